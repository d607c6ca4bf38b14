"""Where each factor's work runs, and the CPU fallback after a real out-of-memory error (docs/concepts.md).

On an accelerator, ``A`` (``in × in``) is accumulated on the device, and so is a dense ``G``; the ``G`` side of huge
(low-rank) layers lives on CPU (:func:`sum_device`): the output-gradient rows leave the device once per batch and
every product with ``U`` runs where ``U`` is.

A real ``torch.OutOfMemoryError`` raised by a factor's work on the accelerator (never an estimate of what would fit)
moves that factor of that layer to CPU for the rest of the pass: the work is rerun on CPU copies of its inputs and
every later batch does the same, with one :class:`~kronfisher.errors.PlacementWarning` naming the layer, ``in``,
``out`` and the factor. Results are identical: the same arithmetic in the same dtype, on another device (the
message names both dimensions, and nothing is staged on the device before the decision).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

from ..errors import PlacementWarning
from ..layers import LayerInfo

logger = logging.getLogger("kronfisher")


R = TypeVar("R")


def is_accelerator(device: torch.device | str) -> bool:
    """True for a device whose memory can run out independently of the host (cuda, mps, xpu, ...)."""
    return torch.device(device).type not in ("cpu", "meta")


def sum_device(factor: str, lowrank: bool, device: torch.device | str) -> torch.device:
    """Where a factor's sum lives: CPU for the ``G`` of a low-rank layer, ``device`` (the model's) otherwise."""
    return torch.device("cpu") if factor == "G" and lowrank else torch.device(device)


def _free_cached(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Placement:
    """Runs factor work where it is placed and moves a factor to CPU after a real out-of-memory error.

    Attributes:
        on_cpu: ``(layer, factor)`` pairs moved to CPU by an out-of-memory error.
        messages: the warnings issued (for :attr:`~kronfisher.accumulate.CollectionReport.warnings`).

    """

    def __init__(self, on_fallback: Callable[[str, str], None] | None = None) -> None:
        """Args: on_fallback: called with ``(layer, factor)`` once a factor moves to CPU (e.g. to move its sum)."""
        self.on_cpu: set[tuple[str, str]] = set()
        self.messages: list[str] = []
        self._on_fallback = on_fallback

    def run(self, info: LayerInfo, factor: str, fn: Callable[..., R], *tensors: Tensor) -> R:
        """``fn(*tensors)`` where the tensors are; on an accelerator OOM, again on CPU copies (and from then on).

        Raises:
            torch.OutOfMemoryError: out of memory with every input already on CPU (nothing to fall back to).

        """
        key = (info.name, factor)
        if key not in self.on_cpu:
            try:
                return fn(*tensors)
            except torch.OutOfMemoryError as err:
                where = next((t.device for t in tensors if is_accelerator(t.device)), None)
                if where is None:
                    raise
                self._fall_back(info, factor, where, err)
        return fn(*(t.to("cpu") for t in tensors))

    def allocate(self, info: LayerInfo, factor: str, make: Callable[[torch.device], R], device: torch.device) -> R:
        """``make(device)``; after a real accelerator OOM, ``make(cpu)``, and the factor's work runs on CPU."""
        try:
            return make(device)
        except torch.OutOfMemoryError as err:
            if not is_accelerator(device):
                raise
            self._fall_back(info, factor, device, err)
        return make(torch.device("cpu"))

    def _fall_back(self, info: LayerInfo, factor: str, where: torch.device, err: BaseException) -> None:
        _free_cached(where)
        self.on_cpu.add((info.name, factor))
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        msg = (
            f"Out of memory on {where} for factor {factor} of layer {info.name!r} (in={info.in_features}, "
            f"out={info.out_features}): this factor's work now runs on CPU (results are identical). [{first}]"
        )
        self.messages.append(msg)
        logger.warning(msg)
        warnings.warn(msg, PlacementWarning, stacklevel=3)
        if self._on_fallback is not None:
            self._on_fallback(info.name, factor)


def on_cpu_after_oom(run: Callable[[torch.device], R], device: torch.device, what: str) -> R:
    """``run(device)``; after a real out-of-memory error on an accelerator, ``run(cpu)`` with a warning.

    For work done once per factor after collection (the eigendecomposition of a dense factor: its float64 copy and
    the solver's workspace need several times the factor's memory). ``what`` names the layer, factor and size.

    Raises:
        torch.OutOfMemoryError: out of memory on CPU, or on an accelerator during the CPU rerun's own allocations.

    """
    try:
        return run(device)
    except torch.OutOfMemoryError as err:
        if not is_accelerator(device):
            raise
        _free_cached(device)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        msg = f"Out of memory on {device} for {what}: computed on CPU instead (the same matrix). [{first}]"
        logger.warning(msg)
        warnings.warn(msg, PlacementWarning, stacklevel=3)
    return run(torch.device("cpu"))


def move_sum_to_cpu(sums: Any, factor: str) -> None:
    """Move a layer's dense ``factor`` sum to CPU (a low-rank ``G`` is there already)."""
    target = getattr(sums, factor)
    if hasattr(target, "sum") and isinstance(target.sum, Tensor):
        target.sum = target.sum.to("cpu")
