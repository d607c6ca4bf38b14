"""``benchmarks/bench_e2e.py``: the phases it reads from a ``kronfisher analyze`` log, and the options it passes on.

The script itself runs the CLI on a saved model in subprocesses (about a minute even on its ``--tiny`` model), so the
suite checks its parts: that the arguments it builds are ones the CLI's own parser accepts with EK-FAC on, that its
steps get the same options, and that wall / CPU / peak RSS per phase follow the markers and samples of a log.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from kronfisher.cli import build_parser, config_from_args

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
try:
    import bench_e2e as be
finally:
    sys.path.pop(0)

GIB = 2**30


def test_cli_arguments_are_the_clis_own_with_ekfac_and_the_budget():
    opts = be.parse(["--dir", "/m", "--max-tokens", "1024", "--extra=--no-plots --seed 3"])
    args = build_parser().parse_args(be.cli_args("/m", opts))
    cfg = config_from_args(args)
    assert args.model == ["/m"] and args.output_dir == "/m-analyze" and args.no_plots
    assert (args.max_tokens, args.seq_len, args.batch_size, args.device) == (1024, 512, 2, "cpu")
    assert cfg.ekfac and cfg.seed == 3 and cfg.max_memory == 20 * GIB


def test_steps_get_the_same_options():
    opts = be.parse(["--dir", "/m", "--layers", "1", "--tiny", "--max-memory", "1GiB", "--seq-len", "64", "--extra=-q"])
    argv = be.step_argv("plain", "/m", opts)
    again = be.parse(argv[2:])
    assert again.plain == "/m" and again.dir is None
    for key in ("layers", "tiny", "max_memory", "max_tokens", "seq_len", "batch_size", "extra", "out_dir"):
        assert getattr(again, key) == getattr(opts, key), key


def _sample(rss: float, hwm: float, cpu: float) -> dict[str, float]:
    return {"VmRSS": int(rss * GIB), "VmHWM": int(hwm * GIB), "cpu": cpu}


def test_phases_of_an_ungrouped_run(tmp_path):
    log = be.Log(tmp_path / "run.log")
    lines = {
        1: "[0] loading model /m",
        2: "  data: 4096 tokens, 8 sequences, 4 batches",
        3: "  K-FAC factors:  25%|██        | 1.02k/4.10k [00:01<00:03, 1.00ktok/s]",
        6: "  decompose:  50%|█████     | 4/8 [00:01<00:01, 3.00layer/s]",
        8: "  EK-FAC eigenvalues:  50%|█████     | 2.05k/4.10k",
        10: "  EK-FAC eigenvalues: 100%|██████████| 4.10k/4.10k",
        11: "  gradient:  75%|███████▌  | 3.07k/4.10k",
        12: "  gradient: 100%|██████████| 4.10k/4.10k",
        14: "wrote out/report.html, out/report.md, out/report.json",
    }
    rss = {t: 1.0 + (2.0 if t in (4, 5) else 0.5 if t == 9 else 0.0) for t in range(16)}  # collect 3 GiB, ekfac 1.5
    for t in range(16):  # a sample every second, CPU at 2 cores
        if t in lines:
            log.write(lines[t], at=t)
        log.write("", _sample(rss[t], max(rss[u] for u in range(t + 1)), 2.0 * t), at=t + 1e-3)
    rows = {r["phase"]: r for r in be.phases(log, 15.5)}
    assert list(rows) == ["startup", "load", "plan", "collect", "decompose", "ekfac", "save", "gradient",
                          "metrics+report", "exit (report written)"]  # fmt: skip
    assert rows["collect"]["wall_s"] == pytest.approx(3.0) and rows["collect"]["cpu_s"] == pytest.approx(6.0)
    assert rows["collect"]["peak_rss_bytes"] == 3 * GIB and rows["decompose"]["peak_rss_bytes"] == GIB
    assert rows["ekfac"]["peak_rss_bytes"] == int(1.5 * GIB) and rows["ekfac"]["cpu_s"] == pytest.approx(4.0)
    rec = {"plain": {"fwd_bwd": {"wall_s": 2.0, "cpu_s": 4.0}}, "analyze": {"rc": 0, "peak_rss_bytes": 3 * GIB}}
    rec["analyze"].update(phases=list(rows.values()), timings_s={"collect": 3.0, "decompose": 2.0, "ekfac": 2.5})
    s = be.summary(rec)
    assert s["ratio_wall"] == pytest.approx(7.5 / 2) and s["ratio_cpu"] == pytest.approx(
        14.0 / 4
    )  # CPU from the log: 3 + 2 + 2 s at 2 cores
    assert s["rss_ok"] and s["ratio_ok"]


def test_phases_of_a_grouped_run_are_per_group(tmp_path):
    log = be.Log(tmp_path / "run.log")
    plan = "    group 1/2: 100 layers (model.layers.0.self_attn.q_proj … model.layers.13.mlp.down_proj), peak cpu 9 GiB"
    steps = [f"  group {k}/2: {p}" for k in (1, 2) for p in ("collect", "decompose", "ekfac", "write")]
    lines = [plan, *steps, "  group 2/2: done", "  gradient:  10%|█   | 410/4.10k"]
    for t, line in enumerate(lines, start=1):
        log.write(line, at=float(t))
        log.write("", _sample(1.0, 1.0, 1.5 * t), at=t + 1e-3)
    rows = be.phases(log, 12.0)
    names = [f"group {k}/2 {p}" for k in (1, 2) for p in ("collect", "decompose", "ekfac", "write")]
    assert [r["phase"] for r in rows] == ["startup", *names, "save", "gradient"]
    timings = {f"group {k}/2: {p}": 1.0 for k in (1, 2) for p in ("collect", "decompose", "ekfac", "write")}
    rec = {"plain": {"fwd_bwd": {"wall_s": 2.0, "cpu_s": 3.0}}, "analyze": {"rc": 0, "peak_rss_bytes": 23 * GIB}}
    rec["analyze"].update(phases=rows, timings_s={**timings, "groups": 8.5, "collect": 99.0, "save": 1.0})
    s = be.summary(rec)  # the CLI's own time of each group's collect, decompose and EK-FAC; not the writes
    assert s["pipeline_wall_s"] == 6.0 and s["groups_wall_s"] == 8.5 and s["ratio_wall"] == pytest.approx(3.0)
    assert s["ratio_cpu"] == pytest.approx(6 * 1.5 / 3.0)  # six phases of one second each, 1.5 CPU s per second
    assert not s["rss_ok"] and s["ratio_ok"]


def test_a_progress_bar_refresh_is_logged_when_it_arrives(tmp_path):
    log = be.Log(tmp_path / "run.log")
    seen_before_next_chunk = []
    chunks = [b"[0] loading model /m\n", b"\r  K-FAC factors:   0%|          | 0.00/4.10k", b"warning: x\n"]

    class Pipe:  # the child's output, one write at a time; a tqdm refresh is "\r" + text, ended by the next one
        def read1(self, n: int) -> bytes:
            seen_before_next_chunk.append([name for _, name in log.events])
            return chunks.pop(0) if chunks else b""

    be.pump(Pipe(), log)
    assert seen_before_next_chunk[2] == ["startup", "load", "collect"]  # not held back until "warning: x" came
    assert log.tail == ["[0] loading model /m", "  K-FAC factors:   0%|          | 0.00/4.10k", "warning: x"]
