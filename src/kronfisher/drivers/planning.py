"""Before the first batch: the tracked layers, the token count and the memory plan of a run (docs/concepts.md)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from ..collection.forward import model_device
from ..comm import broadcast_object
from ..config import KFACConfig
from ..errors import ConfigError, InputError
from ..layers import Discovery, discover_layers
from ..plan import MemoryPlan, plan_memory


def tracked_layers(model: nn.Module, cfg: KFACConfig) -> Discovery:
    """The tracked layers of ``model`` under ``cfg.include`` / ``cfg.exclude``; an error when there are none."""
    discovery = discover_layers(model, cfg.include, cfg.exclude)
    if not discovery.infos:
        raise ConfigError(f"No tracked layers (include={cfg.include}, exclude={cfg.exclude}): {discovery.skipped}")
    return discovery


def check_selection(model: nn.Module, cfg: KFACConfig, source: str) -> None:
    """A short, actionable error when ``--include`` / ``--exclude`` leave no layer of ``source`` to track."""
    found = discover_layers(model, cfg.include, cfg.exclude)
    if found.infos:
        return
    names = list(found.skipped)
    examples = ", ".join(names[:3] + ([names[-1]] if len(names) > 3 else []))
    raise InputError(
        f"No layer of {source} is tracked with --include {list(cfg.include)} --exclude "
        f"{list(cfg.exclude)}: {len(names)} linear layers were all left out (for example {examples}).",
        hint="The patterns are Python regexes searched in the full layer names, e.g. --include 'layers\\.0\\.' "
        "or --include 'mlp' --exclude 'lm_head'.",
    )


def count_tokens(batches: Iterable[Any]) -> tuple[int | None, int | None]:
    """Attended tokens of all batches and of the largest one, for a list of causal-LM batches (else None).

    A :class:`~kronfisher.comm.Shard` counts the whole list (every rank's batches: the sums are reduced over
    ranks, docs/distributed.md). Other iterables are not iterated here (a DataLoader would cost a pass).
    """
    data = getattr(batches, "batches", batches)
    if not isinstance(data, (list, tuple)) or not all(isinstance(b, Mapping) and "input_ids" in b for b in data):
        return None, None
    try:
        sizes = [int(b["attention_mask"].sum()) if "attention_mask" in b else int(b["input_ids"].numel()) for b in data]
    except (AttributeError, TypeError):  # not tensors: the batch loop says what is wrong with them
        return None, None
    return (sum(sizes), max(sizes)) if sizes else (None, None)


def plan_run(
    model: nn.Module, discovery: Discovery, batches: Iterable[Any] | None, cfg: KFACConfig, *, spill: bool = False
) -> MemoryPlan:
    """The memory plan of a run over ``batches`` (:func:`~kronfisher.plan.plan_memory`), the same on every rank.

    ``spill``: groups write their factors to the factor file as they finish (``fit(..., save_to=path)``).
    """
    tokens, largest = count_tokens(batches) if batches is not None else (None, None)
    device = str(model_device(model))
    kw = {"tokens": tokens, "batch_tokens": largest, "device": device, "spill": spill}
    plan = plan_memory(discovery.infos, cfg, **kw, resident=model_bytes(model))
    return broadcast_object(plan)  # free memory differs between ranks; their passes must not


def model_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the model's parameters and buffers per device (a tied weight, one storage, counted once)."""
    seen: set[tuple[str, int]] = set()
    out: dict[str, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        if key in seen or t.device.type == "meta":
            continue
        seen.add(key)
        out[str(t.device)] = out.get(str(t.device), 0) + storage.nbytes()
    return out
