"""The memory plan: representation by token count, groups within the budget, the budget error, the accounting."""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
from typing import Any

import pytest
import torch

import kronfisher as kf
from conftest import make_model, random_ids
from kronfisher.budget import activation_bytes
from kronfisher.cli import main
from kronfisher.drivers.groups import run_groups
from kronfisher.drivers.planning import count_tokens, model_bytes, plan_run, tracked_layers
from kronfisher.errors import ConfigError, MemoryBudgetError
from kronfisher.footprint import group_peak
from kronfisher.layers import LayerInfo, discover_layers
from kronfisher.plan import plan_memory
from test_cli_helpers import TEXT_A, build_model, load_saved, reference_batches, save_model

corrector = importlib.import_module("kronfisher.collection.corrector")

GIB = 2**30


def _info(name: str, a: int, out: int, bias: bool = False) -> LayerInfo:
    return LayerInfo(name, "linear", a, out, bias, f"{name}.weight", f"{name}.bias" if bias else None)


def _block(i: int, hidden: int = 64, inter: int = 256) -> dict[str, LayerInfo]:
    p = f"model.layers.{i}"
    layers = [
        _info(f"{p}.self_attn.q_proj", hidden, hidden, True),
        _info(f"{p}.self_attn.k_proj", hidden, hidden // 4, True),
        _info(f"{p}.self_attn.v_proj", hidden, hidden // 4, True),
        _info(f"{p}.self_attn.o_proj", hidden, hidden),
        _info(f"{p}.mlp.gate_proj", hidden, inter),
        _info(f"{p}.mlp.up_proj", hidden, inter),
        _info(f"{p}.mlp.down_proj", inter, hidden),
    ]
    return {i.name: i for i in layers}


def test_representation_by_token_count() -> None:
    """out > lowrank_threshold: exact low-rank while T is below ~0.9 out, dense beyond or with T unknown."""
    infos = {"mlp": _info("mlp", 64, 1000)}
    cfg = kf.KFACConfig(lowrank_threshold=512, ekfac=True, max_memory="4GiB")
    chosen = {t: plan_memory(infos, cfg, tokens=t).layers["mlp"] for t in (100, 500, 5000)}
    assert [chosen[t].representation for t in (100, 500, 5000)] == ["lowrank", "lowrank", "dense"]
    assert chosen[100].max_rank is None and chosen[100].columns == 100  # exact: every token, never a budget
    assert plan_memory(infos, cfg).layers["mlp"].representation == "dense"  # T unknown: dense G fits
    switch = next(
        t for t in range(100, 2000, 10) if plan_memory(infos, cfg, tokens=t).layers["mlp"].representation == "dense"
    )
    assert 0.8 * 1000 <= switch <= 1000, switch  # the crossover the docstring states
    small = plan_memory({"o": _info("o", 64, 500)}, cfg, tokens=10).layers["o"]
    assert small.representation == "dense"  # out <= lowrank_threshold
    forced = kf.KFACConfig(lowrank_layers=("o",), lowrank_max_rank=8, max_memory="4GiB")
    named = plan_memory({"o": _info("o", 64, 500)}, forced, tokens=10_000).layers["o"]
    assert (named.representation, named.max_rank) == ("lowrank", 8)


def test_token_budget_only_when_dense_G_cannot_be_held() -> None:
    """A 151,936-row lm_head cannot hold a dense G in 20 GiB: low-rank with the token budget, at any T."""
    infos = {"lm_head": _info("lm_head", 1536, 151_936)}
    cfg = kf.KFACConfig(lowrank_max_rank=512, max_memory="20GiB")
    for t in (1024, 100_000, None):
        lp = plan_memory(infos, cfg, tokens=t, batch_tokens=1024).layers["lm_head"]
        assert (lp.representation, lp.max_rank) == ("lowrank", 512), t
        assert lp.columns <= 2 * 512 + 1024  # O(out · k) whatever T is
        assert "dense G needs" in lp.reason


def test_groups_fit_budget_and_keep_shared_inputs_together() -> None:
    infos: dict[str, LayerInfo] = {}
    for i in range(6):
        infos.update(_block(i))
    cfg = kf.KFACConfig(ekfac=True, accumulate_dtype="float64")
    whole = plan_memory(infos, cfg, tokens=512, budgets={"cpu": 64 * GIB}, workers=2)
    assert len(whole.groups) == 1 and whole.passes == 2
    kept, peak = whole.result["cpu"], whole.peaks[0]["cpu"]  # groups keep their factors: the working set shrinks
    budget = kept + (peak - kept) // 2
    plan = plan_memory(infos, cfg, tokens=512, budgets={"cpu": budget}, workers=2)
    assert len(plan.groups) >= 2 and plan.passes == 2 * len(plan.groups)
    assert [n for g in plan.groups for n in g] == list(infos)  # every layer once, in model order
    assert all(peak["cpu"] <= budget for peak in plan.peaks)
    where = {n: k for k, g in enumerate(plan.groups) for n in g}
    for i in range(6):
        p = f"model.layers.{i}"
        assert where[f"{p}.self_attn.q_proj"] == where[f"{p}.self_attn.k_proj"] == where[f"{p}.self_attn.v_proj"]
        assert where[f"{p}.mlp.gate_proj"] == where[f"{p}.mlp.up_proj"]
    assert plan.layers[f"{p}.self_attn.q_proj"].unit == plan.layers[f"{p}.self_attn.k_proj"].unit
    assert plan.result == whole.result  # the same factors at the end, however grouped
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["groups"] == plan.groups and data["passes"] == plan.passes
    text = plan.format()
    assert f"group {len(plan.groups)}/{len(plan.groups)}" in text and "passes over the data" in text


def test_budget_too_small_names_layer_and_bytes() -> None:
    infos = {"big": _info("big", 300, 200), "small": _info("small", 8, 8)}
    cfg = kf.KFACConfig()
    alone = plan_memory({"big": infos["big"]}, cfg, tokens=64, budgets={"cpu": GIB}, workers=1)
    need = group_peak([alone.layers["big"]], 1, cfg.ekfac)["cpu"]  # in a group: its sums freed as decomposed
    assert need < alone.peaks[0]["cpu"]  # alone in one group, the run keeps its sums
    with pytest.raises(MemoryBudgetError, match=rf"Layer 'big' \(in 300, out 200, G dense\) needs {need:,} bytes"):
        plan_memory(infos, cfg, tokens=64, budgets={"cpu": need - 1}, workers=1)
    assert plan_memory(infos, cfg, tokens=64, budgets={"cpu": need}, workers=1).groups == [["big"], ["small"]]


def test_max_memory_config_and_budgets() -> None:
    assert kf.KFACConfig(max_memory="20GiB").max_memory == 20 * GIB
    assert kf.KFACConfig(max_memory="500MB").max_memory == 500_000_000
    assert kf.KFACConfig(max_memory={"cuda:0": "80GB", "cpu": 10**9}).max_memory == {"cuda:0": 80 * 10**9, "cpu": 10**9}
    cfg = kf.KFACConfig(max_memory="1.5 GiB")
    assert kf.KFACConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for bad in ("20 parsecs", "-1GB", 0):
        with pytest.raises(ConfigError, match="Invalid max_memory"):
            kf.KFACConfig(max_memory=bad)
    infos = _block(0)
    default = plan_memory(infos, kf.KFACConfig(), tokens=64)  # what the host has free, less activations
    assert 0 < default.budgets["cpu"] < 2**50
    with pytest.raises(ConfigError, match=r"devices \['cuda:0'\] are not used by this run"):
        plan_memory(infos, kf.KFACConfig(max_memory={"cuda:0": "1GB"}), tokens=64)
    given = plan_memory(infos, kf.KFACConfig(max_memory={"cpu": "1GB"}), tokens=64, resident={"cpu": 10**6})
    acts = activation_bytes(infos, 64)
    assert given.reserved == {"cpu": acts + 10**6}  # max_memory bounds the run: weights and activations come first
    assert given.budgets == {"cpu": 10**9 - acts - 10**6}
    assert "set aside for weights and activations" in given.format()


def test_max_memory_counts_the_model_weights(tmp_path) -> None:
    """The factors get max_memory less the model's weights (a tied weight once) and one batch's activations."""
    model = make_model("qwen2")
    batches = [{"input_ids": random_ids(2, 12)}]
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])  # ties once
    assert model_bytes(model) == {"cpu": weights}
    cfg = kf.KFACConfig(max_memory=10**8)
    plan = plan_run(model, tracked_layers(model, cfg), batches, cfg)
    acts = activation_bytes(tracked_layers(model, cfg).infos, 24)
    assert plan.reserved == {"cpu": weights + acts} and plan.budgets == {"cpu": 10**8 - weights - acts}
    tight = kf.KFACConfig(max_memory=weights + acts + 1000)  # room for the model, not for a layer's factors
    with pytest.raises(MemoryBudgetError, match=r"max_memory less .* of model weights and activations"):
        plan_run(model, tracked_layers(model, tight), batches, tight)


def _allocated(fisher: kf.KFAC, passed: dict[str, Any] | None = None) -> dict[str, int]:
    """Bytes of the sums and of the eigenbases the run actually holds (shared A eigenbases once).

    ``passed``: the blocks the EK-FAC pass ran with, whose ``A`` held the coordinates of its rows until then.
    """
    sums = 0
    rows_seen: set[int] = set()
    for s in fisher.sums.values():
        for part in (s.A, s.G):
            if part.kind == "lowrank":
                sums += sum(c.nbytes for c in part.columns().chunks)
            elif part.holds_rows:  # the rows themselves (reading .sum would fold them), shared inputs once
                sums += sum(r.nbytes for r, _, _ in part.rows if id(r) not in rows_seen)
                rows_seen.update(id(r) for r, _, _ in part.rows)
            else:
                sums += part.sum.nbytes
    seen: set[int] = set()
    eigen_a = eigen_g = ekfac = 0
    for name in fisher.layer_names:
        b = fisher.block(name)
        if id(b.A.vectors) not in seen:  # q/k/v and gate/up share one A eigenbasis
            seen.add(id(b.A.vectors))
            eigen_a += b.A.vectors.nbytes + b.A.values.nbytes
            rows = (passed or {}).get(name)
            if rows is not None and rows.A.seen is not None:
                eigen_a += rows.A.seen.coords.nbytes + rows.A.seen.probes.nbytes
        g = b.G
        eigen_g += (g.coeffs.nbytes if hasattr(g, "coeffs") else g.vectors.nbytes) + g.values.nbytes
        ekfac += b.corrected.nbytes + (0 if b.corrected_tail is None else b.corrected_tail.nbytes)
    return {"sums": sums, "eigen_A": eigen_a, "eigen_G": eigen_g, "ekfac": ekfac}


@pytest.mark.parametrize("seq", [24, 2], ids=["dense-A", "thin-A"])
def test_plan_accounting_matches_allocations(seq: int, monkeypatch) -> None:
    """The plan's sums, eigenbases and EK-FAC sums are within 10 % of what a run allocates (tiny Qwen2).

    With 3 × 2 × 2 = 12 tokens (a float32 model: rows are held in the activations' dtype), down_proj's ``A`` (24,
    ``T ≤ d / 2``) and gate/up's ``G`` are held as rows; down_proj's ``A`` is decomposed into a thin basis.
    """
    model = make_model("qwen2", vocab=300, dtype=torch.float64 if seq > 2 else torch.float32)
    batches = [{"input_ids": random_ids(2, seq, seed=s, vocab=300)} for s in range(3)]
    cfg = kf.KFACConfig(accumulate_dtype="float64", ekfac=True, lowrank_layers=("lm_head",), lowrank_dtype="float32")
    passed: dict[str, Any] = {}
    start = corrector.EigenCorrector.__init__

    def spy(self, infos, blocks, cfg) -> None:  # the blocks of the EK-FAC pass, with the rows' coordinates
        passed.update(blocks)
        start(self, infos, blocks, cfg)

    monkeypatch.setattr(corrector.EigenCorrector, "__init__", spy)
    fisher = kf.fit(model, batches, cfg)
    if seq == 2:
        assert fisher.block("model.layers.0.mlp.down_proj").thin_side == "A" and fisher.block("lm_head").A.full
        assert passed["model.layers.0.mlp.down_proj"].A.seen is not None
    infos = discover_layers(model).infos
    plan = plan_memory(infos, cfg, tokens=6 * seq, batch_tokens=2 * seq, budgets={"cpu": 8 * GIB}, workers=1)
    assert plan.layers["lm_head"].representation == "lowrank"
    planned = {c: sum(sum(lp.total(c).values()) for lp in plan.layers.values()) for c in ("sums", "ekfac")}
    for side in ("A", "G"):
        planned[f"eigen_{side}"] = sum(lp.sides[side].bytes["eigen"] for lp in plan.layers.values())
    actual = _allocated(fisher, passed)
    for c in planned:
        assert abs(planned[c] - actual[c]) <= 0.1 * actual[c], (c, planned[c], actual[c])
    assert torch.get_num_threads() >= 1


def budget_for_groups(model: torch.nn.Module, batches: list, cfg: kf.KFACConfig, spill: bool = False) -> int:
    """The largest max_memory that splits the tracked layers into several groups (the plan's own arithmetic)."""
    infos = discover_layers(model, cfg.include, cfg.exclude).infos
    tokens, largest = count_tokens(batches)
    kw = {"tokens": tokens, "batch_tokens": largest, "spill": spill}
    single = plan_memory(infos, cfg, **kw, budgets={"cpu": 8 * GIB}).peaks[0]["cpu"]
    reserved = model_bytes(model)["cpu"] + activation_bytes(infos, largest)  # max_memory counts these first
    for budget in range(single - 1, single // 2, -max(single // 200, 1)):
        try:
            if len(plan_memory(infos, cfg, **kw, budgets={"cpu": budget}).groups) > 1:
                return reserved + budget
        except MemoryBudgetError:  # the factors kept by earlier groups no longer fit
            continue
    raise AssertionError("no budget splits these layers into groups")


def assert_same_blocks(one: kf.KFAC, grouped: kf.KFAC) -> None:
    assert grouped.layer_names == one.layer_names
    for name in one.layer_names:
        a, b = one.block(name), grouped.block(name)
        assert a.representation == b.representation, name
        for x, y in ((a.A.values, b.A.values), (a.A.vectors, b.A.vectors), (a.G.values, b.G.values)):
            torch.testing.assert_close(y, x, rtol=0, atol=1e-12, msg=name)
        torch.testing.assert_close(b.G.to_dense(), a.G.to_dense(), rtol=0, atol=1e-12, msg=name)
        if a.corrected is not None:
            torch.testing.assert_close(b.corrected, a.corrected, rtol=0, atol=1e-12, msg=name)
            if a.corrected_tail is not None:
                torch.testing.assert_close(b.corrected_tail, a.corrected_tail, rtol=0, atol=1e-12, msg=name)


@pytest.mark.parametrize(
    "kw",
    [{}, {"ekfac": True}, {"ekfac": True, "fisher": "mc", "mc_samples": 2, "seed": 3}],
    ids=["kfac", "ekfac", "ekfac-mc"],
)
def test_grouped_run_equals_unpartitioned(kw: dict, tmp_path, caplog) -> None:
    """Groups, each with its own passes over the same batches, give exactly one run's factors (float64).

    The last group's layers lie in block 1 and after: its passes stop their backward there (collection/cut.py).
    """
    model = make_model("qwen2")
    batches = [{"input_ids": random_ids(2, 12, seed=s)} for s in range(3)]
    cfg = kf.KFACConfig(accumulate_dtype="float64", lowrank_layers=("lm_head",), lowrank_dtype="float64", **kw)
    cfg = cfg.replace(lowrank_max_rank=8)  # the lm_head compresses (its workspace stays below the groups)
    one = kf.fit(model, batches, cfg)
    assert len(one.report.plan["groups"]) == 1 and one.sums is not None
    with caplog.at_level(logging.INFO, logger="kronfisher"):
        grouped = kf.fit(model, batches, cfg.replace(max_memory=budget_for_groups(model, batches, cfg)))
    assert "Backward stops at the input of model.layers.1" in caplog.text  # the exactness below covers the cut
    groups = grouped.report.plan["groups"]
    assert len(groups) >= 2 and [n for g in groups for n in g] == one.layer_names
    assert grouped.sums is None  # each group's sums were freed once decomposed
    assert_same_blocks(one, grouped)
    assert (grouped.report.tokens, grouped.report.loss_terms) == (one.report.tokens, one.report.loss_terms)
    path = kf.save(grouped, tmp_path / "f.safetensors", include_sums=False)
    assert kf.read_metadata(path)["report"]["plan"]["groups"] == groups  # the plan is in the file


def test_representation_follows_token_count_in_a_run() -> None:
    """gate/up (out 24 > lowrank_threshold 20): exact low-rank with few tokens, dense with many (same factors)."""
    model = make_model("qwen2")
    cfg = kf.KFACConfig(accumulate_dtype="float64", lowrank_threshold=20, lowrank_dtype="float64", max_memory="1GiB")
    few = kf.fit(model, [{"input_ids": random_ids(1, 8)}], cfg)
    many = kf.fit(model, [{"input_ids": random_ids(4, 16)}], cfg)
    gate = "model.layers.0.mlp.gate_proj"
    assert few.block(gate).representation == "lowrank" and few.block(gate).G.rank <= 8
    assert many.block(gate).representation == "dense"
    assert few.report.plan["layers"][gate]["max_rank"] is None  # exact: never a token budget
    dense = kf.fit(model, [{"input_ids": random_ids(1, 8)}], cfg.replace(lowrank_threshold=8192))
    torch.testing.assert_close(few.block(gate).G.to_dense(), dense.block(gate).G.to_dense(), rtol=0, atol=1e-12)


def test_cli_max_memory_runs_groups(tmp_path) -> None:
    """``kronfisher analyze --max-memory``: the plan in the report and the file, groups equal to one run."""
    save_model(build_model("qwen2", seed=0, tie=True), tmp_path / "qwen")
    (tmp_path / "a.txt").write_text(TEXT_A, encoding="utf-8")
    args = ["analyze", "--model", str(tmp_path / "qwen"), "--data", str(tmp_path / "a.txt"), "--seq-len", "16"]
    args += ["--batch-size", "3", "--max-tokens", "120", "--dtype", "float64", "--accumulate-dtype", "float64"]
    args += ["--ekfac", "--quiet", "--no-plots", "--exclude", "lm_head"]
    batches = reference_batches(tmp_path / "qwen", [TEXT_A], 16, 3, max_tokens=120)
    cfg = kf.KFACConfig(accumulate_dtype="float64", ekfac=True, lowrank_max_rank=512, exclude=("lm_head",))
    budget = budget_for_groups(load_saved(tmp_path / "qwen"), batches, cfg, spill=True)  # the CLI writes groups out
    assert main([*args, "--output-dir", str(tmp_path / "one")]) == 0
    assert main([*args, "--output-dir", str(tmp_path / "grouped"), "--max-memory", str(budget)]) == 0
    files = {}
    for run in ("one", "grouped"):
        report = json.loads((tmp_path / run / "report.json").read_text())["models"][0]
        files[run] = tmp_path / run / report["factor_file"]
        plan = kf.read_metadata(files[run])["report"]["plan"]
        assert report["collection"]["plan"]["groups"] == plan["groups"]
        assert (len(plan["groups"]) > 1) == (run == "grouped")
    assert_same_blocks(kf.load(files["one"]), kf.load(files["grouped"]))
    assert not (tmp_path / "grouped" / "checkpoints").exists()  # the groups' parts were joined into the file


def test_lowrank_columns_go_to_host_memory_when_the_accelerator_cannot_hold_them() -> None:
    """On an accelerator a low-rank U stays on the device when the layer fits there, else in host memory."""
    infos = {"lm_head": _info("lm_head", 64, 100_000)}
    cfg = kf.KFACConfig(lowrank_max_rank=64)
    roomy = plan_memory(infos, cfg, tokens=4096, batch_tokens=256, device="cuda:0", budgets={"cuda:0": GIB, "cpu": GIB})
    assert roomy.host_columns() == [] and roomy.layers["lm_head"].sides["G"].device == "cuda:0"
    small = {"cuda:0": 40 * 2**20, "cpu": GIB}
    tight = plan_memory(infos, cfg, tokens=4096, batch_tokens=256, device="cuda:0", budgets=small)
    assert tight.host_columns() == ["lm_head"] and "U in host memory" in tight.layers["lm_head"].reason
    assert all(peak["cuda:0"] <= small["cuda:0"] for peak in tight.peaks)
    assert plan_memory(infos, cfg, tokens=4096, batch_tokens=256, budgets={"cpu": GIB}).host_columns() == []


def test_cli_budget_too_small_is_one_line_naming_the_layer(tmp_path, capsys) -> None:
    save_model(build_model("qwen2", seed=0, tie=True), tmp_path / "qwen")
    (tmp_path / "a.txt").write_text(TEXT_A, encoding="utf-8")
    args = ["analyze", "--model", str(tmp_path / "qwen"), "--data", str(tmp_path / "a.txt"), "--seq-len", "16"]
    args += [
        "--max-tokens",
        "64",
        "--quiet",
        "--no-plots",
        "--output-dir",
        str(tmp_path / "out"),
        "--max-memory",
        "1kB",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Layer 'model.layers.0.self_attn.q_proj'" in err and "bytes" in err and "Traceback" not in err


def test_plan_counts_the_columns_of_an_mc_fisher() -> None:
    """With ``fisher="mc"`` and ``mc_samples = s`` a low-rank ``G`` holds ``s`` columns per token: the plan must not
    count fewer columns than the run holds (reference: ``num_columns`` of the collected sum)."""
    model = make_model("qwen2")
    cfg = kf.KFACConfig(
        accumulate_dtype="float64", lowrank_threshold=20, lowrank_dtype="float64", max_memory="1GiB", fisher="mc"
    )
    cfg = cfg.replace(mc_samples=3, seed=1)
    batches = [{"input_ids": random_ids(1, 4, seed=s)} for s in (1, 2)]
    _, collector, report = kf.collect(model, batches, cfg)
    assert report.plan is not None
    for name, s in collector.sums.items():
        if s.G.kind == "lowrank":
            assert report.plan["layers"][name]["columns"] >= s.G.num_columns, name


def test_a_group_of_layers_that_never_fire_does_not_fail_the_run() -> None:
    """Reference: the unpartitioned run, which reports the unused layer in ``never_fired`` and returns the rest."""
    model = make_model("qwen2")
    model.model.unused = torch.nn.Linear(16, 16).double()  # tracked, never called
    batches = [{"input_ids": random_ids(2, 12, seed=s)} for s in range(2)]
    cfg = kf.KFACConfig(accumulate_dtype="float64")
    one = kf.fit(model, batches, cfg)
    assert one.report.never_fired == ["model.unused"]
    discovery = tracked_layers(model, cfg)
    plan = plan_run(model, discovery, batches, cfg)
    used = [n for n in discovery.infos if n != "model.unused"]
    grouped = run_groups(model, batches, cfg, discovery, dataclasses.replace(plan, groups=[used, ["model.unused"]]))
    assert grouped.layer_names == one.layer_names
    assert grouped.report.never_fired == ["model.unused"]


def test_budget_below_the_kept_factors_says_no_grouping_fits() -> None:
    infos = {f"l{i}": _info(f"l{i}", 100, 100) for i in range(12)}
    cfg = kf.KFACConfig()
    one = plan_memory({"l0": infos["l0"]}, cfg, tokens=64, budgets={"cpu": GIB}, workers=1)
    kept = 12 * one.result["cpu"]
    budget = max(one.peaks[0]["cpu"], kept // 2)  # every layer fits alone; their factors together do not
    with pytest.raises(MemoryBudgetError, match="no grouping fits"):
        plan_memory(infos, cfg, tokens=64, budgets={"cpu": budget}, workers=1)
