"""Analysis metrics against dense float64 references: spectra with multiplicities (low-rank G with a tail,
EK-FAC), effective rank, top-1 % share, condition numbers, natural gradients, quadratic forms, subspace overlaps.
"""

from __future__ import annotations

import math

import pytest
import torch

import kronfisher as kf
from conftest import make_model, random_ids
from kronfisher.algebra.damping import Damping
from kronfisher.algebra.eigen import Eigen
from kronfisher.analysis import (
    compare_layer,
    condition_number,
    effective_rank,
    factor_spectrum,
    kron_spectrum,
    layer_metrics,
    layer_position,
    natural_gradients,
    subspace_overlap,
    top_share,
)
from kronfisher.analysis.metrics import make_spectrum


def _batches(n: int = 3, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": random_ids(2, 9, seed=seed + i)} for i in range(n)]


@pytest.fixture(scope="module")
def lowrank_fisher() -> tuple[torch.nn.Module, kf.KFAC]:
    """Qwen2 (biases) whose lm_head (out = 40) is low-rank with a token budget of 6: thin G plus a tail."""
    model = make_model("qwen2")
    cfg = kf.KFACConfig(accumulate_dtype="float64", lowrank_layers=("lm_head",), lowrank_max_rank=6, damping=0.05)
    return model, kf.fit(model, _batches(), cfg)


def _dense_eigs(m: torch.Tensor) -> torch.Tensor:
    return torch.linalg.eigvalsh(m).clamp_min(0)


def _erank(v: torch.Tensor) -> float:
    p = v / v.sum()
    p = p[p > 0]
    return math.exp(-float((p * p.log()).sum()))


def test_spectrum_with_multiplicities_equals_the_expanded_one() -> None:
    vals = torch.tensor([5.0, 2.0, 0.5], dtype=torch.float64)
    spec = make_spectrum([(vals, 1.0), (torch.tensor([0.1], dtype=torch.float64), 97.0)])  # D = 100
    expanded = torch.cat([vals, torch.full((97,), 0.1, dtype=torch.float64)])
    assert spec.dim == 100 and spec.trace() == pytest.approx(float(expanded.sum()), rel=1e-14)
    assert effective_rank(spec) == pytest.approx(_erank(expanded), rel=1e-12)
    # top 1 % of 100 values is the largest one
    assert top_share(spec, 0.01) == pytest.approx(5.0 / float(expanded.sum()), rel=1e-14)
    # top 5 % = 5 values: 5 + 2 + 0.5 + 2 x 0.1 (the tail group taken in part)
    assert top_share(spec, 0.05) == pytest.approx(7.7 / float(expanded.sum()), rel=1e-14)
    assert condition_number(spec) == pytest.approx(50.0)
    assert math.isinf(condition_number(make_spectrum([(torch.tensor([1.0, 0.0]), 1.0)])))
    flat = make_spectrum([(torch.ones(8), 1.0)])
    assert effective_rank(flat) == pytest.approx(8.0) and top_share(flat, 0.01) == pytest.approx(1 / 8)


def test_layer_metrics_of_a_lowrank_layer_match_the_dense_block(lowrank_fisher) -> None:
    _, fisher = lowrank_fisher
    block = fisher.block("lm_head")
    assert block.representation == "lowrank" and block.G.rank < block.G.dim and block.G.tail > 0
    row = layer_metrics(fisher, "lm_head")
    a, g = fisher.factors("lm_head")
    f = fisher.to_dense("lm_head")  # includes the tail term (docs/concepts.md)
    fv = _dense_eigs(f)
    # 1e-8: float64 sums and algebra; the dense side materialises the thin basis P and the tail τ (I − P Pᵀ).
    assert row["trace_F"] == pytest.approx(float(fv.sum()), rel=1e-8)
    assert row["trace_G"] == pytest.approx(float(torch.trace(g)), rel=1e-8)
    assert row["effective_rank_F"] == pytest.approx(_erank(fv), rel=1e-8)
    assert row["effective_rank_F"] == pytest.approx(row["effective_rank_A"] * row["effective_rank_G"], rel=1e-8)
    k = math.ceil(0.01 * fv.numel())
    share = float(fv.sort(descending=True).values[:k].sum() / fv.sum())
    assert row["top1pct_trace_share"] == pytest.approx(share, rel=1e-8)
    assert row["top_eigenvalues_G"] == pytest.approx(_dense_eigs(g).sort(descending=True).values[:5].tolist(), rel=1e-8)
    eye = torch.eye
    damped = torch.kron(g + 0.05 * eye(g.shape[0], dtype=g.dtype), a + 0.05 * eye(a.shape[0], dtype=a.dtype))
    dv = torch.linalg.eigvalsh(damped)
    assert row["condition_number_damped"] == pytest.approx(float(dv[-1] / dv[0]), rel=1e-8)


@pytest.mark.parametrize("mode", ["exact", "pi"])
def test_damped_spectrum_follows_the_damping_mode(lowrank_fisher, mode: str) -> None:
    _, fisher = lowrank_fisher
    name = "model.layers.0.mlp.up_proj"
    a, g = fisher.factors(name)
    d = 0.05
    if mode == "exact":
        ref = _dense_eigs(fisher.to_dense(name)) + d
    else:  # Martens & Grosse 2015 §6.3
        pi = math.sqrt((float(torch.trace(a)) / a.shape[0]) / (float(torch.trace(g)) / g.shape[0]))
        da, dg = pi * math.sqrt(d), math.sqrt(d) / pi
        ref = torch.kron(_dense_eigs(g) + dg, _dense_eigs(a) + da)
    spec = kron_spectrum(fisher.block(name), Damping(mode, d, d, d), name)
    assert condition_number(spec) == pytest.approx(float(ref.max() / ref.min()), rel=1e-8)


def test_ekfac_spectrum_is_the_corrected_one() -> None:
    model = make_model("gpt2")
    cfg = kf.KFACConfig(accumulate_dtype="float64", ekfac=True, lowrank_layers=("lm_head",), lowrank_max_rank=5)
    fisher = kf.fit(model, _batches(), cfg)
    for name in ("transformer.h.0.attn.c_attn", "lm_head"):
        spec = kron_spectrum(fisher.block(name))
        fv = _dense_eigs(fisher.to_dense(name))
        assert spec.trace() == pytest.approx(float(fv.sum()), rel=1e-8)
        assert effective_rank(spec) == pytest.approx(_erank(fv), rel=1e-8)
        k_share = layer_metrics(fisher, name)["top1pct_trace_share"]
        k = math.ceil(0.01 * fv.numel())
        assert k_share == pytest.approx(float(fv.sort(descending=True).values[:k].sum() / fv.sum()), rel=1e-8)


def test_natural_gradients_equal_a_dense_solve(lowrank_fisher) -> None:
    _, fisher = lowrank_fisher
    gen = torch.Generator().manual_seed(0)
    grads = {n: torch.randn(fisher.infos[n].v_shape, generator=gen, dtype=torch.float64) for n in fisher.layer_names}
    nat = natural_gradients(fisher, grads)
    for name in ("model.layers.1.self_attn.k_proj", "lm_head"):
        a, g = fisher.factors(name)
        eye_g, eye_a = torch.eye(g.shape[0], dtype=g.dtype), torch.eye(a.shape[0], dtype=a.dtype)
        damped = torch.kron(g + 0.05 * eye_g, a + 0.05 * eye_a)
        ref = torch.linalg.solve(damped, grads[name].reshape(-1)).reshape(grads[name].shape)
        torch.testing.assert_close(nat[name], ref, rtol=1e-7, atol=1e-10)


def test_quadratic_form_and_overlaps(lowrank_fisher) -> None:
    _, fisher = lowrank_fisher
    gen = torch.Generator().manual_seed(1)
    for name in ("model.layers.0.self_attn.q_proj", "lm_head"):
        info = fisher.infos[name]
        v = torch.randn(info.v_shape, generator=gen, dtype=torch.float64)
        dv = 1e-2 * torch.randn(info.v_shape, generator=gen, dtype=torch.float64)
        row = compare_layer(fisher, name, v, v + dv, fisher, k=4)
        ref = 0.5 * float(dv.reshape(-1) @ fisher.to_dense(name) @ dv.reshape(-1))
        assert row["quadratic_form"] == pytest.approx(ref, rel=1e-8)
        assert row["relative_change"] == pytest.approx(float(dv.norm() / v.norm()), rel=1e-12)
        assert row["overlap_A"] == pytest.approx(1.0, abs=1e-12) and row["overlap_G"] == pytest.approx(1.0, abs=1e-12)


def test_subspace_overlap_of_rotated_bases() -> None:
    """Two bases sharing 2 of their top-3 directions, the third rotated by θ: overlap (2 + cos²θ) / 3."""
    theta = 0.3
    q = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))[0]
    vals = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], dtype=torch.float64)  # ascending, as eigh returns them
    a = Eigen(q, vals)
    r = torch.eye(6, dtype=torch.float64)
    c, s = math.cos(theta), math.sin(theta)
    r[3, 3], r[3, 0], r[0, 3], r[0, 0] = c, s, -s, c  # rotates the 3rd-largest direction (index 3) with index 0
    b = Eigen(q @ r, vals)
    assert subspace_overlap(a, b, 3) == pytest.approx((2 + c * c) / 3, rel=1e-12)
    assert subspace_overlap(a, a, 6) == pytest.approx(1.0, rel=1e-12)


def test_factor_spectrum_counts_the_tail(lowrank_fisher) -> None:
    _, fisher = lowrank_fisher
    g = fisher.block("lm_head").G
    spec = factor_spectrum(g)
    assert spec.dim == g.dim and spec.trace() == pytest.approx(g.trace(), rel=1e-12)


def test_layer_position() -> None:
    assert layer_position("model.layers.12.self_attn.q_proj") == (12, "self_attn.q_proj")
    assert layer_position("transformer.h.0.mlp.c_fc") == (0, "mlp.c_fc")
    assert layer_position("lm_head") == (None, "lm_head")


def test_models_with_no_layer_in_common_are_not_comparable() -> None:
    """A comparison of models that share no layer (name and shape) is an error, not ``½ΔθᵀFΔθ = 0``; one shared
    layer is enough for a comparison, whose total is that layer's quadratic form."""
    from kronfisher.analysis.run import ModelResult, compare_models, layer_params

    model = make_model("llama")
    batches = _batches(1)

    def result(index: int, include: str) -> ModelResult:
        fisher = kf.fit(model, batches, kf.KFACConfig(accumulate_dtype="float64", include=(include,)))
        return ModelResult(f"m{index}", fisher, layer_params(model, fisher), {"name": f"m{index}", "index": index}, {})

    base, other = result(0, r"self_attn"), result(1, r"mlp")
    with pytest.raises(kf.errors.InputError, match=r"^Models 'm0' and 'm1' are not comparable: no tracked layer"):
        compare_models(base, other, k=2)
    both = result(2, r"layers\.0\.mlp\.up_proj|self_attn\.q_proj")
    comp = compare_models(base, both, k=2)
    assert list(comp["layers"]) and all("q_proj" in n for n in comp["layers"])
    assert comp["total_quadratic_form"] == pytest.approx(0.0, abs=1e-12)  # same weights: Δ = 0
