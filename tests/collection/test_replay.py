"""Late groups start at their cut block from the hidden states the first pass kept (collection/replay.py).

Reference: the same grouped run with no kept states (``late_starts`` returns None), where every pass runs every
block. Float64, a 4-layer Qwen2, K-FAC + EK-FAC with the MC Fisher: every block equal to 1e-12 (the same numbers
enter the same arithmetic), and block 0 must not have run in the later groups' passes. When a later pass sees
other batches at the same positions (a shuffling loader), their fingerprints differ and they run in full.
"""

from __future__ import annotations

import importlib

import torch

import kronfisher as kf
from conftest import Flipping, random_ids, tiny_config
from kronfisher.collection.replay import Replay, batch_fingerprint, pass_through
from test_plan import budget_for_groups

groups_mod = importlib.import_module("kronfisher.drivers.groups")


def _model() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config("qwen2", layers=4)).to(torch.float64).eval()


def _run(monkeypatch, model, batches, cfg, replay: bool) -> tuple[kf.KFAC, int, list[Replay]]:
    calls = [0]
    handle = model.model.layers[0].mlp.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    made: list[Replay] = []
    real = groups_mod.late_starts

    def starts(*args):
        out = real(*args) if replay else None
        made.extend([out] if out is not None else [])
        return out

    try:
        with monkeypatch.context() as m:
            m.setattr(groups_mod, "late_starts", starts)
            m.setattr(groups_mod, "REPLAY_SHARE", 1)  # a tiny model's budget: room for every batch's states
            fisher = kf.fit(model, batches, cfg)
    finally:
        handle.remove()
    return fisher, calls[0], made


def _same(got: kf.KFAC, ref: kf.KFAC) -> None:
    assert got.layer_names == ref.layer_names
    for name in ref.layer_names:
        a, b = got.block(name), ref.block(name)
        for x, y in ((a.A.vectors, b.A.vectors), (a.G.values, b.G.values), (a.corrected, b.corrected)):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-12, msg=name)


def test_late_groups_start_at_their_block_and_give_the_same_factors(monkeypatch):
    model = _model()
    batches = [{"input_ids": random_ids(2, 12, seed=s)} for s in range(3)]
    cfg = kf.KFACConfig(accumulate_dtype="float64", ekfac=True, fisher="mc", mc_samples=2)
    cfg = cfg.replace(max_memory=budget_for_groups(model, batches, cfg))
    got, ran, (replay,) = _run(monkeypatch, model, batches, cfg, True)
    ref, ran_ref, none = _run(monkeypatch, model, batches, cfg, False)
    groups = got.report.plan["groups"]
    assert len(groups) >= 2 and not none
    _same(got, ref)
    late = [k for k, g in enumerate(groups) if k and not any(".layers.0." in n for n in g)]  # cut after block 0
    assert late and replay.replayed == 2 * len(late) * len(batches)  # collect and EK-FAC pass of each
    assert ran_ref == 2 * len(groups) * len(batches) and ran == ran_ref - replay.replayed
    assert replay.bytes == sum(t.numel() * 8 for _, t in replay.states.values()) and replay.bytes <= replay.limit


def test_other_batches_at_the_same_positions_run_in_full(monkeypatch):
    model = _model()
    batches = [{"input_ids": random_ids(2, 12, seed=s)} for s in range(3)]
    cfg = kf.KFACConfig(accumulate_dtype="float64", ekfac=True)
    cfg = cfg.replace(max_memory=budget_for_groups(model, batches, cfg))
    got, ran, (replay,) = _run(monkeypatch, model, Flipping(batches), cfg, True)
    ref, ran_ref, _ = _run(monkeypatch, model, Flipping(batches), cfg, False)
    _same(got, ref)
    groups = got.report.plan["groups"]
    late = [k for k, g in enumerate(groups) if k and not any(".layers.0." in n for n in g)]
    # a late group's collect pass runs in the first pass's order (3 replays); its EK-FAC pass, reversed, finds
    # another batch's state at positions 0 and 2, so only the middle batch starts at the cut block
    assert late and replay.replayed == (3 + 1) * len(late)
    assert ran == ran_ref - replay.replayed


def test_fingerprints_and_the_limit():
    a, b = random_ids(2, 5, seed=1), random_ids(2, 5, seed=2)
    assert batch_fingerprint({"input_ids": a}) == batch_fingerprint({"input_ids": a.clone()})
    assert batch_fingerprint({"input_ids": a}) != batch_fingerprint({"input_ids": b})
    assert batch_fingerprint({"input_ids": a}) != batch_fingerprint({"input_ids": a, "attention_mask": a > 3})
    assert batch_fingerprint((a, 3)) != batch_fingerprint((a, 4))
    assert batch_fingerprint(a) is None and batch_fingerprint({"x": object()}) is None
    replay = Replay([0, 2, 2, 3], limit=2 * 5 * 4 * 8)
    assert replay.starts == [2, 3]
    h = torch.randn(2, 5, 4, dtype=torch.float64)
    replay.keep(2, 0, b"x", h)
    replay.keep(3, 0, b"x", h)  # over the limit: not kept
    replay.saw_output(2, h)
    replay.saw_output(3, h)
    assert replay.state(2, 0, b"x") is not None and replay.state(3, 0, b"x") is None
    assert replay.state(2, 0, b"y") is None and replay.state(2, 1, b"x") is None
    replay.saw_output(2, (h,))  # a block returning a tuple: pass-throughs cannot stand in for it
    assert replay.state(2, 0, b"x") is None
    forward = pass_through(lambda x, **kw: x + 1, lambda: True)
    assert forward(h) is h and forward(hidden_states=h) is h
    assert torch.equal(pass_through(lambda x: x + 1, lambda: False)(h), h + 1)
