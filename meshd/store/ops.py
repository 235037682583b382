"""Control operations of the store and config, per namespace, each checked against the rules.

Rules:
- Every store op acts in one namespace (`namespace`, default "default"; meshd.namespaces
  checks the name). A database of the default namespace keeps its own name (what existed
  before namespaces is the default namespace); a database of namespace NS is kept as
  "@NS/NAME" (`stored_name`), so `orders` in team-a and `orders` in team-b are different
  databases. Callers never see or give those names: a database name starting with "@" is a
  400, listings and watch events show the caller's names only, and a watch of every
  database follows the caller's namespace only.
- Config is per namespace too: the config tree of namespace NS is the config database's
  table NS, so `namespace` of config ops is the mesh namespace.
- Every store op is checked for store:DATABASE:TABLE and every config op for
  config:NAMESPACE:PATH with the caller's token (none: the local operator acts as this node)
  before it runs ("checked"), in the op's namespace.
- The system databases (auth, routing, of the default namespace) are for admins only and
  are never written through the store API: meshd writes them itself (`meshd auth ...`). The
  config database (every namespace's config tree) is reached through config ops only, which
  check each namespace's rules. A watch of every database leaves them all out.
- Listing databases and tables reads the mesh (resource mesh:store: for a remote caller).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from meshd import namespaces
from meshd.errors import MeshError, bad_request
from meshd.ops import REQUEST_TOKEN, Emit, Op, mesh_resource

from .service import CONFIG_DB, SYSTEM_DBS, StoreService

PREFIX = "@"


def stored_name(ns: str, db: str) -> str:
    """The name database `db` of namespace `ns` is kept under."""
    return db if ns == namespaces.DEFAULT else f"{PREFIX}{ns}/{db}"


def caller_name(ns: str, stored: str) -> str | None:
    """The caller's name of a kept database, if it belongs to namespace `ns`."""
    if ns == namespaces.DEFAULT:
        return None if stored.startswith(PREFIX) else stored
    head = f"{PREFIX}{ns}/"
    return stored[len(head):] if stored.startswith(head) else None


def namespace_of(stored: str) -> str:
    """The namespace a kept database belongs to."""
    if stored.startswith(PREFIX) and "/" in stored:
        return stored[len(PREFIX):stored.index("/")]
    return namespaces.DEFAULT


class StoreOps:
    def __init__(self, store: StoreService, auth: Any, node: str,
                 require_admin: Callable[[], Any]) -> None:
        self.store = store
        self.auth = auth
        self.node = node
        self.require_admin = require_admin

    def ops(self) -> list[Op]:
        st = self.store
        listing = mesh_resource("store")
        return [
            self._store("store.write", st.write, write=True),
            self._store("store.read", st.read),
            self._store("store.delete", st.delete, write=True),
            self._store("store.list", st.list_keys),
            self._store("store.counter", st.counter, write=True),
            self._store("store.set", st.set_op, write=True),
            Op("store.watch", self.watch, "checked", "stream"),
            Op("store.databases", self.databases, listing),
            Op("store.tables", self.tables, listing),
            self._config("config.get", st.config_get),
            self._config("config.set", st.config_set),
            self._config("config.del", st.config_del),
            Op("config.watch", self.config_watch, "checked", "stream"),
        ]

    # --- names -------------------------------------------------------------------------------

    def _store_args(self, args: dict[str, Any], write: bool,
                    database_required: bool = True) -> dict[str, Any]:
        """Check the caller for the database and table `args` name, in their namespace; the
        args with the database as kept."""
        ns = namespaces.check(args.get("namespace"))
        db = args.get("database")
        if db is None and not database_required:
            self._authorize(ns, ("store", "*", "*"))
            return {**args, "namespace": ns}
        db = db or "default"
        if not isinstance(db, str):
            raise bad_request("database must be text", id="meshd.store")
        if db.startswith(PREFIX):
            raise bad_request(f"database names may not start with {PREFIX!r}",
                              id="meshd.store")
        if ns == namespaces.DEFAULT and db == CONFIG_DB:
            raise MeshError(403, "the config database holds every namespace's config tree: "
                                 "use `meshd config` (config.*), which checks the rules of "
                                 "each namespace")
        if ns == namespaces.DEFAULT and db in SYSTEM_DBS:
            if write:
                raise MeshError(403, f"the {db} database is written by meshd itself (use "
                                     "`meshd auth ...`)")
            self.require_admin()
        self._authorize(ns, ("store", db, str(args.get("table") or "") or "*"))
        return {**args, "namespace": ns, "database": stored_name(ns, db)}

    def _authorize(self, ns: str, resource: tuple[str, str, str]) -> None:
        self.auth.check(REQUEST_TOKEN.get(), self.node, resource, namespace=ns)

    def _store(self, name: str, fn: Any, write: bool = False) -> Op:
        async def call(args: dict[str, Any]) -> Any:
            return await fn(self._store_args(args, write))
        return Op(name, call, "checked")

    def _config(self, name: str, fn: Any) -> Op:
        async def call(args: dict[str, Any]) -> Any:
            return await fn(self._config_args(args))
        return Op(name, call, "checked")

    def _config_args(self, args: dict[str, Any]) -> dict[str, Any]:
        ns = namespaces.check(args.get("namespace"))
        self._authorize(ns, ("config", ns, str(args.get("path") or "") or "*"))
        return {**args, "namespace": ns}

    # --- streams and listings ------------------------------------------------------------------

    async def watch(self, args: dict[str, Any], emit: Emit) -> None:
        checked = self._store_args(args, False, database_required=False)
        ns, every = checked["namespace"], checked.get("database") is None

        async def mine(ev: Any) -> None:
            stored = ev.get("database")
            if not isinstance(stored, str) or (every and stored in (*SYSTEM_DBS, CONFIG_DB)):
                return
            name = caller_name(ns, stored)
            if name is not None:
                await emit({**ev, "database": name})
        await self.store.watch(checked, mine)

    async def config_watch(self, args: dict[str, Any], emit: Emit) -> None:
        await self.store.config_watch(self._config_args(args), emit)

    async def databases(self, args: dict[str, Any]) -> Any:
        ns = namespaces.check(args.get("namespace"))
        kept = await self.store.databases(args)
        return [n for n in (caller_name(ns, db) for db in kept) if n is not None]

    async def tables(self, args: dict[str, Any]) -> Any:
        ns = namespaces.check(args.get("namespace"))
        db = args.get("database") or "default"
        if not isinstance(db, str) or db.startswith(PREFIX):
            raise bad_request(f"database must be text not starting with {PREFIX!r}",
                              id="meshd.store")
        try:
            return await self.store.tables({**args, "database": stored_name(ns, db)})
        except MeshError as exc:
            if exc.status == 404:
                raise MeshError(404, f"no database {db!r}" + (
                    f" in namespace {ns!r}" if ns != namespaces.DEFAULT else ""),
                    id="meshd.store") from None
            raise

    def counts(self) -> dict[str, int]:
        """Live keys per namespace (for `meshd namespaces`), system databases left out."""
        from .service import _now_ms
        from .state import live

        now = _now_ms()
        out: dict[str, int] = {}
        for (db, _table), t in self.store.rep.state.tables.items():
            if db in SYSTEM_DBS or db == CONFIG_DB:
                continue
            n = sum(1 for s in t.records.values() if live(s, now))
            if n:
                ns = namespace_of(db)
                out[ns] = out.get(ns, 0) + n
        return out
