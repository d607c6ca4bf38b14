"""The backward cut: one collection pass of a late layer group, with and without the cut, side by side.

When the tracked layers run in groups (``max_memory``), each group has its own passes over the data; a group whose
layers all lie in decoder blocks ``k..`` stops its backward at the input of block ``k``, so blocks ``0..k-1`` run
their forward without a graph and get no backward (``kronfisher.collection.cut``, docs/concepts.md). This times one
K-FAC collection pass (``kronfisher.drivers.fit.collect`` with ``layers=`` the group) of the last ``--group``
blocks of a Qwen2.5-1.5B-shaped model (hidden 1,536, intermediate 8,960, 12/2 heads, vocabulary 151,936, tied;
random float32 weights) cut to ``--layers`` decoder layers, over ``--batches`` batches of 1 × ``--seq`` tokens.
"Full" is the same pass with the cut switched off (the pass's ``BlockCut`` replaced by one that never arms:
today's behaviour before the cut). Runs alternate full / cut, ``--repeat`` times each after one warm-up batch;
the fastest of each is compared, and the ratios are full / cut wall and CPU time (CPU seconds of this
process: less sensitive to other jobs on a shared machine). The peak RSS of each pass (``VmHWM``,
reset before it) is reported too: the cut keeps no activations for the skipped blocks.

Prints JSON on stdout and a markdown table on stderr; ``--out FILE`` also writes the JSON. ``--quick``: hidden 64,
intermediate 256, vocabulary 1,024, 6 layers, 2 batches of 1 × 64 (a few seconds).

Reproduce: ``PYTHONPATH=src .venv/bin/python benchmarks/bench_cut.py --out cut.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import torch

import kronfisher as kf
from kronfisher.collection import passes
from kronfisher.collection.cut import BlockCut
from kronfisher.drivers.fit import collect
from kronfisher.drivers.planning import tracked_layers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import SHAPES, machine, peak_rss, reset_peak

FULL = {**SHAPES["qwen2.5-1.5b"], "layers": 6, "seq": 512, "batches": 3}
QUICK = {"hidden": 64, "inter": 256, "heads": 4, "kv": 2, "vocab": 1024, "tied": True, "layers": 6, "seq": 64}
QUICK["batches"] = 2


class NoCut(BlockCut):
    """The pass without the cut: never arms, so the embedding output stays the grad leaf."""

    @contextlib.contextmanager
    def armed(self) -> Iterator[BlockCut]:
        yield self


def model_of(shape: dict[str, Any], layers: int) -> torch.nn.Module:
    """A Qwen2 causal LM of ``shape`` with ``layers`` decoder layers, random float32 weights, eval mode."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        hidden_size=shape["hidden"],
        intermediate_size=shape["inter"],
        num_hidden_layers=layers,
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv"],
        vocab_size=shape["vocab"],
        tie_word_embeddings=shape["tied"],
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg).eval()


class _Said(logging.Handler):
    """Collects the messages of the ``kronfisher`` logger (did the pass use the cut?)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def one_pass(model: torch.nn.Module, batches: list[Any], cfg: kf.KFACConfig, group: list[str], cut: bool) -> Any:
    """Wall and CPU seconds, peak RSS and whether the cut was used, for one collection pass of ``group``."""
    said, logger = _Said(), logging.getLogger("kronfisher")
    level = logger.level
    logger.addHandler(said)
    logger.setLevel(logging.INFO)
    patch = contextlib.nullcontext() if cut else mock.patch.object(passes, "BlockCut", NoCut)
    reset_peak()
    try:
        with patch:
            start, cpu = time.perf_counter(), time.process_time()
            collect(model, batches, cfg, layers=group, check=False)
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    finally:
        logger.removeHandler(said)
        logger.setLevel(level)
    used = any(m.startswith("Backward stops") for m in said.messages)
    used = used and not any(m.startswith("Backward cut turned off") for m in said.messages)
    return wall, cpu, peak_rss(), used


def run(shape: dict[str, Any], layers: int, group: int, batches: int, seq: int, repeat: int) -> dict[str, Any]:
    """Time the full and the cut pass of the last ``group`` blocks; see the module docstring."""
    model = model_of(shape, layers)
    cfg = kf.KFACConfig()
    names = list(tracked_layers(model, cfg).infos)
    late = [n for n in names if any(f".layers.{i}." in n for i in range(layers - group, layers))]
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(0, shape["vocab"], (1, seq), generator=g)} for _ in range(batches)]
    collect(model, data[:1], cfg, layers=late, check=False)  # warm-up (allocator, kernels)
    times: dict[str, list[float]] = {"full": [], "cut": []}
    cpus: dict[str, list[float]] = {"full": [], "cut": []}
    peaks: dict[str, list[int]] = {"full": [], "cut": []}
    used: dict[str, bool] = {}
    for _ in range(repeat):
        for kind in ("full", "cut"):
            wall, cpu, peak, used[kind] = one_pass(model, data, cfg, late, cut=kind == "cut")
            times[kind].append(wall)
            cpus[kind].append(cpu)
            peaks[kind].append(peak)
    full, cut = min(times["full"]), min(times["cut"])
    full_cpu, cut_cpu = min(cpus["full"]), min(cpus["cut"])
    return {
        "shape": shape,
        "layers": layers,
        "group": late,
        "cut_at_block": layers - group,
        "batches": batches,
        "tokens_per_batch": seq,
        "cut_used": used,
        "wall_s": times,
        "cpu_s": cpus,
        "peak_rss_bytes": {k: max(v) for k, v in peaks.items()},
        "best_wall_s": {"full": full, "cut": cut},
        "best_cpu_s": {"full": full_cpu, "cut": cut_cpu},
        "ratio_full_over_cut": full / cut,
        "cpu_ratio_full_over_cut": full_cpu / cut_cpu,
    }


def table(report: dict[str, Any]) -> str:
    r = report["result"]
    mib = 2**20
    head = f"{r['layers']} layers, group = last {r['layers'] - r['cut_at_block']} blocks, {r['batches']} × 1×"
    lines = [
        f"{head}{r['tokens_per_batch']} tokens",
        "",
        "| pass | best wall s | best CPU s | peak RSS MiB |",
        "|---|---|---|---|",
    ]
    for kind in ("full", "cut"):
        wall, cpu, peak = r["best_wall_s"][kind], r["best_cpu_s"][kind], r["peak_rss_bytes"][kind] / mib
        lines.append(f"| {kind} | {wall:.2f} | {cpu:.2f} | {peak:.0f} |")
    lines.append(f"\nfull / cut: wall {r['ratio_full_over_cut']:.2f}×, CPU {r['cpu_ratio_full_over_cut']:.2f}×")
    return "\n".join(lines)


def group_bench(
    name: str, doc: str, run_fn: Any, table_fn: Any, full: dict[str, Any], quick: dict[str, Any], below: int
) -> Any:
    """The ``main`` of a benchmark of one late group's pass (this one, ``bench_seen.py``): options, JSON, table.

    ``below``: blocks the group must leave below it (1 for the cut).
    """

    def main(argv: list[str] | None = None) -> int:
        parser = argparse.ArgumentParser(description=doc.split("\n")[0])
        parser.add_argument("--quick", action="store_true", help="tiny shapes, a few seconds")
        parser.add_argument("--layers", type=int, default=None, help=f"decoder layers (default {full['layers']})")
        parser.add_argument("--group", type=int, default=2, help="the group: the last N blocks (default 2)")
        parser.add_argument(
            "--batches", type=int, default=None, help=f"batches (default {full['batches']}; quick {quick['batches']})"
        )
        parser.add_argument(
            "--seq", type=int, default=None, help=f"tokens per batch (default {full['seq']}; quick {quick['seq']})"
        )
        parser.add_argument("--repeat", type=int, default=2, help="passes of each kind (the fastest counts)")
        parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
        args = parser.parse_args(argv)
        base = quick if args.quick else full
        layers = args.layers or base["layers"]
        if not 0 < args.group <= layers - below:
            parser.error(f"--group must be between 1 and {layers - below}")
        result = run_fn(base, layers, args.group, args.batches or base["batches"], args.seq or base["seq"], args.repeat)
        report = {"benchmark": name, "quick": args.quick, "machine": machine(), "result": result}
        text = json.dumps(report, indent=2)
        print(text)
        print(table_fn(report), file=sys.stderr)
        if args.out is not None:
            args.out.write_text(text + "\n")
        return 0

    return main


main = group_bench("bench_cut", __doc__, run, table, FULL, QUICK, below=1)  # the cut needs blocks below the group


if __name__ == "__main__":
    sys.exit(main())
