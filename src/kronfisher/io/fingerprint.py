"""Model fingerprints of factor files: layer shapes plus a cheap digest of the weights.

A factor file records, per layer, ``[out, in, has_bias]`` (metadata key ``"fingerprint"``) and, next to it, a
digest of a fixed, evenly strided sample of the layer's weight and bias values (``"weights"``). Loading with a
model, merging and ``--resume`` compare them, so factors computed from other weights of the same architecture are
refused with a :class:`~kronfisher.errors.FingerprintError` naming the layers, instead of being silently combined
with the wrong model. Files written before the weight digests existed carry shapes only and are checked on shapes
only.

The digest hashes the sample as float32 values: a model loaded in float32 or float64 from the same checkpoint
gives the same digests, while a cast to bfloat16 or float16 changes the weights (and so the Fisher) and is
reported as other weights, with the dtypes named. It samples ``WEIGHT_SAMPLES`` entries per tensor, so its cost
does not grow with the model; a change confined to a few rows of a large matrix can escape it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import FingerprintError
from ..layers import LayerInfo, discover_layers, layer_kind
from .format import dtype_name

WEIGHT_SAMPLES = 1024
WEIGHTS_METHOD = f"strided{WEIGHT_SAMPLES}-float32-sha256"
_SHOWN = 8  # layers named in one message; the exception's ``mismatched`` holds all of them


# Layer shapes ---------------------------------------------------------------------------------------------------
def model_fingerprint(model_or_infos: Any) -> dict[str, list[int]]:
    """Layer name -> ``[out, in, has_bias]`` (docs/files.md).

    Args:
        model_or_infos: a model (every ``nn.Linear`` / ``Conv1D``, frozen or not), a dict of
            :class:`~kronfisher.layers.LayerInfo`, an object with ``.infos`` (a :class:`KFAC`, a :class:`SumsFile`)
            or a fingerprint dict.

    """
    if isinstance(model_or_infos, nn.Module):
        out: dict[str, list[int]] = {}
        for name, module in model_or_infos.named_modules():
            kind = layer_kind(module)
            if kind is None:
                continue
            w = module.weight
            in_f, out_f = (w.shape[1], w.shape[0]) if kind == "linear" else (w.shape[0], w.shape[1])
            out[name] = [int(out_f), int(in_f), int(getattr(module, "bias", None) is not None)]
        return out
    infos = getattr(model_or_infos, "infos", model_or_infos)
    if not isinstance(infos, Mapping):
        raise TypeError(f"model_fingerprint needs a model, layer infos or a fingerprint, got {type(infos).__name__}.")
    result = {}
    for name, v in infos.items():
        if isinstance(v, LayerInfo):
            result[name] = [v.out_features, v.in_features, int(v.has_bias)]
        else:
            result[name] = [int(x) for x in v]
    return result


def fingerprint_mismatches(expected: Mapping[str, list[int]], model_or_infos: Any) -> list[tuple[str, str, str]]:
    """``(layer, expected, found)`` for every layer of ``expected`` that the model lacks or shapes differently."""
    found = model_fingerprint(model_or_infos)
    bad = []
    for name, want in expected.items():
        have = found.get(name)
        if have is None:
            bad.append((name, str(list(want)), "missing"))
        elif list(have) != list(want):
            bad.append((name, str(list(want)), str(list(have))))
    return bad


def check_fingerprint(
    expected: Mapping[str, list[int]], model_or_infos: Any, *, path: str | os.PathLike[str] = "?"
) -> None:
    """Raise :class:`FingerprintError` listing every mismatched layer (``[out, in, has_bias]``)."""
    bad = fingerprint_mismatches(expected, model_or_infos)
    if bad:
        shown = "; ".join(f"{n}: file {e}, model {f}" for n, e, f in bad[:20])
        more = f" (and {len(bad) - 20} more)" if len(bad) > 20 else ""
        raise FingerprintError(
            f"Factor file {path} does not match the model: {len(bad)} mismatched layer(s) "
            f"[out, in, has_bias]: {shown}{more}.",
            bad,
        )


# Weights -----------------------------------------------------------------------------------------------------
MERGE_HINT = "Merge only files computed from the same model weights (the same checkpoint and dtype)."


def _sample(t: Tensor) -> Tensor | None:
    """``WEIGHT_SAMPLES`` evenly spaced entries of ``t`` in row-major order, as float32 on CPU (None on ``meta``).

    The entries are picked by index, so a large or non-contiguous weight is never copied whole.
    """
    if t.is_meta:
        return None
    n = t.numel()
    k = min(n, WEIGHT_SAMPLES)
    flat = torch.arange(k, dtype=torch.int64) * n // k
    coords = []
    for size in reversed(t.shape):  # row-major coordinates (torch.unravel_index is ~100x slower here)
        coords.append((flat % size).to(t.device))
        flat = flat // size
    return t.detach()[tuple(reversed(coords))].to(device="cpu", dtype=torch.float32)


def weight_digest(module: nn.Module) -> str | None:
    """Digest of a strided sample of a layer's weight (and bias) as float32; None when not readable (``meta``)."""
    h = hashlib.sha256()
    for t in (module.weight, getattr(module, "bias", None)):
        if t is None:
            continue
        s = _sample(t)
        if s is None:
            return None
        h.update(f"{list(t.shape)};".encode())
        h.update(s.numpy().astype("<f4").tobytes())
    return h.hexdigest()[:16]


def weights_fingerprint(model: nn.Module, names: Iterable[str]) -> dict[str, Any]:
    """The ``"weights"`` metadata of a file holding layers ``names`` of ``model``.

    Returns:
        ``{"method", "dtype", "layers": {name: digest}}``; layers that are not readable (``meta``) are left out.

    """
    modules = dict(model.named_modules())
    layers: dict[str, str] = {}
    dtypes: set[str] = set()
    for name in names:
        module = modules.get(name)
        if module is None or layer_kind(module) is None:
            continue
        digest = weight_digest(module)
        if digest is not None:
            layers[name] = digest
            dtypes.add(dtype_name(module.weight.dtype))
    return {"method": WEIGHTS_METHOD, "dtype": ",".join(sorted(dtypes)), "layers": layers}


def usable(weights: Any) -> bool:
    """Whether ``weights`` metadata was written with the method this version computes."""
    return isinstance(weights, Mapping) and weights.get("method") == WEIGHTS_METHOD


def _names(items: Sequence[str]) -> str:
    more = f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + more


def check_weights(weights: Any, model: nn.Module, *, path: Path | str, hint: str | None = None) -> None:
    """Raise :class:`FingerprintError` when the model's weights differ from those a file was computed from.

    ``weights`` is the file's ``"weights"`` metadata; None (a file from before weight digests) or an unknown
    method checks nothing. Layers the model lacks are left to the shape check.
    """
    if not usable(weights):
        return
    now = weights_fingerprint(model, weights["layers"])
    bad = [
        (n, d, now["layers"][n]) for n, d in weights["layers"].items() if n in now["layers"] and now["layers"][n] != d
    ]
    if not bad:
        return
    dtypes = ""
    if weights.get("dtype") and now["dtype"] and weights["dtype"] != now["dtype"]:
        dtypes = f"; the file was written from {weights['dtype']} weights, the model is {now['dtype']}"
    raise FingerprintError(
        f"Factor file {path} was computed from other weights than the model: {len(bad)} of "
        f"{len(weights['layers'])} layer(s) differ ({_names([n for n, _, _ in bad])}){dtypes}.",
        [(n, f"weights {d}", f"weights {m}") for n, d, m in bad],
        hint=hint,
    )


def untracked_layers(
    model: nn.Module, config: Mapping[str, Any], present: Iterable[str], excused: Iterable[str] = ()
) -> list[str]:
    """Layers of ``model`` that the file's include/exclude selection tracks but that are not ``present``.

    ``excused``: layers a file lacks for a recorded reason (hooks never fired, skipped at collection, sums not
    stored). Frozen layers of ``model`` are not counted: they get no gradient to precondition.
    """
    include = tuple(config.get("include") or ())
    exclude = tuple(config.get("exclude") or ())
    skip = set(present) | set(excused)
    return [n for n in discover_layers(model, include, exclude).infos if n not in skip]


def _excused(meta: Mapping[str, Any]) -> set[str]:
    report = meta.get("report") or {}
    return (
        set(report.get("never_fired", ()))
        | set(report.get("skipped_layers", {}))
        | set(meta.get("sums_not_stored", ()))
    )


def check_subset(
    model: nn.Module,
    config: Mapping[str, Any],
    present: Iterable[str],
    excused: Iterable[str],
    *,
    path: Path | str,
) -> None:
    """Refuse a model with tracked layers that the file lacks (the natural gradient would silently skip them)."""
    present = list(present)
    extra = untracked_layers(model, config, present, excused)
    if extra:
        raise FingerprintError(
            f"Factor file {path} covers {len(present)} layer(s), but the model has {len(extra)} more layer(s) "
            f"that the file's selection tracks and the file lacks ({_names(extra)}); natural gradients would "
            "leave them out. Pass allow_subset=True to use the file for its own layers only.",
            [(n, "absent", "present") for n in extra],
            hint="Add --allow-subset to use the file for its own layers only.",
        )


def check_model(
    meta: Mapping[str, Any],
    model: nn.Module,
    *,
    path: Path | str,
    allow_subset: bool = False,
    hint: str | None = None,
) -> None:
    """Check a file's metadata against a model: layer shapes, weights, and (unless ``allow_subset``) coverage.

    Raises:
        FingerprintError: naming the file and the mismatched layers.

    """
    try:
        check_fingerprint(meta["fingerprint"], model, path=path)
    except FingerprintError as err:
        err.hint = err.hint or hint
        raise
    check_weights(meta.get("weights"), model, path=path, hint=hint)
    if not allow_subset:
        check_subset(model, meta.get("config") or {}, meta["fingerprint"], _excused(meta), path=path)


def merged_weights(files: Sequence[tuple[Path, Mapping[str, Any]]]) -> tuple[dict[str, Any] | None, list[str]]:
    """Check that files to merge were computed from the same weights; return the merged ``"weights"`` and notes.

    Every layer digest must agree across the files that hold the layer. A file without weight digests (written
    by an older kronfisher) is checked on shapes only, with a note, and the merged file then carries no digests
    (they would vouch for data that was never checked).

    Raises:
        FingerprintError: naming the layers whose weights differ and the two files.

    """
    seen: dict[str, tuple[str, Path]] = {}
    notes = []
    complete = True
    dtypes: set[str] = set()
    for p, meta in files:
        w = meta.get("weights")
        if not usable(w):
            complete = False
            notes.append(f"{p} has no weight digests (written by an older kronfisher): only layer shapes compared.")
            continue
        bad = [(n, seen[n], d) for n, d in w["layers"].items() if n in seen and seen[n][0] != d]
        if bad:
            other = bad[0][1][1]
            raise FingerprintError(
                f"Cannot merge {p} with {other}: they were computed from different model weights ({len(bad)} "
                f"layer(s) differ: {_names([n for n, _, _ in bad])}).",
                [(n, f"weights {d} in {q}", f"weights {e} in {p}") for n, (d, q), e in bad],
                hint=MERGE_HINT,
            )
        for n, d in w["layers"].items():
            seen.setdefault(n, (d, p))
        dtypes.update(x for x in str(w.get("dtype", "")).split(",") if x)
    if not complete or not seen:
        return None, notes
    layers = {n: d for n, (d, _) in seen.items()}
    return {"method": WEIGHTS_METHOD, "dtype": ",".join(sorted(dtypes)), "layers": layers}, notes
