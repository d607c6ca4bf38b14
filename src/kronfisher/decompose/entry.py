"""The one entry point of decomposition: local threads, or spread over ranks under ``torchrun``."""

from __future__ import annotations

from collections.abc import Callable

from ..algebra.block import KronBlock
from ..collection.sums import LayerSums
from ..comm import is_distributed
from ..config import KFACConfig
from .local import decompose_local
from .spread import decompose_spread


def decompose_all(
    sums: dict[str, LayerSums],
    cfg: KFACConfig,
    *,
    spread: bool = False,
    on_layer: Callable[[str], None] | None = None,
    release: bool = False,
) -> dict[str, KronBlock]:
    """Decompose every layer's factors into a :class:`~kronfisher.algebra.block.KronBlock`.

    Identical ``A`` sums (q/k/v, gate/up) are decomposed once and shared. With ``spread=True`` and a process group,
    the eigendecompositions are spread over ranks by cost and broadcast (docs/distributed.md); every rank must then
    call this together. ``on_layer(name)`` is called once per layer as soon as its factors are decomposed.
    ``release=True``: each dense sum is freed as soon as it is decomposed (in this process's decomposition;
    spread over ranks, the sums are freed by the caller afterwards).
    """
    if spread and is_distributed():
        blocks = decompose_spread(sums, cfg)
        if on_layer is not None:
            for name in blocks:
                on_layer(name)
        return blocks
    return decompose_local(sums, cfg, on_layer=on_layer, release=release)
