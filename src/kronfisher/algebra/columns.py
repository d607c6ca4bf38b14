"""Token-major storage of the low-rank ``W`` of huge layers and its blockwise products (docs/concepts.md).

``W`` (``[out, m]``) is held as ``[n_i, out]`` chunks; every product runs over blocks of ``out`` rows. Where the
products run is the store's :class:`Residence` (docs/gpu.md): on the chunks' own device, or, for a ``W`` kept in
host memory, on an accelerator that the blocks are streamed to (:func:`kronfisher.transfer.stream_blocks`: gathered
on the host, copied in the storage dtype with double buffering, cast on the device). Results are always on
:attr:`ColumnStore.device`, the work device.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ShapeError
from ..transfer import STATS, nbytes, stream_blocks

BLOCK_BYTES = 16 * 2**20  # size of one upcast block of W (or of V) in the blockwise products
MIN_BLOCK_ROWS = 256


def row_blocks(rows: int, width: int, itemsize: int, step: int | None = None) -> Iterator[tuple[int, int]]:
    """Ranges of ``rows`` so that a ``[block, width]`` tensor of ``itemsize`` bytes stays near ``BLOCK_BYTES``.

    ``step`` fixes the block height instead (a :class:`Residence`'s ``block_rows``).
    """
    if step is None:
        step = max(MIN_BLOCK_ROWS, BLOCK_BYTES // max(width * itemsize, 1))
    for start in range(0, rows, max(int(step), 1)):
        yield start, min(start + step, rows)


@dataclass(frozen=True)
class Residence:
    """Where a ``W``'s products run and whether its blocks are streamed there from host memory.

    Attributes:
        work: the device of the products and their results.
        streamed: ``W`` stays in host memory and each product copies its blocks to ``work`` (double-buffered).
        block_rows: rows of ``out`` per block (None: sized by ``BLOCK_BYTES``).

    """

    work: torch.device
    streamed: bool = False
    block_rows: int | None = None


class ColumnStore:
    """``W`` (``[out, m]``) held token-major as immutable ``[n_i, out]`` chunks in a storage dtype.

    Args:
        chunks: ``[n_i, out]`` tensors (same ``out`` and dtype); never modified in place.
        dim: ``out`` (needed when there are no chunks).
        residence: where the products run (None: on the chunks' device, not streamed).

    """

    def __init__(self, chunks: tuple[Tensor, ...] | list[Tensor], dim: int, residence: Residence | None = None) -> None:
        self.chunks = tuple(c for c in chunks if c.shape[0])
        self.dim = int(dim)
        for c in self.chunks:
            if c.dim() != 2 or c.shape[1] != self.dim:
                raise ShapeError(f"Low-rank columns must be stored as [n, out={self.dim}], got {list(c.shape)}.")
        self.residence = residence

    @property
    def m(self) -> int:
        """Number of columns of ``W``."""
        return sum(int(c.shape[0]) for c in self.chunks)

    @property
    def storage_device(self) -> torch.device:
        """Device of the stored chunks."""
        return self.chunks[0].device if self.chunks else torch.device("cpu")

    @property
    def device(self) -> torch.device:
        """The work device: where products run and their results live."""
        return self.residence.work if self.residence is not None else self.storage_device

    @property
    def streamed(self) -> bool:
        """Whether blocks are copied from host memory to the work device for every product."""
        return self.residence is not None and self.residence.streamed

    def on(self, residence: Residence | None) -> ColumnStore:
        """The same chunks with products run elsewhere (e.g. on the host after an out-of-memory error)."""
        return ColumnStore(self.chunks, self.dim, residence)

    def _ranges(self, width: int, itemsize: int) -> list[tuple[int, int]]:
        step = None if self.residence is None else self.residence.block_rows
        return list(row_blocks(self.dim, width, itemsize, step))

    def _fill(self, start: int, stop: int, out: Tensor) -> None:
        """``W[start:stop]ᵀ`` into ``out`` (``[m, stop − start]``), chunk by chunk."""
        offset = 0
        for c in self.chunks:
            n = int(c.shape[0])
            out[offset : offset + n].copy_(c[:, start:stop])
            offset += n

    def block(self, start: int, stop: int, dtype: torch.dtype) -> Tensor:
        """``W[start:stop]ᵀ`` as ``[m, stop − start]`` in ``dtype`` on the work device."""
        parts = [c[:, start:stop] for c in self.chunks]
        if not parts:
            return torch.zeros(0, stop - start, dtype=dtype, device=self.device)
        blk = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        if self.streamed:
            STATS.add(h2d=nbytes(blk))  # a single block: copied synchronously (products use blocks())
        return blk.to(self.device).to(dtype)

    def blocks(
        self, dtype: torch.dtype, width: int | None = None, ranges: Sequence[tuple[int, int]] | None = None
    ) -> Iterator[tuple[int, int, Tensor]]:
        """``(start, stop, W[start:stop]ᵀ)`` on the work device in ``dtype``, over ``ranges`` of the rows of ``W``.

        ``ranges`` default: blocks sized for ``max(m, width)`` columns. A streamed store copies each block from host
        memory in the storage dtype while the device works on the previous one.
        """
        if ranges is None:
            itemsize = torch.empty((), dtype=dtype).element_size()
            ranges = self._ranges(max(self.m, width or 1), itemsize)
        if self.streamed and self.chunks:
            store_dtype = self.chunks[0].dtype
            yield from stream_blocks(ranges, self._fill, self.m, store_dtype, self.device, dtype)
            return
        for start, stop in ranges:
            yield start, stop, self.block(start, stop, dtype)

    def ranges(self, width: int, dtype: torch.dtype) -> list[tuple[int, int]]:
        """The row blocks a product with ``width`` columns in ``dtype`` uses (for two passes over the same blocks)."""
        return self._ranges(max(self.m, width), torch.empty((), dtype=dtype).element_size())

    def gram(self) -> Tensor:
        """``Wᵀ W`` (``[m, m]``, float64) on the work device, block by block; only upper tiles are multiplied."""
        m, tile = self.m, 1024
        out = torch.zeros(m, m, dtype=torch.float64, device=self.device)
        for _, _, blk in self.blocks(torch.float64):
            if m <= tile:
                out.addmm_(blk, blk.t())
                continue
            for i in range(0, m, tile):
                out[i : i + tile, i:].addmm_(blk[i : i + tile], blk[i:].t())
        for i in range(0, m, tile):  # mirror the upper tiles into the lower ones, tile by tile (no m² temporary)
            for j in range(i + tile, m, tile):
                out[j : j + tile, i : i + tile].copy_(out[i : i + tile, j : j + tile].t())
        return out

    def rows_matmul(self, x: Tensor) -> Tensor:
        """``x W`` for ``x`` of shape ``[n, out]`` (``[n, m]``), in ``x``'s dtype, on the work device."""
        x = x.to(self.device)
        out = torch.zeros(x.shape[0], self.m, dtype=x.dtype, device=self.device)
        for start, stop, blk in self.blocks(x.dtype, width=x.shape[0]):
            out.addmm_(x[:, start:stop], blk.t())
        return out

    def square_sum(self) -> float:
        """``‖W‖_F² = tr(W Wᵀ)`` in float64 (one host sync, at the end)."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for _, _, blk in self.blocks(torch.float64):
            total += blk.square().sum()
        return float(total)


def split_rows(chunks: list[Tensor], n: int) -> tuple[list[Tensor], list[Tensor]]:
    """The first ``n`` rows of ``chunks`` and the rest (views; no copy)."""
    head: list[Tensor] = []
    for i, c in enumerate(chunks):
        if n <= 0:
            return head, chunks[i:]
        if c.shape[0] <= n:
            head.append(c)
            n -= int(c.shape[0])
        else:
            return [*head, c[:n]], [c[n:], *chunks[i + 1 :]]
    return head, []
