"""One replica placed on this node, as a process: prepared, started, watched, restarted by
its policy, stopped without leaving anything behind.

Theory of operation: `Replica.run()` is the replica's whole life, in a task the runtime's
nursery owns: prepare the source (sources.py), then start the process and wait for it to end,
and ask restart.py what next (restart after a backoff, stay exited, or `failed`). Every state
change is reported (`report`), so `meshd ps` shows it. Cancelling the task stops the replica:
the process group gets SIGTERM, then SIGKILL after `stop_timeout`.

Rules:
- The process leads its own process group (a new session): stopping it signals the group, so
  what it started goes too; no orphan survives the replica.
- Its stdout and stderr become log records of the replica (service = the spec's name,
  instance = `NAME-SLOT`; stdout at info, stderr at warning), lines cut at MAX_LINE, so
  `meshd logs NAME` shows what it printed and how it crashed.
- Limits from the spec: memory (RLIMIT_AS) and CPU seconds (RLIMIT_CPU), set in the child
  before it runs.
- The environment: this Python's, the spec's, then MESHD_* set by the runtime (the node's
  control socket, the service's token, namespace, replica), which the spec cannot override.
- Health: a replica is healthy while its process group holds a registration in this node's
  registry (`registered(pgid)`, from the control socket's peer credentials: nothing the
  process claims). One that registered and then lost its registration (its heartbeat
  stopped: hung, deadlocked, stopped) for `health_grace` seconds is stopped and restarted by
  its policy as a failure ("health check failed"). A process that never registers (a worker)
  is not judged by this check.
- A source that cannot be prepared, or a command that cannot be started, is `failed` with
  the reason until the spec changes; the replica task then waits (the runtime replaces it
  when the spec's version changes).
"""

from __future__ import annotations

import contextlib
import os
import random
import resource
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import trio

from .procfiles import Leftover, OutputFile, ProcFiles, start_time, stat_fields
from .restart import Restarts
from .sources import SourceError, Sources
from .spec import Spec

MAX_LINE = 8192
HEALTH_EVERY = 1.0  # seconds between looks at the registry
KILL_WAIT = 2.0  # seconds a stop waits for the rest of a group to die of its SIGKILL
Logs = Callable[[str, str, list[dict[str, Any]]], Any]  # (service, instance, records)
Environ = Callable[[Spec, str], Awaitable[dict[str, str]]]


@dataclass(frozen=True)
class State:
    spec: str
    slot: str
    node: str
    version: int
    state: str  # preparing, starting, running, restarting, exited, crashed, failed, stopped
    pid: int = 0
    restarts: int = 0
    started: float = 0.0  # unix time of the current process's start
    reason: str = ""
    revision: str = ""
    healthy: bool = False  # its process group holds a registration now
    registered: bool = False  # its current process has registered (at some point)

    def to_row(self) -> dict[str, Any]:
        return {"name": self.spec, "slot": self.slot, "node": self.node,
                "version": self.version, "state": self.state, "pid": self.pid,
                "restarts": self.restarts, "started": self.started, "reason": self.reason,
                "revision": self.revision, "healthy": self.healthy,
                "registered": self.registered}


PR_SET_PDEATHSIG = 1


def _child_setup(memory_mb: int, cpu_seconds: int, deathsig: bool = True
                 ) -> Callable[[], None]:
    """What the child does before it runs the command: die with the daemon (SIGKILL when
    the thread that started it, the daemon's only one, ends: even on kill -9) unless it is
    to outlive it (keep_on_exit), and take the spec's limits."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def apply() -> None:  # in the child, before exec
        if deathsig:
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if memory_mb:
            size = memory_mb * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (size, size))
        if cpu_seconds:
            resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 5))
    return apply


class _Child:
    """A process started from the daemon's own thread (so the parent-death signal follows
    the daemon, not a worker thread), or adopted from an earlier daemon; its output as
    chunk streams (pipes, or files it appends to); its exit awaited on a pidfd (polled where
    there is none). An adopted process is not our child: its end is seen, not its code."""

    def __init__(self, pid: int, stdout: Any, stderr: Any,
                 popen: subprocess.Popen[bytes] | None = None) -> None:
        self.popen = popen
        self.pid = pid
        self.start_time = start_time(pid) if popen is None else None
        self.stdout = stdout
        self.stderr = stderr
        self.returncode: int | None = None
        self.ended = False

    @classmethod
    def start(cls, argv: list[str], cwd: Any, env: dict[str, str],
              setup: Callable[[], None], files: tuple[Path, Path] | None = None) -> _Child:
        if files is None:
            r_out, w_out = os.pipe()
            r_err, w_err = os.pipe()
        else:
            for path in files:
                path.parent.mkdir(parents=True, exist_ok=True)
            w_out, w_err = (os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                            for path in files)
        try:
            popen = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                     stdout=w_out, stderr=w_err, start_new_session=True,
                                     preexec_fn=setup, close_fds=True)
        except BaseException:
            if files is None:
                for fd in (r_out, r_err):
                    os.close(fd)
            raise
        finally:
            os.close(w_out)
            os.close(w_err)
        if files is not None:
            return cls(popen.pid, OutputFile(files[0]), OutputFile(files[1]), popen)
        return cls(popen.pid, trio.lowlevel.FdStream(r_out), trio.lowlevel.FdStream(r_err),
                   popen)

    @classmethod
    def adopt(cls, pid: int, files: tuple[Path, Path]) -> _Child:
        return cls(pid, OutputFile(files[0]), OutputFile(files[1]))

    def running(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return self.start_time is not None and start_time(self.pid) == self.start_time

    async def wait(self) -> int | None:
        if self.ended:
            return self.returncode
        try:
            fd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            fd = -1
        try:
            while self.running():
                if fd >= 0:
                    await trio.lowlevel.wait_readable(fd)
                else:
                    await trio.sleep(0.05)
        finally:
            if fd >= 0:
                os.close(fd)
        self.ended = True
        self.returncode = self.popen.returncode if self.popen is not None else None
        return self.returncode

    def finish_output(self) -> None:
        for stream in (self.stdout, self.stderr):
            if isinstance(stream, OutputFile):
                stream.finish()


class Replica:
    def __init__(self, spec: Spec, slot: str, node: str, sources: Sources, environ: Environ,
                 logs: Logs, report: Callable[[State], None], stop_timeout: float = 10.0,
                 rng: random.Random | None = None,
                 registered: Callable[[int], bool] | None = None,
                 health_grace: float = 10.0, procs: ProcFiles | None = None,
                 keep_on_exit: Callable[[], bool] | None = None,
                 adopt: Leftover | None = None) -> None:
        self.spec = spec
        self.slot = slot
        self.instance = f"{spec.name}-{slot}"
        self.sources = sources
        self.environ = environ
        self.logs = logs
        self.report = report
        self.stop_timeout = stop_timeout
        self.restarts = Restarts(spec.restart, rng or random.Random())
        self.state = State(spec.name, slot, node, spec.version, "preparing")
        self.process: _Child | None = None
        self.registered = registered
        self.health_grace = health_grace
        self._unhealthy = ""  # why the runtime stopped the current process ("": it did not)
        self.procs = procs  # where its process's record (and output files) are kept
        # keep_on_exit: None (off: output through pipes, the process dies with the daemon),
        # or whether the daemon is leaving now (the process then runs on, to be adopted)
        self.keep_on_exit = keep_on_exit
        self.adopt = adopt

    def _set(self, **changes: Any) -> None:
        self.state = replace(self.state, restarts=self.restarts.count, **changes)
        self.report(self.state)

    async def run(self) -> None:
        """The replica's life; returns when it will not run again (exited by policy, or
        failed: it then waits to be cancelled); stops the process when cancelled."""
        self._set(state="preparing")
        try:
            ready = await self.sources.prepare(self.spec)
        except SourceError as exc:
            self._set(state="failed", reason=str(exc))
            self._log("error", f"cannot prepare {self.spec.source}: {exc}")
            return
        self.state = replace(self.state, revision=ready.revision)
        while True:
            now = time.monotonic()
            self.restarts.started(now)
            adopt, self.adopt = self.adopt, None
            try:
                code, ran = await self._run_once(ready.argv, ready.cwd, adopt)
            except OSError as exc:
                self._set(state="failed", pid=0, reason=f"cannot start "
                          f"{' '.join(ready.argv)}: {exc.strerror or exc}")
                self._log("error", self.state.reason)
                return
            why = self._unhealthy or ("it ended; its exit code is unknown (adopted from an "
                                      "earlier daemon)" if adopt is not None else "")
            decision = self.restarts.exited(code, ran, time.monotonic(), why)
            self._log("warning" if code else "info",
                      f"{self.instance} ended ({decision.reason}); {decision.state}"
                      + (f" in {decision.delay:.2f} s" if decision.action == "restart"
                         else ""))
            if decision.action != "restart":
                self._set(state=decision.state, pid=0, reason=decision.reason, healthy=False)
                return
            self._set(state="restarting", pid=0, reason=decision.reason, healthy=False)
            await trio.sleep(decision.delay)

    async def _run_once(self, argv: tuple[str, ...], cwd: os.PathLike[str],
                        adopt: Leftover | None = None) -> tuple[int | None, float]:
        """Start the process (or adopt the one an earlier daemon left), forward its output,
        wait for it; (exit code or None for a signal, seconds it ran). Cancelled: the process
        group is stopped first, unless the daemon is leaving with keep_on_exit."""
        spec, slot = self.spec, self.slot
        files = self.procs.output(spec.namespace, spec.name, slot) \
            if self.procs is not None and self.keep_on_exit is not None else None
        if adopt is not None and files is not None:
            proc = _Child.adopt(adopt.pid, files)
            started = adopt.started
            self._log("info", f"{self.instance}: adopted pid {adopt.pid} from an earlier "
                      "daemon")
        else:
            env = {**os.environ, **spec.env, **await self.environ(spec, slot)}
            self._set(state="starting")
            proc = _Child.start(list(argv), cwd, env,
                                _child_setup(spec.memory_mb, spec.cpu_seconds,
                                             deathsig=files is None), files)
            started = time.time()
            if self.procs is not None:
                self.procs.record(Leftover(spec.namespace, spec.name, slot, proc.pid,
                                           start_time(proc.pid) or 0, spec.version,
                                           self.state.revision, started, files is not None))
        self.process = proc
        self._unhealthy = ""
        leaving = False
        t0 = time.monotonic() - (time.time() - started)
        self._set(state="running", pid=proc.pid, started=started, reason="", healthy=False,
                  registered=False)  # each process is judged from its own registration
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._forward, proc.stdout, "info", "stdout")
                nursery.start_soon(self._forward, proc.stderr, "warning", "stderr")
                watch = trio.CancelScope()
                if self.registered is not None:
                    nursery.start_soon(self._watch_health, proc, watch)
                try:
                    await proc.wait()
                except trio.Cancelled:
                    leaving = self.keep_on_exit is not None and self.keep_on_exit()
                    raise
                finally:  # the group goes too, so nothing holds its pipes open
                    watch.cancel()
                    if not leaving:
                        with trio.CancelScope(shield=True):
                            await self._stop(proc)
                    proc.finish_output()
                nursery.cancel_scope.deadline = trio.current_time() + 1.0  # the last lines
        finally:
            self.process = None
            with trio.CancelScope(shield=True):
                for stream in (proc.stdout, proc.stderr):
                    await stream.aclose()
            if self.procs is not None and not leaving:
                self.procs.forget(spec.namespace, spec.name, slot)
        code = proc.returncode
        return (code if code is not None and code >= 0 else None), time.monotonic() - t0

    async def _watch_health(self, proc: _Child, scope: trio.CancelScope) -> None:
        """Looks at the registry every HEALTH_EVERY seconds; stops the process (SIGTERM to its
        group, SIGKILL after stop_timeout) once it has been without the registration it had
        for health_grace seconds. Cancelled as soon as the process ends."""
        assert self.registered is not None
        missing_since: float | None = None
        with scope:
            while True:
                await trio.sleep(HEALTH_EVERY)
                healthy = self.registered(proc.pid)
                if healthy != self.state.healthy:
                    self._set(healthy=healthy, registered=self.state.registered or healthy)
                if healthy or not self.state.registered:
                    missing_since = None
                    continue
                now = time.monotonic()
                missing_since = missing_since if missing_since is not None else now
                if now - missing_since >= self.health_grace:
                    self._unhealthy = (f"health check failed: no registration for "
                                       f"{self.health_grace:g} s (its heartbeat stopped)")
                    self._log("warning", f"{self.instance}: {self._unhealthy}; stopping it")
                    signal_group(proc.pid, signal.SIGTERM)
                    await trio.sleep(self.stop_timeout)  # hung too deep to take SIGTERM
                    signal_group(proc.pid, signal.SIGKILL)
                    return

    async def _stop(self, proc: _Child) -> None:
        """SIGTERM to the process group, SIGKILL after stop_timeout; also when the leader is
        gone already (what it started goes too). A stopped (SIGSTOP) group is continued so
        it can take the SIGTERM."""
        signal_group(proc.pid, signal.SIGTERM)
        with trio.move_on_after(self.stop_timeout):
            await proc.wait()
            # the leader is gone: give the rest of its group the same chance
            while group_alive(proc.pid):
                await trio.sleep(0.05)
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        # the rest of the group dies of the same SIGKILL a moment later (the kernel tears
        # each process down on its own): return once it is gone, so a stopped replica
        # leaves nothing running (bounded: a process in uninterruptible sleep may linger)
        with trio.move_on_after(KILL_WAIT):
            while group_alive(proc.pid):
                await trio.sleep(0.02)

    async def _forward(self, stream: Any, level: str, name: str) -> None:
        buf = b""
        async for chunk in stream:
            buf += chunk
            *lines, buf = buf.split(b"\n")
            if len(buf) > MAX_LINE:
                lines.append(buf[:MAX_LINE])
                buf = b""
            if lines:
                self.logs(self.spec.name, self.instance, [
                    {"message": line[:MAX_LINE].decode("utf-8", "replace").rstrip("\r"),
                     "level": level, "fields": {"stream": name}} for line in lines])
        if buf:
            self.logs(self.spec.name, self.instance, [
                {"message": buf.decode("utf-8", "replace"), "level": level,
                 "fields": {"stream": name}}])

    def _log(self, level: str, message: str) -> None:
        self.logs(self.spec.name, self.instance,
                  [{"message": message, "level": level, "fields": {"stream": "runtime"}}])


def signal_group(pgid: int, sig: int) -> None:
    """`sig` to a process group, then SIGCONT (a stopped process takes no signal but
    SIGKILL until it runs again); nothing when the group is gone."""
    for s in (sig, signal.SIGCONT):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, s)


def group_alive(pgid: int) -> bool:
    """Whether a process of group `pgid` still runs (a zombie waiting for its parent to
    reap it runs nothing and does not count)."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        entries = os.listdir("/proc")
    except OSError:
        return True  # no /proc: the signal check is all there is
    for entry in entries:
        fields = stat_fields(entry) if entry.isdigit() else None
        if fields is not None and len(fields) > 2 and int(fields[2]) == pgid:
            return True
    return False
