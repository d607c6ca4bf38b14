"""Sums plus counts, normalised once (docs/concepts.md). One code path serves ``A`` and ``G``.

A factor is ``Σ rowsᵀ rows`` and a count (``T`` tokens for ``A``, ``N`` loss terms for ``G``). A batch's rows are
staged, checked for non-finite values, and only then committed, so a poisoned batch never reaches the sums. Sums
from disjoint data merge exactly by adding sums and counts.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..algebra.columns import ColumnStore, Residence, split_rows
from ..algebra.gram import add_gram
from ..algebra.lowrank import LowRankEigen, compress_columns, eigen_from_columns
from ..errors import KronfisherError, PlacementWarning, ShapeError
from . import placement

logger = logging.getLogger("kronfisher")


class DenseSum:
    """Dense ``[d, d]`` sum of outer products plus a count.

    With ``max_rows > 0`` the sum starts by keeping the rows themselves (as staged, with their scale and bias flag):
    while at most ``max_rows`` have been seen, the factor has rank ``≤ T < d`` and is decomposed from its
    ``[T, T]`` Gram (:func:`~kronfisher.algebra.lowrank.eigen_from_rows`), the rows take ``T · d ≤ max_rows · d``
    memory instead of ``d²``, and collection pays no ``d² · T`` GEMM. The first contribution past ``max_rows`` (or
    a read of :attr:`sum`) folds the rows into the dense sum, once, with the arithmetic a dense sum would have
    used for them; from then on it is the plain dense sum.

    Attributes:
        rows: the held row blocks ``(rows, scale, augment)`` (empty once folded).
        count: the normaliser (tokens or loss terms).

    """

    kind = "dense"

    def __init__(
        self, dim: int, dtype: torch.dtype, device: torch.device | str = "cpu", *, max_rows: int = 0, label: str = ""
    ) -> None:
        self.dim = dim
        self.dtype = dtype
        self.device = torch.device(device)
        self.max_rows = max(0, int(max_rows))
        self.label = label or f"a dense factor ({dim} × {dim})"
        self.rows: list[tuple[Tensor, float, bool]] = []
        self._sum: Tensor | None = None if self.max_rows else torch.zeros(dim, dim, dtype=dtype, device=device)
        self.count = 0.0
        self.released = False

    @property
    def holds_rows(self) -> bool:
        """True while the factor is kept as rows (not yet folded into the dense sum)."""
        return self._sum is None

    @property
    def num_rows(self) -> int:
        """Rows held (0 once folded)."""
        return sum(int(r.shape[0]) for r, _, _ in self.rows)

    def release(self) -> None:
        """Free the rows or the sum once decomposed (a grouped run); the count stays, any later read raises."""
        self.rows, self._sum, self.released = [], None, True

    def _live(self) -> None:
        if self.released:  # a zero sum here would silently poison whatever reads it
            raise KronfisherError(f"The sum of {self.label} was freed once decomposed; it cannot be read again.")

    @property
    def sum(self) -> Tensor:
        """The dense ``[d, d]`` sum (folds held rows first, once)."""
        self._live()
        if self._sum is None:
            total = self._allocate()
            for r, scale, augment in self.rows:
                add_gram(total, r.to(total.device), augment=augment, scale=scale)
            self.rows, self._sum = [], total
        return self._sum

    @sum.setter
    def sum(self, value: Tensor) -> None:
        self.rows, self._sum, self.device = [], value, value.device

    def _allocate(self, rows: Tensor | None = None) -> Tensor:
        """``[d, d]`` zeros (or a copy of ``rows``) where the sum lives.

        After a real accelerator OOM the sum moves to CPU with a :class:`~kronfisher.errors.PlacementWarning` and
        the tensor is made there (docs/gpu.md).
        """
        try:
            if rows is None:
                return torch.zeros(self.dim, self.dim, dtype=self.dtype, device=self.device)
            return rows.to(self.device, copy=True)  # never a view of an activation or a gradient
        except torch.OutOfMemoryError as err:
            if not placement.is_accelerator(self.device):
                raise
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            msg = f"Out of memory on {self.device} for the sum of {self.label}: it is kept on CPU. [{first}]"
            logger.warning(msg)
            warnings.warn(msg, PlacementWarning, stacklevel=3)
            self.to(torch.device("cpu"))
            return self._allocate(rows)

    def to(self, device: torch.device | str) -> None:
        """Move the held rows or the sum to ``device`` (in place)."""
        self.device = torch.device(device)
        self.rows = [(r.to(self.device), s, a) for r, s, a in self.rows]
        if self._sum is not None:
            self._sum = self._sum.to(self.device)

    def add(self, contribution: Tensor, count: float) -> None:
        """Add a staged ``[d, d]`` contribution and its count."""
        if contribution.shape != (self.dim, self.dim):
            raise ShapeError(f"Contribution of shape {list(contribution.shape)} for a sum of {[self.dim, self.dim]}.")
        total = self.sum
        total.add_(contribution.to(total.device, total.dtype))
        self.count += float(count)

    def add_rows(
        self,
        rows: Tensor,
        count: float,
        *,
        augment: bool = False,
        scale: float = 1.0,
        prepared: dict[Any, Tensor] | None = None,
    ) -> None:
        """Add ``Σ_t a_t a_tᵀ`` of ``[n, d]`` rows (``a_t = [s·rows_t; 1]`` with ``augment``) and their count.

        Kept as rows while at most ``max_rows`` are held, else accumulated into the dense sum in place.
        ``prepared`` shares the stored copy of one staged tensor between sums that receive it (q/k/v, gate/up).
        """
        self._live()
        n, width = int(rows.shape[0]), int(rows.shape[1]) + int(augment)
        if width != self.dim:
            raise ShapeError(f"Rows of width {width} (augment={augment}) for a sum of {[self.dim, self.dim]}.")
        if self._sum is None and self.num_rows + n <= self.max_rows:
            key = (id(rows), self.device)
            stored = None if prepared is None else prepared.get(key)
            if stored is None or stored.device != self.device:  # (a sum moved to CPU after an OOM)
                stored = self._allocate(rows)
                if prepared is not None:
                    prepared[(id(rows), self.device)] = stored
            if n:
                self.rows.append((stored, float(scale), bool(augment)))
        else:
            add_gram(self.sum, rows.to(self.sum.device), augment=augment, scale=scale)
        self.count += float(count)

    def row_matrix(self, dtype: torch.dtype, device: torch.device | None = None) -> Tensor:
        """The held rows as one ``[T, d]`` matrix ``[s·rows, 1]`` in ``dtype`` (the factor is its Gram / count)."""
        self._live()
        where = self.device if device is None else device
        out = torch.empty(self.num_rows, self.dim, dtype=dtype, device=where)
        start = 0
        for r, scale, augment in self.rows:
            n, w = int(r.shape[0]), int(r.shape[1])
            block = out[start : start + n]
            block[:, :w].copy_(r)
            if scale != 1.0:
                block[:, :w].mul_(scale)
            if augment:
                block[:, w] = 1.0
            start += n
        return out

    def merge(self, other: DenseSum) -> None:
        """Add another sum over disjoint data (exact)."""
        if self.holds_rows and other.holds_rows and self.num_rows + other.num_rows <= self.max_rows:
            self.rows.extend((r.to(self.device), s, a) for r, s, a in other.rows)
            self.count += other.count
            return
        self.add(other.sum if not other.holds_rows else other.folded(), other.count)

    def folded(self) -> Tensor:
        """The dense sum without changing this object (a temporary when rows are held)."""
        self._live()
        if self._sum is not None:
            return self._sum
        total = torch.zeros(self.dim, self.dim, dtype=self.dtype, device=self.device)
        for r, scale, augment in self.rows:
            add_gram(total, r, augment=augment, scale=scale)
        return total

    def state(self) -> dict[str, Tensor]:
        """Raw state as plain tensors (for files and distributed reduction); held rows are folded into a copy."""
        return {"sum": self.folded(), "count": torch.tensor(self.count, dtype=torch.float64)}

    def load_state(self, state: dict[str, Tensor]) -> None:
        """Replace the state by ``state`` (inverse of :meth:`state`)."""
        self.sum = state["sum"].clone()
        self.count = float(state["count"])


class LowRankSum:
    """Low-rank ``G``: keeps the (masked, rescaled) output-gradient rows so that ``G = U Uᵀ`` (docs/concepts.md).

    The columns ``W = [ĝ_1 … ĝ_T]`` of ``U = W / √N`` (``[out, T]``) are held token-major, as ``[n, out]`` chunks in
    ``storage_dtype`` (``lowrank_dtype``) on ``device`` (see ``residence``); arithmetic on them is blockwise in
    float32 or higher. Nothing of size ``out × out`` is ever allocated.

    Token budget (``max_rank = k``, buffer ``b = k`` by default): ``k`` compressed columns ``basis = P diag(√s)``
    plus a buffer of new ones. When more than ``k + b`` are held, the basis and the next ``b`` buffered columns are
    compressed back to ``k`` (:func:`~kronfisher.algebra.lowrank.compress_columns`, a ``[k + b, k + b]`` Gram and
    eigh in ``gram_dtype``) until at most ``k + b`` are held; the discarded mass goes to ``tail_mass`` (the trace
    stays exact). So ``O(out · k)`` work per token whatever the batch size, memory ``O(out (k + b))`` plus one
    batch, and no ``[T, T]`` matrix larger than ``k + b``. :meth:`eigen` truncates to ``k``; exact while ``T ≤ k``.

    Attributes:
        chunks: raw ``[n, out]`` rows after the basis (each immutable once appended).
        basis: compressed columns ``[out, k]`` (a transposed view of a token-major tensor), or None.
        count: ``N`` (loss terms).
        tail_mass: discarded eigenvalue mass, un-normalised (``G_sum`` units); ``discarded_mass`` equals it.
        compressions: number of compressions run.

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
        *,
        buffer: int | None = None,
        gram_dtype: torch.dtype = torch.float64,
    ) -> None:
        self.dim = dim
        self.storage_dtype = storage_dtype
        self.max_rank = max_rank
        self.buffer = max(1, int(buffer if buffer is not None else (max_rank or 1)))
        self.gram_dtype = gram_dtype
        self.device = torch.device(device)
        self.residence = residence  # where products with U run (streamed from host memory, docs: placement)
        self.chunks: list[Tensor] = []
        self.count = 0.0
        self.basis: Tensor | None = None
        self.basis_sq: Tensor | None = None  # float64 squared norms of the basis columns (orthogonal)
        self.tail_mass = 0.0
        self.discarded_mass = 0.0
        self.compressions = 0

    @property
    def num_columns(self) -> int:
        """Columns currently held (compressed basis plus raw tokens)."""
        raw = sum(int(c.shape[0]) for c in self.chunks)
        return raw + (0 if self.basis is None else int(self.basis.shape[1]))

    @property
    def over_budget(self) -> bool:
        """True when more than ``k + b`` columns are held (the next :meth:`compress` has work to do)."""
        return self.max_rank is not None and self.num_columns > self.max_rank + self.buffer

    def columns(self) -> ColumnStore:
        """The held columns ``W`` (basis first) as a :class:`~kronfisher.algebra.columns.ColumnStore` (no copy)."""
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
        self.compress()

    def merge(self, other: LowRankSum) -> None:
        """Add another sum over disjoint data: concatenate columns, add counts and tail mass (docs/concepts.md)."""
        if other.dim != self.dim:
            raise ShapeError(f"Cannot merge low-rank sums of out={other.dim} into out={self.dim}.")
        self.chunks.extend(c.to(self.device, self.storage_dtype) for c in other.columns().chunks)
        self.tail_mass += other.tail_mass
        self.discarded_mass += other.discarded_mass
        self.count += other.count
        self.compress()

    def compress(self) -> None:
        """While more than ``k + b`` columns are held, compress the basis and the next ``b`` to ``k`` (trace kept)."""
        while self.over_budget:
            k, first = int(self.max_rank), [] if self.basis is None else [self.basis.t()]  # type: ignore[arg-type]
            head, self.chunks = split_rows(self.chunks, max(k + self.buffer - sum(b.shape[0] for b in first), 1))
            store = ColumnStore(first + head, self.dim, self.residence)
            known = self.basis_sq if first else None
            kept, dropped, self.basis_sq = compress_columns(store, k, self.storage_dtype, self.gram_dtype, known)
            self.basis = kept.t()
            self.tail_mass += dropped
            self.discarded_mass += dropped
            self.compressions += 1

    def eigen(self, *, name: str = "?", dtype: torch.dtype = torch.float32) -> LowRankEigen:
        """Thin eigenform of the normalised ``G`` (budget ``max_rank`` enforced; the sums are not modified)."""
        return eigen_from_columns(
            self.columns(),
            self.count,
            self.tail_mass,
            max_rank=self.max_rank,
            dtype=dtype,
            name=name,
            gram_dtype=self.gram_dtype,
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
        self.basis = self.basis_sq = None
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
