"""Store and config through the local daemon.

    store = Store(database="shop", table="carts")
    await store.write("cart:1", b"...", ttl=3600)
    records = await store.read(prefix="cart:")
    await store.incr("visits", 1); await store.add("tags", "new")
    async for change in store.watch(prefix="cart:"): ...

    config = Config("billing", file="billing.json", env_prefix="BILLING_")
    host = await config.get("db.host")
    async for value in config.watch("db"): ...

Rules:
- Every call goes through the local daemon; errors are MeshError.
- Config layers, lowest first: the store, then `file` (JSON), then the environment
  (`<env_prefix>DB__HOST=...` is db.host; values parsed as JSON when they parse, else text).
  A path set in a higher layer hides the same path below it.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from meshd.control import ControlClient
from meshd.errors import MeshError
from meshd.store import paths

from .client import Client


class Store:
    """A table of a store database, in a namespace (`namespace=`, else the running
    service's, else MESHD_NAMESPACE, else default: as `Client`)."""

    def __init__(self, database: str = "default", table: str = "store",
                 addr: str | os.PathLike[str] | None = None, token: str | None = None,
                 namespace: str | None = None) -> None:
        self.database = database
        self.table = table
        self._client = Client(addr, token=token, namespace=namespace)

    def _args(self, **kw: Any) -> dict[str, Any]:
        return {"database": self.database, "table": self.table,
                "namespace": self._client.namespace, **kw}

    async def write(self, key: str, value: bytes | str, *, ttl: float | None = None,
                    metadata: dict[str, Any] | None = None, replicas: int = 1
                    ) -> dict[str, Any]:
        return await self._client._request("store.write", **self._args(
            key=key, value=value.encode() if isinstance(value, str) else value, ttl=ttl,
            metadata=metadata or {}, replicas=replicas))

    async def read(self, key: str | None = None, *, prefix: str | None = None,
                   suffix: str | None = None, limit: int = 0, offset: int = 0
                   ) -> list[dict[str, Any]]:
        if key is None and prefix is None and suffix is None:
            prefix = ""
        return await self._client._request("store.read", **self._args(
            key=key, prefix=prefix, suffix=suffix, limit=limit, offset=offset))

    async def get(self, key: str) -> bytes | None:
        """The value of `key`, or None when there is none."""
        try:
            rows = await self.read(key)
        except MeshError as exc:
            if exc.status == 404:
                return None
            raise
        return rows[0].get("value") if rows else None

    async def delete(self, key: str) -> None:
        await self._client._request("store.delete", **self._args(key=key))

    async def list(self, prefix: str | None = None) -> list[str]:
        return await self._client._request("store.list", **self._args(prefix=prefix))

    async def incr(self, key: str, delta: int = 1) -> int:
        return (await self._client._request("store.counter", **self._args(
            key=key, delta=delta)))["counter"]

    async def add(self, key: str, member: str) -> list[str]:
        return (await self._client._request("store.set", **self._args(
            key=key, op="add", member=member)))["members"]

    async def remove(self, key: str, member: str) -> list[str]:
        return (await self._client._request("store.set", **self._args(
            key=key, op="remove", member=member)))["members"]

    async def members(self, key: str) -> list[str]:
        return (await self._client._request("store.set", **self._args(
            key=key, op="members")))["members"]

    async def watch(self, prefix: str = "") -> AsyncIterator[dict[str, Any]]:
        client = ControlClient(self._client.path, token=self._client.token)
        try:
            async for ev in client.stream("store.watch", **self._args(prefix=prefix)):
                yield ev
        finally:
            await client.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()


class Config:
    """The config tree of a namespace (`namespace`, else the running service's, else
    MESHD_NAMESPACE, else default: as `Client`), layered with a file and the environment."""

    def __init__(self, namespace: str | None = None, *,
                 file: str | os.PathLike[str] | None = None, env_prefix: str | None = None,
                 addr: str | os.PathLike[str] | None = None, token: str | None = None) -> None:
        self._client = Client(addr, token=token, namespace=namespace)
        self.namespace = self._client.namespace
        self.file = Path(file) if file else None
        self.env_prefix = env_prefix

    def _overrides(self) -> dict[str, Any]:
        """file < environment, flattened to dot paths."""
        flat: dict[str, Any] = {}
        if self.file is not None and self.file.exists():
            try:
                data = json.loads(self.file.read_text())
            except json.JSONDecodeError as exc:
                raise MeshError(400, f"{self.file}: not valid JSON: {exc.msg} at line "
                                     f"{exc.lineno} column {exc.colno}", id="sdk") from None
            _flatten(data, "", flat)
        if self.env_prefix:
            for name, raw in os.environ.items():
                if name.startswith(self.env_prefix):
                    path = name[len(self.env_prefix):].lower().replace("__", ".")
                    try:
                        flat[path] = json.loads(raw)
                    except json.JSONDecodeError:
                        flat[path] = raw
        return flat

    def _layer(self, path: str, found: bool, value: Any) -> tuple[bool, Any]:
        tree: dict[str, Any] = {}
        if found:
            _set(tree, path.split(".") if path else [], value)
        for p, v in self._overrides().items():
            if not path or p == path or p.startswith(path + ".") or path.startswith(p + "."):
                _set(tree, p.split("."), v)
                found = True
        if not found:
            return False, None
        if not path:
            return True, tree
        return paths.lookup(tree, path.split("."))

    async def get(self, path: str = "", default: Any = None) -> Any:
        try:
            r = await self._client._request("config.get", namespace=self.namespace, path=path)
            found, value = True, r["value"]
        except MeshError as exc:
            if exc.status != 404:
                raise
            found, value = False, None
        found, value = self._layer(path, found, value)
        return value if found else default

    async def set(self, path: str, value: Any) -> None:
        await self._client._request("config.set", namespace=self.namespace, path=path,
                                    value=value)

    async def delete(self, path: str) -> None:
        await self._client._request("config.del", namespace=self.namespace, path=path)

    async def watch(self, path: str = "") -> AsyncIterator[Any]:
        """Yield the value at `path` each time it changes on this node (no restart needed)."""
        client = ControlClient(self._client.path, token=self._client.token)
        try:
            async for ev in client.stream("config.watch", namespace=self.namespace,
                                          path=path):
                found, value = self._layer(path, not ev["deleted"], ev["value"])
                yield value if found else None
        finally:
            await client.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()


def _flatten(data: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(data, dict) and data:
        for k, v in data.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif prefix:
        out[prefix] = data


def _set(tree: dict[str, Any], parts: list[str], value: Any) -> None:
    if not parts:
        if isinstance(value, dict):
            tree.update(value)
        return
    paths.parent(tree, parts)[parts[-1]] = value
