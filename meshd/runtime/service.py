"""The runtime on one node: reads the specs and placement from the store, places replicas
when it is the coordinator, and runs the replicas placed on this node (trio shell).

Theory of operation:
- The store's system database "runtime" holds, per namespace, the specs (`specs`, key
  `NS/NAME`: the current version, and the `stable` one it replaces while it rolls out), where
  each replica is placed and which version it runs (`placement`, key `NS/NAME/SLOT`), each
  spec's rollout (`rollouts`, key `NS/NAME`) and how each replica is doing (`status`, key
  `NS/NAME/SLOT`, written by the node that runs it). All replicate like every table, so
  every node sees the same desired state and a spec changed anywhere takes effect everywhere.
- Reconcile (on start, on every change of that database, on every membership event, and every
  RECONCILE seconds): the coordinator (placement.coordinator: the alive member with the
  lowest name) computes placement.plan, then rollout.step for each spec, and writes the
  changes; every node then starts a `Replica` (process.py) for each slot placed on it, of the
  slot's version, and stops those no longer placed on it or whose slot changed version.
- Health: a replica is healthy while its process group holds a registration in this node's
  registry (`registered`); process.py restarts one whose registration went away, and the
  rollout waits for each new replica to be healthy.
- Stopping the runtime (the daemon stopping) cancels every replica: each process group is
  stopped; none outlives the daemon. With `keep_on_exit` they are left running instead, and
  the next daemon adopts them (procfiles.py records each process): a leftover wanted at its
  version becomes that replica again, with its pid and start time; one not wanted by a
  reconcile LEFTOVER_WAIT seconds after start (or any, without keep_on_exit: a daemon that
  crashed) is stopped, its process group first signalled SIGTERM, then SIGKILL.

Rules:
- Only this module writes the runtime database (a user reaches it through the runtime ops,
  checked for runtime:NAME); a record that does not parse is logged and skipped.
- A replica's state changes are written to `status` (its row is deleted when the replica
  is no longer this node's), so `meshd ps` on any node shows every replica.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import trio

from meshd.errors import MeshError
from meshd.membership.messages import STATE_NAMES

from . import placement as pl
from .process import Replica, State, group_alive, signal_group
from .procfiles import Leftover, ProcFiles
from .rollout import Rollout, step
from .sources import Sources
from .spec import Spec, parse_spec

log = logging.getLogger("meshd.runtime")

DB = "runtime"
SPECS, PLACEMENT, STATUS, ROLLOUTS = "specs", "placement", "status", "rollouts"
RECONCILE = 5.0  # seconds between reconciles when nothing changes
LEFTOVER_WAIT = 10.0  # seconds after start before a leftover no spec wants is stopped
# A node that takes over as coordinator from another waits this long before it steps the
# rollouts: the rollout records its predecessor wrote may not have reached it yet (tables
# replicate independently), and stepping without them would start a failed rollout again.
TAKEOVER_WAIT = 10.0


class RuntimeService:
    def __init__(self, node: str, store: Any, core: Any, data_dir: Path, socket: Path,
                 logs: Callable[[str, str, list[dict[str, Any]]], Any],
                 service_token: Callable[[str, str], Any] | None = None,
                 grace: float = 30.0, stop_timeout: float = 10.0,
                 registered: Callable[[], set[int]] | None = None,
                 health_grace: float = 10.0, healthy_deadline: float = 300.0,
                 keep_on_exit: bool = False) -> None:
        self.node = node
        self.store = store
        self.core = core
        self.sources = Sources(data_dir / "runtime")
        self.socket = socket
        self.logs = logs
        self.service_token = service_token
        self.grace = grace
        self.stop_timeout = stop_timeout
        self.registered = registered
        self.health_grace = health_grace
        self.healthy_deadline = healthy_deadline
        self.keep_on_exit = keep_on_exit
        self.procs = ProcFiles(data_dir / "runtime" / "procs")
        self.leftovers: dict[tuple[str, str, str], Leftover] = {}
        self._started_at = 0.0
        self._coordinator = ""  # the coordinator the last reconcile saw
        self._coordinating_since = 0.0
        self.down_since: dict[str, float] = {}
        self.running: dict[tuple[str, str, str], tuple[int, trio.CancelScope]] = {}
        self.stats = {"runtime_replicas": 0, "runtime_starts": 0, "runtime_reconciles": 0}
        self._wake = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._status: dict[str, dict[str, Any]] = {}  # rows to write, latest per replica
        self._status_due = trio.Event()

    # --- the store's tables ----------------------------------------------------------------

    def rows(self, table: str, prefix: str = "") -> dict[str, Any]:
        """The JSON records of one of the runtime's tables, by key."""
        from meshd.store.state import view
        now = int(time.time() * 1000)
        out = {}
        for key, state in self.store.rep.state.read(DB, table, now, prefix=prefix or None):
            raw = view(key, state, now).get("value")
            if raw is None:
                continue
            try:
                out[key] = json.loads(raw)
            except (ValueError, TypeError):
                log.warning("runtime %s record %r is not JSON: skipped", table, key)
        return out

    async def put(self, table: str, key: str, value: Any) -> None:
        await self.store.write({"database": DB, "table": table, "key": key,
                                "value": json.dumps(value).encode()})

    async def drop(self, table: str, key: str) -> None:
        try:
            await self.store.delete({"database": DB, "table": table, "key": key})
        except MeshError as exc:
            if exc.status != 404:
                raise

    def specs(self) -> dict[str, tuple[Spec, Spec | None]]:
        """`NS/NAME` -> (the current spec, the stable one it replaces or None)."""
        out = {}
        for key, record in self.rows(SPECS).items():
            try:
                spec = parse_spec(record)
                stable = record.get("stable")
                out[key] = (spec, parse_spec(stable) if isinstance(stable, dict) else None)
            except MeshError as exc:
                log.warning("runtime spec %s cannot run: %s", key, exc.detail)
        return out

    def placed(self) -> dict[str, dict[str, pl.Slot]]:
        """Placement by `NS/NAME` -> slot -> Slot."""
        out: dict[str, dict[str, pl.Slot]] = {}
        for key, rec in self.rows(PLACEMENT).items():
            full, _, slot = key.rpartition("/")
            if not full or not isinstance(rec, dict) or not isinstance(rec.get("node"), str):
                continue
            version = rec.get("version")
            out.setdefault(full, {})[slot] = pl.Slot(
                rec["node"], float(rec.get("since", 0)), str(rec.get("reason", "")),
                version if type(version) is int else 0, float(rec.get("changed", 0) or 0))
        return out

    # --- running ---------------------------------------------------------------------------

    def wake(self, *_: Any) -> None:
        self._wake.set()

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._started_at = time.monotonic()
            for item in self.procs.leftovers():
                key = (item.namespace, item.name, item.slot)
                if self.keep_on_exit and item.files:
                    self.leftovers[key] = item
                else:
                    log.warning("runtime: a process of %s/%s/%s (pid %d) outlived its "
                                "daemon: stopping it", *key, item.pid)
                    nursery.start_soon(self._stop_leftover, item)
            nursery.start_soon(self.store.watch, {"database": DB}, self._changed)
            nursery.start_soon(self._write_status)
            task_status.started()
            while True:
                try:
                    await self.reconcile()
                except Exception:  # one bad pass must not end the runtime
                    log.exception("runtime reconcile failed")
                self._wake = trio.Event()
                with trio.move_on_after(RECONCILE):
                    await self._wake.wait()
                await trio.sleep(0.05)  # a burst of changes is one pass

    async def _changed(self, ev: Any) -> None:
        if ev.get("table") != STATUS:
            self.wake()

    def nodes(self) -> list[pl.Node]:
        now = time.time()
        out = []
        for m in self.core.member_list():
            status = STATE_NAMES[m.state]
            if status == pl.DEAD:
                self.down_since.setdefault(m.name, now)
            else:
                self.down_since.pop(m.name, None)
            tags = tuple(sorted((k, v) for k, v in m.tags.items() if isinstance(v, str)))
            out.append(pl.Node(m.name, status, tags, self.down_since.get(m.name)))
        return out

    async def reconcile(self) -> None:
        self.stats["runtime_reconciles"] += 1
        specs = self.specs()
        nodes = self.nodes()
        placed = self.placed()
        coordinator = pl.coordinator(nodes)
        if coordinator != self._coordinator:
            self._coordinating_since = time.monotonic() if self._coordinator else 0.0
            self._coordinator = coordinator
        if coordinator == self.node:
            placed = await self._coordinate(
                specs, placed, nodes,
                time.monotonic() - self._coordinating_since >= TAKEOVER_WAIT)
        wanted: dict[tuple[str, str, str], Spec] = {}
        waiting = set()  # slots of a version this node has no spec of: left as they run
        for full, slot in pl.mine(placed, self.node):
            if full not in specs:
                continue
            current, stable = specs[full]
            version = placed[full][slot].version
            spec = _of_version(current, stable, version)
            key = (current.namespace, current.name, slot)
            if spec is None:
                waiting.add(key)
                if key not in self.running and stable is not None \
                        and version < current.version:
                    wanted[key] = stable  # nothing runs: the stable one until it moves
            else:
                wanted[key] = spec
        for key, (version, scope) in list(self.running.items()):
            spec = wanted.get(key)
            if key not in waiting and (spec is None or spec.version != version):
                scope.cancel()  # the replica's task stops its process and forgets it
                del self.running[key]
        for key, spec in wanted.items():
            if key not in self.running and self._nursery is not None:
                scope = trio.CancelScope()
                self.running[key] = (spec.version, scope)
                adopt = self.leftovers.pop(key, None)
                if adopt is not None and adopt.version != spec.version:
                    self._nursery.start_soon(self._stop_leftover, adopt)
                    adopt = None
                self._nursery.start_soon(self._replica, spec, key[2], scope, adopt)
        if self.leftovers and time.monotonic() - self._started_at >= LEFTOVER_WAIT \
                and self._nursery is not None:
            for key, item in list(self.leftovers.items()):
                if key not in wanted:
                    log.info("runtime: %s/%s/%s (pid %d) left by an earlier daemon is no "
                             "longer wanted here: stopping it", *key, item.pid)
                    del self.leftovers[key]
                    self._nursery.start_soon(self._stop_leftover, item)
        self.stats["runtime_replicas"] = len(self.running)

    async def _coordinate(self, specs: dict[str, tuple[Spec, Spec | None]],
                          placed: dict[str, dict[str, pl.Slot]], nodes: list[pl.Node],
                          rollouts_too: bool = True) -> dict[str, dict[str, pl.Slot]]:
        """The coordinator's part: place the slots, step the rollouts (not while it has
        just taken over: TAKEOVER_WAIT), write the changes; the placement after them."""
        now = time.time()
        keyed = [_keyed(key, s) for key, (s, _) in specs.items()]
        changes = pl.plan(keyed, placed, nodes, now, self.grace)
        placed = pl.apply(placed, changes)
        writes: dict[str, pl.Slot | None] = {f"{c.spec}/{c.slot}": c.slot_value
                                             for c in changes}
        status: dict[str, dict[str, Any]] = {}
        for key, row in self.rows(STATUS).items():
            full, _, slot = key.rpartition("/")
            status.setdefault(full, {})[slot] = row
        rollouts = self.rows(ROLLOUTS)
        alive = {n.name for n in nodes if n.status == pl.ALIVE}
        for full, (spec, stable) in sorted(specs.items()) if rollouts_too else ():
            old = Rollout.from_record(rollouts.get(full))
            moved, rollout = step(spec.version, stable.version if stable else None,
                                  placed.get(full, {}), status.get(full, {}), old, now,
                                  self.healthy_deadline, alive)
            for slot, value in moved.items():
                writes[f"{full}/{slot}"] = value
                placed.setdefault(full, {})[slot] = value
            if rollout != old:
                if rollout is None:
                    await self.drop(ROLLOUTS, full)
                else:
                    await self.put(ROLLOUTS, full, rollout.to_record())
                    if old is None or old.state != rollout.state:
                        log.info("runtime %s: v%d over v%d %s%s", full, rollout.version,
                                 rollout.stable, rollout.state,
                                 f": {rollout.reason}" if rollout.reason else "")
        for full in set(rollouts) - set(specs) if rollouts_too else ():
            await self.drop(ROLLOUTS, full)
        for key, value in writes.items():
            if value is None:
                await self.drop(PLACEMENT, key)
            else:
                await self.put(PLACEMENT, key, value.to_record())
        return placed

    async def _stop_leftover(self, item: Leftover) -> None:
        """Stop a process group an earlier daemon left (SIGTERM, SIGKILL after
        stop_timeout) and forget its record."""
        signal_group(item.pid, signal.SIGTERM)
        with trio.move_on_after(self.stop_timeout):
            while group_alive(item.pid):
                await trio.sleep(0.1)
        if group_alive(item.pid):
            signal_group(item.pid, signal.SIGKILL)
        self.procs.forget(item.namespace, item.name, item.slot)

    async def _replica(self, spec: Spec, slot: str, scope: trio.CancelScope,
                       adopt: Leftover | None = None) -> None:
        """One replica's task: its failures are its own (logged, shown), never the node's."""
        key = f"{spec.namespace}/{spec.name}/{slot}"
        registered = None
        if self.registered is not None:
            groups = self.registered
            registered = lambda pgid: pgid in groups()  # noqa: E731
        replica = Replica(spec, slot, self.node, self.sources, self._environ, self.logs,
                          lambda state: self._report(key, state), self.stop_timeout,
                          registered=registered, health_grace=self.health_grace,
                          procs=self.procs, adopt=adopt,
                          keep_on_exit=(lambda: not scope.cancel_called)
                          if self.keep_on_exit else None)
        self.stats["runtime_starts"] += 1
        with scope:
            try:
                await replica.run()
            except Exception as exc:
                log.exception("replica %s failed", key)
                self._report(key, replace(replica.state, state="failed", pid=0,
                                          reason=f"the runtime failed running it: {exc}"))
            await trio.sleep_forever()  # exited or failed: kept so until the spec changes
        mine = self.running.get((spec.namespace, spec.name, slot))
        if self._nursery is None or (mine is not None and mine[1] is scope):
            return  # the daemon is stopping: its row stays as it was last
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            self._status.pop(key, None)
            current = self.rows(STATUS, key).get(key)
            if isinstance(current, dict) and current.get("node") == self.node \
                    and current.get("version") == spec.version:  # not its successor's
                try:
                    await self.drop(STATUS, key)
                except MeshError as exc:
                    log.warning("runtime status of %s not removed: %s", key, exc.detail)

    def _report(self, key: str, state: State) -> None:
        self._status[key] = state.to_row()
        self._status_due.set()

    async def _write_status(self) -> None:
        """One writer of replica rows, in order, the latest of each (two writes racing
        could leave an older state last)."""
        while True:
            await self._status_due.wait()
            self._status_due = trio.Event()
            while self._status:
                key = next(iter(self._status))
                row = self._status.pop(key)
                try:
                    await self.put(STATUS, key, row)
                except MeshError as exc:
                    log.warning("runtime status of %s not written: %s", key, exc.detail)

    async def _environ(self, spec: Spec, slot: str) -> dict[str, str]:
        env = {"MESHD_ADDR": str(self.socket), "MESHD_NAMESPACE": spec.namespace,
               "MESHD_REPLICA": f"{spec.name}-{slot}", "MESHD_NODE_NAME": self.node}
        if self.keep_on_exit:  # it outlives this daemon: it registers again with the next
            env["MESHD_RECONNECT"] = "1"
        if self.service_token is not None:
            token = await self.service_token(spec.name, spec.namespace)
            if token:
                env["MESHD_TOKEN"] = token
        for path in spec.env_from_config:
            found, value = self.store.config_value(spec.namespace, path)
            if found:
                name = path.replace(".", "_").replace("-", "_").upper()
                env.setdefault(name, value if isinstance(value, str) else json.dumps(value))
        return env


def _of_version(spec: Spec, stable: Spec | None, version: int) -> Spec | None:
    """The spec a slot of `version` runs: the current one, the stable one, the current one
    for a slot of no version yet (0: placed, its version not chosen); None for a version
    this node has no spec of (an interrupted rollout's, or one it has not read yet): what
    runs there is left running until the rollout moves the slot."""
    if version in (spec.version, 0):
        return spec
    if stable is not None and version == stable.version:
        return stable
    return None


def _keyed(key: str, spec: Spec) -> Spec:
    """The spec under its placement key (NS/NAME), so specs of two namespaces with the same
    name are placed apart."""
    from dataclasses import replace
    return replace(spec, name=key)
