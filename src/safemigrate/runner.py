"""The phased runner: preparation → structure → transformation → validation → cleanup.

Each phase and step is journaled as it starts and ends; a run interrupted anywhere resumes from
the journal and ends exactly where an uninterrupted run would have.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from . import capture
from ._exceptions import (
    AbortedError,
    ChecksumMismatchError,
    GuardTrippedError,
    MigrationFileError,
    SafeMigrateError,
    ValidationError,
)
from ._version import __version__
from .backup import (
    Snapshot,
    backup_settings,
    plain_snapshot,
    record_layer,
    take_snapshot,
    verify_run_backup,
)
from .ddl import run_schema_step
from .digest import reflect
from .engine import BackfillExecutor, DrainReport
from .events import Event
from .migration import PHASES, Migration
from .shadow import create_shadow, shadow_rows
from .steps import Backfill
from .validate import (
    CheckResult,
    backfill_rows,
    failed,
    integrity,
    invariants,
    smoke_checks,
    untouched_columns,
)

if TYPE_CHECKING:
    from .migrator import Migrator


@dataclass
class RunResult:
    run_id: str
    migration_id: str
    status: str
    rows: int = 0
    quarantined: int = 0
    seconds: float = 0.0
    snapshot: str | None = None
    checks: list[CheckResult] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["checks"] = [c.as_dict() for c in self.checks]
        return out


class Runner:
    """Takes one migration through the five phases, as a new run or resuming an unfinished one."""

    def __init__(self, migrator: Migrator, migration: Migration) -> None:
        self.m = migrator
        self.migration = migration
        self.dialect = migrator.dialect
        self.journal = migrator.journal
        self.settings = migrator.settings
        self.run_id = ""
        self.result: RunResult | None = None
        self._backup: Snapshot | None = None  # this run's backup, once verified

    # -- helpers -------------------------------------------------------------------------------
    def emit(self, kind: str, message: str, level: str = "info", **data: Any) -> None:
        self.m.bus.emit(Event(kind, message, self.run_id, level, data))

    def _start_or_resume(self) -> dict[str, Any]:
        run = self.journal.unfinished_run(self.migration.id)
        if run is not None:
            if run["checksum"] != self.migration.checksum:
                raise ChecksumMismatchError(
                    f"migration {self.migration.id} changed since its run {run['id']} started",
                    "restore the file as it was, or `safemigrate rollback` that run first",
                )
            self.run_id = run["id"]
            self._verify_backup()  # never go on with a corrupted backup; the run stays as it was
            self.journal.update_run(None, self.run_id, status="running", error=None)
            self.emit("run.resumed", f"resuming run {self.run_id} of {self.migration.id} "
                      f"from phase {run['phase']}", migration=self.migration.id, phase=run["phase"])
            return run
        options = {"batch_size": self.settings.batch_size, "workers": self.settings.workers,
                   "backup_dir": str(self.settings.backup_dir), "online": self.settings.online}
        with self.dialect.engine.begin() as conn:
            self.run_id = self.journal.create_run(conn, self.migration.id, self.migration.checksum,
                                                  options, __version__)
            self.journal.init_steps(conn, self.run_id, [
                {"idx": i, "kind": s.kind, "description": s.describe(),
                 "phase": self.migration.phase_of(i)}
                for i, s in enumerate(self.migration.steps)
            ])
        self.emit("run.started", f"run {self.run_id} of {self.migration.id} started",
                  migration=self.migration.id, steps=len(self.migration.steps))
        run = self.journal.run(self.run_id)
        assert run is not None
        return run

    # -- the run -------------------------------------------------------------------------------
    def execute(self) -> RunResult:
        started = time.time()
        run = self._start_or_resume()
        self.m.lock_attach(self.run_id)
        self.result = RunResult(self.run_id, self.migration.id, "running")
        done_phases = {p["name"] for p in self.journal.phases(self.run_id) if p["status"] == "completed"}
        current = ""
        try:
            for phase in PHASES:
                if phase in done_phases:
                    continue
                current = phase
                self.m.between_steps()  # pause, abort, a tripped guard, a failed on-start hook
                self.journal.phase(self.run_id, phase, "running")
                self.emit("phase.started", f"phase {phase}", phase=phase)
                getattr(self, f"_phase_{phase}")(run)
                self.journal.phase(self.run_id, phase, "completed")
                self.emit("phase.completed", f"phase {phase} completed", phase=phase)
        except AbortedError as exc:
            self.journal.phase(self.run_id, current, "interrupted", exc.message)
            self.journal.update_run(None, self.run_id, status="interrupted", error=exc.message)
            self.emit("run.interrupted", exc.message, "warning", phase=current)
            raise
        except KeyboardInterrupt as exc:  # abort now (a second SIGINT): journal it, then go
            message = str(exc) or "interrupted (KeyboardInterrupt)"
            try:
                self.journal.phase(self.run_id, current, "interrupted", message)
                self.journal.update_run(None, self.run_id, status="interrupted", error=message)
                self.emit("run.interrupted", message, "warning", phase=current)
            except Exception:  # noqa: BLE001, S110 - status still sees a dead runner as interrupted
                pass
            raise
        except GuardTrippedError as exc:
            self._tripped(current, exc)
        except ValidationError:
            raise
        except SafeMigrateError as exc:
            self._fail(current, exc.message)
            raise
        except sa.exc.DBAPIError as exc:
            error = self.dialect.translate_error(exc)
            self._fail(current, error.message)
            raise error from None
        steps = self.journal.steps(self.run_id)
        self.result.status = "completed"
        self.result.rows = sum(s["rows_done"] for s in steps)
        self.result.quarantined = sum(s["rows_quarantined"] for s in steps)
        self.result.seconds = time.time() - started
        self.emit("run.completed", f"{self.migration.id} completed: {self.result.rows} rows, "
                  f"{self.result.quarantined} quarantined", rows=self.result.rows,
                  quarantined=self.result.quarantined, seconds=self.result.seconds)
        return self.result

    def _fail(self, phase: str, message: str) -> None:
        if phase:
            self.journal.phase(self.run_id, phase, "failed", message)
        self.journal.update_run(None, self.run_id, status="failed", error=message)
        self.emit("run.failed", message, "error", phase=phase)

    def _tripped(self, phase: str, exc: GuardTrippedError) -> None:
        """A guard tripped (or an immediate rollback was requested): journal the decision with
        its figures, roll back, exit 3."""
        if phase:
            self.journal.phase(self.run_id, phase, "failed", exc.message)
        self.emit("guard.decision", f"automatic rollback ({exc.strategy}) of run {self.run_id}",
                  "critical",
                  guard=exc.guard, decision="rollback", strategy=exc.strategy, figures=exc.figures,
                  request_id=exc.request_id)
        self.m.rollback_run(self.run_id, strategy=exc.strategy, reason=exc.message, locked=True)
        raise GuardTrippedError(f"{exc.message}; the run was rolled back ({exc.strategy})",
                                guard=exc.guard, figures=exc.figures, strategy=exc.strategy,
                                request_id=exc.request_id) from None

    # -- phases --------------------------------------------------------------------------------
    def _phase_preparation(self, run: dict[str, Any]) -> None:
        with self.dialect.engine.connect() as conn:
            existing = set(self.dialect.user_tables(conn))
        created = self.migration.created_tables()
        clash = sorted(created & existing)
        if clash:
            raise MigrationFileError(f"table {clash[0]} already exists; the migration creates it")
        missing = sorted(self.migration.tables() - created - existing)
        if missing:
            raise MigrationFileError(f"table {missing[0]} does not exist",
                                     "check the table names in the migration")
        with self.dialect.engine.connect() as conn:  # refuse before any change, not mid-run
            for table in sorted({s.table for s in self.migration.steps
                                 if isinstance(s, Backfill) and s.table not in created}):
                if not reflect(conn, table).primary_key.columns:
                    raise MigrationFileError(
                        f"table {table} has no primary key; Backfill pages by primary key",
                        "add a primary key (or a unique NOT NULL key made primary) before backfilling",
                    )
                self._refuse_unaddressable_rows(conn, table)
        self._run_own_checks()
        from .rollback_validate import record_canary_baseline

        record_canary_baseline(self.m, self.run_id)  # what the rollback validator compares with
        affected = sorted(self.migration.tables() - created)
        self._install_capture(affected)
        try:
            snapshot = self._snapshot(affected)
        except Exception:
            capture.forget(self.journal, self.dialect, self.run_id)  # leave nothing behind
            raise
        with self.dialect.engine.connect() as conn:
            schema = self.dialect.schema_fingerprint(conn, sorted(affected + sorted(created)))
        baseline = {"tables": affected, "created": sorted(created), "schema": schema,
                    "digests": {t: snapshot.digests[t] for t in affected},
                    "snapshot_id": snapshot.id}
        self.journal.update_run(None, self.run_id, baseline=baseline)
        for idx, step in enumerate(self.migration.steps):
            if not isinstance(step, Backfill) or step.table in created:
                continue
            with self.dialect.engine.begin() as conn:
                columns = [c for c in step.writes if c in reflect(conn, step.table).c]
                name = create_shadow(conn, self.run_id, idx, step.table, columns) if columns else None
                rows = shadow_rows(conn, step.table, name) if name else 0
                self.journal.update_step(conn, self.run_id, idx,
                                         state={"shadow": name, "columns": columns})
            if name:
                self.journal.event(self.run_id, "backup.shadow",
                                   f"shadow copy of {step.table}({', '.join(columns)}) in {name}")
                record_layer(self.journal, snapshot.id, snapshot.manifest_path, {
                    "layer": "shadow", "location": f"table {name}", "table": step.table,
                    "step": idx, "columns": columns, "rows": rows, "status": "verified",
                    "verified_at": time.time()})

    def _install_capture(self, tables: list[str]) -> list[capture.Capture]:
        """Change capture on every affected table, before the snapshot so no write escapes."""
        if not self.settings.online:
            return []
        written = self.migration.written_columns()
        captures = []
        for table in tables:
            installed = capture.install(self.dialect, self.run_id, table, written.get(table, set()))
            if installed.log:
                captures.append(installed)
        capture.save(self.journal, self.run_id, captures)
        if captures:
            self.journal.event(self.run_id, "capture.installed",
                               f"change capture on {', '.join(c.table for c in captures)}",
                               data={"captures": [c.as_dict() for c in captures]})
        return captures

    def _captures(self) -> dict[str, capture.Capture]:
        return {c.table: c for c in capture.load(self.journal, self.run_id)}

    def _drain(self, idx: int, step: Backfill, phase: str, *, until_empty: bool = False) -> DrainReport:
        """Drain the step's change log (bounded by drain_passes / drain_seconds unless
        `until_empty`). A drained row that fails validation as stored fails the run as a failed
        validation does (rolled back when auto_rollback is on)."""
        cap = self._captures().get(step.table)
        if cap is None:
            return DrainReport()
        report = self._executor(idx, step).drain(
            cap, max_passes=self.settings.drain_passes, max_seconds=self.settings.drain_seconds,
            until_empty=until_empty)
        if report.failures:
            check = CheckResult(f"drain:{step.table}#{idx}", False,
                                f"{len(report.failures)} rows written by the application fail "
                                f"validation as stored ({'; '.join(report.failures[:3])})")
            self._record_check(check)
            self._validation_failed(phase, [check])
        return report

    def _executor(self, idx: int, step: Backfill) -> BackfillExecutor:
        return BackfillExecutor(
            dialect=self.dialect, journal=self.journal, bus=self.m.bus,
            run_id=self.run_id, step_idx=idx, step=step,
            migration_path=self.migration.path, workers=self.settings.workers,
            batch_size=self.settings.batch_size, stop=self.m.stop,
            between_batches=self.m.between_batches,
        )

    def _refuse_unaddressable_rows(self, conn: sa.Connection, table: str) -> None:
        """SQLite lets a non-INTEGER primary key hold NULL: such rows can be neither paged past
        nor updated by key, and would be silently skipped. And compiling (never running) an
        UPDATE compiles the application's triggers: a SQL function or collation only the
        application registers fails here, before any change, not in the middle of the run."""
        if self.dialect.name != "sqlite":  # servers enforce NOT NULL keys and resolve at run time
            return
        q = self.dialect.quote
        keys = [c.name for c in reflect(conn, table).primary_key.columns]
        nulls = " OR ".join(f"{q(k)} IS NULL" for k in keys)
        if conn.execute(sa.text(f"SELECT 1 FROM {q(table)} WHERE {nulls} LIMIT 1")).first():
            raise MigrationFileError(
                f"table {table} has rows whose primary key ({', '.join(keys)}) is NULL; "
                "Backfill cannot address them by key",
                "give those rows a key (or delete them) before backfilling",
            )
        writes = {w for s in self.migration.steps if isinstance(s, Backfill) and s.table == table
                  for w in s.writes} & set(reflect(conn, table).c.keys())
        sets = ", ".join(f"{q(c)} = {q(c)}" for c in sorted(writes) or keys[:1])
        conn.execute(sa.text(f"EXPLAIN UPDATE {q(table)} SET {sets} WHERE 1 = 0"))

    def _run_own_checks(self) -> None:
        """The full pre-migration check suite (safemigrate.checks) for this migration; every
        outcome and every skip (with who and why) is journaled. Not ready: nothing changes."""
        from .checks import journal_report, not_ready_error, preflight

        report = preflight(self.m, migrations=[self.migration], run_id=self.run_id,
                           skip=self.m.skip_checks)
        journal_report(self.m, self.run_id, report)
        for outcome in report.checks:
            if outcome.verdict in ("warning", "skipped"):
                self.emit(f"check.{outcome.verdict}", f"check {outcome.name} {outcome.verdict}: "
                          f"{outcome.details}", "warning", check=outcome.name)
        self.emit("checks.completed", f"pre-migration checks: {report.summary()}",
                  "info" if report.ready else "error", ready=report.ready, counts=report.counts())
        if not report.ready:
            raise not_ready_error(report, self.migration.id)

    def _notify(self, kind: str, message: str, level: str) -> None:
        self.emit(kind, message, level)

    def _verify_backup(self) -> Snapshot | None:
        """Re-check this run's backup before using it again (resume): a corrupted or missing
        snapshot stops here, with the run left as it was."""
        if self._backup is not None:
            return self._backup
        for record in self.journal.backups(self.run_id, kind="snapshot"):
            if record["status"] == "verified":
                self._backup = verify_run_backup(self.dialect, self.journal, record,
                                                 backup_settings(self.settings), notify=self._notify)
                return self._backup
        return None

    def _snapshot(self, tables: list[str]) -> Snapshot:
        """The verified snapshot of this run: taken now, or reused (and re-checked) on resume."""
        reused = self._verify_backup()
        if reused is not None:
            return reused
        self.emit("backup.started", "taking a verified snapshot before any change")
        snapshot = take_snapshot(self.dialect, self.journal, self.settings.backup_dir,
                                 run_id=self.run_id, kind="snapshot", tables=tables,
                                 label=self.migration.id, config=backup_settings(self.settings),
                                 migration=self.migration.id, notify=self._notify)
        self._backup = snapshot
        self.emit("backup.verified", f"snapshot {snapshot.path.name} verified "
                  f"({snapshot.size / 1e6:.1f} MB, sha256 {snapshot.sha256[:12]})",
                  path=str(snapshot.path), size=snapshot.size, sha256=snapshot.sha256)
        self.journal.event(self.run_id, "backup.verified", f"snapshot {snapshot.path} verified",
                           data={"sha256": snapshot.sha256, "size": snapshot.size})
        if self.result is not None:
            self.result.snapshot = str(snapshot.path)
        return snapshot

    def _apply_steps(self, phase: str) -> None:
        step_rows = {s["idx"]: s for s in self.journal.steps(self.run_id)}
        for idx, step in enumerate(self.migration.steps):
            if self.migration.phase_of(idx) != phase or step_rows[idx]["status"] == "done":
                continue
            if isinstance(step, Backfill):
                self._executor(idx, step).run()
                self._drain(idx, step, phase)
                continue
            self.emit("step.started", step.describe(), step=idx)
            run_schema_step(self.dialect, self.journal, self.run_id, idx, step, step_rows[idx])
            self.emit("step.completed", step.describe(), step=idx)
            if self.m.stop.is_set():
                raise AbortedError(f"stopped after step {idx}: {self.m.stop.reason}")
            self.m.between_steps()

    def _phase_structure(self, run: dict[str, Any]) -> None:
        self._apply_steps("structure")

    def _phase_transformation(self, run: dict[str, Any]) -> None:
        self._apply_steps("transformation")

    def _phase_validation(self, run: dict[str, Any]) -> None:
        run = self.journal.run(self.run_id) or run
        baseline = run["baseline"]
        captures = self._captures()
        snapshot = next((Path(b["location"]) for b in self.journal.backups(self.run_id, kind="snapshot")
                         if b["id"] == baseline.get("snapshot_id")), None)
        with plain_snapshot(self.dialect, snapshot, needed=bool(captures)) as path:
            results = [integrity(self.dialect),
                       untouched_columns(self.dialect, self.migration, baseline, captures, path)]
        step_rows = {s["idx"]: s for s in self.journal.steps(self.run_id)}
        for idx, step in enumerate(self.migration.steps):
            if isinstance(step, Backfill):
                existing = step_rows[idx]["state"].get("columns", [])
                results.append(backfill_rows(self.dialect, self.journal, self.run_id, idx, step,
                                             existing, self.settings.batch_size,
                                             captures.get(step.table),
                                             workers=self.settings.workers,
                                             migration_path=self.migration.path))
        results += invariants(self.dialect, self.migration)
        results += smoke_checks(self.dialect, self.migration)
        for result in results:
            self._record_check(result)
        bad = failed(results)
        if bad:
            self._validation_failed("validation", bad)

    def _validation_failed(self, phase: str, bad: list[CheckResult]) -> None:
        """Roll back (auto_rollback) and raise ValidationError, or fail the run."""
        summary = "; ".join(f"{r.name}: {r.details}" for r in bad)
        self.journal.phase(self.run_id, phase, "failed", summary)
        self.emit("validation.failed", f"validation failed: {summary}", "error",
                  failures=[r.as_dict() for r in bad])
        if not self.settings.auto_rollback:
            self.journal.update_run(None, self.run_id, status="failed", error=summary)
            raise SafeMigrateError(f"validation failed: {summary}",
                                   "auto_rollback is off: fix and re-run, or `safemigrate rollback`")
        self.m.rollback_run(self.run_id, reason=f"validation failed: {summary}", locked=True)
        raise ValidationError(f"validation failed and the run was rolled back: {summary}")

    def _phase_cleanup(self, run: dict[str, Any]) -> None:
        """Cleanup steps, then the last drains, with the triggers removed in between.

        The application writes until the very end, so the triggers stay through validation:
        untouched-columns and a rollback read the log to tell its rows apart, and a write after
        the triggers came out would be one nobody sees. Rows it wrote after validation's
        snapshot are therefore drained here, after validation, and are validated by the drain
        itself: each drain batch re-reads what it stored and runs the validator in the same
        transaction as the write (the application cannot change the row in between), and a
        failing row fails the run like a failed validation. Order: a bounded drain while the
        application still writes, triggers out, then a drain until the log is empty (it no
        longer grows), so every row the application wrote while captured is transformed and
        validated before the run completes."""
        self._apply_steps("cleanup")
        backfills = [(i, s) for i, s in enumerate(self.migration.steps) if isinstance(s, Backfill)]
        reports = {idx: self._drain(idx, step, "cleanup") for idx, step in backfills}
        for cap in self._captures().values():
            capture.remove_triggers(self.dialect, cap)
        for idx, step in backfills:
            last = self._drain(idx, step, "cleanup", until_empty=True)
            first = reports[idx]
            rows, validated = first.rows + last.rows, first.validated + last.validated
            if rows:
                self._record_check(CheckResult(
                    f"drain:{step.table}#{idx}", True,
                    f"{rows} rows written by the application after validation migrated "
                    f"({validated} validated as stored, {first.quarantined + last.quarantined} "
                    f"quarantined) in cleanup"))
        self.m.dialect_analyze(sorted(self.migration.tables()))
        with self.dialect.engine.begin() as conn:
            self.journal.mark_applied(conn, self.migration.id, self.migration.checksum, self.run_id)
            self.journal.update_run(conn, self.run_id, status="completed", finished_at=time.time())

    def _record_check(self, result: CheckResult) -> None:
        """A check's result: in the run's result and, as a validation.check event, the journal."""
        assert self.result is not None
        self.result.checks.append(result)
        self.journal.event(self.run_id, "validation.check",
                           f"{result.name}: {'passed' if result.passed else 'FAILED'} "
                           f"{result.details}", level="info" if result.passed else "error",
                           data=result.as_dict())
