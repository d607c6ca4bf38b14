"""Decompose what has rank: a dense factor of dimension ``d`` seen on ``T < d`` rows (issue 11, item 5).

For each ``d``, ``T`` and dtype, the same factor ``F = Xᵀ X / T`` (``X``: ``[T, d]`` random rows with a decaying
column scale, float32 as collected) is decomposed two ways:

* ``full``: the dense path, ``eigh`` of the ``[d, d]`` factor (what a dense sum gets today; timed from the float64
  factor, without forming it);
* ``rows``: the ``[T, T]`` Gram route (:func:`eigen_from_rows`): Gram, ``eigh`` of ``T``, thin basis, Householder
  completion to the full ``[d, d]`` eigenbasis.

Both run in the same process, one after the other, on the same rows; ``ratio = full / rows``. ``agree`` is the
largest relative difference of ``(F + δ I)^{-1} v`` (``δ = 10⁻³ λ_max``, 8 random ``v``) between the two, a check that
both decomposed the same factor. ``collect_gram_s`` is the time of the ``[d, d]`` Gram a dense sum pays during
collection for those ``T`` rows (float32, the accumulation dtype), which the rows route does not pay (it keeps the
rows and forms the ``[T, T]`` Gram once).

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/bench_rank.py [--dims 1536 8960] [--tokens 512 1024 ...]
[--dtypes float64 float32] [--out rank.json]`` (JSON on stdout, a table on stderr). The default grid takes about
30 minutes on a 2-core box; ``--quick`` runs ``d = 1536`` only.
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

from kronfisher.accumulate import symmetric_gram
from kronfisher.linalg import safe_eigh
from kronfisher.rankroute import eigen_from_rows

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
    start = time.perf_counter()
    vals, vecs = safe_eigh(mean, name="bench", factor="A", dtype=dtype, symmetric=True)
    full = time.perf_counter() - start
    del mean
    start = time.perf_counter()
    eig = eigen_from_rows([x], float(t), eigh_dtype=dtype, store_dtype=dtype, name="bench")
    rows = time.perf_counter() - start
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
        "collect_gram_s": round(collect, 3),
        "agree": agree,
    }


def main(argv: list[str] | None = None) -> None:
    """Run the grid; JSON on stdout, table on stderr."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", type=int, nargs="+", default=[1536, 8960])
    p.add_argument("--tokens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--dtypes", nargs="+", default=["float64", "float32"], choices=sorted(DTYPES))
    p.add_argument("--quick", action="store_true", help="d = 1536 only")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
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
    print("\n|     d |     T | dtype   | full eigh s | [T,T] route s | full/route | collect Gram s | agree |", file=sys.stderr)
    print("|------:|------:|---------|------------:|--------------:|-----------:|---------------:|------:|", file=sys.stderr)
    for r in rows:
        print(
            f"| {r['d']:5d} | {r['T']:5d} | {r['dtype']:7s} | {r['full_s']:11.2f} | {r['rows_s']:13.2f} | "
            f"{r['ratio']:10.2f} | {r['collect_gram_s']:14.2f} | {r['agree']:.0e} |",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
