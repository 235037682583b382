"""Dot-path trees ("db.host" -> {"db": {"host": ...}}), shared by config in the daemon and
the SDK's config layers."""

from __future__ import annotations

from typing import Any


def parent(tree: dict[str, Any], parts: list[str]) -> dict[str, Any]:
    """The dict that holds parts[-1], creating (or replacing non-dict) levels on the way."""
    node = tree
    for p in parts[:-1]:
        child = node.get(p)
        if not isinstance(child, dict):
            child = node[p] = {}
        node = child
    return node


def lookup(tree: dict[str, Any], parts: list[str]) -> tuple[bool, Any]:
    """(found, value) at parts; the whole tree for no parts (found if not empty)."""
    node: Any = tree
    for p in parts:
        if not isinstance(node, dict) or p not in node:
            return False, None
        node = node[p]
    if not parts and not tree:
        return False, None
    return True, node
