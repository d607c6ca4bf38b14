"""The memory plan of a run: each layer's G and layer groups within a budget (docs/concepts.md, memory plan).

Before the first batch: what every tracked layer needs per device (sums, its staged contribution, eigenbases,
decomposition workspace, EK-FAC sums, low-rank columns) for the planned token count ``T``; each layer's ``G``; and
groups whose passes fit ``max_memory`` (kronfluence's module partitions, Grosse et al. 2023).

**G** (``out > lowrank_threshold``). Dense: ``out²`` twice, an ``out³`` eigh (~32 ``out²`` bytes of workspace),
``out² T`` to accumulate, ``2 out² T`` in EK-FAC. Exact low-rank: ``out T + T²``, an ``out T²`` Gram and a ``T³``
eigh (~40 ``T²`` bytes), ``2 (out T + T²) T`` in EK-FAC. Symmetric in ``out`` and ``T``: flops cross at ``T = out``,
memory near ``0.9 out``. Low-rank when it needs less memory *and* fewer flops, dense beyond (both exact); the token
budget only when a dense ``G`` cannot be held at all, or for ``lowrank_layers``; ``T`` unknown: dense if it fits.

**Groups.** Layers reading one input (q/k/v, gate/up) stay together; groups fill in model order; a group's peak is
its largest phase (collect: sums + a batch's staged contributions; decompose: sums, eigenbases, the largest concurrent
workspaces; EK-FAC: eigenbases, EK-FAC sums + staged contributions) on top of the earlier groups' result.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from .budget import format_bytes, format_plan, resolve_budgets
from .config import KFACConfig
from .errors import MemoryBudgetError
from .footprint import LayerPlan, dense_side, g_flops, group_peak, lowrank_side, rows_route_pays, size_of, unit_key
from .layers import LayerInfo


@dataclass
class MemoryPlan:
    """Representation per layer, groups and bytes per device of a run (JSON-able with :meth:`to_dict`).

    Attributes:
        tokens, batch_tokens: planned token count ``T`` (None: unknown), tokens of the largest batch.
        ekfac, budgets: whether an EK-FAC pass follows each K-FAC pass; ``max_memory`` in bytes per device.
        layers: :class:`LayerPlan` by name (model order).
        groups: layer names of each group (model order); one group is an unpartitioned run.
        peaks: peak bytes per device of each group's passes, including what earlier groups keep.
        result: bytes per device kept at the end (eigenbases, low-rank columns, EK-FAC eigenvalues).
        spill: each group's factors are written to the factor file and dropped as it finishes, so a group's peak
            does not include the earlier groups' factors (``fit(..., save_to=path)``).
        reserved: bytes per device set aside before ``budgets`` (weights and activations, see
            :func:`~kronfisher.budget.resolve_budgets`); empty when the budgets were given.
        keeps_sums: the run keeps its raw sums (one group that fits with them); otherwise each dense sum is freed
            as it is decomposed (``KFAC.from_sums(..., release=True)``) and the plan counts that.

    """

    tokens: int | None
    batch_tokens: int
    ekfac: bool
    budgets: dict[str, int]
    layers: dict[str, LayerPlan]
    groups: list[list[str]]
    peaks: list[dict[str, int]]
    result: dict[str, int]
    spill: bool = False
    reserved: dict[str, int] = field(default_factory=dict)
    keeps_sums: bool = True

    @property
    def passes(self) -> int:
        """Passes over the data: one K-FAC pass (and one EK-FAC pass) per group."""
        return len(self.groups) * (2 if self.ekfac else 1)

    def host_columns(self) -> list[str]:
        """Low-rank layers whose ``U`` lives in host memory while the rest of the run is on an accelerator."""
        return [n for n, lp in self.layers.items() if lp.sides["G"].device == "cpu" != lp.sides["A"].device]

    def lowrank(self) -> dict[str, int | None]:
        """Low-rank layers with their token budget (None: exact), for the collector."""
        return {n: lp.max_rank for n, lp in self.layers.items() if lp.representation == "lowrank"}

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (the report and the factor file's metadata)."""
        out = {k: getattr(self, k) for k in ("tokens", "batch_tokens", "ekfac", "passes", "spill")}
        out["reserved"] = dict(self.reserved)
        out.update(budgets=dict(self.budgets), groups=[list(g) for g in self.groups], result=dict(self.result))
        out.update(peaks=[dict(p) for p in self.peaks], layers={n: lp.to_dict() for n, lp in self.layers.items()})
        return out

    def format(self) -> str:
        """Readable summary: representations, groups with their peak per device, passes (:func:`format_plan`)."""
        return format_plan(self.to_dict())


@dataclass(frozen=True)
class _Ctx:
    cfg: KFACConfig
    tokens: int | None
    rows: int
    device: str
    g_device: str  # where a low-rank G lives
    budgets: dict[str, int]
    workers: int
    host: str | None  # where a low-rank U goes (streamed) when it does not fit on the accelerator, or None
    spill: bool = False  # earlier groups' factors are written out, not kept
    reserved: dict[str, int] = field(default_factory=dict)  # set aside for weights and activations


def _build(
    info: LayerInfo, ctx: _Ctx, rep: str, max_rank: int | None, owner: bool, reason: str, g_device: str | None = None
) -> LayerPlan:
    cfg, t, rows = ctx.cfg, ctx.tokens, ctx.rows
    a, out = info.a_dim, info.out_features
    draws = cfg.mc_samples if cfg.fisher == "mc" else 1  # a low-rank G holds a column per token and draw
    acc = size_of(cfg.accumulate_torch_dtype)
    if rep == "dense":
        m, r = 0, out
        g = dense_side(out, cfg, ctx.device, True, rows, t)
    else:
        m = draws * (t if t is not None else rows)  # exact: every column (unknown T: one batch, grows with T)
        if max_rank is not None:
            m = min(m, 2 * max_rank + draws * rows)  # compression when more than 2k columns are held
        r = min(m, out, max_rank if max_rank is not None else m)
        g = lowrank_side(out, m, r, cfg, g_device or ctx.g_device, draws * rows, max_rank is not None)
    side_a = dense_side(a, cfg, ctx.device, owner, rows, t, thin=True, square=rep != "dense")
    if cfg.ekfac:
        thin = rep != "dense" and r < out
        a_thin = rep == "dense" and t is not None and rows_route_pays(t, a)  # A's basis [a, s], s ≤ T
        s = min(a, t) if a_thin and t is not None else a
        side_a.bytes["ekfac"] = (r * s + (a if thin else 0) + (r if a_thin else 0)) * acc  # span (and tail) sums
        side_a.bytes["result"] += side_a.bytes["ekfac"]  # the corrected eigenvalues stay in the block
        # per layer until the batch commits: its projections z [rows, r] and rotated inputs y (y² too) [rows, s];
        # while one layer's hook runs: its masked ĝ and projections, and the [r, s] product of a sequence
        g.bytes["ekfac_staging"] += rows * (r + 2 * s) * 4
        g.bytes["ekfac_transient"] += rows * (2 * out + m) * 4 + r * s * 4
    flops = None
    if out > cfg.lowrank_threshold and t is not None:
        d, lo = g_flops(out, a, t, draws * t, cfg.ekfac)
        flops = {"dense": d, "lowrank": lo}
    return LayerPlan(info.name, a, out, rep, max_rank, m, reason, unit_key(info), owner, {"A": side_a, "G": g}, flops)


def _alone(lp: LayerPlan, ctx: _Ctx) -> dict[str, int]:
    return group_peak([lp], ctx.workers, ctx.cfg.ekfac)


def _fits(peak: dict[str, int], kept: dict[str, int], budgets: dict[str, int]) -> bool:
    return all(kept.get(d, 0) + b <= budgets[d] for d, b in peak.items())


def _on_host(lp: LayerPlan, info: LayerInfo, ctx: _Ctx) -> LayerPlan | None:
    """The same low-rank layer with ``U`` in host memory (streamed through the accelerator), or None."""
    if lp.representation == "dense" or ctx.host is None or lp.sides["G"].device == ctx.host:
        return None
    why = f"{lp.reason}; U in host memory"
    return _build(info, ctx, "lowrank", lp.max_rank, lp.owner, why, g_device=ctx.host)


def _choose(info: LayerInfo, ctx: _Ctx, owner: bool) -> LayerPlan:
    """The representation of one layer's ``G`` (module docstring); a ``U`` that does not fit the device: host."""
    lp = _represent(info, ctx, owner)
    host = None if _fits(_alone(lp, ctx), {}, ctx.budgets) else _on_host(lp, info, ctx)
    return lp if host is None else host


def _represent(info: LayerInfo, ctx: _Ctx, owner: bool) -> LayerPlan:
    cfg, out, t = ctx.cfg, info.out_features, ctx.tokens
    if any(re.search(p, info.name) for p in cfg.lowrank_layers):
        return _build(info, ctx, "lowrank", cfg.lowrank_max_rank, owner, "named by lowrank_layers")
    if out <= cfg.lowrank_threshold:
        return _build(info, ctx, "dense", None, owner, f"out {out:,} ≤ lowrank_threshold")
    dense = _build(info, ctx, "dense", None, owner, "")
    need = _alone(dense, ctx)
    if not _fits(need, {}, ctx.budgets):
        dev, b = max(need.items(), key=lambda kv: kv[1] - ctx.budgets[kv[0]])
        why = f"dense G needs {format_bytes(b)} > {format_bytes(ctx.budgets[dev])} on {dev}"
        return _build(info, ctx, "lowrank", cfg.lowrank_max_rank, owner, why)
    if t is None:
        return _build(info, ctx, "dense", None, owner, "T unknown; dense G fits")
    low = _build(info, ctx, "lowrank", None, owner, "")
    low_b, dense_b = sum(_alone(low, ctx).values()), sum(need.values())
    assert low.flops is not None
    sizes = f"the layer needs {format_bytes(low_b)} with U, {format_bytes(dense_b)} with dense G"
    if low_b <= dense_b and low.flops["lowrank"] <= low.flops["dense"]:
        return _build(info, ctx, "lowrank", None, owner, f"T = {t:,} < out = {out:,}: {sizes}, fewer flops")
    return _build(info, ctx, "dense", None, owner, f"T = {t:,}, out = {out:,}: {sizes}")


def plan_memory(
    infos: dict[str, LayerInfo],
    cfg: KFACConfig,
    *,
    tokens: int | None = None,
    batch_tokens: int | None = None,
    device: str | torch.device = "cpu",
    lowrank_device: str | torch.device | None = None,
    budgets: dict[str, int] | None = None,
    workers: int | None = None,
    spill: bool = False,
    resident: dict[str, int] | None = None,
) -> MemoryPlan:
    """Plan a run: the representation of each layer's ``G``, groups that fit the budget, bytes per device.

    Args:
        infos: the tracked layers (model order).
        cfg: configuration (dtypes, ``lowrank_*``, ``ekfac``, ``max_memory``).
        tokens: planned token count ``T`` (None: unknown).
        batch_tokens: tokens of the largest batch (default ``min(T, 2048)``).
        device: the model's device, where ``A`` and dense ``G`` live.
        lowrank_device: where low-rank ``G`` lives (default: ``device``; on an accelerator, a ``U`` that does not
            fit goes to host memory and is streamed, :meth:`MemoryPlan.host_columns`).
        budgets: bytes per device for the factors (default: ``cfg.max_memory`` or the free memory, less the
            weights and activations, see :func:`~kronfisher.budget.resolve_budgets`).
        workers: concurrent eigendecompositions (default: torch's threads on CPU, 1 on an accelerator).
        spill: when the layers run in groups, each group's factors are written to the factor file and dropped as
            it finishes (:attr:`MemoryPlan.spill`); otherwise they stay in memory and count in the later groups.
        resident: bytes of the model's weights per device (counted in an explicit ``max_memory``).

    Raises:
        MemoryBudgetError: a layer needs more than its device's budget even alone (the message names it).

    """
    rows = int(batch_tokens or min(tokens or 2048, 2048))
    dev = str(torch.device(device))
    g_dev = dev if lowrank_device is None else str(torch.device(lowrank_device))
    accelerator = torch.device(dev).type not in ("cpu", "meta")
    host = "cpu" if accelerator and lowrank_device is None else None
    devices = sorted({dev, g_dev} | ({"cpu"} if accelerator else set()))
    reserved: dict[str, int] = {}
    if budgets is None:
        budgets, reserved = resolve_budgets(cfg, devices, infos, rows, resident)
    budgets = dict(budgets)
    for d in devices:
        budgets.setdefault(d, max(budgets.values()))
    if workers is None:
        workers = torch.get_num_threads() if torch.device(dev).type == "cpu" else 1
    ctx = _Ctx(cfg, tokens, rows, dev, g_dev, budgets, max(int(workers), 1), host, spill, reserved)
    units: dict[str, list[LayerPlan]] = {}
    for info in infos.values():  # the first layer of a unit decomposes the shared A
        lp = _choose(info, ctx, owner=unit_key(info) not in units)
        units.setdefault(lp.unit, []).append(lp)
    every = [lp for unit in units.values() for lp in unit]
    single = group_peak(every, ctx.workers, cfg.ekfac, keep_sums=True)  # one group: the operator keeps its sums
    keeps = _fits(single, {}, budgets)
    if keeps:
        groups, peaks, kept = [every], [single], _result(every)
    else:
        groups, peaks, kept = _pack(list(units.values()), ctx, infos)
    layers = {lp.name: lp for g in groups for lp in g}
    names = [[lp.name for lp in g] for g in groups]
    spilled = spill and len(groups) > 1
    layers = {n: layers[n] for n in infos}
    return MemoryPlan(tokens, rows, cfg.ekfac, budgets, layers, names, peaks, kept, spilled, reserved, keeps)


def _result(layers: list[LayerPlan], kept: dict[str, int] | None = None) -> dict[str, int]:
    kept = dict(kept or {})
    for d, b in ((d, b) for lp in layers for d, b in lp.total("result").items()):
        kept[d] = kept.get(d, 0) + b
    return kept


def _pack(
    units: list[list[LayerPlan]], ctx: _Ctx, infos: dict[str, LayerInfo]
) -> tuple[list[list[LayerPlan]], list[dict[str, int]], dict[str, int]]:
    """Fill groups in model order; a unit that does not fit alone is split into single layers (module docstring)."""
    groups: list[list[LayerPlan]] = []
    peaks: list[dict[str, int]] = []
    kept: dict[str, int] = {}
    current: list[LayerPlan] = []

    def held() -> dict[str, int]:  # what earlier groups leave in memory
        return {} if ctx.spill else kept

    def fits(layers: list[LayerPlan]) -> bool:
        return _fits(group_peak(layers, ctx.workers, ctx.cfg.ekfac), held(), ctx.budgets)

    def close() -> None:
        if current:
            peak = group_peak(current, ctx.workers, ctx.cfg.ekfac)
            peaks.append({d: held().get(d, 0) + b for d, b in peak.items()})
            groups.append(list(current))
            kept.update(_result(current, kept))
            current.clear()

    for unit in units:
        if not fits(current + unit):
            close()
        if fits(current + unit):
            current.extend(unit)
            continue
        pieces = unit if len(unit) == 1 else [_choose(infos[lp.name], ctx, owner=True) for lp in unit]
        for lp in pieces:  # layers sharing an input, split: each decomposes its own copy of that A
            if not fits([*current, lp]):
                close()
            lp = lp if fits([lp]) else (_on_host(lp, infos[lp.name], ctx) or lp)
            if not fits([lp]):
                raise _too_small(lp, ctx, held(), _result([x for u in units for x in u]))
            current.append(lp)
    close()
    return groups, peaks, kept


def _too_small(lp: LayerPlan, ctx: _Ctx, kept: dict[str, int], total: dict[str, int]) -> MemoryBudgetError:
    need = group_peak([lp], ctx.workers, ctx.cfg.ekfac)
    dev = next(d for d, b in need.items() if kept.get(d, 0) + b > ctx.budgets[d])
    part, earlier = {c: lp.total(c).get(dev, 0) for c in ("sums", "eigen", "workspace", "ekfac")}, kept.get(dev, 0)
    return MemoryBudgetError(
        f"Layer {lp.name!r} (in {lp.a_dim:,}, out {lp.out:,}, G {lp.representation}) needs {need[dev]:,} bytes "
        f"({format_bytes(need[dev])}) on {dev}: sums {format_bytes(part['sums'])}, eigenbases "
        f"{format_bytes(part['eigen'])}, decomposition workspace {format_bytes(part['workspace'])}, EK-FAC sums "
        f"{format_bytes(part['ekfac'])}; the factors may use {ctx.budgets[dev]:,} bytes "
        f"({format_bytes(ctx.budgets[dev])}) there"
        + _set_aside(ctx, dev)
        + (f", of which the factors kept from earlier layers take {format_bytes(earlier)}" if earlier else "")
        + ". Raise max_memory (--max-memory) or leave the layer out (exclude)."
        + (
            f" The factors all tracked layers keep at the end need {format_bytes(total[dev])} there: no grouping fits "
            "in memory; write each group's factors to a file as it finishes (fit(..., save_to=path))."
            if total.get(dev, 0) > ctx.budgets[dev] and not ctx.spill
            else ""
        )
    )


def _set_aside(ctx: _Ctx, dev: str) -> str:
    """What the budget of ``dev`` leaves out, for the error message."""
    if dev not in ctx.reserved:
        return ""
    mm = ctx.cfg.max_memory
    if (mm.get(dev) if isinstance(mm, dict) else mm) is None:
        return f" (its free memory less {format_bytes(ctx.reserved[dev])} of activations)"
    return f" (max_memory less {format_bytes(ctx.reserved[dev])} of model weights and activations)"
