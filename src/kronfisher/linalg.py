"""Pure tensor functions: safe eigh, the Kronecker-eigenbasis apply, low-rank eigenform, Woodbury.

Nothing here builds ``diag(λ)``, ``Q diag(λ) Qᵀ``, ``G ⊗ A`` or an ``out × out`` matrix for a low-rank factor
(SPEC §4, §6, §7).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

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

    def to_dense(self) -> Tensor:
        """Dense ``M`` (diagnostics only)."""
        q = self.vectors
        m = (q * self.values) @ q.t()
        if not self.full and self.tail != 0.0:
            m = m + self.tail * (torch.eye(self.dim, dtype=q.dtype, device=q.device) - q @ q.t())
        return m


def safe_eigh(matrix: Tensor, *, name: str, factor: str, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of a symmetric PSD factor with a NaN/Inf guard (SPEC §4).

    The matrix is symmetrised, decomposed in ``dtype``, and negative eigenvalues (round-off) are clamped to 0.

    Raises:
        DecompositionError: the factor has non-finite entries or eigh fails; the message names layer and factor.

    """
    m = matrix.to(dtype)
    if not bool(torch.isfinite(m).all()):
        raise DecompositionError(f"Factor {factor} of layer {name!r} ({list(m.shape)}) has non-finite entries.")
    m = (m + m.t()) / 2
    try:
        values, vectors = torch.linalg.eigh(m)
    except RuntimeError as err:  # torch.linalg.LinAlgError subclasses RuntimeError
        raise DecompositionError(f"eigh failed for factor {factor} of layer {name!r} ({list(m.shape)}): {err}") from err
    return values.clamp_min_(0.0), vectors


def lowrank_eigen(columns: Tensor, tail: float = 0.0, *, name: str = "?") -> Eigen:
    """Thin eigendecomposition of ``G = U Uᵀ`` from the ``[r0, r0]`` Gram matrix ``Uᵀ U`` (SPEC §6).

    Args:
        columns: ``U`` with shape ``[out, m]`` in float32 or float64.
        tail: isotropic tail eigenvalue of the compressed part.
        name: layer name for messages.

    Returns:
        ``Eigen`` with ``P = U W / σ`` (``[out, r]``), ``values = σ²``, keeping the numerically non-zero ones.

    """
    u = columns
    if u.shape[1] == 0:
        return Eigen(u.new_zeros(u.shape[0], 0), u.new_zeros(0), tail)
    work = torch.float64 if u.shape[1] <= 8192 else u.dtype
    k = u.t().to(work) @ u.to(work)
    vals, vecs = safe_eigh(k, name=name, factor="G (Gram of U)", dtype=work)
    top = float(vals.max()) if vals.numel() else 0.0
    keep = vals > max(top, 0.0) * vals.numel() * torch.finfo(u.dtype).eps
    vals, vecs = vals[keep], vecs[:, keep]
    p = (u.to(work) @ vecs) / vals.sqrt()
    return Eigen(p.to(u.dtype), vals.to(u.dtype), tail)


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
    p, q = g.vectors, a.vectors
    x = v @ q  # [out, a]
    y = p.t() @ x  # [r, a]
    out = p @ (y * span)
    if not g.full and tail is not None:
        out = out + (x - p @ y) * tail
    return out @ q.t()


def woodbury_solve(u: Tensor, delta: float, x: Tensor, eps: float = 1e-10, *, name: str = "?") -> Tensor:
    """``(U Uᵀ + δ I)^{-1} X`` by Woodbury with ``S = I_T + Uᵀ U / δ`` (``[T, T]``, SPEC §6).

    ``S`` is factorised by Cholesky; on failure jitter ``ε, 10ε, 100ε`` is added to its diagonal; if all fail a
    symmetric eigendecomposition of ``S`` is used with a warning. Never a silent ``inv``.
    """
    if delta <= 0:
        raise DecompositionError(f"Woodbury for layer {name!r} needs damping > 0, got {delta}.")
    work = torch.promote_types(u.dtype, torch.float32)
    u = u.to(work)
    xw = x.to(work)
    t = u.shape[1]
    s = (u.t() @ u) / delta
    s.diagonal().add_(1.0)
    z = u.t() @ xw  # [T, k]
    w = None
    for jitter in (0.0, eps, 10 * eps, 100 * eps):
        s_try = s if jitter == 0.0 else s + jitter * torch.eye(t, dtype=work, device=u.device)
        chol, info = torch.linalg.cholesky_ex(s_try)
        if int(info) == 0:
            w = torch.cholesky_solve(z, chol)
            break
    if w is None:
        logger.warning("Woodbury: Cholesky of S failed for layer %r even with jitter; using eigh of S.", name)
        vals, vecs = torch.linalg.eigh(s)
        vals = vals.clamp_min(torch.finfo(work).tiny)
        w = vecs @ ((vecs.t() @ z) / vals.unsqueeze(1))
    return (xw / delta - (u @ w) / delta**2).to(x.dtype)
