"""The curvature options of ``kronfisher analyze`` come from the KFACConfig field metadata (issue 10), and every
configuration error is a usage error or one ``kronfisher: error:`` line before any model or data is loaded
(issue 12). No model is loaded here: the checks must fire before one would be.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import kronfisher as kf
from kronfisher.cli import build_parser, config_from_args, main
from kronfisher.config import config_fields

# The options and defaults of the command before they were generated (tests/cli/test_cli*.py rely on them).
CLI_DEFAULTS = {
    "--fisher": "empirical",
    "--mc-samples": 1,
    "--approx": "expand",
    "--ekfac": False,
    "--include": [],
    "--exclude": [],
    "--damping": 1e-3,
    "--damping-mode": "factored",
    "--lowrank-rank": 512,
    "--lowrank-threshold": 8192,
    "--accumulate-dtype": "float32",
    "--eigh-dtype": "float64",
    "--eigh-max-dim": 8192,
    "--seed": 0,
    "--lowrank-layers": [],
    "--max-memory": None,
}


def analyze_actions() -> dict[str, object]:
    """Option string → argparse action of the ``analyze`` subcommand."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    analyze = sub.choices["analyze"]
    return {opt: a for a in analyze._actions for opt in a.option_strings}


def test_cli_flags_and_defaults_unchanged() -> None:
    """Generating the options kept every flag and default of the hand-written parser."""
    args = build_parser().parse_args(["analyze"])
    actions = analyze_actions()
    for flag, default in CLI_DEFAULTS.items():
        assert getattr(args, actions[flag].dest) == default, flag


def test_curvature_options_generated_from_config_metadata() -> None:
    """Each field with a ``cli`` flag has that option, with the field's help, choices and dest."""
    actions = analyze_actions()
    flagged = [f for f in config_fields() if f.metadata["cli"]]
    assert {f.metadata["cli"] for f in flagged} == set(CLI_DEFAULTS)
    for f in flagged:
        action = actions[f.metadata["cli"]]
        assert action.dest == f.name and action.help.startswith(f.metadata["help"]), f.name
        options = f.metadata["rule"].options
        if options:
            assert tuple(action.choices) == options, f.name


def test_parsed_defaults_build_the_config_the_library_documents() -> None:
    """The command's config equals the library default except for its token budget (512 on the command line)."""
    cfg = config_from_args(build_parser().parse_args(["analyze"]))
    assert cfg == kf.KFACConfig(lowrank_max_rank=512)
    changed = build_parser().parse_args(["analyze", "--fisher", "mc", "--include", "mlp", "--lowrank-rank", "all"])
    cfg = config_from_args(changed)
    assert cfg.fisher == "mc" and cfg.include == ("mlp",) and cfg.lowrank_max_rank is None
    assert dataclasses.replace(cfg, fisher="empirical", include=(), lowrank_max_rank=512) == kf.KFACConfig(
        lowrank_max_rank=512
    )


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--max-tokens", "0"], "argument --max-tokens: expected an integer >= 1 or 'all'"),
        (["--lowrank-rank", "0"], "argument --lowrank-rank: expected an integer >= 1 or 'all'"),
        (["--damping", "inf"], "argument --damping: expected a finite number >= 0, got 'inf'"),
        (["--damping", "abc"], "argument --damping: expected a finite number >= 0, got 'abc'"),
        (["--mc-samples", "1.5"], "argument --mc-samples: expected an integer >= 1, got '1.5'"),
        (["--seed", "x"], "argument --seed: expected an integer, got 'x'"),
    ],
)
def test_max_tokens_zero_and_other_bad_numbers_are_usage_errors(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--max-tokens 0`` and ``--lowrank-rank 0`` meant "all" silently; now they are usage errors (exit 2)."""
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["analyze", *argv])
    assert info.value.code == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize("damping", ["0", "1e-300"])
def test_damping_zero_refused_before_any_model_is_loaded(
    damping: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Natural gradients need δ > 0: refused at once (it failed after the whole collection and decomposition)."""
    out = tmp_path / "out"
    argv = ["analyze", "--model", str(tmp_path / "no-such-model"), "--damping", damping, "--output-dir", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("kronfisher: error: Invalid --damping:") and "natural gradients" in err, err
    assert not out.exists()  # nothing was started


def test_bad_regex_refused_before_any_model_is_loaded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A bad ``--include`` regex is named before the model (here: missing) is even looked at."""
    argv = ["analyze", "--model", str(tmp_path / "no-such-model"), "--include", "([x", "--output-dir", str(tmp_path)]
    assert main(argv) == 2
    assert "Invalid include regex '([x'" in capsys.readouterr().err
