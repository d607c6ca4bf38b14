"""Factor files: save, lazy load, raw sums for resume and merge, inspection (docs/files.md).

Files are safetensors plus JSON metadata (format and library version, config, per-layer representation, shapes,
token counts, a model fingerprint and checksums; see :mod:`kronfisher.io.format`). Never pickle; model weights are
never stored. Two kinds of file share the format:

* ``"kfac"`` (:func:`save`, :meth:`KFAC.save`): decomposed blocks per layer (eigenbases of ``A`` and ``G``, a thin
  ``G`` with its tail for low-rank layers, EK-FAC eigenvalues) and, by default, the raw sums.
* ``"sums"`` (:func:`save_sums`): raw sums and counts only, written during collection so that it can resume and
  so that files from disjoint data merge exactly by adding sums and counts (:func:`merge_files`).

:func:`load` reads only the header; each layer's tensors are read (and checksum-verified) on first access.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..algebra.block import KronBlock, block_summary
from ..algebra.columns import ColumnStore, Residence
from ..algebra.eigen import Eigen
from ..algebra.lowrank import LowRankEigen
from ..collection import placement
from ..errors import FileFormatError
from ..layers import LayerInfo
from ..operator import KFAC
from .fingerprint import check_model
from .format import Header, Payload, Rows, read_header, read_tensors, verify_payload
from .lazy import LazyLayers
from .sums import (
    PathLike,
    base_meta,
    config_from_header,
    infos_from_header,
    read_layer_sums,
    report_from_dict,
    sums_meta,
    write_file,
)

__all__ = [
    "LoadedKFAC",
    "inspect_file",
    "load",
    "read_metadata",
    "save",
    "verify_file",
]


logger = logging.getLogger("kronfisher")


# Decomposed factors ---------------------------------------------------------------------------------------------
def save(
    fisher: KFAC,
    path: PathLike,
    *,
    model: nn.Module | None = None,
    include_sums: bool = False,
    extra_meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write a :class:`KFAC` to a safetensors file with JSON metadata, atomically (docs/files.md).

    Args:
        fisher: the operator (K-FAC or EK-FAC; dense and low-rank layers).
        path: destination (``.safetensors``).
        model: when given, checked against the layer shapes, described in the metadata, and a digest of a sample
            of its weights stored (the weights themselves never are). Default: the weight digests the operator was
            loaded or merged with, else the model :func:`~kronfisher.fit` attached.
        include_sums: also store the raw sums (about doubles the file), so that the file can be merged with files
            from disjoint data (:func:`kronfisher.merge_files`). Off by default: the blocks alone serve every
            operator, and collection checkpoints keep their own sums (docs/files.md).
        extra_meta: JSON-serialisable data for the caller.

    Returns:
        The written path.

    """
    blocks = {n: fisher.block(n) for n in fisher.layer_names}
    infos = {n: fisher.infos[n] for n in blocks}
    if model is None and fisher.weights_fingerprint is None:  # weight digests from the model fit() attached
        model = fisher.attached_model
    meta = base_meta("kfac", fisher.cfg, infos, fisher.report, model, extra_meta, weights=fisher.weights_fingerprint)
    payload = Payload()
    bmeta, rows = {}, {}
    for name, b in blocks.items():
        info = infos[name]
        entry: dict[str, Any] = {"representation": b.representation, "tokens": dict(b.tokens)}
        for which, eig in (("A", b.A), ("G", b.G)):
            entry[which] = _eigen_meta(payload, f"block:{name}:{which}", eig)
        for which in ("corrected", "corrected_tail"):
            t = getattr(b, which)
            entry[which] = None if t is None else payload.add(f"block:{name}:{which}", t)
        bmeta[name] = entry
        rows[name] = block_summary(info, b)
    meta["blocks"] = bmeta
    meta["layers"] = rows
    if include_sums and fisher.sums is not None:
        kept = {n: s for n, s in fisher.sums.items() if n in infos}
        dropped = [n for n, s in fisher.sums.items() if n not in infos and (s.A.count > 0 or s.G.count > 0)]
        if dropped:  # a layer with A but no G tokens (or vice versa) has no block and no LayerInfo in the operator
            logger.warning("save: sums of layers without a block are not stored: %s", dropped)
        meta["sums"] = sums_meta(payload, kept)
        meta["sums_not_stored"] = dropped
    return write_file(path, payload, meta)


def _eigen_meta(payload: Payload, prefix: str, eig: Any) -> dict[str, Any]:
    """Store an eigenbasis: explicit ``Q`` (``Eigen``) or, for an implicit low-rank ``P = W C``, ``W`` and ``C``.

    The implicit form (:class:`~kronfisher.algebra.lowrank.LowRankEigen`) is stored as it is held: ``W`` token-major
    in its storage dtype (the same bytes as the raw low-rank sum, so the payload keeps one copy; its per-batch chunks
    are written in turn, not concatenated) and ``C``; building ``P`` (``out × r``) is never needed.
    """
    meta: dict[str, Any] = {"tail": float(eig.tail), "values": payload.add(f"{prefix}.values", eig.values)}
    if eig.kind == "lowrank":
        chunks = tuple(eig.columns.chunks)
        # several chunks (one per batch) are written one after the other, never concatenated (a copy of W)
        cols: Tensor | Rows = (
            Rows(chunks) if len(chunks) > 1 else chunks[0] if chunks else eig.coeffs.new_zeros(0, eig.dim)
        )
        meta.update(
            form="implicit",
            dim=int(eig.dim),
            columns=payload.add(f"{prefix}.columns", cols),
            coeffs=payload.add(f"{prefix}.coeffs", eig.coeffs),
            discarded=float(getattr(eig, "discarded", 0.0)),
        )
    else:
        meta.update(form="explicit", vectors=payload.add(f"{prefix}.vectors", eig.vectors))
    return meta


def _eigen_keys(em: Mapping[str, Any]) -> tuple[str, ...]:
    if em.get("form") == "implicit":
        return (em["columns"], em["coeffs"], em["values"])
    return (em["vectors"], em["values"])


class _BlockReader:
    """Reads one layer's block on demand; eigenbases stored once (shared ``A``) are loaded once and shared."""

    def __init__(self, header: Header, infos: Mapping[str, LayerInfo], device: torch.device | str) -> None:
        self.header = header
        self.infos = infos
        self.device = torch.device(device)
        # weak: an eigenbasis shared by layers (one A) is read once while any of them holds it, and freed with them
        self._eigen: weakref.WeakValueDictionary[tuple[str, ...], Any] = weakref.WeakValueDictionary()

    def _build(self, em: Mapping[str, Any], read: Mapping[str, Tensor]) -> Any:
        if em.get("form") == "implicit":
            # U stays in host memory; on an accelerator its products stream through the device (docs/gpu.md).
            residence = Residence(self.device, streamed=True) if placement.is_accelerator(self.device) else None
            cols = ColumnStore([read[em["columns"]]], int(em["dim"]), residence)
            coeffs, values = read[em["coeffs"]].to(cols.device), read[em["values"]].to(cols.device)
            return LowRankEigen(cols, coeffs, values, float(em["tail"]), em["discarded"])
        return Eigen(read[em["vectors"]].to(self.device), read[em["values"]].to(self.device), float(em["tail"]))

    def __call__(self, name: str) -> KronBlock:
        bm = self.header.meta["blocks"][name]
        keys = [k for w in ("A", "G") if _eigen_keys(bm[w]) not in self._eigen for k in _eigen_keys(bm[w])]
        keys += [bm[k] for k in ("corrected", "corrected_tail") if bm[k] is not None]
        read = read_tensors(self.header, dict.fromkeys(keys))
        eig = {}
        for which in ("A", "G"):
            sig = _eigen_keys(bm[which])
            held = self._eigen.get(sig)
            if held is None:
                if not set(_eigen_keys(bm[which])) <= set(read):  # freed since the key list was made
                    read.update(read_tensors(self.header, _eigen_keys(bm[which])))
                held = self._build(bm[which], read)
                self._eigen[sig] = held
            eig[which] = held
        info = self.infos[name]
        a, g = eig["A"], eig["G"]
        thin_a = a.rank < a.dim and g.full  # A seen on fewer tokens than its size (one thin side per block)
        if a.dim != info.a_dim or (a.rank != a.dim and not thin_a) or g.dim != info.out_features:
            raise FileFormatError(
                f"Factor file {self.header.path}: layer {name!r} has eigenbases A [{a.dim}, {a.rank}] / "
                f"G [{g.dim}, {g.rank}], which do not fit [out={info.out_features}, a_dim={info.a_dim}]."
            )
        corrected, tail = (
            None if bm[k] is None else read[bm[k]].to(self.device) for k in ("corrected", "corrected_tail")
        )
        return KronBlock(a, g, corrected, tail, tokens=dict(bm["tokens"]))


def block_bytes(block: KronBlock) -> int:
    """Bytes of a block's tensors (eigenvectors or low-rank columns and coefficients, values, EK-FAC values)."""
    tensors = [block.corrected, block.corrected_tail]
    for eig in (block.A, block.G):
        tensors.append(eig.values)
        if eig.kind == "lowrank":
            tensors += [eig.coeffs, *eig.columns.chunks]
        else:
            tensors.append(eig.vectors)
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class LoadedKFAC(KFAC):
    """A :class:`KFAC` read from a file: blocks load per layer on first use (docs/files.md).

    Only ``repr`` differs from :class:`KFAC`: it describes layers that are not loaded yet from the file's metadata
    (which describes exactly the file's tensors), so printing a loaded operator reads no tensor.
    """

    def __init__(self, *args: Any, rows: Mapping[str, Mapping[str, Any]], path: Path, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.path = path
        self._rows = rows

    def __repr__(self) -> str:
        blocks = self._blocks
        loaded = set(blocks.loaded) if isinstance(blocks, LazyLayers) else set(blocks)
        reps: dict[str, int] = {}
        ekfac = True
        for name in self.layer_names:
            if name in loaded:
                b = blocks[name]
                rep, is_ek = b.representation, b.is_ekfac
            else:
                rep, is_ek = self._rows[name]["representation"], bool(self._rows[name]["ekfac"])
            reps[rep] = reps.get(rep, 0) + 1
            ekfac = ekfac and is_ek
        kind = "EK-FAC" if ekfac and reps else "K-FAC"
        return f"KFAC({kind}, layers={len(self.layer_names)}, representations={reps}, file={str(self.path)!r})"


def load(
    path: PathLike,
    *,
    model: nn.Module | None = None,
    device: torch.device | str = "cpu",
    verify: bool = False,
    allow_subset: bool = False,
    keep_bytes: int | None = None,
) -> KFAC:
    """Load a factor file (docs/files.md). Layers load lazily: each layer's tensors are read on first use.

    Args:
        path: a file written by :func:`save` (or :func:`save_sums`, which is then decomposed here, eagerly).
        model: when given, every layer of the file must exist in it with the same ``[out, in, has_bias]`` and the
            same weights (a digest of a strided sample of each layer's values; files written before the digests
            existed are checked on shapes only), and the file must cover every layer of the model that its
            include/exclude selection tracks (:class:`FingerprintError` lists the layers); the model is attached
            for :meth:`KFAC.natural_gradient`.
        device: where the tensors go when they are read.
        verify: read every tensor now and check the payload checksum (otherwise each tensor is checked when read).
        allow_subset: accept a model with more tracked layers than the file (natural gradients then cover the
            file's layers only).
        keep_bytes: hold at most this many bytes of loaded blocks; the least recently used are dropped and read
            again when needed (an operator larger than memory, used one layer at a time). None: keep every block
            once read.

    Raises:
        FileFormatError: truncated, corrupted or unsupported file (the message names the file).
        FingerprintError: the model does not match.

    """
    header = read_header(path)
    if verify:
        verify_payload(header)
    cfg = config_from_header(header)
    infos = infos_from_header(header)
    if model is not None:
        check_model(header.meta, model, path=header.path, allow_subset=allow_subset)
    report = report_from_dict(header.meta.get("report", {}))
    if header.meta.get("kind") == "sums":
        sums = {n: read_layer_sums(header, n, cfg, device) for n in header.meta["sums"]}
        fisher = KFAC.from_sums(infos, sums, cfg, report=report, model=model)
        fisher.weights_fingerprint = header.meta.get("weights")
        return fisher
    if header.meta.get("kind") != "kfac":
        raise FileFormatError(f"Factor file {header.path}: unknown kind {header.meta.get('kind')!r}.")
    names = list(header.meta["blocks"])
    reader = _BlockReader(header, infos, device)
    blocks: LazyLayers[KronBlock] = LazyLayers(names, reader, limit=keep_bytes, size=block_bytes)
    sums = None
    if header.meta.get("sums"):
        sums = LazyLayers(header.meta["sums"], lambda n: read_layer_sums(header, n, cfg, device))
    fisher = LoadedKFAC(
        {n: infos[n] for n in names},
        blocks,  # type: ignore[arg-type]
        cfg,
        sums=sums,  # type: ignore[arg-type]
        report=report,
        model=model,
        rows=header.meta["layers"],
        path=header.path,
    )
    fisher.weights_fingerprint = header.meta.get("weights")
    return fisher


def verify_file(path: PathLike) -> dict[str, Any]:
    """Check every byte of a factor file (header, metadata and all tensor checksums); return its metadata."""
    header = read_header(path)
    verify_payload(header)
    return header.meta


def read_metadata(path: PathLike) -> dict[str, Any]:
    """The checked JSON metadata of a factor file, without reading any tensor."""
    return read_header(path).meta


def ekfac_status(meta: Mapping[str, Any]) -> str:
    """Whether every layer of a file holds EK-FAC eigenvalues (``kronfisher inspect``'s ``ekfac=``).

    ``"True"``, or ``"False"`` followed by the reason when the configuration (or an input of a merge) asked for
    EK-FAC: merged files are K-FAC, sums files hold no eigenvalues.
    """
    rows = list(meta.get("layers", {}).values())
    held = bool(rows) and all(r.get("ekfac") for r in rows)
    merged = (meta.get("extra") or {}).get("merged_from") or []
    asked = bool((meta.get("config") or {}).get("ekfac")) or any(m.get("ekfac") for m in merged)
    if held or not asked:
        return str(held)
    if merged:
        return "False (merged: EK-FAC eigenvalues are not mergeable; rerun the EK-FAC pass on the merged factors)"
    if meta.get("kind") == "sums":
        return "False (raw sums only; EK-FAC eigenvalues come after the decomposition)"
    return "False (K-FAC blocks; the EK-FAC pass did not run)"


def inspect_file(path: PathLike) -> list[dict[str, Any]]:
    """Per-layer summary from the header only: name, representation, in, out, T, N, trace_A, trace_G, and more."""
    meta = read_header(path).meta
    return [{"name": name, **row} for name, row in meta["layers"].items()]
