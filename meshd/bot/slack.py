"""The Slack input of the bot (`meshd bot slack`): slack_bolt's App, fed by the Events API
over HTTP (`--listen`, `POST /slack/events`) or by Socket Mode (`--socket-mode`).

Theory of operation: Bolt does what Slack asks of an app: it verifies each request's
signature with the signing secret and refuses timestamps older than 5 minutes (401), answers
url_verification, acks within Slack's 3 seconds and runs the listener afterwards in its own
thread pool, and ignores the bot's own messages. The listeners (a mention, a direct message)
hand the text to the core on the trio side (`trio.from_thread.run`), which runs the command
as the user against the local daemon, and post the reply with `chat.postMessage` in the
channel (in the thread, when the message was in one).

Rules:
- HTTP: served on the gateway's stack (h11, the Gate's caps per source, timeouts, TLS when
  given a certificate), loopback unless told; only `POST /slack/events`, bodies at most
  MAX_BODY (Slack's are a few KB). Bolt's dispatch runs in a worker thread.
- Slack retries an event it did not see acked in time (header X-Slack-Retry-Num) and may
  deliver one twice: an event id seen in the last SEEN_FOR seconds (at most SEEN_MAX kept) is
  acked and dropped, so a command runs once.
- Secrets come from files or the environment (cli/bot.py), never from flags.
- Every command is logged with the Slack user, the account it acted as and the outcome:
  into the daemon's logs (the bot registers as the service `meshd-bot`, so `meshd logs
  meshd-bot` shows them) and to stderr.
"""

from __future__ import annotations

import collections
import logging
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from slack_bolt import App, BoltRequest, BoltResponse
from slack_sdk import WebClient
from slack_sdk.signature import SignatureVerifier

from meshd.asgi import Receive, Scope, Send, allow_header, non_http, require_method, respond
from meshd.errors import MeshError
from meshd.gateway.bodies import read_body

from .commands import builtins, provided_commands
from .core import Bot, Reply, escape
from .mesh import Directory

log = logging.getLogger("meshd.bot")

MAX_BODY = 1 << 20
SEEN_FOR, SEEN_MAX = 3600.0, 10_000
SERVICE = "meshd-bot"
PATH = "/slack/events"


@dataclass(frozen=True)
class HttpLimits:
    """What the gateway's HTTP stack needs to know (the fields it reads of ApiSettings)."""

    max_body_bytes: int = MAX_BODY
    timeout: float = 10.0
    read_timeout: float = 10.0
    keep_alive: float = 30.0
    max_header_bytes: int = 16 * 1024


class Seen:
    """Event ids seen lately, bounded in count and age."""

    def __init__(self, keep: float = SEEN_FOR, most: int = SEEN_MAX) -> None:
        self.keep = keep
        self.most = most
        self.ids: collections.OrderedDict[str, float] = collections.OrderedDict()

    def first(self, event_id: str, now: float | None = None) -> bool:
        """Whether `event_id` is new (it is remembered from now on)."""
        now = time.monotonic() if now is None else now
        while self.ids and now - next(iter(self.ids.values())) > self.keep:
            self.ids.popitem(last=False)
        if event_id in self.ids:
            return False
        while len(self.ids) >= self.most:
            self.ids.popitem(last=False)
        self.ids[event_id] = now
        return True


class SlackBot:
    def __init__(self, socket: Path, bot_token: str, signing_secret: str = "",
                 app_token: str = "", api_url: str = "https://slack.com/api/",
                 admin_token: str | None = None) -> None:
        self.socket = socket
        self.directory = Directory(socket, admin_token)
        self.core = Bot(builtins(), extra=provided_commands, log=self._log)
        self.app_token = app_token
        self.signing_secret = signing_secret
        self.seen = Seen()
        self.stats = {"bot_events": 0, "bot_duplicates": 0, "bot_replies": 0,
                      "bot_reply_errors": 0}
        self.shipper: Any = None  # the meshd-bot service's log shipper, once registered
        self.trio_token: trio.lowlevel.TrioToken | None = None
        client = WebClient(token=bot_token, base_url=api_url)
        self.app = App(token=bot_token, client=client, signing_secret=signing_secret or None,
                       request_verification_enabled=bool(signing_secret),
                       process_before_response=False)
        self.app.middleware(self._dedupe)
        self.app.event("app_mention")(self._on_mention)
        self.app.event("message")(self._on_message)

    # --- Bolt's side (its worker threads) --------------------------------------------------

    def _dedupe(self, body: dict[str, Any], next: Any) -> BoltResponse | None:
        event_id = body.get("event_id") if isinstance(body, dict) else None
        if isinstance(event_id, str) and event_id:
            self.stats["bot_events"] += 1
            if not self.seen.first(event_id):
                self.stats["bot_duplicates"] += 1
                return BoltResponse(status=200, body="")
        next()
        return None

    def _on_mention(self, event: dict[str, Any], client: WebClient) -> None:
        self._answer(event, client)

    def _on_message(self, event: dict[str, Any], client: WebClient) -> None:
        if event.get("channel_type") == "im" and not event.get("subtype") \
                and not event.get("bot_id"):
            self._answer(event, client)

    def _answer(self, event: dict[str, Any], client: WebClient) -> None:
        user, text, channel = event.get("user"), event.get("text"), event.get("channel")
        if not isinstance(user, str) or not isinstance(text, str) \
                or not isinstance(channel, str) or self.trio_token is None:
            return
        try:
            reply = trio.from_thread.run(self.handle, user, text, trio_token=self.trio_token)
        except trio.RunFinishedError:
            return
        thread = event.get("thread_ts")
        try:
            client.chat_postMessage(channel=channel, text=escape(reply.plain()),
                                    blocks=reply.blocks(),
                                    **({"thread_ts": thread} if isinstance(thread, str)
                                       else {}))
            self.stats["bot_replies"] += 1
        except Exception as exc:  # Slack refused or is unreachable: this reply is lost
            self.stats["bot_reply_errors"] += 1
            log.warning("reply to %s in %s not posted: %s", user, channel, exc)

    # --- the trio side ---------------------------------------------------------------------

    async def handle(self, user: str, text: str) -> Reply:
        """A command line from `user`, run as the account it is mapped to."""
        try:
            async with self.directory.mesh(user) as mesh:
                return await self.core.handle(user, text, mesh)
        except MeshError as exc:
            self._log(user, "?", text[:200], f"{exc.status} {exc.detail}")
            return Reply(f"I could not act for you: {exc.status} {exc.detail}", ok=False)

    def _log(self, user: str, account: str, line: str, outcome: str) -> None:
        message = f"{user} as {account or 'nobody'}: {line} -> {outcome}"
        log.info("%s", message)
        if self.shipper is not None:
            self.shipper.add("info" if outcome == "ok" else "warning", message,
                             {"user": user, "account": account or "", "command": line})

    async def serve_http(self, host: str, port: int, tls: ssl.SSLContext | None = None,
                         task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        from meshd.gateway.server import GatewayServer

        server = GatewayServer(BoltHttp(self.app, self.signing_secret), HttpLimits(), self.stats,  # type: ignore[arg-type]
                               name="bot")
        await server.serve(host, port, tls, task_status=task_status)

    async def serve_socket_mode(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        from slack_bolt.adapter.socket_mode import SocketModeHandler

        handler = SocketModeHandler(self.app, self.app_token)
        await trio.to_thread.run_sync(handler.connect)
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(handler.close)

    async def run(self, listen: tuple[str, int] | None, socket_mode: bool,
                  tls: ssl.SSLContext | None = None,
                  task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Registers as `meshd-bot`, then serves Slack until cancelled; started() gives the
        HTTP port (0 with Socket Mode only)."""
        from meshd_sdk import Service

        self.trio_token = trio.lowlevel.current_trio_token()
        service = Service(SERVICE, addr=self.socket, reconnect=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(service.run)
            await service.registered.wait()
            self.shipper = service.logs
            port = 0
            if listen is not None:
                port = await nursery.start(self.serve_http, listen[0], listen[1], tls)
            if socket_mode:
                await nursery.start(self.serve_socket_mode)
            task_status.started(port)


MAX_TIMESTAMP_DIGITS = 12


class BoltHttp:
    """ASGI: `POST /slack/events` handed to Bolt (in a worker thread), its answer sent back.

    The signature is checked here, before Bolt parses anything: an unsigned body is a 401
    whatever it holds, and a signed one that is not a Slack request (not a JSON object,
    nested past the parser, an `event` that is not a map) a 400, never a failure inside
    Bolt."""

    def __init__(self, app: App, signing_secret: str = "") -> None:
        self.app = app
        self.verifier = SignatureVerifier(signing_secret) if signing_secret else None

    def signed(self, body: str, headers: dict[str, list[str]]) -> bool:
        """Whether Slack signed `body` in the last 5 minutes (always, without a secret)."""
        if self.verifier is None:
            return True
        stamp = (headers.get("x-slack-request-timestamp") or [""])[0]
        signature = (headers.get("x-slack-signature") or [""])[0]
        if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= MAX_TIMESTAMP_DIGITS):
            return False
        return self.verifier.is_valid(body=body, timestamp=stamp, signature=signature)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if await non_http(scope, receive, send):
            return
        try:
            if scope["path"] != PATH:
                raise MeshError(404, f"Slack's events go to POST {PATH}")
            require_method(scope["method"], ("POST",), "meshd.bot")
            body = await read_body(scope, receive, MAX_BODY, 10.0)
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            await respond(send, 400, b"the body is not UTF-8", "text/plain")
            return
        except MeshError as exc:
            await respond(send, exc.status, exc.detail.encode(), "text/plain",
                          *allow_header(exc))
            return
        headers: dict[str, list[str]] = {}
        for name, value in scope.get("headers") or []:
            headers.setdefault(name.decode("latin-1").lower(), []).append(
                value.decode("latin-1"))
        if not self.signed(text, headers):
            await respond(send, 401, b"the request is not signed by Slack (or is older than "
                          b"5 minutes)", "text/plain")
            return
        query = (scope.get("query_string") or b"").decode("latin-1")
        try:
            request = BoltRequest(body=text, query=query, headers=headers)
            if not isinstance(request.body, dict) or not isinstance(
                    request.body.get("event", {}), dict):
                raise ValueError("not an object")
        except Exception:  # Bolt's parsing of a body Slack would not send
            await respond(send, 400, b"the body is not a Slack request", "text/plain")
            return
        response = await trio.to_thread.run_sync(self.app.dispatch, request)
        out = [(k.encode("latin-1"), v.encode("latin-1"))
               for k, values in response.headers.items() for v in values
               if k.lower() != "content-length"]
        ctype = next((v for k, v in out if k == b"content-type"), b"text/plain").decode()
        await respond(send, response.status, response.body.encode(), ctype,
                      *[(k, v) for k, v in out if k != b"content-type"])
