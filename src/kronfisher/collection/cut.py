"""Stop a pass's backward at the earliest decoder block holding a hooked layer (docs/concepts.md, module groups).

A pass needs the output gradient of its hooked layers only. When every hooked layer lies in blocks ``k..`` of the
model's block list, the input hidden state of block ``k`` is made the grad leaf instead of the input-embedding
output: blocks ``0..k-1`` then build no graph, keep no activations and get no backward. The gradient a hooked layer
receives depends only on what runs after it, so its factors are unchanged, provided its input depends on the cut
tensor; that is checked on every hooked call, and a batch that breaks it (a tracked layer before the blocks, or one
fed from outside the block stream) is re-run without the cut, which stays off for the rest of the pass.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from .replay import Replay, pass_through

logger = logging.getLogger("kronfisher")

T = TypeVar("T")


class _CutBroken(Exception):
    """Raised from a hook to abort a forward that the cut would get wrong (never leaves :meth:`BlockCut.run`)."""


def _hidden(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Tensor | None:
    """A block's input hidden state: its first positional argument or ``hidden_states`` (floating point)."""
    hidden = args[0] if args and isinstance(args[0], Tensor) else kwargs.get("hidden_states")
    return hidden if isinstance(hidden, Tensor) and hidden.is_floating_point() else None


def _tensors(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Iterator[Tensor]:
    for v in (*args, *kwargs.values()):
        if isinstance(v, Tensor):
            yield v


def find_blocks(model: nn.Module, hooked: Mapping[str, nn.Module]) -> tuple[str, nn.ModuleList] | None:
    """The model's main block list: the ``nn.ModuleList`` holding the most hooked modules.

    Ties (e.g. every hooked module in one block's expert list, which the outer list holds too) go to the
    outermost list; with no hooked module in any list, the list with the most submodules (``model.layers`` of HF
    Llama/Qwen2, ``transformer.h`` of GPT-2). None when the model has no ``nn.ModuleList``.
    """
    ids = {id(m) for m in hooked.values()}
    best: tuple[tuple[int, int, int], str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        subs = list(module.modules())
        key = (sum(id(m) in ids for m in subs), len(subs), -name.count("."))
        if best is None or key > best[0]:
            best = (key, name, module)
    return None if best is None else (best[1], best[2])


def cut_index(blocks: nn.ModuleList, hooked: Mapping[str, nn.Module]) -> int:
    """The earliest block holding a hooked module (the last block when none does: e.g. the ``lm_head`` alone)."""
    where = {id(m): i for i, block in enumerate(blocks) for m in block.modules()}
    inside = [where[id(m)] for m in hooked.values() if id(m) in where]
    return min(inside) if inside else len(blocks) - 1


class BlockCut:
    """The cut of one pass: which block's input becomes the grad leaf, and the checks that keep it exact.

    Inactive (today's behaviour: the embedding output is the leaf) when the cut block is the first one, when the
    model has no block list, before :meth:`armed`, and once a batch broke it.

    With ``replay`` (a grouped run, :mod:`~kronfisher.collection.replay`), the pass also keeps the inputs of later
    groups' cut blocks, and starts at its own cut block from the state an earlier pass kept for the batch.

    Args:
        model: the unwrapped model of the pass.
        hooked: the modules the pass hooks, by name (``Capture.modules``).
        replay: the kept hidden states of a grouped run, or None.

    """

    def __init__(self, model: nn.Module, hooked: Mapping[str, nn.Module], replay: Replay | None = None) -> None:
        self.model = model
        self.replay = replay
        self._batch: tuple[int, bytes | None] | None = None  # (global index, fingerprint) of the current batch
        self._state: Tensor | None = None  # the kept input of the cut block for the current batch
        self.hooked = dict(hooked)
        found = find_blocks(model, self.hooked) if self.hooked else None
        self.where = "" if found is None else found[0]
        self.blocks = None if found is None else found[1]
        self.index = 0 if self.blocks is None else cut_index(self.blocks, self.hooked)
        self.active = False
        self.broken: str | None = None  # why the cut was turned off during the pass
        self._seen = False  # the cut block's input was reached in the current forward

    @contextlib.contextmanager
    def armed(self) -> Iterator[BlockCut]:
        """Install the hooks and activate the cut (when it saves anything) for the duration."""
        if self.blocks is None:
            yield self
            return
        handles = self._keepers(self.blocks)
        if self.index == 0:
            try:
                yield self
            finally:
                for h in handles:
                    h.remove()
            return
        handles += [
            self.model.register_forward_pre_hook(self._start),
            self.blocks[self.index].register_forward_pre_hook(self._leaf, with_kwargs=True),
        ]
        handles += [m.register_forward_pre_hook(self._check(n), with_kwargs=True) for n, m in self.hooked.items()]
        stubs = self._pass_throughs(self.blocks)
        self.active = True
        logger.info(
            "Backward stops at the input of %s.%d (%d of %d blocks skipped): no hooked layer below it.",
            self.where,
            self.index,
            self.index,
            len(self.blocks),
        )
        try:
            yield self
        finally:
            self.active = False
            for h in handles:
                h.remove()
            for block, before in stubs:  # the blocks' own forward again (or the wrapper an earlier tool installed)
                if before is None:
                    del block.forward
                else:
                    block.forward = before
            if stubs and self.replay is not None:
                logger.info("%s", self.replay.summary())

    def _keepers(self, blocks: nn.ModuleList) -> list[Any]:
        """Hooks keeping the inputs of later groups' cut blocks (and whether the block before returns a tensor)."""
        replay = self.replay
        if replay is None:
            return []
        handles = []
        for start in (s for s in replay.starts if self.index < s < len(blocks)):

            def keep(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], start: int = start) -> None:
                hidden = _hidden(args, kwargs)
                if self._batch is not None and hidden is not None:
                    replay.keep(start, self._batch[0], self._batch[1], hidden)

            def output(module: nn.Module, args: Any, out: Any, start: int = start) -> None:
                replay.saw_output(start, out)

            handles.append(blocks[start].register_forward_pre_hook(keep, with_kwargs=True))
            handles.append(blocks[start - 1].register_forward_hook(output))
        return handles

    def _pass_throughs(self, blocks: nn.ModuleList) -> list[tuple[nn.Module, Any]]:
        """Blocks ``0..k-1`` as pass-throughs while a kept state stands in for them (the block's forward before)."""
        if self.replay is None or not self.replay.plain.get(self.index, False):
            return []
        stubs = []
        for block in list(blocks)[: self.index]:
            before = block.__dict__.get("forward")
            block.forward = pass_through(block.forward, lambda: self.active and self._state is not None)
            stubs.append((block, before))
        return stubs

    def run(
        self,
        step: Callable[[], T],
        discard: Callable[[], None],
        index: int | None = None,
        fingerprint: bytes | None = None,
    ) -> T:
        """Run one batch's ``step``; if the cut broke during it, ``discard`` what it staged and re-run it uncut.

        ``index`` and ``fingerprint`` name the batch for the kept hidden states (``replay``).
        """
        self._seen = False
        self._batch = None if index is None else (index, fingerprint)
        self._state = None
        if self.active and self.replay is not None and index is not None:
            self._state = self.replay.state(self.index, index, fingerprint)
        try:
            out = step()
            if self.replay is not None and self._state is not None:
                self.replay.replayed += 1
            return out
        except _CutBroken as why:
            discard()
            self.active = False
            self._state = None
            self.broken = str(why)
            logger.info("Backward cut turned off for the rest of the pass (the batch is re-run in full): %s", why)
        return step()

    # Hooks ------------------------------------------------------------------------------------------------
    def _start(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._seen = False  # a new forward of the model

    def _leaf(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not self.active or not torch.is_grad_enabled():
            return None
        self._seen = True
        hidden = _hidden(args, kwargs)
        if hidden is None:
            raise _CutBroken(f"the hidden state of {self.where}.{self.index} is not among its arguments")
        kept = self._state
        if kept is not None and tuple(kept.shape) != tuple(hidden.shape):
            raise _CutBroken(
                f"the kept input of {self.where}.{self.index} has shape {list(kept.shape)}, not {list(hidden.shape)}"
            )
        leaf = (hidden if kept is None else kept.to(hidden.device, hidden.dtype)).detach().requires_grad_(True)
        if args and args[0] is hidden:
            return (leaf, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": leaf}

    def _check(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if not self.active or not torch.is_grad_enabled():
                return
            if not self._seen:
                raise _CutBroken(f"layer {name!r} runs before {self.where}.{self.index}")
            if not any(t.requires_grad for t in _tensors(args, kwargs)):
                raise _CutBroken(f"the input of layer {name!r} does not depend on {self.where}.{self.index}")

        return hook
