"""`python -m meshd_sim run SCENARIO [--nodes N] [--seed S] [--json]`: run a scenario, report;
`python -m meshd_sim check EVENT_LOG [--json]`: check a nemesis run's event log afterwards."""

from __future__ import annotations

import json
import sys

import click

from . import history
from .brokersim import BrokerSimulation
from .engine import Simulation
from .nemesis import NemesisSimulation
from .report import print_report
from .scenario import SCENARIO_DIR, ScenarioError, load


@click.group()
def main() -> None:
    """The meshd network simulator."""


@main.command()
@click.argument("scenario")
@click.option("--nodes", type=click.IntRange(min=1), help="Node count (default: the scenario's).")
@click.option("--seed", type=int, help="Seed (default: the scenario's).")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True),
              help="Simulated seconds (default: the scenario's).")
@click.option("--lifeguard/--no-lifeguard", default=None,
              help="Force Lifeguard on or off (default: the scenario's setting).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a scenario key, e.g. network.loss=0.1 or membership.probe_interval=2.")
@click.option("--event-log", type=click.File("w"), help="Also write the event log here.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def run(scenario: str, nodes: int | None, seed: int | None, duration: float | None,
        lifeguard: bool | None, overrides: tuple[str, ...], event_log, as_json: bool) -> None:
    """Run SCENARIO (a path, or a name from sim/scenarios/)."""
    extra = list(overrides)
    if duration is not None:
        extra.append(f"duration={duration}")
    if lifeguard is not None:
        extra.append(f"membership.lifeguard={'true' if lifeguard else 'false'}")
    try:
        sc = load(scenario, extra)
        if nodes is not None:
            sc.nodes = nodes
    except ScenarioError as exc:
        raise click.ClickException(str(exc)) from None
    kind = NemesisSimulation if sc.nemesis is not None else \
        BrokerSimulation if sc.broker is not None else Simulation
    sim = kind(sc, seed=seed, event_log=event_log,
               progress=sys.stderr.isatty() and not as_json)
    result = sim.run()
    if as_json:
        click.echo(json.dumps(result, sort_keys=True))
    else:
        print_report(result)


@main.command("check")
@click.argument("event_log", type=click.File("r", encoding="utf-8"))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def check_log(event_log, as_json: bool) -> None:
    """Check a nemesis run's EVENT_LOG (written with --event-log) against the invariants."""
    try:
        report = history.check(event_log)
    except history.HistoryError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps({"violations": report.violations, "checks": report.checks,
                               "checked_ops": report.checked_ops, "lines": report.lines},
                              sort_keys=True))
        return
    click.echo(f"{report.lines} lines, {report.checks} checks, {report.checked_ops} checked "
               f"ops: {len(report.violations)} violations")
    if not report.checks:
        click.echo("warning: the run made no check (shorter than one round): only what is "
                   "checked as it happens was", err=True)
    for v in report.violations:
        click.echo(f"  {v['time']:.3f} {v['invariant']} {' '.join(v['nodes'])}: {v['detail']}")
    if report.violations:
        sys.exit(1)


@main.command("list")
def list_scenarios() -> None:
    """List the bundled scenarios."""
    for path in sorted(SCENARIO_DIR.glob("*.toml")):
        first = ""
        for line in path.read_text().splitlines():
            if line.startswith("description"):
                first = line.split("=", 1)[1].strip().strip('"')
                break
        click.echo(f"{path.stem:16} {first}")


if __name__ == "__main__":
    main()
