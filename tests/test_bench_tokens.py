"""``benchmarks/bench_tokens.py --quick``: the lm_head keeps the token budget, so its memory does not grow with T.

The quick shapes (hidden 64, vocabulary 4,096, budget k = 128, ``max_memory`` 256 MiB so that a dense ``G`` does not
fit) run in child processes at 4,096 and 16,384 tokens, K-FAC only (about 30 s on 2 cores). Past the first few
compressions the peak RSS is flat in T (measured: 620, 604, 592 MiB at 4k, 8k, 16k tokens, but it varies by tens of
MiB from run to run with the allocator); keeping every token instead would hold 4,096 × T float32 columns, 192 MiB
more at 16k than at 4k, plus a [T, T] float64 Gram of 2 GiB at 16k. The tolerance, 96 MiB, is half the columns.
"""

from __future__ import annotations

import json

from conftest import bench_module

MIB = 2**20


def test_quick_mode_keeps_the_lm_head_within_its_token_budget(capsys):
    bench = bench_module("bench_tokens")
    assert bench.main(["--quick", "--no-ekfac", "--tokens", "4096", "16384", "--every", "100"]) == 0
    report = json.loads(capsys.readouterr().out)
    runs = {r["tokens"]: r for r in report["runs"]}
    assert sorted(runs) == [4096, 16384]
    k = bench.QUICK["max_rank"]
    for t, r in runs.items():
        assert r["plan_lm_head"]["representation"] == "lowrank" and r["plan_lm_head"]["max_rank"] == k
        assert r["plan_lm_head"]["columns"] == 2 * k + 1024  # 2k plus one batch, whatever T
        op = r["operator_lm_head"]
        assert op["representation"] == "lowrank" and op["rank_G"] == k and op["T"] == t
        assert 0 < op["discarded_G"] < op["trace_G"]  # compressed, trace kept in the tail
        assert set(r["phases"]) >= {"build", "group1_collect", "group1_decompose", "fit"}
    small, large = runs[4096]["peak_rss_fit_bytes"], runs[16384]["peak_rss_fit_bytes"]
    assert large <= small + 96 * MIB, (small / MIB, large / MIB)
