"""Decompose what has rank: a dense factor of dimension ``d`` seen on ``T < d`` rows.

For each ``d``, ``T`` and dtype, the same factor ``F = Xᵀ X / T`` (``X``: ``[T, d]`` random rows with a decaying
column scale, float32 as collected) is decomposed two ways:

* ``full``: the dense path, ``eigh`` of the ``[d, d]`` factor (what a dense sum gets today; timed from the float64
  factor, without forming it);
* ``rows``: the ``[T, T]`` Gram route (:func:`eigen_from_rows`): Gram, ``eigh`` of ``T``, thin basis, Householder
  completion to the full ``[d, d]`` eigenbasis.

Both run in the same process, one after the other, on the same rows; ``ratio = full / rows``. ``agree`` is the
largest relative difference of ``(F + δ I)^{-1} v`` (``δ = 10⁻³ λ_max``, 8 random ``v``) between the two, a check that
both decomposed the same factor. ``collect_gram_s`` is the wall time of the ``[d, d]`` Gram a dense sum pays during
collection for those ``T`` rows (float32, the accumulation dtype), which the rows route does not pay (it keeps the
rows and forms the ``[T, T]`` Gram once).

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/bench_rank.py [--dims 1536 8960] [--tokens 512 1024 ...]
[--dtypes float64 float32] [--out rank.json]`` (JSON on stdout, a table on stderr). The default grid takes about
30 minutes on a 2-core box; ``--quick`` runs ``d = 1536`` only. ``--budget`` measures the token-budget compression
instead (:func:`budget_case`); ``--parts`` times the steps of the ``[T, T]`` route one by one (:func:`parts_case`:
Gram, eigh, thin basis, Householder completion; then that completion in float32, as a factor wider than
``eigh_max_dim`` got it, and the reduced QR in float32 that a thin ``A`` pays instead), the cost a ``down_proj``
``A`` of Qwen2.5-1.5B pays at 4,096 tokens (``--dims 8960 --tokens 4096``).
Results and their reading: ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time
from typing import Any

import torch

from kronfisher.algebra.columns import ColumnStore
from kronfisher.algebra.eigen import safe_eigh
from kronfisher.algebra.gram import symmetric_gram
from kronfisher.algebra.lowrank import compress_columns, eigen_from_rows
from kronfisher.collection.sums import LowRankSum

DTYPES = {"float64": torch.float64, "float32": torch.float32}


def _rows(t: int, d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scale = torch.logspace(0, -3, d)  # a decaying spectrum, like activations
    return torch.randn(t, d, generator=gen) * scale


def _probe_inverse(vectors: torch.Tensor, values: torch.Tensor, probe: torch.Tensor, delta: float) -> torch.Tensor:
    return vectors @ ((vectors.t() @ probe) / (values.unsqueeze(1) + delta))


def case(d: int, t: int, dtype: torch.dtype) -> dict[str, Any]:
    """Time both routes on one factor; returns the row of the table."""
    x = _rows(t, d, seed=d + t)
    start = time.perf_counter()
    total = symmetric_gram(x)  # the dense sum's collection GEMM, float32
    collect = time.perf_counter() - start
    del total
    x64 = x.to(torch.float64)
    mean = symmetric_gram(x64).div_(t)  # the exact factor (the float32 sum's rounding is not what is compared)
    del x64
    start, cpu = time.perf_counter(), time.process_time()
    vals, vecs = safe_eigh(mean, name="bench", factor="A", dtype=dtype, symmetric=True)
    full, full_cpu = time.perf_counter() - start, time.process_time() - cpu
    del mean
    start, cpu = time.perf_counter(), time.process_time()
    eig = eigen_from_rows([x], float(t), eigh_dtype=dtype, store_dtype=dtype, name="bench")
    rows, rows_cpu = time.perf_counter() - start, time.process_time() - cpu
    probe = torch.randn(d, 8, generator=torch.Generator().manual_seed(7), dtype=dtype)
    delta = 1e-3 * float(vals.max())
    ref = _probe_inverse(vecs, vals, probe, delta)
    got = _probe_inverse(eig.vectors, eig.values, probe, delta)
    agree = float((got - ref).abs().max() / ref.abs().max())
    return {
        "d": d,
        "T": t,
        "dtype": str(dtype).replace("torch.", ""),
        "full_s": round(full, 3),
        "rows_s": round(rows, 3),
        "ratio": round(full / rows, 2),
        "full_cpu_s": round(full_cpu, 3),
        "rows_cpu_s": round(rows_cpu, 3),
        "cpu_ratio": round(full_cpu / rows_cpu, 2),
        "collect_gram_s": round(collect, 3),
        "agree": agree,
    }


def parts_case(d: int, t: int, dtype: torch.dtype) -> dict[str, Any]:
    """Wall seconds of each step of the ``[T, T]`` route (:func:`eigen_from_rows`) for ``T`` rows of width ``d``."""
    x = _rows(t, d, seed=d + t).to(dtype)
    out: dict[str, Any] = {"d": d, "T": t, "dtype": str(dtype).replace("torch.", "")}
    out["threads"] = torch.get_num_threads()

    def timed(name: str, fn: Any) -> Any:
        start = time.perf_counter()
        value = fn()
        out[f"{name}_s"] = round(time.perf_counter() - start, 3)
        return value

    gram = timed("gram", lambda: torch.mm(x, x.t()))
    vals, vecs = timed("eigh", lambda: torch.linalg.eigh(gram))
    thin = timed("thin", lambda: torch.mm(x.t(), vecs).div_(vals.clamp_min(1e-30).sqrt()))
    timed("complete_qr", lambda: torch.linalg.qr(thin, mode="complete"))
    out["total_s"] = round(sum(v for k, v in out.items() if k.endswith("_s")), 3)
    # what a factor wider than eigh_max_dim pays instead (outside total_s): the completion in float32, and what a
    # thin A pays, only the re-orthonormalisation (reduced QR) in float32
    timed("complete_qr_float32", lambda: torch.linalg.qr(thin.float(), mode="complete"))
    timed("thin_qr_float32", lambda: torch.linalg.qr(thin.float(), mode="reduced"))
    return out


def budget_case(out: int, k: int, batch: int, tokens: int) -> dict[str, Any]:
    """Token budget ``k`` on ``tokens`` random gradient rows of width ``out``, in batches of ``batch``.

    ``amortised``: :class:`~kronfisher.collection.sums.LowRankSum` (``k`` kept + a buffer of ``b = k``; each
    compression sees at most ``k + b`` columns). ``per_batch``: the previous rule, every held column compressed
    whenever more than ``2k`` are held (so every batch once ``batch > k``, on ``k + batch`` columns).
    """
    gen = torch.Generator().manual_seed(out + batch)
    scale = torch.logspace(0, -2, out)
    row_batches = [torch.randn(min(batch, tokens - s), out, generator=gen) * scale for s in range(0, tokens, batch)]
    total = sum(float(r.double().square().sum()) for r in row_batches)
    new = LowRankSum(out, torch.float32, max_rank=k)
    start, cpu, widest = time.perf_counter(), time.process_time(), 0
    for r in row_batches:
        new.add(r, r.shape[0])
        widest = max(widest, new.num_columns)
    amortised = (time.perf_counter() - start, time.process_time() - cpu)
    held: list[torch.Tensor] = []
    kept_cols, dropped_old, calls = None, 0.0, 0
    start, cpu = time.perf_counter(), time.process_time()
    for r in row_batches:
        held.append(r)
        if sum(int(h.shape[0]) for h in held) + (0 if kept_cols is None else kept_cols.shape[0]) > 2 * k:
            store = ColumnStore(([] if kept_cols is None else [kept_cols]) + held, out)
            kept_cols, dropped, _ = compress_columns(store, k, torch.float32)
            dropped_old, held, calls = dropped_old + dropped, [], calls + 1
    per_batch = (time.perf_counter() - start, time.process_time() - cpu)
    return {
        "out": out,
        "k": k,
        "batch": batch,
        "tokens": tokens,
        "amortised_s": round(amortised[0], 2),
        "amortised_cpu_s": round(amortised[1], 2),
        "per_batch_s": round(per_batch[0], 2),
        "per_batch_cpu_s": round(per_batch[1], 2),
        "cpu_ratio": round(per_batch[1] / amortised[1], 2),
        "compressions": new.compressions,
        "per_batch_compressions": calls,
        "max_columns_held": widest,
        "discarded_fraction": new.discarded_mass / total,
        "per_batch_discarded_fraction": dropped_old / total,
    }


def main(argv: list[str] | None = None) -> None:
    """Run the grid; JSON on stdout, table on stderr."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", type=int, nargs="+", default=[1536, 8960])
    p.add_argument("--tokens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--dtypes", nargs="+", default=["float64", "float32"], choices=sorted(DTYPES))
    p.add_argument("--quick", action="store_true", help="d = 1536 only")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--parts", action="store_true", help="the steps of the [T, T] route, timed one by one")
    p.add_argument("--budget", action="store_true", help="token-budget compression cost instead (out, k, batches)")
    p.add_argument("--width", type=int, default=32768, help="--budget: out (the cost is linear in it)")
    p.add_argument("--rank", type=int, default=512, help="--budget: k")
    p.add_argument("--batches", type=int, nargs="+", default=[256, 1024, 4096], help="--budget: batch sizes")
    p.add_argument("--budget-tokens", type=int, default=8192, help="--budget: tokens per run")
    args = p.parse_args(argv)
    if args.budget:
        rows = [budget_case(args.width, args.rank, b, args.budget_tokens) for b in args.batches]
        text = json.dumps({"bench": "bench_rank --budget", "torch": torch.__version__, "rows": rows}, indent=1)
        print(text)
        if args.out:
            with open(args.out, "w", encoding="utf-8") as fh:
                fh.write(text + "\n")
        for r in rows:
            print(json.dumps(r), file=sys.stderr)
        return
    if args.parts:
        parts = [parts_case(d, t, DTYPES[n]) for n in args.dtypes for d in args.dims for t in args.tokens if t < d]
        text = json.dumps({"bench": "bench_rank --parts", "torch": torch.__version__, "rows": parts}, indent=1)
        print(text)
        if args.out:
            with open(args.out, "w", encoding="utf-8") as fh:
                fh.write(text + "\n")
        head = "| d | T | dtype | threads | Gram s | eigh s | thin basis s | completion (QR) s | total s | "
        head += "completion in float32 s | thin A: reduced QR in float32 s |"
        print(head, file=sys.stderr)
        print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|", file=sys.stderr)
        for r in parts:
            cells = [r["d"], r["T"], r["dtype"], r["threads"], r["gram_s"], r["eigh_s"], r["thin_s"]]
            cells += [r["complete_qr_s"], r["total_s"], r["complete_qr_float32_s"], r["thin_qr_float32_s"]]
            print("| " + " | ".join(str(c) for c in cells) + " |", file=sys.stderr)
        return
    dims = [1536] if args.quick else args.dims
    rows = []
    for name in args.dtypes:
        for d in dims:
            for t in args.tokens:
                if t >= d:  # rank d: nothing to gain, the route does not apply
                    continue
                rows.append(case(d, t, DTYPES[name]))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    result = {
        "bench": "bench_rank",
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": torch.get_num_threads()},
        "torch": torch.__version__,
        "command": "PYTHONPATH=src python benchmarks/bench_rank.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "rows": rows,
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    head = "|     d |     T | dtype   | full eigh s (CPU s) | [T,T] route s (CPU s) | full/route (CPU) | agree |"
    print("\n" + head, file=sys.stderr)
    rule = "|------:|------:|---------|--------------------:|----------------------:|-----------------:|------:|"
    print(rule, file=sys.stderr)
    for r in rows:
        print(
            f"| {r['d']:5d} | {r['T']:5d} | {r['dtype']:7s} | {r['full_s']:8.2f} ({r['full_cpu_s']:8.2f}) | "
            f"{r['rows_s']:10.2f} ({r['rows_cpu_s']:8.2f}) | {r['ratio']:6.2f} ({r['cpu_ratio']:6.2f}) | "
            f"{r['agree']:.0e} |",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
