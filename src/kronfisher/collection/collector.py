"""The K-FAC collection processor: turns captured ``(x, ĝ)`` into factor contributions (docs/concepts.md).

``A`` and ``G`` go through the same code: the hooks stage rows (attended inputs, output gradients) and the commit
adds each layer's Gram into its sum, in place, layer by layer (or keeps the rows, see
:class:`~kronfisher.collection.sums.DenseSum`), so a batch never holds a second copy of the dense contributions.
Layers that read the same input tensor (q/k/v, gate/up) share one staged ``A`` per batch (and one stored copy when
the rows are kept).

The output-gradient rows of a low-rank layer are scaled and cast to ``lowrank_dtype`` where they are (the device)
and appended to ``U`` there; when the memory plan keeps ``U`` in host memory they are copied down asynchronously
while the backward goes on, and committed after the batch's one synchronising non-finite check
(:mod:`~kronfisher.collection.placement`, :mod:`kronfisher.transfer`).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Any

import torch
from torch import Tensor

from ..algebra.columns import Residence
from ..algebra.eigen import all_finite
from ..algebra.gram import compute_dtype
from ..config import KFACConfig
from ..footprint import ROWS_RATIO
from ..layers import LayerInfo
from ..transfer import download, wait
from .hooks import BatchContext, Staged
from .placement import Placement, columns_placement, move_sum_to_cpu, sum_device
from .sums import DenseSum, LayerSums, LowRankSum


def is_lowrank(info: LayerInfo, cfg: KFACConfig, lowrank: Mapping[str, int | None] | None = None) -> bool:
    """Whether ``G`` of this layer is kept low-rank (docs/concepts.md).

    ``lowrank``: the memory plan's choice (:meth:`~kronfisher.plan.MemoryPlan.lowrank`, layer → token budget);
    without it, ``out > lowrank_threshold`` or named by ``lowrank_layers``.
    """
    if lowrank is not None:
        return info.name in lowrank
    if info.out_features > cfg.lowrank_threshold:
        return True
    return any(re.search(p, info.name) for p in cfg.lowrank_layers)


def new_layer_sums(
    info: LayerInfo,
    cfg: KFACConfig,
    device: torch.device | str = "cpu",
    placement: Placement | None = None,
    host_columns: Collection[str] = (),
    lowrank: Mapping[str, int | None] | None = None,
) -> LayerSums:
    """Empty sums for one layer, with the representation the plan (``lowrank``, see :func:`is_lowrank`) selects.

    With ``placement``, a dense sum that does not fit on the accelerator (a real out-of-memory error) is allocated
    on CPU and that factor's work runs on CPU from then on (docs/gpu.md). A low-rank ``U`` is kept on ``device`` unless
    the layer is in ``host_columns`` (:func:`~kronfisher.collection.placement.columns_placement`).
    """
    dtype = cfg.accumulate_torch_dtype

    def dense(factor: str, dim: int) -> DenseSum:
        where = sum_device(factor, False, device)
        label = f"factor {factor} of layer {info.name!r} (in={info.in_features}, out={info.out_features})"
        rows = int(ROWS_RATIO * dim)  # kept as rows while T ≤ ρ d: decomposed from the [T, T] Gram

        def make(d: torch.device) -> DenseSum:
            return DenseSum(dim, dtype, d, max_rows=rows, label=label)

        return make(where) if placement is None else placement.allocate(info, factor, make, where)

    a = dense("A", info.a_dim)
    g: DenseSum | LowRankSum
    if is_lowrank(info, cfg, lowrank):  # on the device, or in host memory streamed through it (docs/gpu.md)
        where, residence = columns_placement(info, device, host_columns)
        k = cfg.lowrank_max_rank if lowrank is None else lowrank[info.name]
        gram = cfg.eigh_torch_dtype if k is None or 2 * k <= cfg.eigh_max_dim else torch.float32  # [T, T] work
        g = LowRankSum(info.out_features, cfg.lowrank_torch_dtype, k, where, residence, gram_dtype=gram)
    else:
        g = dense("G", info.out_features)
    return LayerSums(A=a, G=g)


def _sequence_means(x: Tensor, ctx: BatchContext, info: LayerInfo) -> Tensor:
    """Per-sequence mean of attended rows (KFAC-reduce), empty sequences dropped."""
    xm = ctx.masked(x, info, "input")
    if ctx.mask is None:
        return xm.mean(dim=1)
    counts = ctx.mask.sum(dim=1)
    keep = counts > 0
    return xm[keep].sum(dim=1) / counts[keep].unsqueeze(1).to(xm.dtype)


class FactorCollector:
    """Stages and commits ``A`` / ``G`` contributions for every tracked layer.

    Attributes:
        sums: :class:`~kronfisher.collection.sums.LayerSums` by layer name (plain data, handed to the algebra).

    """

    def __init__(
        self,
        infos: dict[str, LayerInfo],
        cfg: KFACConfig,
        device: torch.device | str = "cpu",
        host_columns: Collection[str] = (),
        lowrank: Mapping[str, int | None] | None = None,
    ) -> None:
        """``host_columns``: low-rank layers whose ``U`` stays in host memory; ``lowrank``: see :func:`is_lowrank`."""
        self.infos = infos
        self.cfg = cfg
        self.sums: dict[str, LayerSums] = {}
        # a real OOM on the accelerator moves that factor's work (and its sum) to CPU, with a warning.
        self.placement = Placement(on_fallback=self._move_to_cpu)
        self._pending: dict[int, tuple[Tensor, Tensor]] = {}  # id(device rows) -> (device rows, host copy)
        self._pending_batch = -1
        for name, info in infos.items():
            self.sums[name] = new_layer_sums(info, cfg, device, self.placement, host_columns, lowrank)

    def _move_to_cpu(self, layer: str, factor: str) -> None:
        if layer not in self.sums:  # not yet when the sum's own allocation failed (it is then made on CPU)
            return
        part = getattr(self.sums[layer], factor)
        if part.kind == "lowrank":
            self._columns_to_host(part, torch.device("cpu"), streamed=False)
        else:
            move_sum_to_cpu(self.sums[layer], factor)

    @staticmethod
    def _columns_to_host(part: LowRankSum, work: torch.device, streamed: bool) -> None:
        """Move ``U`` to host memory; its products run on ``work`` (``streamed``: blocks copied there)."""
        if part.residence is not None:
            return
        where = part.device
        part.chunks = [download(c) for c in part.chunks]
        if part.basis is not None:
            part.basis = download(part.basis.t()).t()
        wait(where)  # the host reads these chunks from now on
        part.device = torch.device("cpu")
        part.residence = Residence(work, streamed=streamed)

    def _stage_A(self, name: str, x: Tensor, ctx: BatchContext, cache: dict[Any, Any]) -> tuple[Tensor, float]:
        """The rows of ``A`` (attended inputs, or sequence means), once per distinct input tensor (q/k/v share)."""
        info = self.infos[name]
        key = ("A", id(x))
        hit = cache.get(key)
        if hit is not None:
            return hit

        def rows_of(x: Tensor) -> Tensor:
            rows = ctx.select(x, info, "input") if self.cfg.approx == "expand" else _sequence_means(x, ctx, info)
            return rows.to(compute_dtype(rows.dtype))

        rows = self.placement.run(info, "A", rows_of, x.detach())
        out = cache[key] = (rows, float(rows.shape[0]))
        return out

    def _G_contribution(self, g: Tensor, ctx: BatchContext, info: LayerInfo) -> Tensor:
        """The rows ``ĝ`` of ``G``.

        Unscaled for a dense ``G`` (the scale enters its Gram at commit as ``alpha = s²``); scaled and cast to
        ``lowrank_dtype`` where they are for a low-rank one.
        """
        if self.cfg.approx == "expand":
            rows = ctx.select(g, info, "output gradient")
        else:
            rows = ctx.masked(g, info, "output gradient").sum(dim=1)
        lowrank = self.sums[info.name].G
        if lowrank.kind == "dense":
            return rows.to(compute_dtype(rows.dtype))
        # Scaled and cast to lowrank_dtype where the rows are (the device), before anything is copied.
        out = rows.to(compute_dtype(rows.dtype))
        if ctx.grad_scale != 1.0:
            out = out * ctx.grad_scale
        out = out.to(lowrank.storage_dtype)
        if out.untyped_storage().data_ptr() == g.untyped_storage().data_ptr():
            out = out.clone()  # never keep a view of autograd's gradient buffer in U
        return out

    def stage(self, name: str, x: Tensor, g: Tensor, ctx: BatchContext, cache: dict[Any, Any]) -> Staged:
        """Rows of one layer call: ``A``'s on the first backward of a forward, ``G``'s on every one."""
        info = self.infos[name]
        staged: Staged = []
        if ctx.first_draw:
            a_rows, a_count = self._stage_A(name, x, ctx, cache)
            staged.append((name, "A", a_rows, (a_count, 1.0)))
        contribution = self.placement.run(info, "G", lambda t: self._G_contribution(t, ctx, info), g.detach())
        part = self.sums[name].G
        if part.kind == "lowrank" and part.residence is not None and part.residence.streamed:
            if ctx.batch != self._pending_batch:  # copies of a batch that was never committed (dropped)
                self._pending, self._pending_batch = {}, ctx.batch
            if contribution.device == part.residence.work:  # U in host memory: copy down now, asynchronously
                self._pending[id(contribution)] = (contribution, download(contribution))
        staged.append((name, "G", contribution, (float(ctx.num_terms), float(ctx.grad_scale))))
        return staged

    def check(self, entry: tuple[str, str, Tensor, Any]) -> Tensor:
        """0-d bool: the staged rows are finite and their Gram cannot overflow the sum's dtype (no host sync).

        ``|Σ_t a_t a_tᵀ| ≤ n · s² · max|a|²``, so this keeps a batch whose contribution would not be finite out of
        the sums, as a check of the Gram itself would.
        """
        rows, (_, scale) = entry[2], entry[3]
        if rows.numel() == 0:
            return all_finite(rows)
        lo, hi = torch.aminmax(rows)
        big = torch.maximum(hi, -lo).to(torch.float64)
        limit = torch.finfo(self.cfg.accumulate_torch_dtype).max / max(rows.shape[0] * scale * scale, 1e-300)
        return torch.isfinite(lo) & torch.isfinite(hi) & (big * big < limit)

    def commit(self, staged: Staged) -> None:
        """Add checked rows to the sums, layer by layer (dense: Gram into the sum in place, or kept as rows)."""
        seen_batches: set[str] = set()
        if self._pending:
            wait(next(iter(self._pending.values()))[0].device)  # done already: the non-finite check synchronised
        prepared: dict[Any, Tensor] = {}  # one stored copy of rows shared by several sums (q/k/v, gate/up)
        for name, target, rows, (count, scale) in staged:
            part = getattr(self.sums[name], target)
            if part.kind == "lowrank":
                self._add_columns(name, part, rows, count)
            else:
                augment = target == "A" and self.infos[name].has_bias
                part.add_rows(rows, count, augment=augment, scale=scale, prepared=prepared)
            if target == "A" and name not in seen_batches:
                self.sums[name].batches += 1
                seen_batches.add(name)
        self._pending = {}

    def _add_columns(self, name: str, part: LowRankSum, rows: Tensor, count: float) -> None:
        """Append to ``U``; when it no longer fits on the device, move it to host memory (streamed) and retry."""
        hit = self._pending.get(id(rows))
        if hit is not None and hit[0] is rows:
            rows = hit[1]
        saved = (list(part.chunks), part.basis, part.basis_sq, part.count, part.tail_mass, part.discarded_mass)
        try:
            part.add(rows, count)
            return
        except torch.OutOfMemoryError as err:
            if part.residence is not None:
                raise
            where = part.device
            part.chunks, part.basis, part.basis_sq, part.count, part.tail_mass, part.discarded_mass = saved
            self.placement.columns_to_host(self.infos[name], where, err)  # re-raises on the host
        self._columns_to_host(part, where, streamed=True)
        part.add(rows, count)
