"""Proof that a migration (or a rollback) left the database as promised.

Every check runs even when another fails, and reports passed/failed with details, so the
operator sees the whole picture at once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .capture import Capture, changed_keys, drained_name
from .dialects import Dialect
from .digest import diff_digests, row_differences, table_digest
from .journal import Journal
from .migration import Migration
from .revalidate import Job, revalidate
from .steps import Backfill, RawSQL


@dataclass
class CheckResult:
    name: str
    passed: bool
    details: str = ""
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def timed(name: str, func: Callable[[], str]) -> CheckResult:
    """Run a check, turning an exception into a failed result with its message."""
    started = time.time()
    try:
        details = func()
        return CheckResult(name, True, details, time.time() - started)
    except Exception as exc:  # noqa: BLE001 - a failing check is a result, not a crash
        message = str(exc) or type(exc).__name__
        return CheckResult(name, False, message, time.time() - started)


def _call_check(func: Callable[[Connection], object], conn: Connection) -> str:
    result = func(conn)
    if result is False:
        raise AssertionError(f"{func.__name__} returned False")
    return "" if result in (None, True) else str(result)


def integrity(dialect: Dialect) -> CheckResult:
    def check() -> str:
        with dialect.engine.connect() as conn:
            problems = dialect.integrity_check(conn)
        if problems:
            raise AssertionError(f"{len(problems)} problems: {'; '.join(problems[:3])}")
        return "engine integrity check ok"
    return timed("integrity", check)


def smoke_checks(dialect: Dialect, migration: Migration) -> list[CheckResult]:
    """Each smoke check in its own transaction, always rolled back: they may write freely."""
    results = []
    for func in migration.smoke_checks:
        def run(func: Callable[[Connection], object] = func) -> str:
            with dialect.engine.connect() as conn:
                tx = conn.begin()
                try:
                    return _call_check(func, conn) or "ok"
                finally:
                    tx.rollback()
        results.append(timed(f"smoke:{func.__name__}", run))
    return results


def invariants(dialect: Dialect, migration: Migration) -> list[CheckResult]:
    results = []
    for func in migration.invariants:
        def run(func: Callable[[Connection], object] = func) -> str:
            with dialect.engine.connect() as conn:
                return _call_check(func, conn) or "holds"
        results.append(timed(f"invariant:{func.__name__}", run))
    return results


def untouched_columns(dialect: Dialect, migration: Migration, baseline: dict[str, Any],
                      captures: dict[str, Capture] | None = None,
                      snapshot: Path | None = None) -> CheckResult:
    """Invariant 4: every column the migration does not declare as written is unchanged.

    Rows the application changed meanwhile (from the change log) are left out on both sides:
    then the other side is the snapshot itself, digested without them. The log and the table
    are read in one snapshot transaction, so a write landing mid-check cannot slip between."""
    written = migration.written_columns()
    raw_tables = {t for s in migration.steps if isinstance(s, RawSQL) for t in s.tables()}
    captures = captures or {}

    def check() -> str:
        problems, compared, skipped = [], 0, 0
        with ExitStack() as stack:
            conn = stack.enter_context(dialect.engine.connect())
            conn = conn.execution_options(**dialect.snapshot_read_options)
            stack.enter_context(conn.begin())
            snap = None
            for table, before in baseline["digests"].items():
                if table in raw_tables:
                    continue
                columns = [c for c in before["columns"] if c not in written.get(table, set())]
                skip = changed_keys(conn, captures[table]) if table in captures else set()
                after = table_digest(conn, table, columns, skip)
                if skip and snapshot is not None:
                    snap = snap or stack.enter_context(dialect.snapshot_reader(snapshot))
                    expected = table_digest(snap, table, columns, skip)
                    skipped += len(skip)
                else:
                    expected = {"rows": before["rows"],
                                "columns": {c: before["columns"][c] for c in columns}}
                problems += [f"{table}: {p}" for p in diff_digests(expected, after)]
                compared += len(columns)
        if problems:
            raise AssertionError("; ".join(problems[:5]))
        extra = f" ({skipped} rows changed by the application compared apart)" if skipped else ""
        return f"{compared} columns in {len(baseline['digests'])} tables bit-for-bit unchanged{extra}"
    return timed("untouched-columns", check)


def _quarantined_keys(journal: Journal, run_id: str, step_idx: int) -> set[tuple[Any, ...]]:
    from .journal import quarantine

    with journal.engine.connect() as conn:
        rows = conn.execute(sa.select(quarantine.c.pk).where(
            quarantine.c.run_id == run_id, quarantine.c.step_idx == step_idx))
        return {tuple(json.loads(r[0])) for r in rows}


def backfill_rows(dialect: Dialect, journal: Journal, run_id: str, step_idx: int,
                  step: Backfill, existing_written: list[str], batch_size: int,
                  capture: Capture | None = None, *, workers: int = 1,
                  migration_path: Path | None = None) -> CheckResult:
    """Every row is migrated or quarantined; every migrated row passes the validator again;
    quarantined rows still hold their original values. With change capture, rows the
    application wrote are told apart: drained ones are checked like the others; those still
    waiting in the log are skipped here. The cleanup phase drains them (the triggers stay until
    then) and the drain validates every row it writes, re-read as stored in the same
    transaction as the write, failing the run like this check would (Runner._phase_cleanup)."""

    def check() -> str:
        quarantined = _quarantined_keys(journal, run_id, step_idx)
        step_row = next(s for s in journal.steps(run_id) if s["idx"] == step_idx)
        job = Job(run_id, step_idx, existing_written, batch_size, quarantined, capture,
                  drained_name(run_id, step_idx))
        tally = revalidate(dialect, step, job, total=step_row["rows_done"], workers=workers,
                           migration_path=migration_path)
        problems = []
        unexplained = tally.rows - tally.app_rows - step_row["rows_done"]
        if unexplained > 0:
            problems.append(f"{unexplained} rows were never processed")
        if tally.failures:
            problems.append(f"{tally.failures} migrated rows fail validation "
                            f"({'; '.join(tally.examples)})")
        if tally.untouched_bad:
            problems.append(f"{tally.untouched_bad} quarantined rows were modified")
        if problems:
            raise AssertionError("; ".join(problems))
        app = f", {tally.app_rows} written by the application meanwhile" if tally.app_rows else ""
        return (f"{tally.rows} rows: {tally.rows - len(quarantined)} migrated "
                f"({tally.revalidated} re-validated), {len(quarantined)} quarantined and "
                f"unchanged{app}")
    return timed(f"backfill:{step.table}#{step_idx}", check)


def schema_and_content(dialect: Dialect, baseline: dict[str, Any], snapshot: Path | None = None,
                       restored: dict[str, set[str]] | None = None,
                       application_wrote: bool = True) -> list[CheckResult]:
    """After a rollback: the schema equals the pre-migration one, and so does the content,
    apart from rows the application changed meanwhile, which are kept and listed. A difference
    in a column the rollback restored is never the application's: it fails the check. With
    `application_wrote` False (the run was not online: the operator said nothing else writes)
    no difference can be put down to the application, so every one fails the check."""
    restored = restored or {}

    def schema() -> str:
        with dialect.engine.connect() as conn:
            now = dialect.schema_fingerprint(conn, sorted(baseline["schema"]))
        changed = [t for t in baseline["schema"] if now.get(t) != baseline["schema"][t]]
        if changed:
            raise AssertionError(f"schema differs from before the migration: {', '.join(changed)}")
        return f"{len(now)} tables identical to before the migration"

    def content() -> str:
        problems: list[str] = []
        kept: dict[str, list[Any]] = {}
        with ExitStack() as stack:
            conn = stack.enter_context(dialect.engine.connect())
            snap = None
            for table, before in baseline["digests"].items():
                diff = diff_digests(before, table_digest(conn, table))
                if not diff:
                    continue
                if snapshot is None:
                    problems += [f"{table}: {p}" for p in diff]
                    continue
                snap = snap or stack.enter_context(dialect.snapshot_reader(snapshot))
                for key, kind, columns in row_differences(conn, snap, table):
                    if kind == "changed" and columns & restored.get(table, set()):
                        problems.append(f"{table} {list(key)}: restored column(s) "
                                        f"{', '.join(sorted(columns & restored[table]))} differ")
                    elif not application_wrote:
                        what = f" in {', '.join(sorted(columns))}" if kind == "changed" else ""
                        problems.append(f"{table} {list(key)}: {kind}{what}, and the run was not "
                                        "online (no application writes expected)")
                    else:
                        kept.setdefault(table, []).append(list(key))
        if problems:
            raise AssertionError("; ".join(problems[:5]))
        rows = sum(d["rows"] for d in baseline["digests"].values())
        if not kept:
            return f"{rows} rows in {len(baseline['digests'])} tables equal to before the migration"
        listed = "; ".join(f"{t}: {len(k)} rows, e.g. {k[:5]}" for t, k in kept.items())
        return (f"equal to before the migration except rows the application changed since, "
                f"kept: {listed}")

    return [timed("schema", schema), timed("content", content)]


def failed(results: list[CheckResult]) -> list[CheckResult]:
    return [r for r in results if not r.passed]
