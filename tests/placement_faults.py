"""Out-of-memory faults injected through the public placement seam (``kronfisher.collection.placement``).

Every piece of factor work that may fall back to the host goes through :meth:`Placement.run` (per-batch work),
:meth:`Placement.allocate` (sums) or :func:`placement.on_cpu_after_oom` (decompositions, operator products);
:func:`oom_once` and :func:`oom_once_after` wrap the work one of them is handed so that its first call raises the
error a full accelerator raises. The fallback logic then runs exactly as it would on a GPU, with no private method
of the library replaced.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch

import kronfisher.collection.placement as placement

OOM = "CUDA out of memory. Tried to allocate 2.00 GiB (injected)"


def oom_once(monkeypatch: pytest.MonkeyPatch, method: str, layer: str, factor: str, times: int = 1) -> list[bool]:
    """Make the first ``times`` calls of the work ``Placement.<method>`` runs for ``(layer, factor)`` raise OOM.

    Args:
        monkeypatch: pytest's fixture (the patch ends with the test).
        method: ``"run"`` or ``"allocate"``.
        layer: the layer name.
        factor: ``"A"``, ``"G"`` or ``"EK-FAC"``.
        times: how many calls fail.

    Returns:
        One entry per call of that work, in order: ``True`` for an injected failure, ``False`` for a real call.

    """
    real = getattr(placement.Placement, method)
    calls: list[bool] = []

    def patched(self: placement.Placement, info: Any, fac: str, fn: Any, *rest: Any) -> Any:
        if info.name != layer or fac != factor:
            return real(self, info, fac, fn, *rest)

        def wrapped(*args: Any) -> Any:
            calls.append(sum(calls) < times)
            if calls[-1]:
                raise torch.OutOfMemoryError(OOM)
            return fn(*args)

        return real(self, info, fac, wrapped, *rest)

    monkeypatch.setattr(placement.Placement, method, patched)
    return calls


def oom_once_after(monkeypatch: pytest.MonkeyPatch, what: str, times: int = 1) -> list[bool]:
    """Make the first ``times`` runs of the work ``placement.on_cpu_after_oom`` is handed end in an OOM error.

    Args:
        monkeypatch: pytest's fixture (the patch ends with the test).
        what: a regular expression searched in the work's description (``"eigendecomposition of factor A of layer
            'x'"``, ``"low-rank eigenform of G"``, ``"product of layer"``); ``""`` matches all.
        times: how many runs fail.

    Returns:
        One entry per run of matching work, in order: ``True`` for an injected failure, ``False`` for a real run.

    """
    real = placement.on_cpu_after_oom
    calls: list[bool] = []

    def patched(run: Any, device: Any, description: str) -> Any:
        if not re.search(what, description):
            return real(run, device, description)

        def wrapped(where: Any) -> Any:
            out = run(where)  # the work runs, with whatever it sets up on the way (e.g. where its inputs live) ...
            calls.append(sum(calls) < times)
            if calls[-1]:
                raise torch.OutOfMemoryError(OOM)  # ... and its last allocation fails
            return out

        return real(wrapped, device, description)

    monkeypatch.setattr(placement, "on_cpu_after_oom", patched)
    return calls
