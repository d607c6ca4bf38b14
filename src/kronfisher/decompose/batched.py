"""Dense eighs on an accelerator: equal-sized factors batched, the host's share concurrent, float32 + refinement.

Called once by :func:`~kronfisher.decompose.local.decompose_local` before its own jobs; returns the dense factors it
decomposed (the rest go the usual way). Three options of :class:`~kronfisher.config.KFACConfig` (docs/gpu.md):

* ``eigh_batched`` (None: on for CUDA, off elsewhere): dense factors on an accelerator are grouped by size and each
  group is one ``torch.linalg.eigh`` on a ``[k, d, d]`` stack (one launch instead of ``k`` latency-bound ones;
  ``benchmarks/CUDA.md``). While the device works, the host's threads decompose a
  share of the smallest factors (:func:`host_share`, copied down once and their eigenbases copied back). The CUDA
  speed-up and the right share are pending a GPU run (``benchmarks/CUDA.md``).
* ``eigh_refine`` (off): a factor decomposed in float32 (``eigh_dtype="float32"`` or ``dim > eigh_max_dim``) gets one
  float64 refinement step (:func:`refine_eigh`, Ogita & Aishima 2018) built from six float64 GEMMs. Measured on CPU
  against float64 eigh (``benchmarks/eigh_refine.py``, table in ``benchmarks/CUDA.md``): orthogonality to float64
  precision and the eigenvalues of a flat spectrum to 2e-10 (d = 576) – 5e-9 (d = 1,536) of ``λ_max``, but
  eigenvalues far below ``λ_max`` keep float32's absolute error (one step cannot separate them), so the damped
  inverse of a fast-decaying factor is no better than plain float32: an opt-in, not a substitute for float64 eigh.

A group that runs out of device memory is decomposed factor by factor the usual way (with its own CPU fallback).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from ..algebra.eigen import Eigen, all_finite, safe_eigh
from ..collection import placement
from ..collection.sums import DenseSum, LayerSums
from ..config import KFACConfig
from ..errors import DecompositionError
from ..transfer import download, upload, wait
from .layer import decompose_dense, symmetric_mean

Key = tuple[str, str]  # ("A" | "G", layer)

DEVICE_CORES = 8.0  # eigh throughput of the accelerator in host cores (a guess pending a GPU run: benchmarks/CUDA.md)
STACK_BYTES = 2**30  # largest float64 stack of one batched eigh


def eigh_dtype(dim: int, cfg: KFACConfig) -> torch.dtype:
    """The dtype a ``dim``-sized factor is decomposed in (``eigh_dtype`` up to ``eigh_max_dim``, float32 above)."""
    return cfg.eigh_torch_dtype if dim <= cfg.eigh_max_dim else torch.float32


def batched_enabled(cfg: KFACConfig, device: torch.device) -> bool:
    """``eigh_batched``, where None means: on for CUDA, off elsewhere."""
    flag = getattr(cfg, "eigh_batched", None)
    return device.type == "cuda" if flag is None else bool(flag)


def refine_eigh(matrix: Tensor, values: Tensor, vectors: Tensor) -> tuple[Tensor, Tensor]:
    """One float64 refinement step of an approximate eigendecomposition (Ogita & Aishima 2018, Algorithm 1).

    With ``X`` the approximate eigenvectors, ``R = I − XᵀX`` and ``S = Xᵀ M X``, the eigenvalues are
    ``λ_i = s_ii / (1 − r_ii)`` and ``X ← X (I + E)`` with ``E_ij = (s_ij + λ_j r_ij) / (λ_j − λ_i)`` for pairs
    separated by more than ``δ = 2 (‖S − diag λ‖ + ‖M‖ ‖R‖)`` and ``E_ij = r_ij / 2`` otherwise (Frobenius norms:
    a larger, safer ``δ`` than the 2-norms of the paper), then one orthogonalisation step. Six ``d³`` float64 GEMMs;
    ``values`` is unused (the step recomputes them) and kept for the signature of an eigh.
    """
    del values
    m = matrix.to(torch.float64)
    x = vectors.to(torch.float64)
    r = torch.mm(x.t(), x).neg_()
    r.diagonal().add_(1.0)
    s = x.t() @ (m @ x)
    lam = s.diagonal() / (1.0 - r.diagonal())
    off = s.clone()
    off.diagonal().sub_(lam)
    delta = 2.0 * (torch.linalg.matrix_norm(off) + torch.linalg.matrix_norm(m) * torch.linalg.matrix_norm(r))
    gap = lam.unsqueeze(0) - lam.unsqueeze(1)  # [i, j] = λ_j − λ_i
    e = torch.where(gap.abs() > delta, (s + r * lam.unsqueeze(0)) / gap, r / 2)
    e.diagonal().copy_(r.diagonal() / 2)
    x = x + x @ e
    # Pairs just above δ get first-order rotations that are not small: one orthogonalisation step
    # X ← X (I + (I − XᵀX)/2) brings XᵀX back to I to second order (two more GEMMs).
    r = torch.mm(x.t(), x).neg_()
    r.diagonal().add_(1.0)
    return lam.clamp_min(0.0), x + x @ r.div_(2)


def eigh_one(mean: Tensor, *, name: str, factor: str, cfg: KFACConfig) -> Eigen:
    """One factor: :func:`safe_eigh` in its dtype, refined when ``eigh_refine`` and that dtype is float32."""
    dtype = eigh_dtype(mean.shape[0], cfg)
    values, vectors = safe_eigh(mean, name=name, factor=factor, dtype=dtype, symmetric=True)
    if getattr(cfg, "eigh_refine", False) and dtype == torch.float32:
        values, vectors = refine_eigh(mean, values, vectors)
    store = cfg.accumulate_torch_dtype
    return Eigen(vectors.to(store), values.to(store))


def eigh_stack(means: Sequence[Tensor], names: Sequence[tuple[str, str]], cfg: KFACConfig) -> list[Eigen]:
    """Equal-sized factors in one batched ``torch.linalg.eigh`` (one non-finite check for the whole stack)."""
    dtype = eigh_dtype(means[0].shape[0], cfg)
    stack = torch.stack([m.to(dtype) for m in means])
    if not bool(all_finite(stack)):
        bad = [f"{f} of {n!r}" for (n, f), m in zip(names, means) if not bool(all_finite(m))]
        raise DecompositionError(f"Factors {bad} ({list(means[0].shape)}) have non-finite entries.")
    try:
        values, vectors = torch.linalg.eigh(stack)
    except RuntimeError as err:  # torch.linalg.LinAlgError subclasses RuntimeError
        raise DecompositionError(f"Batched eigh of {len(means)} factors {list(names)[:4]}... failed: {err}") from err
    values.clamp_min_(0.0)
    out = []
    store = cfg.accumulate_torch_dtype
    refine = getattr(cfg, "eigh_refine", False) and dtype == torch.float32
    for i, mean in enumerate(means):
        val, vec = refine_eigh(mean, values[i], vectors[i]) if refine else (values[i], vectors[i])
        out.append(Eigen(vec.to(store), val.to(store)))
    return out


def host_share(costs: dict[Key, float], host_threads: int, device_cores: float = DEVICE_CORES) -> list[Key]:
    """The smallest factors whose cost is about the host's part of the total, ``H / (H + device_cores)``."""
    if host_threads < 1 or not costs:
        return []
    budget = sum(costs.values()) * host_threads / (host_threads + device_cores)
    share, used = [], 0.0
    for key in sorted(costs, key=lambda k: (costs[k], k)):
        if used + costs[key] > budget:
            break
        share.append(key)
        used += costs[key]
    return share


def _dense_parts(sums: dict[str, LayerSums], owner: dict[str, str]) -> dict[Key, DenseSum]:
    parts: dict[Key, DenseSum] = {}
    for name, layer in sums.items():
        if owner[name] == name:
            parts[("A", name)] = layer.A
        if isinstance(layer.G, DenseSum):
            parts[("G", name)] = layer.G
    return {k: p for k, p in parts.items() if p.count > 0 and not p.holds_rows}  # rows: the [T, T] route


def decompose_batched(sums: dict[str, LayerSums], owner: dict[str, str], cfg: KFACConfig) -> dict[Key, Eigen]:
    """Dense factors decomposed here (see the module docstring); an empty dict when no option applies.

    Args:
        sums: the layers' sums.
        owner: layer → the layer whose identical ``A`` is decomposed for it (only owners are decomposed).
        cfg: ``eigh_batched``, ``eigh_refine``, eigh dtypes.

    """
    parts = _dense_parts(sums, owner)
    on_device = {
        k: p for k, p in parts.items() if placement.is_accelerator(p.sum.device) and batched_enabled(cfg, p.sum.device)
    }
    out: dict[Key, Eigen] = {}
    if getattr(cfg, "eigh_refine", False):  # large float32 factors elsewhere: one at a time, every thread
        for key, part in parts.items():
            if key not in on_device and eigh_dtype(part.dim, cfg) == torch.float32:
                out[key] = eigh_one(symmetric_mean(part), name=key[1], factor=key[0], cfg=cfg)
    if not on_device:
        return out
    threads = torch.get_num_threads()
    host = set(host_share({k: float(p.dim) ** 3 for k, p in on_device.items()}, threads - 1))
    # Host share: means formed on the device, copied down together, one sync, then decomposed on host threads.
    means = {k: download(symmetric_mean(on_device[k])) for k in sorted(host)}
    for device in {on_device[k].sum.device for k in host}:
        wait(device)  # the copies above are asynchronous
    torch.set_num_threads(1)  # one eigh per host thread, single-threaded BLAS (as decompose/local.py's pool)
    try:
        with ThreadPoolExecutor(max_workers=max(1, min(threads - 1, len(host))), thread_name_prefix="kf-eigh") as pool:
            futures = {k: pool.submit(eigh_one, means[k], name=k[1], factor=k[0], cfg=cfg) for k in means}
            out.update(_device_groups({k: p for k, p in on_device.items() if k not in host}, cfg))
            for k, future in futures.items():
                eig = future.result()
                dev = on_device[k].sum.device
                out[k] = Eigen(upload(eig.vectors, dev), upload(eig.values, dev))
    finally:
        torch.set_num_threads(threads)
    return out


def _device_groups(parts: dict[Key, DenseSum], cfg: KFACConfig) -> dict[Key, Eigen]:
    """Batched eighs of equal-sized factors on their device; a group that runs out of memory goes one by one."""
    groups: dict[tuple[int, str], list[Key]] = {}
    for key in sorted(parts, key=lambda k: (-parts[k].dim, k)):
        groups.setdefault((parts[key].dim, str(parts[key].sum.device)), []).append(key)
    out: dict[Key, Eigen] = {}
    for (dim, _), keys in groups.items():
        per = max(1, STACK_BYTES // (dim * dim * 8))
        for start in range(0, len(keys), per):
            chunk = keys[start : start + per]
            try:
                eigs = eigh_stack([symmetric_mean(parts[k]) for k in chunk], [(k[1], k[0]) for k in chunk], cfg)
            except torch.OutOfMemoryError:
                eigs = [decompose_dense(k[1], parts[k], k[0], cfg) for k in chunk]  # its own CPU fallback
            out.update(zip(chunk, eigs))
    return out
