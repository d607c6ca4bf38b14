"""Resumable K-FAC pass of ``kronfisher analyze``: run identity, checkpoints, ``--resume`` (docs/files.md).

The raw sums are checkpointed every few batches (atomic writes). Under ``torchrun`` each rank checkpoints its own
shard's sums to its own file (``<model>.rank<r>-of-<w>.sums.safetensors``) without any collective, so ranks with
different batch counts never wait on each other mid-pass; ``--resume`` then restarts every rank from its own file
and the end-of-pass reduction merges them as usual. MC targets are seeded per global batch index, so a
resumed run draws exactly what the uninterrupted run would have drawn.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from ..comm import Shard, get_rank, get_world_size
from ..config import KFACConfig, sum_fields
from ..data import TextBatches
from ..drivers.fit import CollectState, collect
from ..errors import InputError, KronfisherWarning, WriteError
from ..faults import human_bytes, write_error
from ..io.fingerprint import check_model, model_fingerprint
from ..io.sums import load_sums, save_sums
from ..models import LoadedModel
from ..report import CollectionReport

CHECKPOINT_SECONDS = 300.0  # default checkpoint interval when --checkpoint-every is not given


def weights_digest(model: nn.Module) -> str:
    """A cheap identity of the weights: sha256 of every parameter's name, shape, sum and sum of squares."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            t = p.detach().to(torch.float64)
            h.update(f"{name}:{list(p.shape)}:{float(t.sum())!r}:{float(t.square().sum())!r};".encode())
    return h.hexdigest()


def model_identity(spec: str) -> str:
    """``--model`` as part of a run's identity: a local path resolved, so ``./m/``, ``m`` and ``/abs/m`` are one model.

    Hub ids and the embedded default are kept as given.
    """
    path = Path(spec).expanduser()
    if spec == "default" or not path.exists():
        return spec
    return str(path.resolve())


def run_identity(lm: LoadedModel, tb: TextBatches, cfg: KFACConfig) -> dict[str, Any]:
    """What a checkpoint or factor file must match to be resumed from (model, weights, data, config)."""
    fp = json.dumps(model_fingerprint(lm.model), sort_keys=True)
    full = cfg.to_dict()
    return {
        "mc_seeding": "per-batch",  # MC draws seeded per global batch since 0.1 (older checkpoints: another stream)
        "model": model_identity(lm.source.spec),
        "fingerprint_sha256": hashlib.sha256(fp.encode()).hexdigest(),
        "weights_sha256": weights_digest(lm.model),
        "data_sha256": tb.fingerprint,
        "sums_config": {k: full[k] for k in (*sum_fields(), "seed", "on_nonfinite")},
        "config": full,
    }


def mismatch(saved: dict[str, Any], want: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """Keys of ``want`` whose values differ in ``saved`` (except ``ignore``); model paths compared resolved."""
    if isinstance(saved.get("model"), str):  # files of older runs hold the path as typed
        saved = {**saved, "model": model_identity(saved["model"])}
    return [k for k in want if k not in ignore and saved.get(k) != want[k]]


def checkpoint_path(folder: Path, slug: str) -> Path:
    """The checkpoint file of this rank: one per rank under ``torchrun``, so no rank waits for another."""
    world = get_world_size()
    if world == 1:
        return folder / f"{slug}.sums.safetensors"
    return folder / f"{slug}.rank{get_rank()}-of-{world}.sums.safetensors"


def remove_checkpoint(ckpt: Path) -> None:
    """Delete this rank's checkpoint and any temporary file a killed writer left beside it.

    Writes are atomic, so a kill never leaves a partial file under the real name, only such a temporary.
    """
    ckpt.unlink(missing_ok=True)
    if ckpt.parent.is_dir():
        for stale in ckpt.parent.glob(f".{ckpt.name}.*.tmp"):
            stale.unlink(missing_ok=True)


RESUME_HINT = (
    "Run without --resume to start over (the checkpoint is then replaced), or resume with the model the run "
    "started with."
)


def _resume_state(
    ckpt: Path, identity: dict[str, Any], shard: Shard, info: Callable[[str], None], model: nn.Module
) -> CollectState | None:
    sf = load_sums(ckpt)
    check_model(sf.meta, model, path=ckpt, allow_subset=True, hint=RESUME_HINT)  # names the layers that differ
    extra = sf.meta.get("extra", {})
    bad = mismatch(extra.get("identity", {}), identity, ignore=("config",))  # damping etc. may change
    saved_world = extra.get("world_size", 1)
    if saved_world != shard.world_size:
        bad.append(f"world size ({saved_world} then, {shard.world_size} now)")
    if bad:
        raise InputError(
            f"Checkpoint {ckpt} was written for a different run: {', '.join(bad)} differ.",
            hint="Run without --resume to start over (the checkpoint is then replaced), or restore the same "
            "model, data, options and number of processes.",
        )
    done = int(extra["batches_done"])
    info(f"  resuming from {ckpt}: {done} of {len(shard)} batches already collected")
    return CollectState(sf.sums, sf.report, done)


def collect_with_checkpoints(
    lm: LoadedModel,
    shard: Shard,
    sizes: list[int],
    cfg: KFACConfig,
    identity: dict[str, Any],
    ckpt: Path,
    *,
    resume: bool,
    every: int | None,
    info: Callable[[str], None],
    bar: Any,
    plan: Any = None,
) -> tuple[Any, Any, CollectionReport]:
    """The K-FAC pass over this rank's ``shard`` with checkpoints every ``every`` batches (or 5 minutes).

    Args:
        lm: the loaded model.
        shard: this rank's batches (all batches on one process).
        sizes: attended tokens of every batch of the whole data (global index), for the progress bar.
        cfg: configuration.
        identity: :func:`run_identity` of this run.
        ckpt: this rank's checkpoint file (:func:`checkpoint_path`).
        resume: continue from ``ckpt`` if it exists.
        every: checkpoint every N batches of this rank (None: every :data:`CHECKPOINT_SECONDS`; 0: never).
        info: status-line printer.
        bar: progress bar with ``update(tokens)``.
        plan: the run's memory plan (:func:`~kronfisher.drivers.planning.plan_run`): the representation of the sums.

    Returns:
        ``(discovery, collector, report)`` of :func:`~kronfisher.fit.collect`, reduced over ranks.

    """
    state = None
    if resume and ckpt.exists():
        state = _resume_state(ckpt, identity, shard, info, lm.model)
        bar.update(sum(sizes[shard.global_index(k)] for k in range(state.batches_done)))
    elif resume:
        info(f"  no checkpoint at {ckpt}: starting from the beginning")
    last = time.monotonic()
    local_batches = len(shard)
    failed = False

    def on_batch_end(done: int, index: int, collector: Any, report: CollectionReport) -> None:
        nonlocal last, failed
        bar.update(sizes[index])
        if every is not None:
            due = every > 0 and done % every == 0  # 0: never
        else:
            due = time.monotonic() - last > CHECKPOINT_SECONDS
        if due and done < local_batches and not failed:
            extra = {"identity": identity, "batches_done": done, "world_size": shard.world_size}
            try:  # the atomic writer creates checkpoints/ with the first checkpoint: no empty folder otherwise
                save_sums(
                    ckpt,
                    collector.infos,
                    collector.sums,
                    cfg,
                    report=report,
                    model=lm.model,
                    extra_meta=extra,
                    local=True,
                )
            except (OSError, SafetensorError) as err:  # a checkpoint is insurance: losing it must not stop the run
                failed = True
                warnings.warn(
                    f"{write_error(err, ckpt)} The collection goes on without checkpoints; an interruption from "
                    "now on loses it.",
                    KronfisherWarning,
                    stacklevel=2,
                )
            last = time.monotonic()

    return collect(lm.model, shard, cfg, resume=state, on_batch_end=on_batch_end, plan=plan)


def sums_writer(
    lm: LoadedModel,
    infos: Mapping[str, Any],
    sums: Mapping[str, Any],
    cfg: KFACConfig,
    report: CollectionReport,
    identity: dict[str, Any],
    shard: Shard,
) -> Callable[[Path], Any]:
    """A writer of the complete sums as a checkpoint that ``--resume`` continues from (every batch done)."""
    extra = {"identity": identity, "batches_done": len(shard), "world_size": shard.world_size}

    def write(dest: Path) -> Any:
        return save_sums(dest, infos, sums, cfg, report=report, model=lm.model, extra_meta=extra, local=True)

    return write


@contextlib.contextmanager
def keeping_sums(target: Path, ckpt: Path, write: Callable[[Path], Any], world_size: int) -> Iterator[None]:
    """Write ``target`` inside this block; if the write fails (a full disk), keep the sums (:func:`keep_sums`)."""
    try:
        yield
    except (OSError, SafetensorError) as err:
        raise keep_sums(err, target, ckpt, write, world_size) from err


def _restated(base: WriteError, message: str, hint: str) -> WriteError:
    return WriteError(
        message, path=base.path, errno_code=base.errno_code, needed=base.needed, free=base.free, hint=hint
    )


def keep_sums(
    err: BaseException, target: Path, ckpt: Path, write: Callable[[Path], Any], world_size: int
) -> WriteError:
    """After ``target`` (a factor file) could not be written: keep the collected sums and say how to resume.

    The sums are written as a complete checkpoint (every batch done) by ``write(path)``: first at ``ckpt``, where
    ``--resume`` looks, else in the temporary folder (``$TMPDIR``). Under ``torchrun`` the sums are already
    merged over ranks, which a per-rank checkpoint is not: there the last periodic checkpoints are what remains.

    Returns:
        The error to raise: the cause, the space needed and free, where the sums are, and how to resume.

    """
    base = write_error(err, target, what="(factor file)")
    needed = "some"
    if base.needed and base.free is not None:
        needed = f"at least {human_bytes(max(base.needed - base.free, 0))} of"
    elif base.needed:
        needed = f"about {human_bytes(base.needed)} of"
    if world_size > 1:
        hint = f"Free {needed} space and run the same command again with --resume."
        return _restated(base, f"{base} The checkpoints in {ckpt.parent}, if any, are kept.", hint)
    tried = []
    for dest in (ckpt, Path(tempfile.gettempdir()) / f"kronfisher-rescue-{os.getpid()}" / ckpt.name):
        try:
            write(dest)
        except (OSError, SafetensorError) as again:
            tried.append(f"{dest.parent}: {write_error(again, dest).args[0].split(': ', 1)[-1].rstrip('.')}")
            continue
        move = "" if dest == ckpt else f", move {dest} to <output-dir>/checkpoints/{ckpt.name}"
        hint = (
            f"Free {needed} space (or pick another --output-dir){move}, and run the same command again with "
            "--resume: the collection is not repeated."
        )
        return _restated(base, f"{base} The collected sums are kept in {dest}.", hint)
    hint = f"Free {needed} space and run the same command again."
    return _restated(base, f"{base} The collected sums could not be kept either ({'; '.join(tried)}).", hint)
