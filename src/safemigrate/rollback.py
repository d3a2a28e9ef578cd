"""Rollback: back to exactly the state the run started from, and proof that it is.

Reverse strategy: undo the steps in reverse order (backfilled columns from the shadow copy,
added objects dropped). Restore strategy: replace the affected tables from the verified
snapshot. Either way the current state is saved first, every step is journaled and resumable,
and the result must equal the pre-migration schema and content digests.
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
    UsageError,
)
from .backup import plain_snapshot, take_snapshot, verify_backup_record
from .ddl import run_schema_step
from .digest import reflect, row_differences
from .events import Event
from .journal import runs
from .migration import Migration
from .shadow import drop_shadow, restore_from_shadow
from .steps import Backfill
from .validate import CheckResult, failed, integrity, schema_and_content

if TYPE_CHECKING:
    from .migrator import Migrator

STRATEGIES = ("reverse", "restore")


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


class RollbackExecutor:
    def __init__(self, migrator: Migrator, run: dict[str, Any], migration: Migration | None,
                 strategy: str, reason: str) -> None:
        if strategy not in STRATEGIES:
            raise UsageError(f"unknown rollback strategy {strategy!r}", "use reverse or restore")
        self.m = migrator
        self.run = run
        self.run_id = run["id"]
        self.migration = migration
        self.strategy = strategy
        self.reason = reason
        self.dialect = migrator.dialect
        self.journal = migrator.journal

    def emit(self, kind: str, message: str, level: str = "info", **data: Any) -> None:
        self.m.bus.emit(Event(kind, message, self.run_id, level, data))

    # -- prerequisites and plan ------------------------------------------------------------------
    def _changed_steps(self) -> list[dict[str, Any]]:
        """Steps that changed something, newest first: done, or a backfill that started."""
        rows = self.journal.steps(self.run_id)
        changed = [s for s in rows if s["status"] in ("done", "applying", "reverting")
                   or (s["kind"] == "backfill" and s["status"] in ("running", "failed"))]
        return sorted(changed, key=lambda s: s["idx"], reverse=True)

    def prerequisites(self) -> RollbackPlan:
        if self.run["status"] == "rolled_back":
            raise AlreadyRolledBack(
                f"run {self.run_id} ({self.run['migration_id']}) is already rolled back; nothing to do",
                "to roll back an earlier run, name it: safemigrate rollback --run ID",
            )
        later = [r for r in self.journal.runs() if r["started_at"] > self.run["started_at"]
                 and r["status"] in ("completed", "running", "interrupted", "failed")]
        if later:
            raise UsageError(
                f"run {later[-1]['id']} ({later[-1]['migration_id']}) came after run {self.run_id}",
                f"roll back the later run first: safemigrate rollback --run {later[-1]['id']}",
            )
        changed = self._changed_steps()
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
        return RollbackPlan(self.run_id, self.run["migration_id"], self.strategy, actions,
                            needs_backup=bool(changed))

    def _snapshot_record(self) -> dict[str, Any]:
        records = [b for b in self.journal.backups(self.run_id, kind="snapshot")
                   if b["status"] == "verified"]
        if not records:
            raise BackupError(f"run {self.run_id} has no verified snapshot to restore from",
                              "use --strategy reverse")
        return records[-1]

    # -- execution -------------------------------------------------------------------------------
    def execute(self) -> RollbackResult:
        started = time.time()
        plan = self.prerequisites()
        if self.strategy == "restore" and plan.needs_backup:
            verify_backup_record(self.dialect, self._snapshot_record())
        result = RollbackResult(self.run_id, self.run["migration_id"], self.strategy, "running")
        self.journal.update_run(None, self.run_id, status="rolling_back")
        self.journal.event(self.run_id, "rollback.started", f"rollback ({self.strategy}): {self.reason}",
                           level="warning", data={"strategy": self.strategy, "reason": self.reason,
                                                  "actions": plan.actions})
        self.emit("rollback.started", f"rolling back run {self.run_id}: {self.reason}", "warning",
                  strategy=self.strategy)
        if plan.needs_backup:
            result.pre_rollback_backup = self._pre_rollback_backup()
            if self.strategy == "reverse":
                self._reverse()
            else:
                self._restore()
            result.checks = self._prove()
            bad = failed(result.checks)
            if bad:
                summary = "; ".join(f"{r.name}: {r.details}" for r in bad)
                self.journal.event(self.run_id, "rollback.unproven", summary, level="critical")
                raise RollbackError(f"rollback of run {self.run_id} could not be proven: {summary}")
        self._finish()
        result.status = "rolled_back"
        result.seconds = time.time() - started
        self.emit("rollback.completed", f"run {self.run_id} rolled back ({self.strategy})",
                  "warning", seconds=result.seconds)
        return result

    def _pre_rollback_backup(self) -> str:
        """Invariant 5: save the current state first (once, even across a resumed rollback)."""
        for record in self.journal.backups(self.run_id, kind="pre-rollback"):
            if record["status"] == "verified" and Path(record["location"]).exists():
                return record["location"]
        snapshot = take_snapshot(self.dialect, self.journal, self.m.settings.backup_dir,
                                 run_id=self.run_id, kind="pre-rollback",
                                 label=f"pre-rollback-{self.run['migration_id']}")
        self.journal.event(self.run_id, "backup.pre_rollback",
                           f"current state saved to {snapshot.path} before rollback",
                           data={"sha256": snapshot.sha256})
        self.emit("backup.verified", f"pre-rollback snapshot {snapshot.path.name} verified")
        return str(snapshot.path)

    def _reverse(self) -> None:
        assert self.migration is not None
        for row in self._changed_steps():
            step = self.migration.steps[row["idx"]]
            if not isinstance(step, Backfill):
                detail = run_schema_step(self.dialect, self.journal, self.run_id, row["idx"], step,
                                         row, revert=True)
                self.emit("rollback.step", detail, step=row["idx"])
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

    def _export_application_changes(self, snapshot: Path) -> Path | None:
        """Rows the application inserted or changed since the snapshot, as JSON lines beside
        the backup: the restore is about to replace them (they are also in the pre-rollback
        backup; this file lists just them)."""
        baseline = self.run["baseline"]
        target = snapshot.with_name(f"{snapshot.stem}.application-changes.jsonl")
        count = 0
        with self.dialect.engine.connect() as live, self.dialect.snapshot_reader(snapshot) as snap:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                for table in baseline["tables"]:
                    t = reflect(live, table)
                    pk = list(t.primary_key.columns)
                    for key, kind, _cols in row_differences(live, snap, table):
                        row = None
                        if kind != "deleted" and pk:
                            match = sa.and_(*[c == v for c, v in zip(pk, key, strict=True)])
                            found = live.execute(sa.select(t).where(match)).mappings().first()
                            row = dict(found) if found else None
                        out.write(json.dumps({"table": table, "key": list(key), "change": kind,
                                              "row": row}, default=str) + "\n")
                        count += 1
        if not count:
            target.unlink()
            return None
        self.journal.event(self.run_id, "rollback.exported",
                           f"{count} rows changed by the application exported to {target}",
                           level="warning", data={"file": str(target), "rows": count})
        return target

    def _restore(self) -> None:
        baseline = self.run["baseline"]
        snapshot = self._snapshot_record()
        with plain_snapshot(self.dialect, snapshot["location"]) as path:  # decompressed if need be
            assert path is not None
            self._export_application_changes(path)
            self.dialect.restore_tables(path, baseline["tables"], baseline["created"])
        changed = self._changed_steps()  # read before BEGIN IMMEDIATE: its own connection would wait
        with self.dialect.engine.begin() as conn:
            for row in changed:
                self.journal.update_step(conn, self.run_id, row["idx"], status="reverted")
            self.journal.event(self.run_id, "rollback.restore",
                               f"restored {', '.join(baseline['tables'])} from {snapshot['location']}",
                               conn=conn)
        self.emit("rollback.step", f"restored {', '.join(baseline['tables'])} from the snapshot")

    def _prove(self) -> list[CheckResult]:
        baseline = self.run["baseline"]
        snapshot = next((Path(b["location"]) for b in self.journal.backups(self.run_id, kind="snapshot")
                         if b["id"] == baseline.get("snapshot_id")), None)
        restored: dict[str, set[str]] = {}
        if self.strategy == "reverse" and self.migration is not None:
            for row in self.journal.steps(self.run_id):
                step = self.migration.steps[row["idx"]]
                if isinstance(step, Backfill) and row["state"].get("columns"):
                    restored.setdefault(step.table, set()).update(row["state"]["columns"])
        with plain_snapshot(self.dialect, snapshot) as path:  # decompressed if need be
            results = [integrity(self.dialect)] + schema_and_content(self.dialect, baseline, path,
                                                                     restored)
        for result in results:
            self.journal.event(self.run_id, "rollback.check",
                               f"{result.name}: {'passed' if result.passed else 'FAILED'} "
                               f"{result.details}", level="info" if result.passed else "error",
                               data=result.as_dict())
        return results

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
        from .journal import applied

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
