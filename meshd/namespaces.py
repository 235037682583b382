"""Namespaces: several teams share one mesh without seeing each other's services.

Rules:
- A namespace is named by NAME (`[a-z0-9-]{1,63}`, a DNS label's alphabet); DEFAULT is the
  namespace of everything that names none: records written before namespaces existed, and
  old nodes' records, are in it, so existing data dirs keep working.
- `check` is the one place a name is accepted: None or "" is DEFAULT, anything else that is
  not a NAME is a 400 saying what is allowed. Every op that takes `namespace` runs it.
- One name space per namespace: `greeter` in `team-a` and `greeter` in `team-b` are
  different services. Reading an unknown namespace is an empty result, never an error.
- MESHD_NAMESPACE (`from_env`) is what the CLI and the SDK use when told nothing else.
"""

from __future__ import annotations

import os
import re
from typing import Any

from .errors import bad_request

NAME = "[a-z0-9-]{1,63}"
DEFAULT = "default"
ENV = "MESHD_NAMESPACE"
_NAME = re.compile(NAME)


def check(ns: Any) -> str:
    """`ns` as a namespace name (None or "" -> DEFAULT); a 400 if it is not one."""
    if ns is None or ns == "":
        return DEFAULT
    if not isinstance(ns, str) or not _NAME.fullmatch(ns):
        shown = repr(ns) if len(repr(ns)) <= 80 else repr(ns)[:77] + "..."
        raise bad_request(f"invalid namespace {shown}: a namespace is 1 to 63 lowercase "
                          f"letters, digits or '-' (allowed: {NAME})")
    return ns


def from_env() -> str:
    """MESHD_NAMESPACE, checked; DEFAULT when unset or empty."""
    return check(os.environ.get(ENV) or None)


def of(record: dict[str, Any] | None) -> str:
    """The namespace a registry record belongs to (DEFAULT if it names none)."""
    ns = (record or {}).get("namespace")
    return ns if isinstance(ns, str) and ns else DEFAULT
