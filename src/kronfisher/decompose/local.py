"""Decompose every layer in this process, eighs spread over local threads (docs/concepts.md)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from functools import partial

import torch

from ..algebra.block import KronBlock
from ..algebra.eigen import Eigen
from ..collection.sums import DenseSum, LayerSums, LowRankSum
from ..config import KFACConfig
from .batched import decompose_batched
from .layer import POOL_GRAM_MAX, decompose_A, decompose_G, decompose_layer, shared_A_owners


def decompose_local(
    sums: dict[str, LayerSums],
    cfg: KFACConfig,
    *,
    on_layer: Callable[[str], None] | None = None,
    release: bool = False,
) -> dict[str, KronBlock]:
    """Decompose every layer in this process; identical ``A`` sums (q/k/v, gate/up) are decomposed once and shared.

    ``release=True`` frees each dense sum (:meth:`~kronfisher.collection.sums.DenseSum.release`) as soon as its
    decomposition ends, so memory holds a factor's sum or its eigenbasis, not both (a grouped run, which keeps no
    sums; the memory plan counts it so). A low-rank ``G``'s columns are part of its eigenbasis and stay.

    ``on_layer(name)`` is called once per layer of the single-process path as soon as both its factors are
    decomposed (progress bars; with concurrent eighs, in order of completion).

    On CPU with more than one torch thread, every decomposition (dense factors, and low-rank ``G`` up to
    :data:`POOL_GRAM_MAX` columns, their Gram included) runs concurrently, one per thread (:func:`_run_jobs`),
    largest first. Each job makes its own temporaries (float64 mean or ``[T, T]`` Gram, solver workspace) and
    drops them when it ends, so the pool holds only what its threads are working on. The factors are those of the
    sequential path (same matrices, same eigh).
    """
    owner = shared_A_owners(sums)
    jobs: dict[tuple[str, str], Callable[[], Eigen]] = {}
    for name, layer in sums.items():
        if owner[name] == name:
            jobs[("A", name)] = partial(decompose_A, name, layer, cfg)
        jobs[("G", name)] = partial(decompose_G, name, layer, cfg)
    freed: dict[tuple[str, str], list[DenseSum]] = {key: [] for key in jobs}
    for name, layer in sums.items():
        if release:
            freed[("A", owner[name])].append(layer.A)
            if isinstance(layer.G, DenseSum):
                freed[("G", name)].append(layer.G)
    cost: dict[tuple[str, str], float] = {}
    if _on_cpu(sums) and torch.get_num_threads() > 1:
        for key in jobs:
            kind, name = key
            part = sums[name].A if kind == "A" else sums[name].G
            cost_of = _cost(part)
            if cost_of is not None:
                cost[key] = cost_of
    for key, eig in decompose_batched(sums, owner, cfg).items():  # accelerator batches, float32 + refinement
        jobs[key] = partial(_done, eig)
        cost.pop(key, None)
    jobs = {key: partial(_then_free, job, freed[key]) if freed[key] else job for key, job in jobs.items()}
    reported: set[str] = set()
    finished: set[tuple[str, str]] = set()

    def job_done(key: tuple[str, str]) -> None:  # concurrent path: a layer counts once both its factors are done
        finished.add(key)
        for name in sums:
            if name not in reported and {("A", owner[name]), ("G", name)} <= finished:
                reported.add(name)
                if on_layer is not None:
                    on_layer(name)

    results = _run_jobs(jobs, cost, on_done=job_done)
    blocks: dict[str, KronBlock] = {}
    for name, layer in sums.items():
        a_eig = results[("A", owner[name])]()
        blocks[name] = decompose_layer(name, layer, cfg, shared_A=a_eig, shared_G=results[("G", name)]())
        if on_layer is not None and name not in reported:
            on_layer(name)
    return blocks


def _cost(part: DenseSum | LowRankSum) -> float | None:
    """Rough FLOPs of one decomposition (largest first in the pool); None: not a pool job (a huge ``[T, T]``)."""
    d = float(part.dim)
    if part.kind == "dense":
        t = float(part.num_rows)
        return 2 * t * t * d + 9 * t**3 + 4 * d * d * t if part.holds_rows and t > 0 else 9 * d**3
    m = float(part.num_columns)
    return 2 * d * m * m + 9 * m**3 if 0 < m <= POOL_GRAM_MAX and part.count > 0 else None


def _on_cpu(sums: dict[str, LayerSums]) -> bool:
    for layer in sums.values():
        for part in (layer.A, layer.G):
            if part.kind == "dense" and part.device.type != "cpu":
                return False
    return True


def _run_jobs(
    jobs: dict[tuple[str, str], Callable[[], Eigen]],
    concurrent: dict[tuple[str, str], float],
    on_done: Callable[[tuple[str, str]], None] | None = None,
) -> dict[tuple[str, str], Callable[[], Eigen]]:
    """Run the decompositions; returns a getter per job that raises that job's error (so in the caller's order).

    ``on_done(key)`` is called in the caller's thread as each concurrent job finishes (progress bars).

    The jobs in ``concurrent`` (key → cost) run at once on CPU when torch has more than one thread: largest first,
    one job per thread, BLAS single-threaded: LAPACK's eigh gains little from a second thread at these sizes while
    independent eighs scale (``benchmarks/RESULTS.md``). The thread count is restored afterwards. Every other
    job runs lazily in the caller's thread.
    """
    out = {key: _lazy(job) for key, job in jobs.items()}
    workers = min(torch.get_num_threads(), len(concurrent))
    if workers <= 1:
        return out

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kronfisher-eigh") as pool:
            futures = {key: pool.submit(jobs[key]) for key in sorted(concurrent, key=lambda k: -concurrent[k])}
            keys = {future: key for key, future in futures.items()}
            for future in as_completed(keys):  # every job, before the thread count is restored
                if on_done is not None and future.exception() is None:
                    on_done(keys[future])
    finally:
        torch.set_num_threads(threads)
    out.update({key: future.result for key, future in futures.items()})
    return out


def _lazy(job: Callable[[], Eigen]) -> Callable[[], Eigen]:
    cell: list[Eigen] = []

    def get() -> Eigen:
        if not cell:
            cell.append(job())
        return cell[0]

    return get


def _done(eig: Eigen) -> Eigen:
    return eig


def _then_free(job: Callable[[], Eigen], parts: list[DenseSum]) -> Eigen:
    eig = job()
    for part in parts:  # the sums of every layer sharing this A (their rows are one stored copy)
        part.release()
    return eig
