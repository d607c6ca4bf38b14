"""Decomposition on local threads: ``decompose_all`` with concurrent eighs (torch threads > 1; the suite runs with
one) against the sequential path: same factors, shared ``A`` kept, a low-rank ``G``'s Gram computed before the
pool, ``on_layer`` once per layer as it finishes, errors in layer order, thread count restored.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch

import kronfisher as kf
import kronfisher.decompose.local as local
from conftest import make_model, random_ids
from kronfisher.collection.sums import LowRankSum
from kronfisher.decompose.entry import decompose_all


def decompose_both_ways(sums: dict[str, Any], cfg: Any) -> tuple[dict[str, Any], dict[str, Any], int]:
    """``decompose_all`` with one torch thread (sequential) and with two (concurrent eighs, Grams first).

    Returns ``(sequential, concurrent, threads seen right after the concurrent call)``; the count is restored.
    """
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        seq = decompose_all(sums, cfg)
        torch.set_num_threads(2)
        par = decompose_all(sums, cfg)
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    return seq, par, after


def assert_same_factors(seq: dict[str, Any], par: dict[str, Any]) -> None:
    """Same layers, ranks and factors: the same float64 matrices through the same eigh agree to round-off
    (1e-12 of the largest entry)."""
    assert list(par) == list(seq)
    for name in seq:
        for side in ("A", "G"):
            a, b = getattr(seq[name], side), getattr(par[name], side)
            assert a.rank == b.rank, (name, side)
            ref = a.to_dense()
            assert float((b.to_dense() - ref).abs().max()) <= 1e-12 * float(ref.abs().max()), (name, side)


def _tiny_sums(cfg: kf.KFACConfig) -> dict:
    _, collector, _ = kf.collect(make_model("qwen2"), [{"input_ids": random_ids(3, 12)}], cfg)
    return collector.sums


def test_concurrent_decomposition_equals_sequential_and_restores_threads() -> None:
    """``decompose_all`` runs dense eighs concurrently when torch has > 1 thread (the suite runs with 1)."""
    cfg = kf.KFACConfig(accumulate_dtype="float64")
    sums = _tiny_sums(cfg)
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

    cfg = kf.KFACConfig(accumulate_dtype="float64")
    sums = _tiny_sums(cfg)
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
        decompose_all(sums, cfg, on_layer=lambda name: calls.append((name, in_pool[0])))
    finally:
        local.as_completed = real
        torch.set_num_threads(before)
    names = [n for n, _ in calls]
    assert sorted(names) == sorted(sums) and len(names) == len(set(names))
    assert any(during for _, during in calls)  # every factor here is dense, so all jobs run in the pool


def test_concurrent_decomposition_raises_for_the_first_bad_layer_in_order() -> None:
    cfg = kf.KFACConfig(accumulate_dtype="float64")
    sums = _tiny_sums(cfg)
    names = list(sums)
    for bad in (names[5], names[2]):  # two poisoned layers; the error names the first in model order
        sums[bad].A.sum[0, 0] = float("nan")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with pytest.raises(kf.DecompositionError, match=re.escape(repr(names[2]))):
            decompose_all(sums, cfg)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


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


@pytest.mark.parametrize("threads", [1, 2])
def test_release_frees_each_dense_sum_and_keeps_the_factors(threads: int) -> None:
    """``release=True`` (a grouped run): the same factors as without it (1e-12, float64), sequential and on the
    thread pool; afterwards every dense sum, shared ``A`` rows included, is freed and refuses a read, while a
    low-rank ``G`` keeps the columns its eigenbasis reads."""
    cfg = kf.KFACConfig(accumulate_dtype="float64", lowrank_layers=(r"mlp\.up_proj",))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        kept = decompose_all(_tiny_sums(cfg), cfg)
        sums = _tiny_sums(cfg)
        freed = decompose_all(sums, cfg, release=True)
    finally:
        torch.set_num_threads(before)
    assert_same_factors(kept, freed)
    lowrank = [n for n, s in sums.items() if isinstance(s.G, LowRankSum)]
    assert lowrank and all(sums[n].G.num_columns > 0 for n in lowrank)
    for name, layer in sums.items():
        parts = [layer.A] + ([] if name in lowrank else [layer.G])
        for part in parts:
            assert part.released and part.count > 0 and not part.rows, name
            with pytest.raises(kf.KronfisherError, match="freed once decomposed"):
                _ = part.sum
