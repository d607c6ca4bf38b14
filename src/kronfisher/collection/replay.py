"""Start a late group's passes at its cut block, from hidden states an earlier pass kept (docs/concepts.md).

A group whose hooked layers all lie in blocks ``k..`` needs blocks ``0..k-1`` only for the hidden state entering
block ``k`` (:mod:`~kronfisher.collection.cut`). That state is the same in every pass over a batch: the model is
in eval mode and its weights do not change. So the first pass of a grouped run keeps, per batch, the input of
each later group's cut block; the later groups' passes then run blocks ``0..k-1`` as pass-throughs and put the
kept state in at block ``k``. The factors are the unpartitioned run's, bit for bit (the same numbers enter the
same arithmetic), and each late pass saves the forward of ``k`` blocks.

Nothing is assumed: a state is used only for the batch it was kept for (a fingerprint of the batch's tensors),
only when block ``k - 1`` returns a plain tensor (what a pass-through returns), and only when the state arriving
at block ``k`` has the kept one's shape; otherwise the batch runs in full. Kept states are bounded (``limit``
bytes, in host memory): past it, later batches simply run in full.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor


def batch_fingerprint(batch: Any) -> bytes | None:
    """A digest of a batch's tensors and scalars (by key or position); None for a batch of another kind."""
    if isinstance(batch, Mapping):
        items = sorted(((str(k), v) for k, v in batch.items()), key=lambda kv: kv[0])
    elif isinstance(batch, (tuple, list)):
        items = [(str(i), v) for i, v in enumerate(batch)]
    else:
        return None
    digest = hashlib.blake2b(digest_size=16)
    for key, value in items:
        digest.update(key.encode())
        if isinstance(value, Tensor):
            t = value.detach().to("cpu").contiguous()
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, (int, float, str, bool)) or value is None:
            digest.update(repr(value).encode())
        else:
            return None  # something the digest cannot see: never replay this batch
    return digest.digest()


class Replay:
    """Hidden states at the cut blocks of later groups, kept by the first pass over each batch.

    Args:
        starts: cut blocks of the groups that will run later (0 is never one: nothing to skip).
        limit: bytes of kept states at most (host memory).

    """

    def __init__(self, starts: Iterable[int], limit: int) -> None:
        self.starts = sorted({int(s) for s in starts if int(s) > 0})
        self.limit = int(limit)
        self.states: dict[tuple[int, int], tuple[bytes, Tensor]] = {}
        self.plain: dict[int, bool] = {}  # block k - 1 returned a plain tensor on every kept batch
        self.bytes = 0
        self.replayed = 0  # batches a late pass started at its cut block

    def keep(self, start: int, index: int, fingerprint: bytes | None, hidden: Tensor) -> None:
        """Keep ``hidden``, the input of block ``start`` for batch ``index``, unless kept already or over the limit."""
        if fingerprint is None or (start, index) in self.states:
            return
        size = hidden.numel() * hidden.element_size()
        if self.bytes + size > self.limit:
            return
        self.states[(start, index)] = (fingerprint, hidden.detach().to("cpu", copy=True))
        self.bytes += size

    def saw_output(self, start: int, output: Any) -> None:
        """Block ``start - 1`` returned ``output``: pass-throughs stand in for it only if it is a plain tensor."""
        self.plain[start] = self.plain.get(start, True) and isinstance(output, Tensor)

    def summary(self) -> str:
        """One line for the log: how many batch passes started at a cut block so far, from how many kept bytes."""
        return (
            f"{self.replayed} batch passes of later groups so far started at their cut block from "
            f"{self.bytes / 2**20:.1f} MiB of kept hidden states."
        )

    def state(self, start: int, index: int, fingerprint: bytes | None) -> Tensor | None:
        """The kept input of block ``start`` for this batch, or None (the batch runs in full)."""
        kept = self.states.get((start, index))
        if kept is None or fingerprint is None or kept[0] != fingerprint or not self.plain.get(start, False):
            return None
        return kept[1]


def pass_through(original: Any, replaying: Any) -> Any:
    """A block's ``forward`` that returns its input hidden state while ``replaying()``, else runs ``original``."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        if not replaying():
            return original(*args, **kwargs)
        if args and isinstance(args[0], Tensor):
            return args[0]
        return kwargs["hidden_states"]

    return forward
