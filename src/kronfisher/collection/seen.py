"""The EK-FAC pass on the rows its factors were collected on (docs/concepts.md, "EK-FAC on the collected rows").

A factor decomposed from its rows knows where they lie in its eigenbasis: an ``A`` held as rows ``X`` has
``X Q_A = V diag(√(c λ))`` from its ``[T, T]`` eigh (:class:`~kronfisher.algebra.eigen.SeenRows`), and an exact
low-rank ``G = W Wᵀ / N`` with its implicit basis ``P = W C`` has ``Wᵀ P = N C diag(λ)``. The EK-FAC pass runs
the same batches in the same order (MC targets are seeded per batch), so row ``t`` of a batch is collected row
``cursor + t`` and its projection is a slice of those coordinates: no ``[n, d] × [d, r]`` product, the largest
cost of the pass for the wide factors of an MLP.

Nothing is assumed: every batch's rows are checked against the collected ones before their coordinates are
used, by float64 fingerprints on fixed random directions (``rows Ω`` against ``X Ω``, relative
:data:`PROBE_RTOL`). A batch that differs (another order, a batch dropped by one pass only, a compressed or
gathered ``W``) turns the shortcut off for that factor for the rest of the pass, and the pass projects as before.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from ..algebra.eigen import fingerprints, probe_directions
from ..algebra.lowrank import LowRankEigen

logger = logging.getLogger("kronfisher")

PROBE_RTOL = 1e-5  # |r·ω − x·ω| ≤ rtol ‖r‖ for unit ω: bit-identical rows give ~1e-15; another row fails w.h.p.
REUSE_ROWS = True  # off: project every batch (the reference of tests and benchmarks/bench_seen.py)


class RowCursor:
    """Where each factor's collected rows stand in the current pass, and which factors gave the shortcut up.

    Keys name one stream of collected rows: the ``A`` of a rows-held eigenbasis (shared by the layers reading
    that input) or the ``W`` of one low-rank ``G``. The rows a batch takes are pending in the capture's
    per-forward ``cache`` (dropped with it when the batch is discarded) until :meth:`committed`.
    """

    def __init__(self) -> None:
        self.cursor: dict[Any, int] = {}
        self.off: set[Any] = set()
        self.used: set[Any] = set()
        self._pending: dict[Any, int] | None = None
        self._omega: dict[tuple[int, torch.device], Tensor] = {}

    def take(
        self, key: Any, label: str, rows: Tensor, probes: Tensor, cache: dict[Any, Any], scale: float
    ) -> int | None:
        """Offset of ``scale · rows`` (``[n, d]``) among the collected rows of ``key``, or None (project them).

        Args:
            key: the stream of collected rows.
            label: what to name in the log when the shortcut goes off.
            rows: this call's rows as the pass sees them (unscaled).
            probes: ``[T, PROBES]`` fingerprints of the collected rows.
            cache: the capture's per-forward cache (holds the rows taken by this batch so far).
            scale: the factor turning ``rows`` into the collected rows (the gradient scale of ``G``).

        """
        if not self.live(key):
            return None
        pending = cache.setdefault(("seen rows", "pending"), {})
        self._pending = pending
        start, n = self.cursor.get(key, 0) + pending.get(key, 0), int(rows.shape[0])
        why = None
        if start + n > probes.shape[0]:
            why = f"the pass has more rows than the {probes.shape[0]} collected"
        else:
            dim = int(rows.shape[1])
            where = (dim, rows.device)
            omega = self._omega.get(where)
            if omega is None:
                omega = self._omega[where] = probe_directions(dim, rows.device)
            got = fingerprints(rows, omega).mul_(scale)
            size = torch.linalg.vector_norm(rows, dim=1, keepdim=True, dtype=torch.float64).mul_(abs(scale))
            if not bool(((got - probes[start : start + n].to(got.device)).abs() <= PROBE_RTOL * size).all()):
                why = f"rows {start}..{start + n} differ from the collected ones"
        if why is not None:
            self.off.add(key)
            logger.info("EK-FAC of %s projects its rows again for the rest of the pass: %s.", label, why)
            return None
        pending[key] = pending.get(key, 0) + n
        self.used.add(key)
        return start

    def live(self, key: Any) -> bool:
        """Whether ``key``'s rows may still be taken in this pass (worth selecting the batch's rows for)."""
        return REUSE_ROWS and key not in self.off

    def committed(self) -> None:
        """The batch whose rows were taken last is committed: move the cursors past them."""
        for key, n in (self._pending or {}).items():
            self.cursor[key] = self.cursor.get(key, 0) + n
        self._pending = None


def lowrank_probes(g: LowRankEigen) -> Tensor:
    """``[m, PROBES]`` float64 fingerprints of the columns ``W`` of a low-rank ``G`` (one pass over ``W``)."""
    omega = probe_directions(g.dim, g.columns.storage_device)
    parts = [fingerprints(c, omega) for c in g.columns.chunks]
    return torch.cat(parts) if parts else torch.zeros(0, omega.shape[1], dtype=torch.float64)


def lowrank_coords(
    g: LowRankEigen, count: float, start: int, n: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """Rows ``start..start+n`` of ``Wᵀ P = N C diag(λ)``: the collected ``ĝ`` in the implicit basis ``P = W C``."""
    c = g.coeffs[start : start + n].to(device, dtype, copy=True)
    return c.mul_(g.values.to(device, dtype)).mul_(float(count))


def scatter_rows(flat: Tensor, rows: Tensor | None, shape: tuple[int, int]) -> Tensor:
    """``[B, S, r]`` with the ``[n, r]`` rows of ``flat`` at the attended positions ``rows`` and zeros elsewhere."""
    b, s = shape
    if rows is None:
        return flat.reshape(b, s, -1)
    out = torch.zeros(b * s, flat.shape[1], dtype=flat.dtype, device=flat.device)
    out.index_copy_(0, rows.to(flat.device), flat)
    return out.reshape(b, s, -1)
