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

from ..comm import Shard
from ..config import KFACConfig
from ..drivers.fit import run_groups
from ..drivers.planning import plan_run, tracked_layers
from ..io.files import save
from ..models import LoadedModel
from ..operator import KFAC
from ..plan import MemoryPlan


def plan_for(lm: LoadedModel, shard: Shard, cfg: KFACConfig, info: Callable[[str], None]) -> MemoryPlan:
    """The memory plan of one model's run over ``shard``, printed with ``info``."""
    plan = plan_run(lm.model, tracked_layers(lm.model, cfg), shard, cfg)
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
) -> KFAC:
    """Run the groups of ``plan`` and save the factor file (without sums; none when ``factor_path`` is None)."""
    t = time.monotonic()
    fisher = run_groups(
        lm.model,
        shard,
        cfg,
        tracked_layers(lm.model, cfg),
        plan,
        on_phase=lambda k, n, phase: info(f"  group {k}/{n}: {phase}"),
    )
    fisher.attach_model(lm.model)
    fisher.report.warnings.append(
        f"The tracked layers ran in {len(plan.groups)} groups to fit max_memory, each with its own passes over the "
        "data; each group's raw sums were freed once decomposed, so the factor file holds no sums (no merge)."
    )
    timings["groups"] = time.monotonic() - t
    if factor_path is None:
        return fisher
    t = time.monotonic()
    factor_path.parent.mkdir(parents=True, exist_ok=True)
    extra = {"identity": identity, "data": sources}  # as the ungrouped path writes them (resume compares identity)
    save(fisher, factor_path, model=lm.model, include_sums=False, extra_meta=extra)
    timings["save"] = time.monotonic() - t
    return fisher
