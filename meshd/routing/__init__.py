"""Routing: measured RTTs, Vivaldi coordinates and a latency-weighted next-hop table."""
