"""Merge factor files collected on disjoint data: sums add, then one decomposition (docs/files.md)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..algebra.gram import add_gram
from ..collection.sums import DenseSum, LowRankSum
from ..config import sum_fields
from ..errors import FileFormatError, FingerprintError, KronfisherError
from ..operator import KFAC
from ..report import CollectionReport
from .files import save
from .fingerprint import MERGE_HINT, check_model, check_subset, merged_weights
from .sums import PathLike, SumsFile, load_sums


# Merge ----------------------------------------------------------------------------------------------------------
def _sources(meta: Mapping[str, Any]) -> list[str]:
    """Payload checksums of the original (unmerged) files whose data a file holds."""
    return list(meta.get("extra", {}).get("sources") or [meta.get("payload_sha256")])


logger = logging.getLogger("kronfisher")


def _check_mergeable(files: list[tuple[Path, SumsFile]]) -> list[str]:
    seen: dict[str, Path] = {}
    for p, f in files:  # merging needs disjoint data: the same file (or a merge containing it) counts twice
        for src in _sources(f.meta):
            if src in seen:
                raise FileFormatError(
                    f"Cannot merge {p} with {seen[src]}: both hold the sums of the same file (payload {src[:12]}), "
                    "so that data would be counted twice.",
                    hint="Pass each file once; a merged file already holds the files it was merged from.",
                )
            seen[src] = p
    base_path, base = files[0]
    base_cfg = base.cfg.to_dict()
    notes = []
    for p, f in files[1:]:
        cfg = f.cfg.to_dict()
        bad = [k for k in sum_fields() if cfg.get(k) != base_cfg.get(k)]
        if bad:
            diffs = ", ".join(f"{k}: {base_cfg.get(k)!r} vs {cfg.get(k)!r}" for k in bad)
            raise FileFormatError(
                f"Cannot merge {p} into {base_path}: sums collected with different {diffs}.",
                hint="Merge only files collected with the same options (those listed must be equal).",
            )
        other = [k for k in cfg if k not in (*sum_fields(), "ekfac") and cfg.get(k) != base_cfg.get(k)]
        if other:
            notes.append(f"{p}: config fields {other} differ from {base_path}; the first file's values are kept.")
        for name, info in f.infos.items():
            if name in base.infos and base.infos[name] != info:
                raise FingerprintError(
                    f"Cannot merge {p} into {base_path}: layer {name!r} differs "
                    f"({base.infos[name].to_dict()} vs {info.to_dict()}).",
                    [(name, str(base.infos[name].to_dict()), str(info.to_dict()))],
                    hint=MERGE_HINT,
                )
    return notes


def _dense_G(g: DenseSum | LowRankSum, dtype: torch.dtype, name: str, path: Path) -> DenseSum:
    """``g`` as a dense sum, to merge it with an input where the same layer's ``G`` is dense.

    An exact low-rank ``G`` becomes ``W Wᵀ``, the dense sum of the same rows. One compressed to a token budget
    cannot (its discarded mass has no dense form).
    """
    if g.kind == "dense":
        return g  # type: ignore[return-value]
    assert isinstance(g, LowRankSum)
    if g.tail_mass > 0:
        raise FileFormatError(
            f"G of layer {name!r} is dense in one merge input and compressed to a token budget in another "
            f"(merging {path}): the budget's discarded mass cannot be added to a dense G.",
            hint="Collect those inputs with the same representation (--lowrank-layers, or --lowrank-rank all).",
        )
    dense = DenseSum(g.dim, dtype, g.device)
    for chunk in g.columns().chunks:
        add_gram(dense.sum, chunk)
    dense.count = g.count
    return dense


def _add_up(files: list[tuple[Path, SumsFile]]) -> tuple[dict[str, Any], dict[str, Any], CollectionReport]:
    """Layer infos, summed sums and the combined collection report of the files (the first file's sums in place)."""
    base = files[0][1]
    infos = dict(base.infos)
    sums = dict(base.sums)
    report = CollectionReport(skipped_layers=dict(base.report.skipped_layers))
    for path, f in files[1:]:
        for name, s in f.sums.items():
            if name in sums:
                if sums[name].G.kind != s.G.kind:  # the plan chose G by each run's token count (docs/concepts.md)
                    dense = s.G if s.G.kind == "dense" else sums[name].G
                    sums[name].G, s.G = (_dense_G(g, dense.dtype, name, path) for g in (sums[name].G, s.G))
                sums[name].merge(s)
            else:
                infos[name], sums[name] = f.infos[name], s
    for _, f in files:
        report.merge(f.report)
    never = {n for _, f in files for n in f.report.never_fired}
    report.never_fired = sorted(n for n in never if not (n in sums and sums[n].A.count > 0))
    return infos, sums, report


def merge_files(
    paths: Iterable[PathLike], out_path: PathLike, *, model: nn.Module | None = None, allow_subset: bool = False
) -> Path:
    """Merge files of sums from disjoint data: add sums and counts, then decompose (docs/files.md).

    The result equals one collection over the union of the data. Every input must carry raw sums (a ``"sums"`` file
    or a ``"kfac"`` file saved with ``include_sums=True``) collected with the same sum-relevant configuration (the
    fields marked ``sums`` in the config metadata, :func:`~kronfisher.config.sum_fields`) from the same model
    weights (the layer weight digests must agree; files written before the digests existed are compared on layer
    shapes only). A layer absent from one file (its hooks never fired
    there) contributes nothing from it. Inputs that hold the same data (the same file twice, or a merged file and
    one of its sources, recognised by the payload checksums recorded in ``extra["sources"]``) are refused.
    EK-FAC eigenvalues cannot be merged (they depend on the merged eigenbasis): the output is K-FAC (its config
    says ``ekfac=False``) and a warning says so. The output is a ``"kfac"`` file with its sums, so it can be merged
    again.

    Args:
        paths: two or more input files.
        out_path: destination, written atomically.
        model: when given, every input must match it (shapes and weights, :class:`FingerprintError`), and the
            inputs together must cover the layers it tracks.
        allow_subset: with ``model``, accept a model with more tracked layers than the inputs hold.

    Returns:
        The written path.

    Raises:
        FingerprintError: inputs from different architectures or weights, or not matching ``model``.
        FileFormatError: inputs without raw sums, with different sum options, or holding the same data.

    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise KronfisherError("merge_files needs at least one input file.")
    out = Path(out_path)
    if out.exists() and any(p.exists() and p.samefile(out) for p in paths):
        # Written atomically over its own input, the file would lose what a merge drops (EK-FAC eigenvalues).
        raise FileFormatError(
            f"The merge output {out} is also one of its inputs; it would be replaced by the merged file.",
            hint="Name a new output file first: kronfisher merge OUTPUT INPUT INPUT...",
        )
    files = []
    for p in paths:
        f = load_sums(p)
        if model is not None:
            check_model(f.meta, model, path=p, allow_subset=True)
        files.append((p, f))
    notes = _check_mergeable(files)
    weights, weight_notes = merged_weights([(p, f.meta) for p, f in files])
    notes.extend(weight_notes)
    base = files[0][1]
    infos, sums, report = _add_up(files)
    if model is not None and not allow_subset:
        excused = set(report.never_fired) | set(report.skipped_layers)
        check_subset(model, base.cfg.to_dict(), infos, excused, path=", ".join(map(str, paths)))
    if any(f.cfg.ekfac for _, f in files):
        notes.append("EK-FAC eigenvalues are not mergeable; the merged file is K-FAC: rerun the EK-FAC pass.")
    for note in notes:
        logger.warning("merge_files: %s", note)
    report.warnings.extend(notes)
    fisher = KFAC.from_sums(infos, sums, base.cfg.replace(ekfac=False), report=report)
    fisher.weights_fingerprint = weights
    merged_from = [
        {
            "path": str(p),
            "tokens": f.report.tokens,
            "loss_terms": f.report.loss_terms,
            "batches": f.report.batches,
            "empty_batches": f.report.empty_batches,
            "nonfinite_batches": [[b, ls] for b, ls in f.report.nonfinite_batches],
            "payload_sha256": f.meta.get("payload_sha256"),
            "ekfac": bool(f.cfg.ekfac),
        }
        for p, f in files
    ]
    sources = sorted({src for _, f in files for src in _sources(f.meta)})
    return save(
        fisher, out_path, model=model, include_sums=True, extra_meta={"merged_from": merged_from, "sources": sources}
    )
