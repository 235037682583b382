"""The op table: who may run what, locally and from a remote environment (meshd/ops.py)."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from meshd.errors import MeshError
from meshd.ops import (
    REQUEST_REMOTE,
    REQUEST_TOKEN,
    Op,
    OpTable,
    StreamSlots,
    mesh_resource,
    serve_request,
)


class FakeAuth:
    """Tokens "good" (may read members) and "weak" (may not); anything else is a 401.
    Without a token (anonymous), what `public` lists is granted and the rest is a 401."""

    def __init__(self) -> None:
        self.checked: list[tuple[str | None, tuple[str, str, str]]] = []
        self.namespaces: list[str] = []
        self.public: set[tuple[str, str, str]] = set()

    def identify(self, token: str | None, node: str | None) -> Any:
        if token not in ("good", "weak"):
            raise MeshError(401, "invalid token")
        return token

    def check(self, token: str | None, node: str | None, resource: tuple[str, str, str],
              namespace: str = "default") -> Any:
        if token is None and node is None and resource in self.public:
            self.checked.append((token, resource))
            return "anonymous"
        self.identify(token, node)
        self.checked.append((token, resource))
        self.namespaces.append(namespace)
        if token == "weak":
            raise MeshError(403, "denied by rule default-deny")
        return token


class Pipe:
    """The server's end of a connection: what it writes is kept."""

    def __init__(self) -> None:
        self.out: list[Any] = []

    async def read(self, limit: int = 0) -> Any:
        raise EOFError

    async def write(self, value: Any) -> None:
        self.out.append(value)

    async def aclose(self) -> None:
        pass


def table() -> tuple[OpTable, FakeAuth, list[str]]:
    ran: list[str] = []

    def handler(name: str) -> Any:
        async def fn(args: dict[str, Any]) -> Any:
            ran.append(name)
            return name
        return fn

    t = OpTable()
    auth = FakeAuth()
    t.auth = auth
    t.add([Op("members", handler("members"), mesh_resource("members")),
           Op("services", handler("services"), mesh_resource("services", per_namespace=True)),
           Op("leave", handler("leave"), "operator"),
           Op("store.read", handler("store.read"), "checked"),
           Op("rpc.call", handler("rpc.call"), "checked", anonymous=True),
           Op("auth.login", handler("auth.login"), "public")])
    return t, auth, ran


def run(t: OpTable, req: dict[str, Any], remote: bool) -> dict[str, Any]:
    pipe = Pipe()

    async def go() -> None:
        REQUEST_REMOTE.set(remote)
        await serve_request(t, pipe, {"id": 1, **req})
    trio.run(go)
    assert len(pipe.out) == 1
    return pipe.out[0]


def status(reply: dict[str, Any]) -> int | None:
    return None if reply.get("ok") else reply["error"]["status"]


def test_the_local_operator_runs_every_op_without_a_token():
    t, auth, ran = table()
    for op in ("members", "leave", "store.read", "auth.login"):
        assert run(t, {"op": op}, remote=False) == {"id": 1, "ok": True, "result": op}
    assert ran == ["members", "leave", "store.read", "auth.login"]
    assert auth.checked == [], "the table checks nothing for the local operator"


def test_a_remote_caller_without_a_token_gets_401_for_all_but_public_ops():
    t, _, ran = table()
    for op in ("members", "leave", "store.read"):
        reply = run(t, {"op": op}, remote=True)
        assert status(reply) == 401, op
        assert "token" in reply["error"]["detail"]
    assert run(t, {"op": "auth.login"}, remote=True)["ok"] is True
    assert ran == ["auth.login"]


def test_a_remote_caller_without_a_token_gets_what_the_public_scope_grants():
    """Anonymous (the bot's unmapped users, an environment without a token): a read the
    public rules grant runs; one they do not is the 401 that says to log in; a checked op
    runs only if its handler checks anonymous callers itself; operator ops never."""
    t, auth, ran = table()
    auth.public = {("mesh", "services", ""), ("mesh", "members", "")}
    assert run(t, {"op": "services"}, remote=True)["ok"] is True
    assert auth.checked == [(None, ("mesh", "services", ""))]
    auth.public = {("mesh", "services", "")}
    reply = run(t, {"op": "members"}, remote=True)
    assert status(reply) == 401 and "meshd auth login" in reply["error"]["detail"]
    assert run(t, {"op": "rpc.call"}, remote=True)["ok"] is True
    for op in ("store.read", "leave"):
        assert status(run(t, {"op": op}, remote=True)) == 401, op
    assert ran == ["services", "rpc.call"]


def test_operator_ops_are_refused_remotely_even_to_a_good_token():
    t, _, ran = table()
    reply = run(t, {"op": "leave", "token": "good"}, remote=True)
    assert status(reply) == 403
    assert "operator" in reply["error"]["detail"]
    assert ran == []


def test_a_remote_read_of_the_mesh_is_checked_against_its_resource():
    t, auth, ran = table()
    assert run(t, {"op": "members", "token": "good"}, remote=True)["ok"] is True
    assert auth.checked == [("good", ("mesh", "members", ""))]
    denied = run(t, {"op": "members", "token": "weak"}, remote=True)
    assert status(denied) == 403 and "default-deny" in denied["error"]["detail"]
    assert status(run(t, {"op": "members", "token": "forged"}, remote=True)) == 401
    assert ran == ["members"]
    assert auth.namespaces == ["default", "default"]


def test_a_remote_read_of_a_namespace_is_checked_in_the_namespace_it_names():
    t, auth, ran = table()
    reply = run(t, {"op": "services", "token": "good", "args": {"namespace": "team-a"}},
                remote=True)
    assert reply["ok"] is True
    assert auth.namespaces == ["team-a"]
    bad = run(t, {"op": "services", "token": "good", "args": {"namespace": "Team A"}},
              remote=True)
    assert status(bad) == 400 and "invalid namespace" in bad["error"]["detail"]
    assert ran == ["services"] and auth.namespaces == ["team-a"]


def test_a_remote_read_of_the_cluster_is_checked_in_default_whatever_namespace_it_names():
    """The member list is nobody's namespace: team-a's rules (its admins may do everything
    in team-a) must not open it (found by review)."""
    t, auth, ran = table()
    reply = run(t, {"op": "members", "token": "good", "args": {"namespace": "team-a"}},
                remote=True)
    assert reply["ok"] is True
    assert auth.namespaces == ["default"]
    bad = run(t, {"op": "members", "token": "good", "args": {"namespace": "Team A"}},
              remote=True)
    assert status(bad) == 400 and "invalid namespace" in bad["error"]["detail"]
    assert ran == ["members"] and auth.namespaces == ["default"]


def test_checked_ops_run_with_a_token_that_verifies_and_never_with_a_bad_one():
    t, auth, ran = table()
    assert run(t, {"op": "store.read", "token": "weak"}, remote=True)["ok"] is True
    assert status(run(t, {"op": "store.read", "token": "forged"}, remote=True)) == 401
    assert ran == ["store.read"]
    assert auth.checked == [], "a checked op's handler checks its own resource"


def test_unknown_ops_list_the_known_ones_and_the_connection_stays_usable():
    t, _, _ = table()
    reply = run(t, {"op": "nope"}, remote=False)
    assert status(reply) == 404
    assert "auth.login, leave, members, rpc.call, services, store.read" in reply["error"]["detail"]


def test_an_op_registered_twice_is_refused():
    t, _, _ = table()
    with pytest.raises(ValueError, match="'members' registered twice"):
        t.add([Op("members", lambda args: None, "operator")])


class OpenPipe(Pipe):
    """A connection the client keeps open until `hang_up` (then reads see EOF)."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = trio.Event()

    async def read(self, limit: int = 0) -> Any:
        await self.closed.wait()
        raise EOFError

    def hang_up(self) -> None:
        self.closed.set()


def test_a_stream_ends_and_lets_go_when_its_client_hangs_up():
    """Nothing is ever emitted: the handler must still end, and its `finally` run, once the
    client closes (found by review: hung-up watchers held their slots until the next
    event)."""
    released: list[str] = []

    async def watch(args: dict[str, Any], emit: Any) -> None:
        try:
            await trio.sleep_forever()  # no event ever comes
        finally:
            released.append("unsubscribed")

    t = OpTable()
    t.add([Op("watch", watch, "public", "stream")])
    pipe = OpenPipe()

    async def go() -> None:
        # virtual time: a stream that never ends makes the clock jump to the deadline at once
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: serve_request(t, pipe, {"id": 1, "op": "watch"}))
                while not pipe.out:
                    await trio.sleep(0)
                assert released == []
                pipe.hang_up()

    trio.run(go, clock=trio.testing.MockClock(autojump_threshold=0))
    assert pipe.out == [{"id": 1, "ok": True, "result": "streaming"}]
    assert released == ["unsubscribed"]


def test_streams_and_sessions_are_capped_per_token():
    stats: dict[str, int] = {}
    slots = StreamSlots(2, stats, "proxy")

    async def go() -> None:
        REQUEST_TOKEN.set("t1")
        with slots.hold(), slots.hold():
            assert stats == {"proxy_streams": 2, "proxy_streams_refused": 0}
            with pytest.raises(MeshError) as info, slots.hold():
                pass
            assert info.value.status == 429 and info.value.code == "too_many_requests"
            assert "limits.max_remote_streams" in info.value.detail
            REQUEST_TOKEN.set("t2")  # another token has slots of its own
            with slots.hold():
                assert stats["proxy_streams"] == 3
            REQUEST_TOKEN.set("t1")
        with slots.hold():  # released slots are free again
            assert stats == {"proxy_streams": 1, "proxy_streams_refused": 1}
    trio.run(go)
    assert slots.held == {}


def test_a_remote_request_never_acts_as_the_node():
    """The API gateway and remote environments run ops as REQUEST_REMOTE: without a token
    they act as nobody (the public scope), never as this node."""
    from meshd.ops import REQUEST_REMOTE, acting_node

    assert acting_node("a") == "a"  # the local operator, a service on this node
    reset = REQUEST_REMOTE.set(True)
    try:
        assert acting_node("a") is None
    finally:
        REQUEST_REMOTE.reset(reset)
