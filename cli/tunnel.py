"""`meshd tunnel`: TCP tunnels through the mesh, checked against the rules.

Rules:
- Thin functions over the `tunnel.*` control ops: `expose` and `close` act on this node,
  `list` shows the tunnels exposed anywhere in the cluster.
- `connect` keeps a listener open until Ctrl-C: locally the daemon listens and carries the
  bytes (the `tunnel.listen` session); with --via wss://HOST:PORT this command listens and
  carries each connection through a node's proxy endpoint with the user's own token
  (`cli.client.tunnel_via`). A refused connection is one line on stderr; the listener stays.
"""

from __future__ import annotations

from typing import Any

import click

from meshd.errors import MeshError
from meshd_cli.client import Client, client_options, tunnel_via, via_options
from meshd_cli.output import fail, json_option, line, say, show_lines


@click.group()
def tunnel() -> None:
    """TCP tunnels through the mesh, checked against the rules."""


@tunnel.command("expose")
@click.argument("name")
@click.option("--to", "target", required=True, metavar="HOST:PORT", help="The TCP endpoint.")
@client_options
@json_option
def tunnel_expose(name: str, target: str, client: Client, as_json: bool) -> None:
    """Expose HOST:PORT from this node as tunnel NAME."""
    r = client.call("tunnel.expose", name=name, to=target)
    say(r, as_json, f"tunnel {name} -> {r['to']} exposed on {r['node']}")


@tunnel.command("close")
@click.argument("name")
@client_options
@json_option
def tunnel_close(name: str, client: Client, as_json: bool) -> None:
    """Stop exposing tunnel NAME from this node."""
    r = client.call("tunnel.close", name=name)
    say(r, as_json, f"closed tunnel {name}")


@tunnel.command("list")
@client_options
@json_option
def tunnel_list(client: Client, as_json: bool) -> None:
    """Tunnels exposed anywhere in the cluster."""
    rows = client.call("tunnel.list")
    show_lines(rows, as_json, (f"{r['name']}\ton {r['node']}\t-> {r['target']}" for r in rows))


@tunnel.command("connect")
@click.argument("name")
@click.option("--listen", required=True, metavar="HOST:PORT",
              help="Local address to accept connections on (loopback unless you mean it).")
@via_options("From outside the cluster, through a node's proxy endpoint with your token "
             "(--token, MESHD_TOKEN or `auth login`).")
@client_options
def tunnel_connect(name: str, listen: str, via: str | None, ca_file: str | None,
                   client: Client) -> None:
    """Accept connections on --listen and carry each to tunnel NAME, until Ctrl-C.

    The local daemon does the listening and carries the bytes; this command only keeps the
    listener open and reports refused connections."""
    if via:
        tunnel_via(name, listen, via, ca_file)
        return
    env = client.remote()
    if env is not None:  # the listener is here; the proxy carries each connection
        tunnel_via(name, listen, env.via, env.ca_file or None, client.remote_token(env))
        return
    if ca_file:
        fail("400 bad request: --ca-file goes with --via wss://HOST:PORT")

    def opened(info: Any) -> None:
        line(f"tunnel {name}: listening on {info['listening']}")

    def refused(frame: Any) -> None:
        if isinstance(frame, dict) and "refused" in frame:
            line(f"connection refused: {MeshError.from_dict(frame['refused'])}", err=True)

    client.session("tunnel.listen", opened, refused, closed="the daemon closed the tunnel "
                   "listener", name=name, listen=listen)


COMMANDS: tuple[click.Command, ...] = (tunnel,)
