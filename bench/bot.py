"""Bot (issue 19): `python bench/bot.py`.

From a signed Slack event (a mention: `services`) reaching `meshd bot slack` to its reply
posted to Slack's Web API, with 100 services registered on the node: the bot, a real
daemon, and a local stand-in for Slack (tests/integration/slackfake.py) on 127.0.0.1,
`--rounds` events one after another. Side by side, the floor: the same `services` op asked
of the daemon directly over its control socket (what the command costs without Slack, Bolt
and the bot). The user is mapped to an admin account, so the reply is the whole table.
Goal: median <= 100 ms. Host baseline: trio TCP echo at 32 callers (bench/rpc.py).
"""

from __future__ import annotations

import argparse
import json
import os
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

from tests.integration.cluster import Cluster, control, wait_for  # noqa: E402
from tests.integration.slackfake import FakeSlack, event, post  # noqa: E402
from tests.integration.test_bot import start_bot  # noqa: E402

SERVICES = 100
MANY = '''
import sys, trio
from meshd_sdk import Service

async def main(n):
    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(Service(f"svc{i:03d}", metadata={"team": "bench"}).run)

trio.run(main, int(sys.argv[1]))
'''


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=50)
    opts = ap.parse_args()
    started = time.monotonic()
    baseline, load = rpcbench.host_baseline()
    slack = FakeSlack()
    with tempfile.TemporaryDirectory(prefix="meshd-bench-bot-") as tmp:
        root = Path(tmp)
        c = Cluster(root)
        bot = many = None
        try:
            a = c.add("a")
            (root / "many.py").write_text(MANY)
            env = {**os.environ, "MESHD_ADDR": str(a.data_dir / "meshd.sock"),
                   "PYTHONPATH": str(ROOT)}
            many = subprocess.Popen([sys.executable, str(root / "many.py"), str(SERVICES)],
                                    env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            wait_for(lambda: len(control(a.data_dir, "services")) >= SERVICES, 60,
                     f"{SERVICES} services")
            control(a.data_dir, "auth.accounts.create", id="ops", secret="ops-secret-1",
                    scopes=["admin"])
            control(a.data_dir, "bot.map", user="U0BENCH", account="ops")
            bot, status = start_bot(a, slack, root, "--listen", "127.0.0.1:0")
            url = status["events"]
            for _ in range(5):  # warm: the map, the account's token, Bolt's threads
                post(url, event("<@UBOTBOT> services", user="U0BENCH"))
                slack.wait_post()
            through_bot, direct = [], []
            for _ in range(opts.rounds):
                t0 = time.perf_counter()
                status_code, _ = post(url, event("<@UBOTBOT> services", user="U0BENCH"))
                reply = slack.wait_post()
                through_bot.append(time.perf_counter() - t0)
                count = int(reply["text"].split(" ", 1)[0])  # "101 services in ..."
                assert status_code == 200 and count > SERVICES, reply  # and meshd-bot
                t0 = time.perf_counter()
                rows = control(a.data_dir, "services")
                direct.append(time.perf_counter() - t0)
                assert len(rows) >= SERVICES
        finally:
            for p in (bot, many):
                if p is not None:
                    p.terminate()
                    p.wait(10)
            c.close()
            slack.close()
    med, p90 = statistics.median(through_bot), sorted(through_bot)[int(len(through_bot) * .9)]
    floor = statistics.median(direct)
    print(f"\n{'goal':58} {'measured':>10}  holds")
    print(f"{'event -> reply posted, services with 100 registered <= 100 ms':58} "
          f"{med * 1000:>8.1f}ms  {'yes' if med <= 0.1 else 'NO'}")
    print(f"\nthrough the bot: median {med * 1000:.1f} ms, p90 {p90 * 1000:.1f} ms, max "
          f"{max(through_bot) * 1000:.1f} ms over {len(through_bot)} events")
    print(f"the floor, the services op over the control socket (a new connection each): "
          f"median {floor * 1000:.1f} ms; bot / floor = {med / floor:.1f}")
    print(json.dumps({"bot_ms": round(med * 1000, 1), "floor_ms": round(floor * 1000, 1)}))
    print(rpcbench.baseline_footer(baseline, load, time.monotonic() - started))
    return 0 if med <= 0.1 else 1


if __name__ == "__main__":
    sys.exit(main())
