"""kronfisher against curvlinops 3.0.1 on tiny Qwen2, Llama and GPT-2 models in float64.

Oracle conditions (docs/concepts.md): unpadded batches in which every position carries exactly one loss term
(pre-shifted targets, so ``T = N``), our own cross-entropy from the float64 logits, and a wrapper returning
``logits.reshape(-1, vocab)`` for curvlinops. curvlinops normalises with a ``"mean"`` cross-entropy; kronfisher gets
either the mean or the summed loss (its ``loss_reduction`` handling is then part of the comparison, docs/concepts.md).

Normalisations that must agree:

* expand: ``A = (1/T) Σ_t a_t a_tᵀ``, ``G = (1/N) Σ_t ĝ_t ĝ_tᵀ`` (ĝ of the summed loss); curvlinops divides the
  input covariance by ``num_sequences · seq_len`` and rescales the mean-loss gradients by ``N² / N``.
* reduce: ``A`` from per-sequence means over ``S`` sequences, ``G`` from per-sequence sums over ``N`` loss terms.
* EK-FAC: ``Λ* = (1/N) Σ_s ((Q_Gᵀ ∇_s Q_A)_ij)²`` with per-sequence gradients ``∇_s``.

Layout: curvlinops' joint weight+bias matrix is ``[W | b]`` (bias as the last input column) and it applies
``G · V · A``, the same as kronfisher's ``G ⊗ A`` on the row-major flattening of ``V`` (docs/concepts.md). Matrix-vector
products are compared through both public interfaces, so layout (and GPT-2's transposed ``Conv1D``) is checked
independently of how either library stores its factors.

Float64 throughout: the models use SDPA attention and an RMSNorm patched to keep its input dtype
(``helpers_oracle.keep_float64``). With the stock float32 RMSNorm, the kronfisher run on the *summed* loss and the
curvlinops run on the *mean* loss round differently inside the float32 piece and disagree by ~1e-7 — a property of
the model, not of either library. In float64 both agree to round-off (observed ≲ 1e-13 relative, EK-FAC blocks
included). We assert ``rtol = 1e-6`` elementwise with ``atol = 1e-10 · max|expected|`` so that entries which cancel
to ~0 are judged on the matrix's scale.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import kronfisher as kf
from conftest import VOCAB
from helpers_oracle import (
    EKFACLinearOperator,
    FlatLogits,
    KFACInverseLinearOperator,
    KFACLinearOperator,
    ce_loss_fn,
    float64_model,
    linear_twin,
    oracle_params,
    oracle_to_model,
    shifted_batches,
    to_kronfisher,
    to_oracle,
)
from kronfisher.algebra.damping import Damping

MODELS = ("qwen2", "llama", "gpt2")
PREFIX = "lm."  # FlatLogits keeps the LM as ``.lm``
RTOL = 1e-6
DAMPING = 1e-2


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny float64 eighs are ~40x slower with 2 OpenMP threads on a loaded 2-core machine; restore afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def assert_matches(actual: Tensor, expected: Tensor, what: str, floor: float = 1e-10) -> None:
    """``rtol = 1e-6`` elementwise, ``atol = floor · max|expected|`` (see the module docstring)."""
    scale = float(expected.abs().max())
    assert scale > 0, f"{what}: the oracle is identically zero, the comparison would be vacuous"
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=floor * scale, msg=lambda m: f"{what}: {m}")


def _setup(name: str, n_batches: int = 2, batch: int = 3, seq: int = 5):
    model = float64_model(name)
    twin = FlatLogits(linear_twin(model))
    data = shifted_batches(n_batches, batch, seq, VOCAB, seed=7)
    params, names = oracle_params(twin)
    return model, twin, data, params, names


def _random_vector(params: list[nn.Parameter], seed: int) -> list[Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]


def _compare_products(
    fisher: kf.KFAC,
    model: nn.Module,
    op: KFACLinearOperator,
    params: list[nn.Parameter],
    names: list[str],
    inverse: KFACInverseLinearOperator,
    damping: Damping,
    label: str,
    floor: float = 1e-10,
) -> None:
    """``F v`` and ``(F + damping)^{-1} v`` through both public interfaces, every tracked parameter."""
    vec = _random_vector(params, seed=11)
    v_model = oracle_to_model(model, names, vec, PREFIX)
    ours_fvp = fisher.fvp(v_model)
    ours_inv = fisher.power(v_model, -1.0, damping)
    theirs_fvp = oracle_to_model(model, names, op @ vec, PREFIX)
    theirs_inv = oracle_to_model(model, names, inverse @ vec, PREFIX)
    assert set(ours_fvp) == set(theirs_fvp), f"{label}: tracked parameters differ"
    for pname in theirs_fvp:
        assert_matches(ours_fvp[pname], theirs_fvp[pname], f"{label} F v [{pname}]", floor)
        assert_matches(ours_inv[pname], theirs_inv[pname], f"{label} (F + δ)^-1 v [{pname}] ({damping.mode})", floor)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("model_name", MODELS)
def test_kfac_factors_and_products_match_curvlinops(model_name: str, approx: str) -> None:
    """A, G per layer, F v, and damped inverses (exact, factored, pi) vs curvlinops (docs/concepts.md)."""
    model, twin, data, params, names = _setup(model_name)
    cfg = kf.KFACConfig(approx=approx, accumulate_dtype="float64", damping=DAMPING)
    fisher = kf.fit(model, to_kronfisher(data), cfg, loss_fn=ce_loss_fn("mean"))
    op = KFACLinearOperator(
        twin,
        nn.CrossEntropyLoss(reduction="mean"),
        params,
        to_oracle(data),
        fisher_type="empirical",
        kfac_approx=approx,
        separate_weight_and_bias=False,
        check_deterministic=False,
    )
    op.compute_kronecker_factors()
    assert sorted(fisher.layer_names) == sorted(k.removeprefix(PREFIX) for k in op._mapping)
    for layer in fisher.layer_names:
        A, G = fisher.factors(layer)
        assert_matches(A, op._input_covariances[PREFIX + layer], f"{model_name}/{approx} A of {layer}")
        assert_matches(G, op._gradient_covariances[PREFIX + layer], f"{model_name}/{approx} G of {layer}")
        block = fisher.block(layer)
        assert block.tokens["T"] == (30 if approx == "expand" else 6)  # 2 batches x 3 sequences x 5 positions
        assert block.tokens["N"] == 30

    exact = Damping("exact", DAMPING, DAMPING, DAMPING)
    inverse = KFACInverseLinearOperator(op, damping=DAMPING, use_exact_damping=True)
    _compare_products(fisher, model, op, params, names, inverse, exact, f"{model_name}/{approx}")
    # Factored damping with δ_A ≠ δ_G: curvlinops takes the tuple as (δ_A, δ_G).
    factored = Damping("factored", 0.0, 3e-2, 2e-3)
    inverse = KFACInverseLinearOperator(op, damping=(3e-2, 2e-3))
    _compare_products(fisher, model, op, params, names, inverse, factored, f"{model_name}/{approx}")
    # pi damping, Martens & Grosse 2015 §6.3 (every G here has a positive trace, so both use the same π).
    pi = Damping("pi", DAMPING, 0.0, 0.0)
    inverse = KFACInverseLinearOperator(op, damping=DAMPING, use_heuristic_damping=True, min_damping=0.0)
    _compare_products(fisher, model, op, params, names, inverse, pi, f"{model_name}/{approx}")


@pytest.mark.parametrize("model_name", MODELS)
def test_ekfac_matches_curvlinops(model_name: str) -> None:
    """Dense EK-FAC blocks (docs/concepts.md), F v and the exactly damped inverse vs curvlinops' EKFACLinearOperator.

    Eigenvector signs and the order of (near-)degenerate eigenvalues differ between the libraries, so the corrected
    eigenvalues are compared as the dense blocks ``(Q_G ⊗ Q_A) diag(Λ*) (Q_G ⊗ Q_A)ᵀ``, which do not depend on them.
    kronfisher gets the *summed* loss here (curvlinops the mean): the loss scaling is part of the check.
    """
    model, twin, data, params, names = _setup(model_name)
    cfg = kf.KFACConfig(ekfac=True, loss_reduction="sum", accumulate_dtype="float64", damping=DAMPING)
    fisher = kf.fit(model, to_kronfisher(data), cfg, loss_fn=ce_loss_fn("sum"))
    assert fisher.is_ekfac
    op = EKFACLinearOperator(
        twin,
        nn.CrossEntropyLoss(reduction="mean"),
        params,
        to_oracle(data),
        fisher_type="empirical",
        kfac_approx="expand",
        separate_weight_and_bias=False,
        check_deterministic=False,
    )
    op._maybe_compute_ekfac()
    for layer in fisher.layer_names:
        q_a = op._input_covariances_eigenvectors[PREFIX + layer]
        q_g = op._gradient_covariances_eigenvectors[PREFIX + layer]
        values = op._corrected_eigenvalues[PREFIX + layer]
        if isinstance(values, dict):  # a layer without bias: {position of the weight: [out, in]}
            (values,) = values.values()
        basis = torch.kron(q_g, q_a)
        expected = (basis * values.reshape(-1)) @ basis.t()
        assert_matches(fisher.to_dense(layer), expected, f"{model_name} EK-FAC block of {layer}")

    exact = Damping("exact", DAMPING, DAMPING, DAMPING)
    inverse = KFACInverseLinearOperator(op, damping=DAMPING, use_exact_damping=True)
    _compare_products(fisher, model, op, params, names, inverse, exact, f"{model_name}/ekfac")


class _FirstPositionLogits(nn.Module):
    """Logits of position 0 only: the single loss term of a length-2 causal-LM sequence."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.lm(input_ids=input_ids).logits[:, 0]


def test_mc_fisher_approaches_type2_kfac() -> None:
    """MC Fisher G (docs/concepts.md) converges to curvlinops' type-2 K-FAC G as the number of sampled targets grows.

    Set-up: 128 sequences of length 2 through the ordinary causal-LM path, so each sequence has one loss term
    (position 0; position 1 is attended but its ĝ is 0 by causality). With one loss term per sequence,
    ``E_y[ĝ_t ĝ_tᵀ] = J_tᵀ H J_t`` exactly, which is what type-2 K-FAC backpropagates (no cross terms between loss
    terms), so the MC estimate is unbiased for curvlinops' G.

    Statistical tolerance: two independent MC fits (seeds 1 and 2, ``mc_samples = 24`` each, i.e. 3072 draws
    each) give ``G₁, G₂`` with ``E‖Gᵢ − G‖² = σ²``. Their mean has ``E‖Ḡ − G‖² = σ²/2`` and the half-difference
    has ``E‖(G₁ − G₂)/2‖² = σ²/2`` too, so ``‖Ḡ − G‖ / (‖G₁ − G₂‖/2)`` is ≈ 1 for an unbiased estimator (observed
    0.6–2.0 over layers, data seeds and models) and we require it ≤ 3. A Frobenius norm over hundreds of entries
    concentrates, so 3 is a wide margin for noise while a bias (wrong count, wrong scaling, data targets instead of
    sampled ones: observed 5–13 spreads away) fails. Exactly-zero factors (q/k of a single attended key: the
    softmax over one key has zero gradient) must be zero on both sides.
    """
    model = float64_model("qwen2")
    ids = torch.randint(0, VOCAB, (128, 2), generator=torch.Generator().manual_seed(5))
    cfg = kf.KFACConfig(fisher="mc", mc_samples=24, accumulate_dtype="float64", seed=1)
    fit1 = kf.fit(model, [{"input_ids": ids}], cfg)
    fit2 = kf.fit(model, [{"input_ids": ids}], cfg.replace(seed=2))
    twin = _FirstPositionLogits(linear_twin(model))
    params, _ = oracle_params(twin)
    op = KFACLinearOperator(
        twin,
        nn.CrossEntropyLoss(reduction="mean"),
        params,
        [(ids, ids[:, 1])],
        fisher_type="type-2",
        separate_weight_and_bias=False,
        check_deterministic=False,
    )
    op.compute_kronecker_factors()
    nonzero = 0
    for layer in fit1.layer_names:
        g1, g2 = fit1.factors(layer)[1], fit2.factors(layer)[1]
        expected = op._gradient_covariances[PREFIX + layer]
        top = max(float(op._gradient_covariances[k].norm()) for k in op._gradient_covariances)
        if float(expected.norm()) <= 1e-12 * top:
            assert float(g1.norm()) <= 1e-12 * top and float(g2.norm()) <= 1e-12 * top, layer
            continue
        nonzero += 1
        spread = float((g1 - g2).norm()) / 2
        error = float(((g1 + g2) / 2 - expected).norm())
        assert spread > 0, layer
        assert error <= 3.0 * spread, f"{layer}: MC error {error:.3e} vs sampling spread {spread:.3e}"
        # and the sampling spread itself is small: the estimate is informative, not just noisy
        assert spread <= 0.1 * float(expected.norm()), layer
    assert nonzero >= 5
