"""``kf.collect`` / ``kf.fit``: one forward per batch, and the report of dropped batches over ranks and resumes.

A batch dropped as non-finite (``on_nonfinite="skip"``) must be in the report that the pass returns, whatever the
shape of the run: under ``torchrun`` every rank reports what one process reports, and a resumed pass reports what
the uninterrupted one does. Both once failed because the dropped batches were copied into the report only after
the reduction over ranks and never into the checkpointed report.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

import kronfisher as kf
from conftest import make_model, random_ids, right_pad
from distributed_helper import distributed_test
from kronfisher.comm import Shard
from kronfisher.drivers.fit import CollectState

CFG = kf.KFACConfig(accumulate_dtype="float64", on_nonfinite="skip")
POISONED = "model.layers.1.mlp.down_proj"


def _batches() -> list[dict[str, Tensor]]:
    """Four batches; only batch 1 has 3 sequences (the poison hook recognises it by that)."""
    ids = random_ids(3, 7, seed=21)
    return [
        {"input_ids": random_ids(2, 6, seed=20)},
        right_pad([ids[0], ids[1, :4], ids[2, :5]]),
        {"input_ids": random_ids(2, 5, seed=22)},
        {"input_ids": random_ids(2, 4, seed=23)},
    ]


def _poison(model: nn.Module) -> Any:
    """A NaN in the output of ``POISONED`` for every batch of 3 sequences (batch 1 only)."""

    def hook(module: nn.Module, inputs: Any, output: Tensor) -> Tensor | None:
        if output.shape[0] != 3:
            return None
        out = output.clone()
        out[0, 1, 3] = float("nan")
        return out

    return model.get_submodule(POISONED).register_forward_hook(hook)


def _dropped(report: kf.CollectionReport) -> list[int]:
    return [b for b, _ in report.nonfinite_batches]


def nonfinite_worker(rank: int, world_size: int) -> dict[str, Any]:
    """Each rank collects its round-robin shard (rank 0: batches 0, 2; rank 1: batches 1, 3)."""
    model = make_model("qwen2")
    handle = _poison(model)
    try:
        _, _, report = kf.collect(model, Shard(_batches()), CFG)
    finally:
        handle.remove()
    return {"dropped": _dropped(report), "batches": report.batches}


def test_nonfinite_batches_of_other_ranks_reach_the_report(tmp_path: Any) -> None:
    """Under torchrun every rank's report lists the batch rank 1 dropped, like one process (docs/distributed.md)."""
    model = make_model("qwen2")
    handle = _poison(model)
    try:
        _, _, one = kf.collect(model, _batches(), CFG)
    finally:
        handle.remove()
    assert _dropped(one) == [1]  # the one-process oracle: batch 1 dropped, 3 committed
    results = distributed_test(2, nonfinite_worker, tmp_path, timeout=120)
    for rank, res in enumerate(results):
        assert res["batches"] == one.batches == 3, rank  # the reduced count: sums and counts do merge
        # Exact list equality: batch indices are global with a Shard. The bug: rank 0 reported [] (its own list).
        assert res["dropped"] == [1], f"rank {rank} reports dropped batches {res['dropped']}"


def test_resume_keeps_nonfinite_batches_dropped_before_the_interruption(tmp_path: Any) -> None:
    """A pass checkpointed after batch 2 and resumed reports the same dropped batches as one pass."""
    model = make_model("qwen2")
    handle = _poison(model)
    path = tmp_path / "ckpt.sums.safetensors"

    def checkpoint(done: int, index: int, collector: Any, report: kf.CollectionReport) -> None:
        if done == 3:  # batches 0, 1 (dropped), 2 are in the sums
            kf.save_sums(path, collector.infos, collector.sums, CFG, report=report, extra_meta={"done": done})

    try:
        _, full_collector, full = kf.collect(model, _batches(), CFG, on_batch_end=checkpoint)
        saved = kf.load_sums(path)
        state = CollectState(saved.sums, saved.report, int(saved.meta["extra"]["done"]))
        _, collector, resumed = kf.collect(model, _batches(), CFG, resume=state)
    finally:
        handle.remove()
    assert _dropped(full) == [1]
    # The sums agree (float64, same batches in the same order: bit-identical), so only the report could be wrong.
    for name, s in full_collector.sums.items():
        assert torch.equal(s.A.sum, collector.sums[name].A.sum), name
    assert resumed.batches == full.batches == 3
    # The bug: the resumed report said no batch was dropped.
    assert _dropped(resumed) == _dropped(full)


def test_no_double_forward_pass() -> None:
    """``kf.fit`` runs exactly one forward per batch and pass (K-FAC; plus one per batch for EK-FAC, also with
    several MC samples); ``kf.capture`` runs none of its own."""
    model = make_model("qwen2")
    cfg = kf.KFACConfig(accumulate_dtype="float64", damping=1e-2)
    calls: list[int] = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        data = [{"input_ids": random_ids(2, 7, seed=70 + i)} for i in range(3)]
        kf.fit(model, data, cfg)
        assert len(calls) == 3
        calls.clear()
        kf.fit(model, data, cfg.replace(fisher="mc", mc_samples=3))
        assert len(calls) == 3
        calls.clear()
        kf.fit(model, data, cfg.replace(ekfac=True))
        assert len(calls) == 6  # two passes (collection, then the EK-FAC correction), one forward each
        calls.clear()
        with kf.capture(model, cfg) as cap:
            for b in data:
                loss = model(**b, labels=b["input_ids"]).loss
                cap.backward(loss, num_terms=12, reduction="mean")
            cap.finalize()
        assert len(calls) == 3
    finally:
        handle.remove()


def test_resume_keeps_an_exact_lowrank_G_exact(tmp_path: Any) -> None:
    """A low-rank ``G`` the plan keeps exact (no token budget) stays exact through a checkpoint and resume.

    gate/up (out 24 > lowrank_threshold 20) on 12 tokens: exact low-rank. The bug: the resumed sums were rebuilt
    with ``cfg.lowrank_max_rank`` (here 2), so the batches after the resume were compressed to that budget.
    Reference: the uninterrupted pass (float64, same batches; the factors agree to 1e-12).
    """
    model = make_model("qwen2")
    cfg = kf.KFACConfig(
        accumulate_dtype="float64", lowrank_threshold=20, lowrank_dtype="float64", lowrank_max_rank=2, max_memory="1GiB"
    )
    batches = [{"input_ids": random_ids(1, 4, seed=s)} for s in (1, 2, 3)]
    path = tmp_path / "ckpt.sums.safetensors"

    def checkpoint(done: int, index: int, collector: Any, report: kf.CollectionReport) -> None:
        if done == 1:
            kf.save_sums(path, collector.infos, collector.sums, cfg, report=report, extra_meta={"done": done})

    _, full, report = kf.collect(model, batches, cfg, on_batch_end=checkpoint)
    gate = "model.layers.0.mlp.gate_proj"
    assert report.plan is not None and report.plan["layers"][gate]["max_rank"] is None  # exact by the plan
    saved = kf.load_sums(path)
    assert saved.sums[gate].G.max_rank is None  # a merge of such files stays exact too
    _, resumed, _ = kf.collect(model, batches, cfg, resume=CollectState(saved.sums, saved.report, 1))
    for name, s in full.sums.items():
        if s.G.kind == "lowrank":
            mine = resumed.sums[name].G
            assert mine.tail_mass == 0.0, name
            want, got = s.G.eigen(dtype=torch.float64).to_dense(), mine.eigen(dtype=torch.float64).to_dense()
            torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
