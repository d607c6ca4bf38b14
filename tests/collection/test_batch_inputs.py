"""Batches the model cannot take are one error naming the batch and the key, before the forward (docs/errors.md).

Token ids outside the vocabulary or not integer, an ``attention_mask`` or ``labels`` of another shape than
``input_ids``, labels outside the LM head's classes, and a ``loss_fn`` loss that does not require grad (the
``inputs_embeds`` case) gave raw PyTorch errors; on CUDA an id outside the vocabulary is a device-side assert.
Each is now refused by the one batch loop (:func:`kronfisher.collection.passes.run_pass`) before anything of the
batch is staged: the sums after the error are bit-identical (``torch.equal``) to those of a clean run over the
batches before it, in the K-FAC pass and in the EK-FAC pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kronfisher as kf
from conftest import VOCAB, make_model, random_ids, right_pad
from kronfisher.collection.collector import FactorCollector
from kronfisher.collection.corrector import EigenCorrector
from kronfisher.collection.hooks import Capture
from kronfisher.collection.passes import run_pass
from kronfisher.drivers.planning import tracked_layers
from kronfisher.errors import InputError
from kronfisher.report import CollectionReport

CFG = kf.KFACConfig(accumulate_dtype="float64")


def clean_batches() -> list[dict[str, Tensor]]:
    ids = random_ids(3, 7, seed=31)
    return [{"input_ids": random_ids(2, 6, seed=30)}, right_pad([ids[0], ids[1, :4], ids[2, :5]])]


def ids_with(value: int) -> Tensor:
    ids = random_ids(2, 5, seed=32)
    ids[1, 3] = value
    return ids


# name -> (bad batch, expected error class, words the message must hold besides the batch and the key)
BAD: dict[str, tuple[dict[str, Any], type[Exception], list[str]]] = {
    "id_at_vocab": ({"input_ids": ids_with(VOCAB)}, InputError, [f"holds {VOCAB}", "[1, 3]", f"[0, {VOCAB})"]),
    "id_far_above_vocab": ({"input_ids": ids_with(10**9)}, InputError, ["holds 1000000000", f"[0, {VOCAB})"]),
    "negative_id": ({"input_ids": ids_with(-1)}, InputError, ["holds -1", "min -1", f"[0, {VOCAB})"]),
    "float_ids": ({"input_ids": random_ids(2, 5).float()}, InputError, ["torch.float32", "not integer"]),
    "bool_ids": ({"input_ids": random_ids(2, 5) > 3}, InputError, ["torch.bool", "not integer"]),
    "ids_of_one_dim": ({"input_ids": random_ids(1, 5)[0]}, kf.ShapeError, ["[5]", "[batch, seq]"]),
    "short_mask": (
        {"input_ids": random_ids(2, 5), "attention_mask": torch.ones(2, 4, dtype=torch.long)},
        kf.ShapeError,
        ["[2, 4]", "[2, 5]"],
    ),
    "mask_of_one_dim": (
        {"input_ids": random_ids(2, 5), "attention_mask": torch.ones(5, dtype=torch.long)},
        kf.ShapeError,
        ["[5]", "[2, 5]"],
    ),
    "short_labels": (
        {"input_ids": random_ids(2, 5), "labels": random_ids(2, 4)},
        kf.ShapeError,
        ["[2, 4]", "[2, 5]"],
    ),
    "labels_above_classes": (
        {"input_ids": random_ids(2, 5), "labels": ids_with(VOCAB + 3)},
        InputError,
        [f"holds {VOCAB + 3}", f"[0, {VOCAB})", "-100"],
    ),
    "float_labels": (
        {"input_ids": random_ids(2, 5), "labels": random_ids(2, 5).double()},
        InputError,
        ["torch.float64", "not integer"],
    ),
}
KEY = {
    "short_mask": "'attention_mask'",
    "mask_of_one_dim": "'attention_mask'",
    "short_labels": "'labels'",
    "labels_above_classes": "'labels'",
    "float_labels": "'labels'",
}


def assert_names_batch_and_key(err: BaseException, batch: int, key: str, words: list[str]) -> None:
    text = str(err)
    assert text.startswith(f"Batch {batch}: {key}"), text
    assert "\n" not in text
    for word in words:
        assert word in text, (word, text)


@pytest.mark.parametrize("case", sorted(BAD))
def test_unusable_batch_is_one_error_naming_batch_key_and_expectation(case: str) -> None:
    """``kf.fit`` refuses the bad batch (here batch 2) with the documented class and one line."""
    bad, cls, words = BAD[case]
    with pytest.raises(cls) as info:
        kf.fit(make_model("qwen2"), [*clean_batches(), bad], CFG)
    assert_names_batch_and_key(info.value, 2, KEY.get(case, "'input_ids'"), words)


def test_token_ids_at_or_above_the_vocabulary_are_refused_with_the_vocabulary_size() -> None:
    """The vocabulary is the model's input embedding's: 40 rows here, 57 after resizing (the limit follows it)."""
    model = make_model("llama")
    with pytest.raises(InputError, match=r"expected ids in \[0, 40\)"):
        kf.collect(model, [{"input_ids": ids_with(40)}], CFG)
    model.resize_token_embeddings(57)
    _, collector, _ = kf.collect(model, [{"input_ids": ids_with(56)}], CFG)  # the new rows are ids like any other
    assert collector.sums and all(s.A.count == 10 for s in collector.sums.values())
    with pytest.raises(InputError, match=r"holds 57 .* expected ids in \[0, 57\)"):
        kf.collect(model, [{"input_ids": ids_with(57)}], CFG)


def test_integer_ids_of_any_width_equal_the_int64_result() -> None:
    """int32 / int16 ids (and labels) are read as int64: the factors equal those of the int64 batch exactly."""
    model = make_model("qwen2")
    ref = kf.fit(model, clean_batches(), CFG)
    for dtype in (torch.int32, torch.int16):
        narrow = [{k: v.to(dtype) for k, v in b.items()} for b in clean_batches()]
        narrow[0]["labels"] = clean_batches()[0]["input_ids"].to(dtype)
        other = kf.fit(model, narrow, CFG)
        for name in ref.layer_names:
            for mine, theirs in zip(ref.factors(name), other.factors(name)):
                assert torch.equal(mine, theirs), (dtype, name)


def embeds_loss(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Any]]:
    """A user loss that feeds ``inputs_embeds`` to the model instead of ids."""
    logits = model(inputs_embeds=batch["inputs_embeds"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
    return loss, {"num_terms": targets.numel(), "reduction": "sum"}


def embeds_batch(model: nn.Module, ids: Tensor, requires_grad: bool) -> dict[str, Tensor]:
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(requires_grad)
    return {"inputs_embeds": embeds, "labels": ids}


def test_loss_fn_with_inputs_embeds_without_grad_is_one_input_error() -> None:
    """The parameters are frozen for the pass and ``inputs_embeds`` bypass the input embedding, so their loss has
    no gradient: one line naming the batch, the key and the fix (it was ``RuntimeError: element 0 of tensors does
    not require grad``). With ``requires_grad_(True)`` the same batches fit, and the K-FAC ``A`` of the first
    layer equals that of the ids batches (the same inputs reach the layers)."""
    model = make_model("qwen2")
    ids = [random_ids(2, 6, seed=40), random_ids(2, 6, seed=41)]
    with pytest.raises(InputError) as info:
        kf.fit(model, [embeds_batch(model, i, i is ids[0]) for i in ids], CFG, loss_fn=embeds_loss)
    words = ["[2, 6, 16] torch.float64", "requires_grad=False", "inputs_embeds.requires_grad_(True)"]
    assert_names_batch_and_key(info.value, 1, "'inputs_embeds'", words)
    fisher = kf.fit(model, [embeds_batch(model, i, True) for i in ids], CFG, loss_fn=embeds_loss)
    ref = kf.fit(model, [{"input_ids": i} for i in ids], CFG)
    name = "model.layers.0.self_attn.q_proj"
    torch.testing.assert_close(fisher.factors(name)[0], ref.factors(name)[0], rtol=1e-12, atol=1e-14)


def test_loss_fn_loss_without_grad_or_not_a_tensor_is_one_input_error() -> None:
    """A loss computed under ``no_grad``, or a float, is refused before its backward, naming the batch."""

    def no_grad_loss(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Any]]:
        with torch.no_grad():
            return model(**batch).logits.sum(), {"num_terms": 1}

    def float_loss(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Any, dict[str, Any]]:
        return model(**batch).logits.sum().item(), {"num_terms": 1}

    model = make_model("qwen2")
    with pytest.raises(InputError, match=r"^Batch 0: the loss of loss_fn does not require grad"):
        kf.fit(model, clean_batches(), CFG, loss_fn=no_grad_loss)
    with pytest.raises(InputError, match=r"^Batch 0: loss_fn returned a float as the loss; expected a tensor"):
        kf.fit(model, clean_batches(), CFG, loss_fn=float_loss)


# --- Nothing half-committed: the one batch loop, in the K-FAC and the EK-FAC pass -------------------------------


def kfac_processor(model: nn.Module) -> tuple[Capture, Callable[[], dict[str, Any]]]:
    discovery = tracked_layers(model, CFG)
    collector = FactorCollector(discovery.infos, CFG)

    def state() -> dict[str, Any]:
        return {n: (s.A.sum, s.G.sum, s.A.count, s.G.count, s.batches) for n, s in collector.sums.items()}

    return Capture(discovery.modules, discovery.infos, collector, CFG.on_nonfinite), state


def ekfac_processor(model: nn.Module) -> tuple[Capture, Callable[[], dict[str, Any]]]:
    fisher = kf.fit(model, clean_batches(), CFG)
    modules = dict(model.named_modules())
    infos = {n: fisher.infos[n] for n in fisher.blocks}
    corrector = EigenCorrector(infos, fisher.blocks, CFG)

    def state() -> dict[str, Any]:
        return {n: (s, corrector.counts[n]) for n, s in corrector.sums.items()}

    return Capture({n: modules[n] for n in infos}, infos, corrector, CFG.on_nonfinite), state


def assert_same_state(mine: dict[str, Any], ref: dict[str, Any]) -> None:
    assert mine.keys() == ref.keys()
    for name in ref:
        for a, b in zip(mine[name], ref[name]):
            assert torch.equal(a, b) if isinstance(a, Tensor) else a == b, name


def counted(model: nn.Module) -> tuple[list[int], Any]:
    """Count the model's forwards (a pre-hook on the whole model)."""
    calls: list[int] = []
    return calls, model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(1), with_kwargs=True)


BAD_FOR_SUMS = ["id_at_vocab", "negative_id", "float_ids", "short_mask", "short_labels", "labels_above_classes"]


@pytest.mark.parametrize("make", [kfac_processor, ekfac_processor], ids=["kfac", "ekfac"])
@pytest.mark.parametrize("case", [*BAD_FOR_SUMS, "inputs_embeds_without_grad"])
def test_bad_batch_leaves_the_sums_bit_identical_to_the_clean_run(
    make: Callable[[nn.Module], tuple[Capture, Callable[[], dict[str, Any]]]], case: str
) -> None:
    """Two clean batches, then the bad one: after the error the sums and counts equal those of the clean run
    exactly, and a bad causal-LM batch never reached the model's forward."""
    model = make_model("qwen2")
    loss_fn = None
    if case == "inputs_embeds_without_grad":
        good = [embeds_batch(model, random_ids(2, 6, seed=s), True) for s in (50, 51)]
        batches, loss_fn, cls = [*good, embeds_batch(model, random_ids(2, 6, seed=52), False)], embeds_loss, InputError
    else:
        bad, cls, _ = BAD[case]
        batches = [*clean_batches(), bad]
    cap, state = make(model)
    calls, handle = counted(model)
    try:
        with pytest.raises(cls, match=r"^Batch 2: "):
            run_pass(model, batches, cap, CFG, CollectionReport(), loss_fn=loss_fn)
    finally:
        handle.remove()
    assert len(calls) == (3 if loss_fn is not None else 2)  # the loss_fn's forward runs; the check follows it
    after = state()
    cap, state = make(model)
    run_pass(model, batches[:2], cap, CFG, CollectionReport(), loss_fn=loss_fn)
    assert_same_state(after, state())


class TwoPasses:
    """Clean batches in the first pass over the data, a bad batch at index 1 in the second (the EK-FAC pass)."""

    def __init__(self, bad: dict[str, Any]) -> None:
        self.bad, self.passes = bad, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.passes += 1
        batches = clean_batches()
        if self.passes == 2:
            batches[1] = self.bad
        return iter(batches)


@pytest.mark.parametrize("case", ["id_at_vocab", "float_ids", "short_mask"])
def test_bad_batch_in_the_ekfac_pass_is_refused_naming_the_batch(case: str) -> None:
    """``fit(ekfac=True)`` checks the batches of its second pass too."""
    bad, cls, words = BAD[case]
    data = TwoPasses(bad)
    with pytest.raises(cls) as info:
        kf.fit(make_model("gpt2"), data, kf.KFACConfig(accumulate_dtype="float64", ekfac=True))
    assert data.passes == 2
    assert_names_batch_and_key(info.value, 1, KEY.get(case, "'input_ids'"), words)
