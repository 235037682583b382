"""`meshd logs`, `meshd stats`, `meshd trace`, `meshd traces`: the cluster's logs, stats and
traces, asked of every node through the local one (or an environment's).

Rules:
- Thin over the debug.* ops; the JSON keys are the ops' own (`logs --json` prints one
  record per line, also when following).
- Nodes that did not answer are named on stderr ("node b: no answer in time"); what the
  others answered is still printed.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any

import click

from meshd_cli.args import parse_duration
from meshd_cli.client import Client, client_options
from meshd_cli.output import json_option, line, print_table, show

LEVELS = ("debug", "info", "warning", "error", "critical")
_COLORS = {"debug": "dim", "info": "", "warning": "yellow", "error": "red", "critical": "red"}


def _missing(errors: dict[str, str]) -> None:
    for node, why in sorted(errors.items()):
        line(f"node {node}: {why}", err=True)


def _clock(t: float) -> str:
    return datetime.fromtimestamp(t).strftime("%H:%M:%S.%f")[:-3]


def _record_line(r: dict[str, Any]) -> str:
    who = r["service"] if r["service"] != "meshd" else r.get("fields", {}).get("logger", "meshd")
    trace = f" trace={r['trace_id']}" if r.get("trace_id") else ""
    return f"{_clock(r['time'])} {r['node']:<10} {who:<14} {r['level'].upper():<8} " \
           f"{r['message']}{trace}"


@click.command()
@click.argument("service", required=False)
@click.option("-f", "--follow", is_flag=True, help="Keep printing new records (Ctrl-C ends).")
@click.option("--since", metavar="DUR", help="Only records of the last DUR (30s, 5m, 1h).")
@click.option("--node", metavar="NAME", help="Only this node's records.")
@click.option("--level", type=click.Choice(LEVELS), help="Only this level and above.")
@click.option("-n", "--limit", type=click.IntRange(1, 5000), default=200, show_default=True,
              help="At most this many records (the newest).")
@client_options
@json_option
def logs(service: str | None, follow: bool, since: str | None, node: str | None,
         level: str | None, limit: int, client: Client, as_json: bool) -> None:
    """Log records of every node (or of SERVICE's instances), merged in time order."""
    args: dict[str, Any] = {"service": service, "node": node, "level": level}
    args = {k: v for k, v in args.items() if v is not None}
    if since is not None:
        args["since"] = time.time() - parse_duration(since, "--since")
    asked = time.time()
    found = client.call("debug.logs", limit=limit, **args)
    _missing(found["errors"])
    for r in found["records"]:
        line(json.dumps(r) if as_json else _record_line(r))
    if follow:  # from just after what was shown: nothing logged in between is lost
        shown = found["records"]
        after = shown[-1]["time"] + 1e-6 if shown else asked - 1.0
        client.stream("debug.logs.follow",
                      lambda r: line(json.dumps(r) if as_json else _record_line(r)),
                      **{**args, "since": max(after, args.get("since", after))})


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


@click.command()
@click.argument("service", required=False)
@client_options
@json_option
def stats(service: str | None, client: Client, as_json: bool) -> None:
    """Stats of every node (uptime, CPU, memory, tasks, links, members, store), or of
    SERVICE's instances (requests, errors, latency per endpoint, in flight)."""
    found = client.call("debug.stats", **({"service": service} if service else {}))
    _missing(found["errors"])
    if as_json:
        click.echo(json.dumps(found))
        return
    if not service:
        rows = []
        for n in found["nodes"]:
            s = n["sample"]
            members = s.get("members", {})
            rows.append((n["node"], f"{s.get('uptime', 0):.0f} s",
                         f"{s.get('cpu_seconds', 0):.1f} s",
                         f"{s.get('rss_bytes', 0) / 1e6:.1f} MB", str(s.get("tasks", 0)),
                         str(s.get("links", 0)),
                         " ".join(f"{k} {v}" for k, v in members.items() if v),
                         f"{s.get('store_records', 0)} / {s.get('store_bytes', 0) / 1e6:.1f}"
                         " MB", str(s.get("services", 0))))
        print_table(("node", "uptime", "cpu", "rss", "tasks", "links", "members",
                     "store records / file", "services"), rows)
        return
    rows = []
    for n in found["nodes"]:
        for inst in n["instances"]:
            for name, ep in inst["endpoints"].items() or {"-": None}.items():
                rows.append((n["node"], inst["instance"], name,
                             str(ep["count"]) if ep else "0",
                             str(ep["errors"]) if ep else str(inst["errors"]),
                             str(inst["in_flight"]),
                             _ms(ep["mean_ms"] / 1000) if ep else "-",
                             f"≤ {ep['p50_ms']:g} ms" if ep else "-",
                             f"≤ {ep['p99_ms']:g} ms" if ep else "-"))
    if not rows:
        line(f"no instance of {service} has stats (none runs, or none was called)")
        return
    print_table(("node", "instance", "endpoint", "requests", "errors", "in flight",
                 "mean", "p50", "p99"), rows)


def _tree(spans: list[dict[str, Any]]) -> list[str]:
    """The spans as an indented tree (children under their parent, in start order)."""
    held = {s["span_id"] for s in spans}
    children: dict[str, list[dict[str, Any]]] = {}
    for s in spans:
        parent = s["parent_id"] if s["parent_id"] in held else ""
        children.setdefault(parent, []).append(s)
    t0 = min(s["start"] for s in spans)
    out: list[str] = []

    def walk(parent: str, depth: int) -> None:
        for s in sorted(children.get(parent, []), key=lambda x: x["start"]):
            status = f"  [red]{s['status']} {s['error']}[/]" if s["status"] else ""
            where = f"{s['node']}" + (f" {s['service']}" if s["service"] else "")
            out.append(f"{'  ' * depth}{s['name']:<40} {_ms(s['duration']):>11}  "
                       f"+{_ms(s['start'] - t0):>11}  {s['kind']:<8} {where}{status}")
            walk(s["span_id"], depth + 1)

    walk("", 0)
    return out


@click.command()
@click.argument("trace_id")
@client_options
@json_option
def trace(trace_id: str, client: Client, as_json: bool) -> None:
    """The spans of TRACE_ID from every node, as a tree with durations and nodes."""
    found = client.call("debug.trace", trace_id=trace_id)
    _missing(found["errors"])
    if as_json:
        click.echo(json.dumps(found))
        return
    from meshd_cli.output import console

    console.print(f"trace {found['trace_id']}  ({len(found['spans'])} spans)")
    for text in _tree(found["spans"]):
        console.print(text, highlight=False)


@click.command()
@click.option("--service", metavar="NAME", help="Only traces that reached this service.")
@click.option("--slowest", type=click.IntRange(1, 1000), metavar="N",
              help="The N slowest (default: the newest).")
@click.option("--errors", is_flag=True, help="Only traces with a failed span.")
@click.option("-n", "--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
@client_options
@json_option
def traces(service: str | None, slowest: int | None, errors: bool, limit: int,
           client: Client, as_json: bool) -> None:
    """Recent traces across the cluster (newest, or slowest first)."""
    args: dict[str, Any] = {"limit": limit, "errors": errors}
    if service:
        args["service"] = service
    if slowest:
        args["slowest"] = slowest
    found = client.call("debug.traces", **args)
    _missing(found["errors"])
    show(found, as_json, ("trace id", "root", "duration", "status", "spans", "nodes", "when"),
         ((t["trace_id"], t["name"], _ms(t["duration"]),
           f"[red]{t['status']}[/]" if t["status"] else "ok", str(t["spans"]),
           ",".join(t["nodes"]), _clock(t["start"])) for t in found["traces"]))


COMMANDS = [logs, stats, trace, traces]
