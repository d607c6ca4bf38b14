"""Distributed collection with ``torch.distributed``; every function is a no-op without a process group.

Launched by ``torchrun``, each rank collects on its own shard of the data. At the end of a pass (never per batch,
so a rank that runs out of batches early, or has no tokens at all, cannot hang the others) the ranks merge:

* dense sums (``A``, dense ``G``, EK-FAC sums) and every count are all-reduced in a few flat buckets (one buffer
  per dtype and device, capped at ``bucket_bytes``), not one collective per tensor;
* low-rank ``U`` (docs/concepts.md) is all-gathered along the token dimension after padding every rank's columns to the
  largest local count; the padding is removed after the gather, so the merged ``U`` holds exactly the columns of
  every rank (rank order). Ranks that compressed under a token budget send their basis columns with their raw
  ones, so ``G = U Uᵀ`` plus the summed tail mass is the merge of the sums;
* decompositions are spread over ranks by estimated cost (longest first, to the least loaded rank) and every
  result is broadcast by its owner, so all ranks hold bit-identical eigenbases (the EK-FAC pass relies on it;
  :mod:`kronfisher.decompose.spread`).

The result equals one process over the union of the data up to summation order (tested against one process, float64
``rtol 1e-10``). With a token budget the merged columns are exact until the merged count passes ``2 · max_rank``
(the threshold :meth:`~kronfisher.collection.sums.LowRankSum.add` uses); past it both paths compress at different
points and only the trace and the counts stay exact.

Files: only rank 0 writes. A writer is called on every rank and does ``if is_main_process(): write(...)`` then
``barrier()``, so no rank goes on (and reads the file) before it is complete; a writer must not be wrapped in a
second ``is_main_process()`` test by its caller, or rank 0 would wait in a barrier the others never reach.

Usage (``torchrun --nproc_per_node=2 script.py``)::

    import torch.distributed as dist
    import kronfisher as kf
    from kronfisher.distributed import Shard

    dist.init_process_group("gloo")  # or "nccl"
    fisher = kf.fit(model, Shard(batches), cfg)  # each rank: every world_size-th batch; result: all batches
    fisher.save("factors.safetensors")  # on every rank: rank 0 writes, the others wait for it

A model wrapped in ``DistributedDataParallel`` may be passed as is. A rank that raises during a pass leaves the
others waiting at the end-of-pass collective until ``torchrun`` stops the job (its default on a worker failure)
or the process-group timeout expires.

Every collective function here must be called by all ranks (``fit``, ``collect``, ``capture(...).finalize()`` and
the EK-FAC pass call them at the same point on every rank).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DataParallel, DistributedDataParallel

from .errors import ConfigError
from .report import CollectionReport

DEFAULT_BUCKET_BYTES = 256 * 2**20


# Process-group queries ------------------------------------------------------------------------------------
def is_distributed() -> bool:
    """True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """Rank of this process (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0 (and always without a process group): the only rank that writes files (docs/distributed.md)."""
    return get_rank() == 0


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (no-op without a process group).

    One decision for all ranks, e.g. whether a file is reused, so that no rank takes a path whose collectives the
    others never reach.
    """
    if not is_distributed():
        return obj

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait for every rank (no-op without a process group); put it after a rank-0 write, before any read."""
    if is_distributed():
        dist.barrier()


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` (or ``DataParallel``); other models unchanged.

    Collection runs on the inner module: layer and parameter names have no ``module.`` prefix (they match the
    plain model), and DDP's forward (buffer broadcast) and gradient hooks are never involved, so collection
    triggers no collective per batch and no gradient all-reduce (docs/distributed.md).
    """
    while isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    return model


class Shard:
    """A rank's share of a batch iterable: every ``world_size``-th batch from ``rank`` on (round-robin).

    Re-iterable whenever ``batches`` is (a list, a DataLoader), so the two passes of EK-FAC see the same batches.
    Batch counts differ by at most one between ranks, and the shards of all ranks are disjoint and cover the data,
    so ``fit`` on the shards equals one process on all batches. Without a process group it is every batch.
    For large datasets a ``DistributedSampler`` avoids loading the other ranks' batches; this is the simple path.
    """

    def __init__(self, batches: Iterable[Any], rank: int | None = None, world_size: int | None = None) -> None:
        self.batches = batches
        self.rank = get_rank() if rank is None else int(rank)
        self.world_size = get_world_size() if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"Invalid shard: rank {self.rank} of world size {self.world_size}.")

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.batches), self.rank, None, self.world_size)

    def __len__(self) -> int:
        n = len(self.batches)  # type: ignore[arg-type]
        return max(0, (n - self.rank + self.world_size - 1) // self.world_size)

    def global_index(self, local: int) -> int:
        """Index in the whole data of this rank's ``local``-th batch (MC seeds and reports use it)."""
        return self.rank + int(local) * self.world_size


def global_indices(batches: Iterable[Any]) -> Callable[[int], int]:
    """Map a local batch position to its index in the whole data.

    A :class:`Shard` (or any iterable with a ``global_index(local)`` method, for a custom split) knows it; for other
    iterables the position is the index. The MC targets of a batch are seeded by this index, so one process and
    ``torchrun`` ranks draw the same targets for the same batch only when the batches come through a ``Shard``
    (pass it directly, not wrapped in another generator).
    """
    index_of = getattr(batches, "global_index", None)
    if callable(index_of):
        return lambda k: int(index_of(k))
    return lambda k: k


def comm_device(device: torch.device) -> torch.device:
    """Device on which the default group's backend can communicate a tensor that lives on ``device``."""
    backend = str(dist.get_backend()).lower()
    if "gloo" in backend and "nccl" in backend:  # "cpu:gloo,cuda:nccl": each device has its backend
        return device
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# Bucketed all-reduce ---------------------------------------------------------------------------------------
def all_reduce_tensors(tensors: Iterable[Tensor], bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> int:
    """Sum every tensor over ranks, in place, packing them into flat buffers (one per dtype and device).

    Tensors of one dtype and device are concatenated into buffers of at most ``bucket_bytes`` (a larger tensor goes
    alone), so a whole pass costs a few collectives whatever the number of layers.

    Args:
        tensors: the tensors to reduce; every rank passes the same shapes and dtypes in the same order.
        bucket_bytes: cap on one buffer.

    Returns:
        The number of collectives issued (0 without a process group).

    """
    if not is_distributed():
        return 0

    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        if t.numel():
            groups.setdefault((t.dtype, comm_device(t.device)), []).append(t)
    calls = 0
    for (dtype, device), members in groups.items():
        itemsize = torch.empty((), dtype=dtype).element_size()
        bucket: list[Tensor] = []
        size = 0
        for t in [*members, None]:
            if t is not None and (not bucket or size + t.numel() * itemsize <= bucket_bytes):
                bucket.append(t)
                size += t.numel() * itemsize
                continue
            if bucket:
                flat = torch.cat([b.reshape(-1).to(device) for b in bucket])
                dist.all_reduce(flat)
                calls += 1
                offset = 0
                for b in bucket:
                    b.copy_(flat[offset : offset + b.numel()].view_as(b))
                    offset += b.numel()
            bucket, size = ([t], t.numel() * itemsize) if t is not None else ([], 0)
    return calls


def merge_report_lists(report: CollectionReport) -> None:
    """Replace the empty / non-finite batch lists of ``report`` by their sorted union over ranks (collective)."""
    if not is_distributed():
        return
    mine = (list(report.empty_batches), [(int(b), list(ls)) for b, ls in report.nonfinite_batches])
    everyone: list[Any] = [None] * get_world_size()
    dist.all_gather_object(everyone, mine)
    report.empty_batches = sorted({b for empty, _ in everyone for b in empty})
    report.nonfinite_batches = sorted((b, ls) for _, bad in everyone for b, ls in bad)
