"""Low-level factor-file format: safetensors payload, checked JSON metadata, atomic writes (docs/files.md).

A factor file is a plain safetensors file (never pickle). Its ``__metadata__`` carries two strings: the
kronfisher metadata as JSON text and the SHA-256 of that text. The metadata lists every tensor with its dtype,
shape and the SHA-256 of its bytes, so every byte of the file is covered by a check:

* the 8-byte header length and the safetensors header (tensor index): parsed here, every entry compared with the
  metadata, offsets checked to tile the payload exactly and the file size checked against the header (a
  truncated file is refused when it is opened, before any tensor is read);
* the metadata text: its own SHA-256;
* the tensor payload: per-tensor SHA-256, checked whenever a tensor is read, so lazy loading (one layer at a time)
  still never hands out a corrupted tensor; :func:`verify_payload` checks them all at once.

Writes are atomic (:mod:`kronfisher.io.atomic`).
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import CorruptedFileError, FileFormatError

FORMAT_NAME = "kronfisher"


FORMAT_VERSION = 1


META_KEY = "kronfisher"


META_SHA_KEY = "kronfisher_sha256"


MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit safetensors itself enforces


ST_CODES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}


_TORCH_DTYPES = {name: getattr(torch, name) for name in ST_CODES}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True, eq=False)
class Rows:
    """Tensors stacked along their first dimension, stored as one tensor and never concatenated in memory.

    The low-rank columns ``W`` are held in one chunk per batch (:class:`~kronfisher.algebra.columns.ColumnStore`);
    the file stores them as one ``[m, out]`` tensor, written (and hashed) chunk by chunk (docs/files.md#format).
    """

    chunks: tuple[Tensor, ...]

    def __post_init__(self) -> None:
        first = self.chunks[0]
        for c in self.chunks:
            if c.dtype != first.dtype or c.dim() != first.dim() or c.shape[1:] != first.shape[1:]:
                raise ValueError(f"Rows of {first.dtype} {list(first.shape)} and {c.dtype} {list(c.shape)}.")

    @property
    def shape(self) -> torch.Size:
        """The shape of the stacked tensor."""
        return torch.Size([sum(int(c.shape[0]) for c in self.chunks), *self.chunks[0].shape[1:]])

    @property
    def dtype(self) -> torch.dtype:
        """The chunks' dtype."""
        return self.chunks[0].dtype

    def numel(self) -> int:
        """Elements of the stacked tensor."""
        return sum(c.numel() for c in self.chunks)

    def element_size(self) -> int:
        """Bytes per element."""
        return self.chunks[0].element_size()


DIGEST_SLICE_BYTES = 64 << 20  # a strided tensor is hashed this many bytes of rows at a time


def tensor_digest(t: Tensor | Rows) -> str:
    """SHA-256 of a tensor's bytes in row-major order (the bytes safetensors stores, little endian).

    A strided tensor (an eigenbasis is column-major) is hashed a slice of rows at a time: never a whole copy.
    """
    h = hashlib.sha256()
    for c in t.chunks if isinstance(t, Rows) else (t,):
        c = c.detach()
        if c.numel() == 0:
            continue
        if c.dim() == 0 or c.is_contiguous():
            parts = [c]
        else:
            step = max(1, DIGEST_SLICE_BYTES // max(c[0].nbytes, 1))
            parts = [c[i : i + step] for i in range(0, c.shape[0], step)]
        for part in parts:
            h.update(part.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def payload_digest(entries: Mapping[str, Mapping[str, Any]]) -> str:
    """One SHA-256 for the whole tensor payload, from the per-tensor entries (name, dtype, shape, digest)."""
    h = hashlib.sha256()
    for key in sorted(entries):
        e = entries[key]
        h.update(f"{key}\t{e['dtype']}\t{list(e['shape'])}\t{e['sha256']}\n".encode())
    return h.hexdigest()


class Payload:
    """Tensors to write, each stored once.

    Tensors are deduplicated by identity (a shared ``A`` eigenbasis) and by content (identical ``A`` sums of
    layers reading the same input; the low-rank columns ``W`` held both by the sums and by an implicit eigenbasis):
    a tensor with the same dtype, shape and SHA-256 as one already registered gets that tensor's key. Each tensor is
    moved to CPU (no copy there) and hashed when it is added; a strided one is written row-major by slices.
    """

    def __init__(self) -> None:
        self.tensors: dict[str, Tensor | Rows] = {}
        self.entries: dict[str, dict[str, Any]] = {}
        self._by_id: dict[int, tuple[str, weakref.ref[Tensor | Rows]]] = {}
        self._by_content: dict[tuple[str, tuple[int, ...], str], str] = {}

    def add(self, key: str, t: Tensor | Rows) -> str:
        """Register ``t`` under ``key`` unless an identical tensor is already registered; return the key to use."""
        known = self._by_id.get(id(t))
        if known is not None and known[1]() is t:  # the same live object (e.g. a shared A basis)
            return known[0]
        if key in self.tensors:
            raise KeyError(f"Duplicate tensor key {key!r} in a factor file.")
        # On the host as they are: a strided tensor (a column-major eigenbasis) is made row-major by the writer a
        # slice at a time, not copied whole here (that held a copy of every eigenbasis of a group until written).
        if isinstance(t, Rows):
            c: Tensor | Rows = Rows(tuple(x.detach().to("cpu") for x in t.chunks))
        else:
            c = t.detach().to("cpu")
        name = dtype_name(c.dtype)
        if name not in ST_CODES:
            raise FileFormatError(f"Tensor {key!r} has dtype {c.dtype}, which factor files do not store.")
        digest = tensor_digest(c)
        sig = (name, tuple(c.shape), digest)
        hit = self._by_content.get(sig)
        if hit is None:
            self.tensors[key] = c
            self.entries[key] = {"dtype": name, "shape": list(c.shape), "sha256": digest}
            self._by_content[sig] = hit = key
        self._by_id[id(t)] = (hit, weakref.ref(t))  # a weak reference: a dropped copy is not kept alive
        return hit

    def prepared(self) -> tuple[dict[str, Tensor | Rows], dict[str, dict[str, Any]]]:
        """The tensors to write (CPU, contiguous; views of one storage are fine) and their metadata entries."""
        return dict(self.tensors), dict(self.entries)


# Writing ------------------------------------------------------------------------------------------------------
# Reading ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FileStamp:
    """Identity of a file on disk: a replaced or rewritten file gets a different stamp."""

    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, path: Path) -> FileStamp:
        """Stamp of ``path`` now."""
        st = os.stat(path)
        return cls(st.st_size, st.st_mtime_ns, st.st_ino)


@dataclass(frozen=True)
class Header:
    """Checked header of a factor file.

    Attributes:
        path: the file.
        meta: the kronfisher metadata (JSON object).
        stamp: identity of the file when the header was read.

    """

    path: Path
    meta: dict[str, Any]
    stamp: FileStamp
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)  # tensor -> byte range in the payload
    data_start: int = 0  # where the payload starts in the file


FOREIGN_HINT = "Pass a factor file written by kronfisher (analyze, merge, or save in Python)."


def _fail(path: Path, what: str) -> CorruptedFileError:
    """A kronfisher file damaged after it was written (truncated, or bytes changed)."""
    return CorruptedFileError(f"Factor file {path}: {what}")


def _unusable(path: Path, what: str, hint: str | None = None) -> FileFormatError:
    """A file that is intact as far as can be told, but not one this kronfisher can use."""
    return FileFormatError(f"Factor file {path}: {what}", hint=hint)


def read_header(path: str | os.PathLike[str]) -> Header:
    """Parse and check the header of a factor file without reading any tensor.

    Raises:
        FileNotFoundError: no such file.
        FileFormatError: not a kronfisher file, truncated, corrupted header or metadata, or a newer format.

    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No such factor file: {path}")
    stamp = FileStamp.of(path)
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise _fail(path, f"truncated ({stamp.size} bytes; not even a safetensors header length).")
        n = int.from_bytes(prefix, "little")
        if n > MAX_HEADER_BYTES or 8 + n > stamp.size:
            raise _fail(path, f"truncated or corrupted: header of {n} bytes announced, file has {stamp.size} bytes.")
        raw = fh.read(n)
    try:
        index = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _fail(path, f"corrupted safetensors header ({err}).") from err
    if not isinstance(index, dict):
        raise _fail(path, "corrupted safetensors header (not a JSON object).")
    block = index.pop("__metadata__", None)
    if not isinstance(block, dict) or not isinstance(block.get(META_KEY), str):
        # Our metadata names "kronfisher" in its keys and in its text: a header that still holds the name but not
        # under the expected keys is one of our files with a damaged byte (a key or the "__metadata__" name).
        if META_KEY.encode() in raw:
            raise _fail(path, "corrupted safetensors header (the kronfisher metadata is not under its keys).")
        raise _unusable(
            path, "not a kronfisher factor file (no kronfisher metadata in the safetensors header).", FOREIGN_HINT
        )
    text = block[META_KEY]
    if hashlib.sha256(text.encode()).hexdigest() != block.get(META_SHA_KEY):
        raise _fail(path, "metadata checksum mismatch (corrupted file).")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as err:  # pragma: no cover - the checksum passed, so only a writer bug gets here
        raise _fail(path, f"unreadable metadata ({err}).") from err
    _check_version(path, meta)
    _check_layout(path, index, meta["tensors"], stamp.size - 8 - n)
    spans = {k: (int(e["data_offsets"][0]), int(e["data_offsets"][1])) for k, e in index.items()}
    return Header(path=path, meta=meta, stamp=stamp, spans=spans, data_start=8 + n)


def _check_version(path: Path, meta: Any) -> None:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME or not isinstance(meta.get("tensors"), dict):
        raise _unusable(path, "not a kronfisher factor file (unexpected metadata).", FOREIGN_HINT)
    version = meta.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise _unusable(path, f"invalid format version {version!r}.", FOREIGN_HINT)
    if version > FORMAT_VERSION:
        raise _unusable(
            path,
            f"format version {version} (written by kronfisher {meta.get('library_version')}); this kronfisher "
            f"reads format versions up to {FORMAT_VERSION}: upgrade kronfisher.",
            "pip install --upgrade kronfisher",
        )


def _check_layout(path: Path, index: dict[str, Any], expected: dict[str, Any], data_len: int) -> None:
    """The safetensors tensor index must describe exactly the tensors of the metadata and tile the payload."""
    if set(index) != set(expected):
        extra = sorted(set(index) - set(expected))[:5]
        missing = sorted(set(expected) - set(index))[:5]
        raise _fail(path, f"corrupted tensor index (unexpected {extra}, missing {missing}).")
    spans = []
    for key, entry in index.items():
        exp = expected[key]
        try:
            dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            ok = (
                dtype == ST_CODES[exp["dtype"]]
                and list(shape) == list(exp["shape"])
                and isinstance(start, int)
                and isinstance(end, int)
                and end - start == _numel(shape) * _TORCH_DTYPES[exp["dtype"]].itemsize
            )
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise _fail(path, f"corrupted tensor index entry for {key!r}: {entry!r} (expected {exp!r}).")
        spans.append((start, end))
    pos = 0
    for start, end in sorted(spans):
        if start != pos:
            raise _fail(path, "corrupted tensor index (offsets do not tile the payload).")
        pos = end
    if pos != data_len:
        what = "truncated" if data_len < pos else "corrupted (trailing bytes)"
        raise _fail(path, f"{what}: the header describes {pos} payload bytes, the file holds {data_len}.")


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        if not isinstance(s, int) or s < 0:
            raise ValueError(shape)
        n *= s
    return n


def _iter_tensors(header: Header, keys: list[str]) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(key, tensor)`` on CPU, each checked against its recorded SHA-256, from one open of the file."""
    path = header.path
    try:
        now = FileStamp.of(path)
    except OSError as err:
        raise _unusable(path, f"cannot be read any more ({err}).") from err
    if now != header.stamp:
        raise _unusable(
            path,
            "changed on disk since it was opened; load it again.",
            "Another process replaced the file after it was opened.",
        )
    entries = header.meta["tensors"]
    # plain reads of each tensor's byte range: a whole-file mmap (safetensors' own reader) is refused for files
    # larger than memory (the 27 GB factors of a 1.5B model on a 24 GiB host)
    try:
        fh = open(path, "rb")
    except OSError as err:
        raise _unusable(path, f"cannot be read any more ({err}).") from err
    with fh:
        for key in keys:
            e = entries[key]
            start, end = header.spans[key]
            raw = torch.empty(end - start, dtype=torch.uint8)
            try:
                fh.seek(header.data_start + start)
                got = fh.readinto(memoryview(raw.numpy())) if end > start else 0
            except OSError as err:
                raise _fail(path, f"cannot read tensor {key!r}: {err}") from err
            if got != end - start:
                raise _fail(path, f"truncated: tensor {key!r} has {got} of its {end - start} bytes.")
            t = raw.view(_TORCH_DTYPES[e["dtype"]]).reshape(e["shape"])
            if tensor_digest(t) != e["sha256"]:
                raise _fail(path, f"checksum mismatch in tensor {key!r} (corrupted file).")
            yield key, t


def read_tensors(header: Header, keys: Iterable[str]) -> dict[str, Tensor]:
    """Read tensors ``keys`` (on CPU), each checked against its recorded SHA-256.

    Raises:
        FileFormatError: the file changed on disk since its header was read, or a tensor is corrupted.

    """
    return dict(_iter_tensors(header, list(keys)))


def verify_payload(header: Header) -> str:
    """Read every tensor, check its SHA-256 and the payload checksum; return the payload checksum."""
    entries = header.meta["tensors"]
    for _ in _iter_tensors(header, list(entries)):  # one tensor in memory at a time
        pass
    digest = payload_digest(entries)
    if digest != header.meta.get("payload_sha256"):
        raise _fail(header.path, "payload checksum mismatch (corrupted file).")
    return digest
