"""PostgreSQL calls on trio: one pipelined libpq connection for the engine's hot statements.

The PostgreSQL engine's single-key operations run here, in the node's own trio thread,
instead of a worker thread per call (handing each call to a thread and back cost more than
PostgreSQL's own work). psycopg makes the connection (DSN, TLS, authentication, all of
libpq's options) in a worker thread and prepares the statements; then this module drives
its libpq connection (`psycopg.pq`, psycopg's documented libpq wrapper) without blocking,
in pipeline mode.

Rules:
- Every call is one prepared statement followed by a Sync, so each is its own implicit
  transaction, committed before its result is handed out (autocommit semantics: nothing
  is acknowledged that PostgreSQL did not commit), and a statement that fails fails only
  its own call. Calls are queued with their place in the result queue together (no
  checkpoint between); the writer sends everything queued and flushes; PostgreSQL answers
  in order, so the reader hands out results first in, first out: a call's result, the end
  of its results, then its Sync.
- Up to `size` connections. Calls go to the first connection that flows (its oldest call
  began less than STUCK ago), so they share its batches; another is opened only when every
  open one is held up, so a statement waiting on a row lock (another client's
  transaction) holds up only the calls already behind it on its connection.
- Deadlines, queue bounds and connecting once as inflight.py says (as for Redis). Any
  failure of a connection fails every call on it; the next call connects anew. Nothing is
  resent. When no more connections can be had, a call queues on the least busy one.
- Parameters go as text, except those the statement marks binary (bytea values). Results
  come as text and are converted by the statement's column kinds (text, bytea, int, json,
  bool); JSON is decoded with meshd's bounded decoder.
- The connection's tasks run in the nursery of the `Pipeline.run` that made it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from meshd.wire import loads_json

from .inflight import Call, Connections, Inflight

STUCK = 0.2  # seconds the oldest call of a connection waits before calls go elsewhere
MAX_JSON = 64 * 1024 * 1024  # bytes of one JSON column (metadata, members)


class StatementFailed(Exception):
    """PostgreSQL refused the statement (its error message)."""


@dataclass(frozen=True)
class Statement:
    """A prepared statement: its SQL ($1 placeholders), which parameters are binary and how
    to read each result column ("text", "bytea", "int", "json", "bool")."""

    name: str
    sql: str
    columns: tuple[str, ...]
    binary: frozenset[int] = frozenset()


def _bytea(raw: bytes) -> bytes:
    if not raw.startswith(b"\\x"):
        raise ValueError("bytea not in hex format")
    return bytes.fromhex(raw[2:].decode("ascii"))


_READERS: dict[str, Callable[[bytes], Any]] = {
    "text": lambda raw: raw.decode(),
    "bytea": _bytea,
    "int": int,
    "json": lambda raw: loads_json(raw, max_bytes=MAX_JSON),
    "bool": lambda raw: raw == b"t",
}


class BadParameter(ValueError):
    """A parameter PostgreSQL cannot take as text (a NUL character)."""


def _param(value: Any) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, bool):
        return b"t" if value else b"f"
    text = str(value)
    if "\x00" in text:  # libpq would cut a text parameter there: refuse, never truncate
        raise BadParameter("text on PostgreSQL cannot hold NUL characters")
    return text.encode()


class _Call(Call):
    __slots__ = ("ended", "result", "statement")

    def __init__(self, statement: Statement, deadline: float) -> None:
        super().__init__(deadline)
        self.statement = statement
        self.result: Any = None
        self.ended = False  # the end of its results came; its Sync is next


class _Connection(Inflight):
    def __init__(self, conn: Any) -> None:
        import psycopg
        from psycopg import pq

        super().__init__("PostgreSQL")
        self.conn = conn
        self.pg = conn.pgconn
        self.pq = pq
        self.psycopg = psycopg
        self.fd = self.pg.socket
        self.pg.nonblocking = 1
        self.pg.enter_pipeline_mode()
        self.sent = 0  # how many of `waiting` (from its head) were sent
        self.outgoing: list[tuple[_Call, list[bytes | None], list[int]]] = []

    def queue(self, call: _Call, params: list[bytes | None], formats: list[int]) -> None:
        self.admit(call)
        self.outgoing.append((call, params, formats))

    async def serve(self) -> None:
        async def close() -> None:
            self.conn.close()  # PQfinish: a Terminate message, never a wait
        await self.run([self._write, self._read], close)

    def _why(self) -> str:
        return (self.pg.error_message or b"").decode(errors="replace").strip() \
            or "the connection to PostgreSQL failed"

    async def _write(self) -> None:
        pg = self.pg
        try:
            while True:
                if not self.outgoing:
                    await self.lot.park()
                    continue
                batch, self.outgoing = self.outgoing, []
                for call, params, formats in batch:
                    pg.send_query_prepared(call.statement.name.encode(), params,
                                           param_formats=formats)
                    pg.pipeline_sync()
                self.sent += len(batch)
                while pg.flush() == 1:
                    self._results()  # flush may have read answers in (libpq does)
                    await trio.lowlevel.wait_writable(self.fd)
                self._results()
        except (OSError, self.psycopg.Error) as exc:
            self.fail(ConnectionResetError(str(exc) or self._why()))

    def _results(self) -> None:
        """Hand out every answer libpq already holds (sent calls only: libpq knows nothing
        of the rest, and would say there is nothing more)."""
        pg, status = self.pg, self.pq.ExecStatus
        while self.sent and not self.closed and not pg.is_busy():
            res = pg.get_result()
            call = self.waiting[0]
            if res is None:
                call.ended = True
            elif res.status == status.PIPELINE_SYNC:
                self.waiting.popleft()
                self.sent -= 1
                call.finish()
            elif call.ended:
                raise ConnectionResetError("PostgreSQL answered out of order")
            elif res.status in (status.TUPLES_OK, status.COMMAND_OK):
                try:
                    call.result = _rows(res, call.statement.columns)
                except (ValueError, TypeError, UnicodeDecodeError) as exc:
                    call.error = ValueError(f"an unreadable row: {exc}")
            else:
                message = (res.error_message or b"").decode(errors="replace")
                call.error = StatementFailed(message.strip() or "the statement failed")
        if pg.status != self.pq.ConnStatus.OK:
            raise ConnectionResetError(self._why())

    async def _read(self) -> None:
        try:
            while True:
                self._results()
                await trio.lowlevel.wait_readable(self.fd)
                self.pg.consume_input()
        except (OSError, self.psycopg.Error) as exc:
            self.fail(exc if isinstance(exc, OSError)
                      else ConnectionResetError(str(exc) or self._why()))


def _rows(res: Any, columns: tuple[str, ...]) -> list[tuple[Any, ...]]:
    readers = [_READERS[c] for c in columns]
    if res.nfields != len(columns) and res.ntuples:
        raise ValueError("unexpected columns")
    out = []
    for r in range(res.ntuples):
        row = []
        for c, read in enumerate(readers):
            raw = res.get_value(r, c)
            row.append(None if raw is None else read(raw))
        out.append(tuple(row))
    return out


class Pipeline(Connections):
    """Prepared statements of many tasks over up to `size` pipelined connections (module
    docstring). `connect` is a blocking function (run in a worker thread) returning a
    psycopg connection in autocommit mode with the statements prepared on it."""

    def __init__(self, connect: Callable[[], Any], timeout: float, size: int = 4) -> None:
        super().__init__("PostgreSQL")
        self._connect = connect
        self.timeout = timeout
        self.size = max(1, size)

    def _choice(self) -> _Connection | None:
        """The first live connection that is not held up (its oldest call began less than
        STUCK ago), so calls share one connection and its batches while it flows; when
        every one is held up (a statement waiting on another client's row lock), None
        while more may be made, else the least busy."""
        self._conns = [c for c in self._conns if not c.closed]
        flowing = trio.current_time() + self.timeout - STUCK  # deadline of a STUCK-old call
        for conn in self._conns:
            if not conn.waiting or conn.waiting[0].deadline > flowing:
                return conn
        if len(self._conns) < self.size:
            return None
        return min(self._conns, key=lambda c: len(c.waiting))

    async def _connection(self, deadline: float) -> _Connection:
        conn = self._choice()
        if conn is not None:
            return conn
        busy = min(self._conns, key=lambda c: len(c.waiting), default=None)

        async def opened() -> Any:
            # the connect's own timeout bounds the thread (connect_timeout)
            return await trio.to_thread.run_sync(self._connect, cancellable=True)

        async def discard(raw: Any) -> None:
            raw.close()

        async def connect() -> _Connection:
            return await self._add(opened, _Connection, discard)

        try:
            return await self._gate.open(deadline, self._choice, connect)
        except Exception:
            if busy is not None and not busy.closed:
                return busy  # no more connections to be had: queue behind the held-up one
            raise

    async def call(self, statement: Statement, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        """Run a prepared statement; its rows, converted by its column kinds."""
        deadline = trio.current_time() + self.timeout
        conn = await self._connection(deadline)
        encoded = [_param(p) for p in params]
        call = _Call(statement, deadline)
        conn.queue(call, encoded,
                   [1 if i in statement.binary else 0 for i in range(len(params))])
        await conn.wait(call)
        return call.result or []


async def notifications(conn: Any, heard: Callable[[bytes], None]) -> None:
    """Hand the payload of every notification that arrives on `conn` (a psycopg
    connection that LISTENs) to `heard`, driving its libpq connection from this trio
    thread; raises (OSError, psycopg.Error) when the connection is lost."""
    from psycopg import pq

    pg = conn.pgconn
    pg.nonblocking = 1
    while True:
        while (note := pg.notifies()) is not None:
            heard(note.extra)
        await trio.lowlevel.wait_readable(pg.socket)
        pg.consume_input()
        if pg.status != pq.ConnStatus.OK:
            raise ConnectionResetError("the listening connection to PostgreSQL failed")
