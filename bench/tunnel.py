"""Tunnel throughput on loopback, same run: `python bench/tunnel.py [--mb N]`.

One TCP stream of N MB into a sink server, through:
  (a) direct TCP;
  (b) an OpenSSH `ssh -L` port forward (Debian's openssh-server, started here on a loopback
      port with a throwaway host key and user key, stopped after; installed with apt-get when
      missing and running as root);
  (c) a meshd tunnel: `meshd tunnel connect` on node b -> daemon b -> secure link -> daemon
      a -> the sink (two daemons on loopback).
Goal: (c) >= 1.0x (b); the ratio to (a) is reported. Also the CPU seconds per GB of the two
daemons in (c) (from /proc/PID/stat): throughput on a shared machine swings between runs,
CPU per byte much less, so it is the figure to compare before and after a change.
First it prints the host's AES-256-GCM rate (encrypt + decrypt of 64 KiB frames in one
process, what the link frames cost): hosts differ by 4x on it, and the ratio to ssh -L
(which uses AES-GCM or ChaCha20 too) is what must hold on any of them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.integration.cluster import Cluster, LoopbackServer, control, wait_for  # noqa: E402


class Sink(LoopbackServer):
    """Counts bytes until EOF, then answers with the count (so the sender knows it all got
    there)."""

    def handle(self, conn: socket.socket) -> None:
        total = 0
        with conn:
            while data := conn.recv(1 << 20):
                total += len(data)
            conn.sendall(str(total).encode())


def push(port: int, megabytes: int) -> float:
    block = os.urandom(1 << 20)
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        start = time.perf_counter()
        for _ in range(megabytes):
            s.sendall(block)
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := s.recv(64):
            answer += chunk
        took = time.perf_counter() - start
    if int(answer or 0) != megabytes << 20:
        raise RuntimeError(f"sink got {answer!r} bytes, expected {megabytes << 20}")
    return megabytes / took


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def ssh_forward(root: Path, target: int) -> tuple[list[subprocess.Popen[bytes]], int] | None:
    if not shutil.which("sshd") and not Path("/usr/sbin/sshd").exists():
        if os.geteuid() != 0:
            return None
        subprocess.run(["apt-get", "install", "-y", "-qq", "openssh-server",
                        "openssh-client"], capture_output=True, check=False)
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    if not Path(sshd).exists():
        return None
    for name in ("host", "user"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                        str(root / name)], check=True)
    (root / "authorized_keys").write_text((root / "user.pub").read_text())
    os.chmod(root / "authorized_keys", 0o600)
    port = free_port()
    config = root / "sshd_config"
    config.write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {root / 'host'}
AuthorizedKeysFile {root / 'authorized_keys'}
PasswordAuthentication no
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
PidFile {root / 'sshd.pid'}
""")
    Path("/run/sshd").mkdir(exist_ok=True)
    server = subprocess.Popen([sshd, "-D", "-f", str(config), "-e"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    local = free_port()
    client = subprocess.Popen(
        ["ssh", "-N", "-i", str(root / "user"), "-p", str(port), "-o",
         "StrictHostKeyChecking=no", "-o", f"UserKnownHostsFile={root / 'known'}", "-o",
         "BatchMode=yes", "-L", f"{local}:127.0.0.1:{target}", "root@127.0.0.1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(local)
    time.sleep(0.5)
    return [client, server], local


def aes_gcm_baseline(seconds: float = 1.0) -> float:
    """GB/s of AES-256-GCM encrypt + decrypt of 64 KiB frames in this process."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    aead, frame, n = AESGCM(os.urandom(32)), os.urandom(64 << 10), 0
    start = time.perf_counter()
    while (took := time.perf_counter() - start) < seconds:
        nonce = n.to_bytes(12, "big")
        aead.decrypt(nonce, aead.encrypt(nonce, frame, None), None)
        n += 1
    return n * len(frame) / took / 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=512)
    opts = ap.parse_args()
    print(f"host baseline: AES-256-GCM encrypt+decrypt {aes_gcm_baseline():.2f} GB/s "
          f"(load average {os.getloadavg()[0]:.2f})")
    sink = Sink()
    results: dict[str, float] = {"(a) direct TCP": push(sink.port, opts.mb)}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ssh = ssh_forward(root, sink.port) if os.geteuid() == 0 else None
        if ssh is not None:
            procs, local = ssh
            try:
                results["(b) ssh -L"] = push(local, opts.mb)
            finally:
                for p in procs:
                    p.terminate()
        c = Cluster(root / "mesh")
        (root / "mesh").mkdir()
        try:
            a = c.add("a", profile="lan")
            b = c.add("b", join=[a.addr], profile="lan")
            control(a.data_dir, "tunnel.expose", name="sink", to=f"127.0.0.1:{sink.port}")
            wait_for(lambda: control(b.data_dir, "tunnel.list") != [], 10, "tunnel on b")
            port = free_port()
            proc = subprocess.Popen([sys.executable, "-m", "meshd_cli", "tunnel", "connect", "sink",
                                     "--listen", f"127.0.0.1:{port}", "--data-dir",
                                     str(b.data_dir)], stdout=subprocess.PIPE, text=True)
            assert proc.stdout is not None
            proc.stdout.readline()
            try:
                before = {d.name: _cpu_seconds(d.proc.pid) for d in (a, b)}
                results["(c) meshd tunnel"] = push(port, opts.mb)
                cpu = {n: (_cpu_seconds(d.proc.pid) - before[n]) * 1024 / opts.mb
                       for n, d in (("a", a), ("b", b))}
            finally:
                proc.terminate()
        finally:
            c.close()
    print(f"one TCP stream of {opts.mb} MB on loopback:")
    for name, rate in results.items():
        print(f"  {name:18} {rate:8.0f} MB/s")
    mesh = results["(c) meshd tunnel"]
    print(f"meshd / direct: {mesh / results['(a) direct TCP']:.2f}")
    if "(b) ssh -L" in results:
        print(f"meshd / ssh -L: {mesh / results['(b) ssh -L']:.2f} (goal >= 1.0)")
    else:
        print("ssh -L not measured (needs root to install and start openssh-server)")
    print("(c) CPU s per GB: " + ", ".join(f"daemon {n} {v:.2f}" for n, v in cpu.items()))
    print("added latency per relay hop: see bench/relay.py (network namespaces, root)")
    return 0


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    sys.exit(main())
