"""What a configuration value may be: choice enums and the rule each field is checked against.

A :class:`Rule` checks one value, returns it in its canonical form and says what is allowed, in one line naming the
field and the value (``Invalid fisher: 'x'. Supported: 'empirical', 'mc'.``). The command line reads its values
through the same rules, so the library and the ``kronfisher`` command accept exactly the same things.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch

from .errors import ConfigError

NONE_WORDS = ("all", "none")  # command-line spellings of None ("no limit") for optional integers
_BYTE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20}
_BYTE_UNITS.update({"gib": 2**30, "tib": 2**40})
_SIZE_HELP = "bytes (int) or a size such as '20GiB' or '500MB'"


class Choice(str, Enum):
    """A string option: equal to, hashed like and printed as its plain value, so ``cfg.fisher == "mc"`` holds."""

    __hash__ = str.__hash__

    def __str__(self) -> str:
        return str(self.value)

    def __repr__(self) -> str:
        return repr(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class Fisher(Choice):
    """Targets of the Fisher: the data (empirical) or samples from the model (Monte Carlo)."""

    EMPIRICAL = "empirical"
    MC = "mc"


class Approx(Choice):
    """K-FAC for weight sharing (Eschenhagen et al. 2023): tokens as samples, or summed over a sequence."""

    EXPAND = "expand"
    REDUCE = "reduce"


class Granularity(Choice):
    """Per-sample gradients of the EK-FAC pass: one per sequence or one per token."""

    SEQUENCE = "sequence"
    TOKEN = "token"


class DampingMode(Choice):
    """How damping enters: per factor, per factor scaled by π (Martens & Grosse 2015 §6.3), or on F itself."""

    FACTORED = "factored"
    PI = "pi"
    EXACT = "exact"


class Reduction(Choice):
    """Reduction of a user loss over its terms."""

    MEAN = "mean"
    SUM = "sum"


class LowRankSolver(Choice):
    """``p = -1`` on low-rank layers: the eigenform or the Woodbury identity."""

    EIGEN = "eigen"
    WOODBURY = "woodbury"


class OnNonFinite(Choice):
    """What a batch with non-finite activations or output gradients does."""

    RAISE = "raise"
    SKIP = "skip"


def _number(value: Any) -> Any:
    """A 0-d tensor as its Python number; anything else unchanged."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_meta and not value.is_complex():
        return value.item()
    return value


@dataclass(frozen=True)
class Rule:
    """What a field accepts, how it is stored, and how the command line reads it.

    Attributes:
        kind: ``"choice"``, ``"flag"`` (bool), ``"int"``, ``"real"`` (finite float), ``"dtype"``, ``"regexes"`` or
            ``"bytes"`` (a size, or a ``{device: size}`` mapping; see :func:`parse_bytes`).
        enum: the :class:`Choice` of a choice field.
        names: the allowed dtype names of a dtype field.
        low: smallest allowed number (inclusive), or None for any.
        optional: None is allowed (it means what ``none_means`` says).
        none_means: meaning of None, for messages and help.

    """

    kind: str
    enum: type[Choice] | None = None
    names: tuple[str, ...] = ()
    low: float | None = None
    optional: bool = False
    none_means: str = ""

    @property
    def options(self) -> tuple[str, ...]:
        """The plain string values of a choice or dtype field."""
        return tuple(m.value for m in self.enum) if self.enum is not None else self.names

    def expected(self, none_word: str = "None") -> str:
        """What is allowed, as a phrase: ``"a finite number >= 0"``, ``"an integer >= 1 or None (keep all)"``."""
        if self.kind == "int":
            text = "an integer" + ("" if self.low is None else f" >= {self.low:g}")
        elif self.kind == "real":
            text = "a finite number" + ("" if self.low is None else f" >= {self.low:g}")
        elif self.kind == "regexes":
            text = "a regex string or a sequence of regex strings"
        elif self.kind == "bytes":
            text = f"{_SIZE_HELP}, or {{device: size}}"
        else:
            text = ", ".join(repr(o) for o in self.options)
        return f"{text} or {none_word} ({self.none_means})" if self.optional else text

    def fail(self, name: str, value: Any) -> ConfigError:
        """The uniform error for an invalid ``value`` of field ``name``."""
        if self.kind in ("choice", "dtype"):
            tail = " (as a name or a torch.dtype)" if self.kind == "dtype" else ""
            return ConfigError(f"Invalid {name}: {value!r}. Supported: {self.expected()}{tail}.")
        if self.kind == "flag":
            return ConfigError(f"Invalid {name}: {value!r}. Supported: True, False.")
        return ConfigError(f"Invalid {name}: {value!r}. Must be {self.expected()}.")

    def check(self, name: str, value: Any) -> Any:
        """``value`` in its canonical form, or :class:`ConfigError` naming the field, the value and the rule."""
        if value is None and self.optional:
            return None
        if self.kind == "choice" and self.enum is not None:
            if isinstance(value, str) and value in self.options:
                return self.enum(value)
        elif self.kind == "flag":
            if isinstance(value, bool):
                return value
        elif self.kind == "dtype":
            name_ = str(value).removeprefix("torch.") if isinstance(value, (str, torch.dtype)) else None
            if name_ in self.names:
                return name_
        elif self.kind == "regexes":
            return _regexes(name, value, self)
        elif self.kind == "bytes":
            if isinstance(value, Mapping):
                return {str(k): parse_bytes(v, f"{name}[{k!r}]") for k, v in value.items()}
            return parse_bytes(value, name)
        else:
            return self._check_number(name, _number(value), value)
        raise self.fail(name, value)

    def _check_number(self, name: str, value: Any, given: Any) -> int | float:
        """``value`` (a 0-d tensor already unwrapped) as int / float; messages show the ``given`` value."""
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise self.fail(name, given)
        if self.kind == "int":
            if not isinstance(value, numbers.Integral):
                raise self.fail(name, given)
            value = int(value)
        else:
            value = float(value)
            if not math.isfinite(value):
                raise self.fail(name, given)
        if self.low is not None and value < self.low:
            raise self.fail(name, given)
        return value

    def from_text(self, name: str, text: str) -> Any:
        """Read a command-line value: numbers from their text, ``'all'`` / ``'none'`` as None when optional."""
        if self.optional and text.strip().lower() in NONE_WORDS:
            return None
        if self.kind in ("int", "real"):
            try:
                value: Any = int(text) if self.kind == "int" else float(text)
            except ValueError:
                raise self.fail(name, text) from None
            return self.check(name, value)
        return self.check(name, text)


def parse_bytes(value: Any, what: str = "max_memory") -> int:
    """Bytes from an int or a string such as ``"20GiB"``, ``"500MB"`` or ``"1.5 GB"`` (``GB`` = 10⁹, ``GiB`` = 2³⁰)."""
    number = _number(value)
    if isinstance(number, numbers.Real) and not isinstance(number, bool):
        number, unit = float(number), "b"
    else:
        m = re.fullmatch(
            r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", value if isinstance(value, str) else ""
        )
        if m is None or (m.group(2) or "b").lower() not in _BYTE_UNITS:
            raise ConfigError(f"Invalid {what}: {value!r}. Use {_SIZE_HELP}.")
        number, unit = float(m.group(1)), (m.group(2) or "b").lower()
    if not math.isfinite(number) or not number * _BYTE_UNITS[unit] >= 1:
        raise ConfigError(f"Invalid {what}: {value!r}. Must be a finite size of at least 1 byte.")
    return int(number * _BYTE_UNITS[unit])


def _regexes(name: str, value: Any, rule: Rule) -> tuple[str, ...]:
    patterns = (value,) if isinstance(value, str) else value
    if isinstance(patterns, (bytes, dict)) or not hasattr(patterns, "__iter__"):
        raise rule.fail(name, value)
    patterns = tuple(patterns)
    for p in patterns:
        if not isinstance(p, str):
            raise ConfigError(f"Invalid {name}: {value!r}. Must be {rule.expected()}; {p!r} is not a string.")
        try:
            re.compile(p)
        except re.error as err:
            raise ConfigError(f"Invalid {name} regex {p!r}: {err}.") from None
    return patterns


def check_number(name: str, value: Any, low: float | None = 0.0) -> float:
    """A finite real number ``>= low`` (any if ``low`` is None) given outside a config, e.g. a damping or a power."""
    return float(Rule("real", low=low).check(name, value))
