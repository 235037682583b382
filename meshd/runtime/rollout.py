"""Rolling updates: which version of its spec each replica runs (sans-IO).

Theory of operation: `meshd update` (or `meshd run` of a name that runs) writes the spec's
new version next to the one it replaces, the *stable* version. The coordinator then calls
`step` on every reconcile: it moves one slot at a time to the new version, and the next
only once every slot already moved runs it healthy. When the last slot has moved the rollout
is `done`; when a moved slot fails, the rollout is `failed` and every moved slot goes back to
the stable version, which the others never stopped running. The rollout's record lives in
the store beside the spec, so a new coordinator goes on where the last one stopped.

Rules:
- Healthy: the replica's status row (written by the node running it) is of the slot's node
  and version, that node is alive, the replica is `running`, and registered in that node's
  registry now (`healthy`). A spec whose stable replicas never registered (a worker, not an
  RPC service; remembered from one rollout to the next) cannot be judged so: running
  MIN_HEALTHY seconds is healthy for it, counted from the later of when its slot moved (the
  coordinator's clock) and when it started (its node's), so a skewed clock only delays.
- Failed: a moved replica that crashed (`restarting`, `crashed`, `exited`, `failed`), or that
  is not healthy `deadline` seconds after its slot moved. The reason names the slot, its
  node and what its status says.
- A slot placed anew (a new replica, one moved off a dead node, or every slot when the
  update changed the placement) starts as the stable version while rolling, and is moved
  like the others, one at a time; once done it takes the new version, once failed the
  stable one. So does an unplaced slot (it runs nothing).
- A spec with no stable version (its first) has no rollout: every slot runs its version.
- An update during a rollout starts a new rollout from the same stable version: slots on
  the interrupted version count as not moved.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, replace
from typing import Any

from .placement import Slot

MIN_HEALTHY = 5.0
ROLLING, DONE, FAILED = "rolling", "done", "failed"
CRASHED = ("restarting", "crashed", "exited", "failed")


@dataclass(frozen=True)
class Rollout:
    version: int  # the version rolled out
    stable: int  # the version it replaces
    state: str  # rolling, done or failed
    reason: str = ""  # why it failed
    registers: bool = True  # the stable replicas registered: health is their registration
    started: float = 0.0

    def to_record(self) -> dict[str, Any]:
        return {"version": self.version, "stable": self.stable, "state": self.state,
                "reason": self.reason, "registers": self.registers, "started": self.started}

    @classmethod
    def from_record(cls, rec: Any) -> Rollout | None:
        """A stored record; None when it is not one (it is then started again)."""
        if not isinstance(rec, dict):
            return None
        version, stable, state = rec.get("version"), rec.get("stable"), rec.get("state")
        if type(version) is not int or type(stable) is not int \
                or state not in (ROLLING, DONE, FAILED):
            return None
        return cls(version, stable, state, str(rec.get("reason", "")),
                   bool(rec.get("registers", True)), float(rec.get("started", 0) or 0))


def step(version: int, stable: int | None, slots: dict[str, Slot],
         status: dict[str, dict[str, Any]], rollout: Rollout | None, now: float,
         deadline: float, alive: Collection[str] | None = None
         ) -> tuple[dict[str, Slot], Rollout | None]:
    """The slots to change (slot -> new Slot) and the rollout record after this step, for
    a spec at `version` replacing `stable` (None: nothing to replace); `alive`: the nodes
    whose status rows count (None: every node's)."""
    changes: dict[str, Slot] = {}

    def move(slot: str, to: int) -> None:
        changes[slot] = replace(slots[slot], version=to, changed=now)

    if stable is None or stable == version:
        for slot, s in sorted(slots.items()):
            if s.version != version:
                move(slot, version)
        return changes, None
    if rollout is None or rollout.version != version or rollout.stable != stable:
        registers = any(row.get("registered") for row in status.values()
                        if isinstance(row, dict)) or (rollout is not None and rollout.registers)
        rollout = Rollout(version, stable, ROLLING, registers=registers, started=now)
    if rollout.state != ROLLING:
        target = stable if rollout.state == FAILED else version
        for slot, s in sorted(slots.items()):
            if s.version != target:
                move(slot, target)
        return changes, rollout
    for slot, s in sorted(slots.items()):  # new and unplaced slots start as the stable one
        if not s.version or (not s.node and s.version != stable):
            move(slot, stable)
    current = {**slots, **changes}
    for slot, s in sorted(current.items()):
        if not s.node or s.version != version:
            continue
        verdict, why = judge(status.get(slot), s, rollout.registers, now, alive)
        if verdict == "waiting" and now - (s.changed or now) >= deadline:
            verdict, why = "failed", f"not healthy {deadline:g} s after it started ({why})"
        if verdict == "failed":
            rollout = replace(rollout, state=FAILED, reason=f"replica {slot} on {s.node}: "
                              f"{why}; v{stable} kept")
            for other, o in sorted(current.items()):
                if o.version != stable:
                    move(other, stable)
            return changes, rollout
        if verdict == "waiting":
            return changes, rollout
    old = [slot for slot, s in sorted(current.items(), key=lambda kv: _order(kv[0]))
           if s.node and s.version != version]
    if old:
        move(old[0], version)
    else:
        rollout = replace(rollout, state=DONE)
    return changes, rollout


def judge(row: dict[str, Any] | None, slot: Slot, registers: bool, now: float,
          alive: Collection[str] | None = None) -> tuple[str, str]:
    """("healthy" | "waiting" | "failed", what the status says) for a moved slot."""
    if not isinstance(row, dict) or row.get("node") != slot.node \
            or row.get("version") != slot.version:
        return "waiting", "no status from it yet"
    if alive is not None and slot.node not in alive:
        return "waiting", f"its node {slot.node} is not alive"
    state = row.get("state")
    if state in CRASHED:
        return "failed", f"{state}: {row.get('reason') or 'no reason given'}"
    if state != "running":
        return "waiting", f"{state}"
    if registers:
        return ("healthy", "") if row.get("healthy") else ("waiting", "not registered")
    since = max(slot.changed, row.get("started") or now)
    if now - since >= MIN_HEALTHY:
        return "healthy", ""
    return "waiting", f"running {max(0.0, now - since):.0f} s of {MIN_HEALTHY:g}"


def _order(slot: str) -> tuple[int, str]:
    """Slots "0", "1", ... in number order; a `*` spec's node-named slots by name."""
    return (int(slot), "") if slot.isdigit() else (1 << 30, slot)
