"""Reductions of collected sums and EK-FAC sums across ranks (docs/distributed.md)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist
from torch import Tensor

from ..comm import (
    DEFAULT_BUCKET_BYTES,
    all_reduce_tensors,
    comm_device,
    get_rank,
    get_world_size,
    is_distributed,
    merge_report_lists,
)
from ..report import CollectionReport
from .corrector import EigenCorrector
from .sums import LayerSums, LowRankSum


# K-FAC pass ------------------------------------------------------------------------------------------------
def _local_rows(g: LowRankSum) -> Tensor:
    """Held columns of ``g`` as ``[m, out]`` rows in the storage dtype (compressed basis first, then raw tokens)."""
    parts = [c.to(g.device, g.storage_dtype) for c in g.columns().chunks]
    if not parts:
        return torch.zeros(0, g.dim, dtype=g.storage_dtype, device=g.device)
    return torch.cat(parts).contiguous()


def _gather_lowrank(items: list[tuple[LowRankSum, Tensor, list[int]]]) -> None:
    """All-gather low-rank columns along the token dimension, padded to the largest local count (docs/distributed.md).

    Args:
        items: ``(sum, local rows [m, out], column counts of every rank)``; ``count`` and ``tail_mass`` of each
            sum are already the reduced totals.

    """
    world = get_world_size()
    by_dtype: dict[torch.dtype, list[tuple[LowRankSum, Tensor, list[int]]]] = {}
    for item in items:
        if max(item[2]) > 0:
            by_dtype.setdefault(item[0].storage_dtype, []).append(item)
    for dtype, members in by_dtype.items():
        device = comm_device(members[0][0].device)
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
    """Merge the K-FAC sums, counts and report of every rank, in place, at the end of a pass (docs/distributed.md).

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
    lowrank = [n for n in names if sums[n].G.kind == "lowrank"]
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
        scalars[report_base:] = torch.tensor(report.counts(), dtype=torch.float64)
    dense = [sums[n].A.sum for n in names] + [sums[n].G.sum for n in names if sums[n].G.kind == "dense"]
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
        report.set_counts(values[report_base : report_base + 4])
        merge_report_lists(report)
    return merged | (fired - set(names))


# EK-FAC pass -----------------------------------------------------------------------------------------------
def reduce_corrector(corrector: EigenCorrector, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
    """Sum the EK-FAC sums, tail sums and counts of every rank, in place (docs/concepts.md)."""
    if not is_distributed():
        return
    names = list(corrector.sums)
    counts = torch.tensor([corrector.counts[n] for n in names], dtype=torch.float64)
    tails = [corrector.tail_sums[n] for n in names if n in corrector.tail_sums]
    all_reduce_tensors([*(corrector.sums[n] for n in names), *tails, counts], bucket_bytes)
    for n, c in zip(names, counts.tolist()):
        corrector.counts[n] = c
