"""Node's reactions to membership events, without the storms they made at 50 daemons.

- _sync_newcomer: a new member and a restarted one (a new `boot` tag) get an immediate store
  and registry sync; a member back from a death it refuted in the same run does not (every
  member syncing with it at once loads a node that was only too slow to answer).
- _members_changed: the state file is written at once only when our incarnation moved.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from meshd.membership.core import MemberEvent
from meshd.node import Node


class _Recorder:
    def __init__(self) -> None:
        self.synced: list[str] = []
        self._nursery = object()

    def sync_with(self, addr: str) -> list[str]:
        self.synced.append(addr)
        return [addr]


def _node() -> tuple[Any, _Recorder, _Recorder]:
    store, reg = _Recorder(), _Recorder()
    store.rep = store  # the store service's replicator answers sync_with
    store._send = lambda sends: None
    reg.replicator = reg
    reg._send_all = lambda sends: None
    node = SimpleNamespace(name="me", store=store, registry=reg, _synced_boots={},
                           core=SimpleNamespace(members={"a": 1, "b": 1}))
    return node, store, reg


def _join(node: Any, name: str, boot: str) -> None:
    Node._sync_newcomer(node, MemberEvent("join", name, f"{name}:1", 1, {"boot": boot}))


def test_new_and_restarted_members_are_synced_at_once_refuted_deaths_are_not():
    node, store, reg = _node()
    _join(node, "a", "100")  # new
    _join(node, "a", "100")  # back from a refuted death: the same run
    _join(node, "a", "200")  # restarted
    _join(node, "b", "100")  # another member with the same boot time is its own
    assert store.synced == reg.synced == ["a:1", "a:1", "b:1"]
    Node._sync_newcomer(node, MemberEvent("update", "a", "a:1", 2, {"boot": "300"}))
    Node._sync_newcomer(node, MemberEvent("join", "me", "me:1", 1, {"boot": "1"}))
    assert store.synced == ["a:1", "a:1", "b:1"]


def test_member_changes_save_the_state_file_at_once_only_when_our_incarnation_moved():
    saves: list[str] = []
    node = SimpleNamespace(state={"incarnation": 3}, _peers_dirty=False,
                           core=SimpleNamespace(me=SimpleNamespace(incarnation=3)),
                           _schedule_save=lambda: saves.append("now"))
    Node._members_changed(node)  # a suspicion or a refutation of another member
    assert saves == [] and node._peers_dirty, "the peers wait for the periodic save"
    node.core.me.incarnation = 4  # we refuted a suspicion of ourselves
    Node._members_changed(node)
    assert saves == ["now"], "a restart must start above the incarnation we reached"
