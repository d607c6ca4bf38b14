"""Tied weights: tracked layers whose weight is also another parameter (lm_head / embedding)."""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from ..errors import TiedWeightsWarning


# Tied weights -----------------------------------------------------------------------------------------------
def find_tied(model: nn.Module, infos: dict[str, Any]) -> dict[str, list[str]]:
    """Tracked layers whose weight is also registered under other names (tied lm_head / embedding).

    Returns:
        ``{layer: [other parameter names]}``, e.g. ``{"lm_head": ["model.embed_tokens.weight"]}``.

    """
    names_by_param: dict[int, list[str]] = {}
    for pname, param in model.named_parameters(remove_duplicate=False):
        names_by_param.setdefault(id(param), []).append(pname)
    tied: dict[str, list[str]] = {}
    for layer, info in infos.items():
        for group in names_by_param.values():
            if info.weight_name in group and len(group) > 1:
                tied[layer] = sorted(n for n in group if n != info.weight_name)
    return tied


def tied_message(tied: dict[str, list[str]]) -> str:
    """The warning text for tied layers (one message for the whole model)."""
    pairs = "; ".join(f"{layer!r} shares its weight with {others}" for layer, others in sorted(tied.items()))
    return (
        f"Tied weights: {pairs}. The curvature is that of the output-layer use only (the embedding use is "
        "not in the factors); natural gradients are returned under the layer's own parameter name."
    )


def note_tied(report: Any, tied: dict[str, list[str]]) -> None:
    """Record tied layers in ``report.tied`` / ``report.warnings`` and warn once per collection."""
    report.tied = dict(tied)
    if not tied:
        return
    msg = tied_message(tied)
    if msg not in report.warnings:
        report.warnings.append(msg)
        warnings.warn(msg, TiedWeightsWarning, stacklevel=3)
