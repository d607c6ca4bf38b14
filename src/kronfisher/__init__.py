"""kronfisher: Kronecker-factored (K-FAC / EK-FAC) Fisher approximations for transformer language models.

The public API (SPEC §10)::

    import kronfisher as kf
    cfg = kf.KFACConfig(fisher="empirical", approx="expand", ekfac=False, damping=1e-3)
    fisher = kf.fit(model, batches, cfg)
    fisher.natural_gradient(grads)
"""

from __future__ import annotations

from .config import KFACConfig
from .damping import Damping
from .errors import (
    ConfigError,
    DecompositionError,
    FileFormatError,
    FingerprintError,
    KronfisherError,
    NonFiniteError,
    ShapeError,
    SpectrumError,
)
from .fit import CaptureSession, capture, collect, fit
from .io import (
    SumsFile,
    inspect_file,
    load,
    load_sums,
    merge_files,
    model_fingerprint,
    read_metadata,
    save,
    save_sums,
    verify_file,
)
from .layers import LayerInfo, discover_layers
from .operator import KFAC

__version__ = "0.1.0"

__all__ = [
    "KFAC",
    "CaptureSession",
    "ConfigError",
    "Damping",
    "DecompositionError",
    "FileFormatError",
    "FingerprintError",
    "KFACConfig",
    "KronfisherError",
    "LayerInfo",
    "NonFiniteError",
    "ShapeError",
    "SpectrumError",
    "SumsFile",
    "__version__",
    "capture",
    "collect",
    "discover_layers",
    "fit",
    "inspect_file",
    "load",
    "load_sums",
    "merge_files",
    "model_fingerprint",
    "read_metadata",
    "save",
    "save_sums",
    "verify_file",
]
