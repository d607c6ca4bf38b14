"""Eigendecompositions spread over the ranks of a process group, by cost, and broadcast (docs/distributed.md).

Every rank holds the same reduced sums after a pass. Instead of each rank decomposing every factor, the tasks (one
per distinct ``A`` and one per ``G``) are assigned longest-first to the least-loaded rank; each owner decomposes its
tasks and broadcasts the results packed in one buffer per task, so all ranks end with bit-identical eigenbases (the
EK-FAC pass relies on it). Used by :func:`kronfisher.decompose.entry.decompose_all` with ``spread=True``.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from ..algebra.block import KronBlock
from ..algebra.eigen import Eigen
from ..algebra.lowrank import LowRankEigen
from ..collection.sums import LayerSums
from ..comm import comm_device, get_rank, get_world_size, is_distributed, is_main_process
from ..config import KFACConfig
from ..errors import DecompositionError
from .layer import decompose_A, decompose_G, decompose_layer, shared_A_owners
from .local import decompose_local


def _task_cost(kind: str, s: LayerSums) -> float:
    """Rough flop count of one decomposition: ``9 d³`` for a dense eigh, Gram + eigh + ``P`` for a low-rank one."""
    if kind == "G" and s.G.kind == "lowrank":
        m = s.G.num_columns
        return 4.0 * s.G.dim * m * m + 9.0 * m**3
    return 9.0 * float(s.A.dim if kind == "A" else s.G.dim) ** 3


def _assign(costs: list[float], world: int) -> list[int]:
    """Owner of each task: longest first, each to the least loaded rank (LPT), deterministic on every rank."""
    owner = [0] * len(costs)
    load = [0.0] * world
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += costs[i]
    return owner


def _shared_A_plan(sums: dict[str, LayerSums]) -> list[int]:
    """For each layer, the index of the first layer with an identical ``A`` sum (itself if none), agreed by all.

    Computed on rank 0 and broadcast, so every rank builds the same task list even if reduced sums were to differ
    in the last bit between ranks (a mismatch would otherwise desynchronise the broadcasts that follow).
    """
    names = list(sums)
    plan = torch.arange(len(names), dtype=torch.int64)
    if is_main_process():  # the single-process rule (bucketed, device-aware: a sum moved to CPU is never equal)
        index = {n: i for i, n in enumerate(names)}
        for n, owner in shared_A_owners(dict(sums)).items():
            plan[index[n]] = index[owner]
    wire = plan.to(comm_device(torch.device("cpu")))
    dist.broadcast(wire, src=0)
    return [int(p) for p in wire.cpu()]


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes of a tensor in a packed buffer, padded to 8 so that every slice can be viewed as any dtype."""
    n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return n + (-n) % 8


def _pack(tensors: list[tuple[Tensor, torch.dtype]]) -> Tensor:
    """Tensors (cast to the given dtypes) as one uint8 CPU buffer, each padded to 8 bytes (see :func:`_nbytes`)."""
    parts = []
    for t, dtype in tensors:
        raw = t.detach().to("cpu", dtype).contiguous().reshape(-1).view(torch.uint8)
        parts.append(raw)
        pad = (-raw.numel()) % 8
        if pad:
            parts.append(torch.zeros(pad, dtype=torch.uint8))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8)


def _payload(eig: Eigen | LowRankEigen) -> list[Tensor]:
    """The tensors that describe a decomposition: ``(Q, λ)``, or ``(C, λ, [τ, tail mass])`` for ``P = W C``."""
    if eig.kind == "lowrank":
        scalars = torch.tensor([eig.tail, eig.discarded], dtype=torch.float64)
        return [eig.coeffs, eig.values, scalars]
    return [eig.vectors, eig.values]


def decompose_spread(sums: dict[str, LayerSums], cfg: KFACConfig) -> dict[str, KronBlock]:
    """Decompose every layer with the eigendecompositions spread over ranks (docs/distributed.md).

    Tasks (each distinct ``A``, each ``G``) are assigned by estimated cost (``d³`` for a dense eigh, ``out · m²``
    and ``m³`` for a low-rank eigenform); each owner decomposes its tasks and broadcasts them in one buffer, so every
    rank ends with bit-identical blocks. A task that fails on its owner makes every rank raise (no rank is left
    waiting). Without a process group it is :func:`~kronfisher.decompose.local.decompose_local`.

    Raises:
        DecompositionError: a decomposition failed on another rank (the owner raises its own error).

    """
    if not is_distributed():
        return decompose_local(sums, cfg)
    names = list(sums)
    world = get_world_size()
    shared = _shared_A_plan(sums)
    tasks: list[tuple[str, int]] = [("A", i) for i in range(len(names)) if shared[i] == i]
    tasks += [("G", i) for i in range(len(names))]
    owner = _assign([_task_cost(kind, sums[names[i]]) for kind, i in tasks], world)
    results, ranks, error = _own_tasks(sums, names, tasks, owner, cfg)
    _raise_failures(ranks, error, tasks, names, owner)
    _exchange(sums, names, tasks, owner, ranks, results, cfg)
    return {
        name: decompose_layer(name, sums[name], cfg, shared_A=results[("A", shared[i])], shared_G=results[("G", i)])
        for i, name in enumerate(names)
    }


def _own_tasks(
    sums: dict[str, LayerSums], names: list[str], tasks: list[tuple[str, int]], owner: list[int], cfg: KFACConfig
) -> tuple[dict[tuple[str, int], Eigen | LowRankEigen], Tensor, BaseException | None]:
    """Decompose this rank's tasks; the eigenpair count of each task (-1: failed) is all-reduced."""
    rank = get_rank()
    results: dict[tuple[str, int], Eigen | LowRankEigen] = {}
    error: BaseException | None = None
    # Explicit eigenpair count of each task (only its owner knows it for a low-rank eigenform); -1: failed.
    ranks = torch.zeros(len(tasks), dtype=torch.int64)
    for t, (kind, i) in enumerate(tasks):
        if owner[t] != rank or error is not None:
            continue
        name, s = names[i], sums[names[i]]
        try:
            eig = decompose_A(name, s, cfg) if kind == "A" else decompose_G(name, s, cfg)
        except Exception as err:  # re-raised below, after every rank has learnt of it
            error = err
            ranks[t] = -1
            continue
        results[(kind, i)] = eig
        ranks[t] = eig.rank
    wire = ranks.to(comm_device(torch.device("cpu")))
    dist.all_reduce(wire)
    return results, wire.cpu(), error


def _raise_failures(
    ranks: Tensor, error: BaseException | None, tasks: list[tuple[str, int]], names: list[str], owner: list[int]
) -> None:
    failed = [t for t in range(len(tasks)) if int(ranks[t]) < 0]
    if failed:
        if error is not None:
            raise error
        kind, i = tasks[failed[0]]
        raise DecompositionError(
            f"Decomposition of factor {kind} of layer {names[i]!r} failed on rank {owner[failed[0]]}; see its log."
        )


def _exchange(
    sums: dict[str, LayerSums],
    names: list[str],
    tasks: list[tuple[str, int]],
    owner: list[int],
    ranks: Tensor,
    results: dict[tuple[str, int], Eigen | LowRankEigen],
    cfg: KFACConfig,
) -> None:
    """Every owner broadcasts its results in one buffer; the other ranks unpack them into ``results``."""
    world, rank = get_world_size(), get_rank()
    store = cfg.accumulate_torch_dtype
    lowrank_work = torch.float64 if store == torch.float64 else torch.float32  # as decompose_G
    # What each owner sends, in task order: a dense eigenbasis as (Q, λ); a low-rank eigenform as (C, λ, [τ, tail
    # mass]) with P = W C implicit: every rank already holds the same gathered W.
    layout: list[list[tuple[int, list[tuple[tuple[int, ...], torch.dtype]]]]] = [[] for _ in range(world)]
    for t, (kind, i) in enumerate(tasks):
        s = sums[names[i]]
        if kind == "G" and s.G.kind == "lowrank":
            m, r = s.G.num_columns, int(ranks[t])
            spec = [((m, r), lowrank_work), ((r,), lowrank_work), ((2,), torch.float64)]
        else:  # a thin A (held as rows) has rank < dim columns
            d, r = (s.A.dim if kind == "A" else s.G.dim), int(ranks[t])
            spec = [((d, r), store), ((r,), store)]
        layout[owner[t]].append((t, spec))
    for src in range(world):
        if not layout[src]:
            continue
        if src == rank:
            buf = _pack([(x, dt) for t, spec in layout[src] for x, (_, dt) in zip(_payload(results[tasks[t]]), spec)])
        else:
            buf = torch.empty(sum(_nbytes(sh, dt) for _, spec in layout[src] for sh, dt in spec), dtype=torch.uint8)
        wire = buf.to(comm_device(torch.device("cpu")))
        dist.broadcast(wire, src=src)
        if src != rank:
            _unpack(wire.cpu(), layout[src], sums, names, tasks, results)


def _unpack(
    buf: Tensor,
    layout: list[tuple[int, list[tuple[tuple[int, ...], torch.dtype]]]],
    sums: dict[str, LayerSums],
    names: list[str],
    tasks: list[tuple[str, int]],
    results: dict[tuple[str, int], Eigen | LowRankEigen],
) -> None:
    offset = 0
    for t, spec in layout:
        parts = []
        for shape, dtype in spec:
            raw = buf[offset : offset + _nbytes(shape, dtype)].view(dtype)
            parts.append(raw[: math.prod(shape)].reshape(shape).clone())
            offset += _nbytes(shape, dtype)
        kind, i = tasks[t]
        s = sums[names[i]]
        if kind == "G" and s.G.kind == "lowrank":
            cols = s.G.columns()
            tail, mass = parts[2].tolist()
            results[(kind, i)] = LowRankEigen(cols, parts[0].to(cols.device), parts[1].to(cols.device), tail, mass)
        else:
            device = s.A.device if kind == "A" else s.G.device
            results[(kind, i)] = Eigen(parts[0].to(device), parts[1].to(device), 0.0)
