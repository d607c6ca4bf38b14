"""The token budget at 100k tokens: a Qwen2.5-1.5B lm_head alone, peak RSS against the token count (issue 11).

The model is a ``transformers`` ``Qwen2ForCausalLM`` with the real hidden size (1,536) and vocabulary (151,936),
tied embeddings, random float32 weights and no decoder layer (``num_hidden_layers=0``): the embedding, the final
norm and the lm_head. Only the lm_head is tracked (``KFACConfig(include=...)``), with the library's default token
budget (``lowrank_max_rank``): its dense ``G`` (151,936², 92 GB) cannot be held, so the plan makes it low-rank with
budget ``k``, and the columns it holds (``2k`` plus one batch) do not depend on the token count (docs/concepts.md).
``kf.fit`` (K-FAC, and EK-FAC unless ``--no-ekfac``) runs on random token batches of 2 × 512.

Each token count runs in its own process (this script with ``--one T``), so each peak is that count's alone. Per
phase (collect / decompose / ekfac, from the ``group i/n: phase`` log lines of ``kronfisher.drivers.fit``): wall
and CPU seconds and peak RSS (``VmHWM``, reset before each phase); plus the RSS before the fit, the plan of the
lm_head (representation, budget ``k``, columns held) and the operator's ``G`` rank and discarded mass. Each child
writes its JSON after every phase and every ``--every`` batches (``--out`` given: ``OUT.T<count>.json``) and logs
its progress on stderr, so a run stopped early still says how far it got and its peak so far.

Prints JSON on stdout and a markdown table on stderr; ``--out FILE`` also writes the JSON. ``--quick``: hidden 64,
vocabulary 4,096, budget 128 and ``max_memory`` 256 MiB (so the dense ``G`` does not fit, as at full size), 2,048
and 8,192 tokens, a few seconds.

Reproduce: ``PYTHONPATH=src .venv/bin/python benchmarks/bench_tokens.py --out tokens.json [--tokens 10240 102400]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

import kronfisher as kf
from kronfisher.budget import format_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import PhaseLog, current_rss, machine, peak_rss, reset_peak, timed

DEFAULT_RANK = kf.KFACConfig().lowrank_max_rank  # the library's default token budget
FULL = {"hidden": 1536, "vocab": 151936, "max_rank": DEFAULT_RANK, "max_memory": None, "threshold": None}
QUICK = {"hidden": 64, "vocab": 4096, "max_rank": 128, "max_memory": "256MiB", "threshold": 1024}
SEQ = 512  # tokens per sequence; a batch is 2 sequences


def model_of(hidden: int, vocab: int) -> torch.nn.Module:
    """A Qwen2 causal LM with no decoder layer: embedding, norm and tied lm_head, random float32 weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    heads = max(hidden // 128, 1)
    cfg = Qwen2Config(
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=0,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=vocab,
        tie_word_embeddings=True,
        max_position_embeddings=SEQ,
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg).float().eval()


class Batches(list):
    """The batches as a list (the plan counts their tokens), logging progress as a pass goes through them."""

    def __init__(self, items: list[dict[str, torch.Tensor]], record: dict[str, Any], every: int, flush: Any) -> None:
        super().__init__(items)
        self.record, self.every, self.flush, self.passes = record, every, flush, 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self.passes += 1
        start = time.monotonic()
        for i, b in enumerate(super().__iter__(), start=1):
            yield b
            if i % self.every == 0 or i == len(self):
                done = {"pass": self.passes, "batch": i, "of": len(self), "s": round(time.monotonic() - start, 1)}
                done.update(rss_bytes=current_rss(), peak_rss_bytes=peak_rss())
                self.record["progress"] = done
                print(
                    f"[T={self.record['tokens']}] pass {self.passes} batch {i}/{len(self)} {done['s']} s, "
                    f"RSS {format_bytes(done['rss_bytes'])}, phase peak {format_bytes(done['peak_rss_bytes'])}",
                    file=sys.stderr,
                    flush=True,
                )
                self.flush()


def one(tokens: int, shape: dict[str, Any], ekfac: bool, every: int, out_path: Path | None) -> dict[str, Any]:
    """One ``kf.fit`` of the lm_head over ``tokens`` random tokens (the child process of each count)."""
    record: dict[str, Any] = {"tokens": tokens, "batch_tokens": 2 * SEQ, "ekfac": ekfac, **shape}
    record.update(num_hidden_layers=0, machine=machine())
    phases: dict[str, Any] = {}
    record["phases"] = phases

    def flush() -> None:
        if out_path is not None:
            out_path.write_text(json.dumps(record, indent=1))

    model = timed(phases, "build", lambda: model_of(shape["hidden"], shape["vocab"]), flush)
    g = torch.Generator().manual_seed(1)
    items = [{"input_ids": torch.randint(0, shape["vocab"], (2, SEQ), generator=g)} for _ in range(tokens // 1024)]
    batches = Batches(items, record, every, flush)
    extra: dict[str, Any] = {"max_memory": shape["max_memory"]}
    if shape["threshold"] is not None:
        extra["lowrank_threshold"] = shape["threshold"]
    cfg = kf.KFACConfig(include=(r"^lm_head$",), ekfac=ekfac, lowrank_max_rank=shape["max_rank"], **extra)
    reset_peak()
    record["rss_before_fit_bytes"] = current_rss()
    with PhaseLog(phases, flush):
        fisher = timed(phases, "fit", lambda: kf.fit(model, batches, cfg), flush)
    group_peaks = [v["peak_rss_bytes"] for k, v in phases.items() if k.startswith("group")]
    phases["fit"]["peak_rss_bytes"] = max(group_peaks)  # the group phases reset the high-water mark
    record["peak_rss_fit_bytes"] = max(group_peaks)
    plan = fisher.report.to_dict()["plan"]
    record["plan_lm_head"] = {k: plan["layers"]["lm_head"][k] for k in ("representation", "max_rank", "columns")}
    record["plan_lm_head"]["reason"] = plan["layers"]["lm_head"]["reason"]
    record["planned_peak_bytes"] = max(max(p.values()) for p in plan["peaks"])
    row = fisher.summary()["lm_head"]
    record["operator_lm_head"] = {k: row[k] for k in ("representation", "rank_G", "T", "trace_G", "discarded_G")}
    record["machine_end"] = machine()
    flush()
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help="token counts (multiples of 1,024)")
    parser.add_argument("--quick", action="store_true", help="hidden 64, vocabulary 4,096: seconds")
    parser.add_argument("--no-ekfac", action="store_true", help="K-FAC only (collection is where the budget acts)")
    parser.add_argument("--max-rank", type=int, default=None, help="token budget k (0: none; default: the mode's)")
    parser.add_argument("--every", type=int, default=10, help="log progress every N batches")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here (and OUT.T<count>.json)")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = dict(QUICK if args.quick else FULL)
    if args.max_rank is not None:
        shape["max_rank"] = args.max_rank or None
    if args.one is not None:
        part = None if args.out is None else args.out.with_suffix(f".T{args.one}.json")
        print(json.dumps(one(args.one, shape, not args.no_ekfac, args.every, part)))
        return 0
    counts = args.tokens or ([2048, 8192] if args.quick else [10240, 102400])
    report: dict[str, Any] = {"command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]), "runs": []}
    for t in counts:
        cmd = [sys.executable, __file__, "--one", str(t), "--every", str(args.every)]
        cmd += ["--quick"] * args.quick + ["--no-ekfac"] * args.no_ekfac
        cmd += [] if args.max_rank is None else ["--max-rank", str(args.max_rank)]
        cmd += [] if args.out is None else ["--out", str(args.out)]
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True, env=os.environ)
        report["runs"].append(json.loads(done.stdout))
        if args.out is not None:
            args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    print(table(report), file=sys.stderr)
    return 0


def table(report: dict[str, Any]) -> str:
    """Markdown: one row per token count and phase, then the lm_head's plan and operator per count."""
    lines = ["| tokens | phase | wall s | CPU s | peak RSS |", "|---:|---|---:|---:|---:|"]
    for r in report["runs"]:
        for k, v in r["phases"].items():
            if isinstance(v, dict):
                row = f"| {r['tokens']:,} | {k} | {v['wall_s']:.1f} | {v['cpu_s']:.1f} "
                lines.append(row + f"| {format_bytes(v['peak_rss_bytes'])} |")
    lines += ["", "| tokens | RSS before fit | peak RSS of fit | lm_head plan | columns | rank G | discarded / tr G |"]
    lines.append("|---:|---:|---:|---|---:|---:|---:|")
    for r in report["runs"]:
        p, o = r["plan_lm_head"], r["operator_lm_head"]
        share = o["discarded_G"] / o["trace_G"] if o["trace_G"] else 0.0
        lines.append(
            f"| {r['tokens']:,} | {format_bytes(r['rss_before_fit_bytes'])} | {format_bytes(r['peak_rss_fit_bytes'])} "
            f"| {p['representation']}, k {p['max_rank']} | {p['columns']:,} | {o['rank_G']} | {share:.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
