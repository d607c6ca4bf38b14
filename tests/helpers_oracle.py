"""Helpers for comparing kronfisher with independent references (curvlinops, dense per-sample Fisher).

The set-up: curvlinops knows no attention masks and wants a 2-D model output, so the oracle
runs on unpadded batches in which *every* position carries one loss term (targets are passed pre-shifted), the LM
is wrapped to return ``logits.reshape(-1, vocab)``, and the cross-entropy is computed by us from float64 logits.
curvlinops tracks ``nn.Linear`` only: GPT-2's ``Conv1D`` layers are mirrored by a twin model in which each
``Conv1D`` is replaced by the equivalent ``nn.Linear`` (weight transposed), while kronfisher runs on the original
``Conv1D`` model, so the Conv1D adapter (docs/concepts.md) is part of what is compared.
"""

from __future__ import annotations

import copy
import types
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

with warnings.catch_warnings():
    # curvlinops (through backpack) may warn on import; the import must not depend on torchvision.
    warnings.simplefilter("ignore")
    import curvlinops
    from curvlinops import EKFACLinearOperator, KFACInverseLinearOperator, KFACLinearOperator

try:
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover - transformers is a test dependency
    Conv1D = None

__all__ = [
    "EKFACLinearOperator",
    "FlatLogits",
    "KFACInverseLinearOperator",
    "KFACLinearOperator",
    "ce_loss_fn",
    "conv1d_weights",
    "curvlinops",
    "float64_model",
    "keep_float64",
    "linear_twin",
    "oracle_params",
    "oracle_to_model",
    "shifted_batches",
    "to_kronfisher",
    "to_oracle",
]


class FlatLogits(nn.Module):
    """``input_ids -> logits.reshape(-1, vocab)``: the 2-D output curvlinops' (E)K-FAC expects."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: Tensor) -> Tensor:
        logits = self.lm(input_ids=input_ids).logits
        return logits.reshape(-1, logits.shape[-1])


def _rmsnorm_in_input_dtype(self: nn.Module, hidden_states: Tensor) -> Tensor:
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def keep_float64(model: nn.Module) -> nn.Module:
    """Make every HF ``*RMSNorm`` compute in its input dtype instead of float32, in place.

    Stock Llama/Qwen2 RMSNorm upcasts to float32; then a backward whose seed is scaled (a summed instead of a mean
    loss) rounds differently at float32 precision, and two mathematically equal computations differ by ~1e-7.
    Together with ``attn_implementation="sdpa"`` (which keeps float64; eager attention takes its softmax in float32)
    the whole forward and backward run in float64.
    """
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_rmsnorm_in_input_dtype, module)
    return model


def float64_model(name: str, seed: int = 0) -> nn.Module:
    """A tiny model from ``tests/conftest.py`` whose forward and backward run entirely in float64."""
    from conftest import make_model

    return keep_float64(make_model(name, seed=seed, dtype=torch.float64, attn="sdpa"))


def linear_twin(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in which every transformers ``Conv1D`` is an equivalent ``nn.Linear``."""
    twin = copy.deepcopy(model)
    if Conv1D is None:
        return twin
    for name, module in list(twin.named_modules()):
        if not isinstance(module, Conv1D):
            continue
        in_f, out_f = module.weight.shape
        lin = nn.Linear(in_f, out_f, bias=module.bias is not None, dtype=module.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(module.weight.t())
            if module.bias is not None:
                lin.bias.copy_(module.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(twin.get_submodule(parent_name) if parent_name else twin, child, lin)
    return twin


def oracle_params(wrapped: nn.Module) -> tuple[list[nn.Parameter], list[str]]:
    """Parameters of every ``nn.Linear`` of the wrapped twin (what curvlinops supports) and their names."""
    params, names = [], []
    for mod_name, module in wrapped.named_modules():
        if isinstance(module, nn.Linear):
            for p_name, p in module.named_parameters(recurse=False):
                params.append(p)
                names.append(f"{mod_name}.{p_name}")
    return params, names


def shifted_batches(n_batches: int, batch: int, seq: int, vocab: int, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    """``(input_ids [B, S], targets [B, S])`` with the next token of every position as its target.

    Each row is drawn as ``S + 1`` tokens and split, so every position of the input carries exactly one loss term
    (``T = N``, the oracle conditions of ``tests/drivers/test_oracle_curvlinops.py``).
    """
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(0, vocab, (batch, seq + 1), generator=gen)
        out.append((ids[:, :-1].contiguous(), ids[:, 1:].contiguous()))
    return out


def ce_loss_fn(reduction: str) -> Callable[[nn.Module, Mapping[str, Tensor]], tuple[Tensor, dict[str, Any]]]:
    """A kronfisher ``loss_fn`` with our own cross-entropy from the (float64) logits over every position."""

    def loss_fn(model: nn.Module, batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Any]]:
        logits = model(input_ids=batch["input_ids"]).logits
        targets = batch["targets"].reshape(-1)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, reduction=reduction)
        return loss, {"num_terms": targets.numel(), "reduction": reduction}

    return loss_fn


def to_kronfisher(batches: list[tuple[Tensor, Tensor]]) -> list[dict[str, Tensor]]:
    """The same batches as kronfisher ``loss_fn`` inputs."""
    return [{"input_ids": x, "targets": y} for x, y in batches]


def to_oracle(batches: list[tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor]]:
    """The same batches for curvlinops: flat targets matching :class:`FlatLogits`."""
    return [(x, y.reshape(-1)) for x, y in batches]


def conv1d_weights(model: nn.Module) -> set[str]:
    """Qualified weight names of transformers ``Conv1D`` layers (stored ``[in, out]``, docs/concepts.md)."""
    if Conv1D is None:
        return set()
    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Conv1D)}


def oracle_to_model(model: nn.Module, names: list[str], tensors: list[Tensor], prefix: str) -> dict[str, Tensor]:
    """curvlinops tensor list (twin layout) -> dict keyed by ``model``'s parameter names and shapes."""
    conv = conv1d_weights(model)
    out = {}
    for name, t in zip(names, tensors):
        key = name.removeprefix(prefix)
        out[key] = t.t() if key in conv else t
    return out
