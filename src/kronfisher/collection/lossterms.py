"""Loss terms of a causal-LM batch and the backward passes of each Fisher type (docs/concepts.md).

The loss is computed here from the logits, in the logits' dtype (float64 stays float64), as the
*summed* loss ``L_sum`` over loss terms, so captured gradients need no rescaling. ``empirical`` uses the data
targets; ``mc`` samples targets from the model's predictive distribution with a generator seeded from the
configured seed, the pass and the *global* index of the batch (:func:`mc_generator`), so the draws of a batch do not
depend on how the data is split over ranks, on batches before it, or on an interruption and resume (docs/concepts.md).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ShapeError


@dataclass
class LMTerms:
    """Shifted logits and targets of the positions that carry a loss term.

    Attributes:
        logits: ``[N, vocab]`` logits at loss-term positions.
        targets: ``[N]`` data targets.
        attention_mask: ``[B, S]`` mask of attended positions (None: all attended).
        num_terms: ``N``.
        num_tokens: ``T`` (attended positions).

    """

    logits: Tensor
    targets: Tensor
    attention_mask: Tensor | None
    num_terms: int
    num_tokens: int


def batch_labels(batch: Mapping[str, Tensor], ignore_index: int) -> Tensor:
    """Labels of a batch: ``labels`` if given, else ``input_ids`` with non-attended positions ignored."""
    ids = batch["input_ids"]
    labels = batch.get("labels")
    if labels is None:
        labels = ids.clone()
        mask = batch.get("attention_mask")
        if mask is not None:
            labels = labels.masked_fill(mask == 0, ignore_index)
    if labels.shape != ids.shape:
        raise ShapeError(f"labels {list(labels.shape)} must have the shape of input_ids {list(ids.shape)}.")
    return labels


def lm_terms(logits: Tensor, batch: Mapping[str, Tensor], ignore_index: int) -> LMTerms:
    """Select the positions with a target after the causal shift (docs/concepts.md)."""
    ids = batch["input_ids"]
    if logits.shape[:2] != ids.shape:
        raise ShapeError(f"logits {list(logits.shape)} do not match input_ids {list(ids.shape)}.")
    labels = batch_labels(batch, ignore_index)
    targets = labels[:, 1:]
    valid = targets != ignore_index
    mask = batch.get("attention_mask")
    if mask is not None:
        # A target at a non-attended position, or predicted from one (left padding), is no loss term.
        valid = valid & (mask[:, 1:] != 0) & (mask[:, :-1] != 0)
    sel = logits[:, :-1][valid]
    n = int(valid.sum())
    t = int(mask.sum()) if mask is not None else int(ids.numel())
    return LMTerms(sel, targets[valid], mask, n, t)


def summed_ce(logits: Tensor, targets: Tensor) -> Tensor:
    """``Σ_n ℓ_n`` for cross-entropy, computed in the logits' dtype (at least float32)."""
    work = torch.promote_types(logits.dtype, torch.float32)
    return F.cross_entropy(logits.to(work), targets, reduction="sum")


def mc_generator(seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of the MC targets of one batch: a function of ``(seed, global batch index)`` alone.

    One process over all batches and ``torchrun`` ranks over their shards draw the same targets for the same batch,
    and a resumed run draws what the uninterrupted run would have. The EK-FAC pass draws the same targets as the
    K-FAC pass, so the eigenvalue correction measures the very sample of the Fisher the factors were built from:
    its per-sample gradients stay in the span of ``G``, and its values do not depend on how the memory plan stores
    ``G`` (docs/concepts.md). The stream is the device's own (CPU and CUDA generators differ), so no logits are
    copied to the CPU to sample.

    Args:
        seed: ``KFACConfig.seed``.
        index: index of the batch in the whole (unsharded) data.
        device: device of the logits.

    """
    # ":0:" kept from when the two passes drew apart, so the K-FAC draws (and resumed checkpoints) are unchanged
    digest = hashlib.sha256(f"kronfisher-mc:{int(seed)}:0:{int(index)}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


class MCDraws:
    """The MC targets of one batch: the predictive distribution is computed once for every draw and the data loss.

    One ``log_softmax`` over ``[N, vocab]`` per batch (then exponentiated in place), instead of a softmax per draw
    plus a separate cross-entropy for the report's data loss (docs/concepts.md).
    """

    def __init__(self, logits: Tensor, targets: Tensor, generator: torch.Generator) -> None:
        with torch.no_grad():
            work = torch.float64 if logits.dtype == torch.float64 else torch.float32
            log_probs = torch.log_softmax(logits.detach().to(work), -1)
            self.data_loss = -log_probs.gather(1, targets.unsqueeze(1)).sum()  # summed CE of the data targets
            self.probs = log_probs.exp_()
        self.generator = generator

    def sample(self) -> Tensor:
        """``[N]`` targets drawn from the predictive distribution."""
        probs = self.probs if self.probs.device == self.generator.device else self.probs.to(self.generator.device)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(1).to(self.probs.device)
