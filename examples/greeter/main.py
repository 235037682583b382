"""The greeter service: `python examples/greeter/main.py` next to a running `meshd up`.

Call it from any node:  meshd call greeter Greeter.Hello '{"name": "Ada"}'
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import trio

from meshd_sdk import Service


@dataclass
class HelloRequest:
    name: str


@dataclass
class HelloResponse:
    msg: str


service = Service("greeter", version="1.0.0")


@service.handler("Greeter.Hello")
async def hello(req: HelloRequest) -> HelloResponse:
    return HelloResponse(msg=f"Hello {req.name}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(service.run)
