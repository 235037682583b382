"""Issue 22: the record cache's size estimate is not below what its entries really take, so
store.cache_bytes bounds the memory it holds."""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Callable

import cbor2

from meshd.store import crdt
from meshd.store.cache import RecordCache, entry_size
from meshd.store.records import Entry, key_hash


def _entry(i: int, value: bytes, metadata: dict | None = None) -> Entry:
    state = {"lww": crdt.lww((1_700_000_000_000 + i, i, "node-a"), value, metadata)}
    state = cbor2.loads(cbor2.dumps(state))  # as a read from disk decodes it
    return Entry(state, key_hash(f"key-{i:07d}", state))


def _measured(make: Callable[[], list[tuple[tuple[str, str, str], Entry]]]
              ) -> tuple[int, int]:
    """(bytes really taken, bytes estimated) by a cache holding the entries `make` builds."""
    gc.collect()
    tracemalloc.start()
    try:
        cache = RecordCache(1 << 40)
        for key, entry in make():
            cache.add(key, entry)
        gc.collect()
        taken = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return taken, cache.bytes


def test_the_estimate_covers_what_entries_of_100_byte_values_take():
    taken, estimated = _measured(lambda: [(("default", "store", f"key-{i:07d}"),
                                           _entry(i, b"v" * 100)) for i in range(5000)])
    assert taken <= estimated, f"{taken} bytes taken, {estimated} estimated"
    assert estimated < 2 * taken, "an estimate far too high wastes the cache"


def test_the_estimate_covers_large_values_and_metadata():
    taken, estimated = _measured(lambda: [(("db", "t", f"k{i}"), _entry(
        i, b"x" * 5000, {"lang": "en", "n": str(i)})) for i in range(500)])
    assert taken <= estimated


def test_an_entry_larger_than_the_whole_cache_is_not_kept():
    cache = RecordCache(2000)
    big = _entry(1, b"x" * 5000)
    cache.add(("d", "t", "k"), big)
    assert len(cache) == 0 and cache.bytes == 0
    small = _entry(2, b"")
    assert entry_size(("d", "t", "k"), small) <= 2000
    cache.add(("d", "t", "k"), small)
    assert cache.get(("d", "t", "k")) == small and cache.bytes <= 2000
