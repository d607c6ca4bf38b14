"""Exception classes: every error names the layer, the shape or the file it is about."""

from __future__ import annotations

from collections.abc import Sequence


class KronfisherError(Exception):
    """Base class of every error raised by kronfisher."""


class ConfigError(KronfisherError, ValueError):
    """An invalid configuration value (docs/library.md)."""


class ShapeError(KronfisherError, ValueError):
    """A tensor whose shape does not match the layer or parameter it is meant for."""


class VectorError(KronfisherError, TypeError):
    """A vector given to an operator that it cannot use: not a tensor, not real floating point, or without data."""


class NonFiniteError(KronfisherError, FloatingPointError):
    """Non-finite activations or output gradients in a batch (docs/concepts.md).

    Attributes:
        layers: names of the layers whose contributions were non-finite.
        batch: index of the offending batch.

    """

    def __init__(self, message: str, layers: list[str], batch: int) -> None:
        super().__init__(message)
        self.layers = layers
        self.batch = batch


class NoFactorsError(KronfisherError, ValueError):
    """A collection that gave no layer any factor, instead of an empty operator.

    The message says why: no batches, no attended token with a loss term, every batch skipped as non-finite, or no
    tracked layer on the path to the loss.
    """


class DecompositionError(KronfisherError, ArithmeticError):
    """An eigendecomposition that cannot be trusted (non-finite factor, failed eigh)."""


class SpectrumError(KronfisherError, ArithmeticError):
    """A negative power of a damped spectrum that is not positive, or a power whose result overflows."""


class FileFormatError(KronfisherError, OSError):
    """A factor file that cannot be used: not a kronfisher file, damaged, of a newer format, or incompatible.

    Attributes:
        hint: one line suggesting a fix, or None.

    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class CorruptedFileError(FileFormatError):
    """A factor file damaged after it was written: truncated, or bytes changed.

    A checksum, the JSON header or the tensor index no longer agree. A file of another format, or one this version
    cannot use, is a plain :class:`FileFormatError`.
    """


class FingerprintError(FileFormatError):
    """A factor file whose layers do not match the model (shapes or weights), or files of different weights.

    Attributes:
        mismatched: list of ``(layer, expected, found)`` describing each mismatch.

    """

    def __init__(self, message: str, mismatched: Sequence[tuple[str, str, str]] = (), hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.mismatched = list(mismatched)


class KronfisherWarning(UserWarning):
    """Base class of every warning issued by kronfisher."""


class NumericalWarning(KronfisherWarning):
    """A numerical fallback was taken (e.g. Woodbury's Cholesky failed and eigh was used)."""


class ConfigWarning(KronfisherWarning):
    """A valid configuration with a setting that has no effect (e.g. per-factor damping with EK-FAC)."""


class PlacementWarning(KronfisherWarning):
    """A factor's work moved from the accelerator to CPU after a real out-of-memory error (docs/concepts.md)."""


class TiedWeightsWarning(KronfisherWarning):
    """A tracked layer shares its weight with another parameter (tied lm_head / embedding)."""


class InputError(KronfisherError, ValueError):
    """A user input that cannot be used (a command-line argument, a batch): the message says what, ``hint`` what to do.

    Attributes:
        hint: one line suggesting a fix, or None.

    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class ModelLoadError(InputError):
    """A model that cannot be loaded: missing folder or file, offline hub id, unsupported format (docs/files.md)."""


class DataError(InputError):
    """Text data that cannot be read or yields no tokens (missing file, bad JSONL field, empty dataset)."""


class MemoryBudgetError(ConfigError):
    """A memory budget (``max_memory``) too small for even one layer: the message names the layer and the bytes."""


class WriteError(KronfisherError, OSError):
    """A file that could not be written: no space left, a read-only or unwritable folder (``docs/errors.md``).

    The message names the file and the cause in one line; ``needed`` and ``free`` say how much space the write
    needed and how much was left, when the cause is a full disk.

    Attributes:
        path: the file that could not be written.
        needed: bytes the write needed (None when unknown).
        free: bytes free on the file system of ``path`` when it failed (None when unknown).
        hint: one line suggesting a fix, or None.

    """

    def __init__(
        self,
        message: str,
        *,
        path: str,
        errno_code: int | None = None,
        needed: int | None = None,
        free: int | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.path = path
        self.errno_code = errno_code
        self.needed = needed
        self.free = free
        self.hint = hint
