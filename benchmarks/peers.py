"""Adapters for the libraries a user would otherwise pick: curvlinops and kronfluence.

Both are imported lazily (inside the functions), so the runner and kronfisher's own figures work without them.
Each adapter runs in its own benchmark process (see ``run.py``), so an out-of-memory kill or an exception is
recorded as a failed figure, never fatal to the run.

Both peers see the workload's tokens and loss (pre-shifted targets, mean cross-entropy over all positions) and
track the same layers as ``kronfisher`` with ``exclude=lm_head``: the output layer's ``out × out`` gradient
factor does not fit them (see :func:`head_requirements`).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workloads import Workload

Phase = Callable[[str], Any]  # context-manager factory: ``with phase("name"): ...`` times a phase


class FlatLogits(nn.Module):
    """Wraps a causal LM so that it returns ``[B·S, V]`` logits (curvlinops' EK-FAC wants a 2-D output)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: Tensor) -> Tensor:
        logits = self.lm(input_ids=input_ids, use_cache=False).logits
        return logits.reshape(-1, logits.shape[-1])


def tracked_linears(model: nn.Module, head: str) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` layers kronfisher tracks with ``exclude=head`` (every trainable one but the head)."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name != head and m.weight.requires_grad
    }


def _params_of(layers: dict[str, nn.Linear]) -> list[nn.Parameter]:
    params: list[nn.Parameter] = []
    for m in layers.values():
        params.append(m.weight)
        if m.bias is not None:
            params.append(m.bias)
    return params


# curvlinops ---------------------------------------------------------------------------------------------------
def curvlinops_operator(model: nn.Module, wl: Workload, include_head: bool = False) -> Any:
    """curvlinops' EK-FAC operator for the workload (empirical Fisher, expand, weight and bias joint).

    These are the settings under which curvlinops is kronfisher's oracle (docs/concepts.md): ``"mean"``
    cross-entropy, every position one loss term, the sequence as the per-sample unit of the correction.
    ``include_head`` also tracks the output layer (its dense ``out × out`` G: see :func:`head_requirements`).
    """
    from curvlinops import EKFACLinearOperator
    from curvlinops.kfac import FisherType, KFACType

    wrapped = FlatLogits(model)
    layers = tracked_linears(model, "" if include_head else wl.head)
    data = [(b["input_ids"], b["targets"].reshape(-1)) for b in wl.batches]
    num_data = sum(int(b["input_ids"].shape[0]) for b in wl.batches)
    seq = int(wl.batches[0]["input_ids"].shape[1])
    return EKFACLinearOperator(
        wrapped,
        nn.CrossEntropyLoss(reduction="mean"),
        _params_of(layers),
        data,
        check_deterministic=False,
        fisher_type=FisherType.EMPIRICAL,
        kfac_approx=KFACType.EXPAND,
        separate_weight_and_bias=False,
        num_data=num_data,
        num_per_example_loss_terms=seq,
    )


def run_curvlinops(model: nn.Module, wl: Workload, phase: Phase) -> dict[str, Any]:
    """curvlinops K-FAC collection, eigendecomposition and EK-FAC correction, each phase timed."""
    op = curvlinops_operator(model, wl)
    with phase("kfac_collect"):
        op.compute_kronecker_factors()
    with phase("eigh"):
        op._compute_eigenvectors()
    with phase("ekfac_correction"):
        op.compute_eigenvalue_correction()
    return {"layers": len(op._mapping)}


def run_curvlinops_head(model: nn.Module, wl: Workload, phase: Phase) -> dict[str, Any]:
    """curvlinops K-FAC collection with the output layer included (the whole workload), when memory allows.

    Refuses (an error recorded by the runner, nothing allocated) when the available memory is below what its dense
    ``G`` needs (:func:`head_requirements`) plus 3 GiB: the machine is shared.
    """
    import psutil

    head = dict(model.named_modules())[wl.head]
    req = head_requirements(int(head.out_features), int(head.in_features), 1, None)
    avail = psutil.virtual_memory().available / 1024**3
    if avail < req["curvlinops_kfac_GiB"] + 3.0:
        raise MemoryError(
            f"curvlinops K-FAC with {wl.head} needs about {req['curvlinops_kfac_GiB']} GiB for its dense G "
            f"({head.out_features:,}²); {avail:.1f} GiB available"
        )
    op = curvlinops_operator(model, wl, include_head=True)
    with phase("kfac_collect"):
        op.compute_kronecker_factors()
    return {"layers": len(op._mapping), "available_gib": avail}


# kronfluence --------------------------------------------------------------------------------------------------
class _Rows(torch.utils.data.Dataset):
    """The workload's sequences as a map-style dataset of ``{"input_ids": [S], "targets": [S]}``."""

    def __init__(self, wl: Workload) -> None:
        self.ids = torch.cat([b["input_ids"] for b in wl.batches])
        self.targets = torch.cat([b["targets"] for b in wl.batches])

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.ids[i], "targets": self.targets[i]}


def _lm_task(layer_names: list[str]) -> Any:
    from kronfluence.task import Task

    class LMTask(Task):
        """Summed cross-entropy over every position (kronfluence expects a summed loss)."""

        def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> Tensor:
            logits = model(input_ids=batch["input_ids"], use_cache=False).logits
            logits = logits.reshape(-1, logits.shape[-1])
            if sample:
                with torch.no_grad():
                    targets = torch.multinomial(torch.softmax(logits.detach(), -1), 1).squeeze(1)
            else:
                targets = batch["targets"].reshape(-1)
            return F.cross_entropy(logits, targets, reduction="sum")

        def compute_measurement(self, batch: Any, model: nn.Module) -> Tensor:
            return self.compute_train_loss(batch, model)

        def get_influence_tracked_modules(self) -> list[str]:
            return list(layer_names)

        def get_attention_mask(self, batch: Any) -> None:
            return None

    return LMTask()


def run_kronfluence(model: nn.Module, wl: Workload, phase: Phase) -> dict[str, Any]:
    """kronfluence's three EK-FAC phases (covariance, eigendecomposition, lambda), each timed.

    Factor files go to a temporary directory (writing them is part of kronfluence's pipeline and of its time).
    """
    import logging

    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments

    names = list(tracked_linears(model, wl.head))
    task = _lm_task(names)
    model = prepare_model(model, task)
    batch = int(wl.batches[0]["input_ids"].shape[0])
    dataset = _Rows(wl)
    args = FactorArguments(strategy="ekfac", use_empirical_fisher=True)
    with tempfile.TemporaryDirectory(prefix="kronfluence-bench-") as out:
        analyzer = Analyzer(
            "bench", model, task, cpu=True, disable_tqdm=True, output_dir=out, log_level=logging.WARNING
        )
        common = {"factors_name": "ekfac", "factor_args": args, "overwrite_output_dir": True}
        with phase("covariance"):
            analyzer.fit_covariance_matrices(dataset=dataset, per_device_batch_size=batch, **common)
        with phase("eigendecomposition"):
            analyzer.perform_eigendecomposition(**common)
        with phase("lambda"):
            analyzer.fit_lambda_matrices(dataset=dataset, per_device_batch_size=batch, **common)
    return {"layers": len(names)}


# Agreement with curvlinops ------------------------------------------------------------------------------------
def _rel(a: Tensor, b: Tensor) -> float:
    """Max-norm relative error ``max|a − b| / max|b|``."""
    den = float(b.abs().max())
    return float((a - b).abs().max()) / den if den > 0 else float((a - b).abs().max())


def agreement(wl: Workload) -> dict[str, Any]:
    """kronfisher against curvlinops in float64 on the workload's tokens (lm_head excluded).

    Returns the max relative errors (max-norm) of the K-FAC factors ``A`` and ``G`` over layers, and the relative
    error (2-norm) of the undamped EK-FAC matrix-vector product on a random vector, max over layers.
    """
    import kronfisher as kf
    from kronfisher.decompose.layer import symmetric_mean
    from kronfisher.drivers.ekfac import correct
    from kronfisher.operator import KFAC
    from workloads import kronfisher_loss_fn

    model = wl.build().double()
    cfg = kf.KFACConfig(exclude=(rf"^{wl.head}$",), accumulate_dtype="float64", eigh_dtype="float64")
    discovery, collector, report = kf.collect(model, wl.batches, cfg, loss_fn=kronfisher_loss_fn)
    fisher = KFAC.from_sums(discovery.infos, collector.sums, cfg, report=report, model=model)
    op = curvlinops_operator(model, wl)
    op.compute_kronecker_factors()
    err_a = err_g = 0.0
    worst: dict[str, str] = {}
    for name, sums in collector.sums.items():
        key = f"lm.{name}"
        ea = _rel(symmetric_mean(sums.A), op._input_covariances[key])
        eg = _rel(symmetric_mean(sums.G), op._gradient_covariances[key])
        if ea > err_a:
            err_a, worst["A"] = ea, name
        if eg > err_g:
            err_g, worst["G"] = eg, name
    correct(fisher, model, wl.batches, loss_fn=kronfisher_loss_fn)
    op.compute_eigenvalue_correction()
    gen = torch.Generator().manual_seed(0)
    params = dict(model.named_parameters())
    vecs = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in op._params]
    ref = op._matmat([v.unsqueeze(-1) for v in vecs])
    by_param = {id(p): i for i, p in enumerate(op._params)}
    err_e = 0.0
    for name in fisher.layer_names:
        info = fisher.infos[name]
        names = [n for n in (info.weight_name, info.bias_name) if n]
        idx = [by_param[id(params[n])] for n in names]
        out = fisher.fvp({n: vecs[i] for n, i in zip(names, idx)})
        num = sum(float((out[n] - ref[i].squeeze(-1)).square().sum()) for n, i in zip(names, idx))
        den = sum(float(ref[i].square().sum()) for i in idx)
        e = math.sqrt(num / den) if den > 0 else math.sqrt(num)
        if e > err_e:
            err_e, worst["ekfac_mvp"] = e, name
    return {
        "dtype": "float64",
        "layers": len(fisher.layer_names),
        "kfac_A_max_rel_err": err_a,
        "kfac_G_max_rel_err": err_g,
        "ekfac_mvp_max_rel_err": err_e,
        "worst_layer": worst,
    }


# What a peer would need for the output layer ------------------------------------------------------------------
def head_requirements(out: int, in_: int, batch: int, eigh_seconds_2048: float | None) -> dict[str, Any]:
    """Memory (and eigh time) a dense-``G`` peer needs for an output layer of ``out`` rows.

    Args:
        out: output dimension (vocabulary size).
        in_: input dimension (hidden size).
        batch: sequences per batch (kronfluence's per-sample gradients are ``[batch, out, in]``).
        eigh_seconds_2048: measured time of one float32 ``eigh`` of size 2048 on this machine, scaled by
            ``(out / 2048)³`` to estimate the ``out × out`` eigendecomposition (None: not estimated).

    """
    gib = 1024**3
    g32 = out * out * 4 / gib
    g64 = out * out * 8 / gib
    est = None if eigh_seconds_2048 is None else eigh_seconds_2048 * (out / 2048) ** 3
    return {
        "out": out,
        "G_float32_GiB": round(g32, 1),
        # curvlinops: G accumulated in float32 (einsum result plus the running sum), eigh in float32 (syevd:
        # matrix + eigenvectors + 2n² workspace).
        "curvlinops_kfac_GiB": round(2 * g32, 1),
        "curvlinops_ekfac_GiB": round(4 * g32, 1),
        # kronfluence: covariance in float32, eigendecomposition in float64 (matrix + vectors + 2n² workspace),
        # lambda: per-sample gradients [batch, out, in] in float32 plus the rotated copy.
        "kronfluence_eigendecomposition_GiB": round(g32 + 4 * g64, 1),
        "kronfluence_lambda_per_sample_GiB": round(2 * batch * out * in_ * 4 / gib, 2),
        "eigh_out_x_out_estimated_s": None if est is None else round(est),
    }
