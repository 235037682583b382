"""Topics, patterns and the pattern index (meshd/broker/subjects.py)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.broker.subjects import (
    MAX_TOKENS,
    MAX_TOPIC,
    Index,
    check_pattern,
    check_topic,
    matches,
)
from meshd.errors import MeshError


@pytest.mark.parametrize("topic", ["orders", "orders.created", "a.b.c.d", "ünï.cödé",
                                   "x-y_z.1", "a" * 255])
def test_valid_topics(topic):
    assert check_topic(topic) == topic
    assert check_pattern(topic) == topic


@pytest.mark.parametrize("topic, why", [
    ("", "non-empty"), (".a", "empty token"), ("a.", "empty token"), ("a..b", "empty token"),
    ("a b", "whitespace"), ("a\tb", "whitespace"), ("a\x00b", "control"),
    ("a.*", "wildcard"), ("a.>", "wildcard"), ("orders*", "whole tokens"),
    ("a." + "b" * 256, "longer than 255"), ("a." * MAX_TOKENS + "a", "tokens"),
    ("é" * (MAX_TOPIC // 2 + 1), "bytes"), (7, "text"), (None, "text")])
def test_invalid_topics_are_400_saying_why(topic, why):
    with pytest.raises(MeshError) as err:
        check_topic(topic)
    assert err.value.status == 400 and why in err.value.detail


@pytest.mark.parametrize("pattern", ["*", ">", "a.*", "a.>", "*.b.>", "a.*.c"])
def test_valid_patterns(pattern):
    assert check_pattern(pattern) == pattern


@pytest.mark.parametrize("pattern, why", [
    ("a.>.b", "last token"), (">.a", "last token"), ("a*", "whole tokens"),
    ("a.b>", "whole tokens"), ("a..*", "empty token")])
def test_invalid_patterns_are_400_saying_why(pattern, why):
    with pytest.raises(MeshError) as err:
        check_pattern(pattern)
    assert err.value.status == 400 and why in err.value.detail


@pytest.mark.parametrize("pattern, topic, hit", [
    ("a.b", "a.b", True), ("a.b", "a.c", False), ("a.b", "a.b.c", False),
    ("a.b.c", "a.b", False), ("a.*", "a.b", True), ("a.*", "a.b.c", False),
    ("a.*", "a", False), ("a.>", "a.b", True), ("a.>", "a.b.c", True), ("a.>", "a", False),
    (">", "a", True), (">", "a.b.c", True), ("*", "a", True), ("*", "a.b", False),
    ("*.b.>", "x.b.y.z", True), ("*.b.>", "x.c.y", False), ("*.*", "a.b", True)])
def test_matching_as_nats(pattern, topic, hit):
    assert matches(pattern, topic) is hit
    index: Index[str] = Index()
    index.add(pattern, "v")
    assert (index.match(topic) == {"v"}) is hit


def _reference(pattern: str, topic: str) -> bool:
    """A regular expression per pattern: the meaning of the wildcards, written differently."""
    parts = [r"[^.]+" if t == "*" else r"[^.]+(\.[^.]+)*" if t == ">" else re.escape(t)
             for t in pattern.split(".")]
    return re.fullmatch(r"\.".join(parts), topic) is not None


TOKENS = st.sampled_from(["a", "b", "c", "orders", "x1"])
TOPICS = st.lists(TOKENS, min_size=1, max_size=5).map(".".join)
PATTERNS = st.lists(st.one_of(TOKENS, st.just("*")), min_size=1, max_size=5).flatmap(
    lambda toks: st.sampled_from([".".join(toks), ".".join([*toks[:-1], ">"])]))


@settings(max_examples=300, deadline=None)
@given(PATTERNS, TOPICS)
def test_matches_agrees_with_a_regular_expression(pattern, topic):
    assert matches(pattern, topic) == _reference(pattern, topic)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(PATTERNS, st.integers(0, 5)), max_size=30),
       st.lists(st.tuples(PATTERNS, st.integers(0, 5)), max_size=10),
       st.lists(TOPICS, min_size=1, max_size=10))
def test_the_index_finds_exactly_the_values_of_matching_patterns(added, removed, topics):
    index: Index[int] = Index()
    model: set[tuple[str, int]] = set()
    for p, v in added:
        assert index.add(p, v) == ((p, v) not in model)
        model.add((p, v))
    for t in topics:  # fill the cache, then change the index: the cache must not lie
        index.match(t)
    for p, v in removed:
        assert index.remove(p, v) == ((p, v) in model)
        model.discard((p, v))
    assert len(index) == len(model)
    assert index.patterns() == sorted({p for p, _ in model})
    for t in topics:
        assert index.match(t) == {v for p, v in model if matches(p, t)}


def test_removing_the_last_value_prunes_the_trie():
    index: Index[str] = Index()
    index.add("a.b.c", "v")
    index.add("a.>", "w")
    assert index.remove("a.b.c", "v")
    assert not index.remove("a.b.c", "v")
    assert index._root.children["a"].children == {}, "the empty branch b.c is gone"
    assert index.remove("a.>", "w")
    assert index._root.children == {}
