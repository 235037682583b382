"""Secure links: the cluster keyring (sealed UDP), the stream handshake and AEAD frames."""
