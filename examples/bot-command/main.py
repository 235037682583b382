"""A service that adds `roll` to the chat bot: `@meshd roll 2d6` in Slack.

Run it next to a `meshd up` (or `meshd run examples/bot-command`); `help` then lists it.
"""

from __future__ import annotations

import contextlib
import random

import trio

from meshd_sdk import Service
from meshd_sdk.bot import CommandReply, CommandRequest, bot_command

service = Service("dice")


@bot_command(service, "roll", usage="roll [NdM]", help="roll dice (2d6 unless told)")
async def roll(req: CommandRequest) -> CommandReply:
    spec = req.args[0] if req.args else "2d6"
    try:
        count, sides = (int(x) for x in spec.lower().split("d", 1))
    except ValueError:
        return CommandReply(text=f"{spec!r} is not NdM (like 2d6)")
    if not (1 <= count <= 100 and 2 <= sides <= 1000):
        return CommandReply(text="1..100 dice of 2..1000 sides")
    rolls = [random.randint(1, sides) for _ in range(count)]
    who = req.user or "nobody"
    return CommandReply(text=f"{who} rolled {sum(rolls)}", code=" ".join(map(str, rolls)))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(service.run)
