"""``benchmarks/bench_seen.py --quick``: the EK-FAC pass with the collected rows' coordinates and projecting them.

Checks that the two passes differ only by the shortcut (taken by the thin ``A`` of ``down_proj`` and the low-rank
``G`` of ``gate_proj``/``up_proj`` in the "rows" pass, by nothing in the "projected" one) and give the same
eigenvalues (float32 weights: 1e-4 relative); the timings themselves are not asserted (no timed tests).
"""

from __future__ import annotations

import json

from conftest import bench_module


def test_quick_mode_compares_the_pass_with_and_without_the_rows(capsys):
    bench = bench_module("bench_seen")
    assert bench.main(["--quick", "--repeat", "1"]) == 0
    r = json.loads(capsys.readouterr().out)["result"]
    assert len(r["group"]) == 14  # q k v o gate up down of 2 blocks
    thin = [n for n, h in r["held"].items() if h["thin_A"]]
    assert sorted(thin) == ["model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"]
    used = r["shortcut_used"]
    assert used["projected"] == [] and used["rows"].count("A of a rows-held input") == 2
    assert {f"G model.layers.{i}.mlp.{p}_proj" for i in (1, 2) for p in ("gate", "up")} <= set(used["rows"])
    assert r["max_rel_diff_corrected"] < 1e-4
    assert r["ratio_projected_over_rows"] > 0 and r["cpu_ratio_projected_over_rows"] > 0
