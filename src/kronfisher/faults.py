"""One line for each fault of the environment: OS errors, a full disk, signals (``docs/errors.md``).

The ``kronfisher`` command turns these into ``kronfisher: error: <path>: <cause>`` plus a ``hint:`` line and exit
status 2, never a traceback (``--debug`` shows it). Errors from the safetensors writer are not ``OSError`` exceptions:
their text ends in ``(os error N)``, from which the error number is read back.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from safetensors import SafetensorError

from .errors import KronfisherError, WriteError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a process ended by Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what `cmd | head -1` reports for a process ended by the closed pipe

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)")

_HINTS = {
    errno.ENOSPC: "Free some space on that file system, or write somewhere else (--output-dir).",
    errno.EDQUOT: "Your disk quota is used up: free some space, or write somewhere else (--output-dir).",
    errno.EACCES: "Check the permissions of that path, or write somewhere else (--output-dir).",
    errno.EPERM: "Check the permissions of that path, or write somewhere else (--output-dir).",
    errno.EROFS: "That file system is mounted read-only: write somewhere else (--output-dir).",
    errno.ENOTDIR: "A part of that path is a file, not a directory: pass another path.",
    errno.EEXIST: "That path exists and is not a directory: pass another path.",
    errno.EISDIR: "That path is a directory: pass a file.",
    errno.ENOENT: "Check the path.",
    errno.EMFILE: "Too many open files: raise the limit (ulimit -n) and run again.",
}


class Terminated(SystemExit):
    """SIGTERM (a job scheduler, ``kill``, ``torchrun`` stopping the other workers) as an exception.

    Raised from the signal handler of the ``kronfisher`` command, so that every ``finally`` runs: an atomic write
    in progress removes its temporary file and the output folder's lock is released. Exit status 143.
    """

    def __init__(self) -> None:
        super().__init__(EXIT_TERMINATED)


def errno_of(err: BaseException) -> int | None:
    """The error number of an ``OSError``, or the ``(os error N)`` a safetensors writer error ends with."""
    if isinstance(err, OSError) and err.errno:
        return int(err.errno)
    if isinstance(err, WriteError):
        return err.errno_code
    m = _OS_ERROR_IN_TEXT.search(str(err))
    return int(m.group(1)) if m else None


def hint_for_errno(code: int | None) -> str | None:
    """What to do about an OS error, by error number (None when there is nothing specific to say)."""
    return _HINTS.get(code) if code is not None else None


def human_bytes(n: int | None) -> str:
    """``1536`` → ``'1.5 kB'`` (decimal units, as ``df -H`` prints them)."""
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"  # pragma: no cover - the loop always returns


def free_bytes(path: str | os.PathLike[str]) -> int | None:
    """Bytes free to this user on the file system that holds ``path`` (or its nearest existing parent)."""
    p = Path(path).absolute()
    for candidate in (p, *p.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def cause_of(err: BaseException) -> str:
    """The cause of an OS-level error in a few words (``'No space left on device'``), without the path."""
    if isinstance(err, OSError) and err.strerror:
        return str(err.strerror)
    code = errno_of(err)
    if code is not None:
        return os.strerror(code)
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def write_error(
    err: BaseException, path: str | os.PathLike[str], *, needed: int | None = None, what: str = ""
) -> WriteError:
    """A :class:`~kronfisher.errors.WriteError` naming ``path`` and the cause of ``err``.

    Args:
        err: the error of the failed write (``OSError`` or safetensors' ``SafetensorError``).
        path: the file that was being written.
        needed: bytes the write needed, when known (said in the message when the disk is full).
        what: a few words after the path, e.g. ``"(factor file)"``.

    """
    if isinstance(err, WriteError):
        return err
    code = errno_of(err)
    free = free_bytes(Path(path).parent) if code in NO_SPACE else None
    message = f"Cannot write {path}{' ' + what if what else ''}: {cause_of(err)}"
    if code in NO_SPACE:
        needs = f"needs about {human_bytes(needed)}, " if needed else ""
        message += f" ({needs}{human_bytes(free)} free)"
    return WriteError(
        message + ".", path=str(path), errno_code=code, needed=needed, free=free, hint=hint_for_errno(code)
    )


def os_error_line(err: BaseException) -> tuple[str, str | None]:
    """The one-line message and hint for an OS-level error that reached the command."""
    names = [str(n) for n in (getattr(err, "filename", None), getattr(err, "filename2", None)) if n]
    cause = cause_of(err)
    message = f"{' -> '.join(names)}: {cause}" if names else cause
    return message, hint_for_errno(errno_of(err))


def run_reporting_faults(
    command: Callable[[], int],
    *,
    debug: bool,
    resumable: bool,
    hint_for: Callable[[KronfisherError], str | None],
) -> int:
    """Run a command of the ``kronfisher`` program; every expected failure becomes one line and an exit status.

    kronfisher's own errors and ``OSError`` and kin (a full disk, a read-only or unwritable folder, a path under
    a file, safetensors' writer errors) print ``kronfisher: error: <message>`` and a ``hint:`` line: status 2, or
    their traceback with ``debug``. Ctrl-C gives 130 and SIGTERM (:class:`Terminated`) 143, each with a line saying
    how to resume when the command is ``resumable``. A reader that closed our output pipe ends the command quietly
    with 141, as ``cat`` does.

    Args:
        command: runs the command and returns its exit status.
        debug: re-raise errors (traceback) instead of printing one line.
        resumable: the command continues with ``--resume`` (``kronfisher analyze``).
        hint_for: the hint line for one of kronfisher's errors, or None.

    """
    resume = " run again with --resume to continue from the last checkpoint." if resumable else ""
    try:
        status = command()
        sys.stdout.flush()  # inside the try: a reader that went away is seen here, not at interpreter exit
        return status
    except BrokenPipeError:
        return _stdout_gone()
    except KronfisherError as err:
        if debug:
            raise
        _error(str(err), hint_for(err))
        return EXIT_USER_ERROR
    except (OSError, SafetensorError) as err:
        if debug:
            raise
        _error(*os_error_line(err))
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"kronfisher: interrupted;{resume or ' nothing was written.'}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print(f"kronfisher: terminated (SIGTERM);{resume or ' nothing was written.'}", file=sys.stderr)
        return EXIT_TERMINATED


def _error(message: str, hint: str | None) -> None:
    print(f"kronfisher: error: {message}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)


def _stdout_gone() -> int:
    """The reader of our output closed the pipe (``kronfisher inspect FILE | head -1``): stop quietly.

    Standard output is pointed at ``/dev/null`` so that the interpreter's final flush does not fail again
    (the recipe of the Python documentation, "Note on SIGPIPE").
    """
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return EXIT_BROKEN_PIPE


def add_debug_option(parser: argparse.ArgumentParser, commands: Sequence[argparse.ArgumentParser]) -> None:
    """``--debug`` (the traceback of an error instead of one line), before or after the command name."""
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (for bug reports)")
    for command in commands:  # SUPPRESS: absent after the command, the value given before it is kept
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
