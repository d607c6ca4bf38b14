"""GGUF loading (docs/files.md): the route of the embedded default model, tested on a tiny GGUF written at test time.

References, independent of the code under test:
* the weights and config of the seeded source model the file was written from (``gguf_fixture``);
* a byte-level BPE tokenizer built with ``tokenizers`` directly from the same vocabulary and merges;
* the same ``kronfisher analyze`` command run on a ``save_pretrained`` folder of the source model: the GGUF route
  must reproduce the folder route, which ``test_cli.py`` checks against dense references.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from gguf_fixture import EOS_ID, PAD_ID, SPECIAL_TOKENS, TinyGGUF, byte_level_vocab, make_tiny_gguf
from kronfisher.cli import main
from kronfisher.models import load_model

SENTENCE = "It is a truth universally acknowledged, that the man was in want of a wife (1813).\nCafé!"
TEXT = (
    "It is a truth universally acknowledged, that a single man in possession\n"
    "of a good fortune, must be in want of a wife.\n\n"
    "However little known the feelings or views of such a man may be on his\n"
    "first entering a neighbourhood, this truth is so well fixed in the minds\n"
    "of the surrounding families, that he is considered the rightful property\n"
    "of some one or other of their daughters. Caf\u00e9 au lait.\n"
)
ANALYZE = ["--seq-len", "32", "--batch-size", "4", "--max-tokens", "all", "--dtype", "float64"]
ANALYZE += [
    "--accumulate-dtype",
    "float64",
    "--lowrank-threshold",
    "64",
    "--lowrank-layers",
    "lm_head",
    "--damping",
    "0.01",
]
ANALYZE += ["--no-plots", "--quiet", "--max-memory", "8GiB"]  # the report records the budget, not the free memory


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyGGUF:
    """Tied F32 GGUF (like the default SmolLM2: tied head, byte-level BPE) and its save_pretrained folder."""
    return make_tiny_gguf(tmp_path_factory.mktemp("gguf"), seed=0, tie=True)


@pytest.mark.parametrize(("tie", "f16"), [(True, False), (False, True)], ids=["tied-f32", "untied-f16"])
def test_load_model_returns_the_source_weights_config_and_tokenizer(tmp_path: Path, tie: bool, f16: bool) -> None:
    fx = make_tiny_gguf(tmp_path, seed=3, tie=tie, f16=f16)
    lm = load_model(str(fx.gguf_path), device="cpu", quiet=True)
    assert lm.source.kind == "gguf" and lm.source.gguf_file == "tiny.gguf"
    model, source = lm.model, fx.model

    # Weights: exact. F32 is stored as is; for F16 the source was rounded to float16 first and F16 -> float32 is
    # exact. A missing q/k row permutation, a swapped norm or a wrong tie would each break equality.
    got = dict(model.named_parameters())
    want = dict(source.named_parameters())
    assert sorted(got) == sorted(want)
    for name, p in want.items():
        assert got[name].dtype == torch.float32, name
        assert torch.equal(got[name], p), name
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie

    # Config read back from the GGUF metadata: every field the forward pass depends on.
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        assert getattr(model.config, key) == getattr(source.config, key), key
    for key in ("num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "eos_token_id"):
        assert getattr(model.config, key) == getattr(source.config, key), key
    assert model.config.rope_parameters["rope_theta"] == source.config.rope_parameters["rope_theta"]
    ids = torch.randint(0, source.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # same weights and config in float32: equal up to kernel rounding (tolerance 1e-6 absolute and relative)
        torch.testing.assert_close(model(ids).logits, source(ids).logits, rtol=1e-6, atol=1e-6)

    # Tokenizer rebuilt from the GGUF metadata: same ids as the independent reference, merges applied, lossless.
    from gguf_fixture import reference_tokenizer

    tok, ref = lm.tokenizer, reference_tokenizer()
    enc = tok(SENTENCE, add_special_tokens=False)["input_ids"]
    assert enc == ref(SENTENCE, add_special_tokens=False)["input_ids"]
    assert len(enc) < len(SENTENCE.encode("utf-8"))  # some of the merges were used
    assert tok.decode(enc) == SENTENCE
    tokens, _ = byte_level_vocab()
    assert tok(" the and", add_special_tokens=False)["input_ids"] == [tokens.index("Ġthe"), tokens.index("Ġand")]
    assert tok.eos_token_id == EOS_ID and tok.pad_token_id == PAD_ID
    assert tok(SPECIAL_TOKENS[0] + "a", add_special_tokens=False)["input_ids"] == [EOS_ID, tokens.index("a")]


def _assert_same_numbers(a: Any, b: Any, where: str) -> None:
    """Recursive equality of two JSON values, numbers within rel 1e-10 (see the caller for why)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), where
        for k in a:
            _assert_same_numbers(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_numbers(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and not isinstance(a, bool):
        assert isinstance(b, float) and math.isclose(a, b, rel_tol=1e-10, abs_tol=1e-12), (where, a, b)
    else:
        assert a == b, (where, a, b)


def test_analyze_on_the_gguf_equals_analyze_on_the_saved_folder(tiny: TinyGGUF, tmp_path: Path) -> None:
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    reports = {}
    for route, model in (("gguf", tiny.gguf_path), ("folder", tiny.folder)):
        out = tmp_path / route
        argv = ["analyze", "--model", str(model), "--data", str(text), *ANALYZE, "--output-dir", str(out)]
        assert main(argv) == 0, route
        reports[route] = (out, json.loads((out / "report.json").read_text()))
    (g_out, g), (f_out, f) = reports["gguf"], reports["folder"]
    gm, fm = g["models"][0], f["models"][0]
    assert gm["kind"] == "gguf" and fm["kind"] == "folder"
    assert gm["model_class"] == "LlamaForCausalLM" and len(gm["layers"]) == 15  # 7 per block x 2 + lm_head
    assert gm["layers"]["lm_head"]["representation"] == "lowrank"  # named, as SmolLM2's is by the plan
    assert gm["layers"]["lm_head"]["tied_with"] == ["model.embed_tokens.weight"]
    assert g["data"]["tokens"] == f["data"]["tokens"] > 200
    assert g["data"]["fingerprint_sha256"] == f["data"]["fingerprint_sha256"]  # same tokens, same batches

    # A float64 run on bit-identical weights and batches performs the same arithmetic in both routes, so the
    # numbers should agree exactly; rel 1e-10 only leaves room for a different reduction order.
    for key in ("layers", "loss", "perplexity", "loss_terms", "tokens", "totals", "collection"):
        _assert_same_numbers(gm[key], fm[key], key)
    g_factors, f_factors = load_file(g_out / gm["factor_file"]), load_file(f_out / fm["factor_file"])
    assert sorted(g_factors) == sorted(f_factors)
    for name, t in f_factors.items():
        torch.testing.assert_close(g_factors[name], t, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("damage", ["not-gguf", "truncated-header", "truncated-tensors", "empty"])
def test_a_damaged_gguf_is_one_readable_error_naming_the_file(
    tiny: TinyGGUF, tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    data = tiny.gguf_path.read_bytes()
    content = {
        "not-gguf": b"this is a text file, not a model\n" * 8,
        "truncated-header": data[:100],  # inside the metadata: struct.error in the reader
        "truncated-tensors": data[: len(data) // 2],  # metadata intact, tensor data cut
        "empty": b"",
    }[damage]
    bad = tmp_path / f"{damage}.gguf"
    bad.write_bytes(content)
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    capsys.readouterr()
    rc = main(["analyze", "--model", str(bad), "--data", str(text), "--output-dir", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 2 and lines[0].startswith("kronfisher: error: ") and lines[1].startswith("hint: "), err
    assert str(bad) in lines[0]
    assert "truncated" in lines[1]
