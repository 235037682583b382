"""Auth costs: `python bench/auth.py`.

1. Token verifications per second on one core (a cached, valid token, as a busy node sees
   the same caller's token again and again; and uncached), against raw ed25519 verify from
   `cryptography` in the same run. Goal: cached >= 0.8x raw.
2. The latency auth adds to an RPC call between two daemons: p50 of calls that present a
   token (verified at the callee) against calls that do not (node identity, rules only).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import trio  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from meshd.auth.tokens import Verifier, issue, make_claims, new_signing_key  # noqa: E402
from tests.integration.cluster import Cluster, control, wait_for  # noqa: E402

N = 20_000


def verify_rates() -> tuple[float, float, float]:
    kid, priv, pub = new_signing_key()
    claims = make_claims("ada", ["dev"], "n1", "c1", 3600)
    token = issue(kid, priv, claims)
    v = Verifier("c1", lambda: {kid: pub}, lambda jti: False)
    t0 = time.perf_counter()
    for _ in range(N):
        v.verify(token)
    cached = N / (time.perf_counter() - t0)
    tokens = [issue(kid, priv, make_claims("ada", ["dev"], "n1", "c1", 3600))
              for _ in range(2000)]
    v2 = Verifier("c1", lambda: {kid: pub}, lambda jti: False)
    t0 = time.perf_counter()
    for t in tokens:
        v2.verify(t)
    uncached = len(tokens) / (time.perf_counter() - t0)
    key = Ed25519PrivateKey.generate()
    msg = b"x" * 200
    sig = key.sign(msg)
    pk = key.public_key()
    t0 = time.perf_counter()
    for _ in range(N):
        pk.verify(sig, msg)
    raw = N / (time.perf_counter() - t0)
    return cached, uncached, raw


SERVICE = '''
import trio
from typing import Any
from meshd_sdk import Service
service = Service("authecho")

@service.handler("Echo.Call")
async def echo(req: dict[str, Any]) -> dict[str, Any]:
    return req

trio.run(service.run)
'''


def rpc_latency(calls: int = 2000) -> tuple[float, float]:
    from meshd_sdk import Client

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        script = root / "svc.py"
        script.write_text(SERVICE)
        c = Cluster(root)
        try:
            a = c.add("a")
            b = c.add("b", join=[a.addr])
            c.service(b, "authecho", script=script)

            def ready() -> bool:
                try:
                    return len(control(a.data_dir, "describe",
                                       service="authecho")["instances"]) == 1
                except Exception:
                    return False

            wait_for(ready, 20, "service")
            control(a.data_dir, "auth.accounts.create", id="bench", secret="bench-secret",
                    scopes=["admin"])
            token = control(a.data_dir, "auth.token.create", account="bench",
                            ttl=600)["token"]
            wait_for(lambda: any(x["id"] == "bench" for x in control(
                b.data_dir, "auth.accounts.list")), 10, "account on b")

            async def measure(tok: str | None) -> float:
                lat = []
                async with Client(a.data_dir / "meshd.sock", token=tok) as client:
                    for _ in range(100):
                        await client.call("authecho", "Echo.Call", {"x": 1})
                    for _ in range(calls):
                        t0 = time.perf_counter()
                        await client.call("authecho", "Echo.Call", {"x": 1})
                        lat.append(time.perf_counter() - t0)
                return statistics.median(lat) * 1000

            without = trio.run(measure, None)
            with_token = trio.run(measure, token)
            # revocation: revoke on a, poll b until the token is refused there
            control(a.data_dir, "auth.token.revoke", token=token)
            t0 = time.monotonic()

            async def refused_on_b() -> bool:
                async with Client(b.data_dir / "meshd.sock", token=token) as client:
                    try:
                        await client.call("authecho", "Echo.Call", {"x": 1})
                        return False
                    except Exception:
                        return True

            while not trio.run(refused_on_b) and time.monotonic() - t0 < 30:
                time.sleep(0.01)
            print(f"revoked on node a, refused on node b after {time.monotonic() - t0:.3f} s")
            return without, with_token
        finally:
            c.close()


def main() -> int:
    cached, uncached, raw = verify_rates()
    print(f"token verifications/s on one core: cached {cached:,.0f}, uncached {uncached:,.0f};"
          f" raw ed25519 verify {raw:,.0f}")
    print(f"cached / raw: {cached / raw:.1f}x (goal >= 0.8x); uncached / raw: "
          f"{uncached / raw:.2f}x", flush=True)
    without, with_token = rpc_latency()
    print(f"RPC p50 between two daemons: without a token {without:.3f} ms, with a token "
          f"{with_token:.3f} ms (auth adds {with_token - without:+.3f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
