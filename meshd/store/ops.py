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
  before it runs ("checked"), in the op's namespace. A store op that names no table acts on
  table "store" and is checked for it (a watch without one: for "*", then per event).
- Rules match names, not trees, so what a read returns is checked too, not only what the
  request names: a rule denying store:orders:cards or config:team-a:db.password holds
  whatever the caller asks for. What the caller may not read is left out, as if absent
  (rather than refusing the request whenever some narrower rule denies: that would take
  guessing which rule patterns could match below a name; leaving out is the same rules
  decision made for each part):
  - a store watch checks each event for store:DATABASE:TABLE (a watch of every database,
    or of a database without a table, streams only the tables the caller may read);
  - config get and watch check every path below the one asked for (config:NS:PATH.KEY...)
    and leave out each denied path with everything under it; a change the caller cannot
    see is no event.
  Writes cannot leave anything out: config set and del of a path replace or delete all
  below it, so they are a 403 naming the rule when a path below it is denied, in the tree
  there now or in the value written.
- The system databases (auth, routing, of the default namespace) are for admins only and
  are never written through the store API: meshd writes them itself (`meshd auth ...`). The
  config database (every namespace's config tree) is reached through config ops only, which
  check each namespace's rules. A watch of every database leaves them all out.
- Listing databases and tables reads the mesh (resource mesh:store: for a remote caller, in
  the namespace listed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from meshd import namespaces
from meshd.errors import MeshError, bad_request
from meshd.ops import REQUEST_TOKEN, Emit, Finish, Op, mesh_resource

from .engines.bindings import ACTIVE, ENGINES_DB, check_binding
from .engines.migrate import Migration
from .service import CONFIG_DB, SYSTEM_DBS, StoreService, _now_ms, config_args

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


def caller_database(db: Any) -> str:
    """A database name as a caller gives it: text not starting with PREFIX (the kept names
    of other namespaces' databases are not the caller's to use); 400 otherwise."""
    if not isinstance(db, str):
        raise bad_request("database must be text", id="meshd.store")
    if db.startswith(PREFIX):
        raise bad_request(f"database names may not start with {PREFIX!r}", id="meshd.store")
    return db


def visible(value: Any, path: str, may: Callable[[str], bool]) -> Any:
    """`value` (the config at `path`) without the paths below it that `may` refuses, each
    with everything under it."""
    if not isinstance(value, dict):
        return value
    out = {}
    for key, sub in value.items():
        below = join_path(path, key)
        if may(below):
            out[key] = visible(sub, below, may)
    return out


def first_denied(value: Any, path: str, may: Callable[[str], bool]) -> str | None:
    """The first path below `path` in `value` (the config at it) that `may` refuses."""
    if isinstance(value, dict):
        for key, sub in value.items():
            below = join_path(path, key)
            denied = below if not may(below) else first_denied(sub, below, may)
            if denied is not None:
                return denied
    return None


def join_path(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


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
        listing = mesh_resource("store", per_namespace=True)
        return [
            self._store("store.write", st.write, write=True, fast=st.write_fast),
            self._store("store.read", st.read, fast=st.read_fast),
            self._store("store.delete", st.delete, write=True),
            self._store("store.list", st.list_keys),
            self._store("store.counter", st.counter, write=True),
            self._store("store.set", st.set_op, write=True),
            Op("store.watch", self.watch, "checked", "stream"),
            Op("store.databases", self.databases, listing),
            Op("store.databases.create", self.create_database, "checked"),
            Op("store.migrate", self.migrate, "checked", "stream"),
            Op("store.tables", self.tables, listing),
            Op("config.get", self.config_get, "checked"),
            Op("config.set", self.config_set, "checked"),
            Op("config.del", self.config_del, "checked"),
            Op("config.watch", self.config_watch, "checked", "stream"),
            Op("config.history", self.config_history, "checked"),
        ]

    # --- names and checks ----------------------------------------------------------------------

    def _store_args(self, args: dict[str, Any], write: bool,
                    watch: bool = False) -> dict[str, Any]:
        """Check the caller for the database and table `args` name, in their namespace; the
        args with the database as kept (a watch may name no database: every one)."""
        ns = namespaces.check(args.get("namespace"))
        if args.get("database") is None and watch:
            self._authorize(ns, ("store", "*", "*"))
            return {**args, "namespace": ns}
        db = caller_database(args.get("database") or "default")
        if ns == namespaces.DEFAULT and db == CONFIG_DB:
            raise MeshError(403, "the config database holds every namespace's config tree: "
                                 "use `meshd config` (config.*), which checks the rules of "
                                 "each namespace")
        if ns == namespaces.DEFAULT and db == ENGINES_DB:
            raise MeshError(403, "the engines database holds the engines' credentials: "
                                 "`meshd store databases` shows the bindings")
        if ns == namespaces.DEFAULT and db in SYSTEM_DBS:
            if write:
                raise MeshError(403, f"the {db} database is written by meshd itself (use "
                                     "`meshd auth ...`)")
            self.require_admin()
        table = args.get("table")
        self._authorize(ns, ("store", db, str(table) if table else "*" if watch else "store"))
        return {**args, "namespace": ns, "database": stored_name(ns, db)}

    def _authorize(self, ns: str, resource: tuple[str, str, str]) -> Any:
        """The caller (its principal), if the rules of `ns` let it reach `resource`."""
        return self.auth.check(REQUEST_TOKEN.get(), self.node, resource, namespace=ns)

    def _may(self, ns: str, who: Any) -> Callable[[tuple[str, str, str]], bool]:
        """Whether `who` may reach a resource of `ns`, by the rules as they are when asked
        (for leaving out of a read or watch what it may not see)."""
        return lambda resource: self.auth.allows(who, resource, ns)

    def _store(self, name: str, fn: Any, write: bool = False, fast: Any = None) -> Op:
        async def call(args: dict[str, Any]) -> Any:
            return await fn(self._store_args(args, write))

        def quick(args: dict[str, Any], token: str | None, finish: Finish, size: int) -> bool:
            """The op on a multiplexed control connection, answered without a task when the
            store can (an engine database): the same checks first; a refusal or anything
            else goes the ordinary way, which says why."""
            try:
                checked = self._store_args(args, write)
            except MeshError:
                return False
            return bool(fast(checked, finish))
        return Op(name, call, "checked", fast=quick if fast is not None else None)

    def _config_args(self, args: dict[str, Any]
                     ) -> tuple[dict[str, Any], str, Callable[[str], bool]]:
        """Check the caller for the config path `args` name: the args, the path, and whether
        the caller may reach a given path of the namespace."""
        ns = namespaces.check(args.get("namespace"))
        path = args.get("path") or ""
        who = self._authorize(ns, ("config", ns, str(path) or "*"))
        may = self._may(ns, who)
        return {**args, "namespace": ns}, str(path), lambda p: may(("config", ns, p))

    def _replaceable(self, args: dict[str, Any], value: Any) -> dict[str, Any]:
        """The checked args of a config set (of `value`) or del (None); 403 naming the rule
        if a path below the one it replaces is denied, in the tree now or in `value`."""
        checked, path, may = self._config_args(args)
        ns = checked["namespace"]
        config_args(checked)  # a bad path is a 400 before anything is looked at
        for tree in (self.store.config_value(ns, path)[1], value) if path else ():
            denied = first_denied(tree, path, may)
            if denied is not None:
                self._authorize(ns, ("config", ns, denied))  # raises, naming the rule
        return checked

    # --- config --------------------------------------------------------------------------------

    async def config_get(self, args: dict[str, Any]) -> Any:
        checked, path, may = self._config_args(args)
        found = await self.store.config_get(checked)
        return {**found, "value": visible(found["value"], path, may)}

    async def config_set(self, args: dict[str, Any]) -> Any:
        return await self.store.config_set(self._replaceable(args, args.get("value")),
                                           by=self._who())

    async def config_del(self, args: dict[str, Any]) -> Any:
        return await self.store.config_del(self._replaceable(args, None), by=self._who())

    async def config_history(self, args: dict[str, Any]) -> Any:
        """The namespace's recent config changes at, above or below a path, newest first;
        a change to a path the caller may not read is left out."""
        checked, path, may = self._config_args(args)
        config_args(checked)  # a bad path is a 400
        return [r for r in self.store.config_history(checked["namespace"], path)
                if may(r["path"])]

    def _who(self) -> str:
        """Who the current request acts as (recorded with a config change)."""
        return self.auth.identify(REQUEST_TOKEN.get(), self.node).id

    async def config_watch(self, args: dict[str, Any], emit: Emit) -> None:
        checked, path, may = self._config_args(args)
        await self.store.config_watch(checked, emit,
                                      shown=lambda v: visible(v, path, may))

    # --- streams and listings ------------------------------------------------------------------

    async def watch(self, args: dict[str, Any], emit: Emit) -> None:
        checked = self._store_args(args, False, watch=True)
        ns, every = checked["namespace"], checked.get("database") is None
        may = self._may(ns, self.auth.identify(REQUEST_TOKEN.get(), self.node))

        async def mine(ev: Any) -> None:
            stored = ev.get("database")
            if not isinstance(stored, str) or (every and stored in (*SYSTEM_DBS, CONFIG_DB)):
                return
            name = caller_name(ns, stored)
            if name is not None and may(("store", name, str(ev.get("table")))):
                await emit({**ev, "database": name})
        await self.store.watch(checked, mine)

    async def databases(self, args: dict[str, Any]) -> Any:
        """The namespace's databases: names, or with `detail` one row per database with
        its backend ("embedded", "postgres", "redis") and, while a migration copies it,
        "migrating_to"."""
        ns = namespaces.check(args.get("namespace"))
        kept = await self.store.databases(args)
        names = [(n, db) for n, db in ((caller_name(ns, db), db) for db in kept)
                 if n is not None]
        if not args.get("detail"):
            return [n for n, _ in names]
        bound = self.store.engines.rows()
        rows = []
        for name, db in names:
            b = bound.get(db)
            if b is None:
                rows.append({"name": name, "backend": "embedded"})
            elif b["state"] == ACTIVE:
                rows.append({"name": name, "backend": b["backend"]})
            else:
                rows.append({"name": name, "backend": "embedded",
                             "migrating_to": b["backend"]})
        return rows

    def _bindable(self, args: dict[str, Any]) -> tuple[str, str, str, str, str]:
        """Checked args of binding a database to an engine (an admin act: the binding holds
        a credential and decides where the data lives): (namespace, caller's name, kept
        name, backend, dsn)."""
        self.require_admin()
        ns = namespaces.check(args.get("namespace"))
        name = caller_database(args.get("database"))
        if not name or len(name) > 128 or "\x00" in name:
            raise bad_request("database must be 1..128 characters", id="meshd.store")
        if ns == namespaces.DEFAULT and (name in SYSTEM_DBS or name == CONFIG_DB):
            raise MeshError(403, f"the {name} database is meshd's own and stays embedded",
                            id="meshd.store")
        backend, dsn = check_binding(args.get("backend"), args.get("dsn"))
        return ns, name, stored_name(ns, name), backend, dsn

    async def create_database(self, args: dict[str, Any]) -> Any:
        """Bind a new database to an engine (every node serves it from there); the engine
        is reached first, so a binding that cannot work is a 503 and nothing is bound."""
        ns, name, db, backend, dsn = self._bindable(args)
        engines = self.store.engines
        if engines.binding(db) is not None:
            raise MeshError(409, f"database {name!r} is already bound to "
                                 f"{engines.binding(db)['backend']}", id="meshd.store")
        if db in self.store.rep.state.databases(_now_ms()):
            raise MeshError(409, f"database {name!r} holds data in the embedded store: move "
                                 f"it with `meshd store migrate {name} --to {backend}`",
                            id="meshd.store")
        await engines.probe(backend, dsn, db)
        await engines.bind(db, backend, dsn, ACTIVE, self._who())
        return {"database": name, "backend": backend, "namespace": ns}

    async def migrate(self, args: dict[str, Any], emit: Emit) -> None:
        _, name, db, backend, dsn = self._bindable({**args, "backend": args.get("to")})
        grace = args.get("grace", self.store.s.migrate_grace)
        if not isinstance(grace, int | float) or isinstance(grace, bool) or \
                not 0 <= grace <= 3600:
            raise bad_request("grace must be 0..3600 seconds", id="meshd.store")
        result = await Migration(self.store, db, name, backend, dsn, self._who(), grace,
                                 emit).run()
        await emit(result)

    async def tables(self, args: dict[str, Any]) -> Any:
        ns = namespaces.check(args.get("namespace"))
        db = caller_database(args.get("database") or "default")
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
        now = _now_ms()
        state = self.store.rep.state
        out: dict[str, int] = {}
        for db, table in list(state.tables):
            if db in SYSTEM_DBS or db == CONFIG_DB:
                continue
            n = state.count_live(db, table, now)
            if n:
                ns = namespace_of(db)
                out[ns] = out.get(ns, 0) + n
        return out
