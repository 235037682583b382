"""`meshd store`: the replicated key-value store (records, counters, sets; watch; export and
import).

Rules:
- Thin functions over the `store.*` control ops; every command names its --database
  (default "default") and, where it acts on records, its --table (default "store"), in a
  namespace (--namespace, MESHD_NAMESPACE, the environment's, else default).
- Values are bytes: printed as text when they are UTF-8, else as `value_base64` in JSON.
- `export` prints one JSON line per record (values in base64); `import` writes such lines
  back, skipping expired records; a line that is not an exported record is a "400 bad
  request" line naming it.
"""

from __future__ import annotations

import base64
import binascii
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from meshd_cli.args import parse_meta
from meshd_cli.client import Client, chosen_namespace, client_options, namespace_option
from meshd_cli.output import fail, json_option, line, print_table, say


def _store_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--table", default="store", show_default=True, help="Table.")(f)
    f = click.option("--database", default="default", show_default=True, help="Database.")(f)
    return client_options(json_option(namespace_option_hidden(f)))


def namespace_option_hidden(f: Callable[..., Any]) -> Callable[..., Any]:
    return namespace_option(f, exposed=False)


def _call(client: Client, op: str, /, **args: Any) -> Any:
    """A store op in the command's namespace (`Client.namespace`)."""
    return client.call(op, namespace=client.namespace(chosen_namespace()), **args)


def _record_json(rec: dict[str, Any]) -> dict[str, Any]:
    out = dict(rec)
    if isinstance(out.get("value"), bytes):
        try:
            out["value"] = out["value"].decode()
        except UnicodeDecodeError:
            out["value_base64"] = base64.b64encode(out.pop("value")).decode()
    return out


@click.group()
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
                database: str, table: str, client: Client, as_json: bool) -> None:
    """Write VALUE under KEY (VALUE "-" reads it from stdin)."""
    raw = sys.stdin.buffer.read() if value == "-" else value.encode()
    metadata = parse_meta(meta)
    rec = _call(client, "store.write", database=database, table=table, key=key,
                      value=raw, ttl=ttl, replicas=replicas, metadata=metadata)
    say(_record_json(rec), as_json, f"wrote {key}")


@store.command("read")
@click.argument("key", required=False)
@click.option("--prefix", help="All keys with this prefix.")
@click.option("--suffix", help="All keys with this suffix.")
@click.option("--limit", type=click.IntRange(min=0), default=0)
@click.option("--offset", type=click.IntRange(min=0), default=0)
@_store_options
def store_read(key: str | None, prefix: str | None, suffix: str | None, limit: int,
               offset: int, database: str, table: str, client: Client,
               as_json: bool) -> None:
    """Read KEY (or the keys matching --prefix/--suffix)."""
    if key is None and prefix is None and suffix is None:
        prefix = ""
    rows = _call(client, "store.read", database=database, table=table, key=key,
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
def store_delete(key: str, database: str, table: str, client: Client,
                 as_json: bool) -> None:
    """Delete KEY."""
    result = _call(client, "store.delete", database=database, table=table, key=key)
    say(result, as_json, f"deleted {key}")


@store.command("list")
@click.option("--prefix", help="Keys starting with this.")
@click.option("--contains", help="Keys holding this text anywhere.")
@click.option("--limit", type=click.IntRange(min=0), default=0)
@_store_options
def store_list(prefix: str | None, contains: str | None, limit: int, database: str,
               table: str, client: Client, as_json: bool) -> None:
    """List keys."""
    keys = _call(client, "store.list", database=database, table=table, prefix=prefix,
                       contains=contains, limit=limit)
    say(keys, as_json, "\n".join(keys))


@store.group("databases", invoke_without_command=True)
@client_options
@json_option
@namespace_option_hidden
@click.pass_context
def store_databases(ctx: click.Context, client: Client, as_json: bool) -> None:
    """List databases with their backends (embedded, postgres, redis); `create` puts a new
    database on an engine."""
    if ctx.invoked_subcommand is not None:
        return
    rows = _call(client, "store.databases", detail=True)
    if as_json:
        say(rows, True, "")
        return
    print_table(["database", "backend"], [
        (r["name"], r["backend"] + (f" (migrating to {r['migrating_to']})"
                                    if r.get("migrating_to") else "")) for r in rows])


def _dsn(path: str) -> str:
    """The DSN in the file at `path` (first line): a credential, so never an argument."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"400 bad request: cannot read the DSN file {path}: "
             f"{getattr(exc, 'strerror', None) or exc}")
    dsn = text.strip()
    if not dsn or "\n" in dsn:
        fail(f"400 bad request: the DSN file {path} must hold one line (the DSN)")
    return dsn


BACKEND = click.Choice(["postgres", "redis"])


@store_databases.command("create")
@click.argument("name")
@click.option("--backend", type=BACKEND, required=True, help="The engine that keeps it.")
@click.option("--dsn-file", required=True, metavar="FILE",
              help="A file holding the engine's DSN (postgresql://USER:PASS@HOST:PORT/DB or "
                   "redis://HOST:PORT/N); replicated to every node, never shown.")
@client_options
@json_option
@namespace_option_hidden
def store_databases_create(name: str, backend: str, dsn_file: str, client: Client,
                           as_json: bool) -> None:
    """Create the database NAME on an engine: every node serves it from there."""
    r = _call(client, "store.databases.create", database=name, backend=backend,
              dsn=_dsn(dsn_file))
    say(r, as_json, f"created database {name} on {backend}")


@store.command("migrate")
@click.argument("database")
@click.option("--to", "to", type=BACKEND, required=True, help="The engine to move it to.")
@click.option("--dsn-file", required=True, metavar="FILE", help="A file holding its DSN.")
@click.option("--grace", type=click.FloatRange(0, 3600), default=None,
              help="Seconds to keep copying writes still reaching the embedded store after "
                   "the switch (default: the store.migrate_grace setting, 30).")
@client_options
@json_option
@namespace_option_hidden
def store_migrate(database: str, to: str, dsn_file: str, grace: float | None,
                  client: Client, as_json: bool) -> None:
    """Copy the embedded DATABASE to an engine and switch it over (writes made meanwhile,
    through any node, are copied too)."""
    args: dict[str, Any] = {"database": database, "to": to, "dsn": _dsn(dsn_file),
                            "namespace": client.namespace(chosen_namespace())}
    if grace is not None:
        args["grace"] = grace

    def show(ev: Any) -> None:
        if as_json:
            line(json.dumps(ev))
        elif ev.get("phase") == "copying" and "of" in ev:
            line(f"copied {ev['done']} of {ev['of']} keys", err=True)
        elif ev.get("phase") == "copying":
            line(f"copying {database} to {to}", err=True)
        elif ev.get("phase") == "switched":
            line(f"switched {database} to {to}; copying late writes", err=True)
        elif ev.get("phase") == "done":
            line(f"migrated {database} to {to}: {ev['copied']} copies in {ev['seconds']} s")
    client.stream("store.migrate", show, **args)


@store.command("tables")
@click.option("--database", default="default", show_default=True)
@client_options
@json_option
@namespace_option_hidden
def store_tables(database: str, client: Client, as_json: bool) -> None:
    """List the tables of a database."""
    names = _call(client, "store.tables", database=database)
    say(names, as_json, "\n".join(names))


@store.command("counter")
@click.argument("key")
@click.argument("delta", type=int, default=0)
@_store_options
def store_counter(key: str, delta: int, database: str, table: str, client: Client,
                  as_json: bool) -> None:
    """Add DELTA (may be negative; 0 reads) to the counter KEY."""
    r = _call(client, "store.counter", database=database, table=table, key=key, delta=delta)
    say(r, as_json, str(r["counter"]))


@store.command("set")
@click.argument("op", type=click.Choice(["add", "remove", "members"]))
@click.argument("key")
@click.argument("member", required=False)
@_store_options
def store_set(op: str, key: str, member: str | None, database: str, table: str,
              client: Client, as_json: bool) -> None:
    """Add or remove MEMBER of the set KEY, or list its members."""
    r = _call(client, "store.set", database=database, table=table, key=key, op=op,
                    member=member)
    say(r, as_json, "\n".join(r["members"]))


@store.command("watch")
@click.option("--prefix", default="")
@click.option("--table", help="Only this table (default: all).")
@click.option("--database", default="default", show_default=True)
@client_options
@json_option
@namespace_option_hidden
def store_watch(prefix: str, table: str | None, database: str, client: Client,
                as_json: bool) -> None:
    """Stream changes under a key prefix as they land on this node."""
    def show(ev: Any) -> None:
        ev = {**ev, "record": _record_json(ev["record"])}
        if as_json:
            line(json.dumps(ev))
            return
        what = "deleted" if ev["deleted"] else "written"
        line(f"{ev['table']}/{ev['key']} {what} ({ev['origin']})")

    client.stream("store.watch", show, database=database, table=table, prefix=prefix,
                  namespace=client.namespace(chosen_namespace()))


@store.command("export")
@_store_options
def store_export(database: str, table: str, client: Client, as_json: bool) -> None:
    """Print every record of a table as JSON lines (for backup)."""
    for rec in _call(client, "store.read", database=database, table=table, prefix=""):
        out = {"key": rec["key"]}
        if "value" in rec:
            out.update({"value_base64": base64.b64encode(rec["value"]).decode(),
                        "metadata": rec.get("metadata") or {}, "expiry": rec.get("expiry")})
        if "counter" in rec:
            out["counter"] = rec["counter"]
        if "members" in rec:
            out["members"] = rec["members"]
        click.echo(json.dumps(out))


@store.command("import")
@click.argument("file", type=click.File("r"), default="-")
@_store_options
def store_import(file: Any, database: str, table: str, client: Client,
                 as_json: bool) -> None:
    """Write the JSON lines of FILE (from `export`) into a table."""
    count = 0
    for n, text in enumerate(file, start=1):
        if not text.strip():
            continue
        try:
            rec = json.loads(text)
            key = rec["key"]
            if "value_base64" in rec:
                value = base64.b64decode(rec["value_base64"], validate=True)
                ttl = None
                if rec.get("expiry"):
                    ttl = rec["expiry"] / 1000 - time.time()
                    if ttl <= 0:
                        continue
                _call(client, "store.write", database=database, table=table, key=key,
                            value=value, metadata=rec.get("metadata") or {}, ttl=ttl)
            if rec.get("counter"):
                _call(client, "store.counter", database=database, table=table, key=key,
                            delta=int(rec["counter"]))
            for member in rec.get("members", []):
                _call(client, "store.set", database=database, table=table, key=key, op="add",
                            member=member)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, binascii.Error) as exc:
            fail(f"400 bad request: line {n} is not an exported record: {exc}")
        count += 1
    say({"imported": count}, as_json, f"imported {count} records")


COMMANDS: tuple[click.Command, ...] = (store,)
