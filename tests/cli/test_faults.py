"""Fault injection against ``kronfisher analyze``: disk full, kill during save, two concurrent runs, SIGTERM.

Each test asserts the exit status, the one ``kronfisher: error:`` line (plus its ``hint:``), and that the files of
an earlier run are intact (same SHA-256). The reference for "nothing lost" is an uninterrupted run of the same
command: the sums after a resume must be bitwise equal to it (same batches in the same order, float32 sums).

The full disk is a small tmpfs when the tests run as root and ``mount`` works; otherwise the atomic writer's public
seam (``write_safetensors``) is patched to fail with the error the safetensors writer gives on a full disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

import kronfisher as kf
import kronfisher.io.atomic as io_atomic
from kronfisher.cli import main
from test_cli_helpers import model_and_text

ARGS = ["--seq-len", "16", "--batch-size", "2", "--max-tokens", "200", "--no-plots", "--quiet"]
ARGS += ["--save-sums"]  # the tests compare the factor files' raw sums
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model_and_text(tmp_path_factory.mktemp("faults"))


def analyze_args(work: Path, out: Path, *extra: str) -> list[str]:
    return ["analyze", "--model", str(work / "qwen"), "--data", str(work / "a.txt"), "--output-dir", str(out), *ARGS]


@pytest.fixture(scope="module")
def reference(work: Path) -> Path:
    """An uninterrupted run: what every interrupted run must end up with."""
    out = work / "reference"
    assert main(analyze_args(work, out)) == 0
    return out / "factors" / "0-qwen.safetensors"


def digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` (relative names)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def assert_same_sums(got: Path, want: Path) -> None:
    a, b = kf.load_sums(got), kf.load_sums(want)
    assert a.report.tokens == b.report.tokens and a.report.batches == b.report.batches
    for name, s in b.sums.items():
        assert torch.equal(a.sums[name].A.sum, s.A.sum) and torch.equal(a.sums[name].G.sum, s.G.sum), name


def error_lines(err: str) -> list[str]:
    """The lines the command printed about the error (no warnings, no status lines)."""
    return [ln for ln in err.splitlines() if ln.startswith(("kronfisher: error:", "hint:", "Traceback"))]


def leftovers(out: Path) -> list[str]:
    """Temporary files and the lock: nothing of these may remain after a run ends, however it ends."""
    return sorted(p.name for p in out.rglob(".*") if p.is_file())


class SmallDisk:
    """A folder on a nearly full file system: a tmpfs of ``kb`` kB, or a patched writer with that budget."""

    def __init__(self, folder: Path, kb: int, monkeypatch: pytest.MonkeyPatch) -> None:
        self.folder, self.kb, self.mp = folder, kb, monkeypatch
        folder.mkdir()
        self.mounted = os.geteuid() == 0 and self._mount(f"size={kb}k")
        if not self.mounted:
            real = io_atomic.write_safetensors

            def full_disk(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
                size = sum(t.numel() * t.element_size() for t in tensors.values())
                if Path(path).is_relative_to(self.folder) and size > self.kb * 1000 // 2:
                    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
                real(tensors, path, metadata)

            monkeypatch.setattr(io_atomic, "write_safetensors", full_disk)

    def _mount(self, options: str, remount: bool = False) -> bool:
        cmd = ["mount", "-t", "tmpfs", "-o", ("remount," if remount else "") + options, "tmpfs", str(self.folder)]
        return subprocess.run(cmd, capture_output=True).returncode == 0

    def grow(self) -> None:
        """Free space: the next writes fit."""
        if self.mounted:
            assert self._mount("size=4m", remount=True)
        else:
            self.mp.undo()

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.folder)], capture_output=True)


@contextlib.contextmanager
def small_disk(folder: Path, kb: int, monkeypatch: pytest.MonkeyPatch) -> Iterator[SmallDisk]:
    disk = SmallDisk(folder, kb, monkeypatch)
    try:
        yield disk
    finally:
        disk.close()


def test_disk_full_keeps_the_sums_and_previous_files_then_resume_finishes(
    work: Path, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The factor file (236 kB) does not fit on 256 kB next to an earlier run's files; the sums (118 kB) do."""
    with small_disk(tmp_path / "disk", 256, monkeypatch) as disk:
        out = disk.folder / "out"
        assert main([*analyze_args(work, out), "--include", "mlp"]) == 0  # an earlier, smaller run
        before = digests(out)
        capsys.readouterr()
        rc = main(analyze_args(work, out))
        err = capsys.readouterr().err
        lines = error_lines(err)
        assert rc == 2 and len(lines) == 2, err
        ckpt = out / "checkpoints" / "0-qwen.sums.safetensors"
        assert f"Cannot write {out / 'factors' / '0-qwen.safetensors'}" in lines[0]
        assert "No space left on device" in lines[0] and "free)" in lines[0]
        assert f"The collected sums are kept in {ckpt}." in lines[0]
        assert lines[1].startswith("hint: Free") and "--resume" in lines[1]
        assert {k: v for k, v in digests(out).items() if k in before} == before  # earlier files intact
        assert leftovers(out) == []  # no temporary, no lock
        disk.grow()
        assert main([*analyze_args(work, out), "--resume"]) == 0
        assert_same_sums(out / "factors" / "0-qwen.safetensors", reference)
        assert not (out / "checkpoints").exists() and leftovers(out) == []


def test_disk_full_with_no_room_for_the_sums_keeps_them_in_tmpdir(
    work: Path, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not even the sums fit (96 kB): they go to $TMPDIR and the hint says where to move them to resume."""
    rescue = tmp_path / "tmpdir"
    rescue.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(rescue))
    with small_disk(tmp_path / "disk", 96, monkeypatch) as disk:
        out = disk.folder / "out"
        rc = main(analyze_args(work, out))
        err = capsys.readouterr().err
        lines = error_lines(err)
        assert rc == 2 and len(lines) == 2, err
        kept = next(rescue.rglob("0-qwen.sums.safetensors"))
        assert f"The collected sums are kept in {kept}." in lines[0]
        assert f"move {kept} to <output-dir>/checkpoints/0-qwen.sums.safetensors" in lines[1]
        assert not (out / "checkpoints").exists() and leftovers(out) == []  # no empty checkpoints/ left
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "checkpoints").mkdir(parents=True)
    kept.rename(elsewhere / "checkpoints" / kept.name)  # what the hint says
    assert main([*analyze_args(work, elsewhere), "--resume"]) == 0
    assert_same_sums(elsewhere / "factors" / "0-qwen.safetensors", reference)


def test_disk_full_while_writing_the_report_keeps_the_factor_file(
    work: Path, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Room for the factor file (236 kB) but not the report: the message says --resume writes it without recomputing."""
    if os.geteuid() != 0:
        import kronfisher.analysis.report as report_module

        def full(path: Path, data: bytes) -> Path:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(report_module, "atomic_write_bytes", full)
        disk_folder = tmp_path / "disk"
        ctx: contextlib.AbstractContextManager = contextlib.nullcontext()
    else:
        ctx = small_disk(tmp_path / "disk", 252, monkeypatch)
        disk_folder = tmp_path / "disk"
    with ctx as disk:
        out = disk_folder / "out"
        rc = main(analyze_args(work, out))
        lines = error_lines(capsys.readouterr().err)
        assert rc == 2 and len(lines) == 2 and "No space left on device" in lines[0]
        assert lines[0].startswith(f"kronfisher: error: Cannot write {out / 'report.'}")
        assert "--resume" in lines[1] and "factors" in lines[1]
        assert kf.verify_file(out / "factors" / "0-qwen.safetensors")  # complete and valid
        if disk is not None:
            disk.grow()
        else:
            monkeypatch.undo()
        assert main([*analyze_args(work, out), "--resume"]) == 0
        report = json.loads((out / "report.json").read_text())
        assert "collect" not in report["models"][0]["timings_s"]  # reused, not recomputed
        assert leftovers(out) == []


# Runs the real command in a fresh interpreter (SIGTERM handler installed as for the console script). What it does
# at one point is chosen by FAULT: "kill-in-save" writes part of a file the way the safetensors writer does (its own
# .tmpXXXXXX) and then SIGKILLs itself; "term-at-batch" sends itself SIGTERM before batch 3; "hold" creates
# <out>.started at batch 0 and waits for <out>.go (another run tries the folder meanwhile).
DRIVER = textwrap.dedent(
    """
    import importlib, os, signal, sys, time
    from pathlib import Path
    fault, out = sys.argv[1], Path(sys.argv[2])
    io_atomic = importlib.import_module("kronfisher.io.atomic")
    fit = importlib.import_module("kronfisher.collection.passes")
    real_write, real_batch = io_atomic.write_safetensors, fit.run_batch
    def write(tensors, path, metadata):
        if fault == "kill-in-save" and Path(path).parent.name == "factors":
            (Path(path).parent / ".tmpAb12Cd").write_bytes(b"partial" * 1000)
            os.kill(os.getpid(), signal.SIGKILL)
        real_write(tensors, path, metadata)
    def run_batch(model, batch, cap, cfg, index, *args, **kwargs):
        if fault == "term-at-batch" and index == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        if fault == "hold" and index == 0:
            Path(str(out) + ".started").touch()
            for _ in range(600):
                if Path(str(out) + ".go").exists():
                    break
                time.sleep(0.1)
        return real_batch(model, batch, cap, cfg, index, *args, **kwargs)
    io_atomic.write_safetensors, fit.run_batch = write, run_batch
    from kronfisher.cli import main
    sys.argv = ["kronfisher", *sys.argv[3:]]
    sys.exit(main())
    """
)


def driver(fault: str, out: Path, args: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-c", DRIVER, fault, str(out), *args]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_kill_during_save_keeps_the_previous_file_and_the_next_run_cleans_up(
    work: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    args = analyze_args(work, out)
    assert main(args) == 0
    before = digests(out)
    proc = driver("kill-in-save", out, [*args, "--damping", "0.5"])
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert digests(out).items() >= before.items()  # the earlier factor file and reports are intact
    orphans = leftovers(out)
    assert ".tmpAb12Cd" in orphans and ".kronfisher.lock" in orphans and any(n.endswith(".tmp") for n in orphans)
    assert main([a for a in args if a != "--quiet"]) == 0
    status = capsys.readouterr().err
    assert f"took over the lock of a run that has ended: pid {proc.pid}" in status
    assert f"removed {len(orphans) - 1} temporary file(s)" in status
    assert leftovers(out) == []


def test_sigterm_prints_how_to_resume_exits_143_and_resume_finishes(
    work: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    proc = driver("term-at-batch", out, [*analyze_args(work, out), "--checkpoint-every", "1", "--resume"])
    _, err = proc.communicate(timeout=300)
    text = err.decode()
    assert proc.returncode == 143, text[-2000:]
    assert text.strip().splitlines()[-1] == (
        "kronfisher: terminated (SIGTERM); run again with --resume to continue from the last checkpoint."
    )
    assert "Traceback" not in text
    ckpt = out / "checkpoints" / "0-qwen.sums.safetensors"
    assert kf.read_metadata(ckpt)["extra"]["batches_done"] == 3
    assert leftovers(out) == []  # the write in progress cleaned up, the lock released
    assert main([*analyze_args(work, out), "--resume"]) == 0
    assert_same_sums(out / "factors" / "0-qwen.safetensors", reference)


def test_second_concurrent_run_fails_fast_naming_the_first(
    work: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    first = driver("hold", out, [*analyze_args(work, out), "--damping", "0.5"])
    try:
        for _ in range(600):
            if Path(str(out) + ".started").exists() or first.poll() is not None:
                break
            time.sleep(0.1)
        assert first.poll() is None, first.communicate()[1].decode()[-2000:]
        t = time.monotonic()
        rc = main(analyze_args(work, out))
        lines = error_lines(capsys.readouterr().err)
        assert rc == 2 and len(lines) == 2
        assert f"Output directory {out} is in use by another kronfisher run: pid {first.pid} on host" in lines[0]
        assert "started" in lines[0] and "--damping 0.5" in lines[0]
        assert time.monotonic() - t < 30  # before loading the model: fails fast (generous bound for loaded CI)
    finally:
        Path(str(out) + ".go").touch()
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err.decode()[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["fisher"]["config"]["damping"] == 0.5  # the first run's results, not replaced by the second
    assert kf.verify_file(out / "factors" / "0-qwen.safetensors") and leftovers(out) == []


def test_library_write_on_a_full_disk_is_a_write_error_with_the_space_needed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The needed bytes are those of the file a successful write produces (exact but for the writer's padding)."""
    tensors = {"a": torch.zeros(100, 7), "b": torch.ones(3, dtype=torch.float64)}
    ok = io_atomic.atomic_write(tmp_path / "ok.safetensors", tensors, {"k": 'quoted "json"'})
    real = io_atomic.write_safetensors

    def full(*args: object, **kwargs: object) -> None:
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(io_atomic, "write_safetensors", full)
    with pytest.raises(kf.KronfisherError) as info:
        io_atomic.atomic_write(tmp_path / "f.safetensors", tensors, {"k": 'quoted "json"'})
    err = info.value
    assert isinstance(err, OSError) and err.path == str(tmp_path / "f.safetensors") and err.errno_code == 28
    assert abs(err.needed - ok.stat().st_size) <= 8 and err.free is not None
    assert str(err).startswith(f"Cannot write {tmp_path / 'f.safetensors'}: No space left on device (needs about ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.safetensors"]  # no temporary left
    monkeypatch.setattr(io_atomic, "write_safetensors", real)


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_written_files_honour_the_umask(tmp_path: Path, umask: int) -> None:
    """Factor files (through the safetensors writer's own 0600 temporary) and reports get 0666 & ~umask."""
    previous = os.umask(umask)
    try:
        f = io_atomic.atomic_write(tmp_path / "f.safetensors", {"x": torch.zeros(2)}, {})
        r = io_atomic.atomic_write_bytes(tmp_path / "r.json", b"{}")
    finally:
        os.umask(previous)
    assert (f.stat().st_mode & 0o777) == 0o666 & ~umask and (r.stat().st_mode & 0o777) == 0o666 & ~umask


def test_checkpoint_write_failure_warns_and_the_run_finishes(
    work: Path, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A checkpoint is insurance: when it cannot be written, one warning, and the run still ends with its result."""
    real = io_atomic.write_safetensors

    def no_room_for_checkpoints(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
        if Path(path).parent.name == "checkpoints":
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        real(tensors, path, metadata)

    monkeypatch.setattr(io_atomic, "write_safetensors", no_room_for_checkpoints)
    out = tmp_path / "out"
    argv = [a for a in analyze_args(work, out) if a != "--quiet"]
    assert main([*argv, "--checkpoint-every", "1"]) == 0
    warned = re.findall(r"warning: (Cannot write [^\n]*)", capsys.readouterr().err)  # may follow a progress bar
    assert len(warned) == 1 and "No space left on device" in warned[0] and "without checkpoints" in warned[0]
    assert_same_sums(out / "factors" / "0-qwen.safetensors", reference)
    assert not (out / "checkpoints").exists() and leftovers(out) == []
