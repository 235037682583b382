"""Tunnels and the identity-aware proxy."""
