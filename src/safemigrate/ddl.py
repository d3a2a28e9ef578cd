"""Schema steps with their journal entries, on engines with and without transactional DDL.

Where DDL is transactional (SQLite, PostgreSQL) a step and its journal entry commit together.
Where it is not (MySQL, CREATE INDEX CONCURRENTLY) the intent is journaled first, the DDL runs
on its own, and the result is journaled after; a step found half-way ("applying"/"reverting")
is repaired by asking the database whether the change is there.
"""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa

from ._exceptions import SafeMigrateError
from .dialects import Dialect
from .journal import Journal
from .steps import Step

INTERRUPTED = ("applying", "reverting")
# A statement that gave up waiting for a lock never started: it is tried again after 0.5, 1, 2
# and 4 s (as pgroll does) before the step fails. Only a step of one statement: a later one of
# several cannot be retried without repeating the earlier ones.
LOCK_RETRIES = 4
LOCK_BACKOFF = 0.5


def run_schema_step(dialect: Dialect, journal: Journal, run_id: str, idx: int, step: Step,
                    row: dict[str, Any], *, revert: bool = False) -> str:
    """Apply (or revert) one schema step exactly once; return what was done, for the log."""
    target, interim = ("reverted", "reverting") if revert else ("done", "applying")
    detail = f"{'reverted' if revert else 'applied'}: {step.describe()}"
    action = step.revert if revert else step.apply
    state = row.get("state") or {}
    if dialect.transactional_ddl and not step.autocommit(dialect) and row["status"] not in INTERRUPTED:
        with dialect.engine.begin() as conn:
            if not revert:
                state = step.capture(conn, dialect)
            action(conn, dialect, state)
            journal.update_step(conn, run_id, idx, status=target, state=state,
                                finished_at=time.time())
            journal.event(run_id, f"step.{target}", detail,
                          data={"step": idx, "sql": step.sql(dialect)}, conn=conn)
        return detail
    already = False
    if row["status"] in INTERRUPTED:
        with dialect.engine.connect() as conn:
            step.repair(conn.execution_options(isolation_level="AUTOCOMMIT"), dialect)
            present = step.is_applied(conn, dialect)
        if present is None:
            raise SafeMigrateError(
                f"step {idx} ({step.describe()}) was interrupted between its SQL and its journal "
                "entry, and whether it took effect cannot be told",
                "inspect the database by hand; `safemigrate rollback --strategy restore` "
                "restores the tables from the verified snapshot",
            )
        already = (not present) if revert else present
    else:
        if not revert:
            with dialect.engine.begin() as conn:
                state = step.capture(conn, dialect)
        journal.update_step(None, run_id, idx, status=interim, state=state, started_at=time.time())
        journal.event(run_id, f"step.{interim}", f"{interim}: {step.describe()}", data={"step": idx})
    if not already:
        _run_alone(dialect, step, action, state, revert)
    journal.update_step(None, run_id, idx, status=target, finished_at=time.time())
    journal.event(run_id, f"step.{target}", detail, data={"step": idx, "repaired": already})
    return detail


def _run_alone(dialect: Dialect, step: Step, action: Any, state: dict[str, Any], revert: bool) -> None:
    """Run a step's SQL outside any transaction, retrying lock wait timeouts with backoff."""
    try:
        single = len(step.inverse_sql(dialect, state) if revert else step.sql(dialect)) <= 1
    except Exception:  # noqa: BLE001 - cannot count the statements: no retry
        single = False
    attempt = 0
    while True:
        try:
            with dialect.engine.connect() as conn:
                action(conn.execution_options(isolation_level="AUTOCOMMIT"), dialect, state)
            return
        except sa.exc.DBAPIError as exc:
            if not single or attempt >= LOCK_RETRIES or not dialect.is_lock_timeout(exc):
                raise
        time.sleep(LOCK_BACKOFF * 2 ** attempt)
        attempt += 1
