"""The output folder of ``kronfisher analyze``: checked before any work, locked, cleaned (``docs/errors.md``).

* **Checked** before the model is loaded: a path that is a file, lies under a file, is not writable or is on a
  read-only file system is one clear error, not a traceback after minutes of work.
* **Locked**: ``<output-dir>/.kronfisher.lock`` holds an exclusive ``flock`` for the whole run and says who holds
  it (pid, host, start time, command). A second run into the same folder fails at once with a line naming the
  first; the kernel drops the lock when its process dies, so the lock of a killed run is taken over silently
  (its previous owner is named in a status line).
* **Cleaned**: the temporaries a killed run left behind (ours, ``.<name>.<pid>.<hex>.tmp``, and the safetensors
  writer's own ``.tmpXXXXXX``) are removed at the next start: while the lock is held, no other kronfisher run
  writes there. Empty ``checkpoints/`` folders are removed when the run ends, and a folder created by a run that
  failed before writing anything is removed again.

Under ``torchrun`` rank 0 checks, locks and cleans; its verdict is broadcast so that every rank stops together.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..comm import broadcast_object, is_main_process
from ..errors import InputError
from ..faults import NO_SPACE, cause_of, errno_of, free_bytes, human_bytes

try:  # POSIX; without it (Windows) runs are not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".kronfisher.lock"
OUR_TEMPORARY = re.compile(r"^\..+\.\d+\.[0-9a-f]{12}\.tmp$")  # io atomic writes: .<name>.<pid>.<hex>.tmp
WRITER_TEMPORARY = re.compile(r"^\.tmp[A-Za-z0-9]{6}$")  # the safetensors writer's own temporary file
SUBFOLDERS = ("", "factors", "checkpoints", "plots")


@dataclass
class LockOwner:
    """Who holds (or held) the lock of an output folder."""

    pid: int | str
    host: str
    started: str
    command: str

    def describe(self) -> str:
        """``pid 123 on host h, started 2026-01-01T00:00:00+00:00 (kronfisher analyze ...)``."""
        cmd = f" ({self.command})" if self.command else ""
        return f"pid {self.pid} on host {self.host}, started {self.started}{cmd}"


def _unusable(out: Path, err: OSError) -> InputError:
    code = errno_of(err)
    where = err.filename or out
    if code in (errno.EACCES, errno.EPERM):
        return InputError(
            f"Output directory {out} is not writable: {where}: {cause_of(err)}.",
            hint="Pass a directory you can write to as --output-dir, or change its permissions.",
        )
    if code == errno.EROFS:
        return InputError(
            f"Output directory {out} is on a read-only file system ({where}).",
            hint="Pass an --output-dir on a writable file system.",
        )
    if code in NO_SPACE:
        return InputError(
            f"Output directory {out} is on a full file system ({human_bytes(free_bytes(out))} free).",
            hint="Free some space, or pass an --output-dir on another file system.",
        )
    return InputError(f"Output directory {out} cannot be used: {where}: {cause_of(err)}.", hint=None)


def check_output_dir(out: Path) -> bool:
    """Create ``out`` if needed; one clear :class:`InputError` when it cannot hold the results.

    Returns:
        True when this call created the folder.

    """
    if out.exists() and not out.is_dir():
        raise InputError(
            f"Output directory {out} is a file, not a directory.", hint="Pass a new or existing folder as --output-dir."
        )
    for parent in out.parents:  # as the user wrote it (relative parents end at '.', which exists)
        if parent.exists():
            if not parent.is_dir():
                raise InputError(
                    f"Output directory {out} cannot be created: {parent} is a file, not a directory.",
                    hint="Pass a new or existing folder as --output-dir.",
                )
            break
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _unusable(out, err) from err
    return created


class OutputLock:
    """An exclusive lock on an output folder for the duration of one run (see the module docstring)."""

    def __init__(self, out: Path, command: str = "") -> None:
        self.path = out / LOCK_NAME
        self.command = command
        self._fd: int | None = None
        self.unsupported = False  # the file system refused the lock: concurrent runs are not detected

    def acquire(self) -> LockOwner | None:
        """Take the lock, or raise :class:`InputError` naming the run that holds it.

        Returns:
            The previous owner when the lock file of a run that has died was taken over, else None.

        """
        if fcntl is None:  # pragma: no cover
            return None
        for _ in range(5):  # the holder may unlink the file between our open and our flock: open it again
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as err:
                raise _unusable(self.path.parent, err) from err
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_owner(fd)
                os.close(fd)
                raise InputError(
                    f"Output directory {self.path.parent} is in use by another kronfisher run: "
                    f"{owner.describe() if owner else 'owner unknown'}.",
                    hint="Wait for that run to finish, or pass another --output-dir.",
                ) from None
            except OSError:  # a file system without locks (some network mounts): run, but unlocked
                os.close(fd)
                self.unsupported = True
                return None
            if _same_file(fd, self.path):
                break
            os.close(fd)
        else:  # pragma: no cover - five races in a row
            raise InputError(f"Could not lock {self.path}: it keeps being replaced.", hint="Run again.")
        previous = _read_owner(fd)
        self._fd = fd
        self._write_owner()
        return previous

    def _write_owner(self) -> None:
        assert self._fd is not None
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        text = json.dumps(
            {"pid": os.getpid(), "host": socket.gethostname(), "started": started, "command": self.command}
        )
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, text.encode() + b"\n", 0)
        except OSError as err:
            self.release()
            raise _unusable(self.path.parent, err) from err

    def release(self) -> None:
        """Remove the lock file and drop the lock (no-op when not held)."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            if _same_file(self._fd, self.path):
                self.path.unlink()
        os.close(self._fd)  # drops the flock
        self._fd = None


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read_owner(fd: int) -> LockOwner | None:
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        d = json.loads(text) if text else None
    except (OSError, ValueError):
        return None
    if not isinstance(d, dict):
        return None
    return LockOwner(d.get("pid", "?"), str(d.get("host", "?")), str(d.get("started", "?")), str(d.get("command", "")))


def remove_stale_temporaries(out: Path) -> list[tuple[Path, int]]:
    """Delete the temporary files a killed run left in ``out`` (call with the lock held).

    Returns:
        ``(path, size in bytes)`` of each file removed.

    """
    removed = []
    for sub in SUBFOLDERS:
        folder = out / sub if sub else out
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if (OUR_TEMPORARY.match(p.name) or WRITER_TEMPORARY.match(p.name)) and p.is_file():
                with contextlib.suppress(OSError):
                    size = p.stat().st_size
                    p.unlink()
                    removed.append((p, size))
    return removed


def tidy(out: Path, created: bool) -> None:
    """Remove an empty ``checkpoints/`` folder, and ``out`` itself when this run created it and wrote nothing."""
    for sub in ("checkpoints", "factors", "plots"):
        with contextlib.suppress(OSError):
            if (out / sub).is_dir() and not any((out / sub).iterdir()):
                (out / sub).rmdir()
    if created:
        with contextlib.suppress(OSError):
            out.rmdir()  # only succeeds when empty


@contextlib.contextmanager
def locked_output_dir(out: Path, command: str, info: Callable[[str], None]) -> Iterator[Path]:
    """Check, lock and clean ``out`` for the duration of a run (rank 0; every rank gets its verdict).

    Raises:
        InputError: ``out`` cannot be used, or another run holds it.

    """
    lock = OutputLock(out, command)
    failure: InputError | None = None
    created = False
    notes: list[str] = []
    if is_main_process():
        try:
            created = check_output_dir(out)
            previous = lock.acquire()
            if lock.unsupported:
                notes.append("the file system does not support locks: a second run into it is not detected")
            if previous is not None:
                notes.append(f"took over the lock of a run that has ended: {previous.describe()}")
            removed = remove_stale_temporaries(out)
            if removed:
                size = human_bytes(sum(s for _, s in removed))
                notes.append(f"removed {len(removed)} temporary file(s) ({size}) left by an interrupted run")
        except InputError as err:
            failure = err
    verdict = broadcast_object(None if failure is None else (str(failure), failure.hint))
    if failure is not None:
        raise failure
    if verdict is not None:
        raise InputError(*verdict)
    for note in notes:
        info(f"{out}: {note}")
    try:
        yield out
    finally:
        if is_main_process():
            lock.release()
            tidy(out, created)
