"""The user-driven loop ``kf.capture`` and what ``kf.fit`` leaves behind (docs/concepts.md).

A user loop with an HF loss (reduction ``"mean"``, ``num_terms=N``) must give the factors of ``kf.fit`` on the same
batches; capture mode populates ``.grad`` exactly as a plain backward does; ``kf.fit`` leaves ``.grad``,
``requires_grad`` and train/eval modes as it found them; hooks never outlive the with-block.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kronfisher as kf
from conftest import make_model, random_ids, right_pad

CFG = kf.KFACConfig(accumulate_dtype="float64")


def batches() -> list[dict[str, Tensor]]:
    ids = random_ids(3, 8, seed=41)
    return [right_pad([ids[0], ids[1, :5], ids[2, :6]]), {"input_ids": random_ids(2, 7, seed=42)}]


def labels_of(batch: dict[str, Tensor]) -> Tensor:
    """HF labels: the ids, ``-100`` at padding."""
    mask = batch.get("attention_mask")
    return batch["input_ids"] if mask is None else batch["input_ids"].masked_fill(mask == 0, -100)


def num_terms(batch: dict[str, Tensor]) -> int:
    """``N``: shifted targets that are not ignored (docs/concepts.md)."""
    return int((labels_of(batch)[:, 1:] != -100).sum())


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def rel(x: Tensor, ref: Tensor) -> float:
    return float((x - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("loss_kind", ["hf_mean", "own_sum"])
def test_capture_matches_fit(loss_kind: str) -> None:
    """The user loop gives ``kf.fit``'s factors.

    ``hf_mean``: the model's own loss (mean over N; HF computes it in float32) -> 1e-5 relative.
    ``own_sum``: a float64 summed cross-entropy with ``reduction="sum"`` -> 1e-10 relative.
    """
    model = make_model("qwen2")
    data = batches()
    ref = kf.fit(model, data, CFG)
    with kf.capture(model, CFG) as cap:
        for b in data:
            n = num_terms(b)
            if loss_kind == "hf_mean":
                loss = model(**b, labels=labels_of(b)).loss
                cap.backward(loss, reduction="mean", num_terms=n, attention_mask=b.get("attention_mask"))
            else:
                logits = model(**b).logits[:, :-1]
                loss = F.cross_entropy(logits.transpose(1, 2), labels_of(b)[:, 1:], reduction="sum")
                cap.backward(loss, reduction="sum", num_terms=n, attention_mask=b.get("attention_mask"))
        fisher = cap.finalize()
    tol = 1e-5 if loss_kind == "hf_mean" else 1e-10
    assert fisher.layer_names == ref.layer_names
    for name in ref.layer_names:
        a, g = fisher.factors(name)
        a_ref, g_ref = ref.factors(name)
        assert rel(a, a_ref) < 1e-12, name  # A does not depend on the loss
        assert rel(g, g_ref) < tol, name
    assert fisher.report.loss_terms == ref.report.loss_terms == 16 + 12


def test_capture_grad_is_the_plain_backward_grad() -> None:
    """Capture mode runs the ordinary backward: ``.grad`` equals that of a plain backward, bit for bit."""
    model = make_model("llama")
    b = batches()[0]
    model.zero_grad()
    model(**b, labels=labels_of(b)).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with kf.capture(model, CFG) as cap:
        cap.backward(model(**b, labels=labels_of(b)).loss, num_terms=num_terms(b), attention_mask=b["attention_mask"])
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.equal(p.grad, plain[n]), n


def test_fit_leaves_grad_flags_and_modes_untouched() -> None:
    """``kf.fit`` (K-FAC and EK-FAC passes) restores ``.grad``, ``requires_grad`` and every module's mode."""
    model = make_model("qwen2")
    model.train()
    model.model.layers[1].eval()  # a mixed mode must come back exactly
    frozen = model.model.layers[0].mlp.up_proj.weight
    frozen.requires_grad_(False)
    sentinel = {}
    for i, (n, p) in enumerate(model.named_parameters()):
        if i % 3 == 0:
            p.grad = torch.full_like(p, float(i))
        sentinel[n] = p.grad
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    hooks = hook_count(model)
    kf.fit(model, batches(), CFG.replace(ekfac=True))
    for i, (n, p) in enumerate(model.named_parameters()):
        assert p.grad is sentinel[n], n
        if p.grad is not None:
            assert bool((p.grad == float(i)).all()), n
        assert p.requires_grad == flags[n], n
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert hook_count(model) == hooks


def test_hooks_removed_when_user_code_raises() -> None:
    """Hooks go away on exit from the with-block, also when the user's code raises inside it."""
    model = make_model("gpt2")
    before = hook_count(model)
    b = batches()[1]
    with pytest.raises(RuntimeError, match="user failure"), kf.capture(model, CFG) as cap:
        loss = model(**b, labels=b["input_ids"]).loss
        assert hook_count(model) > before  # the hooks were really installed
        cap.backward(loss, num_terms=12)
        model(**b)  # a forward whose backward never comes
        raise RuntimeError("user failure")
    assert hook_count(model) == before
    out = model(**b).logits  # no kronfisher hook fires any more: a plain forward/backward works
    out.sum().backward()
    with pytest.raises(kf.ConfigError), kf.capture(model, CFG) as cap:
        cap.backward(model(**b).logits.sum(), num_terms=12, reduction="median")
    assert hook_count(model) == before


def test_fit_removes_hooks_after_an_error() -> None:
    """A NonFiniteError inside ``kf.fit`` leaves no hook and restores ``requires_grad``."""
    model = make_model("llama")
    handle = model.model.layers[0].mlp.register_forward_hook(lambda m, i, o: o * float("nan"))
    before = hook_count(model)
    with pytest.raises(kf.NonFiniteError):
        kf.fit(model, batches(), CFG)
    assert hook_count(model) == before
    assert all(p.requires_grad for p in model.parameters())
    handle.remove()


def test_never_fired_layer_reported_by_name() -> None:
    """A tracked layer whose hooks never fire is reported by name after the pass and has no factors."""
    model = make_model("llama")
    b = batches()[1]
    with kf.capture(model, CFG) as cap:
        hidden = model.model(input_ids=b["input_ids"]).last_hidden_state  # lm_head is never called
        cap.backward(hidden.square().sum(), num_terms=14, reduction="sum")
        fisher = cap.finalize()
    assert fisher.report.never_fired == ["lm_head"]
    assert "lm_head" not in fisher.layer_names and len(fisher.layer_names) == 14

    # The same in kf.fit, with a loss_fn that bypasses the MLP of the last block.
    def loss_fn(m: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, object]]:
        saved = m.model.layers[1].mlp.forward
        m.model.layers[1].mlp.forward = lambda x: torch.zeros_like(x)  # type: ignore[method-assign]
        try:
            logits = m(input_ids=batch["input_ids"]).logits
        finally:
            m.model.layers[1].mlp.forward = saved  # type: ignore[method-assign]
        loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["input_ids"][:, 1:], reduction="sum")
        return loss, {"num_terms": 12, "reduction": "sum"}

    fitted = kf.fit(model, [b], CFG, loss_fn=loss_fn)
    missing = {f"model.layers.1.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    assert set(fitted.report.never_fired) == missing
    assert not missing & set(fitted.layer_names)


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_report_counts_and_mean_loss_match_a_hand_computed_loss(fisher: str) -> None:
    """``report.loss_sum / report.loss_terms`` is the mean data loss, whatever the Fisher type (MC draws count
    the data loss once per draw, like ``loss_terms``); ``tokens`` is the attended count. Reference: the shifted
    cross-entropy computed by hand from the logits (float64, rel 1e-12), and the mask sums."""
    model = make_model("llama")
    data = batches()
    cfg = kf.KFACConfig(accumulate_dtype="float64", fisher=fisher, mc_samples=2 if fisher == "mc" else 1)
    _, _, report = kf.collect(model, data, cfg)
    total, n = 0.0, 0
    with torch.no_grad():  # by hand in float64 (HF's own loss upcasts logits to float32 only)
        for b in data:
            logits = model(**b).logits[:, :-1]
            total += float(F.cross_entropy(logits.flatten(0, 1), labels_of(b)[:, 1:].flatten(), reduction="sum"))
            n += num_terms(b)
    draws = cfg.mc_samples if fisher == "mc" else 1
    assert report.loss_terms == n * draws
    assert report.loss_sum / report.loss_terms == pytest.approx(total / n, rel=1e-12)
    assert report.tokens == sum(int(b.get("attention_mask", torch.ones_like(b["input_ids"])).sum()) for b in data)


def test_capture_report_counts_tokens_and_loss() -> None:
    """Capture mode reports T from the given masks and the summed loss (``reduction='mean'`` rescaled by N)."""
    model = make_model("llama")
    data = batches()
    with kf.capture(model, CFG) as cap:
        losses = []
        for b in data:
            out = model(**b, labels=labels_of(b))
            mask = b.get("attention_mask", torch.ones_like(b["input_ids"]))
            cap.backward(out.loss, num_terms=num_terms(b), reduction="mean", attention_mask=mask)
            losses.append(float(out.loss.detach()) * num_terms(b))  # the loss the user passed, times N
    model.zero_grad(set_to_none=True)
    report = cap.report
    assert report.tokens == sum(int(b.get("attention_mask", torch.ones_like(b["input_ids"])).sum()) for b in data)
    assert report.loss_sum == pytest.approx(sum(losses), rel=1e-12)
