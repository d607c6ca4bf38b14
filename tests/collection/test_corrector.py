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
