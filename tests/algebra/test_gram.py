"""Grams of activation rows: ``symmetric_gram`` (upper block triangle on CPU) against a float64 ``XᵀX`` for sizes that
cross the tile boundary (the tiny test models never do), with and without the bias augmentation (docs/concepts.md),
and ``gram(..., scale=s)`` against the Gram of the scaled rows.
"""

from __future__ import annotations

import pytest
import torch

from kronfisher.algebra.gram import GRAM_TILE, gram, symmetric_gram


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("augment", [False, True])
@pytest.mark.parametrize("rows", [0, 1, 300])
def test_symmetric_gram_matches_full_product(dtype: torch.dtype, augment: bool, rows: int) -> None:
    d = 2 * GRAM_TILE + 17  # two full tiles and a partial one
    x = torch.randn(rows, d, dtype=dtype, generator=torch.Generator().manual_seed(1))
    g = gram(x, augment, torch.float64)
    xa = torch.cat([x, torch.ones(rows, 1, dtype=dtype)], 1) if augment else x
    ref = xa.double().t() @ xa.double()
    # Tolerance: float32 GEMM rounding over ≤ 300 terms (relative to the largest entry); float64 the same at 1e-16.
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    scale = max(float(ref.abs().max()), 1.0)
    assert float((g - ref).abs().max()) <= tol * scale
    assert torch.equal(g, g.t())  # mirrored, so exactly symmetric


def test_symmetric_gram_of_strided_rows_writes_into_a_view() -> None:
    d = GRAM_TILE + 5
    x = torch.randn(d, 64, generator=torch.Generator().manual_seed(2)).t()  # [64, d], not contiguous
    out = torch.full((d + 3, d + 3), 7.0)
    symmetric_gram(x, out=out[:d, :d])
    ref = x.double().t() @ x.double()
    assert float((out[:d, :d].double() - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    assert bool((out[d:, :] == 7.0).all()) and bool((out[:, d:] == 7.0).all())  # nothing written outside the view


def test_gram_with_scale_equals_gram_of_scaled_rows() -> None:
    """``gram(rows, augment, dtype, scale=s)`` (``s²`` as the GEMM's alpha) is the Gram of ``s · rows``."""
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
