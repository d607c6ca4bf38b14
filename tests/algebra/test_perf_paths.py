"""The fast paths of the benchmark issue give the same answers as the plain formulas they replace.

* :func:`kronfisher.algebra.eigen.all_finite` (one ``aminmax`` pass) against ``torch.isfinite(t).all()``.
* :func:`kronfisher.algebra.gram.symmetric_gram` (upper block triangle on CPU) against a float64 ``XᵀX`` for sizes that
  cross the tile boundary (the tiny test models never do), with and without the bias augmentation (docs/concepts.md).
* :func:`kronfisher.decompose.entry.decompose_all` with concurrent eighs (torch threads > 1; the suite runs with one)
  against
  the sequential path: same factors, shared ``A`` kept, errors in layer order, thread count restored (docs/concepts.md).
"""

from __future__ import annotations

import importlib
import re

import pytest
import torch

import kronfisher as kf
from conftest import assert_same_factors, decompose_both_ways
from kronfisher.algebra.eigen import all_finite

accumulate = importlib.import_module("kronfisher.algebra.gram")
factors = importlib.import_module("kronfisher.decompose.entry")
local = importlib.import_module("kronfisher.decompose.local")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("pos", [0, 4097, -1])
def test_all_finite_flags_every_non_finite_value(dtype: torch.dtype, bad: float, pos: int) -> None:
    t = torch.randn(97, 61, generator=torch.Generator().manual_seed(0)).to(dtype)
    assert bool(all_finite(t)) and bool(torch.isfinite(t).all())
    t.view(-1)[pos] = bad
    assert bool(all_finite(t)) == bool(torch.isfinite(t).all()) is False


def test_all_finite_edge_cases() -> None:
    assert bool(all_finite(torch.empty(0, 5)))
    assert bool(all_finite(torch.arange(6).reshape(2, 3)))  # integer tensors are finite
    big = torch.full((3, 3), torch.finfo(torch.float32).max)
    assert bool(all_finite(big))  # the largest finite value is finite: no overflow in the check


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("augment", [False, True])
@pytest.mark.parametrize("rows", [0, 1, 300])
def test_symmetric_gram_matches_full_product(dtype: torch.dtype, augment: bool, rows: int) -> None:
    d = 2 * accumulate.GRAM_TILE + 17  # two full tiles and a partial one
    x = torch.randn(rows, d, dtype=dtype, generator=torch.Generator().manual_seed(1))
    g = accumulate.gram(x, augment, torch.float64)
    xa = torch.cat([x, torch.ones(rows, 1, dtype=dtype)], 1) if augment else x
    ref = xa.double().t() @ xa.double()
    # Tolerance: float32 GEMM rounding over ≤ 300 terms (relative to the largest entry); float64 the same at 1e-16.
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    scale = max(float(ref.abs().max()), 1.0)
    assert float((g - ref).abs().max()) <= tol * scale
    assert torch.equal(g, g.t())  # mirrored, so exactly symmetric


def test_symmetric_gram_of_strided_rows_writes_into_a_view() -> None:
    d = accumulate.GRAM_TILE + 5
    x = torch.randn(d, 64, generator=torch.Generator().manual_seed(2)).t()  # [64, d], not contiguous
    out = torch.full((d + 3, d + 3), 7.0)
    accumulate.symmetric_gram(x, out=out[:d, :d])
    ref = x.double().t() @ x.double()
    assert float((out[:d, :d].double() - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    assert bool((out[d:, :] == 7.0).all()) and bool((out[:, d:] == 7.0).all())  # nothing written outside the view


def _sums_of_tiny_qwen() -> tuple[dict, kf.KFACConfig]:
    from conftest import make_model, random_ids

    cfg = kf.KFACConfig(accumulate_dtype="float64")
    model = make_model("qwen2")
    _, collector, _ = kf.collect(model, [{"input_ids": random_ids(3, 12)}], cfg)
    return collector.sums, cfg


def test_concurrent_decomposition_equals_sequential_and_restores_threads() -> None:
    """``decompose_all`` runs dense eighs concurrently when torch has > 1 thread (the suite runs with 1)."""
    sums, cfg = _sums_of_tiny_qwen()
    seq, par, threads = decompose_both_ways(sums, cfg)
    assert threads == 2  # restored after the pool
    assert_same_factors(seq, par)
    q, k = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"
    assert par[q].A is par[k].A  # identical A sums are still decomposed once and shared


def test_concurrent_decomposition_reports_each_layer_once_as_it_finishes() -> None:
    """Progress: with concurrent eighs, ``on_layer`` fires for every layer exactly once, and (at least) the layers
    whose jobs finish in the pool are reported from inside it, so a progress bar moves during the decomposition
    instead of jumping at the end (it showed a 5-hour ETA on SmolLM2)."""
    import concurrent.futures

    sums, cfg = _sums_of_tiny_qwen()
    calls: list[tuple[str, bool]] = []
    in_pool = [False]
    real = concurrent.futures.as_completed

    def spy(futures):  # marks the loop that waits for the pool's jobs
        in_pool[0] = True
        try:
            yield from real(futures)
        finally:
            in_pool[0] = False

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        local.as_completed = spy
        factors.decompose_all(sums, cfg, on_layer=lambda name: calls.append((name, in_pool[0])))
    finally:
        local.as_completed = real
        torch.set_num_threads(before)
    names = [n for n, _ in calls]
    assert sorted(names) == sorted(sums) and len(names) == len(set(names))
    assert any(during for _, during in calls)  # every factor here is dense, so all jobs run in the pool


def test_concurrent_decomposition_raises_for_the_first_bad_layer_in_order() -> None:
    sums, cfg = _sums_of_tiny_qwen()
    names = list(sums)
    for bad in (names[5], names[2]):  # two poisoned layers; the error names the first in model order
        sums[bad].A.sum[0, 0] = float("nan")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with pytest.raises(kf.DecompositionError, match=re.escape(repr(names[2]))):
            factors.decompose_all(sums, cfg)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
