"""The OTLP/HTTP exporter (meshd/debug/otlp.py) against a test receiver: a stdlib HTTP server
on a loopback port that decodes every request with the OTLP protobuf messages."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import trio

pytest.importorskip("opentelemetry.exporter.otlp.proto.http.trace_exporter")

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status as PbStatus

from meshd.debug.otlp import OtlpExporter, signal_url
from meshd.debug.stats import CallStats, NodeSampler
from meshd.debug.traces import Span, SpanBuffer

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
START = 1_700_000_000.25  # exactly representable: nanoseconds compare exactly


class Receiver:
    """An OTLP/HTTP collector stand-in: records (path, decoded request) of every POST and
    answers `code`."""

    def __init__(self, port: int = 0) -> None:
        self.code = 200
        self.requests: list[tuple[str, Any]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                kind = {"/v1/traces": ExportTraceServiceRequest,
                        "/v1/metrics": ExportMetricsServiceRequest}.get(self.path)
                msg = kind.FromString(body) if kind else body
                with receiver.lock:
                    receiver.requests.append((self.path, msg))
                self.send_response(receiver.code)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,),
                                       daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def of(self, path: str) -> list[Any]:
        with self.lock:
            return [m for p, m in self.requests if p == path]

    def spans(self) -> list[tuple[dict[str, Any], PbSpan]]:
        """Every received span with its resource's attributes, in arrival order."""
        out = []
        for req in self.of("/v1/traces"):
            for rs in req.resource_spans:
                res = attrs(rs.resource.attributes)
                out.extend((res, s) for ss in rs.scope_spans for s in ss.spans)
        return out


def attrs(kvs: Any) -> dict[str, Any]:
    return {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in kvs}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    try:
        yield r
    finally:
        r.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def span(n: int, parent: str = "", kind: str = "client", service: str = "greeter",
         status: int = 0, error: str = "", trace: str = TRACE) -> Span:
    return Span(trace, f"{n:016x}", parent, f"op {n}", kind, "node-a", service, START + n,
                0.5, status, error, {"rpc.endpoint": "Hello"})


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.01)


def exporter(url: str, buf: SpanBuffer, **kw: Any) -> OtlpExporter:
    kw.setdefault("interval", 0.05)
    kw.setdefault("timeout", 0.5)  # below the SDK's first retry backoff: failures are fast
    return OtlpExporter(url, buf, "node-a", **kw)


async def test_spans_are_received_and_decoded(receiver: Receiver) -> None:
    buf = SpanBuffer(100)
    exp = exporter(receiver.url, buf)
    buf.add(span(1, kind="client", service=""))
    buf.add(span(2, parent=f"{1:016x}", kind="server"))
    buf.add(span(3, parent=f"{2:016x}", kind="handler", status=500, error="boom"))
    buf.add(span(4, parent=f"{2:016x}", kind="relay"))
    buf.add(span(5, parent=f"{1:016x}", kind="producer"))
    buf.add(span(6, parent=f"{5:016x}", kind="consumer"))

    assert await exp.flush() == 6
    assert len(receiver.of("/v1/traces")) == 1
    got = {s.span_id: (res, s) for res, s in receiver.spans()}
    assert set(got) == {bytes.fromhex(f"{n:016x}") for n in range(1, 7)}
    kinds = {1: PbSpan.SPAN_KIND_CLIENT, 2: PbSpan.SPAN_KIND_SERVER,
             3: PbSpan.SPAN_KIND_INTERNAL, 4: PbSpan.SPAN_KIND_INTERNAL,
             5: PbSpan.SPAN_KIND_PRODUCER, 6: PbSpan.SPAN_KIND_CONSUMER}
    for n, kind in kinds.items():
        res, s = got[bytes.fromhex(f"{n:016x}")]
        assert s.trace_id == bytes.fromhex(TRACE)
        assert s.name == f"op {n}"
        assert s.kind == kind
        assert s.start_time_unix_nano == int((START + n) * 1e9)
        assert s.end_time_unix_nano - s.start_time_unix_nano == 500_000_000
        assert res["host.name"] == "node-a" and res["meshd.node"] == "node-a"
        assert res["service.name"] == ("meshd" if n == 1 else "greeter")
        a = attrs(s.attributes)
        assert a["rpc.endpoint"] == "Hello" and a["meshd.node"] == "node-a"
    root, server, handler = (got[bytes.fromhex(f"{n:016x}")][1] for n in (1, 2, 3))
    assert root.parent_span_id == b""
    assert server.parent_span_id == bytes.fromhex(f"{1:016x}")
    assert handler.parent_span_id == bytes.fromhex(f"{2:016x}")
    assert handler.status.code == PbStatus.STATUS_CODE_ERROR
    assert handler.status.message == "boom"
    assert attrs(handler.attributes)["meshd.status"] == 500
    assert attrs(handler.attributes)["meshd.kind"] == "handler"
    assert server.status.code == PbStatus.STATUS_CODE_UNSET
    # one resource per service: the spans are grouped under it
    req = receiver.of("/v1/traces")[0]
    assert sorted(attrs(rs.resource.attributes)["service.name"]
                  for rs in req.resource_spans) == ["greeter", "meshd"]
    assert exp.stats["otlp_spans_exported"] == 6
    assert exp.stats["otlp_export_failures"] == 0


async def test_only_new_spans_are_sent_next_round(receiver: Receiver) -> None:
    buf = SpanBuffer(100)
    buf.add(span(1))  # held before the exporter starts: sent too
    exp = exporter(receiver.url, buf)
    buf.add(span(2))
    assert await exp.flush() == 2
    assert await exp.flush() == 0  # nothing new: no request at all
    assert len(receiver.of("/v1/traces")) == 1
    buf.add(span(3))
    assert await exp.flush() == 1
    reqs = receiver.of("/v1/traces")
    assert len(reqs) == 2
    assert [s.name for rs in reqs[1].resource_spans for ss in rs.scope_spans
            for s in ss.spans] == ["op 3"]
    ids = [s.span_id for _, s in receiver.spans()]
    assert len(ids) == len(set(ids)) == 3


async def test_batches_of_max_batch(receiver: Receiver) -> None:
    buf = SpanBuffer(100)
    exp = exporter(receiver.url, buf, max_batch=2)
    for n in range(1, 6):
        buf.add(span(n))
    assert await exp.flush() == 5
    sizes = [sum(len(ss.spans) for rs in r.resource_spans for ss in rs.scope_spans)
             for r in receiver.of("/v1/traces")]
    assert sizes == [2, 2, 1]
    assert [s.name for _, s in receiver.spans()] == [f"op {n}" for n in range(1, 6)]


async def test_run_loop_exports_every_interval(receiver: Receiver) -> None:
    buf = SpanBuffer(100)
    exp = exporter(receiver.url, buf)
    async with trio.open_nursery() as nursery:
        await nursery.start(exp.run)
        buf.add(span(1))
        await until(lambda: len(receiver.spans()) == 1)
        buf.add(span(2))
        # received, and counted by the exporter (it counts once the collector answered)
        await until(lambda: len(receiver.spans()) == 2
                    and exp.stats["otlp_spans_exported"] == 2)
        nursery.cancel_scope.cancel()
    assert [s.name for _, s in receiver.spans()] == ["op 1", "op 2"]
    assert exp.stats["otlp_spans_exported"] == 2


async def test_collector_answering_500_is_counted_and_retried(receiver: Receiver) -> None:
    buf = SpanBuffer(100)
    exp = exporter(receiver.url, buf)
    receiver.code = 500
    buf.add(span(1))
    assert await exp.flush() == 0  # no exception
    assert exp.stats["otlp_export_failures"] == 1
    assert exp.stats["otlp_spans_exported"] == 0
    assert len(receiver.of("/v1/traces")) >= 1  # it did try
    receiver.code = 200
    buf.add(span(2))
    assert await exp.flush() == 2  # the failed batch again, with what is new
    assert exp.stats["otlp_spans_exported"] == 2
    assert exp.stats["otlp_spans_dropped"] == 0


async def test_collector_down_the_loop_survives_and_recovers() -> None:
    port = free_port()
    buf = SpanBuffer(100)
    exp = exporter(f"http://127.0.0.1:{port}", buf)
    async with trio.open_nursery() as nursery:
        await nursery.start(exp.run)
        buf.add(span(1))
        # tried ATTEMPTS times, then given up on (counted), and the loop goes on
        await until(lambda: exp.stats["otlp_spans_dropped"] == 1)
        assert exp.stats["otlp_export_failures"] >= 3
        r = Receiver(port)
        try:
            buf.add(span(2))
            # received, and counted by the exporter (it counts once the collector answered)
            await until(lambda: len(r.spans()) == 1
                        and exp.stats["otlp_spans_exported"] == 1)
            nursery.cancel_scope.cancel()
        finally:
            r.close()
    assert [s.name for _, s in r.spans()] == ["op 2"]
    assert exp.stats["otlp_spans_exported"] == 1


async def test_spans_lost_to_buffer_overflow_are_counted(receiver: Receiver) -> None:
    buf = SpanBuffer(4)
    exp = exporter(receiver.url, buf)
    buf.add(span(1))
    buf.add(span(2))
    assert await exp.flush() == 2
    for n in range(3, 13):  # 10 more into 4 places: 3..8 never seen by the exporter
        buf.add(span(n))
    assert await exp.flush() == 4
    assert exp.stats["otlp_spans_dropped"] == 6
    assert [s.name for _, s in receiver.spans()][2:] == [f"op {n}" for n in range(9, 13)]


async def test_a_span_the_sdk_cannot_take_does_not_stop_the_batch(receiver: Receiver) -> None:
    buf = SpanBuffer(10)
    exp = exporter(receiver.url, buf)
    buf.add(span(1, trace="0" * 32))  # all-zero trace id: invalid in OpenTelemetry
    buf.add(span(2))
    assert await exp.flush() == 1
    assert [s.name for _, s in receiver.spans()] == ["op 2"]
    assert exp.stats["otlp_spans_dropped"] == 1


async def test_metrics_are_exported(receiver: Receiver) -> None:
    calls = CallStats()
    calls.observe("server", "greeter", "Hello", 0, 0.003)
    calls.observe("server", "greeter", "Hello", 0, 0.2)
    calls.observe("client", "greeter", "Hello", 500, 0.01)
    sampler = NodeSampler(4, lambda: {"members": {"alive": 3, "suspect": 0}})
    sampler.sample()
    exp = exporter(receiver.url, SpanBuffer(10), calls=calls, sampler=sampler)
    assert await exp.export_metrics()
    (req,) = receiver.of("/v1/metrics")
    (rm,) = req.resource_metrics
    assert attrs(rm.resource.attributes)["meshd.node"] == "node-a"
    metrics = {m.name: m for sm in rm.scope_metrics for m in sm.metrics}
    (pt,) = metrics["meshd.rpc.server.duration"].histogram.data_points
    assert attrs(pt.attributes) == {"service": "greeter", "endpoint": "Hello", "status": 0}
    assert pt.count == 2 and sum(pt.bucket_counts) == 2
    assert abs(pt.sum - 0.203) < 1e-9
    assert list(pt.explicit_bounds)[:2] == [0.0005, 0.001]
    (cpt,) = metrics["meshd.rpc.client.duration"].histogram.data_points
    assert attrs(cpt.attributes)["status"] == 500
    members = {attrs(p.attributes)["key"]: p.as_int
               for p in metrics["meshd.node.members"].gauge.data_points}
    assert members == {"alive": 3, "suspect": 0}
    assert metrics["meshd.node.rss_bytes"].gauge.data_points[0].as_int > 0
    assert exp.stats["otlp_metric_exports"] == 1


async def test_metrics_failure_is_counted_not_raised() -> None:
    calls = CallStats()
    calls.observe("server", "greeter", "Hello", 0, 0.003)
    exp = exporter(f"http://127.0.0.1:{free_port()}", SpanBuffer(10), calls=calls)
    assert not await exp.export_metrics()
    assert exp.stats["otlp_metric_failures"] == 1


def test_signal_urls() -> None:
    assert signal_url("http://c:4318", "traces") == "http://c:4318/v1/traces"
    assert signal_url("http://c:4318/", "metrics") == "http://c:4318/v1/metrics"
    assert signal_url("https://c/otlp/v1/traces", "metrics") == "https://c/otlp/v1/metrics"
    with pytest.raises(ValueError):
        signal_url("c:4318", "traces")


def test_meshd_imports_without_the_sdk() -> None:
    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            raise ImportError(name)
sys.meta_path.insert(0, Block())
from meshd.debug import otlp
from meshd.debug.traces import SpanBuffer
for f in (otlp.check_available, lambda: otlp.OtlpExporter("http://c:4318", SpanBuffer(1), "n")):
    try:
        f()
    except RuntimeError as e:
        assert "pip install 'meshd[otel]'" in str(e), e
    else:
        raise SystemExit("no RuntimeError")
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
