"""Natural-gradient training in a plain PyTorch loop: K-FAC factors from the loop's own forward and backward.

Every ``REFRESH`` steps the step's backward goes through ``kf.capture`` (no extra forward pass), and the factors are
refreshed from that batch; every step preconditions the gradient with ``(F + δ)^{-1}`` before an SGD step. See
docs/training-loop.md. Runs in a few seconds on CPU (tiny Llama built from a config, no download).
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import kronfisher as kf

REFRESH = 5  # steps between factor refreshes
STEPS = 30
LR = 0.3
DAMPING = 0.1


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


def data(n_batches: int = 8, batch: int = 4, seq: int = 24) -> list[dict[str, torch.Tensor]]:
    """A learnable toy language: each token is the previous one plus 1 (mod 48), from a random start."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n_batches):
        start = torch.randint(0, 48, (batch, 1), generator=g)
        ids = (start + torch.arange(seq)) % 48
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def loss_and_terms(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    loss = model(**batch, labels=labels).loss  # a mean over the loss terms
    return loss, int((labels[:, 1:] != -100).sum())  # N: targets after the model's one-token shift


def train() -> dict[str, list[float]]:
    model = tiny_model()
    batches = data()
    cfg = kf.KFACConfig(damping=DAMPING, damping_mode="pi")
    fisher: kf.KFAC | None = None
    losses, cosines = [], []
    for step in range(STEPS):
        batch = batches[step % len(batches)]
        model.zero_grad()
        if step % REFRESH == 0:
            with kf.capture(model, cfg) as cap:  # hooks see this step's forward and backward
                loss, n_terms = loss_and_terms(model, batch)
                cap.backward(loss, reduction="mean", num_terms=n_terms, attention_mask=batch["attention_mask"])
            fisher = cap.finalize()  # .grad is populated as by loss.backward()
        else:
            loss, _ = loss_and_terms(model, batch)
            loss.backward()
        losses.append(float(loss.detach()))
        assert fisher is not None
        nat = fisher.natural_gradient()  # (F + δ)^{-1} g of the tracked layers, from their .grad
        with torch.no_grad():
            g = torch.cat([p.grad.reshape(-1) for n, p in model.named_parameters() if n in nat])
            ng = torch.cat([nat[n].reshape(-1) for n, p in model.named_parameters() if n in nat])
            cosines.append(float(g @ ng / (g.norm() * ng.norm())))
            for name, p in model.named_parameters():
                if p.grad is not None:
                    p -= LR * nat.get(name, p.grad)  # untracked parameters (embeddings, norms): plain SGD
    return {"losses": losses, "cosines": cosines}


def main() -> dict[str, list[float]]:
    result = train()
    losses, cos = result["losses"], result["cosines"]
    print(f"loss: step 0 {losses[0]:.3f}, last five steps {sum(losses[-5:]) / 5:.3f}")
    print(f"cosine(gradient, natural gradient): min {min(cos):.3f}, max {max(cos):.3f}")
    return result


if __name__ == "__main__":
    main()
