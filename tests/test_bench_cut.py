"""``benchmarks/bench_cut.py --quick``: the collection pass of a late group, with and without the backward cut.

Checks the report's shape and that the two passes differ only by the cut (the "full" pass never armed it, the "cut"
pass used it all along); the timings themselves are not asserted (no timed tests).
"""

from __future__ import annotations

import json

from conftest import bench_module


def test_quick_mode_compares_the_pass_with_and_without_the_cut(capsys):
    bench = bench_module("bench_cut")
    assert bench.main(["--quick", "--repeat", "1"]) == 0
    r = json.loads(capsys.readouterr().out)["result"]
    assert r["cut_used"] == {"full": False, "cut": True}
    assert r["cut_at_block"] == 4 and all(".layers.4." in n or ".layers.5." in n for n in r["group"])
    assert len(r["group"]) == 14  # q k v o gate up down of 2 blocks
    assert r["ratio_full_over_cut"] > 0 and r["cpu_ratio_full_over_cut"] > 0
    assert set(r["peak_rss_bytes"]) == {"full", "cut"}
