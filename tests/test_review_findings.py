"""Regression tests for three bugs a review found in the torchrun / resume / left-padding changes (each test failed
before the fix: non-finite batches are now recorded in the report when they are dropped, and ``position_ids`` go
only to a forward that names them or to a transformers model).

1. ``reduce_collection`` merges ``report.nonfinite_batches`` over ranks (``merge_report_lists``), but ``collect``
   only copies the capture's non-finite batches into the report *after* the reduction (``_finish_report``): under
   ``torchrun`` each rank reports its own dropped batches only, so rank 0's report (and factor file) misses the
   others' (SPEC §8: the report equals one process).
2. The same ordering loses, on ``--resume``, the non-finite batches dropped before the interruption: the
   checkpointed report never holds them (SPEC §9: a resumed run equals the uninterrupted one).
3. ``model_inputs`` adds ``position_ids`` for a left-padded batch to any forward with ``**kwargs``; a model whose
   ``**kwargs`` are not meant for ``position_ids`` (here: passed on to an inner call that does not take them) now
   fails with ``TypeError`` where it worked before.
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
    """SPEC §8: under torchrun every rank's report lists the batch rank 1 dropped, like one process does."""
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
        # Exact list equality: batch indices are global with a Shard. Fails: rank 0 reports [] (its own list only).
        assert res["dropped"] == [1], f"rank {rank} reports dropped batches {res['dropped']}"


def test_resume_keeps_nonfinite_batches_dropped_before_the_interruption(tmp_path: Any) -> None:
    """SPEC §9: a pass checkpointed after batch 2 and resumed reports the same dropped batches as one pass."""
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
    # The sums agree (float64, same batches in the same order: bit-identical), so only the report is wrong.
    for name, s in full_collector.sums.items():
        assert torch.equal(s.A.sum, collector.sums[name].A.sum), name
    assert resumed.batches == full.batches == 3
    # Fails: the resumed report says no batch was dropped.
    assert _dropped(resumed) == _dropped(full)


class _Inner(nn.Module):
    """A causal LM core whose forward takes ids and mask only."""

    def __init__(self) -> None:
        super().__init__()
        self.lm = make_model("gpt2")

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, *, use_cache: bool = False) -> Any:
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)


class _Wrapper(nn.Module):
    """A wrapper that forwards its extra keyword options (``use_cache`` ...) to the core, a common pattern."""

    def __init__(self) -> None:
        super().__init__()
        self.core = _Inner()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Any:
        return self.core(input_ids, attention_mask, **kwargs)


def test_model_with_kwargs_but_no_position_ids_still_fits_left_padded_batches() -> None:
    """Before 176e257 this fit ran; ``model_inputs`` now passes ``position_ids`` into ``**kwargs`` (TypeError).

    The check is the count of attended positions (exact integer), reached only if the forward does not raise.
    """
    torch.manual_seed(0)
    model = _Wrapper().to(torch.float64)
    ids = random_ids(2, 6, seed=3)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    batch = {"input_ids": ids, "attention_mask": mask}
    fisher = kf.fit(model, [batch], kf.KFACConfig(accumulate_dtype="float64"))  # TypeError on the reviewed code
    assert fisher.report.tokens == int(mask.sum())  # T counts attended positions only (SPEC §3.1)
