"""Sums plus counts, normalised once (SPEC §3.3). One code path serves ``A`` and ``G``.

A factor is accumulated as ``Σ rowsᵀ rows`` and a count (``T`` tokens for ``A``, ``N`` loss terms for ``G``).
Contributions of a batch are first *staged* (computed, checked for non-finite values by the capture) and only
then *committed*, so a poisoned batch never reaches the sums. Sums from disjoint data merge exactly by adding
sums and counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .errors import ShapeError


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic dtype for rows of ``dtype``: at least float32 (SPEC §6: arithmetic in float32 or higher)."""
    return torch.promote_types(dtype, torch.float32)


def gram(rows: Tensor, augment: bool, out_dtype: torch.dtype) -> Tensor:
    """``Σ_t a_t a_tᵀ`` for ``a_t = [rows_t; 1]`` (``augment``) or ``rows_t``, without concatenating ones.

    Args:
        rows: ``[n, d]`` rows (already masked).
        augment: append the constant 1 (bias column, SPEC §3.1).
        out_dtype: dtype of the returned sum.

    Returns:
        ``[d(+1), d(+1)]`` sum of outer products.

    """
    rows = rows.to(compute_dtype(rows.dtype))
    n, d = rows.shape
    if not augment:
        return (rows.t() @ rows).to(out_dtype)
    out = torch.empty(d + 1, d + 1, dtype=rows.dtype, device=rows.device)
    out[:d, :d] = rows.t() @ rows
    colsum = rows.sum(0)
    out[:d, d] = colsum
    out[d, :d] = colsum
    out[d, d] = n
    return out.to(out_dtype)


class DenseSum:
    """Dense ``[d, d]`` sum of outer products plus a count."""

    kind = "dense"

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        self.dim = dim
        self.sum = torch.zeros(dim, dim, dtype=dtype, device=device)
        self.count = 0.0

    def add(self, contribution: Tensor, count: float) -> None:
        """Add a staged ``[d, d]`` contribution and its count."""
        if contribution.shape != self.sum.shape:
            raise ShapeError(f"Contribution of shape {list(contribution.shape)} for a sum of {list(self.sum.shape)}.")
        self.sum.add_(contribution.to(self.sum.device, self.sum.dtype))
        self.count += float(count)

    def merge(self, other: DenseSum) -> None:
        """Add another sum over disjoint data (exact, SPEC §3.3)."""
        self.add(other.sum, other.count)

    def mean(self, dtype: torch.dtype | None = None) -> Tensor:
        """The normalised, symmetrised factor ``sum / count``."""
        s = self.sum.to(dtype or self.sum.dtype)
        if self.count <= 0:
            return torch.zeros_like(s)
        return (s + s.t()) / (2.0 * self.count)

    def state(self) -> dict[str, Tensor]:
        """Raw state as plain tensors (for files and distributed reduction)."""
        return {"sum": self.sum, "count": torch.tensor(self.count, dtype=torch.float64)}

    def load_state(self, state: dict[str, Tensor]) -> None:
        """Replace the state by ``state`` (inverse of :meth:`state`)."""
        self.sum = state["sum"].clone()
        self.count = float(state["count"])


class LowRankSum:
    """Low-rank ``G``: keeps the (masked, rescaled) output-gradient rows so that ``G = U Uᵀ`` (SPEC §6).

    Rows are stored as ``[T, out]`` chunks in ``storage_dtype``; :meth:`factor_U` returns ``U = [ĝ_1 … ĝ_T] / √N``
    with shape ``[out, T]``. Nothing of size ``out × out`` is ever allocated. When ``max_rank`` is set, the token
    columns are stream-compressed (see :mod:`kronfisher.lowrank`).
    """

    kind = "lowrank"

    def __init__(
        self,
        dim: int,
        storage_dtype: torch.dtype,
        max_rank: int | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.dim = dim
        self.storage_dtype = storage_dtype
        self.max_rank = max_rank
        self.device = torch.device(device)
        self.chunks: list[Tensor] = []
        self.count = 0.0
        # Compressed part (SPEC §6 token budget): G_sum ≈ basis diag(weights) basisᵀ + tail_mass · iso.
        self.basis: Tensor | None = None  # [out, k] orthonormal columns scaled: W with G_sum part = W Wᵀ
        self.tail_mass = 0.0
        self.discarded_mass = 0.0

    @property
    def num_columns(self) -> int:
        """Columns currently held (compressed basis plus raw tokens)."""
        raw = sum(c.shape[0] for c in self.chunks)
        return raw + (0 if self.basis is None else self.basis.shape[1])

    def add(self, rows: Tensor, count: float) -> None:
        """Append staged ``[n, out]`` rows (already scaled to gradients of the summed loss)."""
        if rows.dim() != 2 or rows.shape[1] != self.dim:
            raise ShapeError(f"Low-rank rows must be [n, {self.dim}], got {list(rows.shape)}.")
        if rows.shape[0]:
            self.chunks.append(rows.to(self.device, self.storage_dtype))
        self.count += float(count)
        if self.max_rank is not None and self.num_columns > 2 * self.max_rank:
            self.compress()

    def merge(self, other: LowRankSum) -> None:
        """Add another sum over disjoint data: concatenate token columns, add counts (SPEC §3.3)."""
        if other.basis is not None:
            self.chunks.append(other.basis.t().to(self.device, self.storage_dtype))
        self.chunks.extend(c.to(self.device, self.storage_dtype) for c in other.chunks)
        self.tail_mass += other.tail_mass
        self.discarded_mass += other.discarded_mass
        self.count += other.count
        if self.max_rank is not None and self.num_columns > self.max_rank:
            self.compress()

    def raw_columns(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``[out, m]`` matrix ``W`` of all held columns with ``G_sum ≈ W Wᵀ (+ tail)``; arithmetic dtype."""
        parts = []
        if self.basis is not None:
            parts.append(self.basis.to(dtype))
        parts.extend(c.to(dtype).t() for c in self.chunks)
        if not parts:
            return torch.zeros(self.dim, 0, dtype=dtype, device=self.device)
        return torch.cat(parts, dim=1)

    def compress(self) -> None:
        """Compress to the top ``max_rank`` eigenpairs plus an isotropic tail (SPEC §6)."""
        from .lowrank import compress_columns

        if self.max_rank is None:
            return
        w = self.raw_columns(torch.float32 if self.storage_dtype != torch.float64 else torch.float64)
        kept, dropped = compress_columns(w, self.max_rank)
        self.basis = kept.to(self.storage_dtype)
        self.chunks = []
        self.tail_mass += dropped
        self.discarded_mass += dropped

    def factor_U(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``U = W / √N`` with shape ``[out, m]`` (asserted)."""
        w = self.raw_columns(dtype)
        assert w.shape[0] == self.dim, f"U must be [out={self.dim}, T], got {list(w.shape)}"
        return w / math.sqrt(self.count) if self.count > 0 else w

    def tail(self) -> float:
        """Isotropic tail eigenvalue ``τ`` of the normalised ``G`` over the complement of the kept columns."""
        if self.tail_mass <= 0 or self.count <= 0:
            return 0.0
        rank = self.num_columns
        return self.tail_mass / self.count / max(self.dim - rank, 1)

    def state(self) -> dict[str, Tensor]:
        """Raw state as plain tensors: columns ``W`` (``[out, m]``), count and tail mass."""
        return {
            "columns": self.raw_columns(self.storage_dtype if self.storage_dtype != torch.float16 else torch.float32),
            "count": torch.tensor(self.count, dtype=torch.float64),
            "tail_mass": torch.tensor(self.tail_mass, dtype=torch.float64),
            "discarded_mass": torch.tensor(self.discarded_mass, dtype=torch.float64),
        }

    def load_state(self, state: dict[str, Tensor]) -> None:
        """Replace the state by ``state`` (inverse of :meth:`state`)."""
        cols = state["columns"]
        self.basis = None
        self.chunks = [cols.t().to(self.device, self.storage_dtype).contiguous()] if cols.shape[1] else []
        self.count = float(state["count"])
        self.tail_mass = float(state.get("tail_mass", torch.tensor(0.0)))
        self.discarded_mass = float(state.get("discarded_mass", torch.tensor(0.0)))


@dataclass
class LayerSums:
    """The two factor sums of one layer. ``G`` is a :class:`DenseSum` or a :class:`LowRankSum`."""

    A: DenseSum
    G: DenseSum | LowRankSum
    batches: int = 0

    def merge(self, other: LayerSums) -> None:
        """Add the sums of another pass over disjoint data."""
        self.A.merge(other.A)
        self.G.merge(other.G)  # type: ignore[arg-type]
        self.batches += other.batches


@dataclass
class CollectionReport:
    """What happened during collection, for the user and the report (SPEC §1, §3.3).

    Attributes:
        skipped_layers: affine layers not tracked, with the reason.
        never_fired: tracked layers whose hooks never fired.
        empty_batches: indices of batches with ``T = 0`` or ``N = 0``.
        nonfinite_batches: ``(batch, layers)`` for batches dropped by ``on_nonfinite="skip"``.
        tokens: attended positions seen (``T``), loss terms seen (``N``), batches committed.
        warnings: other messages (tied weights, placement).

    """

    skipped_layers: dict[str, str] = field(default_factory=dict)
    never_fired: list[str] = field(default_factory=list)
    empty_batches: list[int] = field(default_factory=list)
    nonfinite_batches: list[tuple[int, list[str]]] = field(default_factory=list)
    tokens: int = 0
    loss_terms: int = 0
    batches: int = 0
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-serialisable form."""
        return {
            "skipped_layers": dict(self.skipped_layers),
            "never_fired": list(self.never_fired),
            "empty_batches": list(self.empty_batches),
            "nonfinite_batches": [[b, list(ls)] for b, ls in self.nonfinite_batches],
            "tokens": self.tokens,
            "loss_terms": self.loss_terms,
            "batches": self.batches,
            "warnings": list(self.warnings),
        }
