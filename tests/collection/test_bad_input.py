"""Bad input: non-finite batches, empty batches, wrong shapes, one-shot iterators (docs/concepts.md).

A poisoned batch must never reach the sums: with ``on_nonfinite="raise"`` the error names the layers and the batch
and the sums are bit-identical to those without that batch; with ``"skip"`` the batch is dropped for every layer.
The references are fits on the same data without the bad batch, so equality is exact (``torch.equal``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kronfisher as kf
from conftest import make_model, random_ids, right_pad
from kronfisher.collection.sums import DenseSum, LayerSums

CFG = kf.KFACConfig(accumulate_dtype="float64")
POISONED = "model.layers.1.mlp.down_proj"


def clean_batches() -> list[dict[str, Tensor]]:
    ids = random_ids(3, 7, seed=21)
    return [
        {"input_ids": random_ids(2, 6, seed=20)},
        right_pad([ids[0], ids[1, :4], ids[2, :5]]),
        {"input_ids": random_ids(2, 5, seed=22)},
    ]


def poison_hook(model: nn.Module, state: dict[str, bool]) -> Any:
    """Forward hook putting one NaN into the output of ``POISONED`` while ``state["on"]`` is set."""

    def hook(module: nn.Module, inputs: Any, output: Tensor) -> Tensor | None:
        if not state["on"]:
            return None
        out = output.clone()
        out[0, 1, 3] = float("nan")
        return out

    return model.get_submodule(POISONED).register_forward_hook(hook)


def poisoned_at(batches: list[dict[str, Tensor]], bad: int, state: dict[str, bool]) -> Iterator[dict[str, Tensor]]:
    """Yield ``batches``; the forward of batch ``bad`` is poisoned."""
    for i, b in enumerate(batches):
        state["on"] = i == bad
        yield b
    state["on"] = False


def assert_sums_equal(sa: dict[str, Any], sb: dict[str, Any]) -> None:
    """Bit-identical sums and counts, layer by layer."""
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name].A.sum, sb[name].A.sum), name
        assert torch.equal(sa[name].G.sum, sb[name].G.sum), name
        assert (sa[name].A.count, sa[name].G.count) == (sb[name].A.count, sb[name].G.count), name


def _copy(sums: Any) -> Any:
    """A frozen copy of one layer's dense sums."""

    def dup(s: DenseSum) -> DenseSum:
        d = DenseSum(s.dim, s.sum.dtype)
        d.sum, d.count = s.sum.clone(), s.count
        return d

    return LayerSums(dup(sums.A), dup(sums.G), sums.batches)


def test_nonfinite_raises_naming_layer_and_batch() -> None:
    """The default is a NonFiniteError naming the layer(s) and the batch."""
    model = make_model("qwen2")
    state = {"on": False}
    handle = poison_hook(model, state)
    try:
        with pytest.raises(kf.NonFiniteError) as info:
            kf.fit(model, poisoned_at(clean_batches(), 1, state), CFG)
    finally:
        handle.remove()
    err = info.value
    assert err.batch == 1
    assert POISONED in err.layers
    assert POISONED in str(err) and "batch 1" in str(err)


def test_nonfinite_leaves_sums_of_earlier_batches_untouched() -> None:
    """After the error the sums are bit-identical to those without the batch, and collection goes on."""
    model = make_model("qwen2")
    batches = clean_batches()
    state = {"on": False}

    def loss_of(batch: dict[str, Tensor]) -> tuple[Tensor, int]:
        logits = model(**batch).logits[:, :-1]
        targets = batch["input_ids"][:, 1:]
        if "attention_mask" in batch:
            targets = targets.masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
        n = int((targets != -100).sum())
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"), n

    def run(indices: list[int], bad: int | None) -> tuple[dict[str, Any], dict[str, Any], kf.KFAC]:
        snapshot: dict[str, Any] = {}
        with kf.capture(model, CFG) as cap:
            for i in indices:
                state["on"] = i == bad
                loss, n = loss_of(batches[i])
                mask = batches[i].get("attention_mask")
                if i == bad:
                    with pytest.raises(kf.NonFiniteError) as info:
                        cap.backward(loss, num_terms=n, reduction="sum", attention_mask=mask)
                    assert info.value.batch == indices.index(i) and POISONED in info.value.layers
                    state["on"] = False
                    after = {k: _copy(s) for k, s in cap.collector.sums.items()}
                    assert_sums_equal(after, snapshot)
                else:
                    assert cap.backward(loss, num_terms=n, reduction="sum", attention_mask=mask)
                    snapshot = {k: _copy(s) for k, s in cap.collector.sums.items()}
            fisher = cap.finalize()
        return snapshot, fisher.sums, fisher

    handle = poison_hook(model, state)
    try:
        _, with_bad, _ = run([0, 1, 2], bad=1)
    finally:
        handle.remove()
    _, without, _ = run([0, 2], bad=None)
    assert_sums_equal(with_bad, without)


def test_skip_drops_the_batch_for_all_layers() -> None:
    """``on_nonfinite="skip"`` equals the fit without that batch and reports it."""
    model = make_model("qwen2")
    state = {"on": False}
    cfg = CFG.replace(on_nonfinite="skip")
    handle = poison_hook(model, state)
    try:
        skipped = kf.fit(model, poisoned_at(clean_batches(), 1, state), cfg)
    finally:
        handle.remove()
    batches = clean_batches()
    reference = kf.fit(model, [batches[0], batches[2]], cfg)
    assert_sums_equal(skipped.sums, reference.sums)
    assert [b for b, _ in skipped.report.nonfinite_batches] == [1]
    assert POISONED in skipped.report.nonfinite_batches[0][1]
    assert skipped.report.batches == 2 and skipped.report.loss_terms == reference.report.loss_terms


class TwoBranch(nn.Module):
    """``l1`` and ``l2`` read the same input; the losses of the branches are independent."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(5, 3)
        self.l2 = nn.Linear(5, 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.l1(x), self.l2(x)


def two_branch_loss(model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
    y1, y2 = model(batch["x"])
    if batch["poison"]:
        y2 = y2 + float("nan")  # only l2's output gradient becomes NaN; l1's stays finite
    loss = y1.square().sum() + y2.square().sum()
    return loss, {"num_terms": batch["x"].shape[0], "reduction": "sum"}


def test_skip_drops_finite_layers_too() -> None:
    """Only l2 is non-finite, yet l1 (finite) also drops the batch, so the factors stay consistent."""
    torch.manual_seed(0)
    model = TwoBranch().double()
    gen = torch.Generator().manual_seed(1)
    data = [{"x": torch.randn(6, 5, generator=gen, dtype=torch.float64), "poison": i == 1} for i in range(3)]
    cfg = CFG.replace(on_nonfinite="skip")
    skipped = kf.fit(model, data, cfg, loss_fn=two_branch_loss)
    assert skipped.report.nonfinite_batches == [(1, ["l2"])]
    reference = kf.fit(model, [data[0], data[2]], cfg, loss_fn=two_branch_loss)
    assert_sums_equal(skipped.sums, reference.sums)
    with pytest.raises(kf.NonFiniteError) as info:
        kf.fit(model, data, CFG, loss_fn=two_branch_loss)
    assert info.value.layers == ["l2"] and info.value.batch == 1 and "'l2'" in str(info.value)


def test_empty_batches_contribute_nothing_and_are_reported() -> None:
    """A batch with ``T = 0`` (all padding) or ``N = 0`` (one token per sequence) is reported."""
    model = make_model("llama")
    batches = clean_batches()
    all_pad = {"input_ids": random_ids(2, 5, seed=23), "attention_mask": torch.zeros(2, 5, dtype=torch.long)}
    one_token = right_pad([random_ids(1, 1, seed=24)[0], random_ids(1, 1, seed=25)[0]])
    data = [batches[0], all_pad, batches[1], one_token, batches[2]]
    fisher = kf.fit(model, data, CFG)
    reference = kf.fit(model, batches, CFG)
    assert fisher.report.empty_batches == [1, 3]
    assert_sums_equal(fisher.sums, reference.sums)
    assert fisher.report.batches == 3 and fisher.report.tokens == reference.report.tokens


def test_empty_batch_in_capture_mode_is_reported() -> None:
    """In the user loop: ``num_terms=0`` contributes nothing and is reported."""
    model = make_model("llama")
    ids = random_ids(2, 5, seed=26)
    with kf.capture(model, CFG) as cap:
        loss = model(input_ids=ids, labels=ids).loss
        assert not cap.backward(loss, num_terms=0)
        loss = model(input_ids=ids, labels=ids).loss
        assert cap.backward(loss, num_terms=8)
        fisher = cap.finalize()
    assert fisher.report.empty_batches == [0] and fisher.report.batches == 1
    assert all(s.A.count == 10 for s in fisher.sums.values())


def test_wrong_vector_shape_names_parameter_and_shapes() -> None:
    """A tensor of the wrong shape raises ShapeError naming the parameter and both shapes."""
    qwen = make_model("qwen2")
    fisher = kf.fit(qwen, clean_batches()[:1], CFG)
    w = "model.layers.0.self_attn.q_proj.weight"
    for op in (fisher.natural_gradient, fisher.fvp, fisher.whiten, lambda v: fisher.power(v, 0.5)):
        with pytest.raises(kf.ShapeError) as info:
            op({w: torch.zeros(16, 15, dtype=torch.float64)})
        msg = str(info.value)
        assert w in msg and "[16, 16]" in msg and "[16, 15]" in msg
    b = "model.layers.0.self_attn.q_proj.bias"
    with pytest.raises(kf.ShapeError) as info:
        fisher.natural_gradient({w: torch.zeros(16, 16, dtype=torch.float64), b: torch.zeros(17, dtype=torch.float64)})
    assert b in str(info.value) and "[16]" in str(info.value) and "[17]" in str(info.value)
    gpt2 = make_model("gpt2")
    fisher = kf.fit(gpt2, clean_batches()[:1], CFG)
    w = "transformer.h.0.mlp.c_fc.weight"  # Conv1D: [in, out] = [16, 64]; the nn.Linear layout is wrong
    with pytest.raises(kf.ShapeError) as info:
        fisher.natural_gradient({w: torch.zeros(64, 16, dtype=torch.float64)})
    assert w in str(info.value) and "[16, 64]" in str(info.value) and "[64, 16]" in str(info.value)


def test_ekfac_on_one_shot_iterator_raises_before_any_work() -> None:
    """EK-FAC needs two passes; a one-shot iterator raises ConfigError before the first forward."""
    model = make_model("llama")
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        for one_shot in (iter(clean_batches()), (b for b in clean_batches())):
            with pytest.raises(kf.ConfigError, match="iterator"):
                kf.fit(model, one_shot, CFG.replace(ekfac=True))
    finally:
        handle.remove()
    assert calls == []


# No factors at all: an error naming why, never an empty operator (issue 12) ---------------------------------------
def no_token_batches() -> dict[str, list[dict[str, Tensor]]]:
    """Batch lists from which no layer gets a factor, each for a different reason."""
    ids = random_ids(2, 5, seed=30)
    return {
        "empty batch list": [],
        "all padding": [{"input_ids": ids, "attention_mask": torch.zeros_like(ids)}],
        "every label ignore_index": [{"input_ids": ids, "labels": torch.full_like(ids, -100)}],
        "sequences of one token": [{"input_ids": ids[:, :1]}, {"input_ids": ids[:, 1:2]}],
    }


@pytest.mark.parametrize("case", sorted(no_token_batches()))
@pytest.mark.parametrize("options", [{}, {"fisher": "mc"}, {"ekfac": True}], ids=["kfac", "mc", "ekfac"])
def test_no_attended_tokens_or_labels_is_no_factors_error(case: str, options: dict[str, Any]) -> None:
    """These returned ``KFAC(layers=0)`` and ``natural_gradient(g) == {}``; now ``NoFactorsError`` says why."""
    from kronfisher.errors import NoFactorsError

    batches = no_token_batches()[case]
    needle = "the batch list is empty" if not batches else r"have no attended token with a loss term"
    with pytest.raises(NoFactorsError, match=rf"^No factors were collected for any layer: .*{needle}"):
        kf.fit(make_model("llama"), batches, CFG.replace(**options))


def test_every_batch_skipped_as_nonfinite_is_no_factors_error() -> None:
    """A NaN weight with ``on_nonfinite="skip"`` dropped every batch and returned an empty operator."""
    from kronfisher.errors import NoFactorsError

    model = make_model("llama")
    with torch.no_grad():
        model.get_submodule("model.layers.0.mlp.up_proj").weight[0, 0] = float("nan")
    with pytest.raises(NoFactorsError, match=r"batch\(es\) \[0, 1, 2\] were skipped as non-finite"):
        kf.fit(model, clean_batches(), CFG.replace(on_nonfinite="skip"))


def test_capture_with_nothing_captured_is_no_factors_error() -> None:
    """``capture().finalize()`` with no backward, or only empty batches, names the reason too."""
    from kronfisher.errors import NoFactorsError

    model = make_model("llama")
    with kf.capture(model, CFG) as cap, pytest.raises(NoFactorsError, match="backward\\(\\) was never called"):
        cap.finalize()
    ids = random_ids(2, 5, seed=31)
    with kf.capture(model, CFG) as cap:
        assert not cap.backward(model(input_ids=ids, labels=ids).loss, num_terms=0)
        with pytest.raises(NoFactorsError, match=r"batch\(es\) \[0\] have no attended token with a loss term"):
            cap.finalize()


def test_layers_off_the_loss_path_is_no_factors_error() -> None:
    """Batches ran, but the loss does not depend on the tracked layer: the error says the hooks never fired."""
    from kronfisher.errors import NoFactorsError

    model = TwoBranch().double()

    def loss_fn(m: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        y1, _ = m(batch["x"])
        return y1.square().sum(), {"num_terms": batch["x"].shape[0], "reduction": "sum"}

    data = [{"x": torch.randn(4, 5, dtype=torch.float64)}]
    with pytest.raises(NoFactorsError, match=r"1 batch\(es\) ran, but no tracked layer took part in the loss"):
        kf.fit(model, data, CFG.replace(include=("l2",)), loss_fn=loss_fn)
