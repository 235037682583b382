"""Durable topics on disk: each topic's messages, numbered, and its durable subscribers'
state, in `broker.db` (SQLite, opened by meshd/sqlitefile.py).

Rules:
- A durable topic's messages are numbered 1, 2, 3... in append order; a number is never
  used twice, even after retention removed every message (the topic row keeps the last).
- `append` is one transaction for a batch (the shell's group commit): when it returns the
  messages are on disk, and only then is a publish acknowledged.
- Message ids deduplicate: appending an id the topic holds from within `dedup_window`
  seconds returns the number it already has and writes nothing. Only ids a publisher gave
  are kept for that (indexed); an id the node made for a publish (`minted`) cannot repeat
  and is neither looked up nor indexed. Replicas' copies (`put`) are not deduplicated.
- Retention (`trim`): at most `max_msgs` messages and none older than `max_age` seconds;
  the oldest go first, whoever has not acked them (a hard limit, as JetStream's default).
- A durable subscriber's state (meshd/broker/consumer.py `state()`) is saved with `save`,
  in the same file, so it survives with the messages it points into.
- Deleting a topic removes its messages and subscribers' state in one transaction.
- `put` stores messages at the numbers another node gave them (a replica's copy of that
  node's log, kept under a namespace key no real namespace can have, see durable.py).
- Every method holds the log's lock: the shell calls it from the event loop and from
  worker threads, and one connection's transactions must not interleave.
- Everything stored is CBOR of plain values; nothing here decodes what a peer sent
  (the shell checks messages with meshd.wire before they get here).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Container
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import cbor2

from meshd.sqlitefile import open_private, transaction

FILE = "broker.db"
SCHEMA_VERSION = 2
SCHEMA = """
CREATE TABLE topics (ns TEXT NOT NULL, name TEXT NOT NULL, settings BLOB NOT NULL,
    last_seq INTEGER NOT NULL, PRIMARY KEY (ns, name)) WITHOUT ROWID;
CREATE TABLE messages (ns TEXT NOT NULL, topic TEXT NOT NULL, seq INTEGER NOT NULL,
    id TEXT NOT NULL, published_at REAL NOT NULL, not_before REAL, message BLOB NOT NULL,
    dedup INTEGER NOT NULL, UNIQUE (ns, topic, seq));
CREATE INDEX messages_by_id ON messages (ns, topic, id) WHERE dedup;
CREATE TABLE subscribers (ns TEXT NOT NULL, topic TEXT NOT NULL, name TEXT NOT NULL,
    state BLOB NOT NULL, PRIMARY KEY (ns, topic, name)) WITHOUT ROWID;
"""


# Version 1 kept messages in a WITHOUT ROWID table (rows of a kilobyte and more are slow
# there) and indexed every id; version 2 keeps them in a rowid table and indexes only the
# ids publishers gave (`dedup`): ids the node made for a publish are never looked up.
UPGRADES = {1: """
CREATE TABLE messages_v2 (ns TEXT NOT NULL, topic TEXT NOT NULL, seq INTEGER NOT NULL,
    id TEXT NOT NULL, published_at REAL NOT NULL, not_before REAL, message BLOB NOT NULL,
    dedup INTEGER NOT NULL, UNIQUE (ns, topic, seq));
INSERT INTO messages_v2 SELECT ns, topic, seq, id, published_at, not_before, message, 1
    FROM messages;
DROP TABLE messages;
ALTER TABLE messages_v2 RENAME TO messages;
CREATE INDEX messages_by_id ON messages (ns, topic, id) WHERE dedup;
"""}

F = TypeVar("F", bound=Callable[..., Any])


def _locked(fn: F) -> F:
    """One caller at a time: the shell calls from the event loop and from worker threads,
    and a transaction must not interleave with another on the same connection."""
    @functools.wraps(fn)
    def wrapper(self: BrokerLog, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return fn(self, *args, **kwargs)
    return wrapper  # type: ignore[return-value]


class BrokerFileError(RuntimeError):
    """broker.db cannot be used; str() names it and says what to do."""


# The duplicate check of every publish: by the id index (left to itself SQLite walks the
# primary key backwards to honour ORDER BY, reading every message of the topic each time).
DUPLICATE = ("SELECT seq FROM messages INDEXED BY messages_by_id WHERE ns=? AND topic=? AND "
             "id=? AND dedup AND published_at >= ? ORDER BY seq DESC LIMIT 1")


class NoSuchTopic(KeyError):
    pass


@dataclass(frozen=True)
class TopicSettings:
    max_age: float | None = None  # seconds
    max_msgs: int | None = None
    replicas: int = 1
    dedup_window: float = 120.0  # seconds (JetStream's default duplicate window is 2 min)


@dataclass(frozen=True)
class Stored:
    seq: int
    id: str
    published_at: float
    not_before: float | None
    message: Any


class BrokerLog:
    def __init__(self, data_dir: Path, fsync: bool = True) -> None:
        self.path = data_dir / FILE
        self._lock = threading.RLock()
        self.conn = open_private(self.path, SCHEMA_VERSION, SCHEMA, "broker log",
                                 BrokerFileError, fsync=fsync, upgrades=UPGRADES)
        self._topics: dict[tuple[str, str], tuple[TopicSettings, int]] = {}
        for ns, name, settings, last in self.conn.execute(
                "SELECT ns, name, settings, last_seq FROM topics"):
            self._topics[(ns, name)] = (TopicSettings(**cbor2.loads(settings)), last)

    @_locked
    def close(self) -> None:
        self.conn.close()

    # --- topics ------------------------------------------------------------------------------

    @_locked
    def topics(self) -> dict[tuple[str, str], TopicSettings]:
        return {k: v[0] for k, v in self._topics.items()}

    @_locked
    def create(self, ns: str, name: str, settings: TopicSettings) -> bool:
        """Whether the topic is new (an existing one gets the new settings)."""
        last = self._topics.get((ns, name), (settings, 0))[1]
        with transaction(self.conn) as cur:
            cur.execute("INSERT OR REPLACE INTO topics VALUES (?, ?, ?, ?)",
                        (ns, name, cbor2.dumps(asdict(settings)), last))
        new = (ns, name) not in self._topics
        self._topics[(ns, name)] = (settings, last)
        return new

    @_locked
    def delete(self, ns: str, name: str) -> bool:
        if (ns, name) not in self._topics:
            return False
        with transaction(self.conn) as cur:
            for table in ("topics", "messages", "subscribers"):
                column = "name" if table == "topics" else "topic"
                cur.execute(f"DELETE FROM {table} WHERE ns=? AND {column}=?", (ns, name))
        del self._topics[(ns, name)]
        return True

    @_locked
    def last_seq(self, ns: str, name: str) -> int:
        return self._topic(ns, name)[1]

    # --- messages ----------------------------------------------------------------------------

    @_locked
    def append(self, ns: str, name: str, batch: list[tuple[str, float, float | None, Any]],
               minted: Container[str] = frozenset()) -> list[tuple[int, bool]]:
        """Append (id, published_at, not_before, message) items in one transaction; for
        each, (its number, whether it was a duplicate of one already held). Ids in
        `minted` were made by this node for this publish: not looked up."""
        settings, last = self._topic(ns, name)
        out: list[tuple[int, bool]] = []
        seen: dict[str, int] = {}
        with transaction(self.conn) as cur:
            for msg_id, published_at, not_before, message in batch:
                dup = seen.get(msg_id)
                if dup is None and msg_id not in minted:
                    row = cur.execute(DUPLICATE, (ns, name, msg_id, published_at
                                                  - settings.dedup_window)).fetchone()
                    dup = row[0] if row else None
                if dup is not None:
                    out.append((dup, True))
                    continue
                last += 1
                cur.execute("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            (ns, name, last, msg_id, published_at, not_before,
                             cbor2.dumps(message), msg_id not in minted))
                seen[msg_id] = last
                out.append((last, False))
            cur.execute("UPDATE topics SET last_seq=? WHERE ns=? AND name=?", (last, ns, name))
        self._topics[(ns, name)] = (settings, last)
        return out

    @_locked
    def put(self, ns: str, name: str, batch: list[tuple[int, str, float, float | None, Any]]
            ) -> None:
        """Store (seq, id, published_at, not_before, message) items at the numbers they
        have on their origin (a replica's copy of another node's log), in one transaction;
        a number held already is kept as it is."""
        settings, last = self._topic(ns, name)
        with transaction(self.conn) as cur:
            for seq, msg_id, published_at, not_before, message in batch:
                cur.execute("INSERT OR IGNORE INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, 0)",
                            (ns, name, seq, msg_id, published_at, not_before,
                             cbor2.dumps(message)))
                last = max(last, seq)
            cur.execute("UPDATE topics SET last_seq=? WHERE ns=? AND name=?", (last, ns, name))
        self._topics[(ns, name)] = (settings, last)

    @_locked
    def read(self, ns: str, name: str, after: int = 0, limit: int = 100) -> list[Stored]:
        """Messages numbered above `after`, in order, at most `limit`."""
        self._topic(ns, name)
        rows = self.conn.execute(
            "SELECT seq, id, published_at, not_before, message FROM messages WHERE ns=? AND "
            "topic=? AND seq > ? ORDER BY seq LIMIT ?", (ns, name, after, limit))
        return [Stored(seq, i, at, nb, cbor2.loads(m)) for seq, i, at, nb, m in rows]

    @_locked
    def get(self, ns: str, name: str, seq: int) -> Stored | None:
        rows = self.read(ns, name, seq - 1, 1)
        return rows[0] if rows and rows[0].seq == seq else None

    @_locked
    def count(self, ns: str, name: str) -> int:
        (n,) = self.conn.execute("SELECT count(*) FROM messages WHERE ns=? AND topic=?",
                                 (ns, name)).fetchone()
        return n

    @_locked
    def trim(self, ns: str, name: str, now: float) -> int:
        """Apply retention; how many messages it removed."""
        settings, last = self._topic(ns, name)
        removed = 0
        with transaction(self.conn) as cur:
            if settings.max_age is not None:
                removed += cur.execute(
                    "DELETE FROM messages WHERE ns=? AND topic=? AND published_at < ?",
                    (ns, name, now - settings.max_age)).rowcount
            if settings.max_msgs is not None:
                removed += cur.execute(
                    "DELETE FROM messages WHERE ns=? AND topic=? AND seq <= ?",
                    (ns, name, last - settings.max_msgs)).rowcount
        return removed

    # --- durable subscribers -----------------------------------------------------------------

    @_locked
    def save_many(self, rows: list[tuple[str, str, str, dict[str, Any]]]) -> None:
        """Several subscribers' states in one transaction (ns, topic, name, state)."""
        with transaction(self.conn) as cur:
            for ns, name, subscriber, state in rows:
                if (ns, name) in self._topics:
                    cur.execute("INSERT OR REPLACE INTO subscribers VALUES (?, ?, ?, ?)",
                                (ns, name, subscriber, cbor2.dumps(state)))

    @_locked
    def save(self, ns: str, name: str, subscriber: str, state: dict[str, Any]) -> None:
        self._topic(ns, name)
        with transaction(self.conn) as cur:
            cur.execute("INSERT OR REPLACE INTO subscribers VALUES (?, ?, ?, ?)",
                        (ns, name, subscriber, cbor2.dumps(state)))

    @_locked
    def subscribers(self, ns: str, name: str) -> dict[str, dict[str, Any]]:
        return {sub: cbor2.loads(state) for sub, state in self.conn.execute(
            "SELECT name, state FROM subscribers WHERE ns=? AND topic=?", (ns, name))}

    @_locked
    def forget(self, ns: str, name: str, subscriber: str) -> bool:
        with transaction(self.conn) as cur:
            return cur.execute("DELETE FROM subscribers WHERE ns=? AND topic=? AND name=?",
                               (ns, name, subscriber)).rowcount > 0

    # --- inside ------------------------------------------------------------------------------

    def _topic(self, ns: str, name: str) -> tuple[TopicSettings, int]:
        found = self._topics.get((ns, name))
        if found is None:
            raise NoSuchTopic(f"no durable topic {name!r} in namespace {ns!r}")
        return found
