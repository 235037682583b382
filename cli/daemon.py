"""`meshd up` (run a node in the foreground) and `meshd status` (this node's status).

Rules:
- `up` layers its settings as everywhere: the --config TOML file, then MESHD_* variables,
  then the flags; anything it cannot start with (settings, certificate, secret) is refused
  with one "400 bad request" line before anything starts.
- `up` prints its status screen with plain click output, never rich: the daemon then does not
  load rich at all. --print-settings prints the effective settings (TOML, or JSON with
  --json) and exits.
- `status` is a thin function over the `status` op.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import trio

from meshd_cli.client import Client, client_options, data_dir_option
from meshd_cli.output import console, fail, json_option

if TYPE_CHECKING:
    from meshd.node import Node


@click.command()
@click.option("--name", help="Node name, unique in the cluster (default: host name).")
@click.option("--bind", help="HOST:PORT for gossip and links (default 0.0.0.0:7946).")
@click.option("--advertise", help="HOST:PORT others reach us at (or ws://HOST:PORT).")
@click.option("--ws-listen", help="Also accept links over WebSocket on HOST:PORT.")
@click.option("--proxy-listen", help="Serve outside clients (WebSocket, tokens) on HOST:PORT.")
@click.option("--tls-cert", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="PEM certificate (chain) for the proxy endpoint: it then serves wss://.")
@click.option("--tls-key", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="The unencrypted PEM private key of --tls-cert.")
@click.option("--metrics-listen", metavar="HOST:PORT", help="Serve Prometheus /metrics on "
              "HOST:PORT (https with --tls-cert/--tls-key). Also MESHD_DEBUG_METRICS_LISTEN.")
@click.option("--api-listen", metavar="HOST:PORT", help="Serve the API gateway (HTTP to every "
              "service) on HOST:PORT (https with --tls-cert/--tls-key). Also "
              "MESHD_API_LISTEN.")
@click.option("--web-listen", metavar="HOST:PORT", help="Serve the web dashboard on HOST:PORT "
              "(https with --tls-cert/--tls-key). Also MESHD_WEB_LISTEN.")
@click.option("--otlp-endpoint", metavar="URL", help="Export spans and metrics over OTLP/HTTP "
              "to the collector at URL (e.g. http://127.0.0.1:4318; needs `pip install "
              "meshd[otel]`).")
@click.option("--join", "join", multiple=True, metavar="PEER", help="Join through PEER.")
@click.option("--auth-root", metavar="FP", help="Fingerprint of the cluster's auth root key "
              "to trust (`meshd invite` prints it; default: the one the --join seeds vouch "
              "for). Also MESHD_AUTH_ROOT.")
@click.option("--tags", "tags", multiple=True, metavar="K=V", help="Node tag (repeatable).")
@click.option("--profile", type=click.Choice(["lan", "wan", "local"]), help="Timing profile.")
@click.option("--secret-file", type=click.Path(dir_okay=False, path_type=Path),
              help="File holding the cluster secret (or MESHD_SECRET).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              envvar="MESHD_CONFIG", help="TOML settings file.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--print-settings", is_flag=True, help="Print the effective settings and exit.")
@click.option("--print-systemd-unit", is_flag=True, help="Print a hardened systemd unit that "
              "runs this `meshd up` (its other options; data dir /var/lib/meshd unless "
              "given) and exit.")
@click.option("--unit-user", default="meshd", show_default=True, metavar="USER",
              help="With --print-systemd-unit: the user the unit runs the daemon as.")
@data_dir_option
@json_option
def up(name: str | None, bind: str | None, advertise: str | None, ws_listen: str | None,
       proxy_listen: str | None, tls_cert: Path | None, tls_key: Path | None,
       metrics_listen: str | None, api_listen: str | None, web_listen: str | None,
       otlp_endpoint: str | None, join: tuple[str, ...],
       auth_root: str | None,
       tags: tuple[str, ...], profile: str | None, secret_file: Path | None,
       config_file: Path | None, log_level: str | None, print_settings: bool,
       print_systemd_unit: bool, unit_user: str, data_dir: Path | None,
       as_json: bool) -> None:
    """Run a node in the foreground (Ctrl-C leaves the cluster gracefully)."""
    if print_systemd_unit:
        click.echo(_systemd_unit(unit_user, data_dir), nl=False)
        return
    from meshd.node import Node, NodeError
    from meshd.secure.keyring import KeyringError, parse_secret
    from meshd.settings import SettingsError, as_dict, load_settings
    from meshd.tlsconf import TlsError, server_context

    toml: dict[str, Any] = {}
    if config_file is not None:
        try:
            toml = tomllib.loads(config_file.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            fail(f"400 bad request: settings file {config_file}: {exc}")
    flags = {"name": name, "bind": bind, "advertise": advertise, "ws_listen": ws_listen,
             "proxy_listen": proxy_listen, "debug.metrics_listen": metrics_listen,
             "debug.otlp_endpoint": otlp_endpoint, "api.listen": api_listen,
             "web.listen": web_listen,
             "tls_cert": str(tls_cert) if tls_cert else None,
             "tls_key": str(tls_key) if tls_key else None,
             "join": join, "tags": tags, "auth_root": auth_root,
             "profile": profile, "log_level": log_level,
             "data_dir": str(data_dir) if data_dir else None,
             "secret_file": str(secret_file) if secret_file else None}
    try:
        settings = load_settings(toml, dict(os.environ), flags)
    except SettingsError as exc:
        fail(f"400 bad request: {exc}")
    if print_settings:
        data = as_dict(settings)
        click.echo(json.dumps(data, indent=2) if as_json else _toml(data))
        return
    try:  # refuse a certificate or key that cannot serve before anything starts
        server_context(settings.node.tls_cert, settings.node.tls_key)
    except TlsError as exc:
        fail(f"400 bad request: {exc}")
    secret = None
    try:
        if settings.node.secret_file:
            secret = parse_secret(Path(settings.node.secret_file).expanduser().read_text())
        elif os.environ.get("MESHD_SECRET"):
            secret = parse_secret(os.environ["MESHD_SECRET"])
    except OSError as exc:
        fail(f"400 bad request: cannot read the secret file: {exc.strerror}")
    except KeyringError as exc:
        fail(f"400 bad request: {exc}")
    logging.basicConfig(
        level=getattr(logging, settings.node.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", stream=sys.stderr)

    node = Node(settings, secret, on_ready=lambda node: _up(node, as_json))
    _tune_gc()
    try:
        trio.run(node.run)
    except NodeError as exc:
        fail(f"503 unavailable: {exc}")
    except KeyboardInterrupt:
        pass


def _tune_gc() -> None:
    """The daemon process's collector: a young-generation threshold of GC_YOUNG allocations
    instead of Python's 700. A node allocates a few hundred objects per request it serves
    and holds many long-lived ones; at 700, collections took 10-15% of a gateway request's
    CPU (bench/gateway.py, docs/benchmarks.md). Only the daemon's own process is tuned:
    `meshd up`, never a program that embeds the SDK."""
    import gc

    gc.set_threshold(GC_YOUNG, *gc.get_threshold()[1:])


GC_YOUNG = 5000


def _up(node: Node, as_json: bool) -> None:
    """Once the node is up: what it built while starting (modules, settings, cores: most of
    its objects) moves out of the collector's sight for good (gc.freeze), then the status
    screen. Without it a full collection walked them all: pauses of 300 ms, every one
    finding nothing, made a gateway's p99 ten times its p50 (docs/benchmarks.md)."""
    import gc

    gc.collect()
    gc.freeze()
    _ready(node, as_json)


def _ready(node: Node, as_json: bool) -> None:
    """The status screen once the node is up."""
    # plain click output (not rich): the daemon then never loads rich at all
    if as_json:
        click.echo(json.dumps(node.status()), err=False)
        sys.stdout.flush()
        return
    st = node.status()
    click.echo(click.style("meshd is up", fg="green", bold=True)
               + f"  {st['name']} ({st['short_id']}) at {st['address']}  "
               f"profile {st['profile']}")
    click.echo(f"  data dir   {st['data_dir']}")
    alive = st["members"].get("alive", 1)
    verb = "created a new cluster" if node.created_cluster else "in a cluster"
    click.echo(f"  cluster    {verb} of {alive} alive member(s)")
    if st.get("api"):
        click.echo(f"  api        http{'s' if node.settings.node.tls_cert else ''}://"
                   f"{st['api']}/")
    if st.get("web"):
        click.echo(f"  web        http{'s' if node.settings.node.tls_cert else ''}://"
                   f"{st['web']}/")
    if st.get("metrics"):
        click.echo(f"  metrics    http{'s' if node.settings.node.tls_cert else ''}://"
                   f"{st['metrics']}/metrics")
    click.echo("  others join with `meshd invite` on this host, which prints:")
    click.echo(f"    MESHD_SECRET=… meshd up --join {st['address']}")
    if node.bootstrap_token:
        click.echo("  " + click.style("admin token", bold=True)
                   + " (shown once; also saved in the data dir as admin.token):")
        click.echo(f"    {node.bootstrap_token}")
    click.echo("  Ctrl-C leaves the cluster gracefully.")
    sys.stdout.flush()


def _systemd_unit(user: str, data_dir: Path | None) -> str:
    """The unit for this command line: the options given (but these two and --json)."""
    import shutil

    from meshd import systemd_unit

    ctx = click.get_current_context()
    where = str(data_dir.expanduser().resolve()) if data_dir else systemd_unit.DATA_DIR
    found = shutil.which("meshd")
    command = [os.path.abspath(found)] if found else [sys.executable, "-m", "meshd_cli"]
    command += ["up", "--data-dir", where]
    skip = {"print_systemd_unit", "unit_user", "as_json", "data_dir", "print_settings"}
    for param in ctx.command.params:
        value = ctx.params.get(param.name or "")
        if param.name in skip or value in (None, False, ()) or not param.opts:
            continue
        option = max(param.opts, key=len)
        if value is True:
            command.append(option)
            continue
        for one in value if isinstance(value, tuple) else (value,):
            command += [option, str(one)]
    try:
        return systemd_unit.unit(command, user, where)
    except systemd_unit.UnitError as exc:
        fail(f"400 bad request: {exc}")


def _toml(data: dict[str, Any]) -> str:
    lines = [f"profile = {json.dumps(data['profile'])}"]
    from meshd.settings import SECTIONS

    for section in ("node", *SECTIONS):
        lines.append(f"\n[{section}]")
        for key, value in data[section].items():
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, list | tuple):
                text = json.dumps(list(value))
            else:
                text = json.dumps(value)
            lines.append(f"{key} = {text}")
    return "\n".join(lines)


@click.command()
@client_options
@json_option
def status(client: Client, as_json: bool) -> None:
    """Show this node's status."""
    st = client.call("status")
    if as_json:
        click.echo(json.dumps(st))
        return
    counts = ", ".join(f"{v} {k}" for k, v in sorted(st["members"].items()))
    console.print(f"[bold]{st['name']}[/] ({st['short_id']}) at {st['address']}  "
                  f"meshd {st['version']}, profile {st['profile']}, up {st['uptime_s']:.0f} s")
    console.print(f"  members    {counts}")
    console.print(f"  health     {st['health_score']} (0 is best), incarnation "
                  f"{st['incarnation']}, {st['links']} secure link(s)")
    if "data_dir" in st:  # a node does not tell a remote environment its paths
        console.print(f"  data dir   {st['data_dir']}")
    dropped = {k: v for k, v in st["stats"].items() if v and ("drop" in k or "fail" in k
                                                               or "error" in k)}
    if dropped:
        console.print("  rejected   " + ", ".join(f"{k}={v}" for k, v in dropped.items()))


COMMANDS: tuple[click.Command, ...] = (up, status)

