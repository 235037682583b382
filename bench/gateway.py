"""API gateway (issue 16) against nginx and a Starlette proxy: `python bench/gateway.py`.

`POST /greeter/hello` with `{"name": "Ada"}` (Content-Type: application/json, and
`Authorization: Bearer <admin token>` on every target so the requests are the same bytes),
driven by wrk on loopback (`-t1 -c32` by default, `--latency` for p99), in one run:
  (a) nginx (Debian) `proxy_pass` to the backend: generated config in a temp dir, daemon
      off, worker_processes 1, access log off, upstream keepalive 32 (HTTP/1.1 to the
      backend), keepalive_requests raised so neither side reconnects during a window;
  (b) Starlette + httpx reverse proxy on uvicorn (1 process): one httpx.AsyncClient for
      the app's life (keep-alive pool of 64), forwarding method, path, headers and body;
  backend of (a) and (b): uvicorn (1 process) serving a raw ASGI app that decodes the JSON
      and answers `{"msg":"Hello Ada"}`, as the greeter does;
  gateway, same node: wrk -> daemon A's gateway (--api-listen) -> greeter on A;
  gateway, other node: wrk -> daemon A's gateway -> daemon B -> greeter on B (the greeter
      on A is stopped first and A's registry must list B's instance alone).
References, no proxy: the same backend app loaded directly, on uvicorn and on hypercorn's
trio worker (the HTTP server the gateway runs on, configured as meshd/gateway/server.py
does): the floor of each stack.
uvicorn runs with its defaults (`auto` picks uvloop and httptools when installed, else
asyncio and h11; the run prints which). Both daemons run with MESHD_API_ACCESS_LOG=false
(the access log costs a log record per request); everything else is the default.
Goals: gateway req/s >= 1x (b) and >= 0.25x (a); gateway p99 <= 2x (b)'s; for both cases.

Rules: one target loaded at a time; `--rounds` rounds, the order of the targets rotated each
round so drift hits all alike, each window preceded by a discarded warm-up; the medians over
rounds are reported. Every window must be all 2xx with no socket error (wrk's "Non-2xx or
3xx responses" and "Socket errors" lines), and each target's answer is checked once before
it is loaded, else the bench fails: no target is measured on errors. Host baseline: trio TCP
echo at 32 callers (bench/rpc.py (a)) and the load average. CPU microseconds per request of
each server process (from /proc) are reported too: they move less than rates between runs.
`--profile` adds one window per gateway case under `py-spy record` of the daemons and
prints their top frames. Everything listens on 127.0.0.1 (free ports), lives in a temp dir
and is stopped on the way out, on errors and Ctrl-C too.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import rpc as rpcbench  # noqa: E402  (bench/rpc.py: trio TCP echo baseline, helpers)

from tests.integration.cluster import Cluster, Daemon, ServiceProcess, control  # noqa: E402

PATH = "/greeter/hello"
BODY = '{"name": "Ada"}'
EXPECTED = {"msg": "Hello Ada"}
GREETER = ROOT / "examples" / "greeter" / "main.py"
NGINX = "/usr/sbin/nginx"
WRK = "/usr/bin/wrk"
MESHD_ENV = {"MESHD_API_ACCESS_LOG": "false"}
TARGETS = ("nginx", "starlette", "gateway-same", "gateway-other")
REFS = ("backend", "hypercorn")
LABELS = {"nginx": "(a) nginx proxy_pass", "starlette": "(b) Starlette+httpx/uvicorn",
          "gateway-same": "gateway, same node", "gateway-other": "gateway, other node",
          "backend": "backend app on uvicorn", "hypercorn": "backend app on hypercorn/trio"}
GOAL_RPS_B, GOAL_RPS_A, GOAL_P99_B = 1.0, 0.25, 2.0

BACKEND_APP = '''
"""The trivial HTTP service behind nginx and the Starlette proxy: raw ASGI."""
import json


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    if scope["method"] != "POST" or scope["path"] != "/greeter/hello":
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    name = json.loads(body or b"{}").get("name", "")
    data = json.dumps({"msg": f"Hello {name}"}, separators=(",", ":")).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
'''

PROXY_APP = '''
"""(b): what a Python team would write, a Starlette reverse proxy with one httpx client."""
import os
from contextlib import asynccontextmanager

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

UPSTREAM = os.environ["BENCH_UPSTREAM"]
HOP = {"host", "connection", "keep-alive", "proxy-connection", "te", "trailer",
       "transfer-encoding", "upgrade", "content-length", "date", "server"}


@asynccontextmanager
async def lifespan(app):
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=UPSTREAM, limits=limits, timeout=30) as client:
        app.state.client = client
        yield


async def proxy(request: Request) -> Response:
    headers = {k: v for k, v in request.headers.items() if k not in HOP}
    upstream = await request.app.state.client.request(
        request.method, request.url.path, params=request.query_params, headers=headers,
        content=await request.body())
    out = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP}
    return Response(upstream.content, status_code=upstream.status_code, headers=out)


app = Starlette(routes=[Route("/{path:path}", proxy,
                              methods=["GET", "POST", "PUT", "PATCH", "DELETE"])],
                lifespan=lifespan)
'''

HYPERCORN_APP = '''
"""The backend app on hypercorn's trio worker, configured as meshd/gateway/server.py does."""
import sys

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from bench_backend import app

config = Config()
config.bind = [f"127.0.0.1:{sys.argv[1]}"]
config.accesslog = None
config.errorlog = None
config.include_server_header = False
trio.run(serve, app, config)
'''

NGINX_CONF = """
worker_processes 1;
daemon off;
master_process on;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 1000000;
    upstream backend {{
        server 127.0.0.1:{backend};
        keepalive 32;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""

WRK_SCRIPT = """wrk.method = "POST"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {token}"
"""


# --- processes ---------------------------------------------------------------------------------

def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, what: str) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{what} did not start: {log.read_text()[-2000:]}") \
                    from None
            time.sleep(0.05)


@contextlib.contextmanager
def server(cmd: list[str], port: int, log: Path, what: str,
           env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """A server process listening on `port` once yielded; stopped on the way out."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=out, env={**os.environ, **(env or {})})
        try:
            _wait_port(port, proc, log, what)
            yield proc
        finally:
            _stop(proc)


def uvicorn(app_dir: Path, module: str, port: int, log: Path,
            env: dict[str, str] | None = None) -> contextlib.AbstractContextManager[Any]:
    return server([sys.executable, "-m", "uvicorn", f"{module}:app", "--app-dir", str(app_dir),
                   "--host", "127.0.0.1", "--port", str(port), "--no-access-log",
                   "--log-level", "warning"], port, log, f"uvicorn {module}", env)


def uvicorn_flavour() -> str:
    """What uvicorn's `auto` loop and http pick here."""
    import importlib.metadata as md
    import importlib.util

    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http_ = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return (f"uvicorn {md.version('uvicorn')} ({loop}, {http_}), starlette "
            f"{md.version('starlette')}, httpx {md.version('httpx')}")


def nginx_version() -> str:
    out = subprocess.run([NGINX, "-v"], capture_output=True, text=True, check=False)
    return (out.stderr or out.stdout).strip().removeprefix("nginx version: ")


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def _cpu(pid: int) -> float:
    try:
        return rpcbench._cpu_seconds(pid)
    except (OSError, IndexError):
        return 0.0


# --- requests ----------------------------------------------------------------------------------

def post(port: int, token: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", PATH, BODY, {"Content-Type": "application/json",
                                          "Authorization": f"Bearer {token}"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def check_answer(port: int, token: str, what: str, attempts: int = 100) -> None:
    """One request must get 200 and the greeting (retried while the mesh settles: up to
    `attempts` tries 0.1 s apart), else the bench fails with the last answer."""
    last: Any = None
    for _ in range(attempts):
        try:
            status, data = post(port, token)
            if status == 200 and json.loads(data) == EXPECTED:
                return
            last = (status, data[:500])
        except (OSError, ValueError) as exc:
            last = exc
        time.sleep(0.1)
    raise AssertionError(f"{what}: POST {PATH} did not answer 200 {EXPECTED}; last: {last}")


# --- wrk -----------------------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if m is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> dict[str, Any]:
    """Requests/s, p50/p99 ms, requests, and the error lines of a `wrk --latency` run."""
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    n = re.search(r"^\s+(\d+) requests in", out, re.M)
    if not (rps and p99 and p50 and n):
        raise AssertionError(f"could not read wrk's output:\n{out}")
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                     out)
    return {"rps": float(rps.group(1)), "p99_ms": _ms(p99.group(1)),
            "p50_ms": _ms(p50.group(1)), "requests": int(n.group(1)),
            "non2xx": int(non2xx.group(1)) if non2xx else 0,
            "socket_errors": sum(map(int, sock.groups())) if sock else 0}


def wrk(port: int, script: Path, seconds: float, threads: int, conns: int) -> dict[str, Any]:
    cmd = [WRK, f"-t{threads}", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--latency",
           "-s", str(script), f"http://127.0.0.1:{port}{PATH}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60,
                         check=False)
    if out.returncode != 0:
        raise AssertionError(f"wrk failed ({out.returncode}): {out.stderr}{out.stdout}")
    return parse_wrk(out.stdout) | {"raw": out.stdout}


# --- the meshd side ----------------------------------------------------------------------------

class Mesh:
    """Daemons a (gateway) and b joined; the greeter on exactly one of them at a time."""

    def __init__(self, c: Cluster, api_port: int) -> None:
        self.c = c
        self.a = c.add("a", extra=("--api-listen", f"127.0.0.1:{api_port}"), env=MESHD_ENV)
        self.b = c.add("b", join=[self.a.addr], env=MESHD_ENV)
        self.token = (self.a.data_dir / "admin.token").read_text().strip()
        self.greeter: ServiceProcess | None = None
        self.on: Daemon | None = None

    def place(self, on: Daemon) -> None:
        """The greeter on `on` only, once daemon a's registry lists that one instance."""
        if self.on is on:
            return
        if self.greeter is not None:
            self.greeter.stop()
        self.greeter = self.c.service(on, "greeter", script=GREETER)
        self.on = on

        def placed() -> bool:
            try:
                rows = control(self.a.data_dir, "describe", service="greeter")["instances"]
            except Exception:
                return False
            return [r["node"] for r in rows] == [on.name] and \
                any(e["name"] == "Greeter.Hello" for e in rows[0].get("endpoints", []))

        for _ in range(300):
            if placed():
                return
            self.a.assert_running()
            on.assert_running()
            time.sleep(0.1)
        raise AssertionError(f"the greeter on {on.name} alone never showed at daemon a")


# --- py-spy ------------------------------------------------------------------------------------

@contextlib.contextmanager
def pyspy(pids: dict[str, int], seconds: float, root: Path) -> Iterator[dict[str, Any]]:
    """`py-spy record` (raw collapsed stacks) of each process while the block runs; on the
    way out the result holds each one's top frames."""
    exe = shutil.which("py-spy")
    result: dict[str, Any] = {}
    if exe is None:
        print("py-spy is not installed: no profile")
        yield result
        return
    procs = {}
    for name, pid in pids.items():
        out = root / f"pyspy-{name}.txt"
        with open(root / f"pyspy-{name}.log", "wb") as log:
            procs[name] = (subprocess.Popen(
                [exe, "record", "-p", str(pid), "-d", str(max(1, round(seconds))), "-f", "raw",
                 "-o", str(out), "--nonblocking", "--full-filenames"], stdout=log,
                stderr=log), out)
    try:
        yield result
    finally:
        for name, (proc, out) in procs.items():
            try:
                proc.wait(seconds + 30)
            except subprocess.TimeoutExpired:
                _stop(proc)
            if out.exists():
                result[name] = top_frames(out.read_text())
            else:
                print(f"py-spy of {name} wrote nothing: "
                      f"{(root / f'pyspy-{name}.log').read_text()[-1000:]}")


# frames on every stack (start-up, the event loop): left out of the "on stack" list
_PLUMBING = re.compile(r"\((click/|<frozen runpy>|cli/|trio/_core/_run\.py|asyncio/)")


def top_frames(collapsed: str, n: int = 15) -> dict[str, Any]:
    """Samples, and the top `n` functions by own (leaf) and by total (on the stack, but
    for the start-up and event-loop frames every stack has) share of the samples."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        k = int(count)
        frames = [_short(f) for f in stack.split(";")]
        samples += k
        own[frames[-1]] += k
        for f in set(frames):
            if not _PLUMBING.search(f):
                total[f] += k
    pct = 100 / max(samples, 1)
    return {"samples": samples,
            "own": [(f, round(c * pct, 1)) for f, c in own.most_common(n)],
            "total": [(f, round(c * pct, 1)) for f, c in total.most_common(n)]}


def _short(frame: str) -> str:
    """`func (/long/path/meshd/x.py:12)` -> `func (meshd/x.py:12)`."""
    m = re.fullmatch(r"(.*) \((.*):(\d+)\)", frame.strip())
    if m is None:
        return frame.strip()
    func, path, line = m.groups()
    path = path.replace(str(ROOT) + "/", "")
    path = re.sub(r".*/site-packages/", "", path)
    path = re.sub(r".*/lib/python3\.\d+/", "", path)
    return f"{func} ({path}:{line})"


# --- main --------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per wrk window")
    ap.add_argument("--warmup", type=float, default=2.0,
                    help="seconds of discarded wrk load before each window (0: none)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds over all targets")
    ap.add_argument("--connections", type=int, default=32, help="wrk -c")
    ap.add_argument("--threads", type=int, default=1, help="wrk -t")
    ap.add_argument("--profile", action="store_true",
                    help="then one window per gateway case under py-spy record of the daemons")
    ap.add_argument("--json", action="store_true", help="also print the results as JSON")
    opts = ap.parse_args()
    for exe in (NGINX, WRK):
        if not os.access(exe, os.X_OK):
            raise SystemExit(f"{exe} is needed (Debian: apt-get install nginx wrk)")
    started = time.monotonic()
    out: dict[str, Any] = {"load_before": os.getloadavg()[0], "duration": opts.duration,
                           "rounds": opts.rounds, "connections": opts.connections,
                           "threads": opts.threads, "versions": {
                               "nginx": nginx_version(), "python": uvicorn_flavour()},
                           "meshd_env": MESHD_ENV}

    out["baseline"] = rpcbench.host_baseline()[0]
    print(f"nginx {out['versions']['nginx']}; {out['versions']['python']}; meshd daemons "
          f"with {' '.join(f'{k}={v}' for k, v in MESHD_ENV.items())}")

    with tempfile.TemporaryDirectory(prefix="meshd-bench-gw-") as tmp:
        root = Path(tmp)
        os.chmod(root, 0o711)  # nginx's worker (nobody) may reach its temp paths
        run(root, opts, out)

    out["load_after"] = os.getloadavg()[0]
    out["took_s"] = time.monotonic() - started
    report(out, opts)
    if opts.json:
        print(json.dumps(out, indent=2))
    return 0


def run(root: Path, opts: Any, out: dict[str, Any]) -> None:
    (root / "apps").mkdir()
    (root / "apps" / "bench_backend.py").write_text(BACKEND_APP)
    (root / "apps" / "bench_proxy.py").write_text(PROXY_APP)
    (root / "apps" / "bench_hypercorn.py").write_text(HYPERCORN_APP)
    ngx = root / "nginx"
    ngx.mkdir(mode=0o755)
    ports = {k: rpcbench._free_port() for k in ("backend", "nginx", "starlette", "api",
                                                "hypercorn")}
    (ngx / "nginx.conf").write_text(NGINX_CONF.format(d=ngx, backend=ports["backend"],
                                                      port=ports["nginx"]))
    (root / "meshd").mkdir()
    c = Cluster(root / "meshd")
    with contextlib.ExitStack() as stack:
        stack.callback(c.close)
        backend = stack.enter_context(uvicorn(root / "apps", "bench_backend", ports["backend"],
                                              root / "backend.log"))
        nginx = stack.enter_context(server(
            [NGINX, "-p", str(ngx), "-e", str(ngx / "error.log"), "-c", str(ngx / "nginx.conf")],
            ports["nginx"], ngx / "stderr.log", "nginx"))
        proxy = stack.enter_context(uvicorn(
            root / "apps", "bench_proxy", ports["starlette"], root / "proxy.log",
            {"BENCH_UPSTREAM": f"http://127.0.0.1:{ports['backend']}"}))
        hyper = stack.enter_context(server(
            [sys.executable, str(root / "apps" / "bench_hypercorn.py"), str(ports["hypercorn"])],
            ports["hypercorn"], root / "hypercorn.log", "hypercorn",
            {"PYTHONPATH": os.pathsep.join([str(root / "apps"), *sys.path])}))
        mesh = Mesh(c, ports["api"])
        script = root / "post.lua"
        script.write_text(WRK_SCRIPT.format(body=BODY, token=mesh.token))
        workers = _children(nginx.pid)

        # what each target is: its port, what to set up first, the processes whose CPU counts
        def target(name: str) -> tuple[int, Callable[[], None], dict[str, int]]:
            if name == "nginx":
                return ports["nginx"], lambda: None, {
                    "nginx": nginx.pid, **{f"nginx worker {i}": p for i, p in enumerate(workers)},
                    "backend": backend.pid}
            if name == "starlette":
                return ports["starlette"], lambda: None, {"proxy": proxy.pid,
                                                         "backend": backend.pid}
            if name == "backend":
                return ports["backend"], lambda: None, {"backend": backend.pid}
            if name == "hypercorn":
                return ports["hypercorn"], lambda: None, {"hypercorn": hyper.pid}
            if name == "gateway-same":
                return ports["api"], lambda: mesh.place(mesh.a), {"daemon A": mesh.a.proc.pid}
            return ports["api"], lambda: mesh.place(mesh.b), {"daemon A": mesh.a.proc.pid,
                                                               "daemon B": mesh.b.proc.pid}

        def window(name: str, seconds: float) -> dict[str, Any]:
            port, setup, pids = target(name)
            setup()
            if mesh.greeter is not None and name.startswith("gateway"):
                pids = {**pids, "greeter": mesh.greeter.proc.pid}
            check_answer(port, mesh.token, LABELS[name])
            if opts.warmup > 0:
                _checked(name, wrk(port, script, opts.warmup, opts.threads, opts.connections))
            before = {k: _cpu(p) for k, p in pids.items()}
            w = _checked(name, wrk(port, script, seconds, opts.threads, opts.connections))
            w["cpu_us"] = {k: (_cpu(p) - before[k]) * 1e6 / max(w["requests"], 1)
                           for k, p in pids.items()}
            return w

        every = TARGETS + REFS
        windows: dict[str, list[dict[str, Any]]] = {t: [] for t in every}
        for r in range(opts.rounds):
            order = every[r % len(every):] + every[:r % len(every)]
            for name in order:
                w = window(name, opts.duration)
                windows[name].append(w)
                print(f"round {r + 1}/{opts.rounds} {LABELS[name]:30} {w['rps']:9,.0f} req/s  "
                      f"p99 {w['p99_ms']:7.2f} ms  p50 {w['p50_ms']:6.2f} ms  CPU us/req: "
                      + ", ".join(f"{k} {v:.0f}" for k, v in w["cpu_us"].items()))
        out["windows"] = {t: [{k: v for k, v in w.items() if k != "raw"} for w in ws]
                          for t, ws in windows.items()}
        out["median"] = {t: {"rps": statistics.median(w["rps"] for w in ws),
                             "p99_ms": statistics.median(w["p99_ms"] for w in ws),
                             "p50_ms": statistics.median(w["p50_ms"] for w in ws),
                             "cpu_us": {k: statistics.median(w["cpu_us"][k] for w in ws)
                                        for k in ws[0]["cpu_us"]}}
                         for t, ws in windows.items()}
        errors = c.root / "a.log", c.root / "b.log"
        out["daemon_log_tail"] = {p.name: _errors(p) for p in errors}

        if opts.profile:
            out["profile"] = {}
            for name, d in (("gateway-same", (mesh.a,)), ("gateway-other", (mesh.a, mesh.b))):
                port, setup, _ = target(name)
                setup()
                check_answer(port, mesh.token, LABELS[name])
                with pyspy({f"daemon {x.name.upper()}": x.proc.pid for x in d}, opts.duration,
                           root) as prof:
                    w = _checked(name, wrk(port, script, opts.duration, opts.threads,
                                           opts.connections))
                out["profile"][name] = {"rps": w["rps"], "frames": prof}


def _checked(name: str, w: dict[str, Any]) -> dict[str, Any]:
    if w["non2xx"] or w["socket_errors"]:
        raise AssertionError(f"{LABELS.get(name, name)}: {w['non2xx']} non-2xx responses, "
                             f"{w['socket_errors']} socket errors: not measured on errors\n"
                             f"{w['raw']}")
    return w


def _errors(log: Path) -> list[str]:
    """Warning and error lines of a daemon's stderr (the last 20)."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [x for x in lines if re.search(r"WARNING|ERROR|Traceback|CRITICAL", x)][-20:]


def report(out: dict[str, Any], opts: Any) -> None:
    med = out["median"]
    print(f"\n{opts.rounds} rounds of {opts.duration:g} s, wrk -t{opts.threads} "
          f"-c{opts.connections}; medians over rounds\n")
    print(f"{'target':32}{'req/s':>10}{'p99 ms':>9}{'p50 ms':>9}  CPU us per request")
    for t in TARGETS + REFS:
        if t == REFS[0]:
            print("references, no proxy:")
        m = med[t]
        print(f"{LABELS[t]:32}{m['rps']:10,.0f}{m['p99_ms']:9.2f}{m['p50_ms']:9.2f}  "
              + ", ".join(f"{k} {v:.0f}" for k, v in m["cpu_us"].items()))
    a, b = med["nginx"], med["starlette"]
    goals = []
    print(f"\n{'goal':44}{'measured':>10}  holds")
    for t in ("gateway-same", "gateway-other"):
        g = med[t]
        for what, value, goal, ok in (
                (f"{LABELS[t]}: req/s / (b) >= {GOAL_RPS_B:g}", g["rps"] / b["rps"],
                 GOAL_RPS_B, g["rps"] / b["rps"] >= GOAL_RPS_B),
                (f"{LABELS[t]}: req/s / (a) >= {GOAL_RPS_A:g}", g["rps"] / a["rps"],
                 GOAL_RPS_A, g["rps"] / a["rps"] >= GOAL_RPS_A),
                (f"{LABELS[t]}: p99 / (b) p99 <= {GOAL_P99_B:g}", g["p99_ms"] / b["p99_ms"],
                 GOAL_P99_B, g["p99_ms"] / b["p99_ms"] <= GOAL_P99_B)):
            goals.append({"goal": what, "measured": value, "target": goal, "holds": ok})
            print(f"{what:44}{value:10.2f}  {'yes' if ok else 'NO'}")
    out["goals"] = goals
    per_round = {t: [round(w["rps"]) for w in out["windows"][t]] for t in TARGETS + REFS}
    print("\nreq/s per round: " + "; ".join(f"{LABELS[t]} {v}" for t, v in per_round.items()))
    for name, lines in out["daemon_log_tail"].items():
        if lines:
            print(f"{name}: warnings/errors in the daemon's stderr:\n  " + "\n  ".join(lines))
    for name, p in (out.get("profile") or {}).items():
        print(f"\npy-spy, {LABELS[name]} ({p['rps']:,.0f} req/s during the profile):")
        for proc, f in p["frames"].items():
            print(f"  {proc}: {f['samples']} samples (non-idle)")
            print("    own time:   " + "\n                ".join(
                f"{pct:5.1f}% {fr}" for fr, pct in f["own"][:12]))
            print("    on stack:   " + "\n                ".join(
                f"{pct:5.1f}% {fr}" for fr, pct in f["total"][:15]))
    print("\n" + rpcbench.baseline_footer(out["baseline"], out["load_before"], out["took_s"]))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
