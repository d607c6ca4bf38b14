"""Checks of one batch before its forward: one error naming the batch, the key and what was expected (docs/errors.md).

A causal-LM batch whose token ids lie outside the vocabulary, are not integers, or whose ``attention_mask`` /
``labels`` do not have the shape of ``input_ids`` would otherwise fail deep inside the model with a raw PyTorch
error (on CUDA, a device-side assert that poisons the whole process). The check runs before the forward, so nothing
of the batch is staged and no sum is touched. It costs one ``aminmax`` of the ids (and of the labels) and one host
sync per batch, no Python loop over tokens.

A user ``loss_fn`` owns its batch; what can be checked is that its loss reaches the tracked layers through autograd
(:func:`loss_without_grad`), before the backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InputError, ShapeError


def vocab_sizes(model: nn.Module) -> tuple[int | None, int | None]:
    """``(input vocabulary, output classes)`` of a causal LM, each None where the model does not say.

    The input vocabulary is the row count of ``model.get_input_embeddings()``; the classes are the output features
    of ``model.get_output_embeddings()`` (the LM head).
    """
    return _size(model, "get_input_embeddings", "num_embeddings"), _size(model, "get_output_embeddings", "out_features")


def _size(model: nn.Module, getter: str, attribute: str) -> int | None:
    get = getattr(model, getter, None)
    if not callable(get):
        return None
    module = None
    with contextlib.suppress(Exception):  # e.g. transformers' NotImplementedError for a model without one
        module = get()
    size = getattr(module, attribute, None)
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def _describe(t: Tensor) -> str:
    return f"{list(t.shape)} {t.dtype}"


def _integer_tensor(batch: Mapping[str, Any], key: str, index: int, what: str) -> Tensor:
    """``batch[key]`` as an int64 tensor; an :class:`InputError` for anything that is not an integer tensor."""
    t = batch[key]
    if not isinstance(t, Tensor):
        raise InputError(f"Batch {index}: {key!r} is a {type(t).__name__}; expected a tensor of {what}.")
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise InputError(f"Batch {index}: {key!r} {_describe(t)} is not integer; expected {what} (torch.int64).")
    return t if t.dtype == torch.int64 else t.long()  # the loss takes int64 targets; the embedding int32 or int64


def _same_shape(batch: Mapping[str, Any], key: str, ids: Tensor, index: int) -> Tensor | None:
    """``batch[key]`` (None when absent), refused unless it is a tensor of the shape of ``input_ids``."""
    t = batch.get(key)
    if t is None:
        return None
    if not isinstance(t, Tensor):
        raise InputError(f"Batch {index}: {key!r} is a {type(t).__name__}; expected a tensor {list(ids.shape)}.")
    if t.shape != ids.shape:
        raise ShapeError(
            f"Batch {index}: {key!r} has shape {list(t.shape)}; expected the shape of 'input_ids' {list(ids.shape)}."
        )
    return t


def check_lm_batch(
    batch: Mapping[str, Any],
    index: int,
    *,
    vocab: int | None,
    classes: int | None,
    ignore_index: int,
) -> dict[str, Any]:
    """The causal-LM batch ``batch`` checked, with integer ids and labels as int64 (docs/errors.md).

    Args:
        batch: a mapping with ``input_ids`` ``[batch, seq]`` and optional ``attention_mask`` / ``labels`` of the
            same shape.
        index: global index of the batch, for the message.
        vocab: rows of the input embedding (ids must lie in ``[0, vocab)``); None: not checked.
        classes: output classes (labels other than ``ignore_index`` must lie in ``[0, classes)``); None: not checked.
        ignore_index: the label of positions without a loss term.

    Returns:
        A shallow copy of ``batch`` (the caller's mapping is not modified).

    Raises:
        InputError: ids or labels that are not integer tensors, or outside the vocabulary.
        ShapeError: ids that are not ``[batch, seq]``, a mask or labels of another shape.

    """
    out = dict(batch)
    ids = out["input_ids"] = _integer_tensor(batch, "input_ids", index, "token ids [batch, seq]")
    if ids.dim() != 2:
        raise ShapeError(f"Batch {index}: 'input_ids' has shape {list(ids.shape)}; expected [batch, seq] (2 dims).")
    _same_shape(batch, "attention_mask", ids, index)
    labels = _same_shape(batch, "labels", ids, index)
    if labels is not None:
        labels = out["labels"] = _integer_tensor(batch, "labels", index, "target ids")
    checks = []  # (key, tensor, the values to bound, size, what is expected)
    if vocab is not None:
        checks.append(("input_ids", ids, ids, vocab, f"ids in [0, {vocab}), the rows of the model's input embedding"))
    if labels is not None and classes is not None:
        expected = f"labels in [0, {classes}), the model's output classes, or {ignore_index} (no loss term)"
        checks.append(("labels", labels, labels.masked_fill(labels == ignore_index, 0), classes, expected))
    checks = [c for c in checks if c[1].numel()]
    if not checks:
        return out
    found = torch.stack([torch.stack(torch.aminmax(c[2])) for c in checks]).tolist()  # the one host sync
    for (key, t, values, size, expected), (lo, hi) in zip(checks, found):
        if lo < 0 or hi >= size:
            raise InputError(_out_of_range(index, key, t, values, (lo, hi), size, expected))
    return out


def _out_of_range(
    index: int, key: str, t: Tensor, values: Tensor, bounds: tuple[int, int], size: int, expected: str
) -> str:
    """The message of ids out of ``[0, size)``: the first offending position and value, the range found."""
    bad = ((values < 0) | (values >= size)).nonzero()[0].tolist()  # only on the error path
    value = int(t[tuple(bad)])
    return (
        f"Batch {index}: {key!r} {_describe(t)} holds {value} at position {bad} (min {bounds[0]}, max {bounds[1]}); "
        f"expected {expected}."
    )


def loss_without_grad(loss: Any, batch: Any, index: int) -> InputError:
    """The error for a ``loss_fn`` loss that autograd cannot differentiate, raised before its backward (docs/errors.md).

    The pass freezes the parameters and makes the input embedding's output the leaf of the backward
    (:func:`~kronfisher.collection.forward.activation_only_backward`); ``inputs_embeds`` fed to the model bypass
    that module, so unless they require grad nothing in the loss does.
    """
    if not isinstance(loss, Tensor):
        return InputError(f"Batch {index}: loss_fn returned a {type(loss).__name__} as the loss; expected a tensor.")
    embeds = batch.get("inputs_embeds") if isinstance(batch, Mapping) else None
    if isinstance(embeds, Tensor) and not embeds.requires_grad:
        return InputError(
            f"Batch {index}: 'inputs_embeds' {_describe(embeds)} has requires_grad=False, so the loss of loss_fn "
            "does not require grad (the parameters are frozen for the pass and inputs_embeds bypass the input "
            "embedding, where the backward starts); expected inputs_embeds.requires_grad_(True)."
        )
    return InputError(
        f"Batch {index}: the loss of loss_fn does not require grad (the parameters are frozen for the pass and the "
        "backward starts at the input embedding's output); expected a loss computed by the model with gradients "
        "enabled, from input ids or from inputs_embeds that require grad."
    )
