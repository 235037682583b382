"""Seen: the Slack event ids the bot saw lately, so a retried event runs its command once;
bounded in age (`keep` seconds) and in count (`most` entries)."""

from __future__ import annotations

from meshd.bot.slack import SEEN_FOR, SEEN_MAX, Seen


def test_an_id_is_first_once_and_a_repeat_is_not():
    seen = Seen()
    assert seen.first("Ev1", now=0.0)
    assert not seen.first("Ev1", now=1.0)
    assert not seen.first("Ev1", now=2.0)
    assert seen.first("Ev2", now=3.0)
    assert not seen.first("Ev2", now=4.0)
    assert (seen.keep, seen.most) == (SEEN_FOR, SEEN_MAX)


def test_an_id_without_now_uses_the_clock():
    seen = Seen()
    assert seen.first("Ev1") and not seen.first("Ev1")


def test_ids_older_than_keep_are_forgotten():
    seen = Seen(keep=10.0, most=100)
    assert seen.first("old", now=0.0)
    assert not seen.first("old", now=10.0)  # exactly keep: still remembered
    assert seen.first("new", now=10.5)  # "old" is now 10.5 s old
    assert "old" not in seen.ids and "new" in seen.ids
    assert seen.first("old", now=11.0)  # a repeat that late runs again


def test_a_repeat_does_not_extend_how_long_an_id_is_kept():
    seen = Seen(keep=10.0, most=100)
    assert seen.first("a", now=0.0)
    assert not seen.first("a", now=9.0)
    assert seen.first("a", now=10.5)


def test_never_more_than_most_entries():
    seen = Seen(keep=1e9, most=10)
    for i in range(1000):
        assert seen.first(f"Ev{i}", now=float(i))
        assert len(seen.ids) <= 10
    assert not seen.first("Ev999", now=1000.0)  # the latest are remembered
    assert seen.first("Ev0", now=1001.0)  # the oldest were dropped


def test_a_repeat_is_caught_while_its_id_is_held():
    seen = Seen(keep=1e9, most=1)
    assert seen.first("Ev1", now=0.0)
    assert not seen.first("Ev1", now=1.0)
