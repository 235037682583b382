"""The bot's commands: each built-in is the right daemon op with the right arguments (in the
user's namespace); services provide commands through `bot.command=NAME` (never shadowing a
built-in, their usage from Command.Help, run through Command.Exec as the user); and BotOps,
the daemon's bot.map / bot.unmap / bot.users, checks its input and asks for the right
namespace's admin."""

from __future__ import annotations

import json
from typing import Any

import pytest

from meshd.bot.commands import TIMEOUT, builtins, provided_commands
from meshd.bot.core import Bot, Reply
from meshd.bot.ops import DB, USERS, BotOps, check_user
from meshd.errors import MeshError


class FakeMesh:
    """A Mesh without a daemon: records (op, args); answers from `answers` by op (or by
    (op, endpoint) for rpc.call); an answer that is an exception is raised."""

    def __init__(self, answers: dict[Any, Any] | None = None, account: str = "alice",
                 namespace: str = "team") -> None:
        self.answers = {"services": [], **(answers or {})}
        self.account = account
        self.namespace = namespace
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def call(self, op: str, /, **args: Any) -> Any:
        self.calls.append((op, args))
        key = (op, args.get("endpoint"))
        answer = self.answers[key] if key in self.answers else self.answers[op]
        if isinstance(answer, BaseException):
            raise answer
        return answer


def bot() -> Bot:
    return Bot(builtins(), extra=provided_commands)


async def run(line: str, answers: dict[Any, Any] | None = None, **kw: Any
              ) -> tuple[Reply, FakeMesh]:
    mesh = FakeMesh(answers, **kw)
    return await bot().handle("U1", line, mesh), mesh


# --- built-ins -----------------------------------------------------------------------------

async def test_nodes():
    reply, mesh = await run("nodes", {"members": [
        {"name": "a", "status": "alive", "addr": "10.0.0.1:7946", "rtt_ms": 1.5},
        {"name": "b", "status": "suspect", "address": "10.0.0.2:7946"}]})
    assert mesh.calls == [("members", {})]
    assert reply.ok and reply.text == "2 nodes"
    rows = reply.code.splitlines()
    assert rows[1].split() == ["a", "alive", "10.0.0.1:7946", "1.5", "ms"]
    assert rows[2].split() == ["b", "suspect", "10.0.0.2:7946", "-"]


async def test_services_in_the_users_namespace():
    reply, mesh = await run("services", {"services": [
        {"name": "web", "instances": 2, "nodes": ["a", "b"], "versions": ["1.0"]}]},
        namespace="team")
    assert mesh.calls == [("services", {"namespace": "team"})]
    assert reply.text == "1 services in namespace team"
    assert reply.code.splitlines()[1].split() == ["web", "2", "a,b", "1.0"]


async def test_describe():
    info = {"name": "web", "instances": [
        {"id": "web-1", "node": "a", "address": "x:1", "version": "2",
         "endpoints": [{"name": "Get", "request": {"type": "object"}, "response": None},
                       {"name": "Watch", "stream": True}]}]}
    reply, mesh = await run("describe web", {"describe": info}, namespace="ops")
    assert mesh.calls == [("describe", {"service": "web", "namespace": "ops"})]
    assert reply.text == "web: 1 instances"
    assert "instance web-1 on a (x:1) version 2" in reply.code
    assert '  Get: {"type": "object"} -> null' in reply.code
    assert "  Watch (stream): null -> null" in reply.code


async def test_call_is_rpc_call_with_body_endpoint_timeout_and_namespace():
    reply, mesh = await run('call svc Get {"id": 7}', {"rpc.call": {"name": "x"}},
                            namespace="ops")
    assert mesh.calls == [("rpc.call", {"service": "svc", "endpoint": "Get",
                                        "body": {"id": 7}, "timeout": TIMEOUT, "meta": {},
                                        "namespace": "ops"})]
    assert reply.ok and reply.text == "svc Get answered"
    assert json.loads(reply.code) == {"name": "x"}


async def test_call_without_a_body_sends_none():
    _, mesh = await run("call svc Ping", {"rpc.call": "pong"})
    assert mesh.calls[0][1]["body"] is None


async def test_health_is_not_ok_when_an_instance_fails():
    rows = [{"id": "w1", "node": "a", "status": "ok", "latency_ms": 1.25, "detail": ""},
            {"id": "w2", "node": "b", "status": "failing", "latency_ms": 5000.0,
             "detail": "503 unavailable: timeout"}]
    reply, mesh = await run("health web", {"health": rows}, namespace="team")
    assert mesh.calls == [("health", {"service": "web", "namespace": "team"})]
    assert not reply.ok and reply.text == "web: 1 of 2 instances ok"
    assert "503 unavailable: timeout" in reply.code
    ok, _ = await run("health web", {"health": rows[:1]})
    assert ok.ok and ok.text == "web: 1 of 1 instances ok"


async def test_logs_with_a_limit_and_its_bounds():
    records = {"records": [{"time": 0, "level": "warning", "instance": "web-1",
                            "message": "disk full"}]}
    reply, mesh = await run("logs web", {"debug.logs": records})
    assert mesh.calls == [("debug.logs", {"service": "web", "limit": 20})]
    assert reply.text == "last 1 log lines of web"
    assert reply.code == "00:00:00 warn web-1: disk full"
    for n in ("1", "500", "37"):
        _, mesh = await run(f"logs web {n}", {"debug.logs": {"records": []}})
        assert mesh.calls == [("debug.logs", {"service": "web", "limit": int(n)})]
    for n in ("0", "501", "-1", "ten", "1e2"):
        reply, mesh = await run(f"logs web {n}", {"debug.logs": {"records": []}})
        assert not reply.ok and "1..500" in reply.text and "`logs SERVICE [N]`" in reply.text
        assert mesh.calls == [], n


async def test_stats_of_the_nodes_and_of_a_service():
    nodes = {"nodes": [{"node": "a", "sample": {"uptime": 61.2, "cpu_seconds": 2.25,
                                                 "rss_bytes": 40e6, "services": 3}}]}
    reply, mesh = await run("stats", {"debug.stats": nodes})
    assert mesh.calls == [("debug.stats", {})]
    assert reply.text == "1 nodes"
    assert reply.code.splitlines()[1].split() == ["a", "61", "s", "2.2", "s", "40", "MB", "3"]
    svc = {"nodes": [{"node": "a", "instances": [{"instance": "web-1", "endpoints": {
        "Get": {"count": 10, "errors": 1, "mean_ms": 1.5, "p99_ms": 8}}}]}]}
    reply, mesh = await run("stats web", {"debug.stats": svc})
    assert mesh.calls == [("debug.stats", {"service": "web"})]
    assert reply.text == "web: 1 endpoints called"
    assert reply.code.splitlines()[1].split() == [
        "a", "web-1", "Get", "10", "1", "1.50", "ms", "<=", "8", "ms"]


async def test_config_get_and_set():
    reply, mesh = await run("config get feature.x", {"config.get": {"value": {"on": True}}},
                            namespace="team")
    assert mesh.calls == [("config.get", {"namespace": "team", "path": "feature.x"})]
    assert reply.text == "config feature.x" and json.loads(reply.code) == {"on": True}
    reply, mesh = await run('config set feature.x {"on": false, "pct": 5}',
                            {"config.set": {}}, namespace="team")
    assert mesh.calls == [("config.set", {"namespace": "team", "path": "feature.x",
                                          "value": {"on": False, "pct": 5}})]
    assert reply.ok and reply.text == "config feature.x set"


async def test_ps_with_and_without_a_name():
    answer = {"specs": [{}], "replicas": [
        {"name": "web", "slot": "0", "node": "a", "state": "running", "pid": 42,
         "restarts": 1, "version": "3"},
        {"name": "web", "slot": "1", "node": None, "state": "pending"}]}
    reply, mesh = await run("ps", {"runtime.ps": answer}, namespace="team")
    assert mesh.calls == [("runtime.ps", {"namespace": "team"})]
    assert reply.text == "2 replicas of 1 managed services"
    assert reply.code.splitlines()[2].split() == ["web", "1", "-", "pending", "-", "0", "-"]
    _, mesh = await run("ps web", {"runtime.ps": answer}, namespace="team")
    assert mesh.calls == [("runtime.ps", {"namespace": "team", "name": "web"})]


async def test_restart_is_a_rolling_update():
    reply, mesh = await run("restart web", {"runtime.update": {"version": 4,
                                                                "source": "/srv/web"}},
                            namespace="team")
    assert mesh.calls == [("runtime.update", {"namespace": "team", "name": "web"})]
    assert reply.ok and "v4" in reply.text and "/srv/web" in reply.text


async def test_publish():
    reply, mesh = await run('publish orders.new {"id": 1, "items": ["a b"]}',
                            {"broker.publish": {"id": "m-9"}}, namespace="shop")
    assert mesh.calls == [("broker.publish", {"topic": "orders.new",
                                              "body": {"id": 1, "items": ["a b"]},
                                              "headers": {}, "namespace": "shop"})]
    assert reply.text == "published m-9 on orders.new"


# --- service commands ----------------------------------------------------------------------

DICE = {"name": "dice", "instances": 1, "tags": ["bot.command=roll", "team=games"]}


async def test_a_service_tag_adds_a_command_run_through_command_exec():
    answers = {"services": [DICE],
               ("rpc.call", "Command.Exec"): {"text": "rolled 7", "code": "3 + 4"}}
    reply, mesh = await run("roll 2d6 fast", answers, account="alice", namespace="games")
    assert reply == Reply("rolled 7", "3 + 4")
    assert mesh.calls[-1] == ("rpc.call", {
        "service": "dice", "endpoint": "Command.Exec",
        "body": {"args": ["2d6", "fast"], "user": "alice"}, "timeout": TIMEOUT, "meta": {},
        "namespace": "games"})
    assert ("services", {"namespace": "games"}) in mesh.calls


async def test_an_unmapped_user_runs_a_service_command_as_nobody():
    answers = {"services": [DICE], ("rpc.call", "Command.Exec"): [1, 2]}
    reply, mesh = await run("ROLL", answers, account="")
    assert mesh.calls[-1][1]["body"] == {"args": [], "user": ""}
    assert reply.ok and reply.text == "roll: [1, 2]"


async def test_help_lists_a_provided_commands_usage_from_command_help():
    answers = {"services": [DICE],
               ("rpc.call", "Command.Help"): {"usage": "roll NdM", "help": "roll dice"}}
    reply, mesh = await run("help", answers)
    assert "roll NdM" in reply.code and "roll dice (from service dice)" in reply.code
    assert ("rpc.call", {"service": "dice", "endpoint": "Command.Help", "body": {},
                         "timeout": TIMEOUT, "meta": {}, "namespace": "team"}) in mesh.calls


async def test_a_service_failing_command_help_still_appears_in_help():
    answers = {"services": [DICE],
               ("rpc.call", "Command.Help"): MeshError(503, "dice is down")}
    reply, _ = await run("help", answers)
    row = next(line for line in reply.code.splitlines() if line.startswith("roll"))
    assert row.split() == ["roll", "(from", "service", "dice)"]


async def test_a_provided_name_never_shadows_a_builtin_and_must_be_an_identifier():
    rows = [{"name": "evil", "tags": ["bot.command=nodes"]},
            {"name": "evil2", "tags": ["bot.command=config"]},
            {"name": "evil3", "tags": ["bot.command=help"]},
            {"name": "bad", "tags": ["bot.command=rm -rf"]},
            {"name": "bad2", "tags": ["bot.command=a.b"]},
            {"name": "bad3", "tags": ["bot.command="]},
            {"name": "first", "tags": ["bot.command=dup"]},
            {"name": "second", "tags": ["bot.command=dup"]}]
    mesh = FakeMesh({"services": rows})
    provided = await provided_commands(mesh)
    assert [c.name for c in provided] == ["dup"]
    assert "first" in provided[0].help
    reply, mesh = await run("nodes", {"services": rows, "members": []})
    assert reply.ok and mesh.calls == [("members", {})]  # the built-in, not evil's
    reply, mesh = await run("help", {"services": rows, ("rpc.call", "Command.Help"): {}})
    assert "evil" not in reply.code and "bad" not in reply.code


async def test_services_failing_leaves_the_builtins():
    reply, _ = await run("help", {"services": MeshError(403, "no")})
    assert reply.ok and "nodes" in reply.code
    reply, _ = await run("roll", {"services": MeshError(403, "no")})
    assert not reply.ok and "`help`" in reply.text


async def test_a_refused_command_exec_names_the_account():
    answers = {"services": [DICE], ("rpc.call", "Command.Exec"): MeshError(403, "no dice")}
    reply, _ = await run("roll", answers, account="bob")
    assert not reply.ok and "403 denied: no dice" in reply.text and "`bob`" in reply.text


async def test_a_command_help_lists_can_be_run():
    rows = [{"name": "dice", "tags": ["bot.command=Roll"]}]
    answers = {"services": rows, ("rpc.call", "Command.Help"): None,
               ("rpc.call", "Command.Exec"): {"text": "rolled"}}
    reply, _ = await run("help", answers)
    if "Roll" in reply.code:
        reply, mesh = await run("Roll", answers)
        assert reply.ok and mesh.calls[-1][1]["endpoint"] == "Command.Exec"


# --- BotOps --------------------------------------------------------------------------------

class FakeStore:
    def __init__(self, records: dict[str, Any] | None = None) -> None:
        self.records = dict(records or {})
        self.writes: list[dict[str, Any]] = []
        self.deletes: list[dict[str, Any]] = []

    def json_records(self, db: str, table: str) -> dict[str, Any]:
        assert (db, table) == (DB, USERS)
        return dict(self.records)

    async def write(self, req: dict[str, Any]) -> None:
        self.writes.append(req)
        self.records[req["key"]] = json.loads(req["value"])

    async def delete(self, req: dict[str, Any]) -> None:
        self.deletes.append(req)
        self.records.pop(req["key"], None)


class Admin:
    """require_admin: records the namespaces asked for; admin of `of` only."""

    def __init__(self, *of: str) -> None:
        self.of = set(of)
        self.asked: list[str] = []

    def __call__(self, namespace: str) -> Any:
        self.asked.append(namespace)
        if namespace not in self.of:
            raise MeshError(403, f"not an admin of {namespace}")
        return "admin"


@pytest.mark.parametrize("user", ["U12", "W0A", "UABCDEFGHIJ0123456789", "W" + "9" * 20])
def test_user_ids_slack_gives(user):
    assert check_user(user) == user


@pytest.mark.parametrize("user", ["U1", "U", "", "u123", "X123", "U12a", "U" + "A" * 21,
                                  "U123 ", "U123\n", " U123", "U-123", 123, None])
def test_user_ids_that_are_not_slacks(user):
    with pytest.raises(MeshError) as exc:
        check_user(user)
    assert exc.value.status == 400


async def test_map_writes_the_record_as_the_admin_of_the_namespace_given():
    store, admin = FakeStore(), Admin("team")
    ops = BotOps(store, admin)
    out = await ops.map({"user": "U123", "account": "alice@x", "namespace": "team"})
    assert out == {"user": "U123", "account": "alice@x", "namespace": "team"}
    assert admin.asked == ["team"]
    assert store.writes == [{"database": DB, "table": USERS, "key": "U123",
                             "value": json.dumps({"account": "alice@x",
                                                  "namespace": "team"}).encode()}]


async def test_map_without_a_namespace_is_default_and_needs_its_admin():
    store, admin = FakeStore(), Admin("team")
    with pytest.raises(MeshError) as exc:
        await BotOps(store, admin).map({"user": "U123", "account": "alice"})
    assert exc.value.status == 403 and admin.asked == ["default"] and store.writes == []


@pytest.mark.parametrize("args", [
    {"user": "U1", "account": "alice"},
    {"user": "u123", "account": "alice"},
    {"user": "U123", "account": ""},
    {"user": "U123", "account": "a b"},
    {"user": "U123", "account": "a" * 129},
    {"user": "U123", "account": 5},
    {"user": "U123"},
    {"user": "U123", "account": "alice", "namespace": "Bad_NS"},
])
async def test_map_refuses_bad_input_before_asking_for_an_admin(args):
    store, admin = FakeStore(), Admin("default", "team")
    with pytest.raises(MeshError) as exc:
        await BotOps(store, admin).map({"namespace": "team", **args})
    assert exc.value.status == 400
    assert store.writes == [] and admin.asked == []


async def test_unmap_needs_the_admin_of_the_mappings_namespace():
    store = FakeStore({"U123": {"account": "alice", "namespace": "team"}})
    admin = Admin("default")  # an admin of default, not of team
    with pytest.raises(MeshError) as exc:
        await BotOps(store, admin).unmap({"user": "U123", "namespace": "default"})
    assert exc.value.status == 403 and admin.asked == ["team"] and store.deletes == []
    admin = Admin("team")
    assert await BotOps(store, admin).unmap({"user": "U123"}) == {"unmapped": "U123"}
    assert store.deletes == [{"database": DB, "table": USERS, "key": "U123"}]
    assert admin.asked == ["team"]


async def test_unmap_of_an_unknown_user_is_404():
    store, admin = FakeStore({"U999": {"account": "x", "namespace": "team"}}), Admin("team")
    with pytest.raises(MeshError) as exc:
        await BotOps(store, admin).unmap({"user": "U123"})
    assert exc.value.status == 404 and store.deletes == []
    with pytest.raises(MeshError) as exc:
        await BotOps(store, admin).unmap({"user": "nobody"})
    assert exc.value.status == 400


USERS_MAP = {"U2": {"account": "bob", "namespace": "team"},
             "U1": {"account": "alice", "namespace": "default"},
             "U3": {"account": "carol", "namespace": "other"},
             "U4": "not a record"}


async def test_users_without_a_namespace_lists_all_for_an_admin_of_default():
    admin = Admin("default")
    out = await BotOps(FakeStore(USERS_MAP), admin).users({})
    assert admin.asked == ["default"]
    assert out == [{"user": "U1", "account": "alice", "namespace": "default"},
                   {"user": "U2", "account": "bob", "namespace": "team"},
                   {"user": "U3", "account": "carol", "namespace": "other"}]
    admin = Admin("team")
    with pytest.raises(MeshError) as exc:
        await BotOps(FakeStore(USERS_MAP), admin).users({})
    assert exc.value.status == 403 and admin.asked == ["default"]


async def test_users_of_a_namespace_lists_only_it_for_its_admin():
    admin = Admin("team")
    out = await BotOps(FakeStore(USERS_MAP), admin).users({"namespace": "team"})
    assert admin.asked == ["team"]
    assert out == [{"user": "U2", "account": "bob", "namespace": "team"}]
    with pytest.raises(MeshError) as exc:
        await BotOps(FakeStore(USERS_MAP), Admin("team")).users({"namespace": "other"})
    assert exc.value.status == 403


def test_the_ops_are_checked_by_themselves():
    ops = BotOps(FakeStore(), Admin()).ops()
    assert {(op.name, op.access) for op in ops} == {
        ("bot.map", "checked"), ("bot.unmap", "checked"), ("bot.users", "checked")}


async def test_users_of_the_empty_namespace_are_those_of_default():
    """"" names default everywhere in meshd; a record kept without a namespace is default's."""
    records = {**USERS_MAP, "U5": {"account": "dave"}}
    admin = Admin("default")
    out = await BotOps(FakeStore(records), admin).users({"namespace": ""})
    assert admin.asked == ["default"]
    assert out == [{"user": "U1", "account": "alice", "namespace": "default"},
                   {"user": "U5", "account": "dave", "namespace": "default"}]
