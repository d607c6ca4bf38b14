"""Invariances of the collected factors (docs/concepts.md).

Padding, batch size, merging sums from disjoint data and the accumulation dtype must not change the factors.
The reference of each test is the same data seen another way, so no expected value comes from the code under test.
Models are the tiny float64 HF models of ``conftest.py``.
"""

from __future__ import annotations

import pytest
import torch

import kronfisher as kf
from conftest import make_model, random_ids, right_pad
from kronfisher.collection.sums import LowRankSum
from kronfisher.operator import KFAC

F64 = kf.KFACConfig(accumulate_dtype="float64")
ATTNS = ("eager", "sdpa")


def left_pad(seqs: list[torch.Tensor], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Left-padded batch with the ``position_ids`` HF's ``generate`` would pass (count of attended tokens)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = s
        mask[i, width - len(s) :] = 1
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


def ragged(seed: int = 1) -> list[torch.Tensor]:
    """Three sequences of lengths 8, 5 and 3."""
    ids = random_ids(3, 8, seed=seed)
    return [ids[0], ids[1, :5], ids[2, :3]]


def unpadded(seqs: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Each sequence as its own batch of one, without a mask."""
    return [{"input_ids": s[None]} for s in seqs]


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest entry error relative to the largest reference entry."""
    return float((x - ref).abs().max() / ref.abs().max().clamp_min(1e-300))


def max_factor_error(fa: KFAC, fb: KFAC) -> float:
    """Largest relative error of ``A`` and ``G`` over every layer (both operators must track the same layers)."""
    assert fa.layer_names == fb.layer_names
    err = 0.0
    for name in fa.layer_names:
        a1, g1 = fa.factors(name)
        a2, g2 = fb.factors(name)
        err = max(err, rel(a1, a2), rel(g1, g2))
    return err


def max_fvp_error(fa: KFAC, fb: KFAC, probes: int = 2) -> float:
    """Largest relative error of ``F v`` for random ``v`` over every layer (basis-independent, no dense block)."""
    assert fa.layer_names == fb.layer_names
    gen = torch.Generator().manual_seed(0)
    err = 0.0
    for _ in range(probes):
        vec = {}
        for name in fa.layer_names:
            info = fa.infos[name]
            vec[info.weight_name] = torch.randn(info.out_features, info.in_features, generator=gen).double()
            if info.kind == "conv1d":
                vec[info.weight_name] = vec[info.weight_name].t().contiguous()
            if info.bias_name:
                vec[info.bias_name] = torch.randn(info.out_features, generator=gen).double()
        out_a, out_b = fa.fvp(vec), fb.fvp(vec)
        err = max(err, *(rel(out_a[k], out_b[k]) for k in out_b))
    return err


@pytest.mark.parametrize("attn", ATTNS)
def test_right_padding_equals_unpadded(model_name: str, attn: str) -> None:
    """A right-padded batch gives the factors of the same sequences unpadded (expand and reduce)."""
    model = make_model(model_name, attn=attn)
    seqs = ragged()
    for approx in ("expand", "reduce"):
        cfg = F64.replace(approx=approx)
        ref = kf.fit(model, unpadded(seqs), cfg)
        padded = kf.fit(model, [right_pad(seqs)], cfg)
        # float64 end to end; only the summation order differs -> 1e-11 relative.
        assert max_factor_error(padded, ref) < 1e-11, (model_name, attn, approx)
        assert padded.report.tokens == ref.report.tokens == 16
        assert padded.report.loss_terms == ref.report.loss_terms == 13


def test_left_padding_equals_unpadded(model_name: str) -> None:
    """Left padding (with position_ids) gives the unpadded factors; pads predict no loss term.

    sdpa only: HF eager attention in float64 turns fully masked query rows (left pads) into NaN that reaches every
    position of the next layer, so the model's own output is non-finite (and kronfisher rightly raises).
    """
    model = make_model(model_name, attn="sdpa")
    seqs = ragged(seed=2)
    for approx in ("expand", "reduce"):
        cfg = F64.replace(approx=approx)
        ref = kf.fit(model, unpadded(seqs), cfg)
        padded = kf.fit(model, [left_pad(seqs)], cfg)
        # The pad just before each sequence must not count as a loss term: N = 7 + 4 + 2.
        assert padded.report.loss_terms == ref.report.loss_terms == 13
        assert max_factor_error(padded, ref) < 1e-11, (model_name, approx)  # float64, summation order only


@pytest.mark.parametrize("model_name", ["gpt2", "llama"])
def test_left_padding_without_position_ids_equals_unpadded(model_name: str) -> None:
    """A left-padded batch *without* position_ids: kronfisher numbers the attended tokens itself (as ``generate``
    does), so GPT-2's absolute positions see each sequence as unpadded. float64, rel 1e-11 (summation order)."""
    model = make_model(model_name, attn="sdpa")
    seqs = ragged(seed=4)
    ref = kf.fit(model, unpadded(seqs), F64)
    batch = left_pad(seqs)
    del batch["position_ids"]
    padded = kf.fit(model, [batch], F64)
    assert padded.report.loss_terms == ref.report.loss_terms
    assert max_factor_error(padded, ref) < 1e-11, model_name


def test_left_padding_eager_nonfinite_is_reported() -> None:
    """The NaN that HF eager attention produces for left padding is caught, not accumulated."""
    model = make_model("llama", attn="eager")
    with pytest.raises(kf.NonFiniteError) as info:
        kf.fit(model, [left_pad(ragged())], F64)
    assert info.value.batch == 0 and info.value.layers


@pytest.mark.parametrize("granularity", ["sequence", "token"])
@pytest.mark.parametrize("model_name", ["qwen2", "gpt2"])
def test_ekfac_padding_invariance(model_name: str, granularity: str) -> None:
    """EK-FAC eigenvalues of a right- or left-padded batch equal those of the unpadded sequences."""
    model = make_model(model_name, attn="sdpa")
    seqs = ragged(seed=3)
    cfg = F64.replace(ekfac=True, ekfac_granularity=granularity)
    ref = kf.fit(model, unpadded(seqs), cfg)
    assert ref.is_ekfac
    for pad in (right_pad, left_pad):
        padded = kf.fit(model, [pad(seqs)], cfg)
        # Compared through F v on random v (basis-independent); float64 -> 1e-10 relative.
        assert max_fvp_error(padded, ref) < 1e-10, (model_name, granularity, pad.__name__)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_batch_size_one_equals_batch_size_eight(approx: str) -> None:
    """Splitting the same eight sequences into batches of 1, 3+5 or 8 gives the same factors."""
    model = make_model("qwen2")
    ids = random_ids(8, 6, seed=4)
    whole = kf.fit(model, [{"input_ids": ids}], F64.replace(approx=approx))
    ones = kf.fit(model, [{"input_ids": ids[i : i + 1]} for i in range(8)], F64.replace(approx=approx))
    split = kf.fit(model, [{"input_ids": ids[:3]}, {"input_ids": ids[3:]}], F64.replace(approx=approx))
    assert max_factor_error(ones, whole) < 1e-11  # float64, summation order only
    assert max_factor_error(split, whole) < 1e-11
    assert ones.report.batches == 8 and whole.report.batches == 1


@pytest.mark.parametrize("lowrank", [False, True])
def test_merged_halves_equal_one_pass(lowrank: bool) -> None:
    """Adding the sums and counts of two disjoint halves equals one pass (DenseSum and LowRankSum)."""
    model = make_model("llama")
    cfg = F64.replace(lowrank_layers=("lm_head",) if lowrank else (), lowrank_dtype="float32")
    batches = [{"input_ids": random_ids(2, 7, seed=s)} for s in range(4)]
    _, first, _ = kf.collect(model, batches[:2], cfg)
    _, second, _ = kf.collect(model, batches[2:], cfg)
    disc, whole, _ = kf.collect(model, batches, cfg)
    for name, sums in first.sums.items():
        sums.merge(second.sums[name])
        ref = whole.sums[name]
        assert sums.A.count == ref.A.count and sums.G.count == ref.G.count and sums.batches == ref.batches == 4
        assert rel(sums.A.sum, ref.A.sum) < 1e-13  # float64 sums, two summation orders
        if isinstance(ref.G, LowRankSum):
            u, u_ref = sums.G.factor_U(torch.float64), ref.G.factor_U(torch.float64)
            assert u.shape == u_ref.shape == (ref.G.dim, 56)  # one column per token, [out, T]
            # U stored in float32 (lowrank_dtype): G = U Uᵀ agrees to float32 round-off.
            assert rel(u @ u.t(), u_ref @ u_ref.t()) < 1e-6
        else:
            assert rel(sums.G.sum, ref.G.sum) < 1e-13
    assert lowrank == isinstance(first.sums["lm_head"].G, LowRankSum)
    merged = KFAC.from_sums(disc.infos, first.sums, cfg)
    fitted = kf.fit(model, batches, cfg)
    # F v of the merged and the one-pass operator: 1e-6 (the float32 low-rank U bounds it).
    assert max_fvp_error(merged, fitted) < 1e-6


def test_float32_accumulation_agrees_with_float64() -> None:
    """``accumulate_dtype`` float32 and float64 give the same factors to float32 precision."""
    model = make_model("gpt2")
    batches = [right_pad(ragged(seed=5)), {"input_ids": random_ids(3, 6, seed=6)}]
    f64 = kf.fit(model, batches, F64)
    f32 = kf.fit(model, batches, kf.KFACConfig(accumulate_dtype="float32"))
    for name in f64.layer_names:
        a32, g32 = f32.factors(name)
        a64, g64 = f64.factors(name)
        assert a32.dtype == torch.float32 and a64.dtype == torch.float64
        # Each entry is rounded to float32 a few times: 1e-5 of the largest entry, and not bit-equal.
        assert rel(a32.double(), a64) < 1e-5 and rel(g32.double(), g64) < 1e-5
