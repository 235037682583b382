"""Values given on the command line that more than one command group parses.

Rules:
- A value that does not parse is a "400 bad request" line naming the flag
  (`cli.output.fail`), never a traceback.
"""

from __future__ import annotations

from meshd_cli.output import fail


def parse_pairs(items: tuple[str, ...], flag: str) -> dict[str, str]:
    """Repeated `flag K=V` items as a map; one without "=" or a key is a "400 bad request"
    line."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"400 bad request: {flag} {item!r} must look like key=value")
        out[key] = value
    return out


def parse_meta(meta: tuple[str, ...]) -> dict[str, str]:
    """--meta K=V items as a map."""
    return parse_pairs(meta, "--meta")


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str, flag: str) -> float:
    """A duration as people write it ("30s", "5m", "1h30m", "250ms", "2d"; a bare number is
    seconds) in seconds; anything else is a "400 bad request" line naming `flag`."""
    import re

    raw = text.strip().lower()
    try:
        seconds = float(raw)
    except ValueError:
        parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", raw)
        if not parts or "".join(n + u for n, u in parts) != raw:
            fail(f"400 bad request: {flag} {text!r} is not a duration (like 30s, 5m, 1h30m, "
                 "250ms, 2d)")
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if not 0 <= seconds < 1e10:
        fail(f"400 bad request: {flag} {text!r} is out of range")
    return seconds
