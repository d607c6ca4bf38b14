"""K-FAC natural gradients inside a Hugging Face ``Trainer``, through a ``TrainerCallback``.

The callback refreshes the factors with ``kf.fit`` on a few held-out batches every ``refresh`` steps (extra forward
and backward passes on those batches only) and, just before each optimizer step, replaces the gradients of the
tracked layers by their natural gradients ``(F + δ)^{-1} g``. See docs/training-loop.md. Runs in a few seconds on CPU
(tiny Qwen2 built from a config, no download).
"""

from __future__ import annotations

import tempfile

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Trainer, TrainerCallback, TrainingArguments

import kronfisher as kf


class NaturalGradientCallback(TrainerCallback):
    """Precondition the gradients of the tracked layers with K-FAC before every optimizer step."""

    def __init__(self, model: torch.nn.Module, batches: list[dict], cfg: kf.KFACConfig, refresh: int = 10) -> None:
        self.model, self.batches, self.cfg, self.refresh = model, batches, cfg, refresh
        self.fisher: kf.KFAC | None = None
        self.refreshes = 0
        self.preconditioned = 0

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step % self.refresh == 0:  # fit() leaves .grad, requires_grad and train mode as they were
            self.fisher = kf.fit(self.model, self.batches, self.cfg)
            self.refreshes += 1

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.fisher is None:
            return
        nat = self.fisher.natural_gradient()  # reads the accumulated .grad of the tracked layers
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in nat.items():
                params[name].grad.copy_(value)
        self.preconditioned += 1


class TokenDataset(torch.utils.data.Dataset):
    """Sequences of a toy language (each token is the previous one plus 1, mod the vocabulary)."""

    def __init__(self, n: int, seq: int = 24, vocab: int = 48, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = (torch.randint(0, vocab, (n, 1), generator=g) + torch.arange(seq)) % vocab

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def main(steps: int = 12) -> dict[str, float]:
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        )
    )  # fmt: skip
    held_out = TokenDataset(8, seed=1).ids
    fisher_batches = [{"input_ids": held_out[i : i + 4], "attention_mask": torch.ones_like(held_out[i : i + 4])}
                      for i in (0, 4)]  # fmt: skip
    callback = NaturalGradientCallback(model, fisher_batches, kf.KFACConfig(damping=0.1, damping_mode="pi"), 5)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, max_steps=steps, per_device_train_batch_size=4, learning_rate=0.3,
            optim="sgd", lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
            report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
        )  # fmt: skip
        trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(64), callbacks=[callback])
        trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    result = {
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "refreshes": callback.refreshes,
        "preconditioned_steps": callback.preconditioned,
    }
    print(result)
    return result


if __name__ == "__main__":
    main()
