"""``distributed_test(world_size, fn, tmp_path)``: run ``fn`` on gloo ranks on CPU, with a timeout.

Each rank is a process set up the way ``torchrun`` sets one up (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT`` on a free localhost port, one intra-op thread); it initialises a gloo process
group, calls ``fn(rank, world_size, **kwargs)`` and writes the returned object (tensors, numbers, strings, lists
and dicts of them) to ``tmp_path`` with ``torch.save``; the parent loads it with ``weights_only=True``. A rank that
raises fails the test at once (the others are killed; its traceback is in the message); ranks still running at
the timeout are killed and the test fails with :class:`DistributedTimeout`, so a hang never stalls CI.

Processes are forked where the platform allows it (Linux): a fork inherits the imported torch and transformers
and starts in milliseconds, where a fresh interpreter takes seconds per rank on a loaded 2-core CI machine. The
child sets one intra-op thread before any tensor work, as DataLoader workers do. ``start_method="spawn"`` works
too (``fn`` must then be importable from its module).
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch


class DistributedTestError(AssertionError):
    """A rank failed; the message holds its traceback."""


class DistributedTimeout(DistributedTestError):
    """Ranks were still running at the timeout (a hang); they were killed.

    Attributes:
        running: ranks that were still running.

    """

    def __init__(self, message: str, running: list[int]) -> None:
        super().__init__(message)
        self.running = running


def free_port() -> int:
    """A TCP port on localhost that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_rank(fn: Callable[..., Any], rank: int, world_size: int, port: int, out: str, kwargs: dict) -> None:
    """Body of one rank: process group, ``fn``, result file; a traceback file on error (exit code 1)."""
    import torch.distributed as dist

    code = 0
    try:
        torch.set_num_threads(1)
        os.environ.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_WORLD_SIZE=str(world_size),
        )
        dist.init_process_group("gloo", timeout=timedelta(minutes=10))
        result = fn(rank, world_size, **kwargs)
        torch.save(result, Path(out) / f"rank{rank}.pt")
    except BaseException:
        # Written before the process group goes down, so the root cause is on disk before its peers fail.
        (Path(out) / f"rank{rank}.err").write_text(traceback.format_exc())
        code = 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # a forked child must not run the parent's (pytest's) exit handlers


def distributed_test(
    world_size: int,
    fn: Callable[..., Any],
    tmp_path: Path,
    *,
    timeout: float = 120.0,
    start_method: str | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(rank, world_size, **kwargs)`` on ``world_size`` gloo ranks and return the results by rank.

    Args:
        world_size: number of processes.
        fn: module-level function; its return value must be loadable with ``torch.load(weights_only=True)``.
        tmp_path: directory for results and tracebacks.
        timeout: seconds for the whole run (process start included) before every rank is killed.
        start_method: ``"fork"`` (default where available) or ``"spawn"``.
        **kwargs: keyword arguments for ``fn`` (picklable for ``"spawn"``).

    Raises:
        DistributedTestError: a rank raised.
        DistributedTimeout: ranks were still running at ``timeout``.

    """
    method = start_method or ("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    ctx = multiprocessing.get_context(method)
    out = Path(tmp_path) / f"dist_{fn.__name__}_{world_size}_{time.monotonic_ns()}"
    out.mkdir(parents=True)
    port = free_port()
    procs = []
    try:
        for r in range(world_size):
            p = ctx.Process(target=_run_rank, args=(fn, r, world_size, port, str(out), kwargs), daemon=True)
            p.start()
            procs.append(p)
        deadline = time.monotonic() + timeout
        while True:
            codes = [p.exitcode for p in procs]
            failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                # The first rank to die is often a victim (its peer closed the connection): give the others a
                # moment to finish writing their tracebacks, then report every rank that left one.
                grace = time.monotonic() + 3.0
                while time.monotonic() < grace and any(p.exitcode is None for p in procs):
                    time.sleep(0.02)
                codes = [p.exitcode for p in procs]
                errs = [(r, out / f"rank{r}.err") for r in range(world_size)]
                errors = "\n".join(f"--- rank {r} ---\n{path.read_text()}" for r, path in errs if path.exists())
                raise DistributedTestError(f"rank(s) failed; exit codes {codes}.\n{errors}")
            if all(c == 0 for c in codes):
                break
            if time.monotonic() > deadline:
                running = [r for r, c in enumerate(codes) if c is None]
                raise DistributedTimeout(
                    f"rank(s) {running} still running after {timeout:.0f} s (hang?); killed.", running
                )
            time.sleep(0.02)
    finally:
        for p in procs:
            if p.exitcode is None:
                p.kill()
            p.join()
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world_size)]


# Workers used to test the helper itself (torch only: they start fast).
def hang_worker(rank: int, world_size: int) -> dict[str, int]:
    """Rank 0 waits in a barrier that rank 1 never reaches: a hang."""
    import torch.distributed as dist

    if rank == 0:
        dist.barrier()
    else:
        time.sleep(600)
    return {"rank": rank}


def failing_worker(rank: int, world_size: int) -> dict[str, int]:
    """Rank 1 raises; rank 0 waits in a barrier."""
    import torch.distributed as dist

    if rank == 1:
        raise ValueError("rank 1 failed on purpose")
    dist.barrier()
    return {"rank": rank}
