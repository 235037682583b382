"""sdk/schema.py: request and response formats from Python types, and load() against them."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from meshd_sdk.schema import SchemaError, describe, dump, load


@dataclass
class Order:
    id: str
    quantity: int
    note: str | None = None
    tags: list[str] | None = None


def test_optional_fields_are_described_and_loaded():
    d = describe(Order)
    assert d["required"] == ["id", "quantity"]
    assert d["properties"]["note"] == {"anyOf": [{"type": "string"}, {"type": "null"}]}
    assert d["properties"]["tags"] == {"anyOf": [{"type": "array", "items": {"type": "string"}},
                                                 {"type": "null"}]}
    assert describe(type(None)) == {"type": "null"} == describe(None)
    got = load(Order, {"id": "a", "quantity": 2, "note": None})
    assert got == Order("a", 2, None) and dump(got)["note"] is None
    assert load(Order, {"id": "a", "quantity": 2, "note": "x"}).note == "x"
    with pytest.raises(SchemaError, match="note"):
        load(Order, {"id": "a", "quantity": 2, "note": 5})
