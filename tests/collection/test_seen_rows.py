"""EK-FAC on the collected rows: the pass takes the coordinates a rows-held factor already knows.

Reference: the same fit with ``seen.REUSE_ROWS = False``, where the EK-FAC pass projects every batch onto the
eigenbases (the route of every other layer). Float64, padded batches, token and sequence granularity, empirical
and MC Fisher (two draws): every layer's dense block equal to 1e-10 relative, and the shortcut must have been
taken for the thin ``A`` of ``down_proj`` and the exact low-rank ``G`` of ``gate_proj``/``up_proj``. When the
EK-FAC pass sees the batches in another order, the fingerprints differ, the shortcut turns itself off, and the
result is still the projected one.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import kronfisher as kf
from conftest import Flipping, make_model, random_ids, right_pad

corrector = importlib.import_module("kronfisher.collection.corrector")
seen = importlib.import_module("kronfisher.collection.seen")

DOWN, GATE, UP = "model.layers.{}.mlp.down_proj", "model.layers.{}.mlp.gate_proj", "model.layers.{}.mlp.up_proj"


def _batches() -> list[dict[str, torch.Tensor]]:
    # 4 + 2 + 3 = 9 attended tokens: down_proj's A (24) is held as rows and gets a thin basis (T ≤ d / 2)
    ids = random_ids(3, 4, seed=3)
    return [right_pad([ids[0], ids[1, :2]]), {"input_ids": ids[2:, :3]}]


def _fit(monkeypatch, batches, reuse: bool, **kw) -> tuple[kf.KFAC, list]:
    model = make_model("qwen2")
    cfg = kf.KFACConfig(
        accumulate_dtype="float64",
        lowrank_dtype="float64",
        lowrank_layers=(r"mlp\.(gate|up)_proj$",),
        lowrank_max_rank=None,
        ekfac=True,
        **kw,
    )
    cursors = []

    class Spy(seen.RowCursor):
        def __init__(self) -> None:
            super().__init__()
            cursors.append(self)

    with monkeypatch.context() as m:
        m.setattr(seen, "REUSE_ROWS", reuse)
        m.setattr(corrector, "RowCursor", Spy)
        return kf.fit(model, batches, cfg), cursors


def _same(got: kf.KFAC, ref: kf.KFAC) -> None:
    assert got.layer_names == ref.layer_names
    for name in ref.layer_names:
        a, b = got.to_dense(name), ref.to_dense(name)
        err = float((a - b).abs().max())
        assert err <= 1e-10 * float(b.abs().max()), f"{name}: {err:.3e}"


@pytest.mark.parametrize("granularity", ["token", "sequence"])
@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_collected_rows_give_the_projected_eigenvalues(monkeypatch, granularity, fisher):
    kw = {"ekfac_granularity": granularity, "fisher": fisher, "mc_samples": 2}
    got, cursors = _fit(monkeypatch, _batches(), True, **kw)
    ref, _ = _fit(monkeypatch, _batches(), False, **kw)
    _same(got, ref)
    (cursor,) = cursors
    assert not cursor.off
    for i in (0, 1):
        assert got.block(DOWN.format(i)).thin_side == "A" and got.block(DOWN.format(i)).A.seen is None  # dropped
        assert got.block(GATE.format(i)).G.kind == "lowrank"
        assert ("G", GATE.format(i)) in cursor.used and ("G", UP.format(i)) in cursor.used
    a_keys = {k for k in cursor.used if k[0] == "A"}
    assert len(a_keys) == 2  # the two down_proj inputs (every other A is square: more tokens than half its size)
    tokens = 9 * (2 if fisher == "mc" else 1)
    assert all(cursor.cursor[("G", GATE.format(i))] == tokens for i in (0, 1))  # every collected row taken once
    assert all(cursor.cursor[k] == 9 for k in a_keys)


def test_another_order_turns_the_shortcut_off(monkeypatch, caplog):
    kw = {"ekfac_granularity": "token"}
    with caplog.at_level("INFO", logger="kronfisher"):
        got, cursors = _fit(monkeypatch, Flipping(_batches()), True, **kw)
    ref, _ = _fit(monkeypatch, Flipping(_batches()), False, **kw)
    plain, _ = _fit(monkeypatch, _batches(), False, **kw)
    _same(got, ref)
    _same(got, plain)  # the eigenvalues are sums over samples: the order does not matter
    (cursor,) = cursors
    assert ("G", GATE.format(0)) in cursor.off and any(k[0] == "A" for k in cursor.off)
    assert "projects its rows again" in caplog.text and "differ from the collected ones" in caplog.text


def test_a_discarded_batch_takes_no_rows():
    rows = torch.randn(5, 7, dtype=torch.float64)
    probes = rows @ seen.probe_directions(7)
    cur = seen.RowCursor()
    first: dict = {}
    assert cur.take("k", "x", rows[:3], probes, first, 1.0) == 0
    second: dict = {}  # the batch was discarded (its cache dropped): the same rows again from the same offset
    assert cur.take("k", "x", rows[:3], probes, second, 1.0) == 0
    cur.committed()
    assert cur.take("k", "x", 2.0 * rows[3:], probes, {}, 0.5) == 3  # the gradient scale applies to the pass's rows
    cur.committed()
    assert cur.take("k", "x", rows[:1], probes, {}, 1.0) is None and "k" in cur.off  # past the collected rows
    assert cur.take("j", "x", rows[1:3], probes, {}, 1.0) is None and "j" in cur.off  # offset 0 holds rows 0, 1
