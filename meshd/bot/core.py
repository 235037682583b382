"""The bot's chat-agnostic core: a message's text becomes a command, run with the sender's
rights, and its answer a `Reply` that reads well as plain text and as Slack blocks.

Theory of operation: an input (slack.py) hands `Bot.handle(user, text)` the text of a
mention or a direct message and the chat's user id. The core strips the mention, splits the
command word from its arguments, finds the command (built-in, commands.py, or one a service
provides) and runs it against a `Mesh`: the local daemon, acting as the meshd account the
user is mapped to (or as nobody). Whatever goes wrong is a reply, never an exception: a
command that fails says why (a denial names the rule's resource and the account), an unknown
command points at `help`.

Rules:
- A command line is `NAME [WORDS...] [JSON]`: words are split like a shell would; the JSON
  argument of `call`, `config set` and `publish` is the rest of the line after the words the
  command takes, so it may hold spaces. Slack's formatting is undone first (`<@U1>` mentions
  stripped, with a `:` or `,` after them, other spacing kept so JSON strings arrive whole;
  `&lt;` `&gt;` `&amp;` decoded, smart quotes straightened, a ```code``` fence around the
  JSON dropped).
- A reply is a headline (`text`, also the notification) and an optional preformatted body
  (`code`: a table or JSON). Bodies are cut at MAX_LINES lines and MAX_CHARS characters with a
  note saying how much was left out; Slack blocks (`blocks()`) stay within Slack's 3000
  characters per section.
- Text from the chat is bounded (MAX_INPUT) before anything parses it.
"""

from __future__ import annotations

import html
import json
import re
import shlex
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from meshd.errors import MeshError

MAX_INPUT = 8000
MAX_LINES = 40
MAX_CHARS = 2800  # a Slack section holds 3000; the fence and the note fit in the rest
MENTION = re.compile(r"[ \t]*<@[^<>\s]*>[:,]?")  # `<@U1>`, `<@U1|name>`, `<@U1>:`
QUOTES = str.maketrans({"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'"})


@dataclass
class Reply:
    text: str  # the headline: plain text, also the notification
    code: str = ""  # a preformatted body (a table, JSON), cut to fit
    ok: bool = True

    def body(self, size: Callable[[str], int] = len) -> str:
        """`code` cut at MAX_LINES lines and MAX_CHARS characters (as `size` counts them),
        with a note when something was left out."""
        lines = self.code.splitlines()
        whole = "\n".join(lines)
        out = _fit("\n".join(lines[:MAX_LINES]), MAX_CHARS, size)
        if out == whole:
            return out
        shown = out.count("\n") + 1 if out else 0
        return out + (f"\n… {len(lines) - shown} more lines ({len(whole) - len(out)} "
                      "characters) not shown")

    def plain(self) -> str:
        body = self.body()
        return f"{self.text}\n```\n{body}\n```" if body else self.text

    def blocks(self) -> list[dict[str, Any]]:
        """Slack blocks: the headline and the body, escaped, each within a section's 3000
        characters after escaping."""
        head = escape(_fit(self.text, 2900, lambda t: len(escape(t)), lines=False))
        blocks: list[dict[str, Any]] = [
            {"type": "section", "text": {"type": "mrkdwn", "text": head}}]
        body = self.body(lambda t: len(escape(t)))
        if body:
            blocks.append({"type": "section",
                           "text": {"type": "mrkdwn", "text": f"```{escape(body)}```"}})
        return blocks


def _fit(text: str, most: int, size: Callable[[str], int], lines: bool = True) -> str:
    """The longest prefix of `text` of at most `most` (as `size` counts), cut at a line end
    when `lines` and there is one."""
    if size(text) <= most:
        return text
    low, high = 0, min(len(text), most)  # size counts each character at least once
    while low < high:
        mid = (low + high + 1) // 2
        if size(text[:mid]) <= most:
            low = mid
        else:
            high = mid - 1
    out = text[:low]
    return out[:out.rfind("\n")] if lines and "\n" in out else out


def escape(text: str) -> str:
    """Text as Slack mrkdwn shows it literally (its three control characters escaped)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns aligned with spaces: what reads well in a code block."""
    cells = [[str(c) for c in columns]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in cells)


class Mesh(Protocol):
    """What commands need: the local daemon's ops, run as the user (their account's token,
    or nobody), in their namespace."""

    account: str  # "" = not mapped: nobody (the public scope)
    namespace: str

    async def call(self, op: str, /, **args: Any) -> Any: ...


@dataclass
class Command:
    name: str  # one word, or two for a group ("config get")
    usage: str
    help: str
    run: Callable[[Mesh, list[str], str], Awaitable[Reply]]  # (mesh, words, json text)
    words: int = 0  # words before a JSON argument (-1: no JSON, every word)


class UsageError(ValueError):
    """The command line does not fit the command: the reply shows its usage."""


def clean(text: str) -> str:
    """A chat message's text as a command line: mentions stripped, Slack's escapes undone,
    smart quotes straightened."""
    text = MENTION.sub("", text[:MAX_INPUT])
    return html.unescape(text).translate(QUOTES).strip()


def json_arg(text: str, what: str) -> Any:
    """The JSON argument of a command (a ``` fence around it dropped); UsageError when it
    does not parse."""
    text = text.strip()
    if text.startswith("```") and text.endswith("```") and len(text) >= 6:
        text = text[3:-3].strip()
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{what} is not JSON: {exc}") from None
    except RecursionError:
        raise UsageError(f"{what} is nested too deeply") from None


@dataclass
class Bot:
    """Runs command lines against a mesh; `extra` finds the commands services provide."""

    commands: list[Command]
    extra: Callable[[Mesh], Awaitable[list[Command]]] | None = None
    log: Callable[[str, str, str, str], None] | None = None  # (user, account, line, outcome)
    names: dict[str, Command] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.names = {c.name: c for c in self.commands}

    async def handle(self, user: str, text: str, mesh: Mesh) -> Reply:
        line = clean(text)
        reply = await self._run(line, mesh)
        if self.log is not None:
            self.log(user, mesh.account, line[:200], "ok" if reply.ok else reply.text[:200])
        return reply

    async def _run(self, line: str, mesh: Mesh) -> Reply:
        if not line:
            return await self.names["help"].run(mesh, [], "")
        head = line.split(None, 2)
        command = self.names.get(" ".join(head[:2]).lower()) if len(head) > 1 else None
        command = command or self.names.get(head[0].lower())
        if command is None and self.extra is not None:
            try:
                provided = {c.name: c for c in await self.extra(mesh)}
            except MeshError:
                provided = {}
            command = provided.get(head[0].lower())
        if command is None:
            return Reply(f"I don't know `{head[0][:40]}`: say `help` for what I can do.",
                         ok=False)
        parts = line.split(None, len(command.name.split()))
        rest = parts[-1] if len(parts) > len(command.name.split()) else ""
        try:
            words, raw = _split(rest, command.words)
            return await command.run(mesh, words, raw)
        except UsageError as exc:
            return Reply(f"{exc}. Usage: `{command.usage}`", ok=False)
        except MeshError as exc:
            return Reply(denied(exc, mesh) if exc.status in (401, 403)
                         else f"{exc.status} {exc.detail}", ok=False)


def _split(rest: str, words: int) -> tuple[list[str], str]:
    """(the command's words, the JSON text after them)."""
    if words < 0:
        try:
            return shlex.split(rest), ""
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    parts = rest.split(None, words)
    if len(parts) <= words:
        return parts, ""
    return parts[:words], parts[words]


def denied(exc: MeshError, mesh: Mesh) -> str:
    """A refusal, saying who asked and what decided."""
    who = f"account `{mesh.account}`" if mesh.account else \
        "nobody (you are not mapped to a meshd account: an admin runs `meshd bot map " \
        "YOUR_SLACK_ID ACCOUNT`)"
    return f"{exc.status} denied: {exc.detail} (acting as {who})"
