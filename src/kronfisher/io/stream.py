"""Safetensors files written tensor by tensor, in bounded chunks (docs/files.md#format).

The header (tensor index and string metadata) depends only on the tensors' names, dtypes and shapes, so it is
written first and each tensor's bytes follow, in at most :data:`CHUNK_BYTES` at a time: writing a file never holds
more than one chunk beyond the tensors themselves, whichever safetensors version is installed (older versions of
``safetensors.torch.save_file``, which this package accepts, copy each tensor to ``bytes`` before writing it:
https://github.com/huggingface/safetensors/issues/564). A CPU tensor in memory order is written from a view of
its storage, with no copy; a strided or accelerator tensor is copied to the host one slice of at most a chunk at a
time.

The layout is the one the safetensors writer produces (its Rust ``prepare`` and ``Metadata`` serialisation): tensors
by decreasing dtype alignment, then by name; compact JSON with the metadata first, padded with spaces to a multiple
of 8 bytes; data little endian and contiguous. A file written here is byte for byte the file ``save_file`` writes
for the same tensors whenever the metadata has at most one key (with more, ``save_file`` orders the metadata keys
by a hash map's iteration order, which changes from run to run; this writer keeps the caller's order).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, BinaryIO

import torch
from torch import Tensor

from ..errors import FileFormatError
from .format import ST_CODES, Rows, dtype_name

CHUNK_BYTES = 64 << 20  # the most bytes written (or copied to the host) at once


# Rank of each dtype in safetensors' ordering (decreasing alignment; its Dtype enum order breaks the ties).
_RANK = {code: i for i, code in enumerate(("I64", "F64", "F32", "I32", "BF16", "F16", "I16", "I8", "U8", "BOOL"))}


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # bytes views (bfloat16 has no numpy)


Spec = tuple[str, str, list[int], int]  # name, safetensors dtype code, shape, byte length


def st_code(key: str, t: Tensor | Rows) -> str:
    """The safetensors dtype code of ``t`` (``"F32"``), or a one-line error naming the tensor."""
    code = ST_CODES.get(dtype_name(t.dtype))
    if code is None:
        raise FileFormatError(f"Tensor {key!r} has dtype {t.dtype}, which factor files do not store.")
    return code


def ordered(tensors: Mapping[str, Tensor | Rows]) -> list[tuple[str, Tensor | Rows]]:
    """``tensors`` in the order the safetensors writer lays them out: decreasing alignment, then by name."""
    return sorted(tensors.items(), key=lambda kv: (_RANK[st_code(kv[0], kv[1])], kv[0]))


def specs(items: Iterable[tuple[str, Tensor | Rows]]) -> list[Spec]:
    """The index entries of tensors written in the order of ``items``."""
    return [(k, st_code(k, t), list(t.shape), t.numel() * t.element_size()) for k, t in items]


def header_bytes(entries: Iterable[Spec], metadata: Mapping[str, str] | None) -> tuple[bytes, int]:
    """The safetensors header of tensors stored in the order of ``entries``; and the payload length.

    Returns the bytes that precede the payload (8-byte little-endian length, then the JSON index padded with
    spaces to a multiple of 8, as the safetensors writer lays it out) and the total byte length of the tensors.
    """
    index: dict[str, Any] = {} if metadata is None else {"__metadata__": dict(metadata)}
    offset = 0
    for name, code, shape, nbytes in entries:
        index[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    # ensure_ascii=False: the safetensors writer (serde_json) keeps non-ASCII text as UTF-8 and escapes as Python does
    head = json.dumps(index, separators=(",", ":"), ensure_ascii=False).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head, offset


def _host_slices(t: Tensor, limit: int) -> Iterator[Tensor]:
    """``t`` as CPU tensors in memory order, each a view of ``t`` or a copy of at most ``limit`` bytes (or one element).

    A slice along the first dimension of a strided or accelerator tensor holds whole rows; a row larger than
    ``limit`` is split in turn, so no copy exceeds ``limit`` bytes unless one element does.
    """
    if t.device.type == "cpu" and t.is_contiguous():
        yield t
        return
    if t.dim() == 0 or t.numel() * t.element_size() <= limit:
        yield t.to("cpu").contiguous()
        return
    row = t[0].numel() * t.element_size()
    if row > limit and t.dim() > 1:
        for i in range(t.shape[0]):
            yield from _host_slices(t[i], limit)
        return
    step = max(1, limit // max(row, 1))
    for i in range(0, t.shape[0], step):
        yield t[i : i + step].to("cpu").contiguous()


def byte_chunks(t: Tensor | Rows, limit: int | None = None) -> Iterator[Any]:
    """The bytes of ``t`` as safetensors stores them (memory order, little endian), at most ``limit`` bytes each.

    Each chunk is a buffer (a numpy view of the tensor's storage where it is a CPU tensor in memory order): pass it
    to ``write`` or ``hashlib`` as it is. On a big-endian host each chunk is a byte-swapped copy. :class:`Rows` are
    written one stacked tensor after the other, never concatenated.
    """
    limit = CHUNK_BYTES if limit is None else limit
    if isinstance(t, Rows):
        for c in t.chunks:
            yield from byte_chunks(c, limit)
        return
    t = t.detach()
    if t.numel() == 0:
        return
    size = t.element_size()
    step = max(1, limit // size)
    for part in _host_slices(t, limit):
        flat = part.reshape(-1).view(_INT_OF_SIZE[size]).numpy()
        for i in range(0, flat.shape[0], step):
            piece = flat[i : i + step]
            yield piece.byteswap() if sys.byteorder == "big" else piece


def copy_range(src: BinaryIO, dst: BinaryIO, start: int, length: int, limit: int | None = None) -> None:
    """Copy ``length`` bytes of ``src`` from ``start`` to the current position of ``dst``, a chunk at a time."""
    limit = CHUNK_BYTES if limit is None else limit
    src.seek(start)
    while length > 0:
        chunk = src.read(min(limit, length))
        if not chunk:
            raise OSError(f"{src.name}: ended {length} bytes early")
        dst.write(chunk)
        length -= len(chunk)


def write_tensors(
    fh: BinaryIO, tensors: Mapping[str, Tensor | Rows], metadata: Mapping[str, str] | None, limit: int | None = None
) -> int:
    """Write ``tensors`` and string ``metadata`` to ``fh`` as a safetensors file, tensor by tensor; return its size.

    No more than ``limit`` bytes (:data:`CHUNK_BYTES` by default) are copied at once (see :func:`byte_chunks`).
    """
    items = ordered(tensors)
    head, total = header_bytes(specs(items), metadata)
    fh.write(head)
    for _, t in items:
        for chunk in byte_chunks(t, limit):
            fh.write(chunk)
    return len(head) + total
