"""Pre-migration checks: is this database in a state where a migration may start?

The seed's PreMigrationChecker. Three groups, each check a function of a `CheckContext`:

- environment: database reachable and its version; migration state (no failed or interrupted run
  pending, applied files unchanged); free disk at the backup location and at the database;
  CPU load and memory (psutil); every backup layer's destination writable; for servers,
  connection latency stable over a few round trips.
- data: the engine's integrity check, foreign-key violations, indexes present and valid, and a
  dry pass of each Backfill's transform and validator over a sample of rows.
- business: no other migration running (the journal lock), no long-running transactions or
  pending writers, and user-defined checks (a migration's `checks` and `[checks] custom`).

A check returns its details (passed), returns `Warn(...)` (warning), or raises (failed; a
`CheckFailed` carries its own hint, any other exception counts as a crash and fails with its
error, as the seed does with Promise.allSettled). Checks run concurrently in threads, each with
a timeout. A required check that fails makes the report not ready; a failing advisory check
(`[checks] advisory`, default cpu-load) is a warning. `run --skip-check NAME --reason TEXT`
skips a check: it shows as skipped, and the skip is journaled with who and why.
"""

from __future__ import annotations

import fnmatch
import getpass
import importlib
import inspect
import os
import shutil
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import backup as backup_module
from ._exceptions import (
    ConfigError,
    DiskFullError,
    NotReadyError,
    SafeMigrateError,
    UsageError,
)
from .digest import reflect
from .lock import _owner_is_dead, current_holder
from .settings import Settings, section_settings
from .steps import AddColumn, Backfill, CreateIndex, DropIndex
from .validate import CheckResult

if TYPE_CHECKING:
    from .migration import Migration
    from .migrator import Migrator

VERDICTS = ("passed", "warning", "failed", "skipped")
CATEGORIES = ("environment", "data", "business")


# -- configuration ------------------------------------------------------------------------------
@dataclass
class CheckSettings:
    """The `[checks]` table of safemigrate.toml."""

    disk_factor: float | None = None  # free disk needed / data size; default: top-level disk_factor
    max_cpu_percent: float = 95.0
    max_memory_percent: float = 95.0
    sample_rows: int = 1000  # rows each Backfill is tried on (`check --full`: all rows)
    max_quarantine_rate: float = 0.5  # sampled rows a transform may reject before the check fails
    timeout_seconds: float = 300.0  # per check
    latency_rounds: int = 5  # servers: round trips measured
    max_latency_ms: float = 200.0  # servers: median round trip allowed
    max_transaction_seconds: float = 60.0  # servers: oldest open transaction allowed
    advisory: list[str] = field(default_factory=lambda: ["cpu-load"])  # failing -> warning
    custom: list[str] = field(default_factory=list)  # "module:function" user checks

    def __post_init__(self) -> None:
        if self.disk_factor is not None and (
                not isinstance(self.disk_factor, int | float) or isinstance(self.disk_factor, bool)
                or self.disk_factor <= 0):
            raise ConfigError(f"[checks] disk_factor must be a positive number, got {self.disk_factor!r}")
        for name in ("max_cpu_percent", "max_memory_percent", "timeout_seconds", "max_latency_ms",
                     "max_transaction_seconds"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"[checks] {name} must be positive, got {getattr(self, name)!r}")
        for name in ("sample_rows", "latency_rounds"):
            if getattr(self, name) < 1:
                raise ConfigError(f"[checks] {name} must be at least 1, got {getattr(self, name)!r}")
        if not 0 <= self.max_quarantine_rate <= 1:
            raise ConfigError("[checks] max_quarantine_rate must be between 0 and 1, "
                              f"got {self.max_quarantine_rate!r}")
        for entry in self.custom:
            module, _, func = str(entry).partition(":")
            if not isinstance(entry, str) or not module.strip() or not func.strip():
                raise ConfigError(f"[checks] custom entry {entry!r} is not \"module:function\"",
                                  'e.g. custom = ["myapp.checks:sync_queue_empty"]')
        if not all(isinstance(a, str) for a in self.advisory):
            raise ConfigError("[checks] advisory must be a list of check names")


def check_settings(settings: Settings) -> CheckSettings:
    return section_settings(CheckSettings, settings.section("checks"), "checks")


# -- results -----------------------------------------------------------------------------------
class CheckFailed(Exception):  # noqa: N818 - raised by a check, it is a verdict, not an error
    """Raise from a check to fail it with details and (optionally) a hint of its own."""

    def __init__(self, details: str, hint: str | None = None,
                 data: Mapping[str, Any] | None = None) -> None:
        super().__init__(details)
        self.details = details
        self.hint = hint
        self.data = dict(data or {})


@dataclass
class Warn:
    """Return from a check for a warning: it does not stop a migration, but is reported."""

    details: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Passed:
    """Return from a check to pass with structured data beside the details."""

    details: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class CheckOutcome(CheckResult):
    """One check's verdict. `passed` is False only for a failed required check."""

    verdict: str = "passed"
    category: str = ""
    hint: str = ""
    required: bool = True
    data: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CheckReport:
    """The seed's PreMigrationReport: a verdict, every check, and what to do about the others."""

    ready: bool
    checks: list[CheckOutcome]
    database: str = ""
    full: bool = False
    timestamp: float = field(default_factory=time.time)

    @property
    def failed(self) -> list[CheckOutcome]:
        return [c for c in self.checks if c.verdict == "failed"]

    @property
    def recommendations(self) -> list[str]:
        return [f"{c.name}: {c.hint}" for c in self.checks
                if c.verdict in ("failed", "warning") and c.hint]

    def counts(self) -> dict[str, int]:
        return {v: sum(1 for c in self.checks if c.verdict == v) for v in VERDICTS}

    def summary(self) -> str:
        counts = self.counts()
        return ", ".join(f"{n} {v}" for v, n in counts.items() if n)

    def as_dict(self) -> dict[str, Any]:
        return {"ready": self.ready, "database": self.database, "full": self.full,
                "timestamp": self.timestamp, "counts": self.counts(),
                "checks": [c.as_dict() for c in self.checks],
                "recommendations": self.recommendations}


# -- the context a check runs in ---------------------------------------------------------------
@dataclass
class CheckContext:
    m: Migrator
    settings: CheckSettings
    full: bool
    migrations: list[Migration]  # the migrations whose data and user checks to try
    pending: list[Migration] | None  # every pending migration (None: could not be determined)
    pending_error: SafeMigrateError | None
    run_id: str | None  # inside a run: that run (its own state and lock are not a problem)
    _connections: dict[str, list[Any]] = field(default_factory=dict)
    _guard: threading.Lock = field(default_factory=threading.Lock)

    @property
    def dialect(self) -> Any:
        return self.m.dialect

    @property
    def is_sqlite(self) -> bool:
        return self.m.dialect.name == "sqlite"

    @contextmanager
    def read(self, check: str) -> Iterator[Connection]:
        """A read-only connection (SQLite: a DEFERRED transaction, never the write lock),
        registered so a timed-out check can be interrupted."""
        with self.m.dialect.engine.connect() as conn:
            conn = conn.execution_options(sqlite_begin="DEFERRED")
            raw = conn.connection.dbapi_connection
            with self._guard:
                self._connections.setdefault(check, []).append(raw)
            try:
                yield conn
            finally:
                with self._guard:
                    self._connections[check].remove(raw)

    def interrupt(self, check: str) -> None:
        with self._guard:
            raws = list(self._connections.get(check, []))
        for raw in raws:
            stop = getattr(raw, "interrupt", None) or getattr(raw, "cancel", None)
            if callable(stop):  # sqlite3 interrupt(), psycopg cancel(): the statement ends now
                with suppress(Exception):
                    stop()


CheckFunc = Callable[[CheckContext], "str | Warn | Passed"]


@dataclass(frozen=True)
class Check:
    """A check's definition: name, group, what it runs, what to do when it fails."""

    name: str
    category: str
    func: CheckFunc
    hint: str


# -- environment ---------------------------------------------------------------------------------
def _database(ctx: CheckContext) -> str:
    with ctx.read("database") as conn:
        version = ctx.dialect.server_version(conn)
    return f"{ctx.m.display_url}: {version}"


def _run_changed_something(ctx: CheckContext, run_id: str) -> bool:
    return any(s["status"] != "pending" for s in ctx.m.journal.steps(run_id))


def _migration_state(ctx: CheckContext) -> str | Warn:
    if ctx.pending_error is not None:
        raise CheckFailed(ctx.pending_error.message, ctx.pending_error.hint)
    pending = ctx.pending or []
    applied: dict[str, Any] = {}
    notes: list[str] = []
    if ctx.m.journal_ready:
        applied = ctx.m.journal.applied()
        for run in ctx.m.journal.runs():
            if run["id"] == ctx.run_id:
                continue
            if run["status"] in ("running", "interrupted", "rolling_back"):
                what = "rollback" if run["status"] == "rolling_back" else "run"
                raise CheckFailed(
                    f"{what} {run['id']} of {run['migration_id']} is {run['status']} "
                    f"(phase {run['phase']})",
                    "`safemigrate run` resumes it, `safemigrate rollback` undoes it"
                    if what == "run" else "finish it first: safemigrate rollback",
                )
        latest: dict[str, dict[str, Any]] = {}
        for run in ctx.m.journal.runs():  # newest first
            latest.setdefault(run["migration_id"], run)
        for migration in pending:
            run = latest.get(migration.id)
            if run is None or run["id"] == ctx.run_id or run["status"] != "failed":
                continue
            if _run_changed_something(ctx, run["id"]):
                raise CheckFailed(
                    f"run {run['id']} of {migration.id} failed in phase {run['phase']} after "
                    f"changing the database: {run['error'] or 'no error recorded'}",
                    f"roll it back first: safemigrate rollback --run {run['id']}",
                )
            notes.append(f"run {run['id']} failed before changing anything")
    details = (f"{len(applied)} applied (files unchanged), {len(pending)} pending: "
               f"{', '.join(m.id for m in pending) or 'none'}")
    if notes:
        return Warn(f"{details}; {'; '.join(notes)}")
    return details


def _nearest_existing(path: Path) -> Path:
    path = path.resolve() if not path.is_absolute() else path
    return path if path.exists() else next((p for p in path.parents if p.exists()), Path("/"))


def _disk(ctx: CheckContext) -> str:
    with ctx.read("disk-space") as conn:
        size = ctx.dialect.size_bytes(conn)
    factor = ctx.settings.disk_factor or ctx.m.settings.disk_factor
    needed = int(size * factor)
    places = [("backup folder", _nearest_existing(ctx.m.settings.backup_dir))]
    path = getattr(ctx.dialect, "path", None)
    if path is not None:
        places.append(("database folder", _nearest_existing(Path(path).parent)))
    seen: dict[int, str] = {}
    lines, short = [], []
    for label, where in places:
        device = os.stat(where).st_dev
        if device in seen:
            lines.append(f"{label} {where}: same filesystem as the {seen[device]}")
            continue
        seen[device] = label
        free = shutil.disk_usage(where).free
        lines.append(f"{label} {where}: {_mb(free)} free")
        try:  # the same estimate the backup itself makes
            backup_module.check_free_space(where, needed)
        except DiskFullError:
            short.append(f"{label} {where} has {_mb(free)} free, needs {_mb(needed)}")
    need = f"need {_mb(needed)} ({factor:g} x {_mb(size)} of data)"
    if short:
        raise CheckFailed(f"{'; '.join(short)} ({factor:g} x {_mb(size)} of data)",
                          "free space there, point --backup-dir at a larger disk, or lower "
                          "[checks] disk_factor if you know the migration needs less")
    return f"{'; '.join(lines)}; {need}"


def _mb(size: float) -> str:
    if size >= 1e9:
        return f"{size / 1e9:.1f} GB"
    return f"{size / 1e6:.1f} MB"


def _cpu(ctx: CheckContext) -> str:
    percent = psutil.cpu_percent(interval=0.25)
    load = ""
    with suppress(OSError, AttributeError):
        one, five, _ = os.getloadavg()
        load = f", load average {one:.2f}/{five:.2f} on {os.cpu_count()} CPUs"
    details = f"CPU {percent:.0f}% busy{load} (limit {ctx.settings.max_cpu_percent:g}%)"
    if percent > ctx.settings.max_cpu_percent:
        raise CheckFailed(details)
    return details


def _memory(ctx: CheckContext) -> str:
    memory = psutil.virtual_memory()
    details = (f"memory {memory.percent:.0f}% used, {_mb(memory.available)} available "
               f"(limit {ctx.settings.max_memory_percent:g}%)")
    if memory.percent > ctx.settings.max_memory_percent:
        raise CheckFailed(details)
    return details


def _probe_folder(folder: Path) -> str:
    """Whether a file can be created in `folder` (or in its nearest existing parent, where the
    backup would create it)."""
    if folder.is_dir():
        probe = folder / f".safemigrate-probe-{os.getpid()}-{threading.get_ident()}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, b"ok")
            os.close(fd)
        except OSError as exc:
            raise CheckFailed(f"cannot write in {folder}: {exc.strerror}",
                              "point --backup-dir at a writable folder") from None
        finally:
            with suppress(OSError):
                probe.unlink()
        return f"{folder} writable"
    if folder.exists():
        raise CheckFailed(f"{folder} is not a folder", "point --backup-dir at a folder")
    parent = _nearest_existing(folder)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CheckFailed(f"{folder} does not exist and {parent} is not writable",
                          "create the backup folder, or point --backup-dir elsewhere")
    return f"{folder} will be created in {parent}"


def _backup_destinations(ctx: CheckContext) -> str | Warn:
    from .offsite import probe_offsite

    config = backup_module.backup_settings(ctx.m.settings)
    parts = []
    path = getattr(ctx.dialect, "path", None)
    if path is not None:  # layer 1 lives in the database file
        if not os.access(path, os.W_OK) or not os.access(Path(path).parent, os.W_OK | os.X_OK):
            raise CheckFailed(f"layer shadow: database {path} (or its folder) is not writable",
                              "the shadow copy and the migration itself need write access")
        parts.append("shadow: database writable")
    else:
        parts.append("shadow: in the database")
    parts.append(f"snapshot: {_probe_folder(ctx.m.settings.backup_dir)}")
    if config.offsite:
        try:
            parts.append(f"offsite: {probe_offsite(config)}")
        except Exception as exc:  # noqa: BLE001 - any failure of the remote is the verdict
            message = f"layer offsite ({config.redacted_offsite}) is not writable: {_short(exc)}"
            if config.offsite_required:
                raise CheckFailed(message, "fix the off-site URL or credentials, or set "
                                  "[backup] offsite_required = false") from None
            return Warn(f"{'; '.join(parts)}; {message} (not required: the run goes on)")
    return "; ".join(parts)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def latency_verdict(samples_ms: list[float], max_ms: float) -> tuple[str, str]:
    """('passed' | 'warning' | 'failed', details) for round-trip times in milliseconds:
    failed when the median exceeds `max_ms`, warning when the slowest is far above the median."""
    median = statistics.median(samples_ms)
    worst = max(samples_ms)
    details = (f"{len(samples_ms)} round trips: median {median:.1f} ms, max {worst:.1f} ms "
               f"(limit {max_ms:g} ms)")
    if median > max_ms:
        return "failed", details
    if worst > 3 * median + 20:
        return "warning", details + ": unstable"
    return "passed", details


def _latency(ctx: CheckContext) -> str | Warn:
    samples = []
    with ctx.read("latency") as conn:
        conn.exec_driver_sql("SELECT 1").scalar()  # the first one pays for the connection
        for _ in range(ctx.settings.latency_rounds):
            started = time.perf_counter()
            conn.exec_driver_sql("SELECT 1").scalar()
            samples.append((time.perf_counter() - started) * 1000)
    verdict, details = latency_verdict(samples, ctx.settings.max_latency_ms)
    if verdict == "failed":
        raise CheckFailed(details)
    return Warn(details) if verdict == "warning" else details


# -- data ------------------------------------------------------------------------------------------
def _integrity(ctx: CheckContext) -> str:
    with ctx.read("integrity") as conn:
        check = ctx.dialect.integrity_check if ctx.full else ctx.dialect.quick_integrity_check
        problems = check(conn)
    if problems:
        raise CheckFailed(f"{len(problems)} problems: {'; '.join(problems[:3])}",
                          data={"problems": problems[:20]})
    return "full integrity check ok" if ctx.full else "quick integrity check ok (--full: full check)"


def _foreign_keys(ctx: CheckContext) -> str:
    limit = 1000
    with ctx.read("foreign-keys") as conn:
        problems = ctx.dialect.foreign_key_violations(conn, limit=limit)
    if problems:
        count = f"at least {limit}" if len(problems) >= limit else str(len(problems))
        raise CheckFailed(f"{count} rows break a foreign key, e.g. {'; '.join(problems[:3])}",
                          "fix or delete the orphaned rows (PRAGMA foreign_key_check lists them)",
                          data={"violations": problems[:20]})
    if ctx.is_sqlite:
        return "no foreign-key violations"
    return f"{ctx.dialect.name} enforces foreign keys on every write"


def _touched_tables(ctx: CheckContext, existing: set[str]) -> list[str]:
    tables: set[str] = set()
    for migration in ctx.migrations:
        tables |= migration.tables() - migration.created_tables()
    return sorted(tables & existing)


def _indexes(ctx: CheckContext) -> str:
    problems: list[str] = []
    with ctx.read("indexes") as conn:
        existing = set(ctx.dialect.user_tables(conn))
        for migration in ctx.migrations:
            made: set[tuple[str, str]] = set()
            for idx, step in enumerate(migration.steps):
                if isinstance(step, CreateIndex):
                    if step.table in existing and ctx.dialect.has_index(conn, step.table, str(step.name)):
                        problems.append(f"index {step.name} on {step.table} already exists "
                                        f"({migration.id} step {idx} creates it)")
                    made.add((step.table, str(step.name)))
                elif isinstance(step, DropIndex) and (step.table, step.name) not in made and not (
                        step.table in existing and ctx.dialect.has_index(conn, step.table, step.name)):
                    problems.append(f"index {step.name} on {step.table} does not exist "
                                    f"({migration.id} step {idx} drops it)")
        tables = _touched_tables(ctx, existing)
        problems += ctx.dialect.index_problems(conn, tables)
        count = sum(len(sa.inspect(conn).get_indexes(t)) for t in tables)
    if problems:
        raise CheckFailed(f"{len(problems)} problems: {'; '.join(problems[:3])}",
                          "rebuild a damaged index (REINDEX name), or fix the migration's index "
                          "names", data={"problems": problems[:20]})
    if not tables:
        return "no existing table is touched"
    return f"{count} indexes on {', '.join(tables)} present and valid"


def _backfills(migration: Migration) -> Iterator[tuple[int, Backfill]]:
    for idx, step in enumerate(migration.steps):
        if isinstance(step, Backfill):
            yield idx, step


def _literal_default(step: AddColumn) -> Any:
    default = step.default
    return default if isinstance(default, str | int | float | bool) else None


def _sample_keys(conn: Connection, table: sa.Table, pk: list[sa.Column], wanted: int,
                 windows: int = 10) -> Iterator[list[tuple[Any, ...]]]:
    """Row batches spread over the table: `windows` runs of consecutive keys starting at evenly
    spaced points of an integer key's range (the first `wanted` rows for other keys)."""
    count_limit = conn.execute(sa.select(sa.func.count()).select_from(
        sa.select(pk[0]).limit(wanted + 1).subquery())).scalar() or 0
    low = high = None
    if len(pk) == 1 and count_limit > wanted:
        low, high = conn.execute(sa.select(sa.func.min(pk[0]), sa.func.max(pk[0]))).one()
    if not (isinstance(low, int) and isinstance(high, int)) or isinstance(low, bool):
        yield from _keyset(conn, table, pk, limit=wanted)
        return
    per = max(1, wanted // windows)
    taken: set[Any] = set()
    for i in range(windows):
        start = low + (high - low) * i // windows
        query = table.select().where(pk[0] >= start).order_by(pk[0]).limit(per)
        rows = [tuple(r) for r in conn.execute(query) if r[0] not in taken]
        taken.update(r[0] for r in rows)
        if rows:
            yield rows


def _keyset(conn: Connection, table: sa.Table, pk: list[sa.Column], *, limit: int | None,
            batch: int = 2000) -> Iterator[list[tuple[Any, ...]]]:
    """Keyset pagination in key order: memory stays at one batch whatever the table's size."""
    last: tuple[Any, ...] | None = None
    seen = 0
    while limit is None or seen < limit:
        size = batch if limit is None else min(batch, limit - seen)
        query = table.select().order_by(*pk).limit(size)
        if last is not None:
            query = query.where(pk[0] > last[0] if len(pk) == 1 else sa.tuple_(*pk) > sa.tuple_(*last))
        rows = [tuple(r) for r in conn.execute(query)]
        if not rows:
            return
        seen += len(rows)
        last = tuple(r for r in rows[-1][:len(pk)])
        yield rows
        if len(rows) < size:
            return


def _sample_check(migration: Migration, idx: int, step: Backfill) -> CheckFunc:
    def check(ctx: CheckContext) -> str | Warn | Passed:
        from .engine import transform_rows

        name = sample_name(migration, idx)
        with ctx.read(name) as conn:
            if step.table not in set(ctx.dialect.user_tables(conn)):
                return f"{step.table} is created by the migration: nothing to sample"
            source = reflect(conn, step.table)
            pk = list(source.primary_key.columns)
            if not pk:
                raise CheckFailed(f"table {step.table} has no primary key; Backfill pages by "
                                  "primary key", "add a primary key before backfilling")
            added = {s.column: s for s in migration.steps[:idx]
                     if isinstance(s, AddColumn) and s.table == step.table}
            pk_names = [c.name for c in pk]
            reads = [c for c in step.reads if c not in pk_names]
            missing = [c for c in reads if c not in source.c and c not in added]
            if missing:
                raise CheckFailed(f"Backfill on {step.table} reads {missing[0]!r}, which neither "
                                  "exists nor is added by an earlier step",
                                  "check the Backfill's reads against the table")
            present = [c for c in reads if c in source.c]
            table = sa.select(*pk, *[source.c[c] for c in present]).subquery()
            keys = [table.c[n] for n in pk_names]
            names = pk_names + present + [c for c in reads if c not in source.c]
            defaults = tuple(_literal_default(added[c]) for c in reads if c not in source.c)
            limit = None if ctx.full else ctx.settings.sample_rows
            batches = (_keyset(conn, table, keys, limit=None) if limit is None
                       else _sample_keys(conn, table, keys, limit))
            rows = bad = 0
            examples: list[dict[str, Any]] = []
            for batch in batches:
                batch = [r + defaults for r in batch] if defaults else batch
                _, rejected = transform_rows(step, names, len(pk), batch)
                rows += len(batch)
                bad += len(rejected)
                for key, _row, error in rejected[:max(0, 3 - len(examples))]:
                    examples.append({"key": list(key), "error": error})
        what = f"{'all' if ctx.full else 'sampled'} {rows:,} rows of {step.table}"
        data = {"table": step.table, "step": idx, "rows": rows, "would_quarantine": bad,
                "examples": examples, "full": ctx.full}
        if rows == 0:
            return Passed(f"{step.table} is empty: nothing to transform", data)
        if not bad:
            return Passed(f"{what}: every row transforms and validates", data)
        rate = bad / rows
        shown = "; ".join(f"key {e['key']}: {e['error']}" for e in examples)
        details = f"{what}: {bad:,} would be quarantined ({rate:.1%}), e.g. {shown}"
        if rate > ctx.settings.max_quarantine_rate:
            raise CheckFailed(details, "fix the transform (or the data): more than "
                              f"{ctx.settings.max_quarantine_rate:.0%} of the rows are rejected",
                              data=data)
        return Warn(details + " (quarantined rows are left unchanged and listed)", data)
    return check


def sample_name(migration: Migration, idx: int) -> str:
    return f"sample:{migration.id}#{idx}"


# -- business ------------------------------------------------------------------------------------
def _lock(ctx: CheckContext) -> str | Warn:
    if not ctx.m.journal_ready:
        return "free (no journal yet)"
    holder = current_holder(ctx.m.journal)
    own = getattr(ctx.m, "_lock", None)
    if holder is None or (own is not None and holder["owner"] == own.owner):
        return "free" if holder is None else "held by this run"
    who = (f"{holder['owner'].split(':')[0]} pid {holder['pid']} on {holder['hostname']}, "
           f"run {holder['run_id'] or '-'}, heartbeat {time.time() - holder['heartbeat_at']:.0f}s ago")
    dead = _owner_is_dead(_Row(holder), ctx.m.settings.lock_stale_after)
    if dead:
        return Warn(f"lock left by a dead runner ({who}): {dead}; `run` takes it over")
    raise CheckFailed(f"another safemigrate {who} holds the lock",
                      "wait for it to finish (`safemigrate status` shows it)")


class _Row:
    def __init__(self, data: Mapping[str, Any]) -> None:
        self.__dict__.update(data)


def _health(ctx: CheckContext, conn: Connection) -> dict[str, Any]:
    """The dialect's health figures; where it can list long transactions, those open longer
    than [checks] max_transaction_seconds (so the check can name them)."""
    health = getattr(ctx.dialect, "health", None)
    if not callable(health):
        return {}
    try:
        takes_limit = "long_after" in inspect.signature(health).parameters
    except (TypeError, ValueError):
        takes_limit = False
    if takes_limit:
        return dict(health(conn, long_after=ctx.settings.max_transaction_seconds))
    return dict(health(conn))


def _long_transactions(figures: Mapping[str, Any], limit: int = 5) -> str:
    """Who holds the long transactions: what an operator needs to end one."""
    listed = [t for t in figures.get("long_transaction_list") or [] if isinstance(t, Mapping)]
    named = []
    for t in listed[:limit]:
        about = ", ".join(str(v) for v in (t.get("user"), t.get("application"), t.get("state")) if v)
        seconds = t.get("seconds")
        age = f" {seconds:.0f}s" if isinstance(seconds, int | float) else ""
        named.append(f"pid {t.get('pid')}{f' ({about})' if about else ''}{age}")
    more = f" and {len(listed) - limit} more" if len(listed) > limit else ""
    return "; ".join(named) + more


def _activity(ctx: CheckContext) -> str | Warn:
    problems, warnings, facts = [], [], []
    with ctx.read("activity") as conn:
        writers = ctx.dialect.pending_writers(conn)
        figures = _health(ctx, conn)
    problems += writers
    oldest = figures.get("oldest_transaction_s")
    if isinstance(oldest, int | float) and oldest > ctx.settings.max_transaction_seconds:
        holders = _long_transactions(figures)
        problems.append(f"a transaction has been open for {oldest:.0f}s "
                        f"(limit {ctx.settings.max_transaction_seconds:g}s)"
                        + (f": {holders}" if holders else ""))
    for name, value in figures.items():
        if isinstance(value, int | float) and value > 0 and "lock_wait" in name:
            warnings.append(f"{name} = {value:g}")
        if isinstance(value, list | dict):  # the lists behind the figures go to the data only
            continue
        if value is not None:
            facts.append(f"{name}={value:g}" if isinstance(value, int | float) else f"{name}={value}")
    if problems:
        raise CheckFailed("; ".join(problems), "let the long transaction or writer finish (or end "
                          "it), then run again", data={"health": figures})
    details = ", ".join(facts) if facts else "no long transaction or pending writer seen"
    if warnings:
        return Warn(f"writers are waiting for locks: {', '.join(warnings)}; {details}",
                    {"health": figures})
    return Passed(details, {"health": figures})


def _user_hint(func: Callable[..., Any]) -> str:
    hint = getattr(func, "hint", None)
    if isinstance(hint, str) and hint.strip():
        return hint.strip()
    doc = (func.__doc__ or "").strip()
    return doc.splitlines()[0] if doc else f"see {getattr(func, '__module__', '?')}.{func.__name__}"


def with_hint(hint: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator for a user-defined check: the hint shown when it fails."""
    def mark(func: Callable[..., Any]) -> Callable[..., Any]:
        func.hint = hint  # type: ignore[attr-defined]
        return func
    return mark


def call_read_only(conn: Connection, func: Callable[[Connection], object], name: str) -> str:
    """Call a user's check inside a transaction that is always rolled back, so a check cannot
    change data even by mistake. False fails it; None or True is "ok"; anything else is its
    details."""
    tx = conn.begin()
    try:
        result = func(conn)
    finally:
        tx.rollback()
    if result is False:
        raise CheckFailed(f"{getattr(func, '__name__', name)} returned False")
    return "ok" if result in (None, True) else str(result)


def _user_check(name: str, func: Callable[[Connection], object]) -> CheckFunc:
    def check(ctx: CheckContext) -> str:
        with ctx.read(name) as conn:
            return call_read_only(conn, func, name)
    return check


def _import_custom(entry: str) -> Callable[[Connection], object]:
    module_name, _, func_name = entry.partition(":")
    added = False
    if os.getcwd() not in sys.path:  # a project's own module, next to safemigrate.toml
        sys.path.insert(0, os.getcwd())
        added = True
    try:
        module = importlib.import_module(module_name.strip())
    except Exception as exc:  # noqa: BLE001 - reported as the check's failure
        raise CheckFailed(f"cannot import {module_name}: {_short(exc)}",
                          "custom checks are \"module:function\", importable from the current "
                          "folder or the environment") from None
    finally:
        if added:
            with suppress(ValueError):
                sys.path.remove(os.getcwd())
    func = getattr(module, func_name.strip(), None)
    if not callable(func):
        raise CheckFailed(f"{module_name} has no function {func_name}",
                          "custom checks are \"module:function\"")
    return func


def _custom_check(entry: str) -> CheckFunc:
    def check(ctx: CheckContext) -> str:
        func = _import_custom(entry)
        return _user_check(f"custom:{entry}", func)(ctx)
    return check


def custom_name(entry: str) -> str:
    return f"custom:{entry.partition(':')[2].strip()}"


# -- the suite ---------------------------------------------------------------------------------------
def build_checks(m: Migrator, settings: CheckSettings, migrations: list[Migration]) -> list[Check]:
    checks = [
        Check("database", "environment", _database,
              "check --db / SAFEMIGRATE_DB, that the server is up and the credentials"),
        Check("migration-state", "environment", _migration_state,
              "see `safemigrate status` and `safemigrate history`"),
        Check("disk-space", "environment", _disk, "free space, or point --backup-dir elsewhere"),
        Check("cpu-load", "environment", _cpu,
              "wait for a quieter moment, or raise [checks] max_cpu_percent"),
        Check("memory", "environment", _memory,
              "free memory, or raise [checks] max_memory_percent"),
        Check("backup-destinations", "environment", _backup_destinations,
              "make every backup layer's destination writable"),
    ]
    if m.dialect.name != "sqlite":
        checks.append(Check("latency", "environment", _latency,
                            "a slow or jittery link makes every batch slow: run closer to the "
                            "database, or raise [checks] max_latency_ms"))
    checks += [
        Check("integrity", "data", _integrity,
              "repair the database first (restore a good backup, or dump and reload)"),
        Check("foreign-keys", "data", _foreign_keys, "fix or delete the orphaned rows"),
        Check("indexes", "data", _indexes, "REINDEX a damaged index; fix the migration's index names"),
    ]
    for migration in migrations:
        for idx, step in _backfills(migration):
            checks.append(Check(sample_name(migration, idx), "data", _sample_check(migration, idx, step),
                                "fix the transform or the data; rejected rows are quarantined"))
    checks += [
        Check("lock", "business", _lock, "wait for the other run (`safemigrate status`)"),
        Check("activity", "business", _activity,
              "let long transactions and writers finish, then run again"),
    ]
    for migration in migrations:
        for func in migration.checks:
            name = f"{migration.id}:{getattr(func, '__name__', 'check')}"
            checks.append(Check(name, "business", _user_check(name, func), _user_hint(func)))
    for entry in settings.custom:
        checks.append(Check(custom_name(entry), "business", _custom_check(entry),
                            f"see {entry} (a [checks] custom check)"))
    return checks


def check_names(m: Migrator, migrations: list[Migration] | None = None) -> list[str]:
    """Every check name the suite would run (what --skip-check may name)."""
    if migrations is None:
        try:
            migrations = m.pending()
        except SafeMigrateError:
            migrations = []
    return [c.name for c in build_checks(m, check_settings(m.settings), migrations)]


def validate_skips(m: Migrator, skips: Mapping[str, str],
                   migrations: list[Migration] | None = None) -> None:
    """Bad --skip-check input is a usage error before anything runs: unknown names (a typo
    would silently skip nothing) and skips without a reason."""
    if not skips:
        return
    names = check_names(m, migrations)
    for pattern, reason in skips.items():
        if not str(reason or "").strip():
            raise UsageError(f"--skip-check {pattern} needs a reason",
                             "add --reason TEXT: the skip is journaled with who and why")
        if not fnmatch.filter(names, pattern):
            raise UsageError(f"no check named {pattern!r}",
                             "checks: " + ", ".join(names))


def who() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name in some containers
        user = f"uid{os.getuid()}" if hasattr(os, "getuid") else "unknown"
    return f"{user}@{socket.gethostname()}"


def _skip_reason(name: str, skips: Mapping[str, str]) -> str | None:
    for pattern, reason in skips.items():
        if fnmatch.fnmatchcase(name, pattern):
            return reason
    return None


def _outcome(check: Check, required: bool, verdict: str, details: str, seconds: float,
             hint: str | None = None, data: dict[str, Any] | None = None) -> CheckOutcome:
    if verdict == "failed" and not required:
        verdict = "warning"
    return CheckOutcome(check.name, verdict != "failed", details, seconds, verdict=verdict,
                        category=check.category, hint=hint or check.hint if verdict != "passed" else "",
                        required=required, data=data or {})


def _execute(check: Check, ctx: CheckContext, required: bool) -> CheckOutcome:
    started = time.perf_counter()
    try:
        value = check.func(ctx)
    except CheckFailed as exc:
        return _outcome(check, required, "failed", exc.details, time.perf_counter() - started,
                        exc.hint, exc.data)
    except SafeMigrateError as exc:
        hint = exc.hint if exc.hint != type(exc).default_hint else None
        return _outcome(check, required, "failed", exc.message, time.perf_counter() - started, hint)
    except Exception as exc:  # noqa: BLE001 - a crashing check is a failed check, with its error
        if isinstance(exc, sa.exc.DBAPIError):
            error = ctx.dialect.translate_error(exc)
            hint = error.hint if error.hint != type(error).default_hint else None
            return _outcome(check, required, "failed", error.message,
                            time.perf_counter() - started, hint, {"crashed": True})
        return _outcome(check, required, "failed", f"crashed: {_short(exc)}",
                        time.perf_counter() - started, None, {"crashed": True})
    seconds = time.perf_counter() - started
    if isinstance(value, Warn):
        return _outcome(check, required, "warning", value.details, seconds, None, value.data)
    if isinstance(value, Passed):
        return _outcome(check, required, "passed", value.details, seconds, None, value.data)
    return _outcome(check, required, "passed", "" if value is None else str(value), seconds)


def preflight(m: Migrator, *, full: bool = False, migrations: list[Migration] | None = None,
              run_id: str | None = None, skip: Mapping[str, str] | None = None) -> CheckReport:
    """Run the whole suite and return the report. `migrations` limits the data and user checks
    (default: every pending migration); `run_id` is the run asking (inside `run`)."""
    settings = check_settings(m.settings)
    skips = dict(skip or {})
    if run_id is not None:
        return _preflight(m, settings, skips, full, migrations, run_id)
    # `check` only reads: SQLite transactions begin DEFERRED, so a writer holding the lock is
    # reported (activity) instead of being waited for.
    engine = m.dialect.engine
    begin = engine.get_execution_options().get("sqlite_begin")
    engine.update_execution_options(sqlite_begin="DEFERRED")
    try:
        m._open(write=False)  # an unreachable database is bad input: one line, like any command
        return _preflight(m, settings, skips, full, migrations, run_id)
    finally:
        engine.update_execution_options(sqlite_begin=begin or "IMMEDIATE")


def _preflight(m: Migrator, settings: CheckSettings, skips: dict[str, str], full: bool,
               migrations: list[Migration] | None, run_id: str | None) -> CheckReport:
    pending: list[Migration] | None = None
    pending_error: SafeMigrateError | None = None
    try:
        pending = m.pending()
    except SafeMigrateError as exc:
        pending_error = exc
    if migrations is None:
        migrations = pending or []
    ctx = CheckContext(m, settings, full, list(migrations), pending, pending_error, run_id)
    checks = build_checks(m, settings, ctx.migrations)
    advisory = set(settings.advisory)
    results: dict[str, CheckOutcome] = {}
    runnable: list[Check] = []
    for check in checks:
        required = not any(fnmatch.fnmatchcase(check.name, a) for a in advisory)
        reason = _skip_reason(check.name, skips)
        if reason is not None:
            results[check.name] = CheckOutcome(
                check.name, True, f"skipped by {who()}: {reason}", 0.0, verdict="skipped",
                category=check.category, hint="", required=required,
                data={"skipped_by": who(), "reason": reason})
        else:
            runnable.append(check)
    results.update(_run_concurrently(runnable, ctx, advisory, settings.timeout_seconds))
    ordered = [results[c.name] for c in checks]
    ready = not any(r.verdict == "failed" for r in ordered)
    return CheckReport(ready, ordered, m.display_url, full)


def _run_concurrently(checks: list[Check], ctx: CheckContext, advisory: set[str],
                      timeout: float) -> dict[str, CheckOutcome]:
    """Each check in its own thread; one that overruns its timeout fails (and, on SQLite, its
    statement is interrupted) without holding up the others."""
    out: dict[str, CheckOutcome] = {}
    if not checks:
        return out
    pool = ThreadPoolExecutor(max_workers=len(checks), thread_name_prefix="safemigrate-check")
    try:
        futures: list[tuple[Check, bool, float, Future[CheckOutcome]]] = []
        for check in checks:
            required = not any(fnmatch.fnmatchcase(check.name, a) for a in advisory)
            futures.append((check, required, time.monotonic(), pool.submit(_execute, check, ctx, required)))
        for check, required, started, future in futures:
            remaining = started + timeout - time.monotonic()
            try:
                out[check.name] = future.result(timeout=max(remaining, 0.001))
            except FutureTimeout:
                ctx.interrupt(check.name)
                out[check.name] = _outcome(
                    check, required, "failed", f"timed out after {timeout:g}s",
                    time.monotonic() - started,
                    f"raise [checks] timeout_seconds, or --skip-check {check.name} --reason TEXT")
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return out


def run_checks(m: Migrator, **options: Any) -> list[CheckOutcome]:
    """The checks' outcomes as a list (see `preflight` for the report and its options)."""
    return preflight(m, **options).checks


def journal_report(m: Migrator, run_id: str, report: CheckReport) -> None:
    """Every outcome, and every skip with who and why, into the journal (invariant 6)."""
    for outcome in report.checks:
        level = {"passed": "info", "warning": "warning", "failed": "error",
                 "skipped": "warning"}[outcome.verdict]
        if outcome.verdict == "skipped":
            m.journal.event(run_id, "check.skipped",
                            f"check {outcome.name} skipped by {outcome.data['skipped_by']}: "
                            f"{outcome.data['reason']}", level=level,
                            data={"check": outcome.name, "who": outcome.data["skipped_by"],
                                  "reason": outcome.data["reason"], "required": outcome.required})
            continue
        m.journal.event(run_id, f"check.{outcome.verdict}", f"{outcome.name}: {outcome.details}",
                        level=level, data=outcome.as_dict())


def not_ready_error(report: CheckReport, what: str) -> SafeMigrateError:
    """The error a failed report raises: a full disk is a DiskFullError (one clear cause),
    anything else a NotReadyError naming every failed check, with the first one's hint."""
    bad = report.failed
    summary = "; ".join(f"{c.name}: {c.details}" for c in bad)
    hint = bad[0].hint if bad and bad[0].hint else None
    skip = f"; or --skip-check {bad[0].name} --reason TEXT" if bad else ""
    if [c.name for c in bad] == ["disk-space"]:
        return DiskFullError(f"{what}: not enough free disk: {bad[0].details}", hint)
    return NotReadyError(f"{what} is not ready: {summary}", (hint or NotReadyError.default_hint) + skip)
