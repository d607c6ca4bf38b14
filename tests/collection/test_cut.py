"""The backward cut (``collection.cut``): a pass over late blocks stops its backward at the earliest one.

Reference: the same pass without the cut (every tracked layer hooked, so the cut block is block 0: today's path),
in float64; factors, counts and EK-FAC eigenvalues must agree to 1e-12. Models where the cut would be wrong (a
tracked layer before the blocks, one fed from outside the block stream, a block whose hidden state is not among its
arguments) must fall back to the full backward and still give every factor.
"""

from __future__ import annotations

import dataclasses
import logging
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import kronfisher as kf
from conftest import VOCAB, random_ids, tiny_config
from kronfisher.drivers.fit import collect
from kronfisher.drivers.groups import run_groups
from kronfisher.drivers.planning import plan_run, tracked_layers
from test_plan import assert_same_blocks, budget_for_groups

CUT = "Backward stops at the input of"
OFF = "Backward cut turned off"


def tiny4(arch: str = "llama", seed: int = 0) -> nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch, layers=4)).double().eval()


def _batches() -> list[dict[str, Tensor]]:
    ids = [random_ids(2, 12, seed=s) for s in range(3)]
    mask = torch.ones_like(ids[1])
    mask[0, 9:] = 0  # a right-padded sequence: counts follow the mask
    return [{"input_ids": ids[0]}, {"input_ids": ids[1], "attention_mask": mask}, {"input_ids": ids[2]}]


def _assert_same_sums(ref: Any, cut: Any, names: list[str]) -> None:
    for name in names:
        a, b = ref.sums[name], cut.sums[name]
        assert b.batches == a.batches, name
        for x, y in ((a.A, b.A), (a.G, b.G)):
            assert y.count == x.count, name
            torch.testing.assert_close(y.sum, x.sum, rtol=0, atol=1e-12, msg=name)


FISHERS = [{"fisher": "empirical"}, {"fisher": "mc", "mc_samples": 2, "seed": 3}]


@pytest.mark.parametrize("kw", FISHERS, ids=["empirical", "mc"])
def test_a_pass_over_late_blocks_gives_the_factors_of_the_full_pass(kw: dict, caplog) -> None:
    model, batches = tiny4(), _batches()
    cfg = kf.KFACConfig(accumulate_dtype="float64", **kw)
    _, ref, _ = collect(model, batches, cfg)
    late = [n for n in ref.sums if ".layers.2." in n or ".layers.3." in n] + ["lm_head"]
    with caplog.at_level(logging.INFO, logger="kronfisher"):
        _, mine, _ = collect(model, batches, cfg, layers=late)
    assert f"{CUT} model.layers.2 (2 of 4 blocks skipped)" in caplog.text and OFF not in caplog.text
    assert sorted(mine.sums) == sorted(late)
    _assert_same_sums(ref, mine, late)


@pytest.mark.parametrize("kw", FISHERS, ids=["empirical", "mc"])
def test_ekfac_of_a_late_group_equals_one_run(kw: dict, caplog) -> None:
    """Two groups (blocks 0-1, then blocks 2-3 and the head): the second group's passes run with the cut."""
    model, batches = tiny4(), _batches()
    cfg = kf.KFACConfig(accumulate_dtype="float64", ekfac=True, **kw)
    one = kf.fit(model, batches, cfg)
    discovery = tracked_layers(model, cfg)
    plan = plan_run(model, discovery, batches, cfg)
    early = [n for n in discovery.infos if ".layers.0." in n or ".layers.1." in n]
    late = [n for n in discovery.infos if n not in early]
    with caplog.at_level(logging.INFO, logger="kronfisher"):
        grouped = run_groups(model, batches, cfg, discovery, dataclasses.replace(plan, groups=[early, late]))
    assert caplog.text.count(f"{CUT} model.layers.2") == 2  # the collection and the EK-FAC pass of group 2
    assert one.block(late[0]).corrected is not None
    assert_same_blocks(one, grouped)


def test_grouped_fit_uses_the_cut_and_equals_one_run(caplog) -> None:
    model, batches = tiny4("qwen2"), _batches()
    cfg = kf.KFACConfig(accumulate_dtype="float64", ekfac=True)
    one = kf.fit(model, batches, cfg)
    with caplog.at_level(logging.INFO, logger="kronfisher"):
        grouped = kf.fit(model, batches, cfg.replace(max_memory=budget_for_groups(model, batches, cfg)))
    assert len(grouped.report.plan["groups"]) >= 2
    assert CUT in caplog.text and OFF not in caplog.text
    assert_same_blocks(one, grouped)


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, h: Tensor | None = None, x: Tensor | None = None) -> Tensor:
        h = h if h is not None else x
        return h + torch.tanh(self.fc(h))


class _ProjInLM(nn.Module):
    """Embedding → ``proj_in`` (before the blocks) → 3 residual blocks → head, plus a ``side`` layer fed the
    embedding directly (outside the block stream). ``call`` says how a block gets its hidden state."""

    def __init__(self, call: str = "positional", width: int = 8) -> None:
        super().__init__()
        self.call = call
        self.embed = nn.Embedding(VOCAB, width)
        self.proj_in = nn.Linear(width, width)
        self.blocks = nn.ModuleList(_Block(width) for _ in range(3))
        self.side = nn.Linear(width, width)
        self.head = nn.Linear(width, VOCAB)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Any:
        e = self.embed(input_ids)
        h = self.proj_in(e)
        for block in self.blocks:
            h = block(h) if self.call == "positional" else block(x=h)
        return SimpleNamespace(logits=self.head(h + self.side(e)))


@pytest.mark.parametrize(
    ("call", "tracked", "why"),
    [
        ("positional", ["proj_in", "blocks.2.fc"], "layer 'proj_in' runs before blocks.2"),
        ("positional", ["blocks.2.fc", "side"], "the input of layer 'side' does not depend on blocks.2"),
        ("keyword", ["blocks.1.fc", "head"], "the hidden state of blocks.1 is not among its arguments"),
    ],
    ids=["layer-before-blocks", "layer-outside-stream", "hidden-state-not-found"],
)
def test_a_cut_that_would_lose_factors_falls_back_to_the_full_backward(
    call: str, tracked: list[str], why: str, caplog
) -> None:
    torch.manual_seed(0)
    model = _ProjInLM(call).double().eval()
    batches = _batches()
    cfg = kf.KFACConfig(accumulate_dtype="float64")
    _, ref, _ = collect(model, batches, cfg)
    with caplog.at_level(logging.INFO, logger="kronfisher"):
        _, mine, report = collect(model, batches, cfg, layers=tracked)
    assert CUT in caplog.text and caplog.text.count(OFF) == 1 and why in caplog.text  # once per pass
    assert sorted(mine.sums) == sorted(tracked) and not report.never_fired
    assert all(mine.sums[n].A.count > 0 for n in tracked)  # no factor silently lost
    assert mine.sums[tracked[0]].batches == len(batches)  # the broken batch was re-run, not dropped or doubled
    _assert_same_sums(ref, mine, tracked)


def test_no_gradient_reaches_the_blocks_below_the_cut() -> None:
    """Deterministic check of the work removed: output-gradient hooks on every block's layers count calls."""
    model, batches = tiny4(), _batches()
    cfg = kf.KFACConfig(accumulate_dtype="float64")
    calls = [0] * 4
    leaf: list[bool] = []  # whether block 0's input requires grad (builds a graph)

    def counter(i: int) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Tensor) -> None:
            if output.requires_grad:
                output.register_hook(lambda g: calls.__setitem__(i, calls[i] + 1))

        return hook

    handles = [b.mlp.down_proj.register_forward_hook(counter(i)) for i, b in enumerate(model.model.layers)]
    first = model.model.layers[0]
    handles.append(first.register_forward_pre_hook(lambda m, args: leaf.append(args[0].requires_grad)))
    late = [n for n in tracked_layers(model, cfg).infos if ".layers.3." in n]
    collect(model, batches, cfg, layers=late)
    assert calls == [0, 0, 0, len(batches)] and not any(leaf)
    calls[:], leaf[:] = [0] * 4, []
    collect(model, batches, cfg)  # every layer: no cut
    assert calls == [len(batches)] * 4 and all(leaf)
    for h in handles:
        h.remove()
    assert not any(b._forward_pre_hooks for b in model.model.layers)  # the cut's hooks are gone
    assert all(p.requires_grad for p in model.parameters())  # flags restored
