"""Low-rank layers inside real (tiny) models: EK-FAC, tied lm_head, OOM placement, storage dtypes (docs/concepts.md)."""

from __future__ import annotations

import warnings

import pytest
import torch

import kronfisher as kf
import kronfisher.collection.placement as placement
from conftest import make_model, random_ids
from kronfisher.drivers.ekfac import correct
from kronfisher.errors import PlacementWarning, TiedWeightsWarning
from placement_faults import oom_once, oom_once_after

BATCHES = [{"input_ids": random_ids(2, 6, seed=s)} for s in range(2)]
OTHER = [{"input_ids": random_ids(3, 5, seed=10 + s)} for s in range(2)]
F64 = {"accumulate_dtype": "float64", "lowrank_dtype": "float64", "damping": 0.05}


def _pair(model, **kw):
    dense = kf.fit(model, BATCHES, kf.KFACConfig(**F64, **kw))
    low = kf.fit(model, BATCHES, kf.KFACConfig(**F64, lowrank_layers=("lm_head",), **kw))
    assert low.block("lm_head").representation == "lowrank" and dense.block("lm_head").representation == "dense"
    return dense, low


@pytest.mark.parametrize("granularity", ["sequence", "token"])
def test_ekfac_lowrank_equals_dense_on_the_kfac_data(granularity):
    # Same data in both passes: every per-sample gradient lies in span(P) ⊗ R^a, so the complement carries nothing
    # and the low-rank EK-FAC block equals the dense one exactly (float64, rtol 1e-8).
    model = make_model("qwen2")
    dense, low = _pair(model, ekfac=True, ekfac_granularity=granularity)
    b = low.block("lm_head")
    assert b.G.rank < b.G.dim and b.corrected_tail is not None
    assert float(b.corrected_tail.abs().max()) <= 1e-12 * float(b.corrected.abs().max())
    ref = dense.to_dense("lm_head")
    torch.testing.assert_close(low.to_dense("lm_head"), ref, rtol=1e-8, atol=1e-12 * float(ref.abs().max()))
    v = {"lm_head.weight": torch.randn(40, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))}
    for p in (1.0, -1.0, -0.5):
        torch.testing.assert_close(
            low.power(v, p)["lm_head.weight"], dense.power(v, p)["lm_head.weight"], rtol=1e-8, atol=0
        )


def test_ekfac_lowrank_restricted_to_span_plus_complement_trace_on_other_data():
    # Documented restriction (ekfac.py): on span(P) ⊗ q_j the corrected eigenvalues are the dense ones (same
    # eigenvectors up to sign); on the complement the low-rank block keeps one value per q_j whose total
    # (out − r) · Λ*_⊥j is the dense block's total over the null space of G.
    model = make_model("llama")
    dense, low = _pair(model)
    for f in (dense, low):
        correct(f, model, OTHER)
    bd, bl = dense.block("lm_head"), low.block("lm_head")
    r, out = bl.G.rank, bl.G.dim
    order = torch.argsort(bd.G.values, descending=True)
    gaps = (bl.G.values[:-1] - bl.G.values[1:]) / bl.G.values[0]
    assert float(gaps.min()) > 1e-8  # distinct eigenvalues: eigenvectors are unique up to sign
    torch.testing.assert_close(bd.G.values[order[:r]], bl.G.values, rtol=1e-9, atol=0)
    torch.testing.assert_close(bl.corrected, bd.corrected[order[:r]], rtol=1e-7, atol=1e-12)
    complement = bd.corrected[order[r:]].sum(0)
    assert float(complement.max()) > 0  # the other data does leave span(P): the tail is exercised
    torch.testing.assert_close(bl.corrected_tail * (out - r), complement, rtol=1e-7, atol=1e-14)


def test_tied_lm_head_detected_warned_once_and_named(recwarn, tmp_path):
    model = make_model("qwen2", tie=True)
    warnings.simplefilter("always")
    fisher = kf.fit(model, BATCHES, kf.KFACConfig(**F64, lowrank_layers=("lm_head",), ekfac=True))
    tied = [w for w in recwarn if issubclass(w.category, TiedWeightsWarning)]
    assert len(tied) == 1 and "'lm_head' shares its weight with ['model.embed_tokens.weight']" in str(tied[0].message)
    assert fisher.report.tied == {"lm_head": ["model.embed_tokens.weight"]}
    assert sum("Tied weights" in w for w in fisher.report.warnings) == 1
    assert fisher.report.to_dict()["tied"] == {"lm_head": ["model.embed_tokens.weight"]}

    # .grad of the shared parameter comes back under the lm_head name, from the model or from either key.
    model.zero_grad()
    logits = model(input_ids=BATCHES[0]["input_ids"]).logits
    torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 40), BATCHES[0]["input_ids"][:, 1:].reshape(-1)
    ).backward()
    shared = model.model.embed_tokens.weight.grad
    ng = fisher.natural_gradient()
    assert "lm_head.weight" in ng and "model.embed_tokens.weight" not in ng
    by_alias = fisher.natural_gradient({"model.embed_tokens.weight": shared})
    explicit = fisher.power({"lm_head.weight": shared}, -1.0)
    assert set(by_alias) == {"lm_head.weight"}
    assert torch.equal(ng["lm_head.weight"], explicit["lm_head.weight"])
    assert torch.equal(by_alias["lm_head.weight"], explicit["lm_head.weight"])
    loaded = kf.load(fisher.save(tmp_path / "tied.safetensors"))  # the tie survives a file round trip
    assert loaded.report.tied == fisher.report.tied
    again = loaded.natural_gradient({"model.embed_tokens.weight": shared})
    torch.testing.assert_close(again["lm_head.weight"], explicit["lm_head.weight"], rtol=1e-12, atol=0)

    untied = make_model("qwen2", tie=False)
    recwarn.clear()
    assert kf.fit(untied, BATCHES, kf.KFACConfig(**F64)).report.tied == {}
    assert not [w for w in recwarn if issubclass(w.category, TiedWeightsWarning)]


def test_capture_session_warns_tied_once_across_finalize_calls(recwarn):
    model = make_model("gpt2", tie=True)
    warnings.simplefilter("always")
    with kf.capture(model, kf.KFACConfig(**F64)) as cap:
        for b in BATCHES:
            logits = model(input_ids=b["input_ids"]).logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, 40), b["input_ids"][:, 1:].reshape(-1), reduction="sum"
            )
            cap.backward(loss, num_terms=b["input_ids"][:, 1:].numel(), reduction="sum")
    first, second = cap.finalize(), cap.finalize()
    assert first.report.tied == {"lm_head": ["transformer.wte.weight"]}
    assert len([w for w in recwarn if issubclass(w.category, TiedWeightsWarning)]) == 1
    assert second.report.tied == first.report.tied


@pytest.mark.parametrize("lowrank", [False, True])
def test_injected_oom_moves_the_factor_to_cpu_with_warning_identical_result(monkeypatch, lowrank):
    # The machine has no accelerator: the device is simulated by declaring every device an accelerator, so the
    # fallback logic runs; the CPU path is the same arithmetic, so the factors must be identical.
    model = make_model("qwen2")
    cfg = kf.KFACConfig(**F64, lowrank_layers=("lm_head",) if lowrank else ())
    ref = kf.fit(model, BATCHES, cfg)
    monkeypatch.setattr(placement, "is_accelerator", lambda device: True)
    calls = oom_once(monkeypatch, "run", "lm_head", "G")  # the per-batch G contribution of lm_head
    with pytest.warns(PlacementWarning, match=r"factor G of layer 'lm_head' \(in=16, out=40\)"):
        got = kf.fit(model, BATCHES, cfg)
    assert calls == [True] + [False] * len(BATCHES)  # one failed device attempt, then CPU for every batch
    assert sum("Out of memory" in w for w in got.report.warnings) == 1
    a_ref, g_ref = ref.factors("lm_head")
    a_got, g_got = got.factors("lm_head")
    assert torch.equal(a_got, a_ref) and torch.equal(g_got, g_ref)  # identical, not just close
    v = {"lm_head.weight": torch.ones(40, 16, dtype=torch.float64)}
    assert torch.equal(got.natural_gradient(v)["lm_head.weight"], ref.natural_gradient(v)["lm_head.weight"])


def test_oom_on_cpu_is_not_swallowed(monkeypatch):
    model = make_model("llama")
    oom_once(monkeypatch, "run", "lm_head", "G")
    with pytest.raises(torch.OutOfMemoryError):  # already on CPU: nothing to fall back to
        kf.fit(model, BATCHES, kf.KFACConfig(**F64))


def test_a_factor_oom_falls_back_too(monkeypatch):
    model = make_model("llama")
    cfg = kf.KFACConfig(**F64)
    ref = kf.fit(model, BATCHES, cfg)
    monkeypatch.setattr(placement, "is_accelerator", lambda device: True)
    calls = oom_once(monkeypatch, "run", "model.layers.0.mlp.down_proj", "A")
    with pytest.warns(PlacementWarning, match=r"factor A of layer 'model.layers.0.mlp.down_proj' \(in=24, out=16\)"):
        got = kf.fit(model, BATCHES, cfg)
    assert calls == [True] + [False] * len(BATCHES)
    for name in ref.layer_names:
        assert all(torch.equal(x, y) for x, y in zip(got.factors(name), ref.factors(name))), name


@pytest.mark.parametrize("factor", ["A", "G"])
def test_decomposition_oom_reruns_that_factor_on_cpu(monkeypatch, factor):
    """A real OOM in the eigendecomposition of one dense factor (its float64 copy and the solver's workspace) reruns
    that decomposition on CPU with a PlacementWarning naming layer, factor and size; every block is identical.
    The accelerator is simulated (no GPU here); the injected error is the first run of that decomposition."""
    model = make_model("llama")
    cfg = kf.KFACConfig(**F64)
    ref = kf.fit(model, BATCHES, cfg)
    monkeypatch.setattr(placement, "is_accelerator", lambda device: True)
    what = f"eigendecomposition of factor {factor} of layer 'model.layers.1.mlp.down_proj'"
    calls = oom_once_after(monkeypatch, what)
    dim = 24 if factor == "A" else 16
    match = rf"{what} \({dim} × {dim}\)"
    with pytest.warns(PlacementWarning, match=match):
        got = kf.fit(model, BATCHES, cfg)
    assert calls == [True, False]  # the failed attempt, then the CPU rerun
    for name in ref.layer_names:
        b, r = got.block(name), ref.block(name)
        assert torch.equal(b.A.vectors, r.A.vectors) and torch.equal(b.G.values, r.G.values), name


def test_sum_allocation_oom_puts_that_sum_on_cpu(monkeypatch):
    """The dense sum of one factor does not fit on the (simulated) accelerator at allocation: it is made on CPU,
    that factor's work runs on CPU (PlacementWarning naming layer, in, out, factor) and the factors are identical."""
    model = make_model("llama")
    cfg = kf.KFACConfig(**F64)
    ref = kf.fit(model, BATCHES, cfg)
    monkeypatch.setattr(placement, "is_accelerator", lambda device: True)
    calls = oom_once(monkeypatch, "allocate", "model.layers.0.mlp.gate_proj", "G")
    with pytest.warns(PlacementWarning, match=r"factor G of layer 'model.layers.0.mlp.gate_proj' \(in=16, out=24\)"):
        got = kf.fit(model, BATCHES, cfg)
    assert calls == [True, False]  # the sum on the device failed, then it was made on CPU
    for name in ref.layer_names:
        assert all(torch.equal(x, y) for x, y in zip(got.factors(name), ref.factors(name))), name


def test_decomposition_oom_on_cpu_is_not_swallowed(monkeypatch):
    oom_once_after(monkeypatch, "eigendecomposition of factor")
    with pytest.raises(torch.OutOfMemoryError):  # already on CPU: nothing to fall back to
        kf.fit(make_model("llama"), BATCHES, kf.KFACConfig(**F64))


def test_dense_sum_fold_oom_keeps_the_sum_on_cpu_with_warning(monkeypatch):
    """Rows held by a dense sum are folded into [d, d] when more arrive; that allocation failing on the (simulated)
    accelerator keeps the sum on CPU with a PlacementWarning naming the factor; the factors are identical."""
    model = make_model("llama")
    cfg = kf.KFACConfig(**F64)
    ref = kf.fit(model, BATCHES, cfg)
    monkeypatch.setattr(placement, "is_accelerator", lambda device: True)
    real, seen = torch.zeros, []

    def zeros(*shape, **kw):
        if tuple(shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape) == (24, 24) and not seen:
            seen.append(1)  # the first 24 × 24 sum folded: A of a down_proj (12 rows per batch, 12 ≤ 24 / 2)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 5.00 GiB (injected)")
        return real(*shape, **kw)

    monkeypatch.setattr(torch, "zeros", zeros)
    with pytest.warns(PlacementWarning, match=r"sum of factor A of layer 'model.layers.\d.mlp.down_proj'"):
        got = kf.fit(model, BATCHES, cfg)
    assert seen
    for name in ref.layer_names:
        assert all(torch.equal(x, y) for x, y in zip(got.factors(name), ref.factors(name))), name


def test_lowrank_layers_equal_dense_when_tokens_below_out() -> None:
    """With ``T < out`` the ``[T, T]`` path (``lowrank_layers``) gives the dense K-FAC and EK-FAC blocks.

    benchmarks/README.md cites this for the ``T < d`` discussion: same data in both passes, float64 storage of ``U``.
    """
    model = make_model("qwen2")
    data = [{"input_ids": random_ids(1, 10)}]  # T = 10 tokens < out = 24 of gate/up
    for ekfac in (False, True):
        fits = [
            kf.fit(model, data, kf.KFACConfig(accumulate_dtype="float64", lowrank_dtype="float64", ekfac=ekfac, **kw))
            for kw in ({}, {"lowrank_layers": (r"mlp\.(gate|up)_proj",)})
        ]
        names = [n for n in fits[0].layer_names if "gate_proj" in n or "up_proj" in n]
        assert names and all(fits[1].block(n).representation == "lowrank" for n in names)
        for n in names:
            ref, got = fits[0].to_dense(n), fits[1].to_dense(n)
            # float64 round-off of two eigendecompositions of the same G: 1e-13 relative.
            assert float((got - ref).abs().max()) <= 1e-13 * float(ref.abs().max())
