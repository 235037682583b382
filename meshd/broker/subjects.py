"""Topics and subscription patterns (sans-IO): what is valid, what matches, and an index.

Rules (as NATS subjects):
- A topic is tokens separated by "."; a token is 1..MAX_TOKEN characters, none of them
  whitespace or a control character (C0, DEL or C1); the whole topic is at most MAX_TOPIC
  bytes of UTF-8 and MAX_TOKENS tokens. A topic one publishes to has no wildcards.
- A pattern is a topic whose tokens may also be "*" (exactly one token) or, as the last
  token only, ">" (one or more tokens). "*" and ">" are wildcards only as whole tokens; a
  token holding "*" or ">" among other characters ("orders*") is refused, in topics and
  patterns alike, so a typo never silently matches nothing.
- `check_topic` / `check_pattern` are the one place a name is accepted: anything else is a
  400 saying what is allowed.
- `Index` maps patterns to values in a trie keyed by tokens: matching costs the topic's
  depth times the wildcard branching, not the number of patterns. Results are cached per
  topic (bounded, MAX_CACHE entries) and the cache is dropped on every change.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from meshd.errors import bad_request

MAX_TOPIC = 1024  # bytes of UTF-8
MAX_TOKEN = 255
MAX_TOKENS = 64
MAX_CACHE = 4096
ONE, REST = "*", ">"

V = TypeVar("V")


def _tokens(text: object, what: str) -> list[str]:
    if not isinstance(text, str) or not text:
        raise bad_request(f"{what} must be non-empty text", id="meshd.broker")
    if len(text.encode()) > MAX_TOPIC:
        raise bad_request(f"{what} is longer than {MAX_TOPIC} bytes", id="meshd.broker")
    tokens = text.split(".")
    if len(tokens) > MAX_TOKENS:
        raise bad_request(f"{what} has more than {MAX_TOKENS} tokens", id="meshd.broker")
    for t in tokens:
        if not t:
            raise bad_request(f"{what} {text!r} has an empty token (tokens are separated by "
                              "single dots, none at either end)", id="meshd.broker")
        if len(t) > MAX_TOKEN:
            raise bad_request(f"{what} {text!r} has a token longer than {MAX_TOKEN}",
                              id="meshd.broker")
        if any(c.isspace() or ord(c) < 32 or 127 <= ord(c) < 160 for c in t):
            raise bad_request(f"{what} {text!r} has whitespace or a control character",
                              id="meshd.broker")
        if t not in (ONE, REST) and (ONE in t or REST in t):
            raise bad_request(f"{what} {text!r}: '*' and '>' are wildcards only as whole "
                              "tokens", id="meshd.broker")
    return tokens


def check_topic(topic: object) -> str:
    """`topic` if it is a concrete topic (no wildcards); a 400 otherwise. Valid topics are
    remembered (lru_cache of a pure check: every publish checks its topic several times)."""
    if type(topic) is str:
        return _check_text_topic(topic)
    return _check_topic(topic)


@functools.lru_cache(maxsize=4096)
def _check_text_topic(topic: str) -> str:
    return _check_topic(topic)


def _check_topic(topic: object) -> str:
    tokens = _tokens(topic, "topic")
    if ONE in tokens or REST in tokens:
        raise bad_request(f"topic {topic!r} has a wildcard: publish to a concrete topic "
                          "('*' and '>' are for subscriptions)", id="meshd.broker")
    assert isinstance(topic, str)
    return topic


def check_pattern(pattern: object) -> str:
    """`pattern` if it is a valid subscription pattern; a 400 otherwise."""
    tokens = _tokens(pattern, "pattern")
    if REST in tokens[:-1]:
        raise bad_request(f"pattern {pattern!r}: '>' may only be the last token",
                          id="meshd.broker")
    assert isinstance(pattern, str)
    return pattern


def matches(pattern: str, topic: str) -> bool:
    """Whether a (valid) pattern matches a (valid) topic."""
    p, t = pattern.split("."), topic.split(".")
    for i, token in enumerate(p):
        if token == REST:
            return len(t) > i
        if i >= len(t) or (token != ONE and token != t[i]):
            return False
    return len(p) == len(t)


@dataclass
class _Node(Generic[V]):
    children: dict[str, _Node[V]] = field(default_factory=dict)
    here: set[V] = field(default_factory=set)  # values of patterns ending at this token
    rest: set[V] = field(default_factory=set)  # values of patterns ending with ">" here


class Index(Generic[V]):
    """Patterns -> values; `match(topic)` is every value of every matching pattern."""

    def __init__(self) -> None:
        self._root: _Node[V] = _Node()
        self._patterns: dict[str, int] = {}  # pattern -> how many values it holds
        self._cache: dict[str, frozenset[V]] = {}

    def __len__(self) -> int:
        return sum(self._patterns.values())

    def patterns(self) -> list[str]:
        return sorted(self._patterns)

    def add(self, pattern: str, value: V) -> bool:
        """Add `value` under a (valid) pattern; whether it was new."""
        node = self._root
        tokens = pattern.split(".")
        for token in tokens[:-1]:
            node = node.children.setdefault(token, _Node())
        last = tokens[-1]
        bucket = node.rest if last == REST else node.children.setdefault(last, _Node()).here
        if value in bucket:
            return False
        bucket.add(value)
        self._patterns[pattern] = self._patterns.get(pattern, 0) + 1
        self._cache.clear()
        return True

    def remove(self, pattern: str, value: V) -> bool:
        """Remove `value` from a pattern; whether it was there. Empty branches are pruned."""
        path: list[tuple[_Node[V], str]] = []
        node = self._root
        tokens = pattern.split(".")
        for token in tokens[:-1]:
            child = node.children.get(token)
            if child is None:
                return False
            path.append((node, token))
            node = child
        last = tokens[-1]
        if last == REST:
            bucket = node.rest
        else:
            leaf = node.children.get(last)
            if leaf is None:
                return False
            path.append((node, last))
            bucket = leaf.here
        if value not in bucket:
            return False
        bucket.discard(value)
        left = self._patterns[pattern] - 1
        if left:
            self._patterns[pattern] = left
        else:
            del self._patterns[pattern]
        for parent, token in reversed(path):  # prune what holds nothing any more
            child = parent.children[token]
            if child.children or child.here or child.rest:
                break
            del parent.children[token]
        self._cache.clear()
        return True

    def match(self, topic: str) -> frozenset[V]:
        """Every value of every pattern matching the (valid) topic."""
        hit = self._cache.get(topic)
        if hit is not None:
            return hit
        found: set[V] = set()
        tokens = topic.split(".")
        for node, i in self._walk(self._root, tokens, 0):
            if i == len(tokens):
                found |= node.here
            elif node.rest:
                found |= node.rest
        result = frozenset(found)
        if len(self._cache) >= MAX_CACHE:
            self._cache.clear()
        self._cache[topic] = result
        return result

    def _walk(self, node: _Node[V], tokens: list[str], i: int
              ) -> Iterator[tuple[_Node[V], int]]:
        """(node, depth) for every trie node the topic's first `depth` tokens lead to; the
        caller takes `here` at full depth and `rest` (one or more tokens left) before it."""
        yield node, i
        if i == len(tokens):
            return
        for key in (tokens[i], ONE):
            child = node.children.get(key)
            if child is not None:
                yield from self._walk(child, tokens, i + 1)
