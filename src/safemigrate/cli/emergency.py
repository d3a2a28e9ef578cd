"""`safemigrate emergency --reason TEXT`: stop, emergency mode, notify, roll back, validate,
restore service only if the validation passed (safemigrate.emergency); prints the timeline."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..emergency import handle_emergency
from ..events import EventBus
from . import common, handle_errors, migrator_from, out, settings_from
from .render import checks_table

STYLE = {"completed": "green", "skipped": "yellow", "failed": "bold red"}


def _clock(ts: float) -> str:
    from datetime import datetime

    return datetime.fromtimestamp(ts).strftime("%H:%M:%S.%f")[:-3]


@click.command()
@click.option("--reason", required=True, help="What happened (journaled and notified).")
@click.option("--by", default=None, help="Who declares it (default user@host).")
@click.option("--stop-timeout", type=click.FloatRange(min=0.1), default=None,
              help="Seconds a running migration has to stop ([rollback] stop_timeout, 60).")
@click.option("--json", "as_json", is_flag=True, help="Print the response as JSON.")
@common
@handle_errors
def emergency(reason: str, by: str | None, stop_timeout: float | None, as_json: bool,
              db: str | None, migrations: Path | None, backup_dir: Path | None, yes: bool) -> None:
    """Emergency: stop every migration, emergency mode, notify, roll back the latest run,
    validate, and restore service only if the validation passed. Exit 1 when it did not."""
    with migrator_from(settings_from(db, migrations, backup_dir), EventBus()) as m:
        response = handle_emergency(m, reason, by=by, stop_timeout=stop_timeout)
    if as_json:
        click.echo(json.dumps(response.as_dict(), default=str))
    else:
        out.print(f"[bold red]EMERGENCY[/] declared by {response.by}: {reason}", soft_wrap=True)
        for action in response.actions:
            style = STYLE.get(action.status, "")
            out.print(f"  {_clock(action.timestamp)}  {action.action:<19} [{style}]{action.status:<9}[/] "
                      f"{action.details}", soft_wrap=True, highlight=False)
        if response.checks:
            out.print(checks_table("post-rollback validation", [c.as_dict() for c in response.checks]))
        verdict = ("[bold green]resolved[/]: service restored" if response.ok else
                   "[bold red]NOT resolved[/]: the application stays degraded; see "
                   "`safemigrate history` and `safemigrate verify --after-rollback`")
        out.print(f"{verdict} ({response.finished - response.started:.1f}s)"
                  if response.finished else verdict)
    sys.exit(0 if response.ok else 1)
