"""kronfisher: Kronecker-factored (K-FAC / EK-FAC) Fisher approximations for transformer language models.

The public API (docs/library.md)::

    import kronfisher as kf
    cfg = kf.KFACConfig(fisher="empirical", approx="expand", ekfac=False, damping=1e-3)
    fisher = kf.fit(model, batches, cfg)
    fisher.natural_gradient(grads)
"""

from __future__ import annotations

from ._version import __version__
from .algebra.damping import Damping
from .config import KFACConfig
from .drivers.fit import CaptureSession, capture, collect
from .drivers.groups import fit
from .errors import (
    ConfigError,
    CorruptedFileError,
    DecompositionError,
    FileFormatError,
    FingerprintError,
    KronfisherError,
    NonFiniteError,
    ShapeError,
    SpectrumError,
)
from .io.files import inspect_file, load, read_metadata, save, verify_file
from .io.fingerprint import model_fingerprint
from .io.merge import merge_files
from .io.sums import SumsFile, load_sums, save_sums
from .layers import LayerInfo, discover_layers
from .operator import KFAC

__all__ = [
    "KFAC",
    "CaptureSession",
    "ConfigError",
    "CorruptedFileError",
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
