"""Low-rank G (docs/concepts.md): eigenform and Woodbury against the dense path and an independent dense reference.

The reference builds ``G = gᵀg / N`` and ``A = aᵀa / T`` in float64 from the same rows and applies matrix functions
by its own ``eigh``; the Kronecker reference for ``exact`` damping materialises ``G ⊗ A`` (row-major ``V``).
"""

from __future__ import annotations

import math

import pytest
import torch

import kronfisher as kf
from kronfisher.algebra.woodbury import woodbury_factor
from kronfisher.collection.sums import DenseSum, LayerSums, LowRankSum
from kronfisher.errors import ConfigError, NumericalWarning
from kronfisher.layers import LayerInfo

OUT, IN = 30, 5
INFO = LayerInfo("head", "linear", IN, OUT, True, "head.weight", "head.bias")
F64 = {"accumulate_dtype": "float64", "lowrank_dtype": "float64", "damping": 0.1}


def _rows(t: int, seed: int = 0, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, IN, generator=gen, dtype=torch.float64)
    g = torch.randn(t, OUT, generator=gen, dtype=torch.float64) * torch.linspace(0.2, 2.0, OUT, dtype=torch.float64)
    if rank is not None:  # gradients confined to a rank-dimensional subspace
        basis = torch.randn(rank, OUT, generator=gen, dtype=torch.float64)
        g = torch.randn(t, rank, generator=gen, dtype=torch.float64) @ basis
    return x, g


def _fisher(x: torch.Tensor, g: torch.Tensor, n: float, lowrank: bool, **cfg_kw) -> kf.KFAC:
    cfg = kf.KFACConfig(**{**F64, **cfg_kw})
    a = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    sa = DenseSum(IN + 1, torch.float64)
    sa.add(a.t() @ a, len(x))
    if lowrank:
        sg = LowRankSum(OUT, cfg.lowrank_torch_dtype, cfg.lowrank_max_rank)
        sg.add(g, n)
    else:
        sg = DenseSum(OUT, torch.float64)
        sg.add(g.t() @ g, n)
    return kf.KFAC.from_sums({"head": INFO}, {"head": LayerSums(sa, sg)}, cfg)


def _mpow(m: torch.Tensor, p: float, shift: float, kappa: float | None = None) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh((m + m.t()) / 2)
    vals = vals.clamp_min(0) + shift
    if kappa is not None:
        vals = vals.clamp_min(float(vals.max()) / kappa)
    return (vecs * vals.pow(p)) @ vecs.t()


def _reference(x, g, n, v, p, mode, delta=0.1, kappa=None) -> torch.Tensor:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 180×180 LAPACK eigh thrashes with 2 threads on a loaded 2-core machine
    try:
        return _reference_1t(x, g, n, v, p, mode, delta, kappa)
    finally:
        torch.set_num_threads(threads)


def _reference_1t(x, g, n, v, p, mode, delta, kappa) -> torch.Tensor:
    a = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    amat, gmat = a.t() @ a / len(x), g.t() @ g / n
    if mode == "exact":
        f = torch.kron(gmat, amat)
        return (_mpow(f, p, delta, kappa) @ v.reshape(-1)).reshape(v.shape)
    if mode == "pi":
        pi = math.sqrt((torch.trace(amat) / amat.shape[0]) / (torch.trace(gmat) / gmat.shape[0]))
        d_a, d_g = pi * math.sqrt(delta), math.sqrt(delta) / pi
    else:
        d_a = d_g = delta
    return _mpow(gmat, p, d_g, kappa) @ v @ _mpow(amat, p, d_a, kappa)


def _apply(fisher: kf.KFAC, v: torch.Tensor, p: float) -> torch.Tensor:
    out = fisher.power({"head.weight": v[:, :IN], "head.bias": v[:, IN]}, p)
    return torch.cat([out["head.weight"], out["head.bias"][:, None]], 1)


@pytest.mark.parametrize("tokens", [12, 50])  # T < out (thin P + complement) and T > out (budget off: full rank)
@pytest.mark.parametrize("mode", ["factored", "pi", "exact"])
@pytest.mark.parametrize("kappa", [None, 30.0])
def test_lowrank_equals_dense_every_power_and_damping_mode(tokens, mode, kappa):
    x, g = _rows(tokens)
    n = tokens - 3  # N ≠ T: G is normalised by loss terms
    dense = _fisher(x, g, n, False, damping_mode=mode, max_condition_number=kappa)
    low = _fisher(x, g, n, True, damping_mode=mode, max_condition_number=kappa)
    assert low.block("head").representation == "lowrank"
    assert low.block("head").G.rank == min(tokens, OUT)
    v = torch.randn(OUT, IN + 1, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    for p in (1.0, -1.0, -0.5, 0.5):
        ref = _reference(x, g, n, v, p, mode, kappa=kappa)
        # float64 throughout: both paths agree with the independent dense reference to 1e-8 relative
        torch.testing.assert_close(_apply(low, v, p), ref, rtol=1e-8, atol=1e-10 * float(ref.abs().max()))
        torch.testing.assert_close(_apply(low, v, p), _apply(dense, v, p), rtol=1e-8, atol=0)


@pytest.mark.parametrize("tokens", [12, 50])
@pytest.mark.parametrize("mode", ["factored", "pi"])
def test_woodbury_equals_eigenform_and_reference(tokens, mode):
    x, g = _rows(tokens, seed=1)
    eig = _fisher(x, g, tokens, True, damping_mode=mode)
    wood = _fisher(x, g, tokens, True, damping_mode=mode, lowrank_solver="woodbury")
    v = torch.randn(OUT, IN + 1, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ref = _reference(x, g, tokens, v, -1.0, mode)
    got = _apply(wood, v, -1.0)
    torch.testing.assert_close(got, ref, rtol=1e-8, atol=0)  # float64 Woodbury vs dense solve
    torch.testing.assert_close(got, _apply(eig, v, -1.0), rtol=1e-8, atol=0)
    # Other powers keep the eigenform under lowrank_solver="woodbury".
    torch.testing.assert_close(_apply(wood, v, -0.5), _apply(eig, v, -0.5), rtol=0, atol=0)


def test_woodbury_factor_gives_the_dense_damped_solve_and_refuses_a_non_square_gram():
    gen = torch.Generator().manual_seed(3)
    u = torch.randn(40, 7, generator=gen, dtype=torch.float64)
    x = torch.randn(40, 3, generator=gen, dtype=torch.float64)
    ref = torch.linalg.solve(u @ u.t() + 0.05 * torch.eye(40, dtype=torch.float64), x)
    solve = woodbury_factor(u.t() @ u, 0.05)  # S = I + UᵀU/δ; (UUᵀ + δI)^{-1} X = X/δ − U S^{-1} Uᵀ X / δ²
    torch.testing.assert_close(x / 0.05 - u @ solve(u.t() @ x) / 0.05**2, ref, rtol=1e-9, atol=0)  # float64
    with pytest.raises(kf.DecompositionError):
        woodbury_factor(u, 0.05)  # not a [T, T] Gram: refused, not solved


def test_injected_cholesky_failure_falls_back_to_eigh_with_warning(monkeypatch):
    x, g = _rows(12, seed=4)
    v = torch.randn(OUT, IN + 1, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    good = _apply(_fisher(x, g, 12, True, lowrank_solver="woodbury"), v, -1.0)
    calls = []
    real = torch.linalg.cholesky_ex

    def failing(a, *args, **kw):
        chol, _ = real(a, *args, **kw)
        calls.append(a.shape)
        return chol, torch.ones((), dtype=torch.int32)  # every attempt reports "not positive definite"

    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing)
    with pytest.warns(NumericalWarning, match="Cholesky of S .* failed for layer 'head'"):
        got = _apply(_fisher(x, g, 12, True, lowrank_solver="woodbury"), v, -1.0)
    assert len(calls) == 4  # no jitter, ε, 10ε, 100ε
    assert bool(torch.isfinite(got).all())
    torch.testing.assert_close(got, good, rtol=1e-9, atol=0)  # eigh of S gives the same solve (float64)


def test_woodbury_refuses_what_does_not_factor():
    with pytest.raises(ConfigError, match="ekfac=True"):
        kf.KFACConfig(lowrank_solver="woodbury", ekfac=True)
    x, g = _rows(12)
    # The token budget is on by default; Woodbury refuses only a G that was actually compressed (12 > k + b = 8).
    squeezed = _fisher(x, g, 12, True, lowrank_solver="woodbury", lowrank_max_rank=4)
    with pytest.raises(ConfigError, match="compressed G"):
        squeezed.power({"head.weight": torch.ones(OUT, IN, dtype=torch.float64)}, -1.0)
    wood = _fisher(x, g, 12, True, lowrank_solver="woodbury")
    v = {"head.weight": torch.ones(OUT, IN, dtype=torch.float64)}
    with pytest.raises(ConfigError, match="cannot apply to layer 'head'"):
        wood.power(v, -1.0, damping=kf.Damping("exact", 0.1, 0.1, 0.1))


def _dense_g(g: torch.Tensor, n: float) -> torch.Tensor:
    return g.t() @ g / n


@pytest.mark.parametrize("storage", ["float64", "float32", "bfloat16"])
def test_streaming_compression_keeps_trace_and_error_bound(storage):
    _, g = _rows(230, seed=7)
    k = 6
    s = LowRankSum(OUT, kf.KFACConfig(lowrank_dtype=storage).lowrank_torch_dtype, max_rank=k)
    held = []
    stored = []
    for start in range(0, 230, 9):  # 26 batches: columns keep arriving after each compression
        rows = g[start : start + 9]
        s.add(rows, len(rows))
        stored.append(rows.to(s.storage_dtype).to(torch.float64))
        held.append(s.num_columns)
    assert max(held) <= 2 * k  # memory O(out · k) however many tokens
    assert s.tail_mass > 0
    eig = s.eigen(dtype=torch.float64)
    assert eig.rank == k
    exact = _dense_g(torch.cat(stored), 230)  # G of the values as stored (lowrank_dtype rounding)
    trace = float(torch.trace(exact))
    assert eig.trace() == pytest.approx(trace, rel=1e-12)  # the trace is kept exactly (float64 accounting)
    assert s.trace() == pytest.approx(trace, rel=1e-12)
    approx = eig.to_dense()
    diff = exact - approx
    d = eig.discarded
    assert d > 0.05 * trace  # a real truncation, so the bound is not vacuous
    nuclear = float(torch.linalg.svdvals(diff).sum())
    spectral = float(torch.linalg.svdvals(diff)[0])
    slack = 1e-9 if storage == "float64" else 1e-2  # documented: up to the rounding of the stored columns
    assert nuclear <= 2 * d * (1 + slack)  # ‖G − G̃‖_* ≤ 2 d
    assert spectral <= d * (1 + slack)  # ‖G − G̃‖₂ ≤ d
    assert nuclear > 0.5 * d  # and the error is of that order: the bound is not loose by orders of magnitude


def test_compression_is_lossless_within_budget_rank():
    _, g = _rows(80, seed=8, rank=4)
    s = LowRankSum(OUT, torch.float64, max_rank=6)
    for start in range(0, 80, 10):
        s.add(g[start : start + 10], 10)
    eig = s.eigen(dtype=torch.float64)
    assert eig.rank == 4 and eig.discarded == pytest.approx(0.0, abs=1e-12 * eig.trace())
    torch.testing.assert_close(eig.to_dense(), _dense_g(g, 80), rtol=0, atol=1e-12 * eig.trace())


def test_merge_and_state_roundtrip_keep_columns_counts_and_tail():
    _, g = _rows(60, seed=9)
    one = LowRankSum(OUT, torch.float64, max_rank=5)
    halves = [LowRankSum(OUT, torch.float64, max_rank=5) for _ in range(2)]
    for start in range(0, 60, 6):
        one.add(g[start : start + 6], 6)
        halves[start // 30].add(g[start : start + 6], 6)
    halves[0].merge(halves[1])
    # Different compression order, same trace (exact) and count; the spectra agree to within the bound.
    assert halves[0].count == one.count == 60
    assert halves[0].trace() == pytest.approx(float(torch.trace(_dense_g(g, 60))), rel=1e-12)
    clone = LowRankSum(OUT, torch.float64, max_rank=5)
    clone.load_state(halves[0].state())
    assert torch.equal(clone.raw_columns(torch.float64), halves[0].raw_columns(torch.float64))
    assert (clone.count, clone.tail_mass) == (halves[0].count, halves[0].tail_mass)
    assert clone.tail() == pytest.approx(halves[0].eigen(dtype=torch.float64).tail, rel=0)


def test_no_budget_lowrank_sum_is_exact_and_u_is_out_by_t():
    _, g = _rows(20, seed=10)
    s = LowRankSum(OUT, torch.float64)
    s.add(g[:7], 7)
    s.add(g[7:], 13)
    u = s.factor_U(torch.float64)
    assert u.shape == (OUT, 20)  # U = [ĝ_1 … ĝ_T] / √N is [out, T]
    torch.testing.assert_close(u @ u.t(), _dense_g(g, 20), rtol=1e-12, atol=0)
    assert s.tail() == 0.0 and s.eigen(dtype=torch.float64).discarded == 0.0


def test_blockwise_gram_and_products_match_dense_algebra():
    # m = 2500 > the 1024-row tiles (upper tiles mirrored) and out = 70000 > one block of rows; several chunks.
    from kronfisher.algebra.columns import ColumnStore

    gen = torch.Generator().manual_seed(11)
    chunks = [torch.randn(n, 70, generator=gen, dtype=torch.float64) for n in (1000, 1, 1499)]
    store = ColumnStore(chunks, 70)
    w = torch.cat(chunks).t()  # [out, m]
    torch.testing.assert_close(store.gram(), w.t() @ w, rtol=1e-12, atol=1e-12)  # float64, summation order only
    wide = ColumnStore([torch.randn(3, 70000, generator=gen, dtype=torch.float64)], 70000)
    x = torch.randn(5, 70000, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(wide.rows_matmul(x), x @ wide.chunks[0].t(), rtol=1e-12, atol=1e-12)
    assert wide.square_sum() == pytest.approx(float(wide.chunks[0].square().sum()), rel=1e-13)
