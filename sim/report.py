"""Human-readable report of a simulation result (the JSON form is the result dict itself)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

_LABELS = {
    "dissemination_rounds_p999": "gossip rounds until 99.9% know a change (worst change)",
    "dissemination_rounds_max": "gossip rounds until 100% know a change (worst change)",
    "dissemination_rounds_p999_mean": "gossip rounds until 99.9% know (mean over changes)",
    "dissemination_incomplete": "changes not learned by every node",
    "detection_first_s_p50": "crash to first suspicion, median (s)",
    "detection_first_s_max": "crash to first suspicion, worst (s)",
    "detection_all_s_p50": "crash to dead at every node, median (s)",
    "detection_all_s_max": "crash to dead at every node, worst (s)",
    "dead_after_suspicion_s_max": "first suspicion to dead at every node, worst (s)",
    "detection_incomplete": "crashes not detected by every node",
    "false_deaths": "healthy nodes declared dead (declarations)",
    "false_death_nodes": "distinct healthy nodes declared dead",
    "degraded_deaths": "paused/stalled nodes declared dead",
    "partition_deaths": "nodes declared dead across a partition",
    "rejoin_after_heal_s": "partition heal to one cluster again (s)",
    "msgs_per_node_per_s": "messages sent per node per second",
    "bytes_per_node_per_s": "bytes sent per node per second",
    "kbit_per_node_per_s": "kbit/s sent per node",
    "suspicions_after_warmup": "suspicions after warmup",
    "false_deaths_after_warmup": "healthy nodes declared dead after warmup",
    "route_coverage": "route_coverage: pairs a packet reaches hop by hop",
    "path_stretch_p99": "path_stretch_p99: path latency / optimum",
    "path_stretch_max": "path_stretch_max",
    "route_flaps": "route_flaps: next-hop changes after warmup",
    "route_convergence_s_max": "route_convergence_s_max: crash to all pairs routed (s)",
    "route_convergence_s": "route_convergence_s per crash",
    "route_unconverged": "crashes after which routes never converged",
    "routing_msgs": "link-state advert messages",
}


def print_report(result: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    console.print(f"[bold]scenario[/] {result['scenario']}  nodes={result['nodes']}  "
                  f"seed={result['seed']}  simulated={result['duration_s']:.0f}s  "
                  f"lifeguard={'on' if result['lifeguard'] else 'off'}")
    table = Table(show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result["metrics"].items():
        table.add_row(_LABELS.get(key, key), "-" if value is None else str(value))
    console.print(table)
    for line in result.get("false_death_examples", []):
        console.print(f"  false death: {line}")
    console.print(f"event log sha256 {result['event_log_sha256']}")
    console.print(f"{result['events']} events in {result['sim_wall_s']:.1f} s wall, "
                  f"peak RSS {result['peak_rss_mb']:.0f} MB")
