"""`meshd up --print-systemd-unit` (meshd/systemd_unit.py): hardened, and the command as
given."""

from __future__ import annotations

import pytest

from meshd.systemd_unit import UnitError, unit


def directives(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            out[key] = value
    return out


def test_the_unit_runs_the_daemon_unprivileged_and_confined():
    d = directives(unit(["/usr/bin/meshd", "up", "--data-dir", "/var/lib/meshd"]))
    assert d["User"] == "meshd" and d["Group"] == "meshd"
    assert d["NoNewPrivileges"] == "yes"
    assert d["CapabilityBoundingSet"] == "" and d["AmbientCapabilities"] == ""
    assert d["ProtectSystem"] == "strict" and d["ProtectHome"] == "yes"
    assert d["StateDirectory"] == "meshd" and d["StateDirectoryMode"] == "0700"
    assert d["Restart"] == "on-failure"
    assert d["EnvironmentFile"].startswith("-/etc/meshd/")
    assert d["ExecStart"] == "/usr/bin/meshd up --data-dir /var/lib/meshd"
    assert d["WantedBy"] == "multi-user.target"


def test_a_data_dir_elsewhere_is_the_one_writable_path():
    d = directives(unit(["/usr/bin/meshd", "up"], user="mesh", data_dir="/srv/mesh data"))
    assert "StateDirectory" not in d
    assert d["ReadWritePaths"] == '"/srv/mesh data"' and d["User"] == "mesh"


def test_words_are_quoted_for_systemd_so_no_value_adds_a_word_or_a_directive():
    d = directives(unit(["/usr/bin/meshd", "up", "--tags", "team=a b", "--name", "n%1",
                         "--tags", 'k=$MESHD_SECRET', "--tags", 'q="x" \\']))
    assert d["ExecStart"] == ('/usr/bin/meshd up --tags "team=a b" --name "n%%1" '
                              '--tags "k=$$MESHD_SECRET" --tags "q=\\"x\\" \\\\"')
    for bad in ("a\nExecStartPre=+/bin/sh", "tab\there", "del\x7f"):
        with pytest.raises(UnitError):
            unit(["/usr/bin/meshd", "up", "--name", bad])
    for user in ("", "a b", "root\nUser=x"):
        with pytest.raises(UnitError):
            unit(["/usr/bin/meshd", "up"], user=user)
    with pytest.raises(UnitError):
        unit(["/usr/bin/meshd", "up"], data_dir="relative/dir")
