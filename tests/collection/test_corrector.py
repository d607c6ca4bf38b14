"""The EK-FAC corrector's per-batch arithmetic against the plain formula of its eigenvalue sums (docs/concepts.md)."""

from __future__ import annotations

import torch

import kronfisher as kf
from kronfisher.collection.corrector import EigenCorrector


def test_ekfac_span_commit_equals_the_batched_formula() -> None:
    """``EigenCorrector.add_span`` (per-sequence products into a reused scratch, added in place at commit) is
    ``Σ_b (z_bᵀ y_b)²``, and ``z²ᵀ y²`` for token granularity; into a float32 sum from float64 projections too."""
    corrector = EigenCorrector({}, {}, kf.KFACConfig())
    gen = torch.Generator().manual_seed(2)
    for b, s, r, a in ((1, 5, 4, 3), (3, 7, 6, 5), (4, 2, 9, 8), (2, 7, 6, 5)):  # the last reuses a larger scratch
        z = torch.randn(b, s, r, generator=gen, dtype=torch.float64)
        y = torch.randn(b, s, a, generator=gen, dtype=torch.float64)
        ref = torch.einsum("bsr,bsa->bra", z, y).square().sum(0)
        got = torch.ones(r, a, dtype=torch.float64)
        corrector.add_span(got, z, y)
        # float64 products summed in another order: 1e-13 relative (on top of the sum's previous content).
        assert float((got - 1 - ref).abs().max()) <= 1e-13 * float(ref.abs().max())
        single = torch.zeros(r, a, dtype=torch.float32)
        corrector.add_span(single, z, y)
        assert float((single.double() - ref).abs().max()) <= 1e-6 * float(ref.abs().max())
        flat_z, flat_y = z.reshape(-1, r).square(), y.reshape(-1, a).square()
        token = torch.zeros(r, a, dtype=torch.float64)
        corrector.add_span(token, flat_z, flat_y)
        torch.testing.assert_close(token, flat_z.t() @ flat_y, rtol=1e-13, atol=0)
    empty = torch.zeros(4, 2)
    corrector.add_span(empty, torch.zeros(0, 3, 4), torch.zeros(0, 3, 2))
    assert torch.equal(empty, torch.zeros(4, 2))


def test_staged_span_is_the_smaller_of_projections_and_contribution_and_commits_the_same_sum() -> None:
    """A layer call stages its projections when they have fewer rows than ``a`` (the sum is formed at commit) and
    its ``[r, a]`` contribution otherwise; both commit the batched formula (float64, 1e-13 relative)."""
    corrector = EigenCorrector({}, {}, kf.KFACConfig(accumulate_dtype="float64"))
    gen = torch.Generator().manual_seed(3)
    for b, s, r, a in ((2, 3, 4, 9), (4, 5, 4, 3)):  # 6 rows < a = 9: projections; 20 rows > a = 3: contribution
        z = torch.randn(b, s, r, generator=gen, dtype=torch.float64)
        y = torch.randn(b, s, a, generator=gen, dtype=torch.float64)
        entry = corrector.span_entry("lin", z, y, 7.0)
        assert (entry[2] is z) == (b * s <= a) and entry[2].shape == ((b, s, r) if b * s <= a else (r, a))
        corrector.sums["lin"], corrector.counts["lin"] = torch.zeros(r, a, dtype=torch.float64), 0.0
        corrector.commit([entry])
        ref = torch.einsum("bsr,bsa->bra", z, y).square().sum(0)
        assert float((corrector.sums["lin"] - ref).abs().max()) <= 1e-13 * float(ref.abs().max())
        assert corrector.counts["lin"] == 7.0
