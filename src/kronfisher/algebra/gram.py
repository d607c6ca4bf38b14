"""Covariance Grams: the symmetric ``XᵀX`` products behind every Kronecker factor (docs/concepts.md)."""

from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic dtype for rows of ``dtype``: at least float32.

    Low-rank columns may be stored in bfloat16 / float16; arithmetic is always float32 or higher.
    """
    return torch.promote_types(dtype, torch.float32)


GRAM_TILE = 384  # block size of the symmetric Gram on CPU (see :func:`symmetric_gram`)


def _mm(a: Tensor, b: Tensor, out: Tensor, alpha: float, beta: float = 0.0) -> Tensor:
    if alpha == 1.0 and beta == 0.0:
        return torch.mm(a, b, out=out)
    return torch.addmm(out, a, b, beta=beta, alpha=alpha, out=out)  # beta=0: out's old contents are ignored


def symmetric_gram(rows: Tensor, out: Tensor | None = None, alpha: float = 1.0, accumulate: bool = False) -> Tensor:
    """``alpha · rowsᵀ rows`` (``[d, d]``), written into ``out`` when given (``alpha`` is the GEMM's own scale).

    ``accumulate=True`` adds the product to ``out`` (a symmetric sum) instead of overwriting it.

    The product is symmetric, so on CPU only its upper block triangle is multiplied (``GRAM_TILE``-wide strips,
    each mirrored into the lower part): for ``d ≫ GRAM_TILE`` close to half the FLOPs of a full GEMM, 15–45 % less
    CPU time for the factor sizes of transformer layers (d = 512 … 1,536). The covariance GEMMs are the whole
    overhead of K-FAC collection (STYLE.md), and this is what BLAS ``syrk`` does; the value is the full GEMM's up
    to float rounding, and exactly symmetric when ``alpha = 1`` (symmetric to rounding otherwise; the factor
    means symmetrise).
    """
    d = rows.shape[1]
    if out is None:
        out = torch.empty(d, d, dtype=rows.dtype, device=rows.device)
    beta = 1.0 if accumulate else 0.0
    if rows.device.type != "cpu":
        return _mm(rows.t(), rows, out, alpha, beta)
    cols = rows.t()
    for i in range(0, d, GRAM_TILE):
        j = min(i + GRAM_TILE, d)
        _mm(cols[i:j], rows[:, i:], out[i:j, i:], alpha, beta)
        # A GEMM's diagonal block is symmetric only up to the kernel's summation order (it differs between
        # CPUs); mirroring its upper triangle makes the whole sum exactly symmetric everywhere.
        block = out[i:j, i:j]
        block.copy_(block.triu() + block.triu(1).t())
        if j < d:
            out[j:, i:j] = out[i:j, j:].t()
    return out


def gram(rows: Tensor, augment: bool, out_dtype: torch.dtype, scale: float = 1.0) -> Tensor:
    """``Σ_t a_t a_tᵀ`` for ``a_t = [s·rows_t; 1]`` (``augment``) or ``s·rows_t``, without concatenating ones.

    Args:
        rows: ``[n, d]`` rows (already masked).
        augment: append the constant 1 (bias column).
        out_dtype: dtype of the returned sum.
        scale: ``s``, e.g. the rescaling of a mean loss by ``N``; it enters the GEMM as ``alpha = s²`` instead of a
            scaled copy of the rows (one ``[n, d]`` pass and allocation less per layer and batch).

    Returns:
        ``[d(+1), d(+1)]`` sum of outer products.

    """
    rows = rows.to(compute_dtype(rows.dtype))
    n, d = rows.shape
    if not augment:
        return symmetric_gram(rows, alpha=scale * scale).to(out_dtype)
    out = torch.empty(d + 1, d + 1, dtype=rows.dtype, device=rows.device)
    symmetric_gram(rows, out=out[:d, :d], alpha=scale * scale)
    colsum = rows.sum(0) if scale == 1.0 else rows.sum(0).mul_(scale)
    out[:d, d] = colsum
    out[d, :d] = colsum
    out[d, d] = n
    return out.to(out_dtype)


def add_gram(total: Tensor, rows: Tensor, *, augment: bool = False, scale: float = 1.0) -> None:
    """``total += Σ_t a_t a_tᵀ`` for ``a_t = [s·rows_t; 1]`` (``augment``) or ``s·rows_t``, in place.

    When the rows' arithmetic dtype is the sum's, the product goes straight into ``total`` (no ``[d, d]``
    temporary: the commit of a batch adds each layer's contribution where it lives); otherwise (float64 sums of
    float32 rows) through one temporary of this layer only.
    """
    work = compute_dtype(rows.dtype)
    if work != total.dtype or total.device != rows.device:
        total.add_(gram(rows, augment, work, scale).to(total.device, total.dtype))
        return
    rows = rows.to(work)
    d = rows.shape[1]
    symmetric_gram(rows, out=total[:d, :d], alpha=scale * scale, accumulate=True)
    if augment:
        colsum = rows.sum(0) if scale == 1.0 else rows.sum(0).mul_(scale)
        total[:d, d].add_(colsum)
        total[d, :d].add_(colsum)
        total[d, d].add_(rows.shape[0])
