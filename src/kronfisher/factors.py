"""Factor representations behind one interface and their decomposition (SPEC §4–6).

A :class:`KronBlock` is what the algebra knows about one layer: the eigenbasis of ``A`` (always dense), the
eigenbasis of ``G`` (dense, or thin low-rank plus tail) and, after EK-FAC, the corrected eigenvalues. Blocks are
immutable: updating factors builds new blocks, so a cached spectrum can never outlive the factors it came from
(seed bug 1, stale inverse cache, is impossible by construction).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor

from .accumulate import DenseSum, LayerSums, LowRankSum
from .config import KFACConfig
from .linalg import Eigen, safe_eigh
from .placement import on_cpu_after_oom


@dataclass(frozen=True)
class KronBlock:
    """Decomposed curvature block of one layer.

    Attributes:
        A: eigenbasis of ``A`` (``[a_dim, a_dim]``).
        G: eigenbasis of ``G`` (``[out, out]`` dense or ``[out, r]`` low-rank).
        representation: ``"dense"`` or ``"lowrank"``.
        corrected: EK-FAC eigenvalues ``Λ*`` on ``span(P) ⊗ span(Q_A)``, ``[r, a_dim]`` (SPEC §5), or None.
        corrected_tail: EK-FAC eigenvalue per ``q_j`` on the complement of a thin ``P`` (``[a_dim]``), or None.
        tokens: ``T`` and ``N`` counts the factors were normalised with.

    """

    A: Eigen
    G: Eigen
    representation: str
    corrected: Tensor | None = None
    corrected_tail: Tensor | None = None
    tokens: dict[str, float] = field(default_factory=dict)
    cache: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_ekfac(self) -> bool:
        """True when EK-FAC eigenvalues are present."""
        return self.corrected is not None

    def with_correction(self, corrected: Tensor, corrected_tail: Tensor | None) -> KronBlock:
        """A new block (fresh cache) with EK-FAC eigenvalues."""
        return KronBlock(self.A, self.G, self.representation, corrected, corrected_tail, dict(self.tokens))

    def kron_eigenvalues(self) -> tuple[Tensor, Tensor | None]:
        """Undamped eigenvalues: ``(span [r, a], tail [a] or None)``; EK-FAC ones when corrected (SPEC §4–5)."""
        if self.corrected is not None:
            return self.corrected, self.corrected_tail
        a_vals = self.A.values.to(self.G.values.device)  # low-rank G lives on CPU, A on the model's device (SPEC §6)
        span = self.G.values.unsqueeze(1) * a_vals.unsqueeze(0)
        tail = None if self.G.full else self.G.tail * a_vals
        return span, tail


def _eigh_dtype(dim: int, cfg: KFACConfig) -> torch.dtype:
    return cfg.eigh_torch_dtype if dim <= cfg.eigh_max_dim else torch.float32


POOL_GRAM_MAX = 4096  # low-rank G with at most this many columns join the concurrent eighs (Gram ≤ 128 MiB)


def symmetric_mean(part: DenseSum) -> Tensor:
    """The normalised, symmetrised factor ``(S + Sᵀ) / (2c)`` in float64 (SPEC §3.3, §4).

    Bit for bit :meth:`DenseSum.mean(torch.float64) <kronfisher.accumulate.DenseSum.mean>` (addition commutes), but
    the transpose is one contiguous copy followed by a contiguous add instead of a strided ``S + Sᵀ``: about 40 %
    less time per factor (d = 1,536 float64: 15 ms instead of 24 ms, against a 550 ms eigh). The result is
    exactly symmetric, so :func:`~kronfisher.linalg.safe_eigh` may skip its own symmetrisation.
    """
    return _symmetric_mean(part.sum, part.count)


def _symmetric_mean(total: Tensor, count: float) -> Tensor:
    s = total.to(torch.float64)
    if count <= 0:
        return torch.zeros_like(s)
    out = s.t().contiguous()  # a new tensor even when the sum already is float64
    out.add_(s)
    return out.div_(2.0 * count)


def decompose_dense(name: str, part: DenseSum, factor: str, cfg: KFACConfig) -> Eigen:
    """Eigendecomposition of a dense factor sum where it lives; on CPU after a real accelerator OOM (SPEC §4, §6).

    The float64 mean and the solver's workspace take several times the sum's memory: when they do not fit on the
    accelerator, the same matrix is decomposed on CPU (a :class:`~kronfisher.errors.PlacementWarning` names the
    layer, factor and size) and the eigenvectors are moved back next to the sum.
    """
    device = part.sum.device

    def run(where: torch.device) -> Eigen:
        mean = _symmetric_mean(part.sum.to(where), part.count)
        return decompose_factor(mean, name=name, factor=factor, cfg=cfg, symmetric=True)

    what = f"the eigendecomposition of factor {factor} of layer {name!r} ({part.dim} × {part.dim})"
    eig = on_cpu_after_oom(run, device, what)
    if eig.vectors.device != device:
        eig = Eigen(eig.vectors.to(device), eig.values.to(device))
    return eig


def decompose_factor(mean: Tensor, *, name: str, factor: str, cfg: KFACConfig, symmetric: bool = False) -> Eigen:
    """Eigendecomposition of a normalised dense factor, stored in the accumulation dtype (SPEC §4).

    ``symmetric=True``: ``mean`` is exactly symmetric (:func:`symmetric_mean`), see :func:`safe_eigh`.
    """
    values, vectors = safe_eigh(
        mean, name=name, factor=factor, dtype=_eigh_dtype(mean.shape[0], cfg), symmetric=symmetric
    )
    store = cfg.accumulate_torch_dtype
    return Eigen(vectors.to(store), values.to(store))


def decompose_G(name: str, sums: LayerSums, cfg: KFACConfig, gram: Tensor | None = None) -> Eigen:
    """Eigenbasis of ``G``: dense eigh (SPEC §4) or the low-rank eigenform from ``Uᵀ U`` (SPEC §6).

    ``gram``: the low-rank ``G``'s ``Wᵀ W`` when already computed (consumed; see :func:`decompose_all`).
    """
    if isinstance(sums.G, LowRankSum):
        work = torch.float64 if cfg.accumulate_torch_dtype == torch.float64 else torch.float32
        if gram is None:
            return sums.G.eigen(name=name, dtype=work)  # implicit thin basis from the float64 Gram, budget applied
        from .lowrank import eigen_from_columns

        g = sums.G  # the arguments of LowRankSum.eigen, with the Gram handed over
        return eigen_from_columns(
            g.columns(), g.count, g.tail_mass, max_rank=g.max_rank, dtype=work, name=name, gram=gram
        )
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
        shared_G: an already computed decomposition of this layer's ``G`` (e.g. by another rank, SPEC §8).

    """
    a_eig = shared_A or _decompose_A(name, sums, cfg)
    g_eig = shared_G or decompose_G(name, sums, cfg)
    rep = "lowrank" if isinstance(sums.G, LowRankSum) else "dense"
    if rep == "dense" and a_eig.device != g_eig.device:  # one factor moved to CPU by an OOM: the layer's algebra too
        cpu = torch.device("cpu")
        a_eig = Eigen(a_eig.vectors.to(cpu), a_eig.values.to(cpu), a_eig.tail)
        g_eig = Eigen(g_eig.vectors.to(cpu), g_eig.values.to(cpu), g_eig.tail)
    tokens = {"T": sums.A.count, "N": sums.G.count}
    return KronBlock(a_eig, g_eig, rep, tokens=tokens)


def shared_A_owners(sums: dict[str, LayerSums]) -> dict[str, str]:
    """Layer → first layer (in order) whose ``A`` sum is identical: the ``A`` decomposed once for both.

    Candidates are bucketed by shape, count, dtype and the bytes of the diagonal, and only a candidate in the same
    bucket is compared in full (``torch.equal``): identical sums always share a bucket, so the result is the
    all-pairs comparison's, without its cost (SmolLM2-135M, 210 layers: 8,595 full comparisons of 576² sums,
    7.2 s before the first eigh; now one per shared layer).
    """
    owner: dict[str, str] = {}
    buckets: dict[tuple[Any, ...], list[tuple[str, Tensor]]] = {}
    for name, layer in sums.items():
        s = layer.A.sum
        diag = s.diagonal().detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()
        key = (tuple(s.shape), float(layer.A.count), s.dtype, str(s.device), diag)
        firsts = buckets.setdefault(key, [])
        owner[name] = next((first for first, other in firsts if torch.equal(other, s)), name)
        if owner[name] == name:
            firsts.append((name, s))
    return owner


def decompose_all(
    sums: dict[str, LayerSums],
    cfg: KFACConfig,
    *,
    spread: bool = False,
    on_layer: Callable[[str], None] | None = None,
) -> dict[str, KronBlock]:
    """Decompose every layer; identical ``A`` sums (q/k/v, gate/up) are decomposed once and shared.

    With ``spread=True`` and a process group, the eigendecompositions are spread over ranks by cost and broadcast
    (SPEC §8, :func:`~kronfisher.spread.decompose_spread`); every rank must then call this together.
    ``on_layer(name)`` is called once per layer of the single-process path as soon as both its factors are
    decomposed (progress bars; with concurrent eighs, in order of completion).

    On CPU with more than one torch thread, the Grams ``Wᵀ W`` of low-rank ``G`` (GEMMs, with every thread) come
    first; then every eigh (dense factors and those Grams up to :data:`POOL_GRAM_MAX` columns) runs concurrently,
    one per thread (:func:`_run_jobs`). The factors are those of the sequential path (same matrices, same eigh).
    """
    if spread:
        from .distributed import is_distributed
        from .spread import decompose_spread

        if is_distributed():
            return decompose_spread(sums, cfg)
    owner = shared_A_owners(sums)
    jobs: dict[tuple[str, str], Callable[[], Eigen]] = {}
    for name, layer in sums.items():
        if owner[name] == name:
            jobs[("A", name)] = partial(_decompose_A, name, layer, cfg)
        jobs[("G", name)] = partial(decompose_G, name, layer, cfg)
    cost: dict[tuple[str, str], float] = {}
    if _on_cpu(sums) and torch.get_num_threads() > 1:
        for key in jobs:
            kind, name = key
            part = sums[name].A if kind == "A" else sums[name].G
            if not isinstance(part, LowRankSum):
                cost[key] = float(part.dim) ** 3
            elif 0 < part.num_columns <= POOL_GRAM_MAX and part.count > 0:
                gram = part.columns().gram()  # GEMM-bound: every thread, before the pool
                jobs[key] = partial(decompose_G, name, sums[name], cfg, gram=gram)
                cost[key] = float(part.num_columns) ** 3
    reported: set[str] = set()
    finished: set[tuple[str, str]] = set()

    def job_done(key: tuple[str, str]) -> None:  # concurrent path: a layer counts once both its factors are done
        finished.add(key)
        for name in sums:
            if name not in reported and {("A", owner[name]), ("G", name)} <= finished:
                reported.add(name)
                if on_layer is not None:
                    on_layer(name)

    results = _run_jobs(jobs, cost, on_done=job_done)
    blocks: dict[str, KronBlock] = {}
    for name, layer in sums.items():
        a_eig = results[("A", owner[name])]()
        blocks[name] = decompose_layer(name, layer, cfg, shared_A=a_eig, shared_G=results[("G", name)]())
        if on_layer is not None and name not in reported:
            on_layer(name)
    return blocks


def _decompose_A(name: str, sums: LayerSums, cfg: KFACConfig) -> Eigen:
    return decompose_dense(name, sums.A, "A", cfg)


def _on_cpu(sums: dict[str, LayerSums]) -> bool:
    for layer in sums.values():
        for part in (layer.A, layer.G):
            t = getattr(part, "sum", None)
            if t is not None and t.device.type != "cpu":
                return False
    return True


def _run_jobs(
    jobs: dict[tuple[str, str], Callable[[], Eigen]],
    concurrent: dict[tuple[str, str], float],
    on_done: Callable[[tuple[str, str]], None] | None = None,
) -> dict[tuple[str, str], Callable[[], Eigen]]:
    """Run the decompositions; returns a getter per job that raises that job's error (so in the caller's order).

    ``on_done(key)`` is called in the caller's thread as each concurrent job finishes (progress bars).

    The jobs in ``concurrent`` (key → cost) run at once on CPU when torch has more than one thread: largest first,
    one job per thread, BLAS single-threaded. LAPACK's eigh gains nothing from a second thread at these sizes
    (6 × 1,536 + 12 × 576 float64 on 2 cores: 4.6 s with 2 threads, 4.2 s with 1) while independent eighs scale
    (2.0 s). The thread count is restored afterwards. Every other job runs lazily in the caller's thread.
    """
    out = {key: _lazy(job) for key, job in jobs.items()}
    workers = min(torch.get_num_threads(), len(concurrent))
    if workers <= 1:
        return out
    from concurrent.futures import ThreadPoolExecutor, as_completed

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kronfisher-eigh") as pool:
            futures = {key: pool.submit(jobs[key]) for key in sorted(concurrent, key=lambda k: -concurrent[k])}
            keys = {future: key for key, future in futures.items()}
            for future in as_completed(keys):  # every job, before the thread count is restored
                if on_done is not None and future.exception() is None:
                    on_done(keys[future])
    finally:
        torch.set_num_threads(threads)
    out.update({key: future.result for key, future in futures.items()})
    return out


def _lazy(job: Callable[[], Eigen]) -> Callable[[], Eigen]:
    cell: list[Eigen] = []

    def get() -> Eigen:
        if not cell:
            cell.append(job())
        return cell[0]

    return get
