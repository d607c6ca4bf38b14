"""K-FAC under ``torchrun``: each rank collects on its shard of the batches; the result is the one-process result.

    torchrun --standalone --nproc_per_node=2 examples/distributed.py fisher.safetensors
    python examples/distributed.py fisher-1proc.safetensors      # the same factors, in one process

Each rank builds the same model and the same list of batches, and passes ``Shard(batches)`` to ``kf.fit``: rank r
takes batches r, r + K, r + 2K, ... Sums and counts are merged once at the end of each pass, the decompositions are
spread over the ranks, and rank 0 writes the file while the others wait. See docs/distributed.md. Runs in a few
seconds on CPU (gloo; tiny Qwen2 built from a config, no download).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from transformers import Qwen2Config, Qwen2ForCausalLM

import kronfisher as kf
from kronfisher.distributed import Shard, is_main_process


def main(path: str = "fisher.safetensors") -> kf.KFAC:
    torch.manual_seed(0)  # every rank builds the same model and data
    model = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        )
    ).to(torch.float64)  # fmt: skip
    ids = torch.randint(0, 48, (10, 16))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # padding is fine: it never enters a factor
    batches = [{"input_ids": ids[i : i + 2], "attention_mask": mask[i : i + 2]} for i in range(0, 10, 2)]  # 5 batches
    cfg = kf.KFACConfig(fisher="mc", mc_samples=2, ekfac=True, accumulate_dtype="float64", seed=3)
    fisher = kf.fit(model, Shard(batches), cfg)  # collective: every rank calls it
    fisher.save(path, model)  # every rank calls it: rank 0 writes, the others wait until the file is complete
    if is_main_process():
        world = dist.get_world_size() if dist.is_initialized() else 1
        print(f"{world} process(es): {fisher.report.batches} batches, {fisher.report.tokens} tokens -> {path}")
    return fisher


if __name__ == "__main__":
    if "WORLD_SIZE" in os.environ:  # launched by torchrun
        dist.init_process_group("gloo")  # "nccl" with one GPU per rank
    try:
        main(sys.argv[1] if len(sys.argv) > 1 else "fisher.safetensors")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
