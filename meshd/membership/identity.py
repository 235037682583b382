"""Membership identity checks: which alives the daemon's membership core may apply (S5).

Rules:
- An alive is accepted only if it carries a 32-byte ed25519 key and a valid signature by
  that key over its payload (incarnation, name, address, tags, key), its "id" tag (when
  present) is the node id of that key, and the key is not revoked.
- So a member's name and address change only by its own hand; another holder of the
  cluster secret can neither move it to another address nor bind its name to a new key
  while it is in the member table (the core's S5 rule does the binding).
- Verification is pure computation (no I/O): the core calls it only for alives it is about
  to apply, so the steady state (rebroadcasts, push-pulls of known members) costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable

from meshd.identity import node_id_from_public, verify

from .messages import KEY_BYTES, SIG_BYTES, Alive


class AliveVerifier:
    """Callable `verify(alive) -> bool` for the membership core."""

    def __init__(self, is_revoked: Callable[[bytes], bool] | None = None) -> None:
        self.is_revoked = is_revoked
        self.stats = {"alive_bad_signature": 0, "alive_revoked": 0}

    def __call__(self, msg: Alive) -> bool:
        if len(msg.key) != KEY_BYTES or len(msg.sig) != SIG_BYTES:
            self.stats["alive_bad_signature"] += 1
            return False
        tag_id = msg.tags.get("id")
        if tag_id is not None and tag_id != node_id_from_public(msg.key):
            self.stats["alive_bad_signature"] += 1
            return False
        if self.is_revoked is not None and self.is_revoked(msg.key):
            self.stats["alive_revoked"] += 1
            return False
        if not verify(msg.key, msg.sig, msg.payload()):
            self.stats["alive_bad_signature"] += 1
            return False
        return True
