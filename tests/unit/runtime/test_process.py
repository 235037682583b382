"""A replica as a process: its output becomes log records, a crash is restarted with backoff
until the start limit says failed, a clean exit under on-failure stays exited, cancelling it
stops its whole process group (no orphan), and limits and environment reach the child."""

from __future__ import annotations

import os
import random
import signal
import sys
import time
from pathlib import Path

import trio

from meshd.runtime import restart
from meshd.runtime.process import Replica, State, group_alive
from meshd.runtime.sources import Sources
from meshd.runtime.spec import parse_spec


def make(tmp_path: Path, main: str, **kw):
    app = tmp_path / "app"
    app.mkdir(exist_ok=True)
    (app / "main.py").write_text(main)
    spec = parse_spec({"name": "svc", "source": str(app), **kw})
    states: list[State] = []
    logs: list[tuple[str, str, dict]] = []

    async def environ(spec, slot):
        return {"MESHD_REPLICA": f"{spec.name}-{slot}", "MESHD_TOKEN": "tok"}

    replica = Replica(spec, "0", "node-a", Sources(tmp_path / "runtime"), environ,
                      lambda svc, inst, records: logs.extend((svc, inst, r) for r in records),
                      states.append, stop_timeout=2.0, rng=random.Random(3))
    return replica, states, logs


def lines(logs, stream):
    return [r["message"] for _, _, r in logs if r["fields"]["stream"] == stream]


async def test_output_is_logged_and_a_clean_exit_under_on_failure_stays_exited(tmp_path):
    replica, states, logs = make(tmp_path, (
        "import os, sys\n"
        "print('hello from', os.environ['MESHD_REPLICA'], os.environ['MESHD_TOKEN'])\n"
        "print('to stderr', file=sys.stderr)\n"
        "print('A' * 20000)\n"
        "print('no newline', end='')\n"), restart="on-failure")
    with trio.fail_after(20):
        await replica.run()
    assert lines(logs, "stdout")[:1] == ["hello from svc-0 tok"]
    assert len(lines(logs, "stdout")[1]) == 8192 and "no newline" in lines(logs, "stdout")
    assert lines(logs, "stderr") == ["to stderr"]
    assert all(svc == "svc" and inst == "svc-0" for svc, inst, _ in logs)
    assert [s.state for s in states] == ["preparing", "starting", "running", "exited"]
    assert states[2].pid > 0 and states[-1].reason == "exit code 0"


async def test_a_crashing_process_backs_off_then_fails_at_the_start_limit(tmp_path):
    replica, states, logs = make(tmp_path, "import sys; sys.exit(3)\n")
    t0 = time.monotonic()
    with trio.fail_after(30):
        await replica.run()
    took = time.monotonic() - t0
    assert states[-1].state == "failed" and "exit code 3" in states[-1].reason
    assert [s.state for s in states].count("running") == restart.START_LIMIT
    assert states[-1].restarts == restart.START_LIMIT - 1
    # the backoff: 0.1 + 0.2 + 0.4 + 0.8 s, each times a jitter of 0.5..1
    assert took >= 0.75
    assert any("restarting in" in r["message"] for _, _, r in logs)


async def test_cancelled_it_stops_the_whole_group(tmp_path):
    replica, states, _ = make(tmp_path, (
        "import subprocess, sys, time, signal\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)  # it ignores the polite ask\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(replica.run)
        with trio.fail_after(20):
            while not any(s.state == "running" for s in states) or replica.process is None:
                await trio.sleep(0.05)
            await trio.sleep(0.5)
        pid = replica.process.pid
        assert os.getpgid(pid) == pid  # its own group
        t0 = time.monotonic()
        nursery.cancel_scope.cancel()
    assert time.monotonic() - t0 < 5  # SIGKILL after stop_timeout (2 s)
    assert not group_alive(pid), "the process group outlived the replica"


async def test_a_command_that_cannot_start_and_limits(tmp_path):
    replica, states, _ = make(tmp_path, "", command=["/nonexistent/binary"])
    with trio.fail_after(10):
        await replica.run()
    assert states[-1].state == "failed" and "cannot start" in states[-1].reason
    # a memory limit the child hits
    replica, states, logs = make(
        tmp_path, "x = bytearray(400 * 1024 * 1024)\nprint('allocated')\n",
        memory_mb=200, restart="never")
    with trio.fail_after(20):
        await replica.run()
    assert states[-1].state == "crashed"
    assert "allocated" not in lines(logs, "stdout")
    assert any("MemoryError" in m for m in lines(logs, "stderr"))


async def test_killed_by_a_signal_is_a_crash(tmp_path):
    replica, states, _ = make(tmp_path, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)\n",
                              restart="never")
    with trio.fail_after(10):
        await replica.run()
    assert states[-1].state == "crashed" and "signal" in states[-1].reason
    assert signal.SIGKILL and sys.platform.startswith("linux")


async def test_a_replica_whose_registration_goes_away_is_restarted_as_a_failure(tmp_path):
    """The health check: registered, then not (its heartbeat stopped) for health_grace:
    stopped (SIGTERM, SIGKILL after stop_timeout for one that is too hung to take it) and
    restarted by its policy, the reason shown. Never registering is not judged (a worker),
    and the next process is judged by its own registration."""
    replica, states, logs = make(tmp_path, (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"  # hung too deep to take SIGTERM
        "while True: time.sleep(1)\n"), restart="on-failure")
    registered: set[int] = set()
    replica.registered = lambda pgid: pgid in registered
    replica.health_grace = 1.0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(replica.run)
        with trio.fail_after(20):
            while not (replica.state.state == "running" and replica.state.pid):
                await trio.sleep(0.05)
            first = replica.state.pid
            await trio.sleep(2.5)  # never registered: not judged, still the same process
            assert replica.state.pid == first and not replica.state.registered
            registered.add(first)
            while not replica.state.healthy:
                await trio.sleep(0.05)
            assert replica.state.registered
            os.kill(first, signal.SIGSTOP)  # hung: its heartbeat stops
            registered.clear()
            while replica.state.pid in (0, first):
                await trio.sleep(0.05)
        assert not group_alive(first)
        assert replica.state.restarts == 1 and not replica.state.healthy
        assert not replica.state.registered
        # the new process has not registered (yet): it is not judged by the old one's
        second = replica.state.pid
        await trio.sleep(2.5)
        assert replica.state.pid == second and replica.state.state == "running"
        restarting = [s for s in states if s.state == "restarting"]
        assert restarting and restarting[0].reason.startswith("health check failed")
        assert any("health check failed" in r["message"] for r in
                   (r for _, _, r in logs if r["fields"]["stream"] == "runtime"))
        nursery.cancel_scope.cancel()
