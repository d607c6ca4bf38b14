"""Every script in examples/ runs, and what it prints or returns holds against an independent check.

The scripts are run through ``runpy`` (their ``main()`` called with the same arguments a user would pass), except
the torchrun one, which is launched as users launch it. Each check could fail: a reference computed another way (a
dense block, a one-process run, a run on the union of the data) or a property the script's setup guarantees
(frozen layers do not move, an unchanged input gives the same factor).
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kronfisher as kf

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _main(name: str):
    return runpy.run_path(str(EXAMPLES / name))["main"]


def test_every_example_is_tested() -> None:
    tested = {"training_loop.py", "hf_trainer.py", "compare_models.py", "analyze_cli.py", "files.py", "gpu.py"}
    tested |= {"distributed.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


def test_training_loop_trains_with_natural_gradients() -> None:
    result = _main("training_loop.py")()
    losses, cos = result["losses"], result["cosines"]
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0  # 3.90 -> about 2.3 in 30 steps
    # Preconditioning must change the direction (cos < 1) and keep a descent direction (cos > 0: F + δ is SPD).
    assert all(0.0 < c < 0.999 for c in cos)


def test_hf_trainer_callback_preconditions_every_step() -> None:
    result = _main("hf_trainer.py")()
    assert result["refreshes"] == 3  # steps 0, 5, 10 of 12
    assert result["preconditioned_steps"] == 12
    assert result["last_loss"] < result["first_loss"] - 0.5


def test_compare_models_frozen_layers_do_not_move_and_quadratic_form_is_dense() -> None:
    result = _main("compare_models.py")()
    rows, fisher = result["rows"], result["fisher_base"]
    base, tuned = dict(result["base"].named_parameters()), dict(result["tuned"].named_parameters())
    for name, r in rows.items():
        if "layers.1.self_attn" in name:  # frozen during the fine-tune
            assert r["quadratic_form"] == 0.0 and r["relative_change"] == 0.0
        else:
            assert r["quadratic_form"] > 0.0 and r["relative_change"] > 0.0
        assert 0.0 <= r["overlap_A"] <= 1.0 + 1e-6 and 0.0 <= r["overlap_G"] <= 1.0 + 1e-6
    # Reference: the dense block G ⊗ A over the row-major flattening of W (float64), rtol 1e-4 (float32 factors).
    for name in ("model.layers.0.mlp.down_proj", "model.layers.0.self_attn.v_proj"):
        w = fisher.infos[name].weight_name
        d = (tuned[w] - base[w]).detach().to(torch.float64).reshape(-1)
        dense = 0.5 * float(d @ fisher.to_dense(name).to(torch.float64) @ d)
        assert rows[name]["quadratic_form"] == pytest.approx(dense, rel=1e-4)


def test_analyze_cli_unchanged_layers_have_zero_distance(tmp_path: Path) -> None:
    result = _main("analyze_cli.py")(str(tmp_path), plots=False)
    quad, overlap_a = result["quadratic_form"], result["overlap_A"]
    assert set(quad) and all(v == 0.0 for n, v in quad.items() if ".mlp." not in n)  # only the MLPs changed
    assert all(v > 0.0 for n, v in quad.items() if ".mlp." in n)
    # Block 0's attention reads the embeddings, which did not change: same A, so its top subspace overlaps fully.
    assert overlap_a["model.layers.0.self_attn.q_proj"] == pytest.approx(1.0, abs=1e-5)
    assert (tmp_path / "results" / "report.html").is_file()


def test_files_merge_of_halves_equals_the_full_run(tmp_path: Path) -> None:
    result = _main("files.py")(str(tmp_path))
    assert result["max_relative_difference_merged_vs_full"] < 1e-12  # float64 sums, only the order differs
    assert result["merged_tokens"] == result["full_tokens"] == 128
    assert result["inspect_status"] == 0 and len(result["layers"]) == 9


def test_gpu_example_factors_agree_with_the_cpu() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = _main("gpu.py")(device)
    assert result["lm_head_representation"] == "lowrank"
    assert result["A_device"].startswith(device) and result["lm_head_G_device"].startswith(device)  # U fits
    assert result["max_relative_factor_difference"] < (1e-5 if device == "cuda" else 1e-12)


@pytest.mark.slow
def test_distributed_example_under_torchrun_equals_one_process(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    script = str(EXAMPLES / "distributed.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script, "two.st"]
    run = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 process(es): 5 batches" in run.stdout
    one = _main("distributed.py")(str(tmp_path / "one.st"))
    two = kf.load(tmp_path / "two.st")
    assert two.is_ekfac and two.report.tokens == one.report.tokens
    for name in one.layer_names:  # float64: only the summation order differs (sums rtol 1e-10)
        for mine, ref in zip(two.factors(name), one.factors(name)):
            torch.testing.assert_close(mine, ref, rtol=1e-10, atol=1e-14)
        # EK-FAC blocks go through eigendecompositions of the merged factors: rtol 1e-7.
        torch.testing.assert_close(two.to_dense(name), one.to_dense(name), rtol=1e-7, atol=1e-12)
