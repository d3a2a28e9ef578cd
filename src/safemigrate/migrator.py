"""The library's front door: one object per database and migrations folder.

Every CLI command is a few lines over a method here. Progress leaves through the event bus;
nothing here prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from ._exceptions import ChecksumMismatchError, MigrationFileError, UsageError
from .dialects import Dialect, dialect_for
from .engine import BatchHook, BatchStats, StopSignal
from .events import PROGRESS_KINDS, Event, EventBus
from .journal import Journal
from .lock import RunLock
from .migration import Migration, discover
from .rollback import RollbackExecutor, RollbackPlan, RollbackResult, migration_for_run
from .runner import Runner, RunResult
from .settings import Settings
from .steps import Backfill
from .supervisor import Supervisor, attach_outputs
from .urls import normalize_url, redact
from .validate import CheckResult, integrity, invariants, smoke_checks, timed


@dataclass
class PlannedStep:
    index: int
    phase: str
    kind: str
    description: str
    sql: list[str]
    reversible: bool
    rows: int | None = None


@dataclass
class PlannedMigration:
    id: str
    description: str
    file: str
    steps: list[PlannedStep] = field(default_factory=list)
    disk_needed: int = 0
    resumes_run: str | None = None

    @property
    def irreversible(self) -> list[PlannedStep]:
        return [s for s in self.steps if not s.reversible]


class Migrator:
    """Plans, runs, rolls back and reports migrations of one database."""

    def __init__(self, settings: Settings, bus: EventBus | None = None) -> None:
        self.settings = settings
        self.url = normalize_url(settings.db or "")
        self.dialect: Dialect = dialect_for(self.url, lock_timeout=settings.lock_timeout)
        self.journal = Journal(self.dialect.engine)
        self.bus = bus or EventBus()
        self.bus.subscribe(self._journal_subscriber)
        self.stop = StopSignal()
        self.between_batches: BatchHook | None = None
        self._lock: RunLock | None = None
        self._journal_ready = False
        self.supervisor: Supervisor | None = None  # set while `run()` supervises a run
        self.skip_checks: dict[str, str] = {}  # check name (or glob) -> reason, for `run`
        self.outputs = attach_outputs(self)  # notifications and hooks

    @property
    def journal_ready(self) -> bool:
        """Whether the database has a journal (read-only commands never create one)."""
        return self._journal_ready

    @property
    def display_url(self) -> str:
        return redact(self.url)

    def close(self) -> None:
        self.outputs.close()
        self.dialect.dispose()

    def __enter__(self) -> Migrator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ----------------------------------------------------------------------------------
    def _journal_subscriber(self, event: Event) -> None:
        if event.kind in PROGRESS_KINDS or not self._journal_ready:
            return
        if event.kind.startswith(("run.", "phase.", "step.", "rollback.started", "validation.",
                                  "quarantine", "alert", "guard", "lock", "control", "request",
                                  "hook")):
            self.journal.event(event.run_id, event.kind, event.message, event.level, event.data)

    def _open(self, *, write: bool) -> None:
        """Reach the database; create the journal only for commands that write."""
        self.dialect.ping()
        try:
            if write:
                self.journal.ensure()
                self._journal_ready = True
            else:
                self._journal_ready = self.journal.exists()
        except sa.exc.DBAPIError as exc:
            raise self.dialect.translate_error(exc) from None

    def lock_attach(self, run_id: str) -> None:
        if self._lock is not None:
            self._lock.attach_run(run_id)
            takeover = self._lock.pop_takeover()
            if takeover is not None:
                self.bus.emit(Event("lock.takeover", "took over the lock of a dead runner: "
                                    f"{takeover['reason']}", run_id, "warning", takeover))

    def _check_lock(self, stats: BatchStats | None = None) -> int | None:
        if self._lock is not None and self._lock.lost.is_set():
            self.stop.set("the run lock was taken over by another process")
        return None

    def between_steps(self) -> None:
        """The runner calls this between phases and schema steps: pause, abort, trips."""
        if self.supervisor is not None:
            self.supervisor.between_steps()

    def dialect_analyze(self, tables: list[str]) -> None:
        with self.dialect.engine.begin() as conn:
            existing = set(self.dialect.user_tables(conn))
            for table in tables:
                if table in existing:
                    conn.exec_driver_sql(self.dialect.analyze_sql(table))

    # -- migrations ----------------------------------------------------------------------------
    def migrations(self) -> list[Migration]:
        return discover(self.settings.migrations)

    def pending(self) -> list[Migration]:
        """Migrations not applied yet, after proving the applied ones were not edited."""
        found = self.migrations()
        applied = self.journal.applied() if self._journal_ready else {}
        by_id = {m.id: m for m in found}
        for migration_id, row in applied.items():
            migration = by_id.get(migration_id)
            if migration is None:
                raise MigrationFileError(
                    f"applied migration {migration_id} has no file in {self.settings.migrations}",
                    "restore the file from version control (or point --migrations at the right folder)",
                )
            if migration.checksum != row["checksum"]:
                raise ChecksumMismatchError(
                    f"migration {migration_id} was edited after it was applied "
                    f"(checksum {migration.checksum[:12]} != applied {row['checksum'][:12]})"
                )
        return [m for m in found if m.id not in applied]

    # -- plan ----------------------------------------------------------------------------------
    def plan(self) -> list[PlannedMigration]:
        self._open(write=False)
        pending = self.pending()
        unfinished = self.journal.unfinished_run() if self._journal_ready else None
        out = []
        with self.dialect.engine.connect() as conn:
            db_size = self.dialect.size_bytes(conn)
            tables = set(self.dialect.user_tables(conn))
            counts: dict[str, int] = {}
            for migration in pending:
                planned = PlannedMigration(migration.id, migration.description,
                                           str(migration.path), disk_needed=db_size)
                if unfinished and unfinished["migration_id"] == migration.id:
                    planned.resumes_run = unfinished["id"]
                for idx, step in enumerate(migration.steps):
                    rows = None
                    if isinstance(step, Backfill) and step.table in tables:
                        if step.table not in counts:
                            t = sa.table(step.table)
                            counts[step.table] = int(conn.execute(
                                sa.select(sa.func.count()).select_from(t)).scalar() or 0)
                        rows = counts[step.table]
                        planned.disk_needed += rows * 64  # shadow copy of keys and old values
                    planned.steps.append(PlannedStep(
                        idx, migration.phase_of(idx), step.kind, step.describe(),
                        step.sql(self.dialect), step.reversible, rows))
                out.append(planned)
        return out

    # -- run -------------------------------------------------------------------------------------
    def run(self, skip_checks: dict[str, str] | None = None) -> list[RunResult]:
        """Apply every pending migration (resuming an unfinished run first). `skip_checks`
        maps pre-migration check names (or globs) to the reason they are skipped (journaled)."""
        from .checks import validate_skips

        # Bad input (a broken or edited migration file) fails before a byte is written:
        # not even the journal or the lock.
        self._open(write=False)
        pending = self.pending()
        if skip_checks is not None:
            validate_skips(self, skip_checks, pending)
            self.skip_checks = dict(skip_checks)
        self._open(write=True)
        results = []
        with self._locked("run"), Supervisor(self):
            unfinished = self.journal.unfinished_run()
            if unfinished is not None and unfinished["status"] == "rolling_back":
                raise UsageError(
                    f"the rollback of run {unfinished['id']} was interrupted",
                    "finish it first: safemigrate rollback",
                )
            pending = self.pending()
            if unfinished is not None:
                pending.sort(key=lambda m: m.id != unfinished["migration_id"])
            for migration in pending:
                results.append(Runner(self, migration).execute())
        return results

    def _locked(self, purpose: str) -> RunLock:
        lock = RunLock(self.journal, stale_after=self.settings.lock_stale_after, purpose=purpose)
        lock.acquire()
        self._lock = lock
        self.between_batches = self._check_lock
        return lock

    # -- rollback --------------------------------------------------------------------------------
    def _rollback_target(self, run_id: str | None) -> dict[str, Any]:
        if run_id is not None:
            run = self.journal.run(run_id)
            if run is None:
                raise UsageError(f"no run {run_id!r}", "see `safemigrate history` for run ids")
            return run
        latest = self.journal.runs(limit=1)
        if not latest:
            raise UsageError("there is no run to roll back", "see `safemigrate history`")
        # Always the latest run: after a rollback that crashed at its very end, a second
        # `rollback` must not quietly move on to the run before it.
        return latest[0]

    def _executor(self, run_id: str | None, strategy: str, reason: str) -> RollbackExecutor:
        run = self._rollback_target(run_id)
        migration = None
        try:
            migration = migration_for_run(self.migrations(), run)
        except ChecksumMismatchError:
            if strategy in ("reverse", "auto"):  # an edited file is bad input: refuse
                raise
        except MigrationFileError:
            if strategy == "reverse":
                raise
        return RollbackExecutor(self, run, migration, strategy, reason)

    def rollback_plan(self, run_id: str | None = None, strategy: str = "auto") -> RollbackPlan:
        self._open(write=False)
        if not self._journal_ready:
            raise UsageError("this database has no safemigrate journal: nothing to roll back")
        return self._executor(run_id, strategy, "dry run").prerequisites()

    def rollback(self, run_id: str | None = None, strategy: str = "auto",
                 reason: str = "requested by operator") -> RollbackResult:
        """The eight journaled, resumable steps of `safemigrate.rollback`; a live runner is
        first asked to stop through the control channel (bounded wait for its lock)."""
        from .rollback import stop_live_runner
        from .rollback_validate import RollbackSettings

        self._open(write=True)
        stopped = stop_live_runner(self, reason=f"rollback: {reason}",
                                   timeout=RollbackSettings.from_settings(self.settings).stop_timeout)
        with self._locked("rollback"):
            return self.rollback_run(run_id, strategy=strategy, reason=reason, locked=True,
                                     stopped=stopped)

    def rollback_run(self, run_id: str | None, *, strategy: str = "auto", reason: str,
                     locked: bool, stopped: dict[str, Any] | None = None) -> RollbackResult:
        """Roll back while already holding the lock (the runner calls this on auto-rollback)."""
        if not locked:
            return self.rollback(run_id, strategy, reason)
        executor = self._executor(run_id, strategy, reason)
        executor.stopped = stopped
        self.lock_attach(executor.run_id)
        return executor.execute()

    # -- reports ---------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        from .status import build_status

        self._open(write=False)
        return build_status(self)

    def history(self, limit: int = 20) -> list[dict[str, Any]]:
        self._open(write=False)
        if not self._journal_ready:
            return []
        out = []
        for run in self.journal.runs(limit):
            run = {k: v for k, v in run.items() if k != "baseline"}
            run["events"] = self.journal.events(run["id"])
            out.append(run)
        return out

    def verify(self) -> list[CheckResult]:
        """Integrity, the applied migrations' invariants and smoke checks, backup checksums."""
        from .backup import verify_backup_record

        self._open(write=False)
        results = [integrity(self.dialect)]
        applied = self.journal.applied() if self._journal_ready else {}
        for migration in self.migrations():
            if migration.id in applied:
                results += invariants(self.dialect, migration)
                results += smoke_checks(self.dialect, migration)
        if self._journal_ready:
            for record in self.journal.backups():
                if record["status"] != "verified" or not Path(record["location"]).exists():
                    continue

                def check(record: dict[str, Any] = record) -> str:
                    verify_backup_record(self.dialect, record, full=False)
                    return f"{Path(record['location']).name} matches sha256 {record['sha256'][:12]}"
                results.append(timed(f"backup:{record['id']}", check))
        return results
