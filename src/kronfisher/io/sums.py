"""Raw sums on disk, fingerprints and shared metadata of factor files (docs/concepts.md).

Raw sums and counts are saved (:func:`save_sums`) so that collection can resume after an interruption and so that
files from disjoint data merge exactly by adding sums and counts. The model fingerprint (layer name ->
``[out, in, has_bias]``) is checked against a model when one is given. The file format itself (checksums) lives in
:mod:`kronfisher.io.format`, atomic writes in :mod:`kronfisher.io.atomic`; the public entry points are re-exported
by :mod:`kronfisher.io`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._version import __version__
from ..algebra.block import summary_row
from ..collection.sums import DenseSum, LayerSums, LowRankSum
from ..config import KFACConfig
from ..errors import ConfigError, FileFormatError, KronfisherError
from ..layers import LayerInfo
from ..report import CollectionReport
from .atomic import atomic_write
from .fingerprint import check_fingerprint, check_weights, model_fingerprint, weights_fingerprint
from .format import FORMAT_NAME, FORMAT_VERSION, Header, Payload, payload_digest, read_header, read_tensors

PathLike = str | os.PathLike[str]


# Metadata helpers -----------------------------------------------------------------------------------------------
def _model_meta(model: nn.Module | None) -> dict[str, Any] | None:
    if model is None:
        return None
    config = getattr(model, "config", None)
    return {
        "class": type(model).__name__,
        "name_or_path": getattr(config, "_name_or_path", None) or None,
        "model_type": getattr(config, "model_type", None),
    }


def base_meta(
    kind: str,
    cfg: KFACConfig,
    infos: Mapping[str, LayerInfo],
    report: CollectionReport | None,
    model: nn.Module | None,
    extra: Mapping[str, Any] | None,
    *,
    weights: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Metadata common to every file kind; checks ``model`` against ``infos`` when given (docs/files.md).

    ``"weights"`` holds digests of ``model``'s weights for every layer of ``infos``; without a model, the given
    ``weights`` (what a loaded or merged operator carries), restricted to those layers.
    """
    if model is not None:
        check_fingerprint(model_fingerprint(infos), model, path="(being written)")
        check_weights(weights, model, path="(being written)")
        weights = weights_fingerprint(model, infos)
    elif weights is not None:
        weights = {**weights, "layers": {n: d for n, d in weights["layers"].items() if n in infos}}
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "library_version": __version__,
        "torch_version": torch.__version__,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": cfg.to_dict(),
        "report": (report or CollectionReport()).to_dict(),
        "fingerprint": model_fingerprint(infos),
        "weights": weights,
        "infos": {n: info.to_dict() for n, info in infos.items()},
        "model": _model_meta(model),
        "extra": dict(extra or {}),
    }


def report_from_dict(d: Mapping[str, Any]) -> CollectionReport:
    """Inverse of :meth:`CollectionReport.to_dict`; keys this version does not know are ignored."""
    known = {f.name for f in dataclasses.fields(CollectionReport)}
    kwargs = {k: v for k, v in d.items() if k in known}
    if "nonfinite_batches" in kwargs:
        kwargs["nonfinite_batches"] = [(int(b), list(ls)) for b, ls in kwargs["nonfinite_batches"]]
    return CollectionReport(**kwargs)


def write_file(path: PathLike, payload: Payload, meta: dict[str, Any], *, local: bool = False) -> Path:
    """Record per-tensor checksums and the payload checksum in ``meta``, then write atomically.

    ``local``: see :func:`~kronfisher.io.atomic.atomic_write`.
    """
    tensors, entries = payload.prepared()
    meta["tensors"] = entries
    meta["payload_sha256"] = payload_digest(entries)
    try:
        return atomic_write(path, tensors, meta, local=local)
    except TypeError as err:  # json.dumps of a user extra_meta
        raise ConfigError(f"Metadata for {path} is not JSON-serialisable: {err}") from err


# Sums -----------------------------------------------------------------------------------------------------------
def _state_trace(kind: str, state: Mapping[str, Tensor], block: int = 4096) -> float:
    """Trace of the raw sum from its state: ``tr(sum)`` (dense) or ``‖W‖_F² + tail_mass`` (low-rank), float64.

    Low-rank columns are summed in blocks of ``block`` columns, so no float64 copy of ``W`` is made.
    """
    if kind == "dense":
        return float(state["sum"].diagonal().to(torch.float64).sum())
    cols = state["columns"]
    total = sum(float(cols[:, i : i + block].to(torch.float64).square().sum()) for i in range(0, cols.shape[1], block))
    return total + float(state.get("tail_mass", 0.0))


def _add_state(payload: Payload, prefix: str, kind: str, state: Mapping[str, Tensor]) -> dict[str, Any]:
    """Register one factor's raw state: scalars go to the JSON, tensors to the payload.

    Low-rank columns ``W`` (``[out, m]``) are stored token-major (``[m, out]``), the layout they are held in, so no
    transposed copy is made and the bytes match an implicit eigenbasis built from the same columns.
    """
    tensors, scalars, token_major = {}, {}, []
    for key, value in state.items():
        if value.dim() == 0:
            scalars[key] = float(value)
        elif kind == "lowrank" and key == "columns":
            tensors[key] = payload.add(f"{prefix}.{key}", value.t())
            token_major.append(key)
        else:
            tensors[key] = payload.add(f"{prefix}.{key}", value)
    return {
        "kind": kind,
        "tensors": tensors,
        "scalars": scalars,
        "token_major": token_major,
        "trace_sum": _state_trace(kind, state),
    }


def sums_meta(payload: Payload, sums: Mapping[str, LayerSums]) -> dict[str, Any]:
    """Register the raw state of every layer's sums in ``payload``; return their metadata."""
    return {
        name: {
            "batches": int(s.batches),
            "A": _add_state(payload, f"sums:{name}:A", s.A.kind, s.A.state()),
            "G": _add_state(payload, f"sums:{name}:G", s.G.kind, s.G.state()),
        }
        for name, s in sums.items()
    }


def _sums_rows(infos: Mapping[str, LayerInfo], smeta: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per-layer inspection rows of a sums file, from the metadata of :func:`sums_meta`."""
    rows = {}
    for name, sm in smeta.items():
        t, n = sm["A"]["scalars"]["count"], sm["G"]["scalars"]["count"]
        rows[name] = summary_row(
            infos[name],
            representation=sm["G"]["kind"],
            rank_G=None,
            tokens=(t, n),
            traces=(sm["A"]["trace_sum"] / t if t > 0 else 0.0, sm["G"]["trace_sum"] / n if n > 0 else 0.0),
        )
    return rows


@dataclass
class SumsFile:
    """Raw sums read from a file (docs/concepts.md).

    Attributes:
        infos: static layer descriptions by name.
        sums: :class:`~kronfisher.collection.sums.LayerSums` by name (fresh tensors, safe to keep accumulating into).
        cfg: the configuration the sums were collected with.
        report: the collection report.
        meta: the whole file metadata (``meta["extra"]`` holds what the writer passed as ``extra_meta``).

    """

    infos: dict[str, LayerInfo]
    sums: dict[str, LayerSums]
    cfg: KFACConfig
    report: CollectionReport
    meta: dict[str, Any] = field(repr=False)


def save_sums(
    path: PathLike,
    infos: Mapping[str, LayerInfo],
    sums: Mapping[str, LayerSums],
    cfg: KFACConfig,
    *,
    report: CollectionReport | None = None,
    model: nn.Module | None = None,
    extra_meta: Mapping[str, Any] | None = None,
    local: bool = False,
) -> Path:
    """Write raw sums and counts atomically, to resume collection or merge later (docs/concepts.md).

    Args:
        path: destination (``.safetensors``).
        infos: layer infos; must cover every layer of ``sums``.
        sums: accumulated sums by layer (for example ``FactorCollector.sums``).
        cfg: the configuration used to collect them.
        report: the collection report so far.
        model: when given, checked against the layer shapes and described in the metadata (weights never stored).
        extra_meta: JSON-serialisable data for the caller (for example how many batches were consumed).
        local: write this process's own sums, without the rank-0 rule and barrier of ``torchrun`` runs: a per-rank
            checkpoint inside a pass (a barrier there would hang ranks with different batch counts).

    Returns:
        The written path.

    """
    missing = sorted(set(sums) - set(infos))
    if missing:
        raise KronfisherError(f"save_sums: no LayerInfo for layers {missing}.")
    infos = {n: infos[n] for n in sums}
    meta = base_meta("sums", cfg, infos, report, model, extra_meta)
    payload = Payload()
    meta["sums"] = sums_meta(payload, sums)
    meta["layers"] = _sums_rows(infos, meta["sums"])
    return write_file(path, payload, meta, local=local)


def _tensor_state(header: Header, part: Mapping[str, Any], device: torch.device | str) -> dict[str, Tensor]:
    keys = part["tensors"]
    read = read_tensors(header, keys.values())
    flip = set(part.get("token_major", ()))
    state = {k: (read[key].t() if k in flip else read[key]).to(device) for k, key in keys.items()}
    state.update({k: torch.tensor(v, dtype=torch.float64) for k, v in part["scalars"].items()})
    return state


def _planned_rank(header: Header, name: str, cfg: KFACConfig) -> int | None:
    """The token budget of a low-rank ``G`` as the run's plan chose it (None: exact), else ``cfg``'s (older files)."""
    plan = (header.meta.get("report") or {}).get("plan") or {}
    layer = (plan.get("layers") or {}).get(name)
    if layer is not None and layer.get("representation") == "lowrank":
        return layer.get("max_rank")
    return cfg.lowrank_max_rank


def read_layer_sums(header: Header, name: str, cfg: KFACConfig, device: torch.device | str = "cpu") -> LayerSums:
    """Rebuild one layer's :class:`LayerSums` from a file (fresh tensors, checksum-verified)."""
    sm = header.meta["sums"][name]
    info = header.meta["infos"][name]
    parts = []
    for factor, dim in (("A", info["in_features"] + int(info["has_bias"])), ("G", info["out_features"])):
        part = sm[factor]
        s: DenseSum | LowRankSum
        if part["kind"] == "dense":
            state = _tensor_state(header, part, device)
            s = DenseSum(dim, state["sum"].dtype, device)
        elif part["kind"] == "lowrank":
            state = _tensor_state(header, part, "cpu")  # on the host; a resumed collection moves U where it keeps it
            s = LowRankSum(dim, cfg.lowrank_torch_dtype, _planned_rank(header, name, cfg), device="cpu")
        else:
            raise FileFormatError(f"Factor file {header.path}: unknown sum kind {part['kind']!r} for layer {name!r}.")
        first = next(iter(state.values()))
        if first.dim() and first.shape[0] != dim:
            raise FileFormatError(
                f"Factor file {header.path}: {factor} sum of layer {name!r} has shape {list(first.shape)}, "
                f"expected {dim} rows."
            )
        s.load_state(state)
        parts.append(s)
    return LayerSums(A=parts[0], G=parts[1], batches=int(sm["batches"]))  # type: ignore[arg-type]


def config_from_header(header: Header) -> KFACConfig:
    """The :class:`KFACConfig` stored in a file (FileFormatError if this version cannot read it)."""
    try:
        return KFACConfig.from_dict(header.meta["config"])
    except (ConfigError, KeyError, TypeError) as err:
        raise FileFormatError(
            f"Factor file {header.path}: its configuration cannot be read by this kronfisher "
            f"(written by {header.meta.get('library_version')}): {err}"
        ) from err


def infos_from_header(header: Header) -> dict[str, LayerInfo]:
    """The :class:`LayerInfo` of every layer stored in a file."""
    try:
        return {n: LayerInfo(**d) for n, d in header.meta["infos"].items()}
    except (KeyError, TypeError) as err:
        raise FileFormatError(f"Factor file {header.path}: unreadable layer infos ({err}).") from err


def load_sums(path: PathLike) -> SumsFile:
    """Read the raw sums of a ``"sums"`` file, or of a ``"kfac"`` file saved with its sums (eager, CPU)."""
    header = read_header(path)
    if not header.meta.get("sums"):
        raise FileFormatError(
            f"Factor file {header.path} holds no raw sums, so it cannot be merged (it was saved without "
            "include_sums=True).",
            hint="Only files with their raw sums merge: rerun kronfisher analyze with --save-sums "
            "(in Python: save with include_sums=True).",
        )
    cfg = config_from_header(header)
    infos = infos_from_header(header)
    sums = {n: read_layer_sums(header, n, cfg) for n in header.meta["sums"]}
    return SumsFile(
        infos={n: infos[n] for n in sums},
        sums=sums,
        cfg=cfg,
        report=report_from_dict(header.meta.get("report", {})),
        meta=header.meta,
    )
