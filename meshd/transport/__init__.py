"""Transports: sealed UDP datagrams and multiplexed secure stream links."""
