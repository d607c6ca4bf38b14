"""Analysis of fitted curvature: per-layer metrics, model comparisons, plots and reports (``kronfisher analyze``).

Metrics are plain functions returning dicts (:mod:`.metrics`); :func:`analyze` runs the whole pipeline of the CLI.
"""

from __future__ import annotations

from .gradient import MeanGradient, mean_gradient
from .metrics import (
    compare_layer,
    condition_number,
    effective_rank,
    factor_spectrum,
    kron_spectrum,
    layer_metrics,
    layer_natural_gradient,
    layer_position,
    natural_gradients,
    subspace_overlap,
    top_share,
)
from .run import AnalyzeOptions, analyze

__all__ = [
    "AnalyzeOptions",
    "MeanGradient",
    "analyze",
    "compare_layer",
    "condition_number",
    "effective_rank",
    "factor_spectrum",
    "kron_spectrum",
    "layer_metrics",
    "layer_natural_gradient",
    "layer_position",
    "mean_gradient",
    "natural_gradients",
    "subspace_overlap",
    "top_share",
]
