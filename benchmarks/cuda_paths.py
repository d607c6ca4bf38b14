"""Sections ``stream`` and ``eigh`` of ``cuda_check.py``: the GPU paths that the CPU suite can only simulate.

* ``stream``: a float64 fit (EK-FAC, tiny GPT-2, low-rank lm_head with ``out = 300``) with ``U`` kept in host memory
  and streamed through the GPU in blocks of 60 rows (the side stream, events and pinned buffers of
  :func:`kronfisher.transfer.stream_blocks`) against the same fit on the CPU: max relative error of every dense
  EK-FAC block and of the natural gradient, and the bytes that crossed; then the same with ``U`` on the device
  (nothing may cross). With ``--device cpu`` the accelerator is simulated on the CPU, as in the tests.
* ``eigh``: float64 eighs of SmolLM2- and Qwen2-1.5B-sized factor sets one by one and stacked (``eigh_batched``),
  and float32 eigh + one float64 refinement step (``eigh_refine``) against float64 eigh for single large factors:
  the figures that decide the defaults of those options on CUDA.
"""

from __future__ import annotations

import time
from typing import Any

import torch

import kronfisher as kf
import kronfisher.algebra.columns as columns
import kronfisher.collection.placement as placement
from kronfisher.decompose.batched import eigh_stack, refine_eigh
from kronfisher.transfer import STATS


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def check_stream(
    device: str, model_fn: Any, batches: list[dict[str, torch.Tensor]], block_rows: int = 64
) -> dict[str, Any]:
    """Streamed (in blocks of ``block_rows`` rows) and device-resident ``U`` on ``device`` equal the CPU fit."""
    cfg = kf.KFACConfig(ekfac=True, accumulate_dtype="float64", lowrank_layers=("lm_head",), lowrank_dtype="float64")
    ref_model = model_fn().to(torch.float64)
    ref = kf.fit(ref_model, batches, cfg)
    gen = torch.Generator().manual_seed(3)
    probe = {n: torch.randn(p.shape, generator=gen, dtype=torch.float64) for n, p in ref_model.named_parameters()}
    nat_ref = ref.natural_gradient(probe)
    out: dict[str, Any] = {}
    saved = (placement.columns_on_device, columns.MIN_BLOCK_ROWS, columns.BLOCK_BYTES, placement.is_accelerator)
    if device == "cpu":  # dry run: the CPU simulates an accelerator, as the tests do (same copies, same counts)
        placement.is_accelerator = lambda dev: True  # type: ignore[assignment]
    for where in ("streamed", "device"):
        if where == "streamed":
            placement.columns_on_device = lambda info, dev, host: False  # type: ignore[assignment]
            columns.MIN_BLOCK_ROWS, columns.BLOCK_BYTES = block_rows, 1  # several blocks over out
        model = model_fn().to(torch.float64).to(device)
        STATS.reset()
        try:
            got = kf.fit(model, batches, cfg)
            nat = got.natural_gradient({k: v.to(device) for k, v in probe.items()})
        finally:
            placement.columns_on_device, columns.MIN_BLOCK_ROWS, columns.BLOCK_BYTES = saved[:3]  # type: ignore[assignment]
            if where == "device":
                placement.is_accelerator = saved[3]  # type: ignore[assignment]
        moved = STATS.snapshot()
        out[where] = {
            "max_rel_dense_ekfac": max(_rel(got.to_dense(n), ref.to_dense(n)) for n in ref.layer_names),
            "max_rel_natgrad": max(_rel(nat[k], nat_ref[k]) for k in nat_ref),
            "U_streamed": got.sums["lm_head"].G.columns().streamed,
            "G_device": str(got.block("lm_head").G.device),
            **moved,
        }
    s, d = out["streamed"], out["device"]
    out["ok"] = (
        max(s["max_rel_dense_ekfac"], s["max_rel_natgrad"], d["max_rel_dense_ekfac"], d["max_rel_natgrad"]) < 1e-8
        and s["U_streamed"]
        and s["h2d_bytes"] > 0
        and d["h2d_bytes"] == d["d2h_bytes"] == 0
    )
    return out


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _spd(k: int, d: int, device: str, seed: int = 0) -> list[torch.Tensor]:
    """``k`` factors ``ZᵀZ / n`` with columns scaled by ``logspace(0, -3)`` (a K-FAC-like decay), made on ``device``."""
    g = torch.Generator(device).manual_seed(seed)
    scale = torch.logspace(0, -3, d, dtype=torch.float64, device=device)
    out = []
    for _ in range(k):
        z = torch.randn(2 * d, d, generator=g, dtype=torch.float64, device=device) * scale
        out.append(z.t() @ z / (2 * d))
    return out


def _timed(fn: Any, device: str) -> float:
    fn()  # warm-up (cusolver handles, workspaces)
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def eigh_timings(device: str, quick: bool) -> dict[str, Any]:
    """One-by-one against batched float64 eighs; float32 + refinement against float64 for large factors."""
    sets = {"smollm2-like (30 x 576, 12 x 1536)": [(30, 576), (12, 1536)], "qwen2-1.5B MLP (2 x 8960)": [(2, 8960)]}
    if quick:
        sets = {"quick (6 x 64, 4 x 96)": [(6, 64), (4, 96)]}
    cfg = kf.KFACConfig(accumulate_dtype="float64")
    out: dict[str, Any] = {}
    for label, groups in sets.items():
        mats = {d: _spd(k, d, device) for k, d in groups}
        one = sum(_timed(lambda m=m: [torch.linalg.eigh(x) for x in m], device) for m in mats.values())
        stacked = sum(_timed(lambda m=m: eigh_stack(m, [("x", "A")] * len(m), cfg), device) for m in mats.values())
        count = sum(k for k, _ in groups)
        out[label] = {"factors": count, "one_by_one_s": one, "batched_s": stacked, "speedup": one / stacked}
    refine: dict[str, Any] = {}
    for d in (256,) if quick else (1536, 8960):
        (m,) = _spd(1, d, device, seed=1)
        t64 = _timed(lambda m=m: torch.linalg.eigh(m), device)
        t32 = _timed(lambda m=m: torch.linalg.eigh(m.float()), device)
        v32, q32 = torch.linalg.eigh(m.float())
        tr = _timed(lambda m=m, v=v32, q=q32: refine_eigh(m, v, q), device)
        ref = torch.linalg.eigvalsh(m)
        vals, vecs = refine_eigh(m, v32, q32)
        eye = torch.eye(d, dtype=torch.float64, device=device)
        refine[str(d)] = {
            "float64_s": t64,
            "float32_plus_refine_s": t32 + tr,
            "eigenvalue_err": float((torch.sort(vals).values - ref).abs().max() / ref.abs().max()),
            "orthogonality": float((vecs.t() @ vecs - eye).abs().max()),
        }
    out["refine"] = refine
    return out
