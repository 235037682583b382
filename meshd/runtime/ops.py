"""Control operations of the runtime: run, update, kill and ps, each checked for
runtime:NAME in the request's namespace.

Rules:
- `runtime.run` writes a spec (a new one at version 1; an existing one is replaced and its
  version bumped, so its replicas are replaced). `runtime.update` bumps the version (with a
  new source if given) of a spec that exists (404 otherwise). Either keeps, as `stable`, the
  version the running replicas are of (the old one, or while an earlier update has not rolled
  out, the one before it): rollout.py replaces them one at a time and keeps them if the new
  version fails. `runtime.kill` deletes it: its
  replicas stop on every node. `runtime.ps` lists every replica of the namespace (or of one
  spec): its node, state, pid, restarts, uptime, version and revision, and the slots that
  are not placed with the reason.
- The caller is checked for runtime:NAME (ps of everything: runtime:*) with its token (none:
  the local operator, as this node). Running, updating and killing also take an admin (of
  the namespace, or a node holding an issuer key: auth's require_admin): a spec runs code on
  other nodes, which a member acting as a node, or a service, must never be able to do.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from meshd import namespaces
from meshd.errors import bad_request, not_found
from meshd.ops import REQUEST_TOKEN, Op, acting_node

from .rollout import DONE, Rollout
from .service import PLACEMENT, ROLLOUTS, SPECS, STATUS, RuntimeService
from .spec import ID, parse_spec


class RuntimeOps:
    def __init__(self, runtime: RuntimeService, auth: Any, node: str,
                 require_admin: Callable[[str], Any] | None = None) -> None:
        self.runtime = runtime
        self.auth = auth
        self.node = node
        self.require_admin = require_admin

    def ops(self) -> list[Op]:
        return [Op("runtime.run", self.run, "checked"),
                Op("runtime.update", self.update, "checked"),
                Op("runtime.kill", self.kill, "checked"),
                Op("runtime.ps", self.ps, "checked")]

    def _check(self, name: str, namespace: str, admin: bool = False) -> None:
        if admin and self.require_admin is not None:
            self.require_admin(namespace)
        if self.auth is not None:
            self.auth.check(REQUEST_TOKEN.get(), acting_node(self.node), ("runtime", name, ""),
                            namespace=namespace)

    def _name(self, args: dict[str, Any]) -> tuple[str, str]:
        ns = namespaces.check(args.get("namespace"))
        name = args.get("name")
        if not isinstance(name, str) or not name:
            raise bad_request("name a managed service", id=ID)
        return ns, name

    async def run(self, args: dict[str, Any]) -> Any:
        spec = parse_spec({**args, "version": 1})
        self._check(spec.name, spec.namespace, admin=True)
        key = f"{spec.namespace}/{spec.name}"
        old = self.runtime.rows(SPECS, key).get(key)
        version = (old.get("version", 0) if isinstance(old, dict) else 0) + 1
        record = self._with_stable(key, old, {**spec.to_record(), "version": version})
        await self.runtime.put(SPECS, key, record)
        self.runtime.wake()
        return {"name": spec.name, "namespace": spec.namespace, "version": version,
                "source": str(spec.source), "replicas": spec.replicas,
                "placement": spec.placement or "(any)"}

    async def update(self, args: dict[str, Any]) -> Any:
        ns, name = self._name(args)
        self._check(name, ns, admin=True)
        key = f"{ns}/{name}"
        old = self.runtime.rows(SPECS, key).get(key)
        if not isinstance(old, dict):
            raise not_found(f"no managed service {name!r} in namespace {ns!r}: meshd run it",
                            id=ID)
        record = dict(old)
        if args.get("source"):
            record["source"] = args["source"]
        spec = parse_spec({**record, "version": int(old.get("version", 1)) + 1})
        await self.runtime.put(SPECS, key, self._with_stable(key, old, spec.to_record()))
        self.runtime.wake()
        return {"name": name, "namespace": ns, "version": spec.version,
                "source": str(spec.source)}

    def _with_stable(self, key: str, old: Any, record: dict[str, Any]) -> dict[str, Any]:
        """`record` (a new version of the spec at `key`) with the version its running
        replicas are of as `stable`."""
        if not isinstance(old, dict):
            return record
        rollout = Rollout.from_record(self.runtime.rows(ROLLOUTS, key).get(key))
        slots = [rec.get("version") for rec in self.runtime.rows(PLACEMENT, key + "/").values()
                 if isinstance(rec, dict)]
        rolled_out = (rollout is not None and rollout.state == DONE
                      and rollout.version == old.get("version")) \
            or (bool(slots) and all(v == old.get("version") for v in slots))
        stable = old.get("stable")
        if not isinstance(stable, dict) or rolled_out:
            stable = {k: v for k, v in old.items() if k != "stable"}
        return {**record, "stable": stable}

    async def kill(self, args: dict[str, Any]) -> Any:
        ns, name = self._name(args)
        self._check(name, ns, admin=True)
        key = f"{ns}/{name}"
        if key not in self.runtime.rows(SPECS, key):
            raise not_found(f"no managed service {name!r} in namespace {ns!r}", id=ID)
        await self.runtime.drop(SPECS, key)
        self.runtime.wake()
        return {"killed": name, "namespace": ns}

    async def ps(self, args: dict[str, Any]) -> Any:
        ns = namespaces.check(args.get("namespace"))
        name = args.get("name")
        if name is not None and not isinstance(name, str):
            raise bad_request("name must be text", id=ID)
        self._check(name or "*", ns)
        prefix = f"{ns}/{name}/" if name else f"{ns}/"
        status = self.runtime.rows(STATUS, prefix)
        now = time.time()
        rows = []
        for key, rec in sorted(self.runtime.rows(PLACEMENT, prefix).items()):
            spec_name, slot = key[len(ns) + 1:].rsplit("/", 1)
            if not isinstance(rec, dict):
                continue
            st = status.get(key)
            if rec.get("node") and isinstance(st, dict) and st.get("node") == rec["node"]:
                started = st.get("started") or 0
                rows.append({**st, "name": spec_name, "slot": slot,
                             "target": rec.get("version"),
                             "uptime": round(now - started, 1)
                             if st.get("state") == "running" and started else None})
            else:
                rows.append({"name": spec_name, "slot": slot, "node": rec.get("node") or "",
                             "state": "placed" if rec.get("node") else "pending",
                             "pid": 0, "restarts": 0, "uptime": None,
                             "version": None, "target": rec.get("version"),
                             "revision": "",
                             "reason": rec.get("reason", "")})
        specs = self.runtime.rows(SPECS, f"{ns}/{name}" if name else f"{ns}/")
        rollouts = self.runtime.rows(ROLLOUTS, f"{ns}/{name}" if name else f"{ns}/")
        if name:
            specs = {k: v for k, v in specs.items() if k == f"{ns}/{name}"}
            rows = [r for r in rows if r["name"] == name]
        if name and not specs:
            raise not_found(f"no managed service {name!r} in namespace {ns!r}", id=ID)
        return {"namespace": ns, "replicas": rows,
                "specs": [{"name": k[len(ns) + 1:], "version": v.get("version"),
                           "source": _source_text(v.get("source")),
                           "replicas": v.get("replicas"), "placement": v.get("placement"),
                           "restart": v.get("restart"), "rollout": rollouts.get(k)}
                          for k, v in sorted(specs.items()) if isinstance(v, dict)]}


def _source_text(source: Any) -> str:
    if not isinstance(source, dict):
        return str(source)
    if source.get("kind") == "module":
        return f"module:{source.get('location')}"
    ref = source.get("ref")
    return f"{source.get('location')}@{ref}" if ref else str(source.get("location"))
