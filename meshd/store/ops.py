"""Control operations of the store and config, each checked against the rules.

Rules:
- Every store op is checked for store:DATABASE:TABLE and every config op for
  config:NAMESPACE:PATH with the caller's token (none: the local operator acts as this node)
  before it runs ("checked"); the database defaults to "default", as the namespace does.
- The system databases (auth, routing) are for admins only and are never written through
  the store API: meshd writes them itself (`meshd auth ...`). A watch of every database
  leaves them out.
- Listing databases and tables reads the mesh (resource mesh:store: for a remote caller).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from meshd.errors import MeshError
from meshd.ops import REQUEST_TOKEN, Emit, Op, mesh_resource

from .service import SYSTEM_DBS, StoreService


class StoreOps:
    def __init__(self, store: StoreService, auth: Any, node: str,
                 require_admin: Callable[[], Any]) -> None:
        self.store = store
        self.auth = auth
        self.node = node
        self.require_admin = require_admin

    def ops(self) -> list[Op]:
        st = self.store
        store = ("store", "database", "default", "table")
        config = ("config", "namespace", "default", "path")
        listing = mesh_resource("store")
        return [
            self._guarded("store.write", st.write, store, write=True),
            self._guarded("store.read", st.read, store),
            self._guarded("store.delete", st.delete, store, write=True),
            self._guarded("store.list", st.list_keys, store),
            self._guarded("store.counter", st.counter, store, write=True),
            self._guarded("store.set", st.set_op, store, write=True),
            self._guarded("store.watch", st.watch, store, stream=True),
            Op("store.databases", st.databases, listing),
            Op("store.tables", st.tables, listing),
            self._guarded("config.get", st.config_get, config),
            self._guarded("config.set", st.config_set, config),
            self._guarded("config.del", st.config_del, config),
            self._guarded("config.watch", st.config_watch, config, stream=True),
        ]

    def _check(self, args: dict[str, Any], what: tuple[str, str, str, str],
               write: bool) -> None:
        kind, name_key, default, sub_key = what
        name = args.get(name_key) or default
        sub = args.get(sub_key) or ""
        if kind == "store" and name in SYSTEM_DBS:
            if write:
                raise MeshError(403, f"the {name} database is written by meshd itself (use "
                                     "`meshd auth ...`)")
            self.require_admin()
        self.auth.check(REQUEST_TOKEN.get(), self.node, (kind, str(name), str(sub) or "*"))

    def _guarded(self, name: str, fn: Any, what: tuple[str, str, str, str],
                 write: bool = False, stream: bool = False) -> Op:
        """`fn` behind the rules for (kind, name, sub) of its arguments."""
        if stream:
            async def watch(args: dict[str, Any], emit: Emit) -> None:
                self._check(args, what, write)
                if what[0] == "store" and not args.get(what[1]):
                    async def user_only(ev: Any) -> None:
                        if ev.get("database") not in SYSTEM_DBS:
                            await emit(ev)
                    await fn(args, user_only)
                    return
                await fn(args, emit)
            return Op(name, watch, "checked", "stream")

        async def call(args: dict[str, Any]) -> Any:
            self._check(args, what, write)
            return await fn(args)
        return Op(name, call, "checked")
