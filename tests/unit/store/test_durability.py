"""Issue 11 item 12 (store): a replica acknowledges a write only once it is on its disk, and
the store files (they hold the auth database) are private to the node's user."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cbor2
import trio
import trio.testing

from meshd.settings import StoreSettings
from meshd.store import crdt
from meshd.store.persist import FILE, StoreDB
from meshd.store.records import key_hash
from meshd.store.service import StoreService


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@contextlib.contextmanager
def _umask(mask: int) -> Any:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _row(key: str = "k") -> tuple[str, str, str, Any, int]:
    state = {"lww": crdt.lww((1, 0, "a"), b"v")}
    return ("d", "t", key, state, key_hash(key, state))


def test_a_new_store_and_its_wal_and_shm_are_0600(tmp_path):
    with _umask(0o022):  # the usual umask: files would be 0644 unless made private
        db = StoreDB(tmp_path / FILE)
        db.save([_row()])
        try:
            for suffix in ("", "-wal", "-shm"):
                path = tmp_path / (FILE + suffix)
                assert path.exists(), f"{path.name} should exist while the store is open"
                assert _mode(path) == 0o600, f"{path.name} is {_mode(path):o}"
        finally:
            db.close()


def test_an_existing_0644_store_is_tightened_on_open(tmp_path):
    with _umask(0o022):
        db = StoreDB(tmp_path / FILE)
        db.save([_row()])
        db.close()
        for path in tmp_path.iterdir():
            os.chmod(path, 0o644)  # as an older meshd left it
        db = StoreDB(tmp_path / FILE)
        try:
            assert [r[2] for r in db.load()] == ["k"], "the data is kept"
            for path in tmp_path.iterdir():
                assert _mode(path) == 0o600, f"{path.name} is {_mode(path):o}"
        finally:
            db.close()


# --- a replica acks only after its commit ------------------------------------------------

class _Core:
    me = SimpleNamespace(name="b")

    @staticmethod
    def member_list() -> list[Any]:
        return []

    @staticmethod
    def alive_peers() -> list[str]:
        return []


class _Out:
    """An outgoing channel that notes, for each message, whether key k was on disk."""

    def __init__(self, links: _Links) -> None:
        self.links = links

    async def __aenter__(self) -> _Out:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def send(self, payload: bytes) -> None:
        conn = sqlite3.connect(self.links.db_path)
        try:
            (on_disk,) = conn.execute("SELECT count(*) FROM records WHERE key='k'").fetchone()
        finally:
            conn.close()
        self.links.sent.append((cbor2.loads(payload), on_disk))
        self.links.any_sent.set()


class _Links:
    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path
        self.handlers: dict[str, Any] = {}
        self.sent: list[tuple[dict[str, Any], int]] = []
        self.any_sent = trio.Event()

    async def open_channel(self, addr: str, name: str) -> _Out:
        return _Out(self)


class _In:
    peer_addr = "127.0.0.1:7001"

    def __init__(self, msg: dict[str, Any]) -> None:
        self.payload = cbor2.dumps(msg)

    async def receive(self) -> bytes:
        return self.payload


def _slow_disk(svc: StoreService) -> tuple[threading.Event, threading.Event]:
    """Commits of `svc` wait for the returned gate; the other event is set once one does."""
    gate, saving = threading.Event(), threading.Event()
    real_save = svc.db.save

    def slow_save(rows: Any, deleted: Any = ()) -> None:
        saving.set()
        gate.wait()  # the disk is slow: the commit has not completed yet
        real_save(rows, deleted)

    svc.db.save = slow_save  # type: ignore[method-assign]
    return gate, saving


async def test_a_replica_sends_its_ack_only_after_the_commit_holding_the_write(tmp_path):
    links = _Links(tmp_path / FILE)
    svc = StoreService(_Core(), links, tmp_path, StoreSettings())  # type: ignore[arg-type]
    gate, saving = _slow_disk(svc)
    batch = {"t": "batch", "fwd": False, "ack": [7],
             "e": [["d", "t", "k", {"lww": crdt.lww((int(time.time() * 1000), 0, "a"),
                                                     b"v")}]]}
    async with trio.open_nursery() as nursery:
        try:
            await nursery.start(svc.run)
            nursery.start_soon(svc._serve_channel, _In(batch))
            await trio.to_thread.run_sync(saving.wait)
            await trio.testing.wait_all_tasks_blocked()
            assert links.sent == [], "acked while the commit holding the write was running"
            gate.set()
            with trio.fail_after(10):  # a hang guard, not a timing check
                await links.any_sent.wait()
            assert links.sent == [({"t": "ack", "ids": [7]}, 1)], \
                "the ack must go out once the record is on disk"
        finally:
            gate.set()  # never leave the commit thread blocked (it cannot be cancelled)
            nursery.cancel_scope.cancel()


class _CoreWithPeer(_Core):
    @staticmethod
    def alive_peers() -> list[str]:
        return ["127.0.0.1:7001"]


async def test_a_local_write_is_pushed_only_after_the_commit_holding_it(tmp_path):
    """Issue 23 (the nemesis's review): a push that left before the commit, then kill -9,
    and the restarted node's counter slot was behind its peers': its next increments were
    swallowed by the max-merge. Nothing leaves a node before it is on its disk."""
    links = _Links(tmp_path / FILE)
    svc = StoreService(_CoreWithPeer(), links, tmp_path, StoreSettings())  # type: ignore[arg-type]
    gate, saving = _slow_disk(svc)
    async with trio.open_nursery() as nursery:
        try:
            await nursery.start(svc.run)
            svc.rep.local("d", "t", "k", {"counter": crdt.counter_add(None, "b", 5)},
                          trio.current_time())
            svc._changed("d", "t", "k", {}, True)  # (what on_change does: a commit wanted)
            svc._kick.set()
            await trio.to_thread.run_sync(saving.wait)
            await trio.sleep(2 * svc.rep.batch_interval)  # the batch is due: it must wait
            await trio.testing.wait_all_tasks_blocked()
            assert links.sent == [], "pushed while the commit holding the write was running"
            gate.set()
            with trio.fail_after(10):  # a hang guard, not a timing check
                await links.any_sent.wait()
            msg, on_disk = links.sent[0]
            assert msg["t"] == "batch" and msg["e"][0][2] == "k" and on_disk == 1
        finally:
            gate.set()  # never leave the commit thread blocked (it cannot be cancelled)
            nursery.cancel_scope.cancel()


async def test_or_set_tags_are_unique_to_a_process(tmp_path):
    """A node restarted with its clock set back reads the same HLC times again: its tags
    carry its life id, so an add never reuses a tag of an earlier life."""
    tags, lives = [], []
    for _ in range(2):  # two lives of one node on one data dir
        svc = StoreService(_Core(), _Links(tmp_path / FILE), tmp_path,  # type: ignore[arg-type]
                           StoreSettings())
        async with trio.open_nursery() as nursery:
            await nursery.start(svc.run)
            await svc.set_op({"database": "d", "table": "t", "key": "s", "op": "add",
                              "member": f"x{len(tags)}"})
            state = svc.rep.state.get("d", "t", "s")
            tags.append(state["set"]["adds"][f"x{len(tags)}"][0])
            lives.append(svc._life)
            nursery.cancel_scope.cancel()
    assert lives[0] != lives[1]
    for tag, life in zip(tags, lives, strict=True):
        node, wall, count, end = tag.split(":")
        assert node == "b" and int(wall) > 0 and int(count) >= 0 and end == life


# --- review of issue 22: disk errors and the shutdown commit ------------------------------

async def test_a_disk_error_ends_one_store_message_and_the_timer_goes_on(tmp_path):
    links = _Links(tmp_path / FILE)
    svc = StoreService(_Core(), links, tmp_path, StoreSettings())  # type: ignore[arg-type]

    def broken(*args: Any) -> Any:
        raise sqlite3.OperationalError("disk I/O error")

    now = int(time.time() * 1000)
    svc.rep.state.apply("d", "t", "k", {"lww": crdt.lww((now, 0, "a"), b"v")})
    async with trio.open_nursery() as nursery:
        await nursery.start(svc.run)
        await svc._durable()
        svc.records.cache.clear()
        svc.db.hashes = broken  # type: ignore[method-assign]
        svc.db.tombstones = broken  # type: ignore[method-assign]
        await svc._serve_channel(_In({"t": "keys", "tables": {
            "d\x00t": {"b": list(range(4096)), "k": {}}}}))
        svc.rep.next_sync = 0.0  # a sync tick now: tombstone collection fails
        svc._kick.set()
        await trio.testing.wait_all_tasks_blocked()
        assert svc.rep.next_sync > 0.0, "the tick ran"
        # the store still serves: a write is committed and acknowledged
        await svc._commit_local("d", "t", "k2", {"lww": crdt.lww((now + 1, 0, "a"), b"w")}, 1)
        assert svc.rep.state.get("d", "t", "k2") is not None
        nursery.cancel_scope.cancel()


async def test_the_shutdown_commit_changes_the_records_on_the_event_loop_thread(tmp_path):
    links = _Links(tmp_path / FILE)
    svc = StoreService(_Core(), links, tmp_path, StoreSettings())  # type: ignore[arg-type]
    loop_thread = threading.get_ident()
    threads: list[tuple[str, int]] = []
    for name in ("begin_commit", "end_commit"):
        real = getattr(svc.records, name)

        def traced(*args: Any, _real: Any = real, _name: str = name) -> Any:
            threads.append((_name, threading.get_ident()))
            return _real(*args)

        setattr(svc.records, name, traced)
    async with trio.open_nursery() as nursery:
        await nursery.start(svc.run)
        # merged without asking for a commit: only the shutdown commit writes it
        svc.rep.state.apply("d", "t", "k", {"lww": crdt.lww((1, 0, "a"), b"v")})
        nursery.cancel_scope.cancel()
    assert threads == [("begin_commit", loop_thread), ("end_commit", loop_thread)]
    db = StoreDB(tmp_path / FILE)
    try:
        assert [r[2] for r in db.load()] == ["k"]
    finally:
        db.close()
