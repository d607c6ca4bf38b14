"""The K-FAC collection processor: turns captured ``(x, ĝ)`` into factor contributions (docs/concepts.md).

``A`` and ``G`` go through the same staging code (:func:`~kronfisher.accumulate.gram` or low-rank rows).
Layers that read the same input tensor (q/k/v, gate/up) share one ``A`` contribution per batch: it is computed
once per distinct input tensor and committed into each layer's sum.

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
from ..algebra.gram import compute_dtype, gram
from ..config import KFACConfig
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
        if placement is None:
            return DenseSum(dim, dtype, where)
        return placement.allocate(info, factor, lambda d: DenseSum(dim, dtype, d), where)

    a = dense("A", info.a_dim)
    g: DenseSum | LowRankSum
    if is_lowrank(info, cfg, lowrank):  # on the device, or in host memory streamed through it (docs/gpu.md)
        where, residence = columns_placement(info, device, host_columns)
        k = cfg.lowrank_max_rank if lowrank is None else lowrank[info.name]
        g = LowRankSum(info.out_features, cfg.lowrank_torch_dtype, k, where, residence)
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
        sums: :class:`~kronfisher.accumulate.LayerSums` by layer name (plain data, handed to the algebra).

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
        info = self.infos[name]
        key = ("A", id(x), info.has_bias)
        hit = cache.get(key)
        if hit is not None:
            return hit

        def contribution(x: Tensor) -> tuple[Tensor, float]:
            rows = ctx.select(x, info, "input") if self.cfg.approx == "expand" else _sequence_means(x, ctx, info)
            return gram(rows, info.has_bias, self.cfg.accumulate_torch_dtype), float(rows.shape[0])

        out = self.placement.run(info, "A", contribution, x.detach())
        cache[key] = out
        return out

    def _G_contribution(self, g: Tensor, ctx: BatchContext, info: LayerInfo) -> Tensor:
        """``Σ ĝ ĝᵀ`` of a dense ``G``, or the rows ``ĝ`` of a low-rank one (cast where they are)."""
        if self.cfg.approx == "expand":
            rows = ctx.select(g, info, "output gradient")
        else:
            rows = ctx.masked(g, info, "output gradient").sum(dim=1)
        lowrank = self.sums[info.name].G
        if lowrank.kind == "dense":
            return gram(rows, False, self.cfg.accumulate_torch_dtype, scale=ctx.grad_scale)  # no scaled copy of ĝ
        # Scaled and cast to lowrank_dtype where the rows are (the device), before anything is copied.
        out = rows.to(compute_dtype(rows.dtype))
        if ctx.grad_scale != 1.0:
            out = out * ctx.grad_scale
        out = out.to(lowrank.storage_dtype)
        if out.untyped_storage().data_ptr() == g.untyped_storage().data_ptr():
            out = out.clone()  # never keep a view of autograd's gradient buffer in U
        return out

    def stage(self, name: str, x: Tensor, g: Tensor, ctx: BatchContext, cache: dict[Any, Any]) -> Staged:
        """Contributions of one layer call: ``A`` on the first backward of a forward, ``G`` on every one."""
        info = self.infos[name]
        staged: Staged = []
        if ctx.first_draw:
            a_sum, a_count = self._stage_A(name, x, ctx, cache)
            staged.append((name, "A", a_sum, a_count))
        contribution = self.placement.run(info, "G", lambda t: self._G_contribution(t, ctx, info), g.detach())
        part = self.sums[name].G
        if part.kind == "lowrank" and part.residence is not None and part.residence.streamed:
            if ctx.batch != self._pending_batch:  # copies of a batch that was never committed (dropped)
                self._pending, self._pending_batch = {}, ctx.batch
            if contribution.device == part.residence.work:  # U in host memory: copy down now, asynchronously
                self._pending[id(contribution)] = (contribution, download(contribution))
        staged.append((name, "G", contribution, float(ctx.num_terms)))
        return staged

    def commit(self, staged: Staged) -> None:
        """Add checked contributions to the sums."""
        seen_batches: set[str] = set()
        if self._pending:
            wait(next(iter(self._pending.values()))[0].device)  # done already: the non-finite check synchronised
        for name, target, tensor, count in staged:
            part = getattr(self.sums[name], target)
            if part.kind == "lowrank":
                self._add_columns(name, part, tensor, count)
            else:
                part.add(tensor, count)
            if target == "A" and name not in seen_batches:
                self.sums[name].batches += 1
                seen_batches.add(name)
        self._pending = {}

    def _add_columns(self, name: str, part: LowRankSum, rows: Tensor, count: float) -> None:
        """Append to ``U``; when it no longer fits on the device, move it to host memory (streamed) and retry."""
        hit = self._pending.get(id(rows))
        if hit is not None and hit[0] is rows:
            rows = hit[1]
        saved = (list(part.chunks), part.basis, part.count, part.tail_mass, part.discarded_mass)
        try:
            part.add(rows, count)
            return
        except torch.OutOfMemoryError as err:
            if part.residence is not None:
                raise
            where = part.device
            part.chunks, part.basis, part.count, part.tail_mass, part.discarded_mass = saved
            self.placement.columns_to_host(self.infos[name], where, err)  # re-raises on the host
        self._columns_to_host(part, where, streamed=True)
        part.add(rows, count)
