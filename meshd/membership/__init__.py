"""Membership: SWIM + Lifeguard failure detection and gossip (sans-IO core)."""

from .core import Member, MemberEvent, Membership, MembershipError, Output, Send
from .messages import DecodeError, decode_packet, encode_packet

__all__ = [
    "DecodeError",
    "Member",
    "MemberEvent",
    "Membership",
    "MembershipError",
    "Output",
    "Send",
    "decode_packet",
    "encode_packet",
]
