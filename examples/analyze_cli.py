"""``kronfisher analyze`` on a base model and its fine-tune, end to end, then ``inspect`` and ``--resume``.

Two tiny Llama models (a base and a copy whose MLPs were perturbed) are saved with ``save_pretrained`` next to a
character-level tokenizer; the command analyses both on a text file and compares the second with the first. A second
run with ``--resume`` reuses the finished factor files instead of recomputing them. See docs/cli.md and
docs/compare-models.md. Runs in a few seconds on CPU (no download).
"""

from __future__ import annotations

import copy
import json
import string
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from kronfisher.cli import main as kronfisher_command

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune must be in want of "
    "a wife. "
)


def char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<eos>": 1, "<pad>": 2}
    for c in sorted(set(string.printable)):
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")


def save_models(folder: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=1,
    )  # fmt: skip
    base = LlamaForCausalLM(cfg)
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if ".mlp." in name:  # the "fine-tune" changed only the MLPs
                p.add_(0.01 * torch.randn_like(p))
    for model, sub in ((base, "base"), (tuned, "tuned")):
        model.save_pretrained(folder / sub)
        char_tokenizer().save_pretrained(folder / sub)
    return folder / "base", folder / "tuned"


def main(folder: str | None = None, plots: bool = True) -> dict[str, object]:
    work = Path(folder or tempfile.mkdtemp())
    base, tuned = save_models(work)
    (work / "text.txt").write_text(TEXT * 12)
    out = work / "results"
    args = ["analyze", "--model", str(base), "--model", str(tuned), "--data", str(work / "text.txt")]
    args += ["--output-dir", str(out), "--seq-len", "64", "--batch-size", "4", "--max-tokens", "1024", "--quiet"]
    args += [] if plots else ["--no-plots"]
    assert kronfisher_command(args) == 0
    report = json.loads((out / "report.json").read_text())
    factor_file = out / report["models"][0]["factor_file"]
    assert kronfisher_command(["inspect", str(factor_file)]) == 0
    assert kronfisher_command([*args, "--resume"]) == 0  # factor files are complete: reused, not recomputed
    comparison = report["comparisons"][0]
    result = {
        "loss_base": report["models"][0]["loss"],
        "loss_tuned": report["models"][1]["loss"],
        "quadratic_form": {n: r["quadratic_form"] for n, r in comparison["layers"].items()},
        "overlap_A": {n: r["overlap_A"] for n, r in comparison["layers"].items()},
        "plots": [p["file"] for p in report["plots"]],
        "report_html": str(out / "report.html"),
    }
    worst = max(result["quadratic_form"], key=result["quadratic_form"].get)
    print(f"loss: base {result['loss_base']:.4f}, tuned {result['loss_tuned']:.4f}; largest ½ΔθᵀFΔθ in {worst}")
    print(f"report: {result['report_html']} ({len(result['plots'])} plots)")
    return result


if __name__ == "__main__":
    main()
