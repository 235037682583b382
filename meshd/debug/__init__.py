"""Debug and observability: every node's logs, stats and trace spans in bounded buffers,
queried across the cluster (service.py, ops.py), exported to Prometheus (metrics.py) and
OpenTelemetry collectors (otlp.py). See docs/observability.md."""
