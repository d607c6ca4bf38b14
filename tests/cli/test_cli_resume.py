"""Kill-and-resume: a ``kronfisher analyze`` subprocess killed (SIGKILL) mid-collection, then ``--resume``, gives
exactly the factors of an uninterrupted run (docs/files.md). The MC Fisher is used so that the draws after the resume
must be those of the uninterrupted run (targets are seeded per batch index), and a token budget on the low-rank
lm_head so that compression happens across the interruption.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import kronfisher as kf
from kronfisher.cli import main
from test_cli_helpers import TEXT_A, TEXT_B, build_model, save_model

KILL_AT = 5  # batch index at which the subprocess kills itself; checkpoints every 2 batches -> 4 batches saved

# Runs the real CLI in a fresh interpreter; the only change is that batch KILL_AT ends the process with SIGKILL
# before it is computed (no cleanup, no atexit: like an OOM kill or a power cut).
KILLER = textwrap.dedent(
    f"""
    import importlib, os, signal, sys
    fit = importlib.import_module("kronfisher.collection.passes")  # the module holding the one batch loop
    original = fit.run_batch
    def run_batch(model, batch, cap, cfg, index, *args, **kwargs):
        if index == {KILL_AT}:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(model, batch, cap, cfg, index, *args, **kwargs)
    fit.run_batch = run_batch
    from kronfisher.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def test_killed_run_resumes_to_the_uninterrupted_factors(tmp_path: Path) -> None:
    save_model(build_model("llama", seed=2, tie=True), tmp_path / "m")
    (tmp_path / "t.txt").write_text(TEXT_A + TEXT_B)
    args = ["analyze", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "t.txt"), "--no-plots", "--quiet"]
    args += ["--seq-len", "12", "--batch-size", "2", "--max-tokens", "all", "--fisher", "mc", "--seed", "3"]
    args += ["--lowrank-threshold", "64", "--lowrank-rank", "10", "--checkpoint-every", "2", "--save-sums"]

    whole = tmp_path / "whole"
    assert main([*args, "--output-dir", str(whole)]) == 0
    report = json.loads((whole / "report.json").read_text())
    assert report["data"]["batches"] > KILL_AT + 2  # the kill really is mid-collection

    part = tmp_path / "part"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, *args, "--output-dir", str(part)], env=env, capture_output=True, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    ckpt = next((part / "checkpoints").glob("*.safetensors"))
    assert kf.read_metadata(ckpt)["extra"]["batches_done"] == 4
    assert not list((part / "factors").glob("*")) if (part / "factors").exists() else True

    # Without --resume a fresh run would start over; with it, the 4 saved batches are not recomputed.
    assert main([*args, "--output-dir", str(part), "--resume"]) == 0
    assert not ckpt.exists()
    name = report["models"][0]["factor_file"]
    got, want = kf.load_sums(part / name), kf.load_sums(whole / name)
    assert got.report.tokens == want.report.tokens and got.report.batches == want.report.batches
    for layer, s in want.sums.items():
        g = got.sums[layer]
        # Same batches, same order, same MC draws, float32 sums: bitwise equal.
        assert torch.equal(g.A.sum, s.A.sum) and g.A.count == s.A.count, layer
        if s.G.kind == "dense":
            assert torch.equal(g.G.sum, s.G.sum), layer
        else:
            assert torch.equal(g.G.raw_columns(), s.G.raw_columns()) and g.G.tail_mass == s.G.tail_mass, layer
        assert g.G.count == s.G.count
    a, b = kf.load(part / name), kf.load(whole / name)
    for layer in b.layer_names:
        assert torch.equal(a.block(layer).A.values, b.block(layer).A.values)
    assert json.loads((part / "report.json").read_text())["models"][0]["layers"] == report["models"][0]["layers"]

    # --resume on a finished run reuses the complete factor file: no collection, same numbers.
    assert main([*args, "--output-dir", str(whole), "--resume"]) == 0
    again = json.loads((whole / "report.json").read_text())["models"][0]
    assert "collect" not in again["timings_s"]
    # Same factors, same gradients; the report's GEMMs may round differently in another process (MKL's kernels
    # depend on memory alignment), so numbers agree to 1e-12 relative rather than bitwise.
    want = report["models"][0]["layers"]
    assert again["layers"].keys() == want.keys()
    for layer, row in again["layers"].items():
        assert row.keys() == want[layer].keys(), layer
        for key, value in row.items():
            if isinstance(value, float):
                assert value == pytest.approx(want[layer][key], rel=1e-12, abs=1e-300), (layer, key)
            else:
                assert value == want[layer][key], (layer, key)


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save_model(build_model("llama", seed=2, tie=True), tmp_path / "m")
    (tmp_path / "t.txt").write_text(TEXT_A)
    args = ["analyze", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "t.txt"), "--no-plots", "--quiet"]
    args += ["--seq-len", "12", "--batch-size", "2", "--output-dir", str(tmp_path / "o")]
    ckpt = tmp_path / "o" / "checkpoints" / "0-m.sums.safetensors"
    ckpt.parent.mkdir(parents=True)
    # A checkpoint of the same model on other data (written through the library API).
    other = [{"input_ids": torch.arange(2, 14).reshape(1, 12), "attention_mask": torch.ones(1, 12, dtype=torch.long)}]
    model = build_model("llama", seed=2, tie=True)
    _, c, r = kf.collect(model, other, kf.KFACConfig(lowrank_max_rank=512))
    kf.save_sums(ckpt, c.infos, c.sums, kf.KFACConfig(lowrank_max_rank=512), report=r, extra_meta={"identity": {}})
    rc = main([*args, "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and "different run" in err and "data_sha256" in err and "hint:" in err
