"""`meshd bot ...`: the chat bot. `bot slack` runs it for Slack; `bot map`, `bot unmap` and
`bot users` say which meshd account each Slack user acts as.

Rules:
- `bot slack` needs exactly one input: `--listen HOST:PORT` (the Events API, POST
  /slack/events; loopback unless told, https with --tls-cert/--tls-key) or `--socket-mode`
  (an app-level token). Secrets only from files or the environment, never flags:
  `--bot-token-file` or SLACK_BOT_TOKEN, `--signing-secret-file` or SLACK_SIGNING_SECRET
  (Events API), `--app-token-file` or SLACK_APP_TOKEN (Socket Mode). A missing or empty one,
  or a file that cannot be read, is one clear line and exit 1.
- It acts on the node of --data-dir (or MESHD_ADDR), as its operator (the node must hold an
  issuer key: it signs the mapped accounts' tokens) or with --token of an admin. Once it
  serves it prints one line (JSON with --json: {"events": URL or null, "socket_mode"}) and
  runs until interrupted.
- `bot map USER ACCOUNT [--namespace NS]` takes an admin of NS.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click
import trio

from meshd import tlsconf
from meshd.transport import addr as addrs
from meshd_cli.client import Client, client_options, current_token, namespace_option, run
from meshd_cli.output import fail, json_option, say, show


@click.group()
def bot() -> None:
    """The chat bot: query and operate the mesh from Slack."""


def _secret(path: str | None, env: str, what: str, flag: str) -> str:
    if path:
        try:
            value = Path(path).expanduser().read_text().strip()
        except OSError as exc:
            fail(f"400 bad request: {flag} {path}: {exc.strerror or exc}")
    else:
        value = os.environ.get(env, "").strip()
    if not value:
        fail(f"400 bad request: give the {what} with {flag} FILE or {env}")
    return value


@bot.command("slack")
@click.option("--listen", metavar="HOST:PORT",
              help="Serve Slack's Events API at POST /slack/events on HOST:PORT.")
@click.option("--socket-mode", is_flag=True, help="Take events over Socket Mode instead.")
@click.option("--bot-token-file", metavar="FILE", help="The bot token (xoxb-...); or "
              "SLACK_BOT_TOKEN.")
@click.option("--signing-secret-file", metavar="FILE", help="The app's signing secret (Events "
              "API); or SLACK_SIGNING_SECRET.")
@click.option("--app-token-file", metavar="FILE", help="An app-level token (xapp-..., Socket "
              "Mode); or SLACK_APP_TOKEN.")
@click.option("--api-url", default="https://slack.com/api/", show_default=True,
              envvar="MESHD_BOT_SLACK_API", help="Slack's Web API (a test double's, in tests).")
@click.option("--tls-cert", metavar="FILE", help="Serve https with this certificate.")
@click.option("--tls-key", metavar="FILE", help="... and this key.")
@client_options
@json_option
def slack(listen: str | None, socket_mode: bool, bot_token_file: str | None,
          signing_secret_file: str | None, app_token_file: str | None, api_url: str,
          tls_cert: str | None, tls_key: str | None, client: Client, as_json: bool) -> None:
    """Run the bot for Slack until interrupted."""
    if client.remote() is not None:
        fail("400 bad request: meshd bot slack runs beside a node, on its control socket: "
             "run it on the node, without --env")
    if bool(listen) == socket_mode:
        fail("400 bad request: give --listen HOST:PORT (the Events API) or --socket-mode")
    bot_token = _secret(bot_token_file, "SLACK_BOT_TOKEN", "bot token", "--bot-token-file")
    signing = app_token = ""
    where: tuple[str, int] | None = None
    tls = None
    if listen:
        signing = _secret(signing_secret_file, "SLACK_SIGNING_SECRET", "signing secret",
                          "--signing-secret-file")
        try:
            where = addrs.parse(listen)
            tls = tlsconf.server_context(tls_cert or "", tls_key or "")
        except (addrs.AddressError, tlsconf.TlsError) as exc:
            fail(f"400 bad request: --listen {listen}: {exc}")
    else:
        app_token = _secret(app_token_file, "SLACK_APP_TOKEN", "app-level token",
                            "--app-token-file")
    from meshd.bot.slack import SlackBot

    try:
        runner = SlackBot(client.socket, bot_token, signing, app_token, api_url,
                          admin_token=current_token(client.data_dir))
    except Exception as exc:  # Bolt checks the token with Slack (auth.test) at once
        fail(f"503 unavailable: Slack refused the bot token or could not be reached: {exc}")

    async def go() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(runner.run, where, socket_mode, tls)
            url = None
            if where is not None:
                scheme = "https" if tls is not None else "http"
                url = f"{scheme}://{addrs.format(where[0], port)}/slack/events"
            say({"events": url, "socket_mode": socket_mode}, as_json,
                f"meshd bot: Slack events at {url}" if url else
                "meshd bot: connected to Slack over Socket Mode")
            if where is not None and tls is None and not addrs.is_loopback(where[0]):
                click.echo("warning: plain HTTP beyond loopback; give --tls-cert and "
                           "--tls-key", err=True)

    try:
        run(go, until_interrupted=True)
    except OSError as exc:
        fail(f"503 unavailable: {exc.strerror or exc}")


@bot.command("map")
@click.argument("user")
@click.argument("account")
@namespace_option
@client_options
@json_option
def map_(user: str, account: str, namespace: str | None, client: Client,
         as_json: bool) -> None:
    """Let Slack user USER (U...) act as meshd ACCOUNT."""
    r = client.call("bot.map", user=user, account=account,
                    namespace=client.namespace(namespace))
    say(r, as_json, f"{r['user']} acts as {r['account']} (namespace {r['namespace']})")


@bot.command("unmap")
@click.argument("user")
@client_options
@json_option
def unmap(user: str, client: Client, as_json: bool) -> None:
    """USER acts as nobody again."""
    r = client.call("bot.unmap", user=user)
    say(r, as_json, f"{user} acts as nobody")


@bot.command("users")
@click.option("--namespace", help="Only this namespace's (an admin of it may list them).")
@client_options
@json_option
def users(namespace: str | None, client: Client, as_json: bool) -> None:
    """Which Slack users act as which accounts."""
    args: dict[str, Any] = {"namespace": namespace} if namespace else {}
    rows = client.call("bot.users", **args)
    show(rows, as_json, ("user", "account", "namespace"),
         ((r["user"], r["account"], r["namespace"]) for r in rows))


COMMANDS = [bot]
