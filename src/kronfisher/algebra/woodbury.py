"""Woodbury solves ``(G + δ I)^{-1}`` for low-rank ``G = U Uᵀ`` (docs/concepts.md)."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, DecompositionError, NumericalWarning
from .columns import ColumnStore
from .damping import pi_factor
from .eigen import Eigen, logger
from .kron import two_pass


# Woodbury ---------------------------------------------------------------------------------------------------
def woodbury_applicable(block: Any, damping: Any) -> str | None:
    """Why Woodbury cannot compute this block's ``p = -1`` (None when it can)."""
    if block.is_ekfac:
        return "EK-FAC eigenvalues do not factor as (G + δ_G) ⊗ (A + δ_A)"
    if damping.mode not in ("factored", "pi"):
        return f"damping_mode={damping.mode!r} does not factor; use 'factored' or 'pi'"
    if damping.max_condition_number is not None:
        return "a condition-number cap acts on eigenvalues"
    if block.representation != "lowrank":
        return "G is not low-rank"
    if block.G.tail != 0.0:
        return "a compressed G (token budget) has an isotropic tail"
    return None


def woodbury_kron_apply(
    v: Tensor, store: ColumnStore, count: float, a: Eigen, delta_g: float, a_scale: Tensor, solve: Any
) -> Tensor:
    """``(G + δ_G I)^{-1} V Q diag(a_scale) Qᵀ`` with ``G = W Wᵀ / N`` by Woodbury (docs/concepts.md).

    ``(G + δI)^{-1} X = X/δ − U S^{-1} Uᵀ X / δ² = X/δ − W S^{-1} Wᵀ X / (N δ²)`` with ``U = W/√N`` and
    ``S = I_T + UᵀU/δ``; ``solve`` applies ``S^{-1}`` (:func:`~kronfisher.algebra.woodbury.woodbury_factor`).
    """
    work = v.dtype
    factor = -1.0 / (float(count) * delta_g**2)

    def middle(wtx: Tensor) -> Tensor:
        return solve(wtx.to(torch.float64)).to(work) * factor

    diag = torch.full((v.shape[1],), 1.0 / delta_g, dtype=work, device=store.device)
    return two_pass(v, store, None, a.vectors, middle, a_scale.to(store.device, work), diag, work)


def woodbury_power(block: Any, v: Tensor, damping: Any, name: str) -> Tensor:
    """``(F + δ)^{-1} V`` of a low-rank block by Woodbury (``lowrank_solver="woodbury"``; factored or pi damping).

    ``S`` is factorised once per ``δ_G`` and cached on the (immutable) block.

    Raises:
        ConfigError: the block or damping does not factor (EK-FAC, exact mode, cap, compressed tail).

    """
    why = woodbury_applicable(block, damping)
    if why is not None:
        raise ConfigError(f"lowrank_solver='woodbury' cannot apply to layer {name!r}: {why}.")
    if damping.mode == "pi":
        pi, root = pi_factor(block), math.sqrt(damping.delta)
        d_a, d_g = pi * root, root / pi
    else:
        d_a, d_g = damping.delta_A, damping.delta_G
    a_shift = block.A.values.to(torch.float64) + d_a
    if d_g <= 0 or float(a_shift.min()) <= 0:
        raise ConfigError(f"lowrank_solver='woodbury' for layer {name!r} needs δ_G > 0 and A + δ_A > 0 (p = -1).")
    if block.G.kind == "lowrank":  # G = W Wᵀ / N from the collected columns
        store, count = block.G.columns, float(block.tokens.get("N", 0.0))
    else:  # an explicit thin eigenbasis (e.g. loaded from a file): G = (P √λ)(P √λ)ᵀ
        store, count = ColumnStore([(block.G.vectors * block.G.values.sqrt()).t()], block.G.dim), 1.0
    key = ("woodbury", float(d_g))
    solve = block.cache.get(key)
    if solve is None:
        solve = woodbury_factor(store.gram().div_(count), d_g, name=name, overwrite=True)
        block.cache[key] = solve
    work = torch.promote_types(v.dtype, block.A.vectors.dtype)
    res = woodbury_kron_apply(v.to(work), store, count, block.A, d_g, a_shift.reciprocal(), solve)
    return res.to(v.device, v.dtype)


def woodbury_factor(
    gram: Tensor, delta: float, eps: float | None = None, *, name: str = "?", overwrite: bool = False
) -> Any:
    """Factorise ``S = I_T + K / δ`` for Woodbury, ``K = Uᵀ U`` (``[T, T]``); returns ``z ↦ S^{-1} z``.

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

    msg = (
        f"Woodbury: Cholesky of S ({t}×{t}) failed for layer {name!r} even with jitter up to {100 * base:.1e}; "
        "using a symmetric eigendecomposition of S."
    )
    logger.warning(msg)
    warnings.warn(msg, NumericalWarning, stacklevel=3)
    vals, vecs = torch.linalg.eigh(s)
    vals = vals.clamp_min(1.0)
    return lambda z: vecs @ ((vecs.t() @ z.to(vecs.dtype)) / vals.unsqueeze(1))
