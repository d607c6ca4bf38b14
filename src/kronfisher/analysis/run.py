"""The analysis pipeline behind ``kronfisher analyze``: models × data → factor files + report.

For each model, in order: load it and its tokenizer, tokenise the data, run the K-FAC pass (checkpointing the raw
sums every few batches so that ``--resume`` continues after a kill, SPEC §9), decompose, optionally run the EK-FAC
pass, save the factor file, compute the mean-loss gradient and its natural gradient, and the per-layer metrics.
Every model after the first is compared with the first (the base). Finally the report is written.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import shlex
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import __version__
from ..accumulate import CollectionReport
from ..config import KFACConfig
from ..data import TextBatches, build_batches
from ..ekfac import correct
from ..errors import InputError
from ..factors import decompose_all
from ..fit import CollectState, collect
from ..io import SUM_FIELDS, load, load_sums, model_fingerprint, read_metadata, save, save_sums
from ..layers import combine, discover_layers
from ..models import LoadedModel, embedded_text_path, load_model
from ..operator import KFAC
from .gradient import mean_gradient
from .metrics import compare_layer, highlights, layer_metrics, natural_gradients, totals
from .plots import Plot, comparison_plots, model_plots
from .report import write_report

CHECKPOINT_SECONDS = 300.0  # default checkpoint interval when --checkpoint-every is not given


@dataclass
class AnalyzeOptions:
    """Everything ``kronfisher analyze`` was asked to do (see ``kronfisher analyze --help``)."""

    models: list[str | None] = field(default_factory=lambda: [None])
    data: list[str] = field(default_factory=list)
    output_dir: Path = Path("kronfisher-results")
    cfg: KFACConfig = field(default_factory=KFACConfig)
    max_tokens: int | None = 2048
    seq_len: int = 256
    batch_size: int = 4
    dtype: str = "float32"
    device: str = "auto"
    trust_remote_code: bool = False
    text_field: str = "text"
    resume: bool = False
    checkpoint_every: int | None = None
    overlap_k: int = 16
    save_sums: bool = True
    plots: bool = True
    quiet: bool = False
    command: str = ""


class Console:
    """Status lines and token progress bars on stderr (silent with ``quiet``)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def info(self, msg: str) -> None:
        """One status line."""
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    def bar(self, total: float, desc: str, unit: str = "tok", initial: float = 0) -> Any:
        """A tqdm bar with rate and ETA (a no-op object when quiet)."""
        if self.quiet:
            return _NoBar()
        from tqdm.auto import tqdm

        return tqdm(
            total=total,
            desc=desc,
            unit=unit,
            unit_scale=unit == "tok",
            initial=initial,
            dynamic_ncols=True,
            file=sys.stderr,
        )


class _NoBar:
    def update(self, n: float = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _tracked(batches: Iterable[dict[str, Tensor]], bar: Any) -> Iterator[dict[str, Tensor]]:
    """Yield batches, advancing ``bar`` by each batch's attended tokens once it has been processed."""
    for b in batches:
        yield b
        bar.update(int(b["attention_mask"].sum()))


def weights_digest(model: nn.Module) -> str:
    """A cheap identity of the weights: sha256 of every parameter's name, shape, sum and sum of squares."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            t = p.detach().to(torch.float64)
            h.update(f"{name}:{list(p.shape)}:{float(t.sum())!r}:{float(t.square().sum())!r};".encode())
    return h.hexdigest()


def run_identity(lm: LoadedModel, tb: TextBatches, cfg: KFACConfig) -> dict[str, Any]:
    """What a checkpoint or factor file must match to be resumed from (model, weights, data, config)."""
    fp = json.dumps(model_fingerprint(lm.model), sort_keys=True)
    full = cfg.to_dict()
    return {
        "model": lm.source.spec,
        "fingerprint_sha256": hashlib.sha256(fp.encode()).hexdigest(),
        "weights_sha256": weights_digest(lm.model),
        "data_sha256": tb.fingerprint,
        "sums_config": {k: full[k] for k in (*SUM_FIELDS, "seed", "on_nonfinite")},
        "config": full,
    }


def _mismatch(saved: dict[str, Any], want: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    return [k for k in want if k not in ignore and saved.get(k) != want[k]]


@dataclass
class ModelResult:
    """What the report and the comparisons need from one analysed model."""

    label: str
    fisher: KFAC
    params: dict[str, Tensor]  # layer → V = [W | b] (CPU)
    entry: dict[str, Any]
    spectra: dict[str, dict[str, Any]]


def layer_params(model: nn.Module, fisher: KFAC) -> dict[str, Tensor]:
    """``V = [W | b]`` of every layer of ``fisher`` (detached CPU copies)."""
    out = {}
    for name in fisher.layer_names:
        module = model.get_submodule(name)
        info = fisher.infos[name]
        bias = module.bias.detach() if info.has_bias else None
        out[name] = combine(info, module.weight.detach(), bias).to("cpu").clone()
    return out


def _collect_with_checkpoints(
    lm: LoadedModel,
    tb: TextBatches,
    opts: AnalyzeOptions,
    identity: dict[str, Any],
    ckpt: Path,
    console: Console,
) -> tuple[Any, Any, CollectionReport]:
    cfg = opts.cfg
    resume_state = None
    done_tokens = 0
    if opts.resume and ckpt.exists():
        sf = load_sums(ckpt)
        extra = sf.meta.get("extra", {})
        bad = _mismatch(extra.get("identity", {}), identity, ignore=("config",))  # damping etc. may change
        if bad:
            raise InputError(
                f"Checkpoint {ckpt} was written for a different run: {', '.join(bad)} differ.",
                hint="Run without --resume to start over (the checkpoint is then replaced), or restore the same "
                "model, data and options.",
            )
        gen = extra.get("generator_state")
        state = torch.frombuffer(bytearray(base64.b64decode(gen)), dtype=torch.uint8) if gen else None
        done = int(extra["batches_done"])
        resume_state = CollectState(sf.sums, sf.report, done, state)
        done_tokens = sum(tb.batch_tokens()[:done])
        console.info(f"  resuming from {ckpt}: {done} of {len(tb.batches)} batches already collected")
    elif opts.resume:
        console.info(f"  no checkpoint at {ckpt}: starting from the beginning")
    every = opts.checkpoint_every
    last = time.monotonic()
    bar = console.bar(tb.tokens, "  K-FAC factors", initial=done_tokens)
    sizes = tb.batch_tokens()

    def on_batch_end(i: int, collector: Any, report: CollectionReport, generator: torch.Generator) -> None:
        nonlocal last
        bar.update(sizes[i])
        due = (every is not None and every > 0 and (i + 1) % every == 0) or (
            every is None and time.monotonic() - last > CHECKPOINT_SECONDS
        )
        if due and i + 1 < len(tb.batches):
            extra = {
                "identity": identity,
                "batches_done": i + 1,
                "generator_state": base64.b64encode(generator.get_state().numpy().tobytes()).decode("ascii"),
            }
            save_sums(ckpt, collector.infos, collector.sums, cfg, report=report, model=lm.model, extra_meta=extra)
            last = time.monotonic()

    ckpt.parent.mkdir(parents=True, exist_ok=True)
    try:
        discovery, collector, report = collect(
            lm.model, tb.batches, cfg, resume=resume_state, on_batch_end=on_batch_end
        )
    finally:
        bar.close()
    return discovery, collector, report


def _check_selection(lm: LoadedModel, cfg: KFACConfig) -> None:
    """A short, actionable error when ``--include`` / ``--exclude`` leave no layer to track (SPEC §1)."""
    found = discover_layers(lm.model, cfg.include, cfg.exclude)
    if found.infos:
        return
    names = list(found.skipped)
    examples = ", ".join(names[:3] + ([names[-1]] if len(names) > 3 else []))
    raise InputError(
        f"No layer of {lm.source.name} is tracked with --include {list(cfg.include)} --exclude "
        f"{list(cfg.exclude)}: {len(names)} linear layers were all left out (for example {examples}).",
        hint="The patterns are Python regexes searched in the full layer names, e.g. --include 'layers\\.0\\.' "
        "or --include 'mlp' --exclude 'lm_head'.",
    )


def analyze_model(
    index: int, spec: str | None, opts: AnalyzeOptions, console: Console, out: Path
) -> tuple[LoadedModel, ModelResult]:
    """Load, collect (resumable), decompose, save and measure one model."""
    cfg = opts.cfg
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    console.info(f"[{index}] loading model {spec or 'default (SmolLM2-135M-Instruct)'}")
    lm = load_model(
        spec, dtype=opts.dtype, device=opts.device, trust_remote_code=opts.trust_remote_code, quiet=opts.quiet
    )
    timings["load"] = time.monotonic() - t0
    _check_selection(lm, cfg)
    label = f"{index}: {lm.source.name}"
    data_paths = opts.data or [str(embedded_text_path())]
    t = time.monotonic()
    tb = build_batches(
        lm.tokenizer,
        data_paths,
        seq_len=opts.seq_len,
        batch_size=opts.batch_size,
        max_tokens=opts.max_tokens,
        text_field=opts.text_field,
    )
    timings["tokenize"] = time.monotonic() - t
    console.info(f"  data: {tb.tokens} tokens, {tb.num_sequences} sequences, {len(tb.batches)} batches")
    identity = run_identity(lm, tb, cfg)
    slug = f"{index}-{lm.source.slug}"
    factor_path = out / "factors" / f"{slug}.safetensors"
    ckpt = out / "checkpoints" / f"{slug}.sums.safetensors"
    fisher = None
    if opts.resume and factor_path.exists():
        extra = read_metadata(factor_path).get("extra", {})
        if not _mismatch(extra.get("identity", {}), identity):
            console.info(f"  factors already complete in {factor_path}: reusing them")
            fisher = load(factor_path, model=lm.model)
    if fisher is None:
        t = time.monotonic()
        discovery, collector, report = _collect_with_checkpoints(lm, tb, opts, identity, ckpt, console)
        timings["collect"] = time.monotonic() - t
        t = time.monotonic()
        live = {n: s for n, s in collector.sums.items() if s.A.count > 0 and s.G.count > 0}
        bar = console.bar(len(live), "  decompose", unit="layer")
        blocks = decompose_all(live, cfg, on_layer=lambda _: bar.update(1))
        bar.close()
        fisher = KFAC({n: discovery.infos[n] for n in live}, blocks, cfg, sums=collector.sums, report=report)
        fisher.attach_model(lm.model)
        timings["decompose"] = time.monotonic() - t
        if cfg.ekfac:
            t = time.monotonic()
            bar = console.bar(tb.tokens, "  EK-FAC eigenvalues")
            try:
                correct(fisher, lm.model, _tracked(tb.batches, bar))
            finally:
                bar.close()
            timings["ekfac"] = time.monotonic() - t
        t = time.monotonic()
        factor_path.parent.mkdir(parents=True, exist_ok=True)
        save(
            fisher,
            factor_path,
            model=lm.model,
            include_sums=opts.save_sums,
            extra_meta={"identity": identity, "data": tb.sources},
        )
        ckpt.unlink(missing_ok=True)
        if ckpt.parent.is_dir() and not any(ckpt.parent.iterdir()):
            ckpt.parent.rmdir()
        timings["save"] = time.monotonic() - t
    fisher.sums = None  # saved; the raw sums are not needed for the analysis
    t = time.monotonic()
    bar = console.bar(tb.tokens, "  gradient")
    try:
        grad = mean_gradient(lm.model, _tracked(tb.batches, bar), cfg)
    finally:
        bar.close()
    timings["gradient"] = time.monotonic() - t
    t = time.monotonic()
    combined = {n: g for n, g in grad.combined.items() if n in fisher.layer_names}
    nat = natural_gradients(fisher, combined)
    rows = {}
    spectra: dict[str, dict[str, Any]] = {}
    for name in fisher.layer_names:
        rows[name] = layer_metrics(fisher, name, grad=combined.get(name), natgrad=nat.get(name))
        b = fisher.block(name)
        spectra[name] = {"A": b.A.values.detach().cpu().numpy(), "G": b.G.values.detach().cpu().numpy()}
    timings["metrics"] = time.monotonic() - t
    timings["total"] = time.monotonic() - t0
    entry = {
        "index": index,
        "name": lm.source.name,
        "source": lm.source.spec if lm.source.kind != "default" else f"{lm.source.location}/{lm.source.gguf_file}",
        "kind": lm.source.kind,
        "model_class": type(lm.model).__name__,
        "dtype": str(next(lm.model.parameters()).dtype).replace("torch.", ""),
        "device": str(next(lm.model.parameters()).device),
        "factor_file": str(factor_path.relative_to(out)),
        "loss": grad.loss,
        "perplexity": math.exp(grad.loss) if grad.loss < 700 else None,
        "loss_terms": grad.loss_terms,
        "tokens": grad.tokens,
        "data": {
            "sources": tb.sources,
            "tokens": tb.tokens,
            "sequences": tb.num_sequences,
            "batches": len(tb.batches),
            "fingerprint_sha256": tb.fingerprint,
        },
        "collection": fisher.report.to_dict(),
        "totals": totals(rows),
        "highlights": highlights(rows),
        "timings_s": timings,
        "layers": rows,
    }
    return lm, ModelResult(label, fisher, layer_params(lm.model, fisher), entry, spectra)


def compare_models(base: ModelResult, other: ModelResult, k: int) -> dict[str, Any]:
    """Per-layer distances of ``other`` from ``base`` (layers present in both with the same shapes)."""
    layers, skipped = {}, []
    for name in base.fisher.layer_names:
        vb, vo = base.params.get(name), other.params.get(name)
        if vo is None or vb is None or vb.shape != vo.shape:
            skipped.append(name)
            continue
        layers[name] = compare_layer(base.fisher, name, vb, vo, other.fisher, k=k)
    skipped += [n for n in other.fisher.layer_names if n not in base.fisher.layer_names]
    return {
        "base": base.entry["name"],
        "other": other.entry["name"],
        "base_index": base.entry["index"],
        "other_index": other.entry["index"],
        "k": k,
        "total_quadratic_form": sum(r["quadratic_form"] for r in layers.values()),
        "skipped": skipped,
        "layers": layers,
    }


def _notes(opts: AnalyzeOptions, results: list[dict[str, Any]]) -> list[str]:
    cfg = opts.cfg
    notes = []
    for m in results:
        tied = m["collection"].get("tied", {})
        for layer, others in tied.items():
            notes.append(
                f"Model {m['index']}: {layer!r} shares its weight with {others} (tied). Its curvature and gradient "
                "are those of the output-layer use only; the embedding use is not included (SPEC §6)."
            )
        for w in m["collection"].get("warnings", []):
            if "Tied weights" not in w:
                notes.append(f"Model {m['index']}: {w}")
        if m["collection"].get("never_fired"):
            notes.append(f"Model {m['index']}: layers whose hooks never fired: {m['collection']['never_fired']}.")
    if cfg.eigh_max_dim < 8192 or cfg.eigh_dtype != "float64":
        notes.append(
            f"Eigendecompositions in {cfg.eigh_dtype} for factors up to {cfg.eigh_max_dim}, float32 above "
            "(--eigh-dtype, --eigh-max-dim); factors are accumulated in "
            f"{cfg.accumulate_dtype}, so eigenvalues below about 1e-6 of the largest carry rounding noise."
        )
    return notes


def _silence_transformers() -> None:
    """No progress bars or info logs from transformers / huggingface_hub (``--quiet``)."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - transformers is needed to load models anyway
        pass


def describe_fisher(cfg: KFACConfig) -> str:
    """One sentence describing the curvature that was computed."""
    kind = "EK-FAC (eigenvalue-corrected, George et al. 2018)" if cfg.ekfac else "K-FAC (Martens & Grosse 2015)"
    fisher = "empirical Fisher (data targets)" if cfg.fisher == "empirical" else f"MC Fisher ({cfg.mc_samples} draws)"
    damp = f"damping {cfg.damping:g} ({cfg.damping_mode})"
    low = f"low-rank G for out > {cfg.lowrank_threshold}" + (
        f" with a budget of {cfg.lowrank_max_rank} eigenpairs plus an isotropic tail" if cfg.lowrank_max_rank else ""
    )
    return f"{kind} of the {fisher}, {cfg.approx} approximation, {damp}, {low}."


GRADIENT_TEXT = (
    "mean-loss gradient (1/N) Σ_t ĝ_t a_tᵀ over the analysed data with the data targets (whatever the Fisher type), "
    "computed in a separate forward/backward pass from each layer's own inputs and output gradients (for a tied "
    "lm_head: the output-layer use); the natural gradient is (F + damping)⁻¹ g under the configured damping."
)


def analyze(opts: AnalyzeOptions, *, console: Console | None = None) -> dict[str, Any]:
    """Run the whole analysis and write factor files and reports into ``opts.output_dir``.

    Returns:
        The report as a dict (also written to ``report.json``).

    Raises:
        InputError: a model or data source the user can fix; kronfisher errors for the rest.

    """
    console = console or Console(opts.quiet)
    if opts.quiet:
        _silence_transformers()
    out = Path(opts.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(opts.cfg.seed)
    results: list[ModelResult] = []
    comparisons: list[dict[str, Any]] = []
    plots: list[Plot] = []
    data_entry: dict[str, Any] = {}
    base: ModelResult | None = None
    for i, spec in enumerate(opts.models):
        lm, res = analyze_model(i, spec, opts, console, out)
        if not data_entry:
            data_entry = {
                **res.entry["data"],
                "seq_len": opts.seq_len,
                "batch_size": opts.batch_size,
                "max_tokens": opts.max_tokens,
            }
        if opts.plots:
            plots += model_plots(i, f"model {i}", res.entry["layers"], res.spectra)
        if base is None:
            base = res
        else:
            console.info(f"  comparing with the base model {base.entry['name']}")
            comp = compare_models(base, res, opts.overlap_k)
            comparisons.append(comp)
            if opts.plots:
                plots += comparison_plots(len(comparisons) - 1, f"model {i} vs model 0", comp["layers"])
            res.fisher = None  # type: ignore[assignment]  # free the other model's factors
            res.params = {}
        results.append(res)
        del lm
    report: dict[str, Any] = {
        "kronfisher_version": __version__,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": opts.command or "kronfisher analyze",
        "settings": {
            "max_tokens": opts.max_tokens,
            "seq_len": opts.seq_len,
            "batch_size": opts.batch_size,
            "dtype": opts.dtype,
            "device": opts.device,
            "overlap_k": opts.overlap_k,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "fisher": {"description": describe_fisher(opts.cfg), "config": opts.cfg.to_dict()},
        "gradient": GRADIENT_TEXT,
        "data": data_entry,
        "notes": _notes(opts, [r.entry for r in results]),
        "models": [r.entry for r in results],
        "comparisons": comparisons,
    }
    paths = write_report(report, plots, out)
    console.info(f"wrote {paths['html']}, {paths['md']}, {paths['json']}")
    return report


def command_line(argv: list[str]) -> str:
    """The command as the user typed it (for the report)."""
    return "kronfisher " + " ".join(shlex.quote(a) for a in argv)
