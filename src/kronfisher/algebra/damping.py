"""Damped eigenvalue functions (docs/concepts.md): one function serves every power and every damping mode.

``spectrum(block, p, damping)`` returns the eigenvalues of ``(F + damping)^p`` in the block's Kronecker eigenbasis,
``(span [r, a], tail [a] or None)``, ready for :func:`~kronfisher.algebra.kron.kron_apply`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..config import KFACConfig
from ..errors import ConfigError, SpectrumError
from .block import KronBlock


@dataclass(frozen=True)
class Damping:
    """Resolved damping: mode, ``δ`` (exact / EK-FAC), ``δ_A``, ``δ_G`` (factored, pi) and the cap ``κ``."""

    mode: str = "factored"
    delta: float = 0.0
    delta_A: float = 0.0
    delta_G: float = 0.0
    max_condition_number: float | None = None

    @classmethod
    def from_config(cls, cfg: KFACConfig) -> Damping:
        """The damping a config asks for."""
        d_a, d_g = cfg.factor_damping()
        return cls(cfg.damping_mode, float(cfg.damping), d_a, d_g, cfg.max_condition_number)

    @classmethod
    def none(cls) -> Damping:
        """No damping and no cap (the plain curvature, e.g. an undamped FVP)."""
        return cls("exact", 0.0, 0.0, 0.0, None)

    @classmethod
    def coerce(cls, value: Damping | float | None, cfg: KFACConfig) -> Damping:
        """``None``: the config's damping; a number: the config's mode with ``δ = δ_A = δ_G = value``."""
        if value is None:
            return cls.from_config(cfg)
        if isinstance(value, Damping):
            return value
        v = float(value)
        if not v >= 0:
            raise ConfigError(f"Invalid damping: {value!r}. Must be a finite number >= 0.")
        return cls(cfg.damping_mode, v, v, v, cfg.max_condition_number)


def _cap(values: list[Tensor], kappa: float | None) -> list[Tensor]:
    """Raise eigenvalues below ``λ_max / κ`` to ``λ_max / κ`` (applied after damping)."""
    if kappa is None:
        return values
    top = max(float(v.max()) for v in values if v.numel())
    floor = top / kappa
    return [v.clamp_min(floor) for v in values]


def _power(values: list[Tensor], p: float, name: str, shift: float = 0.0) -> list[Tensor]:
    if p == 1.0:
        return values
    if p < 0 or not float(p).is_integer():
        live = [v for v in values if v.numel()]
        low = min(float(v.min()) for v in live)
        # For p < 0, eigenvalues within round-off of 0 (numpy matrix_rank's tolerance n·eps·λmax) count as 0.
        # That round-off is in the undamped eigenvalues: a damping shift > 0 makes the spectrum positive.
        tol = 0.0
        if p < 0 and shift <= 0.0:
            n = sum(v.numel() for v in live)
            tol = max(float(v.abs().max()) for v in live) * n * torch.finfo(live[0].dtype).eps
        if low <= tol if p < 0 else low < 0.0:
            raise SpectrumError(
                f"power p={p} of layer {name!r} needs a positive damped spectrum, but its smallest eigenvalue is "
                f"{low:.3e}; increase damping."
            )
    return [v.pow(p) for v in values]


def pi_factor(block: KronBlock) -> float:
    """``π`` of Martens & Grosse 2015 §6.3: ``π² = (tr A / dim A) / (tr G / dim G)`` (1 if a trace is 0)."""
    ta = block.A.trace() / block.A.dim
    tg = block.G.trace() / block.G.dim
    if ta <= 0 or tg <= 0:
        return 1.0
    return math.sqrt(ta / tg)


def _factor_parts(eig: Any, shift: float, thin: bool, damping: Damping, p: float, name: str) -> list[Tensor]:
    """``(λ + shift)^p`` of one factor, capped, and of its tail as a 1-element tensor when the basis is ``thin``."""
    parts = [eig.values + shift]
    if thin:
        parts.append(torch.full((1,), eig.tail + shift, dtype=eig.values.dtype, device=eig.values.device))
    return _power(_cap(parts, damping.max_condition_number), p, name, shift)


def spectrum(block: KronBlock, p: float, damping: Damping, name: str = "?") -> tuple[Tensor, Tensor | None]:
    """Eigenvalues of ``(F + damping)^p`` in the block's Kronecker eigenbasis, cached on the (immutable) block.

    * EK-FAC blocks and ``mode="exact"``: ``(λ_ij + δ)^p`` with ``λ_ij = λ^G_i λ^A_j`` or ``Λ*_ij``.
    * ``"factored"`` / ``"pi"``: ``(λ^G_i + δ_G)^p (λ^A_j + δ_A)^p``, with ``δ_A = π√δ``, ``δ_G = √δ/π`` for pi.

    The condition-number cap acts after damping (per factor, or on the Kronecker eigenvalues).
    """
    key = (float(p), damping)
    hit = block.cache.get(key)
    if hit is not None:
        return hit
    side = block.thin_side
    mode = "exact" if block.is_ekfac else damping.mode
    if mode == "exact":
        span, tail = block.kron_eigenvalues()
        parts = [span + damping.delta] + ([tail + damping.delta] if side and tail is not None else [])
        parts = _power(_cap(parts, damping.max_condition_number), p, name, damping.delta)
        result = (parts[0], parts[1] if len(parts) > 1 else None)
    else:
        if mode == "pi":
            pi = pi_factor(block)
            root = math.sqrt(damping.delta)
            d_a, d_g = pi * root, root / pi
        else:
            d_a, d_g = damping.delta_A, damping.delta_G
        a_parts = _factor_parts(block.A, d_a, side == "A", damping, p, name)
        g_parts = _factor_parts(block.G, d_g, side == "G", damping, p, name)
        ea = [e.to(g_parts[0].device) for e in a_parts]  # G may work elsewhere than A (a host fallback, docs/gpu.md)
        span = g_parts[0].unsqueeze(1) * ea[0].unsqueeze(0)
        tail = g_parts[1] * ea[0] if side == "G" else g_parts[0] * ea[1] if side == "A" else None
        result = (span, tail)
    block.cache[key] = result
    return result
