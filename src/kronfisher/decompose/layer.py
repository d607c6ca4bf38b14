"""Factor representations behind one interface and their decomposition (docs/concepts.md).

A :class:`KronBlock` is what the algebra knows about one layer: the eigenbasis of ``A`` (always dense), the
eigenbasis of ``G`` (dense, or thin low-rank plus tail) and, after EK-FAC, the corrected eigenvalues. Blocks are
immutable: updating factors builds new blocks, so a cached spectrum can never outlive the factors it came from
(a stale inverse is impossible by construction).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..algebra.block import KronBlock
from ..algebra.columns import Residence
from ..algebra.eigen import Eigen, safe_eigh
from ..algebra.lowrank import eigen_from_columns, eigen_from_rows
from ..collection import placement
from ..collection.sums import DenseSum, LayerSums
from ..config import KFACConfig


def _eigh_dtype(dim: int, cfg: KFACConfig) -> torch.dtype:
    return cfg.eigh_torch_dtype if dim <= cfg.eigh_max_dim else torch.float32


POOL_GRAM_MAX = 4096  # low-rank G with at most this many columns join the concurrent eighs (Gram ≤ 128 MiB)


def symmetric_mean(part: DenseSum) -> Tensor:
    """The normalised, symmetrised factor ``(S + Sᵀ) / (2c)`` in float64 (docs/concepts.md).

    Bit for bit ``(S + Sᵀ) / (2c)`` computed naively (addition commutes), but the transpose is one contiguous copy
    followed by a contiguous add instead of a strided ``S + Sᵀ`` (cheaper; ``benchmarks/``). The result is exactly
    symmetric, so :func:`~kronfisher.algebra.eigen.safe_eigh` may skip its own symmetrisation.
    """
    return _symmetric_mean(part.sum, part.count)


def _symmetric_mean(total: Tensor, count: float) -> Tensor:
    s = total.to(torch.float64)
    if count <= 0:
        return torch.zeros_like(s)
    out = s.t().contiguous()  # a new tensor even when the sum already is float64
    out.add_(s)
    return out.div_(2.0 * count)


def decompose_dense(name: str, part: DenseSum, factor: str, cfg: KFACConfig, *, thin: bool = False) -> Eigen:
    """Eigendecomposition of a dense factor sum where it lives; on CPU after a real accelerator OOM (docs/concepts.md).

    The float64 mean and the solver's workspace take several times the sum's memory: when they do not fit on the
    accelerator, the same matrix is decomposed on CPU (a :class:`~kronfisher.errors.PlacementWarning` names the
    layer, factor and size) and the eigenvectors are moved back next to the sum. ``thin``: a factor held as rows
    keeps the thin basis of its nonzero eigenvalues (``A``: :func:`decompose_layer` completes it where ``G`` is
    thin too).
    """
    device = part.device
    rows = part.holds_rows and part.num_rows > 0  # held only while T ≤ ρ d (collector.new_layer_sums)

    def run(where: torch.device) -> Eigen:
        if rows:  # rank ≤ T < d: from the [T, T] Gram of the held rows (exact, eigen_from_rows)
            work = _eigh_dtype(part.num_rows, cfg)  # the [T, T] eigh
            basis = work if part.dim <= cfg.eigh_max_dim else torch.float32  # the [d, d] completion, as a dense eigh
            x = part.row_matrix(work, where)
            return eigen_from_rows(
                [x],
                part.count,
                eigh_dtype=work,
                store_dtype=part.dtype,
                basis_dtype=basis,
                thin=thin,
                seen=thin and cfg.ekfac,  # the EK-FAC pass takes the rows' coordinates instead of projecting them
                name=name,
                factor=factor,
            )
        mean = _symmetric_mean(part.sum.to(where), part.count)
        return decompose_factor(mean, name=name, factor=factor, cfg=cfg, symmetric=True)

    what = f"the eigendecomposition of factor {factor} of layer {name!r} ({part.dim} × {part.dim})"
    eig = placement.on_cpu_after_oom(run, device, what)
    if eig.vectors.device != device:  # rerun on CPU: back to the sum's device if it can hold the result
        eig = placement.on_cpu_after_oom(
            lambda where: Eigen(eig.vectors.to(where), eig.values.to(where), eig.tail), device, what
        )
    return eig


def decompose_factor(mean: Tensor, *, name: str, factor: str, cfg: KFACConfig, symmetric: bool = False) -> Eigen:
    """Eigendecomposition of a normalised dense factor, stored in the accumulation dtype (docs/concepts.md).

    ``symmetric=True``: ``mean`` is exactly symmetric (:func:`symmetric_mean`), see :func:`safe_eigh`.
    """
    values, vectors = safe_eigh(
        mean, name=name, factor=factor, dtype=_eigh_dtype(mean.shape[0], cfg), symmetric=symmetric
    )
    store = cfg.accumulate_torch_dtype
    return Eigen(vectors.to(store), values.to(store))


def decompose_G(name: str, sums: LayerSums, cfg: KFACConfig) -> Eigen:
    """Eigenbasis of ``G``: dense eigh or the low-rank eigenform from ``Uᵀ U`` (docs/concepts.md)."""
    if sums.G.kind == "lowrank":
        work = torch.float64 if cfg.accumulate_torch_dtype == torch.float64 else torch.float32
        g = sums.G  # the arguments of LowRankSum.eigen (implicit thin basis, budget applied)
        cols = g.columns()
        tries: list[torch.device] = []

        def run(where: torch.device) -> Eigen:  # again on the host after a real out-of-memory error (docs/gpu.md)
            tries.append(where)
            store = cols if len(tries) == 1 else cols.on(Residence(where))
            return eigen_from_columns(
                store, g.count, g.tail_mass, max_rank=g.max_rank, dtype=work, name=name, gram_dtype=g.gram_dtype
            )

        what = f"the low-rank eigenform of G of layer {name!r} ({g.num_columns} columns of out={g.dim})"
        return placement.on_cpu_after_oom(run, cols.device, what)
    return decompose_dense(name, sums.G, "G", cfg)


def decompose_layer(
    name: str, sums: LayerSums, cfg: KFACConfig, shared_A: Eigen | None = None, shared_G: Eigen | None = None
) -> KronBlock:
    """Decompose the factors of one layer (once per update; only eigenvectors and eigenvalues are kept).

    Args:
        name: layer name (for messages).
        sums: accumulated sums and counts.
        cfg: configuration (eigh dtype, storage dtype).
        shared_A: an already computed decomposition of an identical ``A`` (layers reading the same input).
        shared_G: an already computed decomposition of this layer's ``G`` (e.g. by another rank).

    """
    a_eig = shared_A or decompose_A(name, sums, cfg)
    g_eig = shared_G or decompose_G(name, sums, cfg)
    if not g_eig.full and not a_eig.full:  # one thin side per block (algebra.block): A gets its null space
        a_eig = a_eig.completed()
    # One factor moved to CPU by an OOM: the layer's algebra too.
    if g_eig.kind == "dense" and a_eig.device != g_eig.device:
        cpu = torch.device("cpu")
        a_eig = Eigen(a_eig.vectors.to(cpu), a_eig.values.to(cpu), a_eig.tail)
        g_eig = Eigen(g_eig.vectors.to(cpu), g_eig.values.to(cpu), g_eig.tail)
    tokens = {"T": sums.A.count, "N": sums.G.count}
    return KronBlock(a_eig, g_eig, tokens=tokens)


def shared_A_owners(sums: dict[str, LayerSums]) -> dict[str, str]:
    """Layer → first layer (in order) whose ``A`` sum is identical: the ``A`` decomposed once for both.

    Candidates are bucketed by shape, count, dtype and the bytes of the diagonal, and only a candidate in the same
    bucket is compared in full (``torch.equal``): identical sums always share a bucket, so the result is the
    all-pairs comparison's, without its cost (one full comparison per shared layer instead of one per pair).
    """
    owner: dict[str, str] = {}
    buckets: dict[tuple[Any, ...], list[tuple[str, Tensor]]] = {}
    by_rows: dict[tuple[Any, ...], str] = {}
    for name, layer in sums.items():
        if layer.A.holds_rows:  # rows shared by identity (one stored copy per staged input): no fold, no compare
            held = tuple((id(r), s, a) for r, s, a in layer.A.rows)
            key_rows = (held, float(layer.A.count), layer.A.dim, str(layer.A.device))
            owner[name] = by_rows.setdefault(key_rows, name)
            continue
        s = layer.A.sum
        diag = s.diagonal().detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()
        key = (tuple(s.shape), float(layer.A.count), s.dtype, str(s.device), diag)
        firsts = buckets.setdefault(key, [])
        owner[name] = next((first for first, other in firsts if torch.equal(other, s)), name)
        if owner[name] == name:
            firsts.append((name, s))
    return owner


def decompose_A(name: str, sums: LayerSums, cfg: KFACConfig) -> Eigen:
    """Eigendecomposition of a layer's ``A`` (always dense; thin when held as rows, docs/concepts.md)."""
    return decompose_dense(name, sums.A, "A", cfg, thin=True)
