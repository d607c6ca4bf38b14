"""Configuration as a frozen dataclass, validated field by field at construction.

Every field carries its rule in its metadata: help text, the allowed values (a
:class:`~kronfisher.options.Rule`), whether the value changes what the accumulated sums mean (``sums``), and the
command-line flag that sets it (``cli``). The command line is generated from this metadata, and the files use it to
decide which sums can be merged. An invalid value raises :class:`~kronfisher.errors.ConfigError` with one line
naming the field, the value and what is allowed, e.g. ``Invalid fisher: 'x'. Supported: 'empirical', 'mc'.``

Values are stored in one canonical form: choices as :class:`~kronfisher.options.Choice` members (strings that
compare, hash and print as their plain value), dtypes as their names (``torch.float64`` and ``'torch.float64'``
become ``'float64'``), numbers as ``int`` / ``float``, regexes as tuples of strings (compiled once here, so a bad
pattern fails at construction). :meth:`KFACConfig.to_dict` gives plain JSON values.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ConfigError, ConfigWarning
from .options import (
    Approx,
    Choice,
    DampingMode,
    Fisher,
    Granularity,
    LowRankSolver,
    OnNonFinite,
    Reduction,
    Rule,
    check_number,
    parse_bytes,
)

__all__ = [
    "Approx",
    "Choice",
    "DampingMode",
    "Fisher",
    "Granularity",
    "KFACConfig",
    "LowRankSolver",
    "OnNonFinite",
    "Reduction",
    "Rule",
    "check_number",
    "config_fields",
    "parse_bytes",
    "sum_fields",
]

_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}


def _meta(help_: str, rule: Rule, *, sums: bool = False, cli: str | None = None, **extra: Any) -> dict[str, Any]:
    """A field's metadata. ``sums``: the value changes what the sums mean; ``cli``: its command-line flag."""
    return {"help": help_, "rule": rule, "sums": sums, "cli": cli, **extra}


_CHOICE = {e: Rule("choice", enum=e) for e in (Fisher, Approx, Granularity, DampingMode, Reduction)}
_NONNEG = Rule("real", low=0.0)
_NONNEG_OPT = Rule("real", low=0.0, optional=True, none_means="use damping")
_POSINT = Rule("int", low=1)
_REGEXES = Rule("regexes")
_FLOAT_NAMES = ("float32", "float64")


@dataclass(frozen=True)
class KFACConfig:
    """All options of a K-FAC / EK-FAC fit. Field names and meanings are stable API."""

    fisher: Fisher = field(
        default=Fisher.EMPIRICAL,
        metadata=_meta(
            "Fisher type: 'empirical' (targets from the data) or 'mc' (targets sampled from the model; Kunstner et al. "
            "2019 on why they differ).",
            _CHOICE[Fisher],
            sums=True,
            cli="--fisher",
        ),
    )
    mc_samples: int = field(
        default=1,
        metadata=_meta("Sampled targets per loss term for fisher='mc'.", _POSINT, sums=True, cli="--mc-samples"),
    )
    approx: Approx = field(
        default=Approx.EXPAND,
        metadata=_meta(
            "K-FAC approximation for weight sharing (Eschenhagen et al. 2023): 'expand' (tokens as samples) or "
            "'reduce' (a sequence's tokens summed).",
            _CHOICE[Approx],
            sums=True,
            cli="--approx",
        ),
    )
    ekfac: bool = field(
        default=False,
        metadata=_meta(
            "Run the eigenvalue-correction pass (EK-FAC, George et al. 2018): a second pass over the data.",
            Rule("flag"),
            cli="--ekfac",
        ),
    )
    ekfac_granularity: Granularity = field(
        default=Granularity.SEQUENCE,
        metadata=_meta("Per-sample gradients of the EK-FAC pass: 'sequence' or 'token'.", _CHOICE[Granularity]),
    )
    damping: float = field(
        default=1e-3,
        metadata=_meta(
            "Damping δ added to the curvature (F + δI); damping_A / damping_G override it per factor.",
            _NONNEG,
            cli="--damping",
        ),
    )
    damping_A: float | None = field(
        default=None, metadata=_meta("δ_A for factored damping (default: damping).", _NONNEG_OPT)
    )
    damping_G: float | None = field(
        default=None, metadata=_meta("δ_G for factored damping (default: damping).", _NONNEG_OPT)
    )
    damping_mode: DampingMode = field(
        default=DampingMode.FACTORED,
        metadata=_meta(
            "'factored' ((G + δ_G) ⊗ (A + δ_A)), 'pi' (the same with π scaling, Martens & Grosse 2015 §6.3) or 'exact' "
            "(G ⊗ A + δ, in the Kronecker eigenbasis).",
            _CHOICE[DampingMode],
            cli="--damping-mode",
        ),
    )
    max_condition_number: float | None = field(
        default=None,
        metadata=_meta(
            "Optional condition-number cap κ applied after damping.",
            Rule("real", low=1.0, optional=True, none_means="no cap"),
        ),
    )
    include: tuple[str, ...] = field(
        default=(),
        metadata=_meta(
            "Regexes; a layer is tracked only if its name matches one (all layers if none).",
            _REGEXES,
            sums=True,
            cli="--include",
        ),
    )
    exclude: tuple[str, ...] = field(
        default=(),
        metadata=_meta("Regexes; a layer whose name matches one is not tracked.", _REGEXES, sums=True, cli="--exclude"),
    )
    loss_reduction: Reduction = field(
        default=Reduction.MEAN,
        metadata=_meta(
            "Reduction of a user loss: 'mean' (rescaled by the number of terms) or 'sum'.",
            _CHOICE[Reduction],
            sums=True,
        ),
    )
    ignore_index: int = field(default=-100, metadata=_meta("Label value without a loss term.", Rule("int"), sums=True))
    accumulate_dtype: str = field(
        default="float32",
        metadata=_meta(
            "dtype of the factor sums.", Rule("dtype", names=_FLOAT_NAMES), sums=True, cli="--accumulate-dtype"
        ),
    )
    eigh_dtype: str = field(
        default="float64",
        metadata=_meta(
            "dtype of eigendecompositions of factors up to eigh_max_dim.",
            Rule("dtype", names=_FLOAT_NAMES),
            cli="--eigh-dtype",
        ),
    )
    eigh_max_dim: int = field(
        default=8192,
        metadata=_meta(
            "Factors larger than this are decomposed in float32 (faster, noisier small eigenvalues).",
            _POSINT,
            cli="--eigh-max-dim",
        ),
    )
    eigh_batched: bool | None = field(
        default=None,
        metadata=_meta(
            "Equal-sized dense factors on an accelerator in batched eighs, the host's threads decomposing a share "
            "concurrently (docs/gpu.md).",
            Rule("flag", optional=True, none_means="on for CUDA, off elsewhere"),
        ),
    )
    eigh_refine: bool = field(
        default=False,
        metadata=_meta(
            "One float64 refinement step after each float32 eigendecomposition (eigh_dtype='float32' or larger than "
            "eigh_max_dim; Ogita & Aishima 2018); small eigenvalues keep float32's absolute error (docs/gpu.md).",
            Rule("flag"),
        ),
    )
    lowrank_threshold: int = field(
        default=8192,
        metadata=_meta(
            "Layers with more outputs than this may keep G low-rank: exact while the planned tokens are below 0.9 out, "
            "dense beyond; the lowrank_max_rank budget only when a dense G does not fit in max_memory.",
            _POSINT,
            sums=True,
            cli="--lowrank-threshold",
        ),
    )
    lowrank_layers: tuple[str, ...] = field(
        default=(),
        metadata=_meta(
            "Regexes of layers whose G is low-rank whatever their size.", _REGEXES, sums=True, cli="--lowrank-layers"
        ),
    )
    lowrank_dtype: str = field(
        default="float32",
        metadata=_meta(
            "Storage dtype of the low-rank U ('float64' for exact checks).",
            Rule("dtype", names=("float32", "bfloat16", "float16", "float64")),
            sums=True,
        ),
    )
    lowrank_max_rank: int | None = field(
        default=512,
        metadata=_meta(
            "Token budget of a low-rank G: the top eigenpairs kept, plus an isotropic tail that keeps the exact trace "
            "(huge output layers such as lm_head). Keeping every token makes memory grow with the tokens.",
            Rule("int", low=1, optional=True, none_means="keep every token"),
            sums=True,
            cli="--lowrank-rank",
            cli_default=512,
        ),
    )
    lowrank_solver: LowRankSolver = field(
        default=LowRankSolver.EIGEN,
        metadata=_meta(
            "p = -1 on low-rank layers: 'eigen' (eigenform) or 'woodbury' (factored/pi damping, no EK-FAC, no "
            "condition cap, no token budget).",
            Rule("choice", enum=LowRankSolver),
        ),
    )
    on_nonfinite: OnNonFinite = field(
        default=OnNonFinite.RAISE,
        metadata=_meta(
            "'raise' on, or 'skip', a batch with non-finite activations or output gradients.",
            Rule("choice", enum=OnNonFinite),
        ),
    )
    seed: int = field(
        default=0, metadata=_meta("Seed of the MC targets and of any other randomness.", Rule("int"), cli="--seed")
    )
    max_dense_elements: int = field(
        default=100_000_000, metadata=_meta("Largest dense matrix that to_dense / factors will build.", _POSINT)
    )
    max_memory: int | str | Mapping[str, int | str] | None = field(
        default=None,
        metadata=_meta(
            "Memory the run may use per device: bytes or a size such as '20GiB' / '500MB' (every device), or "
            "{device: size}; the model's weights there and one batch's activations count in it, the factors get the "
            "rest. Default (None): what each device has free once the model is loaded, less the activations. Layers "
            "that do not fit together run in groups, each with its own passes (docs/concepts.md).",
            Rule("bytes", optional=True, none_means="what each device has free"),
            cli="--max-memory",
        ),
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, f.metadata["rule"].check(f.name, getattr(self, f.name)))
        self._check_woodbury()
        self._warn_ekfac_damping()

    def _check_woodbury(self) -> None:
        if self.lowrank_solver != LowRankSolver.WOODBURY:
            return
        clash = [
            what
            for what, bad in (
                ("ekfac=True", self.ekfac),
                (f"damping_mode={self.damping_mode!r}", self.damping_mode == DampingMode.EXACT),
                ("max_condition_number", self.max_condition_number is not None),
            )
            if bad
        ]
        if clash:
            raise ConfigError(
                f"Invalid lowrank_solver: 'woodbury' needs (G + δ_G) ⊗ (A + δ_A) with an uncompressed U; "
                f"incompatible with {', '.join(clash)}. Use lowrank_solver='eigen'."
            )

    def _warn_ekfac_damping(self) -> None:
        if not self.ekfac:
            return
        ignored = [
            what
            for what, set_ in (
                (f"damping_mode={self.damping_mode!r}", self.damping_mode == DampingMode.PI),
                ("damping_A", self.damping_A is not None),
                ("damping_G", self.damping_G is not None),
            )
            if set_
        ]
        if ignored:  # corrected eigenvalues are not a Kronecker product, so δ is added to each of them
            warnings.warn(
                f"With ekfac=True the corrected eigenvalues are damped additively (Λ* + damping); "
                f"{', '.join(ignored)} has no effect.",
                ConfigWarning,
                stacklevel=4,
            )

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
        """``(δ_A, δ_G)`` for factored damping: each defaults to ``damping``."""
        d_a = self.damping if self.damping_A is None else self.damping_A
        d_g = self.damping if self.damping_G is None else self.damping_G
        return float(d_a), float(d_g)

    def replace(self, **changes: Any) -> KFACConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict of every field (choices as plain strings, tuples as lists)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Choice):
                value = value.value
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, dict):
                value = dict(value)
            out[f.name] = value
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


def config_fields() -> Iterator[dataclasses.Field[Any]]:
    """The fields of :class:`KFACConfig`, each with ``help``, ``rule``, ``sums`` and ``cli`` in its metadata."""
    return iter(dataclasses.fields(KFACConfig))


def sum_fields() -> tuple[str, ...]:
    """Names of the fields that change what the accumulated sums mean: files that differ in one cannot be merged."""
    return tuple(f.name for f in config_fields() if f.metadata["sums"])
