"""The node's bounded buffer of log records: its own (stdlib logging) and its services'.

Rules:
- A record is a flat map: time (unix seconds), level (lower-case name), node, service
  ("meshd" for the daemon itself), instance, trace_id, message, fields (string -> string;
  the daemon's own carry the logger's name). The same keys go to `meshd logs --json`.
- The daemon's records are taken by `BufferHandler` on the "meshd" logger. Several nodes may
  run in one process (tests): each handler keeps only records logged inside its own node's
  tasks (`NODE`, a context variable the node sets), never another node's.
- A service's records arrive through the control socket (`debug.log`) and are checked
  strictly (`service_record`): sizes bounded, the node, service and instance are the
  daemon's to say (the session's registration), never the record's.
- The buffer holds at most `size` records and about `max_bytes` (debug.log_buffer_bytes:
  a burst of long lines cannot take more), oldest first out; followers wait on a sequence
  number and are woken without polling.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

LEVELS = ("debug", "info", "warning", "error", "critical")
LEVEL_NO = {name: (i + 1) * 10 for i, name in enumerate(LEVELS)}
MAX_MESSAGE = 8192
MAX_FIELDS = 32
MAX_FIELD = 1024
MAX_BATCH = 256
# a service's record dated outside [now - MAX_AGE, now + MAX_AHEAD] gets the daemon's time
# (lines dated in the future would otherwise stay "newest" and hide every other line)
MAX_AGE, MAX_AHEAD = 3600.0, 5.0

# The node whose task is logging (set by Node.run; tasks inherit it).
NODE: contextvars.ContextVar[str] = contextvars.ContextVar("meshd_debug_node", default="")
# The trace id of the call being served, for the records logged while serving it.
TRACE: contextvars.ContextVar[str] = contextvars.ContextVar("meshd_debug_trace", default="")

Record = dict[str, Any]


KEYS = ("time", "level", "node", "service", "instance", "trace_id", "message", "fields")
_LEVEL = {name: name for name in LEVELS}  # one string object per level, whoever sent it


def _pack(seq: int, r: Record) -> tuple[Any, ...]:
    """A record as a tuple (a third of a dict's memory); fields that only name the logger
    are kept as that name."""
    fields = r["fields"]
    if len(fields) == 1 and "logger" in fields:
        fields = fields["logger"]
    return (seq, r["time"], _LEVEL.get(r["level"], r["level"]), r["node"], r["service"],
            r["instance"], r["trace_id"], r["message"], fields or None)


def _unpack(t: tuple[Any, ...]) -> Record:
    r = dict(zip(KEYS, t[1:], strict=True))
    fields = r["fields"]
    r["fields"] = {"logger": fields} if isinstance(fields, str) else dict(fields or {})
    return r


RECORD_OVERHEAD = 300  # bytes a packed record costs besides its message


def _cost(t: tuple[Any, ...]) -> int:
    return RECORD_OVERHEAD + len(t[7]) + (0 if t[8] is None or isinstance(t[8], str)
                                           else sum(len(k) + len(v) + 100
                                                    for k, v in t[8].items()))


class LogBuffer:
    """Records are maps with KEYS going in and coming out; held packed, at most `size` of
    them and about `max_bytes` of memory (long messages and many fields count for more),
    the oldest going first."""

    def __init__(self, size: int, max_bytes: int = 1 << 62) -> None:
        self.size = size
        self.max_bytes = max_bytes
        self.bytes = 0
        self._records: deque[tuple[Any, ...]] = deque()
        self.seq = 0
        self._waiters: list[Callable[[], None]] = []

    def __len__(self) -> int:
        return len(self._records)

    def add(self, record: Record) -> None:
        self.seq += 1
        packed = _pack(self.seq, record)
        self._records.append(packed)
        self.bytes += _cost(packed)
        while len(self._records) > self.size or (self.bytes > self.max_bytes
                                                  and len(self._records) > 1):
            self.bytes -= _cost(self._records.popleft())
        if self._waiters:
            waiters, self._waiters = self._waiters, []
            for wake in waiters:
                wake()

    def on_next(self, wake: Callable[[], None]) -> None:
        """Call `wake` once, at the next record added."""
        self._waiters.append(wake)

    def forget(self, wake: Callable[[], None]) -> None:
        if wake in self._waiters:
            self._waiters.remove(wake)

    def since(self, seq: int) -> list[tuple[int, Record]]:
        out = []
        for t in reversed(self._records):
            if t[0] <= seq:
                break
            out.append((t[0], _unpack(t)))
        out.reverse()
        return out

    def from_time(self, since: float, slack: float = 5.0) -> list[Record]:
        """The records of time `since` or later (in arrival order: a record shipped by a
        service may arrive up to `slack` seconds after a newer one)."""
        out = []
        for t in reversed(self._records):
            if t[1] < since - slack:
                break
            if t[1] >= since:
                out.append(_unpack(t))
        out.reverse()
        return out

    def records(self) -> list[Record]:
        return [_unpack(t) for t in self._records]


def matches(record: Record, service: str | None = None, level: str | None = None,
            since: float | None = None, node: str | None = None) -> bool:
    if service and record["service"] != service:
        return False
    if level and LEVEL_NO.get(record["level"], 0) < LEVEL_NO[level]:
        return False
    if since is not None and record["time"] < since:
        return False
    return not (node and record["node"] != node)


def level_name(levelno: int) -> str:
    if levelno >= logging.CRITICAL:
        return "critical"
    if levelno >= logging.ERROR:
        return "error"
    if levelno >= logging.WARNING:
        return "warning"
    return "info" if levelno >= logging.INFO else "debug"


def message_of(record: logging.LogRecord) -> str:
    """A logging record's text, with its exception in one line (never raises: a bad format
    string is the logger's bug), cut to MAX_MESSAGE."""
    try:
        message = record.getMessage()
    except Exception:
        message = str(record.msg)
    if record.exc_info and record.exc_info[1] is not None:
        message += f": {type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
    return message[:MAX_MESSAGE]


class BufferHandler(logging.Handler):
    """Puts the records of one node's tasks into its buffer."""

    def __init__(self, buffer: LogBuffer, node: str, level: int) -> None:
        super().__init__(level)
        self.buffer = buffer
        self.node = node

    def emit(self, record: logging.LogRecord) -> None:
        if NODE.get() != self.node:
            return
        self.buffer.add({"time": record.created, "level": level_name(record.levelno),
                         "node": self.node, "service": "meshd", "instance": "",
                         "trace_id": TRACE.get(), "message": message_of(record),
                         "fields": {"logger": record.name}})


def service_record(raw: Any, node: str, service: str, instance: str) -> Record:
    """A record a service sent, checked: ValueError if it is not a valid one."""
    if not isinstance(raw, dict):
        raise ValueError("a log record is a map")
    message, level = raw.get("message"), raw.get("level", "info")
    if not isinstance(message, str) or not isinstance(level, str) or level not in LEVELS:
        raise ValueError("a log record needs a message and a level of " + ", ".join(LEVELS))
    now = time.time()
    at = raw.get("time", now)
    if not isinstance(at, int | float) or isinstance(at, bool):
        raise ValueError("a log record's time is a number")
    try:
        at = float(at)
    except OverflowError:
        raise ValueError("a log record's time is a number of seconds") from None
    if not (now - MAX_AGE <= at <= now + MAX_AHEAD):  # NaN too: the daemon's clock then
        at = now
    trace_id = raw.get("trace_id", "")
    if not isinstance(trace_id, str) or len(trace_id) > 64:
        raise ValueError("a log record's trace_id is a short string")
    fields = raw.get("fields", {})
    if not isinstance(fields, dict) or len(fields) > MAX_FIELDS or not all(
            isinstance(k, str) and len(k) <= 128 for k in fields):
        raise ValueError(f"a log record's fields are at most {MAX_FIELDS} named values")
    return {"time": at, "level": level, "node": node, "service": service,
            "instance": instance, "trace_id": trace_id, "message": message[:MAX_MESSAGE],
            "fields": {k: _field(v) for k, v in fields.items()}}


def _field(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value) if isinstance(
        value, int | float | bool | None) else f"<{type(value).__name__}>"
    return text[:MAX_FIELD]
