"""The environment's faults at the command line: one ``kronfisher: error:`` line naming the path and the cause, a
``hint:`` line, exit status 2 and never a traceback (``--debug`` shows it); see ``docs/errors.md``."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kronfisher.analysis.outdir import LOCK_NAME
from kronfisher.cli import main
from test_cli_helpers import build_model, model_and_text, save_model

ARGS = ["--seq-len", "16", "--batch-size", "2", "--max-tokens", "64", "--no-plots", "--quiet"]
ARGS += ["--save-sums"]  # the merge test needs mergeable files
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model_and_text(tmp_path_factory.mktemp("clierr"))


@pytest.fixture(scope="module")
def finished(work: Path) -> Path:
    out = work / "done"
    assert (
        main(["analyze", "--model", str(work / "qwen"), "--data", str(work / "a.txt"), "--output-dir", str(out), *ARGS])
        == 0
    )
    return out


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    rc = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, [ln for ln in err.splitlines() if ln.strip()]


def analyze(work: Path, out: Path | str, *extra: str, model: Path | None = None, data: Path | None = None) -> list[str]:
    model, data = model or work / "qwen", data or work / "a.txt"
    return ["analyze", "--model", str(model), "--data", str(data), "--output-dir", str(out), *ARGS, *extra]


def test_output_dir_that_is_a_file_is_one_line(work: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "afile").write_text("x")
    rc, lines = run(analyze(work, tmp_path / "afile"), capsys)
    assert (
        rc == 2 and lines[0] == f"kronfisher: error: Output directory {tmp_path / 'afile'} is a file, not a directory."
    )
    assert lines[1].startswith("hint:") and len(lines) == 2


def test_output_dir_under_a_file_is_one_line(work: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "afile").write_text("x")
    rc, lines = run(analyze(work, tmp_path / "afile" / "sub"), capsys)
    assert rc == 2 and len(lines) == 2
    assert lines[0].endswith(f"cannot be created: {tmp_path / 'afile'} is a file, not a directory.")


def _without_dac_override() -> list[str] | None:
    """A prefix that runs a command without root's permission bypass (root ignores chmod), or None."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    caps = "-dac_override,-dac_read_search"
    return [setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}"]


def test_unwritable_output_dir_is_one_line_before_loading_the_model(work: Path, tmp_path: Path) -> None:
    prefix = _without_dac_override()
    if prefix is None:
        pytest.skip("running as root without setpriv: permission bits cannot be enforced")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    for out in (ro, ro / "sub"):
        cmd = [*prefix, sys.executable, "-m", "kronfisher.cli", *analyze(work, out)]
        proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert lines[0].startswith(f"kronfisher: error: Output directory {out} is not writable:")
        assert "Permission denied" in lines[0] and lines[1].startswith("hint:")
    assert list(ro.iterdir()) == []


def test_read_only_file_system_is_one_line(work: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ro = tmp_path / "rofs"
    ro.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)]).returncode:
        pytest.skip("needs root and mount for a read-only file system")
    try:
        for out in (ro, ro / "sub"):
            rc, lines = run(analyze(work, out), capsys)
            assert rc == 2 and len(lines) == 2
            assert lines[0].startswith(f"kronfisher: error: Output directory {out} is on a read-only file system")
    finally:
        subprocess.run(["umount", "-l", str(ro)])


def test_os_error_is_one_line_naming_the_path_and_debug_shows_the_traceback(
    finished: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "afile").write_text("x")
    target = tmp_path / "afile" / "merged.safetensors"
    factor = str(finished / "factors" / "0-qwen.safetensors")
    rc, lines = run(["merge", str(target), factor], capsys)
    assert rc == 2 and lines[0] == f"kronfisher: error: {tmp_path / 'afile'}: File exists"  # mkdir of the parent
    assert lines[1] == "hint: That path exists and is not a directory: pass another path." and len(lines) == 2
    with pytest.raises(FileExistsError):
        main(["merge", "--debug", str(target), factor])


def test_inspect_of_a_directory_names_its_factor_files(finished: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, lines = run(["inspect", str(finished)], capsys)
    assert rc == 2 and lines[0] == (
        f"kronfisher: error: {finished} is a directory, not a factor file; it holds 1 .safetensors file(s)."
    )
    assert lines[1] == f"hint: Pass one file, e.g. kronfisher inspect {finished / 'factors' / '0-qwen.safetensors'}"


def test_inspect_into_a_closed_pipe_exits_quietly(finished: Path) -> None:
    """``kronfisher inspect FILE | head -0``: the reader is gone before the first line; exit 141 like ``cat``."""
    cmd = [sys.executable, "-m", "kronfisher.cli", "inspect", str(finished / "factors" / "0-qwen.safetensors")]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # type: ignore[union-attr]  # before the command has printed anything
    err = proc.stderr.read().decode()  # type: ignore[union-attr]
    assert proc.wait(timeout=120) == 141 and err == ""


def test_pickled_model_weights_are_refused_in_one_line(
    work: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "pickled"
    shutil.copytree(work / "qwen", folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {marker}",))

    torch.save({"x": Payload()}, folder / "pytorch_model.bin")
    rc, lines = run(analyze(work, tmp_path / "o", model=folder), capsys)
    assert rc == 2 and len(lines) == 2 and not marker.exists()
    assert lines[0].startswith(f"kronfisher: error: Model weights {folder}/pytorch_model.bin refused: a pickle")
    assert "could run code" in lines[0] and "safetensors" in lines[1]


def test_gpt2_seq_len_above_n_positions_is_refused_before_the_first_batch(
    work: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_model(build_model("gpt2", seed=0), tmp_path / "gpt2")  # n_positions 64 (tests/conftest.py)
    argv = [*analyze(work, tmp_path / "o", model=tmp_path / "gpt2"), "--seq-len", "65"]
    rc, lines = run(argv, capsys)
    assert rc == 2 and len(lines) == 2
    assert lines[0] == (
        "kronfisher: error: --seq-len 65 is longer than model gpt2 accepts: its learned position table has 64 "
        "positions (n_positions)."
    )
    assert lines[1] == "hint: Pass --seq-len 64 or less." and not (tmp_path / "o").exists()
    argv[-1] = "64"
    assert main(argv) == 0  # the limit itself is fine


def test_resume_with_dot_slash_model_path_is_the_same_model(
    work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(work)
    out = tmp_path / "o"
    base = ["analyze", "--data", "a.txt", "--output-dir", str(out), *ARGS]
    assert main([*base, "--model", "qwen"]) == 0
    assert main([*base, "--model", "./qwen/", "--resume"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert "collect" not in report["models"][0]["timings_s"]  # the finished factor file was reused
    assert main([*base, "--model", str(work / "qwen"), "--resume"]) == 0
    assert "collect" not in json.loads((out / "report.json").read_text())["models"][0]["timings_s"]


def test_stale_lock_of_a_dead_process_is_taken_over(
    work: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    owner = {"pid": int(dead.stdout), "host": "h", "started": "2026-01-01T00:00:00+00:00", "command": "kronfisher x"}
    (out / LOCK_NAME).write_text(json.dumps(owner))
    assert main([a for a in analyze(work, out) if a != "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"took over the lock of a run that has ended: pid {owner['pid']} on host h" in err
    assert not (out / LOCK_NAME).exists()


def test_failed_run_leaves_no_output_dir_or_empty_checkpoints(
    work: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "new"
    rc, _ = run(analyze(work, out, data=tmp_path / "missing.txt"), capsys)
    assert rc == 2 and not out.exists()  # created for the run, removed with nothing in it


def test_errors_md_names_only_tests_that_exist() -> None:
    """Every test cited in docs/errors.md's table exists (the table is the index of what is covered)."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "errors.md").read_text()
    cited = re.findall(r"`(test_\w+\.py)::(test_\w+)`", text)
    assert len(cited) >= 40
    # Test files live in folders that mirror the package; their basenames are unique across tests/.
    files = {p.name: p for p in Path(__file__).resolve().parents[1].rglob("test_*.py")}
    missing = [
        f"{f}::{t}"
        for f, t in cited
        if f not in files or not re.search(rf"^def {t}\(", files[f].read_text(), flags=re.M)
    ]
    assert not missing, missing


def test_file_system_without_locks_runs_unlocked_with_a_note(
    work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Some network mounts refuse flock (ENOLCK): that is not "in use by another run"; the run goes on, says so."""
    import errno

    import kronfisher.analysis.outdir as outdir

    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(outdir.fcntl, "flock", no_locks)
    out = tmp_path / "o"
    assert main([a for a in analyze(work, out) if a != "--quiet"]) == 0
    assert "does not support locks" in capsys.readouterr().err and (out / "report.json").exists()
