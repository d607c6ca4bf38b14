"""Memory of the report's analysis after the fit (``kronfisher analyze``): gradient pass, natural gradients, metrics.

A Qwen2.5-shaped model scaled down (``--hidden``, ``--inter``, ``--layers``, ``--vocab``; tied lm_head, q/k/v
biases, float32 random weights) is saved with ``save_pretrained`` and analysed by ``kronfisher.analysis.analyze``
(K-FAC, no plots, no factor file). ``VmHWM`` is reset just before the gradient pass, read and reset when it returns,
and read when the model's analysis returns: two peaks over the RSS before the gradient pass, that of the pass
(activations, the gradient sums) and that of what follows (natural gradients, per-layer metrics and spectra, the
copy of the layer parameters if any). Reported in units of the tracked
layers' parameter bytes ``P`` (one float32 copy of every tracked ``[W | b]``): the model itself is already resident
at the reset. Run it against any checkout's ``src`` to compare versions.

Reproduce: ``PYTHONPATH=src .venv/bin/python benchmarks/bench_report_memory.py [--models 2]``.
"""

from __future__ import annotations

import argparse
import json
import string
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

import kronfisher as kf
import kronfisher.analysis.run as analysis_run
from bench_scale import current_rss, peak_rss, reset_peak  # the benchmarks' one RSS probe
from kronfisher.analysis.console import Console
from kronfisher.analysis.run import AnalyzeOptions, analyze
from kronfisher.layers import discover_layers

MIB = 2**20


def save_model(folder: Path, args: argparse.Namespace) -> int:
    """A scaled Qwen2.5-shaped model and a character tokenizer in ``folder``; returns the tracked bytes ``P``."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        hidden_size=args.hidden,
        intermediate_size=args.inter,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=args.vocab,
        tie_word_embeddings=True,
        max_position_embeddings=1024,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(folder)
    vocab = {"<unk>": 0, "<eos>": 1, "<pad>": 2}
    for c in sorted(set(string.printable)):
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")
    fast.save_pretrained(folder)
    infos = discover_layers(model).infos
    return sum(i.out_features * i.a_dim for i in infos.values()) * 4


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Analyse ``--models`` copies of the model; the post-fit peak of each over the RSS before its gradient pass."""
    records: list[dict[str, Any]] = []
    real_gradient, real_analyze = analysis_run.mean_gradient, analysis_run.analyze_model

    def gradient(*a: Any, **k: Any) -> Any:
        reset_peak()
        records.append({"rss_before_gradient": current_rss()})
        out = real_gradient(*a, **k)
        records[-1]["peak_gradient_pass"] = peak_rss()
        reset_peak()  # what follows: natural gradients, metrics, spectra, parameter copies
        return out

    def analyze_model(*a: Any, **k: Any) -> Any:
        out = real_analyze(*a, **k)
        records[-1]["peak"] = peak_rss()
        return out

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        p_bytes = save_model(folder, args)
        opts = AnalyzeOptions(
            models=[str(folder)] * args.models,
            output_dir=Path(tmp) / "out",
            cfg=kf.KFACConfig(),
            max_tokens=args.tokens,
            seq_len=256,
            batch_size=2,
            plots=False,
            save_factors=False,
            quiet=True,
        )
        analysis_run.mean_gradient, analysis_run.analyze_model = gradient, analyze_model
        try:
            analyze(opts, console=Console(True))
        finally:
            analysis_run.mean_gradient, analysis_run.analyze_model = real_gradient, real_analyze
    for r in records:
        base = r["rss_before_gradient"]
        r["gradient_pass_peak_bytes"] = r["peak_gradient_pass"] - base
        r["after_gradient_peak_bytes"] = r["peak"] - base
        r["post_fit_peak_bytes"] = max(r["gradient_pass_peak_bytes"], r["after_gradient_peak_bytes"])
        for key in ("gradient_pass", "after_gradient", "post_fit"):
            r[f"{key}_peak_in_P"] = round(r[f"{key}_peak_bytes"] / p_bytes, 2)
    return {"args": vars(args), "tracked_bytes_P": p_bytes, "models": records, "torch": torch.__version__}


def main() -> None:
    """Command line: prints JSON on stdout and a table on stderr."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--inter", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--models", type=int, default=1)
    out = measure(ap.parse_args())
    print(json.dumps(out, indent=1))
    print(f"tracked [W | b] in float32: P = {out['tracked_bytes_P'] / MIB:.0f} MiB", file=sys.stderr)
    print("| model | RSS before gradient MiB | peak over it: gradient pass | after it | (in P) |", file=sys.stderr)
    print("| ---: | ---: | ---: | ---: | ---: |", file=sys.stderr)
    for i, r in enumerate(out["models"]):
        print(
            f"| {i} | {r['rss_before_gradient'] / MIB:.0f} | {r['gradient_pass_peak_bytes'] / MIB:.0f} MiB | "
            f"{r['after_gradient_peak_bytes'] / MIB:.0f} MiB | {r['gradient_pass_peak_in_P']} / "
            f"{r['after_gradient_peak_in_P']} |",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
