"""Redis connections on trio: one multiplexed connection for calls, one for the change feed.

The Redis engine's hot paths (single-key operations and its watch) run here, in the node's
own trio thread: redis-py's blocking client would need a worker thread per call and its
asyncio client a loop in another thread, and crossing threads cost more than Redis's own
work. hiredis parses the replies and packs the commands; this module only moves bytes.

Rules:
- `Multiplexer`: one connection carries every caller's commands, pipelined, as the
  multiplexed connections of StackExchange.Redis and redis-rs do. A call's commands are
  queued as one contiguous chunk together with its place in the reply queue (no checkpoint
  between the two), and the writer task sends everything queued in one write; Redis
  answers in order, so the reader task hands replies out first in, first out (a call that
  expects n replies takes the next n; an error reply counts as one).
- The connection is made on first use: connect, then AUTH (as redis-py: user and password
  when the URL names a user) and SELECT. Callers that queued behind a connection attempt
  that failed get its failure instead of trying again one after another. Any I/O or
  protocol failure closes the connection and fails every call waiting on it; the next call
  connects anew, so the same engine works again once Redis is back. Nothing is resent: a
  call that failed may or may not have been applied.
- Deadlines, queue bounds and connecting once as inflight.py says; also at most
  MAX_OUTGOING unsent bytes per connection (`Overloaded` past it).
- `follow`: a connection in subscriber mode on one channel, handing each message's payload
  to a callback. It PINGs every `ping_every` seconds and ends (TimeoutError) when nothing,
  not even the PONG, arrived for `ping_every + timeout`: a connection that went silent (an
  idle NAT or load balancer dropped it) is found and the caller subscribes again. TCP
  keepalive is on for both kinds of connection.
- URLs: redis://, rediss:// (TLS) and unix:// as redis-py reads them
  (redis.connection.parse_url), with redis-py's TLS options: ssl_ca_certs, ssl_ca_path,
  ssl_ca_data, ssl_certfile, ssl_keyfile, ssl_password, ssl_cert_reqs (required, the
  default; optional; none), ssl_check_hostname (on unless ssl_cert_reqs=none),
  ssl_min_version (771 = TLS 1.2, 772 = TLS 1.3) and ssl_ciphers. Any other ssl_ option is refused
  rather than ignored.
- The tasks of a connection run in the nursery of the `Multiplexer.run` that made it and
  end with it; `follow`'s in its own.
"""

from __future__ import annotations

import functools
import hashlib
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import hiredis
import trio

from .inflight import Call, Connections, Inflight, Overloaded

READ_SIZE = 65536
MAX_OUTGOING = 64 * 1024 * 1024  # bytes queued and not yet sent on one connection
PING_EVERY = 10.0  # seconds between PINGs on a subscriber connection
_MORE = object()  # hiredis: not enough data yet (a RESP3 false is False, never this)
ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, hiredis.HiredisError)


class ReplyFailed(Exception):
    """Redis answered a call with an error reply (its text is the message)."""


@dataclass(frozen=True)
class Address:
    host: str | None
    port: int
    path: str | None
    username: str | None = field(repr=False)
    password: str | None = field(repr=False)
    db: int
    tls: ssl.SSLContext | None = None


_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL,
              "required": ssl.CERT_REQUIRED}
_TLS_OPTIONS = {"ssl_ca_certs", "ssl_ca_path", "ssl_ca_data", "ssl_certfile", "ssl_keyfile",
                "ssl_password", "ssl_cert_reqs", "ssl_check_hostname", "ssl_min_version",
                "ssl_ciphers"}


def _tls_context(kw: dict[str, Any]) -> ssl.SSLContext:
    unknown = sorted(k for k in kw if k.startswith("ssl_") and k not in _TLS_OPTIONS)
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: not supported by meshd's Redis client")
    reqs = kw.get("ssl_cert_reqs", "required")
    if isinstance(reqs, str):
        if reqs not in _CERT_REQS:
            raise ValueError(f"ssl_cert_reqs must be one of {', '.join(_CERT_REQS)}")
        reqs = _CERT_REQS[reqs]
    ctx = ssl.create_default_context()  # the system's CAs, plus any given below
    if kw.get("ssl_ca_certs") or kw.get("ssl_ca_path") or kw.get("ssl_ca_data"):
        ctx.load_verify_locations(kw.get("ssl_ca_certs"), kw.get("ssl_ca_path"),
                                  kw.get("ssl_ca_data"))
    ctx.check_hostname = bool(kw.get("ssl_check_hostname", True)) and reqs != ssl.CERT_NONE
    ctx.verify_mode = reqs
    if kw.get("ssl_keyfile") and not kw.get("ssl_certfile"):
        raise ValueError("ssl_keyfile needs ssl_certfile")
    if kw.get("ssl_certfile"):
        ctx.load_cert_chain(kw["ssl_certfile"], kw.get("ssl_keyfile"),
                            password=kw.get("ssl_password") or "")  # never a prompt
    version = kw.get("ssl_min_version")
    if version is not None:
        try:
            ctx.minimum_version = ssl.TLSVersion(version)
        except ValueError:
            raise ValueError("ssl_min_version is a TLS version number, as redis-py reads it: "
                             "771 (TLS 1.2) or 772 (TLS 1.3)") from None
    if kw.get("ssl_ciphers"):
        ctx.set_ciphers(kw["ssl_ciphers"])
    return ctx


def address(url: str) -> Address:
    """Where `url` points. Raises ValueError (or OSError, ssl.SSLError: unreadable TLS
    files) for a URL that cannot be used."""
    from redis.connection import SSLConnection, parse_url

    kw = parse_url(url)
    tls = _tls_context(kw) if kw.get("connection_class") is SSLConnection else None
    return Address(kw.get("host", "localhost") if "path" not in kw else None,
                   int(kw.get("port", 6379)), kw.get("path"), kw.get("username"),
                   kw.get("password"), int(kw.get("db", 0) or 0), tls)


@functools.lru_cache(maxsize=64)
def script_sha(source: str) -> str:
    return hashlib.sha1(source.encode()).hexdigest()


def _pack(commands: Sequence[Sequence[Any]]) -> bytes:
    return b"".join(hiredis.pack_command(tuple(c)) for c in commands)


def _keepalive(sock: Any) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)


async def _open(addr: Address, deadline: float) -> tuple[trio.abc.Stream, Any]:
    """A connected, authenticated stream on the right db, and its reply reader; by
    `deadline` (TimeoutError after it)."""
    reader = hiredis.Reader(replyError=ReplyFailed, notEnoughData=_MORE)
    raw: trio.abc.Stream | None = None
    try:
        with trio.fail_at(deadline):
            if addr.path is not None:
                raw = stream = await trio.open_unix_socket(addr.path)
            else:
                tcp = await trio.open_tcp_stream(addr.host or "localhost", addr.port)
                raw = stream = tcp
                _keepalive(tcp)
                if addr.tls is not None:
                    stream = trio.SSLStream(tcp, addr.tls, server_hostname=addr.host,
                                            https_compatible=True)
                    await stream.do_handshake()
            hello: list[tuple[Any, ...]] = []
            if addr.username:  # as redis-py: a named user, with its password or ""
                hello.append(("AUTH", addr.username, addr.password or ""))
            elif addr.password:
                hello.append(("AUTH", addr.password))
            if addr.db:
                hello.append(("SELECT", addr.db))
            if hello:
                await stream.send_all(_pack(hello))
                for _ in hello:
                    reply = await _next_reply(stream, reader)
                    if isinstance(reply, ReplyFailed):
                        raise reply
    except BaseException as exc:
        if raw is not None:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(raw)
        if isinstance(exc, trio.TooSlowError):
            raise TimeoutError("no connection to Redis in time") from None
        raise
    return stream, reader


async def _next_reply(stream: trio.abc.Stream, reader: Any) -> Any:
    while (reply := reader.gets()) is _MORE:
        data = await stream.receive_some(READ_SIZE)
        if not data:
            raise ConnectionResetError("Redis closed the connection")
        reader.feed(data)
    return reply


class _Call(Call):
    __slots__ = ("count", "replies")

    def __init__(self, count: int, deadline: float,
                 then: Callable[[Any], None] | None = None) -> None:
        super().__init__(deadline, then)
        self.count = count
        self.replies: list[Any] = []


class _Connection(Inflight):
    def __init__(self, stream: trio.abc.Stream, reader: Any) -> None:
        super().__init__("Redis")
        self.stream = stream
        self.reader = reader
        self.outgoing: list[bytes] = []
        self.outgoing_bytes = 0

    def queue(self, call: _Call, data: bytes) -> None:
        if self.outgoing_bytes + len(data) > MAX_OUTGOING:
            raise Overloaded("too many bytes queued on the connection to Redis")
        self.admit(call)
        self.outgoing.append(data)
        self.outgoing_bytes += len(data)

    async def serve(self) -> None:
        await self.run([self._write, self._read],
                       lambda: trio.aclose_forcefully(self.stream))

    async def _write(self) -> None:
        try:
            while True:
                if not self.outgoing:
                    await self.lot.park()
                    continue
                data = b"".join(self.outgoing)
                self.outgoing.clear()
                self.outgoing_bytes = 0
                await self.stream.send_all(data)
        except ERRORS as exc:
            self.fail(exc)

    async def _read(self) -> None:
        try:
            while True:
                data = await self.stream.receive_some(READ_SIZE)
                if not data:
                    raise ConnectionResetError("Redis closed the connection")
                self.reader.feed(data)
                while (reply := self.reader.gets()) is not _MORE:
                    if not self.waiting:
                        raise hiredis.ProtocolError("a reply nobody asked for")
                    call = self.waiting[0]
                    call.replies.append(reply)
                    if len(call.replies) == call.count:
                        self.waiting.popleft()
                        call.finish()
        except ERRORS as exc:
            self.fail(exc)


class Multiplexer(Connections):
    """Calls of many tasks over one pipelined connection (module docstring)."""

    def __init__(self, addr: Address, timeout: float) -> None:
        super().__init__("Redis")
        self.addr = addr
        self.timeout = timeout

    @property
    def _conn(self) -> _Connection | None:
        """The connection (the newest made)."""
        return self._conns[-1] if self._conns else None

    def _ready(self) -> _Connection | None:
        conn = self._conn
        return conn if conn is not None and not conn.closed else None

    async def _connection(self, deadline: float) -> _Connection:
        conn = self._ready()
        if conn is not None:
            return conn

        async def connect() -> _Connection:
            return await self._add(lambda: _open(self.addr, deadline),
                                   lambda opened: _Connection(*opened),
                                   lambda opened: trio.aclose_forcefully(opened[0]))

        return await self._gate.open(deadline, self._ready, connect)

    async def call(self, *commands: Sequence[Any]) -> list[Any]:
        """Send `commands` as one chunk; their replies, in order. Error replies are in the
        list as ReplyFailed instances (a script's caller raises them, see `script`)."""
        if not commands:
            return []
        deadline = trio.current_time() + self.timeout
        conn = await self._connection(deadline)
        call = _Call(len(commands), deadline)
        conn.queue(call, _pack(commands))
        await conn.wait(call)
        return call.replies

    def call_soon(self, commands: Sequence[Sequence[Any]],
                  then: Callable[[list[Any] | None, BaseException | None], None]) -> bool:
        """Queue `commands` on the open connection; `then(replies, None)` or `then(None,
        error)` runs once answered, in the reader (it must not block). False, and nothing
        queued, when no connection is open or the queue is full: the caller goes the way
        that awaits (which connects)."""
        conn = self._ready()
        if conn is None or not commands:
            return False
        call = _Call(len(commands), trio.current_time() + self.timeout,
                     lambda c: then(c.replies if c.error is None else None, c.error))
        try:
            conn.queue(call, _pack(commands))
        except Overloaded:
            return False
        return True

    def script_soon(self, source: str, keys: Sequence[Any], args: Sequence[Any],
                    then: Callable[[Any, BaseException | None], None]) -> bool:
        """`script`, answered through `then(reply, error)` as `call_soon` says."""
        def answered(replies: list[Any] | None, error: BaseException | None) -> None:
            reply = replies[0] if replies else None
            if isinstance(reply, ReplyFailed) and str(reply).startswith("NOSCRIPT"):
                if not self.call_soon([("EVAL", source, len(keys), *keys, *args)], loaded):
                    then(None, ConnectionResetError("the connection to Redis was closed"))
                return
            loaded(replies, error)

        def loaded(replies: list[Any] | None, error: BaseException | None) -> None:
            reply = replies[0] if replies else None
            if error is None and isinstance(reply, ReplyFailed):
                error, reply = reply, None
            then(reply, error)

        return self.call_soon([("EVALSHA", script_sha(source), len(keys), *keys, *args)],
                              answered)

    async def script(self, source: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """EVALSHA of `source`, loading it with EVAL when Redis does not hold it yet (a
        NOSCRIPT reply means the script did not run, so this never applies it twice)."""
        sha = script_sha(source)
        reply = (await self.call(("EVALSHA", sha, len(keys), *keys, *args)))[0]
        if isinstance(reply, ReplyFailed) and str(reply).startswith("NOSCRIPT"):
            reply = (await self.call(("EVAL", source, len(keys), *keys, *args)))[0]
        if isinstance(reply, ReplyFailed):
            raise reply
        return reply


async def follow(addr: Address, channel: bytes, timeout: float,
                 on_message: Callable[[bytes], None], ping_every: float = PING_EVERY,
                 task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Subscribe to `channel` on a connection of its own and call `on_message` (which must
    not block) with each message's payload; started once the subscription is confirmed.
    Returns never: raises when the connection ends or goes silent (module docstring)."""
    stream, reader = await _open(addr, trio.current_time() + timeout)
    try:
        await stream.send_all(_pack([("SUBSCRIBE", channel)]))
        with trio.fail_after(timeout):
            reply = await _next_reply(stream, reader)
        if isinstance(reply, ReplyFailed):
            raise reply
        if not (isinstance(reply, list) and reply[:1] == [b"subscribe"]):
            raise hiredis.ProtocolError("no confirmation of the subscription")
        task_status.started()

        silent = trio.CancelScope(deadline=trio.current_time() + ping_every + timeout)
        lost: list[BaseException] = []

        async def ping() -> None:
            try:
                while True:
                    await trio.sleep(ping_every)
                    await stream.send_all(_pack([("PING",)]))
            except ERRORS as exc:
                lost.append(exc)
                silent.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ping)
            with silent:
                while True:
                    msg = await _next_reply(stream, reader)
                    silent.deadline = trio.current_time() + ping_every + timeout
                    if isinstance(msg, list) and len(msg) == 3 and msg[0] == b"message" \
                            and isinstance(msg[2], bytes):
                        on_message(msg[2])
            nursery.cancel_scope.cancel()
        if lost:
            raise lost[0]
        raise TimeoutError(f"the subscription went silent for {ping_every + timeout:g} s")
    finally:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(stream)
