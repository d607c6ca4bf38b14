"""Huge output layers: the low-rank representation of ``G`` (docs/concepts.md).

``G = U Uᵀ`` with ``U = W / √N`` and ``W = [ĝ_1 … ĝ_T]`` (``[out, T]``). ``W`` is held token-major, as ``[n_i, out]``
chunks in ``lowrank_dtype`` (:class:`ColumnStore`); every product with it runs over blocks of ``out`` rows, each
upcast to the arithmetic dtype (float32 or higher), so nothing of size ``out × out`` (nor a second full copy of
``W``) is ever allocated.

**Eigenform** (:class:`LowRankEigen`). From the ``[T, T]`` Gram ``K = UᵀU = V diag(λ) Vᵀ`` (in ``eigh_dtype``), the
thin eigenbasis of ``G`` is ``P = U V λ^{-1/2} = W C`` with ``C = V λ^{-1/2} / √N`` (``[T, r]``). ``P`` is kept
*implicit* (``W`` and ``C``): ``Pᵀ X = Cᵀ (Wᵀ X)`` and ``P Y = W (C Y)``, so the eigenbasis costs ``O(T²)`` memory on
top of ``W`` instead of another ``out × T``. Eigenvalues below ``T · eps · λ_max`` are round-off and dropped.

**Token budget** (``lowrank_max_rank = k``, on by default). ``k`` kept columns ``P diag(√s)`` plus a buffer of ``b``
new ones: when more than ``k + b`` are held, the kept ones and the next ``b`` are replaced by the top-``k``
eigen-columns of their ``W Wᵀ`` (:func:`compress_columns`; the kept columns are orthogonal, so only the products with
the new ones are formed); the discarded eigenvalue mass ``D`` (``Σ_{i>k} s_i``, measured in float64 on the *stored*
columns) becomes an isotropic tail over the complement of the held span: ``G ≈ P diag(s) Pᵀ + τ (I − P Pᵀ)`` with
``τ = D / (N (out − r))``, so ``tr G`` is exact. Decomposition truncates to ``k``. Memory stays ``O(out (k + b))``
and no ``[T, T]`` matrix exceeds ``k + b``. **Error bound**: ``G_sum − G̃_sum = R − (D/(out − r)) (I − P Pᵀ)`` where
``R`` (the sum of every discarded part) is PSD with ``tr R = D``. Hence, with ``d = D / N`` the normalised discarded
mass reported as ``discarded``: ``tr(G − G̃) = 0``, ``‖G − G̃‖_* ≤ 2d`` and ``‖G − G̃‖₂ ≤ d`` (up to the rounding of
the stored columns in ``lowrank_dtype``).

**Dense factors of rank below their size** (:func:`eigen_from_rows`): a factor ``Xᵀ X / c`` seen on ``T < d`` rows
is decomposed from the ``[T, T]`` Gram of its rows (exact): a thin basis of its nonzero eigenvalues (the null space
implicit, tail 0), or completed to a square one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import KronfisherError, ShapeError
from .columns import ColumnStore
from .eigen import Eigen, SeenRows, fingerprints, probe_directions, safe_eigh, square_basis


@dataclass(frozen=True, eq=False)
class LowRankEigen:
    """Thin eigenbasis of a low-rank ``G`` with an implicit basis ``P = W C`` (docs/concepts.md).

    Same interface as :class:`~kronfisher.algebra.eigen.Eigen` (``values``, ``tail``, ``dim``, ``rank``, ``full``,
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
    gram_dtype: torch.dtype = torch.float64,
) -> LowRankEigen:
    """Thin eigendecomposition of ``G = W Wᵀ / N`` (+ tail) from the Gram of ``W`` (docs/concepts.md).

    Args:
        columns: ``W``.
        count: ``N`` (loss terms).
        tail_mass: discarded mass of earlier compressions (un-normalised, in units of ``W Wᵀ``).
        max_rank: token budget ``k``; further eigenpairs move into the tail (trace kept).
        dtype: arithmetic dtype of ``C`` and the eigenvalues.
        name: layer name for messages.
        gram: ``columns.gram()`` when the caller already computed it (the GEMM-bound part, run with every thread
            before the eighs run concurrently, :func:`kronfisher.decompose.entry.decompose_all`); it is consumed
            (scaled in place). None: computed here.
        gram_dtype: dtype of the ``[m, m]`` Gram and its eigh (the configured ``eigh_dtype``).

    """
    n = float(count)
    d, m = columns.dim, columns.m
    if n <= 0 or m == 0:
        tail = tail_mass / n / d if n > 0 else 0.0
        empty = torch.zeros(0, dtype=dtype, device=columns.device)
        return LowRankEigen(columns, empty.reshape(m, 0), empty, tail, tail * d)
    gram = (columns_gram(columns, gram_dtype) if gram is None else gram).div_(n)  # K = Uᵀ U
    vals, vecs = safe_eigh(gram, name=name, factor="G (Gram of U)", dtype=gram.dtype)
    del gram
    vals, order = torch.sort(vals, descending=True)
    vecs = vecs[:, order]
    live = int((vals > float(vals[0]) * m * torch.finfo(vals.dtype).eps).sum()) if float(vals[0]) > 0 else 0
    r = live if max_rank is None else min(live, max_rank)
    tail_trace = tail_mass / n + float(vals[r:live].sum())
    if r >= d:
        tail_trace, r = 0.0, d  # no complement (k ≥ out): nothing to spread
    tau = tail_trace / (d - r) if d > r else 0.0
    coeffs = vecs[:, :r] / (vals[:r].sqrt() * math.sqrt(n))
    return LowRankEigen(columns, coeffs.to(dtype), vals[:r].to(dtype), tau, tail_trace)


def columns_gram(columns: ColumnStore, dtype: torch.dtype) -> Tensor:
    """``Wᵀ W`` (``[m, m]``) in ``dtype`` (the eigendecomposition dtype), block by block over the rows of ``W``."""
    if dtype == torch.float64:
        return columns.gram()
    out = torch.zeros(columns.m, columns.m, dtype=dtype, device=columns.device)
    for _, _, blk in columns.blocks(dtype):
        out.addmm_(blk, blk.t())
    return out


def compress_columns(
    columns: ColumnStore,
    k: int,
    storage: torch.dtype,
    dtype: torch.dtype = torch.float64,
    known: Tensor | None = None,
) -> tuple[Tensor, float, Tensor]:
    """Top-``k`` eigen-columns ``P diag(√s)`` of ``W Wᵀ`` and the discarded mass (token budget, docs/concepts.md).

    Args:
        columns: ``W`` (``[out, m]``): the kept columns of the previous compression first, then new ones.
        k: the budget.
        storage: dtype of the returned columns (``lowrank_dtype``).
        dtype: dtype of the ``[m, m]`` Gram, its eigh and the projection (the configured ``eigh_dtype``).
        known: squared norms of the first ``h`` columns when they are the output of an earlier compression: they
            are mutually orthogonal (``P diag(√s)``, up to their storage rounding), so that block of the Gram is
            ``diag(known)`` and only the products with the ``m − h`` new columns are formed (``out · (m − h) · m``
            instead of ``out · m²``).

    Returns:
        ``(kept, dropped, kept_sq)``: ``kept`` is ``[k', out]`` token-major in ``storage`` (``k' ≤ k``,
        numerically zero directions dropped), ``dropped = ‖W‖_F² − ‖kept‖_F²`` measured in float64 on the stored
        values (so the trace is exact whatever ``storage`` and ``dtype`` round) and ``kept_sq`` the float64 squared
        norms of the kept columns (``known`` of the next compression).

    """
    m, h = columns.m, 0 if known is None else int(known.shape[0])
    gram = torch.zeros(m, m, dtype=dtype, device=columns.device)
    new_sq = torch.zeros((), dtype=torch.float64, device=columns.device)
    for _, _, blk in columns.blocks(dtype):
        gram[h:].addmm_(blk[h:], blk.t())
        new_sq += blk[h:].to(torch.float64).square().sum()
    total = float(new_sq) + (0.0 if known is None else float(known.sum()))
    if h:
        gram[:h, :h].diagonal().copy_(known)  # type: ignore[arg-type]
        gram[:h, h:] = gram[h:, :h].t()
    vals, vecs = safe_eigh(gram, name="lowrank", factor="G (compression)", dtype=dtype)
    del gram
    vals, order = torch.sort(vals, descending=True)
    live = int((vals > float(vals[0]) * m * torch.finfo(dtype).eps).sum()) if float(vals[0]) > 0 else 0
    top = vecs[:, order[: min(k, live)]]  # [m, k']
    kept = torch.empty(top.shape[1], columns.dim, dtype=storage, device=columns.storage_device)
    kept_sq = torch.zeros(top.shape[1], dtype=torch.float64, device=columns.device)
    for start, stop, blk in columns.blocks(dtype):
        part = (top.t() @ blk).to(storage)
        kept[:, start:stop] = part
        kept_sq += part.to(torch.float64).square().sum(1)
    return kept, max(total - float(kept_sq.sum()), 0.0), kept_sq


# Dense factors seen on fewer rows than their dimension -----------------------------------------------------


def eigen_from_rows(
    chunks: Sequence[Tensor],
    count: float,
    *,
    eigh_dtype: torch.dtype,
    store_dtype: torch.dtype,
    basis_dtype: torch.dtype | None = None,
    thin: bool = False,
    seen: bool = False,
    name: str = "?",
    factor: str = "A",
) -> Eigen:
    """Eigenbasis of ``F = Σ_i X_iᵀ X_i / count`` from the ``[T, T]`` Gram of the rows (exact).

    Args:
        chunks: row blocks ``X_i`` (``[n_i, d]``), the rows whose outer products make the factor.
        count: the normaliser ``c`` (tokens or loss terms).
        eigh_dtype: dtype of the ``[T, T]`` Gram, its eigh and the thin basis ``Xᵀ V``.
        store_dtype: dtype of the returned eigenvectors and eigenvalues.
        basis_dtype: dtype of the QR that re-orthonormalises (and completes) the basis (default ``eigh_dtype``): a
            factor wider than ``eigh_max_dim`` gets float32, as its dense eigh would (``benchmarks/bench_rank.py``).
        thin: return the ``[d, r]`` basis of the nonzero eigenvalues with tail 0 (the null space implicit, no
            ``[d, d]`` matrix); else the square basis.
        seen: with ``thin``, also keep the rows' coordinates in the basis and their fingerprints
            (:class:`~kronfisher.algebra.eigen.SeenRows`, for the EK-FAC pass: ``T · (r + 8)`` more numbers).
        name: layer name for messages.
        factor: ``"A"`` or ``"G"`` for messages.

    Returns:
        ``Eigen`` with ascending eigenvalues: thin, or with square ``[d, d]`` vectors (zeros on the null space) like
        :func:`~kronfisher.algebra.eigen.safe_eigh` on the dense factor.

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
    values = vals.clamp_min(0.0).to(store_dtype)
    if r == 0:
        return Eigen(
            torch.eye(d, dtype=store_dtype, device=x.device), torch.zeros(d, dtype=store_dtype, device=x.device)
        )
    basis = torch.mm(x.t(), vecs).div_((vals * c).sqrt())  # [d, r]: q_i = Xᵀ v_i / √(c λ_i)
    rows = None
    if seen and thin:  # X q_i = √(c λ_i) v_i: the coordinates of the rows, from the eigh alone
        rows = SeenRows(vecs.mul((vals * c).sqrt()).to(store_dtype), fingerprints(x, probe_directions(d, x.device)))
    del x, vecs
    # Householder QR re-orthonormalises q_i (rounding of the small eigenvalues' columns; R is diag(±1) up to it,
    # its signs restore q_i); complete, its other d − r columns are an orthonormal basis of the null space.
    basis = basis.to(basis_dtype or eigh_dtype)  # the [d, T] copy in eigh_dtype goes before the QR's output
    full, tri = torch.linalg.qr(basis, mode="reduced" if thin else "complete")
    del basis
    if not thin:
        return square_basis(full, tri, values, 0.0, store_dtype)
    signs = torch.sign(tri.diagonal())
    signs[signs == 0] = 1.0
    return Eigen(full.mul_(signs).to(store_dtype), values, seen=rows)
