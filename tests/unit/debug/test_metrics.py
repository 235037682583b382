"""meshd/debug/metrics.py: the Prometheus exporter, read from a fake node and served on
loopback."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from meshd.debug import metrics
from meshd.debug.gcpauses import GcPauses
from meshd.debug.metrics import SAMPLE, STATS, MetricsExporter
from meshd.debug.stats import BUCKETS, MAX_SERIES, OTHER, CallStats
from meshd.tlsconf import server_context


class FakeNode:
    def __init__(self) -> None:
        self.node = "a"
        self.calls = CallStats()
        self.gc = GcPauses()
        self.stats: dict[str, int] = {}
        self.members: dict[str, int] = {"alive": 3}
        self.score = 0
        self.sample: dict[str, Any] = {}
        self.fail = False

    def node_stats(self) -> dict[str, int]:
        if self.fail:
            raise RuntimeError("broken component")
        return dict(self.stats)

    def members_by_state(self) -> dict[str, int]:
        return dict(self.members)

    def health_score(self) -> int:
        return self.score

    def latest_sample(self) -> dict[str, Any]:
        return dict(self.sample)


def scrape(src: FakeNode) -> dict[str, Any]:
    """name -> family, parsed back from the text format."""
    text = MetricsExporter(src).render().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def values(family: Any, suffix: str = "") -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value for s in family.samples
            if s.name == family.name + suffix}


def test_gc_pauses_are_a_histogram_by_generation():
    import gc

    src = FakeNode()
    with src.gc.watching():
        gc.collect(2)
        gc.collect(2)
        gc.collect(1)
    gc.collect(2)  # not watched any more: not counted
    fam = scrape(src)["meshd_gc_pause_seconds"]
    assert fam.type == "histogram"
    counts = {s.labels["generation"]: s.value for s in fam.samples
              if s.name == "meshd_gc_pause_seconds_count"}
    assert counts == {"0": src.gc.series[0].count, "1": 1, "2": 2}
    total = {s.labels["generation"]: s.value for s in fam.samples
             if s.name == "meshd_gc_pause_seconds_sum"}
    assert total["2"] == pytest.approx(src.gc.series[2].total) and total["2"] > 0
    inf = {s.labels["generation"]: s.value for s in fam.samples
           if s.name == "meshd_gc_pause_seconds_bucket" and s.labels["le"] == "+Inf"}
    assert inf == counts


def test_gc_pauses_count_a_stop_only_after_its_start_and_hook_once():
    import gc

    pauses = GcPauses()
    pauses._callback("stop", {"generation": 2, "collected": 0})  # hooked mid-collection
    assert pauses.series[2].count == 0
    with pauses.watching(), pauses.watching():  # nested: one hook, each pause once
        assert gc.callbacks.count(pauses._callback) == 1
        gc.collect(2)
    assert pauses.series[2].count == 1 and pauses._callback not in gc.callbacks
    assert 0 < pauses.series[2].total < 60


def test_gc_pause_snapshot_is_taken_again_if_a_pause_lands_while_copying():
    pauses = GcPauses()
    pauses.series[2].observe(0.001)
    real = pauses.series[2]
    reads = {"n": 0}

    class Moving:  # a pause counted once the copy has its count, before it has its sum
        def __getattr__(self, name: str):
            if name == "total":
                reads["n"] += 1
                if reads["n"] == 1:
                    real.observe(0.002)
            return getattr(real, name)

    pauses.series[2] = Moving()  # type: ignore[assignment]
    snap = pauses.snapshot()
    assert snap[2].count == 2 and sum(snap[2].buckets) == 2
    assert snap[2].total == pytest.approx(0.003) and reads["n"] == 2


def test_rpc_histograms_are_cumulative_and_match_the_observations():
    src = FakeNode()
    took = [0.0001, 0.003, 0.003, 0.04, 0.7, 30.0]
    for t in took:
        src.calls.observe("server", "greeter", "Greeter.Hello", 0, t)
    src.calls.observe("server", "greeter", "Greeter.Hello", 500, 0.2)
    src.calls.observe("client", "greeter", "Greeter.Hello", 404, 0.001)
    fams = scrape(src)
    server = fams["meshd_rpc_server_duration_seconds"]
    assert server.type == "histogram"
    ok = {"service": "greeter", "endpoint": "Greeter.Hello", "status": "ok"}
    buckets = {float(s.labels["le"]): s.value for s in server.samples
               if s.name.endswith("_bucket") and s.labels["status"] == "ok"}
    assert sorted(buckets) == [*BUCKETS, float("inf")]
    for bound, n in buckets.items():
        assert n == sum(1 for t in took if t <= bound), bound
    assert values(server, "_count")[tuple(sorted(ok.items()))] == len(took)
    assert values(server, "_sum")[tuple(sorted(ok.items()))] == pytest.approx(sum(took))
    errors = {**ok, "status": "500"}
    assert values(server, "_count")[tuple(sorted(errors.items()))] == 1
    client = fams["meshd_rpc_client_duration_seconds"]
    assert {s.labels["status"] for s in client.samples} == {"404"}
    assert values(client, "_count") == {
        tuple(sorted({**ok, "status": "404"}.items())): 1}


def test_calls_beyond_max_series_are_one_other_series():
    src = FakeNode()
    for i in range(MAX_SERIES + 50):  # a caller naming endpoints that do not exist
        src.calls.observe("server", "svc", f"Nope{i}", 404, 0.001)
    counts = values(scrape(src)["meshd_rpc_server_duration_seconds"], "_count")
    assert len(counts) == MAX_SERIES + 1
    other = (("endpoint", OTHER), ("service", OTHER), ("status", "404"))
    assert counts[other] == 50


def test_members_by_state_always_has_the_four_states():
    src = FakeNode()
    src.members = {"alive": 3, "suspect": 1}
    src.score = 2
    fams = scrape(src)
    assert fams["meshd_members"].type == "gauge"
    assert values(fams["meshd_members"]) == {
        (("state", "alive"),): 3, (("state", "suspect"),): 1, (("state", "dead"),): 0,
        (("state", "left"),): 0}
    assert values(fams["meshd_health_score"]) == {(): 2}


def test_node_counters_through_the_table_only():
    src = FakeNode()
    src.stats = {"udp_in": 7, "udp_out": 9, "udp_dropped_replay": 2, "broker_commit_us": 2500,
                 "member_watchers": 4, "link_tcp_refused_cap": 1, "no_such_counter": 5}
    fams = scrape(src)
    udp = fams["meshd_udp_datagrams"]
    assert udp.type == "counter"
    assert {s.name for s in udp.samples} == {"meshd_udp_datagrams_total"}
    assert values(udp, "_total") == {(("direction", "in"),): 7, (("direction", "out"),): 9}
    assert values(fams["meshd_udp_datagrams_dropped"], "_total") == {
        (("reason", "replay"),): 2}
    assert values(fams["meshd_broker_commit_seconds"], "_total") == {(): 0.0025}
    assert fams["meshd_membership_watchers"].type == "gauge"
    assert values(fams["meshd_listener_refused"], "_total") == {
        (("listener", "link_tcp"), ("reason", "cap")): 1}
    # a key outside the table is not exported; a key the node does not report is absent
    text = MetricsExporter(src).render().decode()
    lines = [ln for ln in text.splitlines() if not ln.startswith(("#", "meshd_gc_pause"))]
    assert "no_such_counter" not in text and not any(" 5.0" in ln for ln in lines)
    assert "meshd_membership_suspicions" not in fams


def test_sample_gauges_and_an_empty_sample():
    src = FakeNode()
    assert "meshd_uptime_seconds" not in scrape(src)  # no sample yet: nothing made up
    src.sample = {"uptime": 12.5, "cpu_seconds": 1.25, "rss_bytes": 50 << 20, "tasks": 40,
                  "members": {"alive": 3}, "time": 1.7e9}
    fams = scrape(src)
    assert values(fams["meshd_uptime_seconds"]) == {(): 12.5}
    assert fams["meshd_process_cpu_seconds"].type == "counter"
    assert values(fams["meshd_process_cpu_seconds"], "_total") == {(): 1.25}
    assert values(fams["meshd_process_resident_memory_bytes"]) == {(): 50 << 20}
    assert values(fams["meshd_tasks"]) == {(): 40}


def test_the_naming_contract():
    src = FakeNode()
    src.stats = dict.fromkeys(STATS, 1)
    src.sample = dict.fromkeys(SAMPLE, 1)
    src.calls.observe("server", "s", "e", 0, 0.1)
    src.calls.observe("client", "s", "e", 0, 0.1)
    fams = scrape(src)
    # members, health score, two RPC histograms, GC pauses, and the tables' metrics
    assert len(fams) == 5 + len({s.metric for s in (*STATS.values(), *SAMPLE.values())})
    for fam in fams.values():
        assert fam.name.startswith("meshd_"), fam.name
        for s in fam.samples:
            assert not {"id", "key", "node", "instance", "topic", "addr"} & set(s.labels)
            if fam.type == "counter":
                assert s.name.endswith("_total"), s.name
            else:
                assert not s.name.endswith("_total"), s.name
    for stat in (*STATS.values(), *SAMPLE.values()):  # base units
        assert not stat.metric.endswith(("_us", "_ms", "_kb", "_milliseconds")), stat.metric


# --- the listener ------------------------------------------------------------------------

async def request(port: int, raw: bytes, ctx: ssl.SSLContext | None = None) -> bytes:
    """Send `raw` on a new connection and read until the server closes it."""
    stream: trio.abc.Stream = await trio.open_tcp_stream("127.0.0.1", port)
    if ctx is not None:
        stream = trio.SSLStream(stream, ctx, server_hostname="127.0.0.1",
                                https_compatible=True)  # hypercorn closes without notify
    out = b""
    with trio.fail_after(5):
        await stream.send_all(raw)
        while chunk := await stream.receive_some():
            out += chunk
    await stream.aclose()
    return out


def get(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()


def head_and_body(response: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


@pytest.fixture
async def served(nursery):
    src = FakeNode()
    exporter = MetricsExporter(src)
    port = await nursery.start(exporter.serve, "127.0.0.1", 0, None)
    assert port == exporter.port and port > 0
    return src, exporter


async def test_serves_get_metrics_and_nothing_else(served):
    src, exporter = served
    src.calls.observe("server", "greeter", "Greeter.Hello", 500, 0.01)
    status, headers, body = head_and_body(await request(exporter.port, get("/metrics")))
    assert status == 200
    assert headers["content-type"] == CONTENT_TYPE_LATEST
    fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert values(fams["meshd_members"])[(("state", "alive"),)] == 3
    assert status == 200
    status, headers, _ = head_and_body(await request(exporter.port, get("/nope")))
    assert (status, headers["connection"]) == (404, "close")
    post = b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
    status, headers, _ = head_and_body(await request(exporter.port, post))
    assert (status, headers["allow"], headers["connection"]) == (405, "GET", "close")


async def test_one_request_per_connection_and_scrapes_share_a_rendering(served):
    src, exporter = served
    stream = await trio.open_tcp_stream("127.0.0.1", exporter.port)
    one = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
    with trio.fail_after(5):
        await stream.send_all(one + one)
        got = b""
        while chunk := await stream.receive_some():
            got += chunk
    await stream.aclose()
    assert got.count(b"HTTP/1.1 200") == 1 and b"connection: close" in got.lower()
    # a scrape within a second of another is answered with its text
    before = head_and_body(await request(exporter.port, get("/metrics")))[2]
    src.calls.observe("server", "fresh", "Fresh.One", 0, 0.001)
    assert head_and_body(await request(exporter.port, get("/metrics")))[2] == before
    await trio.sleep(metrics.RENDER_REUSE + 0.1)
    assert b"Fresh.One" in head_and_body(await request(exporter.port, get("/metrics")))[2]


async def test_connections_are_capped(served):
    _, exporter = served
    exporter.gate.max_open = exporter.gate.max_pending = 4
    idle = [await trio.open_tcp_stream("127.0.0.1", exporter.port) for _ in range(12)]
    await trio.sleep(0.2)
    st = exporter.stats
    assert exporter.gate.open <= 4
    assert st["metrics_evicted"] + st["metrics_refused_cap"] + st["metrics_refused_source"] >= 8
    for s in idle:
        await s.aclose()


async def test_junk_and_failures_end_only_their_connection(served):
    src, exporter = served
    status, _, _ = head_and_body(await request(exporter.port, b"GARBAGE\r\n\r\n"))
    assert status == 400
    junk = await trio.open_tcp_stream("127.0.0.1", exporter.port)
    await junk.send_all(b"\x16\x03\x01\x00\xff" + bytes(range(256)))
    await junk.aclose()
    half = await trio.open_tcp_stream("127.0.0.1", exporter.port)  # stays half-sent
    await half.send_all(b"GET /metr")
    src.fail = True  # a component that raises while read: 500, logged
    status, _, _ = head_and_body(await request(exporter.port, get("/metrics")))
    assert status == 500
    src.fail = False
    status, _, body = head_and_body(await request(exporter.port, get("/metrics")))
    assert status == 200 and b"meshd_members" in body
    await half.aclose()


async def test_bind_failure_raises_before_started(nursery):
    exporter = MetricsExporter(FakeNode())
    port = await nursery.start(exporter.serve, "127.0.0.1", 0, None)
    with pytest.raises(OSError):
        await nursery.start(MetricsExporter(FakeNode()).serve, "127.0.0.1", port, None)


def make_cert(root: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = root / "cert.pem", root / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


async def test_tls_serves_https_only(nursery, tmp_path):
    cert, key = make_cert(tmp_path)
    tls = server_context(str(cert), str(key))
    exporter = MetricsExporter(FakeNode())
    port = await nursery.start(exporter.serve, "127.0.0.1", 0, tls)
    client = ssl.create_default_context(cafile=str(cert))
    status, _, body = head_and_body(await request(port, get("/metrics"), client))
    assert status == 200 and b"meshd_members" in body
    plain = await request(port, get("/metrics"))  # plain http to https: no answer
    assert b"meshd_members" not in plain
    status, _, _ = head_and_body(await request(port, get("/metrics"), client))
    assert status == 200


def test_no_global_registry():
    a, b = FakeNode(), FakeNode()
    b.members = {"alive": 5}
    assert MetricsExporter(a).registry is not MetricsExporter(b).registry
    assert values(scrape(b)["meshd_members"])[(("state", "alive"),)] == 5
    assert values(scrape(a)["meshd_members"])[(("state", "alive"),)] == 3
    assert metrics.STATES == ("alive", "suspect", "dead", "left")
