"""Text data for the CLI: read files, tokenise, pack into fixed-length sequences and batch them (docs/concepts.md).

Sources (one or several, in the order given):

* a plain-text file (``.txt`` or any other suffix): one document;
* a JSON-lines file (``.jsonl`` / ``.json``): one document per line, from the field ``text_field``;
* a folder written by ``datasets.Dataset.save_to_disk`` (or a ``DatasetDict``, whose ``train`` split is used, else
  its first split): one document per row, from ``text_field``.

Documents of one source are tokenised without special tokens and joined with the tokenizer's EOS token; the token
stream of each source is cut into sequences of ``seq_len`` tokens (sequences never span two sources, so analyses of
disjoint sources merge exactly). The last, shorter sequence of a source is kept when it has at least two
tokens (one loss term). Sequences are grouped into batches of ``batch_size`` in order, right-padded, with an
``attention_mask``; padded positions carry no loss term and enter no factor (docs/concepts.md). At most ``max_tokens``
tokens are used in total; tokenisation stops as soon as they are reached.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import DataError

CHUNK_CHARS = 16_384  # plain text is tokenised in pieces of about this size, cut after a newline


def source_kind(path: Path) -> str:
    """``"hf_dataset"`` for a folder, ``"jsonl"`` for ``.jsonl`` / ``.json``, else ``"text"``."""
    if path.is_dir():
        return "hf_dataset"
    if path.suffix.lower() in (".jsonl", ".json"):
        return "jsonl"
    return "text"


def text_pieces(text: str, size: int = CHUNK_CHARS) -> Iterator[str]:
    """``text`` in consecutive pieces of about ``size`` characters, each ending after a newline when possible."""
    start = 0
    while start < len(text):
        stop = min(start + size, len(text))
        if stop < len(text):
            cut = text.rfind("\n", start, stop)
            if cut > start:
                stop = cut + 1
        yield text[start:stop]
        start = stop


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"Data file {path} is not UTF-8 text ({err.reason} at byte {err.start}).",
            hint="Convert it to UTF-8, or pass a .jsonl file or a saved datasets folder.",
        ) from err


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"Data file {path}, line {lineno}: not valid JSON ({err.msg}).",
                    hint="A .jsonl file has one JSON object per line.",
                ) from err
            if not isinstance(record, dict) or text_field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise DataError(
                    f"Data file {path}, line {lineno}: no field {text_field!r} (found {keys}).",
                    hint="Choose the field with --text-field.",
                )
            value = record[text_field]
            if not isinstance(value, str):
                raise DataError(f"Data file {path}, line {lineno}: field {text_field!r} is not a string.")
            yield value


def _dataset_documents(path: Path, text_field: str) -> Iterator[str]:
    try:
        import datasets  # noqa: PLC0415 (optional dependency, imported when used)
    except ImportError as err:
        raise DataError(
            f"{path} is a folder; reading a saved Hugging Face dataset needs the 'datasets' package.",
            hint="pip install 'kronfisher[hf]' (or pip install datasets).",
        ) from err
    try:
        ds: Any = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as err:
        raise DataError(
            f"Data folder {path} is not a dataset saved with save_to_disk ({err}).",
            hint="Pass .txt or .jsonl files, or a folder written by Dataset.save_to_disk.",
        ) from err
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else next(iter(ds))
        ds = ds[split]
    if text_field not in ds.column_names:
        raise DataError(
            f"Dataset {path} has no column {text_field!r} (columns: {ds.column_names}).",
            hint="Choose the column with --text-field.",
        )
    for value in ds[text_field]:
        if isinstance(value, str):
            yield value


def iter_documents(path: str | Path, text_field: str = "text") -> Iterator[Iterator[str]]:
    """Documents of one source, each as an iterator of text pieces (plain text is yielded in pieces).

    Raises:
        DataError: missing or unreadable source, missing text field.

    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"Data file {p} does not exist.", hint="Pass --data with a .txt, .jsonl or dataset folder.")
    kind = source_kind(p)
    if kind == "text":
        yield text_pieces(_read_text(p))
    elif kind == "jsonl":
        for doc in _jsonl_documents(p, text_field):
            yield iter((doc,))
    else:
        for doc in _dataset_documents(p, text_field):
            yield iter((doc,))


def tokenize_source(tokenizer: Any, path: str | Path, *, max_tokens: int | None, text_field: str = "text") -> list[int]:
    """Token ids of one source: documents joined by EOS, stopping once ``max_tokens`` ids are held."""
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for d, doc in enumerate(iter_documents(path, text_field)):
        if d > 0 and eos is not None:
            ids.append(int(eos))
        for piece in doc:
            if max_tokens is not None and len(ids) >= max_tokens:
                return ids[:max_tokens]
            ids.extend(int(i) for i in tokenizer(piece, add_special_tokens=False)["input_ids"])
        if max_tokens is not None and len(ids) >= max_tokens:
            return ids[:max_tokens]
    return ids


def pack(ids: Sequence[int], seq_len: int) -> list[Tensor]:
    """Cut a token stream into sequences of ``seq_len`` (the last one shorter, dropped below 2 tokens)."""
    out = []
    for start in range(0, len(ids), seq_len):
        chunk = ids[start : start + seq_len]
        if len(chunk) >= 2:
            out.append(torch.tensor(chunk, dtype=torch.long))
    return out


def batch_sequences(sequences: Sequence[Tensor], batch_size: int, pad_id: int) -> list[dict[str, Tensor]]:
    """Group sequences into right-padded batches with ``input_ids`` and ``attention_mask``."""
    batches = []
    for start in range(0, len(sequences), batch_size):
        group = sequences[start : start + batch_size]
        width = max(len(s) for s in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for i, s in enumerate(group):
            ids[i, : len(s)] = s
            mask[i, : len(s)] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


@dataclass
class TextBatches:
    """Batches built from text sources, with what the report needs to describe them.

    Attributes:
        batches: list of ``{"input_ids", "attention_mask"}`` (re-iterable, so EK-FAC can take a second pass).
        sources: per source ``{"path", "kind", "tokens", "sequences"}``.
        seq_len: sequence length.
        batch_size: sequences per batch.
        fingerprint: sha256 of the settings and every token id in order (identifies the data for resume).

    """

    batches: list[dict[str, Tensor]]
    sources: list[dict[str, Any]] = field(default_factory=list)
    seq_len: int = 0
    batch_size: int = 0
    fingerprint: str = ""

    @property
    def tokens(self) -> int:
        """Attended positions over all batches (``T``)."""
        return int(sum(int(b["attention_mask"].sum()) for b in self.batches))

    @property
    def num_sequences(self) -> int:
        """Number of sequences."""
        return int(sum(b["input_ids"].shape[0] for b in self.batches))

    def batch_tokens(self) -> list[int]:
        """Attended positions per batch."""
        return [int(b["attention_mask"].sum()) for b in self.batches]


def build_batches(
    tokenizer: Any,
    paths: Sequence[str | Path],
    *,
    seq_len: int,
    batch_size: int,
    max_tokens: int | None,
    text_field: str = "text",
) -> TextBatches:
    """Read, tokenise, pack and batch text sources (see the module docstring).

    Raises:
        DataError: bad settings, unreadable sources, or no sequence of at least two tokens.

    """
    if seq_len < 2:
        raise DataError(f"--seq-len must be at least 2, got {seq_len}.")
    if batch_size < 1:
        raise DataError(f"--batch-size must be at least 1, got {batch_size}.")
    if max_tokens is not None and max_tokens < 2:
        raise DataError(f"--max-tokens must be at least 2, got {max_tokens}.")
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    pad_id = int(pad) if pad is not None else 0
    digest = hashlib.sha256(f"seq_len={seq_len};batch_size={batch_size};".encode())
    sequences: list[Tensor] = []
    sources = []
    left = max_tokens
    for path in paths:
        if left is not None and left < 2:
            break
        ids = tokenize_source(tokenizer, path, max_tokens=left, text_field=text_field)
        seqs = pack(ids, seq_len)
        used = sum(len(s) for s in seqs)
        if left is not None:
            left -= len(ids)
        sources.append({"path": str(path), "kind": source_kind(Path(path)), "tokens": used, "sequences": len(seqs)})
        for s in seqs:
            digest.update(s.numpy().tobytes())
        digest.update(b"|")
        sequences.extend(seqs)
    if not sequences:
        raise DataError(
            f"No sequence of at least 2 tokens in {[str(p) for p in paths]}.",
            hint="Check that the files contain text (and --text-field for .jsonl / datasets).",
        )
    batches = batch_sequences(sequences, batch_size, pad_id)
    return TextBatches(batches, sources, seq_len, batch_size, digest.hexdigest())
