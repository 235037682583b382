"""Who a chat user acts as, and the daemon's ops as that user (the bot process, trio).

Rules:
- The map of chat users to meshd accounts comes from the daemon (`bot.users`), asked with
  the bot's own identity (the operator of the node it runs on, which must hold an issuer key,
  or `--token` of an admin) and kept MAP_TTL seconds: a `meshd bot map` takes effect within
  that.
- A mapped user acts with a token of its account, signed by the daemon
  (`auth.token.create`, TOKEN_TTL, renewed a minute before it ends), in the account's
  namespace, as a remote caller: the daemon checks that account's rules for every op. An
  unmapped user acts as nobody (remote, no token): only what is open to the public scope.
- The bot's own identity never runs a user's command.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from meshd import namespaces
from meshd.control import ControlClient

MAP_TTL = 5.0
TOKEN_TTL = 3600.0
RENEW_BEFORE = 60.0


class UserMesh:
    """The daemon's ops as one user: `account` ("" = nobody) in `namespace`."""

    def __init__(self, path: Path, account: str, namespace: str, token: str | None) -> None:
        self.account = account
        self.namespace = namespace
        self.client = ControlClient(path, token, remote=True)

    async def call(self, op: str, /, **args: Any) -> Any:
        return await self.client.call(op, **args)


class Directory:
    def __init__(self, path: Path, token: str | None = None) -> None:
        self.path = path
        self.token = token  # the bot's own (an admin's), or None: the node's operator
        self._map: dict[str, tuple[str, str]] = {}
        self._map_at = -math.inf
        self._tokens: dict[tuple[str, str], tuple[str, float]] = {}
        self._lock = trio.Lock()

    async def _as_bot(self, op: str, /, **args: Any) -> Any:
        client = ControlClient(self.path, self.token)
        try:
            return await client.call(op, **args)
        finally:
            await client.aclose()

    async def who(self, user: str) -> tuple[str, str]:
        """(account, namespace) of a chat user; ("", default) when not mapped."""
        async with self._lock:
            if time.monotonic() - self._map_at >= MAP_TTL:
                rows = await self._as_bot("bot.users")
                self._map = {r["user"]: (r["account"], r["namespace"]) for r in rows}
                self._map_at = time.monotonic()
        return self._map.get(user, ("", namespaces.DEFAULT))

    async def token_of(self, account: str, namespace: str) -> str:
        key = (account, namespace)
        async with self._lock:
            held = self._tokens.get(key)
            if held is None or held[1] - time.monotonic() < RENEW_BEFORE:
                r = await self._as_bot("auth.token.create", account=account,
                                       namespace=namespace, ttl=TOKEN_TTL)
                held = (r["token"], time.monotonic() + float(r.get("expires_in", TOKEN_TTL)))
                self._tokens[key] = held
        return held[0]

    @asynccontextmanager
    async def mesh(self, user: str) -> AsyncIterator[UserMesh]:
        """The daemon as `user` for one command (a MeshError when the bot cannot tell who
        that is, or cannot get its account a token)."""
        account, namespace = await self.who(user)
        token = await self.token_of(account, namespace) if account else None
        mesh = UserMesh(self.path, account, namespace, token)
        try:
            yield mesh
        finally:
            await mesh.client.aclose()
