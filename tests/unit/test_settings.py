"""The settings tree: defaults < TOML < MESHD_* environment < flags, checked (meshd/settings.py)."""

from __future__ import annotations

import pytest

from meshd.settings import BrokerSettings, SettingsError, load_settings


def test_layers_apply_in_order_for_every_section():
    s = load_settings({"broker": {"ack_wait": 5, "max_deliver": 2}, "store": {"fanout": 3}},
                      {"MESHD_BROKER_MAX_DELIVER": "3", "MESHD_STORE_FANOUT": "6",
                       "MESHD_NAME": "n1"},
                      {"broker.max_deliver": 4, "name": "n2"})
    assert (s.broker.ack_wait, s.broker.max_deliver) == (5.0, 4)
    assert s.store.fanout == 6 and s.node.name == "n2"
    assert load_settings().broker == BrokerSettings()


@pytest.mark.parametrize("toml, says", [
    ({"brokr": {}}, "unknown settings table [brokr]; known: node, membership, limits, rpc, "
                    "store, broker"),
    ({"broker": {"max_deliver": 0}}, "must be at least 1"),
    ({"broker": {"ack_wait": 0}}, "ack_wait above 0"),
    ({"broker": {"subscriber_buffer": 0}}, "must be at least 1"),
])
def test_bad_settings_say_what_is_wrong(toml, says):
    with pytest.raises(SettingsError) as err:
        load_settings(toml)
    assert says in str(err.value)


def test_an_unknown_key_in_a_section_is_refused():
    with pytest.raises(SettingsError, match="broker"):
        load_settings({"broker": {"ack_wiat": 1}})
