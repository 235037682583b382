"""`meshd topics` for the whole cluster: every live node's durable logs and subscriptions.

Theory of operation: durable state is spread out (each node is the origin of its own log
and keeps its consumers' counts), and so are core subscriptions (their buffers and drops
live where the subscriber is). `gather` asks every live member over the link channel
"broker" (`{"t": "query", "ns": NS}`), each answers with `local_view` for that namespace,
and the answers are merged: per durable topic, its messages and each durable subscriber's
counts summed over nodes (with the per-node figures under `nodes`), and every node's
subscriptions with their drops.

Rules:
- A node that does not answer within QUERY_TIMEOUT seconds is listed under `unanswered`;
  the overview is never held up by it.
- Answers are checked like any peer input: a malformed one counts as unanswered.
- A member may ask (it acts as a node, and nodes see every namespace); an answer carries
  counts and names, never messages.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import cbor2
import trio

from meshd import namespaces, wire
from meshd.transport.links import ChannelClosed, LinkError, LinkManager

from .links import CHANNEL

log = logging.getLogger("meshd.broker")
QUERY_TIMEOUT = 3.0
COUNTS = ("pending", "waiting", "scheduled", "dead", "lost")


def local_view(durable_rows: list[dict[str, Any]],
               subscriptions: list[dict[str, Any]]) -> dict[str, Any]:
    return {"t": "view", "durable": durable_rows, "subscriptions": subscriptions}


def answer(msg: dict[str, Any], view: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    """The reply to a query (namespace checked)."""
    ns = namespaces.check(msg.get("ns"))
    return view(ns)


async def gather(me: str, ns: str, own: dict[str, Any], members: list[tuple[str, str]],
                 links: LinkManager) -> dict[str, Any]:
    """Ask every member (name, address) but us; merge with our own view."""
    views: dict[str, dict[str, Any]] = {me: own}
    unanswered: list[str] = []

    async def ask(name: str, addr: str) -> None:
        try:
            with trio.fail_after(QUERY_TIMEOUT):
                async with await links.open_channel(addr, CHANNEL) as ch:
                    await ch.send(cbor2.dumps({"t": "query", "ns": ns}))
                    reply = wire.loads(await ch.receive(), max_depth=32)
            if not isinstance(reply, dict) or reply.get("t") != "view" \
                    or not isinstance(reply.get("durable"), list) \
                    or not isinstance(reply.get("subscriptions"), list):
                raise wire.WireError("not a view")
            views[name] = reply
        except (LinkError, ChannelClosed, trio.TooSlowError, wire.WireError) as exc:
            log.debug("no broker view from %s: %s", name, exc)
            unanswered.append(name)

    async with trio.open_nursery() as nursery:
        for name, addr in members:
            if name != me:
                nursery.start_soon(ask, name, addr)
    return merge(views, sorted(unanswered))


def merge(views: dict[str, dict[str, Any]], unanswered: list[str]) -> dict[str, Any]:
    topics: dict[tuple[str, str], dict[str, Any]] = {}
    subscriptions: list[dict[str, Any]] = []
    for node in sorted(views):
        view = views[node]
        for row in view["durable"]:
            if not isinstance(row, dict) or not isinstance(row.get("topic"), str):
                continue
            key = (str(row.get("namespace")), row["topic"])
            t = topics.setdefault(key, {
                "namespace": key[0], "topic": key[1], "durable": True,
                "settings": row.get("settings") or {}, "messages": 0, "subscribers": {},
                "nodes": {}})
            t["messages"] += _int(row.get("messages"))
            t["nodes"][node] = {"messages": _int(row.get("messages")),
                                "last_seq": _int(row.get("last_seq")),
                                "copies": row.get("copies") or {},
                                "subscribers": row.get("subscribers") or {}}
            for name, counts in (row.get("subscribers") or {}).items():
                total = t["subscribers"].setdefault(str(name), dict.fromkeys(COUNTS, 0))
                for k in COUNTS:
                    total[k] += _int((counts or {}).get(k))
        for sub in view["subscriptions"]:
            if isinstance(sub, dict):
                subscriptions.append({**sub, "node": node})
    return {"durable": [topics[k] for k in sorted(topics)], "subscriptions": subscriptions,
            "unanswered": unanswered}


def _int(value: Any) -> int:
    return value if type(value) is int and value >= 0 else 0
