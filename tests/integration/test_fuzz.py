"""A live node takes 10,000 random and mutated packets, streams and frames and keeps serving."""

from __future__ import annotations

import json
import random
import socket

import cbor2
import trio

from meshd.identity import Identity
from meshd.membership.messages import (
    Ack,
    Alive,
    IndirectPing,
    MemberState,
    Ping,
    PushPull,
    Suspect,
    encode_packet,
)
from meshd.secure.frames import FrameCipher
from meshd.secure.handshake import Initiator
from meshd.secure.keyring import Keyring, parse_secret
from meshd.transport.links import DATA, END, HEADER, OPEN, LinkError, _plain, _read_plain

from .cluster import control, wait_for

UDP_RANDOM = 4000
UDP_SEALED = 3000
TCP_RANDOM = 2000
LINK_FRAMES = 1000


def _mutate(rng: random.Random, data: bytes) -> bytes:
    raw = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.choice(("flip", "cut", "insert", "dup"))
        pos = rng.randrange(len(raw)) if raw else 0
        if op == "flip" and raw:
            raw[pos] ^= rng.randint(1, 255)
        elif op == "cut":
            del raw[pos:]
        elif op == "insert":
            raw[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif raw:
            raw += raw[pos:pos + 32]
    return bytes(raw)


def _valid_packets(target: str, addr: str) -> list[bytes]:
    state = MemberState("ghost", "127.0.0.1:9", 1, 0, {})
    return [
        encode_packet([Ping(1, target, "fuzzer", "127.0.0.1:9")]),
        encode_packet([IndirectPing(2, "b", "127.0.0.1:9", "fuzzer", "127.0.0.1:9", True)]),
        encode_packet([Ack(3), Alive(0, "ghost", "127.0.0.1:9", {"k": "v"})]),
        encode_packet([Suspect(0, "ghost", "fuzzer")]),
        encode_packet([PushPull("fuzzer", False, False, [state])]),
    ]


async def _fuzz(addr: str, secret: bytes, stats: dict[str, int]) -> None:
    rng = random.Random(1234)
    host, port = addr.rsplit(":", 1)
    port_n = int(port)
    keyring = Keyring([secret])
    valid = _valid_packets("a", addr)
    udp = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await udp.bind(("127.0.0.1", 0))
    for i in range(UDP_RANDOM):
        await udp.sendto(rng.randbytes(rng.randint(0, 1500)), (host, port_n))
        stats["inputs"] += 1
        if i % 50 == 0:
            await trio.sleep(0.01)  # let the node breathe: this is a fuzz, not a flood
    for i in range(UDP_SEALED):
        await udp.sendto(keyring.seal(_mutate(rng, rng.choice(valid))), (host, port_n))
        stats["inputs"] += 1
        if i % 50 == 0:
            await trio.sleep(0.01)
    udp.close()
    for _ in range(TCP_RANDOM):
        try:
            s = await trio.open_tcp_stream(host, port_n)
            await s.send_all(rng.randbytes(rng.randint(1, 600)))
            await s.aclose()
        except ConnectionError:  # refused or reset under the burst; other errors fail
            stats["tcp_refused"] += 1
        stats["inputs"] += 1
    ident = Identity.generate()
    sent = 0
    while sent < LINK_FRAMES:
        s = await trio.open_tcp_stream(host, port_n)
        ini = Initiator(ident, keyring, "127.0.0.1:9")
        try:
            await s.send_all(_plain(ini.hello()))
            confirm, keys = ini.on_welcome(await _read_plain(s))
            await s.send_all(_plain(confirm))
        except (trio.BrokenResourceError, ConnectionError, LinkError):
            stats["handshakes_cut"] += 1  # the node may shed a connection under the flood
            await s.aclose()
            await trio.sleep(0.01)
            continue
        cipher = FrameCipher(keys.send_key, keys.recv_key, 1 << 20)
        try:
            # a burst of authenticated frames with hostile contents on one link
            for _ in range(50):
                kind = rng.random()
                if kind < 0.3:
                    plain = rng.randbytes(rng.randint(0, 64))
                elif kind < 0.6:
                    plain = HEADER.pack(OPEN, rng.choice([1, 3, 5]), ) + b"membership"
                elif kind < 0.9:
                    plain = HEADER.pack(rng.choice([DATA, END]), 1) + _mutate(
                        rng, rng.choice(valid))
                else:
                    plain = HEADER.pack(rng.randint(0, 255), rng.randint(0, 2**32 - 1))
                await s.send_all(cipher.seal(plain))
                sent += 1
                stats["inputs"] += 1
            # and finally a frame that is not authentic: the link must be dropped
            await s.send_all(b"\x00\x00\x00\x20" + rng.randbytes(32))
            sent += 1
            stats["inputs"] += 1
        except (trio.BrokenResourceError, ConnectionError):
            stats["links_cut"] += 1
        await s.aclose()


def test_fuzzed_node_keeps_serving_its_cluster(cluster):
    a = cluster.add("a")
    b = cluster.add("b", join=[a.addr])
    c = cluster.add("c", join=[a.addr])
    names = ["a", "b", "c"]

    def healthy() -> bool:
        return all(all(d.members().get(n, {}).get("status") == "alive" for n in names)
                   for d in (a, b, c))

    wait_for(healthy, 10, "3 alive")
    secret = parse_secret(json.loads((a.data_dir / "keyring.json").read_text())["primary"])
    stats = {"inputs": 0, "tcp_refused": 0, "links_cut": 0, "handshakes_cut": 0}
    trio.run(_fuzz, a.addr, secret, stats)
    assert stats["inputs"] >= 10_000
    assert a.proc.poll() is None, "the fuzzed node died"
    wait_for(healthy, 15, "the cluster healthy after the fuzz")
    st = control(a.data_dir, "status")["stats"]
    # the kernel may drop a few datagrams under the burst; the node must drop the rest
    assert st["udp_dropped_unsealed"] >= UDP_RANDOM * 0.8
    assert st["decode_errors"] > 100
    assert st["handshakes_failed"] > 100
    assert st["links_dropped_bad_frames"] >= 1
    assert "Traceback" not in a.log.read_text()
    # the control API survives garbage too
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(a.data_dir / "meshd.sock"))
    sock.sendall(b"\x00\x00\x00\x05hello")
    sock.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(a.data_dir / "meshd.sock"))
    body = cbor2.dumps({"op": 5, "args": []})
    sock.sendall(len(body).to_bytes(4, "big") + body)
    reply = sock.recv(4096)
    sock.close()
    assert b"bad_request" in reply
    assert {m["name"]: m["status"] for m in control(a.data_dir, "members")} == {
        "a": "alive", "b": "alive", "c": "alive"}, "the control API no longer answers right"
