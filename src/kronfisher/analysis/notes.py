"""What the ``kronfisher analyze`` report says about each model: its entry, the prose, the notes on the run."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..config import KFACConfig
from ..data import TextBatches
from ..models import LoadedModel
from .metrics import highlights, totals


def run_notes(cfg: KFACConfig, results: list[dict[str, Any]]) -> list[str]:
    """Notes for the report: tied weights, collection warnings, silent layers, reduced-precision eigh."""
    notes = []
    for m in results:
        tied = m["collection"].get("tied", {})
        for layer, others in tied.items():
            notes.append(
                f"Model {m['index']}: {layer!r} shares its weight with {others} (tied). Its curvature and gradient "
                "are those of the output-layer use only; the embedding use is not included (docs/concepts.md)."
            )
        for w in m["collection"].get("warnings", []):
            if "Tied weights" not in w:
                notes.append(f"Model {m['index']}: {w}")
        if m["collection"].get("never_fired"):
            notes.append(f"Model {m['index']}: layers whose hooks never fired: {m['collection']['never_fired']}.")
    if cfg.eigh_max_dim < 8192 or cfg.eigh_dtype != "float64":
        notes.append(
            f"Eigendecompositions in {cfg.eigh_dtype} for factors up to {cfg.eigh_max_dim}, float32 above "
            "(--eigh-dtype, --eigh-max-dim); factors are accumulated in "
            f"{cfg.accumulate_dtype}, so eigenvalues below about 1e-6 of the largest carry rounding noise."
        )
    return notes


def describe_fisher(cfg: KFACConfig) -> str:
    """One sentence describing the curvature that was computed."""
    kind = "EK-FAC (eigenvalue-corrected, George et al. 2018)" if cfg.ekfac else "K-FAC (Martens & Grosse 2015)"
    fisher = "empirical Fisher (data targets)" if cfg.fisher == "empirical" else f"MC Fisher ({cfg.mc_samples} draws)"
    damp = f"damping {cfg.damping:g} ({cfg.damping_mode})"
    # The memory plan chooses G per layer (docs/concepts.md#memory-plan-and-module-groups): the budget is not
    # applied to every layer above the threshold, only where a dense G does not fit (or the layer is named).
    low = f"G dense, or for out > {cfg.lowrank_threshold} exact low-rank U Uᵀ while the tokens are below out" + (
        f"; a budget of {cfg.lowrank_max_rank} eigenpairs plus an isotropic tail only where a dense G does not fit "
        "in max_memory or the layer is named by lowrank_layers (see the plan)"
        if cfg.lowrank_max_rank
        else ""
    )
    return f"{kind} of the {fisher}, {cfg.approx} approximation, {damp}, {low}."


GRADIENT_TEXT = (
    "mean-loss gradient (1/N) Σ_t ĝ_t a_tᵀ over the analysed data with the data targets (whatever the Fisher type), "
    "computed in a separate forward/backward pass from each layer's own inputs and output gradients (for a tied "
    "lm_head: the output-layer use); the natural gradient is (F + damping)⁻¹ g under the configured damping."
)


def model_entry(
    index: int,
    lm: LoadedModel,
    tb: TextBatches,
    grad: Any,
    collection: dict[str, Any],
    rows: Mapping[str, dict[str, Any]],
    factor_file: str | None,
) -> dict[str, Any]:
    """The report's entry of one analysed model (``report.json["models"][i]``), without its timings."""
    params = next(lm.model.parameters())
    return {
        "index": index,
        "name": lm.source.name,
        "source": lm.source.spec if lm.source.kind != "default" else f"{lm.source.location}/{lm.source.gguf_file}",
        "kind": lm.source.kind,
        "model_class": type(lm.model).__name__,
        "dtype": str(params.dtype).replace("torch.", ""),
        "device": str(params.device),
        "factor_file": factor_file,
        "loss": grad.loss,
        "perplexity": math.exp(grad.loss) if grad.loss < 700 else None,
        "loss_terms": grad.loss_terms,
        "tokens": grad.tokens,
        "data": {
            "sources": tb.sources,
            "tokens": tb.tokens,
            "sequences": tb.num_sequences,
            "batches": len(tb.batches),
            "fingerprint_sha256": tb.fingerprint,
        },
        "collection": collection,
        "totals": totals(dict(rows)),
        "highlights": highlights(dict(rows)),
        "timings_s": {},
        "layers": dict(rows),
    }
