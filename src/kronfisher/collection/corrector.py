"""The eigenvalue-correction pass (EK-FAC, George et al. 2018).

With ``A = Q_A Λ_A Q_Aᵀ`` and ``G = P Λ_G Pᵀ`` from the K-FAC pass, a second pass accumulates
``Λ*_ij = (1/N) Σ_s ((Pᵀ ∇_s Q_A)_ij)²`` where ``∇_s`` is a per-sample gradient of ``V`` built from ``ĝ`` (of the
summed loss). ``"sequence"`` granularity: ``∇_s = Σ_t ĝ_t a_tᵀ`` over a sequence; ``"token"``: ``∇_s = ĝ_t a_tᵀ``.
For a thin (low-rank) ``P`` the complement keeps one eigenvalue per ``q_j``: the mean of the squared projections
onto ``span(P)^⊥``, ``Λ*_⊥j = (1/N) Σ_s ‖(I − P Pᵀ) ∇_s q_j‖² / (out − r)``; for a thin ``Q_A`` (an ``A`` seen on
fewer tokens than its size) one per ``p_i``, ``Λ*_i⊥ = (1/N) Σ_s ‖p_iᵀ ∇_s (I − Q_A Q_Aᵀ)‖² / (a − s)`` (zero on the
data ``A`` was collected on). The correction applies to every layer.

The pass runs where each block's ``G`` side works (on an accelerator, ``U`` on the device or streamed through it):
no eigenvector crosses to the host per batch. A real out-of-memory error while allocating a layer's EK-FAC sums or
staging its contribution moves that layer's EK-FAC work to the host with a ``PlacementWarning`` (factor
``"EK-FAC"``, :mod:`~kronfisher.collection.placement`).
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import torch
from torch import Tensor

from ..algebra.block import KronBlock
from ..algebra.eigen import all_finite
from ..algebra.gram import compute_dtype
from ..algebra.lowrank import LowRankEigen
from ..config import KFACConfig
from ..layers import LayerInfo
from .hooks import BatchContext, Staged
from .placement import Placement, block_on
from .seen import RowCursor, lowrank_coords, lowrank_probes, scatter_rows


def _augment(x: Tensor, has_bias: bool, mask: Tensor | None = None) -> Tensor:
    if not has_bias:
        return x
    ones = torch.ones(*x.shape[:-1], 1, dtype=x.dtype, device=x.device)
    if mask is not None:
        ones = ones * mask.unsqueeze(-1).to(x.dtype)
    return torch.cat([x, ones], dim=-1)


def _scaled(z: Tensor, scale: float) -> Tensor:
    """``z · scale`` in place (``z`` is a fresh projection owned by the caller)."""
    return z if scale == 1.0 else z.mul_(scale)


class EigenCorrector:
    """Processor of the EK-FAC pass: stages squared eigenbasis projections of per-sample gradients."""

    def __init__(self, infos: dict[str, LayerInfo], blocks: dict[str, KronBlock], cfg: KFACConfig) -> None:
        self.infos = infos
        self.cfg = cfg
        dtype = cfg.accumulate_torch_dtype
        self.sums: dict[str, Tensor] = {}
        self.tail_sums: dict[str, Tensor] = {}
        self.counts: dict[str, float] = {n: 0.0 for n in blocks}
        self._scratch: dict[tuple[Any, ...], Tensor] = {}  # see add_span
        self._rotations: dict[tuple[Any, ...], Tensor] = {}  # Q_A in the work dtype on the work device, per block
        self.placement = Placement(on_fallback=self._move_to_host)
        self.blocks = dict(blocks)
        self.rows = RowCursor()  # the collected rows' coordinates instead of projections, where checked (.seen)
        self._g_probes = {n: lowrank_probes(b.G) for n, b in blocks.items() if isinstance(b.G, LowRankEigen)}
        for name, b in blocks.items():
            info = infos[name]

            def make(device: torch.device, b: KronBlock = b) -> tuple[Tensor, Tensor | None]:
                span = torch.zeros(b.G.rank, b.A.rank, dtype=dtype, device=device)
                width = {"G": b.A.rank, "A": b.G.rank}.get(b.thin_side or "")  # one tail value per eigenvector
                return span, None if width is None else torch.zeros(width, dtype=dtype, device=device)

            span, tail = self.placement.allocate(info, "EK-FAC", make, b.G.device)
            self.sums[name] = span
            if tail is not None:
                self.tail_sums[name] = tail

    def _move_to_host(self, name: str, factor: str) -> None:
        """After an out-of-memory error: this layer's block and EK-FAC sums on the host for the rest of the pass."""
        cpu = torch.device("cpu")
        self.blocks[name] = block_on(self.blocks[name], cpu)
        if name in self.sums:
            self.sums[name] = self.sums[name].to(cpu)
        if name in self.tail_sums:
            self.tail_sums[name] = self.tail_sums[name].to(cpu)

    def stage(self, name: str, x: Tensor, g: Tensor, ctx: BatchContext, cache: dict[Any, Any]) -> Staged:
        """Squared projections of this layer's per-sample gradients onto the Kronecker eigenbasis."""
        if name not in self.blocks:
            return []
        return self.placement.run(
            self.infos[name],
            "EK-FAC",
            lambda xd, gd: self._stage(name, xd, gd, ctx, cache, id(x)),
            x.detach(),
            g.detach(),
        )

    def _stage(self, name: str, x: Tensor, g: Tensor, ctx: BatchContext, cache: dict[Any, Any], xid: int) -> Staged:
        info, block = self.infos[name], self.blocks[name]
        work = compute_dtype(torch.promote_types(g.dtype, block.A.vectors.dtype))
        dev = block.G.device  # where the G side works: the device (U on it or streamed through it), or the host
        rot = (id(block.A.vectors), dev, work)
        q = self._rotations.get(rot)
        if q is None:  # once per pass, not per batch
            q = self._rotations[rot] = block.A.vectors.to(dev, work)
        side = block.thin_side
        dtype = self.cfg.accumulate_torch_dtype
        staged: Staged = []
        # Layers reading the same input with the same A eigenbasis (q/k/v, gate/up) share the rotated inputs
        # a Q_A (and their squares): computed once per forward, like A itself in the K-FAC pass.
        # Keyed by the captured input (``xid``), which lives for the whole forward, not by its detached alias (a new
        # object per call, whose id a later call may reuse): every MC draw of a forward shares the rotation.
        key = ("ekfac_y", self.cfg.ekfac_granularity, xid, id(block.A.vectors), info.has_bias, dev, work)
        hit = cache.get(key)
        # ĝ of the summed loss is grad_scale · g. The scale is applied to the projections z = gᵀ P
        # ([.., r]) instead of g ([.., out]): the same numbers up to rounding, and for a low-rank lm_head a
        # multiplication (and a copy) of r instead of out = vocab columns per token.
        scale = float(ctx.grad_scale)
        if self.cfg.ekfac_granularity == "token":
            if hit is None:
                a = _augment(ctx.select(x, info, "input"), info.has_bias).to(dev, work)  # [T, a]
                y = self._seen_A(name, block, a, cache)
                y = a @ q if y is None else y  # [T, s]
                y2 = y.square()
                # ‖(I − Q Qᵀ) a_t‖², for a thin Q only
                out_of_span = (a.square().sum(1) - y2.sum(1)).clamp_min(0.0) if side == "A" else None
                hit = cache[key] = (y, y2, out_of_span)
            y, y2, out_of_span = hit
            gr = ctx.select(g, info, "output gradient").to(dev, work)  # [T, out], unscaled
            z = self._seen_G(name, block, gr, scale, cache)
            z = _scaled(block.G.rows_project(gr), scale) if z is None else z  # [T, r]: ĝ_tᵀ P (implicit P: W C)
            z2 = z.square_()
            staged.append(self.span_entry(name, z2, y2, ctx.num_terms))
            if side == "G":
                resid = (gr.square().sum(1).mul_(scale * scale) - z2.sum(1)).clamp_min(0.0)  # ‖(I − PPᵀ) ĝ_t‖²
                tail = (resid @ y2) / max(block.G.dim - block.G.rank, 1)
                staged.append((name, "tail", tail.to(dtype), (0.0, None)))
            elif side == "A" and out_of_span is not None:
                tail = (out_of_span @ z2) / max(block.A.dim - block.A.rank, 1)
                staged.append((name, "tail", tail.to(dtype), (0.0, None)))
        else:
            if hit is None:
                a = _augment(ctx.masked(x, info, "input"), info.has_bias, ctx.mask).to(dev, work)  # [B, S, a]
                y = None
                if block.A.seen is not None and self.rows.live(("A", id(block.A.vectors))):
                    flat = _augment(ctx.select(x, info, "input"), info.has_bias).to(dev, work)
                    y = self._seen_A(name, block, flat, cache)
                    y = None if y is None else scatter_rows(y, ctx.rows, (a.shape[0], a.shape[1]))
                y = a @ q if y is None else y  # [B, S, s]
                # Gram of (I − Q Qᵀ) a per sequence, for a thin Q only
                out_of_span = (a @ a.transpose(1, 2)).sub_(y @ y.transpose(1, 2)) if side == "A" else None
                hit = cache[key] = (y, out_of_span)
            y, out_of_span = hit
            gr = ctx.masked(g, info, "output gradient").to(dev, work)  # [B, S, out], unscaled
            z = None
            if name in self._g_probes and self.rows.live(("G", name)):  # else no [n, out] selection per batch
                flat = ctx.select(g, info, "output gradient").to(dev, work)
                z = self._seen_G(name, block, flat, scale, cache)
                z = None if z is None else scatter_rows(z, ctx.rows, (gr.shape[0], gr.shape[1]))
            z = _scaled(block.G.rows_project(gr), scale) if z is None else z  # [B, S, r]
            staged.append(self.span_entry(name, z, y, ctx.num_terms))
            if side == "G":
                k = (gr @ gr.transpose(1, 2)).mul_(scale * scale)  # [B, S, S]: Gram of ĝ per sequence
                k.sub_(z @ z.transpose(1, 2))  # minus that of Pᵀ ĝ: Gram of (I − PPᵀ) ĝ
                tail = torch.einsum("btu,btj,buj->j", k, y, y).clamp_min(0.0)
                staged.append((name, "tail", (tail / max(block.G.dim - block.G.rank, 1)).to(dtype), (0.0, None)))
            elif side == "A" and out_of_span is not None:
                tail = torch.einsum("btu,bti,bui->i", out_of_span, z, z).clamp_min(0.0)
                staged.append((name, "tail", (tail / max(block.A.dim - block.A.rank, 1)).to(dtype), (0.0, None)))
        return staged

    def _seen_A(self, name: str, block: KronBlock, a: Tensor, cache: dict[Any, Any]) -> Tensor | None:
        """``a Q_A`` (``[n, s]``) from the coordinates of the collected rows, or None (:mod:`.seen`)."""
        seen = block.A.seen
        if seen is None:
            return None
        key = ("A", id(block.A.vectors))  # one stream per eigenbasis: layers sharing an input share its rows
        start = self.rows.take(key, f"A of layer {name!r}", a, seen.probes, cache, 1.0)
        return None if start is None else seen.coords[start : start + a.shape[0]].to(a.device, a.dtype)

    def _seen_G(self, name: str, block: KronBlock, g: Tensor, scale: float, cache: dict[Any, Any]) -> Tensor | None:
        """``ĝ P`` (``[n, r]``, ``ĝ = scale · g``) from the collected ``W`` of a low-rank ``G``, or None."""
        probes = self._g_probes.get(name)
        if probes is None or not isinstance(block.G, LowRankEigen):
            return None
        start = self.rows.take(("G", name), f"G of layer {name!r}", g, probes, cache, scale)
        if start is None:
            return None
        return lowrank_coords(block.G, block.tokens.get("N", 0.0), start, int(g.shape[0]), g.dtype, g.device)

    def add_span(self, total: Tensor, z: Tensor, y: Tensor) -> None:
        """``total += Σ_b (z_bᵀ y_b)²`` (sequence: ``z`` ``[B, S, r]``, ``y`` ``[B, S, a]``) or ``z²ᵀ y²`` (token).

        For token granularity ``z`` and ``y`` arrive squared (``[T, r]``, ``[T, a]``). Formed at commit from the
        staged projections, layer by layer, where the sum lives and straight into it: a batch holds the
        projections (``T · r`` per layer) instead of a second ``[r, a]`` copy of every layer's sum. Sequences go
        one at a time through a scratch matrix reused across layers and batches (fresh ``B · r · a`` temporaries
        cost more than the products on CPU).
        """
        z, y = z.to(total.device), y.to(total.device)
        direct = total.dtype == z.dtype
        if z.dim() == 2:  # token granularity
            if direct:
                total.addmm_(z.t(), y)
            else:
                total.add_(z.t() @ y)
            return
        r, a = z.shape[-1], y.shape[-1]
        key = (threading.get_ident(), z.device, z.dtype)  # autograd may run hooks on one thread per device
        buf = self._scratch.get(key)
        if buf is None or buf.numel() < r * a:
            buf = self._scratch[key] = torch.empty(r * a, dtype=z.dtype, device=z.device)
        m = buf[: r * a].view(r, a)
        acc = total if direct else torch.zeros(r, a, dtype=z.dtype, device=z.device)
        for b in range(z.shape[0]):
            torch.mm(z[b].t(), y[b], out=m)
            acc.addcmul_(m, m)
        if not direct:
            total.add_(acc)

    def check(self, entry: tuple[str, str, Tensor, Any]) -> Tensor:
        """0-d bool: the staged projections (and the rotated inputs they are paired with) are finite."""
        ok = all_finite(entry[2])
        other = entry[3][1]
        return ok if other is None else ok & all_finite(other).to(ok.device)

    def span_entry(self, name: str, z: Tensor, y: Tensor, count: float) -> tuple[str, str, Tensor, Any]:
        """What a layer call stages for its span sum: the smaller of its projections and its contribution.

        The projections ``z`` (``[.., r]``, paired with ``y``) when they have fewer rows than ``a``, the span sum is
        then formed at commit straight into the layer's sum; else the ``[r, a]`` contribution itself.
        """
        rows, r, a = z.numel() // max(z.shape[-1], 1), z.shape[-1], y.shape[-1]
        if rows <= a:
            return (name, "span", z, (count, y))  # formed at commit, in place
        span = torch.zeros(r, a, dtype=z.dtype, device=z.device)
        self.add_span(span, z, y)
        return (name, "span", span, (count, None))

    def commit(self, staged: Staged) -> None:
        """Add checked contributions: span sums from staged projections (in place) or staged ``[r, a]`` values."""
        for name, target, tensor, (count, y) in staged:
            if target == "span":
                if y is None:
                    self.sums[name].add_(tensor.to(self.sums[name].device, self.sums[name].dtype))
                else:
                    self.add_span(self.sums[name], tensor, y)
                self.counts[name] += count
            else:
                self.tail_sums[name].add_(tensor.to(self.tail_sums[name].device))
        self.rows.committed()

    def blocks_out(self) -> dict[str, KronBlock]:
        """Corrected blocks: ``Λ* = sum / N`` (docs/concepts.md), once: the sums become the eigenvalues in place."""
        out = {}
        for name, block in self.blocks.items():
            n = self.counts[name]
            if n <= 0:
                continue
            span = self.sums.pop(name).div_(n)  # no second copy of every layer's [r, a] sums at the end of a pass
            tail = self.tail_sums.pop(name).div_(n) if name in self.tail_sums else None
            store = block.A.vectors.dtype
            if block.A.seen is not None:  # the pass is done: the rows' coordinates are not part of the factors
                block = KronBlock(dataclasses.replace(block.A, seen=None), block.G, tokens=dict(block.tokens))
            out[name] = block.with_correction(span.to(store), None if tail is None else tail.to(store))
        return out
