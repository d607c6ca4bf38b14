"""``kronfisher analyze`` under ``torchrun --nproc_per_node=2`` gives the one-process result (docs/distributed.md).

Both runs use float64 weights and sums, the MC Fisher with two draws (targets seeded per global batch index),
EK-FAC, and a low-rank lm_head keeping every token (so the merged ``U Uᵀ`` is exact). The data has an odd number
of batches, so the ranks have different batch counts. A second scenario kills rank 1 mid-collection (SIGKILL;
torchrun then stops rank 0) and resumes both ranks from their own checkpoints.

Reference: the same command in one process. Tolerances: sums and counts rtol 1e-10 (float64, only the summation
order differs); report numbers rtol 1e-7 (they go through eigendecompositions of the merged factors).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import kronfisher as kf
from kronfisher.cli import main
from test_cli_helpers import TEXT_A, TEXT_B, build_model, save_model

TIMEOUT = 300  # seconds for one torchrun launch; a hang fails the test instead of stalling CI


def _args(tmp_path: Path) -> list[str]:
    args = ["analyze", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "t.txt"), "--no-plots", "--quiet"]
    args += ["--seq-len", "12", "--batch-size", "2", "--max-tokens", "200", "--dtype", "float64"]
    args += ["--accumulate-dtype", "float64", "--fisher", "mc", "--mc-samples", "2", "--ekfac", "--seed", "5"]
    args += ["--lowrank-threshold", "64", "--lowrank-rank", "all", "--save-sums"]
    return args


def _torchrun(script: list[str], args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *script, *args]
    return subprocess.run(cmd, env=env, capture_output=True, timeout=TIMEOUT, cwd=tmp_path)


def _dense_G(s: kf.LayerSums) -> torch.Tensor:
    if s.G.kind == "dense":
        return s.G.sum
    u = s.G.raw_columns().to(torch.float64)
    return u @ u.t()


def _assert_same_sums(got_path: Path, want_path: Path) -> None:
    got, want = kf.load_sums(got_path), kf.load_sums(want_path)
    for key in ("tokens", "loss_terms", "batches"):
        assert getattr(got.report, key) == getattr(want.report, key), key
    assert math.isclose(got.report.loss_sum, want.report.loss_sum, rel_tol=1e-12)
    assert set(got.sums) == set(want.sums)
    for layer, s in want.sums.items():
        g = got.sums[layer]
        assert g.A.count == s.A.count and g.G.count == s.G.count, layer
        torch.testing.assert_close(g.A.sum, s.A.sum, rtol=1e-10, atol=0, msg=layer)
        torch.testing.assert_close(_dense_G(g), _dense_G(s), rtol=1e-10, atol=1e-14, msg=layer)


def _numbers(x: object, path: str = "") -> dict[str, float]:
    """Every finite number in a JSON tree, by its path."""
    out: dict[str, float] = {}
    if isinstance(x, dict):
        for k, v in x.items():
            out.update(_numbers(v, f"{path}/{k}"))
    elif isinstance(x, list):
        for i, v in enumerate(x):
            out.update(_numbers(v, f"{path}/{i}"))
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        out[path] = float(x)
    return out


def _assert_same_report(got_dir: Path, want_dir: Path) -> None:
    got = json.loads((got_dir / "report.json").read_text())["models"][0]
    want = json.loads((want_dir / "report.json").read_text())["models"][0]
    assert got["data"] == want["data"] and got["collection"]["empty_batches"] == want["collection"]["empty_batches"]
    for key in ("loss", "loss_terms", "tokens"):
        assert math.isclose(got[key], want[key], rel_tol=1e-10), key
    a, b = _numbers(got["layers"]), _numbers(want["layers"])
    assert a.keys() == b.keys()
    for k, v in b.items():
        if k.endswith("condition_number_raw"):  # undamped: divides by an eigenvalue at rounding level (~1e-16)
            continue
        assert math.isclose(a[k], v, rel_tol=1e-7, abs_tol=1e-12), (k, a[k], v)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model, the data and the one-process run."""
    tmp = tmp_path_factory.mktemp("torchrun")
    save_model(build_model("llama", seed=4, tie=True), tmp / "m")
    (tmp / "t.txt").write_text(TEXT_A + TEXT_B)
    assert main([*_args(tmp), "--output-dir", str(tmp / "one")]) == 0
    batches = json.loads((tmp / "one" / "report.json").read_text())["data"]["batches"]
    assert batches % 2 == 1 and batches >= 7  # uneven shards: rank 0 gets one batch more
    return tmp


def test_torchrun_two_processes_equal_one(reference: Path) -> None:
    tmp = reference
    proc = _torchrun(["-m", "kronfisher.cli"], [*_args(tmp), "--output-dir", str(tmp / "two")], tmp)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    name = json.loads((tmp / "one" / "report.json").read_text())["models"][0]["factor_file"]
    _assert_same_sums(tmp / "two" / name, tmp / "one" / name)
    one, two = kf.load(tmp / "one" / name), kf.load(tmp / "two" / name)
    assert one.cfg.ekfac and two.cfg.ekfac
    for layer in one.layer_names:  # EK-FAC matrices (corrected eigenvalues in each eigenbasis), dense
        # atol 1e-9 of the largest entry: random weights give lm_head a near-uniform softmax, whose G has clusters
        # of eigenvalues equal to ~1e-4 relative, so the eigenbasis there (and EK-FAC with it) moves with rounding.
        want = one.to_dense(layer)
        torch.testing.assert_close(two.to_dense(layer), want, rtol=1e-8, atol=1e-9 * float(want.abs().max()), msg=layer)
    _assert_same_report(tmp / "two", tmp / "one")
    assert not (tmp / "two" / "checkpoints").exists()


KILLER = textwrap.dedent(
    """
    import importlib, os, pathlib, signal, sys, time
    fit = importlib.import_module("kronfisher.collection.passes")
    original = fit.run_batch
    out = pathlib.Path(sys.argv[sys.argv.index("--output-dir") + 1])
    def run_batch(model, batch, cap, cfg, index, *args, **kwargs):
        if os.environ.get("RANK") == "1" and index == 5:  # global batch 5 is rank 1's third batch
            # ranks run their batches without a collective: on a loaded machine rank 0 may not have written its
            # first checkpoint yet, so wait for it (at most 5 minutes) before the kill
            deadline = time.monotonic() + 300
            while not list(out.glob("checkpoints/[!.]*rank0-of-2*.safetensors")) and time.monotonic() < deadline:
                time.sleep(0.2)
            os.kill(os.getpid(), signal.SIGKILL)
        return original(model, batch, cap, cfg, index, *args, **kwargs)
    fit.run_batch = run_batch
    from kronfisher.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def test_torchrun_killed_rank_resumes_from_its_own_checkpoint(reference: Path) -> None:
    tmp = reference
    (tmp / "killer.py").write_text(KILLER)
    out = ["--output-dir", str(tmp / "part"), "--checkpoint-every", "1"]
    proc = _torchrun([str(tmp / "killer.py")], [*_args(tmp), *out], tmp)
    assert proc.returncode != 0
    ckpts = sorted((tmp / "part" / "checkpoints").glob("*.safetensors"))
    assert [p.name.split(".")[1] for p in ckpts] == ["rank0-of-2", "rank1-of-2"], ckpts
    assert kf.read_metadata(ckpts[1])["extra"]["batches_done"] == 2  # rank 1 had done global batches 1 and 3
    proc = _torchrun(["-m", "kronfisher.cli"], [*_args(tmp), *out, "--resume"], tmp)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    name = json.loads((tmp / "one" / "report.json").read_text())["models"][0]["factor_file"]
    _assert_same_sums(tmp / "part" / name, tmp / "one" / name)
    _assert_same_report(tmp / "part", tmp / "one")
    assert not (tmp / "part" / "checkpoints").exists()


def test_sigterm_becomes_systemexit_so_atomic_writes_clean_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun stops the surviving workers with SIGTERM: the command turns it into SystemExit(143), so a write in
    progress removes its temporary file (nothing partial, not even a stray .tmp)."""
    import signal

    import kronfisher.io.atomic as io_atomic
    from kronfisher.cli import _exit_on_sigterm

    previous = signal.getsignal(signal.SIGTERM)
    try:
        _exit_on_sigterm()

        def killed_mid_write(*args: object, **kwargs: object) -> None:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler raises here, inside the write

        monkeypatch.setattr(io_atomic, "write_safetensors", killed_mid_write)
        with pytest.raises(SystemExit) as info:
            io_atomic.atomic_write(tmp_path / "f.safetensors", {"x": torch.zeros(3)}, {"k": 1})
        assert info.value.code == 128 + signal.SIGTERM
        assert list(tmp_path.iterdir()) == []
    finally:
        signal.signal(signal.SIGTERM, previous)
