"""Decoding what peers and clients send: CBOR and JSON, bounded in size and depth.

Rules:
- Everything that arrives from outside this process (a peer daemon, a control client, a
  proxy client, a token) is decoded here, never with a bare ``cbor2.loads``/``json.loads``.
- Any fault, whatever the bytes, raises :class:`WireError` (a ValueError) and nothing else:
  malformed data, too large, too deep, recursion, unknown tags.
- CBOR tags are refused except bignums (tags 2 and 3): the semantic tags cbor2 would turn
  into objects (MIME messages, shared references, regexes, dates, sets...) are not part of
  any meshd message, and some of them cannot even be encoded again (tag 36), so letting one
  through would fail far from here, in a re-encode that the sender chose to break.
- Depth is bounded by the caller (``max_depth``); sizes by ``max_bytes`` when given. Frame
  and message limits are enforced before the bytes get here.
"""

from __future__ import annotations

import json
from typing import Any

import cbor2

DEFAULT_DEPTH = 32
_ALLOWED_TAGS = frozenset({2, 3})  # positive and negative bignums: plain Python ints


class WireError(ValueError):
    """Input that is not a valid, bounded message; str() says why (for logs and 400s)."""


def _refuse(decoder: Any, *_: Any) -> Any:
    raise cbor2.CBORDecodeError("CBOR tags are not accepted")


class _RefuseTags(dict):  # type: ignore[type-arg]
    """A semantic-decoder table that claims every tag but the bignums and refuses them."""

    def __contains__(self, tag: object) -> bool:
        return tag not in _ALLOWED_TAGS

    def __getitem__(self, tag: object) -> Any:
        if tag in _ALLOWED_TAGS:
            raise KeyError(tag)
        return _refuse

    def get(self, tag: object, default: Any = None) -> Any:
        return default if tag in _ALLOWED_TAGS else _refuse


_SEMANTIC = _RefuseTags()


def _tag_hook(decoder: Any, tag: Any) -> Any:
    raise cbor2.CBORDecodeError(f"CBOR tag {getattr(tag, 'tag', '?')} is not accepted")


def loads(data: bytes | bytearray | memoryview, *, max_depth: int = DEFAULT_DEPTH,
          max_bytes: int | None = None) -> Any:
    """Decode one CBOR item strictly; WireError for anything else."""
    if max_bytes is not None and len(data) > max_bytes:
        raise WireError(f"message of {len(data)} bytes exceeds the {max_bytes}-byte limit")
    try:
        return cbor2.loads(data, max_depth=max_depth, tag_hook=_tag_hook,
                           semantic_decoders=_SEMANTIC)
    except RecursionError:
        raise WireError("message nested too deeply") from None
    except Exception as exc:  # cbor2 raises many types for hostile input; all mean invalid
        raise WireError(f"not valid CBOR: {str(exc)[:120] or type(exc).__name__}") from None


def dumps(value: Any) -> bytes:
    """Encode a value we are about to send; WireError if it cannot be encoded."""
    try:
        return cbor2.dumps(value)
    except RecursionError:
        raise WireError("value nested too deeply to encode") from None
    except Exception as exc:
        raise WireError(f"value cannot be encoded as CBOR ({type(exc).__name__})") from None


def check_plain(value: Any, max_depth: int = DEFAULT_DEPTH) -> None:
    """WireError unless `value` (decoded JSON) nests at most `max_depth` deep and all its
    text is valid Unicode (JSON may carry lone surrogates, which cannot be sent on)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise WireError("text holds a lone surrogate (not valid Unicode)") from None
        elif isinstance(item, dict | list):
            if depth > max_depth:
                raise WireError(f"nested deeper than {max_depth} levels")
            children = item.items() if isinstance(item, dict) else enumerate(item)
            for k, v in children:
                if isinstance(k, str):
                    stack.append((k, depth))
                stack.append((v, depth + 1))


def loads_json(data: str | bytes, *, max_bytes: int | None = None) -> Any:
    """Decode JSON; WireError for invalid, oversized or too deeply nested input (the json
    module's own recursion guard stops runaway nesting; it is turned into WireError)."""
    if max_bytes is not None and len(data) > max_bytes:
        raise WireError(f"JSON of {len(data)} bytes exceeds the {max_bytes}-byte limit")
    try:
        return json.loads(data)
    except RecursionError:
        raise WireError("JSON nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise WireError(f"not valid JSON: {exc.msg} at column {exc.colno}") from None
    except (ValueError, TypeError) as exc:
        raise WireError(f"not valid JSON ({type(exc).__name__})") from None
