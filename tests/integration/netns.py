"""Test hosts in network namespaces that the test creates and always removes.

Layout: a hub namespace holds a bridge; each host namespace has a veth into it and an
address in 10.201.<net>.0/24 — addresses that exist only inside these namespaces.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid


def why_not_available() -> str | None:
    if os.geteuid() != 0:
        return "network namespace tests need root"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"network namespace tests need `{tool}` (apt-get install iproute2 iptables)"
    probe = f"mdprobe{uuid.uuid4().hex[:6]}"
    ok = subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
        return None
    return "this kernel or sandbox does not allow `ip netns add`"


def run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


class Hosts:
    def __init__(self, count: int, net: int = 201) -> None:
        tag = uuid.uuid4().hex[:5]
        self.hub = f"mdhub{tag}"
        self.names = [f"md{tag}h{i}" for i in range(count)]
        self.ips = [f"10.{net}.0.{i + 1}" for i in range(count)]
        self._created: list[str] = []
        try:
            self._build(tag)
        except Exception:
            self.close()
            raise

    def _build(self, tag: str) -> None:
        run("ip", "netns", "add", self.hub)
        self._created.append(self.hub)
        run("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", self.hub, "link", "set", "br0", "up")
        for i, (ns, ip) in enumerate(zip(self.names, self.ips, strict=True)):
            run("ip", "netns", "add", ns)
            self._created.append(ns)
            outer, inner = f"v{tag}{i}o", f"v{tag}{i}i"
            run("ip", "link", "add", outer, "netns", self.hub, "type", "veth", "peer", "name",
                inner, "netns", ns)
            run("ip", "-n", self.hub, "link", "set", outer, "master", "br0", "up")
            run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", inner)
            run("ip", "-n", ns, "link", "set", inner, "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")

    def cut(self, i: int) -> None:
        """Drop every packet in and out of host i (loopback stays up)."""
        ns = self.names[i]
        run("ip", "netns", "exec", ns, "iptables", "-I", "INPUT", "!", "-i", "lo", "-j", "DROP")
        run("ip", "netns", "exec", ns, "iptables", "-I", "OUTPUT", "!", "-o", "lo", "-j",
            "DROP")

    def block(self, i: int, j: int) -> None:
        """Drop everything between hosts i and j (both ways); the rest stays reachable."""
        for a, b in ((i, j), (j, i)):
            run("ip", "netns", "exec", self.names[a], "iptables", "-I", "INPUT", "-s",
                self.ips[b], "-j", "DROP")
            run("ip", "netns", "exec", self.names[a], "iptables", "-I", "OUTPUT", "-d",
                self.ips[b], "-j", "DROP")

    def block_udp(self, i: int, j: int) -> None:
        """Drop UDP between hosts i and j (both ways): TCP still passes."""
        for a, b in ((i, j), (j, i)):
            run("ip", "netns", "exec", self.names[a], "iptables", "-I", "INPUT", "-p", "udp",
                "-s", self.ips[b], "-j", "DROP")
            run("ip", "netns", "exec", self.names[a], "iptables", "-I", "OUTPUT", "-p", "udp",
                "-d", self.ips[b], "-j", "DROP")

    def heal(self, i: int) -> None:
        run("ip", "netns", "exec", self.names[i], "iptables", "-F")

    def prefix(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.names[i]]

    def close(self) -> None:
        for ns in reversed(self._created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._created.clear()
