"""No ``out × out`` tensor in any path (SPEC §6): a vocabulary of 200,000 end to end.

``out² = 4·10¹⁰`` elements (160 GB in float32) cannot be allocated on the test machines, so a single such tensor
fails the test; on top of that a dispatch mode records every tensor an op produces and the test bounds the largest
by ``64 · out`` elements, far below ``out²``.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kronfisher as kf

VOCAB = 200_000


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor produced by an op (factories included)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.op = ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.op = t.numel(), str(func)
        return out


def _tiny_llama(tie: bool) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=tie,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(cfg).to(torch.float64).eval()


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

    # Dense diagnostics refuse instead of allocating out² (SPEC §6, §10).
    with pytest.raises(kf.KronfisherError, match="max_dense_elements"):
        fisher.factors("lm_head")
    with pytest.raises(kf.KronfisherError, match="max_dense_elements"):
        fisher.to_dense("lm_head")
    with pytest.raises(kf.KronfisherError, match="diagnostic for small layers"):
        b.G.to_dense()
