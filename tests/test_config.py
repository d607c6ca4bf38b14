"""Configuration validation and the stable field names (docs/library.md).

The allowed values are the documented ones (docs/library.md), written out here, not taken from ``config.py``, so a
changed or missing option fails. Invalid values raise ConfigError with the uniform message
``Invalid <field>: <value>. Supported: ...``.
"""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

import kronfisher as kf
from conftest import make_model, random_ids
from kronfisher.algebra.damping import Damping

# The documented values (docs/library.md; docs/concepts.md for the dtypes): field -> supported values.
CHOICES: dict[str, tuple[str, ...]] = {
    "fisher": ("empirical", "mc"),
    "approx": ("expand", "reduce"),
    "ekfac_granularity": ("sequence", "token"),
    "damping_mode": ("factored", "pi", "exact"),
    "loss_reduction": ("mean", "sum"),
    "on_nonfinite": ("raise", "skip"),
    "accumulate_dtype": ("float32", "float64"),
    "lowrank_dtype": ("float32", "bfloat16", "float16"),
}
SPEC_FIELDS = (
    "fisher mc_samples approx ekfac ekfac_granularity damping damping_A damping_G damping_mode max_condition_number "
    "include exclude loss_reduction ignore_index accumulate_dtype eigh_dtype lowrank_threshold lowrank_layers "
    "lowrank_dtype lowrank_max_rank on_nonfinite seed"
).split()


def test_spec_field_names_exist() -> None:
    """These field names are API."""
    names = {f.name for f in dataclasses.fields(kf.KFACConfig)}
    assert set(SPEC_FIELDS) <= names
    assert kf.KFACConfig().fisher == "empirical" and kf.KFACConfig().approx == "expand"
    assert kf.KFACConfig().ekfac is False and kf.KFACConfig().damping_mode == "factored"


def test_uniform_message_for_fisher() -> None:
    """The exact message of the style guide."""
    with pytest.raises(kf.ConfigError) as info:
        kf.KFACConfig(fisher="x")
    assert str(info.value) == "Invalid fisher: 'x'. Supported: 'empirical', 'mc'."


@pytest.mark.parametrize("field", sorted(CHOICES))
def test_invalid_choice_uniform_message(field: str) -> None:
    """Every choice field rejects an unknown value with ``Invalid <field>: 'x'. Supported: <each option>.``."""
    with pytest.raises(kf.ConfigError) as info:
        kf.KFACConfig(**{field: "x"})
    msg = str(info.value)
    assert re.fullmatch(rf"Invalid {field}: 'x'\. Supported: .+\.", msg), msg
    for option in CHOICES[field]:
        assert repr(option) in msg.split("Supported:")[1], (field, option)
    for option in CHOICES[field]:  # and every documented option is accepted
        assert getattr(kf.KFACConfig(**{field: option}), field) == option


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"damping": -1.0}, "Invalid damping: -1.0"),
        ({"damping": float("nan")}, "Invalid damping: nan"),
        ({"damping_A": -1e-3}, "Invalid damping_A"),
        ({"damping_G": float("nan")}, "Invalid damping_G"),
        ({"mc_samples": 0}, "Invalid mc_samples: 0"),
        ({"max_condition_number": 0.5}, "Invalid max_condition_number: 0.5"),
        ({"lowrank_threshold": 0}, "Invalid lowrank_threshold: 0"),
        ({"lowrank_max_rank": 0}, "Invalid lowrank_max_rank: 0"),
        ({"ekfac": "yes"}, "Invalid ekfac: 'yes'"),
        ({"eigh_dtype": "float16"}, "Invalid eigh_dtype: 'float16'"),
    ],
)
def test_invalid_numbers_and_types(changes: dict, needle: str) -> None:
    """Out-of-range numbers and wrong types raise ConfigError naming the field and the value."""
    with pytest.raises(kf.ConfigError) as info:
        kf.KFACConfig(**changes)
    assert str(info.value).startswith(needle), str(info.value)


def test_config_error_is_value_error_and_config_is_frozen() -> None:
    """ConfigError is a ValueError (callers may catch either); configs are immutable, ``replace`` re-validates."""
    assert issubclass(kf.ConfigError, ValueError)
    cfg = kf.KFACConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.damping = 1.0  # type: ignore[misc]
    with pytest.raises(kf.ConfigError):
        cfg.replace(approx="bogus")


def test_dict_round_trip_and_unknown_fields() -> None:
    """``to_dict``/``from_dict`` round-trip (JSON-friendly lists); unknown keys are named in the error."""
    cfg = kf.KFACConfig(include=r"mlp", exclude=("lm_head",), damping_A=0.1, accumulate_dtype="float64")
    assert cfg.include == ("mlp",)  # a single regex string becomes a tuple
    data = cfg.to_dict()
    assert data["exclude"] == ["lm_head"]
    assert kf.KFACConfig.from_dict(data) == cfg
    with pytest.raises(kf.ConfigError, match="dampnig"):
        kf.KFACConfig.from_dict({**data, "dampnig": 1.0})


def test_resolved_values() -> None:
    """Resolved dtypes and the factored damping pair (docs/concepts.md: ``δ_A``, ``δ_G`` default to ``δ``)."""
    cfg = kf.KFACConfig(damping=0.5, damping_G=0.25, accumulate_dtype="float64", lowrank_dtype="bfloat16")
    assert cfg.factor_damping() == (0.5, 0.25)
    assert cfg.accumulate_torch_dtype == torch.float64 and cfg.lowrank_torch_dtype == torch.bfloat16
    assert Damping.from_config(cfg) == Damping("factored", 0.5, 0.5, 0.25, None)


def test_invalid_damping_argument_and_reduction() -> None:
    """A negative damping passed at use, or an unknown reduction in the user loop, raise ConfigError."""
    model = make_model("llama")
    ids = random_ids(2, 5, seed=3)
    fisher = kf.fit(model, [{"input_ids": ids}], kf.KFACConfig(accumulate_dtype="float64"))
    w = "lm_head.weight"
    with pytest.raises(kf.ConfigError, match="Invalid damping: -1"):
        fisher.power({w: torch.zeros(40, 16, dtype=torch.float64)}, -1.0, damping=-1.0)
    with kf.capture(model) as cap:
        loss = model(input_ids=ids, labels=ids).loss
        with pytest.raises(kf.ConfigError, match=r"Invalid reduction: 'avg'\. Supported: 'mean', 'sum'\."):
            cap.backward(loss, num_terms=8, reduction="avg")


def test_bad_regex_and_no_layers() -> None:
    """An invalid include/exclude regex is named; a selection that tracks nothing is an error."""
    model = make_model("llama")
    batch = [{"input_ids": random_ids(1, 4)}]
    with pytest.raises(kf.ConfigError, match=r"include regex '\('"):
        kf.fit(model, batch, kf.KFACConfig(include=("(",)))
    with pytest.raises(kf.ConfigError, match="No tracked layers"):
        kf.fit(model, batch, kf.KFACConfig(include=("no_such_layer",)))


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"damping_mode": "pi"}, "damping_mode='pi'"),
        ({"damping_A": 0.1}, "damping_A"),
        ({"damping_G": 0.1}, "damping_G"),
    ],
)
def test_ekfac_warns_about_damping_settings_it_ignores(changes: dict, needle: str) -> None:
    """EK-FAC damps the corrected eigenvalues additively (Λ* + δ); pi mode and per-factor δ would be silently
    ignored, so they warn. The plain defaults (factored mode, one δ) and 'exact' do not."""
    from kronfisher.errors import ConfigWarning

    with pytest.warns(ConfigWarning, match=re.escape(needle)):
        kf.KFACConfig(ekfac=True, **changes)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kf.KFACConfig(ekfac=True)
        kf.KFACConfig(ekfac=True, damping_mode="exact")
        kf.KFACConfig(**changes)  # K-FAC uses them


# Bad values named in one line (issue 12: each accepted silently or failing late with a raw error before) ----------
DTYPE_FIELDS = {
    "accumulate_dtype": (torch.float32, torch.float64),
    "eigh_dtype": (torch.float32, torch.float64),
    "lowrank_dtype": (torch.float32, torch.bfloat16, torch.float16, torch.float64),
}


@pytest.mark.parametrize("field", sorted(DTYPE_FIELDS))
def test_dtype_fields_accept_torch_dtypes_and_names_stored_as_names(field: str) -> None:
    """``torch.float64``, ``'torch.float64'`` and ``'float64'`` give one config holding the name ``'float64'``."""
    for dtype in DTYPE_FIELDS[field]:
        name = str(dtype).removeprefix("torch.")
        configs = [kf.KFACConfig(**{field: v}) for v in (dtype, str(dtype), name)]
        assert all(getattr(c, field) == name and type(getattr(c, field)) is str for c in configs)
        assert configs[0] == configs[1] == configs[2]
        assert configs[0].to_dict()[field] == name
    with pytest.raises(kf.ConfigError, match=rf"^Invalid {field}: torch\.int64\. Supported: 'float"):
        kf.KFACConfig(**{field: torch.int64})


def test_fit_with_torch_dtype_config_equals_fit_with_names() -> None:
    """The reported ``KeyError: torch.float64`` at fit: a dtype object now resolves; the sums are identical."""
    model = make_model("llama")
    batch = [{"input_ids": random_ids(2, 5, seed=3)}]
    a = kf.fit(model, batch, kf.KFACConfig(accumulate_dtype=torch.float64, eigh_dtype=torch.float64))
    b = kf.fit(model, batch, kf.KFACConfig(accumulate_dtype="float64", eigh_dtype="float64"))
    assert a.layer_names == b.layer_names
    for name in a.layer_names:
        assert torch.equal(a.sums[name].A.sum, b.sums[name].A.sum)
        assert a.sums[name].A.sum.dtype == torch.float64


def test_choice_fields_are_str_enums_that_accept_plain_strings() -> None:
    """Choices are stored as ``str`` Enum members that equal, hash and print as the plain string."""
    from kronfisher.config import DampingMode, Fisher

    cfg = kf.KFACConfig(fisher="mc", damping_mode=DampingMode.PI)
    assert cfg.fisher is Fisher.MC and cfg.fisher == "mc" and {"mc": 1}[cfg.fisher] == 1
    assert f"{cfg.fisher}" == str(cfg.fisher) == "mc" and repr(cfg.damping_mode) == "'pi'"
    assert kf.KFACConfig(fisher=Fisher.MC, damping_mode="pi") == cfg
    data = cfg.to_dict()
    assert type(data["fisher"]) is str and type(data["damping_mode"]) is str
    assert json.loads(json.dumps(data)) == data and kf.KFACConfig.from_dict(data) == cfg
    assert "fisher='mc'" in repr(cfg)


BAD_VALUES = [
    ("damping", "0.1"),
    ("damping", "abc"),
    ("damping", True),
    ("damping", float("inf")),
    ("damping", None),
    ("damping", torch.tensor([0.1, 0.2])),
    ("damping_A", "abc"),
    ("damping_G", float("-inf")),
    ("max_condition_number", float("inf")),
    ("max_condition_number", "abc"),
    ("mc_samples", True),
    ("mc_samples", 2.0),
    ("mc_samples", "2"),
    ("eigh_max_dim", True),
    ("lowrank_threshold", torch.tensor(10.0)),
    ("lowrank_max_rank", 0),
    ("lowrank_max_rank", False),
    ("max_dense_elements", float("nan")),
    ("seed", None),
    ("seed", "abc"),
    ("seed", 1.5),
    ("ignore_index", 1.5),
    ("ignore_index", "x"),
    ("ekfac", 1),
    ("fisher", None),
    ("include", 123),
    ("include", None),
    ("exclude", [r"mlp", 3]),
    ("lowrank_layers", b"mlp"),
]


@pytest.mark.parametrize(("field", "value"), BAD_VALUES, ids=[f"{f}={v!r}" for f, v in BAD_VALUES])
def test_bad_value_is_one_line_naming_field_value_and_rule(field: str, value: object) -> None:
    """Strings for numbers, bools for numbers, non-finite or non-scalar numbers, non-integer seeds: one line."""
    with pytest.raises(kf.ConfigError) as info:
        kf.KFACConfig(**{field: value})
    msg = str(info.value)
    assert msg.startswith(f"Invalid {field}: {value!r}. "), msg
    assert "\n" not in msg and ("Must be" in msg or "Supported:" in msg), msg


def test_finite_message_matches_what_is_refused() -> None:
    """The message says "finite", and infinities are refused (they were accepted before)."""
    with pytest.raises(kf.ConfigError, match=r"^Invalid damping: inf\. Must be a finite number >= 0\.$"):
        kf.KFACConfig(damping=float("inf"))


def test_zero_dim_tensor_number_is_converted_to_a_python_number() -> None:
    """``damping=torch.tensor(0.25)`` is stored as the float 0.25 (it failed only at save before)."""
    cfg = kf.KFACConfig(damping=torch.tensor(0.25, dtype=torch.float64), mc_samples=torch.tensor(3), seed=np_int(7))
    assert type(cfg.damping) is float and cfg.damping == 0.25
    assert type(cfg.mc_samples) is int and cfg.mc_samples == 3 and type(cfg.seed) is int
    json.dumps(cfg.to_dict())


def np_int(value: int) -> object:
    """A numpy integer (an ``Integral`` that is not ``int``)."""
    import numpy as np

    return np.int64(value)


def test_integer_fields_take_any_integer_and_store_int() -> None:
    """``seed`` and ``ignore_index`` take any integer (negative too); an int damping becomes a float."""
    cfg = kf.KFACConfig(seed=2**70, ignore_index=-1, damping=1)
    assert cfg.seed == 2**70 and cfg.ignore_index == -1 and type(cfg.damping) is float


def test_regex_fields_accept_a_string_or_a_sequence() -> None:
    """A single regex string, a list or a generator of strings become a tuple."""
    assert kf.KFACConfig(include="mlp").include == ("mlp",)
    assert kf.KFACConfig(exclude=["a", "b"]).exclude == ("a", "b")
    assert kf.KFACConfig(lowrank_layers=(p for p in ["lm_head"])).lowrank_layers == ("lm_head",)


@pytest.mark.parametrize("field", ["include", "exclude", "lowrank_layers"])
def test_bad_regex_fails_at_construction_naming_the_pattern(field: str) -> None:
    """A bad ``lowrank_layers`` regex was a raw ``re.error`` at fit; every regex field now fails when built."""
    with pytest.raises(kf.ConfigError, match=rf"^Invalid {field} regex '\(\[bad': unterminated character set"):
        kf.KFACConfig(**{field: ["ok", "([bad"]})


def test_lowrank_max_rank_zero_is_an_error_and_none_keeps_all() -> None:
    """0 does not mean "all" (it did on the command line); None is the spelling of "keep every token"."""
    with pytest.raises(kf.ConfigError, match=r"Invalid lowrank_max_rank: 0\. Must be an integer >= 1 or None"):
        kf.KFACConfig(lowrank_max_rank=0)
    assert kf.KFACConfig(lowrank_max_rank=None).lowrank_max_rank is None


def test_sum_fields_are_marked_in_the_field_metadata() -> None:
    """The fields that change what the sums mean (files differing in one cannot be merged), written out here."""
    from kronfisher.config import config_fields, sum_fields

    expected = {
        "fisher",
        "mc_samples",
        "approx",
        "include",
        "exclude",
        "loss_reduction",
        "ignore_index",
        "accumulate_dtype",
        "lowrank_threshold",
        "lowrank_layers",
        "lowrank_dtype",
        "lowrank_max_rank",
    }
    assert set(sum_fields()) == expected
    for f in config_fields():
        assert f.metadata["help"] and "SPEC" not in f.metadata["help"], f.name
        assert f.metadata["rule"].check(f.name, f.default) == f.default, f.name
