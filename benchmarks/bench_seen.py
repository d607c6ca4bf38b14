"""The EK-FAC pass on the collected rows: one pass with the rows' coordinates and one projecting them, side by side.

A factor decomposed from its held rows (the thin ``A`` of ``down_proj``, the exact low-rank ``G`` of
``gate_proj``/``up_proj`` at a few thousand tokens) knows the coordinates of those rows in its eigenbasis; the
EK-FAC pass over the same batches takes them, after checking the rows' fingerprints, instead of projecting every
batch (``kronfisher.collection.seen``, docs/concepts.md). This collects and decomposes the last ``--group`` blocks
of a Qwen2.5-1.5B-shaped model (hidden 1,536, intermediate 8,960, 12/2 heads, vocabulary 151,936, tied; random
float32 weights) cut to ``--layers`` decoder layers, over ``--batches`` batches of 1 × ``--seq`` tokens, then runs
the EK-FAC pass of that group alternately with the coordinates ("rows") and with the projections ("projected",
``seen.REUSE_ROWS = False``), ``--repeat`` times each; the fastest of each is compared (ratio projected / rows,
wall and CPU time of this process). The two passes' corrected eigenvalues are compared too (largest difference
relative to the largest value), and the layers that took the shortcut are listed.

Prints JSON on stdout and a markdown table on stderr; ``--out FILE`` also writes the JSON. ``--quick``: hidden 64,
intermediate 256, vocabulary 1,024, 3 layers, 2 batches of 1 × 48 tokens (a few seconds).

Reproduce: ``PYTHONPATH=src .venv/bin/python benchmarks/bench_seen.py --out seen.json``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any
from unittest import mock

import torch

import kronfisher as kf
from kronfisher.collection import corrector, seen
from kronfisher.drivers.ekfac import correct
from kronfisher.drivers.fit import collect
from kronfisher.drivers.planning import tracked_layers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cut import group_bench, model_of
from bench_scale import SHAPES

FULL = {**SHAPES["qwen2.5-1.5b"], "layers": 3, "seq": 512, "batches": 8}
QUICK = {"hidden": 64, "inter": 256, "heads": 4, "kv": 2, "vocab": 1024, "tied": True, "layers": 3, "seq": 48}
QUICK["batches"] = 2


def one_pass(fisher: kf.KFAC, blocks: dict[str, Any], model: torch.nn.Module, data: list[Any], reuse: bool) -> Any:
    """Wall and CPU seconds, the corrected blocks and the row streams that took the shortcut, for one EK-FAC pass."""
    cursors: list[seen.RowCursor] = []

    class Spy(seen.RowCursor):
        def __init__(self) -> None:
            super().__init__()
            cursors.append(self)

    fisher.set_blocks(blocks)  # the decomposed blocks, with the rows' coordinates, before every pass
    with mock.patch.object(seen, "REUSE_ROWS", reuse), mock.patch.object(corrector, "RowCursor", Spy):
        start, cpu = time.perf_counter(), time.process_time()
        correct(fisher, model, data)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    out = {n: fisher.block(n) for n in blocks}
    used = sorted(f"{k[0]} {k[1] if k[0] == 'G' else 'of a rows-held input'}" for k in cursors[0].used)
    return wall, cpu, out, used


def run(shape: dict[str, Any], layers: int, group: int, batches: int, seq: int, repeat: int) -> dict[str, Any]:
    """Collect and decompose the last ``group`` blocks, then time both EK-FAC passes; see the module docstring."""
    model = model_of(shape, layers)
    cfg = kf.KFACConfig(ekfac=True, lowrank_threshold=min(8192, shape["inter"] // 2))  # gate/up: out > threshold
    names = list(tracked_layers(model, cfg).infos)
    late = [n for n in names if any(f".layers.{i}." in n for i in range(layers - group, layers))]
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(0, shape["vocab"], (1, seq), generator=g)} for _ in range(batches)]
    discovery, collector, report = collect(model, data, cfg, layers=late, check=False)
    start = time.perf_counter()
    fisher = kf.KFAC.from_sums(discovery.infos, collector.sums, cfg, report=report, model=model)
    decompose_s = time.perf_counter() - start
    blocks = dict(fisher.blocks)
    held = {n: {"thin_A": b.A.seen is not None, "G": b.G.kind} for n, b in blocks.items()}
    times: dict[str, list[float]] = {"rows": [], "projected": []}
    cpus: dict[str, list[float]] = {"rows": [], "projected": []}
    results: dict[str, dict[str, Any]] = {}
    used: dict[str, list[str]] = {}
    for _ in range(repeat):
        for kind in ("rows", "projected"):
            wall, cpu, results[kind], used[kind] = one_pass(fisher, blocks, model, data, kind == "rows")
            times[kind].append(wall)
            cpus[kind].append(cpu)
    diff = 0.0
    for n in blocks:
        a, b = results["rows"][n].corrected, results["projected"][n].corrected
        diff = max(diff, float((a - b).abs().max()) / max(float(b.abs().max()), 1e-300))
    rows, proj = min(times["rows"]), min(times["projected"])
    return {
        "shape": shape,
        "layers": layers,
        "group": late,
        "batches": batches,
        "tokens_per_batch": seq,
        "held": held,
        "shortcut_used": used,
        "decompose_s": decompose_s,
        "wall_s": times,
        "cpu_s": cpus,
        "best_wall_s": {"rows": rows, "projected": proj},
        "best_cpu_s": {"rows": min(cpus["rows"]), "projected": min(cpus["projected"])},
        "ratio_projected_over_rows": proj / rows,
        "cpu_ratio_projected_over_rows": min(cpus["projected"]) / min(cpus["rows"]),
        "max_rel_diff_corrected": diff,
    }


def table(report: dict[str, Any]) -> str:
    r = report["result"]
    lines = [
        f"{r['layers']} layers, group = last {len(r['group']) // 7} blocks, {r['batches']} × 1×{r['tokens_per_batch']}"
        " tokens, EK-FAC pass",
        "",
        "| pass | best wall s | best CPU s |",
        "|---|---|---|",
    ]
    for kind in ("rows", "projected"):
        lines.append(f"| {kind} | {r['best_wall_s'][kind]:.2f} | {r['best_cpu_s'][kind]:.2f} |")
    lines.append(
        f"\nprojected / rows: wall {r['ratio_projected_over_rows']:.2f}×, CPU {r['cpu_ratio_projected_over_rows']:.2f}×"
        f"; corrected eigenvalues differ by {r['max_rel_diff_corrected']:.1e} (relative)"
    )
    lines.append(f"shortcut taken by: {', '.join(r['shortcut_used']['rows'])}")
    return "\n".join(lines)


main = group_bench("bench_seen", __doc__, run, table, FULL, QUICK, below=0)


if __name__ == "__main__":
    sys.exit(main())
