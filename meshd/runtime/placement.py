"""Where each replica of each spec runs: a pure function of the specs, the members and the
current placement (sans-IO).

Theory of operation: a spec of N replicas has N slots (0..N-1); a `*` spec has a slot per
node that matches it, keyed by that node's name. The current placement (slot -> node, with
the time it was placed) is kept in the store next to the specs, so every node reads the same
one; the node that runs `plan` (the runtime's coordinator: the alive member with the lowest
name) writes the changes it returns, and every node runs what the placement gives it.

Rules:
- Sticky: a slot stays on its node while that node is alive or suspect, and while it has
  been dead for less than the grace period (a node that restarts in time gets its replicas
  back); a slot is never moved back once moved (no flapping).
- A slot whose node left, has been dead for the grace period, or no longer matches the spec's
  placement (the spec changed) is placed again, as is a new slot.
- Placing: among the alive nodes that match, the one running the fewest replicas of this
  spec, then the fewest replicas of all specs, then the lowest name (deterministic: every
  coordinator decides alike).
- A spec with fewer replicas than slots loses its highest slots; a slot that no node matches
  is left unplaced, with the reason (`pending`), and placed as soon as one does.
- Which version of the spec a slot runs is not placement's business: a slot placed anew has
  version 0 and rollout.py gives it one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from .spec import Spec, matches

ALIVE, SUSPECT, DEAD, LEFT = "alive", "suspect", "dead", "left"


@dataclass(frozen=True)
class Node:
    name: str
    status: str  # alive, suspect, dead or left (membership's words)
    tags: tuple[tuple[str, str], ...] = ()
    down_since: float | None = None  # when it was last seen going dead (None: up)

    @property
    def tag_map(self) -> dict[str, str]:
        return dict(self.tags)


@dataclass(frozen=True)
class Slot:
    node: str  # "" = not placed
    since: float  # when it was placed
    reason: str = ""  # why it is not placed
    version: int = 0  # the spec's version it runs (0: not chosen yet: rollout.py chooses)
    changed: float = 0.0  # when that version was chosen

    def to_record(self) -> dict[str, object]:
        return {"node": self.node, "since": self.since, "reason": self.reason,
                "version": self.version, "changed": self.changed}


@dataclass(frozen=True)
class Change:
    spec: str
    slot: str  # "0", "1"... or a node's name for a `*` spec
    slot_value: Slot | None  # None: the slot is gone (scaled down, spec removed)


def slot_names(spec: Spec, nodes: Iterable[Node]) -> list[str]:
    """The slots a spec wants: "0".."N-1", or one per matching live node for `*`."""
    if spec.every_node:
        return sorted(n.name for n in nodes
                      if n.status in (ALIVE, SUSPECT) and matches("*", n.name, n.tag_map))
    return [str(i) for i in range(spec.replicas)]


def plan(specs: Iterable[Spec], placed: dict[str, dict[str, Slot]], nodes: Iterable[Node],
         now: float, grace: float) -> list[Change]:
    """The changes that bring `placed` (spec name -> slot -> Slot) in line with `specs` and
    the members; [] when it already is."""
    nodes = list(nodes)
    by_name = {n.name: n for n in nodes}
    specs = sorted(specs, key=lambda s: s.name)
    wanted = {s.name for s in specs}
    changes = [Change(name, slot, None) for name in sorted(placed) if name not in wanted
               for slot in sorted(placed[name])]
    load: Counter[str] = Counter(slot.node for name in placed if name in wanted
                                 for slot in placed[name].values() if slot.node)
    for spec in specs:
        current = dict(placed.get(spec.name, {}))
        slots = slot_names(spec, nodes)
        for slot in sorted(set(current) - set(slots)):  # scaled down, or a node gone (`*`)
            if current[slot].node:
                load[current[slot].node] -= 1
            changes.append(Change(spec.name, slot, None))
            del current[slot]
        here: Counter[str] = Counter(s.node for s in current.values() if s.node)
        for slot in slots:
            old = current.get(slot)
            if old is not None and old.node and _keeps(spec, old, by_name, now, grace):
                continue
            if old is not None and old.node:
                load[old.node] -= 1
                here[old.node] -= 1
            target = slot if spec.every_node else _choose(spec, nodes, here, load)
            if target:
                new = Slot(target, now)
                load[target] += 1
                here[target] += 1
            else:
                new = Slot("", now, f"no alive node matches --node {spec.placement}")
                if old is not None and not old.node and old.reason == new.reason:
                    continue  # still waiting, for the same reason
            changes.append(Change(spec.name, slot, new))
    return changes


def _keeps(spec: Spec, slot: Slot, nodes: dict[str, Node], now: float, grace: float) -> bool:
    node = nodes.get(slot.node)
    if node is None or node.status == LEFT:
        return False
    if not matches(spec.placement, node.name, node.tag_map):
        return False
    if node.status == DEAD:
        return node.down_since is not None and now - node.down_since < grace
    return True


def _choose(spec: Spec, nodes: list[Node], here: Counter[str], load: Counter[str]) -> str:
    fit = [n.name for n in nodes if n.status == ALIVE
           and matches(spec.placement, n.name, n.tag_map)]
    if not fit:
        return ""
    return min(fit, key=lambda name: (here[name], load[name], name))


def coordinator(nodes: Iterable[Node]) -> str:
    """The node that writes placement changes: the alive member with the lowest name."""
    alive = [n.name for n in nodes if n.status == ALIVE]
    return min(alive) if alive else ""


def apply(placed: dict[str, dict[str, Slot]], changes: Iterable[Change]
          ) -> dict[str, dict[str, Slot]]:
    """`placed` with `changes` made (a copy)."""
    out = {name: dict(slots) for name, slots in placed.items()}
    for c in changes:
        if c.slot_value is None:
            out.get(c.spec, {}).pop(c.slot, None)
            if c.spec in out and not out[c.spec]:
                del out[c.spec]
        else:
            out.setdefault(c.spec, {})[c.slot] = c.slot_value
    return out


def mine(placed: dict[str, dict[str, Slot]], node: str) -> list[tuple[str, str]]:
    """The (spec, slot) pairs placed on `node`."""
    return sorted((name, slot) for name, slots in placed.items()
                  for slot, s in slots.items() if s.node == node)
