"""A tiny Llama GGUF file written at test time, and the saved folder it must behave like (docs/files.md; no downloads).

The default model of ``kronfisher analyze`` is a GGUF file (SmolLM2-135M-Instruct, a Llama with a byte-level BPE
vocabulary). This module writes a file of the same kind, small enough for a unit test, with ``gguf.GGUFWriter``:

* **weights**: a seeded random ``LlamaForCausalLM`` (2 layers, grouped-query attention), its HF parameter names
  turned into llama.cpp's (``blk.N.attn_q.weight`` ...) with ``gguf``'s own name table, which is also what
  transformers inverts when it reads the file. llama.cpp stores the rows of ``q_proj`` / ``k_proj`` in another
  order (rotary pairs interleaved per head, not split in halves); we apply that permutation here, transformers
  undoes it on load. Tensors are F32 (exact) or F16 for 2-D weights with F32 norms (llama.cpp's ``MOSTLY_F16``).
  A tied model has no ``output.weight``: that absence is how a GGUF says the head is the embedding.
* **tokenizer**: ``tokenizer.ggml.model = "gpt2"`` (byte-level BPE), two control tokens, the 256 byte symbols of
  GPT-2's byte alphabet and a few dozen hand-written merges, with token types and bos / eos / padding ids.
* **reference folder**: the same model through ``save_pretrained`` and an independently built byte-level BPE
  tokenizer (``tokenizers`` directly, not transformers' GGUF converter), so a test can ask that the GGUF route and
  the folder route give the same analysis.

Model configs are chosen so that nothing is rounded by GGUF's float32 metadata (``rms_norm_eps = 2**-20``,
``rope_theta = 10000``): the two routes then build bit-identical models.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>")  # ids 0 (bos = eos) and 1 (padding)
BOS_ID = EOS_ID = 0
PAD_ID = 1

# Merges of the byte-level BPE, best first, spelled in the byte alphabet (``Ġ`` is the space byte). Each one must
# join two tokens already in the vocabulary; ``byte_level_vocab`` checks that.
MERGES = (
    "Ġ t",
    "h e",
    "Ġt he",
    "Ġ a",
    "i n",
    "e r",
    "o n",
    "Ġ s",
    "Ġ w",
    "Ġ o",
    "r e",
    "a n",
    "n d",
    "Ġa nd",
    "o u",
    "Ġ h",
    "Ġ m",
    "Ġ b",
    "Ġ f",
    "e d",
    "i s",
    "Ġ i",
    "Ġo f",
    "in g",
    "Ġ c",
    "Ġ p",
    "l l",
    "Ġt o",
    "a t",
    "e n",
    "Ġi n",
    "Ġ is",
    "Ġh e",
    "a s",
    "Ġw as",
)

HIDDEN, HEADS, KV_HEADS, LAYERS, INTERMEDIATE, CONTEXT = 32, 4, 2, 2, 48, 128
RMS_EPS = 2.0**-20  # exactly representable in float32, as GGUF metadata stores it
ROPE_THETA = 10000.0


def byte_alphabet() -> list[str]:
    """GPT-2's printable spelling of the 256 byte values, indexed by byte (Radford et al. 2019, ``encoder.py``).

    Bytes that are printable Latin-1 characters keep their character; the other 68 (controls, space, ...) are
    spelled with the code points from 256 on, in byte order, so that every byte is one visible character.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    kept = set(keep)
    spelling: list[str] = []
    extra = 0
    for byte in range(256):
        if byte in kept:
            spelling.append(chr(byte))
        else:
            spelling.append(chr(256 + extra))
            extra += 1
    return spelling


def byte_level_vocab() -> tuple[list[str], list[str]]:
    """``(tokens, merges)``: the special tokens, the 256 byte symbols, then one token per merge.

    Raises:
        ValueError: a merge joins a token that is not (yet) in the vocabulary.

    """
    tokens = [*SPECIAL_TOKENS, *byte_alphabet()]
    known = set(tokens)
    for merge in MERGES:
        left, right = merge.split(" ")
        if left not in known or right not in known:
            raise ValueError(f"Merge {merge!r} joins a token missing from the vocabulary.")
        if left + right not in known:
            tokens.append(left + right)
            known.add(left + right)
    return tokens, list(MERGES)


def reference_tokenizer() -> Any:
    """The byte-level BPE tokenizer, built with ``tokenizers`` itself (independent of transformers' GGUF reader)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens, merges = byte_level_vocab()
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ")) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    eos, pad = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=eos, eos_token=eos, pad_token=pad, additional_special_tokens=[pad]
    )


def tiny_llama(seed: int = 0, tie: bool = True) -> nn.Module:
    """A seeded random 2-layer Llama (GQA: 4 query heads, 2 key/value heads) over the fixture vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokens, _ = byte_level_vocab()
    config = LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HIDDEN // HEADS,
        max_position_embeddings=CONTEXT,
        rms_norm_eps=RMS_EPS,
        rope_theta=ROPE_THETA,
        tie_word_embeddings=tie,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # RMSNorm weights start at 1: make them random too, so a mix-up of norms shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model.float().eval()


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """The row order llama.cpp's converter writes ``q_proj`` / ``k_proj`` in.

    HF Llama rotates the two halves of each head's dimensions against each other (``rotate_half``); llama.cpp
    rotates adjacent pairs. Per head, the rows ``[h_0 .. h_{d/2-1}, h_{d/2} .. h_{d-1}]`` are written as
    ``[h_0, h_{d/2}, h_1, h_{d/2+1}, ...]``. ``heads`` is the number of heads the matrix produces (query heads
    for q, key/value heads for k).
    """
    rows = weight.shape[0]
    half = rows // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_tensors(model: nn.Module, f16: bool = False) -> dict[str, np.ndarray]:
    """The model's parameters under llama.cpp's names and layout (``gguf``'s Llama name table).

    Raises:
        KeyError: a parameter ``gguf`` has no llama.cpp name for.

    """
    import gguf

    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    out: dict[str, np.ndarray] = {}
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # a GGUF without output.weight is read as tied
        stem, suffix = hf_name.rsplit(".", 1)
        mapped = names.get_name(stem)
        if mapped is None:
            raise KeyError(f"No GGUF name for parameter {hf_name!r} of a Llama.")
        array = tensor.detach().to(torch.float32).cpu().numpy().copy()
        if stem.endswith("self_attn.q_proj"):
            array = llama_cpp_permute(array, cfg.num_attention_heads)
        elif stem.endswith("self_attn.k_proj"):
            array = llama_cpp_permute(array, cfg.num_key_value_heads)
        if f16 and array.ndim == 2:  # llama.cpp's MOSTLY_F16 keeps 1-D tensors (norms) in F32
            array = array.astype(np.float16)
        out[f"{mapped}.{suffix}"] = np.ascontiguousarray(array)
    return out


def write_llama_gguf(model: nn.Module, path: Path, f16: bool = False) -> Path:
    """Write ``model`` (a ``LlamaForCausalLM`` over the fixture vocabulary) and the tokenizer as a GGUF file."""
    import gguf

    cfg = model.config
    tokens, merges = byte_level_vocab()
    if cfg.vocab_size != len(tokens):
        raise ValueError(f"Model vocabulary {cfg.vocab_size} != fixture tokenizer's {len(tokens)} tokens.")
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_name("kronfisher tiny llama")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    control = set(SPECIAL_TOKENS)
    writer.add_token_types([gguf.TokenType.CONTROL if t in control else gguf.TokenType.NORMAL for t in tokens])
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_pad_token_id(PAD_ID)
    writer.add_add_bos_token(False)
    for name, array in gguf_tensors(model, f16=f16).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@dataclass
class TinyGGUF:
    """A written fixture: the GGUF file, the folder of the same model, and the source model (float32)."""

    gguf_path: Path
    folder: Path
    model: nn.Module


def make_tiny_gguf(directory: Path, *, seed: int = 0, tie: bool = True, f16: bool = False) -> TinyGGUF:
    """Write ``tiny.gguf`` and ``folder/`` (``save_pretrained`` + the reference tokenizer) into ``directory``.

    With ``f16`` the source model's 2-D weights are first rounded to float16, so that both routes hold the same
    numbers (F16 -> float32 is exact).
    """
    directory.mkdir(parents=True, exist_ok=True)
    model = tiny_llama(seed=seed, tie=tie)
    if f16:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.copy_(p.half().float())
    path = write_llama_gguf(model, directory / "tiny.gguf", f16=f16)
    folder = directory / "folder"
    model.save_pretrained(folder)
    reference_tokenizer().save_pretrained(folder)
    return TinyGGUF(path, folder, model)
