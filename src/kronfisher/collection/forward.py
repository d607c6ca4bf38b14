"""How a batch goes through the model during a kronfisher pass (docs/concepts.md).

Eval mode (no dropout) with every submodule's mode restored, no parameter gradient (parameters frozen, the
embedding output made a grad leaf, or the input of the earliest block with a hooked layer: :mod:`.cut`), batches
moved to the model's device, and the forward arguments of a causal-LM batch (``position_ids`` derived for left
padding).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .cut import BlockCut


@contextlib.contextmanager
def activation_only_backward(model: nn.Module, cut: BlockCut | None = None) -> Iterator[bool]:
    """Skip parameter gradients during collection when the model has input embeddings.

    Parameters are frozen for the duration and the input-embedding output becomes a leaf that requires grad, so
    the backward computes output gradients of every layer and nothing else. With ``cut`` (the pass's
    :class:`~kronfisher.collection.cut.BlockCut`), the input of the cut block is the leaf instead while the cut is
    active, and the blocks before it build no graph. Flags are restored on exit. Without input embeddings,
    parameters keep their flags and their ``.grad`` is restored on exit instead (and there is no cut).

    Yields:
        True when activation-only backward is active.

    """
    get = getattr(model, "get_input_embeddings", None)
    emb = None
    if callable(get):
        with contextlib.suppress(Exception):
            emb = get()
    params = list(model.parameters())
    if isinstance(emb, nn.Module):
        flags = [p.requires_grad for p in params]

        def leaf(module: nn.Module, inputs: Any, output: Tensor) -> Tensor | None:
            if cut is not None and cut.active:  # the cut block's input is the leaf: no graph before it
                return None
            return output.detach().requires_grad_(True)

        handle = emb.register_forward_hook(leaf)
        try:
            for p in params:
                p.requires_grad_(False)
            with cut.armed() if cut is not None else contextlib.nullcontext():
                yield True
        finally:
            handle.remove()
            for p, f in zip(params, flags):
                p.requires_grad_(f)
    else:
        saved = [p.grad for p in params]
        try:
            yield False
        finally:
            for p, g in zip(params, saved):
                p.grad = g


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run in eval mode (no dropout), restoring every submodule's previous mode (mixed modes included)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, was in modes:
            m.training = was


def to_device(batch: Any, device: torch.device) -> Any:
    """Move the tensors of a mapping batch to ``device`` (anything else is returned as is)."""
    if isinstance(batch, Mapping):
        return {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items()}
    return batch


def model_device(model: nn.Module) -> torch.device:
    """Device of the first parameter (CPU for a parameter-less module)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _accepts(model: nn.Module, name: str) -> bool:
    """Whether ``model.forward`` takes ``name``: explicitly, or through a transformers model's ``**kwargs``.

    A custom model's ``**kwargs`` may not accept it, so it is not passed there.
    """
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    if name in params:
        return True
    try:
        from transformers import PreTrainedModel  # noqa: PLC0415 (optional dependency, imported when used)
    except ImportError:  # pragma: no cover - transformers is a dependency of the hf extra
        return False
    return isinstance(model, PreTrainedModel) and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def model_inputs(model: nn.Module, batch: Mapping[str, Any]) -> dict[str, Any]:
    """The forward arguments of a causal-LM batch: ids, mask and ``position_ids``.

    A left-padded batch without ``position_ids`` gets the ones ``generate`` would use (the count of attended tokens
    before each position), so that a model with absolute positions (GPT-2) sees each sequence exactly as
    unpadded; otherwise stock HF models number the pads too. Right padding keeps the model's own numbering.
    """
    fwd = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    mask = fwd.get("attention_mask")
    if "position_ids" in fwd or mask is None or mask.dim() != 2 or mask.shape[1] < 2:
        return fwd
    left_padded = bool(((mask[:, :-1] == 0) & (mask[:, 1:] != 0)).any())
    if left_padded and _accepts(model, "position_ids"):
        fwd["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
    return fwd
