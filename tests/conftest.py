"""How the suite spreads over xdist workers (`-n 3 --dist loadgroup`, pyproject addopts).

Each test file is one group (its tests run on one worker, in order, sharing module
fixtures), except the files in TIMING_SENSITIVE and CPU_BOUND, which form one group
together: they run one after another on a single worker, so a CPU-bound simulator run never
starves daemons whose timers a test watches (a chain of relays converging, a link declared
silent). The other workers meanwhile run files that mostly wait on daemons.
"""

from __future__ import annotations

from typing import Any

import pytest

TIMING_SENSITIVE = {"test_netns.py", "test_doctor.py", "test_leave.py", "test_multicloud.py",
                    "test_scenarios.py", "test_fifty_daemons.py"}
# (the engine files: writers under load, kill -9, migrations and stalls beside real
# PostgreSQL, Redis and NATS servers; beside the netns relay chain they made its routes
# miss their 90 s on 2 of 4 clean-clone runs)
CPU_BOUND = {"test_messages.py", "test_fuzz_proxy.py", "test_membership.py",
             "test_store_engines.py", "test_attacks_engines.py", "test_broker_jetstream.py",
             "test_nemesis.py"}
SERIAL = "timing-and-cpu"


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    for item in items:
        name = item.path.name
        group = SERIAL if name in TIMING_SENSITIVE | CPU_BOUND else str(item.path)
        item.add_marker(pytest.mark.xdist_group(group))
