"""What the `meshd` commands print: tables for people, JSON for programs, one line on failure.

Rules:
- --json (`json_option`) prints the control API's own field names, `json.dumps` of the op's
  result, one document (or one line per event for streams).
- People get rich tables (`show`, `print_table`) or plain lines (`show_lines`, or `say`
  for one text); rich is imported on first use only, so `meshd up` (the daemon) carries
  no more of it than its status screen needs.
- A failure is one line on stderr, "<status> <code>: <detail>", and exit status 1 (`fail`);
  never a traceback.
- Lines a long-running command prints as things happen go out at once (`line`), so a pipe
  sees them without waiting for a buffer to fill.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NoReturn

import click


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
    """A rich Table (rich imported only now)."""
    from rich.table import Table as RichTable

    return RichTable(*args, **kwargs)


def fail(message: str) -> NoReturn:
    """The one-line error on stderr and exit status 1."""
    click.echo(message, err=True)
    sys.exit(1)


def line(text: str, *, err: bool = False) -> None:
    """One line printed at once (flushed): for commands that run until interrupted."""
    click.echo(text, err=err)
    (sys.stderr if err else sys.stdout).flush()


def json_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """--json: print the op's result as JSON instead of a table or text (`as_json`)."""
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(f)


def print_table(columns: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    """A table with a bold header row, one row per item of `rows`."""
    table = Table(show_header=True, header_style="bold")
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    console.print(table)


def show(data: Any, as_json: bool, columns: Sequence[str],
         rows: Iterable[Sequence[str]]) -> None:
    """`data` as JSON with --json, else the table of `rows` (a generator is consumed only for
    the table, so rows may use fields the JSON does not need)."""
    if as_json:
        click.echo(json.dumps(data))
    else:
        print_table(columns, rows)


def say(data: Any, as_json: bool, text: str) -> None:
    """`data` as JSON with --json, else `text` (what a command that did one thing prints)."""
    click.echo(json.dumps(data) if as_json else text)


def show_lines(data: Any, as_json: bool, lines: Iterable[str]) -> None:
    """`data` as JSON with --json, else each of `lines` (consumed only then)."""
    if as_json:
        click.echo(json.dumps(data))
    else:
        for text in lines:
            click.echo(text)
