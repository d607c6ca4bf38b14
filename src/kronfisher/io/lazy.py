"""Layers read from a factor file on first use, optionally within a byte limit (docs/files.md)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, MutableMapping
from typing import TypeVar

V = TypeVar("V")


class LazyLayers(MutableMapping[str, V]):
    """A mapping layer name -> value whose values are loaded by ``loader`` on first access and then kept.

    Membership, iteration and ``len`` never load anything. Assigning a value replaces (or adds) it without
    reading the file; assigned values are always kept. Used for the blocks and sums of a loaded factor file
    (layers load lazily).

    With ``limit`` (bytes, measured by ``size``), loaded values are kept only while their sizes add up to at most
    ``limit``: the least recently used ones are dropped first and read again when next needed, so an operator
    larger than memory can be used one layer at a time (docs/files.md).
    """

    def __init__(
        self,
        names: Iterable[str],
        loader: Callable[[str], V],
        *,
        limit: int | None = None,
        size: Callable[[V], int] | None = None,
    ) -> None:
        if limit is not None and size is None:
            raise ValueError("LazyLayers: a limit needs a size function.")
        self._names = list(names)
        self._known = set(self._names)
        self._loader = loader
        self._cache: dict[str, V] = {}  # insertion order is the use order (least recent first)
        self._pinned: set[str] = set()
        self._limit, self._size = limit, size
        self._bytes: dict[str, int] = {}

    def __getitem__(self, key: str) -> V:
        if key in self._cache:
            value = self._cache.pop(key)
            self._cache[key] = value  # most recently used last
            return value
        if key not in self._known:
            raise KeyError(key)
        value = self._loader(key)
        if self._limit is not None and self._size is not None:
            self._bytes[key] = self._size(value)
            self._make_room(self._bytes[key])
        self._cache[key] = value
        return value

    def _make_room(self, need: int) -> None:
        """Drop the least recently used loaded (not assigned) values until ``need`` more bytes fit the limit."""
        assert self._limit is not None
        held = sum(self._bytes.get(k, 0) for k in self._cache)
        for key in [k for k in self._cache if k not in self._pinned]:
            if held + need <= self._limit:
                break
            held -= self._bytes.pop(key, 0)
            del self._cache[key]

    def __setitem__(self, key: str, value: V) -> None:
        if key not in self._known:
            self._names.append(key)
            self._known.add(key)
        self._cache.pop(key, None)
        self._cache[key] = value
        self._pinned.add(key)  # an assigned value is not in the file: never dropped

    def __delitem__(self, key: str) -> None:
        if key not in self._known:
            raise KeyError(key)
        self._known.discard(key)
        self._names.remove(key)
        self._cache.pop(key, None)
        self._pinned.discard(key)
        self._bytes.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return key in self._known

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._names))

    def __len__(self) -> int:
        return len(self._names)

    @property
    def loaded(self) -> list[str]:
        """Names whose values are in memory."""
        return [n for n in self._names if n in self._cache]

    def __repr__(self) -> str:
        return f"LazyLayers({len(self._names)} layers, {len(self._cache)} loaded)"
