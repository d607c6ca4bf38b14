"""Distributed collection for users: the names a ``torchrun`` script imports (docs/distributed.md).

Each rank collects on its own :class:`Shard` of the batches; sums and counts are reduced once at the end of a pass,
so the result equals one process over the union of the data.
"""

from __future__ import annotations

from .collection.reduce import reduce_collection, reduce_corrector
from .comm import (
    Shard,
    all_reduce_tensors,
    barrier,
    broadcast_object,
    get_rank,
    get_world_size,
    global_indices,
    is_distributed,
    is_main_process,
    unwrap_model,
)

__all__ = [
    "Shard",
    "all_reduce_tensors",
    "barrier",
    "broadcast_object",
    "get_rank",
    "get_world_size",
    "global_indices",
    "is_distributed",
    "is_main_process",
    "reduce_collection",
    "reduce_corrector",
    "unwrap_model",
]
