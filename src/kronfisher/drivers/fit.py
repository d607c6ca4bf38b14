"""``kf.fit`` and ``kf.capture``: drive the capture over batches (docs/concepts.md).

``fit`` runs exactly one forward and one backward per batch in the K-FAC pass (``mc_samples`` backward passes for
the MC Fisher), computes no parameter gradient when it can avoid it (parameters are frozen for the pass and the
backward starts from the input embeddings), and leaves the model's ``.grad``, ``requires_grad`` flags and
train/eval mode as it found them. ``capture`` is the user-driven loop: the user computes the loss, kronfisher
only hooks in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ..collection.collector import FactorCollector
from ..collection.forward import model_device
from ..collection.hooks import Capture
from ..collection.passes import LossFn, commit_batch, finish_report, run_pass
from ..collection.placement import columns_like
from ..collection.reduce import reduce_collection
from ..collection.replay import Replay
from ..collection.sums import LayerSums
from ..comm import unwrap_model
from ..config import KFACConfig
from ..errors import ConfigError, NoFactorsError
from ..layers import Discovery
from ..operator import KFAC
from ..plan import MemoryPlan
from ..report import CollectionReport
from .planning import plan_run, tracked_layers

logger = logging.getLogger("kronfisher")


@dataclass
class CollectState:
    """Where an interrupted K-FAC pass stopped (docs/files.md): sums, report and batches consumed.

    MC targets are seeded per batch (:func:`~kronfisher.collection.lossterms.mc_generator`), so no generator state is
    needed to draw, after the resume, what the uninterrupted run would have drawn.

    Attributes:
        sums: :class:`~kronfisher.collection.sums.LayerSums` by layer, e.g. ``kf.load_sums(path).sums``.
        report: the collection report so far.
        batches_done: number of leading batches (of this process's iterable) already in ``sums``.

    """

    sums: dict[str, LayerSums]
    report: CollectionReport
    batches_done: int

    def install(self, collector: FactorCollector) -> int:
        """Put the saved sums into ``collector`` (same layers required); returns the batches to skip."""
        if set(self.sums) != set(collector.sums):
            raise ConfigError(
                "Cannot resume: the saved sums cover layers "
                f"{sorted(set(self.sums) ^ set(collector.sums))} that differ from the tracked layers."
            )
        for name, saved in self.sums.items():  # sums (and low-rank U) go where the collector keeps them
            fresh = collector.sums[name]
            for which in ("A", "G"):
                mine, theirs = getattr(fresh, which), getattr(saved, which)
                if mine.kind == theirs.kind == "dense":
                    theirs.sum = theirs.sum.to(mine.sum.device)
                elif mine.kind == theirs.kind == "lowrank":
                    columns_like(theirs, mine)
                    # the plan's budget (None: exact) and the dtype of its [m, m] work, as the uninterrupted pass
                    theirs.max_rank, theirs.buffer, theirs.gram_dtype = mine.max_rank, mine.buffer, mine.gram_dtype
            collector.sums[name] = saved
        return int(self.batches_done)


BatchEnd = Callable[[int, int, FactorCollector, CollectionReport], None]


def collect(
    model: nn.Module,
    batches: Iterable[Any],
    cfg: KFACConfig,
    *,
    loss_fn: LossFn | None = None,
    progress: bool = False,
    resume: CollectState | None = None,
    on_batch_end: BatchEnd | None = None,
    plan: MemoryPlan | None = None,
    layers: Sequence[str] | None = None,
    check: bool = True,
    replay: Replay | None = None,
) -> tuple[Discovery, FactorCollector, CollectionReport]:
    """The K-FAC pass: sums and counts for every tracked layer, or for one group of them (no decomposition).

    Args:
        model: the model (see :func:`fit`).
        batches: an iterable of batches; under ``torchrun`` this rank's
            :class:`~kronfisher.distributed.Shard` (batch indices in reports and MC seeds are then global).
        cfg: configuration.
        loss_fn: optional user loss (empirical Fisher only).
        progress: show a progress bar.
        resume: continue an interrupted pass (docs/files.md): start from these sums and report and skip the first
            ``resume.batches_done`` batches of ``batches`` (they are already in the sums). Under ``torchrun`` each
            rank resumes from its own state, before the end-of-pass reduction.
        on_batch_end: called after every processed batch with ``(batches_done, index, collector, report)``:
            the number of this process's batches consumed so far, the global index of the batch just processed,
            and the (local, unreduced) sums and report, for example to checkpoint them with
            :func:`kronfisher.save_sums` (``local=True`` under ``torchrun``).
        plan: the memory plan (each layer's ``G`` and where a low-rank ``U`` lives); default: :func:`plan_run`.
        layers: hook only these tracked layers (one group of the plan); default: every tracked layer.
        check: raise :class:`~kronfisher.errors.NoFactorsError` when no layer got factors (a group of a larger
            run checks nothing: its layers may all be unused while other groups' are not).
        replay: the hidden states a grouped run keeps across its passes
            (:func:`~kronfisher.collection.passes.run_pass`).

    """
    model = unwrap_model(model)  # DDP: plain names, no DDP forward or gradient hooks
    discovery = tracked_layers(model, cfg)
    plan = plan or plan_run(model, discovery, batches, cfg)
    if layers is not None:
        keep = [n for n in discovery.infos if n in set(layers)]
        modules = {n: discovery.modules[n] for n in keep}
        discovery = Discovery(modules, {n: discovery.infos[n] for n in keep}, discovery.skipped)
    host, lowrank = plan.host_columns(), plan.lowrank()
    collector = FactorCollector(discovery.infos, cfg, device=model_device(model), host_columns=host, lowrank=lowrank)
    report = CollectionReport(plan=plan.to_dict())
    start = 0
    if resume is not None:
        start = resume.install(collector)
        report = resume.report
    cap = Capture(discovery.modules, discovery.infos, collector, cfg.on_nonfinite)
    done = None if on_batch_end is None else (lambda k, i, _batch: on_batch_end(k, i, collector, report))
    run_pass(
        model,
        batches,
        cap,
        cfg,
        report,
        loss_fn=loss_fn,
        progress="K-FAC factors" if progress else None,
        start=start,
        on_batch=done,
        replay=replay,
    )
    fired = cap.fired | {n for n, s in collector.sums.items() if s.A.count > 0}  # incl. batches before a resume
    fired = reduce_collection(collector.sums, report, fired)  # once per pass; no-op on one process
    if check:
        check_factors(collector.sums, report, seen=None)
    finish_report(report, discovery, fired, cap, model=model, collector=collector)
    return discovery, collector, report


def check_factors(sums: dict[str, LayerSums], report: CollectionReport, seen: int | None) -> None:
    """Raise :class:`NoFactorsError` naming why when no layer has both factors (an empty operator is no answer).

    Decided on the sums after the reduction over ranks, so every rank of a ``torchrun`` job agrees.

    Args:
        sums: the (reduced) sums by layer.
        report: the collection report (its dropped and empty batches say why).
        seen: batches handed to the collection, when known (``capture``), else None.

    """
    if any(s.A.count > 0 and s.G.count > 0 for s in sums.values()):
        return
    empty, dropped = sorted(report.empty_batches), sorted(b for b, _ in report.nonfinite_batches)
    if report.batches > 0:
        why = (
            f"{report.batches} batch(es) ran, but no tracked layer took part in the loss (the hooks never fired: the "
            "tracked layers are not on the path from the inputs to the loss)"
        )
    elif not empty and not dropped:
        why = "no batches: the batch list is empty" if seen is None else "backward() was never called"
    else:
        parts = []
        if empty:
            parts.append(
                f"batch(es) {_few(empty)} have no attended token with a loss term (all padding, every label "
                "= ignore_index, or sequences of one token, which have no next token to predict)"
            )
        if dropped:
            parts.append(f"batch(es) {_few(dropped)} were skipped as non-finite (on_nonfinite='skip')")
        why = "; ".join(parts)
    raise NoFactorsError(f"No factors were collected for any layer: {why}.")


def _few(indices: list[int], n: int = 8) -> str:
    """``[0, 1, 2]`` or ``[0, 1, …] (12 in all)``."""
    if len(indices) <= n:
        return str(indices)
    return f"[{', '.join(map(str, indices[:n]))}, …] ({len(indices)} in all)"


class CaptureSession:
    """User-driven collection: ``with kf.capture(model, cfg) as cap: ...; cap.backward(loss, ...)``.

    The user runs the forward and computes the loss; :meth:`backward` runs the ordinary backward (so ``.grad`` is
    populated as usual) with the hooks staging factor contributions, then commits them after the non-finite check.
    No extra forward pass happens.
    """

    def __init__(self, model: nn.Module, cfg: KFACConfig | None = None) -> None:
        self.model = model = unwrap_model(model)
        self.cfg = cfg or KFACConfig()
        self.discovery = tracked_layers(model, self.cfg)
        self.plan = plan = plan_run(model, self.discovery, None, self.cfg)  # T unknown: dense G wherever it fits
        kw = {"host_columns": plan.host_columns(), "lowrank": plan.lowrank()}
        self.collector = FactorCollector(self.discovery.infos, self.cfg, device=model_device(model), **kw)
        self.report = CollectionReport(plan=plan.to_dict())
        self._cap = Capture(self.discovery.modules, self.discovery.infos, self.collector, self.cfg.on_nonfinite)
        self._index = 0
        self._reduced = False
        self._fired: set[str] = set()

    def __enter__(self) -> CaptureSession:
        self._cap.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._cap.__exit__(*exc)

    def backward(
        self,
        loss: Tensor,
        *,
        num_terms: int,
        reduction: str | None = None,
        attention_mask: Tensor | None = None,
        retain_graph: bool = False,
    ) -> bool:
        """Backward of a loss the user computed; factors get this batch's contributions.

        Args:
            loss: the scalar loss of the batch.
            num_terms: number of loss terms ``N`` in it (docs/concepts.md).
            reduction: ``"mean"`` or ``"sum"`` (default: ``cfg.loss_reduction``); never guessed.
            attention_mask: ``[B, S]`` mask of attended positions (None: all positions).
            retain_graph: passed to ``backward``.

        Returns:
            True when committed; False for an empty or dropped batch.

        """
        reduction = reduction or self.cfg.loss_reduction
        if reduction not in ("mean", "sum"):
            raise ConfigError(f"Invalid reduction: {reduction!r}. Supported: 'mean', 'sum'.")
        index = self._index
        self._index += 1
        t = int(attention_mask.sum()) if attention_mask is not None else None
        if num_terms <= 0 or t == 0:
            self.report.empty_batches.append(index)
            self._cap.discard()
            return False
        scale = float(num_terms) if reduction == "mean" else 1.0
        self._cap.backward(
            loss,
            batch=index,
            grad_scale=scale,
            num_terms=num_terms,
            attention_mask=attention_mask,
            retain_graph=retain_graph,
        )
        ok = commit_batch(self._cap, index, self.report)
        if ok:
            self.report.add_batch(int(num_terms), float(loss.detach()) * scale, t if t is not None else 0)
        return ok

    def finalize(self) -> KFAC:
        """Decompose what was collected into a :class:`~kronfisher.operator.KFAC`.

        Raises:
            NoFactorsError: no layer received a factor (no backward, or every batch empty or dropped).

        """
        if not self._reduced:  # merge the ranks' sums once, however often finalize is called (docs/distributed.md)
            self._fired = reduce_collection(self.collector.sums, self.report, self._cap.fired)
            self._reduced = True
        check_factors(self.collector.sums, self.report, seen=self._index)
        finish_report(self.report, self.discovery, self._fired, self._cap, model=self.model, collector=self.collector)
        return KFAC.from_sums(
            self.discovery.infos, self.collector.sums, self.cfg, report=self.report, model=self.model, spread=True
        )


def capture(model: nn.Module, cfg: KFACConfig | None = None) -> CaptureSession:
    """Start a user-driven collection (docs/library.md)."""
    return CaptureSession(model, cfg)
