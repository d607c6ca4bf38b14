"""Peak memory of writing factor files: safetensors' ``save_file`` against kronfisher's tensor-by-tensor writer.

Each case runs in a child process: it builds the float32 tensors (``--count`` × ``[--dim, --dim]``, 8 × 8960² =
2.57 GB by default), reads ``VmRSS``, resets ``VmHWM`` (Linux ``clear_refs``), writes the file and reports the peak
RSS above the tensors themselves, the time and the file's SHA-256. The cases:

* ``save_file``: ``safetensors.torch.save_file`` (the installed safetensors) of the tensors;
* ``stream``: ``kronfisher.io.atomic.write_safetensors``, the writer of every factor file (docs/files.md#format);
* ``cat+save_file`` and ``rows+stream``: each tensor held as ``--chunks`` row chunks, as the low-rank columns ``W``
  are (one chunk per batch). Before, ``save`` concatenated them (``torch.cat``) and then wrote; now the chunks are
  written in turn (``format.Rows``).
* ``contiguous+stream`` and ``payload+stream``: column-major tensors, as every eigenbasis is (``torch.linalg.eigh``).
  Before, the payload of ``save`` held a contiguous copy of each until the write; now ``format.Payload`` keeps them
  as they are, hashes them and the writer transposes them a slice of rows at a time.

The metadata has one key, so the files of a pair must be identical byte for byte (their SHA-256 are compared).

Reproduce: ``PYTHONPATH=src .venv/bin/python benchmarks/bench_write.py [--quick] [--out write.json]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import safetensors
import torch
from safetensors.torch import save_file

from bench_scale import current_rss, machine, peak_rss, reset_peak  # the benchmarks' one RSS probe
from kronfisher.io.atomic import write_safetensors
from kronfisher.io.format import Payload, Rows

MIB = 2**20
CASES = ("save_file", "stream", "cat+save_file", "rows+stream", "contiguous+stream", "payload+stream")
METADATA = {"kronfisher": json.dumps({"note": "one key, so that save_file's layout is deterministic"})}


def child(case: str, count: int, dim: int, chunks: int, path: Path) -> dict[str, Any]:
    """Build the tensors, write them with ``case``; the peak RSS above the tensors, the time, the file's digest."""
    g = torch.Generator().manual_seed(0)
    rows = -(-dim // chunks)
    held = [[torch.randn(min(rows, dim - i), dim, generator=g) for i in range(0, dim, rows)] for _ in range(count)]
    if case in ("save_file", "stream"):
        held = [[torch.cat(parts)] for parts in held]  # one tensor each, built before the baseline
    if case in ("contiguous+stream", "payload+stream"):
        held = [[torch.cat(parts).mT] for parts in held]  # column-major, as an eigenbasis
    base = current_rss()
    reset_peak()
    start = time.perf_counter()
    if case == "save_file":
        save_file({f"t{i}": parts[0] for i, parts in enumerate(held)}, str(path), metadata=METADATA)
    elif case == "stream":
        write_safetensors({f"t{i}": parts[0] for i, parts in enumerate(held)}, str(path), METADATA)
    elif case == "cat+save_file":  # what save did with chunked columns: every concatenation held until the write
        save_file({f"t{i}": torch.cat(parts) for i, parts in enumerate(held)}, str(path), metadata=METADATA)
    elif case == "contiguous+stream":  # what the payload did with an eigenbasis: a contiguous copy held until written
        write_safetensors({f"t{i}": parts[0].contiguous() for i, parts in enumerate(held)}, str(path), METADATA)
    elif case == "payload+stream":
        payload = Payload()
        for i, parts in enumerate(held):
            payload.add(f"t{i}", parts[0])
        write_safetensors(payload.prepared()[0], str(path), METADATA)
    else:
        write_safetensors({f"t{i}": Rows(tuple(parts)) for i, parts in enumerate(held)}, str(path), METADATA)
    seconds = time.perf_counter() - start
    extra = peak_rss() - base
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(64 * MIB):
            h.update(block)
    size = path.stat().st_size
    path.unlink()
    return {"case": case, "tensors_bytes": size, "rss_before": base, "peak_above": extra, "seconds": seconds,
            "sha256": h.hexdigest()}  # fmt: skip


def run_case(case: str, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", case, "--count", str(args.count), "--dim", str(args.dim)]
    cmd += ["--chunks", str(args.chunks), "--folder", str(folder)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(report: dict[str, Any]) -> str:
    rows = {r["case"]: r for r in report["cases"]}
    lines = [
        f"{report['count']} float32 tensors of [{report['dim']}, {report['dim']}] ({report['bytes'] / MIB:,.0f} MiB), "
        f"chunked cases in {report['chunks']} row chunks each",
        "| case | peak RSS above the tensors (MiB) | write s | same bytes as its pair |",
        "|---|---:|---:|---|",
    ]
    pairs = {
        "save_file": "stream",
        "stream": "save_file",
        "cat+save_file": "rows+stream",
        "rows+stream": "cat+save_file",
        "contiguous+stream": "payload+stream",
        "payload+stream": "contiguous+stream",
    }
    for case, r in rows.items():
        same = rows.get(pairs[case], {}).get("sha256") == r["sha256"]
        lines.append(f"| {case} | {r['peak_above'] / MIB:,.1f} | {r['seconds']:.2f} | {same} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 × [1024, 1024] (16 MiB): seconds")
    parser.add_argument("--count", type=int, default=8, help="tensors")
    parser.add_argument("--dim", type=int, default=8960, help="each tensor is [dim, dim] float32")
    parser.add_argument("--chunks", type=int, default=8, help="row chunks per tensor in the chunked cases")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.count, args.dim = 4, 1024
    if args.child:
        print(json.dumps(child(args.child, args.count, args.dim, args.chunks, args.folder / f"{args.child}.st")))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench_write.") as tmp:
        cases = [run_case(case, args, Path(tmp)) for case in CASES]
    report = {
        "machine": {**machine(), "safetensors": safetensors.__version__},
        "count": args.count,
        "dim": args.dim,
        "chunks": args.chunks,
        "bytes": args.count * args.dim * args.dim * 4,
        "cases": cases,
    }
    print(json.dumps(report, indent=1))
    print(table(report), file=sys.stderr)
    if args.out is not None:  # the same JSON as printed
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
