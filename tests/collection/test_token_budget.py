"""Token budget of a low-rank ``G`` (on by default): amortised compression, bounded ``[T, T]`` work, error bound.

Reference: the dense ``G = Wᵀ W / N`` of the rows *as stored*, in float64. The budget keeps ``k`` compressed columns
plus a buffer of ``b`` new ones; each compression sees at most ``k + b`` columns, whatever the batch size.
"""

from __future__ import annotations

import pytest
import torch

import kronfisher as kf
from conftest import make_model, random_ids
from kronfisher.collection.sums import LowRankSum

OUT = 30


def _grads(t: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(t, OUT, generator=gen, dtype=torch.float64) * torch.linspace(0.2, 2.0, OUT, dtype=torch.float64)


def _eigh_sizes(monkeypatch) -> list[tuple[int, torch.dtype]]:
    real, sizes = torch.linalg.eigh, []

    def spy(m, *args, **kw):
        sizes.append((int(m.shape[-1]), m.dtype))
        return real(m, *args, **kw)

    monkeypatch.setattr(torch.linalg, "eigh", spy)
    return sizes


@pytest.mark.parametrize("batch", [3, 17, 100])  # below, near and far above k + b
def test_budget_bounds_memory_and_gram_and_keeps_the_error_bound(monkeypatch, batch):
    k, total = 6, 230
    g = _grads(total, seed=batch)
    s = LowRankSum(OUT, torch.float64, max_rank=k)
    sizes = _eigh_sizes(monkeypatch)
    for start in range(0, total, batch):
        s.add(g[start : start + batch], min(batch, total - start))
        assert s.num_columns <= 2 * k  # k compressed + a buffer of b = k: O(out · k) between batches
    assert s.compressions >= (total - 2 * k) // k  # amortised: one compression per b new columns, not per batch
    eig = s.eigen(dtype=torch.float64)
    assert max(n for n, _ in sizes) <= 2 * k  # no [T, T] work beyond the budget, the decomposition included
    exact = g.t() @ g / total
    assert eig.trace() == pytest.approx(float(torch.trace(exact)), rel=1e-12)  # trace exact (isotropic tail)
    d = eig.discarded
    assert d > 0.05 * float(torch.trace(exact))  # a real truncation: the bound below is not vacuous
    nuclear = float(torch.linalg.svdvals(exact - eig.to_dense()).sum())
    assert 0.5 * d < nuclear <= 2 * d * (1 + 1e-9)  # ‖G − G̃‖_* ≤ 2 × discarded, and of that order


def test_gram_follows_eigh_dtype(monkeypatch):
    sizes = _eigh_sizes(monkeypatch)
    s = LowRankSum(OUT, torch.float32, max_rank=4, gram_dtype=torch.float32)
    s.add(_grads(20, seed=1).float(), 20)
    assert sizes and all(dtype == torch.float32 and n <= 8 for n, dtype in sizes)


def test_default_budget_is_exact_when_tokens_fit():
    # The library default (a budget) and the explicit opt-out (None) give the same factors when T ≤ k.
    model = make_model("qwen2")
    batches = [{"input_ids": random_ids(2, 6, seed=s)} for s in range(2)]
    base = {"accumulate_dtype": "float64", "lowrank_dtype": "float64", "lowrank_layers": ("lm_head",)}
    assert kf.KFACConfig().lowrank_max_rank is not None  # on by default
    budget = kf.fit(model, batches, kf.KFACConfig(**base))
    exact = kf.fit(model, batches, kf.KFACConfig(**base, lowrank_max_rank=None))
    assert budget.block("lm_head").G.tail == 0.0
    torch.testing.assert_close(budget.to_dense("lm_head"), exact.to_dense("lm_head"), rtol=1e-12, atol=0)


def test_staged_rows_whose_gram_would_overflow_are_refused_like_non_finite_ones():
    # Rows are staged and their Gram formed at commit: the check refuses finite rows whose Gram could overflow the
    # sum's dtype (n · max|a|² beyond its range), as a check of the Gram itself did, and accepts ordinary ones.
    from kronfisher.collection.collector import FactorCollector
    from kronfisher.layers import LayerInfo

    info = LayerInfo("lin", "linear", 4, 3, True, "lin.weight", "lin.bias")
    collector = FactorCollector({"lin": info}, kf.KFACConfig())  # float32 sums
    ok = torch.full((8, 4), 1e15)  # 8 · 1e30 < 3.4e38
    big = torch.full((8, 4), 1e19)  # 8 · 1e38 overflows float32
    assert bool(collector.check(("lin", "A", ok, (8.0, 1.0))))
    assert not bool(collector.check(("lin", "A", big, (8.0, 1.0))))
    assert not bool(collector.check(("lin", "G", ok, (8.0, 1e5))))  # the scale enters as s²
    assert not bool(collector.check(("lin", "A", torch.tensor([[float("nan"), 0, 0, 0]]), (1.0, 1.0))))
