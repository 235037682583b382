"""A bounded least-recently-used cache of decoded store entries.

Rules:
- Bounded by an estimate of the bytes its entries take in memory (`entry_size`), not by
  their number: values range from a few bytes to store.max_value_bytes. Adding past the
  bound evicts the least recently used entries first; an entry larger than the whole
  bound is not kept at all.
- It holds only entries equal to what is on disk (the owner drops a key before changing
  it), so evicting never loses anything.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from .records import Entry

CacheKey = tuple[str, str, str]
# Measured with tracemalloc (tests/unit/store/test_cache.py checks the estimate stays above
# what an entry really takes, ~1,120 bytes for a 100-byte value): the OrderedDict slot, the
# key tuple, the entry, the state dict, the register list and its timestamp list, the
# integers, the metadata dict.
OVERHEAD = 1050


def entry_size(key: CacheKey, entry: Entry) -> int:
    """Roughly the bytes `entry` takes in memory."""
    size = OVERHEAD + len(key[0]) + len(key[1]) + len(key[2])
    state = entry.state
    reg = state.get("lww")
    if reg is not None:
        size += len(reg[1] or b"") + len(reg[0][2]) + (_rough(reg[2]) if reg[2] else 0)
        if len(state) == 1:
            return size
    for part in ("counter", "set"):
        if part in state:
            size += _rough(state[part])
    return size


def _rough(v: Any) -> int:
    """Bytes of plain data (dicts, lists, text, bytes, ints), roughly and generously."""
    if isinstance(v, dict):
        return 250 + sum(64 + _rough(k) + _rough(x) for k, x in v.items())
    if isinstance(v, list):
        return 60 + sum(8 + _rough(x) for x in v)
    if isinstance(v, str | bytes):
        return 50 + len(v)
    return 32


class RecordCache:
    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError("the cache size must not be negative")
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[CacheKey, tuple[Entry, int]] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: CacheKey) -> bool:
        return key in self._items

    def get(self, key: CacheKey) -> Entry | None:
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return item[0]

    def peek(self, key: CacheKey) -> Entry | None:
        """The entry if held, without counting it as used (for scans)."""
        item = self._items.get(key)
        return None if item is None else item[0]

    def add(self, key: CacheKey, entry: Entry) -> None:
        self.discard(key)
        size = entry_size(key, entry)
        if size > self.max_bytes:
            return
        self._items[key] = (entry, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, dropped) = self._items.popitem(last=False)
            self.bytes -= dropped
            self.evictions += 1

    def discard(self, key: CacheKey) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self.bytes -= item[1]

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0
