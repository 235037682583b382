"""Reaching a node's proxy endpoint from outside the cluster (`meshd call --via`, `meshd
tunnel connect --via`): the connection, its TLS, and what to tell the user when it fails.

Rules:
- `wss://` always verifies the certificate and the host name (meshd.tlsconf.client_context:
  against --ca-file when given, else the system trust store). Nothing here turns that off.
- `ws://` still works, but it is plain text: `cleartext_warning` says so for every host that
  is not loopback, since the token and the data cross the network in clear.
- The TCP connect, the TLS handshake and the WebSocket upgrade run under one deadline
  (CONNECT_TIMEOUT). A server that closes the connection during the upgrade (a wss://
  endpoint spoken to as ws://) is reported at once; trio-websocket's client alone would
  wait for its deadline.
- Every failure to connect is a MeshError with one line that says what went wrong and what
  to do: 400 for a --via or --ca-file that cannot be used, 503 for an unreachable proxy, a
  certificate that is not trusted ("pass --ca-file"), a TLS/plain-text mismatch.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import trio

from meshd import tlsconf
from meshd.errors import MeshError
from meshd.transport import addr as addrs

CONNECT_TIMEOUT = 10.0  # connect + TLS + upgrade; a proxy slower than this is unusable
CLOSE_TIMEOUT = 5.0  # the WebSocket closing handshake; then the connection is dropped
# OpenSSL verify codes that are not about trust (X509_V_ERR_*)
_NOT_YET_VALID, _EXPIRED, _HOSTNAME_MISMATCH, _IP_MISMATCH = 9, 10, 62, 64


def _error(status: int, detail: str) -> MeshError:
    return MeshError(status, detail, id="meshd.proxy.via")


class Via:
    """A proxy endpoint given as `ws://HOST:PORT` or `wss://HOST:PORT` (and `--ca-file` for
    wss). Building one checks both and loads the trust roots once."""

    def __init__(self, url: str, ca_file: str | None = None) -> None:
        self.url = url
        self.ca_file = ca_file or None
        usage = f"--via {url}: give wss://HOST:PORT (or ws://HOST:PORT)"
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise _error(400, usage) from None
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise _error(400, usage)
        self.secure = parts.scheme == "wss"
        self.host = parts.hostname
        self.port = port or (443 if self.secure else 80)
        self.resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.where = addrs.format(self.host, self.port)
        self.context: ssl.SSLContext | None = None
        if self.secure:
            try:
                self.context = tlsconf.client_context(self.ca_file)
            except tlsconf.TlsError as exc:
                raise _error(400, str(exc)) from None
        elif self.ca_file:
            raise _error(400, f"--ca-file is for wss:// proxies; --via {url} is plain ws://")

    def cleartext_warning(self) -> str | None:
        """One line for stderr when the token and data would cross a network in clear."""
        if self.secure or addrs.is_loopback(self.host):
            return None
        return (f"warning: --via {self.url} is not encrypted: the token and the data cross "
                "the network in clear (serve the proxy with --tls-cert/--tls-key, use wss://)")

    async def _open_stream(self) -> trio.abc.Stream:
        """TCP, then (wss) the TLS handshake with the certificate verified."""
        try:
            tcp = await trio.open_tcp_stream(self.host, self.port)
        except OSError as exc:  # trio's "all attempts failed" carries the reasons as cause
            causes = getattr(exc.__cause__, "exceptions", None) or [exc.__cause__]
            why = getattr(causes[0], "strerror", None) or exc.strerror or exc
            raise _error(503, f"cannot reach the proxy at {self.where}: {why}") from None
        if self.context is None:
            return tcp
        tls = trio.SSLStream(tcp, self.context, server_hostname=self.host,
                             https_compatible=True)
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError as exc:
            await trio.aclose_forcefully(tcp)
            raise _error(503, self._explain(exc.__cause__)) from None
        return tls

    def _explain(self, cause: BaseException | None) -> str:
        where = self.where
        if isinstance(cause, ssl.SSLCertVerificationError):
            code, why = cause.verify_code, cause.verify_message
            if code in (_HOSTNAME_MISMATCH, _IP_MISMATCH):
                return f"TLS certificate of {where} is not valid for {self.host} ({why})"
            if code in (_EXPIRED, _NOT_YET_VALID):
                return f"TLS certificate of {where} is not valid now ({why})"
            if self.ca_file:
                return (f"TLS certificate of {where} is not trusted by --ca-file "
                        f"{self.ca_file} ({why})")
            return f"TLS certificate of {where} is not trusted (pass --ca-file)"
        reason = getattr(cause, "reason", None) or "the connection closed"
        return (f"TLS handshake with {where} failed ({reason}); if that proxy serves plain "
                f"ws://, use --via ws://{where}")

    async def check(self) -> None:
        """Connect once (and for wss, verify the certificate), then hang up: a start-up
        check so a misconfigured --via fails at once, not on the first connection."""
        with trio.move_on_after(CONNECT_TIMEOUT) as scope:
            stream = await self._open_stream()
            with trio.move_on_after(CLOSE_TIMEOUT):
                await stream.aclose()
        if scope.cancelled_caught:
            raise _error(503, f"no answer from the proxy at {self.where} within "
                              f"{CONNECT_TIMEOUT:g} s")

    @contextlib.asynccontextmanager
    async def connect(self, max_message_size: int = 2 << 20) -> AsyncIterator[Any]:
        """An open WebSocket to the proxy (a trio_websocket.WebSocketConnection)."""
        import trio_websocket

        try:
            async with trio.open_nursery() as nursery:
                ws = None
                with trio.move_on_after(CONNECT_TIMEOUT) as scope:
                    stream = _Watched(await self._open_stream())
                    ws = await _upgrade(nursery, stream, self, max_message_size)
                if ws is None:
                    if scope.cancelled_caught:
                        raise _error(503, f"no answer from the proxy at {self.where} within "
                                          f"{CONNECT_TIMEOUT:g} s")
                    hint = "" if self.secure else \
                        f" (if it serves wss://, use --via wss://{self.where})"
                    raise _error(503, f"the proxy at {self.where} closed the connection "
                                      f"during the WebSocket upgrade{hint}")
                try:
                    yield ws
                finally:
                    try:
                        with trio.move_on_after(CLOSE_TIMEOUT):
                            await ws.aclose()
                    finally:
                        nursery.cancel_scope.cancel()
        except trio_websocket.ConnectionRejected as exc:
            raise _error(503, f"the proxy at {self.where} refused the WebSocket upgrade "
                              f"(HTTP {exc.status_code})") from None


async def _upgrade(nursery: trio.Nursery, stream: _Watched, via: Via,
                   max_message_size: int) -> Any:
    """The client side of the WebSocket upgrade, or None if the server hung up first."""
    import trio_websocket

    ws = None
    host = via.host if via.port == (443 if via.secure else 80) else via.where
    async with trio.open_nursery() as race:
        async def upgrade() -> None:
            nonlocal ws
            ws = await trio_websocket.wrap_client_stream(
                nursery, stream, host, via.resource, max_message_size=max_message_size)
            race.cancel_scope.cancel()

        async def hung_up() -> None:
            await stream.ended.wait()
            race.cancel_scope.cancel()

        race.start_soon(upgrade)
        race.start_soon(hung_up)
    return ws


class _Watched(trio.abc.Stream):
    """A stream that notes when the peer has hung up (end of data, a broken or closed
    stream), so the upgrade need not wait for its deadline."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.ended = trio.Event()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            data = await self.inner.receive_some(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.ended.set()
            raise
        if not data:
            self.ended.set()
        return data

    async def aclose(self) -> None:
        self.ended.set()
        await self.inner.aclose()
