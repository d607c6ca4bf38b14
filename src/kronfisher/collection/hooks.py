"""Hooks as a context manager (docs/concepts.md): inputs on forward, output gradients via a tensor hook.

The capture owns the hooks and the per-batch context (mask, gradient scale, counts). What to do with an
``(x, ĝ)`` pair is the job of a *processor* (the K-FAC collector, the EK-FAC corrector): it stages tensors, the
capture checks every staged tensor for non-finite values with one host sync per batch, and only then lets the
processor commit them (docs/concepts.md). Hooks are removed on exit, also when user code raises.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ..algebra.eigen import all_finite
from ..errors import ConfigError, NonFiniteError, ShapeError
from ..layers import LayerInfo

logger = logging.getLogger("kronfisher")


@dataclass
class BatchContext:
    """What hooks need to know about the current backward pass.

    Attributes:
        batch: index of the batch (for messages).
        mask: ``[B, S]`` boolean attention mask or None (all positions attended).
        rows: flat indices of attended positions (None: all).
        grad_scale: factor turning captured gradients into gradients of the summed loss ``L_sum``.
        num_terms: loss terms ``N`` of this backward.
        first_draw: True for the first backward after a forward (A is staged once per forward).

    """

    batch: int
    mask: Tensor | None
    rows: Tensor | None
    grad_scale: float
    num_terms: int
    first_draw: bool

    def select(self, t: Tensor, info: LayerInfo, what: str) -> Tensor:
        """Rows of ``t`` (``[..., d]``) at attended positions, as ``[T, d]``."""
        flat = t.reshape(-1, t.shape[-1])
        if self.mask is None:
            return flat
        if tuple(t.shape[:-1]) != tuple(self.mask.shape):
            raise ShapeError(
                f"Layer {info.name!r}: {what} of shape {list(t.shape)} does not match the attention mask "
                f"{list(self.mask.shape)}; pass attention_mask=None for layers that do not see [batch, seq]."
            )
        return flat.index_select(0, self.rows.to(flat.device))  # type: ignore[union-attr]  # CPU fallback after an OOM

    def masked(self, t: Tensor, info: LayerInfo, what: str) -> Tensor:
        """``t`` as ``[B, S, d]`` with non-attended positions zeroed (sequence view: reduce and EK-FAC)."""
        if t.dim() == 2:
            t = t.unsqueeze(1)
        if t.dim() != 3:
            t = t.reshape(t.shape[0], -1, t.shape[-1])
        if self.mask is None:
            return t
        if tuple(t.shape[:-1]) != tuple(self.mask.shape):
            raise ShapeError(
                f"Layer {info.name!r}: {what} of shape {list(t.shape)} does not match the attention mask "
                f"{list(self.mask.shape)}."
            )
        return t * self.mask.unsqueeze(-1).to(t.device, t.dtype)


Staged = list[tuple[str, str, Tensor, Any]]  # (layer, target, tensor, what the processor's commit needs)


class Processor(Protocol):
    """What a pass does with captured ``(x, ĝ)`` pairs."""

    def stage(self, name: str, x: Tensor, g: Tensor, ctx: BatchContext, cache: dict[Any, Any]) -> Staged:
        """Compute the contributions of one layer call; nothing is committed yet."""
        ...

    def commit(self, staged: Staged) -> None:
        """Add checked contributions to the sums."""
        ...


def _check(processor: Processor, entry: tuple[str, str, Tensor, Any]) -> Tensor:
    """0-d bool: the processor's own check of a staged entry (``check``), or that its tensor is finite."""
    check = getattr(processor, "check", None)
    return check(entry) if check is not None else all_finite(entry[2])


class Capture:
    """Forward/backward hooks on the tracked layers, driven one backward at a time.

    Use :func:`kronfisher.capture` (user loop) or :func:`kronfisher.fit`; both drive this class.
    """

    def __init__(
        self,
        modules: dict[str, nn.Module],
        infos: dict[str, LayerInfo],
        processor: Processor,
        on_nonfinite: str = "raise",
    ) -> None:
        self.modules = modules
        self.infos = infos
        self.processor = processor
        self.on_nonfinite = on_nonfinite
        self.fired: set[str] = set()
        self.nonfinite_batches: list[tuple[int, list[str]]] = []
        self._handles: list[Any] = []
        self._inputs: dict[str, list[Tensor]] = {}
        self._staged: Staged = []
        self._cache: dict[Any, Any] = {}
        self._ctx: BatchContext | None = None
        self._forward_done = True  # the next forward hook starts a new batch
        self._first_draw = True
        self._error: BaseException | None = None

    # Hook management ------------------------------------------------------------------------------------
    def __enter__(self) -> Capture:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._make_forward_hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook and drop references to activations."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._inputs.clear()
        self._staged.clear()
        self._cache.clear()

    def _make_forward_hook(self, name: str) -> Any:
        info = self.infos[name]

        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            if not isinstance(output, Tensor) or not (torch.is_grad_enabled() and output.requires_grad):
                return
            if self._forward_done:  # first hooked call of a new forward pass
                self._inputs = {}
                self._cache = {}
                self._forward_done = False
                self._first_draw = True
            x = inputs[0]
            if x.shape[-1] != info.in_features:
                raise ShapeError(f"Layer {name!r}: input last dim {x.shape[-1]} != in_features {info.in_features}.")
            calls = self._inputs.setdefault(name, [])
            calls.append(x)
            output.register_hook(self._make_grad_hook(name, len(calls) - 1))

        return hook

    def _make_grad_hook(self, name: str, call: int) -> Any:
        def hook(g: Tensor) -> None:
            ctx = self._ctx
            if ctx is None or self._error is not None:
                return
            try:
                x = self._inputs[name][call]
                self.fired.add(name)
                self._staged.extend(self.processor.stage(name, x, g, ctx, self._cache))
            except BaseException as err:  # surfaced after backward returns, with the layer's name
                self._error = err

        return hook

    # Driving --------------------------------------------------------------------------------------------
    def backward(
        self,
        loss: Tensor,
        *,
        batch: int,
        grad_scale: float,
        num_terms: int,
        attention_mask: Tensor | None = None,
        retain_graph: bool = False,
        inputs: list[Tensor] | None = None,
    ) -> None:
        """Run one backward of ``loss`` with the hooks staging contributions (nothing committed yet)."""
        mask = None
        rows = None
        if attention_mask is not None:
            mask = attention_mask.to(torch.bool)
            rows = mask.reshape(-1).nonzero().squeeze(1)
        self._ctx = BatchContext(batch, mask, rows, float(grad_scale), int(num_terms), self._first_draw)
        self._error = None
        try:
            if inputs:
                torch.autograd.backward(loss, retain_graph=retain_graph, inputs=inputs)
            else:
                loss.backward(retain_graph=retain_graph)
        finally:
            self._ctx = None
        self._first_draw = False
        if self._error is not None:
            err, self._error = self._error, None
            self._staged.clear()
            raise err

    def commit(self, batch: int) -> bool:
        """Check every staged tensor for non-finite values (one host sync), then commit or drop them.

        Returns:
            True when the batch was committed; False when it was dropped (``on_nonfinite="skip"``).

        Raises:
            NonFiniteError: non-finite values with ``on_nonfinite="raise"``; the sums are unchanged.

        """
        staged, self._staged = self._staged, []
        self._forward_done = True
        self._inputs = {}
        self._cache = {}
        if not staged:
            return True
        dev = staged[0][2].device  # staged tensors may sit on CPU and on the accelerator
        flags = torch.stack([_check(self.processor, entry).to(dev) for entry in staged])
        if bool(flags.all()):
            self.processor.commit(staged)
            return True
        bad = sorted({staged[i][0] for i in (~flags).nonzero().flatten().tolist()})
        if self.on_nonfinite == "raise":
            raise NonFiniteError(
                f"Non-finite activations or output gradients in batch {batch} for layers {bad}; "
                "nothing from this batch was accumulated (set on_nonfinite='skip' to drop such batches).",
                layers=bad,
                batch=batch,
            )
        if self.on_nonfinite != "skip":
            raise ConfigError(f"Invalid on_nonfinite: {self.on_nonfinite!r}. Supported: 'raise', 'skip'.")
        logger.warning("Batch %d dropped: non-finite values in layers %s", batch, bad)
        self.nonfinite_batches.append((batch, bad))
        return False

    def discard(self) -> None:
        """Drop staged contributions (e.g. an empty batch)."""
        self._staged = []
        self._forward_done = True
        self._inputs = {}
        self._cache = {}
