"""Host↔device copies of the low-rank columns: counted, pinned, and streamed with double buffering.

Every copy of the ``G`` side of a huge layer between the host and the accelerator goes through these helpers
(docs/concepts.md, placement of huge layers), so :data:`STATS` is what one pass moves across the bus:
``benchmarks/cuda_check.py`` reports it per batch. A copy is counted when the caller's placement says it crosses
(host ↔ device), also on the simulated accelerator of the CPU tests, where both sides are CPU tensors: the copies
are real there too, so the tests see the same bytes a GPU run would move.

:func:`stream_blocks` feeds a device computation block by block from host memory: on CUDA the next block is gathered
into a pinned staging buffer by the host and copied on a side stream while the device computes on the current one
(two staging and two landing buffers, ordered by events); elsewhere the same steps run one after the other.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class TransferStats:
    """Bytes copied host→device (``h2d``) and device→host (``d2h``) by the helpers of this module.

    Attributes:
        h2d: bytes uploaded.
        d2h: bytes downloaded.
        copies: number of copies.

    """

    h2d: int = 0
    d2h: int = 0
    copies: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, *, h2d: int = 0, d2h: int = 0) -> None:
        """Count one copy (thread-safe: decompositions run on several threads)."""
        with self._lock:
            self.h2d += int(h2d)
            self.d2h += int(d2h)
            self.copies += 1

    def reset(self) -> None:
        """Start counting from zero."""
        with self._lock:
            self.h2d = self.d2h = self.copies = 0

    def snapshot(self) -> dict[str, int]:
        """The counters as a plain dict."""
        with self._lock:
            return {"h2d_bytes": self.h2d, "d2h_bytes": self.d2h, "copies": self.copies}


STATS = TransferStats()  # process-wide, like torch.cuda's memory statistics


def nbytes(t: Tensor) -> int:
    """Bytes of ``t``'s elements."""
    return t.numel() * t.element_size()


def pinning() -> bool:
    """Whether host buffers are pinned: only when CUDA is available (pinning needs the driver)."""
    return torch.cuda.is_available()


def host_empty(shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    """An uninitialised host tensor, page-locked when CUDA is available (asynchronous copies need it)."""
    return torch.empty(tuple(shape), dtype=dtype, pin_memory=pinning())


def download(t: Tensor) -> Tensor:
    """A host copy of device tensor ``t`` (pinned, asynchronous on CUDA), counted as device→host bytes.

    On CUDA the copy is queued on the current stream and ``t`` must not be read on the host before that stream
    is synchronised (the per-batch non-finite check does it before anything is committed).
    """
    out = host_empty(t.shape, t.dtype)
    out.copy_(t, non_blocking=t.device.type == "cuda")
    STATS.add(d2h=nbytes(t))
    return out


def upload(t: Tensor, device: torch.device) -> Tensor:
    """A copy of host tensor ``t`` on ``device`` (asynchronous from pinned memory), counted as host→device bytes."""
    out = torch.empty(t.shape, dtype=t.dtype, device=device)
    out.copy_(t, non_blocking=t.is_pinned())
    STATS.add(h2d=nbytes(t))
    return out


def _flat_view(buf: Tensor, rows: int, cols: int) -> Tensor:
    return buf[: rows * cols].view(rows, cols)


def stream_blocks(
    ranges: Sequence[tuple[int, int]],
    fill: Callable[[int, int, Tensor], None],
    rows: int,
    store_dtype: torch.dtype,
    device: torch.device,
    dtype: torch.dtype,
) -> Iterator[tuple[int, int, Tensor]]:
    """``(start, stop, block)`` for each range, ``block`` (``[rows, stop − start]``) on ``device`` in ``dtype``.

    ``fill(start, stop, out)`` writes the host block into ``out`` (a ``[rows, stop − start]`` host buffer in
    ``store_dtype``). Blocks cross the bus in ``store_dtype`` (e.g. bfloat16) and are cast on the device. Each
    yielded block is a fresh tensor the consumer may keep.

    On CUDA, while the device works on block ``k`` the host gathers block ``k + 1`` into the other pinned staging
    buffer and a side stream copies it into the other landing buffer: the side stream waits for the device to be
    done with a landing buffer before overwriting it, and the host for the copy out of a staging buffer before
    refilling it (events). On another device (or CPU) the same steps run sequentially.
    """
    if not ranges:
        return
    width = max(stop - start for start, stop in ranges)
    if device.type != "cuda":
        staging = host_empty((rows * width,), store_dtype)
        landing = torch.empty(rows * width, dtype=store_dtype, device=device)
        for start, stop in ranges:
            host = _flat_view(staging, rows, stop - start)
            fill(start, stop, host)
            dev = _flat_view(landing, rows, stop - start)
            dev.copy_(host)
            STATS.add(h2d=nbytes(host))
            yield start, stop, dev.to(dtype, copy=True)
        return
    yield from _stream_cuda(ranges, fill, rows, width, store_dtype, device, dtype)


def _stream_cuda(
    ranges: Sequence[tuple[int, int]],
    fill: Callable[[int, int, Tensor], None],
    rows: int,
    width: int,
    store_dtype: torch.dtype,
    device: torch.device,
    dtype: torch.dtype,
) -> Iterator[tuple[int, int, Tensor]]:
    main = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    staging = [host_empty((rows * width,), store_dtype) for _ in range(2)]
    landing = [torch.empty(rows * width, dtype=store_dtype, device=device) for _ in range(2)]
    copied: list[torch.cuda.Event | None] = [None, None]
    used: list[torch.cuda.Event | None] = [None, None]

    def launch(k: int) -> None:
        i, (start, stop) = k % 2, ranges[k]
        if copied[i] is not None:
            copied[i].synchronize()  # the previous copy out of staging[i] has finished
        host = _flat_view(staging[i], rows, stop - start)
        fill(start, stop, host)
        with torch.cuda.stream(side):
            if used[i] is not None:
                side.wait_event(used[i])  # the device no longer reads landing[i]
            _flat_view(landing[i], rows, stop - start).copy_(host, non_blocking=True)
            event = torch.cuda.Event()
            event.record(side)
            copied[i] = event
        STATS.add(h2d=nbytes(host))

    try:
        launch(0)
        for k, (start, stop) in enumerate(ranges):
            if k + 1 < len(ranges):
                launch(k + 1)
            i = k % 2
            main.wait_event(copied[i])  # type: ignore[arg-type]
            block = _flat_view(landing[i], rows, stop - start).to(dtype, copy=True)
            event = torch.cuda.Event()
            event.record(main)
            used[i] = event
            yield start, stop, block
    finally:
        side.synchronize()  # nothing in flight into buffers about to be freed


def wait(device: torch.device) -> None:
    """Block the host until ``device``'s current stream is done (asynchronous copies read back); no-op elsewhere."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
