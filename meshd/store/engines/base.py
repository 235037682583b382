"""What a store engine is: the operations a database bound to an engine is served by.

Rules:
- An engine serves whole databases (by their kept names, meshd.store.ops.stored_name) with
  the operations of the embedded store; the store shell (service.py) validates every request
  as for the embedded store first, then hands it here. Records come back in the embedded
  store's shape (`record`), so the API, SDK and CLI cannot tell the backends apart.
- Nothing is acknowledged that the engine did not commit: every method returns only after
  the engine confirmed the change. Any failure of the engine (down, refused, timed out,
  misconfigured) is an `EngineDown`, which the shell answers as 503 with the cause; the cause
  never holds the DSN or its password (`redact`).
- Versions are the writer's hybrid clock ([wall_ms, counter]) and `written_by` its node: a
  write through any node stamps them, so a record reads the same through every node. The
  guarded operations (`copy_value`, `copy_delete`) apply only when the engine holds an older
  version: what `meshd store migrate` copies can never overwrite a newer write.
- Watches: an engine reports each committed change to `on_change(db, tbl, key, record,
  written_by)` (record None: deleted) from `run`, which the shell fans out to its watchers
  like embedded changes. What a watch sees of changes made by other clients of the engine is
  the engine's business (documented per engine in docs/store.md).
- Engines run blocking client libraries in worker threads, at most `pool` at a time per
  engine and node, and each call is bounded by `timeout` seconds.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from meshd.errors import MeshError

Record = dict[str, Any]
OnChange = Callable[[str, str, str, Record | None, str], None]
Wanted = Callable[[str, str, str], bool]

BACKENDS = ("postgres", "redis")


class EngineDown(MeshError):
    """The engine did not do what was asked (503, with the cause)."""

    def __init__(self, backend: str, cause: str) -> None:
        super().__init__(503, f"the {backend} engine failed: {cause}", id="meshd.store")


@dataclass(frozen=True)
class Query:
    """A read or listing: one key, or keys by prefix/suffix/substring with paging."""

    key: str | None = None
    prefix: str | None = None
    suffix: str | None = None
    contains: str | None = None
    limit: int = 0
    offset: int = 0

    def matches(self, key: str) -> bool:
        return (self.key is None or key == self.key) \
            and (self.prefix is None or key.startswith(self.prefix)) \
            and (self.suffix is None or key.endswith(self.suffix)) \
            and (self.contains is None or self.contains in key)

    def page(self, keys: list[str]) -> list[str]:
        keys = keys[self.offset:]
        return keys[:self.limit] if self.limit else keys


class Engine(Protocol):
    backend: str

    async def run(self, on_change: OnChange, wanted: Wanted, task_status: Any = ...) -> None:
        """Serve watches (and housekeeping) until cancelled; started once per engine. A
        change is read back and reported only if `wanted(db, tbl, key)` (some watcher
        follows it): without watchers, changes cost the engine nothing more."""

    async def close(self) -> None: ...

    async def write(self, db: str, tbl: str, key: str, value: bytes, metadata: dict[str, Any],
                    expiry: int | None, version: tuple[int, int], by: str) -> Record: ...

    async def read(self, db: str, tbl: str, q: Query, now_ms: int) -> list[Record]: ...

    async def delete(self, db: str, tbl: str, key: str, by: str) -> bool:
        """True if the key held anything."""

    async def list_keys(self, db: str, tbl: str, q: Query, now_ms: int) -> list[str]: ...

    async def tables(self, db: str) -> list[str]: ...

    async def counter(self, db: str, tbl: str, key: str, delta: int, by: str) -> int: ...

    async def members(self, db: str, tbl: str, key: str) -> list[str]: ...

    async def set_change(self, db: str, tbl: str, key: str, add: list[str], remove: list[str],
                         by: str) -> list[str]:
        """Add and remove members (removals first); the members after."""

    async def copy_value(self, db: str, tbl: str, key: str, value: bytes,
                         metadata: dict[str, Any], expiry: int | None,
                         version: tuple[int, int], by: str) -> bool:
        """Write unless the engine holds a newer version of the key's value."""

    async def copy_delete(self, db: str, tbl: str, key: str, version: tuple[int, int]) -> bool:
        """Remove the key's value unless the engine holds a newer version of it."""

    async def drop(self, db: str) -> int:
        """Remove every key of database `db` (a migration starting over); how many."""


def record(key: str, value: bytes | None, metadata: dict[str, Any] | None,
           expiry: int | None, version: tuple[int, int] | None, by: str | None,
           counter: int | None, members: list[str] | None, now_ms: int) -> Record:
    """A record as the embedded store shows it (meshd.store.state.view)."""
    out: Record = {"key": key}
    if value is not None and version is not None and (expiry is None or expiry > now_ms):
        out.update({"value": value, "metadata": metadata or {}, "expiry": expiry,
                    "written_by": by or "", "version": [version[0], version[1]]})
    if counter:
        out["counter"] = counter
    if members:
        out["members"] = sorted(members)
    return out


def live(rec: Record) -> bool:
    return "value" in rec or "counter" in rec or "members" in rec


_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^@/\s]*@", re.I)
_PASSWORD_KV = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'?|\S+)", re.I)


def redact(text: str, secret: str = "") -> str:
    """`text` with any URL userinfo, password=... pair, and the DSN itself blanked."""
    if secret:
        text = text.replace(secret, "<dsn>")
    text = _USERINFO.sub(r"\g<scheme><credentials>@", text)
    return _PASSWORD_KV.sub(r"\1<password>", text)


def where(dsn: str) -> str:
    """Where a DSN points, for showing: host, port and database, never credentials."""
    return redact(dsn).replace("<credentials>@", "")
