"""The K-FAC collection processor: turns captured ``(x, ĝ)`` into factor contributions (docs/concepts.md).

``A`` and ``G`` go through the same staging code (:func:`~kronfisher.accumulate.gram` or low-rank rows).
Layers that read the same input tensor (q/k/v, gate/up) share one ``A`` contribution per batch: it is computed
once per distinct input tensor and committed into each layer's sum.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from ..algebra.gram import compute_dtype, gram
from ..config import KFACConfig
from ..layers import LayerInfo
from .hooks import BatchContext, Staged
from .placement import Placement, move_sum_to_cpu, sum_device
from .sums import DenseSum, LayerSums, LowRankSum


def is_lowrank(info: LayerInfo, cfg: KFACConfig) -> bool:
    """Whether ``G`` of this layer is kept low-rank (docs/concepts.md): ``out > lowrank_threshold`` or named."""
    if info.out_features > cfg.lowrank_threshold:
        return True
    return any(re.search(p, info.name) for p in cfg.lowrank_layers)


def new_layer_sums(
    info: LayerInfo, cfg: KFACConfig, device: torch.device | str = "cpu", placement: Placement | None = None
) -> LayerSums:
    """Empty sums for one layer, with the representation the config selects.

    With ``placement``, a dense sum that does not fit on the accelerator (a real out-of-memory error) is allocated
    on CPU and that factor's work runs on CPU from then on (docs/concepts.md).
    """
    dtype = cfg.accumulate_torch_dtype

    def dense(factor: str, dim: int) -> DenseSum:
        where = sum_device(factor, False, device)
        if placement is None:
            return DenseSum(dim, dtype, where)
        return placement.allocate(info, factor, lambda d: DenseSum(dim, dtype, d), where)

    a = dense("A", info.a_dim)
    g: DenseSum | LowRankSum
    if is_lowrank(info, cfg):  # the G side of huge layers lives on CPU
        g = LowRankSum(info.out_features, cfg.lowrank_torch_dtype, cfg.lowrank_max_rank, sum_device("G", True, device))
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

    def __init__(self, infos: dict[str, LayerInfo], cfg: KFACConfig, device: torch.device | str = "cpu") -> None:
        self.infos = infos
        self.cfg = cfg
        self.sums: dict[str, LayerSums] = {}
        # a real OOM on the accelerator moves that factor's work (and its sum) to CPU, with a warning.
        self.placement = Placement(on_fallback=self._move_to_cpu)
        for name, info in infos.items():
            self.sums[name] = new_layer_sums(info, cfg, device, self.placement)

    def _move_to_cpu(self, layer: str, factor: str) -> None:
        if layer in self.sums:  # not yet when the sum's own allocation failed (it is then made on CPU)
            move_sum_to_cpu(self.sums[layer], factor)

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
        """``Σ ĝ ĝᵀ`` of a dense ``G``, or the rows ``ĝ`` of a low-rank one (moved to CPU first)."""
        if self.cfg.approx == "expand":
            rows = ctx.select(g, info, "output gradient")
        else:
            rows = ctx.masked(g, info, "output gradient").sum(dim=1)
        lowrank = self.sums[info.name].G
        if isinstance(lowrank, LowRankSum):
            rows = rows.to(lowrank.device)
        rows = rows.to(compute_dtype(rows.dtype))
        if isinstance(lowrank, LowRankSum):
            if ctx.grad_scale != 1.0:
                rows = rows * ctx.grad_scale
            return rows.to(lowrank.storage_dtype)
        return gram(rows, False, self.cfg.accumulate_torch_dtype, scale=ctx.grad_scale)  # no scaled copy of ĝ

    def stage(self, name: str, x: Tensor, g: Tensor, ctx: BatchContext, cache: dict[Any, Any]) -> Staged:
        """Contributions of one layer call: ``A`` on the first backward of a forward, ``G`` on every one."""
        info = self.infos[name]
        staged: Staged = []
        if ctx.first_draw:
            a_sum, a_count = self._stage_A(name, x, ctx, cache)
            staged.append((name, "A", a_sum, a_count))
        contribution = self.placement.run(info, "G", lambda t: self._G_contribution(t, ctx, info), g.detach())
        staged.append((name, "G", contribution, float(ctx.num_terms)))
        return staged

    def commit(self, staged: Staged) -> None:
        """Add checked contributions to the sums."""
        seen_batches: set[str] = set()
        for name, target, tensor, count in staged:
            getattr(self.sums[name], target).add(tensor, count)
            if target == "A" and name not in seen_batches:
                self.sums[name].batches += 1
                seen_batches.add(name)
