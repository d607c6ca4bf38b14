"""Decompose what has rank: a dense factor seen on ``T < d`` rows, from its ``[T, T]`` Gram (exact).

Reference: ``F = Xᵀ X / c`` built densely in float64 and decomposed by ``torch.linalg.eigh``; the rows route must give
the same factor (``to_dense``) and the same damped inverse to 1e-10 (relative, float64), with an orthonormal square
basis and ascending eigenvalues like the dense path.
"""

from __future__ import annotations

import pytest
import torch

from kronfisher.algebra.lowrank import eigen_from_rows
from kronfisher.errors import ShapeError
from kronfisher.footprint import rows_route_pays


def _rows(t: int, d: int, seed: int, rank: int | None = None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d, generator=gen, dtype=torch.float64) * torch.linspace(0.1, 3.0, d, dtype=torch.float64)
    if rank is not None:  # rows confined to a rank-dimensional subspace: rank(F) = rank < T
        x = torch.randn(t, rank, generator=gen, dtype=torch.float64) @ x[:rank]
    return x


@pytest.mark.parametrize(("t", "d", "rank"), [(12, 40, None), (39, 40, None), (30, 41, 7), (1, 9, None)])
def test_rows_route_equals_full_eigh(t, d, rank):
    x = _rows(t, d, seed=t + d, rank=rank)
    count = 3.0
    dense = x.t() @ x / count
    eig = eigen_from_rows(list(x.split(5)), count, eigh_dtype=torch.float64, store_dtype=torch.float64)
    vals, vecs = torch.linalg.eigh(dense)
    assert eig.vectors.shape == (d, d) and eig.full
    torch.testing.assert_close(eig.vectors.t() @ eig.vectors, torch.eye(d, dtype=torch.float64), rtol=0, atol=1e-12)
    assert bool((eig.values[1:] >= eig.values[:-1]).all()) and float(eig.values.min()) >= 0.0
    scale = float(vals.max())
    torch.testing.assert_close(eig.to_dense(), dense, rtol=0, atol=1e-12 * scale)
    for delta in (1e-3 * scale, 1e-1 * scale):
        ref = (vecs / (vals.clamp_min(0) + delta)) @ vecs.t()
        got = (eig.vectors / (eig.values + delta)) @ eig.vectors.t()
        assert float((got - ref).abs().max()) <= 1e-10 * float(ref.abs().max())
    assert int((eig.values > 1e-9 * scale).sum()) == min(t, rank or t)  # the rank, no spurious directions


def test_rows_route_with_augmented_rows_and_storage_dtype():
    # A with a bias: rows [x, 1]; the eigenvectors are stored in the sums' dtype (float32), arithmetic in float64.
    x = _rows(10, 24, seed=3)
    a = torch.cat([x, torch.ones(10, 1, dtype=x.dtype)], 1)
    eig = eigen_from_rows([a.float()], 10.0, eigh_dtype=torch.float64, store_dtype=torch.float32)
    assert eig.vectors.dtype == torch.float32 and eig.vectors.shape == (25, 25)
    ref = a.float().double().t() @ a.float().double() / 10.0
    torch.testing.assert_close(eig.to_dense().double(), ref, rtol=0, atol=1e-6 * float(ref.abs().max()))


def test_rows_route_refuses_no_rows_and_pays_only_below_the_ratio():
    with pytest.raises(ShapeError, match="layer 'x'"):
        eigen_from_rows([torch.zeros(0, 5)], 1.0, eigh_dtype=torch.float64, store_dtype=torch.float64, name="x")
    assert rows_route_pays(100, 1000) and not rows_route_pays(900, 1000) and not rows_route_pays(0, 1000)


@pytest.mark.parametrize(("seq", "ekfac"), [(6, False), (6, True), (3, False)])
def test_fit_with_the_rows_route_equals_the_dense_path(monkeypatch, seq, ekfac):
    # A tiny Qwen2 on 2 × seq tokens: with 12, down_proj's A (24) and the lm_head's G (40) are kept as rows
    # (T ≤ d / 2); with 6, every A is, q/k/v sharing one stored copy of their input rows (decomposed once).
    # They are decomposed from their [T, T] Gram; ROWS_RATIO = 0 forces the dense path. Same factors and the same
    # damped inverse, float64, 1e-10 relative (EK-FAC on the K-FAC data: per-sample gradients have no null-space
    # part).
    import importlib

    import kronfisher as kf
    from conftest import make_model, random_ids

    collect = importlib.import_module("kronfisher.collection.collector")

    model = make_model("qwen2")
    batches = [{"input_ids": random_ids(2, seq, seed=s)} for s in range(1)]
    cfg = kf.KFACConfig(accumulate_dtype="float64", lowrank_dtype="float64", damping=1e-3, ekfac=ekfac)
    route = kf.fit(model, batches, cfg)
    if seq == 3:
        from kronfisher.decompose.layer import shared_A_owners

        _, collector, _ = kf.collect(model, batches, cfg)
        sums = collector.sums
        assert all(s.A.holds_rows for s in sums.values()) and sums["lm_head"].G.holds_rows
        owners = shared_A_owners(sums)
        assert owners["model.layers.0.self_attn.v_proj"] == owners["model.layers.0.self_attn.q_proj"]
        assert (
            sums["model.layers.0.self_attn.k_proj"].A.rows[0][0] is sums["model.layers.0.self_attn.q_proj"].A.rows[0][0]
        )
    monkeypatch.setattr(collect, "ROWS_RATIO", 0.0)
    dense = kf.fit(model, batches, cfg)
    for name in dense.layer_names:
        ref = dense.to_dense(name)
        torch.testing.assert_close(route.to_dense(name), ref, rtol=0, atol=1e-10 * float(ref.abs().max()))
    gen = torch.Generator().manual_seed(0)
    v = {n: torch.randn(p.shape, generator=gen, dtype=torch.float64) for n, p in model.named_parameters()}
    v = {n: t for n, t in v.items() if n in route.natural_gradient(v)}
    got, ref = route.natural_gradient(v), dense.natural_gradient(v)
    for n in ref:
        assert float((got[n] - ref[n]).abs().max()) <= 1e-10 * float(ref[n].abs().max()), n


@pytest.mark.parametrize("lowrank", [False, True], ids=["rows", "lowrank"])
def test_mc_ekfac_does_not_depend_on_the_representation_of_G(monkeypatch, lowrank):
    # The memory plan picks G's representation by the token count (dense, rows while T ≤ d / 2, exact low-rank while
    # T < out), so an MC EK-FAC operator must not change with it. Reference: the dense path (ROWS_RATIO = 0,
    # lowrank_threshold above every out), float64, 1e-8 relative. With fresh draws in the EK-FAC pass the
    # representations differed by 0.7 (rows) and 0.9 (low-rank) relative on this model: the values on G's null space
    # depended on its arbitrary basis. The EK-FAC pass now reuses the K-FAC pass's draws.
    import importlib

    import kronfisher as kf
    from conftest import make_model, random_ids

    collect = importlib.import_module("kronfisher.collection.collector")
    model = make_model("qwen2")
    batches = [{"input_ids": random_ids(2, 5, seed=s)} for s in range(2)]
    cfg = kf.KFACConfig(
        accumulate_dtype="float64", lowrank_dtype="float64", max_memory="1GiB", ekfac=True, fisher="mc", seed=3
    )
    route = kf.fit(model, batches, cfg.replace(lowrank_threshold=20) if lowrank else cfg)
    monkeypatch.setattr(collect, "ROWS_RATIO", 0.0)
    dense = kf.fit(model, batches, cfg)
    for name in dense.layer_names:
        ref = dense.to_dense(name)
        torch.testing.assert_close(route.to_dense(name), ref, rtol=0, atol=1e-8 * float(ref.abs().max()), msg=name)


def test_completion_of_a_factor_above_eigh_max_dim_is_float32_and_still_the_factor(monkeypatch):
    # The [T, T] eigh and the thin basis stay in eigh_dtype; the [d, d] completion of a factor wider than
    # eigh_max_dim is a float32 QR, as a dense eigh of that size would be. Reference: F built densely in float64;
    # the float32 completion keeps F to float32 round-off (1e-5 relative) and an orthonormal basis (1e-5).
    x = _rows(20, 60, seed=11)
    dense = x.t() @ x / 4.0
    eig = eigen_from_rows([x], 4.0, eigh_dtype=torch.float64, store_dtype=torch.float64, basis_dtype=torch.float32)
    assert eig.vectors.shape == (60, 60) and eig.vectors.dtype == torch.float64
    scale = float(dense.abs().max())
    torch.testing.assert_close(eig.to_dense(), dense, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(eig.vectors.t() @ eig.vectors, torch.eye(60, dtype=torch.float64), rtol=0, atol=1e-5)

    import kronfisher.decompose.layer as layer
    from kronfisher.collection.sums import DenseSum
    from kronfisher.config import KFACConfig

    seen: list[tuple[torch.dtype, torch.dtype]] = []
    real = layer.eigen_from_rows

    def spy(*args, **kwargs):
        seen.append((kwargs["eigh_dtype"], kwargs["basis_dtype"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(layer, "eigen_from_rows", spy)
    part = DenseSum(60, torch.float32, max_rows=30)
    part.add_rows(x.float(), 20.0)
    assert part.holds_rows
    for max_dim, expect in ((64, torch.float64), (32, torch.float32)):
        got = layer.decompose_dense("m", part, "A", KFACConfig(eigh_max_dim=max_dim))
        assert seen[-1] == (torch.float64, expect)
        ref = (x.float().double().t() @ x.float().double()) / 20.0
        torch.testing.assert_close(got.to_dense().double(), ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
