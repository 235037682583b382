"""Auth through the local daemon: log in, create tokens, check who you are.

    auth = Auth()
    tokens = await auth.login("ada", "secret")      # {"token", "refresh_token", ...}
    client = Client(token=tokens["token"])
"""

from __future__ import annotations

import os
from typing import Any

from .client import Client


class Auth:
    def __init__(self, addr: str | os.PathLike[str] | None = None,
                 token: str | None = None) -> None:
        self._client = Client(addr, token=token)

    async def login(self, account: str, secret: str) -> dict[str, Any]:
        return await self._client._request("auth.login", id=account, secret=secret)

    async def refresh(self, refresh_token: str) -> dict[str, Any]:
        return await self._client._request("auth.refresh", refresh_token=refresh_token)

    async def whoami(self) -> dict[str, Any]:
        return await self._client._request("auth.whoami")

    async def create_account(self, id: str, secret: str, scopes: list[str],
                             type: str = "user") -> dict[str, Any]:
        return await self._client._request("auth.accounts.create", id=id, secret=secret,
                                           scopes=scopes, type=type)

    async def create_rule(self, id: str, resource: str, scope: str, access: str,
                          priority: int = 0) -> dict[str, Any]:
        return await self._client._request("auth.rules.create", id=id, resource=resource,
                                           scope=scope, access=access, priority=priority)

    async def create_token(self, account: str, ttl: float = 3600) -> str:
        return (await self._client._request("auth.token.create", account=account,
                                            ttl=ttl))["token"]

    async def revoke(self, token: str) -> None:
        await self._client._request("auth.token.revoke", token=token)

    async def aclose(self) -> None:
        await self._client.aclose()
