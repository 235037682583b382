"""The `meshd` command.

Rules:
- Every command takes --data-dir (or MESHD_DATA_DIR) to find the node, or MESHD_ADDR.
- Output: rich tables for people; --json prints the control API's own field names.
- Any error is one line on stderr, "<status> <code>: <detail>" (e.g. "404 not found:
  service 'x' has no instances"), and exit status 1; never a traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import trio

from meshd.control import ControlClient, socket_path
from meshd.datadir import default_data_dir
from meshd.errors import MeshError


class _Console:
    """rich's console, created on first use: `meshd up` (the daemon) then carries no more of
    rich than its status screen needs.

    On a terminal, rich fits tables to its width. Anywhere else (a pipe, a file) rich would
    assume 80 columns and fold or ellipsize cells ("127.0.0.1…"); there the console is
    PIPE_WIDTH wide instead, so tables keep their natural width and every cell its full
    text, for grep and scripts. Colour codes are left out there as usual."""

    PIPE_WIDTH = 100_000

    def __getattr__(self, name: str) -> Any:
        real = self.__dict__.get("_real")
        if real is None:
            from rich.console import Console

            try:
                tty = sys.stdout.isatty()
            except (AttributeError, ValueError):  # replaced or closed stdout
                tty = False
            real = Console() if tty else Console(width=self.PIPE_WIDTH)
            self.__dict__["_real"] = real
        return getattr(real, name)


console: Any = _Console()


def Table(*args: Any, **kwargs: Any) -> Any:
    from rich.table import Table as RichTable

    return RichTable(*args, **kwargs)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("meshd")
    except PackageNotFoundError:
        return "0+unknown"


def fail(message: str) -> None:
    click.echo(message, err=True)
    sys.exit(1)


def _remember_token(ctx: click.Context, _param: Any, value: str | None) -> None:
    if value:
        ctx.find_root().meta["token"] = value


def data_dir_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """--data-dir (MESHD_DATA_DIR) and --token, which every command talking to a node takes."""
    f = click.option("--token", expose_value=False, callback=_remember_token,
                     help="Act with this token (also MESHD_TOKEN).")(f)
    return click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
                        envvar="MESHD_DATA_DIR", help="The node's data dir.")(f)


def json_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(f)


def token_file() -> Path:
    env = os.environ.get("MESHD_TOKEN_FILE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_config_dir("meshd")) / "token.json"


def user_token() -> str | None:
    """A token the user gave: --token, else MESHD_TOKEN, else the one saved by `meshd auth
    login`. The only tokens that may leave this host (`--via`)."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        root = ctx.find_root()
        if root.meta.get("token"):
            return root.meta["token"]
        if root.params.get("token"):
            return root.params["token"]
    if os.environ.get("MESHD_TOKEN"):
        return os.environ["MESHD_TOKEN"]
    try:
        saved = json.loads(token_file().read_text()).get("token")
    except (OSError, ValueError, AttributeError):
        return None
    return saved if isinstance(saved, str) and saved else None


def current_token(data_dir: Path | None = None) -> str | None:
    """For the local node: the user's token (`user_token`), else the admin token the first
    node kept in its data dir for the local CLI. Never sent through a proxy (`--via`)."""
    given = user_token()
    if given:
        return given
    try:
        admin = ((data_dir or default_data_dir()) / "admin.token").read_text().strip()
    except OSError:
        return None
    from meshd.auth.tokens import TokenError, unverified_claims

    try:  # an expired admin token would lock the operator out: then act as the node
        if unverified_claims(admin).get("exp", 0) > time.time() + 60:
            return admin
    except TokenError:
        pass
    return None


def call(data_dir: Path | None, op: str, /, **args: Any) -> Any:
    """One control call; exits with one clear line on failure."""
    path = socket_path(data_dir or default_data_dir())
    token = current_token(data_dir)

    async def go() -> Any:
        client = ControlClient(path, token=token)
        try:
            return await client.call(op, **args)
        finally:
            await client.aclose()

    try:
        return trio.run(go)
    except MeshError as exc:
        fail(str(exc))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--token", envvar="MESHD_TOKEN", help="Act with this token (or MESHD_TOKEN; "
              "default: the one saved by `meshd auth login`, else as the local operator).")
def main(token: str | None) -> None:
    """meshd: one daemon per host; services, store, config, auth and routing over gossip."""


@main.command("version")
@json_option
def version_cmd(as_json: bool) -> None:
    """Print the meshd version."""
    from meshd.membership.messages import VERSION

    info = {"version": _version(), "membership_protocol": VERSION}
    if as_json:
        click.echo(json.dumps(info))
    else:
        click.echo(f"meshd {info['version']} (membership protocol {VERSION})")


# --- up --------------------------------------------------------------------------------

@main.command()
@click.option("--name", help="Node name, unique in the cluster (default: host name).")
@click.option("--bind", help="HOST:PORT for gossip and links (default 0.0.0.0:7946).")
@click.option("--advertise", help="HOST:PORT others reach us at (or ws://HOST:PORT).")
@click.option("--ws-listen", help="Also accept links over WebSocket on HOST:PORT.")
@click.option("--proxy-listen", help="Serve outside clients (WebSocket, tokens) on HOST:PORT.")
@click.option("--tls-cert", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="PEM certificate (chain) for the proxy endpoint: it then serves wss://.")
@click.option("--tls-key", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="The unencrypted PEM private key of --tls-cert.")
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
@data_dir_option
@json_option
def up(name: str | None, bind: str | None, advertise: str | None, ws_listen: str | None,
       proxy_listen: str | None, tls_cert: Path | None, tls_key: Path | None,
       join: tuple[str, ...], auth_root: str | None,
       tags: tuple[str, ...], profile: str | None, secret_file: Path | None,
       config_file: Path | None, log_level: str | None, print_settings: bool,
       data_dir: Path | None, as_json: bool) -> None:
    """Run a node in the foreground (Ctrl-C leaves the cluster gracefully)."""
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
             "proxy_listen": proxy_listen,
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

    def ready(node: Node) -> None:
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
        click.echo("  others join with `meshd invite` on this host, which prints:")
        click.echo(f"    MESHD_SECRET=… meshd up --join {st['address']}")
        if node.bootstrap_token:
            click.echo("  " + click.style("admin token", bold=True)
                       + " (shown once; also saved in the data dir as admin.token):")
            click.echo(f"    {node.bootstrap_token}")
        click.echo("  Ctrl-C leaves the cluster gracefully.")
        sys.stdout.flush()

    node = Node(settings, secret, on_ready=ready)
    try:
        trio.run(node.run)
    except NodeError as exc:
        fail(f"503 unavailable: {exc}")
    except KeyboardInterrupt:
        pass


def _toml(data: dict[str, Any]) -> str:
    lines = [f"profile = {json.dumps(data['profile'])}"]
    for section in ("node", "membership", "limits", "rpc", "store"):
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


# --- cluster commands ----------------------------------------------------------------------

@main.command("join")
@click.argument("peers", nargs=-1, required=True)
@data_dir_option
@json_option
def join_cmd(peers: tuple[str, ...], data_dir: Path | None, as_json: bool) -> None:
    """Make the running node join the cluster of PEERS."""
    result = call(data_dir, "join", peers=list(peers))
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"joined through {result['joined']} of {len(peers)} peer(s)")
        for line in result["errors"]:
            click.echo(f"  failed: {line}")


@main.command()
@data_dir_option
@json_option
def leave(data_dir: Path | None, as_json: bool) -> None:
    """Leave the cluster gracefully and stop the node."""
    result = call(data_dir, "leave")
    click.echo(json.dumps(result) if as_json else "left the cluster; the node is stopping")


@main.command()
@click.option("--status", "status_filter", help="Only members with this status.")
@data_dir_option
@json_option
def members(status_filter: str | None, data_dir: Path | None, as_json: bool) -> None:
    """List the members this node knows."""
    rows = call(data_dir, "members")
    if status_filter:
        rows = [r for r in rows if r["status"] == status_filter]
    if as_json:
        click.echo(json.dumps(rows))
        return
    table = Table(show_header=True, header_style="bold")
    for col in ("name", "id", "address", "status", "incarnation", "tags", "rtt", "reach"):
        table.add_column(col)
    colors = {"alive": "green", "suspect": "yellow", "dead": "red", "left": "dim"}
    for r in rows:
        tags = ",".join(f"{k}={v}" for k, v in r["tags"].items())
        rtt = "-" if r["rtt_ms"] is None else f"{r['rtt_ms']:.2f} ms"
        table.add_row(r["name"] + (" *" if r["self"] else ""), r["id"][:8], r["address"],
                      f"[{colors.get(r['status'], 'white')}]{r['status']}[/]",
                      str(r["incarnation"]), tags, rtt, r.get("reach", ""))
    console.print(table)


@main.command()
@data_dir_option
@json_option
def status(data_dir: Path | None, as_json: bool) -> None:
    """Show this node's status."""
    st = call(data_dir, "status")
    if as_json:
        click.echo(json.dumps(st))
        return
    counts = ", ".join(f"{v} {k}" for k, v in sorted(st["members"].items()))
    console.print(f"[bold]{st['name']}[/] ({st['short_id']}) at {st['address']}  "
                  f"meshd {st['version']}, profile {st['profile']}, up {st['uptime_s']:.0f} s")
    console.print(f"  members    {counts}")
    console.print(f"  health     {st['health_score']} (0 is best), incarnation "
                  f"{st['incarnation']}, {st['links']} secure link(s)")
    console.print(f"  data dir   {st['data_dir']}")
    dropped = {k: v for k, v in st["stats"].items() if v and ("drop" in k or "fail" in k
                                                               or "error" in k)}
    if dropped:
        console.print("  rejected   " + ", ".join(f"{k}={v}" for k, v in dropped.items()))


@main.command()
@data_dir_option
@json_option
def invite(data_dir: Path | None, as_json: bool) -> None:
    """Print the one-line command another host runs to join (secret included)."""
    inv = call(data_dir, "invite")
    if as_json:
        click.echo(json.dumps(inv))
    else:
        click.echo(inv["command"])


# --- keys ----------------------------------------------------------------------------------

@main.group()
def keys() -> None:
    """Manage the cluster secrets (roll a new one in without downtime)."""


def _key_op(op: str) -> Callable[..., None]:
    @click.argument("secret")
    @data_dir_option
    @json_option
    def command(secret: str, data_dir: Path | None, as_json: bool) -> None:
        result = call(data_dir, f"keys.{op}", secret=secret)
        if as_json:
            click.echo(json.dumps(result))
            return
        click.echo(f"{op}: {result['ok']} of {result['nodes']} node(s) done")
        for line in result["errors"]:
            click.echo(f"  failed: {line}")
        if result["errors"]:
            sys.exit(1)

    command.__doc__ = {"install": "Add SECRET to every member's keyring.",
                       "use": "Make SECRET the one every member seals with.",
                       "remove": "Remove SECRET from every member's keyring."}[op]
    return command


for _op in ("install", "use", "remove"):
    keys.command(_op)(_key_op(_op))


@keys.command("list")
@data_dir_option
@json_option
def keys_list(data_dir: Path | None, as_json: bool) -> None:
    """List the secrets in the cluster and how many members hold each."""
    result = call(data_dir, "keys.list")
    if as_json:
        click.echo(json.dumps(result))
        return
    table = Table(show_header=True, header_style="bold")
    for col in ("secret", "members holding it", "primary on"):
        table.add_column(col)
    for k in result["keys"]:
        table.add_row(k["key"], f"{k['nodes']}/{result['total_nodes']}", str(k["primary_on"]))
    console.print(table)


@main.command("new-secret")
@json_option
def new_secret_cmd(as_json: bool) -> None:
    """Print a fresh random cluster secret (for `meshd keys install`)."""
    from meshd.secure.keyring import format_secret, new_secret

    secret = format_secret(new_secret())
    click.echo(json.dumps({"secret": secret}) if as_json else secret)


# --- services ----------------------------------------------------------------------------

@main.command()
@data_dir_option
@json_option
def services(data_dir: Path | None, as_json: bool) -> None:
    """List the services in the registry."""
    rows = call(data_dir, "services")
    if as_json:
        click.echo(json.dumps(rows))
        return
    table = Table(show_header=True, header_style="bold")
    for col in ("service", "instances", "nodes", "versions"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], str(r["instances"]), ",".join(r["nodes"]),
                      ",".join(r["versions"]))
    console.print(table)


@main.command()
@click.argument("service")
@data_dir_option
@json_option
def describe(service: str, data_dir: Path | None, as_json: bool) -> None:
    """Show a service's instances, nodes and endpoints with their formats."""
    info = call(data_dir, "describe", service=service)
    if as_json:
        click.echo(json.dumps(info))
        return
    console.print(f"[bold]{info['name']}[/]")
    for inst in info["instances"]:
        console.print(f"  instance {inst['id']} on {inst['node']} ({inst['address']}) "
                      f"version {inst.get('version') or '-'}")
    first = info["instances"][0]
    for ep in first["endpoints"]:
        console.print(f"  endpoint [bold]{ep['name']}[/]")
        console.print(f"    request  {json.dumps(ep.get('request'))}")
        console.print(f"    response {json.dumps(ep.get('response'))}")


@main.command("call")
@click.argument("service")
@click.argument("endpoint")
@click.argument("body", required=False)
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), help="Seconds.")
@click.option("--meta", multiple=True, metavar="K=V", help="Request metadata (repeatable).")
@click.option("--via", metavar="wss://HOST:PORT",
              help="Call from outside the cluster through a node's proxy endpoint with your "
                   "token (--token, MESHD_TOKEN or `auth login`).")
@click.option("--ca-file", metavar="FILE",
              help="Trust the --via wss:// proxy's certificate if this CA signed it "
                   "(default: the system trust store).")
@data_dir_option
@json_option
def call_cmd(service: str, endpoint: str, body: str | None, timeout: float | None,
             meta: tuple[str, ...], via: str | None, ca_file: str | None,
             data_dir: Path | None, as_json: bool) -> None:
    """Call ENDPOINT of SERVICE with a JSON BODY (or JSON on stdin)."""
    text = body if body is not None and body != "-" else (
        sys.stdin.read() if not sys.stdin.isatty() else "{}")
    try:
        request = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as exc:
        fail(f"400 bad request: the request is not valid JSON: {exc.msg} at line {exc.lineno} "
             f"column {exc.colno}")
    metadata = {}
    for item in meta:
        key, sep, value = item.partition("=")
        if not sep:
            fail(f"400 bad request: --meta {item!r} must look like key=value")
        metadata[key] = value
    if ca_file and not via:
        fail("400 bad request: --ca-file goes with --via wss://HOST:PORT")
    if via:
        result = _via(via, ca_file, {"op": "call", "token": user_token(), "service": service,
                                     "endpoint": endpoint, "body": request,
                                     "timeout": timeout, "meta": metadata})
    else:
        result = call(data_dir, "rpc.call", service=service, endpoint=endpoint, body=request,
                      timeout=timeout, meta=metadata)
    click.echo(json.dumps(result) if as_json else json.dumps(result, indent=2))


@main.command()
@click.argument("service")
@data_dir_option
@json_option
def health(service: str, data_dir: Path | None, as_json: bool) -> None:
    """Check every instance of SERVICE."""
    rows = call(data_dir, "health", service=service)
    if as_json:
        click.echo(json.dumps(rows))
    else:
        table = Table(show_header=True, header_style="bold")
        for col in ("instance", "node", "status", "latency", "detail"):
            table.add_column(col)
        for r in rows:
            color = "green" if r["status"] == "ok" else "red"
            table.add_row(r["id"], r["node"], f"[{color}]{r['status']}[/]",
                          f"{r['latency_ms']:.2f} ms", r["detail"])
        console.print(table)
    if any(r["status"] != "ok" for r in rows):
        sys.exit(1)


@main.command()
@data_dir_option
@json_option
def watch(data_dir: Path | None, as_json: bool) -> None:
    """Stream registry changes (create, update, delete) until interrupted."""
    path = socket_path(data_dir or default_data_dir())

    async def go() -> None:
        client = ControlClient(path)
        try:
            async for ev in client.stream("services.watch"):
                if as_json:
                    click.echo(json.dumps(ev))
                else:
                    inst = ev["instance"]
                    click.echo(f"{ev['kind']:7} {inst.get('service', '?')} {inst.get('id')} "
                               f"on {inst.get('node')}")
                sys.stdout.flush()
        finally:
            await client.aclose()

    try:
        trio.run(go)
    except MeshError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        pass


@main.command("stream")
@click.argument("service")
@click.argument("endpoint")
@click.argument("body", required=False)
@data_dir_option
@json_option
def stream_cmd(service: str, endpoint: str, body: str | None, data_dir: Path | None,
               as_json: bool) -> None:
    """Call a streaming ENDPOINT: send BODY (or each JSON line of stdin), print each reply."""
    from sdk import Client

    lines: list[Any] = []
    try:
        if body is not None and body != "-":
            lines = [json.loads(body)]
        elif not sys.stdin.isatty():
            lines = [json.loads(line) for line in sys.stdin if line.strip()]
    except json.JSONDecodeError as exc:
        fail(f"400 bad request: the request is not valid JSON: {exc.msg} at column "
             f"{exc.colno}")

    async def go() -> None:
        client = Client(socket_path(data_dir or default_data_dir()),
                        token=current_token(data_dir))
        async with client.stream(service, endpoint) as s:
            for item in lines:
                await s.send(item)
            await s.close_send()
            async for msg in s:
                click.echo(json.dumps(msg) if as_json else json.dumps(msg, indent=2))
                sys.stdout.flush()

    try:
        trio.run(go)
    except MeshError as exc:
        fail(str(exc))


# --- store -------------------------------------------------------------------------------

def _store_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--table", default="store", show_default=True, help="Table.")(f)
    f = click.option("--database", default="default", show_default=True, help="Database.")(f)
    return data_dir_option(json_option(f))


def _record_json(rec: dict[str, Any]) -> dict[str, Any]:
    out = dict(rec)
    if isinstance(out.get("value"), bytes):
        try:
            out["value"] = out["value"].decode()
        except UnicodeDecodeError:
            import base64

            out["value_base64"] = base64.b64encode(out.pop("value")).decode()
    return out


@main.group()
def store() -> None:
    """The replicated key-value store."""


@store.command("write")
@click.argument("key")
@click.argument("value")
@click.option("--ttl", type=click.FloatRange(min=0, min_open=True), help="Expire after seconds.")
@click.option("--replicas", type=click.IntRange(min=1), default=1,
              help="Wait until this many nodes hold the write.")
@click.option("--meta", multiple=True, metavar="K=V", help="Record metadata (repeatable).")
@_store_options
def store_write(key: str, value: str, ttl: float | None, replicas: int, meta: tuple[str, ...],
                database: str, table: str, data_dir: Path | None, as_json: bool) -> None:
    """Write VALUE under KEY (VALUE "-" reads it from stdin)."""
    raw = sys.stdin.buffer.read() if value == "-" else value.encode()
    metadata = {}
    for item in meta:
        k, sep, v = item.partition("=")
        if not sep:
            fail(f"400 bad request: --meta {item!r} must look like key=value")
        metadata[k] = v
    rec = call(data_dir, "store.write", database=database, table=table, key=key,
               value=raw, ttl=ttl, replicas=replicas, metadata=metadata)
    click.echo(json.dumps(_record_json(rec)) if as_json else f"wrote {key}")


@store.command("read")
@click.argument("key", required=False)
@click.option("--prefix", help="All keys with this prefix.")
@click.option("--suffix", help="All keys with this suffix.")
@click.option("--limit", type=click.IntRange(min=0), default=0)
@click.option("--offset", type=click.IntRange(min=0), default=0)
@_store_options
def store_read(key: str | None, prefix: str | None, suffix: str | None, limit: int,
               offset: int, database: str, table: str, data_dir: Path | None,
               as_json: bool) -> None:
    """Read KEY (or the keys matching --prefix/--suffix)."""
    if key is None and prefix is None and suffix is None:
        prefix = ""
    rows = call(data_dir, "store.read", database=database, table=table, key=key,
                prefix=prefix, suffix=suffix, limit=limit, offset=offset)
    recs = [_record_json(r) for r in rows]
    if as_json:
        click.echo(json.dumps(recs[0] if key is not None else recs))
        return
    for r in recs:
        shown = r.get("value", r.get("value_base64", r.get("counter", r.get("members"))))
        click.echo(shown if key is not None else f"{r['key']}\t{shown}")


@store.command("delete")
@click.argument("key")
@_store_options
def store_delete(key: str, database: str, table: str, data_dir: Path | None,
                 as_json: bool) -> None:
    """Delete KEY."""
    result = call(data_dir, "store.delete", database=database, table=table, key=key)
    click.echo(json.dumps(result) if as_json else f"deleted {key}")


@store.command("list")
@click.option("--prefix")
@click.option("--limit", type=click.IntRange(min=0), default=0)
@_store_options
def store_list(prefix: str | None, limit: int, database: str, table: str,
               data_dir: Path | None, as_json: bool) -> None:
    """List keys."""
    keys = call(data_dir, "store.list", database=database, table=table, prefix=prefix,
                limit=limit)
    click.echo(json.dumps(keys) if as_json else "\n".join(keys))


@store.command("databases")
@data_dir_option
@json_option
def store_databases(data_dir: Path | None, as_json: bool) -> None:
    """List databases."""
    names = call(data_dir, "store.databases")
    click.echo(json.dumps(names) if as_json else "\n".join(names))


@store.command("tables")
@click.option("--database", default="default", show_default=True)
@data_dir_option
@json_option
def store_tables(database: str, data_dir: Path | None, as_json: bool) -> None:
    """List the tables of a database."""
    names = call(data_dir, "store.tables", database=database)
    click.echo(json.dumps(names) if as_json else "\n".join(names))


@store.command("counter")
@click.argument("key")
@click.argument("delta", type=int, default=0)
@_store_options
def store_counter(key: str, delta: int, database: str, table: str, data_dir: Path | None,
                  as_json: bool) -> None:
    """Add DELTA (may be negative; 0 reads) to the counter KEY."""
    r = call(data_dir, "store.counter", database=database, table=table, key=key, delta=delta)
    click.echo(json.dumps(r) if as_json else str(r["counter"]))


@store.command("set")
@click.argument("op", type=click.Choice(["add", "remove", "members"]))
@click.argument("key")
@click.argument("member", required=False)
@_store_options
def store_set(op: str, key: str, member: str | None, database: str, table: str,
              data_dir: Path | None, as_json: bool) -> None:
    """Add or remove MEMBER of the set KEY, or list its members."""
    r = call(data_dir, "store.set", database=database, table=table, key=key, op=op,
             member=member)
    click.echo(json.dumps(r) if as_json else "\n".join(r["members"]))


def _watch(data_dir: Path | None, op: str, show: Callable[[Any], str], **args: Any) -> None:
    path = socket_path(data_dir or default_data_dir())
    token = current_token(data_dir)

    async def go() -> None:
        client = ControlClient(path, token=token)
        try:
            async for ev in client.stream(op, **args):
                click.echo(show(ev))
                sys.stdout.flush()
        finally:
            await client.aclose()

    try:
        trio.run(go)
    except MeshError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        pass


@store.command("watch")
@click.option("--prefix", default="")
@click.option("--table", help="Only this table (default: all).")
@click.option("--database", default="default", show_default=True)
@data_dir_option
@json_option
def store_watch(prefix: str, table: str | None, database: str, data_dir: Path | None,
                as_json: bool) -> None:
    """Stream changes under a key prefix as they land on this node."""
    def show(ev: Any) -> str:
        ev = {**ev, "record": _record_json(ev["record"])}
        if as_json:
            return json.dumps(ev)
        what = "deleted" if ev["deleted"] else "written"
        return f"{ev['table']}/{ev['key']} {what} ({ev['origin']})"

    _watch(data_dir, "store.watch", show, database=database, table=table, prefix=prefix)


@store.command("export")
@_store_options
def store_export(database: str, table: str, data_dir: Path | None, as_json: bool) -> None:
    """Print every record of a table as JSON lines (for backup)."""
    import base64

    for rec in call(data_dir, "store.read", database=database, table=table, prefix=""):
        line = {"key": rec["key"]}
        if "value" in rec:
            line.update({"value_base64": base64.b64encode(rec["value"]).decode(),
                         "metadata": rec.get("metadata") or {}, "expiry": rec.get("expiry")})
        if "counter" in rec:
            line["counter"] = rec["counter"]
        if "members" in rec:
            line["members"] = rec["members"]
        click.echo(json.dumps(line))


@store.command("import")
@click.argument("file", type=click.File("r"), default="-")
@_store_options
def store_import(file: Any, database: str, table: str, data_dir: Path | None,
                 as_json: bool) -> None:
    """Write the JSON lines of FILE (from `export`) into a table."""
    import base64
    import binascii

    count = 0
    for n, line in enumerate(file, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            key = rec["key"]
            if "value_base64" in rec:
                value = base64.b64decode(rec["value_base64"], validate=True)
                ttl = None
                if rec.get("expiry"):
                    import time as _time

                    ttl = rec["expiry"] / 1000 - _time.time()
                    if ttl <= 0:
                        continue
                call(data_dir, "store.write", database=database, table=table, key=key,
                     value=value, metadata=rec.get("metadata") or {}, ttl=ttl)
            if rec.get("counter"):
                call(data_dir, "store.counter", database=database, table=table, key=key,
                     delta=int(rec["counter"]))
            for member in rec.get("members", []):
                call(data_dir, "store.set", database=database, table=table, key=key, op="add",
                     member=member)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, binascii.Error) as exc:
            fail(f"400 bad request: line {n} is not an exported record: {exc}")
        count += 1
    click.echo(json.dumps({"imported": count}) if as_json else f"imported {count} records")


# --- config ----------------------------------------------------------------------------------

@main.group()
def config() -> None:
    """Dynamic config: JSON values at dot paths, replicated, watched."""


def _ns_option(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--namespace", default="default", show_default=True)(f)
    return data_dir_option(json_option(f))


@config.command("get")
@click.argument("path", default="")
@_ns_option
def config_get(path: str, namespace: str, data_dir: Path | None, as_json: bool) -> None:
    """Print the JSON value at PATH (all of the namespace without one)."""
    r = call(data_dir, "config.get", namespace=namespace, path=path)
    click.echo(json.dumps(r["value"]) if as_json else json.dumps(r["value"], indent=2))


@config.command("set")
@click.argument("path")
@click.argument("value")
@_ns_option
def config_set(path: str, value: str, namespace: str, data_dir: Path | None,
               as_json: bool) -> None:
    """Set PATH to the JSON VALUE."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        fail(f"400 bad request: value is not valid JSON: {exc.msg} at line {exc.lineno} "
             f"column {exc.colno} (strings need quotes: '\"text\"')")
    r = call(data_dir, "config.set", namespace=namespace, path=path, value=parsed)
    click.echo(json.dumps(r) if as_json else f"set {path}")


@config.command("del")
@click.argument("path")
@_ns_option
def config_del(path: str, namespace: str, data_dir: Path | None, as_json: bool) -> None:
    """Delete PATH (and everything below it)."""
    r = call(data_dir, "config.del", namespace=namespace, path=path)
    click.echo(json.dumps(r) if as_json else f"deleted {path}")


@config.command("watch")
@click.argument("path", default="")
@_ns_option
def config_watch(path: str, namespace: str, data_dir: Path | None, as_json: bool) -> None:
    """Print PATH's value each time it changes (one JSON line per change with --json)."""
    def show(ev: Any) -> str:
        if as_json:
            return json.dumps(ev)
        return f"{ev['path']} = {json.dumps(ev['value'])}" if not ev["deleted"] \
            else f"{ev['path']} deleted"

    _watch(data_dir, "config.watch", show, namespace=namespace, path=path)


# --- auth ------------------------------------------------------------------------------------

@main.group()
def auth() -> None:
    """Accounts, rules and tokens."""


@auth.command("login")
@click.option("--id", "account", required=True, help="Account id.")
@click.option("--secret", prompt=True, hide_input=True, help="Account secret.")
@data_dir_option
@json_option
def auth_login(account: str, secret: str, data_dir: Path | None, as_json: bool) -> None:
    """Log in; the tokens are kept in your config dir for later commands."""
    r = call(data_dir, "auth.login", id=account, secret=secret, source=f"uid:{os.getuid()}")
    path = token_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    from meshd.datadir import write_json

    write_json(path, {"token": r["token"], "refresh_token": r["refresh_token"],
                      "account": r["account"]})
    click.echo(json.dumps(r) if as_json else f"logged in as {r['account']} (token kept in {path})")


@auth.command("logout")
def auth_logout() -> None:
    """Forget the saved tokens."""
    token_file().unlink(missing_ok=True)
    click.echo("logged out")


@auth.command("whoami")
@data_dir_option
@json_option
def auth_whoami(data_dir: Path | None, as_json: bool) -> None:
    """Who the daemon takes you for."""
    r = call(data_dir, "auth.whoami")
    click.echo(json.dumps(r) if as_json else f"{r['id']} (scopes: {', '.join(r['scopes']) or '-'};"
               f" via {r['via']})")


@auth.command("bootstrap")
@data_dir_option
@json_option
def auth_bootstrap(data_dir: Path | None, as_json: bool) -> None:
    """Set up auth on a cluster that has none (the first node does this itself)."""
    r = call(data_dir, "auth.bootstrap")
    click.echo(json.dumps(r) if as_json else f"admin token: {r['token']}")


@auth.group("accounts")
def auth_accounts() -> None:
    """Accounts."""


@auth_accounts.command("list")
@data_dir_option
@json_option
def accounts_list(data_dir: Path | None, as_json: bool) -> None:
    rows = call(data_dir, "auth.accounts.list")
    if as_json:
        click.echo(json.dumps(rows))
        return
    for r in rows:
        click.echo(f"{r['id']}\t{r['type']}\t{','.join(r['scopes'])}")


@auth_accounts.command("create")
@click.argument("account")
@click.option("--secret", required=True)
@click.option("--scope", "scopes", multiple=True)
@click.option("--type", "kind", type=click.Choice(["user", "service"]), default="user")
@data_dir_option
@json_option
def accounts_create(account: str, secret: str, scopes: tuple[str, ...], kind: str,
                    data_dir: Path | None, as_json: bool) -> None:
    r = call(data_dir, "auth.accounts.create", id=account, secret=secret, scopes=list(scopes),
             type=kind)
    click.echo(json.dumps(r) if as_json else f"created account {account}")


@auth_accounts.command("delete")
@click.argument("account")
@data_dir_option
@json_option
def accounts_delete(account: str, data_dir: Path | None, as_json: bool) -> None:
    r = call(data_dir, "auth.accounts.delete", id=account)
    click.echo(json.dumps(r) if as_json else f"deleted account {account}")


@auth.group("rules")
def auth_rules() -> None:
    """Access rules."""


@auth_rules.command("list")
@data_dir_option
@json_option
def rules_list(data_dir: Path | None, as_json: bool) -> None:
    rows = call(data_dir, "auth.rules.list")
    if as_json:
        click.echo(json.dumps(rows))
        return
    table = Table(show_header=True, header_style="bold")
    for col in ("id", "resource", "scope", "access", "priority"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["id"], r["resource"], repr(r["scope"]) if not r["scope"] else
                      r["scope"], r["access"], str(r["priority"]))
    console.print(table)


@auth_rules.command("create")
@click.argument("rule_id")
@click.option("--resource", required=True, help="TYPE:NAME:ENDPOINT, '*' allowed.")
@click.option("--scope", default="", help='"" public, "*" any account, or a scope.')
@click.option("--access", type=click.Choice(["granted", "denied"]), required=True)
@click.option("--priority", type=int, default=0)
@data_dir_option
@json_option
def rules_create(rule_id: str, resource: str, scope: str, access: str, priority: int,
                 data_dir: Path | None, as_json: bool) -> None:
    r = call(data_dir, "auth.rules.create", id=rule_id, resource=resource, scope=scope,
             access=access, priority=priority)
    click.echo(json.dumps(r) if as_json else f"created rule {rule_id}")


@auth_rules.command("delete")
@click.argument("rule_id")
@data_dir_option
@json_option
def rules_delete(rule_id: str, data_dir: Path | None, as_json: bool) -> None:
    r = call(data_dir, "auth.rules.delete", id=rule_id)
    click.echo(json.dumps(r) if as_json else f"deleted rule {rule_id}")


@auth.group("token")
def auth_token() -> None:
    """Tokens."""


@auth_token.command("create")
@click.option("--account", required=True)
@click.option("--ttl", type=click.FloatRange(min=1), default=3600.0, show_default=True)
@data_dir_option
@json_option
def token_create(account: str, ttl: float, data_dir: Path | None, as_json: bool) -> None:
    r = call(data_dir, "auth.token.create", account=account, ttl=ttl)
    click.echo(json.dumps({"token": r["token"]}) if as_json else r["token"])


@auth_token.command("revoke")
@click.argument("token_text", metavar="TOKEN")
@data_dir_option
@json_option
def token_revoke(token_text: str, data_dir: Path | None, as_json: bool) -> None:
    r = call(data_dir, "auth.token.revoke", token=token_text)
    click.echo(json.dumps(r) if as_json else f"revoked {r['revoked']}")


@auth.group("keys")
def auth_keys() -> None:
    """Token issuer keys."""


@auth_keys.command("rotate")
@data_dir_option
@json_option
def keys_rotate(data_dir: Path | None, as_json: bool) -> None:
    """Make a new issuer key on this node; old keys keep verifying their tokens."""
    r = call(data_dir, "auth.keys.rotate")
    click.echo(json.dumps(r) if as_json else f"new issuer key {r['kid']} on {r['signer']}")


@auth_keys.command("list")
@data_dir_option
@json_option
def keys_list_cmd(data_dir: Path | None, as_json: bool) -> None:
    """Issuer keys this node trusts: who holds each, who endorsed it, its state."""
    rows = call(data_dir, "auth.keys.list")
    if as_json:
        click.echo(json.dumps(rows))
        return
    table = Table(show_header=True, header_style="bold")
    for col in ("kid", "holder", "endorsed by", "state", "created"):
        table.add_column(col)
    for r in rows:
        created = time.strftime("%Y-%m-%d %H:%M", time.gmtime(r["created"]))
        table.add_row(r["kid"] + (" (root)" if r["root"] else ""), r["signer"],
                      r["endorsed_by"], r["state"], created)
    console.print(table)


@auth_keys.command("revoke")
@click.argument("kid")
@data_dir_option
@json_option
def keys_revoke_cmd(kid: str, data_dir: Path | None, as_json: bool) -> None:
    """Stop trusting issuer key KID now: its tokens stop working everywhere (what it
    signed is signed again with a current key)."""
    r = call(data_dir, "auth.keys.revoke", kid=kid)
    click.echo(json.dumps(r) if as_json else f"revoked issuer key {r['revoked']}")


# --- network -----------------------------------------------------------------------------------

@main.command()
@data_dir_option
@json_option
def routes(data_dir: Path | None, as_json: bool) -> None:
    """The routing table: destination, next hop, path and latency."""
    rows = call(data_dir, "routes")
    if as_json:
        click.echo(json.dumps(rows))
        return
    table = Table(show_header=True, header_style="bold")
    for col in ("destination", "next hop", "path", "latency"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["destination"], r["next_hop"], " -> ".join(r["path"]),
                      f"{r['latency_ms']:.3f} ms")
    console.print(table)


def _svg(nodes: list[str], edges: list[dict[str, Any]]) -> str:
    import math as _math

    size, radius = 600, 240
    pos = {n: (size / 2 + radius * _math.cos(2 * _math.pi * i / max(1, len(nodes))),
               size / 2 + radius * _math.sin(2 * _math.pi * i / max(1, len(nodes))))
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


@main.command()
@click.option("--format", "fmt", type=click.Choice(["table", "dot", "svg"]), default="table")
@data_dir_option
@json_option
def graph(fmt: str, data_dir: Path | None, as_json: bool) -> None:
    """The link graph the routes are computed on (table, Graphviz DOT or an SVG picture)."""
    g = call(data_dir, "graph")
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
        table = Table(show_header=True, header_style="bold")
        for col in ("node", "node", "latency"):
            table.add_column(col)
        for e in g["edges"]:
            table.add_row(e["a"], e["b"], f"{e['latency_ms']:.3f} ms")
        console.print(table)


@main.command()
@click.argument("node")
@click.option("--count", type=click.IntRange(1, 100), default=5, show_default=True)
@data_dir_option
@json_option
def ping(node: str, count: int, data_dir: Path | None, as_json: bool) -> None:
    """Round trips to NODE over the secure link."""
    r = call(data_dir, "ping", node=node, count=count)
    if as_json:
        click.echo(json.dumps(r))
        return
    for i, rtt in enumerate(r["rtt_ms"]):
        click.echo(f"reply from {node} ({r['address']}): seq={i} time={rtt:.3f} ms")
    est = r["vivaldi_estimate_ms"]
    click.echo(f"min {r['min_ms']:.3f} ms, avg {r['avg_ms']:.3f} ms"
               + (f", Vivaldi estimate {est:.3f} ms" if est is not None else ""))


# --- tunnels -----------------------------------------------------------------------------------

@main.group()
def tunnel() -> None:
    """TCP tunnels through the mesh, checked against the rules."""


@tunnel.command("expose")
@click.argument("name")
@click.option("--to", "target", required=True, metavar="HOST:PORT", help="The TCP endpoint.")
@data_dir_option
@json_option
def tunnel_expose(name: str, target: str, data_dir: Path | None, as_json: bool) -> None:
    """Expose HOST:PORT from this node as tunnel NAME."""
    r = call(data_dir, "tunnel.expose", name=name, to=target)
    click.echo(json.dumps(r) if as_json else f"tunnel {name} -> {r['to']} exposed on {r['node']}")


@tunnel.command("close")
@click.argument("name")
@data_dir_option
@json_option
def tunnel_close(name: str, data_dir: Path | None, as_json: bool) -> None:
    """Stop exposing tunnel NAME from this node."""
    r = call(data_dir, "tunnel.close", name=name)
    click.echo(json.dumps(r) if as_json else f"closed tunnel {name}")


@tunnel.command("list")
@data_dir_option
@json_option
def tunnel_list(data_dir: Path | None, as_json: bool) -> None:
    """Tunnels exposed anywhere in the cluster."""
    rows = call(data_dir, "tunnel.list")
    if as_json:
        click.echo(json.dumps(rows))
        return
    for r in rows:
        click.echo(f"{r['name']}\ton {r['node']}\t-> {r['target']}")


@tunnel.command("connect")
@click.argument("name")
@click.option("--listen", required=True, metavar="HOST:PORT",
              help="Local address to accept connections on (loopback unless you mean it).")
@click.option("--via", metavar="wss://HOST:PORT",
              help="From outside the cluster, through a node's proxy endpoint with your token "
                   "(--token, MESHD_TOKEN or `auth login`).")
@click.option("--ca-file", metavar="FILE",
              help="Trust the --via wss:// proxy's certificate if this CA signed it "
                   "(default: the system trust store).")
@data_dir_option
def tunnel_connect(name: str, listen: str, via: str | None, ca_file: str | None,
                   data_dir: Path | None) -> None:
    """Accept connections on --listen and carry each to tunnel NAME, until Ctrl-C.

    The local daemon does the listening and carries the bytes; this command only keeps the
    listener open and reports refused connections."""
    if via:
        _tunnel_via(name, listen, via, ca_file, user_token())
        return
    if ca_file:
        fail("400 bad request: --ca-file goes with --via wss://HOST:PORT")
    path = socket_path(data_dir or default_data_dir())
    token = current_token(data_dir)

    async def main() -> None:
        client = ControlClient(path, token=token)
        try:
            info, conn = await client.session("tunnel.listen", name=name, listen=listen)
            click.echo(f"tunnel {name}: listening on {info['listening']}")
            sys.stdout.flush()
            while True:
                try:
                    frame = await conn.receive()
                except EOFError:
                    raise MeshError(503, "the daemon closed the tunnel listener") from None
                if isinstance(frame, dict) and "refused" in frame:
                    click.echo(f"connection refused: {MeshError.from_dict(frame['refused'])}",
                               err=True)
                    sys.stderr.flush()
        finally:
            await client.aclose()

    try:
        trio.run(main)
    except MeshError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        pass


def _open_via(url: str, ca_file: str | None) -> Any:
    """The proxy endpoint `--via` names (a meshd.proxy.via.Via); exits with one line if it
    cannot be used, warns once on stderr if it is plain text across a network."""
    from meshd.proxy.via import Via

    try:
        via = Via(url, ca_file)
    except MeshError as exc:
        fail(str(exc))
    warning = via.cleartext_warning()
    if warning:
        click.echo(warning, err=True)
    return via


def _proxy_reply(raw: Any, via: Any) -> dict[str, Any]:
    """The proxy's reply map; anything else is a 503 naming the proxy."""
    from meshd import wire

    try:
        reply = wire.loads(raw if isinstance(raw, bytes) else str(raw).encode(),
                           max_depth=66, max_bytes=4 << 20)  # an RPC body (64) in a map
    except wire.WireError:
        reply = None
    if not isinstance(reply, dict):
        raise MeshError(503, f"the proxy at {via.where} did not answer like a meshd proxy")
    return reply


def _via(url: str, ca_file: str | None, request: dict[str, Any]) -> Any:
    """One request to a proxy endpoint; exits with one line on failure. Sends only the token
    in `request` (the user's), never the data dir's admin token."""
    import cbor2
    import trio_websocket

    via = _open_via(url, ca_file)

    async def go() -> Any:
        async with via.connect() as ws:
            await ws.send_message(cbor2.dumps(request))
            reply = _proxy_reply(await ws.get_message(), via)
        if not reply.get("ok"):
            raise MeshError.from_dict(reply.get("error"))
        return reply.get("body")

    try:
        return trio.run(go)
    except MeshError as exc:
        fail(str(exc))
    except (OSError, trio_websocket.HandshakeError, trio_websocket.ConnectionClosed) as exc:
        fail(f"503 unavailable: the proxy at {via.where} closed the connection: {exc}")


def _tunnel_via(name: str, listen: str, url: str, ca_file: str | None,
                token: str | None) -> None:
    """Outside the cluster: accept locally, carry each connection over a WebSocket to the
    proxy endpoint, which checks the token against the rules. A wss:// proxy's certificate
    is checked once before listening, so a distrusted one fails at once."""
    import cbor2
    import trio_websocket

    from meshd.transport import addr as addrs

    try:
        host, port = addrs.parse(listen)
    except addrs.AddressError as exc:
        fail(f"400 bad request: --listen: {exc}")
    via = _open_via(url, ca_file)

    async def handle(stream: trio.SocketStream) -> None:
        try:
            async with via.connect(max_message_size=2 << 20) as ws:
                await ws.send_message(cbor2.dumps({"op": "tunnel", "token": token,
                                                   "name": name}))
                reply = _proxy_reply(await ws.get_message(), via)
                if not reply.get("ok"):
                    click.echo(f"connection refused: {MeshError.from_dict(reply.get('error'))}",
                               err=True)
                    sys.stderr.flush()
                    return

                async def up() -> None:
                    while data := await stream.receive_some(65536):
                        await ws.send_message(data)
                    await ws.send_message(b"")

                async def down() -> None:
                    while True:
                        msg = await ws.get_message()
                        if not msg:
                            await stream.send_eof()
                            return
                        await stream.send_all(msg)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(up)
                    nursery.start_soon(down)
        except MeshError as exc:
            click.echo(f"tunnel {name}: {exc}", err=True)
        except (OSError, trio_websocket.HandshakeError, trio_websocket.ConnectionClosed,
                trio.BrokenResourceError) as exc:
            click.echo(f"tunnel {name}: {exc}", err=True)
        finally:
            await stream.aclose()

    async def main() -> None:
        if via.secure:
            await via.check()
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound = listeners[0].socket.getsockname()
        click.echo(f"tunnel {name}: listening on {addrs.format(bound[0], bound[1])} via {url}")
        sys.stdout.flush()
        await trio.serve_listeners(handle, listeners)

    try:
        trio.run(main)
    except MeshError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"503 unavailable: cannot listen on {listen}: {exc.strerror or exc}")
    except KeyboardInterrupt:
        pass


# --- proxy ---------------------------------------------------------------------------------------

@main.group()
def proxy() -> None:
    """The identity-aware proxy."""


@proxy.command("http")
@click.option("--listen", default="127.0.0.1:8080", show_default=True, metavar="HOST:PORT")
@click.option("--tls-cert", envvar="MESHD_TLS_CERT", metavar="FILE",
              help="PEM certificate (chain): serve https:// (also MESHD_TLS_CERT).")
@click.option("--tls-key", envvar="MESHD_TLS_KEY", metavar="FILE",
              help="The unencrypted PEM private key of --tls-cert (also MESHD_TLS_KEY).")
@data_dir_option
def proxy_http(listen: str, tls_cert: str | None, tls_key: str | None,
               data_dir: Path | None) -> None:
    """Forward HTTP requests to services by name: POST /SERVICE/ENDPOINT with a JSON body and
    Authorization: Bearer TOKEN (runs until Ctrl-C)."""
    from meshd.proxy.http import serve
    from meshd.tlsconf import TlsError, server_context

    try:
        tls = server_context(tls_cert or "", tls_key or "") is not None
    except TlsError as exc:
        fail(f"400 bad request: {exc}")
    path = socket_path(data_dir or default_data_dir())
    scheme = "https" if tls else "http"
    click.echo(f"proxy http: forwarding {scheme}://{listen}/SERVICE/ENDPOINT through {path}")
    sys.stdout.flush()
    try:
        trio.run(functools.partial(serve, path, listen, tls_cert=tls_cert or "",
                                   tls_key=tls_key or ""))
    except OSError as exc:
        fail(f"503 unavailable: cannot listen on {listen}: {exc.strerror or exc}")
    except KeyboardInterrupt:
        pass


from cli import nodes as _nodes  # noqa: E402  (registers `meshd nodes`)

main.add_command(_nodes.nodes)
