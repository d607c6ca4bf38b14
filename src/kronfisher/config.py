"""Configuration as a frozen, validated dataclass (SPEC §10).

Every field carries help text in its metadata; the CLI and the docs read it from there. Invalid values raise
:class:`~kronfisher.errors.ConfigError` with a uniform message, for example
``Invalid fisher: 'x'. Supported: 'empirical', 'mc'.``
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ConfigError, ConfigWarning

_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


def resolve_dtype(value: str | torch.dtype, what: str, allowed: tuple[str, ...]) -> torch.dtype:
    """Turn a dtype name (or dtype) into a ``torch.dtype``, checking it is one of ``allowed``."""
    name = str(value).replace("torch.", "")
    if name not in allowed:
        raise ConfigError(f"Invalid {what}: {value!r}. Supported: {', '.join(repr(a) for a in allowed)}.")
    return _DTYPES[name]


def _choice(what: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"Invalid {what}: {value!r}. Supported: {', '.join(repr(a) for a in allowed)}.")


_BYTE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20}
_BYTE_UNITS.update({"gib": 2**30, "tib": 2**40})


def parse_bytes(value: int | float | str, what: str = "max_memory") -> int:
    """Bytes from an int or a string such as ``"20GiB"``, ``"500MB"`` or ``"1.5 GB"`` (``GB`` = 10⁹, ``GiB`` = 2³⁰)."""
    if isinstance(value, bool):
        raise ConfigError(f"Invalid {what}: {value!r}. Use bytes (int) or a size such as '20GiB' or '500MB'.")
    if isinstance(value, (int, float)):
        number, unit = float(value), "b"
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
        if m is None or (m.group(2) or "b").lower() not in _BYTE_UNITS:
            raise ConfigError(f"Invalid {what}: {value!r}. Use bytes (int) or a size such as '20GiB' or '500MB'.")
        number, unit = float(m.group(1)), (m.group(2) or "b").lower()
    size = int(number * _BYTE_UNITS[unit])
    if not size >= 1:
        raise ConfigError(f"Invalid {what}: {value!r}. Must be at least 1 byte.")
    return size


def _nonneg(what: str, value: float | None) -> None:
    if value is not None and not (float(value) >= 0.0):  # also rejects NaN
        raise ConfigError(f"Invalid {what}: {value!r}. Must be a finite number >= 0.")


@dataclass(frozen=True)
class KFACConfig:
    """All options of a K-FAC / EK-FAC fit. Field names and meanings are stable API (SPEC §10)."""

    fisher: str = _help("'empirical' (targets from the data) or 'mc' (sampled targets), SPEC §2.", default="empirical")
    mc_samples: int = _help("Number of sampled targets per loss term for fisher='mc'.", default=1)
    approx: str = _help("'expand' (tokens as samples, §3.1) or 'reduce' (weight sharing, §3.2).", default="expand")
    ekfac: bool = _help("Run the eigenvalue-correction pass (EK-FAC, George et al. 2018; SPEC §5).", default=False)
    ekfac_granularity: str = _help("'sequence' or 'token' per-sample gradients for EK-FAC (§5).", default="sequence")
    damping: float = _help("Damping δ (SPEC §4); damping_A / damping_G override it per factor.", default=1e-3)
    damping_A: float | None = _help("δ_A for factored damping (default: damping).", default=None)
    damping_G: float | None = _help("δ_G for factored damping (default: damping).", default=None)
    damping_mode: str = _help("'factored', 'pi' (Martens & Grosse 2015 §6.3) or 'exact' (§4).", default="factored")
    max_condition_number: float | None = _help("Optional condition-number cap κ applied after damping.", default=None)
    include: tuple[str, ...] = _help("Regexes; a layer is tracked if its name matches one (all if empty).", default=())
    exclude: tuple[str, ...] = _help("Regexes; a layer matching one is not tracked.", default=())
    loss_reduction: str = _help("Reduction of a user loss: 'mean' (rescaled by N) or 'sum'.", default="mean")
    ignore_index: int = _help("Label value without a loss term.", default=-100)
    accumulate_dtype: str = _help("dtype of the factor sums: 'float32' or 'float64'.", default="float32")
    eigh_dtype: str = _help(
        "dtype of eigendecompositions up to eigh_max_dim: 'float64' or 'float32'.", default="float64"
    )
    eigh_max_dim: int = _help("Factors larger than this are decomposed in float32.", default=8192)
    lowrank_threshold: int = _help("Layers with out > this keep G in low-rank form (SPEC §6).", default=8192)
    lowrank_layers: tuple[str, ...] = _help("Regexes of layers whose G is low-rank whatever their size.", default=())
    lowrank_dtype: str = _help(
        "Storage dtype of low-rank U: 'float32', 'bfloat16', 'float16' (or 'float64' for exact checks).",
        default="float32",
    )
    lowrank_max_rank: int | None = _help("Token budget of a low-rank G (top-k + isotropic tail).", default=None)
    lowrank_solver: str = _help(
        "p = -1 on low-rank layers: 'eigen' (eigenform, default) or 'woodbury' (factored/pi damping, no EK-FAC, "
        "no condition cap, no token budget; SPEC §6).",
        default="eigen",
    )
    on_nonfinite: str = _help("'raise' (default) or 'skip' a batch with non-finite values (§3.3).", default="raise")
    seed: int = _help("Seed of the generator used for MC targets.", default=0)
    max_dense_elements: int = _help("Largest dense matrix that to_dense/factors will build.", default=100_000_000)
    max_memory: int | str | Mapping[str, int | str] | None = _help(
        "Memory budget of the factors per device: bytes or a size such as '20GiB' / '500MB' (every device), or "
        "{device: size}. Default (None): what each device has free once the model is loaded, less its "
        "activations. Layers that do not fit together run in groups, each with its own passes (docs/concepts.md).",
        default=None,
    )

    def __post_init__(self) -> None:
        _choice("fisher", self.fisher, ("empirical", "mc"))
        _choice("approx", self.approx, ("expand", "reduce"))
        _choice("ekfac_granularity", self.ekfac_granularity, ("sequence", "token"))
        _choice("damping_mode", self.damping_mode, ("factored", "pi", "exact"))
        _choice("loss_reduction", self.loss_reduction, ("mean", "sum"))
        _choice("on_nonfinite", self.on_nonfinite, ("raise", "skip"))
        if not isinstance(self.ekfac, bool):
            raise ConfigError(f"Invalid ekfac: {self.ekfac!r}. Supported: True, False.")
        if not isinstance(self.mc_samples, int) or self.mc_samples < 1:
            raise ConfigError(f"Invalid mc_samples: {self.mc_samples!r}. Must be an integer >= 1.")
        for name in ("damping", "damping_A", "damping_G"):
            _nonneg(name, getattr(self, name))
        if self.max_condition_number is not None and not (float(self.max_condition_number) >= 1.0):
            raise ConfigError(f"Invalid max_condition_number: {self.max_condition_number!r}. Must be >= 1.")
        resolve_dtype(self.accumulate_dtype, "accumulate_dtype", ("float32", "float64"))
        resolve_dtype(self.eigh_dtype, "eigh_dtype", ("float32", "float64"))
        resolve_dtype(self.lowrank_dtype, "lowrank_dtype", ("float32", "bfloat16", "float16", "float64"))
        _choice("lowrank_solver", self.lowrank_solver, ("eigen", "woodbury"))
        if self.lowrank_solver == "woodbury":
            clash = [
                what
                for what, bad in (
                    ("ekfac=True", self.ekfac),
                    (f"damping_mode={self.damping_mode!r}", self.damping_mode == "exact"),
                    ("max_condition_number", self.max_condition_number is not None),
                    ("lowrank_max_rank (compressed tail)", self.lowrank_max_rank is not None),
                )
                if bad
            ]
            if clash:
                raise ConfigError(
                    f"Invalid lowrank_solver: 'woodbury' needs (G + δ_G) ⊗ (A + δ_A) with an uncompressed U; "
                    f"incompatible with {', '.join(clash)}. Use lowrank_solver='eigen'."
                )
        if self.ekfac:
            ignored = [
                what
                for what, set_ in (
                    (f"damping_mode={self.damping_mode!r}", self.damping_mode == "pi"),
                    ("damping_A", self.damping_A is not None),
                    ("damping_G", self.damping_G is not None),
                )
                if set_
            ]
            if ignored:  # SPEC §5: corrected eigenvalues are not a Kronecker product; δ is added to each
                warnings.warn(
                    f"With ekfac=True the corrected eigenvalues are damped additively (Λ* + damping); "
                    f"{', '.join(ignored)} has no effect.",
                    ConfigWarning,
                    stacklevel=3,
                )
        for name in ("lowrank_threshold", "eigh_max_dim", "max_dense_elements"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"Invalid {name}: {value!r}. Must be an integer >= 1.")
        if self.lowrank_max_rank is not None and (
            not isinstance(self.lowrank_max_rank, int) or self.lowrank_max_rank < 1
        ):
            raise ConfigError(f"Invalid lowrank_max_rank: {self.lowrank_max_rank!r}. Must be an integer >= 1.")
        if isinstance(self.max_memory, Mapping):
            budgets = {str(k): parse_bytes(v, f"max_memory[{k!r}]") for k, v in self.max_memory.items()}
            object.__setattr__(self, "max_memory", budgets)
        elif self.max_memory is not None:
            object.__setattr__(self, "max_memory", parse_bytes(self.max_memory))
        for name in ("include", "exclude", "lowrank_layers"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, (value,))
            elif not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))

    # Resolved values -------------------------------------------------------------------------------------
    @property
    def accumulate_torch_dtype(self) -> torch.dtype:
        """The accumulation dtype as a ``torch.dtype``."""
        return _DTYPES[self.accumulate_dtype]

    @property
    def eigh_torch_dtype(self) -> torch.dtype:
        """The eigendecomposition dtype as a ``torch.dtype``."""
        return _DTYPES[self.eigh_dtype]

    @property
    def lowrank_torch_dtype(self) -> torch.dtype:
        """The storage dtype of low-rank ``U`` as a ``torch.dtype``."""
        return _DTYPES[self.lowrank_dtype]

    def factor_damping(self) -> tuple[float, float]:
        """``(δ_A, δ_G)`` for factored damping (SPEC §4)."""
        d_a = self.damping if self.damping_A is None else self.damping_A
        d_g = self.damping if self.damping_G is None else self.damping_G
        return float(d_a), float(d_g)

    def replace(self, **changes: Any) -> KFACConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict of every field."""
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KFACConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError`."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"Unknown KFACConfig fields: {unknown}. Supported: {sorted(names)}.")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**kwargs)
