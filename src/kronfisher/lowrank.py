"""Token-budget compression of a low-rank ``G`` (SPEC §6).

``G_sum = W Wᵀ`` with ``W`` of shape ``[out, m]`` is replaced by its top-``k`` eigenpairs ``P diag(s) Pᵀ`` (kept as
``P diag(√s)``) and the discarded mass ``Σ_{i>k} s_i`` becomes an isotropic tail over the complement of ``P``, so the
trace stays exact. Only ``[m, m]`` Gram matrices are formed, never ``out × out``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .linalg import safe_eigh


def compress_columns(w: Tensor, k: int) -> tuple[Tensor, float]:
    """Top-``k`` eigen-columns of ``W Wᵀ`` and the discarded eigenvalue mass.

    Args:
        w: ``[out, m]`` columns.
        k: number of eigenpairs to keep.

    Returns:
        ``(kept, dropped)`` with ``kept = P diag(√s)`` of shape ``[out, min(k, m)]`` and ``dropped = Σ_{i>k} s_i``.

    """
    m = w.shape[1]
    if m <= k:
        return w, 0.0
    work = torch.float64 if m <= 8192 else w.dtype
    gram = w.t().to(work) @ w.to(work)
    vals, vecs = safe_eigh(gram, name="lowrank", factor="G (compression)", dtype=work)
    order = torch.argsort(vals, descending=True)
    top = order[:k]
    kept_vals = vals[top]
    dropped = float(vals.sum() - kept_vals.sum())
    # P diag(√s) = W V (the left singular vectors scaled by the singular values).
    kept = w.to(work) @ vecs[:, top]
    return kept.to(w.dtype), max(dropped, 0.0)
