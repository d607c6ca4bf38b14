"""Atomic writes of factor files, checkpoints and reports (docs/distributed.md).

A temporary file in the destination directory, ``fsync``, ``os.replace``, then ``fsync`` of the directory; on any
failure (an exception, or SIGTERM turned into ``SystemExit`` by the command) the temporary file is removed and an
existing destination is left untouched. Under ``torchrun`` only rank 0 writes shared files, and every rank waits.

A write that fails for want of space or permission raises :class:`~kronfisher.errors.WriteError` naming the file,
the cause and, on a full disk, the bytes needed and free (``docs/errors.md``). Files get the mode the umask
gives (``0644`` under the usual ``022``), like any file the user creates.

Factor files are written tensor by tensor straight into the temporary file (:mod:`kronfisher.io.stream`): the
write holds one chunk of bytes, not a copy of the file.

Temporary names: ``.<name>.<pid>.<hex>.tmp`` (ours), and ``.tmpXXXXXX``, which earlier versions that wrote through
``safetensors.torch.save_file`` left after a ``SIGKILL`` in the middle of a write; ``kronfisher analyze`` removes
both from its output folder at its next start.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from torch import Tensor

from ..comm import barrier, is_main_process
from ..errors import FileFormatError
from ..faults import write_error
from .format import META_KEY, META_SHA_KEY, Rows
from .stream import header_bytes, ordered, specs, write_tensors


def write_safetensors(tensors: Mapping[str, Tensor | Rows], path: str, metadata: dict[str, str]) -> None:
    """Write a safetensors file tensor by tensor (the one seam tests patch to simulate a failure midway)."""
    with open(path, "wb") as fh:
        write_tensors(fh, tensors, metadata)


def _fsync_path(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:  # some platforms cannot open directories; the rename is still atomic
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def atomic_write(
    path: str | os.PathLike[str], tensors: Mapping[str, Tensor | Rows], meta: dict[str, Any], *, local: bool = False
) -> Path:
    """Write ``tensors`` and the JSON ``meta`` to ``path`` atomically (docs/files.md).

    The file is written to a temporary name in the same directory, flushed to disk, and renamed over ``path``.
    On any failure the temporary file is removed, so nothing partial is ever left under either name.

    Args:
        path: destination.
        tensors: named tensors.
        meta: JSON metadata.
        local: this process writes its own file (a per-rank checkpoint): no rank-0 rule, no barrier. Otherwise,
            under ``torchrun``, only rank 0 writes and every rank waits for the file (docs/distributed.md).

    Returns:
        The destination path.

    """
    path = Path(path)
    if path.is_dir():
        raise FileFormatError(f"Cannot write factors to {path}: it is a directory.")
    if local:
        return _atomic_write_local(path, tensors, meta)
    if not is_main_process():  # only rank 0 writes; the others wait until the file is complete
        barrier()
        return path
    try:
        return _atomic_write_local(path, tensors, meta)
    finally:
        barrier()


def _atomic_write_local(path: Path, tensors: Mapping[str, Tensor | Rows], meta: dict[str, Any]) -> Path:
    text = json.dumps(meta)  # insertion order kept: layers stay in model order
    header_meta = {META_KEY: text, META_SHA_KEY: hashlib.sha256(text.encode()).hexdigest()}
    return write_through_temporary(
        path,
        lambda tmp: write_safetensors(tensors, str(tmp), header_meta),
        needed=lambda: payload_bytes(tensors, header_meta),
    )


def write_through_temporary(path: Path, write: Callable[[Path], None], needed: Callable[[], int]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then flush and rename it over ``path``.

    On any failure the temporary file is removed and ``path`` is left as it was; a full disk or a read-only file
    system becomes one :class:`~kronfisher.errors.WriteError` naming ``path`` and the ``needed()`` bytes. This
    process writes (no rank-0 rule: see :func:`atomic_write`).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, unlike mkstemp's 0600
    except OSError as err:
        raise write_error(err, path, needed=needed()) from err
    mode = stat.S_IMODE(os.fstat(fd).st_mode)  # what the umask gives a new file
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)  # a writer that replaces the file (safetensors' save_file does) leaves it 0600
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, (OSError, SafetensorError)):  # a full disk, a read-only file system: one clear line
            raise write_error(err, path, needed=needed()) from err
        raise
    _fsync_path(path.parent, directory=True)
    return path


def payload_bytes(tensors: Mapping[str, Tensor | Rows], metadata: dict[str, str]) -> int:
    """The size of the safetensors file of ``tensors`` and ``metadata``: length, JSON header and data."""
    head, data = header_bytes(specs(ordered(tensors)), metadata)
    return len(head) + data


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary name and a rename (reports, plots): never a partial file."""
    return write_through_temporary(Path(path), lambda tmp: tmp.write_bytes(data), needed=lambda: len(data))
