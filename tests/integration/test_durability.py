"""Issue 11 hardening against real daemons: captured sealed gossip played back later does
not churn the member table, and a replayed ping is answered once."""

from __future__ import annotations

import socket
import time

from meshd.membership.messages import Ack, Ping, Suspect, decode_packet, encode_packet
from meshd.secure.keyring import Keyring, parse_secret

from .cluster import control, wait_for


class _Peer:
    """A UDP socket on 127.0.0.1 holding the cluster secret, as an attacker on the path
    that captured sealed packets would (plus the key to check what comes back)."""

    def __init__(self, secret: str) -> None:
        self.ring = Keyring([parse_secret(secret)])
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(10)  # a hang guard: an ack on loopback takes milliseconds
        self.addr = f"127.0.0.1:{self.sock.getsockname()[1]}"

    def send(self, to: str, packet: bytes) -> None:
        host, port = to.rsplit(":", 1)
        self.sock.sendto(packet, (host, int(port)))

    def ping(self, seq: int, target: str) -> bytes:
        return self.ring.seal(encode_packet([Ping(seq, target, "probe", self.addr, True)]))

    def next_ack(self) -> int:
        """The seq of the next ack that arrives (other packets are skipped)."""
        while True:
            data, _ = self.sock.recvfrom(65536)
            for msg in decode_packet(self.ring.open(data, time.time())):
                if isinstance(msg, Ack):
                    return msg.seq

    def close(self) -> None:
        self.sock.close()


def test_captured_suspect_and_ping_played_back_do_not_churn(cluster):
    a = cluster.add("a")
    b = cluster.add("b", join=[a.addr])
    wait_for(lambda: a.status_of("b") == "alive" and b.status_of("a") == "alive", 10,
             "a and b alive")
    # b's incarnation moves once more when it pins the auth root (a new tag): let it settle
    wait_for(lambda: len(control(b.data_dir, "auth.rules.list")) == 3
             and a.members()["b"]["incarnation"] == control(b.data_dir, "status")[
                 "incarnation"], 10, "b settled")
    inc_b = a.members()["b"]["incarnation"]
    b_self = control(b.data_dir, "status")["incarnation"]
    peer = _Peer(cluster.secret)
    try:
        # a suspicion of b that a sent ten minutes ago, captured then, played back now
        captured = peer.ring.seal(encode_packet([Suspect(inc_b, "b", "a")]),
                                  time.time() - 600)
        peer.send(a.addr, captured)
        # a ping, answered, then played back: the next ack must be the fresh ping's. a
        # handles datagrams in order, so once that ack is here the others were handled.
        ping = peer.ping(1, "a")
        peer.send(a.addr, ping)
        assert peer.next_ack() == 1
        peer.send(a.addr, ping)
        peer.send(a.addr, peer.ping(2, "a"))
        assert peer.next_ack() == 2, "the replayed ping was answered again"
    finally:
        peer.close()
    view = a.members()["b"]
    assert (view["status"], view["incarnation"]) == ("alive", inc_b), \
        "the played-back suspicion churned the member table"
    assert control(b.data_dir, "status")["incarnation"] == b_self, "b had to refute"
    stats = control(a.data_dir, "status")["stats"]
    assert stats["udp_dropped_stale"] == 1
    assert stats["udp_dropped_replay"] == 1
