"""OpenTelemetry export: the node's spans (and call metrics) sent over OTLP/HTTP.

Job: `meshd up --otlp-endpoint URL` runs one `OtlpExporter`. Every `interval` seconds it
takes the spans the node's `SpanBuffer` gained since the last round, turns them into the
official SDK's `ReadableSpan`s and hands them, `max_batch` at a time, to the SDK's
`OTLPSpanExporter` (POST `<URL>/v1/traces`). Given the node's `CallStats` and/or
`NodeSampler`, it also sends, every `metrics_interval` seconds, the RPC duration
histograms (cumulative, the same buckets as `meshd stats` and `/metrics`) and the numbers
of the node's newest stats sample as gauges (POST `<URL>/v1/metrics`).

Rules:
- The SDK is an optional extra (`pip install 'meshd[otel]'`): every opentelemetry import is
  inside a function, so meshd imports without it; `check_available()` (and the
  constructor) fail with one clear RuntimeError when it is missing.
- URL is the collector's OTLP/HTTP base (`http://collector:4318`); the signal paths are
  appended. A URL already ending in `/v1/traces` or `/v1/metrics` is taken as that base.
- The SDK exporter blocks: it runs in a worker thread with its own `timeout` (its retries
  of transient errors fit inside it), and the thread is abandoned, never waited for, if it
  overruns (a stuck exporter is replaced) or the node stops.
- The collector being down, slow or refusing never ends the node: a failed export is
  logged (logger "meshd.debug", once when failing starts and once when it recovers) and
  counted in `stats`, never raised. A failed batch is tried again next round, at most
  `ATTEMPTS` times, then dropped.
- Nothing is sent twice after a success: the exporter remembers the buffer's sequence
  number it got to. Spans that left the buffer before they were sent (a sequence gap),
  failed batches given up on and spans the SDK cannot represent are counted in
  `stats["otlp_spans_dropped"]`.
- Mapping: ids are the W3C hex ids as integers (sampled flag set); kind client/server/
  producer/consumer map to the same SpanKind, handler/relay/internal to INTERNAL (the meshd
  kind stays in the "meshd.kind" attribute); a span with a non-zero status is ERROR with the
  error as its description; attributes are the span's plus "meshd.node", "meshd.kind" and
  "meshd.status"; the resource is service.name = the span's service (or "meshd"),
  host.name = meshd.node = this node, so spans group by service.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import trio

from meshd.debug.stats import BUCKETS, CallStats, NodeSampler
from meshd.debug.traces import Span, SpanBuffer

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan

log = logging.getLogger("meshd.debug")

MISSING = "--otlp-endpoint needs the OpenTelemetry SDK: pip install 'meshd[otel]'"
ATTEMPTS = 3  # rounds a failed batch is tried before it is dropped
MAX_RESOURCES = 1024  # cached per-service resources (cleared beyond)
SCOPE = "meshd"
_SIGNALS = ("/v1/traces", "/v1/metrics")


def check_available() -> None:
    """RuntimeError unless the OpenTelemetry SDK and its OTLP/HTTP exporter import."""
    try:
        import opentelemetry.exporter.otlp.proto.http.metric_exporter
        import opentelemetry.exporter.otlp.proto.http.trace_exporter
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError as e:
        raise RuntimeError(MISSING) from e


def signal_url(endpoint: str, signal: str) -> str:
    """`<base>/v1/<signal>` for an OTLP/HTTP base URL (ValueError unless http(s))."""
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"OTLP endpoint must be an http(s) URL, not {endpoint!r}")
    base = endpoint.rstrip("/")
    for suffix in _SIGNALS:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return f"{base}/v1/{signal}"


class OtlpExporter:
    """Sends the spans of `spans` (and optionally call metrics) to an OTLP/HTTP collector."""

    def __init__(self, endpoint: str, spans: SpanBuffer, node: str, interval: float = 2.0,
                 max_batch: int = 512, *, timeout: float = 10.0,
                 calls: CallStats | None = None, sampler: NodeSampler | None = None,
                 metrics_interval: float = 15.0) -> None:
        check_available()
        self.traces_url = signal_url(endpoint, "traces")
        self.metrics_url = signal_url(endpoint, "metrics")
        self.spans = spans
        self.node = node
        self.interval = interval
        self.max_batch = max(1, max_batch)
        self.timeout = timeout
        self.calls = calls
        self.sampler = sampler
        self.metrics_interval = metrics_interval
        self.stats: dict[str, int] = {
            "otlp_spans_exported": 0, "otlp_export_failures": 0, "otlp_spans_dropped": 0,
            "otlp_metric_exports": 0, "otlp_metric_failures": 0}
        self.started = time.time()
        self._seq = spans.seq - len(spans)  # exported up to here: what it holds is sent too
        self._attempts = 0  # failed rounds of the batch at self._seq
        self._failing: set[str] = set()  # signals whose last export failed
        self._next_metrics = 0.0
        self._resources: dict[str, Resource] = {}
        self._span_exporter: Any = None
        self._metric_exporter: Any = None

    # -- the loop ---------------------------------------------------------------------------

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Export every `interval` until cancelled; never raises for the collector's sake."""
        task_status.started()
        try:
            while True:
                await trio.sleep(self.interval)
                await self.flush()
                if self._wants_metrics() and trio.current_time() >= self._next_metrics:
                    self._next_metrics = trio.current_time() + self.metrics_interval
                    await self.export_metrics()
        finally:
            self._close()

    async def flush(self) -> int:
        """One round: send what is new, batch by batch; the number of spans sent. Not to be
        called while `run` is running."""
        sent = 0
        while True:
            last, batch, bad = self._take()
            if last == self._seq:
                return sent
            ok = True
            if batch:
                exp = self._span_exporter
                if exp is None:
                    exp = self._span_exporter = self._new_exporter("traces")
                ok = await self._call("traces", _export_spans, exp, batch)
            if ok:
                self.stats["otlp_spans_exported"] += len(batch)
                self.stats["otlp_spans_dropped"] += bad
                sent += len(batch)
                self._seq, self._attempts = last, 0
                continue
            self.stats["otlp_export_failures"] += 1
            self._attempts += 1
            if self._attempts >= ATTEMPTS:
                log.warning("otlp batch dropped endpoint=%s spans=%d attempts=%d",
                            self.traces_url, len(batch), self._attempts)
                self.stats["otlp_spans_dropped"] += len(batch) + bad
                self._seq, self._attempts = last, 0
            return sent

    async def export_metrics(self) -> bool:
        """Send the call histograms and the newest node sample once; whether it worked."""
        if not self._wants_metrics():
            return False
        exp = self._metric_exporter
        if exp is None:
            exp = self._metric_exporter = self._new_exporter("metrics")
        ok = await self._call("metrics", _export_metrics, exp, self._metrics_data(),
                              self.timeout)
        self.stats["otlp_metric_exports" if ok else "otlp_metric_failures"] += 1
        return ok

    def _wants_metrics(self) -> bool:
        return self.calls is not None or self.sampler is not None

    def _new_exporter(self, signal: str) -> Any:
        if signal == "traces":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            return OTLPSpanExporter(endpoint=self.traces_url, timeout=self.timeout)
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        return OTLPMetricExporter(endpoint=self.metrics_url, timeout=self.timeout)

    async def _call(self, signal: str, fn: Callable[..., bool], *args: Any) -> bool:
        """Run one blocking export in a thread; a failure of any kind is a False."""
        url = self.traces_url if signal == "traces" else self.metrics_url
        ok = False
        with trio.move_on_after(self.timeout + 5.0) as scope:
            try:
                ok = await trio.to_thread.run_sync(fn, *args, cancellable=True)
            except Exception as e:  # the SDK should not raise; if it does, it is a failure
                log.debug("otlp export raised endpoint=%s error=%r", url, e)
        if scope.cancelled_caught:  # the thread is abandoned: so is its exporter
            self._close()
        if not ok and signal not in self._failing:
            self._failing.add(signal)
            log.warning("otlp export failing endpoint=%s (will keep trying)", url)
        elif ok and signal in self._failing:
            self._failing.discard(signal)
            log.info("otlp export recovered endpoint=%s", url)
        return ok

    def _close(self) -> None:
        """Shut the SDK exporters down (stops their retries) and forget them."""
        for exp in (self._span_exporter, self._metric_exporter):
            if exp is not None:
                try:
                    exp.shutdown()
                except Exception as e:
                    log.debug("otlp exporter shutdown error=%r", e)
        self._span_exporter = self._metric_exporter = None

    # -- spans ------------------------------------------------------------------------------

    def _take(self) -> tuple[int, list[ReadableSpan], int]:
        """The next batch after self._seq: (the sequence number it ends at, the spans, how
        many could not be converted). Spans that left the buffer unsent count as dropped."""
        oldest = self.spans.seq - len(self.spans) + 1  # the buffer's seqs are contiguous
        if oldest > self._seq + 1:
            self.stats["otlp_spans_dropped"] += oldest - self._seq - 1
            self._seq, self._attempts = oldest - 1, 0
        batch: list[ReadableSpan] = []
        last, bad = self._seq, 0
        for seq, span in self.spans.since(self._seq):
            last = seq
            try:
                batch.append(self._readable(span))
            except (ValueError, TypeError, OverflowError) as e:
                log.debug("otlp span skipped trace=%s error=%r", span.trace_id, e)
                bad += 1
            if len(batch) >= self.max_batch:
                break
        return last, batch, bad

    def _resource(self, service: str) -> Resource:
        from opentelemetry.sdk.resources import Resource

        res = self._resources.get(service)
        if res is None:
            if len(self._resources) >= MAX_RESOURCES:
                self._resources.clear()
            res = self._resources[service] = Resource.create(
                {"service.name": service, "host.name": self.node, "meshd.node": self.node})
        return res

    def _readable(self, span: Span) -> ReadableSpan:
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

        kinds = {"client": SpanKind.CLIENT, "server": SpanKind.SERVER,
                 "producer": SpanKind.PRODUCER, "consumer": SpanKind.CONSUMER}
        trace_id = int(span.trace_id, 16)
        context = SpanContext(trace_id=trace_id, span_id=int(span.span_id, 16),
                              is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED))
        parent = None
        if span.parent_id:
            parent = SpanContext(trace_id=trace_id, span_id=int(span.parent_id, 16),
                                 is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED))
        if not context.is_valid:
            raise ValueError("invalid span context")
        start = int(span.start * 1e9)
        status = Status(StatusCode.UNSET)
        if span.status:
            status = Status(StatusCode.ERROR, span.error or f"status {span.status}")
        attrs: dict[str, Any] = dict(span.attrs)
        attrs.update({"meshd.node": span.node or self.node, "meshd.kind": span.kind,
                      "meshd.status": span.status})
        return ReadableSpan(
            name=span.name, context=context, parent=parent,
            resource=self._resource(span.service or "meshd"), attributes=attrs,
            kind=kinds.get(span.kind, SpanKind.INTERNAL), status=status, start_time=start,
            end_time=start + max(0, int(span.duration * 1e9)),
            instrumentation_scope=InstrumentationScope(SCOPE))

    # -- metrics ----------------------------------------------------------------------------

    def _metrics_data(self) -> Any:
        from opentelemetry.sdk.metrics.export import (
            AggregationTemporality,
            Gauge,
            Histogram,
            HistogramDataPoint,
            Metric,
            MetricsData,
            NumberDataPoint,
            ResourceMetrics,
            ScopeMetrics,
        )
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        now = time.time_ns()
        start = int(self.started * 1e9)
        metrics = []
        if self.calls is not None:
            points: dict[str, list[HistogramDataPoint]] = {"server": [], "client": []}
            for side, (service, endpoint, status), s in (
                    (which, key, s) for which in ("server", "client")
                    for key, s in self.calls.by_side(which).items()):
                points[side].append(HistogramDataPoint(
                    attributes={"service": service, "endpoint": endpoint, "status": status},
                    start_time_unix_nano=start, time_unix_nano=now, count=s.count,
                    sum=s.total, bucket_counts=list(s.buckets), explicit_bounds=BUCKETS,
                    min=None, max=None))  # type: ignore[arg-type]  # unknown: left unset
            for side, pts in points.items():
                if pts:
                    metrics.append(Metric(
                        name=f"meshd.rpc.{side}.duration", unit="s",
                        description=f"RPC durations seen by the {side} side's daemon",
                        data=Histogram(pts, AggregationTemporality.CUMULATIVE)))
        if self.sampler is not None and self.sampler.samples:
            for key, value in self.sampler.samples[-1].items():
                values: dict[str, Any] = {}
                if isinstance(value, int | float):
                    values[""] = value
                elif isinstance(value, dict) and key != "time":
                    values = {str(k): v for k, v in value.items()}
                gauge = [NumberDataPoint({"key": k} if k else {}, start, now, v)
                         for k, v in values.items()
                         if isinstance(v, int | float) and not isinstance(v, bool)]
                if gauge and key != "time":
                    metrics.append(Metric(name=f"meshd.node.{key}", description=None,
                                          unit=None, data=Gauge(gauge)))
        scope = ScopeMetrics(InstrumentationScope(SCOPE), metrics, "")
        return MetricsData([ResourceMetrics(self._resource("meshd"), [scope], "")])


def _export_spans(exporter: Any, batch: list[ReadableSpan]) -> bool:  # in a worker thread
    from opentelemetry.sdk.trace.export import SpanExportResult

    return bool(exporter.export(batch) == SpanExportResult.SUCCESS)


def _export_metrics(exporter: Any, data: Any, timeout: float) -> bool:  # in a worker thread
    from opentelemetry.sdk.metrics.export import MetricExportResult

    return bool(exporter.export(data, timeout_millis=timeout * 1000)
                == MetricExportResult.SUCCESS)
