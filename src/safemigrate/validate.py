"""Proof that a migration (or a rollback) left the database as promised.

Every check runs even when another fails, and reports passed/failed with details, so the
operator sees the whole picture at once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .dialects import Dialect
from .digest import diff_digests, reflect, table_digest
from .journal import Journal
from .migration import Migration
from .shadow import shadow_name
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


def untouched_columns(dialect: Dialect, migration: Migration, baseline: dict[str, Any]) -> CheckResult:
    """Invariant 4: every column the migration does not declare as written is unchanged."""
    written = migration.written_columns()
    raw_tables = {t for s in migration.steps if isinstance(s, RawSQL) for t in s.tables()}

    def check() -> str:
        problems, compared = [], 0
        with dialect.engine.connect() as conn:
            for table, before in baseline["digests"].items():
                if table in raw_tables:
                    continue
                columns = [c for c in before["columns"] if c not in written.get(table, set())]
                after = table_digest(conn, table, columns)
                expected = {"rows": before["rows"],
                            "columns": {c: before["columns"][c] for c in columns}}
                problems += [f"{table}: {p}" for p in diff_digests(expected, after)]
                compared += len(columns)
        if problems:
            raise AssertionError("; ".join(problems[:5]))
        return f"{compared} columns in {len(baseline['digests'])} tables bit-for-bit unchanged"
    return timed("untouched-columns", check)


def _quarantined_keys(journal: Journal, run_id: str, step_idx: int) -> set[tuple[Any, ...]]:
    from .journal import quarantine

    with journal.engine.connect() as conn:
        rows = conn.execute(sa.select(quarantine.c.pk).where(
            quarantine.c.run_id == run_id, quarantine.c.step_idx == step_idx))
        return {tuple(json.loads(r[0])) for r in rows}


def backfill_rows(dialect: Dialect, journal: Journal, run_id: str, step_idx: int,
                  step: Backfill, existing_written: list[str], batch_size: int) -> CheckResult:
    """Every row is migrated or quarantined; every migrated row passes the validator again;
    quarantined rows still hold their original values."""

    def check() -> str:
        quarantined = _quarantined_keys(journal, run_id, step_idx)
        revalidated = failures = untouched_bad = rows = 0
        examples: list[str] = []
        with dialect.engine.connect() as conn:
            table = reflect(conn, step.table)
            pk = list(table.primary_key.columns)
            shadow = reflect(conn, shadow_name(run_id, step_idx)) if existing_written else None
            old_cols = []
            for name in step.reads:
                if name in step.writes and shadow is not None and name in shadow.c:
                    old_cols.append(shadow.c[name].label(name))
                elif name not in {p.name for p in pk}:
                    old_cols.append(table.c[name])
            new_cols = [table.c[w].label(f"__new_{w}") for w in step.writes]
            select_from: Any = table
            if shadow is not None:
                match = sa.and_(*[shadow.c[p.name] == p for p in pk])
                select_from = table.outerjoin(shadow, match)
                new_cols += [shadow.c[w].label(f"__old_{w}") for w in existing_written]
            query = sa.select(*pk, *old_cols, *new_cols).select_from(select_from).order_by(*pk)
            result = conn.execution_options(stream_results=True).execute(query)
            while chunk := result.mappings().fetchmany(batch_size):
                for rec in chunk:
                    rows += 1
                    key = tuple(rec[p.name] for p in pk)
                    new = {w: rec[f"__new_{w}"] for w in step.writes}
                    if key in quarantined:
                        old = {w: rec.get(f"__old_{w}") for w in step.writes}
                        if new != old:
                            untouched_bad += 1
                        continue
                    if step.validate is None:
                        continue
                    row = {p.name: rec[p.name] for p in pk}
                    row.update({c: rec[c] for c in step.reads if c in rec})
                    revalidated += 1
                    try:
                        if step.validate(row, new) is False:
                            raise ValueError("validate() returned False")
                    except Exception as exc:  # noqa: BLE001
                        failures += 1
                        if len(examples) < 3:
                            examples.append(f"{list(key)}: {exc}")
        step_row = next(s for s in journal.steps(run_id) if s["idx"] == step_idx)
        problems = []
        if step_row["rows_done"] < rows:
            problems.append(f"{rows - step_row['rows_done']} rows were never processed")
        if failures:
            problems.append(f"{failures} migrated rows fail validation ({'; '.join(examples)})")
        if untouched_bad:
            problems.append(f"{untouched_bad} quarantined rows were modified")
        if problems:
            raise AssertionError("; ".join(problems))
        return (f"{rows} rows: {rows - len(quarantined)} migrated ({revalidated} re-validated), "
                f"{len(quarantined)} quarantined and unchanged")
    return timed(f"backfill:{step.table}#{step_idx}", check)


def schema_and_content(dialect: Dialect, baseline: dict[str, Any]) -> list[CheckResult]:
    """After a rollback: schema and every digest equal to the pre-migration ones."""

    def schema() -> str:
        with dialect.engine.connect() as conn:
            now = dialect.schema_fingerprint(conn, sorted(baseline["schema"]))
        changed = [t for t in baseline["schema"] if now.get(t) != baseline["schema"][t]]
        if changed:
            raise AssertionError(f"schema differs from before the migration: {', '.join(changed)}")
        return f"{len(now)} tables identical to before the migration"

    def content() -> str:
        problems = []
        with dialect.engine.connect() as conn:
            for table, before in baseline["digests"].items():
                problems += [f"{table}: {p}" for p in diff_digests(before, table_digest(conn, table))]
        if problems:
            raise AssertionError("; ".join(problems[:5]))
        rows = sum(d["rows"] for d in baseline["digests"].values())
        return f"{rows} rows in {len(baseline['digests'])} tables equal to before the migration"

    return [timed("schema", schema), timed("content", content)]


def failed(results: list[CheckResult]) -> list[CheckResult]:
    return [r for r in results if not r.passed]
