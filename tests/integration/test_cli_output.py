"""Human tables piped to another program keep every cell whole (issue 11): rich assumes 80
columns when stdout is not a terminal and used to cut `127.0.0.1:4…`."""

from __future__ import annotations

import os
import subprocess
import sys

from .cluster import wait_for

LONG_NODE = "node-with-a-name-long-enough-to-overflow-eighty-columns-by-itself-0123456789"
LONG_TAG = "purpose=a-tag-value-that-is-also-far-too-long-for-an-eighty-column-table"
LONG_SERVICE = "a-service-name-long-enough-to-push-the-services-table-past-eighty-columns"


def piped(*args: str, env: dict[str, str]) -> str:
    # capture_output: stdout is a pipe, as in `meshd members | grep ...`
    out = subprocess.run([sys.executable, "-m", "meshd_cli", *args], env=env, capture_output=True,
                         text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_piped_members_and_services_tables_are_not_truncated(cluster):
    # the data dir (and its control socket path) takes the short name; the later --name wins
    d = cluster.add("long", extra=("--name", LONG_NODE, "--tags", LONG_TAG))
    env = {**os.environ, "MESHD_DATA_DIR": str(d.data_dir)}
    env.pop("COLUMNS", None)  # what a pipe or a file really gets
    env.pop("MESHD_ADDR", None)
    members = piped("members", env=env)
    for text in (LONG_NODE, d.addr, LONG_TAG, "alive"):
        assert text in members, f"{text!r} missing from:\n{members}"
    assert "…" not in members
    assert "\x1b[" not in members, "no colour codes in a pipe"
    cluster.service(d, LONG_SERVICE)
    wait_for(lambda: LONG_SERVICE in piped("services", env=env), 15, "the service listed")
    services = piped("services", env=env)
    assert LONG_NODE in services and "…" not in services
