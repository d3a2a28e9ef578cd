"""`safemigrate pause | resume | abort`, rollback requests (`rollback --priority …`,
`rollback approve ID`, `rollback reject ID`) and the live part of `status`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from .. import control
from ..events import EventBus
from . import common, handle_errors, migrator_from, out, settings_from
from .render import ConsoleRenderer, JsonLines, fmt_bytes, fmt_seconds, fmt_time


def _where(live: dict[str, Any] | None) -> str:
    if live is None:
        return "no migration is running"
    return f"run {live['run_id'] or '-'} (pid {live['pid']} on {live['hostname']})"


def _inherit(ctx: click.Context, db: str | None, migrations: Path | None,
             backup_dir: Path | None) -> tuple[str | None, Path | None, Path | None]:
    """Options given to the `rollback` group (before the subcommand) count too."""
    parent = (ctx.parent.obj or {}) if ctx.parent is not None else {}
    return (db or parent.get("db"), migrations or parent.get("migrations"),
            backup_dir or parent.get("backup_dir"))


@click.command()
@click.option("--reason", default="", help="Why (journaled, shown by status).")
@click.option("--by", default=None, help="Who pauses (default user@host).")
@common
@handle_errors
def pause(reason: str, by: str | None, db: str | None, migrations: Path | None,
          backup_dir: Path | None, yes: bool) -> None:
    """Pause the running migration after its current batch (from any terminal)."""
    with migrator_from(settings_from(db, migrations, backup_dir)) as m:
        result = control.pause(m, by=by, reason=reason)
    if result["run"] is None:
        out.print("no migration is running; the next run will wait at its start until "
                  "`safemigrate resume`")
    else:
        out.print(f"pausing {_where(result['run'])} after its current batch; "
                  "`safemigrate resume` continues")


@click.command()
@click.option("--by", default=None, help="Who resumes (default user@host).")
@common
@handle_errors
def resume(by: str | None, db: str | None, migrations: Path | None, backup_dir: Path | None,
           yes: bool) -> None:
    """Resume a paused migration."""
    with migrator_from(settings_from(db, migrations, backup_dir)) as m:
        result = control.resume(m, by=by)
    out.print(f"resumed: {_where(result['run'])}")


@click.command()
@click.option("--reason", default="", help="Why (journaled).")
@click.option("--by", default=None, help="Who aborts (default user@host).")
@common
@handle_errors
def abort(reason: str, by: str | None, db: str | None, migrations: Path | None,
          backup_dir: Path | None, yes: bool) -> None:
    """Stop the running migration after its current batch (resumable with `run`)."""
    with migrator_from(settings_from(db, migrations, backup_dir)) as m:
        result = control.abort(m, by=by, reason=reason)
    out.print(f"aborting {_where(result['run'])} after its current batch; `safemigrate run` resumes, "
              "`safemigrate rollback` undoes")


def _report(request: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(request, default=str))
        return
    status = request["status"]
    style = {"done": "bold yellow", "failed": "bold red", "pending": "cyan"}.get(status, "")
    out.print(f"rollback request {request['id']} ({request['priority']}) for run {request['run_id']}: "
              f"[{style}]{status}[/]" if style else f"rollback request {request['id']} "
              f"({request['priority']}) for run {request['run_id']}: {status}")
    if status == "pending":
        out.print(f"  waits for approval: safemigrate rollback approve {request['id']} "
                  f"(or reject {request['id']})")
    elif status in ("approved", "executing"):
        out.print("  the running migration rolls back after its current batch; "
                  "`safemigrate status` shows the outcome")
    if request.get("outcome"):
        out.print(f"  {request['outcome']}", markup=False)


def _execute(m: Any, request: dict[str, Any], wait: bool, as_json: bool) -> dict[str, Any]:
    bus: EventBus = m.bus
    bus.subscribe(JsonLines() if as_json else ConsoleRenderer(out))
    return control.execute_request(m, request["id"], wait=600.0 if wait else 0.0)


def request_rollback(*, run_id: str | None, strategy: str, reason: str | None, priority: str,
                     requested_by: str | None, wait: bool, as_json: bool, db: str | None,
                     migrations: Path | None, backup_dir: Path | None) -> None:
    """`safemigrate rollback --priority P --reason TEXT --requested-by NAME`."""
    with migrator_from(settings_from(db, migrations, backup_dir)) as m:
        request = control.request_rollback(m, reason=reason or "", priority=priority,
                                           requested_by=requested_by, run_id=run_id, strategy=strategy)
        if request["status"] == "approved":
            request = _execute(m, request, wait, as_json)
    _report(request, as_json)
    if request["status"] == "failed":
        raise SystemExit(1)


@click.command()
@click.argument("request_id")
@click.option("--by", default=None, help="Who approves (default user@host).")
@click.option("--wait/--no-wait", default=True, help="Wait for the rollback's outcome.")
@click.option("--json", "as_json", is_flag=True, help="Print the request as JSON.")
@common
@handle_errors
@click.pass_context
def approve(ctx: click.Context, request_id: str, by: str | None, wait: bool, as_json: bool,
            db: str | None, migrations: Path | None, backup_dir: Path | None, yes: bool) -> None:
    """Approve a pending rollback request: the run is rolled back at once."""
    db, migrations, backup_dir = _inherit(ctx, db, migrations, backup_dir)
    with migrator_from(settings_from(db, migrations, backup_dir)) as m:
        request = control.approve(m, request_id, by=by)
        request = _execute(m, request, wait, as_json)
    _report(request, as_json)
    if request["status"] == "failed":
        raise SystemExit(1)


@click.command()
@click.argument("request_id")
@click.option("--by", default=None, help="Who rejects (default user@host).")
@click.option("--note", default="", help="Why not (journaled).")
@click.option("--json", "as_json", is_flag=True, help="Print the request as JSON.")
@common
@handle_errors
@click.pass_context
def reject(ctx: click.Context, request_id: str, by: str | None, note: str, as_json: bool,
           db: str | None, migrations: Path | None, backup_dir: Path | None, yes: bool) -> None:
    """Reject a pending rollback request."""
    db, migrations, backup_dir = _inherit(ctx, db, migrations, backup_dir)
    with migrator_from(settings_from(db, migrations, backup_dir)) as m:
        request = control.reject(m, request_id, by=by, note=note)
    _report(request, as_json)


# -- status ------------------------------------------------------------------------------------
def _rate(value: Any) -> str:
    return f"{value:,.0f}" if isinstance(value, int | float) else "-"


def print_live(info: dict[str, Any]) -> None:
    """The control state, the runner's metrics, throttling and open requests."""
    ctl = info.get("control") or {}
    if ctl.get("paused"):
        out.print(f"[bold yellow]paused[/] by {ctl.get('paused_by') or '?'} since "
                  f"{fmt_time(ctl.get('paused_at'))}" + (f": {ctl['pause_reason']}"
                                                       if ctl.get("pause_reason") else ""),
                  highlight=False)
    if ctl.get("abort"):
        out.print(f"[bold red]abort requested[/] by {ctl['abort'].get('by')}", highlight=False)
    run = info.get("run") or {}
    metrics = run.get("metrics")
    if metrics and run.get("alive"):
        out.print(f"live: phase {metrics.get('phase')}, step {metrics.get('step')}, "
                  f"rate {_rate(metrics.get('rate_last'))} rows/s (smoothed "
                  f"{_rate(metrics.get('rate_smoothed'))}), ETA {fmt_seconds(metrics.get('eta_seconds'))}, "
                  f"elapsed {fmt_seconds(metrics.get('elapsed_seconds'))}, batch "
                  f"{metrics.get('batch_size') or '-'} rows", highlight=False)
        proc, system = metrics.get("process") or {}, metrics.get("system") or {}
        out.print(f"      CPU {proc.get('cpu_percent', '-')}% (system {system.get('cpu_percent', '-')}%), "
                  f"memory {fmt_bytes(proc.get('rss_bytes'))} (system {system.get('memory_percent', '-')}%)"
                  + ("; database " + ", ".join(f"{k}={v:g}" for k, v in metrics["database"].items()
                                              if isinstance(v, int | float))
                     if metrics.get("database") else ""), highlight=False)
        if metrics.get("throttle"):
            t = metrics["throttle"]
            out.print(f"[yellow]throttled[/] ({t.get('guard')}) since {fmt_time(t.get('since'))}: "
                      f"{t.get('reason')}", highlight=False)
        for alert in metrics.get("alerts") or []:
            out.print(f"[yellow]alert[/] {alert['alert']}: {alert['message']}", highlight=False)
    requests = info.get("requests") or []
    if requests:
        out.print(f"[bold]rollback requests[/] ({len(requests)} open; `safemigrate rollback approve ID` "
                  "or `reject ID`):")
    for r in requests:
        out.print(f"  {r['id']} {r['priority']} {r['status']} run {r['run_id'] or '-'} by "
                  f"{r['requested_by']} at {fmt_time(r['created_at'])}: {r['reason']}",
                  highlight=False, markup=False, soft_wrap=True)


def register(main: click.Group, rollback: click.Group) -> None:
    for command in (pause, resume, abort):
        main.add_command(command)
    rollback.add_command(approve)
    rollback.add_command(reject)
