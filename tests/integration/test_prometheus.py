"""Issue 15, exports: three real daemons with `--metrics-listen`, scraped by a real Prometheus
(Debian's `prometheus`, which .ci/run installs), and an RPC error counted in `/metrics`."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from meshd.errors import MeshError
from meshd_sdk import Client

from .cluster import control, wait_for

FAST = {"MESHD_RPC_INSTANCE_TTL": "2", "MESHD_RPC_REGISTRY_SYNC_INTERVAL": "1"}
METRICS = ("--metrics-listen", "127.0.0.1:0")


def prometheus_binary() -> str:
    found = shutil.which("prometheus") or "/usr/bin/prometheus"
    if not Path(found).exists():
        pytest.fail("Debian's prometheus is not installed: `apt-get install prometheus` "
                    "(.ci/run does it); this test needs a real Prometheus")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> tuple[str, bytes]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.headers["Content-Type"], resp.read()


def samples(address: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> (labels, value) from http://ADDRESS/metrics."""
    content_type, body = get(f"http://{address}/metrics")
    assert content_type.startswith("text/plain"), content_type
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def count(address: str, side: str, service: str, endpoint: str, status: str) -> float:
    want = {"service": service, "endpoint": endpoint, "status": status}
    return sum(v for labels, v in samples(address).get(
        f"meshd_rpc_{side}_duration_seconds_count", []) if labels == want)


def call(data_dir: Path, service: str, endpoint: str, body: dict[str, Any]) -> Any:
    async def go() -> Any:
        async with Client(data_dir / "meshd.sock") as client:
            return await client.call(service, endpoint, body)
    return trio.run(go)


def query(port: int, promql: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    answer = json.loads(get(url)[1])
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def start_prometheus(root: Path, targets: list[str]) -> tuple[subprocess.Popen[bytes], int]:
    binary = prometheus_binary()
    root.mkdir()
    config = root / "prometheus.yml"
    config.write_text(json.dumps({  # YAML is a superset of JSON
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                   "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "meshd", "static_configs": [{"targets": targets}]}]}))
    port = free_port()
    proc = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={root / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=open(root / "prometheus.log", "ab"))  # noqa: SIM115
    return proc, port


def test_prometheus_scrapes_three_nodes_and_an_error_is_counted(cluster, tmp_path):
    prometheus_binary()  # fail before starting anything when it is missing
    a = cluster.add("a", env=FAST, extra=METRICS)
    b = cluster.add("b", join=[a.addr], env=FAST, extra=METRICS)
    c = cluster.add("c", join=[a.addr], env=FAST, extra=METRICS)
    nodes = (a, b, c)
    wait_for(lambda: all(sum(m["status"] == "alive" for m in d.members().values()) == 3
                         for d in nodes), 20, "3 alive on every node")
    address = {d.name: control(d.data_dir, "status")["metrics"] for d in nodes}
    assert all(address.values()), address

    # an error raised by a handler on a, called from c, is counted on both sides
    cluster.service(a, "testsvc")
    wait_for(lambda: bool(control(c.data_dir, "describe", service="testsvc")["instances"]),
             15, "testsvc seen from c")
    with pytest.raises(MeshError) as err:
        call(c.data_dir, "testsvc", "Test.Boom", {"text": "bad day"})
    assert err.value.status == 500
    assert call(c.data_dir, "testsvc", "Test.Echo", {"text": "ok"}) == {"text": "ok"}
    assert count(address["a"], "server", "testsvc", "Test.Boom", "500") >= 1
    assert count(address["a"], "server", "testsvc", "Test.Echo", "ok") >= 1
    assert count(address["c"], "client", "testsvc", "Test.Boom", "500") >= 1

    proc, port = start_prometheus(tmp_path / "prometheus", list(address.values()))
    try:
        def three_alive_everywhere() -> bool:
            assert proc.poll() is None, "prometheus exited: " + (
                tmp_path / "prometheus" / "prometheus.log").read_text()[-2000:]
            rows = query(port, 'meshd_members{state="alive"}')
            return (sorted(r["metric"]["instance"] for r in rows) == sorted(address.values())
                    and all(r["value"][1] == "3" for r in rows))

        try:
            wait_for(three_alive_everywhere, 60,
                     'Prometheus to see meshd_members{state="alive"} = 3 on each node')
        except AssertionError as exc:
            targets = get(f"http://127.0.0.1:{port}/api/v1/targets")[1].decode()
            raise AssertionError(f"{exc}; targets: {targets[:2000]}") from None
        rows = query(port, 'meshd_rpc_server_duration_seconds_count{status="500"}')
        assert {r["metric"]["instance"] for r in rows} == {address["a"]}
        # `meshd up` makes a full collection once the node is up: counted on every daemon
        rows = query(port, 'meshd_gc_pause_seconds_count{generation="2"} > 0')
        assert {r["metric"]["instance"] for r in rows} == set(address.values())
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
