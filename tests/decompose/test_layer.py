"""Per-layer decomposition helpers against their plain formulas: ``symmetric_mean`` is bit for bit the naive
``(S + Sᵀ) / 2c`` (also for a sum that is not symmetric), and ``shared_A_owners`` (bucketed by the diagonal) equals
the all-pairs ``torch.equal`` plan, including sums that agree on the diagonal but not elsewhere.
"""

from __future__ import annotations

import torch

import kronfisher as kf
from conftest import make_model, random_ids
from kronfisher.collection.sums import DenseSum
from kronfisher.decompose.layer import shared_A_owners, symmetric_mean


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
    _, collector, _ = kf.collect(make_model("qwen2"), [{"input_ids": random_ids(3, 12)}], cfg)
    return collector.sums


def test_symmetric_mean_is_bitwise_the_dense_mean() -> None:
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        s = DenseSum(37, dtype)
        s.add(torch.randn(37, 37, generator=gen, dtype=dtype), 5.0)  # deliberately not symmetric
        got = symmetric_mean(s)
        ref = (s.sum.double() + s.sum.double().t()) / (2.0 * s.count)
        assert got.dtype == torch.float64 and torch.equal(got, ref)  # bitwise: addition commutes
        assert torch.equal(got, got.t())
        assert s.sum.dtype == dtype and not torch.equal(s.sum, s.sum.t())  # the sum itself is untouched
    empty = DenseSum(4, torch.float32)
    assert torch.equal(symmetric_mean(empty), torch.zeros(4, 4, dtype=torch.float64))


def test_shared_A_owners_equals_the_all_pairs_plan() -> None:
    sums = _tiny_sums(kf.KFACConfig(accumulate_dtype="float64"))
    names = list(sums)
    # A decoy: the same diagonal as the q/k/v input sum but one different off-diagonal entry (same bucket).
    q = "model.layers.0.self_attn.q_proj"
    decoy = names[-1]
    sums[decoy].A.sum = sums[q].A.sum.clone()
    sums[decoy].A.count = sums[q].A.count
    sums[decoy].A.sum[0, 1] += 1.0
    got, ref = shared_A_owners(sums), _all_pairs_owners(sums)
    assert got == ref
    assert got["model.layers.0.self_attn.k_proj"] == q and got[decoy] == decoy
    assert sum(v != k for k, v in got.items()) >= 4  # q/k/v and gate/up share in both layers
