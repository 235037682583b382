"""Version prefixes: which instances a versioned request may reach (the gateway's `/v1/...`,
a call's `version`).

Rules:
- A prefix is digits ("1", "2"); it matches an instance version equal to it or starting with
  it and a dot, with or without a leading "v": "1" matches "1", "1.2.0", "v1", "v1.3", not
  "10" or "11.0". The empty prefix matches every version.
"""

from __future__ import annotations


def version_matches(prefix: str, version: str) -> bool:
    if not prefix:
        return True
    v = version[1:] if version[:1] in ("v", "V") else version
    return v == prefix or v.startswith(prefix + ".")
