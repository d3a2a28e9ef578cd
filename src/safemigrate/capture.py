"""Change capture: the application keeps writing while a migration runs.

Triggers on each affected table append the key of every row the application inserts, updates
(in a column the migration does not write) or deletes to a log table. The backfill drains the
log after its scan, so rows written behind the cursor are migrated too; validation and rollback
use it to tell the application's changes from the migration's. The migration's own updates set
only written columns, so they do not fire the update trigger.

The triggers go in just before the snapshot (so no write escapes between the two) and come out
in cleanup, after validation, followed by one last drain (each drain validates the rows it
writes, see `Runner._phase_cleanup`). They and their log are safemigrate-owned objects.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .dialects import Dialect
from .digest import reflect
from .journal import Journal

PREFIX = "safemigrate_"


@dataclass
class Capture:
    """Where one table's changes are logged (JSON-able: stored in the journal)."""

    table: str
    log: str
    keys: list[str]
    triggers: list[str]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _short(run_id: str, table: str) -> str:
    return f"{run_id[:8]}_{hashlib.sha1(table.encode()).hexdigest()[:8]}"


def log_table(conn: Connection, capture: Capture) -> sa.Table:
    return reflect(conn, capture.log)


def install(dialect: Dialect, run_id: str, table: str, written: Iterable[str]) -> Capture:
    """Create the log table and the triggers (idempotent: a resumed run reinstalls nothing)."""
    short = _short(run_id, table)
    with dialect.engine.begin() as conn:
        source = reflect(conn, table)
        keys = [c.name for c in source.primary_key.columns]
        if not keys:
            return Capture(table, "", [], [])
        log_name = f"{PREFIX}log_{short}"
        log = sa.Table(
            log_name, sa.MetaData(),
            sa.Column("seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
                      autoincrement=True),
            *[sa.Column(f"k_{k}", source.c[k].type) for k in keys],
            sa.Column("op", sa.String(1), nullable=False),
        )
        watched = [c.name for c in source.columns if c.name not in set(written)]
        capture = Capture(table, log_name, keys, [])
        if not sa.inspect(conn).has_table(log_name):
            log.create(conn)
        statements, names = dialect.capture_triggers_sql(table, log_name, keys, watched,
                                                         f"{PREFIX}cap_{short}")
        existing = dialect.trigger_names(conn, table)
        if not set(names) <= existing:
            for name in names:
                if name in existing:
                    for drop in dialect.drop_trigger_sql(name, table):
                        conn.exec_driver_sql(drop)
            for statement in statements:
                conn.exec_driver_sql(statement)
        capture.triggers = names
    return capture


def remove_triggers(dialect: Dialect, capture: Capture) -> None:
    if not capture.triggers:
        return
    with dialect.engine.begin() as conn:
        existing = dialect.trigger_names(conn, capture.table)
        for name in capture.triggers:
            if name in existing:
                for drop in dialect.drop_trigger_sql(name, capture.table):
                    conn.exec_driver_sql(drop)


def drop_log(dialect: Dialect, capture: Capture, run_id: str = "") -> None:
    remove_triggers(dialect, capture)
    if not capture.log:
        return
    with dialect.engine.begin() as conn:
        names = [n for n in sa.inspect(conn).get_table_names()
                 if n == capture.log or (run_id and n.startswith(f"{PREFIX}drained_{run_id}_"))]
        for name in names:
            sa.Table(name, sa.MetaData()).drop(conn)


def drained_table(name: str) -> sa.Table:
    return sa.Table(name, sa.MetaData(), sa.Column("seq", sa.BigInteger, primary_key=True,
                                                    autoincrement=False))


def drained_name(run_id: str, step_idx: int) -> str:
    return f"{PREFIX}drained_{run_id}_{step_idx}"


def pending(conn: Connection, capture: Capture, drained: str,
            limit: int | None = None) -> list[tuple[int, tuple[Any, ...], str]]:
    """Log entries a backfill step has not drained yet: (seq, key, op), oldest first.

    Progress is a set of drained sequence numbers, not a high-water mark: on PostgreSQL and
    MySQL a log entry with a lower number can commit after a higher one, and must not be
    skipped."""
    log = log_table(conn, capture)
    cols = [log.c[f"k_{k}"] for k in capture.keys]
    query = _undrained(conn, log, drained, sa.select(log.c.seq, *cols, log.c.op).order_by(log.c.seq))
    if limit is not None:
        query = query.limit(limit)
    return [(r[0], tuple(r[1:-1]), r[-1]) for r in conn.execute(query)]


def pending_count(conn: Connection, capture: Capture, drained: str) -> int:
    """How many log entries a backfill step has not drained yet (the drain's backlog)."""
    log = log_table(conn, capture)
    query = _undrained(conn, log, drained, sa.select(sa.func.count()).select_from(log))
    return int(conn.execute(query).scalar() or 0)


def _undrained(conn: Connection, log: sa.Table, drained: str, query: sa.Select) -> sa.Select:
    if not sa.inspect(conn).has_table(drained):  # no table yet: nothing drained yet
        return query
    done = drained_table(drained)
    return query.where(~sa.exists(sa.select(1).select_from(done).where(done.c.seq == log.c.seq)))


def ensure_drained(conn: Connection, drained: str) -> None:
    drained_table(drained).create(conn, checkfirst=True)


def mark_drained(conn: Connection, drained: str, seqs: list[int]) -> None:
    if seqs:
        conn.execute(drained_table(drained).insert(), [{"seq": s} for s in seqs])


def changed_keys(conn: Connection, capture: Capture, upto: int | None = None) -> set[tuple[Any, ...]]:
    """Every key the application touched (inserted, updated or deleted) while captured."""
    if not capture.log or not sa.inspect(conn).has_table(capture.log):
        return set()
    log = log_table(conn, capture)
    query = sa.select(*[log.c[f"k_{k}"] for k in capture.keys]).distinct()
    if upto is not None:
        query = query.where(log.c.seq <= upto)
    return {tuple(r) for r in conn.execute(query)}




def save(journal: Journal, run_id: str, captures: list[Capture]) -> None:
    journal.set_state(f"capture:{run_id}", [c.as_dict() for c in captures])


def load(journal: Journal, run_id: str) -> list[Capture]:
    return [Capture(**c) for c in journal.get_state(f"capture:{run_id}") or []]


def forget(journal: Journal, dialect: Dialect, run_id: str) -> None:
    """Drop the triggers and logs of a run (after rollback, or when pruned)."""
    for capture in load(journal, run_id):
        drop_log(dialect, capture, run_id)
    journal.set_state(f"capture:{run_id}", [])
