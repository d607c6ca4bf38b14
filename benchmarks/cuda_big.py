"""The ``big`` section of ``cuda_check.py``: a 1.5B-shaped Qwen2 with its tied 151,936-row lm_head on 4,096 tokens.

Random weights, real dimensions (Qwen2-1.5B: 28 layers, hidden 1,536, intermediate 8,960, 12 query / 2 key-value
heads, ``tie_word_embeddings``). Phases: a plain forward+backward of the same tokens, K-FAC collection (lm_head
included, its ``G`` low-rank), decomposition, the EK-FAC pass and one natural gradient. Per phase: wall time
(median of ``repeats`` after a warm-up), ratio to the forward+backward, peak device memory, peak host memory (RSS
high-water mark, reset before each phase) and host↔device bytes per batch as counted by
:mod:`kronfisher.transfer` (every copy of the low-rank columns and output-gradient rows goes through it), with the
lm_head's output-gradient bytes per batch for scale. ``--quick`` shrinks the model (2 layers, hidden 96, vocab
5,000) and the batches so that ``--device cpu --quick`` checks the code path in seconds.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import kronfisher as kf
from kronfisher.drivers.ekfac import correct
from kronfisher.transfer import STATS

FULL = {"vocab_size": 151_936, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28}
QUICK = {"vocab_size": 5000, "hidden_size": 96, "intermediate_size": 560, "num_hidden_layers": 2}
HEADS = (12, 2)
SHAPE = {False: (2, 2, 1024), True: (2, 2, 32)}  # (batches, batch size, sequence length): 4,096 tokens in full


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _reset_host_peak() -> bool:
    """Reset this process's RSS high-water mark (Linux ``clear_refs``); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _host_peak_gib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 2**30
    except OSError:
        pass
    return None


def _model(quick: bool, dtype: torch.dtype) -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    dims = QUICK if quick else FULL
    conf = Qwen2Config(
        **dims,
        num_attention_heads=HEADS[0],
        num_key_value_heads=HEADS[1],
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM(conf).to(dtype).eval()


def _measure(fn: Callable[[], Any], device: str, repeats: int, batches: int) -> dict[str, Any]:
    """Median wall time after a warm-up; peaks and transfer bytes of the last run."""
    fn()
    _sync(device)
    walls = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        host_reset = _reset_host_peak()
        STATS.reset()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        walls.append(time.perf_counter() - t0)
    moved = STATS.snapshot()
    row: dict[str, Any] = {
        "s": statistics.median(walls),
        "h2d_bytes_per_batch": moved["h2d_bytes"] / batches,
        "d2h_bytes_per_batch": moved["d2h_bytes"] / batches,
        "peak_host_GiB": _host_peak_gib() if host_reset else None,
    }
    if device.startswith("cuda"):
        row["peak_device_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def perf_big(device: str, quick: bool, repeats: int, dtype: str = "bfloat16") -> dict[str, Any]:
    """The 1.5B-shaped workload on ``device``: K-FAC and EK-FAC with the lm_head, per phase."""
    model_dtype = torch.float32 if quick and device == "cpu" else getattr(torch, dtype)
    model = _model(quick, model_dtype).to(device)
    n_batches, b, s = SHAPE[quick]
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, vocab, (b, s), generator=g).to(device)} for _ in range(n_batches)]
    cfg = kf.KFACConfig(lowrank_layers=("lm_head",))
    state: dict[str, Any] = {}

    def fwd_bwd() -> None:
        for batch in data:
            logits = model(**batch, use_cache=False).logits
            loss = nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), batch["input_ids"][:, 1:].flatten(), reduction="sum"
            )
            loss.backward()
        model.zero_grad(set_to_none=True)

    def collect() -> None:
        state["c"] = kf.collect(model, data, cfg)

    def decompose() -> None:
        disc, col, rep = state["c"]
        state["f"] = kf.KFAC.from_sums(disc.infos, col.sums, cfg, report=rep, model=model)

    def ekfac() -> None:
        state["e"] = correct(state["f"], model, data)

    params = dict(model.named_parameters(remove_duplicate=False))
    out: dict[str, Any] = {
        "shape": {**(QUICK if quick else FULL), "heads": list(HEADS), "tied": True, "dtype": str(model_dtype)},
        "tokens": n_batches * b * s,
        "batches": n_batches,
        # float32 gradient rows of the lm_head output per batch: what crossed the bus when G lived on the host
        "lm_head_grad_bytes_per_batch": b * s * vocab * 4,
    }
    phases = (("fwd_bwd", fwd_bwd), ("collect", collect), ("decompose", decompose), ("ekfac_pass", ekfac))
    for key, fn in phases:
        out[key] = _measure(fn, device, repeats, n_batches if key != "decompose" else 1)
        print(f"  big {key} {out[key]['s']:.3f} s", flush=True)
    fisher = state["e"]
    gen = torch.Generator().manual_seed(1)
    probe = {
        i.weight_name: torch.randn(params[i.weight_name].shape, generator=gen).to(device) for i in fisher.infos.values()
    }
    out["natural_gradient"] = _measure(lambda: fisher.natural_gradient(probe), device, repeats, 1)
    base = out["fwd_bwd"]["s"]
    for key in ("collect", "decompose", "ekfac_pass", "natural_gradient"):
        out[key]["ratio_to_fwd_bwd"] = out[key]["s"] / base
    pipeline = out["collect"]["s"] + out["decompose"]["s"] + out["ekfac_pass"]["s"]
    moved = out["collect"]["h2d_bytes_per_batch"] + out["collect"]["d2h_bytes_per_batch"]
    out["summary"] = {
        "collect/fwd_bwd": out["collect"]["ratio_to_fwd_bwd"],
        "ekfac_pipeline_s": pipeline,
        "collect_bytes_per_batch/lm_head_grad_bytes": moved / out["lm_head_grad_bytes_per_batch"],
        "lm_head_G_device": str(fisher.block("lm_head").G.device),
        "targets": "GPU only: collect/fwd_bwd <= 1.3, ekfac_pipeline_s <= 60, bytes ratio <= 0.05 when U fits",
    }
    return out
