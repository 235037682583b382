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
- A set change travels as a delta (`set_add_delta`, `set_remove_delta`): the one new tag,
  or the tags removed. A delta is itself a state, so merging it is the same merge; a
  replica's work and the bytes sent grow with the change, not with the set (whole sets were
  sent before, and a set of hundreds of tags cost every replica a sort of all of them per add).
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
    """The union of both sides' tags (a list the other side holds too is kept as it is:
    replicas merge one new tag into sets of hundreds, so work goes to what differs)."""
    if a is None:
        return b
    if b is None:
        return a
    adds = dict(a["adds"])
    for elem, tags in b["adds"].items():
        have = adds.get(elem)
        if have is None:
            adds[elem] = sorted(set(tags))
        elif have != tags:
            adds[elem] = sorted({*have, *tags})
    ra, rb = a["removed"], b["removed"]
    return {"adds": adds, "removed": ra if not rb or ra == rb else sorted({*ra, *rb})}


def _normal_set(s: dict[str, Any]) -> dict[str, Any]:
    return {"adds": {e: sorted(set(tags)) for e, tags in sorted(s["adds"].items())},
            "removed": sorted(set(s["removed"]))}


def set_add_delta(elem: str, tag: str) -> dict[str, Any]:
    """What an add changes (a delta: replicas merge it into what they hold)."""
    return {"adds": {elem: [tag]}, "removed": []}


def set_remove_delta(s: dict[str, Any] | None, elem: str | None = None
                     ) -> dict[str, Any] | None:
    """What removing `elem` (every element when None) changes: the tags of it seen in `s`
    (None when there are none)."""
    if s is None:
        return None
    seen = sorted({t for e, tags in s["adds"].items() if elem is None or e == elem
                   for t in tags})
    return {"adds": {}, "removed": seen} if seen else None


def set_add(s: dict[str, Any] | None, elem: str, tag: str) -> dict[str, Any]:
    return merge_set(s, set_add_delta(elem, tag)) or {}


def set_remove(s: dict[str, Any] | None, elem: str | None = None) -> dict[str, Any] | None:
    """Remove what we have seen of `elem` (or of every element when None)."""
    if s is None:
        return None
    return merge_set(s, set_remove_delta(s, elem) or {"adds": {}, "removed": []})


def set_live(s: dict[str, Any] | None) -> bool:
    """Whether the set has a member (set_members without building the list)."""
    if s is None:
        return False
    removed = set(s["removed"])
    return any(t not in removed for tags in s["adds"].values() for t in tags)


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
        out["set"] = _normal_set(state["set"])
    return out
