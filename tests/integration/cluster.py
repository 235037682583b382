"""Real `meshd up` processes on 127.0.0.1 for integration tests; always cleaned up."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from meshd.control import ControlClient
from meshd.errors import MeshError
from meshd.secure.keyring import format_secret, new_secret


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


def control(data_dir: Path, op: str, /, **args: Any) -> Any:
    async def go() -> Any:
        client = ControlClient(data_dir / "meshd.sock")
        try:
            return await client.call(op, **args)
        finally:
            await client.aclose()

    return trio.run(go)


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> float:
    start = time.monotonic()
    last: Exception | None = None
    while time.monotonic() - start < timeout:
        try:
            if check():
                return time.monotonic() - start
        except (MeshError, OSError, KeyError) as exc:
            last = exc
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last error: {last})")


class Daemon:
    def __init__(self, root: Path, name: str, secret: str, profile: str = "local",
                 extra: tuple[str, ...] = (), prefix: list[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.prefix = prefix or []
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

    def start(self, join: list[str] | None = None, wait: bool = True,
              bind: str = "127.0.0.1:0", env: dict[str, str] | None = None) -> Daemon:
        cmd = [*self.prefix, sys.executable, "-m", "cli", "up", "--name", self.name, "--bind", bind,
               "--profile", self.profile, "--data-dir", str(self.data_dir), "--json",
               *self.extra]
        for peer in join or []:
            cmd += ["--join", peer]
        full_env = {**os.environ, "MESHD_SECRET": self.secret, **self.env, **(env or {})}
        full_env.pop("MESHD_ADDR", None)
        full_env["PYTHONPATH"] = os.pathsep.join(sys.path)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                     stderr=open(self.log, "ab"), env=full_env)  # noqa: SIM115
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 15.0) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        line = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if line or self.proc.poll() is not None:
                break
        if not line:
            raise AssertionError(f"{self.name} did not start: {self.log.read_text()[-2000:]}")
        status = json.loads(line)
        self.addr = status["address"]
        return status

    def members(self) -> dict[str, dict[str, Any]]:
        return {m["name"]: m for m in control(self.data_dir, "members")}

    def status_of(self, name: str) -> str | None:
        m = self.members().get(name)
        return None if m is None else m["status"]

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)

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
            self.proc.wait(5)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()


class Cluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.secret = format_secret(new_secret())
        self.daemons: dict[str, Daemon] = {}
        self.services: list[Any] = []

    def service(self, daemon: Daemon, name: str = "testsvc", **kw: Any) -> Any:
        svc = ServiceProcess(daemon, name, **kw)
        self.services.append(svc)
        return svc

    def add(self, name: str, join: list[str] | None = None, **kw: Any) -> Daemon:
        d = Daemon(self.root, name, kw.pop("secret", self.secret), **kw)
        self.daemons[name] = d
        d.start(join=join)
        return d

    def close(self) -> None:
        for svc in self.services:
            svc.stop()
        for d in self.daemons.values():
            d.stop()


SERVICES = Path(__file__).parent / "services"


class ServiceProcess:
    """A test service process attached to one daemon."""

    def __init__(self, daemon: Daemon, name: str = "testsvc",
                 script: Path = SERVICES / "testsvc.py") -> None:
        env = {**os.environ, "MESHD_ADDR": str(daemon.data_dir / "meshd.sock"),
               "MESHD_NODE_NAME": daemon.name, "PYTHONPATH": os.pathsep.join(sys.path)}
        self.log = daemon.root / f"{daemon.name}-{name}-{time.monotonic_ns()}.log"
        self.proc = subprocess.Popen([sys.executable, str(script), name], env=env,
                                     stdout=subprocess.DEVNULL,
                                     stderr=open(self.log, "ab"))  # noqa: SIM115

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
