"""Token-major storage of the low-rank ``W`` of huge layers and its blockwise products (docs/concepts.md)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from ..errors import ShapeError

BLOCK_BYTES = 16 * 2**20  # size of one upcast block of W (or of V) in the blockwise products


def row_blocks(rows: int, width: int, itemsize: int) -> Iterator[tuple[int, int]]:
    """Ranges of ``rows`` so that a ``[block, width]`` tensor of ``itemsize`` bytes stays near ``BLOCK_BYTES``."""
    step = max(256, BLOCK_BYTES // max(width * itemsize, 1))
    for start in range(0, rows, step):
        yield start, min(start + step, rows)


class ColumnStore:
    """``W`` (``[out, m]``) held token-major as immutable ``[n_i, out]`` chunks in a storage dtype.

    Args:
        chunks: ``[n_i, out]`` tensors (same ``out``, dtype and device); never modified in place.
        dim: ``out`` (needed when there are no chunks).

    """

    def __init__(self, chunks: tuple[Tensor, ...] | list[Tensor], dim: int) -> None:
        self.chunks = tuple(c for c in chunks if c.shape[0])
        self.dim = int(dim)
        for c in self.chunks:
            if c.dim() != 2 or c.shape[1] != self.dim:
                raise ShapeError(f"Low-rank columns must be stored as [n, out={self.dim}], got {list(c.shape)}.")

    @property
    def m(self) -> int:
        """Number of columns of ``W``."""
        return sum(int(c.shape[0]) for c in self.chunks)

    @property
    def device(self) -> torch.device:
        """Device of the stored chunks (CPU for huge layers)."""
        return self.chunks[0].device if self.chunks else torch.device("cpu")

    def block(self, start: int, stop: int, dtype: torch.dtype) -> Tensor:
        """``W[start:stop]ᵀ`` as ``[m, stop − start]`` in ``dtype`` (a view when one chunk already has ``dtype``)."""
        parts = [c[:, start:stop] for c in self.chunks]
        if not parts:
            return torch.zeros(0, stop - start, dtype=dtype)
        blk = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        return blk.to(dtype)

    def blocks(self, dtype: torch.dtype, width: int | None = None) -> Iterator[tuple[int, int, Tensor]]:
        """``(start, stop, W[start:stop]ᵀ)`` over the rows of ``W``; blocks sized for ``max(m, width)`` columns."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        for start, stop in row_blocks(self.dim, max(self.m, width or 1), itemsize):
            yield start, stop, self.block(start, stop, dtype)

    def gram(self) -> Tensor:
        """``Wᵀ W`` (``[m, m]``, float64), accumulated block by block; only upper tiles are multiplied."""
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
        """``x W`` for ``x`` of shape ``[n, out]`` (``[n, m]``), in ``x``'s dtype, on the store's device."""
        x = x.to(self.device)
        out = torch.zeros(x.shape[0], self.m, dtype=x.dtype, device=self.device)
        for start, stop, blk in self.blocks(x.dtype, width=x.shape[0]):
            out.addmm_(x[:, start:stop], blk.t())
        return out

    def square_sum(self) -> float:
        """``‖W‖_F² = tr(W Wᵀ)`` in float64."""
        return sum(float(blk.square().sum()) for _, _, blk in self.blocks(torch.float64))
