"""The one way `meshd` commands reach a daemon.

A command takes `client_options` and is handed a `Client`; it calls ops (`call`), follows
streams (`stream`), holds sessions (`session`) and streams RPCs (`rpc_stream`) through it,
and never opens a connection of its own. Through `call_via` and `tunnel_via` it reaches a
node's proxy endpoint from outside the cluster (`--via wss://HOST:PORT`).

Rules:
- Where the daemon is: --data-dir (MESHD_DATA_DIR), else the default data dir; MESHD_ADDR
  names the control socket itself (`meshd.control.socket_path`).
- Which token goes with a request (`current_token`): --token, MESHD_TOKEN, the one saved by
  `meshd auth login` (`user_token`), else the admin token the first node kept in its data
  dir. Only the user's token (`user_token`) ever leaves this host (`--via`); the data dir's
  admin token is for the local socket only.
- Any MeshError becomes the one-line error and exit status 1 (`cli.output.fail`).
- The transport is chosen here only: `Client._control` is the one place a connection is
  opened. The environment (`--env NAME`, MESHD_ENV, else the one `meshd env set` chose;
  meshd/envs.py) decides which: `local` is the daemon's control socket; any other is the
  same ops over wss:// to a node's proxy (meshd.proxy.remote), acting with the token given
  (--token, MESHD_TOKEN) or the one `meshd auth login --env NAME` kept for that
  environment, never a local token. The commands stay as they are.
- Which namespace (`namespace_option`, `Client.namespace`): --namespace, else
  MESHD_NAMESPACE, else the environment's (`meshd env add --namespace`), else "default".
  The daemon checks the name (an invalid one is its 400 line).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import trio

from meshd.control import ControlClient, socket_path
from meshd.datadir import default_data_dir
from meshd.envs import EnvError, Environment, Environments
from meshd.errors import MeshError
from meshd_cli.output import fail, line


def token_file() -> Path:
    """Where `meshd auth login` keeps the tokens: MESHD_TOKEN_FILE, else the user's config
    dir."""
    env = os.environ.get("MESHD_TOKEN_FILE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_config_dir("meshd")) / "token.json"


def _flag_token() -> str | None:
    """--token given on this command line (not MESHD_TOKEN)."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return None
    root = ctx.find_root()
    if root.meta.get("token"):
        return root.meta["token"]
    if root.get_parameter_source("token") == click.core.ParameterSource.COMMANDLINE:
        return root.params.get("token") or None
    return None


def given_token() -> str | None:
    """A token given for this command: --token, else MESHD_TOKEN."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        root = ctx.find_root()
        if root.meta.get("token"):
            return root.meta["token"]
        if root.params.get("token"):
            return root.params["token"]
    return os.environ.get("MESHD_TOKEN") or None


def user_token() -> str | None:
    """A token the user gave: --token, else MESHD_TOKEN, else the one saved by `meshd auth
    login`. The only tokens that may leave this host (`--via`)."""
    given = given_token()
    if given:
        return given
    try:
        saved = json.loads(token_file().read_text()).get("token")
    except (OSError, ValueError, AttributeError):
        return None
    return saved if isinstance(saved, str) and saved else None


def environment() -> Environment:
    """The environment this command acts in; exits with one line for an unknown one."""
    ctx = click.get_current_context(silent=True)
    chosen = None
    if ctx is not None:
        root = ctx.find_root()
        chosen = root.meta.get("env") or root.params.get("env")
    try:
        return Environments().current(chosen)
    except EnvError as exc:
        fail(f"400 bad request: {exc}")


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


def run(go: Callable[[], Awaitable[Any]], *, until_interrupted: bool = False) -> Any:
    """Run `go` under trio; a MeshError exits with its one line. With `until_interrupted`,
    Ctrl-C ends the command quietly (status 0), for commands that run until then."""
    try:
        return trio.run(go)
    except MeshError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        if not until_interrupted:
            raise
    return None


@dataclass(frozen=True)
class Client:
    """The daemon a command talks to (the node of `data_dir`, or a remote environment's
    proxy), with the token to send."""

    data_dir: Path | None

    @property
    def socket(self) -> Path:
        """The local control socket."""
        return socket_path(self.data_dir or default_data_dir())

    def remote(self) -> Environment | None:
        """The remote environment this command acts in; None for the local daemon."""
        env = environment()
        return None if env.local else env

    def namespace(self, given: str | None) -> str:
        """The namespace a command acts in: --namespace / MESHD_NAMESPACE (`given`), else the
        environment's, else "default"."""
        return given or environment().namespace or "default"

    def remote_token(self, env: Environment) -> str | None:
        """--token, else the environment's own token, else MESHD_TOKEN: a token exported for
        one cluster does not go to another that has its own."""
        return _flag_token() or env.token or given_token() or None

    def _control(self) -> ControlClient:
        """The connection every op goes over."""
        env = self.remote()
        if env is not None:
            from meshd.proxy.remote import RemoteControlClient

            return RemoteControlClient(open_via(env.via, env.ca_file or None, env.name),
                                       token=self.remote_token(env))
        return ControlClient(self.socket, token=current_token(self.data_dir))

    def call(self, op: str, /, **args: Any) -> Any:
        """One control op; its result, or exit with one clear line on failure."""
        control = self._control()

        async def go() -> Any:
            try:
                return await control.call(op, **args)
            finally:
                await control.aclose()

        return run(go)

    def stream(self, op: str, on_event: Callable[[Any], None], /,
               **args: Any) -> None:
        """Follow the streaming `op`, handing each event to `on_event`, until the daemon ends
        the stream or Ctrl-C."""
        control = self._control()

        async def go() -> None:
            try:
                async for event in control.stream(op, **args):
                    on_event(event)
            finally:
                await control.aclose()

        run(go, until_interrupted=True)

    def session(self, op: str, on_open: Callable[[Any], None],
                on_frame: Callable[[Any], None], /, *, closed: str, **args: Any) -> None:
        """Hold the session `op` open until Ctrl-C: `on_open` gets its result, `on_frame`
        each frame the daemon sends; the daemon ending it is a 503 saying `closed`."""
        control = self._control()

        async def go() -> None:
            try:
                info, conn = await control.session(op, **args)
                on_open(info)
                while True:
                    try:
                        frame = await conn.receive()
                    except EOFError:
                        raise MeshError(503, closed) from None
                    on_frame(frame)
            finally:
                await control.aclose()

        run(go, until_interrupted=True)

    def rpc_stream(self, service: str, endpoint: str, requests: Iterable[Any],
                   on_reply: Callable[[Any], None], namespace: str = "default") -> None:
        """A streaming call of ENDPOINT of SERVICE in `namespace`: send each request, then
        hand each reply to `on_reply`."""
        from meshd_sdk import Client as SdkClient

        env = self.remote()
        if env is not None:
            sdk = SdkClient(env=env.name, token=self.remote_token(env))
        else:
            sdk = SdkClient(self.socket, token=current_token(self.data_dir))

        async def go() -> None:
            async with sdk, sdk.stream(service, endpoint, namespace=namespace) as s:
                for item in requests:
                    await s.send(item)
                await s.close_send()  # (a server stream may have ended already: fine)
                async for msg in s:
                    on_reply(msg)

        run(go)


def _make_client(_ctx: click.Context, _param: Any, value: Path | None) -> Client:
    return Client(value)


def _remember_token(ctx: click.Context, _param: Any, value: str | None) -> None:
    if value:
        ctx.find_root().meta["token"] = value


def _remember_env(ctx: click.Context, _param: Any, value: str | None) -> None:
    if value:
        ctx.find_root().meta["env"] = value


def env_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """--env NAME: act in that environment for this command (also MESHD_ENV)."""
    return click.option("--env", "env", expose_value=False, callback=_remember_env,
                        metavar="NAME", help="Act in this environment (`meshd env`; also "
                        "MESHD_ENV).")(f)


def _node_options(callback: Callable[[click.Context, Any, Path | None], Any] | None,
                  name: str) -> Callable[[Callable[..., Any]], Any]:
    """--data-dir as `name` (turned into what `callback` makes of it) and --token."""
    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        f = click.option("--token", expose_value=False, callback=_remember_token,
                         help="Act with this token (also MESHD_TOKEN).")(f)
        return click.option("--data-dir", name, type=click.Path(file_okay=False,
                                                                path_type=Path),
                            envvar="MESHD_DATA_DIR", callback=callback,
                            help="The node's data dir.")(f)

    return decorate


def client_options(f: Callable[..., Any]) -> Callable[..., Any]:
    return env_option(_node_options(_make_client, "client")(f))


client_options.__doc__ = """--data-dir (MESHD_DATA_DIR), --token and --env, for every command
talking to a node: the command gets `client: Client`."""

def _remember_namespace(ctx: click.Context, _param: Any, value: str | None) -> None:
    if value:
        ctx.find_root().meta["namespace"] = value


def chosen_namespace() -> str | None:
    """The --namespace of a command whose option is not passed to it (`exposed=False`)."""
    ctx = click.get_current_context(silent=True)
    return ctx.find_root().meta.get("namespace") if ctx is not None else None


def namespace_option(f: Callable[..., Any], exposed: bool = True) -> Callable[..., Any]:
    """--namespace NS (MESHD_NAMESPACE) as `namespace` (None when not given: the command
    asks `Client.namespace`); with `exposed=False` it is kept for `chosen_namespace`."""
    return click.option("--namespace", "namespace", envvar="MESHD_NAMESPACE",
                        metavar="NS", expose_value=exposed,
                        callback=None if exposed else _remember_namespace,
                        help="The namespace (also MESHD_NAMESPACE; default: the "
                        "environment's, else default).")(f)


data_dir_option = _node_options(None, "data_dir")
"""The same options for `meshd up`, which runs the node of `data_dir: Path | None` itself."""


# --- through a node's proxy endpoint (--via) ----------------------------------------------------

def via_options(via_help: str) -> Callable[[Callable[..., Any]], Any]:
    """--via wss://HOST:PORT (`via`, helped by `via_help`) and --ca-file (`ca_file`)."""
    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        f = click.option("--ca-file", metavar="FILE",
                         help="Trust the --via wss:// proxy's certificate if this CA signed it "
                              "(default: the system trust store).")(f)
        return click.option("--via", metavar="wss://HOST:PORT", help=via_help)(f)

    return decorate


def open_via(url: str, ca_file: str | None, env: str = "") -> Any:
    """The proxy endpoint `--via` (or environment `env`) names (a meshd.proxy.via.Via);
    exits with one line if it cannot be used, warns once on stderr if it is plain text
    across a network."""
    from meshd.proxy.via import Via

    try:
        via = Via(url, ca_file)
    except MeshError as exc:
        fail(f"{exc} (environment {env})" if env else str(exc))
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


def call_via(url: str, ca_file: str | None, op: str, /, **args: Any) -> Any:
    """One request `op` to the proxy endpoint at `url`; exits with one line on failure. Sends
    only the user's token (`user_token`), never the data dir's admin token."""
    import cbor2
    import trio_websocket

    request = {"op": op, "token": user_token(), **args}
    via = open_via(url, ca_file)

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


def tunnel_via(name: str, listen: str, url: str, ca_file: str | None,
               token: str | None = None) -> None:
    """Outside the cluster: accept on `listen`, carry each connection over a WebSocket to the
    proxy endpoint, which checks the user's token against the rules; until Ctrl-C. A wss://
    proxy's certificate is checked once before listening, so a distrusted one fails at once."""
    import cbor2
    import trio_websocket

    from meshd.transport import addr as addrs

    token = token or user_token()
    try:
        host, port = addrs.parse(listen)
    except addrs.AddressError as exc:
        fail(f"400 bad request: --listen: {exc}")
    via = open_via(url, ca_file)

    async def handle(stream: trio.SocketStream) -> None:
        try:
            async with via.connect(max_message_size=2 << 20) as ws:
                await ws.send_message(cbor2.dumps({"op": "tunnel", "token": token,
                                                   "name": name}))
                reply = _proxy_reply(await ws.get_message(), via)
                if not reply.get("ok"):
                    line(f"connection refused: {MeshError.from_dict(reply.get('error'))}",
                         err=True)
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
        line(f"tunnel {name}: listening on {addrs.format(bound[0], bound[1])} via {url}")
        await trio.serve_listeners(handle, listeners)

    try:
        trio.run(main)
    except MeshError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"503 unavailable: cannot listen on {listen}: {exc.strerror or exc}")
    except KeyboardInterrupt:
        pass

