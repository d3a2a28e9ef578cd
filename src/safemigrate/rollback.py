"""Rollback: back to exactly the state the run started from, and proof that it is.

The seed's `SafeRollbackExecutor` (3.2.1). `rollback` runs eight steps, each journaled (the
state entry ``rollback:<run_id>`` lists them with status, start, end and details, and every
step is an event) and resumable: a re-run after a crash skips the completed steps, and every
step is idempotent.

1. prerequisites  the run exists and is rollback-able; the strategy (reverse by default, restore
                  when a step is irreversible, the file is gone, or asked); the backup layer it
                  needs exists and verifies; the lock is ours (a live runner was asked to stop)
2. stop_writes    the application goes into maintenance mode (degradation level) for the duration
3. backup         the current state is saved (a pre-rollback snapshot), so the rollback can be undone
4. perform        reverse the steps (shadow copy, drops) or restore the tables from the snapshot
5. rebuild        rebuild the indexes of the affected tables, refresh planner statistics
6. version        the migration leaves `safemigrate_applied`; `schema_version` records the version
7. validate       the rollback validator (safemigrate.rollback_validate)
8. service        the run is marked rolled back, maintenance mode ends, on-rollback hooks run

When step 4 or 7 fails, the pre-rollback backup is restored (tables and journal facts), an
emergency is raised (a critical notification), maintenance mode stays on, and the error says
what to do next; the database is then as it was before the rollback, and `rollback` starts a
new attempt. Other failures leave the attempt to be resumed by `rollback`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from . import capture
from ._exceptions import (
    BackupError,
    ChecksumMismatchError,
    IrreversibleError,
    RollbackError,
    SafeMigrateError,
    UsageError,
)
from .backup import (
    layers_of,
    manifest_path_for,
    plain_snapshot,
    take_snapshot,
    verify_backup_record,
)
from .ddl import run_schema_step
from .digest import reflect, row_differences, table_digest
from .events import Event
from .faults import fault
from .journal import Journal, applied, runs
from .journal import steps as steps_table
from .migration import Migration
from .shadow import drop_shadow, restore_from_shadow, shadow_name
from .steps import Backfill
from .validate import CheckResult, failed

if TYPE_CHECKING:
    from .migrator import Migrator

STRATEGIES = ("auto", "reverse", "restore")
STEPS = ("prerequisites", "stop_writes", "backup", "perform", "rebuild", "version", "validate",
         "service")
STEP_TITLES = {
    "prerequisites": "validate prerequisites (run, strategy, backup layer, lock)",
    "stop_writes": "stop writes: running migration stopped, application in maintenance mode",
    "backup": "save the current state (pre-rollback snapshot)",
    "perform": "perform the rollback",
    "rebuild": "rebuild the affected tables' indexes and refresh planner statistics",
    "version": "record the database version as it was before the migration",
    "validate": "validate (integrity, consistency, smoke checks, performance, access)",
    "service": "restore service: leave maintenance mode, run the on-rollback hooks",
}
RECOVERED_FROM = ("perform", "validate")  # a failure here restores the pre-rollback backup
PROGRESS_KEY = "rollback:{run_id}"
SCHEMA_VERSION_KEY = "schema_version"


def progress_of(journal: Journal, run_id: str) -> dict[str, Any] | None:
    """The journaled progress of the rollback of `run_id` (its latest attempt), or None."""
    return journal.get_state(PROGRESS_KEY.format(run_id=run_id))


class AlreadyRolledBack(UsageError):
    """The run is rolled back already: `rollback` is idempotent, so this is not a failure."""

    exit_code = 0


@dataclass
class RollbackResult:
    run_id: str
    migration_id: str
    strategy: str
    status: str
    seconds: float = 0.0
    pre_rollback_backup: str | None = None
    checks: list[CheckResult] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    attempt: int = 1

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["checks"] = [c.as_dict() for c in self.checks]
        return out


@dataclass
class RollbackPlan:
    run_id: str
    migration_id: str
    strategy: str
    actions: list[str]
    needs_backup: bool
    why: str = ""
    steps: list[tuple[str, str]] = field(default_factory=list)  # (step, what it will do)
    resumes: dict[str, Any] | None = None  # the interrupted attempt a run would resume


class RollbackExecutor:
    def __init__(self, migrator: Migrator, run: dict[str, Any], migration: Migration | None,
                 strategy: str, reason: str, *, stopped: dict[str, Any] | None = None) -> None:
        if strategy not in STRATEGIES:
            raise UsageError(f"unknown rollback strategy {strategy!r}", "use auto, reverse or restore")
        self.m = migrator
        self.run = run
        self.run_id = run["id"]
        self.migration = migration
        self.requested = strategy
        self.strategy = "reverse" if strategy == "auto" else strategy
        self.why = "asked for" if strategy != "auto" else "default"
        self.reason = reason
        self.stopped = stopped  # the live runner stopped through the control channel, if any
        self.dialect = migrator.dialect
        self.journal = migrator.journal
        self.progress: dict[str, Any] = {}
        self._persist = False

    def emit(self, kind: str, message: str, level: str = "info", **data: Any) -> None:
        self.m.bus.emit(Event(kind, message, self.run_id, level, data))

    # -- prerequisites and plan ------------------------------------------------------------------
    def _changed_steps(self) -> list[dict[str, Any]]:
        """Steps that changed something, newest first: done, or a backfill that started."""
        rows = self.journal.steps(self.run_id)
        changed = [s for s in rows if s["status"] in ("done", "applying", "reverting")
                   or (s["kind"] == "backfill" and s["status"] in ("running", "failed"))]
        return sorted(changed, key=lambda s: s["idx"], reverse=True)

    def _resolve_strategy(self, changed: list[dict[str, Any]]) -> None:
        """auto: reverse, unless reversing is impossible (the file is gone, or a step that
        changed something has no inverse) and a verified snapshot exists."""
        if self.requested != "auto" or not changed:
            return
        problem = None
        if self.migration is None:
            problem = f"the file of migration {self.run['migration_id']} is gone"
        else:
            for row in changed:
                step = self.migration.steps[row["idx"]]
                if not step.reversible:
                    problem = f"step {row['idx']} ({step.describe()}) is irreversible"
                    break
        if problem is not None and self._snapshot_records():
            self.strategy, self.why = "restore", f"reverse is impossible: {problem}"

    def prerequisites(self) -> RollbackPlan:
        if self.run["status"] == "rolled_back":
            unfinished = progress_of(self.journal, self.run_id)
            if unfinished is not None and unfinished.get("status") in ("running", "failed"):
                # interrupted in the service step, after the run was marked rolled back: the
                # data is the original, but maintenance mode is still on; `rollback` resumes it
                left = [s["name"] for s in unfinished["steps"] if s["status"] != "done"]
                action = (f"finish the interrupted rollback ({', '.join(left) or 'its journal'}); "
                          "the data is already rolled back")
                plan = RollbackPlan(self.run_id, self.run["migration_id"], unfinished["strategy"],
                                    [action], needs_backup=False, why=unfinished.get("why", ""),
                                    resumes=unfinished)
                plan.steps = [s for s in self._describe_steps(plan) if s[0] in left]
                return plan
            raise AlreadyRolledBack(
                f"run {self.run_id} ({self.run['migration_id']}) is already rolled back; nothing to do",
                "to roll back an earlier run, name it: safemigrate rollback --run ID",
            )
        later = [r for r in self.journal.runs() if r["started_at"] > self.run["started_at"]
                 and r["status"] in ("completed", "running", "interrupted", "failed", "rolling_back")]
        if later:
            raise UsageError(
                f"run {later[-1]['id']} ({later[-1]['migration_id']}) came after run {self.run_id}",
                f"roll back the later run first: safemigrate rollback --run {later[-1]['id']}",
            )
        changed = self._changed_steps()
        self._resolve_strategy(changed)
        actions: list[str] = []
        if self.strategy == "reverse" and changed:
            if self.migration is None:
                raise IrreversibleError(
                    f"the file of migration {self.run['migration_id']} is gone or changed",
                )
            for row in changed:
                step = self.migration.steps[row["idx"]]
                if not step.reversible:
                    raise IrreversibleError(f"step {row['idx']} ({step.describe()}) is irreversible")
                if isinstance(step, Backfill):
                    columns = row["state"].get("columns") or []
                    actions.append(f"restore {step.table}({', '.join(columns)}) from the shadow copy"
                                   if columns else f"nothing to restore for {step.describe()} "
                                   "(its columns are new)")
                else:
                    actions.extend(step.inverse_sql(self.dialect, row["state"]))
        elif self.strategy == "restore" and changed:
            snapshot = self._snapshot_record()
            baseline = self.run["baseline"]
            actions.append(f"restore {', '.join(baseline['tables'])} from {snapshot['location']}")
            if baseline["created"]:
                actions.append(f"drop {', '.join(baseline['created'])}")
        plan = RollbackPlan(self.run_id, self.run["migration_id"], self.strategy, actions,
                            needs_backup=bool(changed), why=self.why)
        plan.steps = self._describe_steps(plan)
        return plan

    def _describe_steps(self, plan: RollbackPlan) -> list[tuple[str, str]]:
        baseline = self.run.get("baseline") or {}
        tables = ", ".join(baseline.get("tables") or []) or "none"
        layer = ("none needed: the run changed nothing" if not plan.needs_backup
                 else "the shadow copies of the backfilled columns" if plan.strategy == "reverse"
                 else "the verified snapshot")
        return [
            ("prerequisites", f"strategy {plan.strategy} ({plan.why}); backup layer: {layer}; "
                              "the run lock (a running migration is asked to stop first)"),
            ("stop_writes", "degradation level maintenance until the rollback ends"),
            ("backup", "pre-rollback snapshot of the whole database" if plan.needs_backup
             else "skipped: nothing to save"),
            ("perform", "; ".join(plan.actions) or "nothing to undo"),
            ("rebuild", f"rebuild indexes and ANALYZE: {tables}"),
            ("version", f"unmark {self.run['migration_id']}; record {SCHEMA_VERSION_KEY}"),
            ("validate", "integrity, foreign keys, schema and content digests, smoke checks, "
                         "canaries, [rollback] checks"),
            ("service", "previous degradation level back; on-rollback hooks"),
        ]

    def _snapshot_records(self) -> list[dict[str, Any]]:
        return [b for b in self.journal.backups(self.run_id, kind="snapshot")
                if b["status"] == "verified"]

    def _snapshot_record(self) -> dict[str, Any]:
        records = self._snapshot_records()
        if not records:
            raise BackupError(f"run {self.run_id} has no verified snapshot to restore from",
                              "use --strategy reverse")
        return records[-1]

    def _check_backup_layer(self, needs_backup: bool) -> str:
        """The backup layer the strategy needs exists and verifies."""
        if not needs_backup:
            return "no backup layer needed (the run changed nothing)"
        if self.strategy == "restore":
            record = self._snapshot_record()
            verify_backup_record(self.dialect, record)
            return f"snapshot {Path(record['location']).name} verified (sha256 {record['sha256'][:12]})"
        assert self.migration is not None
        found = []
        expected = self._shadow_rows_recorded()
        with self.dialect.engine.connect() as conn:
            inspector = sa.inspect(conn)
            for row in self._changed_steps():
                step = self.migration.steps[row["idx"]]
                if isinstance(step, Backfill) and row["state"].get("columns"):
                    name = shadow_name(self.run_id, row["idx"])
                    if not inspector.has_table(name):
                        raise BackupError(f"the shadow copy {name} of step {row['idx']} is missing",
                                          "roll back with --strategy restore (from the snapshot)")
                    rows = conn.execute(sa.select(sa.func.count()).select_from(sa.table(name))).scalar()
                    if name in expected and rows != expected[name]:
                        raise BackupError(
                            f"the shadow copy {name} of step {row['idx']} holds {rows} rows, "
                            f"the backup manifest says {expected[name]}: it was damaged",
                            "roll back with --strategy restore (from the snapshot)")
                    compared = "as recorded" if name in expected else "no manifest left to compare"
                    found.append(f"{name} ({rows} rows, {compared})")
        return "shadow copies present: " + (", ".join(found) or "none needed (new columns only)")

    def _shadow_rows_recorded(self) -> dict[str, int]:
        """Row counts the run's backup manifests recorded for its shadow copies. A shadow copy is
        written once, before the backfill, so any other count means it was damaged since."""
        expected: dict[str, int] = {}
        for record in self.journal.backups(self.run_id, kind="snapshot"):
            path = manifest_path_for(record["location"])
            try:
                manifest = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # no manifest left: the shadow is checked for presence only
            for layer in layers_of(manifest):
                if layer["layer"] == "shadow" and layer.get("rows") is not None:
                    expected[str(layer.get("location", "")).removeprefix("table ")] = int(layer["rows"])
        return expected

    # -- progress (the journal entry rollback:<run_id>) ------------------------------------------
    def _save(self) -> None:
        if self._persist:
            self.journal.set_state(PROGRESS_KEY.format(run_id=self.run_id), self.progress)

    def _entry(self, name: str) -> dict[str, Any]:
        return next(s for s in self.progress["steps"] if s["name"] == name)

    def _mark(self, name: str, status: str, details: str = "") -> None:
        entry = self._entry(name)
        now = time.time()
        entry["status"] = status
        if status == "running":
            entry["started"], entry["finished"] = now, None
        else:
            entry["finished"] = now
        if details or status != "running":
            entry["details"] = details
        if name == "prerequisites" and status == "done":
            self._persist = True
        self._save()
        if self._persist:
            level = {"failed": "error"}.get(status, "info")
            self.journal.event(self.run_id, f"rollback.step.{status}",
                               f"rollback step {STEPS.index(name) + 1} {name} {status}"
                               + (f": {details}" if details else ""), level=level,
                               data={"step": name, "status": status, "details": details,
                                     "attempt": self.progress["attempt"]})
        self.emit("rollback.step", f"{name}: {status}" + (f" — {details}" if details else ""),
                  "error" if status == "failed" else "info", step=name, status=status)

    def _saved_facts(self) -> dict[str, Any]:
        """What the journal says before any change, to put back if the rollback is undone."""
        with self.dialect.engine.connect() as conn:
            row = conn.execute(sa.select(applied).where(
                applied.c.migration_id == self.run["migration_id"])).mappings().first()
        return {"run_status": self.run["status"], "run_error": self.run.get("error"),
                "steps": {str(s["idx"]): s["status"] for s in self.journal.steps(self.run_id)},
                "applied": dict(row) if row is not None and row["run_id"] == self.run_id else None,
                "schema_version": self.journal.get_state(SCHEMA_VERSION_KEY)}

    def _begin(self) -> bool:
        """Resume the interrupted attempt, or start a new one. True when resuming."""
        previous = progress_of(self.journal, self.run_id)
        if previous is not None and previous.get("status") in ("running", "failed"):
            self.progress = previous
            self.strategy = previous["strategy"]
            self.why = previous.get("why", "")
            self.progress.update(status="running", error=None)
            self._persist = True
            self._save()
            done = [s["name"] for s in previous["steps"] if s["status"] == "done"]
            self.journal.event(self.run_id, "rollback.resumed",
                               f"resuming the rollback of run {self.run_id} (attempt "
                               f"{previous['attempt']}): steps done: {', '.join(done) or 'none'}",
                               level="warning", data={"done": done, "reason": self.reason})
            self.emit("rollback.resumed", f"resuming the rollback of run {self.run_id}", "warning",
                      done=done)
            return True
        if self.run["status"] == "rolled_back":
            self.prerequisites()  # raises AlreadyRolledBack
        attempts = list((previous or {}).get("attempts") or [])
        if previous is not None:
            attempts.append({k: previous.get(k) for k in
                             ("attempt", "status", "strategy", "started", "finished", "error",
                              "backup", "recovered")})
        self.progress = {
            "run_id": self.run_id, "migration_id": self.run["migration_id"],
            "attempt": len(attempts) + 1, "status": "running", "requested": self.requested,
            "strategy": self.strategy, "why": self.why, "reason": self.reason,
            "started": time.time(), "finished": None, "error": None,
            "steps": [{"name": n, "title": STEP_TITLES[n], "status": "pending", "started": None,
                       "finished": None, "details": ""} for n in STEPS],
            "needs_backup": None, "actions": [], "backup": None, "backup_tables": [],
            "previous_level": (previous or {}).get("previous_level"), "saved": None,
            "checks": [], "recovered": None, "attempts": attempts,
        }
        self._persist = False  # written once the prerequisites hold: a refusal writes nothing
        return False

    # -- execution -------------------------------------------------------------------------------
    def execute(self) -> RollbackResult:
        started = time.time()
        self._begin()
        result = RollbackResult(self.run_id, self.run["migration_id"], self.strategy, "running",
                                attempt=self.progress["attempt"])
        for name in STEPS:
            if self._entry(name)["status"] == "done":
                continue
            self._mark(name, "running")
            try:
                fault(f"rollback.{name}")
                details = getattr(self, f"_step_{name}")(result)
            except BaseException as exc:  # noqa: BLE001 - journaled, recovered from, re-raised
                self._on_failure(name, exc)
                raise
            self._mark(name, "done", details)
        self.progress.update(status="completed", finished=time.time())
        self._save()
        result.status = "rolled_back"
        result.strategy = self.strategy
        result.seconds = time.time() - started
        result.pre_rollback_backup = self.progress.get("backup")
        result.steps = [dict(s) for s in self.progress["steps"]]
        if not result.checks:
            result.checks = [CheckResult(**c) for c in self.progress.get("checks") or []]
        return result

    def _step_prerequisites(self, result: RollbackResult) -> str:
        plan = self.prerequisites()
        layer = self._check_backup_layer(plan.needs_backup)
        self.progress.update(strategy=self.strategy, why=self.why, needs_backup=plan.needs_backup,
                             actions=plan.actions, saved=self._saved_facts())
        result.strategy = self.strategy
        self.journal.update_run(None, self.run_id, status="rolling_back")
        self.emit("rollback.started", f"rolling back run {self.run_id} ({self.strategy}): "
                  f"{self.reason}", "warning", strategy=self.strategy, reason=self.reason,
                  actions=plan.actions, why=self.why, attempt=self.progress["attempt"])
        stopper = ("a running migration was stopped through the control channel "
                   f"(run {self.stopped.get('run_id')}, pid {self.stopped.get('pid')})"
                   if self.stopped else "the run lock is ours")
        return f"strategy {self.strategy} ({self.why}); {len(plan.actions)} actions; {layer}; {stopper}"

    def _step_stop_writes(self, result: RollbackResult) -> str:
        from .degrade import DegradationManager

        manager = DegradationManager(self.m)
        before = manager.status()
        if self.progress.get("previous_level") is None:
            self.progress["previous_level"] = {"level": before.level, "reason": before.reason}
            self._save()
        manager.set_level("maintenance", f"rollback of run {self.run_id}: {self.reason}",
                          run_id=self.run_id)
        runner = (f"migration run {self.stopped.get('run_id')} stopped through the control channel"
                  if self.stopped else "no other migration running")
        return f"maintenance mode on (was {before.level}); {runner}"

    def _step_backup(self, result: RollbackResult) -> str:
        """Invariant 5: save the current state first (once per attempt)."""
        if not self.progress.get("needs_backup"):
            return "nothing to save: the run changed nothing"
        existing = self.progress.get("backup")
        if existing and Path(existing).exists():
            return f"pre-rollback snapshot {existing} (taken before the interruption)"
        snapshot = take_snapshot(self.dialect, self.journal, self.m.settings.backup_dir,
                                 run_id=self.run_id, kind="pre-rollback",
                                 label=f"pre-rollback-{self.run['migration_id']}")
        self.progress.update(backup=str(snapshot.path), backup_tables=sorted(snapshot.digests))
        self._save()
        self.journal.event(self.run_id, "backup.pre_rollback",
                           f"current state saved to {snapshot.path} before rollback",
                           data={"sha256": snapshot.sha256})
        self.emit("backup.verified", f"pre-rollback snapshot {snapshot.path.name} verified")
        return f"pre-rollback snapshot {snapshot.path} verified (sha256 {snapshot.sha256[:12]})"

    def _step_perform(self, result: RollbackResult) -> str:
        if not self.progress.get("needs_backup"):
            return "nothing to undo"
        done = self._reverse() if self.strategy == "reverse" else self._restore()
        return "; ".join(done) or "nothing left to undo"

    def _step_rebuild(self, result: RollbackResult) -> str:
        baseline = self.run.get("baseline") or {}
        with self.dialect.engine.begin() as conn:
            existing = set(self.dialect.user_tables(conn))
            tables = [t for t in baseline.get("tables") or [] if t in existing]
            statements = []
            for table in tables:
                for sql in self.dialect.rebuild_indexes_sql(conn, table):
                    conn.exec_driver_sql(sql)
                    statements.append(sql)
        self.m.dialect_analyze(tables)
        if not tables:
            return "no affected table to rebuild"
        return (f"{'; '.join(statements) or 'indexes kept valid by the engine'}; "
                f"statistics refreshed: {', '.join(tables)}")

    def _step_version(self, result: RollbackResult) -> str:
        with self.dialect.engine.begin() as conn:
            if self._is_applied(conn):
                self.journal.unmark_applied(conn, self.run["migration_id"])
            ids = [r[0] for r in conn.execute(sa.select(applied.c.migration_id)
                                              .order_by(applied.c.migration_id))]
            version = ids[-1] if ids else None
            value = {"version": version, "rolled_back": self.run["migration_id"],
                     "run_id": self.run_id, "at": time.time()}
            self.journal.set_state(SCHEMA_VERSION_KEY, value, conn=conn)
            self.journal.event(self.run_id, "rollback.version",
                               f"database version is {version or 'the original (none applied)'} "
                               f"again ({self.run['migration_id']} no longer applied)",
                               data=value, conn=conn)
        return f"{SCHEMA_VERSION_KEY} = {version or 'none (no migration applied)'}"

    def _step_validate(self, result: RollbackResult) -> str:
        from .rollback_validate import RollbackValidator

        run = self.journal.run(self.run_id) or self.run
        checks = RollbackValidator(self.m, run, self.migration, self.strategy).validate()
        for check in checks:
            self.journal.event(self.run_id, "rollback.check",
                               f"{check.name}: {'passed' if check.passed else 'FAILED'} "
                               f"{check.details}", level="info" if check.passed else "error",
                               data=check.as_dict())
        result.checks = checks
        self.progress["checks"] = [c.as_dict() for c in checks]
        self._save()
        bad = failed(checks)
        if bad:
            summary = "; ".join(f"{r.name}: {r.details}" for r in bad)
            self.journal.event(self.run_id, "rollback.unproven", summary, level="critical")
            raise RollbackError(f"the rolled-back database does not validate: {summary}")
        return f"{len(checks)} checks passed: {', '.join(c.name for c in checks)}"

    def _step_service(self, result: RollbackResult) -> str:
        from .degrade import DegradationManager

        self._finish()
        manager = DegradationManager(self.m)
        now = manager.status()
        previous = self.progress.get("previous_level") or {"level": "normal"}
        if now.level == "maintenance" and now.run_id == self.run_id:
            note = f"rollback of run {self.run_id} completed"
            if previous.get("reason") and previous["level"] != "normal":
                note += f" (restoring: {previous['reason']})"
            manager.set_level(previous["level"], note, run_id=self.run_id)
            level = f"maintenance mode off (back to {previous['level']})"
        else:
            level = f"degradation level left at {now.level} (set by {now.by} meanwhile)"
        hooks = self.m.outputs.hooks
        before = len(hooks.results)
        self.emit("rollback.completed", f"run {self.run_id} rolled back ({self.strategy})",
                  "warning", strategy=self.strategy, attempt=self.progress["attempt"])
        ran = hooks.results[before:]
        bad = [r for r in ran if not r.ok]
        return f"{level}; on-rollback hooks: {len(ran)} run, {len(bad)} failed"

    # -- failure and recovery --------------------------------------------------------------------
    def _on_failure(self, name: str, exc: BaseException) -> None:
        """Journal the failed step; after step 4 or 7 restore the pre-rollback backup; raise the
        emergency. Raises the error the caller should see (or lets `exc` through)."""
        if isinstance(exc, SafeMigrateError):
            message = exc.message
        elif isinstance(exc, sa.exc.DBAPIError):
            message = self.dialect.translate_error(exc).message
        else:
            message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        self.progress.update(status="failed", error=f"{name}: {message}")
        self._mark(name, "failed", message)
        if not self._persist:  # prerequisites refused: nothing was written, nothing to recover
            return
        if not isinstance(exc, Exception):
            return  # KeyboardInterrupt & co: the journal says where; `rollback` resumes
        recovered = None
        if name in RECOVERED_FROM and self._changed_anything(name):
            try:
                recovered = self._recover()
            except Exception as rexc:  # noqa: BLE001 - the worst case: say so loudly
                why = rexc.message if isinstance(rexc, SafeMigrateError) else f"{type(rexc).__name__}: {rexc}"
                self._emergency(name, message, f"recovery FAILED: {why}")
                raise RollbackError(
                    f"rollback step {name} failed ({message}) and restoring the pre-rollback "
                    f"backup failed too ({why})",
                    f"do not write to the database; maintenance mode stays on; restore "
                    f"{self.progress.get('backup')} by hand",
                ) from None
        if recovered is not None:
            self._emergency(name, message, recovered)
            # Reversing through the table can fire the application's triggers; restoring the
            # verified snapshot does not replay anything, so it is the way out to offer.
            other = (" or `safemigrate rollback --strategy restore` (from the verified snapshot)"
                     if self.strategy == "reverse" and self._snapshot_records() else "")
            raise RollbackError(
                f"rollback step {name} failed: {message}; recovered: the database is back at its "
                f"state before the rollback ({recovered})",
                f"maintenance mode stays on: fix the cause, then `safemigrate rollback` again{other} "
                "(`safemigrate degrade off` reopens the application meanwhile)",
            ) from None
        changed = STEPS.index(name) > STEPS.index("perform")
        self._emergency(name, message, "the data is rolled back" if changed else "nothing was changed")
        state = ("the data is rolled back; `safemigrate rollback` resumes at this step"
                 if changed else "nothing was changed; `safemigrate rollback` resumes")
        raise RollbackError(f"rollback step {name} failed: {message}",
                            f"{state}; maintenance mode stays on until it completes") from None

    def _changed_anything(self, name: str) -> bool:
        if name == "validate" or self.strategy == "restore":
            return True
        saved = (self.progress.get("saved") or {}).get("steps") or {}
        now = {str(s["idx"]): s["status"] for s in self.journal.steps(self.run_id)}
        return now != saved

    def _recover(self) -> str:
        """Put the pre-rollback backup back: the tables the rollback touched, then the journal
        facts (steps, run status, applied row, version), then the change capture."""
        path = self.progress.get("backup")
        if not path or not Path(path).exists():
            raise RollbackError(f"the pre-rollback backup {path or '(none)'} is missing")
        baseline = self.run.get("baseline") or {"tables": [], "created": []}
        in_backup = set(self.progress.get("backup_tables") or [])
        tables = [t for t in baseline["tables"] + baseline["created"] if t in in_backup]
        drop = [t for t in baseline["created"] if t not in in_backup]
        self.dialect.restore_tables(Path(path), tables, drop)
        problems = []
        with self.dialect.engine.connect() as live, self.dialect.snapshot_reader(Path(path)) as snap:
            for table in tables:
                if table_digest(live, table) != table_digest(snap, table):
                    problems.append(table)
        if problems:
            raise RollbackError(f"after restoring the pre-rollback backup, {', '.join(problems)} "
                                "still differ from it")
        saved = self.progress.get("saved") or {}
        with self.dialect.engine.begin() as conn:
            for idx, status in (saved.get("steps") or {}).items():
                conn.execute(steps_table.update().where(
                    steps_table.c.run_id == self.run_id, steps_table.c.idx == int(idx))
                    .values(status=status, updated_at=time.time()))
            conn.execute(runs.update().where(runs.c.id == self.run_id).values(
                status=saved.get("run_status") or self.run["status"],
                error=saved.get("run_error"), updated_at=time.time()))
            row = saved.get("applied")
            if row is not None and not self._is_applied(conn):
                conn.execute(applied.insert().values(**row))
            self.journal.set_state(SCHEMA_VERSION_KEY, saved.get("schema_version"), conn=conn)
        captures = capture.load(self.journal, self.run_id)
        if captures and self.migration is not None and saved.get("run_status") != "completed":
            written = self.migration.written_columns()
            for cap in captures:
                capture.install(self.dialect, self.run_id, cap.table, written.get(cap.table, set()))
        detail = f"{', '.join(tables) or 'no tables'} restored from {path} and proven equal"
        self.progress.update(status="recovered", finished=time.time(),
                             recovered={"at": time.time(), "backup": path, "tables": tables})
        self._save()
        self.journal.event(self.run_id, "rollback.recovered", detail, level="critical",
                           data={"backup": path, "tables": tables, "dropped": drop})
        return detail

    def _emergency(self, name: str, message: str, outcome: str) -> None:
        """The rollback itself failed: a critical event (notified on every channel)."""
        text = (f"EMERGENCY: rollback of run {self.run_id} ({self.run['migration_id']}) failed at "
                f"step {name}: {message}; {outcome}; the application stays in maintenance mode")
        self.journal.event(self.run_id, "rollback.failed", text, level="critical",
                           data={"step": name, "error": message, "outcome": outcome})
        self.emit("emergency", text, "critical", step=name, error=message, outcome=outcome,
                  reason=self.reason)

    # -- the operations --------------------------------------------------------------------------
    def _reverse(self) -> list[str]:
        assert self.migration is not None
        done = []
        for row in self._changed_steps():
            step = self.migration.steps[row["idx"]]
            if not isinstance(step, Backfill):
                detail = run_schema_step(self.dialect, self.journal, self.run_id, row["idx"], step,
                                         row, revert=True)
                self.emit("rollback.step", detail, step=row["idx"])
                done.append(detail)
                continue
            with self.dialect.engine.begin() as conn:
                columns = row["state"].get("columns") or []
                restored = restore_from_shadow(conn, self.run_id, row["idx"], step.table, columns)
                detail = (f"restored {restored} rows of {step.table}({', '.join(columns)})"
                          if columns else f"{step.describe()}: its columns are new, "
                          "dropped with them")
                self.journal.update_step(conn, self.run_id, row["idx"], status="reverted")
                self.journal.event(self.run_id, "rollback.step", detail,
                                   data={"step": row["idx"]}, conn=conn)
            self.emit("rollback.step", detail, step=row["idx"])
            done.append(detail)
        return done

    def _export_application_changes(self, snapshot: Path, location: Path) -> Path | None:
        """Rows the application inserted, changed or deleted since the snapshot, as JSON lines
        beside the backup (`location`; `snapshot` is its plain file): the restore is about to
        replace them (they are also in the pre-rollback backup; this file lists just them).

        A row that differs only in columns the migration's backfills write is the migration's
        own change, not the application's, and is left out (the capture triggers draw the same
        line). Without the migration file every difference is exported."""
        baseline = self.run["baseline"]
        written = self.migration.written_columns() if self.migration is not None else {}
        name = location.name.removesuffix(".zst")
        target = location.with_name(f"{Path(name).stem}.application-changes.jsonl")
        count = 0
        with self.dialect.engine.connect() as live, self.dialect.snapshot_reader(snapshot) as snap:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                for table in baseline["tables"]:
                    t = reflect(live, table)
                    pk = list(t.primary_key.columns)
                    for key, kind, cols in row_differences(live, snap, table):
                        if kind == "changed" and not cols - written.get(table, set()):
                            continue  # only the migration's columns differ
                        row = None
                        if kind != "deleted" and pk:
                            match = sa.and_(*[c == v for c, v in zip(pk, key, strict=True)])
                            found = live.execute(sa.select(t).where(match)).mappings().first()
                            row = dict(found) if found else None
                        out.write(json.dumps({"table": table, "key": list(key), "change": kind,
                                              "columns": sorted(cols), "row": row},
                                             default=str) + "\n")
                        count += 1
        if not count:
            target.unlink()
            return None
        self.journal.event(self.run_id, "rollback.exported",
                           f"{count} rows changed by the application exported to {target}",
                           level="warning", data={"file": str(target), "rows": count})
        return target

    def _restore(self) -> list[str]:
        baseline = self.run["baseline"]
        snapshot = self._snapshot_record()
        with plain_snapshot(self.dialect, snapshot["location"]) as path:  # decompressed if need be
            assert path is not None
            exported = self._export_application_changes(path, Path(snapshot["location"]))
            self.dialect.restore_tables(path, baseline["tables"], baseline["created"])
        changed = self._changed_steps()  # read before BEGIN IMMEDIATE: its own connection would wait
        with self.dialect.engine.begin() as conn:
            for row in changed:
                self.journal.update_step(conn, self.run_id, row["idx"], status="reverted")
            self.journal.event(self.run_id, "rollback.restore",
                               f"restored {', '.join(baseline['tables'])} from {snapshot['location']}",
                               conn=conn)
        self.emit("rollback.step", f"restored {', '.join(baseline['tables'])} from the snapshot")
        done = [f"restored {', '.join(baseline['tables'])} from {snapshot['location']}"]
        if baseline["created"]:
            done.append(f"dropped {', '.join(baseline['created'])}")
        if exported is not None:
            done.append(f"application changes exported to {exported}")
        return done

    def _finish(self) -> None:
        capture.forget(self.journal, self.dialect, self.run_id)
        with self.dialect.engine.begin() as conn:
            for row in self.journal.steps(self.run_id, conn):
                if row["kind"] == "backfill":
                    drop_shadow(conn, self.run_id, row["idx"])
            if self._is_applied(conn):
                self.journal.unmark_applied(conn, self.run["migration_id"])
            conn.execute(runs.update().where(runs.c.id == self.run_id).values(
                status="rolled_back", finished_at=time.time(), updated_at=time.time()))
            self.journal.event(self.run_id, "rollback.completed",
                               f"run {self.run_id} rolled back ({self.strategy})", conn=conn)

    def _is_applied(self, conn: sa.Connection) -> bool:
        row = conn.execute(sa.select(applied.c.run_id).where(
            applied.c.migration_id == self.run["migration_id"])).first()
        return row is not None and row.run_id == self.run_id


def migration_for_run(migrations: list[Migration], run: dict[str, Any]) -> Migration | None:
    """The migration file a run executed, only if it is unchanged since."""
    for migration in migrations:
        if migration.id == run["migration_id"]:
            if migration.checksum != run["checksum"]:
                raise ChecksumMismatchError(
                    f"migration {migration.id} was edited after run {run['id']}",
                    "restore the file, or use `safemigrate rollback --strategy restore`",
                )
            return migration
    return None


def stop_live_runner(m: Migrator, *, reason: str, timeout: float,
                     poll: float = 0.2) -> dict[str, Any] | None:
    """Ask a live `safemigrate run` to stop through the control channel (an abort: it
    checkpoints its batch and exits) and wait up to `timeout` seconds for its lock. Returns the
    holder that was stopped, or None when no migration was running (a dead runner's lock is
    taken over by the caller)."""
    from ._exceptions import LockHeldError
    from .control import live_holder, update_control, who

    holder = live_holder(m.journal, m.settings.lock_stale_after)
    if holder is None or holder["purpose"] != "run":
        return None
    update_control(m.journal, abort={"run_id": holder.get("run_id"), "by": who(),
                                     "reason": reason, "at": time.time()})
    m.journal.event(holder.get("run_id"), "control.abort",
                    f"the rollback asks the running migration (pid {holder['pid']}) to stop: {reason}",
                    level="warning", data={"by": who(), "reason": reason, "pid": holder["pid"]})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if live_holder(m.journal, m.settings.lock_stale_after) is None:
            return holder
        time.sleep(poll)
    raise LockHeldError(
        f"the running migration (run {holder.get('run_id') or '-'}, pid {holder['pid']} on "
        f"{holder['hostname']}) did not stop within {timeout:g}s",
        "see `safemigrate status`; raise [rollback] stop_timeout, or stop the process",
    )
