"""``budget.return_free_memory``: freed heap pages leave the process's resident memory (glibc ``malloc_trim``).

The grouped run calls it between phases (docs/concepts.md). Reference: ``VmRSS`` of this process, read from
``/proc``, around a heap with holes (tensors below glibc's smallest mmap threshold, every tenth kept alive so that
the heap cannot shrink from its top by itself).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

import kronfisher.budget as budget

MIB = 2**20


def rss() -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", text).group(1)) * 1024  # type: ignore[union-attr]


@pytest.mark.skipif(not sys.platform.startswith("linux") or budget._LIBC is None, reason="glibc only")
def test_freed_heap_pages_leave_resident_memory() -> None:
    n = 3000  # 3,000 × 96 KiB ≈ 281 MiB, each below the 128 KiB floor of glibc's mmap threshold: heap pages
    held = [torch.ones(96 * 256) for _ in range(n)]  # 96 KiB of float32 each, written (resident)
    kept = held[9::10]
    del held
    before = rss()
    budget.return_free_memory()
    after = rss()
    assert before - after >= 150 * MIB, (before / MIB, after / MIB)  # ~253 MiB were free in holes of the heap
    assert all(float(t[0]) == 1.0 for t in kept)  # what is alive is untouched
