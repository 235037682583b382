"""The network as this node sees it: `meshd routes`, `graph`, `ping`.

Rules:
- Thin functions over the `routes`, `graph` and `ping` control ops; output as everywhere: a
  table or lines for people, `--json` for programs.
- `graph --format dot|svg` draws the link graph as Graphviz DOT or a standalone SVG picture
  (nodes on a circle, edges labelled with their latency).
"""

from __future__ import annotations

import json
import math
from typing import Any

import click

from meshd_cli.client import Client, client_options
from meshd_cli.output import json_option, print_table, show


@click.command()
@client_options
@json_option
def routes(client: Client, as_json: bool) -> None:
    """The routing table: destination, next hop, path and latency."""
    rows = client.call("routes")
    show(rows, as_json, ("destination", "next hop", "path", "latency"),
         ((r["destination"], r["next_hop"], " -> ".join(r["path"]),
           f"{r['latency_ms']:.3f} ms") for r in rows))


def _svg(nodes: list[str], edges: list[dict[str, Any]]) -> str:
    size, radius = 600, 240
    pos = {n: (size / 2 + radius * math.cos(2 * math.pi * i / max(1, len(nodes))),
               size / 2 + radius * math.sin(2 * math.pi * i / max(1, len(nodes))))
           for i, n in enumerate(nodes)}
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" '
           f'font-family="sans-serif" font-size="11">', '<rect width="100%" height="100%" '
           'fill="white"/>']
    for e in edges:
        (x1, y1), (x2, y2) = pos[e["a"]], pos[e["b"]]
        out.append(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" '
                   'stroke="#888"/>')
        out.append(f'<text x="{(x1 + x2) / 2:.1f}" y="{(y1 + y2) / 2:.1f}" fill="#555">'
                   f'{e["latency_ms"]:.2f} ms</text>')
    for n, (x, y) in pos.items():
        out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="18" fill="#4a90d9"/>')
        out.append(f'<text x="{x:.1f}" y="{y + 32:.1f}" text-anchor="middle">{n}</text>')
    out.append("</svg>")
    return "\n".join(out)


@click.command()
@click.option("--format", "fmt", type=click.Choice(["table", "dot", "svg"]), default="table")
@client_options
@json_option
def graph(fmt: str, client: Client, as_json: bool) -> None:
    """The link graph the routes are computed on (table, Graphviz DOT or an SVG picture)."""
    g = client.call("graph")
    if as_json:
        click.echo(json.dumps(g))
    elif fmt == "dot":
        click.echo("graph meshd {")
        for e in g["edges"]:
            click.echo(f'  "{e["a"]}" -- "{e["b"]}" [label="{e["latency_ms"]:.2f} ms"];')
        click.echo("}")
    elif fmt == "svg":
        click.echo(_svg(g["nodes"], g["edges"]))
    else:
        print_table(("node", "node", "latency"),
                    ((e["a"], e["b"], f"{e['latency_ms']:.3f} ms") for e in g["edges"]))


@click.command()
@click.argument("node")
@click.option("--count", type=click.IntRange(1, 100), default=5, show_default=True)
@client_options
@json_option
def ping(node: str, count: int, client: Client, as_json: bool) -> None:
    """Round trips to NODE over the secure link."""
    r = client.call("ping", node=node, count=count)
    if as_json:
        click.echo(json.dumps(r))
        return
    for i, rtt in enumerate(r["rtt_ms"]):
        click.echo(f"reply from {node} ({r['address']}): seq={i} time={rtt:.3f} ms")
    est = r["vivaldi_estimate_ms"]
    click.echo(f"min {r['min_ms']:.3f} ms, avg {r['avg_ms']:.3f} ms"
               + (f", Vivaldi estimate {est:.3f} ms" if est is not None else ""))


COMMANDS: tuple[click.Command, ...] = (routes, graph, ping)
