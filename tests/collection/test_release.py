"""Collection and correction free their sums as soon as the caller drops them (no reference cycles).

A grouped run drops each group's sums before its EK-FAC pass and its EK-FAC sums before the next group; a cycle
(the placement's fallback callback bound to its owner) kept them until Python's cycle collector happened to run,
gigabytes at 1.5B. Checked with the cycle collector disabled: the objects must die by reference counting alone.
"""

from __future__ import annotations

import gc
import weakref

import pytest

import kronfisher as kf
from conftest import make_model, random_ids
from kronfisher.collection import corrector as corrector_module
from kronfisher.drivers.ekfac import correct
from kronfisher.drivers.fit import collect


@pytest.fixture
def no_cycle_collector():
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_a_dropped_collector_frees_its_sums_without_the_cycle_collector(no_cycle_collector) -> None:
    model = make_model("qwen2")
    batches = [{"input_ids": random_ids(2, 12, seed=s)} for s in range(2)]
    _, collector, _ = collect(model, batches, kf.KFACConfig())
    sums = [weakref.ref(s.A.sum) for s in collector.sums.values() if s.A.kind == "dense"]
    owner = weakref.ref(collector)
    assert sums and all(r() is not None for r in sums)
    del collector
    assert owner() is None and all(r() is None for r in sums)


def test_the_ekfac_pass_frees_its_sums_when_it_returns(no_cycle_collector, monkeypatch) -> None:
    model = make_model("qwen2")
    batches = [{"input_ids": random_ids(2, 12, seed=s)} for s in range(2)]
    fisher = kf.fit(model, batches, kf.KFACConfig())
    made: list[weakref.ref] = []
    original = corrector_module.EigenCorrector.__init__

    def record(self, *args, **kwargs) -> None:
        original(self, *args, **kwargs)
        made.append(weakref.ref(self))

    monkeypatch.setattr(corrector_module.EigenCorrector, "__init__", record)
    correct(fisher, model, batches)
    assert len(made) == 1 and made[0]() is None and fisher.is_ekfac
