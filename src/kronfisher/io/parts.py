"""A factor file written one layer group at a time (docs/concepts.md#memory-plan-and-module-groups, docs/files.md).

When the tracked layers run in groups, the factors of all groups together can exceed memory (Qwen2.5-1.5B at
4,096 tokens keeps about 25 GiB of eigenbases, low-rank columns and EK-FAC eigenvalues). :class:`GroupFiles` writes
each finished group's blocks to a part file next to the destination and drops them; :meth:`GroupFiles.finish`
then joins the parts into one ordinary factor file by copying their tensor bytes (never loading them): the per-tensor
checksums of the parts carry over, the metadata is the union of the parts' layers with the run's merged report.
Parts are removed as they are copied, and on any failure, so nothing partial is left under any name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from torch import nn

from ..comm import barrier, broadcast_object, is_main_process
from ..errors import FileFormatError
from ..operator import KFAC
from ..report import CollectionReport
from .atomic import write_through_temporary
from .files import save
from .format import META_KEY, META_SHA_KEY, payload_digest, read_header
from .stream import Spec, copy_range, header_bytes
from .sums import PathLike, report_from_dict

# per-layer metadata of a factor file that the parts each hold for their own layers
LAYER_KEYS = ("infos", "fingerprint", "blocks", "layers", "tensors")


def _index(path: Path) -> tuple[int, dict[str, Any]]:
    """Where the payload of a safetensors file starts, and its tensor index (dtype, shape, data_offsets)."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        index = json.loads(fh.read(n).decode("utf-8"))
    index.pop("__metadata__", None)
    return 8 + n, index


def _joined_meta(metas: list[dict[str, Any]], report: CollectionReport, extra: Mapping[str, Any] | None) -> dict:
    """The first part's metadata with every part's layers, the run's report and ``extra``."""
    meta = dict(metas[0])
    for key in LAYER_KEYS:
        meta[key] = {k: v for m in metas for k, v in (m.get(key) or {}).items()}
    weights = [m.get("weights") for m in metas]
    if all(w is not None for w in weights):
        meta["weights"] = {**weights[0], "layers": {k: v for w in weights for k, v in w["layers"].items()}}
    meta["report"] = report.to_dict()
    meta["extra"] = dict(extra or {})
    meta["created_utc"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    meta["payload_sha256"] = payload_digest(meta["tensors"])
    return meta


def join_parts(parts: list[Path], dest: Path, report: CollectionReport, extra: Mapping[str, Any] | None) -> Path:
    """Join factor files of disjoint layers into ``dest`` (atomically), copying tensor bytes; parts are removed.

    The safetensors header is laid out as every factor file's (:func:`~kronfisher.io.stream.header_bytes`), with
    the parts' tensors in their order; every tensor keeps the checksum its part recorded, so
    :func:`~kronfisher.io.files.verify_file` and lazy reads check the joined bytes as they would any file.
    """
    metas = [read_header(p).meta for p in parts]
    meta = _joined_meta(metas, report, extra)
    text = json.dumps(meta)
    metadata = {META_KEY: text, META_SHA_KEY: hashlib.sha256(text.encode()).hexdigest()}
    entries: list[Spec] = []
    sources: list[tuple[Path, int, int, int]] = []  # part, its payload start, tensor start, length
    for part in parts:
        start, index = _index(part)
        for key, e in sorted(index.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            a, b = e["data_offsets"]
            entries.append((key, e["dtype"], e["shape"], b - a))
            sources.append((part, start, a, b - a))
    head, total = header_bytes(entries, metadata)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as out:
            out.write(head)
            for part in parts:
                with open(part, "rb") as src:
                    for _, start, a, length in (s for s in sources if s[0] == part):
                        copy_range(src, out, start + a, length)
            out.flush()

    path = write_through_temporary(dest, write, needed=lambda: len(head) + total)
    for part in parts:
        with contextlib.suppress(OSError):
            part.unlink()
    return path


class GroupFiles:
    """Each group's factors go to a part file as the group finishes; :meth:`finish` joins them into ``dest``.

    Parts are hidden temporaries next to ``dest``, removed on failure; with ``keep`` (a folder) they are
    ``<keep>/<dest stem>.group<k>-of-<n>.safetensors`` carrying ``identity``, kept when the run fails, so that a
    resumed run reuses the groups that finished (:meth:`reusable`). Under ``torchrun`` rank 0 writes and joins,
    the other ranks wait (docs/distributed.md).

    Args:
        dest: the factor file to write.
        model: the model (checked against the layers; digests of its weights go into the file).
        keep: folder of resumable parts, or None.
        identity: what a part must match to be reused (model, data, configuration), stored in each part.

    """

    def __init__(
        self,
        dest: PathLike,
        model: nn.Module | None,
        *,
        keep: PathLike | None = None,
        identity: Mapping[str, Any] | None = None,
    ) -> None:
        self.dest = Path(dest)
        self.model = model
        self.keep = None if keep is None else Path(keep)
        self.identity = dict(identity or {})
        self.parts: list[Path] = []
        self._tag = f"{os.getpid()}.{secrets.token_hex(6)}"
        if self.dest.is_dir():
            raise FileFormatError(f"Cannot write factors to {self.dest}: it is a directory.")

    def path(self, k: int, n: int) -> Path:
        """Where group ``k`` of ``n`` goes."""
        if self.keep is not None:
            return self.keep / f"{self.dest.stem}.group{k}-of-{n}.safetensors"
        # a name the output folder's clean-up recognises as ours (.<name>.<pid>.<hex>.tmp) should the run be killed
        return self.dest.parent / f".{self.dest.name}.group{k}.{self._tag}.tmp"

    def add(self, fisher: KFAC, k: int, n: int) -> None:
        """Write group ``k`` of ``n`` (its blocks, no sums) to its part file."""
        part = self.path(k, n)
        part.parent.mkdir(parents=True, exist_ok=True)
        self.parts.append(part)
        save(fisher, part, model=self.model, extra_meta={"identity": self.identity})

    def reusable(self, k: int, n: int, groups: list[list[str]]) -> CollectionReport | None:
        """The report of group ``k``'s part when a finished run of the same identity and plan left it, else None.

        Decided on rank 0 and broadcast, so every rank of a ``torchrun`` job skips the same groups.
        """
        found: dict[str, Any] | None = None
        part = self.path(k, n)
        if is_main_process() and self.keep is not None and part.is_file():
            try:
                meta = read_header(part).meta
            except (OSError, FileFormatError):  # damaged: run the group again
                meta = {}
            same = (meta.get("extra") or {}).get("identity") == self.identity
            if same and (meta.get("report") or {}).get("plan", {}).get("groups") == groups:
                found = meta["report"]
        found = broadcast_object(found)
        if found is None:
            return None
        self.parts.append(part)
        return report_from_dict(found)

    def finish(self, report: CollectionReport, extra: Mapping[str, Any] | None = None) -> Path:
        """Join the parts into ``dest`` (removing them); returns ``dest``."""
        try:
            if is_main_process():
                join_parts(self.parts, self.dest, report, extra)
        finally:
            barrier()
        return self.dest

    def discard(self) -> None:
        """After a failure: remove the temporary parts (resumable ones stay for the next run)."""
        if is_main_process() and self.keep is None:
            for part in self.parts:
                with contextlib.suppress(OSError):
                    part.unlink()
