"""Where each factor's work runs, and the host fallback after a real out-of-memory error (docs/gpu.md).

On an accelerator every factor lives and is worked on the device, the ``G`` side of huge (low-rank) layers included:
``U`` is kept on the device in ``lowrank_dtype`` (the output-gradient rows are cast there before anything is copied)
unless the memory plan keeps it in host memory (:func:`columns_placement`); then it is held in (pinned) host memory
and every product streams its blocks through the device (:class:`~kronfisher.algebra.columns.Residence`), so the
arithmetic still runs on the accelerator.

A real ``torch.OutOfMemoryError`` raised by a factor's work on the accelerator (never an estimate of what would fit)
moves that factor of that layer to the host for the rest of the pass: the work is rerun on host copies of its
inputs and every later batch does the same, with one :class:`~kronfisher.errors.PlacementWarning` naming the layer,
``in``, ``out`` and the factor. Results are identical: the same arithmetic in the same dtype, on another device
(the message names both dimensions, and nothing is staged on the device before the decision). The same holds for
the sums of the EK-FAC pass and its staging (factor ``"EK-FAC"``) and for operator products
(:func:`on_cpu_after_oom` with :func:`block_on`). An out-of-memory error while ``U`` grows on the device moves ``U``
to host memory, streamed (:meth:`Placement.note`).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import warnings
import weakref
from collections.abc import Callable, Collection
from typing import Any, TypeVar

import torch
from torch import Tensor

from ..algebra.block import KronBlock
from ..algebra.columns import Residence
from ..algebra.eigen import Eigen
from ..errors import PlacementWarning
from ..layers import LayerInfo

logger = logging.getLogger("kronfisher")


R = TypeVar("R")


def is_accelerator(device: torch.device | str) -> bool:
    """True for a device whose memory can run out independently of the host (cuda, mps, xpu, ...)."""
    return torch.device(device).type not in ("cpu", "meta")


def sum_device(factor: str, lowrank: bool, device: torch.device | str) -> torch.device:
    """Where a dense factor's sum lives: on ``device`` (the model's); low-rank ``U``: :func:`columns_placement`."""
    del factor, lowrank
    return torch.device(device)


def columns_on_device(info: LayerInfo, device: torch.device, host_columns: Collection[str]) -> bool:
    """Whether a low-rank layer's ``U`` is kept on the accelerator: unless the memory plan lists it in ``host_columns``.

    A real out-of-memory error later still moves it to host memory (:meth:`Placement.columns_to_host`).
    """
    del device
    return info.name not in host_columns


def columns_placement(
    info: LayerInfo, device: torch.device | str, host_columns: Collection[str] = ()
) -> tuple[torch.device, Residence | None]:
    """``(storage device, residence)`` of a low-rank layer's ``U`` for a model on ``device``.

    On the host: stored there, products there. On an accelerator: stored on the device, or in host memory with
    every product streamed through the device when :func:`columns_on_device` says it does not fit.
    """
    dev = torch.device(device)
    if not is_accelerator(dev) or columns_on_device(info, dev, host_columns):
        return dev, None
    return torch.device("cpu"), Residence(dev, streamed=True)


def columns_like(saved: Any, fresh: Any) -> None:
    """Put a loaded low-rank sum's ``U`` where the collector keeps ``fresh``'s (its device and residence)."""
    saved.chunks = [c.to(fresh.device) for c in saved.chunks]
    if saved.basis is not None:
        saved.basis = saved.basis.to(fresh.device)
    saved.device, saved.residence = fresh.device, fresh.residence


def basis_on(eig: Any, device: torch.device) -> Any:
    """An eigenbasis (dense or low-rank) whose products run on ``device`` (a host fallback)."""
    if eig.kind == "lowrank":
        cols = eig.columns.on(Residence(device))
        return dataclasses.replace(eig, columns=cols, coeffs=eig.coeffs.to(device), values=eig.values.to(device))
    if eig.vectors.device == device:
        return eig
    return Eigen(eig.vectors.to(device), eig.values.to(device), eig.tail)


def block_on(block: KronBlock, device: torch.device) -> KronBlock:
    """The same block with every tensor's work on ``device`` (EK-FAC and operator fallbacks)."""
    corrected = None if block.corrected is None else block.corrected.to(device)
    tail = None if block.corrected_tail is None else block.corrected_tail.to(device)
    return KronBlock(basis_on(block.A, device), basis_on(block.G, device), corrected, tail, dict(block.tokens))


def _free_cached(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Placement:
    """Runs factor work where it is placed and moves a factor to CPU after a real out-of-memory error.

    Attributes:
        on_cpu: ``(layer, factor)`` pairs moved to CPU by an out-of-memory error.
        messages: the warnings issued (for :attr:`~kronfisher.report.CollectionReport.warnings`).

    """

    def __init__(self, on_fallback: Callable[[str, str], None] | None = None) -> None:
        """Args: on_fallback: called with ``(layer, factor)`` once a factor moves to CPU (e.g. to move its sum)."""
        self.on_cpu: set[tuple[str, str]] = set()
        self.messages: list[str] = []
        # a bound method of the owner (collector, corrector) is held weakly: a strong one would make the owner and
        # its sums cyclic garbage, freed only when the cycle collector happens to run (gigabytes at 1.5B)
        self._on_fallback = weakref.WeakMethod(on_fallback) if inspect.ismethod(on_fallback) else on_fallback

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
        self.on_cpu.add((info.name, factor))
        self.note(info, f"factor {factor}", where, err, "this factor's work now runs on CPU (results are identical)")
        call = self._on_fallback() if isinstance(self._on_fallback, weakref.WeakMethod) else self._on_fallback
        if call is not None:
            call(info.name, factor)

    def columns_to_host(self, info: LayerInfo, where: torch.device, err: torch.OutOfMemoryError) -> None:
        """The warning for a low-rank ``U`` that no longer fits on ``where``; re-raises ``err`` off an accelerator."""
        if not is_accelerator(where):
            raise err
        action = f"U is now kept in host memory and streamed through {where} for every product (same results)"
        self.note(info, "U", where, err, action)

    def note(self, info: LayerInfo, what: str, where: torch.device, err: BaseException, action: str) -> None:
        """Free the device's cached blocks and issue the one warning of a fallback (``what`` of ``info``)."""
        _free_cached(where)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        msg = (
            f"Out of memory on {where} for {what} of layer {info.name!r} (in={info.in_features}, "
            f"out={info.out_features}): {action}. [{first}]"
        )
        self.messages.append(msg)
        logger.warning(msg)
        warnings.warn(msg, PlacementWarning, stacklevel=4)


def on_cpu_after_oom(run: Callable[[torch.device], R], device: torch.device, what: str) -> R:
    """``run(device)``; after a real out-of-memory error on an accelerator, ``run(cpu)`` with a warning.

    For work done once per factor after collection (the eigendecomposition of a dense factor: its float64 copy and
    the solver's workspace need several times the factor's memory) and for the operator's products. ``what`` names
    the layer, factor and size. Callers reach it as ``placement.on_cpu_after_oom``, so that it is also the one
    public seam where tests inject an out-of-memory error into that work (with :meth:`Placement.run` and
    :meth:`Placement.allocate` for the per-batch work).

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
        msg = f"Out of memory on {device} for {what}: computed on CPU instead (same result). [{first}]"
        logger.warning(msg)
        warnings.warn(msg, PlacementWarning, stacklevel=3)
    return run(torch.device("cpu"))


def move_sum_to_cpu(sums: Any, factor: str) -> None:
    """Move a layer's dense ``factor`` sum to CPU (a low-rank ``G`` is there already)."""
    target = getattr(sums, factor)
    if getattr(target, "kind", None) == "dense":  # held rows or the sum, without folding rows
        target.to(torch.device("cpu"))
