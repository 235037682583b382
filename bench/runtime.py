"""Runtime (issue 18): `python bench/runtime.py`.

(1) From `runtime.run` of a folder source (the greeter, with a requirements.txt so it has
a virtualenv, already built: "venv cached") to its first successful call, through the
daemon (`rpc.call` polled every 20 ms), over `--rounds` rounds (each a new version: a new
checkout is copied, the venv reused). Side by side, the floor: the same greeter started by
hand (`python main.py` in the checkout) until its first call.
(2) The runtime's cost at rest: the daemon's CPU over `--idle` seconds with 100 specs
running (each one replica of `sleep 600`, so the processes cost nothing), against the same
daemon with none, as a share of one core.
Goals: (1) <= 2 s; (2) <= 1% CPU. Host baseline: trio TCP echo at 32 callers (bench/rpc.py).
Everything runs on 127.0.0.1 in a temp dir and is stopped on the way out.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import rpc as rpcbench  # noqa: E402

from meshd.errors import MeshError  # noqa: E402
from tests.integration.cluster import Cluster, control, wait_for  # noqa: E402

SPECS = 100


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def first_call(a, name: str, t0: float, deadline: float = 30.0) -> float:
    """Seconds from `t0` until `name` answers a call through daemon a."""
    while time.monotonic() - t0 < deadline:
        try:
            control(a.data_dir, "rpc.call", service=name, endpoint="Greeter.Hello",
                    body={"name": "Ada"}, timeout=2)
            return time.monotonic() - t0
        except MeshError:
            time.sleep(0.02)
    raise SystemExit(f"{name} never answered")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--idle", type=float, default=30.0, help="seconds of CPU measured")
    opts = ap.parse_args()
    baseline, load = rpcbench.host_baseline()
    with tempfile.TemporaryDirectory(prefix="meshd-bench-runtime-") as tmp:
        root = Path(tmp)
        app = root / "greeter"
        shutil.copytree(ROOT / "examples" / "greeter", app)
        (app / "requirements.txt").write_text("# the SDK comes from the system site\n")
        c = Cluster(root)
        try:
            a = c.add("a")
            t0 = time.monotonic()
            control(a.data_dir, "runtime.run", name="warm", source=str(app))  # builds venv
            print(f"first run (venv built): {first_call(a, 'greeter', t0, 120):.2f} s")
            control(a.data_dir, "runtime.kill", name="warm")
            wait_for(lambda: not _exists(a, "greeter"), 15, "the first one gone")
            runs, by_hand = [], []
            for i in range(opts.rounds):
                name = f"greeter{i}"
                t0 = time.monotonic()
                control(a.data_dir, "runtime.run", name=name, source=str(app))
                runs.append(first_call(a, "greeter", t0))  # the name its code registers
                rows = control(a.data_dir, "runtime.ps", name=name)["replicas"]
                control(a.data_dir, "runtime.kill", name=name)
                # the floor: the same checkout started by hand
                cwd = next((root / "a" / "runtime" / "checkouts" / "default" / name).iterdir())
                venv = next((root / "a" / "runtime" / "venvs").iterdir()) / "bin" / "python"
                env = {**os.environ, "MESHD_ADDR": str(a.data_dir / "meshd.sock"),
                       "PYTHONPATH": str(ROOT)}
                wait_for(lambda: not _exists(a, "greeter"), 15, f"{name} gone")
                t1 = time.monotonic()
                p = subprocess.Popen([str(venv), "main.py"], cwd=cwd, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                try:
                    by_hand.append(first_call(a, "greeter", t1))
                finally:
                    p.kill()
                    p.wait(5)
                wait_for(lambda: not _exists(a, "greeter"), 15, "the hand-started one gone")
                print(f"round {i + 1}: meshd run -> first call {runs[-1]:.2f} s "
                      f"(state {rows[0]['state'] if rows else '?'}); by hand "
                      f"{by_hand[-1]:.2f} s")
            # (2) the cost at rest
            pid = a.proc.pid
            time.sleep(3)
            c0 = cpu_seconds(pid)
            time.sleep(opts.idle)
            idle_none = (cpu_seconds(pid) - c0) / opts.idle
            for i in range(SPECS):
                control(a.data_dir, "runtime.run", name=f"idle{i:03d}", source="module:json",
                        command=["sleep", "600"])
            wait_for(lambda: sum(r["state"] == "running" for r in control(
                a.data_dir, "runtime.ps")["replicas"]) == SPECS, 120, f"{SPECS} running")
            time.sleep(5)
            c0 = cpu_seconds(pid)
            time.sleep(opts.idle)
            idle_full = (cpu_seconds(pid) - c0) / opts.idle
        finally:
            c.close()
    med, floor = statistics.median(runs), statistics.median(by_hand)
    cost = max(0.0, idle_full - idle_none) * 100
    print(f"\n{'goal':58} {'measured':>10}  holds")
    print(f"{'meshd run -> first call, venv cached <= 2 s (median)':58} {med:>9.2f}s  "
          f"{'yes' if med <= 2 else 'NO'}")
    print(f"{'runtime at rest, 100 specs running <= 1% CPU':58} {cost:>9.2f}%  "
          f"{'yes' if cost <= 1 else 'NO'}")
    print(f"\nby hand (the floor: python start, SDK import, registration): median "
          f"{floor:.2f} s; run / by hand = {med / floor:.2f}")
    print(f"daemon CPU at rest: {idle_none * 100:.2f}% with no specs, {idle_full * 100:.2f}% "
          f"with {SPECS} running; runs {[round(x, 2) for x in runs]}, by hand "
          f"{[round(x, 2) for x in by_hand]}")
    print(rpcbench.baseline_footer(baseline, load))
    return 0 if med <= 2 and cost <= 1 else 1


def _exists(a, name: str) -> bool:
    try:
        return bool(control(a.data_dir, "describe", service=name)["instances"])
    except MeshError:
        return False


if __name__ == "__main__":
    sys.exit(main())
