"""Durable topics on disk (meshd/broker/log.py)."""

from __future__ import annotations

import cbor2
import pytest

from meshd.broker.consumer import Consumer
from meshd.broker.log import BrokerLog, NoSuchTopic, TopicSettings


def msg(i: int) -> dict:
    return {"topic": "orders.created", "body": {"n": i}, "headers": {}}


def test_messages_are_numbered_in_order_and_survive_a_reopen(tmp_path):
    log = BrokerLog(tmp_path)
    assert log.create("default", "orders", TopicSettings())
    got = log.append("default", "orders", [(f"id{i}", 100.0 + i, None, msg(i))
                                           for i in range(1, 4)])
    assert got == [(1, False), (2, False), (3, False)]
    log.close()
    log = BrokerLog(tmp_path)
    assert [(m.seq, m.id, m.message["body"]) for m in log.read("default", "orders")] == [
        (1, "id1", {"n": 1}), (2, "id2", {"n": 2}), (3, "id3", {"n": 3})]
    assert log.append("default", "orders", [("id4", 104.0, 200.0, msg(4))]) == [(4, False)]
    stored = log.get("default", "orders", 4)
    assert stored is not None and stored.not_before == 200.0
    assert [m.seq for m in log.read("default", "orders", after=1, limit=2)] == [2, 3]


def test_ids_deduplicate_within_the_window_only(tmp_path):
    log = BrokerLog(tmp_path)
    log.create("default", "orders", TopicSettings(dedup_window=60))
    assert log.append("default", "orders", [("a", 100.0, None, msg(1)),
                                            ("a", 100.5, None, msg(1))]) == [(1, False),
                                                                             (1, True)]
    assert log.append("default", "orders", [("a", 159.0, None, msg(1))]) == [(1, True)]
    assert log.append("default", "orders", [("a", 161.0, None, msg(1))]) == [(2, False)]
    assert log.count("default", "orders") == 2


def test_ids_the_node_minted_are_not_looked_up(tmp_path):
    log = BrokerLog(tmp_path)
    log.create("default", "orders", TopicSettings(dedup_window=60))
    assert log.append("default", "orders", [("a", 100.0, None, msg(1))]) == [(1, False)]
    # the lookup is what finds duplicates: an id named minted is appended without it
    assert log.append("default", "orders", [("b", 101.0, None, msg(2)),
                                            ("a", 101.0, None, msg(3))],
                      minted={"b"}) == [(2, False), (1, True)]
    assert log.append("default", "orders", [("a", 102.0, None, msg(4))],
                      minted={"a"}) == [(3, False)]


def test_retention_removes_the_oldest_and_numbers_are_never_reused(tmp_path):
    log = BrokerLog(tmp_path)
    log.create("default", "t", TopicSettings(max_msgs=2, max_age=50))
    log.append("default", "t", [(f"i{i}", float(i), None, msg(i)) for i in range(1, 6)])
    assert log.trim("default", "t", now=10.0) == 3
    assert [m.seq for m in log.read("default", "t")] == [4, 5]
    assert log.trim("default", "t", now=100.0) == 2, "older than max_age"
    assert log.count("default", "t") == 0
    log.close()
    log = BrokerLog(tmp_path)
    assert log.last_seq("default", "t") == 5
    assert log.append("default", "t", [("new", 100.0, None, msg(6))]) == [(6, False)]


def test_namespaces_and_topics_are_apart_and_delete_takes_everything(tmp_path):
    log = BrokerLog(tmp_path)
    log.create("team-a", "t", TopicSettings())
    log.create("team-b", "t", TopicSettings())
    log.append("team-a", "t", [("x", 1.0, None, msg(1))])
    assert log.append("team-b", "t", [("x", 1.0, None, msg(2))]) == [(1, False)]
    log.save("team-a", "t", "billing", {"floor": 1})
    assert log.delete("team-a", "t") and not log.delete("team-a", "t")
    with pytest.raises(NoSuchTopic):
        log.read("team-a", "t")
    assert log.count("team-b", "t") == 1
    log.close()
    log = BrokerLog(tmp_path)
    assert set(log.topics()) == {("team-b", "t")}
    log.create("team-a", "t", TopicSettings())
    assert log.subscribers("team-a", "t") == {} and log.last_seq("team-a", "t") == 0


def test_a_durable_subscriber_resumes_after_its_last_ack_across_a_reopen(tmp_path):
    log = BrokerLog(tmp_path)
    log.create("default", "t", TopicSettings())
    log.append("default", "t", [(f"i{i}", float(i), None, msg(i)) for i in range(1, 6)])
    c = Consumer(ack_wait=30)
    for m in log.read("default", "t"):
        c.append(m.seq, m.not_before)
    offered = [o.seq for o in c.poll(0.0)]
    assert offered == [1, 2, 3, 4, 5]
    for seq in (1, 2, 4):
        c.ack(seq)
    log.save("default", "t", "billing", c.state())
    log.close()
    log = BrokerLog(tmp_path)  # kill -9 and restart: what was saved is what counts
    r = Consumer.restore(log.subscribers("default", "t")["billing"], now=1.0, ack_wait=30)
    for m in log.read("default", "t"):
        r.append(m.seq, m.not_before)
    assert sorted(o.seq for o in r.poll(1.0)) == [3, 5], "only the unacked come again"
    assert log.forget("default", "t", "billing") and log.subscribers("default", "t") == {}


def test_unknown_topics_are_refused(tmp_path):
    log = BrokerLog(tmp_path)
    for call in (lambda: log.append("default", "nope", [("a", 1.0, None, {})]),
                 lambda: log.save("default", "nope", "s", {}),
                 lambda: log.trim("default", "nope", 1.0)):
        with pytest.raises(NoSuchTopic, match="no durable topic 'nope'"):
            call()


def test_a_failed_batch_writes_nothing(tmp_path):
    log = BrokerLog(tmp_path)
    log.create("default", "t", TopicSettings())
    with pytest.raises(cbor2.CBOREncodeError):
        log.append("default", "t", [("a", 1.0, None, msg(1)), ("b", 2.0, None, object())])
    assert log.count("default", "t") == 0
    assert log.append("default", "t", [("c", 3.0, None, msg(3))]) == [(1, False)]


def test_a_replica_copy_keeps_the_origin_numbers_and_ignores_repeats(tmp_path):
    log = BrokerLog(tmp_path)
    log.create("~b~default", "orders", TopicSettings())
    log.put("~b~default", "orders", [(3, "m3", 1.0, None, {"n": 3}),
                                     (1, "m1", 1.0, None, {"n": 1})])
    log.put("~b~default", "orders", [(1, "again", 2.0, None, {"n": 99})])  # held: kept
    assert [(r.seq, r.message) for r in log.read("~b~default", "orders")] == [
        (1, {"n": 1}), (3, {"n": 3})]
    assert log.last_seq("~b~default", "orders") == 3
    log.close()
    again = BrokerLog(tmp_path)
    assert again.last_seq("~b~default", "orders") == 3
    again.close()


def test_the_duplicate_check_uses_the_id_index_not_a_scan(tmp_path):
    """Each publish looks its id up: by the id index, never by walking the topic (a scan
    made every publish read every message the topic held)."""
    from meshd.broker.log import DUPLICATE

    log = BrokerLog(tmp_path)
    log.create("default", "orders", TopicSettings())
    plan = " ".join(str(row) for row in log.conn.execute(
        "EXPLAIN QUERY PLAN " + DUPLICATE.replace(" INDEXED BY messages_by_id", ""),
        ("default", "orders", "x", 0.0)))
    assert "messages_by_id" in " ".join(str(row) for row in log.conn.execute(
        "EXPLAIN QUERY PLAN " + DUPLICATE, ("default", "orders", "x", 0.0)))
    assert "messages_by_id" not in plan  # what SQLite picks unforced (why we force it)


def test_fsync_false_commits_to_the_os_only(tmp_path):
    """broker.fsync = false opens the log with synchronous=NORMAL (1); the default FULL (2)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert BrokerLog(tmp_path / "a").conn.execute("PRAGMA synchronous").fetchone()[0] == 2
    assert BrokerLog(tmp_path / "b", fsync=False).conn.execute(
        "PRAGMA synchronous").fetchone()[0] == 1


V1 = """
CREATE TABLE topics (ns TEXT NOT NULL, name TEXT NOT NULL, settings BLOB NOT NULL,
    last_seq INTEGER NOT NULL, PRIMARY KEY (ns, name)) WITHOUT ROWID;
CREATE TABLE messages (ns TEXT NOT NULL, topic TEXT NOT NULL, seq INTEGER NOT NULL,
    id TEXT NOT NULL, published_at REAL NOT NULL, not_before REAL, message BLOB NOT NULL,
    PRIMARY KEY (ns, topic, seq)) WITHOUT ROWID;
CREATE INDEX messages_by_id ON messages (ns, topic, id);
CREATE TABLE subscribers (ns TEXT NOT NULL, topic TEXT NOT NULL, name TEXT NOT NULL,
    state BLOB NOT NULL, PRIMARY KEY (ns, topic, name)) WITHOUT ROWID;
"""


def test_a_version_1_log_is_upgraded_in_place_and_keeps_everything(tmp_path):
    import sqlite3

    from meshd.sqlitefile import APPLICATION_ID

    conn = sqlite3.connect(tmp_path / "broker.db", isolation_level=None)
    conn.executescript(f"PRAGMA application_id={APPLICATION_ID};\nPRAGMA user_version=1;\n{V1}")
    settings = cbor2.dumps({"max_age": None, "max_msgs": None, "replicas": 1,
                            "dedup_window": 60.0})
    conn.execute("INSERT INTO topics VALUES ('default', 'orders', ?, 2)", (settings,))
    for seq, mid in ((1, "a"), (2, "b")):
        conn.execute("INSERT INTO messages VALUES ('default', 'orders', ?, ?, 100.0, NULL, ?)",
                     (seq, mid, cbor2.dumps(msg(seq))))
    conn.execute("INSERT INTO subscribers VALUES ('default', 'orders', 'billing', ?)",
                 (cbor2.dumps({"acked": 1}),))
    conn.close()
    log = BrokerLog(tmp_path)
    assert [(m.seq, m.id, m.message) for m in log.read("default", "orders")] == [
        (1, "a", msg(1)), (2, "b", msg(2))]
    assert log.subscribers("default", "orders") == {"billing": {"acked": 1}}
    # ids from before the upgrade still deduplicate; numbering goes on
    assert log.append("default", "orders", [("b", 110.0, None, msg(3)),
                                            ("c", 110.0, None, msg(3))]) == [(2, True),
                                                                             (3, False)]
    (version,) = log.conn.execute("PRAGMA user_version").fetchone()
    assert version == 2
    log.close()
