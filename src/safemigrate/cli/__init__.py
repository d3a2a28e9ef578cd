"""The command line: thin commands over `safemigrate.Migrator`.

Exit codes: 0 success; 1 failed (state in the journal); 2 usage or configuration error;
3 the run was rolled back automatically.
"""

from __future__ import annotations

import functools
import json
import re
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from .._exceptions import SafeMigrateError, UsageError
from .._version import __version__
from ..events import EventBus
from ..migration import FILE_PATTERN
from ..migrator import Migrator
from ..settings import CONFIG_FILE, Settings, load_settings
from ..validate import failed
from . import templates
from .render import (
    ConsoleRenderer,
    JsonLines,
    checks_table,
    fmt_bytes,
    fmt_seconds,
    fmt_time,
    report_table,
)

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def _fail(exc: SafeMigrateError) -> None:
    err.print(exc.one_line(), style="bold red", markup=False, soft_wrap=True)
    sys.exit(exc.exit_code)


def handle_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Every known error becomes one line with a hint and its exit code; data stays as it was."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except SafeMigrateError as exc:
            if exc.exit_code == 0:  # nothing to do (e.g. already rolled back): say so, succeed
                out.print(exc.message, markup=False)
                sys.exit(0)
            _fail(exc)
        except KeyboardInterrupt:
            err.print("error: interrupted (hint: committed batches are safe; "
                      "`safemigrate run` resumes)", style="bold red")
            sys.exit(1)

    return wrapper


def common(func: Callable[..., Any]) -> Callable[..., Any]:
    """--db, --migrations, --backup-dir and --yes, accepted by every command."""
    func = click.option("--yes", "-y", is_flag=True, help="Answer yes to any confirmation.")(func)
    func = click.option("--backup-dir", type=click.Path(path_type=Path), default=None,
                        help="Where snapshots go (default .safemigrate/backups).")(func)
    func = click.option("--migrations", "-m", type=click.Path(path_type=Path), default=None,
                        help="Migrations folder (default ./migrations).")(func)
    func = click.option("--db", "-d", default=None, envvar=None,
                        help="Database URL or SQLite file (or SAFEMIGRATE_DB, safemigrate.toml).")(func)
    return func


def settings_from(db: str | None, migrations: Path | None, backup_dir: Path | None,
                  **extra: Any) -> Settings:
    return load_settings(Path.cwd(), db=db, migrations=migrations, backup_dir=backup_dir, **extra)


def migrator_from(settings: Settings, bus: EventBus | None = None) -> Migrator:
    if not settings.db:
        raise UsageError("no database given",
                         "pass --db URL, set SAFEMIGRATE_DB, or put db = \"...\" in safemigrate.toml")
    return Migrator(settings, bus)


def confirm(question: str, yes: bool) -> None:
    """Ask only on a terminal; --yes (or no terminal) answers yes."""
    if yes or not sys.stdin.isatty():
        return
    if not click.confirm(question, default=False):
        raise UsageError("cancelled", "pass --yes to confirm without a prompt")


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="safemigrate")
def main() -> None:
    """Data migrations on live SQL databases that never lose a row."""


# -- init / new ---------------------------------------------------------------------------------
@main.command()
@common
@handle_errors
def init(db: str | None, migrations: Path | None, backup_dir: Path | None, yes: bool) -> None:
    """Create a migrations folder and safemigrate.toml."""
    folder = migrations or Path("migrations")
    folder.mkdir(parents=True, exist_ok=True)
    config = Path(CONFIG_FILE)
    if config.exists():
        out.print(f"{config} exists; left as it is")
    else:
        db_line = f'db = "{db}"' if db else '# db = "sqlite:///app.db"   # or postgresql://…, mysql://…'
        config.write_text(templates.CONFIG.format(db_line=db_line, migrations=folder))
        out.print(f"wrote {config}")
    out.print(f"migrations folder: {folder}/ — next: safemigrate new add_search_fields")


@main.command()
@click.argument("name")
@common
@handle_errors
def new(name: str, db: str | None, migrations: Path | None, backup_dir: Path | None,
        yes: bool) -> None:
    """Create a new migration file from a template."""
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    if not slug:
        raise UsageError(f"migration name {name!r} has no letters or digits",
                         "use a name like add_search_fields")
    folder = migrations or settings_from(None, None, None).migrations
    if not folder.is_dir():
        raise UsageError(f"migrations folder {folder} does not exist", "run `safemigrate init`")
    numbers = [int(m.group(1)) for p in folder.glob("*.py") if (m := FILE_PATTERN.match(p.name))]
    migration_id = f"{max(numbers, default=0) + 1:04d}_{slug}"
    path = folder / f"{migration_id}.py"
    path.write_text(templates.MIGRATION.format(id=migration_id, title=name.replace("_", " ")))
    out.print(f"wrote {path}")


# -- check / plan -------------------------------------------------------------------------------
@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--full", is_flag=True,
              help="Full integrity check and every row through each Backfill (not a sample).")
@common
@handle_errors
def check(as_json: bool, full: bool, db: str | None, migrations: Path | None,
          backup_dir: Path | None, yes: bool) -> None:
    """Run the pre-migration checks; exit 1 when a required check fails."""
    from ..checks import preflight

    with migrator_from(settings_from(db, migrations, backup_dir)) as m:
        report = preflight(m, full=full)
    if as_json:
        print_json(report.as_dict())
    else:
        out.print(report_table(f"pre-migration checks: {report.database}", report.as_dict()))
        out.print("[bold green]ready[/]" if report.ready else "[bold red]NOT READY[/]",
                  f"({report.summary()})")
    sys.exit(0 if report.ready else 1)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@common
@handle_errors
def plan(as_json: bool, db: str | None, migrations: Path | None, backup_dir: Path | None,
         yes: bool) -> None:
    """Dry run: what would happen, with row counts, disk needed and irreversible steps."""
    with migrator_from(settings_from(db, migrations, backup_dir)) as m:
        planned = m.plan()
    if as_json:
        print_json([{**p.__dict__, "steps": [s.__dict__ for s in p.steps],
                     "irreversible": [s.index for s in p.irreversible]} for p in planned])
        return
    if not planned:
        out.print("nothing to do: every migration is applied")
        return
    for p in planned:
        resume = f" (resumes run {p.resumes_run})" if p.resumes_run else ""
        out.print(f"[bold]{p.id}[/] {p.description}{resume}")
        table = Table(show_header=True, header_style="bold")
        for col in ("#", "phase", "step", "rows", "reversible", "SQL"):
            table.add_column(col, overflow="fold")
        for s in p.steps:
            table.add_row(str(s.index), s.phase, s.description,
                          "-" if s.rows is None else f"{s.rows:,}",
                          "yes" if s.reversible else "[bold red]NO[/]", "\n".join(s.sql))
        out.print(table)
        out.print(f"  disk needed for the snapshot and shadow copy: ~{fmt_bytes(p.disk_needed)}")
        if p.irreversible:
            out.print(f"  [bold red]irreversible steps:[/] {', '.join(str(s.index) for s in p.irreversible)}"
                      " — rollback needs --strategy restore")


# -- run ------------------------------------------------------------------------------------------
@main.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON event per line instead of a display.")
@click.option("--workers", type=int, default=None, help="Transform processes (default: CPU count).")
@click.option("--batch-size", type=int, default=None, help="Rows per batch (default 2000).")
@click.option("--dry-run", is_flag=True, help="Print the plan and change nothing.")
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=None,
              help="Serve Prometheus metrics on 127.0.0.1:PORT during the run.")
@click.option("--skip-check", "skip_check", multiple=True, metavar="NAME",
              help="Skip a pre-migration check (repeatable; globs like 'sample:*'); needs --reason.")
@click.option("--reason", "skip_reason", default=None,
              help="Why the checks are skipped (journaled with user@host).")
@common
@handle_errors
def run(as_json: bool, workers: int | None, batch_size: int | None, dry_run: bool,
        metrics_port: int | None, skip_check: tuple[str, ...], skip_reason: str | None,
        db: str | None, migrations: Path | None, backup_dir: Path | None, yes: bool) -> None:
    """Apply pending migrations through all phases; resume an interrupted run."""
    if skip_check and not (skip_reason or "").strip():
        raise UsageError("--skip-check needs --reason TEXT", "the skip is journaled with who and why")
    if skip_reason and not skip_check:
        raise UsageError("--reason without --skip-check", "name the check: --skip-check NAME")
    if dry_run:
        click.get_current_context().invoke(plan, as_json=as_json, db=db, migrations=migrations,
                                           backup_dir=backup_dir, yes=yes)
        return
    settings = settings_from(db, migrations, backup_dir, workers=workers, batch_size=batch_size)
    if metrics_port:
        settings.sections["monitor"] = {**settings.section("monitor"), "metrics_port": metrics_port}
    bus = EventBus()
    renderer = JsonLines() if as_json else ConsoleRenderer(out)
    bus.subscribe(renderer)
    with migrator_from(settings, bus) as m:
        _install_stop_handlers(m)
        try:
            results = m.run({name: str(skip_reason) for name in skip_check} if skip_check else None)
        finally:
            if isinstance(renderer, ConsoleRenderer):
                renderer.close()
    if as_json:
        click.echo(json.dumps({"kind": "result", "runs": [r.as_dict() for r in results]},
                              default=str))
        return
    if not results:
        out.print("nothing to do: every migration is applied")
    for r in results:
        out.print(f"[bold green]✔ {r.migration_id}[/] run {r.run_id}: {r.rows:,} rows in "
                  f"{fmt_seconds(r.seconds)}, {r.quarantined:,} quarantined")
        if r.quarantined:
            out.print("  quarantined rows are listed by `safemigrate status`; they were left unchanged")


def _install_stop_handlers(m: Migrator) -> None:
    """First SIGINT/SIGTERM: finish the batch, checkpoint, exit (resumable). Second: abort now."""

    def handler(signum: int, _frame: Any) -> None:
        if m.stop.is_set():
            raise KeyboardInterrupt(f"aborted at once by a second {signal.Signals(signum).name}")
        m.stop.set(f"{signal.Signals(signum).name} received")
        err.print("stopping after the current batch (again to abort now)", style="yellow")

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


# -- status / history -----------------------------------------------------------------------------
@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print status as JSON.")
@common
@handle_errors
def status(as_json: bool, db: str | None, migrations: Path | None, backup_dir: Path | None,
           yes: bool) -> None:
    """The current or last run: phase, progress, rate, ETA, errors, quarantine."""
    with migrator_from(settings_from(db, migrations, backup_dir)) as m:
        info = m.status()
    if as_json:
        print_json(info)
        return
    out.print(f"database: {info['database']}")
    out.print(f"pending: {', '.join(info['pending']) or 'none'}")
    if info.get("pending_error"):
        out.print(f"[red]migrations folder: {info['pending_error']}[/]")
    run_info = info.get("run")
    if not run_info:
        out.print("no runs yet")
        print_live(info)
        return
    style = {"completed": "green", "rolled_back": "yellow", "running": "cyan"}.get(
        run_info["status"], "bold red")
    out.print(f"last run: {run_info['id']} {run_info['migration_id']} "
              f"[{style}]{run_info['status']}[/] (phase {run_info['phase']}, "
              f"elapsed {fmt_seconds(run_info['elapsed'])}, started {fmt_time(run_info['started_at'])})")
    table = Table()
    for col in ("#", "phase", "step", "status", "rows", "%", "rows/s", "ETA", "quarantined"):
        table.add_column(col)
    for s in run_info["steps"]:
        rows = f"{s['rows_done']:,}/{s['rows_total']:,}" if s["rows_total"] is not None else "-"
        table.add_row(str(s["index"]), s["phase"], s["description"], s["status"], rows,
                      f"{s['percent']:.0f}", f"{s['rate']:,.0f}" if s["rate"] else "-",
                      fmt_seconds(s["eta_seconds"]), str(s["rows_quarantined"]))
    out.print(table)
    if run_info["quarantined"]:
        out.print(f"[yellow]{run_info['quarantined']:,} rows quarantined[/], e.g.:")
        for q in run_info["quarantine_examples"]:
            out.print(f"  key {q['pk']}: {q['error']}")
    if run_info["error"]:
        out.print(f"[bold red]error:[/] {run_info['error']}")
    if run_info.get("rollback"):
        rb = run_info["rollback"]
        out.print(f"rollback (attempt {rb['attempt']}, strategy {rb['strategy']}): {rb['status']}")
        for number, step in enumerate(rb["steps"], 1):
            mark = {"done": "[green]✔[/]", "failed": "[bold red]✘[/]", "running": "[cyan]…[/]"}.get(
                step["status"], " ")
            out.print(f"  {mark} {number}. {step['name']}: {step['status']}"
                      + (f" — {step['details']}" if step["details"] else ""), soft_wrap=True)
    for e in run_info["errors"]:
        out.print(f"[red]{fmt_time(e['ts'])} {e['kind']}: {e['message']}[/]")
    print_live(info)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print history as JSON.")
@click.option("--limit", type=int, default=20, show_default=True, help="Runs to show.")
@click.option("--events/--no-events", default=True, help="Show each run's events.")
@common
@handle_errors
def history(as_json: bool, limit: int, events: bool, db: str | None, migrations: Path | None,
            backup_dir: Path | None, yes: bool) -> None:
    """Runs and their events (the audit trail)."""
    with migrator_from(settings_from(db, migrations, backup_dir)) as m:
        runs = m.history(limit)
    if as_json:
        print_json(runs)
        return
    if not runs:
        out.print("no runs yet")
    for r in runs:
        out.print(f"[bold]{r['id']}[/] {r['migration_id']} {r['status']} "
                  f"started {fmt_time(r['started_at'])} finished {fmt_time(r['finished_at'])}")
        if events:
            for e in r["events"]:
                style = {"warning": "yellow", "error": "red", "critical": "bold red"}.get(e["level"], "")
                out.print(f"  {fmt_time(e['ts'])} {e['kind']:<20} {e['message']}", style=style,
                          markup=False)


# -- rollback / verify -----------------------------------------------------------------------------
@main.group(invoke_without_command=True)
@click.option("--run", "run_id", default=None, help="Run to roll back (default: the last one).")
@click.option("--strategy", type=click.Choice(["auto", "reverse", "restore"]), default="auto",
              show_default=True, help="Undo the steps (reverse), or restore the tables from the "
              "snapshot; auto reverses unless a step is irreversible or the file is gone.")
@click.option("--reason", default=None, help="Why (journaled).")
@click.option("--dry-run", is_flag=True, help="Print the rollback plan and change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--priority", type=click.Choice(["low", "medium", "high", "critical"]), default=None,
              help="Record a rollback request instead: high and critical stop a running migration "
              "and roll back at once; low and medium wait for `rollback approve ID`.")
@click.option("--requested-by", default=None, help="Who asks (journaled; default user@host).")
@click.option("--wait/--no-wait", default=True, help="With --priority: wait for the rollback's outcome.")
@common
@handle_errors
@click.pass_context
def rollback(ctx: click.Context, run_id: str | None, strategy: str, reason: str | None,
             dry_run: bool, as_json: bool, priority: str | None, requested_by: str | None, wait: bool,
             db: str | None, migrations: Path | None, backup_dir: Path | None, yes: bool) -> None:
    """Roll back the last (or a given) run to exactly the state it started from; or request a
    rollback (--priority), and approve or reject requests (`rollback approve|reject ID`)."""
    if ctx.invoked_subcommand is not None:
        ctx.obj = {"db": db, "migrations": migrations, "backup_dir": backup_dir}
        return
    if priority is not None:
        from .control import request_rollback

        request_rollback(run_id=run_id, strategy=strategy, reason=reason, priority=priority,
                         requested_by=requested_by, wait=wait, as_json=as_json, db=db,
                         migrations=migrations, backup_dir=backup_dir)
        return
    reason = (reason or "requested by operator") + (f" (by {requested_by})" if requested_by else "")
    bus = EventBus()
    renderer = JsonLines() if as_json else ConsoleRenderer(out)
    with migrator_from(settings_from(db, migrations, backup_dir), bus) as m:
        plan_ = m.rollback_plan(run_id, strategy)
        if dry_run or not as_json:
            out.print(f"rollback of run {plan_.run_id} ({plan_.migration_id}), strategy {strategy}:")
            for action in plan_.actions or ["nothing was changed; the run is only marked rolled back"]:
                out.print(f"  • {action}", markup=False)
        if dry_run:
            out.print(f"steps (strategy {plan_.strategy}: {plan_.why}):")
            for number, (step, what) in enumerate(plan_.steps, 1):
                out.print(f"  {number}. {step}: {what}", markup=False)
            return
        confirm(f"Roll back run {plan_.run_id}?", yes)
        bus.subscribe(renderer)
        result = m.rollback(plan_.run_id, strategy, reason)
    if as_json:
        click.echo(json.dumps(result.as_dict(), default=str))
        return
    out.print(checks_table("rollback proof", [c.as_dict() for c in result.checks]))
    out.print(f"[bold yellow]run {result.run_id} rolled back[/] in {fmt_seconds(result.seconds)}; "
              f"state before rollback saved in {result.pre_rollback_backup or '-'}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--after-rollback", is_flag=True,
              help="Check the last rolled-back run: integrity, digests, smoke checks, canaries, "
              "[rollback] checks.")
@click.option("--run", "run_id", default=None, help="With --after-rollback: the run to check.")
@common
@handle_errors
def verify(as_json: bool, after_rollback: bool, run_id: str | None, db: str | None,
           migrations: Path | None, backup_dir: Path | None, yes: bool) -> None:
    """Integrity and consistency checks plus the migrations' smoke checks."""
    if run_id and not after_rollback:
        raise UsageError("--run needs --after-rollback", "safemigrate verify --after-rollback --run ID")
    with migrator_from(settings_from(db, migrations, backup_dir)) as m:
        if after_rollback:
            from ..rollback_validate import verify_after_rollback

            _run, results = verify_after_rollback(m, run_id)
        else:
            results = m.verify()
    ok = not failed(results)
    if as_json:
        print_json({"ok": ok, "checks": [r.as_dict() for r in results]})
    else:
        out.print(checks_table("verify", [r.as_dict() for r in results]))
    sys.exit(0 if ok else 1)


# -- demo -------------------------------------------------------------------------------------------
@main.command()
@click.option("--rows", type=click.IntRange(min=1), default=100_000, show_default=True)
@click.option("--bad-rate", type=click.FloatRange(0, 1), default=0.01, show_default=True,
              help="Fraction of malformed cards (they get quarantined).")
@click.option("--workers", type=int, default=None, help="Transform processes.")
@click.option("--keep", type=click.Path(path_type=Path), default=None,
              help="Keep the demo files in this folder instead of a temporary one.")
@click.option("--no-rollback", is_flag=True, help="Stop after the migration.")
@handle_errors
def demo(rows: int, bad_rate: float, workers: int | None, keep: Path | None,
         no_rollback: bool) -> None:
    """Build a sample flashcard database and migrate it v2 → v3, end to end."""
    from ..demo import run_demo

    bus = EventBus()
    renderer = ConsoleRenderer(out)
    bus.subscribe(renderer)
    out.print(f"[bold]safemigrate demo[/]: {rows:,} flashcards, {bad_rate:.1%} malformed")
    with tempfile.TemporaryDirectory(prefix="safemigrate-demo-") as tmp:
        workdir = keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        if (workdir / "cards.db").exists():
            raise UsageError(f"{workdir / 'cards.db'} exists", "pass an empty folder to --keep")
        try:
            summary = run_demo(workdir, rows=rows, bad_rate=bad_rate, workers=workers, bus=bus,
                               rollback=not no_rollback)
        finally:
            renderer.close()
    table = Table(title="demo summary", title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value")
    table.add_row("cards generated", f"{summary.rows:,} ({summary.bad_rows:,} malformed)")
    table.add_row("migrated", f"{summary.migrated:,}")
    table.add_row("quarantined", f"{summary.quarantined:,} (left unchanged, listed in the journal)")
    rate = summary.rows / summary.run_seconds if summary.run_seconds else 0
    table.add_row("safe run (backup, transform, validate)",
                  f"{summary.run_seconds:.1f}s ({rate:,.0f} rows/s overall)")
    table.add_row("verified snapshot", fmt_bytes(summary.snapshot_bytes))
    for c in summary.validation:
        table.add_row(f"validation: {c['name']}", ("passed: " if c["passed"] else "FAILED: ")
                      + c["details"])
    bad_verify = [c for c in summary.verify if not c["passed"]]
    table.add_row("verify", "all passed" if not bad_verify else f"{len(bad_verify)} FAILED")
    if not no_rollback:
        table.add_row("rollback", f"{summary.rollback_seconds:.1f}s, content identical to v2: "
                      f"{'yes' if summary.restored_identical else 'NO'}")
    table.add_row("files", str(keep) if keep else "temporary (removed)")
    out.print(table)
    if bad_verify or (not no_rollback and not summary.restored_identical):
        sys.exit(1)


from .degrade import degrade as _degrade  # noqa: E402 - registered once `main` exists

main.add_command(_degrade)

from .control import print_live  # noqa: E402
from .control import register as _register_control  # noqa: E402 - registered once `main` exists

_register_control(main, rollback)

from .backup import backup as _backup  # noqa: E402 - registered once `main` exists

main.add_command(_backup)

from .emergency import emergency as _emergency  # noqa: E402 - registered once `main` exists

main.add_command(_emergency)
