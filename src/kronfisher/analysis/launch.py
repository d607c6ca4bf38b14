"""``kronfisher analyze`` under ``torchrun``: joining the process group and picking each rank's device.

``torchrun --nproc_per_node=N -m kronfisher.cli analyze ...`` starts N copies of the command with ``WORLD_SIZE``,
``RANK`` and ``LOCAL_RANK`` in their environment. Each copy joins the default process group (``gloo`` on CPU,
``nccl`` on CUDA, one GPU per local rank), collects on its :class:`~kronfisher.distributed.Shard` of the batches,
and the ranks merge their sums at the end of every pass; rank 0 alone prints progress and writes files.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist

from ..models import resolve_device


def launched_world_size() -> int:
    """``WORLD_SIZE`` set by ``torchrun`` (1 when the command was started on its own)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


@contextlib.contextmanager
def process_group(device: str) -> Iterator[str]:
    """Join the ``torchrun`` process group for the duration of the run; yields the device this rank uses.

    Without ``torchrun`` (or when the caller already initialised a group) nothing changes and ``device`` is
    yielded as given. Under ``torchrun`` a CUDA device without an index becomes ``cuda:LOCAL_RANK``.
    """
    if launched_world_size() <= 1 or dist.is_initialized():
        yield device
        return
    dev = resolve_device(device)
    backend = "gloo"
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
        backend = "nccl"
    dist.init_process_group(backend)
    try:
        yield str(dev)
    finally:
        dist.destroy_process_group()
