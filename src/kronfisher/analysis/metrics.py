"""Per-layer curvature metrics and model comparisons, as plain functions returning dicts (docs/concepts.md).

Spectra are handled with multiplicities, so a low-rank ``G`` (``r`` explicit eigenvalues plus an isotropic tail of
multiplicity ``out − r``) and its Kronecker spectrum (``r · a`` explicit values plus ``a`` tail values, each
``out − r`` times) are summarised exactly without expanding anything of size ``out``.

Definitions (``λ`` the eigenvalues with multiplicities, ``D`` their number, ``p = λ / Σλ``):

* effective rank: ``exp(−Σ p log p)`` (Roy & Vetterli 2007); for ``F = G ⊗ A`` it is the product of those of
  ``A`` and ``G``;
* condition number: ``λ_max / λ_min`` (infinite, ``None`` in JSON, when ``λ_min = 0``); *damped* uses the
  eigenvalues of ``F + damping`` under the configured damping mode (docs/concepts.md);
* top-1 % share: the fraction of ``tr F`` held by the ``⌈D / 100⌉`` largest eigenvalues;
* quadratic form: ``½ Δθᵀ F_base Δθ`` with ``Δθ = V_other − V_base`` (``V = [W | b]``), via the base's undamped
  Fisher-vector product (docs/concepts.md);
* subspace overlap: ``‖Q_baseᵀ Q_other‖_F² / k`` for the top-``k`` eigenvectors of a factor (1: same subspace,
  about ``k / d`` for random ones).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..algebra.block import KronBlock
from ..algebra.damping import Damping, spectrum
from ..layers import LayerInfo, combine, split
from ..operator import KFAC


@dataclass(frozen=True)
class Spectrum:
    """Eigenvalues with multiplicities (float64, both ``[n]``)."""

    values: Tensor
    mult: Tensor

    @property
    def dim(self) -> float:
        """Total number of eigenvalues ``D``."""
        return float(self.mult.sum())

    def trace(self) -> float:
        """``Σ m λ``."""
        return float((self.values * self.mult).sum())


def make_spectrum(parts: list[tuple[Tensor, float]]) -> Spectrum:
    """A :class:`Spectrum` from ``(values, multiplicity of each)`` parts; empty parts are skipped."""
    vals, mult = [], []
    for v, m in parts:
        v = v.detach().reshape(-1).to("cpu", torch.float64)
        if v.numel() and m > 0:
            vals.append(v.clamp_min(0.0))
            mult.append(torch.full_like(v, float(m)))
    if not vals:
        z = torch.zeros(0, dtype=torch.float64)
        return Spectrum(z, z)
    return Spectrum(torch.cat(vals), torch.cat(mult))


def factor_spectrum(eig: Any) -> Spectrum:
    """Eigenvalues of one factor, the isotropic tail of a thin basis counted ``dim − rank`` times."""
    parts: list[tuple[Tensor, float]] = [(eig.values, 1.0)]
    if eig.dim > eig.rank:
        parts.append((torch.tensor([float(eig.tail)], dtype=torch.float64), float(eig.dim - eig.rank)))
    return make_spectrum(parts)


def kron_spectrum(block: KronBlock, damping: Damping | None = None, name: str = "?") -> Spectrum:
    """Eigenvalues of the layer's ``F`` (K-FAC or EK-FAC), or of ``F + damping`` when ``damping`` is given."""
    if damping is None:
        span, tail = block.kron_eigenvalues()
    else:
        span, tail = spectrum(block, 1.0, damping, name)
    parts: list[tuple[Tensor, float]] = [(span, 1.0)]
    thin = block.A if block.thin_side == "A" else block.G  # the tail's multiplicity: the thin side's complement
    rest = thin.dim - thin.rank
    if rest > 0 and tail is not None:
        parts.append((tail, float(rest)))
    return make_spectrum(parts)


def _largest(spec: Spectrum, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest entries (each has multiplicity ≥ 1, so they hold the ``k`` largest eigenvalues), descending."""
    k = min(k, int(spec.values.numel()))
    vals, idx = torch.topk(spec.values, k, sorted=True)
    return vals, spec.mult[idx]


def top_values(spec: Spectrum, k: int = 5) -> list[float]:
    """The ``k`` largest eigenvalues (repeated by multiplicity)."""
    out: list[float] = []
    vals, mult = _largest(spec, k)
    for v, m in zip(vals.tolist(), mult.tolist()):
        out.extend([v] * min(int(m), k - len(out)))
        if len(out) >= k:
            break
    return out


def effective_rank(spec: Spectrum) -> float:
    """``exp(−Σ p log p)`` with ``p = λ / tr`` (Roy & Vetterli 2007); 0 for a zero spectrum."""
    tr = spec.trace()
    if tr <= 0:
        return 0.0
    p = spec.values / tr
    h = -float((spec.mult * torch.special.xlogy(p, p)).sum())  # 0 log 0 = 0
    return math.exp(h)


def condition_number(spec: Spectrum) -> float:
    """``λ_max / λ_min`` over the spectrum (``inf`` when ``λ_min = 0``, ``nan`` when empty)."""
    if not spec.values.numel():
        return float("nan")
    hi, lo = float(spec.values.max()), float(spec.values.min())
    if hi <= 0:
        return float("nan")
    return hi / lo if lo > 0 else float("inf")


def top_share(spec: Spectrum, fraction: float = 0.01) -> float:
    """Share of the trace held by the ``⌈fraction · D⌉`` largest eigenvalues (multiplicities counted)."""
    tr = spec.trace()
    if tr <= 0 or not spec.values.numel():
        return 0.0
    k = max(1, math.ceil(fraction * spec.dim))
    vals, mult = _largest(spec, k)
    cum = torch.cumsum(mult, 0)
    full = int((cum <= k).sum())  # entries taken with their whole multiplicity
    mass = float((vals[:full] * mult[:full]).sum())
    taken = float(cum[full - 1]) if full else 0.0
    if full < vals.numel() and taken < k:
        mass += (k - taken) * float(vals[full])
    return mass / tr


def finite(x: float) -> float | None:
    """``x`` for JSON: ``None`` when infinite or NaN."""
    return x if math.isfinite(x) else None


_DEPTH = re.compile(r"\.(\d+)(?=\.|$)")


def layer_position(name: str) -> tuple[int | None, str]:
    """``(depth, module type)`` from a qualified name: the first numeric component is the depth.

    ``model.layers.3.self_attn.q_proj`` → ``(3, "self_attn.q_proj")``; ``lm_head`` → ``(None, "lm_head")``.
    """
    m = _DEPTH.search(name)
    if m is None:
        return None, name
    return int(m.group(1)), name[m.end() + 1 :] or name[: m.start()]


def _norm(t: Tensor) -> float:
    return float(t.to(torch.float64).norm())


_ROWS_ELEMENTS = 1 << 22  # float64 rows at a time in the gradient sums: 32 MiB, not a copy of a 151,936-row lm_head


def _grad_sums(g: Tensor, ng: Tensor | None) -> tuple[float, float | None, float | None]:
    """``‖g‖``, ``‖ng‖`` and ``⟨g, ng⟩`` in float64, over blocks of rows when the layer is large.

    A small layer is summed in one piece, exactly as ever; a large one (an lm_head) in blocks of rows, so the float64
    work is a few MiB instead of three copies of the layer (the sums then differ from one piece by round-off only).
    """
    step = max(1, _ROWS_ELEMENTS // max(1, g[0].numel())) if g.dim() and g.shape[0] else 1
    if g.dim() == 0 or g.shape[0] <= step:
        g64 = g.to(torch.float64)
        if ng is None:
            return _norm(g64), None, None
        ng64 = ng.to(torch.float64)
        return _norm(g64), _norm(ng64), float((g64 * ng64).sum())
    g2 = n2 = dot = 0.0
    for i in range(0, g.shape[0], step):
        gb = g[i : i + step].to(torch.float64)
        g2 += float(gb.square().sum())
        if ng is not None:
            nb = ng[i : i + step].to(torch.float64)
            n2 += float(nb.square().sum())
            dot += float((gb * nb).sum())
    if ng is None:
        return math.sqrt(g2), None, None
    return math.sqrt(g2), math.sqrt(n2), dot


def layer_metrics(
    fisher: KFAC,
    name: str,
    *,
    grad: Tensor | None = None,
    natgrad: Tensor | None = None,
    damping: Damping | None = None,
    top: int = 5,
) -> dict[str, Any]:
    """Every per-layer number of the report for one layer (docs/concepts.md).

    Args:
        fisher: the operator.
        name: layer name.
        grad: mean-loss gradient of ``V`` (``[out, a_dim]``), or None.
        natgrad: ``(F + damping)^{-1} grad`` as ``[out, a_dim]``, or None.
        damping: damping for the damped condition number (default: the fisher's configuration).
        top: how many top eigenvalues to list.

    """
    info: LayerInfo = fisher.infos[name]
    block = fisher.block(name)
    damp = damping or Damping.from_config(fisher.cfg)
    spec_a, spec_g = factor_spectrum(block.A), factor_spectrum(block.G)
    spec_f = kron_spectrum(block)
    spec_fd = kron_spectrum(block, damp, name)
    depth, mtype = layer_position(name)
    row: dict[str, Any] = {
        "depth": depth,
        "module_type": mtype,
        "in": info.in_features,
        "out": info.out_features,
        "bias": info.has_bias,
        "a_dim": info.a_dim,
        "params": info.out_features * info.a_dim,
        "representation": block.representation,
        "rank_A": block.A.rank,
        "rank_G": block.G.rank,
        "ekfac": block.is_ekfac,
        "tied_with": list(fisher.report.tied.get(name, [])),
        "T": float(block.tokens.get("T", 0.0)),
        "N": float(block.tokens.get("N", 0.0)),
        "trace_A": spec_a.trace(),
        "trace_G": spec_g.trace(),
        "trace_F": spec_f.trace(),
        "discarded_G": float(getattr(block.G, "discarded", 0.0)),
        "top_eigenvalues_A": top_values(spec_a, top),
        "top_eigenvalues_G": top_values(spec_g, top),
        "top_eigenvalues_F": top_values(spec_f, top),
        "effective_rank_A": effective_rank(spec_a),
        "effective_rank_G": effective_rank(spec_g),
        "effective_rank_F": effective_rank(spec_f),
        "condition_number_A": finite(condition_number(spec_a)),
        "condition_number_G": finite(condition_number(spec_g)),
        "condition_number_raw": finite(condition_number(spec_f)),
        "condition_number_damped": finite(condition_number(spec_fd)),
        "top1pct_trace_share": top_share(spec_f, 0.01),
    }
    if grad is not None:
        gn, ngn, dot = _grad_sums(grad, natgrad)
        row["grad_norm"] = gn
        if ngn is not None and dot is not None:
            row["natgrad_norm"] = ngn
            denom = gn * ngn
            row["cosine_grad_natgrad"] = dot / denom if denom > 0 else None
    return row


def layer_natural_gradient(fisher: KFAC, name: str, grad: Tensor) -> Tensor:
    """``(F + δ)^{-1} g`` of one layer as ``[out, a_dim]`` from its combined gradient ``g`` (``[out, a_dim]``).

    Touches only this layer's block, so a caller that goes layer by layer holds one natural gradient at a time.
    """
    info = fisher.infos[name]
    w, b = split(info, grad)
    vec = {info.weight_name: w}
    if b is not None and info.bias_name:
        vec[info.bias_name] = b
    ng = fisher.natural_gradient(vec)
    return combine(info, ng[info.weight_name], ng.get(info.bias_name) if info.bias_name else None)


def natural_gradients(fisher: KFAC, grads: dict[str, Tensor]) -> dict[str, Tensor]:
    """``(F + δ)^{-1} g`` per layer as ``[out, a_dim]`` from combined gradients (``{layer: [out, a_dim]}``).

    All layers at once; the report goes layer by layer with :func:`layer_natural_gradient` instead.
    """
    return {name: layer_natural_gradient(fisher, name, grads[name]) for name in fisher.layer_names if name in grads}


def totals(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Model-level sums: ``‖g‖`` and ``‖F⁻¹g‖`` over all layers (block-diagonal F), their cosine, traces."""
    g2 = sum(r.get("grad_norm", 0.0) ** 2 for r in rows.values())
    n2 = sum((r.get("natgrad_norm") or 0.0) ** 2 for r in rows.values())
    dot = sum(
        (r.get("cosine_grad_natgrad") or 0.0) * r.get("grad_norm", 0.0) * (r.get("natgrad_norm") or 0.0)
        for r in rows.values()
    )
    out: dict[str, Any] = {
        "layers": len(rows),
        "params": sum(r["params"] for r in rows.values()),
        "trace_F": sum(r["trace_F"] for r in rows.values()),
        "representations": {
            rep: sum(1 for r in rows.values() if r["representation"] == rep)
            for rep in sorted({r["representation"] for r in rows.values()})
        },
    }
    if any("grad_norm" in r for r in rows.values()):
        out["grad_norm"] = math.sqrt(g2)
        out["natgrad_norm"] = math.sqrt(n2)
        out["cosine_grad_natgrad"] = dot / math.sqrt(g2 * n2) if g2 > 0 and n2 > 0 else None
    return out


# Comparisons ----------------------------------------------------------------------------------------------------
def top_eigenvectors(eig: Any, k: int) -> Tensor:
    """The ``k`` eigenvectors with the largest eigenvalues (``[d, k]``), without materialising the rest."""
    k = min(k, eig.rank)
    order = torch.argsort(eig.values, descending=True)[:k]
    if eig.kind == "lowrank":  # low-rank eigenform P = W C: build only the k needed columns
        return dataclasses.replace(eig, coeffs=eig.coeffs[:, order], values=eig.values[order]).vectors
    return eig.vectors[:, order]


def subspace_overlap(a: Any, b: Any, k: int) -> float | None:
    """``‖Q_aᵀ Q_b‖_F² / k`` for the top-``k`` eigenvectors of two factors (``k`` capped by both ranks)."""
    k = min(k, a.rank, b.rank)
    if k <= 0:
        return None
    qa = top_eigenvectors(a, k).to(torch.float64)
    qb = top_eigenvectors(b, k).to(qa.device, torch.float64)
    return float((qa.t() @ qb).square().sum()) / k


def compare_layer(
    base: KFAC,
    name: str,
    v_base: Tensor,
    v_other: Tensor,
    other: KFAC | None = None,
    *,
    k: int = 16,
) -> dict[str, Any]:
    """Distance of one layer of another model from the base, measured with the base's Fisher.

    Args:
        base: the base model's operator.
        name: layer name.
        v_base: ``V = [W | b]`` of the base (``[out, a_dim]``).
        v_other: ``V`` of the other model.
        other: the other model's operator (for subspace overlaps), or None.
        k: subspace dimension of the overlaps.

    Returns:
        ``quadratic_form`` (``½ ΔVᵀ F_base ΔV``), ``relative_change`` (``‖ΔV‖ / ‖V_base‖``), ``delta_norm``,
        ``overlap_A`` and ``overlap_G`` (top-``k`` subspaces), ``k``.

    """
    info = base.infos[name]
    delta = (v_other.to(torch.float64) - v_base.to(torch.float64)).cpu()
    w, b = split(info, delta)
    vec = {info.weight_name: w}
    if b is not None and info.bias_name:
        vec[info.bias_name] = b
    fv = base.fvp(vec)
    fd = combine(info, fv[info.weight_name], fv.get(info.bias_name) if info.bias_name else None)
    base_norm = _norm(v_base)
    row: dict[str, Any] = {
        "quadratic_form": 0.5 * float((delta * fd.to(torch.float64).cpu()).sum()),
        "delta_norm": _norm(delta),
        "relative_change": _norm(delta) / base_norm if base_norm > 0 else None,
        "k": k,
    }
    if other is not None and name in other.layer_names:
        ba, bo = base.block(name), other.block(name)
        row["overlap_A"] = subspace_overlap(ba.A, bo.A, k)
        row["overlap_G"] = subspace_overlap(ba.G, bo.G, k)
    return row


HIGHLIGHTS: tuple[tuple[str, str, bool], ...] = (
    ("trace_F", "largest tr F (most curved)", True),
    ("condition_number_damped", "largest condition number of F + damping", True),
    ("natgrad_norm", "largest natural-gradient norm", True),
    ("cosine_grad_natgrad", "smallest cosine(g, (F+δ)⁻¹g) (preconditioning changes the direction most)", False),
)


def highlights(rows: dict[str, dict[str, Any]], n: int = 5) -> list[dict[str, Any]]:
    """The ``n`` most extreme layers for a few metrics: ``[{"metric", "title", "layers": [[name, value], ...]}]``."""
    out = []
    for key, title, largest in HIGHLIGHTS:
        vals = [(name, r[key]) for name, r in rows.items() if isinstance(r.get(key), (int, float))]
        vals = [(name, v) for name, v in vals if math.isfinite(v)]
        if vals:
            vals.sort(key=lambda x: x[1], reverse=largest)
            out.append({"metric": key, "title": title, "layers": [[name, v] for name, v in vals[:n]]})
    return out
