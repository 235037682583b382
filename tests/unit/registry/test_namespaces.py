"""Registry namespaces: every instance belongs to one (records naming none are "default"),
reads select one, `greeter` in team-a and team-b are different services, and RPC picks only
the namespace's instances."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import trio

from meshd.errors import MeshError
from meshd.hlc import HLC
from meshd.membership.core import Member
from meshd.membership.messages import ALIVE
from meshd.registry.core import Entry, select, view
from meshd.registry.ops import RegistryOps
from meshd.registry.service import RegistryService, _validate_registration
from meshd.rpc.service import RpcService

NOW_MS = 1_700_000_000_000


def _member(name: str) -> Member:
    return Member(name, f"{name}:1", 1, ALIVE, {"boot": f"boot-{name}"}, 0.0)


class FakeCore:
    """The little of Membership the registry reads: who is alive, with which boot id."""

    def __init__(self) -> None:
        self.me = _member("me")
        self.members = {n: _member(n) for n in ("me", "a", "b", "c")}
        self.member_version = 1

    def member_list(self) -> list[Member]:
        return list(self.members.values())

    def alive_peers(self) -> list[str]:
        return [m.addr for m in self.members.values() if m.state == ALIVE and m.name != "me"]


def _record(node: str, inst: str, service: str, namespace: str | None) -> dict:
    record = {"service": service, "id": inst, "node": node, "address": f"{node}:1",
              "version": "1", "endpoints": [{"name": "Greeter.Hello"}], "metadata": {}}
    if namespace is not None:
        record["namespace"] = namespace
    return record


def _delta(*records: dict, tick: int = 0) -> dict:
    return {"t": "delta", "entries": [
        Entry(f"{r['node']}/{r['id']}", (NOW_MS, tick, r["node"]), f"boot-{r['node']}",
              r).to_wire() for r in records]}


A = _record("a", "greeter-a", "greeter", "team-a")
B = _record("b", "greeter-b", "greeter", "team-b")
OLD = _record("c", "greeter-c", "greeter", None)  # an old node's record: no namespace
OTHER = _record("a", "billing-a", "billing", "team-a")


def _registry() -> RegistryService:
    links = SimpleNamespace(handlers={})
    reg = RegistryService(FakeCore(), links, "boot-me")  # type: ignore[arg-type]
    reg.hlc = HLC("me", lambda: NOW_MS)
    reg.replicator.hlc = reg.hlc
    return reg


def _receive(reg: RegistryService, msg: dict) -> None:
    reg.replicator.receive("a:1", msg, trio.current_time())


def test_view_fills_in_the_default_namespace_and_select_filters():
    rows = [view(Entry(f"{r['node']}/{r['id']}", (1, 0, "x"), "b", r)) for r in (A, B, OLD)]
    assert [r["namespace"] for r in rows] == ["team-a", "team-b", "default"]
    assert select(rows, "greeter", "team-a") == [rows[0]]
    assert select(rows, "greeter", "team-b") == [rows[1]]
    assert select(rows, "greeter") == [rows[2]], "the default namespace unless told"
    assert select(rows, "greeter", None) == rows
    assert select(rows, "greeter", "nope") == []
    assert select(rows, "billing", "team-a") == []


async def test_same_service_name_in_two_namespaces_is_two_services():
    reg = _registry()
    _receive(reg, _delta(A, B, OLD, OTHER))
    assert [i["id"] for i in reg.instances("greeter", "team-a")] == ["greeter-a"]
    assert [i["id"] for i in reg.instances("greeter", "team-b")] == ["greeter-b"]
    assert [i["id"] for i in reg.instances("greeter")] == ["greeter-c"]
    assert {i["id"] for i in reg.instances("greeter", None)} == {"greeter-a", "greeter-b",
                                                                 "greeter-c"}
    assert reg.instances("greeter", "team-c") == []
    assert sorted(reg.services("team-a"), key=lambda s: s["name"]) == [
        {"name": "billing", "instances": 1, "nodes": ["a"], "versions": ["1"],
         "namespace": "team-a", "tags": []},
        {"name": "greeter", "instances": 1, "nodes": ["a"], "versions": ["1"],
         "namespace": "team-a", "tags": []}]
    assert [s["name"] for s in reg.services()] == ["greeter"]
    assert reg.services()[0]["nodes"] == ["c"]
    assert reg.services("nope") == []
    assert reg.namespace_counts() == [
        {"name": "default", "services": 1, "instances": 1},
        {"name": "team-a", "services": 2, "instances": 2},
        {"name": "team-b", "services": 1, "instances": 1}]


async def test_the_cache_keys_on_the_namespace():
    reg = _registry()
    _receive(reg, _delta(A, B))
    assert [i["id"] for i in reg.instances("greeter", "team-a")] == ["greeter-a"]
    assert [i["id"] for i in reg.instances("greeter", "team-b")] == ["greeter-b"]
    assert [i["id"] for i in reg.instances("greeter", "team-a")] == ["greeter-a"]


async def test_default_is_listed_even_when_empty():
    reg = _registry()
    assert reg.namespace_counts() == [{"name": "default", "services": 0, "instances": 0}]


def _drain(events: trio.MemoryReceiveChannel) -> list[dict]:
    out = []
    while True:
        try:
            out.append(events.receive_nowait())
        except trio.WouldBlock:
            return out


async def test_watch_follows_one_namespace_or_all():
    reg = _registry()
    with reg.watch("team-a") as team_a, reg.watch() as everything:
        _receive(reg, _delta(A, B, OLD))
        gone = Entry("a/greeter-a", (NOW_MS, 9, "a"), "boot-a", None)
        _receive(reg, {"t": "delta", "entries": [gone.to_wire()]})
        seen = _drain(team_a)
        assert [(e["kind"], e["instance"]["id"]) for e in seen] == [
            ("create", "greeter-a"), ("delete", "greeter-a")]
        assert seen[1]["instance"]["namespace"] == "team-a"
        assert seen[1]["instance"]["service"] == "greeter"
        assert len(_drain(everything)) == 4
    # a watch whose block ended is gone at once, not when the next change finds it closed
    assert reg._watchers == []


def test_registration_takes_a_checked_namespace():
    base = {"service": "greeter", "endpoints": []}
    assert _validate_registration(base)["namespace"] == "default"
    assert _validate_registration({**base, "namespace": "team-a"})["namespace"] == "team-a"
    with pytest.raises(MeshError) as exc:
        _validate_registration({**base, "namespace": "Team A"})
    assert exc.value.status == 400 and "allowed: [a-z0-9-]{1,63}" in exc.value.detail


async def test_ops_read_one_namespace():
    reg = _registry()
    _receive(reg, _delta(A, B, OLD))
    ops = RegistryOps(reg, None)  # type: ignore[arg-type]
    assert [s["nodes"] for s in await ops.services({"namespace": "team-b"})] == [["b"]]
    assert [s["nodes"] for s in await ops.services({})] == [["c"]]
    assert await ops.services({"namespace": "unknown"}) == []
    info = await ops.describe({"service": "greeter", "namespace": "team-a"})
    assert info["namespace"] == "team-a"
    assert [i["id"] for i in info["instances"]] == ["greeter-a"]
    with pytest.raises(MeshError) as exc:
        await ops.describe({"service": "greeter", "namespace": "unknown"})
    assert exc.value.status == 404 and "has no instances in namespace 'unknown'" in \
        exc.value.detail
    for bad in ("Team-A", 7, "a" * 64):
        with pytest.raises(MeshError) as exc:
            await ops.services({"namespace": bad})
        assert exc.value.status == 400
    rows = await ops.list_namespaces({})
    assert rows == [
        {"name": "default", "services": 1, "instances": 1, "store_keys": None, "accounts": None},
        {"name": "team-a", "services": 1, "instances": 1, "store_keys": None, "accounts": None},
        {"name": "team-b", "services": 1, "instances": 1, "store_keys": None, "accounts": None}]


async def test_rpc_candidates_are_the_namespace_s_instances_only():
    reg = _registry()
    _receive(reg, _delta(A, B, OLD))
    rpc = RpcService(reg, reg.links, reg.core)  # type: ignore[arg-type]
    assert [i["id"] for i in rpc.candidates("greeter", "Greeter.Hello", "team-a")] == [
        "greeter-a"]
    assert [i["id"] for i in rpc.candidates("greeter", "Greeter.Hello", "team-b")] == [
        "greeter-b"]
    assert [i["id"] for i in rpc.candidates("greeter", "Greeter.Hello")] == ["greeter-c"]
    with pytest.raises(MeshError) as exc:
        rpc.candidates("greeter", "Greeter.Hello", "team-c")
    assert exc.value.status == 404
    with pytest.raises(MeshError) as exc:
        await rpc.call("greeter", "Greeter.Hello", {}, 1.0, namespace="Bad")
    assert exc.value.status == 400


async def test_a_service_lists_its_instances_metadata_as_tags():
    reg = _registry()
    one = {**_record("a", "pay-a", "payments", "team-a"), "metadata": {"tier": "web"}}
    two = {**_record("b", "pay-b", "payments", "team-a"),
           "metadata": {"tier": "web", "team": "pay"}}
    _receive(reg, _delta(one, two))
    assert reg.services("team-a")[0]["tags"] == ["team=pay", "tier=web"]
