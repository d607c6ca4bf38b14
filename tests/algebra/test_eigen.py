"""``all_finite`` (one ``aminmax`` pass) against ``torch.isfinite(t).all()``, and ``safe_eigh`` with
``symmetric=True`` bit for bit the default on an exactly symmetric matrix (the skipped symmetrisation is the identity
there).
"""

from __future__ import annotations

import pytest
import torch

from kronfisher.algebra.eigen import all_finite, safe_eigh


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


def test_safe_eigh_skipping_symmetrisation_is_bitwise_identical_on_symmetric_input() -> None:
    x = torch.randn(64, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    m = (x.t() @ x + (x.t() @ x).t()) / 2  # exactly symmetric
    v0, q0 = safe_eigh(m, name="l", factor="A", dtype=torch.float64)
    v1, q1 = safe_eigh(m, name="l", factor="A", dtype=torch.float64, symmetric=True)
    assert torch.equal(v0, v1) and torch.equal(q0, q1)
