"""The backfill engine: keyset batches, transforms in worker processes, one writer in key order.

Each batch's updates, its quarantined rows and its checkpoint commit in ONE transaction, so a
crash at any instant resumes exactly after the last committed batch. Only a bounded window of
batches is in flight: memory does not grow with the table.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ._exceptions import AbortedError, DatabaseLockedError, MigrationFileError, SafeMigrateError
from .capture import Capture
from .capture import drained_name as capture_drained_name
from .capture import ensure_drained as capture_ensure_drained
from .capture import mark_drained as capture_mark_drained
from .capture import pending as capture_pending
from .capture import pending_count as capture_pending_count
from .dialects import Dialect
from .digest import reflect
from .events import Event, EventBus
from .journal import Journal
from .journal import steps as steps_table
from .steps import Backfill
from .workers import freeze_before_fork, reset_signals

Key = tuple[Any, ...]
# (key, new values) for rows to write; (key, original row, error) for rows to quarantine
Outcome = tuple[list[tuple[Key, dict[str, Any]]], list[tuple[Key, dict[str, Any], str]]]

_IN_PROCESS_BELOW = 3  # batches: small tables are not worth starting a pool for
MAX_IN_FLIGHT_ROWS = 20_000  # rows read but not yet committed, across the worker pool


def transform_rows(step: Backfill, names: Sequence[str], n_key: int,
                   rows: Sequence[Sequence[Any]]) -> Outcome:
    """Run transform and validator on each row; never raise for a row, report it instead."""
    ok: list[tuple[Key, dict[str, Any]]] = []
    bad: list[tuple[Key, dict[str, Any], str]] = []
    writes = set(step.writes)
    for values in rows:
        row = dict(zip(names, values, strict=True))
        key = tuple(values[:n_key])
        try:
            new = step.transform(dict(row))  # type: ignore[misc]
            if not isinstance(new, Mapping):
                raise TypeError(f"transform returned {type(new).__name__}, not a dict")
            if set(new) != writes:
                missing, extra = writes - set(new), set(new) - writes
                raise KeyError(f"transform must return exactly {sorted(writes)}; "
                               f"missing {sorted(missing)}, unexpected {sorted(extra)}")
            if step.validate is not None and step.validate(row, new) is False:
                raise ValueError("validate() returned False")
        except Exception as exc:  # noqa: BLE001 - a rejected row is quarantined with its error
            bad.append((key, row, f"{type(exc).__name__}: {exc}"))
            continue
        ok.append((key, dict(new)))
    return ok, bad


# -- worker processes -------------------------------------------------------------------------
_worker_step: Backfill | None = None
_worker_names: Sequence[str] = ()
_worker_n_key = 0


def _init_worker(migration_path: str, step_idx: int, names: Sequence[str], n_key: int) -> None:
    from .migration import load_file

    reset_signals()
    global _worker_step, _worker_names, _worker_n_key
    migration = load_file(Path(migration_path))
    step = migration.steps[step_idx]
    assert isinstance(step, Backfill)
    _worker_step, _worker_names, _worker_n_key = step, names, n_key


def _worker_transform(rows: Sequence[Sequence[Any]]) -> Outcome:
    assert _worker_step is not None
    return transform_rows(_worker_step, _worker_names, _worker_n_key, rows)


# -- the executor -----------------------------------------------------------------------------
@dataclass
class BackfillProgress:
    total: int
    done: int
    quarantined: int
    started: float
    batch_seconds: float = 0.0

    @property
    def rate(self) -> float:
        elapsed = time.time() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0


@dataclass
class BatchStats:
    """What the supervisor (monitor, guards, control) learns after each committed batch."""

    run_id: str
    step_idx: int
    table: str
    rows: int
    quarantined_in_batch: int
    seconds: float  # wall time since the previous batch was committed (read+transform+write)
    write_seconds: float
    done: int
    total: int
    quarantined: int
    rate: float
    batch_size: int
    first_key: list[Any]
    last_key: list[Any]


# Called after every committed batch; may block (pause, throttle), raise (abort, guard trip) or
# return a new batch size (auto-tuning).
BatchHook = Callable[[BatchStats], "int | None"]


class PreparedUpdate:
    """The batch UPDATE compiled once per step and sent with plain DBAPI parameters: SQLAlchemy
    builds parameters per row otherwise, which costs more than the database's own work."""

    def __init__(self, update: sa.Update, dialect: Dialect) -> None:
        compiled = update.compile(dialect=dialect.engine.dialect)
        self.sql = str(compiled)
        self.order: list[str] | None = list(compiled.positiontup) if compiled.positiontup else None
        self.names = list(compiled.binds)
        writes = [n[3:] for n in (self.order or []) if n.startswith("_w_")]
        keys = [n for n in (self.order or []) if n.startswith("_k")]
        # The usual shape (SET values, then the key): one itemgetter call per row.
        self._fast = bool(writes) and self.order == [f"_w_{w}" for w in writes] + keys \
            and keys == [f"_k{i}" for i in range(len(keys))]
        self._get = itemgetter(*writes) if writes else None
        self._single = len(writes) == 1

    @staticmethod
    def _value(name: str, key: Key, new: Mapping[str, Any]) -> Any:
        return key[int(name[2:])] if name.startswith("_k") else new[name[3:]]

    def execute(self, conn: Connection, rows: list[tuple[Key, dict[str, Any]]]) -> None:
        if self._fast:
            get = self._get
            assert get is not None
            params: list[Any] = ([(get(new), *key) for key, new in rows] if self._single
                                 else [get(new) + tuple(key) for key, new in rows])
        elif self.order is not None:
            value, order = self._value, self.order
            params = [tuple(value(n, key, new) for n in order) for key, new in rows]
        else:
            value, names = self._value, self.names
            params = [{n: value(n, key, new) for n in names} for key, new in rows]
        conn.exec_driver_sql(self.sql, params)


@dataclass
class DrainReport:
    """What one drain of the change log did."""

    rows: int = 0  # rows written by the application, found and transformed (or quarantined)
    validated: int = 0  # of those, re-read as stored and passed the step's validator
    quarantined: int = 0
    passes: int = 0
    seconds: float = 0.0
    remaining: int = 0  # log entries left: the application wrote faster than the drain
    failures: list[str] = field(default_factory=list)  # rows whose stored values failed

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["failures"] = self.failures[:3]
        return out


class _StoredRowInvalid(Exception):
    """A drained row failed validation as stored: its batch is rolled back."""


class StopSignal:
    """Set from a signal handler or another thread; the writer stops between batches."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def set(self, reason: str) -> None:
        self.reason = reason
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()


class BackfillExecutor:
    """Runs one Backfill step of one run, from its last checkpoint to the end of the table."""

    def __init__(self, *, dialect: Dialect, journal: Journal, bus: EventBus, run_id: str,
                 step_idx: int, step: Backfill, migration_path: Path | None, workers: int,
                 batch_size: int, stop: StopSignal | None = None,
                 between_batches: BatchHook | None = None) -> None:
        self.dialect = dialect
        self.journal = journal
        self.bus = bus
        self.run_id = run_id
        self.step_idx = step_idx
        self.step = step
        self.migration_path = migration_path
        self.workers = workers
        self.batch_size = step.batch_size or batch_size
        self.stop = stop or StopSignal()
        self.between_batches = between_batches

    def _table(self, conn: Connection) -> sa.Table:
        table = reflect(conn, self.step.table)
        if not table.primary_key.columns:
            raise MigrationFileError(
                f"table {self.step.table} has no primary key; Backfill pages by primary key",
                "add a primary key (or a unique NOT NULL key made primary) before backfilling",
            )
        missing = [c for c in (*self.step.reads, *self.step.writes) if c not in table.c]
        if missing:
            raise MigrationFileError(
                f"Backfill on {self.step.table}: no column {missing[0]!r}",
                "check reads/writes against the table (and AddColumn steps before the Backfill)",
            )
        return table

    def run(self) -> BackfillProgress:
        with self.dialect.engine.connect() as conn:
            table = self._table(conn)
            (step_row,) = [s for s in self.journal.steps(self.run_id, conn) if s["idx"] == self.step_idx]
            total = step_row["rows_total"]
            if total is None:
                total = int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar() or 0)
        pk = list(table.primary_key.columns)
        reads = [c for c in self.step.reads if c not in {p.name for p in pk}]
        names = [c.name for c in pk] + reads
        checkpoint = step_row["checkpoint"]
        progress = BackfillProgress(total, step_row["rows_done"], step_row["rows_quarantined"],
                                    time.time() - 1e-9)
        progress_base = progress.done
        now = time.time()
        self.journal.update_step(None, self.run_id, self.step_idx, status="running",
                                 rows_total=total, started_at=step_row["started_at"] or now)
        self.bus.emit(Event("step.started", self.step.describe(), self.run_id,
                            data={"step": self.step_idx, "total": total, "done": progress.done,
                                  "resumed_from": checkpoint}))
        started = time.time()
        batches = self._read_batches(table, names, len(pk), checkpoint)
        use_pool = self.workers > 1 and self.migration_path is not None and (
            total - progress.done) > self.batch_size * _IN_PROCESS_BELOW
        update = self._update_statement(table, pk)
        if use_pool:
            outcomes = self._pooled(batches, names, len(pk))
        else:
            outcomes = ((rows, transform_rows(self.step, names, len(pk), rows)) for rows in batches)
        last_commit = time.time()
        for rows, (ok, bad) in outcomes:
            t0 = time.time()
            self._write(update, len(pk), rows, ok, bad)
            progress.done += len(rows)
            progress.quarantined += len(bad)
            progress.batch_seconds = time.time() - t0
            batch_wall, last_commit = time.time() - last_commit, time.time()
            elapsed = time.time() - started
            rate = (progress.done - progress_base) / elapsed if elapsed > 0 else 0.0
            remaining = max(progress.total - progress.done, 0)
            self.bus.emit(Event("batch", f"{progress.done}/{progress.total} rows", self.run_id, data={
                "step": self.step_idx, "done": progress.done, "total": progress.total,
                "quarantined": progress.quarantined, "batch_rows": len(rows),
                "rate": rate, "eta": remaining / rate if rate > 0 else None,
            }))
            if bad:
                self.bus.emit(Event("quarantine", f"{len(bad)} rows quarantined: {bad[0][2]}",
                                    self.run_id, level="warning",
                                    data={"step": self.step_idx, "count": len(bad),
                                          "example_key": list(bad[0][0]), "error": bad[0][2]}))
            if self.between_batches is not None:
                new_size = self.between_batches(BatchStats(
                    self.run_id, self.step_idx, self.step.table, len(rows), len(bad), batch_wall,
                    progress.batch_seconds, progress.done, progress.total, progress.quarantined,
                    rate, self.batch_size, list(rows[0][:len(pk)]), list(rows[-1][:len(pk)])))
                if new_size:
                    self.batch_size = max(1, int(new_size))
                last_commit = time.time()  # time spent paused or throttled is not batch time
            if self.stop.is_set():
                batches.close()
                raise AbortedError(f"stopped after a committed batch: {self.stop.reason}")
        self.journal.update_step(None, self.run_id, self.step_idx, status="done",
                                 finished_at=time.time())
        self.bus.emit(Event("step.completed", self.step.describe(), self.run_id, data={
            "step": self.step_idx, "done": progress.done, "quarantined": progress.quarantined}))
        return progress

    def _read_batches(self, table: sa.Table, names: list[str], n_key: int,
                      checkpoint: list[Any] | None) -> Iterator[list[tuple[Any, ...]]]:
        """Keyset pagination; each batch read in its own short read transaction."""
        pk = [table.c[n] for n in names[:n_key]]
        base = sa.select(*[table.c[n] for n in names]).order_by(*pk)
        last = tuple(checkpoint) if checkpoint is not None else None
        while True:
            query = base.limit(self.batch_size)  # the batch size may be re-tuned between batches
            if last is not None:
                query = query.where(pk[0] > last[0] if n_key == 1 else sa.tuple_(*pk) > sa.tuple_(*last))
            rows = self._retry_locked("read", lambda query=query: self._read(query))
            if not rows:
                return
            last = rows[-1][:n_key]
            yield rows

    def _pooled(self, batches: Iterator[list[tuple[Any, ...]]], names: list[str],
                n_key: int) -> Iterator[tuple[list[tuple[Any, ...]], Outcome]]:
        """Transforms in worker processes; results handed back in key order, with at most
        2 × workers batches, and about MAX_IN_FLIGHT_ROWS rows, in flight (memory stays flat)."""
        # fork: workers start at once and need no importable __main__; spawn elsewhere.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        context = multiprocessing.get_context(method)
        window: deque[tuple[list[tuple[Any, ...]], Future[Outcome]]] = deque()
        freeze_before_fork()
        with ProcessPoolExecutor(
            max_workers=self.workers, mp_context=context, initializer=_init_worker,
            initargs=(str(self.migration_path), self.step_idx, names, n_key),
        ) as pool:
            try:
                for rows in batches:
                    window.append((rows, pool.submit(_worker_transform, rows)))
                    in_flight = sum(len(r) for r, _ in window)
                    while window and (len(window) >= self.workers * 2 or in_flight > MAX_IN_FLIGHT_ROWS):
                        head, future = window.popleft()
                        in_flight -= len(head)
                        yield head, future.result()
                while window:
                    head, future = window.popleft()
                    yield head, future.result()
            except BrokenProcessPool:
                raise SafeMigrateError(
                    "a transform worker process died (killed, or out of memory)",
                    "the last committed batch is safe; `safemigrate run` resumes, "
                    "--workers 1 runs transforms in-process",
                ) from None
            finally:
                for _, future in window:
                    future.cancel()

    def _update_statement(self, table: sa.Table, pk: list[sa.Column]) -> PreparedUpdate:
        where = sa.and_(*[col == sa.bindparam(f"_k{i}") for i, col in enumerate(pk)])
        values = {w: sa.bindparam(f"_w_{w}") for w in self.step.writes}
        return PreparedUpdate(sa.update(table).where(where).values(values), self.dialect)

    def _write(self, update: PreparedUpdate, n_key: int, rows: list[tuple[Any, ...]],
               ok: list[tuple[Key, dict[str, Any]]], bad: list[tuple[Key, dict[str, Any], str]]) -> None:
        last_key = list(rows[-1][:n_key])

        def commit() -> None:
            with self.dialect.engine.begin() as conn:
                self._apply_outcome(conn, update, ok, bad)
                self.journal.update_step(
                    conn, self.run_id, self.step_idx, checkpoint=last_key,
                    rows_done=steps_table.c.rows_done + len(rows),
                    rows_quarantined=steps_table.c.rows_quarantined + len(bad),
                )
        self._retry_locked("write", commit)

    # A batch whose lock wait timed out is retried after 0.5, 1, 2, 4 s (as pgroll and pt-osc
    # do), each retry announced as an alert, then the run stops with DatabaseLockedError.
    lock_retries = 4
    lock_backoff = 0.5

    def _read(self, query: sa.Select) -> list[tuple[Any, ...]]:
        with self.dialect.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(query).all()]

    def _retry_locked(self, what: str, action: Callable[[], Any]) -> Any:
        attempt = 0
        while True:
            try:
                return action()
            except sa.exc.DBAPIError as exc:
                if not self.dialect.is_lock_timeout(exc):
                    raise
                reason = self.dialect.translate_error(exc).message
                if attempt >= self.lock_retries:
                    raise DatabaseLockedError(
                        f"lock wait: gave up on a batch {what} of {self.step.table} after "
                        f"{attempt + 1} attempts: {reason}",
                        "another session holds a lock on the table for long; committed batches are "
                        "safe and `safemigrate run` resumes",
                    ) from None
                delay = self.lock_backoff * 2 ** attempt
                attempt += 1
                self.bus.emit(Event(
                    "alert", f"lock wait: retrying batch {what} of {self.step.table} in {delay:g}s "
                    f"(attempt {attempt} of {self.lock_retries})", self.run_id, level="warning",
                    data={"step": self.step_idx, "attempt": attempt, "delay": delay, "error": reason}))
                time.sleep(delay)

    def _apply_outcome(self, conn: Connection, update: PreparedUpdate,
                       ok: list[tuple[Key, dict[str, Any]]],
                       bad: list[tuple[Key, dict[str, Any], str]]) -> None:
        """The updates and quarantine entries of one batch, in the caller's transaction."""
        if ok:
            update.execute(conn, ok)
        if bad:
            self.journal.quarantine_rows(conn, self.run_id, self.step_idx, self.step.table,
                                         [(list(k), r, e) for k, r, e in bad])

    def drain(self, capture: Capture, *, max_passes: int | None = None,
              max_seconds: float | None = None, until_empty: bool = False) -> DrainReport:
        """Migrate the rows the application wrote while the scan ran (from the change log).

        Work goes in passes, each over the backlog counted at its start; passes repeat while
        the backlog shrinks, up to `max_passes` or `max_seconds`, then one final pass, so an
        application that writes faster than the drain cannot keep it here forever: what it
        leaves is announced (`queue.bounded`) and drained later (cleanup). `until_empty` is
        for the drain after the triggers are gone, when the log no longer grows.

        Each batch reads (locking the rows), transforms, writes, re-reads what it stored and
        runs the validator on it, and records the log position, in ONE transaction: the
        application cannot change a row between its read, its write and its check, and a crash
        resumes exactly where it stopped.
        A row that fails the check is not committed; the drain stops and reports it. Deleted
        rows are simply not found: nothing is resurrected."""
        report = DrainReport()
        if not capture.log:
            return report
        with self.dialect.engine.connect() as conn:
            table = self._table(conn)
        pk = list(table.primary_key.columns)
        names = [c.name for c in pk] + [c for c in self.step.reads if c not in {p.name for p in pk}]
        update = self._update_statement(table, pk)
        # Locking reads (FOR UPDATE; SQLite's BEGIN IMMEDIATE locks the whole database): the
        # application cannot change or delete a row between its read, its write and its check,
        # and on MySQL they read the latest rows, not the transaction's older snapshot.
        select = sa.select(*[table.c[n] for n in names]).with_for_update()
        stored = sa.select(*pk, *[table.c[w] for w in self.step.writes]).with_for_update()
        key_expr = pk[0] if len(pk) == 1 else sa.tuple_(*pk)
        drained = capture_drained_name(self.run_id, self.step_idx)
        with self.dialect.engine.begin() as conn:
            capture_ensure_drained(conn, drained)

        def backlog() -> int:
            with self.dialect.engine.connect() as conn:
                return capture_pending_count(conn, capture, drained)

        def batch(limit: int) -> int:
            """One transaction; returns the log entries it consumed (0: none left)."""
            with self.dialect.engine.begin() as conn:
                entries = capture_pending(conn, capture, drained, limit)
                if not entries:
                    return 0
                keys = list(dict.fromkeys(key for _, key, _ in entries))
                rows = [tuple(r) for r in conn.execute(select.where(key_expr.in_(self._wanted(keys, pk))))]
                ok, bad = transform_rows(self.step, names, len(pk), rows)
                retried = [k for k, _ in ok] + [k for k, _, _ in bad]
                released = self.journal.unquarantine(conn, self.run_id, self.step_idx, retried)
                self._apply_outcome(conn, update, ok, bad)
                validated = self._check_stored(conn, stored, key_expr, pk, names, rows, ok, report)
                capture_mark_drained(conn, drained, [seq for seq, _, _ in entries])
                self.journal.update_step(
                    conn, self.run_id, self.step_idx,
                    rows_quarantined=steps_table.c.rows_quarantined - released + len(bad))
            report.rows += len(rows)
            report.validated += validated
            report.quarantined += len(bad)
            return len(entries)

        started, previous = time.monotonic(), None
        try:
            while (todo := backlog()) > 0:
                final = not until_empty and (
                    (previous is not None and todo >= previous)
                    or (max_passes is not None and report.passes + 1 >= max_passes)
                    or (max_seconds is not None and time.monotonic() - started >= max_seconds))
                report.passes += 1
                previous, left = todo, todo
                while left > 0 and (done := self._retry_locked(
                        "drain", lambda n=left: batch(min(self.batch_size, n)))):
                    left -= done
                if final:
                    break
        except _StoredRowInvalid:
            pass  # that batch rolled back: its rows stay in the log; report.failures says why
        report.seconds = time.monotonic() - started
        if report.rows:
            self.bus.emit(Event("queue.drained", f"{report.rows} rows written by the application during "
                                f"the migration were migrated too", self.run_id,
                                data={"step": self.step_idx, **report.as_dict()}))
        if not report.failures and not until_empty:
            report.remaining = backlog()
            if report.remaining:
                self.bus.emit(Event(
                    "queue.bounded", f"drain of {self.step.table} bounded: the application wrote "
                    f"faster than it drained; {report.remaining} log entries left after "
                    f"{report.passes} passes ({report.seconds:.1f}s), for the next drain",
                    self.run_id, level="warning", data={"step": self.step_idx, **report.as_dict()}))
        return report

    @staticmethod
    def _wanted(keys: list[Key], pk: list[sa.Column]) -> list[Any]:
        return [k[0] for k in keys] if len(pk) == 1 else keys

    def _check_stored(self, conn: Connection, stored: sa.Select, key_expr: Any,
                      pk: list[sa.Column], names: list[str], rows: list[tuple[Any, ...]],
                      ok: list[tuple[Key, dict[str, Any]]], report: DrainReport) -> int:
        """Re-read the values just written (same transaction) and run the validator on them,
        as the validation phase does for the scanned rows. Raises _StoredRowInvalid (rolling
        the batch back) with the failures in `report`."""
        if not ok or self.step.validate is None:
            return 0
        n_key = len(pk)
        before = {tuple(r[:n_key]): dict(zip(names, r, strict=True)) for r in rows}
        wanted = self._wanted([k for k, _ in ok], pk)
        after = {tuple(r[:n_key]): dict(zip(self.step.writes, r[n_key:], strict=True))
                 for r in conn.execute(stored.where(key_expr.in_(wanted)))}
        for key, _ in ok:
            try:
                if key not in after:
                    raise LookupError("the row written is not there")
                if self.step.validate(dict(before[key]), after[key]) is False:
                    raise ValueError("validate() returned False")
            except Exception as exc:  # noqa: BLE001 - a failing row is reported, not raised
                report.failures.append(f"{list(key)}: {type(exc).__name__}: {exc}")
        if report.failures:
            raise _StoredRowInvalid
        return len(ok)
