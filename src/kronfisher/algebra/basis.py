"""``FactorBasis``: the one interface of a decomposed Kronecker factor, dense or low-rank (docs/concepts.md).

A factor ``M`` (``A`` or ``G`` of a layer) is held as an eigenbasis ``M = P diag(λ) Pᵀ + τ (I − P Pᵀ)``. Two
representations implement it: :class:`~kronfisher.algebra.eigen.Eigen` (``kind = "dense"``: explicit square ``Q``)
and :class:`~kronfisher.algebra.lowrank.LowRankEigen` (``kind = "lowrank"``: thin ``P = W C`` kept implicit, for
layers whose ``out × out`` factor is never built). Code that needs to know which one it holds reads ``kind``; the
sums of collection carry the same ``kind`` (:mod:`kronfisher.collection.sums`), so one word names a representation
from the first batch to the file.
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

Representation = Literal["dense", "lowrank"]
"""How a factor is held: a dense eigenbasis, or the low-rank form of a huge layer's ``G``."""


@runtime_checkable
class FactorBasis(Protocol):
    """What the algebra asks of an eigenbasis, whatever its representation."""

    kind: Representation
    values: Tensor
    tail: float

    @property
    def dim(self) -> int:
        """Dimension ``d`` of the factor."""
        ...

    @property
    def rank(self) -> int:
        """Number of explicit eigenpairs ``r``."""
        ...

    @property
    def full(self) -> bool:
        """True when the explicit eigenpairs span the whole space (no tail)."""
        ...

    @property
    def device(self) -> torch.device:
        """Device of the basis."""
        ...

    @property
    def vectors(self) -> Tensor:
        """``[d, r]`` eigenvectors (materialised for a low-rank basis: only for small factors and diagnostics)."""
        ...

    def trace(self) -> float:
        """``tr M``."""
        ...

    def rows_project(self, x: Tensor) -> Tensor:
        """``X P`` for rows ``X`` (``[n, d]`` → ``[n, r]``)."""
        ...

    def to_dense(self, max_elements: int = 100_000_000) -> Tensor:
        """Dense ``M`` (diagnostics only)."""
        ...
