"""Real `meshd up` processes on 127.0.0.1 for integration tests; always cleaned up."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO, Any

import trio

from meshd.control import ControlClient
from meshd.errors import MeshError
from meshd_sdk.testing import Cluster as HarnessCluster
from meshd_sdk.testing import Node as Daemon


class LoopbackServer:
    """A TCP server on 127.0.0.1 (any free port) that runs `handle` on a thread per
    connection; subclasses say what `handle` does."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()

    def handle(self, conn: socket.socket) -> None:
        raise NotImplementedError


def free_port() -> int:
    """A loopback TCP port free right now (for a server a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop(proc: subprocess.Popen[Any], grace: float = 10) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `grace` seconds."""
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(grace)


def control(data_dir: Path, op: str, /, **args: Any) -> Any:
    async def go() -> Any:
        client = ControlClient(data_dir / "meshd.sock")
        try:
            return await client.call(op, **args)
        finally:
            await client.aclose()

    return trio.run(go)


# Errors a condition may raise while it is not yet true: nothing there yet (404), a daemon
# not reachable yet or busy (503, OSError), auth state still on its way (401, 403), a slow
# answer (408), a row not there yet (KeyError). Anything else (400, 409, 500, an assertion)
# cannot turn into success by waiting: it fails at once.
NOT_YET = (401, 403, 404, 408, 503)


def _not_yet(exc: Exception) -> bool:
    """Whether `exc`, raised by a condition, only means "not yet" (see NOT_YET); anything
    else is re-raised by the waits at once."""
    if isinstance(exc, MeshError):
        return exc.status in NOT_YET
    return isinstance(exc, OSError | KeyError)


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll `check` until it returns True; return the seconds that took. Fails after
    `timeout` s naming `what` and the last "not yet" error; other errors fail at once."""
    start = time.monotonic()
    last: Exception | None = None
    while time.monotonic() - start < timeout:
        try:
            if check():
                return time.monotonic() - start
        except Exception as exc:
            if not _not_yet(exc):
                raise
            last = exc
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last error: {last})")


async def wait_for_async(check: Callable[[], Awaitable[bool]], timeout: float,
                         what: str) -> float:
    """`wait_for` inside trio: `check` is awaited."""
    start = trio.current_time()
    last: Exception | None = None
    while trio.current_time() - start < timeout:
        try:
            if await check():
                return trio.current_time() - start
        except Exception as exc:
            if not _not_yet(exc):
                raise
            last = exc
        await trio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last error: {last})")


class Events:
    """Events of a control stream, collected as they arrive (see `control_stream`)."""

    def __init__(self) -> None:
        self.seen: list[Any] = []
        self.ended = False
        self._pos = 0
        self._changed = trio.Event()

    def _add(self, ev: Any) -> None:
        self.seen.append(ev)
        self._wake()

    def _wake(self) -> None:
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    async def next(self, match: Callable[[Any], bool], timeout: float, what: str) -> Any:
        """The next event (after the one `next` returned last) for which `match` is true;
        events that do not match are passed over (they stay in `seen`)."""
        with trio.move_on_after(timeout):
            while True:
                while self._pos < len(self.seen):
                    ev = self.seen[self._pos]
                    self._pos += 1
                    if match(ev):
                        return ev
                if self.ended:
                    raise AssertionError(f"the stream ended before {what}; events: {self.seen}")
                await self._changed.wait()
        raise AssertionError(f"timed out after {timeout} s waiting for {what}; events: "
                             f"{self.seen}")


@asynccontextmanager
async def control_stream(data_dir: Path, op: str, /, token: str | None = None,
                         **args: Any) -> AsyncIterator[Events]:
    """Open control stream `op` (members.watch, services.watch, store.watch, config.watch)
    and enter once the daemon has answered that it streams. The daemon sets the watch up
    just after it answers, so a change that takes another process a while (a service
    starting, a period watched for trouble) is seen; where one event must not be missed,
    prove the watch live first with an event of the test's own (a join, a marker write).
    A refused stream raises."""
    async with client_stream(ControlClient(data_dir / "meshd.sock", token=token), op,
                             **args) as events:
        yield events


@asynccontextmanager
async def client_stream(client: ControlClient, op: str, /, **args: Any
                        ) -> AsyncIterator[Events]:
    """`control_stream` over a client of the test's own (a RemoteControlClient: the same
    ops through a node's proxy); the client is closed on the way out."""
    events = Events()
    opened = trio.Event()
    call = client.call

    async def answered(op: str, /, **kw: Any) -> Any:  # the daemon said it streams
        result = await call(op, **kw)
        opened.set()
        return result

    client.call = answered  # type: ignore[method-assign]

    async def pump() -> None:
        try:
            async for ev in client.stream(op, **args):
                events._add(ev)
        finally:
            events.ended = True
            events._wake()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump)
            await opened.wait()
            yield events
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:  # strict nurseries wrap the block's own failure
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    finally:
        await client.aclose()


class Lines:
    """The lines of a child's text pipe, read on a thread so a test can wait for one with a
    deadline instead of sleeping."""

    def __init__(self, pipe: IO[str]) -> None:
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe: IO[str]) -> None:
        for line in pipe:
            with self._lock:
                self.lines.append(line.rstrip("\n"))

    def wait(self, match: Callable[[str], bool], timeout: float, what: str) -> str:
        """The first line for which `match` is true, waiting up to `timeout` s for it."""
        found: list[str] = []

        def check() -> bool:
            with self._lock:
                found[:] = [x for x in self.lines if match(x)][:1]
            return bool(found)

        try:
            wait_for(check, timeout, what)
        except AssertionError:
            raise AssertionError(f"no line with {what} within {timeout} s; lines: "
                                 f"{self.text()!r}") from None
        return found[0]

    def text(self) -> str:
        with self._lock:
            return "\n".join(self.lines)


class Cluster(HarnessCluster):
    """The harness's cluster (meshd_sdk.testing: one way to start test daemons), with the
    test services of tests/integration/services."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.services: list[Any] = []

    def service(self, daemon: Daemon, name: str = "testsvc", **kw: Any) -> Any:
        svc = ServiceProcess(daemon, name, **kw)
        self.services.append(svc)
        return svc

    def close(self) -> None:
        for svc in self.services:
            svc.stop()
        super().close()


SERVICES = Path(__file__).parent / "services"


class ServiceProcess:
    """A test service process attached to one daemon."""

    def __init__(self, daemon: Daemon, name: str = "testsvc",
                 script: Path = SERVICES / "testsvc.py", env: dict[str, str] | None = None,
                 args: tuple[str, ...] = ()) -> None:
        full_env = {**{k: v for k, v in os.environ.items() if k != "MESHD_NAMESPACE"},
                    "MESHD_ADDR": str(daemon.data_dir / "meshd.sock"),
                    "MESHD_NODE_NAME": daemon.name, "PYTHONPATH": os.pathsep.join(sys.path),
                    **(env or {})}
        self.log = daemon.root / f"{daemon.name}-{name}-{time.monotonic_ns()}.log"
        self.proc = subprocess.Popen([sys.executable, str(script), name, *args], env=full_env,
                                     stdout=subprocess.DEVNULL,
                                     stderr=open(self.log, "ab"))  # noqa: SIM115

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
