"""The memory plan of a run: representation per layer and layer groups that fit a budget (docs/concepts.md).

Before the first batch, the plan computes what every tracked layer needs on each device (sums, one layer's staged
contribution, eigenbases, decomposition workspace, EK-FAC sums, low-rank columns) for the planned token count
``T``, chooses the representation of each layer's ``G`` and splits the layers into groups whose passes fit
``max_memory`` (kronfluence's module partitions; Grosse et al. 2023). Each group runs its own passes over the same
batches with only its layers hooked, so a grouped run gives exactly the factors of one pass over every layer.

**Representation of G** (Martens & Grosse 2015 keep ``G`` dense; a low-rank ``G = U Uᵀ`` with ``U = [ĝ_1 … ĝ_T]/√N``
is exact, docs/concepts.md). For a layer with ``out > lowrank_threshold``:

* dense ``G`` costs ``out²`` twice (sum and eigenbasis), an ``out³`` eigendecomposition with ~32 ``out²`` bytes of
  workspace, ``out² T`` to accumulate and ``2 out² T`` in the EK-FAC pass;
* exact low-rank costs ``out T`` for ``U`` plus ``T²`` for its coefficients, a ``[T, T]`` float64 Gram
  (``out T²``) and its eigendecomposition (``T³``, ~40 ``T²`` bytes), and ``2 (out T + T²) T`` in the EK-FAC pass.

Both models are symmetric in ``out`` and ``T``: their flops cross at ``T = out``, their memory (with the
workspace) near ``T ≈ 0.9 out``. Low-rank is chosen when it needs less memory *and* fewer flops at the planned
``T`` (so while ``T`` is below ~0.9 ``out``), dense beyond; both are exact, nothing is truncated. The approximate
token budget (``lowrank_max_rank``: top-``k`` plus an exact-trace tail) is used only for a layer whose dense ``G``
cannot be held at all within the budget (the lm_head of a 150k vocabulary: ``out² ≈ 92 GB``), and
``lowrank_layers`` forces low-rank. Layers with ``out ≤ lowrank_threshold`` stay dense. With ``T`` unknown (an
iterator, a user loop) a layer is dense when its dense ``G`` fits. ``benchmarks/bench_scale.py --crossover``
measures the crossover.

**Groups.** Layers reading the same input (q/k/v, gate/up: one ``A`` decomposed for all) stay in one group. Groups
are filled in model order; a group's peak is the largest of its phases (collection: sums plus one staged
contribution; decomposition: sums, eigenbases and the largest concurrent workspaces; EK-FAC: eigenbases, EK-FAC
sums and one staged contribution), on top of the factors the earlier groups keep (their eigenbases, low-rank
columns and EK-FAC eigenvalues: the result). A layer that does not fit alone raises
:class:`~kronfisher.errors.MemoryBudgetError` naming the layer and the bytes it needs.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import KFACConfig
from .errors import ConfigError, MemoryBudgetError
from .layers import LayerInfo

EIGH_FLOPS = 32.0  # an eigh with vectors of n costs ~32 n³ GEMM flops (LAPACK syevd measured against GEMM on CPU)
GRAM_WORK = 40  # bytes per m² while a [m, m] float64 Gram is decomposed (Gram, eigh copy, vectors, workspace)
COMPONENTS = ("sums", "staging", "eigen", "workspace", "ekfac", "ekfac_staging", "result")


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def format_bytes(n: float) -> str:
    """``1.23 GiB`` style."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


@dataclass
class Side:
    """What one factor side of a layer needs on one device (bytes per component, see :data:`COMPONENTS`)."""

    device: str
    bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COMPONENTS, 0))


@dataclass
class LayerPlan:
    """The plan of one layer.

    Attributes:
        name: layer name.
        a_dim: dimension of ``A``; ``out``: output dimension.
        representation: ``"dense"`` or ``"lowrank"`` (of ``G``).
        max_rank: token budget ``k`` of a low-rank ``G`` (None: exact, every token kept).
        columns: columns of ``U`` held at the peak (low-rank), or 0.
        reason: why this representation.
        unit: key of the layers sharing this layer's input (and so its ``A``); ``owner``: decomposes that ``A``.
        sides: ``"A"`` and ``"G"`` :class:`Side` (devices and bytes).
        flops: ``{"dense": f, "lowrank": f}`` of ``G`` over the run (None when ``T`` is unknown).

    """

    name: str
    a_dim: int
    out: int
    representation: str
    max_rank: int | None
    columns: int
    reason: str
    unit: str
    owner: bool
    sides: dict[str, Side]
    flops: dict[str, float] | None = None

    def total(self, component: str) -> dict[str, int]:
        """Bytes of ``component`` by device."""
        out: dict[str, int] = {}
        for side in self.sides.values():
            out[side.device] = out.get(side.device, 0) + side.bytes[component]
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "representation": self.representation,
            "max_rank": self.max_rank,
            "columns": self.columns,
            "reason": self.reason,
            "unit": self.unit,
            "bytes": {c: self.total(c) for c in COMPONENTS},
            "flops": self.flops,
        }


def _dense_side(dim: int, cfg: KFACConfig, device: str, owner: bool, rows: int, ekfac_rank: int | None) -> Side:
    acc = _size(cfg.accumulate_torch_dtype)
    eigh64 = dim <= cfg.eigh_max_dim and cfg.eigh_dtype == "float64"
    side = Side(device)
    side.bytes["sums"] = dim * dim * acc
    side.bytes["staging"] = dim * dim * max(acc, 4) + rows * dim * 4
    if owner:
        side.bytes["eigen"] = (dim * dim + dim) * acc
        side.bytes["workspace"] = dim * dim * (32 if eigh64 else 24)  # float64 mean + eigh copy, vectors, work
    side.bytes["result"] = side.bytes["eigen"]
    return side


def _lowrank_side(out: int, m: int, r: int, cfg: KFACConfig, device: str, rows: int, budget: bool) -> Side:
    lr = _size(cfg.lowrank_torch_dtype)
    work = 8 if cfg.accumulate_dtype == "float64" else 4
    side = Side(device)
    side.bytes["sums"] = out * m * lr
    side.bytes["staging"] = rows * out * (4 + lr) + (GRAM_WORK * m * m if budget else 0)  # rows (+ compression)
    side.bytes["eigen"] = (m * r + r) * work  # C [m, r] and λ; U itself is the sum, kept by the eigenbasis
    side.bytes["workspace"] = GRAM_WORK * m * m
    side.bytes["ekfac_staging"] = rows * (out + m) * 4  # ĝ rows and their projections
    side.bytes["result"] = side.bytes["eigen"] + side.bytes["sums"]
    return side


def _g_flops(out: int, a: int, t: int, m: int, ekfac: bool) -> tuple[float, float]:
    """(dense, low-rank) flops of ``G`` over a run of ``t`` tokens with ``m`` low-rank columns (docstring)."""
    dense = out * out * t + EIGH_FLOPS * out**3 + (2.0 * out * out * t + 2.0 * out * a * t if ekfac else 0.0)
    low = out * m * m + EIGH_FLOPS * m**3 + (2.0 * (out * m + m * m) * t + 2.0 * m * a * t if ekfac else 0.0)
    return float(dense), float(low)


def unit_key(info: LayerInfo) -> str:
    """Layers of one parent module with the same input width read the same input (q/k/v, gate/up)."""
    parent = info.name.rsplit(".", 1)[0] if "." in info.name else ""
    return f"{parent}|{info.a_dim}"


def _peak(layers: list[LayerPlan], workers: int, ekfac: bool) -> dict[str, int]:
    """Peak bytes per device of one group's passes (module docstring)."""
    devices = {s.device for lp in layers for s in lp.sides.values()}
    out = {}
    for dev in devices:
        sides = [s for lp in layers for s in lp.sides.values() if s.device == dev]

        def tot(c: str, sides: list[Side] = sides) -> int:
            return sum(s.bytes[c] for s in sides)

        def top(c: str, k: int, sides: list[Side] = sides) -> int:
            return sum(sorted((s.bytes[c] for s in sides), reverse=True)[:k])

        collect = tot("sums") + top("staging", 1)
        decompose = tot("sums") + tot("eigen") + top("workspace", workers)
        correct = tot("result") + tot("ekfac") + top("ekfac_staging", 1) if ekfac else 0
        out[dev] = max(collect, decompose, correct)
    return out


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


def activation_bytes(infos: dict[str, LayerInfo], batch_tokens: int) -> int:
    """Rough activations of one batch: each tracked layer's input and output, plus 4 copies of the widest output."""
    if not infos:
        return 0
    widest = max(i.out_features for i in infos.values())
    return 4 * batch_tokens * (4 * widest + sum(i.a_dim + i.out_features for i in infos.values()))


def resolve_budgets(
    cfg: KFACConfig, devices: list[str], infos: dict[str, LayerInfo], batch_tokens: int
) -> dict[str, int]:
    """Budget per device: ``cfg.max_memory`` (one size for all, or per device), else free memory less activations."""
    mm = cfg.max_memory
    out = {}
    for dev in devices:
        if isinstance(mm, dict):
            if dev not in mm:
                raise ConfigError(f"Invalid max_memory: no budget for device {dev!r} (given: {sorted(mm)}).")
            out[dev] = int(mm[dev])
        elif mm is not None:
            out[dev] = int(mm)
        else:
            out[dev] = max(available_memory(dev) - activation_bytes(infos, batch_tokens), 0)
    return out


@dataclass
class MemoryPlan:
    """Representation per layer, groups and bytes per device of a run (JSON-able with :meth:`to_dict`).

    Attributes:
        tokens: planned token count ``T`` (None: unknown); ``batch_tokens``: tokens of the largest batch.
        ekfac: whether an EK-FAC pass follows each group's K-FAC pass.
        budgets: ``max_memory`` in bytes per device.
        layers: :class:`LayerPlan` by name (model order).
        groups: layer names of each group (model order); one group is an unpartitioned run.
        peaks: peak bytes per device of each group's passes, including what earlier groups keep.
        result: bytes per device kept at the end (eigenbases, low-rank columns, EK-FAC eigenvalues).

    """

    tokens: int | None
    batch_tokens: int
    ekfac: bool
    budgets: dict[str, int]
    layers: dict[str, LayerPlan]
    groups: list[list[str]]
    peaks: list[dict[str, int]]
    result: dict[str, int]

    @property
    def passes(self) -> int:
        """Passes over the data: one K-FAC pass (and one EK-FAC pass) per group."""
        return len(self.groups) * (2 if self.ekfac else 1)

    def lowrank(self) -> dict[str, int | None]:
        """Low-rank layers with their token budget (None: exact), for the collector."""
        return {n: lp.max_rank for n, lp in self.layers.items() if lp.representation == "lowrank"}

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (the report and the factor file's metadata)."""
        return {
            "tokens": self.tokens,
            "batch_tokens": self.batch_tokens,
            "ekfac": self.ekfac,
            "budgets": dict(self.budgets),
            "passes": self.passes,
            "groups": [list(g) for g in self.groups],
            "peaks": [dict(p) for p in self.peaks],
            "result": dict(self.result),
            "layers": {n: lp.to_dict() for n, lp in self.layers.items()},
        }

    def format(self) -> str:
        """Readable summary: representations, groups with their peak per device, passes."""
        t = "unknown" if self.tokens is None else f"{self.tokens:,}"
        lines = [
            f"memory plan: {len(self.layers)} layers, T = {t} tokens (batches of {self.batch_tokens:,}), "
            f"{'EK-FAC' if self.ekfac else 'K-FAC'}; budget "
            + ", ".join(f"{d} {format_bytes(b)}" for d, b in self.budgets.items())
        ]
        kinds: dict[str, list[str]] = {}
        for n, lp in self.layers.items():
            key = (
                "dense"
                if lp.representation == "dense"
                else ("low-rank exact" if lp.max_rank is None else f"low-rank, budget k = {lp.max_rank}")
            )
            kinds.setdefault(key, []).append(n)
        for key, names in kinds.items():
            example = self.layers[names[-1]]
            lines.append(f"  G {key}: {len(names)} layers (e.g. {names[-1]}: {example.reason})")
        for i, (group, peak) in enumerate(zip(self.groups, self.peaks, strict=True)):
            span = group[0] if len(group) == 1 else f"{group[0]} … {group[-1]}"
            lines.append(
                f"  group {i + 1}/{len(self.groups)}: {len(group)} layers ({span}), peak "
                + ", ".join(f"{d} {format_bytes(b)}" for d, b in peak.items())
            )
        lines.append(
            f"  passes over the data: {self.passes} ({len(self.groups)} group(s) × {2 if self.ekfac else 1}); "
            "factors kept at the end: " + ", ".join(f"{d} {format_bytes(b)}" for d, b in self.result.items())
        )
        return "\n".join(lines)


@dataclass(frozen=True)
class _Ctx:
    cfg: KFACConfig
    tokens: int | None
    rows: int
    device: str
    g_device: str  # where a low-rank G lives
    budgets: dict[str, int]
    workers: int


def _build(info: LayerInfo, ctx: _Ctx, rep: str, max_rank: int | None, owner: bool, reason: str) -> LayerPlan:
    cfg, t, rows = ctx.cfg, ctx.tokens, ctx.rows
    a, out = info.a_dim, info.out_features
    acc = _size(cfg.accumulate_torch_dtype)
    if rep == "dense":
        m, r = 0, out
        g = _dense_side(out, cfg, ctx.device, True, rows, None)
    else:
        m = t if t is not None else rows  # exact: every token (unknown T: one batch, grows with T)
        if max_rank is not None:
            m = min(m, 2 * max_rank + rows)  # compression when more than 2k columns are held
        r = min(m, out, max_rank if max_rank is not None else m)
        g = _lowrank_side(out, m, r, cfg, ctx.g_device, rows, max_rank is not None)
    side_a = _dense_side(a, cfg, ctx.device, owner, rows, None)
    if cfg.ekfac:
        thin = rep != "dense" and r < out
        side_a.bytes["ekfac"] = (r * a + (a if thin else 0)) * acc  # span (and tail) sums
        side_a.bytes["result"] += side_a.bytes["ekfac"]  # the corrected eigenvalues stay in the block
        g.bytes["ekfac_staging"] += rows * (a + out) * 4 + r * a * 4
    flops = None
    if out > cfg.lowrank_threshold and t is not None:
        d, lo = _g_flops(out, a, t, t, cfg.ekfac)
        flops = {"dense": d, "lowrank": lo}
    return LayerPlan(info.name, a, out, rep, max_rank, m, reason, unit_key(info), owner, {"A": side_a, "G": g}, flops)


def _alone(lp: LayerPlan, ctx: _Ctx) -> dict[str, int]:
    return _peak([lp], ctx.workers, ctx.cfg.ekfac)


def _fits(peak: dict[str, int], kept: dict[str, int], budgets: dict[str, int]) -> bool:
    return all(kept.get(d, 0) + b <= budgets[d] for d, b in peak.items())


def _choose(info: LayerInfo, ctx: _Ctx, owner: bool) -> LayerPlan:
    """The representation of one layer's ``G`` (module docstring)."""
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


def _model_devices(device: str, lowrank_device: str | None) -> tuple[str, str]:
    dev = str(torch.device(device))
    if lowrank_device is not None:
        return dev, str(torch.device(lowrank_device))
    return dev, "cpu" if torch.device(dev).type not in ("cpu", "meta") else dev  # huge G on the host


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
) -> MemoryPlan:
    """Plan a run: the representation of each layer's ``G``, groups that fit the budget, bytes per device.

    Args:
        infos: the tracked layers (model order).
        cfg: configuration (dtypes, ``lowrank_*``, ``ekfac``, ``max_memory``).
        tokens: planned token count ``T`` (None: unknown).
        batch_tokens: tokens of the largest batch (default ``min(T, 2048)``).
        device: the model's device, where ``A`` and dense ``G`` live.
        lowrank_device: where low-rank ``G`` lives (default: the host when ``device`` is an accelerator).
        budgets: bytes per device (default: from ``cfg.max_memory``, see :func:`resolve_budgets`).
        workers: concurrent eigendecompositions (default: torch's threads on CPU, 1 on an accelerator).

    Raises:
        MemoryBudgetError: a layer needs more than its device's budget even alone (the message names it).

    """
    rows = int(batch_tokens or min(tokens or 2048, 2048))
    dev, g_dev = _model_devices(str(device), None if lowrank_device is None else str(lowrank_device))
    devices = sorted({dev, g_dev})
    budgets = dict(budgets) if budgets is not None else resolve_budgets(cfg, devices, infos, rows)
    for d in devices:
        budgets.setdefault(d, max(budgets.values()))
    if workers is None:
        workers = torch.get_num_threads() if torch.device(dev).type == "cpu" else 1
    ctx = _Ctx(cfg, tokens, rows, dev, g_dev, budgets, max(int(workers), 1))
    units: dict[str, list[LayerPlan]] = {}
    for info in infos.values():
        key = unit_key(info)
        owner = key not in units
        units.setdefault(key, []).append(_choose(info, ctx, owner=owner))
    groups, peaks, kept = _pack(list(units.values()), ctx, infos)
    layers = {lp.name: lp for g in groups for lp in g}
    layers = {n: layers[n] for n in infos}
    return MemoryPlan(tokens, rows, cfg.ekfac, budgets, layers, [[lp.name for lp in g] for g in groups], peaks, kept)


def _pack(
    units: list[list[LayerPlan]], ctx: _Ctx, infos: dict[str, LayerInfo]
) -> tuple[list[list[LayerPlan]], list[dict[str, int]], dict[str, int]]:
    """Fill groups in model order; a unit that does not fit alone is split into single layers (module docstring)."""
    groups: list[list[LayerPlan]] = []
    peaks: list[dict[str, int]] = []
    kept: dict[str, int] = {}
    current: list[LayerPlan] = []

    def fits(layers: list[LayerPlan]) -> bool:
        return _fits(_peak(layers, ctx.workers, ctx.cfg.ekfac), kept, ctx.budgets)

    def close() -> None:
        if current:
            peak = _peak(current, ctx.workers, ctx.cfg.ekfac)
            peaks.append({d: kept.get(d, 0) + b for d, b in peak.items()})
            groups.append(list(current))
            for lp in current:
                for d, b in lp.total("result").items():
                    kept[d] = kept.get(d, 0) + b
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
            if not fits([lp]):
                raise _too_small(lp, ctx, kept)
            current.append(lp)
    close()
    return groups, peaks, kept


def _too_small(lp: LayerPlan, ctx: _Ctx, kept: dict[str, int]) -> MemoryBudgetError:
    need = _peak([lp], ctx.workers, ctx.cfg.ekfac)
    dev = next(d for d, b in need.items() if kept.get(d, 0) + b > ctx.budgets[d])
    part = {c: lp.total(c).get(dev, 0) for c in ("sums", "eigen", "workspace", "ekfac")}
    earlier = kept.get(dev, 0)
    return MemoryBudgetError(
        f"Layer {lp.name!r} (in {lp.a_dim:,}, out {lp.out:,}, G {lp.representation}) needs {need[dev]:,} bytes "
        f"({format_bytes(need[dev])}) on {dev}: sums {format_bytes(part['sums'])}, eigenbases "
        f"{format_bytes(part['eigen'])}, decomposition workspace {format_bytes(part['workspace'])}, EK-FAC sums "
        f"{format_bytes(part['ekfac'])}; max_memory there is {ctx.budgets[dev]:,} bytes "
        f"({format_bytes(ctx.budgets[dev])})"
        + (f", of which the factors kept from earlier layers take {format_bytes(earlier)}" if earlier else "")
        + ". Raise max_memory (--max-memory) or leave the layer out (exclude)."
    )
