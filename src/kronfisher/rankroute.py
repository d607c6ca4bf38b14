"""Decompose what has rank: a dense factor seen on fewer rows than its dimension, from its ``[T, T]`` Gram.

A factor ``F = Xᵀ X / c`` built from ``T`` rows ``X`` (``[T, d]``) has rank at most ``T``. When ``T < d`` its nonzero
eigenpairs follow from the dual Gram ``K = X Xᵀ / c = V diag(λ) Vᵀ`` (``[T, T]``): ``q_i = Xᵀ v_i / √(c λ_i)``.
The rest of the space is the null space of ``F`` (eigenvalue 0, any orthonormal basis of it is an eigenbasis); it
is completed by the Householder QR of the thin basis, so the result is the full ``[d, d]`` eigenbasis the dense
path returns (the same factor; the null-space vectors may differ, as they do between two eigh calls). Cost:
``T² d`` (Gram) + eigh of ``T`` + ``2 d T r`` (basis) + ``≈ 4 d² r`` (completion), against ``≈ 9 d³`` for the eigh
of ``d`` (LAPACK ``syevd``); ``benchmarks/bench_rank.py`` measures where it pays.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .errors import ShapeError
from .linalg import Eigen, safe_eigh

ROWS_RATIO = 0.5  # the rows route is used while T <= ROWS_RATIO * d (benchmarks/bench_rank.py)


def rows_route_pays(rows: int, dim: int, ratio: float = ROWS_RATIO) -> bool:
    """Whether a factor of dimension ``dim`` seen on ``rows`` rows is decomposed from its ``[T, T]`` Gram."""
    return 0 < rows <= ratio * dim


def eigen_from_rows(
    chunks: Sequence[Tensor],
    count: float,
    *,
    eigh_dtype: torch.dtype,
    store_dtype: torch.dtype,
    name: str = "?",
    factor: str = "A",
) -> Eigen:
    """Full eigenbasis of ``F = Σ_i X_iᵀ X_i / count`` from the ``[T, T]`` Gram of the rows (exact).

    Args:
        chunks: row blocks ``X_i`` (``[n_i, d]``), the rows whose outer products make the factor.
        count: the normaliser ``c`` (tokens or loss terms).
        eigh_dtype: dtype of the ``[T, T]`` Gram, its eigh and the basis arithmetic.
        store_dtype: dtype of the returned eigenvectors and eigenvalues.
        name: layer name for messages.
        factor: ``"A"`` or ``"G"`` for messages.

    Returns:
        ``Eigen`` with square ``[d, d]`` vectors and ascending eigenvalues (zeros on the null space), like
        :func:`~kronfisher.linalg.safe_eigh` on the dense factor.

    """
    chunks = [c for c in chunks if c.shape[0]]
    if not chunks:
        raise ShapeError(f"Factor {factor} of layer {name!r}: no rows to decompose.")
    d = int(chunks[0].shape[1])
    x = torch.cat([c.to(eigh_dtype) for c in chunks]) if len(chunks) > 1 else chunks[0].to(eigh_dtype)
    t = int(x.shape[0])
    c = float(count)
    gram = torch.mm(x, x.t()).div_(c)  # K = X Xᵀ / c: same nonzero eigenvalues as F
    vals, vecs = safe_eigh(gram, name=name, factor=f"{factor} (Gram of {t} rows)", dtype=eigh_dtype)
    del gram
    top = float(vals[-1]) if vals.numel() else 0.0
    live = vals > top * t * torch.finfo(eigh_dtype).eps if top > 0 else torch.zeros_like(vals, dtype=torch.bool)
    vals, vecs = vals[live], vecs[:, live]  # ascending, numerically nonzero
    r = int(vals.shape[0])
    thin = torch.mm(x.t(), vecs).div_((vals * c).sqrt())  # [d, r]: q_i = Xᵀ v_i / √(c λ_i)
    del x, vecs
    if r == 0:
        basis = torch.eye(d, dtype=eigh_dtype, device=thin.device)
    else:
        # Householder QR: the first r columns span the thin basis (re-orthonormalised; R is diag(±1) up to
        # rounding, its signs restore q_i), the other d − r complete it to an orthonormal basis of R^d.
        full, tri = torch.linalg.qr(thin, mode="complete")
        signs = torch.sign(tri.diagonal())
        signs[signs == 0] = 1.0
        basis = torch.cat([full[:, r:], full[:, :r] * signs], dim=1)
    values = torch.cat([torch.zeros(d - r, dtype=vals.dtype, device=vals.device), vals.clamp_min(0.0)])
    return Eigen(basis.to(store_dtype), values.to(store_dtype))
