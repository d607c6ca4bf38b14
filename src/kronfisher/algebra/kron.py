"""The Kronecker-eigenbasis apply ``(G ⊗ A + δ)^p`` for dense and low-rank ``G`` (Martens & Grosse 2015)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .columns import ColumnStore
from .eigen import Eigen


def _left_factors(g: Any) -> tuple[ColumnStore, Tensor | None]:
    """``(B, C)`` with ``P = B C`` (``C`` None: ``P = B``), for implicit and explicit thin bases."""
    if g.kind == "lowrank":
        return g.columns, g.coeffs
    return ColumnStore([g.vectors.t()], g.dim), None


def two_pass(
    v: Tensor,
    store: ColumnStore,
    coeffs: Tensor | None,
    q: Tensor,
    middle: Any,
    right: Tensor | None,
    diag: Tensor | None,
    work: torch.dtype,
) -> Tensor:
    """``((B C) · middle(Cᵀ Bᵀ V Q) + (V Q) ∘ diag) ∘ right · Qᵀ``, block by block over the rows of ``V``.

    ``B`` (``[out, m]``) is ``store``, ``C`` is ``coeffs`` (None: identity), ``diag`` scales the columns of ``V Q``
    and ``right`` the columns of the result before ``Qᵀ``. Pass 1 accumulates ``Bᵀ (V Q)`` (``[m, a]``); pass 2
    recomputes ``V[b] Q`` per block and writes the output rows, so only ``V``, the output and ``O(block)``
    temporaries are alive, on ``store``'s device (the ``G`` side).
    """
    dev = store.device
    d, a_dim = v.shape
    q = q.to(dev, work)
    ranges = store.ranges(a_dim, work)  # both passes over the same blocks (streamed from the host, if U is there)
    step = max(stop - start for start, stop in ranges) if ranges else 0
    vq = torch.empty(step, a_dim, dtype=work, device=dev)  # V[b] Q, reused by every block
    acc = torch.zeros(store.m, a_dim, dtype=work, device=dev)
    for start, stop, blk in store.blocks(work, ranges=ranges):
        n = stop - start
        torch.mm(v[start:stop].to(dev, work), q, out=vq[:n])
        acc.addmm_(blk, vq[:n])
    y = middle(acc if coeffs is None else coeffs.to(dev, work).t() @ acc)
    del acc
    z = y if coeffs is None else coeffs.to(dev, work) @ y
    del y
    out = torch.empty(d, a_dim, dtype=work, device=dev)
    rows = torch.empty(step, a_dim, dtype=work, device=dev)
    for start, stop, blk in store.blocks(work, ranges=ranges):
        n = stop - start
        torch.mm(blk.t(), z, out=rows[:n])
        if diag is not None:
            torch.mm(v[start:stop].to(dev, work), q, out=vq[:n])
            rows[:n].addcmul_(vq[:n], diag)
        if right is not None:
            rows[:n].mul_(right)
        torch.mm(rows[:n], q.t(), out=out[start:stop])
    return out


def thin_kron_apply(v: Tensor, g: Any, a: Eigen, span: Tensor, tail: Tensor | None) -> Tensor:
    """:func:`~kronfisher.algebra.kron.kron_apply` for a thin (or implicit) ``P``, blockwise on the ``G`` side's device.

    ``out = P (span ∘ Pᵀ V Q) Qᵀ + ((I − P Pᵀ) V Q) diag(tail) Qᵀ = (P ((span − tail) ∘ y) + (V Q) ∘ tail) Qᵀ``
    with ``y = Pᵀ V Q``; ``tail`` None maps the complement to 0. The result is on the ``G`` side's device.
    """
    store, coeffs = _left_factors(g)
    work = v.dtype
    span = span.to(store.device, work)
    tail_v = None if tail is None else tail.to(store.device, work)
    lam = span if tail_v is None else span - tail_v
    return two_pass(v, store, coeffs, a.vectors, lambda y: y.mul_(lam), None, tail_v, work)


def kron_apply(v: Tensor, g: Eigen, a: Eigen, span: Tensor, tail: Tensor | None) -> Tensor:
    """Apply a function of the Kronecker eigenvalues to ``V`` (``[out, a_dim]``), never building ``G ⊗ A``.

    The operator is ``Σ_ij span_ij (p_i ⊗ q_j)(p_i ⊗ q_j)ᵀ + Σ_j tail_j ((I − P Pᵀ) ⊗ q_j q_jᵀ)``, which in matrix
    form is ``P (span ∘ (Pᵀ V Q)) Qᵀ + ((I − P Pᵀ) V Q) diag(tail) Qᵀ`` (the tail term only when ``P`` is thin).

    A thin ``Q`` (``A`` seen on fewer tokens than its size) with a square ``P`` is the same sum with the roles of
    the two factors exchanged, ``Σ_i tail_i (p_i p_iᵀ ⊗ (I − Q Qᵀ))`` on the complement: it runs as the thin-``P``
    product of ``Vᵀ``.

    Args:
        v: ``[out, a_dim]`` matrix.
        g: eigenbasis of ``G`` (``P``, possibly thin).
        a: eigenbasis of ``A`` (``Q``, thin only when ``P`` is square).
        span: ``[r, s]`` eigenvalues on ``span(P) ⊗ span(Q)``.
        tail: eigenvalues on the complement of the thin side: ``[a_dim]`` on ``span(P)^⊥ ⊗ q_j``, or ``[out]`` on
            ``p_i ⊗ span(Q)^⊥`` (ignored when both bases are square).

    """
    if g.kind == "dense" and g.full and not a.full:
        return kron_apply(v.t(), a, g, span.t(), tail).t().contiguous()
    if g.kind == "lowrank" or not g.full:  # thin or implicit P: blockwise, on the G side's device
        return thin_kron_apply(v, g, a, span, tail)
    p, q = g.vectors, a.vectors
    x = v @ q  # [out, a]
    y = p.t() @ x  # [r, a]
    out = p @ (y * span)
    if not g.full and tail is not None:
        out = out + (x - p @ y) * tail
    return out @ q.t()
