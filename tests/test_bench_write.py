"""``benchmarks/bench_write.py --quick``: every way of writing a factor file gives the bytes of its pair.

The peaks themselves are not asserted at this size (the allocator keeps freed megabytes); the full-size figures
are in benchmarks/RESULTS.md. What is checked: each case ran in its own process and wrote a file, and the files
of a pair (save_file / stream, torch.cat / chunked rows, contiguous copy / column-major payload) are identical.
"""

from __future__ import annotations

import json

from conftest import bench_module


def test_quick_mode_writes_the_same_bytes_in_every_pair(capsys):
    bench = bench_module("bench_write")
    assert bench.main(["--quick"]) == 0
    cases = {c["case"]: c for c in json.loads(capsys.readouterr().out)["cases"]}
    assert set(cases) == set(bench.CASES)
    pairs = [("save_file", "stream"), ("cat+save_file", "rows+stream"), ("contiguous+stream", "payload+stream")]
    for a, b in pairs:
        assert cases[a]["sha256"] == cases[b]["sha256"], (a, b)
        assert cases[a]["tensors_bytes"] == cases[b]["tensors_bytes"] > 4 * 1024 * 1024 * 4
