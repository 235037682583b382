"""`meshd up` without --advertise, in a network namespace this test creates and removes: the
node advertises the address of the interface that carries the default route, not the
loopback address the host name maps to in /etc/hosts (issue 11, item 17)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from .cluster import Daemon, control
from .netns import run, why_not_available

reason = why_not_available()
pytestmark = pytest.mark.skipif(reason is not None, reason=reason or "")

NETNS_ETC = Path("/etc/netns")  # `ip netns exec NS` bind-mounts /etc/netns/NS/* over /etc


@contextlib.contextmanager
def host_with_default_route(ip: str, gateway: str):
    """A namespace with a veth holding `ip`/24, a default route via `gateway`, and an
    /etc/hosts that maps this host's name to 127.0.1.1 (Debian's default)."""
    tag = uuid.uuid4().hex[:6]
    ns, etc = f"mdadv{tag}", NETNS_ETC / f"mdadv{tag}"
    made_etc_root = not NETNS_ETC.exists()
    try:
        run("ip", "netns", "add", ns)
        run("ip", "-n", ns, "link", "add", f"va{tag}", "type", "veth", "peer", "name",
            f"vb{tag}")
        run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", f"va{tag}")
        for dev in ("lo", f"va{tag}", f"vb{tag}"):
            run("ip", "-n", ns, "link", "set", dev, "up")
        run("ip", "-n", ns, "route", "add", "default", "via", gateway, "dev", f"va{tag}")
        etc.mkdir(parents=True)
        (etc / "hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {socket.gethostname()}\n")
        yield ns, f"va{tag}"
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(etc, ignore_errors=True)
        if made_etc_root:
            with contextlib.suppress(OSError):
                NETNS_ETC.rmdir()


def test_up_advertises_the_default_route_address_not_loopback(tmp_path):
    with host_with_default_route("10.204.0.2", "10.204.0.1") as (ns, dev):
        prefix = ["ip", "netns", "exec", ns]
        # the trap the issue describes is really set inside the namespace
        resolved = subprocess.run(
            [*prefix, sys.executable, "-c",
             "import socket; print(socket.gethostbyname(socket.gethostname()))"],
            capture_output=True, text=True, check=True).stdout.strip()
        assert resolved == "127.0.1.1"
        d = Daemon(tmp_path, "adv", "", prefix=prefix)
        try:
            d.start(bind="0.0.0.0:0", env={"MESHD_SECRET": ""})
            host, _, port = d.addr.rpartition(":")
            assert host == "10.204.0.2", f"advertised {d.addr}"
            invite = control(d.data_dir, "invite")
            assert f"--join 10.204.0.2:{port}" in invite["command"]
            log = d.log.read_text()
            assert (f"advertising 10.204.0.2, the address of {dev} (default route); "
                    "pass --advertise to change it") in log
        finally:
            d.stop()
