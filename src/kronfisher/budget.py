"""Budgets per device, sizes and the printed form of the memory plan (docs/concepts.md, memory plan)."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import sys
from typing import Any

import torch

from .config import KFACConfig
from .errors import ConfigError
from .layers import LayerInfo


def format_bytes(n: float) -> str:
    """``1.23 GiB`` style."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def available_memory(device: str | torch.device) -> int:
    """Free memory of a device now: ``MemAvailable`` of ``/proc/meminfo`` on the host, ``mem_get_info`` on CUDA."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.mem_get_info(dev)[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def _libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return lib if hasattr(lib, "malloc_trim") else None
    except OSError:  # a libc without the symbol (musl) or none found
        return None


_LIBC = _libc()


def return_free_memory() -> None:
    """Collect garbage, then give the C allocator's free pages back to the system (glibc ``malloc_trim``).

    Called between the phases of a grouped run: a pass's activations and a decomposition's temporaries of a few
    MiB each come from the heap (below glibc's mmap threshold), and their freed pages otherwise stay in the
    process's resident memory, on top of what the next phase allocates (docs/concepts.md). A no-op elsewhere.
    """
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def activation_bytes(infos: dict[str, LayerInfo], batch_tokens: int) -> int:
    """Rough activations of one batch: each tracked layer's input and output, plus 4 copies of the widest output."""
    if not infos:
        return 0
    widest = max(i.out_features for i in infos.values())
    return 4 * batch_tokens * (4 * widest + sum(i.a_dim + i.out_features for i in infos.values()))


def resolve_budgets(
    cfg: KFACConfig,
    devices: list[str],
    infos: dict[str, LayerInfo],
    batch_tokens: int,
    resident: dict[str, int] | None = None,
) -> tuple[dict[str, int], dict[str, int]]:
    """Factor budget per device, and what was set aside for the rest of the run (docs/concepts.md, memory plan).

    ``cfg.max_memory`` (one size for all, or per device) bounds the run's memory on a device: the factors get it less
    the model's weights there (``resident``) and one batch's activations (:func:`activation_bytes`). Without it, a
    device gives what it has free now (the weights are already in place) less the activations. A device a
    ``{device: size}`` mapping leaves out gets its free memory; one it names that the run does not use is an error
    (a typo such as ``"cuda"`` for ``"cuda:0"``).

    Returns:
        ``(budgets, reserved)``: bytes for the factors per device, and bytes set aside per device for the weights
        and activations (counted in ``max_memory``; for free memory, the activations only).

    """
    mm = cfg.max_memory
    if isinstance(mm, dict) and set(mm) - set(devices):
        unused = sorted(set(mm) - set(devices))
        raise ConfigError(f"Invalid max_memory: devices {unused} are not used by this run (it uses {devices}).")
    acts = activation_bytes(infos, batch_tokens)
    budgets, reserved = {}, {}
    for dev in devices:
        size = mm.get(dev) if isinstance(mm, dict) else mm
        if size is None:
            reserved[dev] = acts
            budgets[dev] = max(available_memory(dev) - acts, 0)
        else:
            reserved[dev] = acts + (resident or {}).get(dev, 0)
            budgets[dev] = max(int(size) - reserved[dev], 0)
    return budgets, reserved


def _per_device(sizes: dict[str, int]) -> str:
    return ", ".join(f"{d} {format_bytes(b)}" for d, b in sizes.items())


def _layers(n: int) -> str:
    return f"{n} layer" + ("" if n == 1 else "s")


def format_plan(plan: dict[str, Any]) -> str:
    """Readable summary of a plan's dict (:meth:`~kronfisher.plan.MemoryPlan.to_dict`): G per layer, groups, passes."""
    t = "unknown" if plan["tokens"] is None else f"{plan['tokens']:,}"
    kind = "EK-FAC" if plan["ekfac"] else "K-FAC"
    lines = [f"memory plan: {len(plan['layers'])} layers, T = {t} tokens (batches of {plan['batch_tokens']:,}), {kind}"]
    lines[0] += f"; factor budget {_per_device(plan['budgets'])}"
    if plan.get("reserved"):
        lines[0] += f" (set aside for weights and activations: {_per_device(plan['reserved'])})"
    kinds: dict[str, list[str]] = {}
    for name, lp in plan["layers"].items():
        key = "low-rank exact" if lp["max_rank"] is None else f"low-rank, budget k = {lp['max_rank']}"
        kinds.setdefault("dense" if lp["representation"] == "dense" else key, []).append(name)
    for key, names in kinds.items():
        lines.append(f"  G {key}: {_layers(len(names))} (e.g. {names[-1]}: {plan['layers'][names[-1]]['reason']})")
    groups = plan["groups"]
    for i, (group, peak) in enumerate(zip(groups, plan["peaks"], strict=True)):
        span = group[0] if len(group) == 1 else f"{group[0]} … {group[-1]}"
        lines.append(f"  group {i + 1}/{len(groups)}: {_layers(len(group))} ({span}), peak {_per_device(peak)}")
    per = 2 if plan["ekfac"] else 1
    where = "written to the factor file group by group" if plan.get("spill") else "kept at the end"
    lines.append(f"  passes over the data: {plan['passes']} ({len(groups)} group(s) × {per}); factors {where}: ")
    lines[-1] += _per_device(plan["result"])
    return "\n".join(lines)
