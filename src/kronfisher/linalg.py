"""Pure tensor functions: safe eigh, the Kronecker-eigenbasis apply, low-rank eigenform, Woodbury.

Nothing here builds ``diag(λ)``, ``Q diag(λ) Qᵀ``, ``G ⊗ A`` or an ``out × out`` matrix for a low-rank factor
(SPEC §4, §6, §7).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .errors import DecompositionError

logger = logging.getLogger("kronfisher")


@dataclass(frozen=True)
class Eigen:
    """Eigenbasis of a symmetric PSD factor: ``M = Q diag(λ) Qᵀ + τ (I − Q Qᵀ)``.

    For a dense factor ``Q`` is square and the tail term is empty. For a low-rank factor (SPEC §6) ``Q`` is the thin
    ``[d, r]`` basis and ``τ`` the isotropic tail eigenvalue (0 unless the token budget compressed it).

    Attributes:
        vectors: ``[d, r]`` orthonormal columns.
        values: ``[r]`` eigenvalues, clamped at 0.
        tail: eigenvalue on the orthogonal complement of ``vectors``.

    """

    vectors: Tensor
    values: Tensor
    tail: float = 0.0

    implicit = False  # the low-rank eigenform (kronfisher.lowrank.LowRankEigen) keeps P = W C implicit

    @property
    def device(self) -> torch.device:
        """Device of the eigenbasis."""
        return self.vectors.device

    def rows_project(self, x: Tensor) -> Tensor:
        """``x P`` for ``x`` of shape ``[..., d]`` (``[..., r]``) in ``x``'s dtype, on the eigenbasis' device."""
        return x.to(self.vectors.device) @ self.vectors.to(x.dtype)

    @property
    def dim(self) -> int:
        """Dimension ``d`` of the factor."""
        return int(self.vectors.shape[0])

    @property
    def rank(self) -> int:
        """Number of explicit eigenpairs ``r``."""
        return int(self.vectors.shape[1])

    @property
    def full(self) -> bool:
        """True when the explicit eigenpairs span the whole space."""
        return self.rank == self.dim

    def trace(self) -> float:
        """``tr M`` including the tail."""
        return float(self.values.sum()) + self.tail * (self.dim - self.rank)

    def cast(self, dtype: torch.dtype) -> Eigen:
        """The same eigenbasis in ``dtype`` (no copy when it already is)."""
        if self.vectors.dtype == dtype:
            return self
        return Eigen(self.vectors.to(dtype), self.values.to(dtype), self.tail)

    def to_dense(self, max_elements: int = 100_000_000) -> Tensor:
        """Dense ``M`` (diagnostics only); refuses a thin basis whose ``d²`` exceeds ``max_elements`` (SPEC §6)."""
        if not self.full and self.dim * self.dim > max_elements:
            raise DecompositionError(
                f"Dense factor of a thin eigenbasis would have {self.dim}² elements (> {max_elements}); "
                "it is a diagnostic for small layers."
            )
        q = self.vectors
        m = (q * self.values) @ q.t()
        if not self.full and self.tail != 0.0:
            m = m + self.tail * (torch.eye(self.dim, dtype=q.dtype, device=q.device) - q @ q.t())
        return m


def all_finite(t: Tensor) -> Tensor:
    """0-d bool tensor: every entry of ``t`` is finite (no host sync).

    Same answer as ``torch.isfinite(t).all()`` in one pass and without a boolean temporary: ``aminmax`` propagates
    NaN, and an infinity shows up as the minimum or the maximum (SPEC §3.3 check of staged contributions, §4 guard).
    """
    if t.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=t.device)
    if not t.is_floating_point():
        return torch.isfinite(t).all()
    lo, hi = torch.aminmax(t)
    return torch.isfinite(lo) & torch.isfinite(hi)


def safe_eigh(
    matrix: Tensor, *, name: str, factor: str, dtype: torch.dtype, symmetric: bool = False
) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of a symmetric PSD factor with a NaN/Inf guard (SPEC §4).

    The matrix is symmetrised, decomposed in ``dtype``, and negative eigenvalues (round-off) are clamped to 0.

    Args:
        matrix: ``[d, d]`` factor.
        name: layer name (for messages).
        factor: which factor (for messages).
        dtype: dtype of the eigendecomposition.
        symmetric: the caller guarantees that ``matrix`` is *exactly* symmetric (e.g. the ``(S + Sᵀ) / 2c`` of
            :func:`kronfisher.factors.symmetric_mean` or a mirrored Gram); the symmetrisation, a transposed
            ``d × d`` pass worth about 3 % of a float64 eigh at d = 1,536, is then skipped. Same bits: ``(m + mᵀ) / 2``
            of an exactly symmetric ``m`` is ``m``.

    Raises:
        DecompositionError: the factor has non-finite entries or eigh fails; the message names layer and factor.

    """
    m = matrix.to(dtype)
    if not bool(all_finite(m)):
        raise DecompositionError(f"Factor {factor} of layer {name!r} ({list(m.shape)}) has non-finite entries.")
    if not symmetric:
        m = (m + m.t()).div_(2)  # in place on the fresh sum: one temporary, same bits
    try:
        values, vectors = torch.linalg.eigh(m)
    except RuntimeError as err:  # torch.linalg.LinAlgError subclasses RuntimeError
        raise DecompositionError(f"eigh failed for factor {factor} of layer {name!r} ({list(m.shape)}): {err}") from err
    return values.clamp_min_(0.0), vectors


def lowrank_eigen(columns: Tensor, tail: float = 0.0, *, name: str = "?") -> Eigen:
    """Thin eigendecomposition of ``G = U Uᵀ`` from the ``[m, m]`` Gram ``Uᵀ U`` in float64 (SPEC §6).

    Args:
        columns: ``U`` with shape ``[out, m]`` (any float dtype; arithmetic in float32 or higher).
        tail: isotropic tail eigenvalue on the complement of ``span(U)``.
        name: layer name for messages.

    Returns:
        A :class:`~kronfisher.lowrank.LowRankEigen` (implicit ``P = U V λ^{-1/2}``, same interface as
        :class:`Eigen`), keeping eigenvalues above ``m · eps₆₄ · λ_max``.

    """
    import dataclasses

    from .lowrank import ColumnStore, eigen_from_columns

    dtype = torch.promote_types(columns.dtype, torch.float32)
    eig = eigen_from_columns(ColumnStore([columns.t()], columns.shape[0]), 1.0, dtype=dtype, name=name)
    return dataclasses.replace(eig, tail=float(tail), discarded=float(tail) * (eig.dim - eig.rank))


def kron_apply(v: Tensor, g: Eigen, a: Eigen, span: Tensor, tail: Tensor | None) -> Tensor:
    """Apply a function of the Kronecker eigenvalues to ``V`` (``[out, a_dim]``), never building ``G ⊗ A``.

    The operator is ``Σ_ij span_ij (p_i ⊗ q_j)(p_i ⊗ q_j)ᵀ + Σ_j tail_j ((I − P Pᵀ) ⊗ q_j q_jᵀ)``, which in matrix
    form is ``P (span ∘ (Pᵀ V Q)) Qᵀ + ((I − P Pᵀ) V Q) diag(tail) Qᵀ`` (the tail term only when ``P`` is thin).

    Args:
        v: ``[out, a_dim]`` matrix.
        g: eigenbasis of ``G`` (``P``, possibly thin).
        a: eigenbasis of ``A`` (``Q``, full).
        span: ``[r, a_dim]`` eigenvalues on ``span(P) ⊗ span(Q)``.
        tail: ``[a_dim]`` eigenvalues on ``span(P)^⊥ ⊗ q_j`` (ignored when ``P`` is square).

    """
    if g.implicit or not g.full:  # thin or implicit P: blockwise, on the G side's device (SPEC §6)
        from .lowrank import thin_kron_apply

        return thin_kron_apply(v, g, a, span, tail)
    p, q = g.vectors, a.vectors
    x = v @ q  # [out, a]
    y = p.t() @ x  # [r, a]
    out = p @ (y * span)
    if not g.full and tail is not None:
        out = out + (x - p @ y) * tail
    return out @ q.t()


def woodbury_factor(
    gram: Tensor, delta: float, eps: float | None = None, *, name: str = "?", overwrite: bool = False
) -> Any:
    """Factorise ``S = I_T + K / δ`` for Woodbury, ``K = Uᵀ U`` (``[T, T]``, SPEC §6); returns ``z ↦ S^{-1} z``.

    ``S`` is factorised in float64 by Cholesky (which reads its lower triangle); on failure, jitter ``ε, 10ε, 100ε``
    is added to its diagonal (``ε = eps``, default ``T · eps₆₄ · max diag S``); if all fail, a symmetric
    eigendecomposition of ``S`` is used with a :class:`~kronfisher.errors.NumericalWarning` (its eigenvalues are
    clamped at 1, since ``S ⪰ I``). Never a silent ``inv``. With ``overwrite=True`` a float64 ``gram`` becomes ``S``
    in place (no second ``T × T`` matrix).

    Raises:
        DecompositionError: ``δ ≤ 0``, a non-square or non-finite ``K``.

    """
    if not delta > 0:
        raise DecompositionError(f"Woodbury for layer {name!r} needs damping δ_G > 0, got {delta}.")
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise DecompositionError(f"Woodbury for layer {name!r}: Uᵀ U must be [T, T], got {list(gram.shape)}.")
    s = gram.to(torch.float64, copy=not overwrite).div_(delta)
    s.diagonal().add_(1.0)
    if not bool(torch.isfinite(s).all()):
        raise DecompositionError(f"Woodbury for layer {name!r}: S = I + UᵀU/δ ({list(s.shape)}) is not finite.")
    t = s.shape[0]
    base = eps if eps is not None else t * torch.finfo(torch.float64).eps * float(s.diagonal().max()) if t else 0.0
    added = 0.0
    for jitter in (0.0, base, 10 * base, 100 * base):
        s.diagonal().add_(jitter - added)  # in place: ε, then 10ε, then 100ε in total
        added = jitter
        chol, info = torch.linalg.cholesky_ex(s)
        if int(info) == 0:
            del s
            return lambda z: torch.cholesky_solve(z.to(chol.dtype), chol)
    s.diagonal().sub_(added)
    import warnings

    from .errors import NumericalWarning

    msg = (
        f"Woodbury: Cholesky of S ({t}×{t}) failed for layer {name!r} even with jitter up to {100 * base:.1e}; "
        "using a symmetric eigendecomposition of S."
    )
    logger.warning(msg)
    warnings.warn(msg, NumericalWarning, stacklevel=3)
    vals, vecs = torch.linalg.eigh(s)
    vals = vals.clamp_min(1.0)
    return lambda z: vecs @ ((vecs.t() @ z.to(vecs.dtype)) / vals.unsqueeze(1))


def woodbury_solve(u: Tensor, delta: float, x: Tensor, eps: float | None = None, *, name: str = "?") -> Tensor:
    """``(U Uᵀ + δ I)^{-1} X`` by Woodbury: ``X/δ − U S^{-1} Uᵀ X / δ²`` with ``S = I_T + Uᵀ U / δ`` (SPEC §6).

    Args:
        u: ``U`` with shape ``[out, T]`` (asserted against ``X``'s ``out`` rows).
        delta: damping ``δ > 0``.
        x: ``[out, k]`` right-hand sides.
        eps: Cholesky jitter (see :func:`woodbury_factor`).
        name: layer name for messages.

    Returns:
        ``[out, k]`` in ``x``'s dtype; arithmetic in float32 or higher (``S`` in float64).

    """
    if u.dim() != 2 or x.dim() != 2 or u.shape[0] != x.shape[0]:
        raise DecompositionError(
            f"Woodbury for layer {name!r}: U must be [out, T] with out = X's rows; got U {list(u.shape)}, "
            f"X {list(x.shape)}."
        )
    work = torch.promote_types(torch.promote_types(u.dtype, x.dtype), torch.float32)
    u = u.to(work)
    xw = x.to(work)
    solve = woodbury_factor(u.t().to(torch.float64) @ u.to(torch.float64), delta, eps, name=name)
    w = solve((u.t() @ xw).to(torch.float64)).to(work)
    return (xw / delta - (u @ w) / delta**2).to(x.dtype)
