"""Values given on the command line that more than one command group parses.

Rules:
- A value that does not parse is a "400 bad request" line naming the flag
  (`cli.output.fail`), never a traceback.
"""

from __future__ import annotations

from cli.output import fail


def parse_meta(meta: tuple[str, ...]) -> dict[str, str]:
    """--meta K=V items as a map; one without "=" is a "400 bad request" line."""
    metadata = {}
    for item in meta:
        key, sep, value = item.partition("=")
        if not sep:
            fail(f"400 bad request: --meta {item!r} must look like key=value")
        metadata[key] = value
    return metadata
