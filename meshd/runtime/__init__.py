"""The runtime (issue 18): services run from source as managed processes, placed across the
mesh and kept running. spec.py (what to run), placement.py (where: sans-IO), restart.py
(when again: sans-IO); the process supervisor, sources, ops and CLI build on them."""
