"""``KronBlock``: what the algebra knows about one layer (eigenbases of ``A`` and ``G``, EK-FAC values)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from ..errors import DecompositionError
from ..layers import LayerInfo
from .basis import FactorBasis, Representation
from .eigen import Eigen


@dataclass(frozen=True)
class KronBlock:
    """Decomposed curvature block of one layer.

    At most one side is thin (:attr:`thin_side`): ``G`` (``[out, r]``, low-rank or a token budget) or ``A``
    (``[a_dim, s]``, the nonzero eigenvalues of an ``A`` seen on fewer tokens than its size; its null space has
    eigenvalue 0). The tail values then live on the complement of the thin side, one per eigenvector of the other.

    Attributes:
        A: eigenbasis of ``A`` (``[a_dim, s]``, square unless thin).
        G: eigenbasis of ``G`` (``[out, out]`` dense or ``[out, r]`` low-rank, :mod:`~kronfisher.algebra.basis`).
        corrected: EK-FAC eigenvalues ``Λ*`` on ``span(P) ⊗ span(Q_A)``, ``[r, s]`` (docs/concepts.md), or None.
        corrected_tail: EK-FAC eigenvalue per ``q_j`` on the complement of a thin ``P`` (``[a_dim]``), or per ``p_i``
            on the complement of a thin ``Q_A`` (``[out]``), or None.
        tokens: ``T`` and ``N`` counts the factors were normalised with.

    """

    A: Eigen
    G: FactorBasis
    corrected: Tensor | None = None
    corrected_tail: Tensor | None = None
    tokens: dict[str, float] = field(default_factory=dict)
    cache: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.A.full and not self.G.full:
            raise DecompositionError(
                f"A Kronecker block with a thin A [{self.A.dim}, {self.A.rank}] and a thin G [{self.G.dim}, "
                f"{self.G.rank}]: complete one of them (Eigen.completed)."
            )

    @property
    def thin_side(self) -> str | None:
        """``"G"`` or ``"A"``: the factor whose basis is thin (its complement carries the tail values), or None."""
        if not self.G.full:
            return "G"
        return None if self.A.full else "A"

    @property
    def representation(self) -> Representation:
        """How ``G`` is held: ``"dense"`` or ``"lowrank"`` (the basis' own ``kind``)."""
        return self.G.kind

    @property
    def is_ekfac(self) -> bool:
        """True when EK-FAC eigenvalues are present."""
        return self.corrected is not None

    def with_correction(self, corrected: Tensor, corrected_tail: Tensor | None) -> KronBlock:
        """A new block (fresh cache) with EK-FAC eigenvalues."""
        return KronBlock(self.A, self.G, corrected, corrected_tail, dict(self.tokens))

    def kron_eigenvalues(self) -> tuple[Tensor, Tensor | None]:
        """Undamped eigenvalues ``(span [r, s], tail or None)`` (see :attr:`thin_side`); EK-FAC ones when corrected."""
        if self.corrected is not None:
            return self.corrected, self.corrected_tail
        a_vals = self.A.values.to(self.G.values.device)  # G may work elsewhere than A (a host fallback)
        span = self.G.values.unsqueeze(1) * a_vals.unsqueeze(0)
        side = self.thin_side
        tail = self.G.tail * a_vals if side == "G" else self.G.values * self.A.tail if side == "A" else None
        return span, tail


def summary_row(
    info: LayerInfo,
    *,
    representation: str,
    rank_G: int | None,
    tokens: tuple[float, float],
    traces: tuple[float, float],
    discarded_G: float = 0.0,
    ekfac: bool = False,
    rank_A: int | None = None,
) -> dict[str, Any]:
    """The per-layer row of ``KFAC.summary``, a file's ``layers`` metadata and ``kronfisher inspect``.

    Args:
        info: the layer.
        representation: how ``G`` is held (``"dense"`` or ``"lowrank"``).
        rank_G: explicit eigenpairs of ``G`` (None before decomposition).
        tokens: ``(T, N)``.
        traces: ``(tr A, tr G)``.
        discarded_G: token-budget mass moved into the isotropic tail.
        ekfac: EK-FAC eigenvalues present.
        rank_A: explicit eigenpairs of ``A`` (below ``in`` for a thin ``A``; None before decomposition).

    """
    return {
        "in": info.in_features,
        "out": info.out_features,
        "bias": info.has_bias,
        "representation": representation,
        "rank_G": rank_G,
        "rank_A": rank_A,
        "T": float(tokens[0]),
        "N": float(tokens[1]),
        "trace_A": float(traces[0]),
        "trace_G": float(traces[1]),
        "discarded_G": float(discarded_G),
        "ekfac": bool(ekfac),
    }


def block_summary(info: LayerInfo, block: KronBlock) -> dict[str, Any]:
    """:func:`summary_row` of a decomposed block."""
    return summary_row(
        info,
        representation=block.representation,
        rank_G=block.G.rank,
        tokens=(block.tokens.get("T", 0.0), block.tokens.get("N", 0.0)),
        traces=(block.A.trace(), block.G.trace()),
        discarded_G=float(getattr(block.G, "discarded", 0.0)),
        ekfac=block.is_ekfac,
        rank_A=block.A.rank,
    )
