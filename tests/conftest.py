"""Shared fixtures: tiny transformer configs (random weights, no downloads) and batch builders.

Test cases are data: ``TINY_MODELS`` maps a name to a constructor; tests cross them with options.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

VOCAB = 40

# Tiny matrices: one thread is 10-100x faster than two on a shared 2-core machine (LAPACK eigh and OpenMP spinning
# under oversubscription); tests measure numbers, not speed.
torch.set_num_threads(1)


def tiny_qwen2(attn: str = "eager", tie: bool = False, vocab: int = VOCAB) -> nn.Module:
    """Qwen2 (q/k/v have biases), 2 layers, GQA."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        attn_implementation=attn,
    )
    return Qwen2ForCausalLM(cfg)


def tiny_llama(attn: str = "eager", tie: bool = False, vocab: int = VOCAB) -> nn.Module:
    """Llama without biases, 2 layers, GQA."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(cfg)


def tiny_gpt2(attn: str = "eager", tie: bool = False, vocab: int = VOCAB) -> nn.Module:
    """GPT-2 (Conv1D layers, weight stored [in, out]), 2 layers."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=vocab,
        n_embd=16,
        n_layer=2,
        n_head=4,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=tie,
        attn_implementation=attn,
    )
    return GPT2LMHeadModel(cfg)


def tiny_neox(attn: str = "eager", tie: bool = False, vocab: int = VOCAB) -> nn.Module:
    """GPT-NeoX (fused query_key_value), 2 layers."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        attn_implementation=attn,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPTNeoXForCausalLM(cfg)


TINY_MODELS: dict[str, Callable[..., nn.Module]] = {
    "qwen2": tiny_qwen2,
    "llama": tiny_llama,
    "gpt2": tiny_gpt2,
    "neox": tiny_neox,
}


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
    return request.param
