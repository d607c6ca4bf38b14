"""Error of float32 eigh, and of float32 eigh plus one float64 refinement step, against float64 eigh (CPU).

``PYTHONPATH=src python benchmarks/eigh_refine.py [--dims 576 1536] [--json out.json]``: for factors shaped like
K-FAC's (``Z ᵀ Z / n`` with a flat spectrum, and with columns scaled by ``logspace(0, -3)``: eigenvalues over six
decades, as measured ``A`` and ``G`` factors decay), prints the relative reconstruction error
``‖Q Λ Qᵀ − M‖_F / ‖M‖_F``, the orthogonality error ``max |QᵀQ − I|``, the eigenvalue error ``max |λ − λ₆₄| / λ_max``
and the error of the damped inverse ``(M + δ)^{-1}`` (``δ = 10⁻³ · mean λ``, relative, Frobenius) of each method,
with wall times (single thread; on a loaded machine only their ratios mean anything). The refinement is
:func:`kronfisher.decompose.batched.refine_eigh` (``eigh_refine=True``).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from kronfisher.decompose.batched import refine_eigh


def _errors(m: torch.Tensor, ref: torch.Tensor, values: torch.Tensor, vectors: torch.Tensor) -> dict[str, float]:
    d = m.shape[0]
    q, lam = vectors.double(), values.double()
    delta = 1e-3 * float(ref.mean())
    inv = torch.linalg.inv(m + delta * torch.eye(d, dtype=torch.float64))
    approx = (q / (lam.clamp_min(0) + delta)) @ q.t()
    return {
        "reconstruction": float(torch.linalg.matrix_norm((q * lam) @ q.t() - m) / torch.linalg.matrix_norm(m)),
        "orthogonality": float((q.t() @ q - torch.eye(d, dtype=torch.float64)).abs().max()),
        "eigenvalues": float((torch.sort(lam).values - ref).abs().max() / ref.abs().max()),
        "damped_inverse": float(torch.linalg.matrix_norm(approx - inv) / torch.linalg.matrix_norm(inv)),
    }


def measure(d: int, decay: bool, seed: int = 0) -> dict[str, Any]:
    """One factor: float64 eigh, float32 eigh, float32 eigh + refinement."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2 * d, d, generator=g, dtype=torch.float64)
    if decay:
        z = z * torch.logspace(0, -3, d, dtype=torch.float64)
    m = z.t() @ z / (2 * d)
    t0 = time.perf_counter()
    ref, ref_vec = torch.linalg.eigh(m)
    t64 = time.perf_counter() - t0
    t0 = time.perf_counter()
    v32, q32 = torch.linalg.eigh(m.float())
    t32 = time.perf_counter() - t0
    t0 = time.perf_counter()
    vr, qr = refine_eigh(m, v32, q32)
    tr = time.perf_counter() - t0
    return {
        "d": d,
        "spectrum": "decaying (1e-6 .. 1)" if decay else "flat",
        "float64": {"s": t64, **_errors(m, ref, ref, ref_vec)},
        "float32": {"s": t32, **_errors(m, ref, v32, q32)},
        "float32+refine": {"s": t32 + tr, **_errors(m, ref, vr, qr)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="*", default=[576, 1536])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [measure(d, decay) for d in args.dims for decay in (False, True)]
    print("| d | spectrum | method | s | reconstruction | orthogonality | eigenvalues | damped inverse |")
    print("| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        for method in ("float64", "float32", "float32+refine"):
            e = r[method]
            print(
                f"| {r['d']} | {r['spectrum']} | {method} | {e['s']:.2f} | {e['reconstruction']:.1e} | "
                f"{e['orthogonality']:.1e} | {e['eigenvalues']:.1e} | {e['damped_inverse']:.1e} |"
            )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
