"""`meshd doctor` against real daemons: a healthy pair is all ok; each planted fault is found
with its fix (a secret file readable by others, UDP blocked between two hosts by iptables in
network namespaces, a node advertising loopback to members on other hosts); no daemon is
one clear failure, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from meshd_sdk.testing import child_env, cluster

from .cluster import Daemon, wait_for
from .netns import Hosts, why_not_available

NETNS = why_not_available()


def doctor(data_dir: Path, prefix: list[str] | None = None) -> tuple[int, dict[str, Any]]:
    out = subprocess.run([*(prefix or []), sys.executable, "-m", "meshd_cli", "doctor",
                          "--data-dir", str(data_dir), "--json"], capture_output=True,
                         text=True, timeout=60, env=child_env())
    assert "Traceback" not in out.stderr, out.stderr
    return out.returncode, json.loads(out.stdout)


def by_check(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["check"]: f for f in report["findings"]}


def test_a_healthy_pair_then_a_secret_readable_by_others(tmp_path):
    with cluster(2, root=tmp_path / "mesh") as m:
        data = m.node(0).data_dir
        wait_for(lambda: all(r["rtt_ms"] is not None for n in (0, 1)
                             for r in m.node(n).members().values() if not r["self"]),
                 20, "each node's UDP probes of the other answered")
        code, report = doctor(data)
        found = by_check(report)
        assert code == 0 and report["ok"], [f for f in report["findings"]
                                            if f["level"] != "ok"]
        for check in ("daemon", "data dir", "one daemon", "advertise", "member node1",
                      "clock", "versions", "secret ring"):
            assert found[check]["level"] == "ok", found[check]
        assert "UDP both ways" in found["member node1"]["detail"]
        human = subprocess.run([sys.executable, "-m", "meshd_cli", "doctor", "--data-dir",
                                str(data)], capture_output=True, text=True, timeout=60,
                               env=child_env())
        assert human.returncode == 0 and human.stdout.startswith("ok  "), human.stdout

        os.chmod(data / "keyring.json", 0o644)  # planted: the cluster secret, world-readable
        code, report = doctor(data)
        bad = by_check(report)["data dir"]
        assert code == 1 and not report["ok"]
        assert bad["level"] == "fail" and "keyring.json (644)" in bad["detail"]
        assert "chmod" in bad["fix"]


def test_no_daemon_is_one_clear_failure(tmp_path):
    data = tmp_path / "nothing"
    data.mkdir(mode=0o700)
    code, report = doctor(data)
    found = by_check(report)
    assert code == 1 and found["daemon"]["level"] == "fail"
    assert "meshd up" in found["daemon"]["fix"]
    assert set(found) == {"daemon", "data dir", "one daemon"}


def test_env_is_refused(tmp_path):
    out = subprocess.run([sys.executable, "-m", "meshd_cli", "--env", "prod", "doctor"],
                         capture_output=True, text=True, timeout=60, env=child_env())
    assert out.returncode == 1 and out.stderr.startswith("400 bad request:"), out.stderr


@pytest.mark.skipif(NETNS is not None, reason=NETNS or "")
def test_udp_blocked_between_two_hosts_and_a_loopback_advertise_are_found(cluster):
    hosts = Hosts(3, net=205)
    try:
        daemons = []
        for i in range(3):
            d = Daemon(cluster.root, f"h{i}", cluster.secret, prefix=hosts.prefix(i))
            cluster.daemons[d.name] = d
            d.start(join=[f"{hosts.ips[0]}:7946"] if i else None, bind=f"{hosts.ips[i]}:7946")
            daemons.append(d)
        h0 = daemons[0]
        wait_for(lambda: all(x.status_of(y.name) == "alive" for x in daemons for y in daemons),
                 20, "3 alive")
        hosts.block_udp(0, 2)
        wait_for(lambda: h0.members()["h2"]["reach"] == "via h1", 30,
                 "h0 reaching h2 through h1 (direct UDP silent)")
        code, report = doctor(h0.data_dir, hosts.prefix(0))
        found = by_check(report)
        assert code == 1, report
        assert found["member h2"]["level"] == "fail", found["member h2"]
        assert "UDP" in found["member h2"]["detail"] and "TCP works" in found["member h2"][
            "detail"]
        assert found["member h1"]["level"] == "ok", found["member h1"]

        # a fourth host advertising loopback: the others are on other hosts
        lo = Daemon(cluster.root, "h3", cluster.secret, prefix=hosts.prefix(1),
                    extra=("--advertise", "127.0.0.1:7950"))
        cluster.daemons[lo.name] = lo
        lo.start(join=[f"{hosts.ips[0]}:7946"], bind="0.0.0.0:7950")
        wait_for(lambda: len(lo.members()) >= 3, 20, "h3 knowing the others")
        code, report = doctor(lo.data_dir, hosts.prefix(1))
        adv = by_check(report)["advertise"]
        assert code == 1 and adv["level"] == "fail" and "127.0.0.1:7950" in adv["detail"]
        assert "--advertise" in adv["fix"]
    finally:
        cluster.close()
        hosts.close()
