"""Damping is Tikhonov, ``(F + δ I)^{-1}``, then the optional cap on ``λ + δ`` (docs/concepts.md): never clamping
the eigenvalues instead of adding ``δ``, checked through the operator against a dense float64 eigendecomposition.
"""

from __future__ import annotations

import torch
from torch import Tensor

import kronfisher as kf
from conftest import make_model, random_ids
from kronfisher.operator import KFAC


def rel(x: Tensor, ref: Tensor) -> float:
    return float((x - ref).abs().max() / ref.abs().max())


def test_damping_is_tikhonov_not_clamping() -> None:
    """With a singular ``F`` (few tokens) the result is the Tikhonov solve, and with a cap it differs from the cap
    alone."""
    model = make_model("llama")
    cfg = kf.KFACConfig(accumulate_dtype="float64", damping_mode="exact", damping=1e-3)
    fisher = kf.fit(model, [{"input_ids": random_ids(1, 6, seed=80)}], cfg)
    name = "model.layers.1.mlp.down_proj"  # in = 24 > 6 tokens: A (so F) is singular
    a, g = fisher.factors(name)
    f = torch.kron(g, a)
    lam, q = torch.linalg.eigh(f)
    assert float(lam.min()) < 1e-12 * float(lam.max())
    w = f"{name}.weight"
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(model.get_submodule(name).weight.shape, generator=gen, dtype=torch.float64)
    tikhonov = torch.linalg.solve(f + 1e-3 * torch.eye(f.shape[0], dtype=f.dtype), x.reshape(-1)).reshape(x.shape)
    assert rel(fisher.natural_gradient({w: x})[w], tikhonov) < 1e-7  # condition ~1e5 in float64

    kappa = 1e3
    capped = KFAC(fisher.infos, fisher.blocks, cfg.replace(max_condition_number=kappa)).natural_gradient({w: x})[w]
    lam = lam.clamp_min(0.0)
    with_delta = (lam + 1e-3).clamp_min(float((lam + 1e-3).max()) / kappa)
    clamp_only = lam.clamp_min(float(lam.max()) / kappa)
    ref = (q @ ((q.t() @ x.reshape(-1)) / with_delta)).reshape(x.shape)
    cap_alone = (q @ ((q.t() @ x.reshape(-1)) / clamp_only)).reshape(x.shape)
    assert rel(capped, ref) < 1e-9  # condition <= κ
    assert rel(capped, cap_alone) > 1e-3  # δ is added before the cap, not replaced by it
