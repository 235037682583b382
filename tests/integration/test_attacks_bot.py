"""Attacks on the Slack bot (`meshd bot slack --listen`): an outside client that can reach
its HTTP port, a Slack user (mapped to a meshd account, or not), and a member of the mesh
(a holder of a token, a service that offers a bot command).

One daemon and one bot serve the module. The bot runs with an open-file limit of 1024 (the
common default), so its listener's Gate caps (meshd/transport/listeners.py default_caps)
are small enough to reach: 341 open connections, 85 per source address. Accounts: `ops` (an
admin, Slack user U0ALICE), `dev` (scope botatk-dev: config under public.*, the dice service
and the list of services; Slack user U0DEV); U0EVE is not mapped. Services: dice (the `roll`
command, examples/bot-command), testsvc, and `rogue` (a member's service that claims the
built-in name `nodes` as its bot command). Slack is the local stand-in of slackfake.py.
Every exchange is on loopback (127.0.0.1; the idle flood comes from 127.0.0.2, another
source address, as an attacker's would).

What must hold (meshd/bot/*.py, ARCHITECTURE.md §9):
- Nothing runs for a request that is not Slack's: unsigned, a wrong signature, a signature
  of another body or timestamp, a timestamp 5+ minutes off (401); over 1 MiB (413), not
  UTF-8 (400), not POST (405), not /slack/events (404). An unsigned request cannot burn an
  event id (the dedupe runs after the signature check).
- Hostile signed payloads cost their request only: the bot answers and serves on.
- A slow client is cut by the read timeout, idle connections by the Gate's per-source cap
  and the read timeout; Slack's events are answered all the while.
- A Slack user acts with the rules of the account mapped to them, or as nobody: never as the
  bot or as another user, whatever the text says; a service command is told the caller's
  account; a member's service cannot take a built-in's name; what replies echo cannot ping
  or link in the channel (blocks escape Slack's control characters).
- On the daemon, bot.map/unmap/users and auth.token.create take an admin (403 otherwise,
  nothing changed); a control request flagged `remote` without a token runs nothing but
  public ops (401): the flag only removes rights.

Every wait is bounded; no duration is asserted beyond "well within the read timeout".
"""

from __future__ import annotations

import contextlib
import json
import queue
import resource
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from meshd.bot.slack import MAX_BODY, HttpLimits
from meshd.control import ControlClient
from meshd.errors import MeshError

from .attacks import HttpConn, request, slow_send
from .cluster import Cluster, Daemon, control, wait_for
from .slackfake import FakeSlack, event, post, signed
from .test_bot import DICE, start_bot
from .test_broker import FAST, ready

BOUND = 20.0  # seconds any one exchange may take before it counts as a hang
READ_TIMEOUT = HttpLimits().read_timeout  # the bot's listener (10 s)
NOFILE = 1024  # the bot's open-file limit: its Gate's caps follow from it
IDLE = 300  # idle connections of the flood
FLOOD_SOURCE = "127.0.0.2"  # the flood's source address (loopback, not Slack's 127.0.0.1)
DEV_SECRET = "botatk-dev-secret-1"
EVE = "U0EVE"  # a Slack user no one mapped


# --- the mesh and the bot ------------------------------------------------------------------


@dataclass
class Bot:
    a: Daemon
    slack: FakeSlack
    url: str  # http://127.0.0.1:PORT/slack/events
    port: int
    pid: int
    log: Path  # the bot's stderr
    dev_token: str  # dev's (not an admin)
    ops_token: str  # ops's (an admin)

    def base(self) -> str:
        return self.url.rsplit("/slack/events", 1)[0]


@contextlib.contextmanager
def open_file_limit(soft: int) -> Iterator[None]:
    """Lower this process's open-file limit for what it starts meanwhile (children inherit
    it)."""
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, old[1]), old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, old)


@pytest.fixture(scope="module")
def bot(tmp_path_factory) -> Iterator[Bot]:
    root = tmp_path_factory.mktemp("botatk")
    c = Cluster(root)
    slack = FakeSlack()
    proc = None
    try:
        a = c.add("a", env=FAST)
        ready(a)
        c.service(a, "dice", script=DICE)
        c.service(a, "testsvc")
        c.service(a, "rogue", env={"TESTSVC_META": "bot.command=nodes"})
        wait_for(lambda: {"dice", "testsvc", "rogue"} <= {
            s["name"] for s in control(a.data_dir, "services")}, 20, "services registered")
        control(a.data_dir, "auth.accounts.create", id="ops", secret="botatk-ops-secret-1",
                scopes=["admin"])
        control(a.data_dir, "auth.accounts.create", id="dev", secret=DEV_SECRET,
                scopes=["botatk-dev"])
        for rid, res in (("botatk-dev-public-config", "config:default:public.*"),
                         ("botatk-dev-dice", "service:dice:*"),
                         ("botatk-dev-services", "mesh:services:*")):
            control(a.data_dir, "auth.rules.create", id=rid, resource=res,
                    scope="botatk-dev", access="granted", priority=10)
        control(a.data_dir, "config.set", path="public.motd", value="hello")
        control(a.data_dir, "config.set", path="guarded.limit", value=10)
        control(a.data_dir, "bot.map", user="U0ALICE", account="ops")
        control(a.data_dir, "bot.map", user="U0DEV", account="dev")
        dev = control(a.data_dir, "auth.login", id="dev", secret=DEV_SECRET)["token"]
        ops = control(a.data_dir, "auth.login", id="ops", secret="botatk-ops-secret-1")["token"]
        with open_file_limit(NOFILE):
            proc, status = start_bot(a, slack, root, "--listen", "127.0.0.1:0")
        url = status["events"]
        port = int(url.split(":")[2].split("/")[0])
        yield Bot(a, slack, url, port, proc.pid, root / "bot.log", dev, ops)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        slack.close()
        c.close()


# --- helpers -------------------------------------------------------------------------------


def http(url: str, body: bytes | None, headers: dict[str, str], method: str = "POST"
         ) -> tuple[int, dict[str, str], bytes]:
    """One request with urllib: (status, headers, body), errors included."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=BOUND) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def ask(b: Bot, text: str, user: str = "U0ALICE", channel: str = "C0ATK",
        **kw: Any) -> dict[str, Any]:
    """Mention the bot with `text` (signed); the reply it posts, which must be the first
    post since the last one taken and in `channel` (a stray post from an attack fails)."""
    status, out = post(b.url, event(f"<@UBOTBOT> {text}", user=user, channel=channel, **kw))
    assert status == 200, (status, out[:300])
    reply = b.slack.wait_post(timeout=BOUND)
    assert reply["channel"] == channel, \
        f"a post to {reply['channel']} came first: {reply['text'][:300]}"
    return reply


def assert_serves(b: Bot) -> None:
    """A normal signed `services` mention is still answered."""
    reply = ask(b, "services", channel="C0ALIVE")
    assert "dice" in reply["text"] and "testsvc" in reply["text"], reply["text"][:300]


def config_value(b: Bot, path: str) -> Any:
    return control(b.a.data_dir, "config.get", path=path)["value"]


def mapped(b: Bot) -> list[dict[str, Any]]:
    return control(b.a.data_dir, "bot.users")


def as_client(b: Bot, op: str, token: str | None, remote: bool = False, **args: Any) -> Any:
    """`op` over the control socket with `token` (and the remote flag)."""
    async def go() -> Any:
        client = ControlClient(b.a.data_dir / "meshd.sock", token, remote=remote)
        try:
            return await client.call(op, **args)
        finally:
            await client.aclose()
    return trio.run(go)


def refused(b: Bot, op: str, token: str | None, remote: bool = False, **args: Any) -> int:
    """The status `op` is refused with (fails if it ran)."""
    with pytest.raises(MeshError) as info:
        as_client(b, op, token, remote, **args)
    return info.value.status


def logs_of_testsvc(b: Bot) -> str:
    found = control(b.a.data_dir, "debug.logs", service="testsvc", limit=500)
    return "\n".join(r["message"] for r in found["records"])


def maybe_post(b: Bot, channel: str, wait: float) -> dict[str, Any] | None:
    """A post within `wait` seconds, if one comes: it must be in `channel`."""
    try:
        reply = b.slack.wait_post(timeout=wait)
    except queue.Empty:
        return None
    assert reply["channel"] == channel, reply
    return reply


def mention(text: str = "services", channel: str = "C0REFUSE", **kw: Any) -> bytes:
    return json.dumps(event(f"<@UBOTBOT> {text}", channel=channel, **kw)).encode()


def deep(n: int) -> bytes:
    return b"[" * n + b"]" * n


# --- 1. requests that must be refused before anything runs --------------------------------


def test_requests_that_are_not_slacks_are_refused_and_run_nothing(bot):
    b = bot
    body = mention()  # a real `services` mention: had any of these run, it would be posted
    other = mention('config set guarded.limit 1')
    now = int(time.time())
    good = signed(body)
    cases: list[tuple[str, str, str, bytes, dict[str, str], int]] = [
        ("unsigned", "POST", b.url, body, {"Content-Type": "application/json"}, 401),
        ("wrong signature", "POST", b.url, body,
         {**good, "X-Slack-Signature": "v0=" + "0" * 64}, 401),
        ("garbage signature", "POST", b.url, body, {**good, "X-Slack-Signature": "v1=x"}, 401),
        ("no timestamp", "POST", b.url, body,
         {k: v for k, v in good.items() if k != "X-Slack-Request-Timestamp"}, 401),
        ("another secret", "POST", b.url, body, signed(body, secret="not-the-secret"), 401),
        ("body swapped after signing", "POST", b.url, other, good, 401),
        ("timestamp swapped after signing", "POST", b.url, body,
         {**good, "X-Slack-Request-Timestamp": str(now - 1)}, 401),
        ("6 minutes old", "POST", b.url, body, signed(body, ts=now - 6 * 60), 401),
        ("6 minutes ahead", "POST", b.url, body, signed(body, ts=now + 6 * 60), 401),
        ("not UTF-8", "POST", b.url, body[:-1] + b', "x": "\xff\xfe"}',
         signed(body[:-1] + b', "x": "\xff\xfe"}'), 400),
        ("GET", "GET", b.url, None, good, 405),
        ("PUT", "PUT", b.url, body, good, 405),
        ("another path", "POST", b.base() + "/other", body, good, 404),
        ("a trailing slash", "POST", b.url + "/", body, good, 404),
        ("a doubled slash", "POST", b.base() + "/slack//events", body, good, 404),
        ("a dot segment", "POST", b.base() + "/slack/x/../events", body, good, 404),
    ]
    wrong = []
    for name, method, url, data, headers, want in cases:
        status, head, out = http(url, data, headers, method)
        if status != want:
            wrong.append(f"{name}: {status} (want {want}) {out[:120]!r}")
        if want == 405 and "POST" not in head.get("allow", ""):
            wrong.append(f"{name}: no Allow: POST ({head})")
    assert not wrong, "\n".join(wrong)
    assert b.slack.no_post(2.0), f"a refused request ran: {b.slack.posts[-1]}"
    assert config_value(b, "guarded.limit") == 10
    assert_serves(b)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_body_over_1_mib_is_a_413_and_runs_nothing(bot, framing):
    """Signed, and a real mention: had it been taken, it would be posted. With a
    Content-Length it is refused before the body is read; chunked (nothing to refuse up
    front), once the bytes so far pass the limit. Sent while reading, so the answer is seen
    even when the bot closes the connection before the body is all sent."""
    b = bot
    body = json.dumps({**event("<@UBOTBOT> services", channel="C0HUGE"),
                       "pad": "x" * (MAX_BODY + 64 * 1024)}).encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in signed(body).items())
    head = f"POST /slack/events HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}"
    if framing == "chunked":
        head += "Transfer-Encoding: chunked\r\n\r\n"
        parts = [b"%x\r\n%s\r\n" % (len(body[i:i + 32768]), body[i:i + 32768])
                 for i in range(0, len(body), 32768)] + [b"0\r\n\r\n"]
    else:
        head += f"Content-Length: {len(body)}\r\n\r\n"
        parts = [body[i:i + 32768] for i in range(0, len(body), 32768)]

    async def go() -> Any:
        conn = await HttpConn.open(b.port)
        try:
            async with trio.open_nursery() as nursery:
                async def feed() -> None:
                    for part in [head.encode(), *parts]:
                        if not await conn.send(part):
                            return
                nursery.start_soon(feed)
                with trio.fail_after(BOUND):
                    resp = await conn.response(allow_cut=True)
                nursery.cancel_scope.cancel()
            return resp
        finally:
            await conn.aclose()

    resp = trio.run(go)
    if framing == "chunked":  # the answer may be lost to the reset of a connection cut mid-body
        assert resp is None or resp.status == 413, (resp.status, resp.body[:200])
    else:
        assert resp is not None and resp.status == 413, resp and (resp.status, resp.body[:200])
    assert b.slack.no_post(1.5), "the oversized body ran"
    assert_serves(b)


def test_a_non_numeric_timestamp_runs_nothing(bot):
    b = bot
    body = mention(channel="C0TSTAMP")
    for ts in ("abc", "", "1e9", "0x10", "9" * 400):
        status, _, _ = http(b.url, body, {**signed(body), "X-Slack-Request-Timestamp": ts})
        assert not 200 <= status < 300, (ts, status)
    assert b.slack.no_post(1.5)
    assert_serves(b)


def test_a_non_numeric_timestamp_is_a_401(bot):
    body = mention(channel="C0TSTAMP")
    status, _, out = http(bot.url, body, {**signed(body), "X-Slack-Request-Timestamp": "abc"})
    assert status == 401, (status, out[:200])


def test_an_unsigned_request_cannot_burn_an_event_id(bot):
    """The dedupe must only see verified events: an unsigned copy of an event id first (or
    a copy signed with another secret) does not make Slack's real event a "duplicate"."""
    b = bot
    payload = event("<@UBOTBOT> services", channel="C0BURN", event_id=f"EvBURN{time.time_ns()}")
    body = json.dumps(payload).encode()
    for headers in ({"Content-Type": "application/json"}, signed(body, secret="other")):
        status, _, _ = http(b.url, body, headers)
        assert status == 401
    status, _ = post(b.url, payload)
    assert status == 200
    reply = b.slack.wait_post(timeout=BOUND)
    assert reply["channel"] == "C0BURN" and "dice" in reply["text"], reply


# --- 2. signed but hostile payloads ---------------------------------------------------------


def _hostile() -> list[tuple[str, bytes, dict[str, str] | None]]:
    """(name, body, headers: None = signed as Slack would)."""
    no_fields = event("x", channel="C0HOSTILE")
    no_fields["event"] = {"type": "app_mention"}
    typed = event("x", channel="C0HOSTILE")
    typed["event"].update(user={"id": "U0ALICE"}, text=["services"], channel=7)
    not_a_map = event("x", channel="C0HOSTILE")
    not_a_map["event"] = "services"
    return [
        ("not JSON", b"this is { not json", None),
        ("a JSON list", b'[{"type": "event_callback"}]', None),
        ("a JSON string", b'"event_callback"', None),
        ("100000 nested lists", deep(100_000), None),
        ("an object holding 100000 nested lists", b'{"event": ' + deep(100_000) + b"}", None),
        ("unsigned, not JSON", b"this is { not json", {"Content-Type": "application/json"}),
        ("unsigned, 100000 nested lists", deep(100_000), {"Content-Type": "application/json"}),
        ("an event without user, text, channel", json.dumps(no_fields).encode(), None),
        ("an event with fields of the wrong types", json.dumps(typed).encode(), None),
        ("unsigned, an event with fields of the wrong types", json.dumps(typed).encode(),
         {"Content-Type": "application/json"}),
        ("an event that is not a map", json.dumps(not_a_map).encode(), None),
        ("an unknown event type",
         json.dumps(event("services", kind="reaction_added", channel="C0HOSTILE")).encode(),
         None),
        ("an unknown envelope type",
         json.dumps({**event("services", channel="C0HOSTILE"), "type": "no_such"}).encode(),
         None),
        ("an empty body", b"", None),
    ]


HOSTILE = _hostile()

def test_hostile_payloads_run_nothing_and_the_bot_serves_on(bot):
    """Each is answered within the bound (whatever the status), nothing is posted, and a
    normal `services` mention is answered right after it."""
    b = bot
    answered = {}
    for name, body, headers in HOSTILE:
        status, _, _ = http(b.url, body, headers if headers is not None else signed(body))
        answered[name] = status
        if headers is not None:  # unsigned: never acked as Slack's
            assert not 200 <= status < 300, (name, status)
        assert_serves(b)
    assert b.slack.no_post(1.5), f"a hostile payload ran: {b.slack.posts[-1]} ({answered})"


@pytest.mark.parametrize("name,body,headers", [pytest.param(n, body, h, id=n)
                                               for n, body, h in HOSTILE])
def test_hostile_payloads_are_never_a_500(bot, name, body, headers):
    """A client's bad bytes are a 4xx (401 when unsigned), or a 2xx ack of an event the bot
    ignores: never the server failing."""
    status, _, out = http(bot.url, body, headers if headers is not None else signed(body))
    if headers is not None:
        assert status == 401, (status, out[:200])
    assert status < 500, (status, out[:200])


def test_a_text_of_1_mb_is_answered_briefly(bot):
    b = bot
    text = "a" * 1_000_000
    assert len(json.dumps(event(text)).encode()) < MAX_BODY
    reply = ask(b, text, channel="C0BIG")
    assert "don't know" in reply["text"] and len(reply["text"]) < 500, reply["text"][:600]
    assert all(len(x["text"]["text"]) <= 3000 for x in reply["blocks"])
    # a real command followed by 1 MB: cut to the input bound, answered
    reply = ask(b, "config get public.motd " + "b" * 1_000_000, channel="C0BIG")
    assert len(reply["text"]) < 4000
    assert_serves(b)


def test_a_deeply_nested_json_argument_costs_its_own_command_only(bot):
    b = bot
    lines = ("call testsvc Test.Echo " + deep(3000).decode(),
             "config set guarded.limit " + deep(3000).decode(),
             "publish botatk.deep " + deep(3000).decode())
    for line in lines:
        status, _ = post(b.url, event(f"<@UBOTBOT> {line}", channel="C0DEEP"))
        assert status == 200
    for _ in lines:  # replies, if any, are to C0DEEP only
        if maybe_post(b, "C0DEEP", 3.0) is None:
            break
    assert config_value(b, "guarded.limit") == 10
    # shallower nesting that parses reaches the daemon, which bounds it (400)
    reply = ask(b, "call testsvc Test.Echo " + deep(200).decode(), channel="C0DEEP")
    assert "400" in reply["text"], reply["text"][:300]
    assert_serves(b)


def test_a_deeply_nested_json_argument_gets_a_reply(bot):
    b = bot
    post(b.url, event("<@UBOTBOT> call testsvc Test.Echo " + deep(3000).decode(),
                      channel="C0DEEP2"))
    reply = maybe_post(b, "C0DEEP2", 5.0)
    assert reply is not None, "no reply at all to a deeply nested argument"


# --- 3. slow and many clients ---------------------------------------------------------------


def _caps(pid: int) -> tuple[int, int]:
    """(max_open, max_per_source) of the bot's listener: listeners.default_caps with the
    bot's open-file limit."""
    soft = NOFILE
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft = int(line.split()[3])
    max_open = max(16, min(16384, soft // 3))
    return max_open, max(8, max_open // 4)


def _open_from(source: str, port: int, count: int) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(2)
        try:
            s.bind((source, 0))
            s.connect(("127.0.0.1", port))
            socks.append(s)
        except OSError:
            s.close()
    return socks


def _still_open(socks: list[socket.socket]) -> int:
    """How many of `socks` the server has not closed (nothing to read, no EOF)."""
    n = 0
    for s in socks:
        s.setblocking(False)
        try:
            if s.recv(1):  # the server said something to an idle connection: counts open
                n += 1
        except BlockingIOError:
            n += 1
        except OSError:
            pass
    return n


def test_slow_and_idle_clients_are_cut_and_slack_is_answered_meanwhile(bot):
    """Slowloris (a head trickled a byte every 0.25 s: 30 s for all of it) is cut within the
    read timeout of its first byte; 300 idle connections from one other address get at most
    the Gate's share per source and are closed by the read timeout; Slack's event (from
    127.0.0.1) is answered while both go on, well before the read timeout frees anything."""
    b = bot
    max_open, per_source = _caps(b.pid)
    assert per_source < IDLE < max_open, (per_source, max_open)  # the cap is what is tested
    head = request("POST", "/slack/events", headers="X-Slow: " + "s" * 40 + "\r\n")
    assert len(head) * 0.25 >= 2.5 * READ_TIMEOUT
    loris: dict[str, Any] = {}

    def trickle() -> None:
        t0 = time.monotonic()

        async def bounded() -> tuple[int, bytes]:
            with trio.fail_after(READ_TIMEOUT + BOUND):
                return await slow_send(b.port, head, 0.25)
        loris["sent"], loris["got"] = trio.run(bounded)
        loris["took"] = time.monotonic() - t0

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    socks = _open_from(FLOOD_SOURCE, b.port, IDLE)
    try:
        assert len(socks) >= per_source, f"only {len(socks)} idle connections opened"
        time.sleep(0.5)
        held = _still_open(socks)
        assert 0 < held <= per_source, f"{held} idle connections held (cap {per_source})"
        t0 = time.monotonic()
        reply = ask(b, "services", channel="C0FLOOD")
        assert "dice" in reply["text"]
        assert time.monotonic() - t0 < READ_TIMEOUT / 2, "Slack waited for the flood to end"
        thread.join(READ_TIMEOUT + BOUND)
        assert not thread.is_alive(), "the slowloris was never cut"
        assert loris["sent"] < len(head), f"the whole trickled head was taken: {loris}"
        assert not loris["got"].startswith(b"HTTP/1.1 2"), loris["got"][:200]
        assert loris["took"] < READ_TIMEOUT + 5, loris["took"]
        deadline = time.monotonic() + READ_TIMEOUT + 5
        while _still_open(socks) and time.monotonic() < deadline:
            time.sleep(0.25)
        assert _still_open(socks) == 0, "idle connections outlived the read timeout"
    finally:
        for s in socks:
            s.close()
    assert_serves(b)


# --- 4. what a Slack user can do ------------------------------------------------------------


def test_a_non_admin_user_cannot_map_or_write_beyond_their_rules(bot):
    b = bot
    before = mapped(b)
    for line in ("bot map U0DEV ops", "bot.map U0DEV ops", "map U0DEV ops",
                 "users", "unmap U0ALICE"):
        reply = ask(b, line, user="U0DEV")
        assert "don't know" in reply["text"], (line, reply["text"][:300])
    for line in ("config set guarded.limit 99", "config set bot.users {\"U0DEV\": \"ops\"}",
                 "config set guarded.limit ```99```"):
        reply = ask(b, line, user="U0DEV")
        assert "403" in reply["text"] and "account `dev`" in reply["text"], reply["text"]
    for line in ("restart dice", 'publish botatk.orders {"id": 1}'):
        reply = ask(b, line, user="U0DEV")
        assert "403" in reply["text"] and "denied" in reply["text"], reply["text"]
    # what dev's rules grant works: the refusals above are the rules', not a blanket one
    reply = ask(b, 'config set public.motd "dev was here"', user="U0DEV")
    assert "config public.motd set" in reply["text"], reply["text"]
    assert config_value(b, "guarded.limit") == 10
    assert mapped(b) == before
    control(b.a.data_dir, "config.set", path="public.motd", value="hello")


def test_an_unmapped_user_cannot_call_a_service_without_a_public_rule(bot):
    b = bot
    sentinel = f"botatk-eve-{time.time_ns()}"
    reply = ask(b, f'call testsvc Test.Log {{"text": "{sentinel}"}}', user=EVE)
    assert "denied" in reply["text"] and "not mapped" in reply["text"], reply["text"]
    reply = ask(b, "config set guarded.limit 1", user=EVE)
    assert "denied" in reply["text"], reply["text"]
    # a call that does run, after: once its line is in the logs, Eve's would be too
    marker = f"botatk-ops-{time.time_ns()}"
    reply = ask(b, f'call testsvc Test.Log {{"text": "{marker}"}}')
    assert marker in reply["text"], reply["text"]
    wait_for(lambda: marker in logs_of_testsvc(b), BOUND, "ops's call in testsvc's logs")
    assert sentinel not in logs_of_testsvc(b), "an unmapped user's call reached testsvc"
    assert config_value(b, "guarded.limit") == 10


def test_a_user_cannot_act_as_another_through_what_they_send(bot):
    b = bot
    attempts = [
        ("<@U0ALICE> config set guarded.limit 1", {}),
        ("config set guarded.limit 1 <@U0ALICE>", {}),
        ('config set guarded.limit {"user": "U0ALICE", "account": "ops", "value": 1}', {}),
        ("config set guarded.limit 1", {"user_id": "U0ALICE", "username": "U0ALICE",
                                        "bot_id": "", "authed_users": ["U0ALICE"]}),
    ]
    for text, extra in attempts:
        reply = ask(b, text, user=EVE, **extra)
        assert "denied" in reply["text"] and "not mapped" in reply["text"], \
            (text, reply["text"])
    # envelope fields that name someone else: the signed event's own user decides
    payload = event("<@UBOTBOT> config set guarded.limit 1", user=EVE, channel="C0ATK")
    payload.update(user="U0ALICE", user_id="U0ALICE", authed_users=["U0ALICE"])
    payload["authorizations"] = [{"user_id": "U0ALICE", "is_bot": False}]
    status, _ = post(b.url, payload)
    assert status == 200
    reply = b.slack.wait_post(timeout=BOUND)
    assert "denied" in reply["text"] and "not mapped" in reply["text"], reply["text"]
    # a user field that is not an id: nothing runs as anyone
    payload = event("<@UBOTBOT> config set guarded.limit 1", channel="C0ATK")
    payload["event"]["user"] = {"id": "U0ALICE"}
    status, _ = post(b.url, payload)
    assert status == 200 and b.slack.no_post(1.5)
    assert config_value(b, "guarded.limit") == 10

    def logged() -> str:
        found = control(b.a.data_dir, "debug.logs", service="meshd-bot", limit=500)
        return "\n".join(r["message"] for r in found["records"])
    wait_for(lambda: "U0EVE as nobody: config set guarded.limit" in logged(), BOUND,
             "the bot's log in the daemon")
    assert "U0EVE as ops" not in logged()


def test_a_service_command_is_told_the_callers_account(bot):
    b = bot
    reply = ask(b, "roll 2d6")
    assert reply["text"].startswith("ops rolled"), reply["text"]
    reply = ask(b, "roll 2d6", user="U0DEV")
    assert reply["text"].startswith("dev rolled"), reply["text"]
    # words that name another user are only words
    reply = ask(b, 'roll 1d6 --user ops user=ops {"user": "ops"} <@U0ALICE>', user="U0DEV")
    assert reply["text"].startswith("dev rolled") and "ops" not in reply["text"], \
        reply["text"]
    # unmapped: nobody, never someone else's account (with no public rule, no command)
    reply = ask(b, "roll 2d6", user=EVE)
    assert reply["text"].startswith("nobody rolled") or "don't know `roll`" in reply["text"], \
        reply["text"]
    assert "ops" not in reply["text"] and "dev" not in reply["text"]


def test_a_service_command_cannot_be_told_another_user_through_call(bot):
    """dev may use `roll`, so dev may call dice's Command.Exec: whatever it answers, it must
    not believe dev is ops."""
    reply = ask(bot, 'call dice Command.Exec {"args": ["1d6"], "user": "ops"}', user="U0DEV")
    assert "ops rolled" not in reply["text"], reply["text"]


def test_an_unmapped_user_gets_what_the_public_scope_may_do(bot):
    b = bot
    rules = (("botatk-public-dice", "service:dice:*"),
             ("botatk-public-services", "mesh:services:*"))
    try:
        for rid, res in rules:
            control(b.a.data_dir, "auth.rules.create", id=rid, resource=res, scope="",
                    access="granted", priority=10)
        time.sleep(0.5)
        reply = ask(b, "roll 2d6", user=EVE)
        assert reply["text"].startswith("nobody rolled"), reply["text"]
    finally:
        for rid, _ in rules:
            with contextlib.suppress(MeshError):
                control(b.a.data_dir, "auth.rules.delete", id=rid)


def test_a_members_service_cannot_take_a_built_in_name(bot):
    """`rogue` says it provides `nodes`: the built-in answers, and help does not list it."""
    b = bot
    reply = ask(b, "nodes")
    assert "1 nodes" in reply["text"] and "alive" in reply["text"], reply["text"]
    reply = ask(b, "help")
    assert "roll [NdM]" in reply["text"]
    assert "from service rogue" not in reply["text"], reply["text"]


def test_what_replies_echo_cannot_ping_or_link_in_the_channel(bot):
    """The message Slack shows (its blocks) and its notification text carry Slack's control
    characters escaped, from the user's own words and from the mesh's data alike."""
    b = bot
    hostile = "<!channel> <!here> <https://evil.example|click> &amp;"
    control(b.a.data_dir, "config.set", path="public.banner", value=hostile)
    for text, echoed in (("frob<!channel> <https://evil.example|click>", "&lt;!channel&gt;"),
                         ("config get public.banner", "&lt;!here&gt;"),
                         ("describe <!here>", "")):
        reply = ask(b, text)
        shown = "\n".join(x["text"]["text"] for x in reply["blocks"])
        for raw in ("<!channel>", "<!here>", "<https://"):
            assert raw not in shown, (text, shown)
            assert raw not in reply["text"], (text, reply["text"])
        assert echoed in shown, (text, shown)  # it was echoed: the check above means something


# --- 5. the daemon's side -------------------------------------------------------------------


def test_bot_ops_refuse_a_non_admin_token_and_change_nothing(bot):
    b = bot
    before = mapped(b)
    for op, args in (("bot.map", {"user": "U0DEV", "account": "ops"}),
                     ("bot.map", {"user": "U0NEW", "account": "ops"}),
                     ("bot.map", {"user": "U0NEW", "account": "dev", "namespace": "botatk"}),
                     ("bot.unmap", {"user": "U0ALICE"}),
                     ("bot.users", {}),
                     ("bot.users", {"namespace": "default"}),
                     # what the bot itself does with its power: sign a token for an account
                     ("auth.token.create", {"account": "ops", "ttl": 60})):
        status = refused(b, op, b.dev_token, **args)
        assert status == 403, (op, args, status)
        assert refused(b, op, "v4.public.forged", **args) == 401, (op, args)
    assert mapped(b) == before
    # the same ops with an admin's token run: the refusals are about the token
    assert any(r["user"] == "U0DEV" for r in as_client(b, "bot.users", b.ops_token))


@pytest.mark.parametrize("op,args", [
    ("config.set", {"path": "guarded.limit", "value": 1}),
    ("bot.map", {"user": "U0EVE", "account": "ops"}),
    ("bot.unmap", {"user": "U0ALICE"}),
    ("bot.users", {}),
    ("auth.token.create", {"account": "ops", "ttl": 60}),
    ("auth.accounts.create", {"id": "botatk-mallory", "secret": "mallory-secret-1",
                              "scopes": ["admin"]}),
    ("store.write", {"database": "bot", "table": "users", "key": "U0EVE",
                     "value": b'{"account": "ops", "namespace": "default"}'}),
    ("settings", {}),
])
def test_the_remote_flag_only_removes_rights(bot, op, args):
    """Over the control socket the operator may do all of these; flagged remote without a
    token, none runs (401); with dev's token, 403. Nothing changed."""
    b = bot
    before = mapped(b)
    assert refused(b, op, None, remote=True, **args) == 401
    assert refused(b, op, b.dev_token, remote=True, **args) in (401, 403)
    assert mapped(b) == before
    assert config_value(b, "guarded.limit") == 10
    assert not any(a.get("id") == "botatk-mallory" for a in
                   control(b.a.data_dir, "auth.accounts.list"))
