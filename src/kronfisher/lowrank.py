"""Huge output layers: the low-rank representation of ``G`` (SPEC §6).

``G = U Uᵀ`` with ``U = W / √N`` and ``W = [ĝ_1 … ĝ_T]`` (``[out, T]``). ``W`` is held token-major, as ``[n_i, out]``
chunks in ``lowrank_dtype`` (:class:`ColumnStore`); every product with it runs over blocks of ``out`` rows, each
upcast to the arithmetic dtype (float32 or higher), so nothing of size ``out × out`` (nor a second full copy of
``W``) is ever allocated.

**Eigenform** (:class:`LowRankEigen`). From the ``[T, T]`` Gram ``K = UᵀU = V diag(λ) Vᵀ`` (float64), the thin
eigenbasis of ``G`` is ``P = U V λ^{-1/2} = W C`` with ``C = V λ^{-1/2} / √N`` (``[T, r]``). ``P`` is kept *implicit*
(``W`` and ``C``): ``Pᵀ X = Cᵀ (Wᵀ X)`` and ``P Y = W (C Y)``, so the eigenbasis costs ``O(T²)`` memory on top of
``W`` instead of another ``out × T``. Eigenvalues below ``T · eps₆₄ · λ_max`` are round-off and dropped.

**Token budget** (``lowrank_max_rank = k``). When more than ``2k`` columns are held, they are replaced by the top-``k``
eigen-columns ``P diag(√s)`` of ``W Wᵀ`` (:func:`compress_columns`); the discarded eigenvalue mass ``D`` (``Σ_{i>k}
s_i``, measured in float64 on the *stored* columns) becomes an isotropic tail over the complement of the held span:
``G ≈ P diag(s) Pᵀ + τ (I − P Pᵀ)`` with ``τ = D / (N (out − r))``, so ``tr G`` is exact. Columns seen after a
compression are appended and compressed with the kept ones next time; decomposition truncates to ``k``. Memory stays
``O(out · k)``. **Error bound**: ``G_sum − G̃_sum = R − (D/(out − r)) (I − P Pᵀ)`` where ``R`` (the sum of every
discarded part) is PSD with ``tr R = D``. Hence, with ``d = D / N`` the normalised discarded mass reported as
``discarded``: ``tr(G − G̃) = 0``, ``‖G − G̃‖_* ≤ 2d`` and ``‖G − G̃‖₂ ≤ d`` (up to the rounding of the stored
columns in ``lowrank_dtype``).

**Woodbury** (:func:`woodbury_kron_apply`): ``(G + δ_G I)^{-1} V (A + δ_A I)^{-1}`` with the ``[T, T]`` solve of
:func:`~kronfisher.linalg.woodbury_factor`; the eigenform stays the default (``lowrank_solver``).

**Tied weights**: :func:`find_tied` lists tracked layers whose weight is also another parameter (lm_head / embedding).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ConfigError, KronfisherError, ShapeError
from .linalg import Eigen, safe_eigh, woodbury_factor

BLOCK_BYTES = 16 * 2**20  # size of one upcast block of W (or of V) in the blockwise products


def _row_blocks(rows: int, width: int, itemsize: int) -> Iterator[tuple[int, int]]:
    """Ranges of ``rows`` so that a ``[block, width]`` tensor of ``itemsize`` bytes stays near ``BLOCK_BYTES``."""
    step = max(256, BLOCK_BYTES // max(width * itemsize, 1))
    for start in range(0, rows, step):
        yield start, min(start + step, rows)


class ColumnStore:
    """``W`` (``[out, m]``) held token-major as immutable ``[n_i, out]`` chunks in a storage dtype.

    Args:
        chunks: ``[n_i, out]`` tensors (same ``out``, dtype and device); never modified in place.
        dim: ``out`` (needed when there are no chunks).

    """

    def __init__(self, chunks: tuple[Tensor, ...] | list[Tensor], dim: int) -> None:
        self.chunks = tuple(c for c in chunks if c.shape[0])
        self.dim = int(dim)
        for c in self.chunks:
            if c.dim() != 2 or c.shape[1] != self.dim:
                raise ShapeError(f"Low-rank columns must be stored as [n, out={self.dim}], got {list(c.shape)}.")

    @property
    def m(self) -> int:
        """Number of columns of ``W``."""
        return sum(int(c.shape[0]) for c in self.chunks)

    @property
    def device(self) -> torch.device:
        """Device of the stored chunks (CPU for huge layers, SPEC §6)."""
        return self.chunks[0].device if self.chunks else torch.device("cpu")

    def block(self, start: int, stop: int, dtype: torch.dtype) -> Tensor:
        """``W[start:stop]ᵀ`` as ``[m, stop − start]`` in ``dtype`` (a view when one chunk already has ``dtype``)."""
        parts = [c[:, start:stop] for c in self.chunks]
        if not parts:
            return torch.zeros(0, stop - start, dtype=dtype)
        blk = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        return blk.to(dtype)

    def blocks(self, dtype: torch.dtype, width: int | None = None) -> Iterator[tuple[int, int, Tensor]]:
        """``(start, stop, W[start:stop]ᵀ)`` over the rows of ``W``; blocks sized for ``max(m, width)`` columns."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        for start, stop in _row_blocks(self.dim, max(self.m, width or 1), itemsize):
            yield start, stop, self.block(start, stop, dtype)

    def gram(self) -> Tensor:
        """``Wᵀ W`` (``[m, m]``, float64), accumulated block by block; only upper tiles are multiplied."""
        m, tile = self.m, 1024
        out = torch.zeros(m, m, dtype=torch.float64, device=self.device)
        for _, _, blk in self.blocks(torch.float64):
            if m <= tile:
                out.addmm_(blk, blk.t())
                continue
            for i in range(0, m, tile):
                out[i : i + tile, i:].addmm_(blk[i : i + tile], blk[i:].t())
        for i in range(0, m, tile):  # mirror the upper tiles into the lower ones, tile by tile (no m² temporary)
            for j in range(i + tile, m, tile):
                out[j : j + tile, i : i + tile].copy_(out[i : i + tile, j : j + tile].t())
        return out

    def rows_matmul(self, x: Tensor) -> Tensor:
        """``x W`` for ``x`` of shape ``[n, out]`` (``[n, m]``), in ``x``'s dtype, on the store's device."""
        x = x.to(self.device)
        out = torch.zeros(x.shape[0], self.m, dtype=x.dtype, device=self.device)
        for start, stop, blk in self.blocks(x.dtype, width=x.shape[0]):
            out.addmm_(x[:, start:stop], blk.t())
        return out

    def square_sum(self) -> float:
        """``‖W‖_F² = tr(W Wᵀ)`` in float64."""
        return sum(float(blk.square().sum()) for _, _, blk in self.blocks(torch.float64))


@dataclass(frozen=True, eq=False)
class LowRankEigen:
    """Thin eigenbasis of a low-rank ``G`` with an implicit basis ``P = W C`` (SPEC §6).

    Same interface as :class:`~kronfisher.linalg.Eigen` (``values``, ``tail``, ``dim``, ``rank``, ``full``,
    ``trace``, ``cast``, ``vectors``, ``to_dense``, ``rows_project``), so operators, EK-FAC and files need not know
    which one they hold. ``G = P diag(values) Pᵀ + tail (I − P Pᵀ)``.

    Attributes:
        columns: ``W`` (``[out, m]``, stored token-major in ``lowrank_dtype``).
        coeffs: ``C`` (``[m, r]``) in the arithmetic dtype.
        values: eigenvalues ``λ`` (``[r]``, descending, > 0).
        tail: isotropic eigenvalue ``τ`` on the complement of ``span(P)``.
        discarded: normalised eigenvalue mass moved into the tail by the token budget (``τ (out − r)``).

    """

    columns: ColumnStore
    coeffs: Tensor
    values: Tensor
    tail: float = 0.0
    discarded: float = 0.0

    implicit = True

    @property
    def dim(self) -> int:
        """Dimension ``out`` of ``G``."""
        return self.columns.dim

    @property
    def rank(self) -> int:
        """Number of explicit eigenpairs ``r``."""
        return int(self.values.shape[0])

    @property
    def full(self) -> bool:
        """True when the explicit eigenpairs span the whole space (``r = out``)."""
        return self.rank == self.dim

    @property
    def device(self) -> torch.device:
        """Where the ``G`` side lives (CPU for huge layers)."""
        return self.columns.device

    def trace(self) -> float:
        """``tr G`` including the tail."""
        return float(self.values.sum()) + self.tail * (self.dim - self.rank)

    def cast(self, dtype: torch.dtype) -> LowRankEigen:
        """The same eigenbasis with arithmetic in ``dtype`` (``W`` stays in its storage dtype)."""
        if self.coeffs.dtype == dtype:
            return self
        return LowRankEigen(self.columns, self.coeffs.to(dtype), self.values.to(dtype), self.tail, self.discarded)

    @property
    def vectors(self) -> Tensor:
        """``P`` materialised (``[out, r]``, ``O(out · r)`` memory; the algebra never needs it)."""
        out = torch.empty(self.dim, self.rank, dtype=self.coeffs.dtype, device=self.device)
        for start, stop, blk in self.columns.blocks(self.coeffs.dtype):
            out[start:stop] = blk.t() @ self.coeffs
        return out

    def rows_project(self, x: Tensor) -> Tensor:
        """``x P`` for ``x`` of shape ``[..., out]`` (``[..., r]``), computed where ``W`` lives."""
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.dim)
        return (self.columns.rows_matmul(flat) @ self.coeffs.to(x.dtype)).reshape(*lead, self.rank)

    def to_dense(self, max_elements: int = 100_000_000) -> Tensor:
        """Dense ``G`` (diagnostics only); refuses when ``out²`` exceeds ``max_elements``."""
        if self.dim * self.dim > max_elements:
            raise KronfisherError(
                f"Dense G of a low-rank layer would have out² = {self.dim}² elements (> {max_elements}); "
                "it is a diagnostic for small layers."
            )
        p = self.vectors
        m = (p * self.values) @ p.t()
        if not self.full and self.tail != 0.0:
            m = m + self.tail * (torch.eye(self.dim, dtype=p.dtype, device=p.device) - p @ p.t())
        return m


def eigen_from_columns(
    columns: ColumnStore,
    count: float,
    tail_mass: float = 0.0,
    *,
    max_rank: int | None = None,
    dtype: torch.dtype = torch.float32,
    name: str = "?",
    gram: Tensor | None = None,
) -> LowRankEigen:
    """Thin eigendecomposition of ``G = W Wᵀ / N`` (+ tail) from the float64 Gram of ``W`` (SPEC §6).

    Args:
        columns: ``W``.
        count: ``N`` (loss terms).
        tail_mass: discarded mass of earlier compressions (un-normalised, in units of ``W Wᵀ``).
        max_rank: token budget ``k``; further eigenpairs move into the tail (trace kept).
        dtype: arithmetic dtype of ``C`` and the eigenvalues.
        name: layer name for messages.
        gram: ``columns.gram()`` when the caller already computed it (the GEMM-bound part, run with every thread
            before the eighs run concurrently, :func:`kronfisher.factors.decompose_all`); it is consumed (scaled in
            place). None: computed here.

    """
    n = float(count)
    d, m = columns.dim, columns.m
    if n <= 0 or m == 0:
        tail = tail_mass / n / d if n > 0 else 0.0
        empty = torch.zeros(0, dtype=dtype, device=columns.device)
        return LowRankEigen(columns, empty.reshape(m, 0), empty, tail, tail * d)
    gram = (columns.gram() if gram is None else gram).div_(n)  # K = Uᵀ U
    vals, vecs = safe_eigh(gram, name=name, factor="G (Gram of U)", dtype=torch.float64)
    vals, order = torch.sort(vals, descending=True)
    vecs = vecs[:, order]
    live = int((vals > float(vals[0]) * m * torch.finfo(torch.float64).eps).sum()) if float(vals[0]) > 0 else 0
    r = live if max_rank is None else min(live, max_rank)
    tail_trace = tail_mass / n + float(vals[r:live].sum())
    if r >= d:
        tail_trace, r = 0.0, d  # no complement (k ≥ out): nothing to spread
    tau = tail_trace / (d - r) if d > r else 0.0
    coeffs = vecs[:, :r] / (vals[:r].sqrt() * math.sqrt(n))
    return LowRankEigen(columns, coeffs.to(dtype), vals[:r].to(dtype), tau, tail_trace)


def compress_columns(columns: ColumnStore, k: int, storage: torch.dtype) -> tuple[Tensor, float]:
    """Top-``k`` eigen-columns ``P diag(√s)`` of ``W Wᵀ`` and the discarded mass (SPEC §6 token budget).

    Returns:
        ``(kept, dropped)``: ``kept`` is ``[k', out]`` token-major in ``storage`` (``k' ≤ k``, numerically zero
        directions dropped) and ``dropped = ‖W‖_F² − ‖kept‖_F²`` measured in float64 on the stored values, so the
        trace is exact whatever ``storage`` rounds.

    """
    gram = columns.gram()
    total = float(gram.diagonal().sum())
    vals, vecs = safe_eigh(gram, name="lowrank", factor="G (compression)", dtype=torch.float64)
    vals, order = torch.sort(vals, descending=True)
    live = int((vals > float(vals[0]) * columns.m * torch.finfo(torch.float64).eps).sum()) if float(vals[0]) > 0 else 0
    top = vecs[:, order[: min(k, live)]]  # [m, k']
    kept = torch.empty(top.shape[1], columns.dim, dtype=storage, device=columns.device)
    kept_mass = 0.0
    for start, stop, blk in columns.blocks(torch.float64):
        part = (top.t() @ blk).to(storage)
        kept[:, start:stop] = part
        kept_mass += float(part.to(torch.float64).square().sum())
    return kept, max(total - kept_mass, 0.0)


def _left_factors(g: Any) -> tuple[ColumnStore, Tensor | None]:
    """``(B, C)`` with ``P = B C`` (``C`` None: ``P = B``), for implicit and explicit thin bases."""
    if getattr(g, "implicit", False):
        return g.columns, g.coeffs
    return ColumnStore([g.vectors.t()], g.dim), None


def _two_pass(
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
    temporaries are alive, on ``store``'s device (the ``G`` side, SPEC §6).
    """
    dev = store.device
    d, a_dim = v.shape
    q = q.to(dev, work)
    itemsize = torch.empty((), dtype=work).element_size()
    ranges = list(_row_blocks(d, max(store.m, a_dim), itemsize))
    step = max(stop - start for start, stop in ranges) if ranges else 0
    vq = torch.empty(step, a_dim, dtype=work, device=dev)  # V[b] Q, reused by every block
    acc = torch.zeros(store.m, a_dim, dtype=work, device=dev)
    for start, stop in ranges:
        n = stop - start
        torch.mm(v[start:stop].to(dev, work), q, out=vq[:n])
        acc.addmm_(store.block(start, stop, work), vq[:n])
    y = middle(acc if coeffs is None else coeffs.to(dev, work).t() @ acc)
    del acc
    z = y if coeffs is None else coeffs.to(dev, work) @ y
    del y
    out = torch.empty(d, a_dim, dtype=work, device=dev)
    rows = torch.empty(step, a_dim, dtype=work, device=dev)
    for start, stop in ranges:
        n = stop - start
        torch.mm(store.block(start, stop, work).t(), z, out=rows[:n])
        if diag is not None:
            torch.mm(v[start:stop].to(dev, work), q, out=vq[:n])
            rows[:n].addcmul_(vq[:n], diag)
        if right is not None:
            rows[:n].mul_(right)
        torch.mm(rows[:n], q.t(), out=out[start:stop])
    return out


def thin_kron_apply(v: Tensor, g: Any, a: Eigen, span: Tensor, tail: Tensor | None) -> Tensor:
    """:func:`~kronfisher.linalg.kron_apply` for a thin (or implicit) ``P``, blockwise on the ``G`` side's device.

    ``out = P (span ∘ Pᵀ V Q) Qᵀ + ((I − P Pᵀ) V Q) diag(tail) Qᵀ = (P ((span − tail) ∘ y) + (V Q) ∘ tail) Qᵀ``
    with ``y = Pᵀ V Q``; ``tail`` None maps the complement to 0. The result is on the ``G`` side's device.
    """
    store, coeffs = _left_factors(g)
    work = v.dtype
    span = span.to(store.device, work)
    tail_v = None if tail is None else tail.to(store.device, work)
    lam = span if tail_v is None else span - tail_v
    return _two_pass(v, store, coeffs, a.vectors, lambda y: y.mul_(lam), None, tail_v, work)


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
    """``(G + δ_G I)^{-1} V Q diag(a_scale) Qᵀ`` with ``G = W Wᵀ / N`` by Woodbury (SPEC §6).

    ``(G + δI)^{-1} X = X/δ − U S^{-1} Uᵀ X / δ² = X/δ − W S^{-1} Wᵀ X / (N δ²)`` with ``U = W/√N`` and
    ``S = I_T + UᵀU/δ``; ``solve`` applies ``S^{-1}`` (:func:`~kronfisher.linalg.woodbury_factor`).
    """
    work = v.dtype
    factor = -1.0 / (float(count) * delta_g**2)

    def middle(wtx: Tensor) -> Tensor:
        return solve(wtx.to(torch.float64)).to(work) * factor

    diag = torch.full((v.shape[1],), 1.0 / delta_g, dtype=work, device=store.device)
    return _two_pass(v, store, None, a.vectors, middle, a_scale.to(store.device, work), diag, work)


def woodbury_power(block: Any, v: Tensor, damping: Any, name: str) -> Tensor:
    """``(F + δ)^{-1} V`` of a low-rank block by Woodbury (``lowrank_solver="woodbury"``; factored or pi damping).

    ``S`` is factorised once per ``δ_G`` and cached on the (immutable) block.

    Raises:
        ConfigError: the block or damping does not factor (EK-FAC, exact mode, cap, compressed tail).

    """
    from .damping import pi_factor

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
    if getattr(block.G, "implicit", False):  # G = W Wᵀ / N from the collected columns
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


# Tied weights -----------------------------------------------------------------------------------------------
def find_tied(model: nn.Module, infos: dict[str, Any]) -> dict[str, list[str]]:
    """Tracked layers whose weight is also registered under other names (tied lm_head / embedding, SPEC §6).

    Returns:
        ``{layer: [other parameter names]}``, e.g. ``{"lm_head": ["model.embed_tokens.weight"]}``.

    """
    names_by_param: dict[int, list[str]] = {}
    for pname, param in model.named_parameters(remove_duplicate=False):
        names_by_param.setdefault(id(param), []).append(pname)
    tied: dict[str, list[str]] = {}
    for layer, info in infos.items():
        for group in names_by_param.values():
            if info.weight_name in group and len(group) > 1:
                tied[layer] = sorted(n for n in group if n != info.weight_name)
    return tied


def tied_message(tied: dict[str, list[str]]) -> str:
    """The warning text for tied layers (one message for the whole model)."""
    pairs = "; ".join(f"{layer!r} shares its weight with {others}" for layer, others in sorted(tied.items()))
    return (
        f"Tied weights: {pairs}. The curvature is that of the output-layer use only (SPEC §6: the embedding use is "
        "not in the factors); natural gradients are returned under the layer's own parameter name."
    )


def note_tied(report: Any, tied: dict[str, list[str]]) -> None:
    """Record tied layers in ``report.tied`` / ``report.warnings`` and warn once per collection."""
    from .errors import TiedWeightsWarning

    report.tied = dict(tied)
    if not tied:
        return
    msg = tied_message(tied)
    if msg not in report.warnings:
        report.warnings.append(msg)
        warnings.warn(msg, TiedWeightsWarning, stacklevel=3)
