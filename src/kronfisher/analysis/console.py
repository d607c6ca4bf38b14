"""Status lines and progress bars of ``kronfisher analyze`` (on stderr; rank 0 only under ``torchrun``)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

from torch import Tensor
from tqdm.auto import tqdm

from ..comm import Shard


class Console:
    """Status lines and token progress bars on stderr (silent with ``quiet``)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def info(self, msg: str) -> None:
        """One status line."""
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    def bar(self, total: float, desc: str, unit: str = "tok", initial: float = 0) -> Any:
        """A tqdm bar with rate and ETA (a no-op object when quiet)."""
        if self.quiet:
            return _NoBar()

        return tqdm(
            total=total,
            desc=desc,
            unit=unit,
            unit_scale=unit == "tok",
            initial=initial,
            dynamic_ncols=True,
            file=sys.stderr,
        )


class _NoBar:
    def update(self, n: float = 1) -> None:
        pass

    def close(self) -> None:
        pass


class Tracked:
    """The batches of this rank, advancing ``bar`` by each batch's attended tokens once it has been processed.

    Keeps the shard's global batch indices visible (``global_index``), on which MC seeds depend (docs/distributed.md).
    """

    def __init__(self, shard: Shard, bar: Any) -> None:
        self.shard = shard
        self.bar = bar
        self.global_index = shard.global_index

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        for b in self.shard:
            yield b
            self.bar.update(int(b["attention_mask"].sum()))


def silence_transformers() -> None:
    """No progress bars or info logs from transformers / huggingface_hub (``--quiet``)."""
    try:
        from transformers.utils import logging as hf_logging  # noqa: PLC0415 (optional dependency, imported when used)

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - transformers is needed to load models anyway
        pass
