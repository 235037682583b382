"""Services for the gateway attack tests that register an HTTP address they do not serve
themselves: `python hostile_http.py NAME HOST:PORT [NAME=HOST:PORT ...]`. The API gateway
proxies /NAME/... to whatever listens there (a hostile server of the test's own), or must
refuse an address that is not loopback. Several services run in one process (one control
connection each) to keep the test's process count down.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import trio

from meshd_sdk import Service


@dataclass
class Text:
    text: str


def service(name: str, address: str) -> Service:
    svc = Service(name, http=address)

    @svc.handler("Hostile.Ping")
    async def ping(req: Text) -> Text:
        return Text(req.text)

    return svc


async def main() -> None:
    pairs = [(sys.argv[1], sys.argv[2])]
    pairs += [tuple(arg.split("=", 1)) for arg in sys.argv[3:]]  # type: ignore[misc]
    async with trio.open_nursery() as nursery:
        for name, address in pairs:
            nursery.start_soon(service(name, address).run)


if __name__ == "__main__":
    trio.run(main)
