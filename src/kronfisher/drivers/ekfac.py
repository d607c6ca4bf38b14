"""The EK-FAC correction pass (George et al. 2018): re-estimate eigenvalues in the Kronecker eigenbasis."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from ..collection.corrector import EigenCorrector
from ..collection.hooks import Capture
from ..collection.passes import run_pass
from ..collection.reduce import reduce_corrector
from ..collection.replay import Replay
from ..comm import unwrap_model
from ..operator import KFAC
from ..report import CollectionReport


def correct(
    fisher: KFAC,
    model: nn.Module,
    batches: Iterable[Any],
    *,
    loss_fn: Any = None,
    progress: bool = False,
    replay: Replay | None = None,
) -> KFAC:
    """Run the EK-FAC pass over ``batches`` and install the corrected eigenvalues into ``fisher`` (in place).

    ``replay``: the hidden states a grouped run keeps across its passes
    (:func:`~kronfisher.collection.passes.run_pass`).
    """
    cfg = fisher.cfg
    blocks = fisher.blocks
    model = unwrap_model(model)  # DDP: plain names, no DDP forward or gradient hooks
    modules = dict(model.named_modules())
    infos = {n: fisher.infos[n] for n in blocks}
    corrector = EigenCorrector(infos, blocks, cfg)
    cap = Capture({n: modules[n] for n in blocks}, infos, corrector, cfg.on_nonfinite)
    report = CollectionReport()
    # MC targets are seeded by (seed, global batch index): the K-FAC pass's draws, whatever the split over ranks.
    run_pass(
        model,
        batches,
        cap,
        cfg,
        report,
        loss_fn=loss_fn,
        progress="EK-FAC eigenvalues" if progress else None,
        replay=replay,
    )
    reduce_corrector(corrector)  # the ranks' sums and counts, once per pass; no-op on one process
    fisher.set_blocks(corrector.blocks_out())
    fisher.report.warnings.extend(report.warnings + corrector.placement.messages)
    return fisher
