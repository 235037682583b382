"""Test harness: real meshd daemons on loopback, in temporary data dirs, for tests.

    from meshd_sdk.testing import mesh

    async def test_hello():                       # trio or asyncio
        async with mesh(nodes=1) as m:
            async with m.client() as client:      # bound to node 0's daemon
                ...

    def test_with_the_fixture(meshd_cluster):     # pytest: `pytest_plugins = ["meshd_sdk.testing"]`
        meshd_cluster.node(0).control("members")

Rules:
- Each daemon is `meshd up` in a process of its own (this Python, `-m meshd_cli`), bound to
  127.0.0.1 on a free port, with a data dir under a temporary directory and the cluster's
  secret in its environment; the others join the first. Nothing listens beyond loopback.
- Starting waits for each daemon's ready line (its status as JSON) and then for every node to
  see every other alive, each wait bounded (START_TIMEOUT); a daemon that exits or does not
  start fails with the end of its log.
- Leaving the block (or the fixture) kills every daemon and service process it started and
  removes the temporary directory (kept when `root` was given).
- `m.client()` and `m.aio_client()` are SDK clients bound to a node's control socket;
  `m.service_env(i)` is the environment a service process needs to register with node i.
- Works from trio and from asyncio (the blocking waits run in a worker thread).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import sniffio

from meshd.control import ControlClient
from meshd.errors import MeshError
from meshd.secure.keyring import format_secret, new_secret

START_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0


def meshd_command() -> list[str]:
    """How to run the `meshd` command with this Python."""
    return [sys.executable, "-m", "meshd_cli"]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a process the harness starts: this one's, with this Python's
    import path, without a MESHD_ADDR or MESHD_NAMESPACE of the caller's."""
    env = {k: v for k, v in os.environ.items() if k not in ("MESHD_ADDR", "MESHD_NAMESPACE")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    env.update(extra or {})
    return env


class Node:
    """One daemon: `meshd up` on loopback with its own data dir."""

    def __init__(self, root: Path, name: str, secret: str, profile: str = "local",
                 extra: tuple[str, ...] = (), prefix: list[str] | None = None,
                 env: dict[str, str] | None = None, command: list[str] | None = None,
                 cwd: str | Path | None = None) -> None:
        self.prefix = prefix or []
        self.command = command or meshd_command()  # another release's, for upgrade tests
        self.cwd = cwd
        self.env = env or {}
        self.root = root
        self.name = name
        self.secret = secret
        self.profile = profile
        self.extra = extra
        self.data_dir = root / name
        self.proc: subprocess.Popen[bytes] | None = None
        self.addr = ""
        self.log = root / f"{name}.log"

    @property
    def socket(self) -> Path:
        """The daemon's control socket (what clients and services connect to)."""
        return self.data_dir / "meshd.sock"

    def start(self, join: list[str] | None = None, wait: bool = True,
              bind: str = "127.0.0.1:0", env: dict[str, str] | None = None) -> Node:
        cmd = [*self.prefix, *self.command, "up", "--name", self.name, "--bind", bind,
               "--profile", self.profile, "--data-dir", str(self.data_dir), "--json",
               *self.extra]
        for peer in join or []:
            cmd += ["--join", peer]
        full_env = child_env({"MESHD_SECRET": self.secret, **self.env, **(env or {})})
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log,
                                         env=full_env, cwd=self.cwd)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = START_TIMEOUT) -> dict[str, Any]:
        """The daemon's ready line (its status), once it is listening."""
        assert self.proc is not None and self.proc.stdout is not None
        line = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if line or self.proc.poll() is not None:
                break
        if not line:
            raise AssertionError(f"{self.name} did not start: {self.log_tail()}")
        status = json.loads(line)
        self.addr = status["address"]
        return status

    def log_tail(self, size: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-size:]
        except OSError:
            return "(no log)"

    def control(self, op: str, /, **args: Any) -> Any:
        """One op on the daemon's control socket, as its operator (blocking: from async code,
        `await node.call(...)`)."""
        import trio

        async def go() -> Any:
            client = ControlClient(self.socket)
            try:
                return await client.call(op, **args)
            finally:
                await client.aclose()
        return trio.run(go)

    async def call(self, op: str, /, **args: Any) -> Any:
        """`control`, from trio or asyncio (it runs in a worker thread)."""
        return await _in_thread(lambda: self.control(op, **args))

    def assert_running(self) -> None:
        """Fail at once if the process has exited."""
        assert self.proc is not None, f"{self.name} was never started"
        code = self.proc.poll()
        if code is not None:
            raise AssertionError(f"daemon {self.name} exited with code {code}: "
                                 f"{self.log_tail()}")

    def members(self) -> dict[str, dict[str, Any]]:
        return {m["name"]: m for m in self.control("members")}

    def status_of(self, name: str) -> str | None:
        m = self.members().get(name)
        return None if m is None else m["status"]

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(STOP_TIMEOUT)

    def terminate(self) -> float:
        """SIGTERM; returns seconds until exit."""
        assert self.proc is not None
        start = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)
        return time.monotonic() - start

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()


class Cluster:
    """Daemons sharing a secret under one root; `add` starts one (joining `join`)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.secret = format_secret(new_secret())
        self.daemons: dict[str, Node] = {}
        self.processes: list[subprocess.Popen[bytes]] = []

    def add(self, name: str, join: list[str] | None = None, **kw: Any) -> Node:
        d = Node(self.root, name, kw.pop("secret", self.secret), **kw)
        self.daemons[name] = d
        d.start(join=join)
        return d

    def node(self, index: int | str = 0) -> Node:
        if isinstance(index, str):
            return self.daemons[index]
        return list(self.daemons.values())[index]

    def wait_converged(self, timeout: float = START_TIMEOUT) -> None:
        """Until every daemon sees every other alive."""
        names = set(self.daemons)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if all({n for n, m in d.members().items() if m["status"] == "alive"} >= names
                       for d in self.daemons.values()):
                    return
            except (OSError, MeshError):
                pass
            for d in self.daemons.values():
                d.assert_running()
            if time.monotonic() > deadline:
                raise AssertionError(f"the nodes {sorted(names)} did not all see each other "
                                     f"alive within {timeout} s")
            time.sleep(0.1)

    def service_env(self, index: int | str = 0, **extra: str) -> dict[str, str]:
        """The environment of a service process that registers with node `index`."""
        node = self.node(index)
        return child_env({"MESHD_ADDR": str(node.socket), "MESHD_NODE_NAME": node.name,
                          **extra})

    def spawn(self, argv: list[str], index: int | str = 0, cwd: str | Path | None = None,
              env: dict[str, str] | None = None, log: Path | None = None
              ) -> subprocess.Popen[bytes]:
        """A process (a service) attached to node `index`, stopped with the cluster."""
        out = log or self.root / f"process-{len(self.processes)}.log"
        with open(out, "ab") as f:
            proc = subprocess.Popen(argv, cwd=cwd, env={**self.service_env(index),
                                                        **(env or {})},
                                    stdout=subprocess.DEVNULL, stderr=f)
        self.processes.append(proc)
        return proc

    def wait_service(self, name: str, index: int | str = 0,
                     timeout: float = START_TIMEOUT) -> None:
        """Until node `index` knows an instance of service `name` (blocking); fails at once
        if a process this cluster spawned has exited."""
        deadline = time.monotonic() + timeout
        node = self.node(index)
        while True:
            try:
                if any(s["name"] == name for s in node.control("services")):
                    return
            except (OSError, MeshError):
                pass
            node.assert_running()
            for proc in self.processes:
                if proc.poll() is not None:
                    raise AssertionError(f"{proc.args} exited with code {proc.returncode} "
                                         f"before {name} registered")
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} did not register within {timeout} s")
            time.sleep(0.1)

    async def registered(self, name: str, index: int | str = 0,
                         timeout: float = START_TIMEOUT) -> None:
        """`wait_service`, from trio or asyncio."""
        await _in_thread(lambda: self.wait_service(name, index, timeout))

    def client(self, index: int | str = 0, **kw: Any) -> Any:
        """A trio SDK client of node `index`."""
        from .client import Client
        return Client(self.node(index).socket, **kw)

    def aio_client(self, index: int | str = 0, **kw: Any) -> Any:
        """An asyncio SDK client of node `index`."""
        from . import aio
        return aio.Client(self.node(index).socket, **kw)

    def close(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(STOP_TIMEOUT)
        for d in self.daemons.values():
            d.stop()


@contextlib.contextmanager
def cluster(nodes: int = 1, root: str | Path | None = None, profile: str = "local",
            env: dict[str, str] | None = None) -> Iterator[Cluster]:
    """`nodes` joined daemons (blocking); see `mesh` for the async form."""
    if nodes < 1:
        raise ValueError("a mesh has at least one node")
    tmp = None if root is not None else tempfile.mkdtemp(prefix="meshd-test-")
    where = Path(root if root is not None else tmp)  # type: ignore[arg-type]
    where.mkdir(parents=True, exist_ok=True)
    c = Cluster(where)
    try:
        first = c.add("node0", profile=profile, env=env)
        for i in range(1, nodes):
            c.add(f"node{i}", join=[first.addr], profile=profile, env=env)
        if nodes > 1:
            c.wait_converged()
        yield c
    finally:
        c.close()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.asynccontextmanager
async def mesh(nodes: int = 1, root: str | Path | None = None, profile: str = "local",
               env: dict[str, str] | None = None) -> AsyncIterator[Cluster]:
    """`nodes` joined daemons on loopback, from trio or asyncio."""
    manager = cluster(nodes, root, profile, env)
    started = await _in_thread(manager.__enter__)
    try:
        yield started
    finally:
        await _in_thread(lambda: manager.__exit__(None, None, None))


async def _in_thread(fn: Any) -> Any:
    if sniffio.current_async_library() == "trio":
        import trio
        return await trio.to_thread.run_sync(fn)
    import asyncio
    return await asyncio.to_thread(fn)


def _nodes_of(request: Any) -> int:
    marker = request.node.get_closest_marker("meshd_nodes")
    return int(marker.args[0]) if marker is not None and marker.args else 1


def pytest_configure(config: Any) -> None:
    config.addinivalue_line("markers", "meshd_nodes(n): how many nodes meshd_cluster starts")


try:  # the fixture, when pytest is there (`pytest_plugins = ["meshd_sdk.testing"]`)
    import pytest

    @pytest.fixture
    def meshd_cluster(request: Any, tmp_path: Path) -> Iterator[Cluster]:
        """A started cluster (1 node; `@pytest.mark.meshd_nodes(3)` for more), stopped
        after the test."""
        with cluster(_nodes_of(request), root=tmp_path / "meshd") as c:
            yield c
except ImportError:  # pragma: no cover - pytest is a test dependency
    pass
