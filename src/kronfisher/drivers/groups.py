"""``kf.fit``: plan the run, then the passes of each layer group (docs/library.md, docs/concepts.md).

One group is the ordinary run: collect, decompose, EK-FAC, an operator in memory that keeps its sums. Several
groups (the layers do not fit ``max_memory`` together) each run their own passes over the same batches, and give
exactly the factors of one unpartitioned run. With ``save_to``, each finished group's factors are written to the
factor file and dropped (:class:`~kronfisher.io.parts.GroupFiles`), so memory holds one group at a time, and the
operator returned reads its layers from that file on use.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import nn

from ..budget import return_free_memory
from ..collection.cut import cut_index, find_blocks
from ..collection.passes import LossFn
from ..collection.replay import Replay
from ..comm import unwrap_model
from ..config import KFACConfig
from ..errors import ConfigError
from ..io.files import load, save
from ..io.parts import GroupFiles
from ..layers import Discovery
from ..operator import KFAC
from ..plan import MemoryPlan
from ..report import CollectionReport
from .ekfac import correct
from .fit import check_factors, collect
from .planning import plan_run, tracked_layers

logger = logging.getLogger("kronfisher")

PathLike = str | os.PathLike[str]


def _merge_reports(into: CollectionReport | None, part: CollectionReport) -> CollectionReport:
    """One report for the groups of a run: counts from the first group (the same batches), the rest merged."""
    if into is None:
        return part
    mine, theirs = {b for b, _ in into.nonfinite_batches}, {b for b, _ in part.nonfinite_batches}
    if mine != theirs:  # on_nonfinite="skip" drops a batch only where it is non-finite: groups saw other batches
        into.warnings.append(f"Batches {sorted(mine ^ theirs)} were dropped as non-finite by some layer groups only.")
    into.never_fired.extend(n for n in part.never_fired if n not in into.never_fired)
    into.nonfinite_batches.extend(b for b in part.nonfinite_batches if b not in into.nonfinite_batches)
    into.warnings.extend(w for w in part.warnings if w not in into.warnings)
    into.tied.update(part.tied)
    return into


def fit(
    model: nn.Module,
    batches: Iterable[Any],
    cfg: KFACConfig | None = None,
    *,
    loss_fn: LossFn | None = None,
    progress: bool = False,
    save_to: PathLike | None = None,
) -> KFAC:
    """Collect, decompose and (with ``cfg.ekfac``) correct: the whole pipeline (docs/library.md).

    Before the first batch the run is planned against ``cfg.max_memory`` (:func:`plan_run`, logged): when the
    tracked layers do not fit together, each group of layers runs its own passes over the same batches (collect,
    decompose, EK-FAC), and its sums are freed once decomposed; the factors are exactly those of one unpartitioned
    run (same batches, same order, same MC seeds). Then the operator keeps no sums (``fisher.sums`` is None).

    Args:
        model: a causal LM (batches with ``input_ids``, optional ``attention_mask`` / ``labels``) or any model with
            ``loss_fn(model, batch) -> (loss, {"num_terms": N, "attention_mask": mask, "reduction": ...})``.
        batches: an iterable of batches; re-iterable (a list, a DataLoader) when ``cfg.ekfac`` is set or the plan
            has several groups.
        cfg: configuration (default :class:`KFACConfig`).
        loss_fn: optional user loss (empirical Fisher only).
        progress: show progress bars.
        save_to: also write the factors to this file (as :meth:`KFAC.save`, without sums). When the layers run in
            groups, each group's factors are written as it finishes and dropped from memory, so the plan needs
            room for one group at a time, not for every group's factors; the operator returned then reads each
            layer from the file when used, holding at most ``max_memory`` of them (docs/files.md).

    Returns:
        The decomposed :class:`~kronfisher.operator.KFAC` operator.

    """
    cfg = cfg or KFACConfig()
    model = unwrap_model(model)
    once = iter(batches) is batches  # type: ignore[comparison-overlap]
    if cfg.ekfac and once:
        raise ConfigError("ekfac=True needs two passes over the data: pass a list or a DataLoader, not an iterator.")
    discovery = tracked_layers(model, cfg)
    plan = plan_run(model, discovery, None if once else batches, cfg, spill=save_to is not None)
    logger.info("%s", plan.format())
    if len(plan.groups) > 1 and once:
        raise ConfigError(
            f"The memory plan has {len(plan.groups)} groups, each with its own pass over the data: "
            "pass a list or a DataLoader, not an iterator (or raise max_memory)."
        )
    fisher = run_groups(model, batches, cfg, discovery, plan, loss_fn=loss_fn, progress=progress, save_to=save_to)
    if save_to is not None and not plan.spill:
        save(fisher, save_to, model=model)
    return fisher


Phase = Callable[[int, int, str], None]

GROUPS_NOTE = (
    "The tracked layers ran in {n} groups to fit max_memory, each with its own passes over the data; each group's "
    "raw sums were freed once decomposed, so the factor file holds no sums (no merge)."
)


FREED_NOTE = (
    "The raw sums were freed as they were decomposed to fit max_memory, so the operator and its file hold no sums "
    "(no merge)."
)


def run_groups(
    model: nn.Module,
    batches: Iterable[Any],
    cfg: KFACConfig,
    discovery: Discovery,
    plan: MemoryPlan,
    *,
    loss_fn: LossFn | None = None,
    progress: bool = False,
    on_phase: Phase | None = None,
    save_to: PathLike | None = None,
    extra_meta: Mapping[str, Any] | None = None,
    parts: PathLike | None = None,
    resume: bool = False,
) -> KFAC:
    """The passes of each group of ``plan``: collect, decompose, (EK-FAC); one operator for all (see :func:`fit`).

    ``on_phase(group, groups, phase)`` is called as each phase starts (``"collect"``, ``"decompose"``, ``"ekfac"``,
    and ``"write"`` when a group's factors go to the file) and once with ``"done"``; the same events are logged as
    ``group i/n: phase``. When ``plan.spill`` and ``save_to`` are set, each group's factors are written to
    ``save_to`` (with ``extra_meta``) as the group finishes and the operator returned is loaded from that file.
    With ``parts`` (a folder) the finished groups' files are kept there until the end, also when the run fails, and
    ``resume`` reuses those of a run with the same ``extra_meta["identity"]`` and plan (phase ``"reused"``).
    """
    n = len(plan.groups)

    def phase(k: int, name: str) -> None:
        _ = n > 1 and return_free_memory()  # grouped: the last phase's freed heap pages go before this allocates
        logger.info("group %d/%d: %s", k, n, name)
        if on_phase is not None:
            on_phase(k, n, name)

    spill = plan.spill and save_to is not None and n > 1
    files = GroupFiles(save_to, model, keep=parts, identity=(extra_meta or {}).get("identity")) if spill else None
    blocks: dict[str, Any] = {}
    report: CollectionReport | None = None
    replay = late_starts(model, discovery, plan) if n > 1 else None
    try:
        for k, names in enumerate(plan.groups, start=1):
            done = files.reusable(k, n, plan.groups) if files is not None and resume else None
            if done is not None:  # a resumed run: this group's factors are on disk already
                phase(k, "reused")
                report = _merge_reports(report, done)
                continue
            phase(k, "collect")
            kw = {"loss_fn": loss_fn, "progress": progress, "plan": plan, "check": n == 1, "replay": replay}
            _, collector, part = collect(model, batches, cfg, layers=None if n == 1 else names, **kw)
            phase(k, "decompose")
            # A grouped run frees each dense sum as it is decomposed (before its EK-FAC pass), as the plan counts.
            free, infos = not plan.keeps_sums, {name: discovery.infos[name] for name in names}
            fisher = KFAC.from_sums(infos, collector.sums, cfg, report=part, model=model, spread=True, release=free)
            del collector
            fisher.report.warnings.extend([FREED_NOTE] if free and n == 1 else [])
            if cfg.ekfac and fisher.layer_names:  # a group whose layers never fired has nothing to correct
                phase(k, "ekfac")
                correct(fisher, model, batches, loss_fn=loss_fn, progress=progress, replay=replay)
            if n == 1:
                phase(k, "done")
                return fisher  # unpartitioned: the operator keeps its sums unless they did not fit
            if files is not None and fisher.layer_names:
                phase(k, "write")
                files.add(fisher, k, n)  # the group's factors go to disk and leave memory
            else:
                blocks.update({name: fisher.block(name) for name in fisher.layer_names})
            report = _merge_reports(report, fisher.report)
            del fisher  # anything a cycle still holds of it goes at the next phase (return_free_memory)
        phase(n, "done")
        assert report is not None
        report.warnings.append(GROUPS_NOTE.format(n=n))
        if files is not None and files.parts:
            files.finish(report, extra_meta)
            return load(files.dest, model=model, allow_subset=True, keep_bytes=keep_bytes(plan))
    except BaseException:
        if files is not None:
            files.discard()
        raise
    if not blocks:
        check_factors({}, report, seen=None)  # no group got factors: say why, as one run would
    live = {name: discovery.infos[name] for name in discovery.infos if name in blocks}
    return KFAC(live, {name: blocks[name] for name in live}, cfg, report=report, model=model)


def keep_bytes(plan: MemoryPlan) -> int:
    """How much of a spilled operator to hold in memory: a quarter of the factor budget of the model's device.

    The groups are done, so their budget is free; the rest is left to what the caller does with the operator
    (a gradient to precondition, the report's per-layer work).
    """
    return max(plan.budgets.values()) // 4


REPLAY_SHARE = 100  # kept hidden states take at most 1 / REPLAY_SHARE of the host's factor budget


def late_starts(model: nn.Module, discovery: Discovery, plan: MemoryPlan) -> Replay | None:
    """The hidden states to keep for the groups after the first: their cut blocks (docs/concepts.md, groups).

    Bounded by ``1 / REPLAY_SHARE`` of the factor budget of the host, where they are kept (past it, a late pass
    runs the rest of its batches in full).
    """
    starts = []
    for names in plan.groups[1:]:
        hooked = {n: discovery.modules[n] for n in names if n in discovery.modules}
        found = find_blocks(model, hooked) if hooked else None
        if found is not None:
            starts.append(cut_index(found[1], hooked))
    limit = plan.budgets.get("cpu", min(plan.budgets.values(), default=0)) // REPLAY_SHARE
    return Replay(starts, limit) if any(s > 0 for s in starts) and limit > 0 else None
