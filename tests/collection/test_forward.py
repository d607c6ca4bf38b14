"""The forward arguments of a batch (``collection.forward.model_inputs``): ``position_ids`` go only where taken.

A left-padded batch gets ``position_ids`` only if the forward names them or is a transformers model; a model whose
``**kwargs`` are meant for something else (here: passed on to an inner call that does not take them) once failed
with ``TypeError`` because ``position_ids`` went into any ``**kwargs``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

import kronfisher as kf
from conftest import make_model, random_ids


class _Inner(nn.Module):
    """A causal LM core whose forward takes ids and mask only."""

    def __init__(self) -> None:
        super().__init__()
        self.lm = make_model("gpt2")

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, *, use_cache: bool = False) -> Any:
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)


class _Wrapper(nn.Module):
    """A wrapper that forwards its extra keyword options (``use_cache`` ...) to the core, a common pattern."""

    def __init__(self) -> None:
        super().__init__()
        self.core = _Inner()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Any:
        return self.core(input_ids, attention_mask, **kwargs)


def test_model_with_kwargs_but_no_position_ids_still_fits_left_padded_batches() -> None:
    """The bug: ``model_inputs`` passed ``position_ids`` into ``**kwargs`` and the inner call raised TypeError.

    The check is the count of attended positions (exact integer), reached only if the forward does not raise.
    """
    torch.manual_seed(0)
    model = _Wrapper().to(torch.float64)
    ids = random_ids(2, 6, seed=3)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    batch = {"input_ids": ids, "attention_mask": mask}
    fisher = kf.fit(model, [batch], kf.KFACConfig(accumulate_dtype="float64"))
    assert fisher.report.tokens == int(mask.sum())  # T counts attended positions only (docs/concepts.md)
