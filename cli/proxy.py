"""`meshd proxy`: the identity-aware proxy, run by this command on this host.

Rules:
- `proxy http` serves HTTP (https:// with a certificate) until Ctrl-C and forwards each
  request to the local daemon's control socket with the request's own bearer token; it
  never acts with the CLI's token. A certificate that cannot serve, or an address it cannot
  listen on, is one line before or instead of serving.
"""

from __future__ import annotations

import functools

import click
import trio

from cli.client import Client, client_options
from cli.output import fail, line


@click.group()
def proxy() -> None:
    """The identity-aware proxy."""


@proxy.command("http")
@click.option("--listen", default="127.0.0.1:8080", show_default=True, metavar="HOST:PORT")
@click.option("--tls-cert", envvar="MESHD_TLS_CERT", metavar="FILE",
              help="PEM certificate (chain): serve https:// (also MESHD_TLS_CERT).")
@click.option("--tls-key", envvar="MESHD_TLS_KEY", metavar="FILE",
              help="The unencrypted PEM private key of --tls-cert (also MESHD_TLS_KEY).")
@client_options
def proxy_http(listen: str, tls_cert: str | None, tls_key: str | None,
               client: Client) -> None:
    """Forward HTTP requests to services by name: POST /SERVICE/ENDPOINT with a JSON body and
    Authorization: Bearer TOKEN (runs until Ctrl-C)."""
    from meshd.proxy.http import serve
    from meshd.tlsconf import TlsError, server_context

    try:
        tls = server_context(tls_cert or "", tls_key or "") is not None
    except TlsError as exc:
        fail(f"400 bad request: {exc}")
    path = client.socket
    scheme = "https" if tls else "http"
    line(f"proxy http: forwarding {scheme}://{listen}/SERVICE/ENDPOINT through {path}")
    try:
        trio.run(functools.partial(serve, path, listen, tls_cert=tls_cert or "",
                                   tls_key=tls_key or ""))
    except OSError as exc:
        fail(f"503 unavailable: cannot listen on {listen}: {exc.strerror or exc}")
    except KeyboardInterrupt:
        pass


COMMANDS: tuple[click.Command, ...] = (proxy,)
