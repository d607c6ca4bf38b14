"""The EK-FAC correction pass (George et al. 2018): re-estimate eigenvalues in the Kronecker eigenbasis."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from ..collection.corrector import EigenCorrector
from ..collection.forward import activation_only_backward, eval_mode
from ..collection.hooks import Capture
from ..collection.lossterms import PASS_EKFAC
from ..collection.passes import run_batch, with_progress
from ..collection.reduce import reduce_corrector
from ..comm import global_indices, unwrap_model
from ..operator import KFAC
from ..report import CollectionReport


def correct(
    fisher: KFAC,
    model: nn.Module,
    batches: Iterable[Any],
    *,
    loss_fn: Any = None,
    progress: bool = False,
) -> KFAC:
    """Run the EK-FAC pass over ``batches`` and install the corrected eigenvalues into ``fisher`` (in place)."""
    cfg = fisher.cfg
    blocks = fisher.blocks
    model = unwrap_model(model)  # DDP: plain names, no DDP forward or gradient hooks (SPEC §8)
    modules = dict(model.named_modules())
    infos = {n: fisher.infos[n] for n in blocks}
    corrector = EigenCorrector(infos, blocks, cfg)
    cap = Capture({n: modules[n] for n in blocks}, infos, corrector, cfg.on_nonfinite)
    report = CollectionReport()
    index_of = global_indices(batches)  # MC targets seeded by (seed, pass, global batch index): SPEC §8
    with eval_mode(model), activation_only_backward(model), cap:
        for k, batch in enumerate(with_progress(batches, progress, "EK-FAC eigenvalues")):
            run_batch(model, batch, cap, cfg, index_of(k), report, loss_fn, pass_id=PASS_EKFAC)
    reduce_corrector(corrector)  # SPEC §8: the ranks' sums and counts, once per pass; no-op on one process
    fisher.set_blocks(corrector.blocks_out())
    fisher.report.warnings.extend(report.warnings)
    return fisher
