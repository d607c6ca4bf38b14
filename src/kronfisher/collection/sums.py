"""Sums plus counts, normalised once (docs/concepts.md). One code path serves ``A`` and ``G``.

A factor is accumulated as ``Σ rowsᵀ rows`` and a count (``T`` tokens for ``A``, ``N`` loss terms for ``G``).
Contributions of a batch are first *staged* (computed, checked for non-finite values by the capture) and only
then *committed*, so a poisoned batch never reaches the sums. Sums from disjoint data merge exactly by adding
sums and counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..algebra.columns import ColumnStore, Residence
from ..algebra.lowrank import LowRankEigen, compress_columns, eigen_from_columns
from ..errors import ShapeError


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
        """Add another sum over disjoint data (exact)."""
        self.add(other.sum, other.count)

    def state(self) -> dict[str, Tensor]:
        """Raw state as plain tensors (for files and distributed reduction)."""
        return {"sum": self.sum, "count": torch.tensor(self.count, dtype=torch.float64)}

    def load_state(self, state: dict[str, Tensor]) -> None:
        """Replace the state by ``state`` (inverse of :meth:`state`)."""
        self.sum = state["sum"].clone()
        self.count = float(state["count"])


class LowRankSum:
    """Low-rank ``G``: keeps the (masked, rescaled) output-gradient rows so that ``G = U Uᵀ`` (docs/concepts.md).

    The columns ``W = [ĝ_1 … ĝ_T]`` of ``U = W / √N`` (``[out, T]``) are held token-major, as ``[n, out]`` chunks in
    ``storage_dtype`` (``lowrank_dtype``), on ``device`` (CPU for huge layers); arithmetic on them is blockwise in
    float32 or higher (:mod:`kronfisher.lowrank`). Nothing of size ``out × out`` is ever allocated.

    Token budget (``max_rank = k``): when more than ``2k`` columns are held, they are compressed to the top-``k``
    eigen-columns ``basis = P diag(√s)`` (``[out, k]``) and the discarded mass goes to ``tail_mass`` (so the trace
    stays exact); columns that arrive later are appended after the basis and compressed with it next time, and
    :meth:`eigen` truncates to ``k``. Memory stays ``O(out · k)``.

    Attributes:
        chunks: raw ``[n, out]`` rows after the basis (each immutable once appended).
        basis: compressed columns ``[out, k]`` (a transposed view of a token-major tensor), or None.
        count: ``N`` (loss terms).
        tail_mass: discarded eigenvalue mass, un-normalised (``G_sum`` units); ``discarded_mass`` equals it.

    """

    kind = "lowrank"
    min_chunk_rows = 256  # small batches are concatenated into chunks of at least this many rows

    def __init__(
        self,
        dim: int,
        storage_dtype: torch.dtype,
        max_rank: int | None = None,
        device: torch.device | str = "cpu",
        residence: Residence | None = None,
    ) -> None:
        self.dim = dim
        self.storage_dtype = storage_dtype
        self.max_rank = max_rank
        self.device = torch.device(device)
        self.residence = residence  # where products with U run (streamed from host memory, docs: placement)
        self.chunks: list[Tensor] = []
        self.count = 0.0
        self.basis: Tensor | None = None
        self.tail_mass = 0.0
        self.discarded_mass = 0.0

    @property
    def num_columns(self) -> int:
        """Columns currently held (compressed basis plus raw tokens)."""
        raw = sum(int(c.shape[0]) for c in self.chunks)
        return raw + (0 if self.basis is None else int(self.basis.shape[1]))

    def columns(self) -> ColumnStore:
        """The held columns ``W`` (basis first) as a :class:`~kronfisher.lowrank.ColumnStore` (no copy)."""
        head = [] if self.basis is None else [self.basis.t()]
        return ColumnStore(head + list(self.chunks), self.dim, self.residence)

    def add(self, rows: Tensor, count: float) -> None:
        """Append staged ``[n, out]`` rows (already scaled to gradients of the summed loss) and their count."""
        if rows.dim() != 2 or rows.shape[1] != self.dim:
            raise ShapeError(f"Low-rank rows must be [n, out={self.dim}], got {list(rows.shape)}.")
        if rows.shape[0]:
            self.chunks.append(rows.to(self.device, self.storage_dtype).contiguous())
            # Small batches: once a trailing run of small chunks reaches min_chunk_rows rows, it becomes one chunk
            # (a new tensor; each row is copied at most once and chunks already handed out stay untouched).
            run = 0
            while run < len(self.chunks) and self.chunks[-1 - run].shape[0] < self.min_chunk_rows:
                run += 1
            if run > 1 and sum(int(c.shape[0]) for c in self.chunks[-run:]) >= self.min_chunk_rows:
                self.chunks[-run:] = [torch.cat(self.chunks[-run:])]
        self.count += float(count)
        if self.max_rank is not None and self.num_columns > 2 * self.max_rank:
            self.compress()

    def merge(self, other: LowRankSum) -> None:
        """Add another sum over disjoint data: concatenate columns, add counts and tail mass (docs/concepts.md)."""
        if other.dim != self.dim:
            raise ShapeError(f"Cannot merge low-rank sums of out={other.dim} into out={self.dim}.")
        self.chunks.extend(c.to(self.device, self.storage_dtype) for c in other.columns().chunks)
        self.tail_mass += other.tail_mass
        self.discarded_mass += other.discarded_mass
        self.count += other.count
        if self.max_rank is not None and self.num_columns > 2 * self.max_rank:
            self.compress()

    def compress(self) -> None:
        """Compress to the top ``max_rank`` eigen-columns plus tail mass, keeping the trace exact (docs/concepts.md)."""
        if self.max_rank is None or self.num_columns <= self.max_rank:
            return
        kept, dropped = compress_columns(self.columns(), self.max_rank, self.storage_dtype)
        self.basis = kept.t()
        self.chunks = []
        self.tail_mass += dropped
        self.discarded_mass += dropped

    def eigen(self, *, name: str = "?", dtype: torch.dtype = torch.float32) -> LowRankEigen:
        """Thin eigenform of the normalised ``G`` (budget ``max_rank`` enforced; the sums are not modified)."""
        return eigen_from_columns(
            self.columns(), self.count, self.tail_mass, max_rank=self.max_rank, dtype=dtype, name=name
        )

    def tail(self) -> float:
        """Isotropic tail eigenvalue ``τ`` of the normalised ``G`` (exactly the one :meth:`eigen` uses).

        ``τ = (tail_mass / N + mass truncated to the budget) / (out − r)``; 0 without compression. It depends on the
        rank ``r`` of the eigenform, so when it is not trivially 0 it is computed by the same decomposition.
        """
        if self.count <= 0:
            return 0.0
        if self.tail_mass <= 0 and (self.max_rank is None or self.num_columns <= self.max_rank):
            return 0.0
        return self.eigen(dtype=torch.float64).tail

    def trace(self) -> float:
        """``tr G`` of the normalised factor, tail included (``(‖W‖_F² + tail_mass) / N``), in float64."""
        if self.count <= 0:
            return 0.0
        return (self.columns().square_sum() + self.tail_mass) / self.count

    def raw_columns(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``W`` materialised as ``[out, m]`` in ``dtype`` (basis first). A full copy: diagnostics and files only."""
        store = self.columns()
        if not store.chunks:
            return torch.zeros(self.dim, 0, dtype=dtype, device=self.device)
        return torch.cat([c.to(dtype) for c in store.chunks]).t()

    def factor_U(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``U = W / √N`` with shape ``[out, m]`` (asserted). A full copy: diagnostics only."""
        w = self.raw_columns(dtype)
        assert w.shape == (self.dim, self.num_columns), f"U must be [out={self.dim}, T], got {list(w.shape)}"
        return w / math.sqrt(self.count) if self.count > 0 else w

    def state(self) -> dict[str, Tensor]:
        """Raw state as plain tensors: columns ``W`` (``[out, m]``, storage dtype), count and tail mass."""
        store = self.columns()
        if store.chunks:
            cols = torch.cat(list(store.chunks)).t()  # a transposed view: no second copy
        else:
            cols = torch.zeros(self.dim, 0, dtype=self.storage_dtype, device=self.device)
        return {
            "columns": cols,
            "count": torch.tensor(self.count, dtype=torch.float64),
            "tail_mass": torch.tensor(self.tail_mass, dtype=torch.float64),
            "discarded_mass": torch.tensor(self.discarded_mass, dtype=torch.float64),
        }

    def load_state(self, state: dict[str, Tensor]) -> None:
        """Replace the state by ``state`` (inverse of :meth:`state`)."""
        cols = state["columns"]
        if cols.dim() != 2 or cols.shape[0] != self.dim:
            raise ShapeError(f"Low-rank columns must be [out={self.dim}, m], got {list(cols.shape)}.")
        self.basis = None
        self.chunks = [cols.t().to(self.device, self.storage_dtype).contiguous()] if cols.shape[1] else []
        self.count = float(state["count"])
        self.tail_mass = float(state.get("tail_mass", torch.tensor(0.0)))
        self.discarded_mass = float(state.get("discarded_mass", torch.tensor(self.tail_mass)))


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
