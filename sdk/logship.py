"""A service's `logging` output, shipped to its daemon (`meshd logs SERVICE`).

Rules:
- `Shipper` is a logging.Handler on the root logger while the service runs. It keeps only
  records logged inside that service's tasks (a context variable the service sets), so
  several services in one process never ship each other's lines; records from other
  threads or from outside the service are not shipped.
- Records wait in a bounded queue (QUEUE records; the oldest go first, counted in
  `dropped`) and leave in batches of at most BATCH records and about BATCH_BYTES on the
  service's registration session as {"log": [...]} frames, every FLUSH_EVERY seconds:
  logging never blocks a handler, and a long line (cut to what the daemon keeps,
  meshd.debug.logs.MAX_MESSAGE) never makes a frame the daemon refuses.
- Each record carries time, level, message, the trace id of the call being served (if
  any) and the logger's name; the daemon adds node, service and instance itself.
- If the process configured no logging at all, the service sets the root logger to INFO
  and keeps printing warnings and worse to stderr as Python would have.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from meshd.debug.logs import level_name, message_of

QUEUE = 1000
BATCH = 256
BATCH_BYTES = 512 * 1024  # a frame stays far below the control socket's frame limit
FLUSH_EVERY = 0.2

# the Shipper of the service whose task is logging
CURRENT: contextvars.ContextVar[Shipper | None] = contextvars.ContextVar(
    "meshd_log_shipper", default=None)


class Shipper(logging.Handler):
    def __init__(self, trace_id: Callable[[], str], level: int = logging.INFO) -> None:
        super().__init__(level)
        self.trace_id = trace_id
        self.queue: deque[dict[str, Any]] = deque(maxlen=QUEUE)
        self.dropped = 0
        self.shipped = 0

    def emit(self, record: logging.LogRecord) -> None:
        if CURRENT.get() is not self:
            return
        if len(self.queue) == self.queue.maxlen:
            self.dropped += 1
        self.queue.append({"time": record.created, "level": level_name(record.levelno),
                           "message": message_of(record), "trace_id": self.trace_id(),
                           "fields": {"logger": record.name[:256]}})

    def add(self, level: str, message: str, fields: dict[str, str] | None = None) -> None:
        """Ship one record made by hand (from any thread), not through `logging`."""
        if len(self.queue) == self.queue.maxlen:
            self.dropped += 1
        self.queue.append({"time": time.time(), "level": level, "message": message,
                           "trace_id": "", "fields": {k: v[:256] for k, v in
                                                       (fields or {}).items()}})

    def install(self) -> Callable[[], None]:
        """Put the handler on the root logger; returns what takes it off again."""
        root = logging.getLogger()
        added: list[logging.Handler] = []
        if not root.handlers and root.level in (logging.NOTSET, logging.WARNING):
            # unconfigured: what lastResort printed (warnings and worse) still goes to stderr
            fallback = logging.StreamHandler(sys.stderr)
            fallback.setLevel(logging.WARNING)
            root.addHandler(fallback)
            root.setLevel(logging.INFO)
            added.append(fallback)
        root.addHandler(self)
        CURRENT.set(self)

        def remove() -> None:
            root.removeHandler(self)
            for h in added:
                root.removeHandler(h)

        return remove

    async def run(self, send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        """Send what is queued, batch by batch, until cancelled."""
        while True:
            await trio.sleep(FLUSH_EVERY)
            while self.queue:
                batch, size = [], 0
                while self.queue and len(batch) < BATCH and size < BATCH_BYTES:
                    record = self.queue.popleft()
                    size += len(record["message"]) * 4 + 300  # UTF-8, worst case
                    batch.append(record)
                await send({"log": batch})
                self.shipped += len(batch)
