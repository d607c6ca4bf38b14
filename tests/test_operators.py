"""Operator identities against dense references (docs/concepts.md).

Every operator works in the Kronecker eigenbasis; here each result is compared with a dense matrix built from the
factors (``fisher.factors``) or the undamped block (``fisher.to_dense``) on tiny float64 models, solved or
multiplied densely. The row-major flattening of ``V = [W | b]`` (docs/concepts.md) is rebuilt here independently of
:mod:`kronfisher.layers`. Tolerances are relative to the largest entry of the reference unless stated.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

import kronfisher as kf
from conftest import make_model, random_ids, right_pad
from kronfisher.algebra.damping import pi_factor
from kronfisher.drivers.ekfac import correct
from kronfisher.layers import LayerInfo

CFG = kf.KFACConfig(accumulate_dtype="float64", damping=1e-2)
# q_proj: bias (augmented A); down_proj: no bias, in != out; lm_head: the widest output.
LAYERS = ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head")


def batches() -> list[dict[str, Tensor]]:
    ids = random_ids(3, 9, seed=11)
    return [right_pad([ids[0], ids[1, :6], ids[2, :4]]), {"input_ids": random_ids(2, 8, seed=12)}]


@pytest.fixture(scope="module")
def qwen() -> nn.Module:
    return make_model("qwen2")


@pytest.fixture(scope="module")
def kfac(qwen: nn.Module) -> kf.KFAC:
    return kf.fit(qwen, batches(), CFG)


@pytest.fixture(scope="module")
def ekfac(qwen: nn.Module) -> kf.KFAC:
    fisher = kf.fit(qwen, batches(), CFG.replace(ekfac=True))
    assert fisher.is_ekfac
    return fisher


def with_cfg(fisher: kf.KFAC, **changes: object) -> kf.KFAC:
    """The same decomposed blocks under another configuration (damping is applied at use, docs/concepts.md)."""
    return kf.KFAC(fisher.infos, fisher.blocks, fisher.cfg.replace(**changes))


def random_vectors(fisher: kf.KFAC, model: nn.Module, seed: int = 0) -> dict[str, Tensor]:
    """A random tensor with the parameter's shape for every tracked parameter."""
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    out = {}
    for name in fisher.layer_names:
        info = fisher.infos[name]
        for pname in (info.weight_name, info.bias_name):
            if pname:
                out[pname] = torch.randn(params[pname].shape, generator=gen, dtype=torch.float64)
    return out


def vec(info: LayerInfo, vectors: dict[str, Tensor]) -> Tensor:
    """Row-major ``vec([W | b])`` with ``W`` as ``[out, in]`` (Conv1D transposed); a missing bias is a zero column."""
    w = vectors[info.weight_name]
    w = w.t() if info.kind == "conv1d" else w
    if info.bias_name:
        b = vectors.get(info.bias_name, torch.zeros(info.out_features, dtype=w.dtype))
        w = torch.cat([w, b[:, None]], dim=1)
    return w.reshape(-1)


def unvec(info: LayerInfo, x: Tensor) -> tuple[Tensor, Tensor | None]:
    """Weight (module layout) and bias from a row-major flat ``V``."""
    v = x.reshape(info.out_features, -1)
    w = v[:, : info.in_features]
    w = w.t() if info.kind == "conv1d" else w
    return w, (v[:, info.in_features] if info.bias_name else None)


def rel(x: Tensor, ref: Tensor) -> float:
    return float((x - ref).abs().max() / ref.abs().max())


def eye_like(m: Tensor) -> Tensor:
    return torch.eye(m.shape[0], dtype=m.dtype)


def damped_fn(m: Tensor, shift: float, kappa: float | None = None) -> Tensor:
    """``Q f(λ) Qᵀ`` with ``f(λ) = max(λ + shift, max(λ + shift)/κ)`` from a dense eigh (docs/concepts.md)."""
    lam, q = torch.linalg.eigh((m + m.t()) / 2)
    lam = lam.clamp_min(0.0) + shift
    if kappa is not None:
        lam = lam.clamp_min(lam.max() / kappa)
    return (q * lam) @ q.t()


def check_against(fisher: kf.KFAC, model: nn.Module, dense: dict[str, Tensor], p: float, tol: float) -> None:
    """``fisher.power(v, p)`` (or natural_gradient for p=-1) equals ``dense[name]^p vec(V)`` for every layer."""
    v = random_vectors(fisher, model)
    out = fisher.natural_gradient(v) if p == -1 else fisher.power(v, p)
    for name, m in dense.items():
        info = fisher.infos[name]
        x = vec(info, v)
        ref = torch.linalg.solve(m, x) if p == -1 else m @ x
        w, b = unvec(info, ref)
        assert rel(out[info.weight_name], w) < tol, name
        if b is not None:
            assert rel(out[info.bias_name], b) < tol, name


@pytest.mark.parametrize("use_ekfac", [False, True])
@pytest.mark.parametrize("p", [1.0, -1.0, -0.5, 0.5, 2.0])
def test_power_round_trip(kfac: kf.KFAC, ekfac: kf.KFAC, qwen: nn.Module, p: float, use_ekfac: bool) -> None:
    """``power(power(v, p), -p) == v`` for every layer (damped spectrum, δ = 1e-2)."""
    fisher = ekfac if use_ekfac else kfac
    v = random_vectors(fisher, qwen, seed=3)
    back = fisher.power(fisher.power(v, p), -p)
    assert set(back) == set(v)
    for name, t in v.items():
        # Condition number of (F + δ)^|p| is at most ~1e4 here: 1e-9 relative in float64.
        assert rel(back[name], t) < 1e-9, name


def test_natural_gradient_factored_dense_solve(kfac: kf.KFAC, qwen: nn.Module) -> None:
    """Factored damping: ``((G + δ_G I) ⊗ (A + δ_A I))^{-1} vec(V)`` with separate ``δ_A``, ``δ_G``."""
    d_a, d_g = 3e-3, 2e-2
    fisher = with_cfg(kfac, damping_mode="factored", damping_A=d_a, damping_G=d_g)
    dense = {}
    for name in LAYERS:
        a, g = kfac.factors(name)
        dense[name] = torch.kron(g + d_g * eye_like(g), a + d_a * eye_like(a))
    check_against(fisher, qwen, dense, -1, 1e-8)  # dense solve in float64, condition <= ~1e5


def test_natural_gradient_pi_damping(kfac: kf.KFAC, qwen: nn.Module) -> None:
    """Pi damping (Martens & Grosse 2015 §6.3): ``π² = (tr A/dim A)/(tr G/dim G)``, ``δ_A = π√δ``, ``δ_G = √δ/π``."""
    delta = 1e-2
    fisher = with_cfg(kfac, damping_mode="pi", damping=delta)
    dense = {}
    for name in LAYERS:
        a, g = kfac.factors(name)
        pi = math.sqrt((float(a.trace()) / a.shape[0]) / (float(g.trace()) / g.shape[0]))
        assert abs(pi_factor(kfac.block(name)) - pi) < 1e-10 * pi  # traces in float64
        root = math.sqrt(delta)
        dense[name] = torch.kron(g + (root / pi) * eye_like(g), a + (pi * root) * eye_like(a))
    check_against(fisher, qwen, dense, -1, 1e-8)


@pytest.mark.parametrize("use_ekfac", [False, True])
def test_natural_gradient_exact_damping(kfac: kf.KFAC, ekfac: kf.KFAC, qwen: nn.Module, use_ekfac: bool) -> None:
    """Exact damping: ``(F + δ I)^{-1}`` with ``F = G ⊗ A`` (from the factors) or the EK-FAC block (``to_dense``)."""
    delta = 1e-3
    base = ekfac if use_ekfac else kfac
    fisher = with_cfg(base, damping_mode="exact", damping=delta)
    dense = {}
    for name in LAYERS:
        if use_ekfac:
            f = base.to_dense(name)
        else:
            a, g = base.factors(name)
            f = torch.kron(g, a)
        dense[name] = f + delta * eye_like(f)
    check_against(fisher, qwen, dense, -1, 1e-7)  # condition up to ~1e6 with δ = 1e-3


@pytest.mark.parametrize("mode", ["factored", "pi"])
def test_ekfac_damping_adds_delta_to_corrected_eigenvalues(ekfac: kf.KFAC, qwen: nn.Module, mode: str) -> None:
    """EK-FAC damping is ``Λ* + δ`` in the Kronecker eigenbasis, whatever the factored/pi mode says
    (pi mode warns that it has no effect)."""
    from kronfisher.errors import ConfigWarning

    delta = 2e-3
    if mode == "pi":
        with pytest.warns(ConfigWarning, match="no effect"):
            fisher = with_cfg(ekfac, damping_mode=mode, damping=delta)
    else:
        fisher = with_cfg(ekfac, damping_mode=mode, damping=delta)
    dense = {n: ekfac.to_dense(n) + delta * eye_like(ekfac.to_dense(n)) for n in LAYERS}
    check_against(fisher, qwen, dense, -1, 1e-7)


@pytest.mark.parametrize("use_ekfac", [False, True])
def test_fvp_is_dense_block_times_vector(kfac: kf.KFAC, ekfac: kf.KFAC, qwen: nn.Module, use_ekfac: bool) -> None:
    """``fvp(V) == to_dense(name) @ vec(V)`` (undamped), and ``damped=True`` adds ``δ vec(V)``."""
    fisher = ekfac if use_ekfac else kfac
    dense = {n: fisher.to_dense(n) for n in LAYERS}
    v = random_vectors(fisher, qwen, seed=5)
    plain = fisher.fvp(v)
    damped = with_cfg(fisher, damping_mode="exact", damping=0.1).fvp(v, damped=True)
    for name, m in dense.items():
        info = fisher.infos[name]
        x = vec(info, v)
        for out, ref in ((plain, m @ x), (damped, m @ x + 0.1 * x)):
            w, b = unvec(info, ref)
            assert rel(out[info.weight_name], w) < 1e-10, name  # one float64 product
            if b is not None:
                assert rel(out[info.bias_name], b) < 1e-10, name
    if not use_ekfac:  # K-FAC: the dense block is G ⊗ A of the factors (docs/library.md)
        a, g = fisher.factors(LAYERS[0])
        assert rel(fisher.to_dense(LAYERS[0]), torch.kron(g, a)) < 1e-12


def test_condition_number_cap_factored(kfac: kf.KFAC, qwen: nn.Module) -> None:
    """Per factor, after damping, eigenvalues below ``λmax/κ`` are raised to it; δ is still added."""
    d_a, d_g, kappa = 1e-3, 2e-3, 30.0
    fisher = with_cfg(kfac, damping_A=d_a, damping_G=d_g, max_condition_number=kappa)
    dense = {}
    for name in LAYERS:
        a, g = kfac.factors(name)
        dense[name] = torch.kron(damped_fn(g, d_g, kappa), damped_fn(a, d_a, kappa))
    check_against(fisher, qwen, dense, -1, 1e-9)  # condition <= κ² = 900

    # The cap binds here (κ = 30 is far below the undamped condition) and never replaces δ: the cap-only
    # operator and the damped-only operator both differ from the capped damped one.
    v = random_vectors(fisher, qwen, seed=8)
    w = kfac.infos[LAYERS[1]].weight_name
    capped = fisher.natural_gradient(v)[w]
    cap_only = with_cfg(kfac, damping=0.0, damping_A=0.0, damping_G=0.0, max_condition_number=kappa)
    damp_only = with_cfg(kfac, damping_A=d_a, damping_G=d_g)
    assert rel(cap_only.natural_gradient(v)[w], capped) > 1e-3
    assert rel(damp_only.natural_gradient(v)[w], capped) > 1e-1


@pytest.mark.parametrize("use_ekfac", [False, True])
def test_condition_number_cap_exact(kfac: kf.KFAC, ekfac: kf.KFAC, qwen: nn.Module, use_ekfac: bool) -> None:
    """Exact mode: the cap acts on the damped Kronecker (or EK-FAC) eigenvalues ``λ + δ``."""
    base = ekfac if use_ekfac else kfac
    delta, kappa = 1e-3, 100.0
    fisher = with_cfg(base, damping_mode="exact", damping=delta, max_condition_number=kappa)
    dense = {n: damped_fn(base.to_dense(n), delta, kappa) for n in LAYERS}
    check_against(fisher, qwen, dense, -1, 1e-9)  # condition <= κ = 100, float64 eigh of the block


def test_negative_power_of_singular_factor_raises(qwen: nn.Module) -> None:
    """``p < 0`` with zero damping on a singular factor raises SpectrumError naming the layer.

    Five tokens make ``A`` of down_proj (in = 24) singular; softmax gradients make ``G`` of lm_head singular
    (``G 1 = 0``) with a null eigenvalue that round-off can leave slightly positive (seed 1 below does).
    """
    few = kf.fit(qwen, [{"input_ids": random_ids(1, 5, seed=2)}], CFG.replace(damping=0.0))
    v = random_vectors(few, qwen)
    with pytest.raises(kf.SpectrumError, match="down_proj"):
        few.natural_gradient({"model.layers.1.mlp.down_proj.weight": v["model.layers.1.mlp.down_proj.weight"]})
    with pytest.raises(kf.SpectrumError, match="down_proj"):
        few.power({"model.layers.1.mlp.down_proj.weight": v["model.layers.1.mlp.down_proj.weight"]}, -0.5)
    model = make_model("llama", seed=1)
    many = kf.fit(model, [{"input_ids": random_ids(4, 20, seed=1)}], CFG.replace(damping=0.0))
    a, g = many.factors("lm_head")
    assert torch.linalg.eigvalsh(a).min() > 1e-3  # A is well conditioned: the singularity is G's
    assert float((g @ torch.ones(g.shape[0], dtype=g.dtype)).abs().max()) < 1e-12
    with pytest.raises(kf.SpectrumError, match="lm_head"):
        many.natural_gradient({"lm_head.weight": torch.randn(40, 16, dtype=torch.float64)})
    # Positive powers need no positive spectrum: p = 0.5 of the same singular operator is finite.
    half = many.power({"lm_head.weight": torch.randn(40, 16, dtype=torch.float64)}, 0.5)["lm_head.weight"]
    assert bool(torch.isfinite(half).all())


@pytest.mark.parametrize("use_ekfac", [False, True])
def test_whiten_squared_is_natural_gradient(kfac: kf.KFAC, ekfac: kf.KFAC, qwen: nn.Module, use_ekfac: bool) -> None:
    """``whiten(whiten(g)) == natural_gradient(g)`` (``p = -1/2`` twice is ``p = -1``)."""
    fisher = ekfac if use_ekfac else kfac
    g = random_vectors(fisher, qwen, seed=9)
    twice = fisher.whiten(fisher.whiten(g))
    ng = fisher.natural_gradient(g)
    for name in g:
        assert rel(twice[name], ng[name]) < 1e-9, name  # float64, condition <= ~1e4


def test_bias_is_augmented_column_missing_bias_is_zero(kfac: kf.KFAC, qwen: nn.Module) -> None:
    """The bias is the last column of ``V``; a missing bias gradient is a zero column, not returned."""
    name = LAYERS[0]
    info = kfac.infos[name]
    assert info.bias_name is not None
    a, g = kfac.factors(name)
    solve_m = torch.kron(g + 1e-2 * eye_like(g), a + 1e-2 * eye_like(a))
    v = random_vectors(kfac, qwen, seed=4)
    both = {info.weight_name: v[info.weight_name], info.bias_name: v[info.bias_name]}
    out = kfac.natural_gradient(both)
    w, b = unvec(info, torch.linalg.solve(solve_m, vec(info, both)))
    assert rel(out[info.weight_name], w) < 1e-8 and rel(out[info.bias_name], b) < 1e-8
    only_w = {info.weight_name: v[info.weight_name]}
    out_w = kfac.natural_gradient(only_w)
    assert set(out_w) == {info.weight_name}
    w0, _ = unvec(info, torch.linalg.solve(solve_m, vec(info, only_w)))  # vec() puts a zero bias column
    assert rel(out_w[info.weight_name], w0) < 1e-8
    assert rel(out_w[info.weight_name], w) > 1e-3  # the bias couples into the weight: omitting it matters


def test_conv1d_weights_in_in_out_layout() -> None:
    """GPT-2 ``Conv1D`` stores ``W`` as ``[in, out]``; results come back in that layout."""
    model = make_model("gpt2")
    fisher = kf.fit(model, batches(), CFG)
    name = "transformer.h.0.attn.c_attn"
    info = fisher.infos[name]
    assert info.kind == "conv1d" and (info.in_features, info.out_features) == (16, 48)
    v = random_vectors(fisher, model, seed=6)
    assert v[info.weight_name].shape == (16, 48)
    ng = fisher.natural_gradient(v)
    fvp = fisher.fvp(v)
    assert ng[info.weight_name].shape == (16, 48) and ng[info.bias_name].shape == (48,)
    a, g = fisher.factors(name)
    assert a.shape == (17, 17) and g.shape == (48, 48)
    damped = torch.kron(g + 1e-2 * eye_like(g), a + 1e-2 * eye_like(a))
    w, b = unvec(info, torch.linalg.solve(damped, vec(info, v)))  # vec() transposes the Conv1D weight itself
    assert rel(ng[info.weight_name], w) < 1e-8 and rel(ng[info.bias_name], b) < 1e-8
    w, b = unvec(info, torch.kron(g, a) @ vec(info, v))
    assert rel(fvp[info.weight_name], w) < 1e-10 and rel(fvp[info.bias_name], b) < 1e-10


def test_natural_gradient_without_args_reads_model_grad() -> None:
    """``natural_gradient()`` uses the ``.grad`` of the tracked parameters of the fitted model."""
    model = make_model("qwen2")
    fisher = kf.fit(model, batches(), CFG)
    model.zero_grad()
    ids = random_ids(2, 7, seed=13)
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    implicit = fisher.natural_gradient()
    explicit = fisher.natural_gradient(grads)
    assert set(implicit) == set(explicit) and len(implicit) == sum(1 + bool(i.bias_name) for i in fisher.infos.values())
    for name in explicit:
        assert torch.equal(implicit[name], explicit[name])
    # And it really used the gradient: a different .grad gives a different answer.
    model.model.layers[0].self_attn.q_proj.weight.grad.mul_(2.0)
    again = fisher.natural_gradient()
    assert not torch.equal(
        again["model.layers.0.self_attn.q_proj.weight"], implicit["model.layers.0.self_attn.q_proj.weight"]
    )


def test_stale_inverse_cache() -> None:
    """Updating the factors changes the natural gradient, which then equals a fresh fit's; new sums drop EK-FAC
    eigenvalues of the old bases; another damping at use is never served from the cache of the first."""
    model = make_model("qwen2")
    first = [{"input_ids": random_ids(2, 7, seed=30 + i)} for i in range(2)]
    second = [{"input_ids": random_ids(2, 7, seed=40 + i)} for i in range(2)]
    fisher = kf.fit(model, first, CFG)
    g = random_vectors(fisher, model)
    before = fisher.natural_gradient(g)  # fills the spectrum cache
    assert all(fisher.natural_gradient(g)[n].equal(before[n]) for n in g)
    _, more, _ = kf.collect(model, second, CFG)
    for name, sums in fisher.sums.items():
        sums.merge(more.sums[name])
    fisher.update_sums(fisher.sums)
    after = fisher.natural_gradient(g)
    fresh = kf.fit(model, first + second, CFG).natural_gradient(g)
    for name in g:
        assert rel(after[name], before[name]) > 1e-3, name  # the update is visible
        assert rel(after[name], fresh[name]) < 1e-9, name  # float64, merged sums vs one pass

    # EK-FAC: a new correction pass replaces the eigenvalues; the damped inverse follows the new block.
    ek = kf.fit(model, first, CFG.replace(ekfac=True, damping_mode="exact", damping=1e-3))
    before = ek.natural_gradient(g)
    correct(ek, model, second)
    after = ek.natural_gradient(g)
    w = "lm_head.weight"  # the layer whose EK-FAC eigenvalues (up to ~2) dominate δ in these tiny models
    f = ek.to_dense("lm_head")
    ref = torch.linalg.solve(f + 1e-3 * torch.eye(f.shape[0], dtype=f.dtype), g[w].reshape(-1)).reshape(g[w].shape)
    assert rel(after[w], before[w]) > 1e-3
    assert rel(after[w], ref) < 1e-8  # float64 dense solve, condition <= ~1e4

    # New sums on an EK-FAC operator: the corrected eigenvalues belong to the old bases, so they are dropped with a
    # warning and the operator is plain K-FAC of the new sums (never EK-FAC values in a foreign basis).
    with pytest.warns(kf.errors.KronfisherWarning, match="EK-FAC eigenvalues .* dropped"):
        ek.update_sums(fisher.sums)
    assert not ek.is_ekfac and all(ek.block(n).corrected is None for n in ek.layer_names)
    for name in fisher.layer_names:  # the same sums decomposed the same way
        assert torch.equal(ek.block(name).G.values, fisher.block(name).G.values), name

    # A different damping at use is never served from the cache of another damping.
    assert rel(fisher.power(g, -1.0, damping=0.5)[w], fisher.natural_gradient(g)[w]) > 1e-2


def test_no_eigenvalue_correction_keeps_matrix_information() -> None:
    """K-FAC without EK-FAC keeps the factors' eigenbases: its natural gradient is the damped Kronecker solve, far
    from ``grad / damping`` (what identity eigenvectors with constant eigenvalues would give)."""
    model = make_model("llama")
    fisher = kf.fit(model, [{"input_ids": random_ids(2, 7, seed=60 + i)} for i in range(3)], CFG)
    assert not fisher.is_ekfac
    g = random_vectors(fisher, model)
    ng = fisher.natural_gradient(g)
    for name in LAYERS:
        w = f"{name}.weight"
        a, gg = fisher.factors(name)
        m = torch.kron(gg + 1e-2 * eye_like(gg), a + 1e-2 * eye_like(a))
        assert rel(ng[w], torch.linalg.solve(m, g[w].reshape(-1)).reshape(g[w].shape)) < 1e-8  # float64 dense solve
        assert rel(ng[w], g[w] / 1e-2) > 0.5
        block = fisher.block(name)
        assert not torch.allclose(block.A.vectors.abs(), eye_like(block.A.vectors)) and block.A.values.std() > 0
