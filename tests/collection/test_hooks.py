"""What the collection hooks record: a layer without gradient in a batch contributes nothing in it (nothing of an
earlier batch is reused), a frozen or never-reached layer is reported, and the bias is the augmented ``[x; 1]``
column of ``A`` at collection and the last column of ``V = [W | b]`` at use (docs/concepts.md).
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

import torch
from torch import Tensor, nn

import kronfisher as kf
from conftest import make_model, random_ids, right_pad

CFG = kf.KFACConfig(accumulate_dtype="float64", damping=1e-2)
Q_PROJ = "model.layers.0.self_attn.q_proj"


def rel(x: Tensor, ref: Tensor) -> float:
    return float((x - ref).abs().max() / ref.abs().max())


def dense_solve(a: Tensor, g: Tensor, d_a: float, d_g: float, v: Tensor) -> Tensor:
    """``((G + δ_G I) ⊗ (A + δ_A I))^{-1} vec(V)`` reshaped to ``V``'s shape (row-major ``vec``)."""
    m = torch.kron(g + d_g * torch.eye(g.shape[0], dtype=g.dtype), a + d_a * torch.eye(a.shape[0], dtype=a.dtype))
    return torch.linalg.solve(m, v.reshape(-1)).reshape(v.shape)


class Branches(nn.Module):
    """``used`` always feeds the loss; ``sometimes`` only when the batch says so; ``dead`` never does."""

    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(4, 3)
        self.sometimes = nn.Linear(4, 2)
        self.dead = nn.Linear(4, 5)
        self.seen: list[weakref.ref[Tensor]] = []

    def forward(self, x: Tensor, use_sometimes: bool) -> Tensor:
        y = self.used(x).square().sum()
        z = self.sometimes(x)  # the layer runs in every batch...
        if use_sometimes:  # ...but its output reaches the loss only in some
            y = y + z.square().sum()
        h = torch.tanh(x)
        self.seen.append(weakref.ref(h))
        self.dead(h)  # output discarded: the gradient hook never fires
        return y


def branches_loss(model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
    return model(batch["x"], batch["use"]), {"num_terms": batch["x"].shape[0], "reduction": "sum"}


def test_layer_without_gradient_is_skipped_not_reused() -> None:
    """A layer whose output gets no gradient contributes nothing in that batch (nothing from an earlier batch is
    reused); a layer that never gets one is reported and has no factors; a frozen layer is reported as skipped."""
    torch.manual_seed(0)
    model = Branches().double()
    gen = torch.Generator().manual_seed(3)
    data = [{"x": torch.randn(5, 4, generator=gen, dtype=torch.float64), "use": i == 0} for i in range(3)]
    fisher = kf.fit(model, data, CFG, loss_fn=branches_loss)
    only_first = kf.fit(model, data[:1], CFG, loss_fn=branches_loss)
    assert fisher.report.never_fired == ["dead"]
    assert "dead" not in fisher.layer_names and set(fisher.layer_names) == {"used", "sometimes"}
    s, ref = fisher.sums["sometimes"], only_first.sums["sometimes"]
    assert torch.equal(s.A.sum, ref.A.sum) and torch.equal(s.G.sum, ref.G.sum)
    assert (s.A.count, s.G.count, s.batches) == (5, 5, 1)
    assert (fisher.sums["used"].A.count, fisher.sums["used"].batches) == (15, 3)
    gc.collect()
    assert model.seen and all(r() is None for r in model.seen)  # no activation of the dead layer is kept

    hf = make_model("llama")
    frozen = "model.layers.0.mlp.down_proj"
    hf.get_submodule(frozen).weight.requires_grad_(False)
    fitted = kf.fit(hf, [{"input_ids": random_ids(2, 7, seed=50 + i)} for i in range(2)], CFG)
    assert frozen not in fitted.layer_names and "frozen" in fitted.report.skipped_layers[frozen]
    assert not hf.get_submodule(frozen).weight.requires_grad  # the flag is left as the user set it
    assert len(fitted.layer_names) == 14 and not fitted.report.never_fired


def test_bias_handling_consistent() -> None:
    """The bias is the augmented ``[x; 1]`` column of ``A`` at collection and the last column of ``V`` at use; a
    frozen bias (no ``.grad``) enters as zero and only the weight comes back."""
    model = make_model("qwen2")
    data = [right_pad([random_ids(1, 7, seed=90)[0], random_ids(1, 4, seed=91)[0]])]
    seen: list[Tensor] = []
    handle = model.get_submodule(Q_PROJ).register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    with torch.no_grad():
        model(**data[0])
    handle.remove()
    x = seen[0][data[0]["attention_mask"].bool()]  # [T, in] attended inputs
    model.get_submodule(Q_PROJ).bias.requires_grad_(False)  # frozen bias, trainable weight
    fisher = kf.fit(model, data, CFG)
    a, g = fisher.factors(Q_PROJ)
    assert a.shape == (17, 17)
    assert abs(float(a[-1, -1]) - 1.0) < 1e-12  # mean of 1·1
    assert rel(a[:-1, -1], x.mean(0)) < 1e-12 and rel(a[-1, :-1], x.mean(0)) < 1e-12
    assert rel(a[:-1, :-1], x.t() @ x / x.shape[0]) < 1e-12

    ids = data[0]["input_ids"]
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.get_submodule(Q_PROJ).bias.grad is None
    ng = fisher.natural_gradient()
    w = f"{Q_PROJ}.weight"
    assert w in ng and f"{Q_PROJ}.bias" not in ng
    grad_w = model.get_submodule(Q_PROJ).weight.grad
    zero_col = torch.cat([grad_w, torch.zeros(16, 1, dtype=grad_w.dtype)], 1)
    assert rel(ng[w], dense_solve(a, g, 1e-2, 1e-2, zero_col)[:, :-1]) < 1e-8  # float64 dense solve
    explicit_zero = fisher.natural_gradient({w: grad_w, f"{Q_PROJ}.bias": torch.zeros(16, dtype=grad_w.dtype)})
    assert torch.allclose(explicit_zero[w], ng[w], rtol=1e-12, atol=0)  # missing bias == zero bias
    model.get_submodule(Q_PROJ).bias.requires_grad_(True)
