"""`meshd doctor`: what breaks clusters in practice, checked, each with what to do.

checks.py turns facts into findings (sans-IO); probe.py is the daemon's side (a round trip
to each member over its link, channel `doctor`: RTT, clock offset, version, and how UDP
fares each way); facts.py gathers what the CLI reads on the host (the data dir's files and
lock, certificates)."""
