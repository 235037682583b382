"""Real PostgreSQL, Redis and NATS servers for tests (Debian's packages), each on a free
loopback port in a temporary dir, stopped and removed after: what the store engines and
durable topics on NATS JetStream (issue 21) are tested against.

Rules:
- PostgreSQL refuses to run as root: as root, its data dir is given to the `postgres` user
  and initdb/pg_ctl run as that user (runuser). Authentication is `trust` on 127.0.0.1 only.
- Redis runs without persistence (--save '' --appendonly no) on 127.0.0.1 only.
- nats-server runs with JetStream (-js) and its store dir in the temporary dir, on
  127.0.0.1 only, with a user and password when asked; `stop()` and `start()` bring it
  back on the same port with the same store (a server that went away and came back).
- Every start is bounded (START_TIMEOUT); a server that does not come up fails with the end
  of its log; leaving the block stops the server even if the test failed.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .cluster import free_port, stop

START_TIMEOUT = 30.0


def postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def why_no_postgres() -> str | None:
    return None if postgres_bin() else "PostgreSQL is not installed (apt-get install postgresql)"


def nats_bin() -> str | None:
    return shutil.which("nats-server") or shutil.which("nats-server", path="/usr/sbin:/sbin")


def why_no_nats() -> str | None:
    return None if nats_bin() else "nats-server is not installed (apt-get install nats-server)"


def why_no_redis() -> str | None:
    return None if shutil.which("redis-server") else \
        "Redis is not installed (apt-get install redis-server)"


def _as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.getuid() == 0 else cmd


def _wait_port(port: int, proc_alive: object, log: Path, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        if callable(proc_alive) and not proc_alive():
            break
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"
    raise AssertionError(f"{what} did not start on port {port}: {tail}")


@dataclass
class EngineServer:
    """A running engine: `url` to reach it; `stop()` and `start()` take it down and bring it
    back on the same port with its data (as an operator restarting it would)."""

    url: str
    stop: Callable[[], None]
    start: Callable[[], None]

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1].split("/")[0])


@contextlib.contextmanager
def postgres(root: Path) -> Iterator[EngineServer]:
    """A running PostgreSQL (database postgres, user postgres)."""
    bindir = postgres_bin()
    assert bindir is not None, why_no_postgres()
    root.mkdir(parents=True, exist_ok=True)
    # its own dir under /tmp: pytest's are root's alone, and the server runs as postgres
    home = Path(tempfile.mkdtemp(prefix="meshd-pg-"))
    data, log = home / "pgdata", root / "postgres.log"
    if os.getuid() == 0:
        shutil.chown(home, "postgres", "postgres")
        log = home / "postgres.log"
    subprocess.run(_as_postgres([str(bindir / "initdb"), "-D", str(data), "-U", "postgres",
                                 "--auth=trust", "-E", "UTF8", "--no-sync"]),
                   check=True, capture_output=True, timeout=120)
    port = free_port()
    opts = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={home} " \
           "-c fsync=off"

    def start() -> None:
        subprocess.run(_as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log),
                                     "-o", opts, "-w", "-t", str(int(START_TIMEOUT)),
                                     "start"]),
                       check=True, capture_output=True, timeout=START_TIMEOUT + 10)
        _wait_port(port, None, log, "PostgreSQL")

    def halt() -> None:
        subprocess.run(_as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate",
                                     "-w", "stop"]), capture_output=True, timeout=60)

    try:
        start()
        yield EngineServer(f"postgresql://postgres@127.0.0.1:{port}/postgres", halt, start)
    finally:
        halt()
        shutil.rmtree(home, ignore_errors=True)


@contextlib.contextmanager
def redis(root: Path, tls: tuple[Path, Path, Path] | None = None) -> Iterator[EngineServer]:
    """A running Redis (its data lives as long as the process: no persistence); with `tls`
    = (certificate, key, CA) it speaks only TLS and the URL is rediss:// trusting that CA."""
    root.mkdir(parents=True, exist_ok=True)
    port, log = free_port(), root / "redis.log"
    procs: list[subprocess.Popen[bytes]] = []
    listen = ["--port", str(port)]
    url = f"redis://127.0.0.1:{port}/0"
    if tls is not None:
        cert, key, ca = tls
        listen = ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert),
                  "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca),
                  "--tls-auth-clients", "no"]
        url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca}"

    def start() -> None:
        with open(log, "ab") as out:
            proc = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", *listen,
                                     "--dir", str(root), "--save", "",
                                     "--appendonly", "no", "--protected-mode", "yes"],
                                    stdout=out, stderr=out)
        procs.append(proc)
        _wait_port(port, lambda: proc.poll() is None, log, "Redis")

    def halt() -> None:
        for proc in procs:
            stop(proc)

    try:
        start()
        yield EngineServer(url, halt, start)
    finally:
        halt()



@contextlib.contextmanager
def nats(root: Path, user: str | None = None, password: str | None = None
         ) -> Iterator[EngineServer]:
    """A running nats-server with JetStream (file store in a temporary dir); its URL holds
    the user and password when given (then the server requires them)."""
    binary = nats_bin()
    assert binary is not None, why_no_nats()
    root.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="meshd-nats-", dir=root))
    port, log = free_port(), home / "nats.log"
    auth = ["--user", user, "--pass", password] if user and password else []
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> None:
        with open(log, "ab") as out:
            proc = subprocess.Popen([binary, "-js", "-sd", str(home / "jetstream"),
                                     "-a", "127.0.0.1", "-p", str(port), *auth],
                                    stdout=out, stderr=out)
        procs.append(proc)
        _wait_port(port, lambda: proc.poll() is None, log, "nats-server")

    def halt() -> None:
        for proc in procs:
            if proc.poll() is None:
                stop(proc)

    creds = f"{user}:{password}@" if user and password else ""
    try:
        start()
        yield EngineServer(f"nats://{creds}127.0.0.1:{port}", halt, start)
    finally:
        halt()
        shutil.rmtree(home, ignore_errors=True)
