"""Configuration validation and the stable field names (SPEC §10).

The allowed values are taken from SPEC §10 (written out here), not from ``config.py``, so a changed or missing
option fails. Invalid values raise ConfigError with the uniform message ``Invalid <field>: <value>. Supported: ...``.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

import kronfisher as kf
from conftest import make_model, random_ids
from kronfisher.algebra.damping import Damping

# SPEC §10 (and §3.3, §6 for the dtypes): field -> supported values.
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
    """SPEC §10: these field names are API."""
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
    """Resolved dtypes and the factored damping pair (SPEC §4: ``δ_A``, ``δ_G`` default to ``δ``)."""
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
    """SPEC §1: an invalid include/exclude regex is named; a selection that tracks nothing is an error."""
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
