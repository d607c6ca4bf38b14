"""Dense eigenbases and the guarded symmetric eigendecomposition (docs/concepts.md)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import DecompositionError

logger = logging.getLogger("kronfisher")

PROBES = 8  # fingerprint columns per collected row (SeenRows.probes)
PROBE_SEED = 20181  # fixed: collection-time and pass-time fingerprints use the same directions


def probe_directions(dim: int, device: torch.device | str = "cpu") -> Tensor:
    """``[dim, PROBES]`` fixed unit Gaussian directions in float64: the fingerprints of rows of width ``dim``."""
    gen = torch.Generator(device="cpu").manual_seed(PROBE_SEED + dim)
    omega = torch.randn(dim, PROBES, dtype=torch.float64, generator=gen)
    return omega.div_(omega.norm(dim=0, keepdim=True)).to(device)


PROBE_BLOCK = 1 << 22  # elements of the float64 copy of rows made at a time (32 MiB): a vocabulary-wide W too


def fingerprints(rows: Tensor, omega: Tensor) -> Tensor:
    """``rows Ω`` in float64 (``[n, PROBES]``), a few rows at a time (no float64 copy of all ``rows``)."""
    out = torch.empty(rows.shape[0], omega.shape[1], dtype=torch.float64, device=rows.device)
    block = max(1, PROBE_BLOCK // max(int(rows.shape[-1]), 1))
    for start in range(0, rows.shape[0], block):
        out[start : start + block] = rows[start : start + block].to(torch.float64) @ omega.to(rows.device)
    return out


@dataclass(frozen=True, eq=False)
class SeenRows:
    """The rows an eigenbasis was computed from, in that basis: what the EK-FAC pass would project again.

    A factor decomposed from its held rows ``X`` (``[T, d]``, :func:`~kronfisher.algebra.lowrank.eigen_from_rows`)
    knows their coordinates ``X Q = V diag(√(c λ))`` from its ``[T, T]`` eigh at no cost. The EK-FAC pass over
    the same batches can take them instead of a ``[n, d] × [d, r]`` product per batch, once it has checked
    that its rows are those rows: ``probes`` are their fingerprints ``X Ω`` (:func:`probe_directions`), computed
    in float64 (docs/concepts.md, "EK-FAC on the collected rows").

    Attributes:
        coords: ``[T, r]`` coordinates of the collected rows in the eigenbasis' columns.
        probes: ``[T, PROBES]`` float64 fingerprints of the collected rows.

    """

    coords: Tensor
    probes: Tensor


@dataclass(frozen=True, eq=False)
class Eigen:
    """Eigenbasis of a symmetric PSD factor: ``M = Q diag(λ) Qᵀ + τ (I − Q Qᵀ)``.

    For a dense factor ``Q`` is square and the tail term is empty. For a low-rank factor ``Q`` is the thin
    ``[d, r]`` basis and ``τ`` the isotropic tail eigenvalue (0 unless the token budget compressed it).

    Attributes:
        vectors: ``[d, r]`` orthonormal columns.
        values: ``[r]`` eigenvalues, clamped at 0.
        tail: eigenvalue on the orthogonal complement of ``vectors``.
        seen: the collected rows in this basis, for the EK-FAC pass that follows (None: not known, or dropped
            once that pass is done; never written to a file).

    """

    vectors: Tensor
    values: Tensor
    tail: float = 0.0
    seen: SeenRows | None = None

    kind = "dense"  # the representation (algebra.basis); LowRankEigen keeps a thin P = W C implicit

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

    def completed(self) -> Eigen:
        """The same factor with a square basis: the complement of a thin ``Q`` as eigenvectors of value ``τ``.

        Householder QR of ``Q`` (its ``R`` is ``diag(±1)`` up to rounding; the signs restore ``Q``): the other
        ``d − r`` columns are an orthonormal basis of the complement, placed first as ascending eigenvalues order
        them when ``τ`` is at most the smallest explicit eigenvalue (``τ = 0``: a factor of rank below its size).
        """
        if self.full:
            return self
        full, tri = torch.linalg.qr(self.vectors, mode="complete")
        return square_basis(full, tri, self.values, self.tail, self.vectors.dtype)

    def to_dense(self, max_elements: int = 100_000_000) -> Tensor:
        """Dense ``M`` (diagnostics only); refuses a thin basis whose ``d²`` exceeds ``max_elements``."""
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


def square_basis(full: Tensor, tri: Tensor, values: Tensor, tail: float, dtype: torch.dtype) -> Eigen:
    """The square eigenbasis from the complete Householder QR ``full, tri`` of a thin orthonormal ``[d, r]`` basis.

    ``R`` is ``diag(±1)`` up to rounding: its signs restore the thin columns. The other ``d − r`` columns, an
    orthonormal basis of the complement with eigenvalue ``tail``, come first, as ascending eigenvalues order them
    (``tail = 0``: the null space). The result is column-major in ``dtype`` (the layout ``torch.linalg.eigh``
    returns), written straight from ``full``: no second ``[d, d]`` copy.
    """
    d, r = int(full.shape[0]), int(values.shape[0])
    signs = torch.sign(tri.diagonal())
    signs[signs == 0] = 1.0
    vectors = torch.empty(d, d, dtype=dtype, device=full.device).mT
    vectors[:, : d - r] = full[:, r:]
    vectors[:, d - r :] = full[:, :r]
    vectors[:, d - r :].mul_(signs.to(dtype))  # ±1: exact in any dtype, after rounding
    rest = torch.full((d - r,), tail, dtype=values.dtype, device=values.device)
    return Eigen(vectors, torch.cat([rest, values]))


def all_finite(t: Tensor) -> Tensor:
    """0-d bool tensor: every entry of ``t`` is finite (no host sync).

    Same answer as ``torch.isfinite(t).all()`` in one pass and without a boolean temporary: ``aminmax`` propagates
    NaN, and an infinity shows up as the minimum or the maximum (the check of staged contributions and
    the eigendecomposition guard).
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
    """Eigendecomposition of a symmetric PSD factor with a NaN/Inf guard (docs/concepts.md).

    The matrix is symmetrised, decomposed in ``dtype``, and negative eigenvalues (round-off) are clamped to 0.

    Args:
        matrix: ``[d, d]`` factor.
        name: layer name (for messages).
        factor: which factor (for messages).
        dtype: dtype of the eigendecomposition.
        symmetric: the caller guarantees that ``matrix`` is *exactly* symmetric (e.g. the ``(S + Sᵀ) / 2c`` of
            :func:`kronfisher.decompose.layer.symmetric_mean` or a mirrored Gram); the symmetrisation, a transposed
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
