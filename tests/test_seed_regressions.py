"""Regression tests named after the predecessor's bugs (``/work/shared/seeds/000*.txt``, ``003*.txt``).

Each test pins one bug so that it cannot come back: a stale inverse cache, activations reused for a layer without
gradient, K-FAC without EK-FAC degenerating to ``grad / damping``, a second forward pass, clamping instead of
Tikhonov damping, dense ``out × out`` matrices in the operators, inconsistent bias handling, and factors stored
densely and decomposed again at use.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import kronfisher as kf
from conftest import make_model, random_ids, right_pad, tiny_llama
from kronfisher.operator import KFAC

CFG = kf.KFACConfig(accumulate_dtype="float64", damping=1e-2)
Q_PROJ = "model.layers.0.self_attn.q_proj"


def batches(seed: int, n: int = 2) -> list[dict[str, Tensor]]:
    return [{"input_ids": random_ids(2, 7, seed=seed + i)} for i in range(n)]


def rel(x: Tensor, ref: Tensor) -> float:
    return float((x - ref).abs().max() / ref.abs().max())


def grads_like(fisher: KFAC, model: nn.Module, seed: int = 0) -> dict[str, Tensor]:
    """Random tensors shaped like every tracked parameter."""
    gen = torch.Generator().manual_seed(seed)
    names = {p for i in fisher.infos.values() for p in (i.weight_name, i.bias_name) if p}
    return {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in model.named_parameters() if n in names}


def dense_solve(a: Tensor, g: Tensor, d_a: float, d_g: float, v: Tensor) -> Tensor:
    """``((G + δ_G I) ⊗ (A + δ_A I))^{-1} vec(V)`` reshaped to ``V``'s shape (row-major, SPEC §1)."""
    m = torch.kron(g + d_g * torch.eye(g.shape[0], dtype=g.dtype), a + d_a * torch.eye(a.shape[0], dtype=a.dtype))
    return torch.linalg.solve(m, v.reshape(-1)).reshape(v.shape)


# Seed bug 1 ----------------------------------------------------------------------------------------------------
def test_stale_inverse_cache() -> None:
    """Updating the factors changes the natural gradient, which then equals a fresh fit's (SPEC §4)."""
    model = make_model("qwen2")
    first, second = batches(30), batches(40)
    fisher = kf.fit(model, first, CFG)
    g = grads_like(fisher, model)
    before = fisher.natural_gradient(g)  # fills the spectrum cache
    assert fisher.natural_gradient(g)[f"{Q_PROJ}.weight"].equal(before[f"{Q_PROJ}.weight"])
    _, more, _ = kf.collect(model, second, CFG)
    for name, sums in fisher.sums.items():
        sums.merge(more.sums[name])
    fisher.update_sums(fisher.sums)
    after = fisher.natural_gradient(g)
    fresh = kf.fit(model, first + second, CFG).natural_gradient(g)
    for name in g:
        assert rel(after[name], before[name]) > 1e-3, name  # the update is visible
        assert rel(after[name], fresh[name]) < 1e-9, name  # float64, merged sums vs one pass

    # EK-FAC: a new correction pass replaces the eigenvalues; the damped inverse follows the new block.
    from kronfisher.drivers.ekfac import correct

    ek = kf.fit(model, first, CFG.replace(ekfac=True, damping_mode="exact", damping=1e-3))
    before = ek.natural_gradient(g)
    correct(ek, model, second)
    after = ek.natural_gradient(g)
    w = "lm_head.weight"  # the layer whose EK-FAC eigenvalues (up to ~2) dominate δ in these tiny models
    f = ek.to_dense("lm_head")
    ref = torch.linalg.solve(f + 1e-3 * torch.eye(f.shape[0], dtype=f.dtype), g[w].reshape(-1)).reshape(g[w].shape)
    assert rel(after[w], before[w]) > 1e-3
    assert rel(after[w], ref) < 1e-8  # float64 dense solve, condition <= ~1e4

    # New sums on an EK-FAC operator: the corrected eigenvalues belong to the old bases, so they are dropped with a
    # warning and the operator is plain K-FAC of the new sums (never EK-FAC values in a foreign basis).
    with pytest.warns(kf.errors.KronfisherWarning, match="EK-FAC eigenvalues .* dropped"):
        ek.update_sums(fisher.sums)
    assert not ek.is_ekfac and all(ek.block(n).corrected is None for n in ek.layer_names)
    for name in fisher.layer_names:  # the same sums decomposed the same way
        assert torch.equal(ek.block(name).G.values, fisher.block(name).G.values), name

    # A different damping at use is never served from the cache of another damping.
    assert rel(fisher.power(g, -1.0, damping=0.5)[w], fisher.natural_gradient(g)[w]) > 1e-2


# Seed bug 2 ----------------------------------------------------------------------------------------------------
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
    fitted = kf.fit(hf, batches(50), CFG)
    assert frozen not in fitted.layer_names and "frozen" in fitted.report.skipped_layers[frozen]
    assert not hf.get_submodule(frozen).weight.requires_grad  # the flag is left as the user set it
    assert len(fitted.layer_names) == 14 and not fitted.report.never_fired


# Seed bug 3 ----------------------------------------------------------------------------------------------------
def test_no_eigenvalue_correction_keeps_matrix_information() -> None:
    """K-FAC without EK-FAC keeps the factors' eigenbases: its natural gradient is the damped Kronecker solve,
    far from ``grad / damping`` (what identity eigenvectors with constant eigenvalues would give)."""
    model = make_model("llama")
    fisher = kf.fit(model, batches(60, 3), CFG)
    assert not fisher.is_ekfac
    g = grads_like(fisher, model)
    ng = fisher.natural_gradient(g)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"):
        w = f"{name}.weight"
        a, gg = fisher.factors(name)
        assert rel(ng[w], dense_solve(a, gg, 1e-2, 1e-2, g[w])) < 1e-8  # float64 dense solve
        assert rel(ng[w], g[w] / 1e-2) > 0.5
        block = fisher.block(name)
        eye = torch.eye(block.A.dim, dtype=torch.float64)
        assert not torch.allclose(block.A.vectors.abs(), eye) and block.A.values.std() > 0


# Seed bug 4 ----------------------------------------------------------------------------------------------------
def test_no_double_forward_pass() -> None:
    """``kf.fit`` runs exactly one forward per batch and pass (K-FAC; plus one per batch for EK-FAC, also with
    several MC samples); ``kf.capture`` runs none of its own."""
    model = make_model("qwen2")
    calls: list[int] = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        data = batches(70, 3)
        kf.fit(model, data, CFG)
        assert len(calls) == 3
        calls.clear()
        kf.fit(model, data, CFG.replace(fisher="mc", mc_samples=3))
        assert len(calls) == 3
        calls.clear()
        kf.fit(model, data, CFG.replace(ekfac=True))
        assert len(calls) == 6  # two passes (SPEC §5), one forward each
        calls.clear()
        with kf.capture(model, CFG) as cap:
            for b in data:
                loss = model(**b, labels=b["input_ids"]).loss
                cap.backward(loss, num_terms=12, reduction="mean")
            cap.finalize()
        assert len(calls) == 3
    finally:
        handle.remove()


# Seed bug 5 ----------------------------------------------------------------------------------------------------
def test_damping_is_tikhonov_not_clamping() -> None:
    """``(F + δ I)^{-1}``, then the optional cap on ``λ + δ``: with a singular ``F`` (few tokens) the result is the
    Tikhonov solve, and with a cap it differs from the cap alone (SPEC §4)."""
    model = make_model("llama")
    cfg = CFG.replace(damping_mode="exact", damping=1e-3)
    fisher = kf.fit(model, [{"input_ids": random_ids(1, 6, seed=80)}], cfg)
    name = "model.layers.1.mlp.down_proj"  # in = 24 > 6 tokens: A (so F) is singular
    a, g = fisher.factors(name)
    f = torch.kron(g, a)
    lam, q = torch.linalg.eigh(f)
    assert float(lam.min()) < 1e-12 * float(lam.max())
    gvec = grads_like(fisher, model)
    w = f"{name}.weight"
    x = gvec[w]
    tikhonov = torch.linalg.solve(f + 1e-3 * torch.eye(f.shape[0], dtype=f.dtype), x.reshape(-1)).reshape(x.shape)
    assert rel(fisher.natural_gradient(gvec)[w], tikhonov) < 1e-7  # condition ~1e5 in float64

    kappa = 1e3
    capped = KFAC(fisher.infos, fisher.blocks, cfg.replace(max_condition_number=kappa)).natural_gradient(gvec)[w]
    lam = lam.clamp_min(0.0)
    with_delta = (lam + 1e-3).clamp_min(float((lam + 1e-3).max()) / kappa)
    clamp_only = lam.clamp_min(float(lam.max()) / kappa)
    ref = (q @ ((q.t() @ x.reshape(-1)) / with_delta)).reshape(x.shape)
    cap_alone = (q @ ((q.t() @ x.reshape(-1)) / clamp_only)).reshape(x.shape)
    assert rel(capped, ref) < 1e-9  # condition <= κ
    assert rel(capped, cap_alone) > 1e-3  # δ is added before the cap, not replaced by it


# Seed bug 6 ----------------------------------------------------------------------------------------------------
class LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any aten op returns while active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.op = ""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor) and t.numel() > self.largest:
                self.largest, self.op = t.numel(), str(func)
        return out


def test_operators_never_materialise_dense(monkeypatch: pytest.MonkeyPatch) -> None:
    """SPEC §6–7: with a 3000-wide low-rank lm_head, no op during fit (EK-FAC included) or in any operator
    returns anything near ``out × out`` (9e6); the largest tensor is ``O(out × (T + in))``."""
    torch.manual_seed(0)
    vocab = 3000
    model = tiny_llama(vocab=vocab).double().eval()
    cfg = CFG.replace(lowrank_threshold=1000, ekfac=True)
    data = [{"input_ids": random_ids(2, 8, seed=s, vocab=vocab)} for s in range(2)]
    tokens, hidden = 32, 16
    bound = vocab * (tokens + hidden)  # 144000, against out × out = 9,000,000
    with LargestAllocation() as mode:
        fisher = kf.fit(model, data, cfg)
        plain = kf.fit(model, data, cfg.replace(ekfac=False))
    assert fisher.block("lm_head").representation == "lowrank" and fisher.is_ekfac and not plain.is_ekfac
    # Thin basis [out, r]: r = 28 = 32 tokens minus the 4 last positions, whose lm_head gradient is 0 (no target).
    assert fisher.block("lm_head").G.vectors.shape == (vocab, tokens - 4)
    assert mode.largest <= bound, mode.op

    def forbidden(*args: Any, **kwargs: Any) -> Tensor:
        raise AssertionError("dense Kronecker/diagonal matrix built by an operator")

    for fn in ("kron", "diag", "diag_embed"):
        monkeypatch.setattr(torch, fn, forbidden)
    g = grads_like(fisher, model)
    pi = KFAC(plain.infos, plain.blocks, cfg.replace(ekfac=False, damping_mode="pi", max_condition_number=100.0))
    for fish in (fisher, plain, pi):
        with LargestAllocation() as mode:
            outs = [fish.natural_gradient(g), fish.fvp(g), fish.whiten(g), fish.power(g, 0.3)]
        assert mode.largest <= bound, mode.op
        assert all(o["lm_head.weight"].shape == (vocab, hidden) for o in outs)


# Seed bug 8 ----------------------------------------------------------------------------------------------------
def test_bias_handling_consistent() -> None:
    """The bias is the augmented ``[x; 1]`` column of ``A`` at collection and the last column of ``V`` at use; a
    frozen bias (no ``.grad``) enters as zero and only the weight comes back (SPEC §1, §3.1, §7)."""
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


# Seed bug 004 (003 file): factors stored as eigendecomposition ------------------------------------------------
def test_factors_stored_as_eigendecomposition(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only eigenvectors and eigenvalues are kept, each distinct factor is decomposed once per fit, and no operator
    decomposes again (SPEC §4)."""
    model = make_model("qwen2")
    calls: list[int] = []
    real_eigh = torch.linalg.eigh

    def counting_eigh(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real_eigh(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", counting_eigh)
    fisher = kf.fit(model, batches(100), CFG)
    # Qwen2, 2 blocks: distinct inputs per block are {q,k,v}, o, {gate,up}, down -> 8, plus lm_head -> 9 A's;
    # 15 layers -> 15 G's.
    assert len(fisher.layer_names) == 15
    assert len(calls) == 9 + 15
    calls.clear()
    g = grads_like(fisher, model)
    fisher.natural_gradient(g)
    fisher.whiten(g)
    fisher.fvp(g)
    fisher.power(g, 0.5, damping=0.1)
    KFAC(fisher.infos, fisher.blocks, CFG.replace(damping_mode="pi")).natural_gradient(g)
    assert calls == []  # no decomposition at use

    for name in fisher.layer_names:
        block = fisher.block(name)
        for eig in (block.A, block.G):
            q = eig.vectors
            assert q.shape[0] == q.shape[1] and bool((eig.values >= 0).all())
            assert rel(q.t() @ q, torch.eye(q.shape[0], dtype=q.dtype)) < 1e-12  # orthonormal
        dense = [v for v in vars(block).values() if isinstance(v, Tensor) and v.dim() == 2]
        assert dense == []  # no dense A or G on the block (corrected eigenvalues are None here)
