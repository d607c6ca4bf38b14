"""CUDA checks and GPU timings, for a machine with a GPU (no test of the suite needs one).

Run from the repository root: ``PYTHONPATH=src python benchmarks/cuda_check.py --out DIR`` (``--device cpu --quick``
is a dry run of the same code on CPU). Writes ``DIR/cuda_check.json`` and prints a table. Sections, each
independent (a failure is recorded with its traceback and the next section runs):

* ``equal``: ``kf.fit`` (EK-FAC, empirical, float64, tiny GPT-2 with a low-rank lm_head) on the GPU equals the CPU
  fit: max relative error of every layer's dense EK-FAC matrix and of the damped natural gradient; where each sum
  lives (``A`` and dense ``G`` on the GPU, low-rank ``G`` on CPU, docs/gpu.md).
* ``mc``: the MC Fisher on the GPU is reproducible (two fits, bitwise equal) and samples on the GPU.
* ``cli``: ``kronfisher analyze --device cuda`` against ``--device cpu`` on a saved tiny model (float64): max
  relative difference of every number of the report's layer table (undamped condition numbers excluded).
* ``oom``: a real ``torch.OutOfMemoryError`` (memory capped with ``set_per_process_memory_fraction``) during
  collection moves that factor's work to CPU with a ``PlacementWarning``; factors equal an uncapped run.
* ``perf``: medium Qwen2 (8×256 tokens) and a SmolLM2-135M-shaped Llama (random weights, 4×256): plain
  forward+backward, K-FAC collection, decomposition, EK-FAC pass, natural gradient; medians of 3 after a warm-up,
  ratios to forward+backward, peak GPU memory.
* ``stream`` / ``eigh``: streamed and device-resident ``U`` against the CPU fit; batched and refined eighs
  (``cuda_paths.py``).
* ``big``: a Qwen2-1.5B-shaped model (random weights, tied 151,936-row lm_head) on 4,096 tokens, K-FAC and EK-FAC
  with the lm_head: per phase time, ratio to forward+backward, peak device and host memory, host↔device bytes per
  batch (``cuda_big.py``).

``--quick`` shrinks every model (2 layers, short sequences, vocabularies of a few thousand) so that
``--device cpu --quick`` runs the whole script in a few CPU minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import kronfisher as kf  # noqa: E402
from cuda_big import perf_big  # noqa: E402
from cuda_paths import check_stream, eigh_timings  # noqa: E402
from kronfisher.errors import PlacementWarning  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _tiny_qwen2(vocab: int = 300, hidden: int = 32, layers: int = 2) -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    return Qwen2ForCausalLM(cfg).eval()


def _tiny_gpt2(vocab: int = 300) -> nn.Module:
    """GPT-2 with sdpa attention: LayerNorm and attention keep float64 (stock Llama/Qwen2 RMSNorm computes in
    float32 even in a float64 model, which would make CPU and GPU differ at float32 round-off)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=vocab,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    cfg._attn_implementation = "sdpa"
    return GPT2LMHeadModel(cfg).eval()


def _batches(vocab: int, n: int, b: int, s: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (b, s), generator=g)
        mask = torch.ones(b, s, dtype=torch.long)
        mask[0, s - 3 :] = 0  # some right padding
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def check_equal(device: str, vocab: int = 300) -> dict[str, Any]:
    """GPU fit equals CPU fit (float64); ``vocab`` 64 in quick mode (the dense lm_head block is ``(33 vocab)²``)."""
    data = _batches(vocab, 3, 3, 24)
    cfg = kf.KFACConfig(ekfac=True, accumulate_dtype="float64", lowrank_layers=("lm_head",), lowrank_dtype="float64")
    fits = {}
    for dev in ("cpu", device):
        model = _tiny_gpt2(vocab).to(torch.float64).to(dev)
        fits[dev] = (kf.fit(model, data, cfg), model)
    (ref, ref_model), (got, _) = fits["cpu"], fits[device]
    out: dict[str, Any] = {"layers": len(ref.layer_names)}
    per_layer = {n: _rel(got.to_dense(n), ref.to_dense(n)) for n in ref.layer_names}
    out["max_rel_dense_ekfac"] = max(per_layer.values())
    out["worst_layer"] = max(per_layer, key=lambda n: per_layer[n])
    gen = torch.Generator().manual_seed(3)
    probe = {
        n: torch.randn(p.shape, generator=gen, dtype=torch.float64) for n, p in ref_model.named_parameters() if p.ndim
    }
    nat_ref = ref.natural_gradient(probe)
    nat_got = got.natural_gradient({k: v.to(device) for k, v in probe.items()})
    out["max_rel_natgrad"] = max(_rel(nat_got[k], nat_ref[k]) for k in nat_ref)
    sums = got.sums or {}
    first = ref.layer_names[0]
    out["sum_devices"] = {
        f"A({first})": str(sums[first].A.sum.device),
        f"G({first}) dense": str(sums[first].G.sum.device),
        "G(lm_head) low-rank": str(sums["lm_head"].G.factor_U(torch.float64).device),
    }
    out["lm_head_representation"] = got.block("lm_head").representation
    out["ok"] = out["max_rel_dense_ekfac"] < 1e-8 and out["max_rel_natgrad"] < 1e-8
    return out


def check_mc(device: str, vocab: int = 300) -> dict[str, Any]:
    """MC Fisher on the GPU: reproducible, targets drawn on the logits' device."""
    data = _batches(vocab, 2, 2, 16)
    cfg = kf.KFACConfig(fisher="mc", mc_samples=2, accumulate_dtype="float64", lowrank_layers=("lm_head",))
    model = _tiny_gpt2(vocab).to(torch.float64).to(device)
    import kronfisher.collection.lossterms as lt

    seen: list[str] = []
    original = lt.MCDraws.sample

    def spy(self: lt.MCDraws) -> torch.Tensor:
        seen.append(f"{self.probs.device}/{self.generator.device}")
        return original(self)

    lt.MCDraws.sample = spy  # type: ignore[method-assign]
    try:
        a, b = kf.fit(model, data, cfg), kf.fit(model, data, cfg)
    finally:
        lt.MCDraws.sample = original  # type: ignore[method-assign]
    same = all(torch.equal(a.to_dense(n), b.to_dense(n)) for n in a.layer_names)
    devices = sorted(set(seen))
    return {"bitwise_reproducible": same, "probs/generator devices": devices, "ok": same and len(devices) == 1}


def _char_tokenizer() -> Any:
    import string

    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, "<pad>": 2}
    for c in sorted(set(string.printable)):
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")


def _numbers(x: Any, path: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    if isinstance(x, dict):
        for k, v in x.items():
            out.update(_numbers(v, f"{path}/{k}"))
    elif isinstance(x, list):
        for i, v in enumerate(x):
            out.update(_numbers(v, f"{path}/{i}"))
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        out[path] = float(x)
    return out


def check_cli(device: str) -> dict[str, Any]:
    """``kronfisher analyze --device cuda`` equals ``--device cpu`` (float64, empirical, EK-FAC)."""
    tmp = Path(tempfile.mkdtemp(prefix="kf-cuda-cli-"))
    model = _tiny_qwen2(vocab=128)
    model.save_pretrained(tmp / "m")
    _char_tokenizer().save_pretrained(tmp / "m")
    text = (ROOT / "src" / "kronfisher" / "data" / "pride_and_prejudice.txt").read_text()[:6000]
    (tmp / "t.txt").write_text(text)
    reports = {}
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    times = {}
    for dev in ("cpu", device):
        args = ["analyze", "--model", str(tmp / "m"), "--data", str(tmp / "t.txt"), "--dtype", "float64"]
        args += ["--accumulate-dtype", "float64", "--ekfac", "--lowrank-threshold", "64", "--seq-len", "64"]
        args += ["--max-tokens", "1024", "--no-plots", "--quiet", "--device", dev, "--output-dir", str(tmp / dev)]
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "kronfisher.cli", *args], env=env, capture_output=True, text=True)
        times[dev] = time.perf_counter() - t0
        if proc.returncode != 0:
            return {"ok": False, "device": dev, "stderr": proc.stderr[-3000:]}
        reports[dev] = json.loads((tmp / dev / "report.json").read_text())["models"][0]
    a, b = _numbers(reports[device]["layers"]), _numbers(reports["cpu"]["layers"])
    worst = max(
        (abs(a[k] - v) / max(abs(v), 1e-12), k)
        for k, v in b.items()
        if not k.endswith("condition_number_raw") and k in a
    )
    return {
        "ok": worst[0] < 1e-6 and a.keys() == b.keys(),
        "keys_only_on_one_side": sorted(set(a) ^ set(b))[:10],
        "max_rel_report_number": worst[0],
        "worst_key": worst[1],
        "report_device": reports[device]["device"],
        "wall_s": times,
    }


def check_oom(device: str) -> dict[str, Any]:
    """A real OOM during collection: the factor moves to CPU with a PlacementWarning; same factors."""
    if not device.startswith("cuda"):
        return {"skipped": "needs CUDA"}

    class Wide(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.up = nn.Linear(64, 6144)
            self.down = nn.Linear(6144, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.down(torch.tanh(self.up(x)))

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        y = model(batch["x"])
        return torch.nn.functional.cross_entropy(y, batch["y"], reduction="sum"), {
            "num_terms": batch["y"].numel(),
            "reduction": "sum",
        }

    g = torch.Generator().manual_seed(0)
    data = [{"x": torch.randn(2048, 64, generator=g), "y": torch.randint(0, 8, (2048,), generator=g)} for _ in range(2)]
    cfg = kf.KFACConfig(accumulate_dtype="float32", ekfac=True)
    probe = {"up.weight": torch.randn(6144, 64, generator=g), "down.weight": torch.randn(8, 6144, generator=g)}

    def summary(fisher: kf.KFAC) -> dict[str, torch.Tensor]:
        nat = fisher.natural_gradient({k: v.to(device) for k, v in probe.items()})
        return {k: v.detach().cpu() for k, v in nat.items()}

    ref = summary(kf.fit(Wide().to(device), data, cfg, loss_fn=loss_fn))
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    # Sums: G(up) 6144² and A(down) 6145² float32 = 288 MiB; a 144 MiB Gram on top does not fit in 400 MiB
    # (collection fallback), nor does a float64 copy for an eigh (decomposition fallback).
    cap = 400 * 2**20
    torch.cuda.set_per_process_memory_fraction(cap / total)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = summary(kf.fit(Wide().to(device), data, cfg, loss_fn=loss_fn))
    except torch.OutOfMemoryError:
        return {"ok": False, "unhandled_oom": traceback.format_exc()[-2500:]}
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    placement = [str(w.message) for w in caught if issubclass(w.category, PlacementWarning)]
    err = max(_rel(got[n], ref[n]) for n in ref)
    return {"ok": bool(placement) and err < 1e-4, "placement_warnings": placement, "max_rel_natgrad_ekfac": err}


def _time(fn: Callable[[], Any], device: str, repeats: int) -> float:
    fn()  # warm-up (kernels, allocator)
    _sync(device)
    walls = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        walls.append(time.perf_counter() - t0)
    return statistics.median(walls)


PERF_MODELS: dict[str, dict[str, Any]] = {  # the benchmark issue's workloads (a) and (b), random weights
    "qwen2": {
        "arch": "Qwen2",
        "config": {"vocab_size": 32000, "hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 6},
        "heads": (8, 8),
        "tie": False,
        "batch": 8,  # 8×256 tokens
    },
    "smollm2": {
        "arch": "Llama",
        "config": {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30},
        "heads": (9, 3),
        "tie": True,
        "batch": 4,  # 4×256 tokens
    },
}


def _perf_model(name: str, quick: bool) -> tuple[nn.Module, list[dict[str, torch.Tensor]], int]:
    import transformers

    spec = PERF_MODELS[name]
    conf = dict(spec["config"], num_attention_heads=spec["heads"][0], num_key_value_heads=spec["heads"][1])
    seq = 256
    if quick:
        conf["num_hidden_layers"], seq = 2, 64
        conf["vocab_size"] = 4096  # still low-rank with the head (lowrank_layers): the code path, not the size
    cfg = getattr(transformers, f"{spec['arch']}Config")(
        **conf, tie_word_embeddings=spec["tie"], attn_implementation="sdpa"
    )
    torch.manual_seed(0)
    model = getattr(transformers, f"{spec['arch']}ForCausalLM")(cfg)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, conf["vocab_size"], (spec["batch"], seq), generator=g)
    return model.eval(), [{"input_ids": ids}], int(ids.numel())


def _perf_one(name: str, device: str, quick: bool, repeats: int, head: bool) -> dict[str, Any]:
    model, batches, tokens = _perf_model(name, quick)
    model = model.to(device)
    on_dev = [{k: v.to(device) for k, v in b.items()} for b in batches]
    cfg = kf.KFACConfig(exclude=() if head else ("lm_head",), lowrank_layers=("lm_head",))
    state: dict[str, Any] = {}

    def fwd_bwd() -> None:
        for b in on_dev:
            logits = model(**b, use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), b["input_ids"][:, 1:].flatten())
            loss.backward()
        model.zero_grad(set_to_none=True)

    def collect() -> None:
        state["c"] = kf.collect(model, on_dev, cfg)

    def decompose() -> None:
        disc, col, rep = state["c"]
        state["f"] = kf.KFAC.from_sums(disc.infos, col.sums, cfg, report=rep, model=model)

    def ekfac() -> None:
        from kronfisher.drivers.ekfac import correct

        state["e"] = correct(state["f"], model, on_dev)

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    row: dict[str, Any] = {"tokens": tokens}
    phases = (("fwd_bwd_s", fwd_bwd), ("collect_s", collect), ("decompose_s", decompose), ("ekfac_pass_s", ekfac))
    for key, fn in phases:
        row[key] = _time(fn, device, repeats)
        print(f"  perf {name} {key} {row[key]:.3f}", flush=True)
    fisher = state["f"]
    gen = torch.Generator().manual_seed(1)
    params = dict(model.named_parameters(remove_duplicate=False))  # tied lm_head keeps its name
    probe = {
        info.weight_name: torch.randn(params[info.weight_name].shape, generator=gen).to(device)
        for info in fisher.infos.values()
    }
    row["natural_gradient_s"] = _time(lambda: fisher.natural_gradient(probe), device, repeats)
    row["collect/fwd_bwd"] = row["collect_s"] / row["fwd_bwd_s"]
    pipeline = row["collect_s"] + row["decompose_s"] + row["ekfac_pass_s"]
    row["ekfac_pipeline/fwd_bwd"] = pipeline / row["fwd_bwd_s"]
    if device.startswith("cuda"):
        row["peak_gpu_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def perf(device: str, quick: bool, repeats: int, models: list[str], head: bool) -> dict[str, Any]:
    """Figures of the benchmark issue on this device (float32 model, default config)."""
    out: dict[str, Any] = {}
    for name in models:
        out[name] = _perf_one(name, device, quick, repeats, head)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=["equal", "stream", "mc", "cli", "oom", "eigh", "perf", "big"])
    parser.add_argument("--out", default=".")
    parser.add_argument("--perf-models", nargs="*", default=["qwen2", "smollm2"])
    parser.add_argument("--no-head", action="store_true", help="perf without the lm_head")
    parser.add_argument("--big-dtype", default="bfloat16", help="dtype of the 1.5B-shaped model on the GPU")
    args = parser.parse_args()
    info = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    results: dict[str, Any] = {"info": info}
    vocab = 64 if args.quick else 300  # low-rank lm_head of the equal / stream checks
    sections = {
        "equal": lambda: check_equal(args.device, vocab),
        "mc": lambda: check_mc(args.device, vocab),
        "cli": lambda: check_cli(args.device),
        "oom": lambda: check_oom(args.device),
        "perf": lambda: perf(args.device, args.quick, args.repeats, args.perf_models, not args.no_head),
        "big": lambda: perf_big(args.device, args.quick, args.repeats, args.big_dtype),
        "stream": lambda: check_stream(args.device, lambda: _tiny_gpt2(vocab), _batches(vocab, 3, 3, 24), vocab // 5),
        "eigh": lambda: eigh_timings(args.device, args.quick),
    }
    for name in args.only:
        t0 = time.perf_counter()
        try:
            results[name] = sections[name]()
        except Exception:  # record and go on: one section must not hide the others
            results[name] = {"ok": False, "error": traceback.format_exc()[-3000:]}
        results[name]["section_wall_s"] = time.perf_counter() - t0
        print(name, json.dumps(results[name], indent=1, default=str), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "cuda_check.json").write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
