"""Compare a base model with its fine-tune, measured with the base model's Fisher (the library route).

Per layer: ``½ Δθᵀ F_base Δθ`` (the second-order loss change the weight difference causes on the base model's data),
the relative weight change ``‖ΔV‖ / ‖V_base‖`` and the overlap of the top-k eigenvectors of ``A`` and ``G`` of both
models. The fine-tune here is a few SGD steps with the attention of block 1 frozen, so those layers must show zero
change. See docs/compare-models.md (``kronfisher analyze --model BASE --model TUNED`` writes the same numbers into a
report). Runs in a few seconds on CPU (tiny Llama built from a config, no download).
"""

from __future__ import annotations

import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import kronfisher as kf

K = 4  # eigenvectors in the subspace overlaps


def batches(seed: int, n: int = 4) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = (torch.randint(0, 48, (n * 4, 1), generator=g) + torch.arange(20)) % 48  # each token = previous + 1
    return [
        {"input_ids": ids[i : i + 4], "attention_mask": torch.ones_like(ids[i : i + 4])} for i in range(0, 4 * n, 4)
    ]


def fine_tune(base: torch.nn.Module, data: list[dict[str, torch.Tensor]], steps: int = 8) -> torch.nn.Module:
    tuned = copy.deepcopy(base)
    for name, p in tuned.named_parameters():
        p.requires_grad_("layers.1.self_attn" not in name)  # frozen: these layers must not move
    opt = torch.optim.SGD([p for p in tuned.parameters() if p.requires_grad], lr=0.05)
    for step in range(steps):
        b = data[step % len(data)]
        opt.zero_grad()
        tuned(**b, labels=b["input_ids"]).loss.backward()
        opt.step()
    for p in tuned.parameters():
        p.requires_grad_(True)
    return tuned


def top_vectors(eig, k: int) -> torch.Tensor:
    order = torch.argsort(eig.values, descending=True)[:k]
    return eig.vectors[:, order].to(torch.float64)


def compare(base: torch.nn.Module, tuned: torch.nn.Module, data: list[dict[str, torch.Tensor]]) -> dict[str, dict]:
    cfg = kf.KFACConfig(exclude=("lm_head",))
    f_base, f_tuned = kf.fit(base, data, cfg), kf.fit(tuned, data, cfg)
    p_base, p_tuned = dict(base.named_parameters()), dict(tuned.named_parameters())
    rows = {}
    for name in f_base.layer_names:
        info = f_base.infos[name]
        delta = {info.weight_name: (p_tuned[info.weight_name] - p_base[info.weight_name]).detach()}
        w_base = p_base[info.weight_name].detach()
        f_delta = f_base.fvp(delta)[info.weight_name]  # undamped F_base Δθ
        a_b, a_t = f_base.block(name).A, f_tuned.block(name).A
        g_b, g_t = f_base.block(name).G, f_tuned.block(name).G
        rows[name] = {
            "quadratic_form": 0.5 * float((delta[info.weight_name] * f_delta).sum()),
            "relative_change": float(delta[info.weight_name].norm() / w_base.norm()),
            "overlap_A": float((top_vectors(a_b, K).t() @ top_vectors(a_t, K)).square().sum()) / K,
            "overlap_G": float((top_vectors(g_b, K).t() @ top_vectors(g_t, K)).square().sum()) / K,
        }
    return {"rows": rows, "fisher_base": f_base}


def main() -> dict[str, dict]:
    torch.manual_seed(0)
    base = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        )
    ).eval()  # fmt: skip
    tuned = fine_tune(base, batches(seed=1)).eval()
    result = compare(base, tuned, batches(seed=2))
    result.update(base=base, tuned=tuned)
    print(f"{'layer':34s} {'½ΔθᵀFΔθ':>10s} {'‖ΔW‖/‖W‖':>10s} {'overlap A':>10s} {'overlap G':>10s}")
    for name, r in result["rows"].items():
        print(
            f"{name:34s} {r['quadratic_form']:10.3e} {r['relative_change']:10.3e} "
            f"{r['overlap_A']:10.3f} {r['overlap_G']:10.3f}"
        )
    return result


if __name__ == "__main__":
    main()
