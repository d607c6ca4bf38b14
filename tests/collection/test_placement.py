"""Huge-layer ``U`` on the accelerator or streamed through it, and the host fallbacks (docs/gpu.md).

The machine has no accelerator: it is simulated, as in ``test_lowrank_model.py``, by declaring every device an
accelerator, so the placement logic runs on CPU tensors. A streamed ``U`` still goes through the real copy helpers
(host staging buffer, landing buffer, cast), whose bytes :data:`kronfisher.transfer.STATS` counts; the blocks are
made smaller than ``out`` so that every product runs over several of them. References are the plain CPU fits,
float64, to 1e-10.
"""

from __future__ import annotations

import pytest
import torch

import kronfisher as kf
import kronfisher.algebra.columns as columns
import kronfisher.collection.placement as placement
import kronfisher.collection.seen as seen
from conftest import make_model, random_ids
from kronfisher.algebra.columns import ColumnStore, Residence
from kronfisher.algebra.kron import thin_kron_apply
from kronfisher.algebra.lowrank import eigen_from_columns
from kronfisher.collection.sums import LowRankSum
from kronfisher.errors import PlacementWarning
from kronfisher.transfer import STATS
from placement_faults import oom_once, oom_once_after

BATCHES = [{"input_ids": random_ids(2, 6, seed=s)} for s in range(2)]
F64 = {"accumulate_dtype": "float64", "lowrank_dtype": "float64", "damping": 0.05}
CFG = kf.KFACConfig(**F64, lowrank_layers=("lm_head",), ekfac=True)
TOL = 1e-10


def _simulate(monkeypatch: pytest.MonkeyPatch, block_rows: int = 7) -> None:
    """An accelerator on CPU, and blocks of ``block_rows`` rows of ``out`` (out = 40 in the tiny models)."""
    monkeypatch.setattr(placement, "is_accelerator", lambda device: True)
    monkeypatch.setattr(columns, "MIN_BLOCK_ROWS", block_rows)
    monkeypatch.setattr(columns, "BLOCK_BYTES", 1)


def _close(got: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(got, ref, rtol=TOL, atol=TOL * float(ref.abs().max()))


def _same_fit(got: kf.KFAC, ref: kf.KFAC) -> None:
    for name in ref.layer_names:
        _close(got.to_dense(name), ref.to_dense(name))
    g = torch.Generator().manual_seed(3)
    model = make_model("qwen2")
    probe = {n: torch.randn(p.shape, generator=g, dtype=torch.float64) for n, p in model.named_parameters()}
    nat_got, nat_ref = got.natural_gradient(probe), ref.natural_gradient(probe)
    for k in nat_ref:
        _close(nat_got[k], nat_ref[k])


def test_streamed_store_with_blocks_smaller_than_out_equals_one_local_block(monkeypatch):
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(5, 40, generator=g, dtype=torch.float64), torch.randn(9, 40, generator=g).double()]
    local = ColumnStore(chunks, 40)  # default blocks: one block of all 40 rows
    ref_gram, x = local.gram(), torch.randn(3, 40, generator=g, dtype=torch.float64)
    ref_rows, ref_sq = local.rows_matmul(x), local.square_sum()
    ref_eig = eigen_from_columns(local, 7.0, dtype=torch.float64)
    _simulate(monkeypatch)
    streamed = ColumnStore(chunks, 40, Residence(torch.device("cpu"), streamed=True))
    assert [b for b in streamed.ranges(1, torch.float64)][:2] == [(0, 7), (7, 14)]
    STATS.reset()
    _close(streamed.gram(), ref_gram)
    assert STATS.snapshot()["h2d_bytes"] == 14 * 40 * 8  # every column crossed once, in 6 blocks
    _close(streamed.rows_matmul(x), ref_rows)
    assert abs(streamed.square_sum() - ref_sq) <= TOL * ref_sq
    eig = eigen_from_columns(streamed, 7.0, dtype=torch.float64)
    _close(eig.values, ref_eig.values)
    v = torch.randn(40, 6, generator=g, dtype=torch.float64)
    q = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))[0]
    a = kf.algebra.eigen.Eigen(q, torch.rand(6, generator=g, dtype=torch.float64) + 0.5)
    span = torch.rand(eig.rank, 6, generator=g, dtype=torch.float64)
    tail = torch.rand(6, generator=g, dtype=torch.float64)
    _close(thin_kron_apply(v, eig, a, span, tail), thin_kron_apply(v, ref_eig, a, span, tail))


@pytest.mark.parametrize("reuse", [True, False], ids=["rows-reused", "projected"])
@pytest.mark.parametrize("where", ["device", "streamed"])
def test_fit_with_U_on_the_device_or_streamed_equals_the_cpu_fit(monkeypatch, where, reuse):
    model = make_model("qwen2")
    ref = kf.fit(model, BATCHES, CFG)
    _simulate(monkeypatch)
    monkeypatch.setattr(seen, "REUSE_ROWS", reuse)
    if where == "streamed":  # the memory plan keeps U on the host
        monkeypatch.setattr(placement, "columns_on_device", lambda info, device, host_columns: False)
    STATS.reset()
    got = kf.fit(model, BATCHES, CFG)
    moved = STATS.snapshot()
    _same_fit(got, ref)
    store = got.sums["lm_head"].G.columns()
    assert store.streamed == (where == "streamed")
    if where == "device":
        assert moved == {"h2d_bytes": 0, "d2h_bytes": 0, "copies": 0}  # nothing crosses the bus
    else:  # the K-FAC pass's output-gradient rows come down once (12 tokens per batch, out = 40, float64) ...
        assert moved["d2h_bytes"] == 24 * 40 * 8
        if reuse:  # ... U's blocks go up once, for the Gram: the EK-FAC pass takes the collected rows' coordinates
            assert moved["h2d_bytes"] == 24 * 40 * 8
        else:  # ... and again for each EK-FAC batch's projection
            assert moved["h2d_bytes"] >= 2 * 24 * 40 * 8


def test_device_U_out_of_memory_moves_it_to_host_memory_streamed(monkeypatch):
    model = make_model("qwen2")
    ref = kf.fit(model, BATCHES, CFG)
    _simulate(monkeypatch)
    real, calls = LowRankSum.add, []

    def add(self, rows, count):
        calls.append(1)
        if len(calls) == 2:  # the second batch's append does not fit on the device
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (injected)")
        return real(self, rows, count)

    monkeypatch.setattr(LowRankSum, "add", add)
    with pytest.warns(PlacementWarning, match=r"U of layer 'lm_head' \(in=16, out=40\).*streamed"):
        got = kf.fit(model, BATCHES, CFG)
    assert got.sums["lm_head"].G.columns().streamed
    assert sum("Out of memory" in w for w in got.report.warnings) == 1
    _same_fit(got, ref)


def test_ekfac_sums_and_staging_out_of_memory_fall_back_to_the_host(monkeypatch):
    model = make_model("qwen2")
    ref = kf.fit(model, BATCHES, CFG)
    _simulate(monkeypatch)
    allocated = oom_once(monkeypatch, "allocate", "model.layers.0.mlp.up_proj", "EK-FAC")
    staged = oom_once(monkeypatch, "run", "lm_head", "EK-FAC")
    with pytest.warns(PlacementWarning) as caught:
        got = kf.fit(model, BATCHES, CFG)
    text = " ".join(str(w.message) for w in caught)
    assert "factor EK-FAC of layer 'model.layers.0.mlp.up_proj'" in text and "factor EK-FAC of layer 'lm_head'" in text
    assert allocated[:2] == staged[:2] == [True, False]  # the device attempt failed, the host one ran
    _same_fit(got, ref)


def test_operator_product_out_of_memory_is_computed_on_the_host(monkeypatch):
    model = make_model("qwen2")
    ref = kf.fit(model, BATCHES, CFG)
    _simulate(monkeypatch)
    got = kf.fit(model, BATCHES, CFG)
    calls = oom_once_after(monkeypatch, "the product of layer")
    with pytest.warns(PlacementWarning, match=r"the product of layer"):
        _same_fit(got, ref)
    assert calls[:2] == [True, False]  # the device product failed, the host one ran


def test_lowrank_eigenform_out_of_memory_is_computed_on_the_host(monkeypatch):
    model = make_model("qwen2")
    ref = kf.fit(model, BATCHES, CFG)
    _simulate(monkeypatch)
    oom_once_after(monkeypatch, "low-rank eigenform of G of layer 'lm_head'")
    with pytest.warns(PlacementWarning, match=r"low-rank eigenform of G of layer 'lm_head' \(24 columns of out=40\)"):
        got = kf.fit(model, BATCHES, CFG)
    assert got.block("lm_head").G.columns.residence == Residence(torch.device("cpu"))
    _same_fit(got, ref)


def test_resumed_sums_keep_the_placement_of_U(monkeypatch, tmp_path):
    from kronfisher.collection.collector import FactorCollector
    from kronfisher.drivers.fit import CollectState

    _simulate(monkeypatch)
    monkeypatch.setattr(placement, "columns_on_device", lambda info, device, host_columns: False)
    model = make_model("qwen2")
    disc, col, rep = kf.collect(model, BATCHES[:1], CFG)
    assert col.sums["lm_head"].G.columns().streamed
    kf.save_sums(tmp_path / "s.safetensors", disc.infos, col.sums, CFG, report=rep)
    loaded = kf.load_sums(tmp_path / "s.safetensors").sums
    assert not loaded["lm_head"].G.columns().streamed  # a file knows nothing of devices
    fresh = FactorCollector(disc.infos, CFG)
    CollectState(loaded, rep, 1).install(fresh)
    assert fresh.sums["lm_head"].G.columns().streamed
    assert torch.equal(
        fresh.sums["lm_head"].G.raw_columns(torch.float64), col.sums["lm_head"].G.raw_columns(torch.float64)
    )


def test_a_loaded_lowrank_U_streams_through_the_device(monkeypatch, tmp_path):
    model = make_model("qwen2")
    ref = kf.fit(model, BATCHES, CFG)
    ref.save(tmp_path / "f.safetensors", model)
    _simulate(monkeypatch)
    got = kf.load(tmp_path / "f.safetensors", model=model)
    assert got.block("lm_head").G.columns.streamed
    STATS.reset()
    _same_fit(got, ref)
    assert STATS.snapshot()["h2d_bytes"] > 0  # the natural gradient's products streamed U
