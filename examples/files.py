"""Factor files: save, lazy load, inspect, verify, checkpoint raw sums, and merge runs on disjoint data.

A collection split into two halves (two jobs, or one job checkpointed half-way) merges into exactly the factors of
one run on all the data. See docs/files.md. Runs in a few seconds on CPU (tiny GPT-2 built from a config, no
download).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import kronfisher as kf
from kronfisher.cli import main as kronfisher_command


def main(folder: str | None = None) -> dict[str, object]:
    out = Path(folder or tempfile.mkdtemp())
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval()
    ids = torch.randint(0, 64, (8, 16))
    batches = [{"input_ids": ids[i : i + 2], "attention_mask": torch.ones_like(ids[i : i + 2])} for i in range(0, 8, 2)]
    cfg = kf.KFACConfig(accumulate_dtype="float64")

    # One run on everything, saved with its raw sums (mergeable later).
    full = kf.fit(model, batches, cfg)
    full_path = kf.save(full, out / "full.safetensors", model=model, include_sums=True)

    # Two jobs on disjoint halves: each checkpoints its raw sums; merging them equals the full run.
    parts = []
    for k, half in enumerate((batches[:2], batches[2:])):
        discovery, collector, report = kf.collect(model, half, cfg)
        parts.append(
            kf.save_sums(out / f"half{k}.sums.safetensors", discovery.infos, collector.sums, cfg, report=report)
        )
    merged_path = kf.merge_files(parts, out / "merged.safetensors", model=model)

    loaded = kf.load(merged_path, model=model)  # header only; each layer is read (and checked) on first use
    worst = 0.0
    for name in full.layer_names:
        for mine, ref in zip(loaded.factors(name), full.factors(name)):
            worst = max(worst, float((mine - ref).abs().max() / ref.abs().max()))

    kf.verify_file(full_path)  # every tensor against its checksum
    status = kronfisher_command(["inspect", str(merged_path)])  # the command-line view of the same file
    meta = kf.read_metadata(merged_path)
    result = {
        "max_relative_difference_merged_vs_full": worst,
        "merged_tokens": meta["report"]["tokens"],
        "full_tokens": full.report.tokens,
        "inspect_status": status,
        "layers": [row["name"] for row in kf.inspect_file(merged_path)],
        "files": sorted(p.name for p in out.iterdir()),
    }
    print({k: v for k, v in result.items() if k != "layers"})
    return result


if __name__ == "__main__":
    main()
