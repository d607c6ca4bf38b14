"""The analysis pipeline behind ``kronfisher analyze``: models × data → factor files + report.

For each model, in order: load it and its tokenizer, tokenise the data, run the K-FAC pass (checkpointing the raw
sums every few batches so that ``--resume`` continues after a kill), decompose, optionally run the EK-FAC
pass, save the factor file, compute the mean-loss gradient and its natural gradient, and the per-layer metrics.
Every model after the first is compared with the first (the base). Finally the report is written.

Under ``torchrun --nproc_per_node=N`` every pass runs on each rank's shard of the batches and is merged at its end
(docs/distributed.md): the factor file and the report equal those of one process, and rank 0 alone writes them.
"""

from __future__ import annotations

import dataclasses
import shlex
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import Tensor, nn

from .._version import __version__
from ..budget import available_memory
from ..collection.forward import model_device
from ..comm import Shard, barrier, broadcast_object, get_world_size, is_main_process
from ..config import KFACConfig
from ..data import TextBatches, build_batches
from ..drivers.ekfac import correct
from ..drivers.planning import check_selection
from ..errors import InputError
from ..faults import write_error
from ..io.files import load, read_metadata, save
from ..layers import combine
from ..models import LoadedModel, check_seq_len, embedded_text_path, load_model
from ..operator import KFAC
from .checkpoint import (
    checkpoint_path,
    collect_with_checkpoints,
    keeping_sums,
    mismatch,
    remove_checkpoint,
    run_identity,
    sums_writer,
)
from .console import Console, Tracked, silence_transformers
from .gradient import mean_gradient
from .groups import fit_groups, plan_for
from .launch import process_group
from .metrics import compare_layer, layer_metrics, layer_natural_gradient
from .notes import GRADIENT_TEXT, describe_fisher, model_entry, run_notes
from .outdir import locked_output_dir
from .plots import Plot, comparison_plots, model_plots
from .report import write_report


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
    save_sums: bool = False
    save_factors: bool = True
    plots: bool = True
    quiet: bool = False
    command: str = ""


@dataclass
class ModelResult:
    """What the report and the comparisons need from one analysed model."""

    label: str
    fisher: KFAC
    params: dict[str, Tensor]  # layer → V = [W | b] (CPU); only when there are models to compare
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


def measure_layers(fisher: KFAC, grads: dict[str, Tensor]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(rows, spectra)`` by layer: :func:`.metrics.layer_metrics` and the eigenvalues of ``A`` and ``G`` (numpy).

    One layer at a time, ``grads`` (``{layer: [out, a_dim]}``) consumed: each gradient is taken out, preconditioned,
    measured and dropped before the next layer's block is touched, so the analysis holds the gradients not yet
    measured plus one layer's block and natural gradient, never every natural gradient at once (docs/cli.md).
    """
    rows, spectra = {}, {}
    for name in fisher.layer_names:
        g = grads.pop(name, None)
        ng = None if g is None else layer_natural_gradient(fisher, name, g)
        rows[name] = layer_metrics(fisher, name, grad=g, natgrad=ng)
        del g, ng  # before the next layer's natural gradient
        b = fisher.block(name)
        spectra[name] = {"A": b.A.values.detach().cpu().numpy(), "G": b.G.values.detach().cpu().numpy()}
    return rows, spectra


@dataclass
class _ModelRun:
    """One model of a run: what its phases share."""

    index: int
    lm: LoadedModel
    tb: TextBatches
    shard: Shard
    identity: dict[str, Any]
    factor_path: Path
    ckpt: Path
    timings: dict[str, float]


def _load(index: int, spec: str | None, opts: AnalyzeOptions, console: Console, out: Path) -> _ModelRun:
    """Load the model and its tokenizer, check the selection and the sequence length, tokenise the data."""
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    console.info(f"[{index}] loading model {spec or 'default (SmolLM2-135M-Instruct)'}")
    lm = load_model(
        spec, dtype=opts.dtype, device=opts.device, trust_remote_code=opts.trust_remote_code, quiet=opts.quiet
    )
    timings["load"] = time.monotonic() - t0
    check_selection(lm.model, opts.cfg, lm.source.name)
    check_seq_len(lm, opts.seq_len)  # before the first batch, not an IndexError inside it
    t = time.monotonic()
    tb = build_batches(
        lm.tokenizer,
        opts.data or [str(embedded_text_path())],
        seq_len=opts.seq_len,
        batch_size=opts.batch_size,
        max_tokens=opts.max_tokens,
        text_field=opts.text_field,
    )
    timings["tokenize"] = time.monotonic() - t
    console.info(f"  data: {tb.tokens} tokens, {tb.num_sequences} sequences, {len(tb.batches)} batches")
    slug = f"{index}-{lm.source.slug}"
    shard = Shard(tb.batches)  # under torchrun: every world_size-th batch; else all of them
    factor_path = out / "factors" / f"{slug}.safetensors"
    ckpt = checkpoint_path(out / "checkpoints", slug)
    return _ModelRun(index, lm, tb, shard, run_identity(lm, tb, opts.cfg), factor_path, ckpt, timings)


def _fit_and_save(run: _ModelRun, opts: AnalyzeOptions, console: Console) -> KFAC:
    """The K-FAC pass (resumable), decomposition, EK-FAC pass and factor file of one model."""
    cfg, lm, shard, timings = opts.cfg, run.lm, run.shard, run.timings
    plan = plan_for(lm, shard, cfg, console.info, spill=opts.save_factors)  # printed before the first batch
    if len(plan.groups) > 1 or not plan.keeps_sums:  # groups, each with its own passes, or sums freed as decomposed:
        # no checkpoints, no sums in the file
        path = run.factor_path if opts.save_factors else None
        kw = {"parts": run.ckpt.parent, "resume": opts.resume}  # finished groups survive a kill (--resume)
        return fit_groups(lm, shard, cfg, plan, console.info, timings, path, run.identity, run.tb.sources, **kw)
    t = time.monotonic()
    bar = console.bar(run.tb.tokens, "  K-FAC factors")
    try:
        discovery, collector, report = collect_with_checkpoints(
            lm,
            shard,
            run.tb.batch_tokens(),
            cfg,
            run.identity,
            run.ckpt,
            resume=opts.resume,
            every=opts.checkpoint_every,
            info=console.info,
            bar=bar,
            plan=plan,
        )
    finally:
        bar.close()
    timings["collect"] = time.monotonic() - t
    t = time.monotonic()
    live = {n: s for n, s in collector.sums.items() if s.A.count > 0 and s.G.count > 0}
    bar = console.bar(len(live), "  decompose", unit="layer")
    fisher = KFAC.from_sums(
        discovery.infos, collector.sums, cfg, report, lm.model, spread=True, on_layer=lambda _: bar.update(1)
    )
    bar.close()
    timings["decompose"] = time.monotonic() - t
    if cfg.ekfac:
        t = time.monotonic()
        bar = console.bar(run.tb.tokens, "  EK-FAC eigenvalues")
        try:
            correct(fisher, lm.model, Tracked(shard, bar))
        finally:
            bar.close()
        timings["ekfac"] = time.monotonic() - t
    t = time.monotonic()
    if opts.save_factors:
        kept = sums_writer(lm, collector.infos, collector.sums, cfg, report, run.identity, shard)
        with keeping_sums(run.factor_path, run.ckpt, kept, shard.world_size):  # a full disk: the sums are kept
            save(  # on every rank: rank 0 writes, the others wait for the complete file
                fisher,
                run.factor_path,
                model=lm.model,
                include_sums=opts.save_sums,
                extra_meta={"identity": run.identity, "data": run.tb.sources},
            )
    remove_checkpoint(run.ckpt)  # each rank its own checkpoint
    barrier()
    if is_main_process() and run.ckpt.parent.is_dir() and not any(run.ckpt.parent.iterdir()):
        run.ckpt.parent.rmdir()
    timings["save"] = time.monotonic() - t
    return fisher


def analyze_model(
    index: int, spec: str | None, opts: AnalyzeOptions, console: Console, out: Path
) -> tuple[LoadedModel, ModelResult]:
    """Load, collect (resumable), decompose, save and measure one model."""
    t0 = time.monotonic()
    run = _load(index, spec, opts, console, out)
    lm, tb, timings = run.lm, run.tb, run.timings
    reuse = False
    if opts.resume and run.factor_path.exists():
        reuse = not mismatch(read_metadata(run.factor_path).get("extra", {}).get("identity", {}), run.identity)
    reuse = broadcast_object(reuse)  # rank 0 decides for all: a split decision would pair unrelated collectives
    if reuse:
        console.info(f"  factors already complete in {run.factor_path}: reusing them")
        # same identity: this run's own layers, read one at a time within a quarter of the free memory (a 1.5B
        # model's file holds ~25 GiB)
        keep = available_memory(model_device(lm.model)) // 4
        fisher = load(run.factor_path, model=lm.model, allow_subset=True, keep_bytes=keep)
    else:
        fisher = _fit_and_save(run, opts, console)
    fisher.sums = None  # saved; the raw sums are not needed for the analysis
    t = time.monotonic()
    bar = console.bar(tb.tokens, "  gradient")
    try:
        grad = mean_gradient(lm.model, Tracked(run.shard, bar), opts.cfg)  # all-reduced over ranks
    finally:
        bar.close()
    timings["gradient"] = time.monotonic() - t
    t = time.monotonic()
    grads = {n: g for n, g in grad.combined.items() if n in fisher.layer_names}
    grad.combined.clear()  # measure_layers frees each layer's gradient once measured
    rows, spectra = measure_layers(fisher, grads)
    timings["metrics"] = time.monotonic() - t
    timings["total"] = time.monotonic() - t0
    kept = reuse or opts.save_factors
    saved = str(run.factor_path.relative_to(out)) if kept else None  # --no-factor-file: the report only
    entry = model_entry(index, lm, tb, grad, fisher.report.to_dict(), rows, saved)
    entry["timings_s"] = timings
    params = layer_params(lm.model, fisher) if len(opts.models) > 1 else {}  # one model: nothing to compare
    return lm, ModelResult(f"{index}: {lm.source.name}", fisher, params, entry, spectra)


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
    if not layers:  # a total of 0 would read as "identical models"
        raise InputError(
            f"Models {base.entry['name']!r} and {other.entry['name']!r} are not comparable: no tracked layer has the "
            f"same name and shape in both ({len(base.fisher.layer_names)} and {len(other.fisher.layer_names)} "
            "layers). Their factor files are saved.",
            hint="Compare models of the same architecture; analyse the others in separate runs.",
        )
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


def analyze(opts: AnalyzeOptions, *, console: Console | None = None) -> dict[str, Any]:
    """Run the whole analysis and write factor files and reports into ``opts.output_dir``.

    Returns:
        The report as a dict (also written to ``report.json``).

    Raises:
        InputError: a model or data source the user can fix; kronfisher errors for the rest.

    """
    with process_group(opts.device) as device:  # torchrun: join the group; each rank its own GPU
        opts = dataclasses.replace(opts, device=device)
        if not is_main_process():  # one progress display and one set of files, from rank 0
            console = Console(True)
        console = console or Console(opts.quiet)
        # checked before any model is loaded; locked against a second run; a killed run's temporaries removed
        with locked_output_dir(Path(opts.output_dir), opts.command or "kronfisher analyze", console.info):
            return _analyze(opts, console)


def _analyze(opts: AnalyzeOptions, console: Console) -> dict[str, Any]:
    if opts.quiet or console.quiet:
        silence_transformers()
    out = Path(opts.output_dir)
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
        if opts.plots and is_main_process():
            plots += model_plots(i, f"model {i}", res.entry["layers"], res.spectra)
        if base is None:
            base = res
        else:
            console.info(f"  comparing with the base model {base.entry['name']}")
            comp = compare_models(base, res, opts.overlap_k)
            comparisons.append(comp)
            if opts.plots and is_main_process():
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
            "processes": get_world_size(),
        },
        "fisher": {"description": describe_fisher(opts.cfg), "config": opts.cfg.to_dict()},
        "gradient": GRADIENT_TEXT,
        "data": data_entry,
        "notes": run_notes(opts.cfg, [r.entry for r in results]),
        "models": [r.entry for r in results],
        "comparisons": comparisons,
    }
    if is_main_process():
        try:
            paths = write_report(report, plots, out)
        except (OSError, SafetensorError) as err:
            lost = write_error(err, getattr(err, "filename", None) or out / "report.json", what="(report)")
            lost.hint = f"The factor files in {out / 'factors'} are complete: free some space and run the same " + (
                "command again with --resume, which reuses them and writes the report."
            )
            raise lost from err
        console.info(f"wrote {paths['html']}, {paths['md']}, {paths['json']}")
    barrier()  # no rank returns (and reads the report) before it is written
    return report


def command_line(argv: list[str]) -> str:
    """The command as the user typed it (for the report)."""
    return "kronfisher " + " ".join(shlex.quote(a) for a in argv)
