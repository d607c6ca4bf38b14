"""Groups that write their factors to the file as they finish (``fit(..., save_to=path)``).

Reference: one unpartitioned run in memory (float64, 1e-12); the joined file is checked byte for byte by
``verify_file`` (every tensor's SHA-256 and the payload checksum).
"""

from __future__ import annotations

import pytest
import torch

import kronfisher as kf
from conftest import make_model, random_ids
from kronfisher.drivers.groups import run_groups
from kronfisher.drivers.planning import plan_run, tracked_layers
from kronfisher.errors import MemoryBudgetError
from kronfisher.io.files import LoadedKFAC
from kronfisher.io.lazy import LazyLayers
from kronfisher.layers import LayerInfo
from kronfisher.plan import plan_memory
from test_plan import assert_same_blocks, budget_for_groups

GIB = 2**30


def _setup(**kw) -> tuple[torch.nn.Module, list, kf.KFACConfig]:
    model = make_model("qwen2")
    batches = [{"input_ids": random_ids(2, 12, seed=s)} for s in range(3)]
    cfg = kf.KFACConfig(accumulate_dtype="float64", lowrank_layers=("lm_head",), lowrank_dtype="float64", **kw)
    return model, batches, cfg.replace(lowrank_max_rank=8)


@pytest.mark.parametrize(
    "kw",
    [{}, {"ekfac": True}, {"ekfac": True, "fisher": "mc", "mc_samples": 2, "seed": 3}],
    ids=["kfac", "ekfac", "ekfac-mc"],
)
def test_spilled_groups_equal_one_run_and_leave_one_verified_file(kw: dict, tmp_path) -> None:
    model, batches, cfg = _setup(**kw)
    one = kf.fit(model, batches, cfg)
    path = tmp_path / "f.safetensors"
    spilled = kf.fit(
        model, batches, cfg.replace(max_memory=budget_for_groups(model, batches, cfg, spill=True)), save_to=path
    )
    plan = spilled.report.plan
    assert plan["spill"] and len(plan["groups"]) >= 2
    assert isinstance(spilled, LoadedKFAC) and spilled.path == path  # read back from the file, layer by layer
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.safetensors"]  # the parts are gone
    meta = kf.verify_file(path)
    assert list(meta["blocks"]) == one.layer_names and meta["report"]["plan"]["groups"] == plan["groups"]
    assert any("groups to fit max_memory" in w for w in meta["report"]["warnings"])
    assert_same_blocks(one, spilled)
    assert (spilled.report.tokens, spilled.report.loss_terms) == (one.report.tokens, one.report.loss_terms)
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    nat, again = one.natural_gradient(grads), spilled.natural_gradient(grads)
    assert set(again) == set(nat) and len(nat) >= len(one.layer_names)
    for name, v in nat.items():
        torch.testing.assert_close(again[name], v, rtol=1e-12, atol=1e-12)


def test_one_group_with_save_to_writes_the_file_and_keeps_the_operator(tmp_path) -> None:
    model, batches, cfg = _setup(ekfac=True)
    fisher = kf.fit(model, batches, cfg, save_to=tmp_path / "f.safetensors")
    assert not fisher.report.plan["spill"] and fisher.sums is not None  # in memory, as an ordinary run
    assert_same_blocks(fisher, kf.load(tmp_path / "f.safetensors", model=model))


def test_a_failed_spilled_run_leaves_no_file(tmp_path) -> None:
    model, batches, cfg = _setup(ekfac=True)
    cfg = cfg.replace(max_memory=budget_for_groups(model, batches, cfg, spill=True))
    discovery = tracked_layers(model, cfg)
    plan = plan_run(model, discovery, batches, cfg, spill=True)
    assert plan.spill and len(plan.groups) >= 2

    def fail(k: int, n: int, phase: str) -> None:
        if (k, phase) == (2, "ekfac"):  # group 1's part is on disk by then
            assert any(tmp_path.iterdir())
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        run_groups(model, batches, cfg, discovery, plan, on_phase=fail, save_to=tmp_path / "f.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_spilling_plan_needs_room_for_one_group_only() -> None:
    """12 layers that fit alone but whose factors together exceed the budget: in memory no grouping fits."""
    infos = {f"l{i}": LayerInfo(f"l{i}", "linear", 100, 100, False, f"l{i}.weight", None) for i in range(12)}
    cfg = kf.KFACConfig()
    one = plan_memory({"l0": infos["l0"]}, cfg, tokens=64, budgets={"cpu": GIB}, workers=1)
    budget = max(one.peaks[0]["cpu"], 12 * one.result["cpu"] // 2)
    with pytest.raises(MemoryBudgetError, match=r"save_to=path"):
        plan_memory(infos, cfg, tokens=64, budgets={"cpu": budget}, workers=1)
    plan = plan_memory(infos, cfg, tokens=64, budgets={"cpu": budget}, workers=1, spill=True)
    assert plan.spill and len(plan.groups) >= 2
    assert all(p["cpu"] <= budget for p in plan.peaks)
    assert plan.result["cpu"] == 12 * one.result["cpu"] > budget  # more than memory holds: on disk
    assert "written to the factor file group by group" in plan.format()


def test_lazy_layers_within_a_byte_limit_drop_the_least_recently_used() -> None:
    reads: list[str] = []

    def loader(name: str) -> str:
        reads.append(name)
        return name

    lazy = LazyLayers("abcd", loader, limit=2, size=lambda _: 1)
    for key in "abab":
        assert lazy[key] == key
    assert reads == ["a", "b"]
    lazy["z"] = "assigned"  # not in the file: kept whatever the limit (and not counted in it)
    assert lazy["c"] == "c" and sorted(lazy.loaded) == ["b", "c", "z"]  # a, the least recently used, dropped
    assert lazy["a"] == "a" and reads == ["a", "b", "c", "a"]  # read again; b dropped for it
    assert sorted(lazy.loaded) == ["a", "c", "z"] and lazy["z"] == "assigned"
    with pytest.raises(ValueError, match="size function"):
        LazyLayers("ab", loader, limit=1)


def test_load_with_keep_bytes_holds_few_layers_and_gives_the_same_products(tmp_path) -> None:
    model, batches, cfg = _setup(ekfac=True)
    fisher = kf.fit(model, batches, cfg)
    path = kf.save(fisher, tmp_path / "f.safetensors")
    sizes = {n: sum(t.numel() * t.element_size() for t in _tensors(fisher.block(n))) for n in fisher.layer_names}
    limit = 2 * max(sizes.values())
    small = kf.load(path, keep_bytes=limit)
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    nat = fisher.natural_gradient(grads)
    for name in fisher.layer_names:  # one layer at a time, as the report does
        info = fisher.infos[name]
        one = {k: grads[k] for k in (info.weight_name, info.bias_name) if k is not None}
        for k, v in small.natural_gradient(one).items():
            torch.testing.assert_close(v, nat[k], rtol=0, atol=1e-12)
        held = small._blocks.loaded  # what the operator holds is the point
        assert sum(sizes[n] for n in held) <= limit and len(held) < len(fisher.layer_names)


def _tensors(block) -> list[torch.Tensor]:
    out = [t for t in (block.corrected, block.corrected_tail) if t is not None]
    for eig in (block.A, block.G):
        out.append(eig.values)
        out += [eig.coeffs, *eig.columns.chunks] if eig.kind == "lowrank" else [eig.vectors]
    return out


def test_a_killed_run_resumes_from_the_groups_that_finished(tmp_path) -> None:
    """Parts kept in a folder survive a failure; a resumed run reuses them (same identity and plan) and equals one
    uninterrupted run; another identity runs every group again."""
    model, batches, cfg = _setup(ekfac=True)
    one = kf.fit(model, batches, cfg)
    cfg = cfg.replace(max_memory=budget_for_groups(model, batches, cfg, spill=True))
    discovery = tracked_layers(model, cfg)
    plan = plan_run(model, discovery, batches, cfg, spill=True)
    n = len(plan.groups)
    kw = {"save_to": tmp_path / "f.safetensors", "parts": tmp_path / "parts", "extra_meta": {"identity": {"run": 1}}}
    seen: list[tuple[int, str]] = []

    def kill_in_last_group(k: int, _n: int, phase: str) -> None:
        seen.append((k, phase))
        if (k, phase) == (n, "ekfac"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_groups(model, batches, cfg, discovery, plan, on_phase=kill_in_last_group, **kw)
    kept = sorted(p.name for p in (tmp_path / "parts").iterdir())
    assert kept == [f"f.group{k}-of-{n}.safetensors" for k in range(1, n)] and not (tmp_path / "f.safetensors").exists()
    seen.clear()

    def record(k: int, _n: int, phase: str) -> None:
        seen.append((k, phase))

    resumed = run_groups(model, batches, cfg, discovery, plan, on_phase=record, resume=True, **kw)
    assert [p for k, p in seen if k < n] == ["reused"] * (n - 1) and (n, "collect") in seen
    assert list((tmp_path / "parts").iterdir()) == []  # joined into the factor file
    assert_same_blocks(one, resumed)
    assert resumed.report.tokens == one.report.tokens
    with pytest.raises(KeyboardInterrupt):
        run_groups(model, batches, cfg, discovery, plan, on_phase=kill_in_last_group, **kw)
    seen.clear()
    other = {**kw, "extra_meta": {"identity": {"run": 2}}}  # e.g. other data: nothing is reused
    run_groups(model, batches, cfg, discovery, plan, on_phase=record, resume=True, **other)
    assert "reused" not in [p for _, p in seen]
