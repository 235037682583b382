"""Daemon ops of the bot: which meshd account each chat user acts as (`meshd bot map`).

Rules:
- The map lives in the store's system database `bot` (table `users`, key: the chat user's
  id), replicated like every table; the store API never writes it (a system database).
- `bot.map` and `bot.unmap` take an admin of the account's namespace; `bot.users` lists the
  map: every namespace's entries for an admin of default (or the operator of a node holding
  an issuer key: the bot process itself, which then signs tokens for the mapped accounts),
  one namespace's for an admin of it.
- A user id is what Slack calls one: `U` or `W` then 2..20 capital letters or digits.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from meshd import namespaces
from meshd.errors import bad_request, not_found
from meshd.ops import Op

DB, USERS = "bot", "users"
USER_ID = re.compile(r"[UW][A-Z0-9]{2,20}")
ACCOUNT = re.compile(r"[A-Za-z0-9_.@:-]{1,128}")
ID = "meshd.bot"


def check_user(value: Any) -> str:
    if not isinstance(value, str) or not USER_ID.fullmatch(value):
        raise bad_request("a Slack user id is U or W then 2..20 capital letters or digits "
                          "(Slack: the user's profile, ⋮, Copy member ID)", id=ID)
    return value


class BotOps:
    def __init__(self, store: Any, require_admin: Callable[[str], Any]) -> None:
        self.store = store
        self.require_admin = require_admin

    def ops(self) -> list[Op]:
        return [Op("bot.map", self.map, "checked"), Op("bot.unmap", self.unmap, "checked"),
                Op("bot.users", self.users, "checked")]

    async def map(self, args: dict[str, Any]) -> Any:
        user = check_user(args.get("user"))
        account = args.get("account")
        if not isinstance(account, str) or not ACCOUNT.fullmatch(account):
            raise bad_request("account must be a meshd account's name", id=ID)
        ns = namespaces.check(args.get("namespace"))
        self.require_admin(ns)
        record = {"account": account, "namespace": ns}
        await self.store.write({"database": DB, "table": USERS, "key": user,
                                "value": json.dumps(record).encode()})
        return {"user": user, **record}

    async def unmap(self, args: dict[str, Any]) -> Any:
        user = check_user(args.get("user"))
        current = self.store.json_records(DB, USERS).get(user)
        if not isinstance(current, dict):
            raise not_found(f"{user} is not mapped", id=ID)
        self.require_admin(namespaces.check(current.get("namespace")))
        await self.store.delete({"database": DB, "table": USERS, "key": user})
        return {"unmapped": user}

    async def users(self, args: dict[str, Any]) -> Any:
        raw = args.get("namespace")
        ns = namespaces.check(raw) if raw is not None else None  # "" is default, as elsewhere
        self.require_admin(ns or namespaces.DEFAULT)
        out = []
        for user, rec in sorted(self.store.json_records(DB, USERS).items()):
            if not isinstance(rec, dict) or (
                    ns is not None and rec.get("namespace", namespaces.DEFAULT) != ns):
                continue
            out.append({"user": user, "account": rec.get("account"),
                        "namespace": rec.get("namespace", namespaces.DEFAULT)})
        return out

