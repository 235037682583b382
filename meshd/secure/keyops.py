"""The cluster keyring across the mesh: `meshd keys list/install/use/remove`.

Rules:
- Every key operation is the local operator's (the keyring is the cluster secret): a remote
  caller never reaches these ops.
- An operation applies here first (a bad secret is a 400 before anything is sent), then goes
  to every live member over the "keys" channel, never to a revoked node; each answers for
  itself within 5 s. The reply counts the nodes that applied it and lists the ones that did
  not, with why.
- The "keys" channel is only reachable over authenticated links (members holding the
  current secret); requests are decoded with size and depth bounds.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
import trio

from meshd import wire
from meshd.errors import bad_request
from meshd.membership.core import Membership
from meshd.ops import Op
from meshd.transport.links import Channel, ChannelClosed, LinkError, LinkManager

from .keyring import Keyring, KeyringError, format_secret, parse_secret

CHANNEL = "keys"


class KeyringOps:
    def __init__(self, keyring: Keyring, data_dir: Path, core: Membership, links: LinkManager,
                 revoked: Callable[[bytes], bool]) -> None:
        self.keyring = keyring
        self.data_dir = data_dir
        self.core = core
        self.links = links
        self.revoked = revoked
        links.handlers[CHANNEL] = self._serve

    def ops(self) -> list[Op]:
        return [Op("keys.list", self.list, "operator"),
                *(Op(f"keys.{op}", self._handler(op), "operator")
                  for op in ("install", "use", "remove"))]

    def apply(self, op: str, secret: bytes) -> None:
        if op == "install":
            self.keyring.install(secret)
        elif op == "use":
            self.keyring.install(secret)
            self.keyring.use(secret)
        elif op == "remove":
            self.keyring.remove(secret)
        else:
            raise KeyringError(f"unknown key operation {op!r}")
        self.keyring.save(self.data_dir)

    async def _serve(self, ch: Channel) -> None:
        try:
            req = wire.loads(await ch.receive(), max_depth=4, max_bytes=4096)
        except wire.WireError:
            return
        try:
            if not isinstance(req, dict):
                raise KeyringError("bad request")
            if req.get("op") == "list":
                reply: dict[str, Any] = {"ok": True, "keys": [
                    format_secret(s) for s in self.keyring.secrets()],
                    "primary": format_secret(self.keyring.primary)}
            else:
                self.apply(str(req.get("op")), parse_secret(str(req.get("secret"))))
                reply = {"ok": True}
        except KeyringError as exc:
            reply = {"ok": False, "error": str(exc)}
        await ch.send(cbor2.dumps(reply))

    async def _fanout(self, request: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
        me = self.core.me.name
        peers = [m for m in self.core.member_list()  # never to revoked nodes
                 if m.name != me and m.state in (0, 1)
                 and not (m.key and self.revoked(m.key))]
        replies: list[dict[str, Any]] = []
        errors: list[str] = []

        async def ask(m: Any) -> None:
            try:
                with trio.fail_after(5):
                    async with await self.links.open_channel(m.addr, CHANNEL) as ch:
                        await ch.send(cbor2.dumps(request))
                        reply = wire.loads(await ch.receive(), max_depth=4, max_bytes=65536)
                if isinstance(reply, dict) and reply.get("ok"):
                    replies.append(reply)
                else:
                    why = reply.get("error", "refused") if isinstance(reply, dict) else "?"
                    errors.append(f"{m.name}: {str(why)[:200]}")
            except (LinkError, ChannelClosed, trio.TooSlowError, ValueError) as exc:
                errors.append(f"{m.name}: {exc or 'no answer'}")

        async with trio.open_nursery() as nursery:
            for m in peers:
                nursery.start_soon(ask, m)
        return replies, errors

    def _handler(self, op: str) -> Callable[[dict[str, Any]], Any]:
        async def handler(args: dict[str, Any]) -> Any:
            try:
                secret = parse_secret(str(args.get("secret", "")))
                self.apply(op, secret)
            except KeyringError as exc:
                raise bad_request(str(exc)) from None
            replies, errors = await self._fanout({"op": op, "secret": format_secret(secret)})
            return {"op": op, "nodes": len(replies) + len(errors) + 1,
                    "ok": len(replies) + 1, "errors": errors}
        return handler

    async def list(self, _: dict[str, Any]) -> Any:
        replies, errors = await self._fanout({"op": "list"})
        mine = {"keys": [format_secret(s) for s in self.keyring.secrets()],
                "primary": format_secret(self.keyring.primary)}
        counts: dict[str, dict[str, Any]] = {}
        for r in [mine, *replies]:
            for k in r.get("keys", []):
                entry = counts.setdefault(k, {"key": k, "nodes": 0, "primary_on": 0})
                entry["nodes"] += 1
            p = r.get("primary")
            if p in counts:
                counts[p]["primary_on"] += 1
        return {"total_nodes": len(replies) + len(errors) + 1, "keys": list(counts.values()),
                "errors": errors}
