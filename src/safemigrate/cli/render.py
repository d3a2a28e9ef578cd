"""Console output: rich live progress on a terminal, plain lines elsewhere, JSON lines on request.

Renderers are event subscribers; the library never imports this module.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from ..events import Event

LEVEL_STYLE = {"info": "", "warning": "yellow", "error": "bold red", "critical": "bold red"}


def fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def fmt_time(ts: float | None) -> str:
    if not ts:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def fmt_bytes(size: float | None) -> str:
    if size is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} GB"


class JsonLines:
    """One JSON object per event on stdout: for scripts and log shippers."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stdout

    def __call__(self, event: Event) -> None:
        self.stream.write(json.dumps(event.as_dict(), default=str) + "\n")
        self.stream.flush()


class ConsoleRenderer:
    """Phases and steps as lines; backfills as live progress bars with rate, ETA, quarantine."""

    def __init__(self, console: Console, plain_interval: float = 5.0) -> None:
        self.console = console
        self.live = console.is_terminal
        self.plain_interval = plain_interval
        self._last_plain = 0.0
        self._progress: Progress | None = None
        self._tasks: dict[tuple[str | None, int], TaskID] = {}

    def _ensure_progress(self) -> Progress:
        if self._progress is None:
            self._progress = Progress(
                TextColumn("  {task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]} rows/s"),
                TextColumn("ETA {task.fields[eta]}"),
                TextColumn("[yellow]{task.fields[quarantined]} quarantined"),
                TimeElapsedColumn(),
                console=self.console,
                transient=False,
            )
            self._progress.start()
        return self._progress

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __call__(self, event: Event) -> None:
        data = event.data
        if event.kind == "batch":
            self._batch(event)
            return
        if event.kind == "step.started" and data.get("total") is not None:
            if self.live:
                progress = self._ensure_progress()
                key = (event.run_id, data["step"])
                self._tasks[key] = progress.add_task(
                    event.message[:60], total=data["total"], completed=data.get("done", 0),
                    rate="-", eta="-", quarantined=0)
            else:
                self.console.print(f"  step: {event.message} ({data['total']} rows)")
            return
        if event.kind == "step.completed" and "done" in data and self.live:
            self.close()
            return
        if event.kind == "step.started":
            return  # schema steps are shown once, when done
        if event.kind in ("quarantine", "metrics"):
            return  # counted in the progress line and the summary; metrics feed status/Prometheus
        style = LEVEL_STYLE.get(event.level, "")
        if event.kind == "phase.started":
            self.close()
            self.console.print(f"[bold cyan]▶ {data.get('phase', event.message)}[/]")
        elif event.kind.startswith(("step.", "rollback.step")):
            self.console.print(f"  ✓ {event.message}", style=style, highlight=False)
        elif event.kind in ("phase.completed",):
            return
        elif self._progress is not None and event.kind.startswith(
                ("alert", "guard.", "control.", "request.", "hook.", "monitor.")):
            # printed above the live bars, which go on (pause, throttle, alerts mid-backfill)
            self._progress.console.print(f"  {event.message}", style=style, highlight=False)
        else:
            self.close()
            self.console.print(f"  {event.message}", style=style, highlight=False)

    def _batch(self, event: Event) -> None:
        data = event.data
        rate = f"{data['rate']:,.0f}" if data.get("rate") else "-"
        eta = fmt_seconds(data.get("eta"))
        if self.live:
            task = self._tasks.get((event.run_id, data["step"]))
            if task is not None and self._progress is not None:
                self._progress.update(task, completed=data["done"], rate=rate, eta=eta,
                                      quarantined=data["quarantined"])
            return
        now = time.time()
        if now - self._last_plain >= self.plain_interval or data["done"] >= data["total"]:
            self._last_plain = now
            self.console.print(f"    {data['done']}/{data['total']} rows, {rate} rows/s, ETA {eta}, "
                               f"{data['quarantined']} quarantined", highlight=False)


def checks_table(title: str, results: list[dict[str, Any]]) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("check")
    table.add_column("result")
    table.add_column("details", overflow="fold")
    table.add_column("time", justify="right")
    for r in results:
        verdict = r.get("verdict") or ("passed" if r["passed"] else "FAILED")
        style = {"passed": "green", "warning": "yellow", "skipped": "dim"}.get(verdict, "bold red")
        table.add_row(r["name"], f"[{style}]{verdict}[/]", r.get("details") or "",
                      f"{r.get('seconds', 0):.2f}s")
    return table


def report_table(title: str, report: dict[str, Any]) -> Table:
    """The pre-migration check report: one row per check, with the hint of those not passed."""
    table = Table(title=title, title_justify="left")
    table.add_column("check", no_wrap=True)
    for col in ("group", "result", "details", "time"):
        table.add_column(col, overflow="fold", justify="right" if col == "time" else "left",
                         no_wrap=col in ("time", "group"))
    for r in report["checks"]:
        verdict = r["verdict"]
        style = {"passed": "green", "warning": "yellow", "skipped": "dim"}.get(verdict, "bold red")
        label = verdict if r.get("required", True) or verdict == "passed" else f"{verdict} (advisory)"
        details = escape(r.get("details") or "")
        if r.get("hint") and verdict in ("failed", "warning"):
            details += f"\n[dim]→ {escape(r['hint'])}[/]"
        table.add_row(escape(r["name"]), r.get("category", ""), f"[{style}]{label}[/]", details,
                      f"{r.get('seconds', 0):.2f}s")
    return table


def backups_table(backups: list[dict[str, Any]]) -> Table:
    table = Table(title="backups", title_justify="left")
    table.add_column("id", no_wrap=True)
    for col in ("kind", "migration / run", "created", "size", "layers", "status"):
        table.add_column(col, overflow="fold", no_wrap=col in ("kind", "size"))
    for b in backups:
        layers = " ".join(
            f"{la['layer']}{'✓' if la.get('status') == 'verified' else '✗'}" for la in b["layers"])
        run = f"{b.get('migration') or '-'} / {b.get('run_id') or '-'}"
        if b.get("run_status"):
            run += f" ({b['run_status']})"
        status = b["status"] + (" [dim](kept: protected)[/]" if b.get("protected") else "")
        table.add_row(b["id"], b["kind"], escape(run), fmt_time(b["created_at"]),
                      fmt_bytes(b["size"]), layers, status)
    return table
