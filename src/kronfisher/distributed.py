"""Distributed collection with ``torch.distributed`` (SPEC §8); every function is a no-op without a process group.

Launched by ``torchrun``, each rank collects on its own shard of the data. At the end of a pass (never per batch,
so a rank that runs out of batches early, or has no tokens at all, cannot hang the others) the ranks merge:

* dense sums (``A``, dense ``G``, EK-FAC sums) and every count are all-reduced in a few flat buckets (one buffer
  per dtype and device, capped at ``bucket_bytes``), not one collective per tensor;
* low-rank ``U`` (SPEC §6) is all-gathered along the token dimension after padding every rank's columns to the
  largest local count; the padding is removed after the gather, so the merged ``U`` holds exactly the columns of
  every rank (rank order). Ranks that compressed under a token budget send their basis columns with their raw
  ones, so ``G = U Uᵀ`` plus the summed tail mass is the merge of SPEC §3.3;
* decompositions are spread over ranks by estimated cost (longest first, to the least loaded rank) and every
  result is broadcast by its owner, so all ranks hold bit-identical eigenbases (the EK-FAC pass relies on it;
  :mod:`kronfisher.spread`).

The result equals one process over the union of the data up to summation order (SPEC §8 oracle, float64
``rtol 1e-10``). With a token budget the merged columns are exact until the merged count passes ``2 · max_rank``
(the threshold :meth:`~kronfisher.accumulate.LowRankSum.add` uses); past it both paths compress at different
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
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .accumulate import CollectionReport, DenseSum, LayerSums, LowRankSum
from .errors import ConfigError

if TYPE_CHECKING:
    from .ekfac import EigenCorrector

DEFAULT_BUCKET_BYTES = 256 * 2**20


# Process-group queries ------------------------------------------------------------------------------------
def is_distributed() -> bool:
    """True when a process group with more than one rank is initialised."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """Rank of this process (0 without a process group)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of ranks (1 without a process group)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0 (and always without a process group): the only rank that writes files (SPEC §8)."""
    return get_rank() == 0


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (no-op without a process group).

    One decision for all ranks, e.g. whether a file is reused, so that no rank takes a path whose collectives the
    others never reach.
    """
    if not is_distributed():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait for every rank (no-op without a process group); put it after a rank-0 write, before any read."""
    if is_distributed():
        import torch.distributed as dist

        dist.barrier()


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` (or ``DataParallel``); other models unchanged.

    Collection runs on the inner module: layer and parameter names have no ``module.`` prefix (they match the
    plain model), and DDP's forward (buffer broadcast) and gradient hooks are never involved, so collection
    triggers no collective per batch and no gradient all-reduce (SPEC §8).
    """
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    return model


class Shard:
    """A rank's share of a batch iterable: every ``world_size``-th batch from ``rank`` on (round-robin).

    Re-iterable whenever ``batches`` is (a list, a DataLoader), so the two passes of EK-FAC see the same batches.
    Batch counts differ by at most one between ranks, and the shards of all ranks are disjoint and cover the data,
    so ``fit`` on the shards equals one process on all batches (SPEC §8). Without a process group it is every batch.
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
        """Index in the whole data of this rank's ``local``-th batch (MC seeds and reports use it, SPEC §8)."""
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


def _comm_device(device: torch.device) -> torch.device:
    """Device on which the default group's backend can communicate a tensor that lives on ``device``."""
    import torch.distributed as dist

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
    import torch.distributed as dist

    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        if t.numel():
            groups.setdefault((t.dtype, _comm_device(t.device)), []).append(t)
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


# K-FAC pass ------------------------------------------------------------------------------------------------
def _local_rows(g: LowRankSum) -> Tensor:
    """Held columns of ``g`` as ``[m, out]`` rows in the storage dtype (compressed basis first, then raw tokens)."""
    parts = [c.to(g.device, g.storage_dtype) for c in g.columns().chunks]
    if not parts:
        return torch.zeros(0, g.dim, dtype=g.storage_dtype, device=g.device)
    return torch.cat(parts).contiguous()


def _gather_lowrank(items: list[tuple[LowRankSum, Tensor, list[int]]]) -> None:
    """All-gather low-rank columns along the token dimension, padded to the largest local count (SPEC §8).

    Args:
        items: ``(sum, local rows [m, out], column counts of every rank)``; ``count`` and ``tail_mass`` of each
            sum are already the reduced totals.

    """
    import torch.distributed as dist

    world = get_world_size()
    by_dtype: dict[torch.dtype, list[tuple[LowRankSum, Tensor, list[int]]]] = {}
    for item in items:
        if max(item[2]) > 0:
            by_dtype.setdefault(item[0].storage_dtype, []).append(item)
    for dtype, members in by_dtype.items():
        device = _comm_device(members[0][0].device)
        padded = []
        for g, rows, counts in members:
            pad = max(counts) - rows.shape[0]
            padded.append(torch.cat([rows, rows.new_zeros(pad, g.dim)]) if pad else rows)
        # Bytes on the wire: every backend gathers uint8, whatever the storage dtype (bfloat16, float16 too).
        local = torch.cat([p.reshape(-1) for p in padded]).view(torch.uint8).to(device)
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local)
        itemsize = torch.empty((), dtype=dtype).element_size()
        offset = 0
        for g, _rows, counts in members:
            width = max(counts)
            nbytes = width * g.dim * itemsize
            blocks = [
                buf[offset : offset + nbytes].to(g.device).view(dtype).reshape(width, g.dim)[: counts[r]]
                for r, buf in enumerate(gathered)
            ]
            offset += nbytes
            g.load_state(
                {
                    "columns": torch.cat(blocks).t(),  # [out, Σ m_r]; rows contiguous, so no further copy
                    "count": torch.tensor(g.count, dtype=torch.float64),
                    "tail_mass": torch.tensor(g.tail_mass, dtype=torch.float64),
                    "discarded_mass": torch.tensor(g.discarded_mass, dtype=torch.float64),
                }
            )
            # Same threshold as LowRankSum.add / merge, so a merged count within 2 * max_rank stays exact.
            if g.max_rank is not None and g.num_columns > 2 * g.max_rank:
                g.compress()


def reduce_collection(
    sums: Mapping[str, LayerSums],
    report: CollectionReport | None = None,
    fired: Iterable[str] = (),
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
) -> set[str]:
    """Merge the K-FAC sums, counts and report of every rank, in place, at the end of a pass (SPEC §8).

    Dense sums and all counts are all-reduced in buckets; low-rank columns are all-gathered (padded to the largest
    local token count, padding removed). Afterwards every rank holds the sums one process would have accumulated
    over the union of the data.

    Args:
        sums: the layer sums of this rank (same layer names and representations on every rank).
        report: this rank's report; ``tokens``, ``loss_terms``, ``loss_sum`` and ``batches`` become totals, and the
            empty and non-finite batch lists the sorted union over ranks (batch indices are global with a Shard).
        fired: names of the layers whose hooks fired on this rank.
        bucket_bytes: cap on one all-reduce buffer.

    Returns:
        The names (from ``sums``) whose hooks fired on at least one rank; ``set(fired)`` without a process group.

    """
    fired = set(fired)
    if not is_distributed():
        return fired
    names = list(sums)
    world, rank = get_world_size(), get_rank()
    lowrank = [n for n in names if isinstance(sums[n].G, LowRankSum)]
    rows = {n: _local_rows(sums[n].G) for n in lowrank}  # type: ignore[arg-type]
    per_layer = 4  # A.count, G.count, batches, fired
    lr_base = per_layer * len(names)
    rank_base = lr_base + 2 * len(lowrank)
    report_base = rank_base + world * len(lowrank)
    scalars = torch.zeros(report_base + 4, dtype=torch.float64)
    for i, n in enumerate(names):
        s = sums[n]
        scalars[per_layer * i : per_layer * (i + 1)] = torch.tensor(
            [s.A.count, s.G.count, float(s.batches), float(n in fired)], dtype=torch.float64
        )
    for j, n in enumerate(lowrank):
        g = sums[n].G
        scalars[lr_base + 2 * j] = g.tail_mass  # type: ignore[union-attr]
        scalars[lr_base + 2 * j + 1] = g.discarded_mass  # type: ignore[union-attr]
        scalars[rank_base + rank * len(lowrank) + j] = rows[n].shape[0]  # own slot: all-reduce = all-gather
    if report is not None:
        scalars[report_base:] = torch.tensor(
            [report.tokens, report.loss_terms, report.batches, report.loss_sum], dtype=torch.float64
        )
    dense = [sums[n].A.sum for n in names] + [sums[n].G.sum for n in names if isinstance(sums[n].G, DenseSum)]
    all_reduce_tensors([*dense, scalars], bucket_bytes)
    values = scalars.tolist()
    merged: set[str] = set()
    for i, n in enumerate(names):
        a_count, g_count, batches, was_fired = values[per_layer * i : per_layer * (i + 1)]
        sums[n].A.count, sums[n].G.count, sums[n].batches = a_count, g_count, int(batches)
        if was_fired > 0:
            merged.add(n)
    items = []
    for j, n in enumerate(lowrank):
        g = sums[n].G
        g.tail_mass, g.discarded_mass = values[lr_base + 2 * j], values[lr_base + 2 * j + 1]  # type: ignore[union-attr]
        counts = [int(values[rank_base + r * len(lowrank) + j]) for r in range(world)]
        items.append((g, rows[n], counts))
    _gather_lowrank(items)  # type: ignore[arg-type]
    if report is not None:
        report.tokens, report.loss_terms, report.batches = (int(v) for v in values[report_base : report_base + 3])
        report.loss_sum = values[report_base + 3]
        merge_report_lists(report)
    return merged | (fired - set(names))


def merge_report_lists(report: CollectionReport) -> None:
    """Replace the empty / non-finite batch lists of ``report`` by their sorted union over ranks (collective)."""
    import torch.distributed as dist

    if not is_distributed():
        return
    mine = (list(report.empty_batches), [(int(b), list(ls)) for b, ls in report.nonfinite_batches])
    everyone: list[Any] = [None] * get_world_size()
    dist.all_gather_object(everyone, mine)
    report.empty_batches = sorted({b for empty, _ in everyone for b in empty})
    report.nonfinite_batches = sorted((b, ls) for _, bad in everyone for b, ls in bad)


# EK-FAC pass -----------------------------------------------------------------------------------------------
def reduce_corrector(corrector: EigenCorrector, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
    """Sum the EK-FAC sums, tail sums and counts of every rank, in place (SPEC §5, §8)."""
    if not is_distributed():
        return
    names = list(corrector.sums)
    counts = torch.tensor([corrector.counts[n] for n in names], dtype=torch.float64)
    tails = [corrector.tail_sums[n] for n in names if n in corrector.tail_sums]
    all_reduce_tensors([*(corrector.sums[n] for n in names), *tails, counts], bucket_bytes)
    for n, c in zip(names, counts.tolist()):
        corrector.counts[n] = c
