"""What a collection pass saw: token, batch and loss counts, dropped batches (docs/concepts.md)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CollectionReport:
    """What happened during collection, for the user and the report (docs/concepts.md).

    Attributes:
        skipped_layers: affine layers not tracked, with the reason.
        never_fired: tracked layers whose hooks never fired.
        empty_batches: indices of batches with ``T = 0`` or ``N = 0``.
        nonfinite_batches: ``(batch, layers)`` for batches dropped by ``on_nonfinite="skip"``.
        tokens: attended positions seen (``T``), loss terms seen (``N``), batches committed.
        loss_sum: summed loss with the *data* targets, counted like ``loss_terms`` (with the MC Fisher, whose
            backward uses sampled targets, once per draw), so ``loss_sum / loss_terms`` is the mean data loss of
            the batches the factors describe.
        warnings: other messages (tied weights, placement).
        tied: tracked layers whose weight is also another parameter, ``{layer: [other names]}`` (docs/concepts.md).
        plan: the memory plan of the run (:meth:`~kronfisher.plan.MemoryPlan.to_dict`), or None.

    """

    skipped_layers: dict[str, str] = field(default_factory=dict)
    never_fired: list[str] = field(default_factory=list)
    empty_batches: list[int] = field(default_factory=list)
    nonfinite_batches: list[tuple[int, list[str]]] = field(default_factory=list)
    tokens: int = 0
    loss_terms: int = 0
    batches: int = 0
    loss_sum: float = 0.0
    warnings: list[str] = field(default_factory=list)
    tied: dict[str, list[str]] = field(default_factory=dict)
    plan: dict | None = None

    def add_batch(self, loss_terms: int, loss_sum: float, tokens: int) -> None:
        """Count one committed batch: its loss terms, its summed data loss (same counting) and attended tokens."""
        self.loss_terms += int(loss_terms)
        self.loss_sum += float(loss_sum)
        self.tokens += int(tokens)
        self.batches += 1

    def counts(self) -> list[float]:
        """The additive counts, in the order :meth:`set_counts` takes them (reductions over ranks)."""
        return [self.tokens, self.loss_terms, self.batches, self.loss_sum]

    def set_counts(self, values: list[float]) -> None:
        """Install totals produced from :meth:`counts` (e.g. summed over ranks)."""
        self.tokens, self.loss_terms, self.batches = (int(v) for v in values[:3])
        self.loss_sum = float(values[3])

    def merge(self, other: CollectionReport) -> None:
        """Add the counts and warnings of a report over disjoint data (merged files)."""
        self.set_counts([a + b for a, b in zip(self.counts(), other.counts())])
        self.warnings.extend(w for w in other.warnings if w not in self.warnings)

    def to_dict(self) -> dict:
        """JSON-serialisable form."""
        return {
            "skipped_layers": dict(self.skipped_layers),
            "never_fired": list(self.never_fired),
            "empty_batches": list(self.empty_batches),
            "nonfinite_batches": [[b, list(ls)] for b, ls in self.nonfinite_batches],
            "tokens": self.tokens,
            "loss_terms": self.loss_terms,
            "batches": self.batches,
            "loss_sum": self.loss_sum,
            "warnings": list(self.warnings),
            "tied": {k: list(v) for k, v in self.tied.items()},
            "plan": self.plan,
        }
