"""Hooks: executables in a folder (`[hooks] dir`, default `.safemigrate/hooks`), run on events.

| hook        | runs on                                                                  |
|-------------|--------------------------------------------------------------------------|
| on-start    | a run starts or resumes, before anything changes; a non-zero exit stops it |
| on-status   | each phase change, and every `status_interval` seconds during a run      |
| on-alert    | a monitor alert (`alert`, `alert.cleared`)                               |
| on-guard    | a guard throttles, recovers, trips, or a decision is taken (`guard.*`)   |
| on-failure  | the run failed, was interrupted, or did not validate                     |
| on-success  | the run completed                                                        |
| on-rollback | a rollback starts or completes; a rollback request is made or decided    |

A hook is the file named exactly so, or so with any extension (`on-alert.sh`); every match runs,
in name order, in the current directory, with the run's state in environment variables:

    SAFEMIGRATE_HOOK         the hook's name (on-alert, ...)
    SAFEMIGRATE_EVENT        the event kind (alert, guard.tripped, run.completed, ...)
    SAFEMIGRATE_LEVEL        info | warning | error | critical
    SAFEMIGRATE_MESSAGE      the event's one-line message
    SAFEMIGRATE_TS           when, in seconds since the epoch
    SAFEMIGRATE_DATA         the event's figures, as JSON
    SAFEMIGRATE_DATABASE     the database URL (password removed)
    SAFEMIGRATE_RUN_ID       the run
    SAFEMIGRATE_MIGRATION    the migration id
    SAFEMIGRATE_PHASE        the run's current phase
    SAFEMIGRATE_STATUS       the run's status (running, completed, failed, rolled_back, ...)
    SAFEMIGRATE_ROWS_DONE    rows processed so far (all backfills of the run)
    SAFEMIGRATE_ROWS_TOTAL   rows to process
    SAFEMIGRATE_QUARANTINED  rows quarantined
    SAFEMIGRATE_RATE         rows/s (smoothed), when a backfill runs
    SAFEMIGRATE_ETA_SECONDS  estimated seconds left, when known
    SAFEMIGRATE_ELAPSED_SECONDS  seconds since the run started
    SAFEMIGRATE_GUARD        the guard (guard.* events) or alert name (alert events)
    SAFEMIGRATE_REASON       the guard's reason, or the request's reason
    SAFEMIGRATE_REQUEST_ID   the rollback request (request.* events)
    SAFEMIGRATE_PRIORITY     the request's priority

Variables without a value are set to the empty string, so a hook can rely on all of them.
Hooks other than on-start never stop a run: a failure is reported as a `hook.failed` event.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from ._exceptions import ConfigError
from .events import Event, EventBus

if TYPE_CHECKING:
    from .journal import Journal
    from .settings import Settings

HOOK_NAMES = ("on-start", "on-status", "on-alert", "on-guard", "on-failure", "on-success",
              "on-rollback")
ENV_VARS = ("SAFEMIGRATE_HOOK", "SAFEMIGRATE_EVENT", "SAFEMIGRATE_LEVEL", "SAFEMIGRATE_MESSAGE",
            "SAFEMIGRATE_TS", "SAFEMIGRATE_DATA", "SAFEMIGRATE_DATABASE", "SAFEMIGRATE_RUN_ID",
            "SAFEMIGRATE_MIGRATION", "SAFEMIGRATE_PHASE", "SAFEMIGRATE_STATUS",
            "SAFEMIGRATE_ROWS_DONE", "SAFEMIGRATE_ROWS_TOTAL", "SAFEMIGRATE_QUARANTINED",
            "SAFEMIGRATE_RATE", "SAFEMIGRATE_ETA_SECONDS", "SAFEMIGRATE_ELAPSED_SECONDS",
            "SAFEMIGRATE_GUARD", "SAFEMIGRATE_REASON", "SAFEMIGRATE_REQUEST_ID",
            "SAFEMIGRATE_PRIORITY")


@dataclass
class HookSettings:
    """`[hooks]`: where the executables are, how long each may take."""

    dir: str = ".safemigrate/hooks"
    timeout: float = 30.0
    status_interval: float = 30.0  # seconds between periodic on-status calls; 0 = phases only

    def __post_init__(self) -> None:
        if self.timeout <= 0 or self.status_interval < 0:
            raise ConfigError("[hooks] timeout must be positive and status_interval not negative")

    @classmethod
    def from_settings(cls, settings: Settings) -> HookSettings:
        from .settings import section_settings

        return section_settings(cls, settings.section("hooks"), "hooks")


def hook_for(kind: str) -> str | None:
    """Which hook an event kind runs (on-start is run by the supervisor, synchronously)."""
    if kind.startswith("phase."):
        return "on-status"
    if kind == "alert" or kind.startswith("alert."):
        return "on-alert"
    if kind.startswith("guard."):
        return "on-guard"
    if kind in ("run.failed", "run.interrupted", "validation.failed"):
        return "on-failure"
    if kind == "run.completed":
        return "on-success"
    if kind in ("rollback.started", "rollback.completed") or kind.startswith("request."):
        return "on-rollback"
    return None


@dataclass
class HookResult:
    hook: str
    path: str
    returncode: int | None
    seconds: float
    output: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".")
    return str(value)


class Hooks:
    """Event subscriber that runs the matching hook. `state` (set by the supervisor) gives the
    live figures; without it the run's state is read from the journal."""

    def __init__(self, settings: HookSettings, journal: Journal, bus: EventBus,
                 database: str = "") -> None:
        self.s = settings
        self.dir = Path(settings.dir).expanduser()
        if not self.dir.is_absolute():
            self.dir = Path.cwd() / self.dir
        self.journal = journal
        self.bus = bus
        self.database = database
        self.state: Callable[[], dict[str, Any]] | None = None
        self.results: list[HookResult] = []

    def find(self, name: str) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir()
                      if (p.name == name or p.name.startswith(name + ".")) and p.is_file()
                      and not p.name.endswith((".sample", "~")))

    def __call__(self, event: Event) -> None:
        name = hook_for(event.kind)
        if name is None or not self.find(name):
            return
        for result in self.fire(name, event):
            if not result.ok:
                self.bus.emit(Event("hook.failed", f"hook {name} ({Path(result.path).name}) "
                                    f"{describe_failure(result)}", event.run_id, "warning",
                                    {"hook": name, "path": result.path,
                                     "returncode": result.returncode, "output": result.output}))

    def fire(self, name: str, event: Event) -> list[HookResult]:
        """Run every executable for `name`; return their results (never raises)."""
        paths = self.find(name)
        if not paths:
            return []
        env = {**os.environ, **self.environment(name, event)}
        results = []
        for path in paths:
            started = time.monotonic()
            if not os.access(path, os.X_OK):
                results.append(HookResult(name, str(path), None, 0.0, "not executable (chmod +x)"))
                continue
            try:
                proc = subprocess.run([str(path)], env=env, capture_output=True, text=True,
                                      timeout=self.s.timeout, stdin=subprocess.DEVNULL, check=False)
                output = (proc.stderr or proc.stdout or "").strip()[-2000:]
                result = HookResult(name, str(path), proc.returncode, time.monotonic() - started, output)
            except subprocess.TimeoutExpired:
                result = HookResult(name, str(path), None, time.monotonic() - started,
                                    f"timed out after {self.s.timeout:g}s")
            except OSError as exc:
                result = HookResult(name, str(path), None, time.monotonic() - started, str(exc))
            results.append(result)
            self.results.append(result)
        return results

    def environment(self, name: str, event: Event) -> dict[str, str]:
        data = event.data or {}
        values: dict[str, Any] = dict.fromkeys(ENV_VARS, "")
        values.update({
            "SAFEMIGRATE_HOOK": name, "SAFEMIGRATE_EVENT": event.kind,
            "SAFEMIGRATE_LEVEL": event.level, "SAFEMIGRATE_MESSAGE": event.message,
            "SAFEMIGRATE_TS": event.ts, "SAFEMIGRATE_DATA": json.dumps(data, default=str),
            "SAFEMIGRATE_DATABASE": self.database, "SAFEMIGRATE_RUN_ID": event.run_id,
            "SAFEMIGRATE_GUARD": data.get("guard") or data.get("alert"),
            "SAFEMIGRATE_REASON": data.get("reason"),
            "SAFEMIGRATE_REQUEST_ID": data.get("request_id"),
            "SAFEMIGRATE_PRIORITY": data.get("priority"),
        })
        values.update(self._run_state(event.run_id))
        return {k: _text(v) for k, v in values.items()}

    def _run_state(self, run_id: str | None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if run_id:
            try:
                run = self.journal.run(run_id)
                steps = self.journal.steps(run_id)
                quarantined = self.journal.quarantine_count(run_id)
            except sa.exc.DBAPIError:
                run, steps, quarantined = None, [], None
            if run is not None:
                out.update({
                    "SAFEMIGRATE_MIGRATION": run["migration_id"], "SAFEMIGRATE_PHASE": run["phase"],
                    "SAFEMIGRATE_STATUS": run["status"],
                    "SAFEMIGRATE_ROWS_DONE": sum(s["rows_done"] or 0 for s in steps),
                    "SAFEMIGRATE_ROWS_TOTAL": sum(s["rows_total"] or 0 for s in steps),
                    "SAFEMIGRATE_QUARANTINED": quarantined,
                    "SAFEMIGRATE_ELAPSED_SECONDS": (run["finished_at"] or time.time()) - run["started_at"],
                })
        if self.state is not None:
            live = self.state()
            if live.get("run_id") in (None, run_id):
                out["SAFEMIGRATE_RATE"] = live.get("rate_smoothed") or live.get("rate_average")
                out["SAFEMIGRATE_ETA_SECONDS"] = live.get("eta_seconds")
                if live.get("phase"):
                    out["SAFEMIGRATE_PHASE"] = live["phase"]
        return out


def describe_failure(result: HookResult) -> str:
    what = f"exited {result.returncode}" if result.returncode is not None else "failed"
    return f"{what}: {result.output}" if result.output else what
