"""Control operations of the registry: list, describe, health-check and watch services, and
register a local service process.

Rules:
- Reads (services, describe, health, services.watch) read the mesh (resource
  mesh:services: for a remote caller, in the namespace they name). describe and health of
  a service without instances are a 404.
- health calls every instance's `__health__` at once (5 s each) with the caller's token
  (the local operator without one: as this node), so the rules for service:NAME:__health__
  apply to the caller as for any call, and reports each one's status, latency and failure
  (a refusal too); one failing instance never hides the others.
- service.register is a session of a service process on this node: the local operator's
  (a remote caller cannot make the node host its instances).
- Every one of them takes `namespace` ("default" when absent; an invalid name is a 400): a
  read sees that namespace only, an unknown one reads empty (describe and health: the
  usual 404). services.watch without one follows every namespace (for a remote caller:
  every namespace whose mesh:services its token may read; the others' events are left out).
- namespaces lists each namespace the registry holds or that has accounts (and "default")
  with its counts of services, instances and accounts (mesh:namespaces: for a remote
  caller, by the rules of "default": the list spans every namespace).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio

from meshd import namespaces
from meshd.errors import MeshError, bad_request
from meshd.ops import REQUEST_REMOTE, REQUEST_TOKEN, Emit, Op, mesh_resource
from meshd.rpc.service import RpcService

from .service import RegistryService


class RegistryOps:
    def __init__(self, registry: RegistryService, rpc: RpcService,
                 accounts: Callable[[], dict[str, int]] | None = None,
                 may_read: Callable[[str | None, str], bool] | None = None,
                 store_keys: Callable[[], dict[str, int]] | None = None) -> None:
        self.registry = registry
        self.rpc = rpc
        self.accounts = accounts  # accounts per namespace (auth), None: not counted
        # may_read(token, namespace): whether a token may read that namespace's services
        self.may_read = may_read
        self.store_keys = store_keys  # live store keys per namespace, None: not counted

    def ops(self) -> list[Op]:
        services = mesh_resource("services", per_namespace=True)
        return [Op("services", self.services, services),
                Op("describe", self.describe, services),
                Op("health", self.health, services),
                Op("services.watch", self.watch, services, "stream"),
                Op("service.register", self.registry.serve_session, "operator", "session"),
                Op("namespaces", self.list_namespaces, mesh_resource("namespaces"))]

    async def services(self, args: dict[str, Any]) -> Any:
        return self.registry.services(namespaces.check(args.get("namespace")))

    def _instances(self, args: dict[str, Any], what: str) -> tuple[str, list[dict[str, Any]]]:
        name = args.get("service")
        if not isinstance(name, str):
            raise bad_request(f"{what} needs a service name")
        ns = namespaces.check(args.get("namespace"))
        rows = self.registry.instances(name, ns)
        if not rows:
            raise MeshError(404, f"service {name!r} has no instances{in_namespace(ns)}")
        return name, rows

    async def describe(self, args: dict[str, Any]) -> Any:
        name, rows = self._instances(args, "describe")
        return {"name": name, "instances": rows, "namespace": rows[0]["namespace"]}

    async def health(self, args: dict[str, Any]) -> Any:
        _, rows = self._instances(args, "health")
        results: list[dict[str, Any]] = []
        token = REQUEST_TOKEN.get()  # the caller's, never the node's (found by review)

        async def check(inst: dict[str, Any]) -> None:
            start = trio.current_time()
            try:
                await self.rpc.call_instance(inst, "__health__", None, 5.0, token)
                status, detail = "ok", ""
            except MeshError as exc:
                status, detail = "failing", str(exc)
            results.append({"id": inst["id"], "node": inst["node"], "status": status,
                            "latency_ms": round((trio.current_time() - start) * 1000, 3),
                            "detail": detail})

        async with trio.open_nursery() as nursery:
            for inst in rows:
                nursery.start_soon(check, inst)
        return sorted(results, key=lambda r: r["id"])

    async def watch(self, args: dict[str, Any], emit: Emit) -> None:
        ns = args.get("namespace")
        token = REQUEST_TOKEN.get()
        checked = not ns and REQUEST_REMOTE.get() and self.may_read is not None
        with self.registry.watch(namespaces.check(ns) if ns else None) as events:
            async for ev in events:
                if checked and not self.may_read(token, namespaces.of(ev.get("instance"))):
                    continue  # a namespace the remote caller may not read
                await emit(ev)

    async def list_namespaces(self, _: dict[str, Any]) -> Any:
        """Each namespace with its counts of services, instances, store keys and accounts (a
        namespace with only keys or accounts is listed too); a count that is not kept is
        null."""
        rows = {row["name"]: row for row in self.registry.namespace_counts()}
        accounts = self.accounts() if self.accounts is not None else None
        keys = self.store_keys() if self.store_keys is not None else None
        for ns in [*(accounts or {}), *(keys or {})]:
            rows.setdefault(ns, {"name": ns, "services": 0, "instances": 0})
        return [{**row, "store_keys": None if keys is None else keys.get(ns, 0),
                 "accounts": None if accounts is None else accounts.get(ns, 0)}
                for ns, row in sorted(rows.items())]


def in_namespace(ns: str) -> str:
    """" in namespace 'x'" for a message about a namespace other than the default."""
    return "" if ns == namespaces.DEFAULT else f" in namespace {ns!r}"
