"""The batch loop shared by collection, the EK-FAC pass and the report's gradient pass."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import Tensor, nn
from tqdm.auto import tqdm

from ..comm import global_indices, is_main_process
from ..config import KFACConfig
from ..errors import ConfigError
from ..layers import Discovery
from ..report import CollectionReport
from .collector import FactorCollector
from .cut import BlockCut
from .forward import activation_only_backward, eval_mode, model_device, model_inputs, to_device
from .hooks import Capture
from .inputs import check_lm_batch, loss_without_grad, vocab_sizes
from .lossterms import MCDraws, lm_terms, mc_generator, summed_ce
from .replay import Replay, batch_fingerprint
from .tied import find_tied, note_tied

logger = logging.getLogger("kronfisher")

LossFn = Callable[[nn.Module, Any], tuple[Tensor, Mapping[str, Any]]]
"""A user loss: ``loss_fn(model, batch) -> (summed loss, LM terms)`` (docs/library.md)."""


def commit_batch(cap: Capture, index: int, report: CollectionReport) -> bool:
    """Commit the staged batch; a batch dropped for non-finite values goes into ``report`` at once.

    So checkpoints and the end-of-pass merge over ranks see it (docs/distributed.md).
    """
    ok = cap.commit(index)
    if not ok and cap.nonfinite_batches and cap.nonfinite_batches[-1][0] == index:
        report.nonfinite_batches.append(cap.nonfinite_batches[-1])
    return ok


def run_batch(
    model: nn.Module,
    batch: Any,
    cap: Capture,
    cfg: KFACConfig,
    index: int,
    report: CollectionReport,
    loss_fn: LossFn | None = None,
) -> bool:
    """One forward and the backward(s) of one batch, then the checked commit. Returns False if skipped.

    Args:
        model: the model (unwrapped).
        batch: a causal-LM mapping, or anything ``loss_fn`` accepts.
        cap: the armed capture.
        cfg: configuration (Fisher type, MC draws, ignore index, seed).
        index: global index of the batch (reports, errors and the MC seed,
            :func:`~kronfisher.collection.lossterms.mc_generator`).
        report: updated with this batch's counts and summed data loss.
        loss_fn: optional user loss (empirical Fisher only).

    """
    batch = to_device(batch, model_device(model))
    if loss_fn is not None:
        if cfg.fisher != "empirical":
            raise ConfigError("fisher='mc' needs logits: use a causal-LM batch (no loss_fn) for the MC Fisher.")
        loss, info = loss_fn(model, batch)
        if not (isinstance(loss, Tensor) and loss.requires_grad):
            cap.discard()  # the forward's hooked inputs; nothing was staged
            raise loss_without_grad(loss, batch, index)
        n = int(info["num_terms"])
        mask = info.get("attention_mask")
        t = int(mask.sum()) if mask is not None else 1
        if n == 0 or t == 0:
            report.empty_batches.append(index)
            cap.discard()
            return False
        reduction = info.get("reduction", cfg.loss_reduction)
        scale = float(n) if reduction == "mean" else 1.0
        cap.backward(loss, batch=index, grad_scale=scale, num_terms=n, attention_mask=mask)
        ok = commit_batch(cap, index, report)
        if ok:
            report.add_batch(n, float(loss.detach()) * scale, t if mask is not None else 0)
        return ok
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise ConfigError(f"Batch {index}: expected a mapping with 'input_ids' (or pass loss_fn).")
    vocab, classes = vocab_sizes(model)  # before the forward: a bad batch never reaches the model or the sums
    batch = check_lm_batch(batch, index, vocab=vocab, classes=classes, ignore_index=cfg.ignore_index)
    fwd = model_inputs(model, batch)
    logits = model(**fwd).logits
    terms = lm_terms(logits, batch, cfg.ignore_index)
    if terms.num_terms == 0 or terms.num_tokens == 0:
        report.empty_batches.append(index)
        logger.info("Batch %d has no loss terms or no attended tokens; it contributes nothing.", index)
        cap.discard()
        return False
    draws = cfg.mc_samples if cfg.fisher == "mc" else 1
    mc = None
    if cfg.fisher == "mc":
        generator = mc_generator(cfg.seed, index, terms.logits.device)
        mc = MCDraws(terms.logits, terms.targets, generator)
    data_loss = None if mc is None else mc.data_loss
    for d in range(draws):
        loss = summed_ce(terms.logits, terms.targets if mc is None else mc.sample())
        data_loss = loss.detach() if mc is None else data_loss
        cap.backward(
            loss,
            batch=index,
            grad_scale=1.0,
            num_terms=terms.num_terms,
            attention_mask=terms.attention_mask,
            retain_graph=d < draws - 1,
        )
    ok = commit_batch(cap, index, report)
    if ok:
        report.add_batch(terms.num_terms * draws, float(data_loss) * draws, terms.num_tokens)
    return ok


BatchDone = Callable[[int, int, Any], None]
"""Called after each batch of a pass with ``(batches consumed so far, global batch index, batch)``."""


def run_pass(
    model: nn.Module,
    batches: Iterable[Any],
    cap: Capture,
    cfg: KFACConfig,
    report: CollectionReport,
    *,
    loss_fn: LossFn | None = None,
    progress: str | None = None,
    start: int = 0,
    on_batch: BatchDone | None = None,
    replay: Replay | None = None,
) -> None:
    """THE batch loop: every pass over the data (K-FAC collection, EK-FAC correction, the report's gradient).

    The model is put in eval mode with activation-only backward for the pass, ``cap`` is armed, and each batch runs
    through :func:`run_batch` under its global index (so MC seeds and reports do not depend on the split over
    ranks, docs/distributed.md). When every hooked layer lies in blocks ``k..`` of the model, the backward stops at
    the input of block ``k`` (:class:`~kronfisher.collection.cut.BlockCut`; a batch that breaks it is re-run
    without it). With ``replay`` (a grouped run) the pass keeps the inputs of later groups' cut blocks and starts
    at its own cut block from a state kept for the batch (:mod:`~kronfisher.collection.replay`).

    Args:
        model: the unwrapped model.
        batches: this process's batches (a :class:`~kronfisher.comm.Shard` under ``torchrun``).
        cap: the capture with the pass's processor (collector, corrector, gradient).
        cfg: configuration (Fisher type, draws, ignore index, seed).
        report: counts of committed batches, dropped batches.
        loss_fn: optional user loss (empirical Fisher only).
        progress: a progress-bar label, or None for none.
        start: skip the first ``start`` batches (already in resumed sums).
        on_batch: called after each processed batch.
        replay: the hidden states kept across the passes of a grouped run, or None.

    """
    index_of = global_indices(batches)
    cut = BlockCut(model, cap.modules, replay)
    with eval_mode(model), activation_only_backward(model, cut), cap:
        for k, batch in enumerate(with_progress(batches, progress is not None, progress or "")):
            if k < start:
                continue
            index = index_of(k)
            step = functools.partial(run_batch, model, batch, cap, cfg, index, report, loss_fn)
            cut.run(step, cap.discard, index, None if replay is None else batch_fingerprint(batch))
            if on_batch is not None:
                on_batch(k + 1, index, batch)


def finish_report(
    report: CollectionReport,
    discovery: Discovery,
    fired: set[str],
    cap: Capture,
    *,
    model: nn.Module | None = None,
    collector: FactorCollector | None = None,
) -> None:
    """Record what a finished pass learnt besides its counts: fallbacks, tied weights, skipped and silent layers."""
    if collector is not None:  # factors moved to CPU by a real out-of-memory error
        report.warnings.extend(m for m in collector.placement.messages if m not in report.warnings)
    if model is not None:  # tied lm_head / embedding, recorded in report.tied and warned once
        note_tied(report, find_tied(model, discovery.infos))
    report.skipped_layers.update(discovery.skipped)
    missing = [n for n in discovery.infos if n not in fired]
    if missing:
        logger.warning("Tracked layers whose hooks never fired (no factors): %s", missing)
    report.never_fired = missing


def with_progress(batches: Iterable[Any], enabled: bool, desc: str) -> Iterable[Any]:
    """Wrap ``batches`` in a progress bar on the main process when ``enabled``."""
    if not enabled or not is_main_process():  # one progress bar under torchrun, not one per rank
        return batches

    return tqdm(batches, desc=desc, unit="batch")
