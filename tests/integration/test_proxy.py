"""Outside clients (no cluster secret) reach services and tunnels through a proxy endpoint
with a user token; no token or a token the rules do not allow is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import trio

from meshd.control import ControlClient
from meshd.errors import MeshError
from meshd.proxy.remote import RemoteControlClient
from meshd.proxy.via import Via

from .cluster import Lines, client_stream, control, wait_for, wait_for_async
from .test_tunnel import EchoServer, free_port, refused, sessions, through


def outside(*args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MESHD_TOKEN", "MESHD_ADDR")}
    env["MESHD_TOKEN_FILE"] = "/nonexistent/token.json"
    cmd = [sys.executable, "-m", "meshd_cli"] + (["--token", token] if token else []) + list(args)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, env=env)


def test_outside_client_calls_and_tunnels_through_the_proxy(cluster, tmp_path):
    proxy_port = free_port()
    a = cluster.add("a", extra=("--proxy-listen", f"127.0.0.1:{proxy_port}"))
    b = cluster.add("b", join=[a.addr])
    cluster.service(b)
    echo = EchoServer()
    control(b.data_dir, "tunnel.expose", name="echo", to=f"127.0.0.1:{echo.port}")
    wait_for(lambda: len(control(a.data_dir, "services")) >= 1, 10, "service visible on a")
    control(a.data_dir, "auth.accounts.create", id="ada", secret="ada-secret-1",
            scopes=["dev"])
    control(a.data_dir, "auth.accounts.create", id="eve", secret="eve-secret-1",
            scopes=["guest"])
    control(a.data_dir, "auth.rules.create", id="dev", resource="*:*:*", scope="dev",
            access="granted")
    wait_for(lambda: {"ada", "eve"} <= {x["id"] for x in control(b.data_dir,
             "auth.accounts.list")}, 10, "accounts on b")
    ada = control(a.data_dir, "auth.token.create", account="ada", ttl=600)["token"]
    eve = control(a.data_dir, "auth.token.create", account="eve", ttl=600)["token"]
    via = f"ws://127.0.0.1:{proxy_port}"

    ok = outside("call", "testsvc", "Test.Caller", '{"text": ""}', "--via", via, "--json",
                 token=ada)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout) == {"text": "ada"}
    none = outside("call", "testsvc", "Test.Echo", '{"text": "x"}', "--via", via)
    assert none.returncode == 1 and none.stderr.startswith("401")
    denied = outside("call", "testsvc", "Test.Echo", '{"text": "x"}', "--via", via, token=eve)
    assert denied.returncode == 1 and denied.stderr.startswith("403")

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("MESHD_TOKEN", "MESHD_ADDR")}
    proc = subprocess.Popen([sys.executable, "-m", "meshd_cli", "--token", ada, "tunnel", "connect",
                             "echo", "--via", via, "--listen", f"127.0.0.1:{port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert "listening" in proc.stdout.readline()
        payload = os.urandom(2 * 1024 * 1024)
        assert through(port, payload) == payload
    finally:
        proc.terminate()
        proc.wait(5)
    port2 = free_port()
    proc2 = subprocess.Popen([sys.executable, "-m", "meshd_cli", "tunnel", "connect", "echo",
                              "--via", via, "--listen", f"127.0.0.1:{port2}"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    stderr = Lines(proc2.stderr)
    try:
        assert "listening" in proc2.stdout.readline()
        refused(port2)  # no token: closed without a byte
        line = stderr.wait(lambda x: x.startswith("connection refused"), 10, "the refusal")
        assert line.startswith("connection refused: 401 unauthorized: "), line
    finally:
        proc2.terminate()
        proc2.wait(5)
    # the session with ada's token is audited at b, the exposing node, under her name
    wait_for(lambda: sessions(b, "echo"), 10, "the session's audit record on b")
    [rec] = sessions(b, "echo")
    assert (rec["caller"], int(rec["bytes_in"]), int(rec["bytes_out"])) == (
        "ada", len(payload), len(payload))


def test_the_api_gateway_forwards_to_services_after_the_check(cluster):
    """What `meshd proxy http` did, now the gateway's (`--api-listen`): a user's token acts
    as its account at the service on another node; no token, bad JSON, unknown names are
    structured errors."""
    import http.client

    port = free_port()
    a = cluster.add("a", env={"MESHD_API_LISTEN": f"127.0.0.1:{port}"})
    b = cluster.add("b", join=[a.addr])
    cluster.service(b)
    wait_for(lambda: len(control(a.data_dir, "services")) >= 1, 10, "service visible on a")
    control(a.data_dir, "auth.accounts.create", id="ada", secret="ada-secret-1",
            scopes=["dev"])
    control(a.data_dir, "auth.rules.create", id="dev", resource="service:testsvc:*",
            scope="dev", access="granted")
    wait_for(lambda: "ada" in {x["id"] for x in control(b.data_dir, "auth.accounts.list")},
             10, "account on b")
    # b checks the call against its own copy of the rules: the grant must be there too
    wait_for(lambda: "dev" in {x["id"] for x in control(b.data_dir, "auth.rules.list")},
             10, "rule on b")
    ada = control(a.data_dir, "auth.token.create", account="ada", ttl=600)["token"]

    def post(path: str, body: bytes, token: str | None) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        conn.request("POST", path, body, headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())

    assert post("/testsvc/Test.Caller", b'{"text": ""}', ada) == (200, {"text": "ada"})
    status, err = post("/testsvc/Test.Echo", b'{"text": "x"}', None)
    assert status == 401 and err["code"] == "unauthorized"
    status, err = post("/testsvc/Test.Echo", b"{oops", ada)
    assert status == 400 and "column" in err["detail"]
    status, err = post("/nope/X.Y", b"{}", ada)
    assert status == 404 and "nope" in err["detail"]


async def test_a_remote_watch_ends_when_its_client_hangs_up_and_streams_are_capped(cluster):
    """A watch through the proxy lets go of its connection slot and its subscription as soon
    as the client closes, not when the next event would be written (found by review: idle
    hung-up watchers held the proxy's slots), and one token holds at most
    limits.max_remote_streams streams at once."""
    port = free_port()
    a = await trio.to_thread.run_sync(lambda: cluster.add(
        "a", extra=("--proxy-listen", f"127.0.0.1:{port}"),
        env={"MESHD_LIMITS_MAX_REMOTE_STREAMS": "2"}))
    token = (a.data_dir / "admin.token").read_text().strip()
    checked: list[str] = []  # a step that ran (a cancelled block would skip the rest)

    async def stats() -> dict[str, int]:
        client = ControlClient(a.data_dir / "meshd.sock")
        try:
            return (await client.call("status"))["stats"]
        finally:
            await client.aclose()

    async def held(streams: int, member_watchers: int) -> bool:
        st = await stats()
        return (st["proxy_streams"], st["member_watchers"]) == (streams, member_watchers)

    before = (await stats())["member_watchers"]
    async with trio.open_nursery() as nursery:
        def remote() -> RemoteControlClient:  # its connection held by a task of the nursery
            return RemoteControlClient(Via(f"ws://127.0.0.1:{port}"), token=token,
                                       nursery=nursery)

        async with client_stream(remote(), "services.watch"):
            async with client_stream(remote(), "members.watch"):
                await wait_for_async(lambda: held(2, before + 1), 15, "both watches held")
                third = remote()
                try:
                    with pytest.raises(MeshError) as info:
                        await third.call("store.watch")
                finally:
                    await third.aclose()
                assert info.value.status == 429, info.value
                assert "limits.max_remote_streams" in info.value.detail
                assert (await stats())["proxy_streams_refused"] == 1
            # the members watcher hung up, and nothing happened in the cluster since
            await wait_for_async(lambda: held(1, before), 15, "the closed watch released")
            async with client_stream(remote(), "store.watch"):  # its slot is free again
                await wait_for_async(lambda: held(2, before), 15, "a new watch held")
        await wait_for_async(lambda: held(0, before), 15, "every watch released")
        checked.append("all released")
    assert checked == ["all released"]
