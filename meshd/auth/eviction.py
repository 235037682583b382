"""Evicting revoked nodes: once an admin revokes a node (`meshd nodes revoke`), this node
stops talking to it, whichever way the revocation reached us.

Rules:
- Every CHECK_EVERY seconds, and only when the revocation table changed: members whose
  identity is revoked are declared dead (membership refuses their alives from then on, so
  they cannot come back), and links that proved a revoked key are closed.
- Links (handshake) and membership (alives, datagrams) also refuse revoked keys on their
  own at once; this task removes what was already there when the revocation arrived.
- Nothing here writes state: each node enforces what it has merged.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from meshd.identity import node_id_from_public

from .service import AuthService

log = logging.getLogger("meshd.auth")
CHECK_EVERY = 0.5


class Evictor:
    def __init__(self, auth: AuthService, core: Any, membership: Any, links: Any) -> None:
        self.auth = auth
        self.core = core
        self.membership = membership
        self.links = links
        self._seen: Any = None

    def accept_sender(self, addr: str) -> bool:
        """Membership datagrams: refused from the address of a revoked member."""
        name = self.core.name_at(addr)
        if name is None:
            return True
        m = self.core.members.get(name)
        return m is None or not m.key or not self.auth.node_revoked(m.key)

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(CHECK_EVERY)
            version = self.auth._version("nodes")
            if version == self._seen:
                continue
            self._seen = version
            await self.enforce()

    async def enforce(self) -> None:
        ids, _ = self.auth._revoked_nodes()
        if not ids:
            return
        for m in self.core.member_list():
            if m.name == self.core.name or m.state not in (0, 1):
                continue
            if (m.key and node_id_from_public(m.key) in ids) or m.tags.get("id") in ids:
                log.warning("member %s at %s is revoked: evicting it", m.name, m.addr)
                self.membership.apply(self.core.evict(m.name, trio.current_time()))
        for key in {link.peer_public for link in self.links.live}:
            if node_id_from_public(key) in ids:
                n = await self.links.close_key(key)
                log.warning("closed %d link(s) of revoked node %s", n,
                            node_id_from_public(key)[:8])
