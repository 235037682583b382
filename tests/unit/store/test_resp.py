"""resp.py against fake Redis servers on loopback: deadlines, bounds and liveness, the ways a
shared pipelined connection can go wrong (the real server's behaviour is in
tests/integration/test_engine_redis.py)."""

from __future__ import annotations

import contextlib
import socket

import pytest
import trio

from meshd.store.engines import inflight, resp


def addr_of(port: int, **kw) -> resp.Address:
    return resp.Address("127.0.0.1", port, None, kw.get("username"), kw.get("password"),
                        kw.get("db", 0))


async def silent_server(nursery, accepted: list | None = None) -> int:
    """Accepts connections, reads what comes, never answers."""
    async def handle(stream):
        if accepted is not None:
            accepted.append(stream)
        try:
            while await stream.receive_some(65536):
                pass
        except trio.BrokenResourceError:
            pass

    listeners = await nursery.start(trio.serve_tcp, handle, 0)
    return listeners[0].socket.getsockname()[1]


async def test_callers_queued_behind_a_hanging_connect_all_fail_within_their_timeout(
        nursery, autojump_clock):
    """A server whose backlog is full drops SYNs: the connect hangs. Callers queued behind
    that attempt get its failure, not a fresh wait each (k callers: not k timeouts)."""
    with socket.socket() as lst:
        lst.bind(("127.0.0.1", 0))
        lst.listen(0)
        port = lst.getsockname()[1]
        fillers = []
        for _ in range(4):  # fill the backlog; later SYNs are dropped
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(("127.0.0.1", port))
            fillers.append(s)
        mux = resp.Multiplexer(addr_of(port), timeout=1.0)
        await nursery.start(mux.run)
        failed: dict[float, float] = {}
        start = trio.current_time()

        async def one(delay: float) -> None:
            await trio.sleep(delay)
            with pytest.raises(OSError):
                await mux.call(("PING",))
            failed[delay] = trio.current_time() - start

        async with trio.open_nursery() as inner:
            for delay in (0.0, 0.3, 0.6):
                inner.start_soon(one, delay)
        # all end with the one attempt (at 1.0 s); each trying anew would end at 1.3, 1.6
        assert failed == pytest.approx({0.0: 1.0, 0.3: 1.0, 0.6: 1.0}, abs=0.05), failed
        for s in fillers:
            s.close()


async def test_stalled_connection_is_closed_at_the_oldest_calls_deadline_even_if_nobody_waits(
        nursery):
    accepted: list = []
    port = await silent_server(nursery, accepted)
    mux = resp.Multiplexer(addr_of(port), timeout=0.5)
    await nursery.start(mux.run)
    with trio.move_on_after(0.1):  # every caller gives up early
        async with trio.open_nursery() as inner:
            for _ in range(5):
                inner.start_soon(mux.call, ("GET", "k"))
    conn = mux._conn
    assert conn is not None and not conn.closed and len(conn.waiting) == 5
    await trio.sleep(0.6)
    assert conn.closed and not conn.waiting  # the stuck connection did not linger
    # and a timed-out call is bounded and leaves the connection closed for the next one
    start = trio.current_time()
    with pytest.raises(TimeoutError):
        await mux.call(("GET", "k"))
    assert trio.current_time() - start < 1.0 and mux._conn.closed


async def test_queue_is_bounded(nursery, monkeypatch):
    monkeypatch.setattr(inflight, "MAX_WAITING", 3)
    port = await silent_server(nursery)
    mux = resp.Multiplexer(addr_of(port), timeout=5.0)
    await nursery.start(mux.run)
    async with trio.open_nursery() as inner:
        for _ in range(3):
            inner.start_soon(mux.call, ("GET", "k"))
        await trio.sleep(0.1)
        start = trio.current_time()
        with pytest.raises(resp.Overloaded):
            await mux.call(("GET", "k"))
        assert trio.current_time() - start < 0.1  # at once, not after the timeout
        inner.cancel_scope.cancel()


async def test_replies_go_to_their_callers_in_order_and_an_error_reply_to_its_own(nursery):
    """A fake server answering each command with its argument (or an error for "bad"):
    every caller gets its own reply; a multi-command call gets its n replies."""
    async def handle(stream):
        import hiredis
        reader = hiredis.Reader()
        try:
            while data := await stream.receive_some(65536):
                reader.feed(data)
                out = []
                while (cmd := reader.gets()) is not False:
                    arg = cmd[-1]
                    out.append(b"-ERR bad\r\n" if arg == b"bad" else
                               b"$%d\r\n%s\r\n" % (len(arg), arg))
                await stream.send_all(b"".join(out))
        except trio.BrokenResourceError:
            pass

    port = (await nursery.start(trio.serve_tcp, handle, 0))[0].socket.getsockname()[1]
    mux = resp.Multiplexer(addr_of(port), timeout=5.0)
    await nursery.start(mux.run)
    got: dict[int, list] = {}

    async def one(i: int) -> None:
        if i % 7 == 0:
            got[i] = await mux.call(("ECHO", f"{i}a"), ("ECHO", "bad"), ("ECHO", f"{i}c"))
        else:
            got[i] = await mux.call(("ECHO", str(i)))

    async with trio.open_nursery() as inner:
        for i in range(100):
            inner.start_soon(one, i)
    for i, replies in got.items():
        if i % 7 == 0:
            assert replies[0] == f"{i}a".encode() and replies[2] == f"{i}c".encode()
            assert isinstance(replies[1], resp.ReplyFailed)
        else:
            assert replies == [str(i).encode()]
    assert len(got) == 100 and await mux.call() == []


async def test_follow_ends_when_the_subscription_goes_silent(nursery):
    """A server that confirms SUBSCRIBE, delivers one message, then answers nothing (not
    even PING): follow raises within ping_every + timeout instead of waiting forever."""
    async def handle(stream):
        await stream.receive_some(65536)
        await stream.send_all(b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n"
                              b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$5\r\nhello\r\n")
        try:
            while await stream.receive_some(65536):
                pass
        except trio.BrokenResourceError:
            pass

    port = (await nursery.start(trio.serve_tcp, handle, 0))[0].socket.getsockname()[1]
    heard: list[bytes] = []
    start = trio.current_time()
    with trio.fail_after(3), pytest.raises(TimeoutError):
        await resp.follow(addr_of(port), b"ch", 0.5, heard.append, ping_every=0.3)
    assert heard == [b"hello"] and trio.current_time() - start >= 0.8


def test_tls_options_are_used_or_refused_never_ignored(tmp_path):
    with pytest.raises(ValueError, match="ssl_foo"):
        resp.address("rediss://127.0.0.1:6380/0?ssl_foo=1")
    with pytest.raises(ValueError, match="ssl_cert_reqs"):
        resp.address("rediss://127.0.0.1:6380/0?ssl_cert_reqs=maybe")
    with pytest.raises(ValueError, match="ssl_min_version"):
        resp.address("rediss://127.0.0.1:6380/0?ssl_min_version=4")
    a = resp.address("rediss://127.0.0.1:6380/0?ssl_cert_reqs=none&ssl_min_version=772")
    assert a.tls is not None and not a.tls.check_hostname
    assert a.tls.minimum_version.name == "TLSv1_3"
    b = resp.address("rediss://127.0.0.1:6380/0")
    assert b.tls.check_hostname and b.tls.verify_mode.name == "CERT_REQUIRED"
    assert resp.address("redis://u:pw@127.0.0.1:6380/2").tls is None
    assert "pw" not in repr(resp.address("redis://u:s3cret@127.0.0.1:6380/2"))
