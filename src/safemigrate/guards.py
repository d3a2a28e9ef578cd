"""Guards: the rollback conditions (seed 3.1.1). Each answers ok, throttle or trip, with a reason
and the figures behind it.

- error rate: quarantined / processed rows of the running backfill (trip above 10%)
- throughput degradation: the median rate of the last batches against a baseline measured over
  the first batches, or configured (trip when more than 80% slower)
- corruption: a sample of just-written rows re-read and re-validated with the Backfill's own
  transform and validator; a digest of the columns the step does not write, per row of the batch
  range, taken before the batch and compared after it
- timeout: the run or a phase exceeds its maximum duration
- user impact: canary queries on their own connection; slow throttles, far slower trips
- database load: the dialect's `health(conn)` figures when it has one, and the lock waits the
  migration itself observes (SQLite: time spent waiting in BEGIN), against a throttle level and
  a critical level, like gh-ost's --max-load / --critical-load

Batch guards run in the writer thread after each committed batch; timeout, load and canaries
also run on the supervisor's timer, so they act while the migration is paused or throttled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import statistics
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from ._exceptions import ConfigError
from .dialects.base import Dialect as _BaseDialect
from .digest import reflect
from .journal import Journal, quarantine
from .shadow import shadow_name
from .steps import Backfill

if TYPE_CHECKING:
    from .dialects import Dialect
    from .engine import BatchStats
    from .settings import Settings

OK, THROTTLE, TRIP = "ok", "throttle", "trip"
_RANK = {OK: 0, THROTTLE: 1, TRIP: 2}


@dataclass
class Verdict:
    """What one guard says now. `strategy` is how to roll back when it trips."""

    guard: str
    action: str = OK
    reason: str = ""
    figures: dict[str, Any] = field(default_factory=dict)
    strategy: str = "reverse"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def worst(verdicts: Sequence[Verdict]) -> Verdict | None:
    """The most severe non-ok verdict (trip over throttle), or None when all are ok."""
    bad = [v for v in verdicts if v.action != OK]
    return max(bad, key=lambda v: _RANK[v.action]) if bad else None


def read_connection(engine: Engine) -> Connection:
    """A connection for reads that never takes SQLite's write lock (BEGIN DEFERRED)."""
    return engine.connect().execution_options(sqlite_begin="DEFERRED")


# -- configuration ------------------------------------------------------------------------------
@dataclass
class GuardSettings:
    """`[guards]`: the rollback conditions, throttling and pacing of batches."""

    enabled: bool = True
    # error rate (seed: trip above 10%), once enough rows were processed to mean something
    error_rate_trip: float = 0.10
    error_rate_min_rows: int = 500
    # throughput degradation against a baseline (seed: trip when more than 80% slower)
    baseline_rate: float = 0.0  # rows/s; 0 measures it over the first batches of each step
    baseline_batches: int = 3  # batches measured (after the first, which warms up)
    degradation_window: int = 5  # the current rate is the median of this many batches
    degradation_throttle: float = 0.0  # back off when this much slower; 0 = never
    degradation_trip: float = 0.8
    # corruption
    corruption_sample: int = 10  # rows re-read and re-validated per batch; 0 = off
    corruption_recompute: bool = True  # compare with the transform re-run on the original row
    corruption_digest: bool = True  # per-row digest of the columns the step does not write
    corruption_digest_rows: int = 200  # rows of each batch digested before and after; 0 = all
    # timeouts (seconds; 0 = none)
    max_run_seconds: float = 0.0
    max_phase_seconds: float = 0.0
    phase_timeouts: dict[str, float] = field(default_factory=dict)
    # database load: figure name -> level (lock_wait_ms, or what the dialect's health() reports)
    max_load: dict[str, float] = field(default_factory=lambda: {"lock_wait_ms": 2000.0})
    critical_load: dict[str, float] = field(default_factory=dict)
    critical_consecutive: int = 2  # critical readings in a row before tripping
    load_window: float = 5.0  # seconds of lock waits that count
    # throttling and pacing
    throttle_poll: float = 0.5  # seconds between checks while paused or throttled
    max_backoff: float = 5.0  # longest single back-off of a batch guard that throttles
    autotune: bool = True
    target_batch_seconds: float = 0.5  # like pt-online-schema-change --chunk-time
    min_batch_size: int = 50
    max_batch_size: int = 10_000  # also bounds memory: batches in flight × this many rows
    sleep_ratio: float = 0.0  # after each batch, sleep this fraction of its duration
    pause_file: str = ".safemigrate/pause"

    def __post_init__(self) -> None:
        for name in ("error_rate_trip", "degradation_throttle", "degradation_trip"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"[guards] {name} must be between 0 and 1, got {getattr(self, name)}")
        for name in ("baseline_rate", "max_run_seconds", "max_phase_seconds", "sleep_ratio",
                     "max_backoff", "target_batch_seconds", "load_window"):
            if getattr(self, name) < 0:
                raise ConfigError(f"[guards] {name} must not be negative, got {getattr(self, name)}")
        for name in ("baseline_batches", "degradation_window", "min_batch_size", "max_batch_size",
                     "critical_consecutive"):
            if getattr(self, name) < 1:
                raise ConfigError(f"[guards] {name} must be at least 1, got {getattr(self, name)}")
        for name in ("error_rate_min_rows", "corruption_sample", "corruption_digest_rows"):
            if getattr(self, name) < 0:
                raise ConfigError(f"[guards] {name} must not be negative, got {getattr(self, name)}")
        if self.throttle_poll <= 0:
            raise ConfigError("[guards] throttle_poll must be positive")
        for name in ("phase_timeouts", "max_load", "critical_load"):
            for key, value in getattr(self, name).items():
                if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                    raise ConfigError(f"[guards] {name}.{key} must be a number >= 0, got {value!r}")

    @classmethod
    def from_settings(cls, settings: Settings) -> GuardSettings:
        from .settings import section_settings

        return section_settings(cls, settings.section("guards"), "guards")


@dataclass
class CanarySettings:
    """`[canaries]`: queries the application depends on, timed alongside the migration."""

    queries: list[str] = field(default_factory=list)
    interval: float = 2.0
    throttle_ms: float = 500.0
    critical_ms: float = 5000.0
    critical_consecutive: int = 2
    recover_rounds: int = 3  # fast rounds in a row before a throttle lifts (no flapping)

    def __post_init__(self) -> None:
        if self.recover_rounds < 1:
            raise ConfigError("[canaries] recover_rounds must be at least 1")
        if not all(isinstance(q, str) and q.strip() for q in self.queries):
            raise ConfigError("[canaries] queries must be a list of SQL strings")
        if self.interval <= 0 or self.throttle_ms <= 0 or self.critical_ms <= 0:
            raise ConfigError("[canaries] interval, throttle_ms and critical_ms must be positive")
        if self.critical_ms < self.throttle_ms:
            raise ConfigError("[canaries] critical_ms must not be below throttle_ms")
        if self.critical_consecutive < 1:
            raise ConfigError("[canaries] critical_consecutive must be at least 1")

    @classmethod
    def from_settings(cls, settings: Settings) -> CanarySettings:
        from .settings import section_settings

        return section_settings(cls, settings.section("canaries"), "canaries")


# -- batch guards -------------------------------------------------------------------------------
class ErrorRateGuard:
    name = "error_rate"

    def __init__(self, settings: GuardSettings) -> None:
        self.s = settings

    def after_batch(self, stats: BatchStats) -> Verdict:
        rate = stats.quarantined / stats.done if stats.done else 0.0
        figures = {"error_rate": round(rate, 6), "failed": stats.quarantined, "processed": stats.done,
                   "threshold": self.s.error_rate_trip, "min_rows": self.s.error_rate_min_rows}
        if self.s.error_rate_trip > 0 and stats.done >= self.s.error_rate_min_rows \
                and rate > self.s.error_rate_trip:
            return Verdict(self.name, TRIP, f"error rate {rate:.1%} is above {self.s.error_rate_trip:.0%} "
                           f"({stats.quarantined} of {stats.done} rows quarantined)", figures)
        return Verdict(self.name, OK, "", figures)


class DegradationGuard:
    name = "degradation"

    def __init__(self, settings: GuardSettings) -> None:
        self.s = settings
        self._step: tuple[str, int] | None = None
        self._seen = 0
        self._warm: list[float] = []
        self._recent: deque[float] = deque(maxlen=settings.degradation_window)
        self.baseline: float | None = None

    def after_batch(self, stats: BatchStats) -> Verdict:
        if self._step != (stats.run_id, stats.step_idx):
            self._step = (stats.run_id, stats.step_idx)
            self._seen, self._warm, self.baseline = 0, [], self.s.baseline_rate or None
            self._recent.clear()
        if stats.rows == 0 or stats.seconds <= 0:
            return Verdict(self.name)
        rate = stats.rows / stats.seconds
        self._seen += 1
        if self.baseline is None:
            if self._seen > 1:  # the first batch pays for start-up (pool, caches)
                self._warm.append(rate)
            if len(self._warm) >= self.s.baseline_batches:
                self.baseline = statistics.median(self._warm)
            return Verdict(self.name, OK, "", {"measuring_baseline": True, "rate": rate})
        self._recent.append(rate)
        current = statistics.median(self._recent)
        degradation = max(0.0, 1.0 - current / self.baseline) if self.baseline > 0 else 0.0
        figures = {"baseline_rate": round(self.baseline, 3), "current_rate": round(current, 3),
                   "degradation": round(degradation, 4), "window": len(self._recent),
                   "threshold": self.s.degradation_trip}
        if len(self._recent) < self.s.degradation_window:
            return Verdict(self.name, OK, "", figures)
        reason = (f"throughput {current:,.0f} rows/s is {degradation:.0%} below the baseline "
                  f"{self.baseline:,.0f} rows/s")
        if self.s.degradation_trip > 0 and degradation > self.s.degradation_trip:
            return Verdict(self.name, TRIP, reason, figures)
        if self.s.degradation_throttle > 0 and degradation > self.s.degradation_throttle:
            figures["threshold"] = self.s.degradation_throttle
            return Verdict(self.name, THROTTLE, reason, figures)
        return Verdict(self.name, OK, "", figures)


def _row_hash(values: Sequence[Any]) -> bytes:
    return hashlib.blake2b(repr(tuple(values)).encode(), digest_size=16).digest()


def _same(written: Any, expected: Any) -> bool:
    """Equal as stored: the database may hand back 1 for True, '5' for 5, 1 for 1.0."""
    if written == expected:
        return True
    if isinstance(written, float) and isinstance(expected, int | float):
        return math.isclose(written, expected, rel_tol=1e-9, abs_tol=1e-12)
    return written is not None and expected is not None and str(written) == str(expected)


def _key_le(a: Sequence[Any], b: Sequence[Any]) -> bool | None:
    try:
        return tuple(a) <= tuple(b)
    except TypeError:
        return None


class CorruptionGuard:
    """Re-reads what a batch wrote and what it must not have touched."""

    name = "corruption"

    def __init__(self, settings: GuardSettings, dialect: Dialect, journal: Journal) -> None:
        self.s = settings
        self.dialect = dialect
        self.journal = journal
        self.rng = random.Random(0x5AFE)
        self.step: Backfill | None = None
        self._before: dict[tuple[Any, ...], bytes] = {}

    @property
    def active(self) -> bool:
        return self.step is not None and (self.s.corruption_sample > 0 or self.s.corruption_digest)

    def begin_step(self, run_id: str, idx: int, step: Backfill, after_key: Sequence[Any] | None,
                   batch_size: int) -> None:
        self.run_id, self.idx, self.step = run_id, idx, step
        self._before = {}
        with read_connection(self.dialect.engine) as conn:
            table = reflect(conn, step.table)
            self.table = table
            self.pk = list(table.primary_key.columns)
            pk_names = {c.name for c in self.pk}
            self.untouched = [c for c in table.columns
                              if c.name not in set(step.writes) and c.name not in pk_names]
            overlap = [c for c in step.reads if c in step.writes]
            self.shadow = None
            name = shadow_name(run_id, idx)
            if overlap and sa.inspect(conn).has_table(name):
                self.shadow = reflect(conn, name)
            # a column the step both reads and writes, with no shadow copy of its old value
            self.can_revalidate = not overlap or (self.shadow is not None and all(
                c in self.shadow.c for c in overlap))
            self._quarantine_seen = int(conn.execute(
                sa.select(sa.func.coalesce(sa.func.max(quarantine.c.id), 0))).scalar() or 0)
        self._capture = self._find_capture()
        self._lookahead(after_key, batch_size)

    def _find_capture(self) -> Any:
        try:
            from . import capture
        except ImportError:  # pragma: no cover - change capture is optional
            return None
        assert self.step is not None
        for cap in capture.load(self.journal, self.run_id):
            if cap.table == self.step.table and cap.log:
                return cap
        return None

    def _app_changed(self, conn: Connection, first: Sequence[Any],
                     last: Sequence[Any]) -> set[tuple[Any, ...]] | None:
        """Keys in [first, last] the application wrote while the run captures changes (they
        may differ legitimately); None when the change log cannot be read."""
        if self._capture is None:
            return set()
        from . import capture

        try:
            log = capture.log_table(conn, self._capture)
            cols = [log.c[f"k_{k}"] for k in self._capture.keys]
            expr: Any = cols[0] if len(cols) == 1 else sa.tuple_(*cols)
            lo: Any = first[0] if len(cols) == 1 else sa.tuple_(*[sa.literal(v) for v in first])
            hi: Any = last[0] if len(cols) == 1 else sa.tuple_(*[sa.literal(v) for v in last])
            rows = conn.execute(sa.select(*cols).where(expr >= lo, expr <= hi).distinct())
            return {tuple(r) for r in rows}
        except (sa.exc.SQLAlchemyError, KeyError, AttributeError):
            return None

    def _key_filter(self, first: Sequence[Any] | None, last: Sequence[Any] | None,
                    strict_after: bool = False) -> list[Any]:
        cols = self.pk
        clauses = []
        expr: Any = cols[0] if len(cols) == 1 else sa.tuple_(*cols)

        def value(key: Sequence[Any]) -> Any:
            return key[0] if len(cols) == 1 else sa.tuple_(*[sa.literal(v) for v in key])

        if first is not None:
            clauses.append(expr > value(first) if strict_after else expr >= value(first))
        if last is not None:
            clauses.append(expr <= value(last))
        return clauses

    def _key_in(self, keys: list[tuple[Any, ...]]) -> Any:
        if len(self.pk) == 1:
            return self.pk[0].in_([k[0] for k in keys])
        return sa.tuple_(*self.pk).in_(keys)

    def _lookahead(self, after_key: Sequence[Any] | None, rows: int) -> None:
        """Digest, row by row, the columns this step must not touch, for the rows it writes next
        (a random sample of `corruption_digest_rows` of them, or all)."""
        self._before = {}
        if not self.s.corruption_digest or not self.untouched:
            return
        n = len(self.pk)
        window = self._key_filter(after_key, None, True)
        sample = self.s.corruption_digest_rows
        with read_connection(self.dialect.engine) as conn:
            if sample and sample < rows:
                keys = [tuple(r) for r in conn.execute(
                    sa.select(*self.pk).where(*window).order_by(*self.pk).limit(max(rows, 1)))]
                if len(keys) > sample:
                    chosen = sorted(self.rng.sample(range(len(keys)), sample))
                    query = sa.select(*self.pk, *self.untouched).where(
                        self._key_in([keys[i] for i in chosen]))
                    self._before = {tuple(r[:n]): _row_hash(r[n:]) for r in conn.execute(query)}
                    return
            query = (sa.select(*self.pk, *self.untouched).where(*window)
                     .order_by(*self.pk).limit(max(rows, 1)))
            self._before = {tuple(r[:n]): _row_hash(r[n:]) for r in conn.execute(query)}

    def after_batch(self, stats: BatchStats, next_rows: int) -> Verdict:
        if not self.active or stats.step_idx != self.idx or stats.rows == 0:
            return Verdict(self.name)
        assert self.step is not None
        problems: list[str] = []
        figures: dict[str, Any] = {"first_key": stats.first_key, "last_key": stats.last_key}
        # restore from the snapshot: undoing through the same table (its triggers, its
        # application) is exactly what can no longer be trusted
        strategy = "restore"
        revalidate = self.s.corruption_sample > 0 and self.can_revalidate
        try:
            with read_connection(self.dialect.engine) as conn:
                # rows first, the change log after: a write the rows show is in the log by then
                # (under READ COMMITTED too)
                written = self._read_written(conn, stats) if revalidate else []
                now = self._read_digests(conn, stats) if self._before else {}
                excluded = self._app_changed(conn, stats.first_key, stats.last_key)
                excluded_quarantine = self._quarantined_since(conn)
        except Exception:
            # A read that did not complete (a lock or statement timeout while the application
            # holds the table) proves nothing: this batch is unchecked (reported by the caller),
            # and the look-ahead, which described this batch's rows, must not be compared with
            # the next batch's. The next batch's look-ahead is taken after that batch.
            self._before = {}
            raise
        if excluded is None:  # the application's writes cannot be told apart: no guess
            figures["change_log"] = "unreadable"
        else:
            if revalidate:
                bad, checked, examples = self._revalidate(written, excluded | excluded_quarantine)
                figures.update(revalidated=checked, revalidation_failures=bad)
                if bad:
                    problems.append(f"{bad} of {checked} re-read rows no longer match what the "
                                    f"transform wrote ({'; '.join(examples)})")
            if self._before:
                changed, compared, examples = self._compare_digests(now, stats, excluded)
                figures.update(digest_rows=compared, digest_mismatches=changed)
                if changed:
                    problems.append(f"{changed} of {compared} rows changed in columns the step does "
                                    f"not write ({'; '.join(examples)})")
        self._lookahead(stats.last_key, max(next_rows, stats.rows))
        if problems:
            return Verdict(self.name, TRIP, "data corruption after batch "
                           f"{stats.first_key}..{stats.last_key}: " + "; ".join(problems),
                           figures, strategy)
        return Verdict(self.name, OK, "", figures)

    def _quarantined_since(self, conn: Connection) -> set[tuple[Any, ...]]:
        rows = conn.execute(sa.select(quarantine.c.id, quarantine.c.pk).where(
            quarantine.c.id > self._quarantine_seen, quarantine.c.run_id == self.run_id,
            quarantine.c.step_idx == self.idx)).all()
        if rows:
            self._quarantine_seen = max(r[0] for r in rows)
        return {tuple(json.loads(r[1])) for r in rows}

    def _read_written(self, conn: Connection, stats: BatchStats) -> list[Any]:
        """The batch's rows: key, the values the transform read (old ones from the shadow copy
        when the step overwrites them), and what it wrote."""
        step = self.step
        assert step is not None
        table, pk = self.table, self.pk
        pk_names = [c.name for c in pk]
        reads: list[Any] = []
        select_from: Any = table
        if self.shadow is not None:
            match = sa.and_(*[self.shadow.c[c.name] == c for c in pk])
            select_from = table.outerjoin(self.shadow, match)
        for name in step.reads:
            if name in pk_names:
                continue
            if name in step.writes and self.shadow is not None:
                reads.append(self.shadow.c[name].label(name))
            else:
                reads.append(table.c[name])
        writes = [table.c[w].label(f"__new_{w}") for w in step.writes]
        # Only a sample is re-validated: read the batch's keys (cheap), then those rows only.
        in_batch = self._key_filter(stats.first_key, stats.last_key)
        keys = [tuple(r) for r in conn.execute(sa.select(*pk).where(*in_batch))]
        wanted = self.s.corruption_sample * 3  # spare rows for those the application changed
        if len(keys) > wanted:
            keys = self.rng.sample(keys, wanted)
        if not keys:
            return []
        query = (sa.select(*pk, *reads, *writes).select_from(select_from)
                 .where(*in_batch, self._key_in(keys)).order_by(*pk))
        return list(conn.execute(query).mappings())

    def _revalidate(self, written: list[Any],
                    excluded: set[tuple[Any, ...]]) -> tuple[int, int, list[str]]:
        """Re-run transform and validator on a sample of the written rows."""
        step = self.step
        assert step is not None
        pk_names = [c.name for c in self.pk]
        records = [r for r in written if tuple(r[n] for n in pk_names) not in excluded]
        sample = self.rng.sample(records, min(self.s.corruption_sample, len(records)))
        bad, examples = 0, []
        for rec in sample:
            key = [rec[n] for n in pk_names]
            row = {n: rec[n] for n in pk_names}
            row.update({c: rec[c] for c in step.reads if c in rec})
            stored = {w: rec[f"__new_{w}"] for w in step.writes}
            problem = None
            try:
                if self.s.corruption_recompute and step.transform is not None:
                    expected = step.transform(dict(row))
                    diff = [w for w in step.writes if not _same(stored[w], expected.get(w))]
                    if diff:
                        problem = f"{', '.join(diff)} differ from the transform's result"
                if problem is None and step.validate is not None and step.validate(row, stored) is False:
                    problem = "validate() returned False"
            except Exception as exc:  # noqa: BLE001 - a row that fails re-validation is the finding
                problem = f"{type(exc).__name__}: {exc}"
            if problem is not None:
                bad += 1
                if len(examples) < 3:
                    examples.append(f"key {key}: {problem}")
        return bad, len(sample), examples

    def _read_digests(self, conn: Connection, stats: BatchStats) -> dict[tuple[Any, ...], bytes]:
        """The same rows as the look-ahead digested, now (those the batch covered)."""
        n = len(self.pk)
        keys = [k for k in self._before if _key_le(k, stats.last_key)]
        if not keys:
            return {}
        where = self._key_filter(stats.first_key, stats.last_key)
        if len(keys) <= 1000:  # a sample: by key; else the whole range (bound parameters are few)
            where.append(self._key_in(keys))
        query = sa.select(*self.pk, *self.untouched).where(*where)
        return {tuple(r[:n]): _row_hash(r[n:]) for r in conn.execute(query)}

    def _compare_digests(self, now: dict[tuple[Any, ...], bytes], stats: BatchStats,
                         app_changed: set[tuple[Any, ...]]) -> tuple[int, int, list[str]]:
        changed, compared, examples = 0, 0, []
        for key, before in self._before.items():
            if key in app_changed:
                continue
            inside = _key_le(key, stats.last_key)
            if not inside:
                continue  # not written yet (the next batch covers it)
            if stats.first_key is not None and _key_le(stats.first_key, key) is False:
                continue  # before the range read now: unknown, not vanished
            compared += 1
            after = now.get(key)
            if after != before:
                changed += 1
                if len(examples) < 3:
                    examples.append(f"key {list(key)} {'vanished' if after is None else 'changed'}")
        return changed, compared, examples


# -- timer guards -------------------------------------------------------------------------------
class TimeoutGuard:
    name = "timeout"

    def __init__(self, settings: GuardSettings) -> None:
        self.s = settings

    def check(self, now: float, run_started: float | None, phase: str | None,
              phase_started: float | None) -> Verdict:
        if run_started is not None and self.s.max_run_seconds > 0:
            elapsed = now - run_started
            if elapsed > self.s.max_run_seconds:
                return Verdict(self.name, TRIP, f"the run has taken {elapsed:.0f}s, more than its "
                               f"maximum of {self.s.max_run_seconds:.0f}s",
                               {"elapsed": round(elapsed, 3), "limit": self.s.max_run_seconds,
                                "scope": "run"})
        limit = self.s.phase_timeouts.get(phase or "", 0) or self.s.max_phase_seconds
        if phase and phase_started is not None and limit > 0:
            elapsed = now - phase_started
            if elapsed > limit:
                return Verdict(self.name, TRIP, f"phase {phase} has taken {elapsed:.0f}s, more than "
                               f"its maximum of {limit:.0f}s",
                               {"elapsed": round(elapsed, 3), "limit": limit, "scope": phase})
        return Verdict(self.name)


class LockWaitMeter:
    """Measures how long the migration's writer thread waits for SQLite's locks, from
    SQLAlchemy's cursor events: the write lock is taken in BEGIN IMMEDIATE; a read (BEGIN
    DEFERRED) takes its shared lock in its first statement, which is timed too. Lock timeouts
    are counted."""

    def __init__(self, engine: Engine, window: float) -> None:
        self.engine = engine
        self.window = window
        self.thread: int | None = None  # only the writer thread's waits count
        self._lock = threading.Lock()
        self._inflight: dict[int, float] = {}
        self._first: set[int] = set()  # connections whose next statement takes the shared lock
        self._waits: deque[tuple[float, float]] = deque(maxlen=1000)
        self.timeouts = 0
        self._installed = False

    def install(self) -> None:
        sa.event.listen(self.engine, "before_cursor_execute", self._before)
        sa.event.listen(self.engine, "after_cursor_execute", self._after)
        sa.event.listen(self.engine, "handle_error", self._error)
        self._installed = True

    def remove(self) -> None:
        if self._installed:
            sa.event.remove(self.engine, "before_cursor_execute", self._before)
            sa.event.remove(self.engine, "after_cursor_execute", self._after)
            sa.event.remove(self.engine, "handle_error", self._error)
            self._installed = False

    def _before(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if threading.get_ident() != self.thread:
            return
        key = id(conn)
        if statement.lstrip()[:5].upper() == "BEGIN" or key in self._first:
            with self._lock:
                self._inflight[key] = time.monotonic()

    def _after(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if threading.get_ident() != self.thread:
            return
        key = id(conn)
        with self._lock:
            started = self._inflight.pop(key, None)
            self._first.discard(key)
            if started is not None:
                now = time.monotonic()
                self._waits.append((now, now - started))
            if statement.strip().upper() == "BEGIN DEFERRED":
                self._first.add(key)

    def _error(self, context: Any) -> None:
        with self._lock:
            self._inflight.pop(id(context.connection), None)
            self._first.discard(id(context.connection))
            if "locked" in str(context.original_exception).lower():
                self.timeouts += 1

    def figures(self) -> dict[str, float]:
        now = time.monotonic()
        with self._lock:
            recent = [w for t, w in self._waits if now - t <= self.window]
            inflight = [now - t for t in self._inflight.values()]
        worst_wait = max(recent + inflight, default=0.0)
        return {"lock_wait_ms": round(worst_wait * 1000, 1), "lock_timeouts": float(self.timeouts)}


class LoadGuard:
    """Database load: throttle above `max_load`, trip above `critical_load` (consecutively)."""

    name = "database_load"

    def __init__(self, settings: GuardSettings, dialect: Dialect) -> None:
        self.s = settings
        self.dialect = dialect
        self.meter = LockWaitMeter(dialect.engine, settings.load_window)
        self._critical = 0
        self.figures: dict[str, float] = {}
        self.health_error: str | None = None

    def sample(self) -> dict[str, float]:
        figures: dict[str, float] = {}
        health = getattr(self.dialect, "health", None)
        inherited = getattr(type(self.dialect), "health", None) is getattr(_BaseDialect, "health", None)
        if callable(health) and not inherited:
            try:
                with read_connection(self.dialect.engine) as conn:
                    found = health(conn)
                if hasattr(found, "as_dict"):
                    found = found.as_dict()
                elif not isinstance(found, Mapping) and hasattr(found, "__dict__"):
                    found = vars(found)
                for key, value in dict(found or {}).items():
                    if isinstance(value, int | float) and not isinstance(value, bool):
                        figures[str(key)] = float(value)
                self.health_error = None
            except Exception as exc:  # noqa: BLE001 - health is advisory; the guard goes on
                self.health_error = f"{type(exc).__name__}: {exc}"
        for key, value in self.meter.figures().items():  # the worse of ours and the server's
            figures[key] = max(figures.get(key, 0.0), value)
        self.figures = figures
        return figures

    def check(self) -> Verdict:
        figures = self.sample()
        critical = {k: v for k, v in figures.items()
                    if self.s.critical_load.get(k, 0) > 0 and v > self.s.critical_load[k]}
        self._critical = self._critical + 1 if critical else 0
        if critical and self._critical >= self.s.critical_consecutive:
            detail = ", ".join(f"{k}={v:g} > {self.s.critical_load[k]:g}" for k, v in critical.items())
            return Verdict(self.name, TRIP, f"critical database load: {detail}",
                           {**figures, "critical_load": self.s.critical_load})
        over = {k: v for k, v in figures.items()
                if self.s.max_load.get(k, 0) > 0 and v > self.s.max_load[k]}
        if over:
            detail = ", ".join(f"{k}={v:g} > {self.s.max_load[k]:g}" for k, v in over.items())
            return Verdict(self.name, THROTTLE, f"database load: {detail}",
                           {**figures, "max_load": self.s.max_load})
        return Verdict(self.name, OK, "", figures)


@dataclass
class _CanaryState:
    sql: str
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=10))
    errors: int = 0
    last_error: str | None = None
    disabled: str | None = None


class CanaryGuard:
    """User impact: the configured queries, timed every `interval` seconds on their own
    connection. Latency above throttle_ms throttles, until `recover_rounds` rounds in a row are
    fast again; above critical_ms for `critical_consecutive` rounds (or one query stuck that
    long) trips."""

    name = "user_impact"

    def __init__(self, settings: CanarySettings, dialect: Dialect,
                 on_problem: Any = None) -> None:
        self.s = settings
        self.dialect = dialect
        self.on_problem = on_problem  # called with a message when a canary fails or is disabled
        self.canaries = [_CanaryState(q) for q in settings.queries]
        self._lock = threading.Lock()
        self._inflight: tuple[str, float] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.rounds = 0

    def start(self) -> None:
        if not self.canaries:
            return
        self._thread = threading.Thread(target=self._loop, name="safemigrate-canaries", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.s.critical_ms / 1000 + 5)

    def _loop(self) -> None:
        conn: Connection | None = None
        try:
            while not self._stop.is_set():
                if conn is None:
                    conn = read_connection(self.dialect.engine)
                self.run_round(conn)
                self._stop.wait(self.s.interval)
        except Exception as exc:  # noqa: BLE001 - a broken canary connection disables canaries
            if self.on_problem is not None:
                self.on_problem(f"canary queries stopped: {type(exc).__name__}: {exc}")
        finally:
            if conn is not None:
                conn.close()

    def run_round(self, conn: Connection) -> None:
        for canary in self.canaries:
            if canary.disabled or self._stop.is_set():
                continue
            started = time.monotonic()
            with self._lock:
                self._inflight = (canary.sql, started)
            error = None
            try:
                conn.exec_driver_sql(canary.sql).fetchall()
            except Exception as exc:  # noqa: BLE001 - a failing canary is a finding, not a crash
                error = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
            finally:
                with contextlib.suppress(Exception):  # nothing to roll back
                    conn.rollback()
            latency = (time.monotonic() - started) * 1000
            with self._lock:
                self._inflight = None
                canary.latencies.append(latency)
                if error is not None:
                    canary.errors += 1
                    canary.last_error = error
                    if self.rounds == 0:  # broken from the start: a configuration mistake
                        canary.disabled = error
            if error is not None and self.on_problem is not None:
                what = "disabled" if canary.disabled else "failed"
                self.on_problem(f"canary query {what}: {canary.sql!r}: {error}")
        self.rounds += 1

    def check(self) -> Verdict:
        now = time.monotonic()
        with self._lock:
            inflight = (self._inflight[0], (now - self._inflight[1]) * 1000) if self._inflight else None
            latest = {c.sql: list(c.latencies) for c in self.canaries if not c.disabled}
        figures: dict[str, Any] = {"latency_ms": {q: round(v[-1], 1) for q, v in latest.items() if v},
                                   "throttle_ms": self.s.throttle_ms, "critical_ms": self.s.critical_ms}
        if inflight is not None:
            figures["in_flight_ms"] = round(inflight[1], 1)
        n = self.s.critical_consecutive
        for sql, values in latest.items():
            if len(values) >= n and all(v > self.s.critical_ms for v in values[-n:]):
                return Verdict(self.name, TRIP, f"canary query {sql!r} took over "
                               f"{self.s.critical_ms:.0f} ms {n} times in a row "
                               f"(last {values[-1]:.0f} ms)", figures)
        if inflight is not None and inflight[1] > self.s.critical_ms * n:
            return Verdict(self.name, TRIP, f"canary query {inflight[0]!r} has been running for "
                           f"{inflight[1]:.0f} ms", figures)
        recent = self.s.recover_rounds
        slow = [(sql, max(values[-recent:])) for sql, values in latest.items()
                if values and max(values[-recent:]) > self.s.throttle_ms]
        if inflight is not None and inflight[1] > self.s.throttle_ms:
            slow.append((inflight[0], inflight[1]))
        if slow:
            sql, ms = max(slow, key=lambda x: x[1])
            return Verdict(self.name, THROTTLE, f"canary query {sql!r} took {ms:.0f} ms "
                           f"(throttle above {self.s.throttle_ms:.0f} ms)", figures)
        return Verdict(self.name, OK, "", figures)
