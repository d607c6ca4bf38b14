"""``decompose_all`` keeps factors as eigendecompositions: each distinct factor is decomposed once per fit (shared
``A`` of q/k/v and gate/up once), only eigenvectors and eigenvalues are kept, and no operator decomposes again."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

import kronfisher as kf
from conftest import make_model, random_ids
from kronfisher.operator import KFAC

CFG = kf.KFACConfig(accumulate_dtype="float64", damping=1e-2)


def rel(x: Tensor, ref: Tensor) -> float:
    return float((x - ref).abs().max() / ref.abs().max())


def test_factors_stored_as_eigendecomposition(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dense factors stored and decomposed again at use were a bug: one eigh per distinct factor, none after."""
    model = make_model("qwen2")
    calls: list[int] = []
    real_eigh = torch.linalg.eigh

    def counting_eigh(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real_eigh(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", counting_eigh)
    fisher = kf.fit(model, [{"input_ids": random_ids(2, 7, seed=100 + i)} for i in range(2)], CFG)
    # Qwen2, 2 blocks: distinct inputs per block are {q,k,v}, o, {gate,up}, down -> 8, plus lm_head -> 9 A's;
    # 15 layers -> 15 G's.
    assert len(fisher.layer_names) == 15
    assert len(calls) == 9 + 15
    calls.clear()
    gen = torch.Generator().manual_seed(0)
    params = dict(model.named_parameters())
    names = [p for i in fisher.infos.values() for p in (i.weight_name, i.bias_name) if p]
    g = {n: torch.randn(params[n].shape, generator=gen, dtype=torch.float64) for n in names}
    fisher.natural_gradient(g)
    fisher.whiten(g)
    fisher.fvp(g)
    fisher.power(g, 0.5, damping=0.1)
    KFAC(fisher.infos, fisher.blocks, CFG.replace(damping_mode="pi")).natural_gradient(g)
    assert calls == []  # no decomposition at use

    for name in fisher.layer_names:
        block = fisher.block(name)
        for eig in (block.A, block.G):
            q = eig.vectors
            assert q.shape[0] == q.shape[1] and bool((eig.values >= 0).all())
            assert rel(q.t() @ q, torch.eye(q.shape[0], dtype=q.dtype)) < 1e-12  # orthonormal
        dense = [v for v in vars(block).values() if isinstance(v, Tensor) and v.dim() == 2]
        assert dense == []  # no dense A or G on the block (corrected eigenvalues are None here)
