"""Re-validation of every backfilled row after the fact, spread over worker processes.

The validation phase reads each row back from the database and runs the step's validator on
what was stored; quarantined rows must still hold their old values. On a large table that is a
second full pass of the validator, so the key range is cut into chunks that worker processes
check in parallel, each with its own connection.
"""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .capture import Capture, changed_keys
from .capture import pending as capture_pending
from .dialects import Dialect, dialect_for
from .digest import reflect
from .shadow import shadow_name
from .steps import Backfill
from .workers import freeze_before_fork, reset_signals

Key = tuple[Any, ...]


@dataclass
class Job:
    """What a scan needs besides the connection (picklable; inherited by forked workers)."""

    run_id: str
    step_idx: int
    existing_written: list[str]
    batch_size: int
    quarantined: set[Key] = field(default_factory=set)
    capture: Capture | None = None  # the table's change log, if the application was captured
    drained: str = ""  # the step's set of drained log entries


@dataclass
class Tally:
    rows: int = 0
    revalidated: int = 0
    failures: int = 0
    untouched_bad: int = 0
    app_rows: int = 0  # rows whose key the application wrote during the run
    examples: list[str] = field(default_factory=list)

    def add(self, other: Tally) -> None:
        self.rows += other.rows
        self.app_rows += other.app_rows
        self.revalidated += other.revalidated
        self.failures += other.failures
        self.untouched_bad += other.untouched_bad
        self.examples = (self.examples + other.examples)[:3]


def _key_filter(pk: list[sa.Column], lo: Key | None, hi: Key | None) -> list[Any]:
    expr = pk[0] if len(pk) == 1 else sa.tuple_(*pk)

    def value(key: Key) -> Any:
        return key[0] if len(pk) == 1 else sa.tuple_(*key)

    out = []
    if lo is not None:
        out.append(expr > value(lo))
    if hi is not None:
        out.append(expr <= value(hi))
    return out


def scan(conn: Connection, step: Backfill, job: Job, lo: Key | None = None,
         hi: Key | None = None) -> Tally:
    """Check the rows with lo < key <= hi (None: unbounded), in one snapshot transaction with
    the change log, so both agree on what the application has written."""
    conn = conn.execution_options(**_snapshot_options(conn))
    with conn.begin():
        return _scan(conn, step, job, lo, hi)


def _snapshot_options(conn: Connection) -> dict[str, Any]:
    if conn.dialect.name == "sqlite":
        return {"sqlite_begin": "DEFERRED"}
    return {"isolation_level": "REPEATABLE READ"}


def _scan(conn: Connection, step: Backfill, job: Job, lo: Key | None, hi: Key | None) -> Tally:
    tally = Tally()
    changed: set[Key] = set()
    pending: set[Key] = set()
    if job.capture is not None:
        changed = changed_keys(conn, job.capture)
        pending = {k for _, k, _ in capture_pending(conn, job.capture, job.drained)}
    table = reflect(conn, step.table)
    pk = list(table.primary_key.columns)
    shadow = reflect(conn, shadow_name(job.run_id, job.step_idx)) if job.existing_written else None
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
        new_cols += [shadow.c[w].label(f"__old_{w}") for w in job.existing_written]
    query = (sa.select(*pk, *old_cols, *new_cols).select_from(select_from)
             .where(*_key_filter(pk, lo, hi)).order_by(*pk))
    result = conn.execution_options(stream_results=True).execute(query)
    quarantined = job.quarantined
    while chunk := result.mappings().fetchmany(job.batch_size):
        for rec in chunk:
            tally.rows += 1
            key = tuple(rec[p.name] for p in pk)
            if key in changed or key in pending:
                tally.app_rows += 1
            if key in pending:
                continue
            new = {w: rec[f"__new_{w}"] for w in step.writes}
            if key in quarantined:
                old = {w: rec.get(f"__old_{w}") for w in step.writes}
                if new != old and key not in changed:
                    tally.untouched_bad += 1
                continue
            if step.validate is None:
                continue
            row = {p.name: rec[p.name] for p in pk}
            row.update({c: rec[c] for c in step.reads if c in rec})
            tally.revalidated += 1
            try:
                if step.validate(row, new) is False:
                    raise ValueError("validate() returned False")
            except Exception as exc:  # noqa: BLE001 - a failing row is counted, not raised
                tally.failures += 1
                if len(tally.examples) < 3:
                    tally.examples.append(f"{list(key)}: {exc}")
    return tally


def _boundaries(conn: Connection, table: str, every: int) -> list[Key]:
    """Every `every`-th key in order, streaming the key columns only."""
    t = reflect(conn, table)
    pk = list(t.primary_key.columns)
    result = conn.execution_options(stream_results=True).execute(sa.select(*pk).order_by(*pk))
    cuts, seen = [], 0
    while chunk := result.fetchmany(10_000):
        for row in chunk:
            seen += 1
            if seen % every == 0:
                cuts.append(tuple(row))
    return cuts


# -- worker processes -------------------------------------------------------------------------
_worker: dict[str, Any] = {}


def _init(url: str, lock_timeout: float, migration_path: str, job: Job) -> None:
    from .migration import load_file
    from .urls import normalize_url

    reset_signals()
    step = load_file(Path(migration_path)).steps[job.step_idx]
    assert isinstance(step, Backfill)
    _worker.update(dialect=dialect_for(normalize_url(url), lock_timeout=lock_timeout),
                   step=step, job=job)


def _scan_range(bounds: tuple[Key | None, Key | None]) -> Tally:
    dialect: Dialect = _worker["dialect"]
    with dialect.engine.connect() as conn:
        return scan(conn, _worker["step"], _worker["job"], *bounds)


def revalidate(dialect: Dialect, step: Backfill, job: Job, *, total: int, workers: int,
               migration_path: Path | None) -> Tally:
    """The whole table, in-process or across `workers` forked processes."""
    chunks = workers * 4
    if workers <= 1 or migration_path is None or total < job.batch_size * chunks \
            or "fork" not in multiprocessing.get_all_start_methods():
        with dialect.engine.connect() as conn:
            return scan(conn, step, job)
    with dialect.engine.connect() as conn:
        cuts = _boundaries(conn, step.table, max(total // chunks, 1))
    ranges = list(zip([None, *cuts], [*cuts, None], strict=True))
    url = dialect.url.render_as_string(hide_password=False)
    context = multiprocessing.get_context("fork")
    freeze_before_fork()
    tally = Tally()
    with context.Pool(workers, initializer=_init,
                      initargs=(url, dialect.lock_timeout, str(migration_path), job)) as pool:
        for part in pool.imap_unordered(_scan_range, ranges):
            tally.add(part)
    return tally
