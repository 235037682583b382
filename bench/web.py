"""Web dashboard (issue 17): `python bench/web.py`.

A mesh of 20 real daemons (profile lan, on 127.0.0.1) with 100 services registered (a load
script: 20 processes, each running 5 SDK services with two typed endpoints and tags, one
instance per service, spread over the nodes), the dashboard on node 1. Playwright drives
Debian's chromium (headless, its executable path) and measures, with the browser's own
timing API (Navigation and Resource Timing, and the page's `meshd:ready:services` mark, set
once the page shows its first answer):
- services page, cold: from navigation start to the mark with 100 rows shown (the page
  is usable: the filter works on the rows); bytes transferred for it (navigation, assets,
  API answers: `transferSize`, what went over the wire, gzip included); the same warm
  (assets cached: a reload);
- live updates: a service registered on the dashboard's node, and one on another node,
  until its row is on the services page (from the moment its registration returned); a
  daemon joining until its row is on the nodes page (from the moment `meshd up` said it
  was up); a daemon killed (-9) until its row says dead is reported too, but that is
  failure detection (profile lan, as the daemons run here: suspicion timeouts), not the page.
Targets: services page interactive < 500 ms and < 1 MB; live updates within 1 s.
`--rounds` rounds (medians reported). Host baseline: trio TCP echo at 32 callers
(bench/rpc.py (a)) and the load average. Everything lives in a temp dir and is stopped on
the way out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import rpc as rpcbench  # noqa: E402

from tests.integration.cluster import Cluster, control, wait_for  # noqa: E402
from tests.integration.test_tunnel import free_port  # noqa: E402

NODES = 20
SERVICES = 100
PER_PROCESS = 5
FAST = {"MESHD_RPC_REGISTRY_SYNC_INTERVAL": "1", "MESHD_STORE_SYNC_INTERVAL": "1"}

LOADER = '''
import sys, time, trio
from dataclasses import dataclass
from meshd_sdk import Service

@dataclass
class Order:
    id: str
    quantity: int
    note: str | None = None

@dataclass
class Receipt:
    id: str
    accepted: bool

def make(name, sock, i):
    svc = Service(name, version=f"1.{i % 3}.0", addr=sock,
                  metadata={"team": f"team-{i % 4}", "tier": "web" if i % 2 else "core"})
    @svc.handler(f"{name.title()}.Place")
    async def place(req: Order) -> Receipt:
        return Receipt(id=req.id, accepted=True)
    @svc.handler(f"{name.title()}.Cancel")
    async def cancel(req: Order) -> Receipt:
        return Receipt(id=req.id, accepted=False)
    return svc

async def main():
    args = sys.argv[1:]
    async with trio.open_nursery() as n:
        svcs = []
        for k in range(0, len(args), 3):
            name, sock, i = args[k], args[k + 1], int(args[k + 2])
            svc = make(name, sock, i)
            svcs.append(svc)
            n.start_soon(svc.run)
        for svc in svcs:
            await svc.registered.wait()
        print("registered", time.time(), flush=True)

trio.run(main)
'''


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    raise SystemExit("chromium is needed (Debian: apt-get install chromium)")


class Mesh:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.c = Cluster(root)
        self.port = free_port()
        self.loaders: list[subprocess.Popen[str]] = []
        (root / "loader.py").write_text(LOADER)

    def start(self, nodes: int) -> None:
        env = {**FAST, "MESHD_WEB_LISTEN": f"127.0.0.1:{self.port}"}
        self.a = self.c.add("n01", env=env, profile="lan")
        for i in range(2, nodes + 1):
            self.c.add(f"n{i:02d}", join=[self.a.addr], env=FAST, profile="lan")
        wait_for(lambda: sum(m["status"] == "alive" for m in control(
            self.a.data_dir, "members")) == nodes, 60, f"{nodes} alive")

    def register(self, names: list[tuple[str, Any, int]]) -> float:
        """Run a loader with (name, daemon, index) services; the time their registrations
        returned."""
        args = [x for name, d, i in names for x in (name, str(d.data_dir / "meshd.sock"),
                                                     str(i))]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("MESHD_NAMESPACE", None)
        proc = subprocess.Popen([sys.executable, str(self.root / "loader.py"), *args],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                env=env)
        self.loaders.append(proc)
        line = proc.stdout.readline() if proc.stdout else ""
        if not line.startswith("registered"):
            raise SystemExit(f"a loader did not register its services: {line!r}")
        return float(line.split()[1])

    def close(self) -> None:
        for p in self.loaders:
            p.kill()
            p.wait(5)
        self.c.close()


def measure_page(page: Any, url: str, name: str) -> dict[str, Any]:
    """Load #/name fresh; the browser's timings of it."""
    page.goto("about:blank")
    page.goto(f"{url}/#/{name}")
    deadline = time.monotonic() + 30
    while not page.evaluate("(n) => performance.getEntriesByName('meshd:ready:' + n).length",
                            name):  # (the page's CSP refuses wait_for_function's eval)
        if time.monotonic() > deadline:
            raise SystemExit(f"the {name} page never became ready")
        time.sleep(0.02)
    return page.evaluate("""(name) => {
        const nav = performance.getEntriesByType('navigation')[0];
        const ready = performance.getEntriesByName('meshd:ready:' + name)[0].startTime;
        const res = performance.getEntriesByType('resource');
        const bytes = nav.transferSize + res.reduce((n, r) => n + (r.transferSize || 0), 0);
        return {ready_ms: ready, bytes, requests: res.length + 1,
                dom_ms: nav.domContentLoadedEventEnd, rows:
                document.querySelectorAll('tr[data-service]').length};
    }""", name)


def run_round(mesh: Mesh, browser: Any, token: str, rnd: int) -> dict[str, Any]:
    url = f"http://127.0.0.1:{mesh.port}"
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    # log in (the token pasted) once: sessionStorage keeps it for the loads below
    page.goto(f"{url}/#/login")
    page.fill("#login-token", token)
    page.click("text=Use token")
    page.wait_for_selector("tr[data-node]")
    out: dict[str, Any] = {}
    expected = SERVICES + rnd * 2
    wait_for(lambda: len(control(mesh.a.data_dir, "services")) == expected, 60,
             f"{expected} services at the dashboard's node")
    cold = measure_page(page, url, "services")  # same origin: the assets revalidate (304)
    if cold["rows"] != expected:
        print(f"  (the services page showed {cold['rows']} rows of {expected})")
    out["services_ready_ms"] = cold["ready_ms"]
    out["services_bytes"] = cold["bytes"]
    out["services_requests"] = cold["requests"]
    warm = measure_page(page, url, "services")
    out["services_warm_ms"] = warm["ready_ms"]
    # a brand-new browser context: nothing cached at all
    fresh_ctx = browser.new_context()
    fresh = fresh_ctx.new_page()
    fresh.goto(f"{url}/#/login")
    fresh.evaluate("(t) => sessionStorage.setItem('meshd.token', t)", token)
    first = measure_page(fresh, url, "services")
    out["services_first_ms"] = first["ready_ms"]
    out["services_first_bytes"] = first["bytes"]
    fresh_ctx.close()
    # live updates on the services page: a service on the dashboard's node, one on another
    page.goto(f"{url}/#/services")
    page.wait_for_selector("tr[data-service]")
    for key, node in (("live_service_local_ms", mesh.a), ("live_service_other_ms",
                                                          mesh.c.daemons["n07"])):
        name = f"late{rnd}{'l' if node is mesh.a else 'o'}"
        t0 = mesh.register([(name, node, 0)])
        page.wait_for_selector(f"tr[data-service='{name}']", timeout=30_000)
        out[key] = (time.time() - t0) * 1000
    # a node joining, then killed
    page.goto(f"{url}/#/nodes")
    page.wait_for_selector("tr[data-node]")
    name = f"j{rnd}"
    d = mesh.c.add(name, join=[mesh.a.addr], env=FAST, profile="lan")
    t0 = time.time()
    page.wait_for_selector(f"tr[data-node='{name}']", timeout=30_000)
    out["live_node_join_ms"] = (time.time() - t0) * 1000
    page.wait_for_selector(f"tr[data-node='{name}'][data-status=alive]", timeout=30_000)
    d.kill9()
    t0 = time.time()
    page.wait_for_selector(f"tr[data-node='{name}'][data-status=dead]", timeout=60_000)
    out["node_dead_ms"] = (time.time() - t0) * 1000
    out["console_errors"] = errors
    context.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--nodes", type=int, default=NODES)
    ap.add_argument("--json", action="store_true")
    opts = ap.parse_args()
    from playwright.sync_api import sync_playwright

    started = time.monotonic()
    baseline, load_before = rpcbench.host_baseline()
    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="meshd-bench-web-") as tmp:
        mesh = Mesh(Path(tmp))
        try:
            t0 = time.monotonic()
            mesh.start(opts.nodes)
            daemons = list(mesh.c.daemons.values())
            names = [(f"svc{i:03d}", daemons[i % len(daemons)], i) for i in range(SERVICES)]
            for k in range(0, SERVICES, PER_PROCESS):
                mesh.register(names[k:k + PER_PROCESS])
            wait_for(lambda: len(control(mesh.a.data_dir, "services")) == SERVICES, 60,
                     f"{SERVICES} services seen from the dashboard's node")
            print(f"{opts.nodes} daemons and {SERVICES} services up in "
                  f"{time.monotonic() - t0:.1f} s")
            token = (mesh.a.data_dir / "admin.token").read_text().strip()
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=chromium(), headless=True,
                                            args=["--no-sandbox", "--disable-dev-shm-usage"])
                try:
                    for rnd in range(opts.rounds):
                        r = run_round(mesh, browser, token, rnd)
                        rounds.append(r)
                        print(f"round {rnd + 1}/{opts.rounds}: " + ", ".join(
                            f"{k} {v:,.0f}" for k, v in r.items() if isinstance(v, float | int)))
                        if r["console_errors"]:
                            print("  console errors:", r["console_errors"])
                finally:
                    browser.close()
        finally:
            mesh.close()
    keys = [k for k in rounds[0] if isinstance(rounds[0][k], float | int)]
    med = {k: statistics.median(r[k] for r in rounds) for k in keys}
    goals = [("services page interactive (cold, assets revalidated) < 500 ms",
              med["services_ready_ms"], 500),
             ("services page interactive (first visit, nothing cached) < 500 ms",
              med["services_first_ms"], 500),
             ("services page transfer (first visit) < 1 MB", med["services_first_bytes"],
              1_000_000),
             ("live update: service on the dashboard's node < 1 s",
              med["live_service_local_ms"], 1000),
             ("live update: service on another node < 1 s", med["live_service_other_ms"],
              1000),
             ("live update: node joined < 1 s", med["live_node_join_ms"], 1000)]
    print(f"\n{'goal':66} {'median':>10} {'/ goal':>7}  holds")
    for what, value, limit in goals:
        print(f"{what:66} {value:>10,.0f} {value / limit:>7.2f}  "
              f"{'yes' if value < limit else 'NO'}")
    print(f"(node killed -9 until shown dead: {med['node_dead_ms']:,.0f} ms, failure "
          "detection of profile lan, not the page)")
    print(f"\nper round: {json.dumps({k: [round(r[k]) for r in rounds] for k in keys})}")
    print(rpcbench.baseline_footer(baseline, load_before, time.monotonic() - started))
    if opts.json:
        print(json.dumps({"baseline": baseline, "rounds": rounds, "median": med}))
    return 0 if all(v < lim for _, v, lim in goals) else 1


if __name__ == "__main__":
    sys.exit(main())
