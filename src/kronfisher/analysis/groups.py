"""``kronfisher analyze`` under a memory budget: the plan before the first batch, and runs in layer groups.

The plan (:func:`~kronfisher.drivers.planning.plan_run`, docs/concepts.md#memory-plan-and-module-groups) is printed
before the first batch. When it has several groups, each group runs its own passes over the same batches (collect,
decompose, EK-FAC) without checkpoints, and its raw sums are freed once decomposed: the factor file holds no sums.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..comm import Shard, is_main_process
from ..config import KFACConfig
from ..drivers.groups import run_groups
from ..drivers.planning import plan_run, tracked_layers
from ..io.files import save
from ..models import LoadedModel
from ..operator import KFAC
from ..plan import MemoryPlan


def plan_for(
    lm: LoadedModel, shard: Shard, cfg: KFACConfig, info: Callable[[str], None], *, spill: bool = False
) -> MemoryPlan:
    """The memory plan of one model's run over ``shard``, printed with ``info``.

    ``spill``: a factor file will be written, so groups write their factors to it as they finish.
    """
    plan = plan_run(lm.model, tracked_layers(lm.model, cfg), shard, cfg, spill=spill)
    for line in plan.format().splitlines():
        info(f"  {line}")
    return plan


def fit_groups(
    lm: LoadedModel,
    shard: Shard,
    cfg: KFACConfig,
    plan: MemoryPlan,
    info: Callable[[str], None],
    timings: dict[str, float],
    factor_path: Path | None,
    identity: dict[str, Any],
    sources: Any,
    *,
    parts: Path | None = None,
    resume: bool = False,
) -> KFAC:
    """Run the groups of ``plan`` and save the factor file (without sums; none when ``factor_path`` is None).

    With a spilling plan (:attr:`MemoryPlan.spill`) each group's factors are written to ``factor_path`` as the group
    finishes, and the operator returned reads its layers from that file. The finished groups' files wait in
    ``parts`` (the checkpoint folder) until all are done, so ``resume`` (``--resume``) after a kill reruns only the
    groups that had not finished.
    """
    t = time.monotonic()
    extra = {"identity": identity, "data": sources}  # as the ungrouped path writes them (resume compares identity)
    spilled = plan.spill and factor_path is not None
    if spilled:
        factor_path.parent.mkdir(parents=True, exist_ok=True)
    fisher = run_groups(
        lm.model,
        shard,
        cfg,
        tracked_layers(lm.model, cfg),
        plan,
        on_phase=PhaseClock(info, timings),
        save_to=factor_path if spilled else None,
        extra_meta=extra,
        parts=parts,
        resume=resume,
    )
    if parts is not None and is_main_process() and parts.is_dir() and not any(parts.iterdir()):
        parts.rmdir()  # the parts were joined into the factor file
    fisher.attach_model(lm.model)
    timings["groups"] = time.monotonic() - t
    if factor_path is None or spilled:
        return fisher
    t = time.monotonic()
    factor_path.parent.mkdir(parents=True, exist_ok=True)
    save(fisher, factor_path, model=lm.model, include_sums=False, extra_meta=extra)
    timings["save"] = time.monotonic() - t
    return fisher


class PhaseClock:
    """Prints each group's phases and times them: ``timings["group k/n: phase"]`` lasts until the next phase."""

    def __init__(self, info: Callable[[str], None], timings: dict[str, float]) -> None:
        self.info, self.timings = info, timings
        self.current: str | None = None
        self.since = time.monotonic()

    def __call__(self, k: int, n: int, phase: str) -> None:
        """``run_groups``'s ``on_phase``."""
        now = time.monotonic()
        if self.current is not None:
            self.timings[self.current] = now - self.since
        self.current, self.since = (None if phase == "done" else f"group {k}/{n}: {phase}"), now
        self.info(f"  group {k}/{n}: {phase}")
