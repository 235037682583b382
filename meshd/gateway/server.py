"""The HTTP listener of the API gateway (`meshd up --api-listen HOST:PORT`) and of the web
dashboard (`--web-listen`, meshd/web/), in the daemon's nursery.

Rules:
- HTTP/1.1 is spoken by gateway/http11.py (h11, one task per connection); a WebSocket
  upgrade is handed to hypercorn's trio connection handler, which speaks WebSocket. The
  connections are accepted through meshd/transport/listeners.py like every listener of the
  node: a Gate caps open connections, those per source address and pending TLS handshakes
  (counted as `api_*`, or `web_*`, in the stats), and whatever one connection does ends that
  connection only. With a certificate (node.tls_cert/tls_key) it serves https:// only, the handshake
  within the pending deadline.
- Bounds: the request head at api.max_header_bytes, a connection that sends nothing for
  api.read_timeout is closed, idle keep-alive connections after api.keep_alive (http11.py,
  and hypercorn's settings for WebSocket connections). The app bounds bodies, time and
  requests in flight (gateway/app.py).
- hypercorn's own logs stay off: the app writes the access log (api.access_log).
"""

from __future__ import annotations

import ssl
from typing import Any

import trio
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.config import Config
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext

from meshd.settings import ApiSettings, WebSettings
from meshd.transport import listeners as serving

from .app import Gateway
from .http11 import Http11, Replay

WS_PING = 20.0  # seconds between pings on an open WebSocket (hypercorn's)


def hypercorn_config(s: ApiSettings | WebSettings) -> Config:
    config = Config()
    config.accesslog = None
    config.errorlog = None
    config.keep_alive_timeout = s.keep_alive
    # hypercorn serves only WebSocket connections here: an idle WebSocket is not a slow
    # client (its read timeout would cut it, even during the upgrade to a slow service);
    # pings keep the connection checked instead
    config.read_timeout = None
    config.websocket_ping_interval = WS_PING
    config.h11_max_incomplete_size = s.max_header_bytes
    config.ssl_handshake_timeout = s.read_timeout
    config.websocket_max_message_size = s.max_body_bytes
    config.include_server_header = False
    return config


class GatewayServer:
    """Serves an ASGI app (the Gateway; the web Dashboard) on one address until cancelled;
    `name` prefixes its connection counters."""

    def __init__(self, gateway: Gateway | Any, settings: ApiSettings | WebSettings,
                 stats: dict[str, int] | None = None, name: str = "api") -> None:
        self.gateway = gateway
        self.s = settings
        self.config = hypercorn_config(settings)
        self.context = WorkerContext(None)
        self.app = ASGIWrapper(gateway)
        self.stats: dict[str, int] = stats if stats is not None else {}
        self.gate = serving.Gate(name, self.stats, pending_timeout=settings.read_timeout)
        self.port = 0

    async def serve(self, host: str, port: int, tls: ssl.SSLContext | None = None,
                    task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; started with the bound port once listening (a bind failure
        raises OSError before that)."""
        self.http11 = Http11(self.gateway, self.s, self._upgrade,
                             "http" if tls is None else "https")
        async with trio.open_nursery() as nursery:
            self.port = await nursery.start(serving.serve_tcp, host, port, self._handle,
                                            self.gate, tls)
            task_status.started(self.port)

    async def _handle(self, stream: Any, ticket: serving.Ticket) -> None:
        ticket.authenticated()  # the request's own token is checked per request
        await self.http11.serve(stream)

    async def _upgrade(self, stream: Any, head: bytes) -> None:
        """A WebSocket upgrade: hypercorn's handler, the head replayed in front."""
        await TCPServer(self.app, self.config, self.context, {}, Replay(stream, head)).run()
