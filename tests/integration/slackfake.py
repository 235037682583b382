"""A local stand-in for Slack, for the bot's tests: the Web API (auth.test,
chat.postMessage, apps.connections.open) on a loopback HTTP server that records what the bot
posts, a Socket Mode WebSocket server speaking Slack's envelopes (hello, events_api, the
app's acknowledgements), and events signed the way Slack signs them.

Only Slack is faked: the daemon and the bot are the real ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import queue
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import trio
from trio_websocket import ConnectionClosed, serve_websocket

BOT_USER = "UBOTBOT"
SECRET = "8f742231b10e8888abcd99yyyzzz85a5"


class FakeSlack:
    """The Web API at `api_url`; `posts` holds every chat.postMessage (a dict of its
    arguments), `wait_post()` waits for the next."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        self.calls: list[str] = []
        self._new: queue.Queue[dict[str, Any]] = queue.Queue()
        self.socket_url = ""  # what apps.connections.open answers
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("content-length") or 0))
                if "json" in (self.headers.get("content-type") or ""):
                    args = json.loads(raw or b"{}")
                else:
                    args = {k: v[0] for k, v in urllib.parse.parse_qs(raw.decode()).items()}
                method = self.path.rsplit("/", 1)[-1]
                fake.calls.append(method)
                if method == "auth.test":
                    out = {"ok": True, "user_id": BOT_USER, "bot_id": "BBOTBOT",
                           "team_id": "T0TEAM", "user": "meshd", "team": "test"}
                elif method == "chat.postMessage":
                    if isinstance(args.get("blocks"), str):
                        args["blocks"] = json.loads(args["blocks"])
                    fake.posts.append(args)
                    fake._new.put(args)
                    out = {"ok": True, "channel": args.get("channel"), "ts": f"{time.time()}"}
                elif method == "apps.connections.open":
                    out = {"ok": True, "url": fake.socket_url}
                else:
                    out = {"ok": False, "error": "unknown_method"}
                data = json.dumps(out).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.api_url = f"http://127.0.0.1:{self.server.server_address[1]}/api/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait_post(self, timeout: float = 15.0) -> dict[str, Any]:
        return self._new.get(timeout=timeout)

    def no_post(self, wait: float = 1.0) -> bool:
        try:
            self._new.get(timeout=wait)
        except queue.Empty:
            return True
        return False

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def event(text: str, user: str = "U0ALICE", channel: str = "C0OPS", kind: str = "app_mention",
          event_id: str = "", **extra: Any) -> dict[str, Any]:
    """An Events API envelope of a mention (or a DM: kind "message", channel_type "im")."""
    inner = {"type": kind, "user": user, "text": text, "channel": channel,
             "ts": f"{time.time():.6f}", "event_ts": f"{time.time():.6f}", **extra}
    return {"token": "unused", "team_id": "T0TEAM", "api_app_id": "A0APP",
            "event": inner, "type": "event_callback",
            "event_id": event_id or f"Ev{time.time_ns()}", "event_time": int(time.time()),
            "authorizations": [{"user_id": BOT_USER, "is_bot": True}]}


def signed(body: bytes, secret: str = SECRET, ts: int | None = None) -> dict[str, str]:
    """The headers Slack sends with `body`."""
    ts = int(time.time()) if ts is None else ts
    base = f"v0:{ts}:".encode() + body
    sig = "v0=" + hmac.new(secret.encode(), base, hashlib.sha256).hexdigest()
    return {"X-Slack-Request-Timestamp": str(ts), "X-Slack-Signature": sig,
            "Content-Type": "application/json"}


def post(url: str, payload: dict[str, Any], headers: dict[str, str] | None = None,
         body: bytes | None = None) -> tuple[int, bytes]:
    """POST an event to the bot as Slack would (signed unless `headers` are given)."""
    data = body if body is not None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers=headers if headers is not None else signed(data))
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class SocketModeServer:
    """Slack's Socket Mode end: the app connects, gets `hello`, and is sent `events_api`
    envelopes (`push`); its acknowledgements land in `acks`."""

    def __init__(self) -> None:
        self.acks: list[str] = []
        self.connected = threading.Event()
        self._out: queue.Queue[dict[str, Any]] = queue.Queue()
        self.port = 0
        self._ready = threading.Event()
        self._stop: trio.lowlevel.TrioToken | None = None
        self._cancel: trio.CancelScope | None = None
        self.thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self.thread.start()
        self._ready.wait(10)
        self.url = f"ws://127.0.0.1:{self.port}/link"

    async def _main(self) -> None:
        self._stop = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as self._cancel:
            async with trio.open_nursery() as nursery:
                server = await nursery.start(serve_websocket, self._handle, "127.0.0.1", 0,
                                             None)
                self.port = server.port
                self._ready.set()

    async def _handle(self, request: Any) -> None:
        ws = await request.accept()
        await ws.send_message(json.dumps({"type": "hello", "num_connections": 1,
                                          "connection_info": {"app_id": "A0APP"}}))
        self.connected.set()

        async def sender() -> None:
            while True:
                try:
                    msg = self._out.get_nowait()
                except queue.Empty:
                    await trio.sleep(0.02)
                    continue
                await ws.send_message(json.dumps(msg))

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender)
                while True:
                    raw = await ws.get_message()
                    msg = json.loads(raw)
                    if isinstance(msg, dict) and "envelope_id" in msg:
                        self.acks.append(msg["envelope_id"])
        except ConnectionClosed:
            pass

    def push(self, payload: dict[str, Any], envelope_id: str) -> None:
        self._out.put({"envelope_id": envelope_id, "type": "events_api",
                       "accepts_response_payload": False, "retry_attempt": 0,
                       "retry_reason": "", "payload": payload})

    def close(self) -> None:
        if self._stop is not None and self._cancel is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._cancel.cancel, trio_token=self._stop)
        self.thread.join(5)
