"""The report's analysis after the fit goes layer by layer (issue 11): same numbers as the all-at-once computation,
one natural gradient alive at a time, each gradient freed once measured, no parameter copies for one model.

References: the whole-model ``KFAC.natural_gradient`` (all layers in one call) with ``layer_metrics`` on its
result, as the report computed it before; the float64 sums of a gradient in one piece for the row-blocked ones.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

import pytest
import torch

import kronfisher as kf
import kronfisher.analysis.metrics as metrics
import kronfisher.analysis.run as analysis_run
from conftest import make_model, random_ids
from kronfisher.analysis import layer_metrics, mean_gradient
from kronfisher.analysis.run import AnalyzeOptions, analyze, measure_layers
from kronfisher.layers import combine
from test_cli_helpers import TEXT_A, build_model, save_model


@pytest.fixture(scope="module")
def fitted() -> tuple[kf.KFAC, Any]:
    """Tiny Qwen2 (q/k/v biases, tied lm_head low-rank with a tail) in float64, fitted, and its mean gradient."""
    model = make_model("qwen2", tie=True)
    batches = [{"input_ids": random_ids(2, 9, seed=1 + i)} for i in range(3)]
    cfg = kf.KFACConfig(accumulate_dtype="float64", lowrank_layers=("lm_head",), lowrank_max_rank=6, damping=0.05)
    return kf.fit(model, batches, cfg), mean_gradient(model, batches, cfg)


def test_layer_by_layer_metrics_equal_the_all_at_once_ones(fitted: tuple[kf.KFAC, Any]) -> None:
    """Every number of every row is exactly (==) what the whole-model natural gradient gives, in float64."""
    fisher, grad = fitted
    ng = fisher.natural_gradient(grad.params)  # all layers in one call
    expected = {}
    for name in fisher.layer_names:
        info = fisher.infos[name]
        nat = combine(info, ng[info.weight_name], ng.get(info.bias_name) if info.bias_name else None)
        expected[name] = layer_metrics(fisher, name, grad=grad.combined[name], natgrad=nat)
    grads = dict(grad.combined)
    rows, spectra = measure_layers(fisher, grads)
    assert grads == {}  # consumed
    assert rows == expected
    assert set(spectra) == set(fisher.layer_names)
    assert any(r["bias"] for r in rows.values()) and rows["lm_head"]["representation"] == "lowrank"


def test_gradient_sums_of_a_large_layer_in_row_blocks(fitted: tuple[kf.KFAC, Any], monkeypatch) -> None:
    """Norms and cosine summed over blocks of 8 elements' rows equal the one-piece float64 sums to 1e-13."""
    fisher, grad = fitted
    nat = {n: metrics.layer_natural_gradient(fisher, n, grad.combined[n]) for n in fisher.layer_names}
    whole = {n: layer_metrics(fisher, n, grad=grad.combined[n], natgrad=nat[n]) for n in fisher.layer_names}
    monkeypatch.setattr(metrics, "_ROWS_ELEMENTS", 8)  # every layer (a_dim ≥ 16) one row per block
    for n in fisher.layer_names:
        row = layer_metrics(fisher, n, grad=grad.combined[n], natgrad=nat[n])
        for key in ("grad_norm", "natgrad_norm", "cosine_grad_natgrad"):
            assert row[key] == pytest.approx(whole[n][key], rel=1e-13), (n, key)
        no_nat = layer_metrics(fisher, n, grad=grad.combined[n])
        assert no_nat["grad_norm"] == pytest.approx(whole[n]["grad_norm"], rel=1e-13)
        assert "natgrad_norm" not in no_nat


def _run(tmp_path: Path, monkeypatch, models: int) -> dict[str, Any]:
    """``analyze`` of a tiny saved Qwen2 (tied lm_head) ``models`` times, recording what the analysis holds."""
    folder = save_model(build_model("qwen2", seed=0, tie=True), tmp_path / "qwen")
    (tmp_path / "a.txt").write_text(TEXT_A, encoding="utf-8")
    seen: dict[str, Any] = {"layers": [], "alive": [], "params": 0}
    nat_refs: list[weakref.ref] = []
    grad_refs: list[weakref.ref] = []
    real_nat, real_params = analysis_run.layer_natural_gradient, analysis_run.layer_params

    def counted_nat(fisher: kf.KFAC, name: str, g: torch.Tensor) -> torch.Tensor:
        # before this layer's natural gradient: earlier layers' natural gradients and gradients still alive
        seen["alive"].append((sum(r() is not None for r in nat_refs), sum(r() is not None for r in grad_refs)))
        seen["layers"].append(name)
        out = real_nat(fisher, name, g)
        nat_refs.append(weakref.ref(out))
        grad_refs.append(weakref.ref(g))
        return out

    def counted_params(*a: Any) -> dict[str, torch.Tensor]:
        seen["params"] += 1
        return real_params(*a)

    monkeypatch.setattr(analysis_run, "layer_natural_gradient", counted_nat)
    monkeypatch.setattr(analysis_run, "layer_params", counted_params)
    opts = AnalyzeOptions(
        models=[str(folder)] * models,
        data=[str(tmp_path / "a.txt")],
        output_dir=tmp_path / "out",
        cfg=kf.KFACConfig(accumulate_dtype="float64"),
        max_tokens=120,
        seq_len=16,
        batch_size=3,
        dtype="float64",
        plots=False,
        save_factors=False,
        quiet=True,
    )
    seen["report"] = analyze(opts)
    return seen


def test_natural_gradients_are_computed_and_freed_one_layer_at_a_time(tmp_path: Path, monkeypatch) -> None:
    """``analyze``: one natural gradient per tracked layer, none of an earlier layer alive when the next is
    computed, each layer's gradient freed once measured; one model copies no parameters."""
    seen = _run(tmp_path, monkeypatch, models=1)
    layers = list(seen["report"]["models"][0]["layers"])
    assert seen["layers"] == layers and len(layers) == 15  # 2 × 7 + the lm_head
    assert seen["alive"] == [(0, 0)] * len(layers)
    assert seen["params"] == 0


def test_two_models_copy_the_parameters_they_compare(tmp_path: Path, monkeypatch) -> None:
    """Two models: each copies its ``[W | b]`` for the comparison, whose numbers are those of identical models."""
    seen = _run(tmp_path, monkeypatch, models=2)
    assert seen["params"] == 2
    comp = seen["report"]["comparisons"][0]
    assert len(comp["layers"]) == 15 and comp["total_quadratic_form"] == 0.0
    assert seen["alive"] == [(0, 0)] * 30
