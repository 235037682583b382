"""AEAD frames: the nonce counter never repeats, and the peer's length cap is exact.

AES-GCM with a repeated nonce under one key leaks the XOR of the plaintexts and lets an
attacker forge tags, so the counter must not wrap at any byte boundary. Sealing the same
plaintext twice gives the same ciphertext exactly when the nonce repeats, which makes reuse
observable from outside the cipher.
"""

from __future__ import annotations

import os

import pytest

from meshd.secure.frames import LENGTH, TAG_BYTES, FrameCipher, FrameError

MAX_FRAME = 1024


def _pair() -> tuple[FrameCipher, FrameCipher]:
    k1, k2 = os.urandom(32), os.urandom(32)
    return FrameCipher(k1, k2, MAX_FRAME), FrameCipher(k2, k1, MAX_FRAME)


def test_the_same_plaintext_never_seals_to_the_same_frame_across_600_frames():
    tx, _ = _pair()
    frames = [tx.seal(b"same") for _ in range(600)]
    assert len(set(frames)) == 600, "a nonce was reused"


def test_frames_256_apart_differ():
    tx, _ = _pair()
    frames = [tx.seal(b"x") for _ in range(513)]
    assert frames[0] != frames[256] != frames[512]
    assert frames[1] != frames[257]


def test_after_256_frames_an_early_frame_replayed_is_refused():
    tx, rx = _pair()
    frames = [tx.seal(f"frame {i}".encode())[4:] for i in range(257)]
    for i in range(256):
        assert rx.open(frames[i]) == f"frame {i}".encode()
    with pytest.raises(FrameError):
        rx.open(frames[0])  # sealed at counter 0; the receiver is at 256
    assert rx.open(frames[256]) == b"frame 256"


def test_a_frame_carries_its_length_and_the_tag():
    tx, rx = _pair()
    frame = tx.seal(b"hello")
    (n,) = LENGTH.unpack(frame[:4])
    assert n == len(frame) - 4 == len(b"hello") + TAG_BYTES
    assert rx.open(frame[4:]) == b"hello"


def test_the_peer_length_limit_is_max_frame_plus_the_tag_exactly():
    _, rx = _pair()
    rx.check_length(TAG_BYTES)  # an empty frame
    rx.check_length(MAX_FRAME + TAG_BYTES)  # the largest we seal
    for n in (MAX_FRAME + TAG_BYTES + 1, 2 * MAX_FRAME, 64 * MAX_FRAME, 2**32 - 1,
              TAG_BYTES - 1, 0):
        with pytest.raises(FrameError):
            rx.check_length(n)


def test_we_seal_up_to_max_frame_and_refuse_one_byte_more():
    tx, rx = _pair()
    frame = tx.seal(b"m" * MAX_FRAME)
    rx.check_length(len(frame) - 4)
    assert rx.open(frame[4:]) == b"m" * MAX_FRAME
    with pytest.raises(FrameError):
        tx.seal(b"m" * (MAX_FRAME + 1))


def test_frame_n_is_aes_gcm_under_the_big_endian_counter_nonce():
    """The wire format both ends of a link must agree on: 4 zero bytes, then the 64-bit
    big-endian frame counter, no associated data."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    key = bytes(range(32))
    tx = FrameCipher(key, os.urandom(32), MAX_FRAME)
    frames = [tx.seal(f"f{i}".encode())[4:] for i in range(300)]
    aead = AESGCM(key)
    for n in (0, 1, 255, 256, 299):
        nonce = bytes(4) + n.to_bytes(8, "big")
        assert aead.decrypt(nonce, frames[n], None) == f"f{n}".encode()
