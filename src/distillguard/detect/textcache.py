"""A bounded least-recently-used map from texts to what was computed from them.

Feature extraction computes the same things again and again for the same texts:
campaigns reuse their templates and system prompts, benign users send prompts from the
same prompt sets. :class:`TextCache` keeps those results for the texts seen most
recently. The text itself is the key, so a hit is exact (no hash collision can hand one
text another's features). Memory stays bounded: at most ``entries`` texts and ``chars``
characters of keys in all; texts longer than ``chars // 256`` characters are never kept.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

V = TypeVar("V")


class TextCache(Generic[V]):
    """``text -> value`` for the most recently used texts, within a size cap."""

    __slots__ = ("_data", "entries", "chars", "size", "longest")

    def __init__(self, entries: int = 32_768, chars: int = 16_000_000) -> None:
        if entries < 0 or chars < 0:
            raise ValueError("TextCache: entries and chars must not be negative")
        self._data: OrderedDict[str, V] = OrderedDict()
        self.entries = entries
        self.chars = chars
        self.size = 0                      # characters of the keys held
        self.longest = chars // 256        # longer texts are computed, never kept

    def __len__(self) -> int:
        return len(self._data)

    def get(self, text: str) -> V | None:
        value = self._data.get(text)
        if value is not None:
            try:  # noqa: SIM105 (a try costs nothing here, a context manager does)
                self._data.move_to_end(text)
            except KeyError:  # evicted meanwhile by another thread
                pass
        return value

    def put(self, text: str, value: V) -> None:
        if len(text) > self.longest or self.entries == 0:
            return
        data = self._data
        if text in data:
            data[text] = value
            data.move_to_end(text)
            return
        data[text] = value
        self.size += len(text)
        while len(data) > self.entries or self.size > self.chars:
            old, _ = data.popitem(last=False)
            self.size -= len(old)

    def resolve(self, keys: Iterable[str], compute: Callable[[list[str]], list[V]]
                ) -> dict[str, V]:
        """``text -> value`` for every text in ``keys``: from the cache, else computed for
        the distinct missing texts in one call to ``compute`` (and kept)."""
        found: dict[str, V] = {}
        missing: dict[str, None] = {}
        get = self.get
        for key in keys:
            if key in found or key in missing:
                continue
            value = get(key)
            if value is None:
                missing[key] = None
            else:
                found[key] = value
        if missing:
            todo = list(missing)
            for key, value in zip(todo, compute(todo), strict=True):
                found[key] = value
                self.put(key, value)
        return found

    def clear(self) -> None:
        self._data.clear()
        self.size = 0
