"""Inputs of ``power`` / ``fvp`` / ``natural_gradient`` / ``whiten`` that cannot be used give one error naming the
parameter (issue 12): before, int64 vectors came back truncated, complex ones lost their imaginary part, a
non-finite or string ``p`` and overflowing powers returned non-finite tensors, and numpy arrays, lists or meta
tensors raised raw ``AttributeError`` / ``NotImplementedError``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

import kronfisher as kf
from conftest import make_model, random_ids
from kronfisher.errors import SpectrumError, VectorError

W = "model.layers.0.self_attn.q_proj.weight"
B = "model.layers.0.self_attn.q_proj.bias"


@pytest.fixture(scope="module")
def fisher() -> kf.KFAC:
    """K-FAC of a tiny Qwen2 (q_proj has a bias) in float32 on 10 tokens (fewer than the width: singular A)."""
    model = make_model("qwen2", dtype=torch.float32)
    return kf.fit(model, [{"input_ids": random_ids(2, 5, seed=4)}], kf.KFACConfig())


def good(fisher: kf.KFAC) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    info = fisher.infos["model.layers.0.self_attn.q_proj"]
    return {
        W: torch.randn(info.out_features, info.in_features, generator=g),
        B: torch.randn(info.out_features, generator=g),
    }


OPS: dict[str, Callable[[kf.KFAC, Any], Any]] = {
    "power": lambda f, v: f.power(v, 1.0),
    "fvp": lambda f, v: f.fvp(v),
    "natural_gradient": lambda f, v: f.natural_gradient(v),
    "whiten": lambda f, v: f.whiten(v),
}
BAD_VECTORS: dict[str, tuple[Callable[[Tensor], Any], str]] = {
    "int64": (lambda t: t.round().long(), r"dtype torch\.int64 is not floating point"),
    "bool": (lambda t: t > 0, r"dtype torch\.bool is not floating point"),
    "complex64": (lambda t: torch.complex(t, t), r"complex dtype torch\.complex64 is not supported"),
    "numpy": (lambda t: t.numpy(), r"expected a torch\.Tensor, got ndarray \(convert it with torch\.as_tensor\)"),
    "list": (lambda t: t.tolist(), r"expected a torch\.Tensor, got list"),
    "meta": (lambda t: t.to("meta"), r"a meta tensor has no data"),
    "string": (lambda t: "grad", r"expected a torch\.Tensor, got str"),
}


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("kind", sorted(BAD_VECTORS))
@pytest.mark.parametrize("which", [W, B])
def test_unusable_vector_is_one_error_naming_the_parameter(fisher: kf.KFAC, op: str, kind: str, which: str) -> None:
    """Every operator refuses a non-floating, complex, non-tensor or data-less weight or bias, naming it."""
    make, needle = BAD_VECTORS[kind]
    vec = good(fisher)
    vec[which] = make(vec[which])
    with pytest.raises(VectorError, match=rf"^Parameter '{which}': {needle}"):
        OPS[op](fisher, vec)


def test_vectors_that_are_not_a_mapping_are_refused(fisher: kf.KFAC) -> None:
    """A list of tensors instead of a dict (raw ``AttributeError: 'list' object has no attribute 'get'`` before)."""
    with pytest.raises(VectorError, match=r"^vectors must be a mapping from parameter name to tensor, got list"):
        fisher.natural_gradient(list(good(fisher).values()))


@pytest.mark.parametrize("p", [float("nan"), float("inf"), float("-inf"), "1", None, True, torch.ones(2)])
def test_power_p_must_be_a_finite_real_number(fisher: kf.KFAC, p: Any) -> None:
    """Non-finite p returned NaN/inf tensors and ``'1'`` a raw ``TypeError``; now ``Invalid p`` names the value."""
    with pytest.raises(kf.ConfigError, match=r"^Invalid p: .*\. Must be a finite number\.$"):
        fisher.power(good(fisher), p)


def test_power_p_as_zero_dim_tensor_is_a_number(fisher: kf.KFAC) -> None:
    """A 0-d tensor ``p`` is read as its value: the same result as the float."""
    vec = good(fisher)
    want = fisher.power(vec, -0.5)
    got = fisher.power(vec, torch.tensor(-0.5))
    assert all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.parametrize("damping", ["abc", float("inf"), float("nan"), -1.0])
def test_power_damping_argument_must_be_finite_and_nonnegative(fisher: kf.KFAC, damping: Any) -> None:
    """``damping='abc'`` was a raw ``ValueError`` and ``inf`` was accepted."""
    with pytest.raises(kf.ConfigError, match=r"^Invalid damping: .*\. Must be a finite number >= 0\.$"):
        fisher.power(good(fisher), -1.0, damping=damping)


@pytest.mark.parametrize("p", [-50.0, 1e6])
def test_power_that_overflows_is_an_error_not_inf(fisher: kf.KFAC, p: float) -> None:
    """``(F + δ)^p`` with ``δ = 1e-3`` on a singular A: ``δ^-50 = 1e150`` leaves float32; before, inf came back."""
    with pytest.raises(SpectrumError, match=re.escape(f"power p={p:g} of layer ") + ".* overflows"):
        fisher.power(good(fisher), p)


def test_nonfinite_input_is_not_reported_as_overflow(fisher: kf.KFAC) -> None:
    """A NaN gradient gives a NaN result (garbage in, garbage out), not an overflow error."""
    vec = good(fisher)
    vec[W][0, 0] = float("nan")
    out = fisher.natural_gradient(vec)
    assert out[W].isnan().any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_floating_vectors_keep_their_dtype(fisher: kf.KFAC, dtype: torch.dtype) -> None:
    """Floating vectors are accepted and returned in their dtype. Reference: the float32 result for the same
    (rounded) input; tolerance: 8 ulp of the dtype at the largest entry, plus float16's subnormal spacing 2^-24."""
    vec = {k: v.to(dtype) for k, v in good(fisher).items()}
    ref = fisher.fvp({k: v.float() for k, v in vec.items()})
    out = fisher.fvp(vec)
    for k in ref:
        assert out[k].dtype == dtype
        atol = 8 * torch.finfo(dtype).eps * float(ref[k].abs().max()) + 2.0**-24
        torch.testing.assert_close(out[k].float(), ref[k], rtol=0, atol=atol)


def test_numpy_arrays_work_once_converted(fisher: kf.KFAC) -> None:
    """The fix the message suggests works: ``torch.as_tensor`` of the array gives the tensor's result."""
    vec = good(fisher)
    converted = {k: torch.as_tensor(np.asarray(v)) for k, v in vec.items()}
    want, got = fisher.fvp(vec), fisher.fvp(converted)
    assert all(torch.equal(want[k], got[k]) for k in want)
