"""The CRDTs a store key may hold, and their merges.

Rules:
- A key's state is a product of three independent CRDTs, any of which may be absent:
  `lww` (last-writer-wins register: value bytes, metadata, expiry, or a delete),
  `counter` (PN-counter with a reset baseline) and `set` (add-wins observed-remove set).
  Merging merges each part; each part's merge is commutative, associative and idempotent,
  so the product's is too (property-tested).
- LWW: the greater HLC timestamp wins; timestamps carry the writer's node id, so they never
  tie between writers. A delete is a tombstone register (value None) with its timestamp.
- Counter: per node increments P and decrements N, merged by pointwise max; a delete raises
  the baseline (pointwise max too) to what the deleting node had seen: the value is
  sum(P - base_P) - sum(N - base_N).
- Set: each add tags the element with a unique (node, counter) tag; a remove removes the tags
  it has seen; an element is present while it has a tag not removed. A concurrent add wins.
- Everything is plain data (dicts, lists, ints, bytes) so it encodes to CBOR as is.
"""

from __future__ import annotations

from typing import Any

from meshd.hlc import Timestamp

State = dict[str, Any]  # {"lww": [...], "counter": {...}, "set": {...}}


# --- LWW register: [ts, value | None, metadata, expiry_ms | None] ---------------------------

def lww(ts: Timestamp, value: bytes | None, metadata: dict[str, Any] | None = None,
        expiry_ms: int | None = None) -> list[Any]:
    return [list(ts), value, dict(metadata or {}), expiry_ms]


def lww_ts(reg: list[Any]) -> tuple[int, int, str]:
    t = reg[0]
    return (t[0], t[1], t[2])


def merge_lww(a: list[Any] | None, b: list[Any] | None) -> list[Any] | None:
    if a is None:
        return b
    if b is None:
        return a
    return a if lww_ts(a) >= lww_ts(b) else b


# --- PN-counter: {"p": {node: n}, "n": {node: n}, "bp": {...}, "bn": {...}} ------------------

def _max_map(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    out = dict(a)
    for k, v in b.items():
        if v > out.get(k, 0):
            out[k] = v
    return out


def merge_counter(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
    if a is None:
        return b
    if b is None:
        return a
    return {k: _max_map(a.get(k, {}), b.get(k, {})) for k in ("p", "n", "bp", "bn")}


def counter_add(c: dict[str, Any] | None, node: str, delta: int) -> dict[str, Any]:
    c = merge_counter(c, {"p": {}, "n": {}, "bp": {}, "bn": {}}) or {}
    c = {k: dict(v) for k, v in c.items()}
    if delta:
        side = "p" if delta > 0 else "n"
        c[side][node] = c[side].get(node, 0) + abs(delta)
    return c


def counter_reset(c: dict[str, Any] | None) -> dict[str, Any] | None:
    if c is None:
        return None
    return {"p": dict(c["p"]), "n": dict(c["n"]), "bp": dict(c["p"]), "bn": dict(c["n"])}


def counter_value(c: dict[str, Any] | None) -> int:
    if c is None:
        return 0
    return (sum(c["p"].values()) - sum(c["bp"].values())
            - sum(c["n"].values()) + sum(c["bn"].values()))


def counter_live(c: dict[str, Any] | None) -> bool:
    if c is None:
        return False
    return any(v > c["bp"].get(k, 0) for k, v in c["p"].items()) or \
        any(v > c["bn"].get(k, 0) for k, v in c["n"].items())


# --- OR-set: {"adds": {elem: [tag...]}, "removed": [tag...]}; tag = "node:counter" ---------

def merge_set(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
    if a is None:
        return b
    if b is None:
        return a
    adds: dict[str, list[str]] = {}
    for src in (a["adds"], b["adds"]):
        for elem, tags in src.items():
            adds[elem] = sorted(set(adds.get(elem, [])) | set(tags))
    removed = sorted(set(a["removed"]) | set(b["removed"]))
    return {"adds": dict(sorted(adds.items())), "removed": removed}


def set_add(s: dict[str, Any] | None, elem: str, tag: str) -> dict[str, Any]:
    return merge_set(s, {"adds": {elem: [tag]}, "removed": []}) or {}


def set_remove(s: dict[str, Any] | None, elem: str | None = None) -> dict[str, Any] | None:
    """Remove what we have seen of `elem` (or of every element when None)."""
    if s is None:
        return None
    seen = [t for e, tags in s["adds"].items() if elem is None or e == elem for t in tags]
    return merge_set(s, {"adds": {}, "removed": seen})


def set_members(s: dict[str, Any] | None) -> list[str]:
    if s is None:
        return []
    removed = set(s["removed"])
    return sorted(e for e, tags in s["adds"].items() if any(t not in removed for t in tags))


# --- the product -----------------------------------------------------------------------------

def merge(a: State | None, b: State | None) -> State:
    a, b = a or {}, b or {}
    out: State = {}
    for key, fn in (("lww", merge_lww), ("counter", merge_counter), ("set", merge_set)):
        v = fn(a.get(key), b.get(key))
        if v is not None:
            out[key] = v
    return out


def canonical(state: State) -> State:
    """A normal form (sorted) so equal states encode and hash equally."""
    out: State = {}
    if "lww" in state:
        out["lww"] = state["lww"]
    if "counter" in state:
        out["counter"] = {k: {n: v for n, v in sorted(state["counter"][k].items()) if v}
                          for k in ("p", "n", "bp", "bn")}
    if "set" in state:
        s = merge_set(state["set"], {"adds": {}, "removed": []})
        assert s is not None
        out["set"] = s
    return out
