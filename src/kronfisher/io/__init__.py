"""Factor files: safetensors tensors plus JSON metadata, atomic writes, raw sums, merge (docs/files.md).

``kronfisher.io`` re-exports the names users import from it.
"""

from __future__ import annotations

from .files import inspect_file, load, read_metadata, save, verify_file
from .fingerprint import check_fingerprint, check_model, model_fingerprint
from .merge import merge_files
from .sums import SumsFile, load_sums, save_sums

__all__ = [
    "SumsFile",
    "check_fingerprint",
    "check_model",
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
