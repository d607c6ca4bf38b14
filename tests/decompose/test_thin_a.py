"""A thin eigenbasis of ``A``: a factor seen on fewer tokens than its size keeps only its nonzero eigenpairs.

Reference: the same model and batches with ``ROWS_RATIO = 0``, every ``A`` a dense sum decomposed by the ``[d, d]``
eigh into a square basis (float64). The thin-``A`` operator must equal it: dense blocks, powers ``1, -1, -1/2``
under every damping mode (factored with ``δ_A ≠ δ_G``, pi, exact, with and without the condition-number cap),
K-FAC and EK-FAC of both granularities, the Kronecker spectrum with multiplicities, and after a save and a load:
1e-9 relative (float64; the two routes round differently).
"""

from __future__ import annotations

import importlib

import pytest
import torch

import kronfisher as kf
from conftest import make_model, random_ids
from kronfisher.algebra.block import KronBlock
from kronfisher.algebra.damping import Damping
from kronfisher.algebra.eigen import Eigen
from kronfisher.analysis.metrics import kron_spectrum
from kronfisher.errors import DecompositionError

collect = importlib.import_module("kronfisher.collection.collector")

DAMPINGS = [
    Damping("factored", 1e-3, 2e-3, 5e-4),  # delta: what EK-FAC adds (its corrected values are damped exactly)
    Damping("pi", 1e-3),
    Damping("exact", 1e-3),
    Damping("exact", 1e-3, max_condition_number=50.0),
    Damping("factored", 1e-3, 1e-3, 1e-3, max_condition_number=20.0),
]


def _fits(monkeypatch, **kw):
    model = make_model("qwen2")
    # 4 + 3 = 7 tokens: every A (16, 17 with a bias, 24) is held as rows (T ≤ d / 2) and has rank ≤ 7 < its size
    batches = [{"input_ids": random_ids(2, 2, seed=1)}, {"input_ids": random_ids(1, 3, seed=2)}]
    cfg = kf.KFACConfig(accumulate_dtype="float64", lowrank_dtype="float64", damping=1e-3, **kw)
    thin = kf.fit(model, batches, cfg)
    with monkeypatch.context() as m:
        m.setattr(collect, "ROWS_RATIO", 0.0)
        dense = kf.fit(model, batches, cfg)
    return model, thin, dense


def _close(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    err = float((got - ref).abs().max())
    assert err <= 1e-9 * max(float(ref.abs().max()), 1e-300), f"{what}: {err:.3e}"


@pytest.mark.parametrize(
    "kw",
    [{}, {"ekfac": True, "ekfac_granularity": "token"}, {"ekfac": True, "ekfac_granularity": "sequence"}],
    ids=["kfac", "ekfac-token", "ekfac-sequence"],
)
def test_thin_A_is_the_operator_of_the_square_basis(monkeypatch, kw):
    model, thin, dense = _fits(monkeypatch, **kw)
    thin_layers = [n for n in thin.layer_names if thin.block(n).thin_side == "A"]
    assert "model.layers.0.mlp.down_proj" in thin_layers and "model.layers.1.self_attn.q_proj" in thin_layers
    assert all(dense.block(n).A.full for n in dense.layer_names)
    gen = torch.Generator().manual_seed(0)
    v = {n: torch.randn(p.shape, generator=gen, dtype=torch.float64) for n, p in model.named_parameters()}
    for name in thin_layers:
        a = thin.block(name).A
        assert a.rank < a.dim and a.rank == int((dense.block(name).A.values > 1e-10).sum())
        assert thin.summary()[name]["rank_A"] == a.rank and dense.summary()[name]["rank_A"] == a.dim
        _close(thin.to_dense(name), dense.to_dense(name), f"{name} dense block")
        for damping in DAMPINGS:
            ref_spec = kron_spectrum(dense.block(name), damping, name)
            got_spec = kron_spectrum(thin.block(name), damping, name)
            assert float(got_spec.mult.sum()) == float(ref_spec.mult.sum())
            _close((got_spec.values * got_spec.mult).sum(), (ref_spec.values * ref_spec.mult).sum(), "trace")
    for damping in DAMPINGS:
        for p in (1.0, -1.0, -0.5):
            got, ref = thin.power(v, p, damping), dense.power(v, p, damping)
            assert got.keys() == ref.keys()
            for n in ref:
                _close(got[n], ref[n], f"{n} p={p} {damping.mode}")


def test_thin_A_with_a_thin_G_is_completed_and_a_file_keeps_it_thin(monkeypatch, tmp_path):
    # lowrank_threshold=20: gate/up (out 24) and the lm_head keep G low-rank, so their A (16) gets a square basis
    # (one thin side per block); down_proj (G dense 16) keeps its thin A, in memory and in the file.
    model, thin, dense = _fits(monkeypatch, ekfac=True, lowrank_threshold=20)
    up, down = "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"
    assert thin.block(up).representation == "lowrank" and thin.block(up).A.full
    assert thin.block(down).thin_side == "A"
    path = tmp_path / "f.safetensors"
    thin.save(path)
    loaded = kf.load(path, model=model)
    assert loaded.block(down).thin_side == "A"
    assert loaded.block(down).A.vectors.shape == thin.block(down).A.vectors.shape
    gen = torch.Generator().manual_seed(1)
    v = {n: torch.randn(p.shape, generator=gen, dtype=torch.float64) for n, p in model.named_parameters()}
    got, ref, back = thin.natural_gradient(v), dense.natural_gradient(v), loaded.natural_gradient(v)
    for n in ref:
        _close(got[n], ref[n], n)
        # the file stores the bases contiguous (memory may hold them column-major): products round differently
        assert float((back[n] - got[n]).abs().max()) <= 1e-12 * float(got[n].abs().max()), n


def test_a_block_with_two_thin_sides_is_refused_and_completion_keeps_the_factor():
    gen = torch.Generator().manual_seed(2)
    q, _ = torch.linalg.qr(torch.randn(7, 3, generator=gen, dtype=torch.float64))
    a = Eigen(q, torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64))
    full = a.completed()
    assert full.full and bool((full.values[1:] >= full.values[:-1]).all())
    torch.testing.assert_close(full.to_dense(), a.to_dense(), rtol=0, atol=1e-14)
    torch.testing.assert_close(full.vectors.t() @ full.vectors, torch.eye(7, dtype=torch.float64), rtol=0, atol=1e-14)
    with pytest.raises(DecompositionError, match=r"thin A \[7, 3\] and a thin G \[5, 2\]"):
        KronBlock(a, Eigen(q[:5, :2], torch.ones(2, dtype=torch.float64)))
