"""`meshd auth`: accounts, rules, tokens and the token issuer keys.

Rules:
- Thin functions over the `auth.*` control ops; output as everywhere: a table or lines for
  people, `--json` for programs.
- `login` keeps the tokens it gets in the token file (`cli.client.token_file`, 0600), where
  later commands find them; `logout` forgets them. Only those tokens, --token and
  MESHD_TOKEN ever leave this host (`--via`).
- In a remote environment (`--env NAME`), `login` asks that cluster and keeps the tokens
  with the environment (meshd/envs.py), and `logout` forgets those: each environment has
  its own tokens, sent only to it.
- `--namespace NS` (MESHD_NAMESPACE, the environment's, else default) on login, whoami,
  accounts, rules and token create: the namespace whose account logs in, whose accounts and
  rules are listed or changed. A rule's `--scope` may be `NS:SCOPE` (that scope of another
  namespace's accounts). JSON replies carry "namespace".
"""

from __future__ import annotations

import os
import time

import click

from meshd.envs import Environments
from meshd_cli.client import (
    Client,
    client_options,
    env_option,
    environment,
    namespace_option,
    token_file,
)
from meshd_cli.output import json_option, say, show, show_lines


@click.group()
def auth() -> None:
    """Accounts, rules and tokens."""


@auth.command("login")
@click.option("--id", "account", required=True, help="Account id.")
@click.option("--secret", prompt=True, hide_input=True, help="Account secret.")
@namespace_option
@client_options
@json_option
def auth_login(account: str, secret: str, namespace: str | None, client: Client,
               as_json: bool) -> None:
    """Log in (as an account of --namespace); the tokens are kept in your config dir for
    later commands."""
    ns = client.namespace(namespace)
    r = client.call("auth.login", id=account, secret=secret, source=f"uid:{os.getuid()}",
                    namespace=ns)
    r.setdefault("namespace", ns)
    where = "" if ns == "default" else f" of namespace {ns}"
    env = client.remote()
    if env is not None:
        envs = Environments()
        kept = envs.get(env.name)
        kept.token, kept.refresh_token = r["token"], r["refresh_token"]
        envs.save()
        say(r, as_json, f"logged in to {env.name} as {r['account']}{where} (token kept with the "
            f"environment in {envs.path})")
        return
    path = token_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    from meshd.datadir import write_json

    write_json(path, {"token": r["token"], "refresh_token": r["refresh_token"],
                      "account": r["account"], "namespace": ns})
    say(r, as_json, f"logged in as {r['account']}{where} (token kept in {path})")


@auth.command("logout")
@env_option
def auth_logout() -> None:
    """Forget the saved tokens (of the environment, with --env or MESHD_ENV)."""
    env = environment()
    if not env.local:
        envs = Environments()
        kept = envs.get(env.name)
        kept.token = kept.refresh_token = ""
        envs.save()
        click.echo(f"logged out of {env.name}")
        return
    token_file().unlink(missing_ok=True)
    click.echo("logged out")


@auth.command("whoami")
@namespace_option
@client_options
@json_option
def auth_whoami(namespace: str | None, client: Client, as_json: bool) -> None:
    """Who the daemon takes you for (a node acts in every namespace: --namespace's)."""
    r = client.call("auth.whoami", namespace=client.namespace(namespace))
    say(r, as_json, f"{r['id']} (scopes: {', '.join(r['scopes']) or '-'};"
        f" via {r['via']}; namespace {r.get('namespace', 'default')})")


@auth.command("bootstrap")
@client_options
@json_option
def auth_bootstrap(client: Client, as_json: bool) -> None:
    """Set up auth on a cluster that has none (the first node does this itself)."""
    r = client.call("auth.bootstrap")
    say(r, as_json, f"admin token: {r['token']}")


@auth.group("accounts")
def auth_accounts() -> None:
    """Accounts."""


@auth_accounts.command("list")
@namespace_option
@client_options
@json_option
def accounts_list(namespace: str | None, client: Client, as_json: bool) -> None:
    """The accounts of a namespace."""
    rows = client.call("auth.accounts.list", namespace=client.namespace(namespace))
    show_lines(rows, as_json, (f"{r['id']}\t{r['type']}\t{','.join(r['scopes'])}" for r in rows))


@auth_accounts.command("create")
@click.argument("account")
@click.option("--secret", required=True)
@click.option("--scope", "scopes", multiple=True)
@click.option("--type", "kind", type=click.Choice(["user", "service"]), default="user")
@namespace_option
@client_options
@json_option
def accounts_create(account: str, secret: str, scopes: tuple[str, ...], kind: str,
                    namespace: str | None, client: Client, as_json: bool) -> None:
    """Create ACCOUNT in a namespace."""
    ns = client.namespace(namespace)
    r = client.call("auth.accounts.create", id=account, secret=secret, scopes=list(scopes),
                    type=kind, namespace=ns)
    say(r, as_json, f"created account {account}{_in(ns)}")


@auth_accounts.command("delete")
@click.argument("account")
@namespace_option
@client_options
@json_option
def accounts_delete(account: str, namespace: str | None, client: Client,
                    as_json: bool) -> None:
    """Delete ACCOUNT of a namespace."""
    ns = client.namespace(namespace)
    r = client.call("auth.accounts.delete", id=account, namespace=ns)
    say(r, as_json, f"deleted account {account}{_in(ns)}")


def _in(ns: str) -> str:
    """" in namespace x" outside default."""
    return "" if ns == "default" else f" in namespace {ns}"


@auth.group("rules")
def auth_rules() -> None:
    """Access rules."""


@auth_rules.command("list")
@namespace_option
@client_options
@json_option
def rules_list(namespace: str | None, client: Client, as_json: bool) -> None:
    """The rules that decide in a namespace (one without rules of its own: the default
    rules)."""
    rows = client.call("auth.rules.list", namespace=client.namespace(namespace))
    show(rows, as_json, ("id", "resource", "scope", "access", "priority"),
         ((r["id"], r["resource"], repr(r["scope"]) if not r["scope"] else r["scope"],
           r["access"], str(r["priority"])) for r in rows))


@auth_rules.command("create")
@click.argument("rule_id")
@click.option("--resource", required=True, help="TYPE:NAME:ENDPOINT, '*' allowed.")
@click.option("--scope", default="", help='"" public, "*" any account of the namespace, a '
              'scope, or NS:SCOPE (that scope of namespace NS\'s accounts).')
@click.option("--access", type=click.Choice(["granted", "denied"]), required=True)
@click.option("--priority", type=int, default=0)
@namespace_option
@client_options
@json_option
def rules_create(rule_id: str, resource: str, scope: str, access: str, priority: int,
                 namespace: str | None, client: Client, as_json: bool) -> None:
    """Create a rule deciding for the resources of a namespace."""
    ns = client.namespace(namespace)
    r = client.call("auth.rules.create", id=rule_id, resource=resource, scope=scope,
                    access=access, priority=priority, namespace=ns)
    say(r, as_json, f"created rule {rule_id}{_in(ns)}")


@auth_rules.command("delete")
@click.argument("rule_id")
@namespace_option
@client_options
@json_option
def rules_delete(rule_id: str, namespace: str | None, client: Client, as_json: bool) -> None:
    """Delete a rule of a namespace."""
    ns = client.namespace(namespace)
    r = client.call("auth.rules.delete", id=rule_id, namespace=ns)
    say(r, as_json, f"deleted rule {rule_id}{_in(ns)}")


@auth.group("token")
def auth_token() -> None:
    """Tokens."""


@auth_token.command("create")
@click.option("--account", required=True)
@click.option("--ttl", type=click.FloatRange(min=1), default=3600.0, show_default=True)
@namespace_option
@client_options
@json_option
def token_create(account: str, ttl: float, namespace: str | None, client: Client,
                 as_json: bool) -> None:
    """A token for ACCOUNT of a namespace."""
    r = client.call("auth.token.create", account=account, ttl=ttl,
                    namespace=client.namespace(namespace))
    say({"token": r["token"]}, as_json, r["token"])


@auth_token.command("revoke")
@click.argument("token_text", metavar="TOKEN")
@client_options
@json_option
def token_revoke(token_text: str, client: Client, as_json: bool) -> None:
    r = client.call("auth.token.revoke", token=token_text)
    say(r, as_json, f"revoked {r['revoked']}")


@auth.group("keys")
def auth_keys() -> None:
    """Token issuer keys."""


@auth_keys.command("rotate")
@client_options
@json_option
def keys_rotate(client: Client, as_json: bool) -> None:
    """Make a new issuer key on this node; old keys keep verifying their tokens."""
    r = client.call("auth.keys.rotate")
    say(r, as_json, f"new issuer key {r['kid']} on {r['signer']}")


@auth_keys.command("list")
@client_options
@json_option
def keys_list_cmd(client: Client, as_json: bool) -> None:
    """Issuer keys this node trusts: who holds each, who endorsed it, its state."""
    rows = client.call("auth.keys.list")
    show(rows, as_json, ("kid", "holder", "endorsed by", "state", "created"),
         ((r["kid"] + (" (root)" if r["root"] else ""), r["signer"], r["endorsed_by"],
           r["state"], time.strftime("%Y-%m-%d %H:%M", time.gmtime(r["created"])))
          for r in rows))


@auth_keys.command("revoke")
@click.argument("kid")
@client_options
@json_option
def keys_revoke_cmd(kid: str, client: Client, as_json: bool) -> None:
    """Stop trusting issuer key KID now: its tokens stop working everywhere (what it
    signed is signed again with a current key)."""
    r = client.call("auth.keys.revoke", kid=kid)
    say(r, as_json, f"revoked issuer key {r['revoked']}")


COMMANDS: tuple[click.Command, ...] = (auth,)
