"""Huge output layers: the low-rank representation of ``G`` (docs/concepts.md).

``G = U Uᵀ`` with ``U = W / √N`` and ``W = [ĝ_1 … ĝ_T]`` (``[out, T]``). ``W`` is held token-major, as ``[n_i, out]``
chunks in ``lowrank_dtype`` (:class:`ColumnStore`); every product with it runs over blocks of ``out`` rows, each
upcast to the arithmetic dtype (float32 or higher), so nothing of size ``out × out`` (nor a second full copy of
``W``) is ever allocated.

**Eigenform** (:class:`LowRankEigen`). From the ``[T, T]`` Gram ``K = UᵀU = V diag(λ) Vᵀ`` (float64), the thin
eigenbasis of ``G`` is ``P = U V λ^{-1/2} = W C`` with ``C = V λ^{-1/2} / √N`` (``[T, r]``). ``P`` is kept *implicit*
(``W`` and ``C``): ``Pᵀ X = Cᵀ (Wᵀ X)`` and ``P Y = W (C Y)``, so the eigenbasis costs ``O(T²)`` memory on top of
``W`` instead of another ``out × T``. Eigenvalues below ``T · eps₆₄ · λ_max`` are round-off and dropped.

**Token budget** (``lowrank_max_rank = k``). When more than ``2k`` columns are held, they are replaced by the top-``k``
eigen-columns ``P diag(√s)`` of ``W Wᵀ`` (:func:`compress_columns`); the discarded eigenvalue mass ``D`` (``Σ_{i>k}
s_i``, measured in float64 on the *stored* columns) becomes an isotropic tail over the complement of the held span:
``G ≈ P diag(s) Pᵀ + τ (I − P Pᵀ)`` with ``τ = D / (N (out − r))``, so ``tr G`` is exact. Columns seen after a
compression are appended and compressed with the kept ones next time; decomposition truncates to ``k``. Memory stays
``O(out · k)``. **Error bound**: ``G_sum − G̃_sum = R − (D/(out − r)) (I − P Pᵀ)`` where ``R`` (the sum of every
discarded part) is PSD with ``tr R = D``. Hence, with ``d = D / N`` the normalised discarded mass reported as
``discarded``: ``tr(G − G̃) = 0``, ``‖G − G̃‖_* ≤ 2d`` and ``‖G − G̃‖₂ ≤ d`` (up to the rounding of the stored
columns in ``lowrank_dtype``).

**Woodbury** (:func:`woodbury_kron_apply`): ``(G + δ_G I)^{-1} V (A + δ_A I)^{-1}`` with the ``[T, T]`` solve of
:func:`~kronfisher.linalg.woodbury_factor`; the eigenform stays the default (``lowrank_solver``).

**Tied weights**: :func:`find_tied` lists tracked layers whose weight is also another parameter (lm_head / embedding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import KronfisherError
from .columns import ColumnStore
from .eigen import safe_eigh


@dataclass(frozen=True, eq=False)
class LowRankEigen:
    """Thin eigenbasis of a low-rank ``G`` with an implicit basis ``P = W C`` (docs/concepts.md).

    Same interface as :class:`~kronfisher.linalg.Eigen` (``values``, ``tail``, ``dim``, ``rank``, ``full``,
    ``trace``, ``cast``, ``vectors``, ``to_dense``, ``rows_project``), so operators, EK-FAC and files need not know
    which one they hold. ``G = P diag(values) Pᵀ + tail (I − P Pᵀ)``.

    Attributes:
        columns: ``W`` (``[out, m]``, stored token-major in ``lowrank_dtype``).
        coeffs: ``C`` (``[m, r]``) in the arithmetic dtype.
        values: eigenvalues ``λ`` (``[r]``, descending, > 0).
        tail: isotropic eigenvalue ``τ`` on the complement of ``span(P)``.
        discarded: normalised eigenvalue mass moved into the tail by the token budget (``τ (out − r)``).

    """

    columns: ColumnStore
    coeffs: Tensor
    values: Tensor
    tail: float = 0.0
    discarded: float = 0.0

    kind = "lowrank"  # the representation (algebra.basis)

    @property
    def dim(self) -> int:
        """Dimension ``out`` of ``G``."""
        return self.columns.dim

    @property
    def rank(self) -> int:
        """Number of explicit eigenpairs ``r``."""
        return int(self.values.shape[0])

    @property
    def full(self) -> bool:
        """True when the explicit eigenpairs span the whole space (``r = out``)."""
        return self.rank == self.dim

    @property
    def device(self) -> torch.device:
        """Where the ``G`` side lives (CPU for huge layers)."""
        return self.columns.device

    def trace(self) -> float:
        """``tr G`` including the tail."""
        return float(self.values.sum()) + self.tail * (self.dim - self.rank)

    def cast(self, dtype: torch.dtype) -> LowRankEigen:
        """The same eigenbasis with arithmetic in ``dtype`` (``W`` stays in its storage dtype)."""
        if self.coeffs.dtype == dtype:
            return self
        return LowRankEigen(self.columns, self.coeffs.to(dtype), self.values.to(dtype), self.tail, self.discarded)

    @property
    def vectors(self) -> Tensor:
        """``P`` materialised (``[out, r]``, ``O(out · r)`` memory; the algebra never needs it)."""
        out = torch.empty(self.dim, self.rank, dtype=self.coeffs.dtype, device=self.device)
        for start, stop, blk in self.columns.blocks(self.coeffs.dtype):
            out[start:stop] = blk.t() @ self.coeffs
        return out

    def rows_project(self, x: Tensor) -> Tensor:
        """``x P`` for ``x`` of shape ``[..., out]`` (``[..., r]``), computed where ``W`` lives."""
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.dim)
        return (self.columns.rows_matmul(flat) @ self.coeffs.to(x.dtype)).reshape(*lead, self.rank)

    def to_dense(self, max_elements: int = 100_000_000) -> Tensor:
        """Dense ``G`` (diagnostics only); refuses when ``out²`` exceeds ``max_elements``."""
        if self.dim * self.dim > max_elements:
            raise KronfisherError(
                f"Dense G of a low-rank layer would have out² = {self.dim}² elements (> {max_elements}); "
                "it is a diagnostic for small layers."
            )
        p = self.vectors
        m = (p * self.values) @ p.t()
        if not self.full and self.tail != 0.0:
            m = m + self.tail * (torch.eye(self.dim, dtype=p.dtype, device=p.device) - p @ p.t())
        return m


def eigen_from_columns(
    columns: ColumnStore,
    count: float,
    tail_mass: float = 0.0,
    *,
    max_rank: int | None = None,
    dtype: torch.dtype = torch.float32,
    name: str = "?",
    gram: Tensor | None = None,
) -> LowRankEigen:
    """Thin eigendecomposition of ``G = W Wᵀ / N`` (+ tail) from the float64 Gram of ``W`` (docs/concepts.md).

    Args:
        columns: ``W``.
        count: ``N`` (loss terms).
        tail_mass: discarded mass of earlier compressions (un-normalised, in units of ``W Wᵀ``).
        max_rank: token budget ``k``; further eigenpairs move into the tail (trace kept).
        dtype: arithmetic dtype of ``C`` and the eigenvalues.
        name: layer name for messages.
        gram: ``columns.gram()`` when the caller already computed it (the GEMM-bound part, run with every thread
            before the eighs run concurrently, :func:`kronfisher.factors.decompose_all`); it is consumed (scaled in
            place). None: computed here.

    """
    n = float(count)
    d, m = columns.dim, columns.m
    if n <= 0 or m == 0:
        tail = tail_mass / n / d if n > 0 else 0.0
        empty = torch.zeros(0, dtype=dtype, device=columns.device)
        return LowRankEigen(columns, empty.reshape(m, 0), empty, tail, tail * d)
    gram = (columns.gram() if gram is None else gram).div_(n)  # K = Uᵀ U
    vals, vecs = safe_eigh(gram, name=name, factor="G (Gram of U)", dtype=torch.float64)
    vals, order = torch.sort(vals, descending=True)
    vecs = vecs[:, order]
    live = int((vals > float(vals[0]) * m * torch.finfo(torch.float64).eps).sum()) if float(vals[0]) > 0 else 0
    r = live if max_rank is None else min(live, max_rank)
    tail_trace = tail_mass / n + float(vals[r:live].sum())
    if r >= d:
        tail_trace, r = 0.0, d  # no complement (k ≥ out): nothing to spread
    tau = tail_trace / (d - r) if d > r else 0.0
    coeffs = vecs[:, :r] / (vals[:r].sqrt() * math.sqrt(n))
    return LowRankEigen(columns, coeffs.to(dtype), vals[:r].to(dtype), tau, tail_trace)


def compress_columns(columns: ColumnStore, k: int, storage: torch.dtype) -> tuple[Tensor, float]:
    """Top-``k`` eigen-columns ``P diag(√s)`` of ``W Wᵀ`` and the discarded mass (docs/concepts.md).

    Returns:
        ``(kept, dropped)``: ``kept`` is ``[k', out]`` token-major in ``storage`` (``k' ≤ k``, numerically zero
        directions dropped) and ``dropped = ‖W‖_F² − ‖kept‖_F²`` measured in float64 on the stored values, so the
        trace is exact whatever ``storage`` rounds.

    """
    gram = columns.gram()
    total = float(gram.diagonal().sum())
    vals, vecs = safe_eigh(gram, name="lowrank", factor="G (compression)", dtype=torch.float64)
    vals, order = torch.sort(vals, descending=True)
    live = int((vals > float(vals[0]) * columns.m * torch.finfo(torch.float64).eps).sum()) if float(vals[0]) > 0 else 0
    top = vecs[:, order[: min(k, live)]]  # [m, k']
    kept = torch.empty(top.shape[1], columns.dim, dtype=storage, device=columns.storage_device)
    kept_mass = 0.0
    for start, stop, blk in columns.blocks(torch.float64):
        part = (top.t() @ blk).to(storage)
        kept[:, start:stop] = part
        kept_mass += float(part.to(torch.float64).square().sum())
    return kept, max(total - kept_mass, 0.0)
