"""Memory plans and runs at the scale of Qwen2.5-1.5B / 7B (issue 11; the plan is ``kronfisher.plan``).

Modes (each prints JSON on stdout and a table on stderr; ``--out FILE`` also writes the JSON, partially after every
phase of ``--run``):

* default: the memory plan of a Qwen2.5-1.5B-shaped model (28 layers, hidden 1,536, intermediate 8,960, 12/2 heads,
  tied 151,936-row lm_head) at 4,096 tokens on a 24 GiB host, and of a Qwen2.5-7B-shaped one (hidden 3,584,
  intermediate 18,944, 28/4 heads, untied 152,064-row lm_head) on one 80 GB and one 141 GB GPU. The budget given to
  the plan is the device less the model's weights, its activations and 1.5 GiB of runtime. Models are built on the
  meta device (no memory). When a budget is too small the error is recorded, with the smallest budget that fits.
* ``--crossover``: dense against exact low-rank ``G`` for one ``Linear(a, out)`` layer (K-FAC and EK-FAC, float32)
  over a range of token counts: wall time and peak RSS of each, and the representation the plan picks.
* ``--run``: ``kf.fit`` (EK-FAC, every layer and the lm_head) of the 1.5B-shaped model with random weights
  (``--layers`` decoder layers; 28 is the full model, about an hour on 2 cores), ``--tokens`` random tokens in
  batches of 2 × 512, under ``--max-memory``; and a plain forward+backward (Hugging Face loss, parameter gradients)
  of the same batches. Peak RSS per phase (``VmHWM``, reset before each phase) and time per phase.

Reproduce: ``PYTHONPATH=src .venv/bin/python benchmarks/bench_scale.py [--crossover | --run --layers 4]``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import kronfisher as kf
from kronfisher.budget import activation_bytes, format_bytes
from kronfisher.errors import MemoryBudgetError
from kronfisher.layers import discover_layers
from kronfisher.plan import plan_memory

GIB = 2**30
SHAPES = {
    "qwen2.5-1.5b": {"hidden": 1536, "inter": 8960, "layers": 28, "heads": 12, "kv": 2, "vocab": 151936, "tied": True},
    "qwen2.5-7b": {"hidden": 3584, "inter": 18944, "layers": 28, "heads": 28, "kv": 4, "vocab": 152064, "tied": False},
}
RUNTIME = int(1.5 * GIB)  # Python, torch and the allocator's slack


def qwen_config(shape: str, layers: int | None = None) -> Any:
    from transformers import Qwen2Config

    s = SHAPES[shape]
    return Qwen2Config(
        hidden_size=s["hidden"],
        intermediate_size=s["inter"],
        num_hidden_layers=layers or s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv"],
        vocab_size=s["vocab"],
        tie_word_embeddings=s["tied"],
        max_position_embeddings=4096,
    )


def meta_model(shape: str) -> torch.nn.Module:
    from transformers import Qwen2ForCausalLM

    with torch.device("meta"):
        return Qwen2ForCausalLM(qwen_config(shape))


def _param_bytes(model: torch.nn.Module, dtype: torch.dtype) -> int:
    size = torch.empty((), dtype=dtype).element_size()
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) * size


def _smallest_fit(fits: Callable[[int], bool], lo: int, hi: int) -> int:
    while hi - lo > 64 * 2**20:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


def plan_case(
    shape: str, device: str, total: int, dtype: torch.dtype, tokens: int, batch: int, spill: bool = True
) -> dict[str, Any]:
    """The plan of one shape on one device of ``total`` bytes (host: a large one when the device is a GPU).

    ``spill``: each group's factors are written to the factor file as it finishes (``kf.fit(..., save_to=...)``,
    what ``kronfisher analyze`` does); otherwise the factors of every group stay in memory.
    """
    model = meta_model(shape)
    infos = discover_layers(model).infos
    weights = _param_bytes(model, dtype)
    budget = total - weights - activation_bytes(infos, batch) - RUNTIME
    budgets = {device: budget} if device == "cpu" else {device: budget, "cpu": 1024 * GIB}
    cfg = kf.KFACConfig(ekfac=True, lowrank_max_rank=512)
    threads = 2 if device == "cpu" else 1

    def plan(b: int) -> Any:
        return plan_memory(
            infos,
            cfg,
            tokens=tokens,
            batch_tokens=batch,
            device=device,
            budgets={**budgets, device: b},
            workers=threads,
            spill=spill,
        )

    out: dict[str, Any] = {
        "shape": shape,
        "device": device,
        "device_bytes": total,
        "weights_bytes": weights,
        "weights_dtype": str(dtype).replace("torch.", ""),
        "budget_bytes": budget,
        "tokens": tokens,
        "spill": spill,
    }
    try:
        p = plan(budget)
        out.update(plan=p.to_dict(), text=p.format())
    except MemoryBudgetError as err:
        out["error"] = str(err)

        def fits(b: int) -> bool:
            try:
                plan(b)
                return True
            except MemoryBudgetError:
                return False

        need = _smallest_fit(fits, budget, 4096 * GIB)
        p = plan(need)
        out.update(smallest_budget_bytes=need, plan=p.to_dict(), text=p.format())
    return out


def plans(tokens: int = 4096, batch: int = 1024) -> list[dict[str, Any]]:
    """The three plans of the issue."""
    cases = [
        ("qwen2.5-1.5b", "cpu", 24 * GIB, torch.float32),
        ("qwen2.5-1.5b", "cpu", 24 * GIB, torch.bfloat16),
        ("qwen2.5-7b", "cuda:0", 80 * 10**9, torch.bfloat16),
        ("qwen2.5-7b", "cuda:0", 141 * 10**9, torch.bfloat16),
    ]
    return [plan_case(*case, tokens, batch, spill) for spill in (True, False) for case in cases]


# Measurements ===================================================================================================
def peak_rss() -> int:
    """``VmHWM`` of this process in bytes."""
    with open("/proc/self/status") as fh:
        return int(re.search(r"VmHWM:\s+(\d+)", fh.read()).group(1)) * 1024  # type: ignore[union-attr]


def reset_peak() -> None:
    """Reset ``VmHWM`` to the current RSS (Linux ``clear_refs``)."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def timed(record: dict[str, Any], phase: str, fn: Callable[[], Any], on_phase: Callable[[], None]) -> Any:
    """Run ``fn`` with wall time and peak RSS recorded as ``record[phase]``."""
    reset_peak()
    t, cpu = time.monotonic(), time.process_time()
    out = fn()
    record[phase] = {"wall_s": time.monotonic() - t, "cpu_s": time.process_time() - cpu, "peak_rss_bytes": peak_rss()}
    on_phase()
    return out


def crossover_one(out: int, a: int, tokens: int, rep: str) -> dict[str, Any]:
    """One ``kf.fit`` (K-FAC + EK-FAC, float32) of ``Linear(a, out)`` with a dense or low-rank ``G`` (child)."""
    from torch import nn

    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(a, out))
    g = torch.Generator().manual_seed(tokens)
    batches = [
        {"x": torch.randn(256, a, generator=g), "t": torch.randint(0, out, (256,), generator=g)}
        for _ in range(tokens // 256)
    ]

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        y = model(batch["x"])
        loss = torch.nn.functional.cross_entropy(y, batch["t"], reduction="sum")
        return loss, {"num_terms": y.shape[0], "reduction": "sum"}

    cfg = kf.KFACConfig(ekfac=True, lowrank_threshold=out, lowrank_layers=("0",) if rep == "lowrank" else ())
    reset_peak()
    base = peak_rss()
    start, cpu = time.monotonic(), time.process_time()
    fisher = kf.fit(layer, batches, cfg, loss_fn=loss_fn)
    wall, cpu = time.monotonic() - start, time.process_time() - cpu
    assert fisher.block("0").representation == rep
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_delta_bytes": peak_rss() - base}


def crossover(
    out: int = 2048, a: int = 256, token_counts: tuple[int, ...] = (256, 512, 1024, 1536, 2048, 3072)
) -> dict:
    """Dense against exact low-rank ``G`` of one layer, each fit in its own process (``--crossover``)."""
    import subprocess

    rows = []
    for t in token_counts:
        row: dict[str, Any] = {"tokens": t}
        for rep in ("dense", "lowrank"):
            cmd = [sys.executable, __file__, "--crossover-one", f"{out},{a},{t},{rep}"]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ)
            row[rep] = json.loads(done.stdout)
        layer = {"0": discover_layers(torch.nn.Sequential(torch.nn.Linear(a, out, device="meta"))).infos["0"]}
        plan_cfg = kf.KFACConfig(ekfac=True, lowrank_threshold=out - 1, max_memory="8GiB")
        row["plan"] = plan_memory(layer, plan_cfg, tokens=t, batch_tokens=256).layers["0"].representation
        rows.append(row)
        print(f"crossover T={t}: {row}", file=sys.stderr)
    return {"out": out, "a": a, "rows": rows}


class PhaseLog:
    """Splits a run into phases at kronfisher's ``group i/n: phase`` log lines: wall time and peak RSS of each."""

    PATTERN = re.compile(r"^group (\d+)/(\d+): (collect|decompose|ekfac|done)")

    def __init__(self, record: dict[str, Any], flush: Callable[[], None]) -> None:
        import logging

        self.record, self.flush = record, flush
        self.current: tuple[str, float, float] | None = None
        self.handler = logging.Handler()
        self.handler.emit = self._emit  # type: ignore[method-assign]
        self.logger = logging.getLogger("kronfisher")

    def __enter__(self) -> PhaseLog:
        import logging

        self.logger.addHandler(self.handler)
        self.level = self.logger.level
        self.logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc: object) -> None:
        self._close()
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.level)

    def _close(self) -> None:
        if self.current is not None:
            name, start, cpu = self.current
            wall, cpu = time.monotonic() - start, time.process_time() - cpu
            self.record[name] = {"wall_s": wall, "cpu_s": cpu, "peak_rss_bytes": peak_rss()}
            self.current = None
            self.flush()

    def _emit(self, rec: Any) -> None:
        msg = rec.getMessage()
        if msg.startswith("memory plan:"):
            self.record["plan_text"] = msg
        m = self.PATTERN.match(msg)
        if m is None:
            return
        self._close()
        if m.group(3) != "done":
            reset_peak()
            self.current = (f"group{m.group(1)}_{m.group(3)}", time.monotonic(), time.process_time())


def current_rss() -> int:
    """``VmRSS`` of this process in bytes."""
    with open("/proc/self/status") as fh:
        return int(re.search(r"VmRSS:\s+(\d+)", fh.read()).group(1)) * 1024  # type: ignore[union-attr]


def run(layers: int, tokens: int, max_memory: str, dtype: str, batch: int, out_path: Path | None) -> dict[str, Any]:
    """``kf.fit`` (EK-FAC) of the 1.5B-shaped model and a plain forward+backward of the same tokens (``--run``)."""
    from transformers import Qwen2ForCausalLM

    record: dict[str, Any] = {"layers": layers, "tokens": tokens, "max_memory": max_memory, "dtype": dtype}
    record.update(batch_tokens=batch, machine=machine())
    phases: dict[str, Any] = {}
    record["phases"] = phases

    def flush() -> None:
        if out_path is not None:
            out_path.write_text(json.dumps(record, indent=1))

    torch.manual_seed(0)
    model = timed(phases, "build", lambda: Qwen2ForCausalLM(qwen_config("qwen2.5-1.5b", layers)), flush)
    model = model.to(getattr(torch, dtype)).eval()
    g = torch.Generator().manual_seed(1)
    vocab = SHAPES["qwen2.5-1.5b"]["vocab"]
    batches = [{"input_ids": torch.randint(0, vocab, (2, batch // 2), generator=g)} for _ in range(tokens // batch)]

    def plain() -> None:
        for b in batches:
            model(input_ids=b["input_ids"], labels=b["input_ids"]).loss.backward()
        model.zero_grad(set_to_none=True)

    timed(phases, "forward_backward", plain, flush)
    cfg = kf.KFACConfig(ekfac=True, lowrank_max_rank=512, max_memory=max_memory)
    gc.collect()
    record["rss_before_fit_bytes"] = current_rss()
    scratch = Path(tempfile.mkdtemp(prefix="bench_scale_"))
    try:
        with PhaseLog(phases, flush):
            # the factors go to a file group by group, as kronfisher analyze writes its factor file
            fisher = timed(phases, "fit", lambda: kf.fit(model, batches, cfg, save_to=scratch / "f.safetensors"), flush)
    except MemoryBudgetError as err:
        record["error"] = str(err)
        flush()
        return record
    finally:
        record["factor_file_bytes"] = sum(f.stat().st_size for f in scratch.iterdir())
        shutil.rmtree(scratch, ignore_errors=True)
    record["layers_tracked"] = len(fisher.layer_names)
    record["plan"] = fisher.report.to_dict().get("plan")
    fb = phases["forward_backward"]["wall_s"]
    record["ratio_fit_to_forward_backward"] = phases["fit"]["wall_s"] / fb
    record["cpu_ratio_fit_to_forward_backward"] = phases["fit"]["cpu_s"] / phases["forward_backward"]["cpu_s"]
    peak = max(v["peak_rss_bytes"] for k, v in phases.items() if k.startswith("group"))
    phases["fit"]["peak_rss_bytes"] = peak  # the group phases reset the high-water mark
    record["peak_rss_fit_bytes"] = peak
    record["peak_rss_fit_above_start_bytes"] = peak - record["rss_before_fit_bytes"]
    record["planned_peak_bytes"] = max(max(p.values()) for p in record["plan"]["peaks"])
    flush()
    return record


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "kronfisher": kf.__version__,
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_avg": os.getloadavg(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def table(report: dict[str, Any]) -> str:
    lines = []
    for case in report.get("plans", []):
        lines.append(
            f"\n## {case['shape']} on {case['device']} ({format_bytes(case['device_bytes'])}, weights "
            f"{case['weights_dtype']} {format_bytes(case['weights_bytes'])}), "
            f"budget {format_bytes(case['budget_bytes'])}, "
            + ("factors written group by group" if case.get("spill") else "factors kept in memory")
        )
        if "error" in case:
            lines.append(f"does not fit: {case['error']}")
            lines.append(f"smallest budget that fits: {format_bytes(case['smallest_budget_bytes'])}")
        lines.append(case["text"])
    if "crossover" in report:
        c = report["crossover"]
        lines.append(f"\n## crossover, Linear({c['a']}, {c['out']}), K-FAC + EK-FAC, float32")
        lines.append(
            "| T | dense wall / CPU s | low-rank wall / CPU s | dense peak RSS Δ | low-rank peak RSS Δ | plan |"
        )
        lines.append("|---:|---:|---:|---:|---:|---|")
        for r in c["rows"]:
            d, lo = r["dense"], r["lowrank"]
            lines.append(
                f"| {r['tokens']:,} | {d['wall_s']:.2f} / {d['cpu_s']:.2f} | {lo['wall_s']:.2f} / {lo['cpu_s']:.2f} "
                f"| {format_bytes(d['peak_rss_delta_bytes'])} | {format_bytes(lo['peak_rss_delta_bytes'])} "
                f"| {r['plan']} |"
            )
    if "run" in report:
        r = report["run"]
        lines.append(
            f"\n## run: {r['layers']} layers, {r['tokens']:,} tokens, --max-memory {r['max_memory']}, {r['dtype']}"
        )
        lines.append("| phase | wall s | CPU s | peak RSS |")
        lines.append("|---|---:|---:|---:|")
        for k, v in r["phases"].items():
            if isinstance(v, dict):
                lines.append(f"| {k} | {v['wall_s']:.1f} | {v['cpu_s']:.1f} | {format_bytes(v['peak_rss_bytes'])} |")
        if "error" in r:
            lines.append(f"error: {r['error']}")
        if "ratio_fit_to_forward_backward" in r:
            lines.append(
                f"fit / plain forward+backward: wall {r['ratio_fit_to_forward_backward']:.2f}, "
                f"CPU {r['cpu_ratio_fit_to_forward_backward']:.2f}"
            )
            lines.append(
                f"peak RSS of fit {format_bytes(r['peak_rss_fit_bytes'])} ({format_bytes(r['rss_before_fit_bytes'])} "
                f"before it); planned peak of the factors {format_bytes(r['planned_peak_bytes'])}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crossover", action="store_true", help="measure dense against low-rank G over T")
    parser.add_argument("--run", action="store_true", help="run kf.fit on the 1.5B-shaped model")
    parser.add_argument("--layers", type=int, default=28, help="decoder layers of the --run model")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens (multiple of 1,024)")
    parser.add_argument("--max-memory", default="12GiB", help="kf.KFACConfig(max_memory=...) of --run")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="model weights")
    parser.add_argument("--batch-tokens", type=int, default=1024, help="tokens per batch of --run (2 sequences)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here (partial during --run)")
    parser.add_argument("--crossover-one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.crossover_one:
        out, a, t, rep = args.crossover_one.split(",")
        print(json.dumps(crossover_one(int(out), int(a), int(t), rep)))
        return 0
    report: dict[str, Any] = {"machine": machine()}
    if args.run:
        report["run"] = run(args.layers, args.tokens, args.max_memory, args.dtype, args.batch_tokens, args.out)
    elif args.crossover:
        report["crossover"] = crossover()
    else:
        report["plans"] = plans(args.tokens)
    text = json.dumps(report, indent=1)
    if args.out is not None:
        args.out.write_text(text)
    print(text)
    print(table(report), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
