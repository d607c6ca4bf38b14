"""What one layer needs in memory, component by component, and the peak of a group of layers (docs/concepts.md).

The byte model behind the memory plan (:mod:`kronfisher.plan`): per factor side and device, the sums, the staged
contribution of a batch, the eigenbases, the decomposition workspace, the EK-FAC sums and what the operator keeps.
**G** dense: ``out²`` twice, an ``out³`` eigh (~32 ``out²`` bytes of workspace), ``out² T`` to accumulate,
``2 out² T`` in EK-FAC. Exact low-rank: ``out T + T²``, an ``out T²`` Gram and a ``T³`` eigh (~40 ``T²`` bytes),
``2 (out T + T²) T`` in EK-FAC.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .config import KFACConfig
from .layers import LayerInfo

EIGH_FLOPS = 32.0  # an eigh with vectors of n costs ~32 n³ GEMM flops (LAPACK syevd measured against GEMM on CPU)
GRAM_WORK = 40  # bytes per m² while a [m, m] float64 Gram is decomposed (Gram, eigh copy, vectors, workspace)
ROWS_RATIO = 0.5  # a dense factor is held as rows while T <= ROWS_RATIO * d (benchmarks/bench_rank.py)
COMPONENTS = (
    "sums",
    "columns",
    "staging",
    "transient",
    "eigen",
    "workspace",
    "ekfac",
    "ekfac_staging",
    "ekfac_transient",
    "result",
)


def rows_route_pays(rows: int, dim: int, ratio: float = ROWS_RATIO) -> bool:
    """Whether a factor of dimension ``dim`` seen on ``rows`` rows is decomposed from its ``[T, T]`` Gram."""
    return 0 < rows <= ratio * dim


def size_of(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


@dataclass
class Side:
    """What one factor side of a layer needs on one device (bytes per component, see :data:`COMPONENTS`)."""

    device: str
    bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COMPONENTS, 0))


@dataclass
class LayerPlan:
    """The plan of one layer.

    Attributes:
        name, a_dim, out: the layer, the dimension of ``A``, the output dimension.
        representation, max_rank, columns, reason: ``G`` is ``"dense"`` or ``"lowrank"`` with token budget ``k``
            (None: exact) and ``columns`` held at the peak, and why.
        unit, owner: key of the layers sharing this layer's input (and ``A``); whether this one decomposes it.
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
        keys = ("representation", "max_rank", "columns", "reason", "unit", "flops")
        sizes = {c: {d: b for d, b in self.total(c).items() if b} for c in COMPONENTS}
        return {**{k: getattr(self, k) for k in keys}, "bytes": {c: v for c, v in sizes.items() if v}}


def dense_side(
    dim: int,
    cfg: KFACConfig,
    device: str,
    owner: bool,
    rows: int,
    tokens: int | None = None,
    *,
    thin: bool = False,
    square: bool = False,
) -> Side:
    """A dense factor of dimension ``dim`` (``owner``: this layer decomposes it) with batches of ``rows`` tokens.

    With ``tokens`` known and at most ``ROWS_RATIO · dim``, the factor is held as its rows and decomposed from
    their ``[T, T]`` Gram (:func:`~kronfisher.algebra.lowrank.eigen_from_rows`): ``T · d`` bytes of sums, and a
    workspace of the ``[T, T]`` eigh, then of the thin basis and its completion (``[d, T]`` and ``[d, d]``; in
    float32 above ``eigh_max_dim``, like a dense eigh of that size). ``thin``: such a factor keeps a thin
    ``[d, T]`` basis (an ``A``), and with EK-FAC the coordinates of its rows in that basis until the EK-FAC pass ends
    (:class:`~kronfisher.algebra.eigen.SeenRows`); ``square``: this layer's block needs it square all the same (its
    ``G`` is thin), a completed copy of its own.
    """
    acc = size_of(cfg.accumulate_torch_dtype)
    eigh64 = dim <= cfg.eigh_max_dim and cfg.eigh_dtype == "float64"
    side = Side(device)
    by_rows = tokens is not None and rows_route_pays(tokens, dim)
    side.bytes["sums"] = tokens * dim * 4 if by_rows and tokens is not None else dim * dim * acc
    side.bytes["staging"] = rows * dim * 4  # the batch's rows; the commit adds their Gram into the sum in place
    side.bytes["transient"] = dim * dim * acc if acc != 4 and not by_rows else 0  # float64 sums of float32 rows
    if owner:
        side.bytes["eigen"] = (dim * dim + dim) * acc
        side.bytes["workspace"] = dim * dim * (32 if eigh64 else 24)  # float64 mean + eigh copy, vectors, work
        if by_rows and tokens is not None:  # the rows and [T, T] eigh, then thin basis, its R and the square Q
            t = tokens
            work = 8 if t <= cfg.eigh_max_dim and cfg.eigh_dtype == "float64" else 4  # the [T, T] eigh's dtype
            basis = work if dim <= cfg.eigh_max_dim else 4  # the completion's dtype
            qr = (2 * t * dim + t * t if thin else 2 * t * dim + dim * dim) * basis  # thin: Q [d, T] and R [T, T]
            side.bytes["workspace"] = max(t * dim * work + GRAM_WORK * t * t, t * dim * (work + basis), qr)
    seen = 0
    if by_rows and tokens is not None:
        if owner and thin:
            side.bytes["eigen"] = (tokens * dim + tokens) * acc
            if cfg.ekfac and not square:  # the rows' coordinates [T, s] and 8 float64 fingerprints, for EK-FAC
                seen = tokens * min(tokens, dim) * acc + tokens * 8 * 8
        if thin and square:  # KronBlock has one thin side at most: this layer's A is completed (Eigen.completed)
            side.bytes["eigen"] += (dim * dim + dim) * acc
    side.bytes["result"] = side.bytes["eigen"]
    side.bytes["eigen"] += seen  # held from the decomposition to the end of the EK-FAC pass, not kept after it
    side.bytes["ekfac_staging"] += seen
    return side


def lowrank_side(out: int, m: int, r: int, cfg: KFACConfig, device: str, rows: int, budget: bool) -> Side:
    """A low-rank ``G``: ``m`` columns of height ``out`` held, rank ``r`` kept, compressed when ``budget``."""
    lr = size_of(cfg.lowrank_torch_dtype)
    work = 8 if cfg.accumulate_dtype == "float64" else 4
    side = Side(device)
    side.bytes["sums"] = side.bytes["columns"] = out * m * lr
    side.bytes["staging"] = rows * out * (4 + lr)  # the batch's rows, scaled and cast
    side.bytes["transient"] = GRAM_WORK * m * m if budget else 0  # a compression, one layer at a time
    side.bytes["eigen"] = (m * r + r) * work  # C [m, r] and λ; U itself is the sum, kept by the eigenbasis
    side.bytes["workspace"] = GRAM_WORK * m * m
    side.bytes["result"] = side.bytes["eigen"] + side.bytes["sums"]
    return side


def g_flops(out: int, a: int, t: int, m: int, ekfac: bool) -> tuple[float, float]:
    """(dense, low-rank) flops of ``G`` over a run of ``t`` tokens with ``m`` low-rank columns (docstring)."""
    dense = out * out * t + EIGH_FLOPS * out**3 + (2.0 * out * out * t + 2.0 * out * a * t if ekfac else 0.0)
    low = out * m * m + EIGH_FLOPS * m**3 + (2.0 * (out * m + m * m) * t + 2.0 * m * a * t if ekfac else 0.0)
    return float(dense), float(low)


def unit_key(info: LayerInfo) -> str:
    """Layers of one parent module with the same input width read the same input (q/k/v, gate/up)."""
    return f"{info.name.rsplit('.', 1)[0] if '.' in info.name else ''}|{info.a_dim}"


def group_peak(layers: list[LayerPlan], workers: int, ekfac: bool, keep_sums: bool = False) -> dict[str, int]:
    """Peak bytes per device of one group's passes (module docstring); ``keep_sums``: dense sums kept to the end."""
    devices = {s.device for lp in layers for s in lp.sides.values()}
    out = {}
    for dev in devices:
        sides = [s for lp in layers for s in lp.sides.values() if s.device == dev]

        def tot(c: str, sides: list[Side] = sides) -> int:
            return sum(s.bytes[c] for s in sides)

        def top(c: str, k: int, sides: list[Side] = sides) -> int:
            return sum(sorted((s.bytes[c] for s in sides), reverse=True)[:k])

        # a batch's rows are staged, checked, then committed layer by layer (one commit's temporary at a time)
        collect = tot("sums") + tot("staging") + top("transient", 1)
        if keep_sums:
            decompose = tot("sums") + tot("eigen") + top("workspace", workers)
        else:  # each dense sum is freed as its decomposition ends: a side holds its sum or its eigenbasis, both
            # only while one of the ``workers`` decomposes it (decompose_local(release=True))
            dense = [s for s in sides if not s.bytes["columns"]]
            decompose = tot("columns") + sum(max(s.bytes["sums"], s.bytes["eigen"]) for s in dense)
            decompose += sum(
                sorted((min(s.bytes["sums"], s.bytes["eigen"]) + s.bytes["workspace"] for s in dense), reverse=True)[
                    :workers
                ]
            )
            decompose = max(decompose, tot("sums") + top("workspace", workers))  # low-rank: columns, Gram, eigh
        kept = tot("result") + (tot("sums") - tot("columns") if keep_sums else 0)
        # the EK-FAC sums are part of the result (divided in place into the corrected eigenvalues at the end)
        correct = kept + tot("ekfac_staging") + top("ekfac_transient", 1) if ekfac else 0
        out[dev] = max(collect, decompose, correct)
    return out
