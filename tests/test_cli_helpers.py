"""Shared builders for the CLI / analysis tests: tiny saved models with a char-level tokenizer, and the
reference batching re-implemented independently of ``kronfisher.data``. No downloads.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from torch import nn

from conftest import tiny_config as conftest_tiny_config

VOCAB = 128  # > the char tokenizer's 103 entries


def char_tokenizer():
    """A character-level fast tokenizer (BPE without merges): one id per printable character."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, "<pad>": 2}
    for c in sorted(set(string.printable)):
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")


def tiny_config(arch: str, tie: bool = True, hidden: int = 16):
    """Config of a 2-layer model of ``arch`` (the shared conftest builder; char-tokenizer vocab, EOS id 1)."""
    return conftest_tiny_config(arch, attn=None, tie=tie, vocab=VOCAB, hidden=hidden, special_id=1)


def build_model(arch: str, seed: int = 0, tie: bool = True, hidden: int = 16) -> nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, tie, hidden))
    return model.eval()


def save_model(model: nn.Module, folder: Path) -> Path:
    """``save_pretrained`` of the model and the char tokenizer into ``folder``."""
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def load_saved(folder: Path, dtype: torch.dtype = torch.float64) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def model_tokenizer(folder: Path):
    """The tokenizer as ``AutoTokenizer`` loads it from a saved model folder (transformers may rebuild the saved
    char tokenizer with the architecture's own pre-tokenizer; the CLI must use exactly what it loads)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def reference_batches(
    folder: Path, texts: list[str], seq_len: int, batch_size: int, max_tokens: int | None = None, pad_id: int = 2
) -> list[dict[str, torch.Tensor]]:
    """What ``kronfisher analyze`` should feed the model, built by hand: each text is one source (plain-text
    file, one document), tokenised by the model's tokenizer without special tokens, truncated to the remaining
    token budget, cut into ``seq_len`` pieces (a last piece shorter than 2 dropped), grouped ``batch_size`` at a
    time with right padding (``pad_id``: the char tokenizer's ``<pad>``).
    """
    tok = model_tokenizer(folder)
    seqs = []
    left = max_tokens
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if left is not None:
            ids = ids[:left]
            left -= len(ids)
        for s in range(0, len(ids), seq_len):
            piece = ids[s : s + seq_len]
            if len(piece) >= 2:
                seqs.append(piece)
    batches = []
    for s in range(0, len(seqs), batch_size):
        group = seqs[s : s + batch_size]
        width = max(len(x) for x in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for i, x in enumerate(group):
            ids[i, : len(x)] = torch.tensor(x)
            mask[i, : len(x)] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


TEXT_A = (
    "It is a truth universally acknowledged, that a single man in possession\n"
    "of a good fortune, must be in want of a wife.\n\n"
    "However little known the feelings or views of such a man may be on his\n"
    "first entering a neighbourhood, this truth is so well fixed in the minds\n"
    "of the surrounding families, that he is considered the rightful property\n"
    "of some one or other of their daughters.\n"
)
TEXT_B = (
    '"My dear Mr. Bennet," said his lady to him one day, "have you heard that\n'
    'Netherfield Park is let at last?"\n\n'
    "Mr. Bennet replied that he had not.\n\n"
    '"But it is," returned she; "for Mrs. Long has just been here, and she\n'
    'told me all about it."\n'
)


def model_and_text(folder: Path) -> Path:
    """``folder`` with a saved tiny Qwen2 (``qwen/``) and ``a.txt``: what the CLI fault tests run on."""
    save_model(build_model("qwen2", seed=0), folder / "qwen")
    (folder / "a.txt").write_text(TEXT_A, encoding="utf-8")
    return folder
