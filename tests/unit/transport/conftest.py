"""Fixtures for transport tests: an in-process mesh of link managers on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from .mesh import Mesh


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    async with trio.open_nursery() as nursery:
        yield Mesh(nursery)
        nursery.cancel_scope.cancel()
