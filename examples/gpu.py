"""K-FAC on a GPU: put the model (and nothing else) on the device; factors and their algebra follow it.

    python examples/gpu.py            # the GPU when there is one, else the CPU
    python examples/gpu.py cpu        # force a device

The fit on the device is compared with a fit on the CPU (same weights, same batches): the factors agree to float32
rounding. Dense factors live next to the model, and so does the low-rank ``G`` of huge layers (here forced for
``lm_head`` with ``lowrank_layers``) when it fits. See docs/gpu.md. Runs in a few seconds on CPU.
"""

from __future__ import annotations

import copy
import sys

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import kronfisher as kf


def main(device: str | None = None) -> dict[str, object]:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False  # TF32 GEMMs would differ from the CPU beyond float32 rounding
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        )
    ).eval()  # fmt: skip
    ids = torch.randint(0, 300, (8, 32))
    batches = [{"input_ids": ids[i : i + 4], "attention_mask": torch.ones_like(ids[i : i + 4])} for i in (0, 4)]
    cfg = kf.KFACConfig(ekfac=True, lowrank_layers=(r"lm_head",))

    on_device = kf.fit(copy.deepcopy(model).to(device), batches, cfg)  # batches are moved to the model's device
    on_cpu = kf.fit(model, batches, cfg)

    worst = 0.0
    for name in on_cpu.layer_names:
        for mine, ref in zip(on_device.factors(name), on_cpu.factors(name)):
            worst = max(worst, float((mine.cpu() - ref).abs().max() / ref.abs().max()))
    q = on_device.block("model.layers.0.self_attn.q_proj")
    head = on_device.block("lm_head")
    result = {
        "device": device,
        "A_device": str(q.A.vectors.device),
        "lm_head_G_device": str(head.G.device),
        "lm_head_representation": head.representation,
        "max_relative_factor_difference": worst,
    }
    print(result)
    return result


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
