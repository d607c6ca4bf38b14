"""``benchmarks/cuda_check.py``'s ``big`` section runs end to end on CPU in its quick shapes (no GPU needed).

The whole script in ``--device cpu --quick`` mode takes a few CPU minutes (its ``cli`` section runs the command
twice in subprocesses), too long for the suite; the new section is the one run here, with its report's fields.
"""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_big_section_quick_on_cpu_reports_every_phase():
    sys.path.insert(0, str(BENCH))
    try:
        from cuda_big import perf_big
    finally:
        sys.path.remove(str(BENCH))
    out = perf_big("cpu", quick=True, repeats=1)
    assert out["tokens"] == 128 and out["batches"] == 2 and out["shape"]["tied"]
    for phase in ("fwd_bwd", "collect", "decompose", "ekfac_pass", "natural_gradient"):
        row = out[phase]
        assert row["s"] > 0 and row["h2d_bytes_per_batch"] == row["d2h_bytes_per_batch"] == 0  # nothing crosses
        assert row["peak_host_GiB"] is None or 0 < row["peak_host_GiB"] < 4
        if phase != "fwd_bwd":
            assert row["ratio_to_fwd_bwd"] > 0
    assert out["summary"]["lm_head_G_device"] == "cpu"
    assert out["summary"]["collect_bytes_per_batch/lm_head_grad_bytes"] == 0
