"""No ``out × out`` tensor in any path (docs/concepts.md): a vocabulary of 200,000 end to end.

``out² = 4·10¹⁰`` elements (160 GB in float32) cannot be allocated on the test machines, so a single such tensor
fails the test; on top of that a dispatch mode records every tensor an op produces and the test bounds the largest
by ``64 · out`` elements, far below ``out²``. A 3000-wide low-rank ``lm_head`` goes through every operator with
``torch.kron`` / ``diag`` forbidden and its largest tensor bounded by ``out × (T + in)``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import kronfisher as kf
from conftest import random_ids, tiny_config, tiny_llama

VOCAB = 200_000


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor produced by an op (factories included)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.op = ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.op = t.numel(), str(func)
        return out


def _tiny_llama(tie: bool) -> torch.nn.Module:
    """The conftest Llama with one layer of width 8 and the huge vocabulary (only lm_head and the embedding grow)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = tiny_config("llama", tie=tie, vocab=VOCAB, hidden=8, layers=1)
    return AutoModelForCausalLM.from_config(cfg).to(torch.float64).eval()


def test_vocab_200k_end_to_end_without_out_squared():
    model = _tiny_llama(tie=True)
    gen = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, VOCAB, (2, 6), generator=gen)} for _ in range(2)]
    base = {"accumulate_dtype": "float64", "lowrank_dtype": "float64", "damping": 1e-2}
    guard = LargestTensor()
    with guard, pytest.warns(kf.errors.TiedWeightsWarning):
        fisher = kf.fit(model, batches, kf.KFACConfig(**base, ekfac=True))  # collect + decompose + EK-FAC pass
        wood = kf.KFAC.from_sums(fisher.infos, fisher.sums, kf.KFACConfig(**base, lowrank_solver="woodbury"))
        budget = kf.fit(model, batches, kf.KFACConfig(**base, lowrank_max_rank=5))
        grads = {"lm_head.weight": torch.randn(VOCAB, 8, dtype=torch.float64, generator=gen)}
        outs = {p: fisher.power(grads, p)["lm_head.weight"] for p in (1.0, -1.0, -0.5, 0.5)}
        plain = kf.KFAC.from_sums(fisher.infos, fisher.sums, fisher.cfg.replace(ekfac=False))
        ng_eig = plain.natural_gradient(grads)["lm_head.weight"]
        ng_wood = wood.natural_gradient(grads)["lm_head.weight"]
        ng_budget = budget.natural_gradient(grads)["lm_head.weight"]
        fvp = fisher.fvp(grads)["lm_head.weight"]
    assert guard.largest <= 64 * VOCAB, (guard.largest, guard.op)  # nothing near out² = 4e10 elements

    b = fisher.block("lm_head")
    assert b.representation == "lowrank" and b.is_ekfac and b.G.dim == VOCAB
    assert b.G.rank <= 2 * 2 * 6  # at most T columns
    gb = budget.block("lm_head").G
    assert gb.rank == 5 and gb.tail > 0
    # The discarded mass is reported and is exactly the tail's trace (the trace itself is kept).
    assert budget.summary()["lm_head"]["discarded_G"] == pytest.approx(gb.tail * (VOCAB - 5), rel=1e-12)
    assert gb.trace() == pytest.approx(plain.block("lm_head").G.trace(), rel=1e-10)
    # Woodbury and the eigenform are the same (G + δ_G)^{-1} ⊗ (A + δ_A)^{-1} (float64).
    torch.testing.assert_close(ng_wood, ng_eig, rtol=1e-9, atol=1e-12 * float(ng_eig.abs().max()))
    # (F + δ)^{-1/2} applied twice is (F + δ)^{-1}: the powers are consistent on the huge layer.
    twice = fisher.power({"lm_head.weight": outs[-0.5]}, -0.5)["lm_head.weight"]
    torch.testing.assert_close(twice, outs[-1.0], rtol=1e-8, atol=1e-12 * float(outs[-1.0].abs().max()))
    # ⟨v, F v⟩ ≥ 0 and (F + δ)^{1/2} (F + δ)^{-1/2} v = v.
    assert float((grads["lm_head.weight"] * fvp).sum()) >= 0
    back = fisher.power({"lm_head.weight": outs[-0.5]}, 0.5)["lm_head.weight"]
    torch.testing.assert_close(back, grads["lm_head.weight"], rtol=1e-8, atol=1e-10)
    assert torch.isfinite(ng_budget).all()

    # Dense diagnostics refuse instead of allocating out² (docs/concepts.md).
    with pytest.raises(kf.KronfisherError, match="max_dense_elements"):
        fisher.factors("lm_head")
    with pytest.raises(kf.KronfisherError, match="max_dense_elements"):
        fisher.to_dense("lm_head")
    with pytest.raises(kf.KronfisherError, match="diagnostic for small layers"):
        b.G.to_dense()


def test_operators_never_materialise_dense(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a 3000-wide low-rank lm_head, no op during fit (EK-FAC included) or in any operator returns anything
    near ``out × out`` (9e6); the largest tensor is ``O(out × (T + in))``."""
    torch.manual_seed(0)
    vocab = 3000
    model = tiny_llama(vocab=vocab).double().eval()
    cfg = kf.KFACConfig(accumulate_dtype="float64", damping=1e-2, lowrank_threshold=1000, ekfac=True)
    data = [{"input_ids": random_ids(2, 8, seed=s, vocab=vocab)} for s in range(2)]
    tokens, hidden = 32, 16
    bound = vocab * (tokens + hidden)  # 144000, against out × out = 9,000,000
    with LargestTensor() as mode:
        fisher = kf.fit(model, data, cfg)
        plain = kf.fit(model, data, cfg.replace(ekfac=False))
    assert fisher.block("lm_head").representation == "lowrank" and fisher.is_ekfac and not plain.is_ekfac
    # Thin basis [out, r]: r = 28 = 32 tokens minus the 4 last positions, whose lm_head gradient is 0 (no target).
    assert fisher.block("lm_head").G.vectors.shape == (vocab, tokens - 4)
    assert mode.largest <= bound, mode.op

    def forbidden(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise AssertionError("dense Kronecker/diagonal matrix built by an operator")

    for fn in ("kron", "diag", "diag_embed"):
        monkeypatch.setattr(torch, fn, forbidden)
    gen = torch.Generator().manual_seed(0)
    params = dict(model.named_parameters())
    names = [p for i in fisher.infos.values() for p in (i.weight_name, i.bias_name) if p]
    g = {n: torch.randn(params[n].shape, generator=gen, dtype=torch.float64) for n in names}
    pi = kf.KFAC(plain.infos, plain.blocks, cfg.replace(ekfac=False, damping_mode="pi", max_condition_number=100.0))
    for fish in (fisher, plain, pi):
        with LargestTensor() as mode:
            outs = [fish.natural_gradient(g), fish.fvp(g), fish.whiten(g), fish.power(g, 0.3)]
        assert mode.largest <= bound, mode.op
        assert all(o["lm_head.weight"].shape == (vocab, hidden) for o in outs)
