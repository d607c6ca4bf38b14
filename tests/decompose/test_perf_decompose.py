"""The decomposition fast paths of the benchmark issue (issue 6) give the answers of the plain formulas.

* :func:`kronfisher.decompose.layer.symmetric_mean` is bit for bit the naive ``(S + Sᵀ) / 2c``, also for a sum
  that is not symmetric, and :func:`kronfisher.algebra.eigen.safe_eigh` with ``symmetric=True`` is bit for bit the
  default on an exactly symmetric matrix (the skipped symmetrisation is the identity there).
* :func:`kronfisher.decompose.layer.shared_A_owners` (bucketed by the diagonal) equals the all-pairs ``torch.equal``
  plan,
  including sums that agree on the diagonal but not elsewhere.
* :func:`kronfisher.decompose.entry.decompose_all` with a low-rank ``G`` whose Gram is computed before the concurrent
  eighs
  equals the sequential path, and the low-rank eigenform equals the dense eigendecomposition of ``U Uᵀ`` (float64).
"""

from __future__ import annotations

import importlib

import torch

import kronfisher as kf
from conftest import assert_same_factors, decompose_both_ways
from kronfisher.collection.sums import DenseSum, LowRankSum

factors = importlib.import_module("kronfisher.decompose.layer")
entry = importlib.import_module("kronfisher.decompose.entry")
linalg = importlib.import_module("kronfisher.algebra.eigen")


def _all_pairs_owners(sums: dict) -> dict[str, str]:
    """The reference plan: each layer's first earlier layer with an identical ``A`` sum (shape, count, values)."""
    owner: dict[str, str] = {}
    firsts: list[tuple[str, DenseSum]] = []
    for name, layer in sums.items():
        owner[name] = name
        for first, a in firsts:
            b = layer.A
            if a.sum.shape == b.sum.shape and a.count == b.count and torch.equal(a.sum, b.sum):
                owner[name] = first
                break
        else:
            firsts.append((name, layer.A))
    return owner


def _tiny_sums(cfg: kf.KFACConfig) -> dict:
    from conftest import make_model, random_ids

    _, collector, _ = kf.collect(make_model("qwen2"), [{"input_ids": random_ids(3, 12)}], cfg)
    return collector.sums


def test_symmetric_mean_is_bitwise_the_dense_mean() -> None:
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        s = DenseSum(37, dtype)
        s.add(torch.randn(37, 37, generator=gen, dtype=dtype), 5.0)  # deliberately not symmetric
        got = factors.symmetric_mean(s)
        ref = (s.sum.double() + s.sum.double().t()) / (2.0 * s.count)
        assert got.dtype == torch.float64 and torch.equal(got, ref)  # bitwise: addition commutes
        assert torch.equal(got, got.t())
        assert s.sum.dtype == dtype and not torch.equal(s.sum, s.sum.t())  # the sum itself is untouched
    empty = DenseSum(4, torch.float32)
    assert torch.equal(factors.symmetric_mean(empty), torch.zeros(4, 4, dtype=torch.float64))


def test_safe_eigh_skipping_symmetrisation_is_bitwise_identical_on_symmetric_input() -> None:
    x = torch.randn(64, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    m = (x.t() @ x + (x.t() @ x).t()) / 2  # exactly symmetric
    v0, q0 = linalg.safe_eigh(m, name="l", factor="A", dtype=torch.float64)
    v1, q1 = linalg.safe_eigh(m, name="l", factor="A", dtype=torch.float64, symmetric=True)
    assert torch.equal(v0, v1) and torch.equal(q0, q1)


def test_shared_A_owners_equals_the_all_pairs_plan() -> None:
    sums = _tiny_sums(kf.KFACConfig(accumulate_dtype="float64"))
    names = list(sums)
    # A decoy: the same diagonal as the q/k/v input sum but one different off-diagonal entry (same bucket).
    q = "model.layers.0.self_attn.q_proj"
    decoy = names[-1]
    sums[decoy].A.sum = sums[q].A.sum.clone()
    sums[decoy].A.count = sums[q].A.count
    sums[decoy].A.sum[0, 1] += 1.0
    got, ref = factors.shared_A_owners(sums), _all_pairs_owners(sums)
    assert got == ref
    assert got["model.layers.0.self_attn.k_proj"] == q and got[decoy] == decoy
    assert sum(v != k for k, v in got.items()) >= 4  # q/k/v and gate/up share in both layers


def test_concurrent_decomposition_with_lowrank_gram_equals_sequential_and_dense() -> None:
    cfg = kf.KFACConfig(accumulate_dtype="float64", lowrank_threshold=30)  # lm_head (out = vocab) is low-rank
    sums = _tiny_sums(cfg)
    low = [n for n, s in sums.items() if isinstance(s.G, LowRankSum)]
    assert low, "the tiny model must have a low-rank G for this test"
    seq, par, threads = decompose_both_ways(sums, cfg)  # two threads: Grams first, then every eigh concurrently
    assert threads == 2
    assert_same_factors(seq, par)
    for name in low:
        u = sums[name].G.factor_U(torch.float64)  # [out, T]
        dense = u @ u.t()  # the exact G = U Uᵀ
        got = par[name].G.to_dense()
        # Low-rank eigenform from the Gram against the exact dense G: float64 round-off (1e-10 relative).
        assert float((got - dense).abs().max()) <= 1e-10 * float(dense.abs().max())


def test_ekfac_span_commit_equals_the_batched_formula() -> None:
    """``EigenCorrector._add_span`` (per-sequence products into a reused scratch, added in place at commit) is
    ``Σ_b (z_bᵀ y_b)²``, and ``z²ᵀ y²`` for token granularity; into a float32 sum from float64 projections too."""
    from kronfisher.collection.corrector import EigenCorrector

    corrector = EigenCorrector({}, {}, kf.KFACConfig())
    gen = torch.Generator().manual_seed(2)
    for b, s, r, a in ((1, 5, 4, 3), (3, 7, 6, 5), (4, 2, 9, 8), (2, 7, 6, 5)):  # the last reuses a larger scratch
        z = torch.randn(b, s, r, generator=gen, dtype=torch.float64)
        y = torch.randn(b, s, a, generator=gen, dtype=torch.float64)
        ref = torch.einsum("bsr,bsa->bra", z, y).square().sum(0)
        got = torch.ones(r, a, dtype=torch.float64)
        corrector._add_span(got, z, y)
        # float64 products summed in another order: 1e-13 relative (on top of the sum's previous content).
        assert float((got - 1 - ref).abs().max()) <= 1e-13 * float(ref.abs().max())
        single = torch.zeros(r, a, dtype=torch.float32)
        corrector._add_span(single, z, y)
        assert float((single.double() - ref).abs().max()) <= 1e-6 * float(ref.abs().max())
        flat_z, flat_y = z.reshape(-1, r).square(), y.reshape(-1, a).square()
        token = torch.zeros(r, a, dtype=torch.float64)
        corrector._add_span(token, flat_z, flat_y)
        torch.testing.assert_close(token, flat_z.t() @ flat_y, rtol=1e-13, atol=0)
    empty = torch.zeros(4, 2)
    corrector._add_span(empty, torch.zeros(0, 3, 4), torch.zeros(0, 3, 2))
    assert torch.equal(empty, torch.zeros(4, 2))


def test_gram_with_scale_equals_gram_of_scaled_rows() -> None:
    """``accumulate.gram(rows, augment, dtype, scale=s)`` (``s²`` as the GEMM's alpha) is the Gram of ``s · rows``."""
    from kronfisher.algebra.gram import gram

    gen = torch.Generator().manual_seed(3)
    for n, d in ((7, 5), (50, 400), (33, 800)):  # 400 and 800 cross the symmetric tile (384)
        rows = torch.randn(n, d, generator=gen, dtype=torch.float64)
        for augment in (False, True):
            for s in (1.0, 3.5, 1e-3):
                ref = gram(rows * s, augment, torch.float64)
                got = gram(rows, augment, torch.float64, scale=s)
                # float64, a rounding of the scale moved into the product: 1e-13 relative.
                assert float((got - ref).abs().max()) <= 1e-13 * float(ref.abs().max())
                if s == 1.0:
                    assert torch.equal(got, got.t())  # mirrored strips: exactly symmetric
                else:  # alpha = s² inside the GEMM: symmetric to rounding (1e-15 relative)
                    assert float((got - got.t()).abs().max()) <= 1e-15 * float(got.abs().max())


def test_lowrank_layers_equal_dense_when_tokens_below_out() -> None:
    """With ``T < out`` the ``[T, T]`` path (``lowrank_layers``) gives the dense K-FAC and EK-FAC blocks.

    benchmarks/README.md cites this for the ``T < d`` discussion: same data in both passes, float64 storage of ``U``.
    """
    from conftest import make_model, random_ids

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
