"""`meshd doctor`: check what breaks clusters in practice, one line each with what to do.

Rules:
- Runs on the host of the node it checks (its data dir: --data-dir, MESHD_DATA_DIR or the
  default): it reads the data dir's files and lock and /proc, and asks the daemon (as its
  operator) to probe every member (meshd/doctor/probe.py). It never acts through --env.
- Every check prints a line, `ok`, `warn` or `fail`, and a fix when not ok; --json prints
  {"ok": bool, "findings": [...]} with the same fields.
- Exit status 1 when any check fails, 0 otherwise (warnings included).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import trio

from meshd.control import ControlClient, socket_path
from meshd.datadir import default_data_dir
from meshd.doctor import checks, facts
from meshd.doctor.checks import Finding
from meshd.errors import MeshError
from meshd_cli.client import current_token, data_dir_option
from meshd_cli.output import fail, json_option

MARK = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}
DEADLINE = 60  # above a probe's 5 s plus a link's 30 s send stall


def _ask(sock: Path, token: str | None, op: str, /, **args: Any) -> tuple[Any, str]:
    """(the op's result, "") or (None, why it failed): a doctor keeps going."""
    async def go() -> Any:
        control = ControlClient(sock, token=token)
        try:
            with trio.fail_after(DEADLINE):
                return await control.call(op, **args)
        finally:
            await control.aclose()
    try:
        return trio.run(go), ""
    except MeshError as exc:
        return None, f"{exc.status} {exc.detail}"
    except (OSError, EOFError) as exc:
        return None, f"{sock}: {getattr(exc, 'strerror', None) or exc}"
    except trio.TooSlowError:
        return None, f"the daemon did not answer within {DEADLINE} s"


def findings(data_dir: Path) -> list[Finding]:
    sock = socket_path(data_dir)
    token = current_token(data_dir)
    out: list[Finding] = []
    status, why = _ask(sock, token, "status")
    out.append(checks.daemon(status, why))
    dir_mode, files = facts.file_modes(data_dir)
    out.append(checks.data_dir_modes(str(data_dir), dir_mode, files))
    report, why = _ask(sock, token, "doctor") if status is not None else (None, why)
    out.append(checks.daemons(str(data_dir), facts.lock_holder(data_dir),
                              report.get("pid") if report else None,
                              [p for p in facts.daemons_of(data_dir)
                               if not report or p != report.get("pid")]))
    if status is None:
        return out
    if report is None:
        out.append(Finding("members", "warn", f"the members were not probed: {why}",
                           "upgrade this node (doctor needs meshd with the doctor op)"))
        return out
    members, _ = _ask(sock, token, "members")
    out.append(checks.advertise(status["name"], status["address"], members or []))
    out.extend(checks.member_reachability(report["members"]))
    settings, _ = _ask(sock, token, "settings")
    bound = float(((settings or {}).get("store") or {}).get("max_clock_drift") or 60.0)
    out.append(checks.clocks(report["members"], bound))
    out.append(checks.versions(report["version"], report["members"]))
    out.append(checks.secret_ring(report.get("keyring")))
    out.extend(_certificates(settings or {}))
    return out


def _certificates(settings: dict[str, Any]) -> list[Finding]:
    """Every TLS listener's certificate: the node's (proxy, gateway, dashboard, metrics)."""
    path = str((settings.get("node") or {}).get("tls_cert") or "")
    if not path:
        return []
    days, why = facts.certificate_days(path)
    return [checks.certificate("tls_cert", path, days, why)]


@click.command("doctor")
@data_dir_option
@json_option
def doctor(data_dir: Path | None, as_json: bool) -> None:
    """Check this node and its links to every member; say what to fix."""
    ctx = click.get_current_context().find_root()
    if ctx.params.get("env"):
        fail("400 bad request: doctor checks the node on this host (its data dir, its "
             "processes); run it there, without --env")
    found = findings(data_dir or default_data_dir())
    level = checks.worst(found)
    if as_json:
        click.echo(json.dumps({"ok": level != "fail", "level": level,
                               "findings": [f.to_json() for f in found]}))
    else:
        width = max(len(f.check) for f in found)
        for f in found:
            click.echo(f"{MARK[f.level]}  {f.check.ljust(width)}  {f.detail}")
            if f.fix:
                click.echo(f"      {' ' * width}  -> {f.fix}")
    if level == "fail":
        raise SystemExit(1)


COMMANDS: tuple[click.Command, ...] = (doctor,)
