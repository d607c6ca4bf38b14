"""Shared fixtures: tiny transformer configs (random weights, no downloads) and batch builders.

Test cases are data: ``TINY_MODELS`` maps a name to a constructor; tests take the ``model_name`` fixture (every
architecture, or the ones a ``parametrize`` mark names) and cross it with options.

Layout: the tests of ``kronfisher/<pkg>/<module>.py`` are in ``tests/<pkg>/`` (``algebra``, ``collection``,
``decompose``, ``io``, ``drivers``, ``analysis``, ``cli``); top-level modules and package-wide checks (docs, README,
examples, import floors) have theirs here. Shared helpers live in this folder and are imported by name
(``conftest``, ``helpers_oracle``, ``distributed_helper``, ``placement_faults``, ``gguf_fixture``,
``test_cli_helpers``): the folders have no ``__init__.py`` (``tests/io`` must not shadow the standard ``io``), so
every test file's basename is unique across ``tests/``. A regression test is named after the bug it pins and sits
with the tests of the module it pins.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import nn

VOCAB = 40
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def bench_module(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` (its own imports of sibling benchmarks resolve from that folder)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


# Tiny matrices: one thread is 10-100x faster than two on a shared 2-core machine (LAPACK eigh and OpenMP spinning
# under oversubscription); tests measure numbers, not speed.
torch.set_num_threads(1)


def tiny_config(
    arch: str,
    *,
    attn: str | None = "eager",
    tie: bool = False,
    vocab: int = VOCAB,
    hidden: int = 16,
    special_id: int = 0,
    layers: int = 2,
) -> Any:
    """Config of a ``layers``-layer model: 'qwen2' (q/k/v biases, GQA), 'llama' (no biases, GQA), 'gpt2' (Conv1D
    layers, weight stored [in, out]) or 'neox' (fused query_key_value). ``attn=None`` keeps the library's default."""
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, Qwen2Config

    common: dict[str, Any] = {"vocab_size": vocab, "tie_word_embeddings": tie}
    if attn is not None:
        common["attn_implementation"] = attn
    if arch == "gpt2":
        drop = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
        ids = {"bos_token_id": special_id, "eos_token_id": special_id}
        return GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=64, **drop, **ids, **common)
    shape = {"hidden_size": hidden, "intermediate_size": 24, "num_hidden_layers": layers, "num_attention_heads": 4}
    shape["max_position_embeddings"] = 64
    if arch == "neox":
        ids = {"bos_token_id": special_id, "eos_token_id": special_id}
        return GPTNeoXConfig(hidden_dropout=0.0, attention_dropout=0.0, **ids, **shape, **common)
    cls = {"qwen2": Qwen2Config, "llama": LlamaConfig}[arch]
    return cls(num_key_value_heads=2, **shape, **common)


def _constructor(arch: str) -> Callable[..., nn.Module]:
    def build(attn: str = "eager", tie: bool = False, vocab: int = VOCAB) -> nn.Module:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_config(tiny_config(arch, attn=attn, tie=tie, vocab=vocab))

    return build


TINY_MODELS: dict[str, Callable[..., nn.Module]] = {
    arch: _constructor(arch) for arch in ("qwen2", "llama", "gpt2", "neox")
}
tiny_qwen2, tiny_llama, tiny_gpt2, tiny_neox = (TINY_MODELS[a] for a in ("qwen2", "llama", "gpt2", "neox"))


def make_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float64, **kw) -> nn.Module:
    """A tiny model with deterministic random weights, in ``dtype``, in eval mode."""
    torch.manual_seed(seed)
    model = TINY_MODELS[name](**kw).to(dtype)
    model.eval()
    return model


def random_ids(batch: int, seq: int, seed: int = 1, vocab: int = VOCAB) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def right_pad(seqs: list[torch.Tensor], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded batch (``attention_mask`` 0 on padding) of 1-D id tensors of different lengths."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(params=sorted(TINY_MODELS))
def model_name(request: pytest.FixtureRequest) -> str:
    """The model case of a test: a key of ``TINY_MODELS``, built with ``make_model(model_name, ...)``.

    A test that takes ``model_name`` runs on every tiny architecture (a new one in ``TINY_MODELS`` is covered at
    once); ``@pytest.mark.parametrize("model_name", [...])`` narrows it to some, and further ``parametrize`` marks
    cross the cases with options (approximation, granularity, attention, ...).
    """
    return request.param


class Flipping:
    """Re-iterable batches in their order on odd passes, reversed on even ones (a loader that shuffles per pass)."""

    def __init__(self, batches: list) -> None:
        self.batches, self.passes = batches, 0

    def __iter__(self):
        self.passes += 1
        return iter(self.batches if self.passes % 2 else self.batches[::-1])
