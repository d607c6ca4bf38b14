"""Tracked layers: discovery and one adapter per layer kind (docs/concepts.md).

A tracked layer applies ``y = W x + b`` to the last input dimension. ``nn.Linear`` stores ``W`` as
``[out, in]``; transformers' ``Conv1D`` (GPT-2 family) stores it as ``[in, out]``. Everything past this module
works on the combined matrix ``V = [W | b]`` of shape ``[out, in + 1]`` (``[out, in]`` without bias), so the
Kronecker block is ``G ⊗ A`` over the row-major flattening of ``V``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import ConfigError, ShapeError

try:  # transformers is optional; GPT-2 style Conv1D is tracked when it is installed
    from transformers.pytorch_utils import Conv1D as _HFConv1D
except Exception:  # pragma: no cover - exercised only without transformers
    _HFConv1D = None


@dataclass(frozen=True)
class LayerInfo:
    """Static description of one tracked layer (plain data, no module reference).

    Attributes:
        name: qualified module name.
        kind: ``"linear"`` or ``"conv1d"``.
        in_features: input dimension ``in``.
        out_features: output dimension ``out``.
        has_bias: whether the module has a bias (then ``A`` is augmented).
        weight_name: qualified parameter name of the weight.
        bias_name: qualified parameter name of the bias, or None.

    """

    name: str
    kind: str
    in_features: int
    out_features: int
    has_bias: bool
    weight_name: str
    bias_name: str | None

    @property
    def a_dim(self) -> int:
        """Dimension of ``A``: ``in + 1`` with a bias, ``in`` otherwise."""
        return self.in_features + int(self.has_bias)

    @property
    def v_shape(self) -> tuple[int, int]:
        """Shape of the combined matrix ``V``."""
        return (self.out_features, self.a_dim)

    def to_dict(self) -> dict:
        """JSON-serialisable form."""
        return dict(self.__dict__)


def layer_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"conv1d"`` or None when the module is not a tracked kind."""
    if isinstance(module, nn.Linear):
        return "linear"
    if _HFConv1D is not None and isinstance(module, _HFConv1D):
        return "conv1d"
    return None


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(re.search(p, name) for p in patterns)


def _compile_all(patterns: tuple[str, ...], what: str) -> None:
    for p in patterns:
        try:
            re.compile(p)
        except re.error as err:
            raise ConfigError(f"Invalid {what} regex {p!r}: {err}.") from err


@dataclass
class Discovery:
    """Result of :func:`discover_layers`.

    Attributes:
        modules: tracked module by name (in model order).
        infos: :class:`LayerInfo` by name.
        skipped: reason by name for affine layers that were excluded or frozen.

    """

    modules: dict[str, nn.Module]
    infos: dict[str, LayerInfo]
    skipped: dict[str, str]


def discover_layers(model: nn.Module, include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> Discovery:
    """Find the tracked layers of ``model`` (docs/concepts.md).

    Args:
        model: any module.
        include: regexes; when non-empty a layer is tracked only if its name matches one.
        exclude: regexes; a matching layer is not tracked.

    Returns:
        The tracked modules, their static infos and the skipped layers with a reason. A layer whose weight does
        not require grad is skipped (reported, never an error).

    """
    _compile_all(include, "include")
    _compile_all(exclude, "exclude")
    modules: dict[str, nn.Module] = {}
    infos: dict[str, LayerInfo] = {}
    skipped: dict[str, str] = {}
    for name, module in model.named_modules():
        kind = layer_kind(module)
        if kind is None:
            continue
        if include and not _matches(name, include):
            skipped[name] = "not matched by include"
            continue
        if exclude and _matches(name, exclude):
            skipped[name] = "matched by exclude"
            continue
        if not module.weight.requires_grad:
            skipped[name] = "weight does not require grad (frozen)"
            continue
        w = module.weight
        in_f, out_f = (w.shape[1], w.shape[0]) if kind == "linear" else (w.shape[0], w.shape[1])
        bias = getattr(module, "bias", None)
        prefix = f"{name}." if name else ""
        infos[name] = LayerInfo(
            name=name,
            kind=kind,
            in_features=int(in_f),
            out_features=int(out_f),
            has_bias=bias is not None,
            weight_name=f"{prefix}weight",
            bias_name=f"{prefix}bias" if bias is not None else None,
        )
        modules[name] = module
    return Discovery(modules=modules, infos=infos, skipped=skipped)


def param_shape(info: LayerInfo, which: str) -> tuple[int, ...]:
    """Shape of the layer's weight (``which="weight"``) or bias as the module stores it."""
    if which == "bias":
        return (info.out_features,)
    if info.kind == "conv1d":
        return (info.in_features, info.out_features)
    return (info.out_features, info.in_features)


def _check_shape(info: LayerInfo, which: str, name: str, tensor: Tensor) -> None:
    expected = param_shape(info, which)
    if tuple(tensor.shape) != expected:
        raise ShapeError(
            f"Parameter {name!r} of layer {info.name!r}: expected shape {list(expected)}, got {list(tensor.shape)}."
        )


def combine(info: LayerInfo, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Build ``V = [W | b]`` (``[out, in(+1)]``) from tensors with the parameters' shapes (docs/concepts.md).

    A layer with a bias whose tensor is missing gets a zero column (the augmented form is kept, so a frozen bias
    still gives the layer's full Kronecker block).
    """
    _check_shape(info, "weight", info.weight_name, weight)
    w = weight.t() if info.kind == "conv1d" else weight
    if not info.has_bias:
        if bias is not None:
            raise ShapeError(f"Layer {info.name!r} has no bias, but a bias tensor was given.")
        return w
    if bias is None:
        col = torch.zeros(info.out_features, 1, dtype=w.dtype, device=w.device)
    else:
        _check_shape(info, "bias", info.bias_name or "bias", bias)
        col = bias.reshape(-1, 1).to(dtype=w.dtype, device=w.device)
    return torch.cat([w, col], dim=1)


def split(info: LayerInfo, v: Tensor) -> tuple[Tensor, Tensor | None]:
    """Inverse of :func:`combine`: weight in the module's layout and bias (or None)."""
    if tuple(v.shape) != info.v_shape:
        raise ShapeError(f"Layer {info.name!r}: combined matrix must be {list(info.v_shape)}, got {list(v.shape)}.")
    w = v[:, : info.in_features]
    w = w.t().contiguous() if info.kind == "conv1d" else w.contiguous()
    b = v[:, info.in_features].contiguous() if info.has_bias else None
    return w, b
