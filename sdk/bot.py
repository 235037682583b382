"""Commands a service adds to the chat bot (`meshd bot`), as Micro's services did.

    service = Service("deploys")

    @bot_command(service, "deploys", usage="deploys [ENV]", help="recent deploys")
    async def deploys(req: CommandRequest) -> CommandReply:
        return CommandReply(text=f"3 deploys to {req.args[0] if req.args else 'prod'}")

Rules:
- `bot_command` puts `bot.command=NAME` in the service's metadata and adds two typed
  endpoints: `Command.Help` (answers the usage and help the bot lists under `help`) and
  `Command.Exec` (the bot's `NAME WORDS...`: `args` holds the words, `user` the meshd
  account the chat user acts as, "" for nobody). `user` is the caller the service's daemon
  verified (from the token the call came with), never a field of the request: whoever may
  call Command.Exec cannot name another user. The call comes with that account's token,
  so the service's own rules apply to it like to any caller.
- One command per service; a name a built-in has (or any not an identifier) is ignored by
  the bot.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .service import Service, current_call


@dataclass
class CommandRequest:
    args: list[str] = field(default_factory=list)
    user: str = ""


@dataclass
class CommandReply:
    text: str
    code: str = ""  # shown as a code block (a table, JSON), cut by the bot when long


@dataclass
class CommandHelp:
    usage: str
    help: str


def verified_user() -> str:
    """The account calling, as the service's daemon established it from the caller's token;
    "" for a caller without one (anonymous, or a node)."""
    info = current_call()
    caller = info.caller if info is not None else ""
    return "" if caller == "anonymous" or caller.startswith("node:") else caller


Exec = Callable[[CommandRequest], Awaitable[CommandReply]]


def bot_command(service: Service, name: str, usage: str = "", help: str = ""
                ) -> Callable[[Exec], Exec]:
    """Make the decorated `async def f(req: CommandRequest) -> CommandReply` the bot's
    command NAME."""
    def wrap(fn: Exec) -> Exec:
        service.metadata["bot.command"] = name

        @service.handler("Command.Help")
        async def command_help(req: dict[str, Any]) -> CommandHelp:
            return CommandHelp(usage or name, help)

        @service.handler("Command.Exec")
        async def command_exec(req: CommandRequest) -> CommandReply:
            req.user = verified_user()  # never what the body says
            return await fn(req)

        return fn
    return wrap
