"""A service whose formats are TypedDicts, for integration tests: `python typedsvc.py NAME`.

(No `from __future__ import annotations` here: TypedDict tells required keys from
NotRequired ones only when the annotations are evaluated.)
"""

import sys
from typing import NotRequired, TypedDict

import trio

from meshd_sdk import Service


class Order(TypedDict):
    item: str
    qty: int
    note: NotRequired[str]


class Receipt(TypedDict):
    item: str
    total: int
    note: str
    request_type: str


service = Service(sys.argv[1] if len(sys.argv) > 1 else "orders")


@service.handler("Orders.Place")
async def place(req: Order) -> Receipt:
    return {"item": req["item"], "total": req["qty"] * 3, "note": req.get("note", ""),
            "request_type": type(req).__name__}


if __name__ == "__main__":
    trio.run(service.run)
