"""The gradient the report preconditions: the mean-loss gradient over the analysed data, per tracked layer.

``∇_V L̄ = (1/N) Σ_t ĝ_t a_tᵀ`` with ``ĝ_t`` the output gradient of the *summed* loss and ``a_t = [x_t; 1]``
(docs/concepts.md): the data targets are used whatever the Fisher type, padded positions contribute nothing. It is built
from the layer's own input and output gradient, like the factors, so for a tied lm_head it is the gradient of the
output-layer use, which is the use the curvature describes (docs/concepts.md). The pass is one forward and one backward
per batch with the same hooks as collection (parameters stay frozen: no weight gradient is computed by autograd).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..collection.forward import model_device
from ..collection.hooks import BatchContext, Capture, Staged
from ..collection.passes import run_pass
from ..comm import all_reduce_tensors, is_distributed, unwrap_model
from ..config import KFACConfig
from ..layers import LayerInfo, discover_layers, split
from ..report import CollectionReport


class GradientProcessor:
    """Stages the rows ``a_t`` and ``ĝ_t`` of each layer call; commits ``Σ_t ĝ_t a_tᵀ`` (``[out, a_dim]``) in place.

    The sums are in the collection dtype (``accumulate_dtype``) and the product is formed at commit, layer by layer,
    straight into them: a batch never holds a second ``[out, a_dim]`` copy per layer.
    """

    def __init__(self, infos: dict[str, LayerInfo], dtype: torch.dtype = torch.float32) -> None:
        self.infos = infos
        self.dtype = dtype
        self.sums: dict[str, Tensor] = {}

    def stage(self, name: str, x: Tensor, g: Tensor, ctx: BatchContext, cache: dict[Any, Any]) -> Staged:
        """The attended rows of this layer call (input and output gradient; the scale goes in at commit)."""
        info = self.infos[name]
        a = ctx.select(x.detach(), info, "input")
        gr = ctx.select(g.detach(), info, "output gradient")
        return [(name, "a", a, None), (name, "g", gr, float(ctx.grad_scale))]

    def commit(self, staged: Staged) -> None:
        """Add ``s · ĝᵀ a`` (and ``s · Σ ĝ`` for a bias) of each checked layer call to its sum."""
        rows: Tensor | None = None
        for name, kind, tensor, scale in staged:
            if kind == "a":
                rows = tensor
                continue
            info = self.infos[name]
            total = self.sums.get(name)
            if total is None:
                total = self.sums[name] = torch.zeros(info.v_shape, dtype=self.dtype, device=tensor.device)
            a = rows.to(total.device, self.dtype)  # type: ignore[union-attr]
            gr = tensor.to(total.device, self.dtype)
            total[:, : a.shape[1]].addmm_(gr.t(), a, alpha=scale)
            if info.has_bias:
                total[:, -1].add_(gr.sum(0), alpha=scale)


@dataclass
class MeanGradient:
    """Result of :func:`mean_gradient`.

    Attributes:
        combined: ``∇_V L̄`` (``[out, a_dim]``, in the collection dtype ``accumulate_dtype``) by layer name.
        infos: the tracked layers (for :attr:`params`, the same split into parameter-shaped tensors).
        loss: mean loss ``L_sum / N`` over the data.
        loss_terms: ``N``.
        tokens: attended positions ``T``.

    """

    combined: dict[str, Tensor]
    infos: dict[str, LayerInfo]
    loss: float
    loss_terms: int
    tokens: int

    @property
    def params(self) -> dict[str, Tensor]:
        """``combined`` split into parameter-shaped tensors, by parameter name (weight and bias).

        Built on access, not kept: a layer with a bias has its weight copied out of ``[W | b]``, and the report
        holds one gradient per layer, not two (docs/cli.md).
        """
        params: dict[str, Tensor] = {}
        for name, v in self.combined.items():
            info = self.infos[name]
            w, b = split(info, v)
            params[info.weight_name] = w
            if b is not None and info.bias_name:
                params[info.bias_name] = b
        return params


def mean_gradient(
    model: nn.Module,
    batches: Iterable[Any],
    cfg: KFACConfig,
    *,
    on_batch: Callable[[int, dict[str, Tensor]], None] | None = None,
) -> MeanGradient:
    """Mean-loss gradient of every tracked layer over causal-LM ``batches`` (empirical targets).

    The same forward/backward as the K-FAC pass (:func:`~kronfisher.collection.passes.run_batch`) with a gradient
    processor in place of the factor collector. It holds one ``[out, a_dim]`` sum per tracked layer in
    ``cfg.accumulate_dtype`` and nothing else of that size: parameters are frozen for the pass (no ``.grad``, not
    even of a tied embedding), and the mean is taken in place. Under ``torchrun`` pass this rank's
    :class:`~kronfisher.distributed.Shard`: the sums and counts of every rank are added at the end, so every rank
    returns the gradient over all the data.

    Args:
        model: causal LM.
        batches: mappings with ``input_ids`` and optional ``attention_mask`` / ``labels``.
        cfg: supplies ``include`` / ``exclude`` and ``ignore_index``.
        on_batch: called after each batch with ``(index, batch)`` (progress bars).

    """
    model = unwrap_model(model)
    discovery = discover_layers(model, cfg.include, cfg.exclude)
    proc = GradientProcessor(discovery.infos, cfg.accumulate_torch_dtype)
    cap = Capture(discovery.modules, discovery.infos, proc, "raise")
    report = CollectionReport()
    data_targets = dataclasses.replace(cfg, fisher="empirical", mc_samples=1, ekfac=False)  # the data loss
    done = None if on_batch is None else (lambda k, _index, batch: on_batch(k - 1, batch))
    run_pass(model, batches, cap, data_targets, report, on_batch=done)
    _reduce(proc, discovery.infos, report, model_device(model))
    n_terms = report.loss_terms
    # the mean in place: one [out, a_dim] tensor per layer in the collection dtype, not a second copy of them all
    combined = {name: proc.sums[name].div_(max(n_terms, 1)) for name in discovery.infos if name in proc.sums}
    return MeanGradient(combined, discovery.infos, report.loss_sum / max(n_terms, 1), n_terms, report.tokens)


def _reduce(proc: GradientProcessor, infos: dict[str, LayerInfo], report: CollectionReport, device: Any) -> None:
    """Sum the gradient sums and the counts of every rank, in place (no-op on one process)."""
    if not is_distributed():
        return
    for name, info in infos.items():  # a rank on which a layer never fired contributes zeros
        if name not in proc.sums:
            proc.sums[name] = torch.zeros(info.v_shape, dtype=proc.dtype, device=device)
    scalars = torch.tensor(report.counts(), dtype=torch.float64)
    all_reduce_tensors([*(proc.sums[n] for n in infos), scalars])
    report.set_counts(scalars.tolist())
