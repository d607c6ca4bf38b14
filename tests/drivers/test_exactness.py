"""Where K-FAC / EK-FAC are exact, they equal the empirical Fisher from per-sample gradients (float64, rtol 1e-8).

References are computed independently of kronfisher's hooks: per-sample gradients with ``torch.func`` (``vmap`` of
``grad`` over ``functional_call``), arranged as ``V = [W | b]`` and flattened row-major (docs/concepts.md), so the dense
reference for a layer is ``(1/N) Σ_s vec(∇_s) vec(∇_s)ᵀ``.

* K-FAC (docs/concepts.md) is exact when the data hold ONE sample of one position: ``∇ = ĝ aᵀ`` gives
  ``vec(∇) vec(∇)ᵀ = ĝĝᵀ ⊗ aaᵀ``, which is ``N · (G ⊗ A)`` with ``T = 1``.
* EK-FAC is exact for ANY data in its own eigenbasis: with ``"token"`` granularity ``Λ*`` is the diagonal
  of the expand empirical Fisher (per-token gradients ``ĝ_t a_tᵀ``) in ``Q_G ⊗ Q_A``; with ``"sequence"``
  granularity it is the diagonal of the per-sequence empirical Fisher.
* The loss reduction (docs/concepts.md): a ``"mean"`` loss is rescaled by ``N``, so mean and sum give identical factors.

Tolerance: everything runs in float64 (HF models with SDPA attention and an RMSNorm kept in float64, see
``helpers_oracle.keep_float64``); observed agreement is ~1e-14 relative, asserted at ``rtol = 1e-8`` with
``atol = 1e-12 · max|reference|`` for entries that cancel to ~0.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

import kronfisher as kf
from conftest import VOCAB
from helpers_oracle import ce_loss_fn, conv1d_weights, float64_model, shifted_batches, to_kronfisher

RTOL = 1e-8

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # vmap over SDPA


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny float64 eighs are ~40x slower with 2 OpenMP threads on a loaded 2-core machine; restore afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def assert_exact(actual: Tensor, expected: Tensor, what: str) -> None:
    """``rtol = 1e-8``, ``atol = 1e-12 · max|expected|``."""
    scale = float(expected.abs().max())
    assert scale > 0, f"{what}: the reference is identically zero, the comparison would be vacuous"
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=1e-12 * scale, msg=lambda m: f"{what}: {m}")


# References -------------------------------------------------------------------------------------------------------
def per_sample_V(model: nn.Module, grads: dict[str, Tensor], layer: str) -> Tensor:
    """Per-sample gradients of one layer as flattened ``V = [W | b]`` (``[n, out · (in + 1)]``, row-major)."""
    w = grads[f"{layer}.weight"]
    if f"{layer}.weight" in conv1d_weights(model):  # Conv1D stores [in, out]
        w = w.transpose(1, 2)
    b = grads.get(f"{layer}.bias")
    v = w if b is None else torch.cat([w, b.unsqueeze(-1)], dim=-1)
    return v.reshape(v.shape[0], -1)


def empirical_fisher(per_sample: Tensor, num_terms: int) -> Tensor:
    """``(1/N) Σ_s vec(∇_s) vec(∇_s)ᵀ``."""
    return per_sample.t() @ per_sample / num_terms


def eigenbasis_diagonal(fisher: kf.KFAC, layer: str, per_sample: Tensor, num_terms: int) -> Tensor:
    """``diag((Q_G ⊗ Q_A)ᵀ F (Q_G ⊗ Q_A))`` of the empirical Fisher ``F`` of ``per_sample``, as ``[r, s]``.

    ``Q_A`` is thin (``s < a``) for an ``A`` seen on fewer tokens than its size; the per-sample gradients then have
    no part on its complement, so the block's tail values there must be zero (checked here, 1e-10 relative).
    """
    block = fisher.block(layer)
    basis = torch.kron(block.G.vectors, block.A.vectors)
    projected = per_sample @ basis  # [n, r · s]
    diag = (projected.square().sum(0) / num_terms).reshape(block.G.rank, block.A.rank)
    if block.thin_side == "A" and block.corrected_tail is not None:
        assert float(block.corrected_tail.abs().max()) <= 1e-10 * float(diag.abs().max()), layer
    return diag


def per_sample_grads(
    model: nn.Module, sample_loss: Callable[..., Tensor], inputs: tuple[Tensor, ...]
) -> dict[str, Tensor]:
    """``torch.func`` per-sample gradients of ``sample_loss(params, *one_sample)`` over dim 0 of ``inputs``."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    return vmap(grad(sample_loss), in_dims=(None, *([0] * len(inputs))))(params, *inputs)


# Deep linear networks ---------------------------------------------------------------------------------------------
def deep_linear(seed: int = 0) -> nn.Sequential:
    """Linear layers with and without bias, no nonlinearity."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(4, 5, bias=True),
        nn.Linear(5, 3, bias=False),
        nn.Linear(3, 6, bias=True),
    ).double()


def multi_target_ce(logits: Tensor, targets: Tensor, reduction: str) -> Tensor:
    """Cross-entropy of the same logits row against several targets: ``K`` loss terms per position."""
    rows = logits.reshape(-1, 1, logits.shape[-1]).expand(-1, targets.shape[-1], -1)
    return F.cross_entropy(rows.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction=reduction)


@pytest.mark.parametrize("api", ["fit", "capture"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_kfac_exact_for_one_sample_deep_linear(reduction: str, api: str) -> None:
    """One sample (one position) with K = 3 loss terms: ``G ⊗ A = (1/N) ∇∇ᵀ`` exactly, for mean and sum losses.

    The three loss terms make the scaling visible: a ``"mean"`` loss that is not rescaled by ``N`` would
    be off by ``N² = 9``.
    """
    model = deep_linear()
    x = torch.randn(1, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([[2, 5, 5]])
    n_terms = targets.numel()
    cfg = kf.KFACConfig(accumulate_dtype="float64", loss_reduction=reduction)

    if api == "fit":

        def loss_fn(m: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict]:
            loss = multi_target_ce(m(batch["x"]), batch["targets"], reduction)
            return loss, {"num_terms": n_terms, "reduction": reduction}

        fisher = kf.fit(model, [{"x": x, "targets": targets}], cfg, loss_fn=loss_fn)
    else:
        with kf.capture(model, cfg) as cap:
            cap.backward(multi_target_ce(model(x), targets, reduction), reduction=reduction, num_terms=n_terms)
        fisher = cap.finalize()

    def sample_loss(params: dict[str, Tensor], xs: Tensor, ts: Tensor) -> Tensor:
        return multi_target_ce(functional_call(model, params, (xs[None],)), ts[None], "sum")

    grads = per_sample_grads(model, sample_loss, (x, targets))
    assert sorted(fisher.layer_names) == ["0", "1", "2"]
    for layer in fisher.layer_names:
        exact = empirical_fisher(per_sample_V(model, grads, layer), n_terms)
        assert_exact(fisher.to_dense(layer), exact, f"{api}/{reduction} K-FAC block of layer {layer}")


class PositionwiseNet(nn.Module):
    """A deep linear network applied to every position of ``[B, S, d]`` inputs (positions never interact)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = deep_linear(seed=3)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("granularity", ["token", "sequence"])
def test_ekfac_is_exact_diagonal_in_eigenbasis_deep_linear(granularity: str, reduction: str) -> None:
    """EK-FAC ``Λ*`` = diagonal of the per-token / per-sequence empirical Fisher in ``Q_G ⊗ Q_A`` (docs/concepts.md).

    Any data: 2 batches of 3 sequences x 4 positions, one loss term per position (N = 24). Positions do not interact,
    so the per-token gradient ``ĝ_t a_tᵀ`` is the gradient of that token's loss and the per-sequence gradient is
    their sum; both are computed with ``vmap(grad)`` over tokens or sequences.
    """
    model = PositionwiseNet()
    gen = torch.Generator().manual_seed(2)
    batches = [
        {"x": torch.randn(3, 4, 4, dtype=torch.float64, generator=gen), "y": torch.randint(0, 6, (3, 4), generator=gen)}
        for _ in range(2)
    ]
    n_terms = 24

    def loss_fn(m: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict]:
        logits = m(batch["x"])
        loss = F.cross_entropy(logits.reshape(-1, 6), batch["y"].reshape(-1), reduction=reduction)
        return loss, {"num_terms": batch["y"].numel(), "reduction": reduction}

    cfg = kf.KFACConfig(ekfac=True, ekfac_granularity=granularity, accumulate_dtype="float64")
    fisher = kf.fit(model, batches, cfg, loss_fn=loss_fn)
    assert fisher.is_ekfac

    def unit_loss(params: dict[str, Tensor], xs: Tensor, ys: Tensor) -> Tensor:
        # one token ([d] -> [1, d]) or one sequence ([S, d]); the summed loss of that unit
        logits = functional_call(model, params, (xs.reshape(-1, 4),))
        return F.cross_entropy(logits, ys.reshape(-1), reduction="sum")

    xs = torch.cat([b["x"] for b in batches])  # [6, 4, 4]
    ys = torch.cat([b["y"] for b in batches])  # [6, 4]
    if granularity == "token":
        xs, ys = xs.reshape(-1, 4), ys.reshape(-1)
    grads = per_sample_grads(model, unit_loss, (xs, ys))
    for layer in fisher.layer_names:
        vs = per_sample_V(model, grads, layer)
        expected = eigenbasis_diagonal(fisher, layer, vs, n_terms)
        assert_exact(fisher.block(layer).corrected, expected, f"{granularity}/{reduction} Λ* of {layer}")
        # and the dense EK-FAC block is that diagonal in the same basis (docs/library.md; to_dense)
        block = fisher.block(layer)
        basis = torch.kron(block.G.vectors, block.A.vectors)
        assert_exact(fisher.to_dense(layer), (basis * expected.reshape(-1)) @ basis.t(), f"EK-FAC block of {layer}")


# Tiny HF transformers ---------------------------------------------------------------------------------------------
def _hf_sample_loss(model: nn.Module) -> Callable[..., Tensor]:
    def sample_loss(params: dict[str, Tensor], ids: Tensor, targets: Tensor) -> Tensor:
        logits = functional_call(model, params, (), {"input_ids": ids[None]}).logits[0]
        return F.cross_entropy(logits, targets, reduction="sum")

    return sample_loss


@pytest.mark.parametrize("model_name", ["qwen2", "gpt2"])
def test_kfac_exact_for_one_position_transformer(model_name: str) -> None:
    """A single sequence of length 1 (one position, one loss term): every K-FAC block equals ``∇∇ᵀ`` exactly.

    With one key, attention's softmax is constant, so q/k (GPT-2: the q/k columns of c_attn) get zero output
    gradients; those blocks must be zero like the reference (checked on the scale of the largest block).
    """
    model = float64_model(model_name)
    data = shifted_batches(1, 1, 1, VOCAB, seed=4)
    cfg = kf.KFACConfig(accumulate_dtype="float64", loss_reduction="mean")
    fisher = kf.fit(model, to_kronfisher(data), cfg, loss_fn=ce_loss_fn("mean"))
    ((ids, targets),) = data
    grads = per_sample_grads(model, _hf_sample_loss(model), (ids, targets))
    tracked = {
        n for n, m in model.named_modules() if isinstance(m, nn.Linear) or f"{n}.weight" in conv1d_weights(model)
    }
    assert set(fisher.layer_names) == tracked
    references = {layer: empirical_fisher(per_sample_V(model, grads, layer), 1) for layer in tracked}
    top = max(float(r.abs().max()) for r in references.values())
    nonzero = 0
    for layer, exact in references.items():
        dense = fisher.to_dense(layer)
        if float(exact.abs().max()) <= 1e-12 * top:
            assert float(dense.abs().max()) <= 1e-12 * top, f"{model_name}: {layer} should have a zero block"
            continue
        nonzero += 1
        assert_exact(dense, exact, f"{model_name} K-FAC block of {layer}")
    assert nonzero >= len(tracked) // 2


@pytest.mark.parametrize("model_name", ["qwen2", "llama", "gpt2"])
def test_ekfac_sequence_is_exact_diagonal_transformer(model_name: str) -> None:
    """EK-FAC ``"sequence"``: ``Λ*`` is the diagonal of the per-sequence empirical Fisher in the eigenbasis (§5).

    4 sequences of 4 positions, every position with a loss term (N = 16); per-sequence gradients with
    ``vmap(grad)`` over sequences of the summed loss (sequences in a batch never interact without padding).
    """
    model = float64_model(model_name)
    data = shifted_batches(2, 2, 4, VOCAB, seed=5)
    cfg = kf.KFACConfig(ekfac=True, ekfac_granularity="sequence", accumulate_dtype="float64")
    fisher = kf.fit(model, to_kronfisher(data), cfg, loss_fn=ce_loss_fn("mean"))
    ids = torch.cat([x for x, _ in data])
    targets = torch.cat([y for _, y in data])
    grads = per_sample_grads(model, _hf_sample_loss(model), (ids, targets))
    for layer in fisher.layer_names:
        vs = per_sample_V(model, grads, layer)
        expected = eigenbasis_diagonal(fisher, layer, vs, targets.numel())
        assert_exact(fisher.block(layer).corrected, expected, f"{model_name} Λ* of {layer}")


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_mean_and_sum_reduction_give_identical_factors(approx: str) -> None:
    """A ``"mean"`` loss is rescaled by ``N``, so its factors equal those of the summed loss.

    Float64 model, so the two backward passes differ only by the power-free scale ``N = 30`` (round-off ~1e-15).
    """
    model = float64_model("llama")
    batches = to_kronfisher(shifted_batches(2, 3, 5, VOCAB, seed=6))
    fits = {}
    for reduction in ("mean", "sum"):
        cfg = kf.KFACConfig(approx=approx, accumulate_dtype="float64", loss_reduction=reduction)
        fits[reduction] = kf.fit(model, batches, cfg, loss_fn=ce_loss_fn(reduction))
    for layer in fits["mean"].layer_names:
        a_mean, g_mean = fits["mean"].factors(layer)
        a_sum, g_sum = fits["sum"].factors(layer)
        assert_exact(a_mean, a_sum, f"A of {layer}")
        assert_exact(g_mean, g_sum, f"G of {layer}")
