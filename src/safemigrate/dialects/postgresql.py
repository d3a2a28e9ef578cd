"""PostgreSQL (psycopg 3): exported-snapshot dumps, scratch-database verification, in-place
restores that keep foreign keys from other tables, concurrent index builds, health figures.

Sessions. Every connection gets ``lock_timeout`` (the dialect's ``lock_timeout`` seconds), a
generous ``statement_timeout`` (``SAFEMIGRATE_PG_STATEMENT_TIMEOUT`` seconds, default 3600, 0 for
none) and ``application_name=safemigrate``, so no statement the migration issues queues behind a
lock for long (a ``LOCK``/``ALTER`` waiting in the lock queue would block every later reader).
The settings are applied with ``set_config`` after connecting (not as startup options), which
also works through pgbouncer.

Snapshots (``snapshot``). Consistency is the contract: one REPEATABLE READ, READ ONLY transaction
takes ACCESS SHARE locks on the tables (no DDL while copying), exports its snapshot, runs
``pg_dump -Fc --snapshot=<id>`` on that snapshot and computes the digests in the same transaction,
so the file and the digests describe the same instant even while the application writes.
``pg_dump``/``pg_restore`` are used only when both are found with a major version >= the
server's (on PATH, ``SAFEMIGRATE_PG_BINDIR``, ``/usr/lib/postgresql/*/bin``, ...); the password
reaches them in ``PGPASSWORD``, never on the command line. Otherwise (or with
``SAFEMIGRATE_PG_DUMP=0``, or ``use_pg_dump=False``) the snapshot is a *COPY export* written by
this module from the same transaction: see ``EXPORT_MAGIC`` for its format. The export covers
ordinary tables with their columns, defaults, identity/serial sequences (and their values),
constraints, indexes, triggers, RLS flags and storage options; it does not carry comments,
policies, grants or column statistics targets (pg_dump's archive does, apart from grants).

Verification (``snapshot_reader``) restores the file into a scratch database
``safemigrate_verify_<random>`` on the same server (same encoding, collation and session
settings, so digests compare), yields a connection to it and drops it WITH (FORCE) afterwards.
Foreign keys, triggers and policies are left out there: the objects they refer to are not in the
snapshot. The migration user therefore needs CREATEDB. Column types or functions the tables use
are recreated there first from the source (``pg_dump --schema-only --exclude-table='*.*'``,
best effort), so enum and domain columns load; with the COPY export (no pg_dump) only types a
fresh database has (built-in, or installed in template0) can be verified.

Restores (``restore_tables``): see its docstring.

Integrity (``integrity_check``): INVALID indexes (``pg_index.indisvalid``; builds in progress
excepted), NOT VALID constraints, and ``amcheck``'s ``bt_index_check`` on every B-tree index of
the user schemas when the extension is installed. safemigrate never installs amcheck itself:
``CREATE EXTENSION`` changes the database's schema, needs privileges the migration user should
not need, and is the DBA's call.

Indexes are created and dropped CONCURRENTLY, outside a transaction; a failed concurrent build
leaves an INVALID index, which ``has_index`` treats as absent and ``prepare_index`` drops
before the build is retried (or, on rollback, before the step is undone).

Change capture (online migrations): row triggers whose functions are SECURITY DEFINER with a
fixed search_path, so application roles need no privilege on safemigrate's log tables; they
are left out of schema fingerprints and of restores.

Driver SQL without parameters is sent as written (see ``_install_events``): a ``%`` in an index
predicate or in RawSQL is not a placeholder, and pg_restore scripts may hold several statements.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO, Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection, Engine

from .._exceptions import (
    BackupError,
    DatabaseError,
    DatabaseLockedError,
    DiskFullError,
    SafeMigrateError,
)
from ..digest import database_digest
from .base import JOURNAL_PREFIX, Dialect

APP_NAME = "safemigrate"
DEFAULT_STATEMENT_TIMEOUT = 3600.0
PGDUMP_MAGIC = b"PGDMP"
# COPY export, version 1. The magic line, then frames: one byte kind, a 4-byte big-endian payload
# length, the payload. H: JSON header {"format": 1, "schema", "server_version", "tables"};
# T: JSON table spec (see PostgreSQLDialect._inspect); D: a chunk of `COPY ... TO STDOUT
# (FORMAT binary)` data of the table whose spec came last (columns: its non-generated columns in
# order); E: end of that table's data; Z: end of file. A file without Z is truncated.
EXPORT_MAGIC = b"SAFEMIGRATE-PGCOPY\n"
EXPORT_VERSION = 1
_FRAME = struct.Struct(">cI")
_CHUNK = 1 << 20
SCRATCH_PREFIX = "safemigrate_verify_"
RESTORE_PREFIX = "safemigrate_restore_"

# pg_restore TOC entries loaded into a scratch database: tables, data, sequences and what only
# refers to the table itself. Foreign keys and triggers refer to objects outside the snapshot.
_SCRATCH_ENTRIES = ("TABLE DATA", "TABLE", "SEQUENCE OWNED BY", "SEQUENCE SET", "SEQUENCE",
                    "DEFAULT", "CHECK CONSTRAINT", "CONSTRAINT", "INDEX ATTACH", "INDEX")
_POST_ENTRIES = ("FK CONSTRAINT", "TRIGGER")
_TOC_LINE = re.compile(r"^\s*\d+;\s+\d+\s+\d+\s+(?P<rest>.*)$")
# Session settings a digest depends on (how values are rendered and parsed).
_DIGEST_SETTINGS = ("TimeZone", "DateStyle", "IntervalStyle", "extra_float_digits", "bytea_output",
                    "lc_monetary", "search_path")
_LIBPQ_ENV = {
    "host": "PGHOST", "hostaddr": "PGHOSTADDR", "port": "PGPORT", "user": "PGUSER",
    "password": "PGPASSWORD", "dbname": "PGDATABASE", "passfile": "PGPASSFILE",
    "service": "PGSERVICE", "options": "PGOPTIONS", "application_name": "PGAPPNAME",
    "connect_timeout": "PGCONNECT_TIMEOUT", "sslmode": "PGSSLMODE", "sslrootcert": "PGSSLROOTCERT",
    "sslcert": "PGSSLCERT", "sslkey": "PGSSLKEY", "sslcrl": "PGSSLCRL",
    "gssencmode": "PGGSSENCMODE", "channel_binding": "PGCHANNELBINDING",
    "target_session_attrs": "PGTARGETSESSIONATTRS", "krbsrvname": "PGKRBSRVNAME",
}
_USER_SCHEMA = ("n.nspname NOT IN ('pg_catalog', 'information_schema') "
                "AND n.nspname !~ '^pg_(toast|temp_)'")
_tool_versions: dict[str, int | None] = {}


def _ident(name: str) -> str:
    """An identifier, always double-quoted (exact case, any character)."""
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _qname(schema: str, name: str) -> str:
    return f"{_ident(schema)}.{_ident(name)}"


def _falsy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("0", "false", "no", "off")


def _tool_major(path: str) -> int | None:
    if path not in _tool_versions:
        try:
            out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30,
                                 check=False).stdout
            match = re.search(r"\(PostgreSQL\)\s+(\d+)", out)
            _tool_versions[path] = int(match.group(1)) if match else None
        except (OSError, subprocess.SubprocessError):
            _tool_versions[path] = None
    return _tool_versions[path]


def _toc_entries(toc: str) -> list[tuple[str, str, str]]:
    """(line, description, rest) of each entry of `pg_restore -l` output."""
    out = []
    for line in toc.splitlines():
        match = _TOC_LINE.match(line)
        if match is None or line.lstrip().startswith(";"):
            continue
        rest = match.group("rest")
        for desc in sorted(_SCRATCH_ENTRIES + _POST_ENTRIES, key=len, reverse=True):
            if rest.startswith(desc + " "):
                out.append((line, desc, rest[len(desc) + 1:]))
                break
        else:
            out.append((line, "", rest))
    return out


# -- the COPY export --------------------------------------------------------------------------------
class _ExportWriter:
    def __init__(self, handle: IO[bytes]) -> None:
        self.handle = handle
        handle.write(EXPORT_MAGIC)

    def frame(self, kind: bytes, payload: bytes) -> None:
        self.handle.write(_FRAME.pack(kind, len(payload)))
        self.handle.write(payload)

    def json(self, kind: bytes, value: Any) -> None:
        self.frame(kind, json.dumps(value, sort_keys=True).encode())


class _ExportArchive:
    """A COPY export opened for reading: table specs, and where each table's data starts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.header: dict[str, Any] = {}
        self.tables: dict[str, tuple[dict[str, Any], int]] = {}
        with open(path, "rb") as handle:
            if handle.read(len(EXPORT_MAGIC)) != EXPORT_MAGIC:
                raise BackupError(f"{path.name} is not a safemigrate PostgreSQL export")
            while True:
                kind, length = self._head(handle)
                if kind == b"D":
                    handle.seek(length, os.SEEK_CUR)
                    continue
                payload = handle.read(length)
                if len(payload) != length:
                    raise BackupError(f"{path.name} is truncated")
                if kind == b"Z":
                    break
                if kind == b"E":
                    continue
                try:
                    value = json.loads(payload)
                except ValueError:
                    raise BackupError(f"{path.name} is corrupted (unreadable {kind!r} frame)") from None
                if kind == b"H":
                    self.header = value
                elif kind == b"T":
                    self.tables[value["table"]] = (value, handle.tell())
                else:
                    raise BackupError(f"{path.name} is corrupted (unknown frame {kind!r})")
        if self.header.get("format") != EXPORT_VERSION:
            raise BackupError(f"{path.name}: unsupported export format {self.header.get('format')!r}")

    def _head(self, handle: IO[bytes]) -> tuple[bytes, int]:
        head = handle.read(_FRAME.size)
        if len(head) != _FRAME.size:
            raise BackupError(f"{self.path.name} is truncated (no end marker)")
        kind, length = _FRAME.unpack(head)
        if kind not in (b"H", b"T", b"D", b"E", b"Z"):
            raise BackupError(f"{self.path.name} is corrupted (unknown frame {kind!r})")
        return kind, length

    @property
    def schema(self) -> str:
        return str(self.header["schema"])

    def data(self, table: str) -> Iterator[bytes]:
        _, offset = self.tables[table]
        with open(self.path, "rb") as handle:
            handle.seek(offset)
            while True:
                kind, length = self._head(handle)
                if kind != b"D":
                    return
                chunk = handle.read(length)
                if len(chunk) != length:
                    raise BackupError(f"{self.path.name} is truncated")
                yield chunk


# -- where a restore reads the snapshot's tables from --------------------------------------------
class _Source:
    """Specs (definitions), data and the foreign keys + triggers of the snapshot's tables."""

    specs: dict[str, dict[str, Any]]

    def data(self, table: str) -> Iterator[bytes]:  # binary COPY of the spec's copy columns
        raise NotImplementedError

    def post_sql(self, table: str) -> list[str]:  # foreign keys and triggers, run last
        raise NotImplementedError


class _ExportSource(_Source):
    def __init__(self, dialect: PostgreSQLDialect, archive: _ExportArchive) -> None:
        self.dialect = dialect
        self.archive = archive
        self.specs = {name: spec for name, (spec, _) in archive.tables.items()}

    def data(self, table: str) -> Iterator[bytes]:
        return self.archive.data(table)

    def post_sql(self, table: str) -> list[str]:
        return self.dialect._links_sql(self.specs[table])


class _ScratchSource(_Source):
    """A pg_dump archive restored into a scratch database; foreign keys and triggers come as
    SQL from the archive itself (they could not be created in the scratch database)."""

    def __init__(self, dialect: PostgreSQLDialect, conn: Connection, schema: str,
                 post: dict[str, str]) -> None:
        self.conn = conn
        self.schema = schema
        self.post = post
        tables = dialect.user_tables(conn)
        specs = {t: dialect._inspect(conn, schema, t, values=True) for t in tables}
        self.specs = {t: s for t, s in specs.items() if s is not None}

    def data(self, table: str) -> Iterator[bytes]:
        spec = self.specs[table]
        raw = self.conn.connection.dbapi_connection
        sql = (f"COPY {_qname(self.schema, table)} ({_column_list(spec)}) "
               "TO STDOUT (FORMAT binary)")
        with raw.cursor() as cur, cur.copy(sql) as copy:  # type: ignore[union-attr]
            for chunk in copy:
                yield bytes(chunk)

    def post_sql(self, table: str) -> list[str]:
        script = self.post.get(table)
        return [script] if script else []


def _copy_columns(spec: dict[str, Any]) -> list[str]:
    return [c["name"] for c in spec["columns"] if not c["generated"]]


def _column_list(spec: dict[str, Any]) -> str:
    return ", ".join(_ident(c) for c in _copy_columns(spec))


class PostgreSQLDialect(Dialect):
    """PostgreSQL 12 or newer through psycopg 3."""

    name = "postgresql"
    transactional_ddl = True

    def rebuild_indexes_sql(self, conn: Connection, table: str) -> list[str]:
        return [f"REINDEX TABLE {self.quote(table)}"]

    def __init__(self, url: URL, *, lock_timeout: float = 10.0, use_pg_dump: bool | None = None,
                 statement_timeout: float | None = None) -> None:
        super().__init__(url, lock_timeout=lock_timeout)
        self.use_pg_dump = use_pg_dump
        if statement_timeout is None:
            env = os.environ.get("SAFEMIGRATE_PG_STATEMENT_TIMEOUT", "").strip()
            statement_timeout = float(env) if env else DEFAULT_STATEMENT_TIMEOUT
        self.statement_timeout = statement_timeout
        self._schema: str | None = None

    # -- connections -----------------------------------------------------------------------------
    def _connect_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {"connect_timeout": 10}
        if "application_name" not in self.url.query:
            args["application_name"] = APP_NAME
        return args

    def _session_settings(self) -> dict[str, str]:
        # psycopg parses intervals only in the 'postgres' style, whatever the database's default
        return {"lock_timeout": f"{max(int(self.lock_timeout * 1000), 1)}ms",
                "statement_timeout": f"{max(int(self.statement_timeout * 1000), 0)}ms",
                "IntervalStyle": "postgres"}

    def _install_events(self, engine: Engine, extra: dict[str, str] | None = None) -> None:
        settings = {**self._session_settings(), **(extra or {})}

        @sa.event.listens_for(engine, "connect")
        def _connect(dbapi_connection: Any, _record: Any) -> None:
            with dbapi_connection.cursor() as cur:
                for name, value in settings.items():
                    cur.execute("SELECT pg_catalog.set_config(%s, %s, false)", (name, value))
            dbapi_connection.commit()

        @sa.event.listens_for(engine, "before_cursor_execute", retval=True)
        def _plain_sql(conn: Connection, cursor: Any, statement: str, parameters: Any,
                       context: Any, executemany: bool) -> tuple[str, Any]:
            # Driver SQL without parameters (DDL, pg_get_indexdef output, RawSQL, pg_restore
            # scripts) goes as written: a literal % stays a %, and several statements may run.
            if (not parameters and not executemany and context is not None
                    and context.compiled is None):
                return statement, None
            return statement, parameters

    def create_engine(self) -> Engine:
        engine = sa.create_engine(self.url, connect_args=self._connect_args(), pool_size=2,
                                  max_overflow=8, pool_pre_ping=True)
        self._install_events(engine)
        return engine

    def _private_engine(self, database: str | None = None,
                        extra: dict[str, str] | None = None) -> Engine:
        """A NullPool engine of our own (for scratch databases and restores: their session
        state never reaches the shared pool)."""
        url = self.url if database is None else self.url.set(database=database)
        engine = sa.create_engine(url, connect_args=self._connect_args(), poolclass=sa.pool.NullPool)
        self._install_events(engine, extra)
        return engine

    def _libpq_env(self, database: str | None = None) -> dict[str, str]:
        """The environment that points pg_dump/pg_restore at our server (password included:
        never on a command line)."""
        url = self.url if database is None else self.url.set(database=database)
        _, kwargs = self.engine.dialect.create_connect_args(url)
        env = dict(os.environ)
        env.setdefault("PGAPPNAME", APP_NAME)
        env.setdefault("PGCONNECT_TIMEOUT", "10")
        for key, value in kwargs.items():
            if key in _LIBPQ_ENV and value is not None:
                env[_LIBPQ_ENV[key]] = str(value)
        return env

    def _where(self) -> str:
        host = self.url.host or self.url.query.get("host") or "local socket"
        if isinstance(host, tuple):
            host = ",".join(host)
        return f"{host}:{self.url.port or 5432}"

    def _scrub(self, text: str) -> str:
        password = self.url.password
        if password:
            text = text.replace(str(password), "***")
        return text

    def ping(self) -> None:
        try:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1").scalar()
        except sa.exc.DBAPIError as exc:
            raise self.translate_error(exc) from None

    def is_lock_timeout(self, exc: BaseException) -> bool:
        orig = getattr(exc, "orig", None) or exc
        state = getattr(orig, "sqlstate", None)
        if state in ("55P03", "40P01"):  # lock_not_available, deadlock_detected
            return True
        return state == "57014" and "lock timeout" in str(orig).lower()

    def translate_error(self, exc: BaseException) -> SafeMigrateError:
        if isinstance(exc, SafeMigrateError):
            return exc
        orig = getattr(exc, "orig", None) or exc
        state = getattr(orig, "sqlstate", None) or ""
        text = self._scrub(str(orig).strip())
        lower = text.lower()
        first = text.splitlines()[0] if text else type(orig).__name__
        where, db, user = self._where(), self.url.database, self.url.username
        if self.is_lock_timeout(orig) or "lock timeout" in lower:
            what = "a deadlock" if state == "40P01" else f"{self.lock_timeout:g}s waiting for a lock"
            return DatabaseLockedError(f"gave up after {what} in database {db} at {where}: {first}")
        if state == "57014" and "statement timeout" in lower:
            return DatabaseError(
                f"a statement ran longer than {self.statement_timeout:g}s on {db} at {where}",
                "raise SAFEMIGRATE_PG_STATEMENT_TIMEOUT (seconds; 0 = no limit)")
        if state == "3D000" or re.search(r'database ".*" does not exist', lower):
            return DatabaseError(
                f"database {db!r} does not exist on PostgreSQL at {where}",
                "create it first (safemigrate never creates the target database) or fix --db")
        if (state in ("28P01", "28000") or "authentication failed" in lower
                or "no pg_hba.conf entry" in lower or re.search(r'role ".*" does not exist', lower)):
            return DatabaseError(
                f"PostgreSQL at {where} refused user {user!r}: {first}",
                "check the user name and password in --db (and pg_hba.conf on the server)")
        if "connection refused" in lower or "is the server running" in lower:
            return DatabaseError(
                f"cannot connect to PostgreSQL at {where}: connection refused",
                "is the server running and accepting TCP/IP connections on that host and port? "
                "check --db")
        if "timeout expired" in lower:
            return DatabaseError(f"connecting to PostgreSQL at {where} timed out",
                                 "check the host and port in --db, and firewalls on the way")
        if "could not translate host name" in lower or "name or service not known" in lower:
            return DatabaseError(f"unknown host in --db ({where})", "check the host name in --db")
        if state == "53100" or "no space left" in lower or "could not extend file" in lower:
            return DiskFullError(f"PostgreSQL at {where} is out of disk space: {first}",
                                 "free space on the database server")
        if state.startswith("08") or "server closed the connection" in lower:
            return DatabaseError(f"lost the connection to PostgreSQL at {where}: {first}",
                                 "check the server; `safemigrate run` resumes from the journal")
        if state == "42501":
            return DatabaseError(f"permission denied on {db} at {where}: {first}",
                                 "grant the migration user the privileges it needs")
        return DatabaseError(f"PostgreSQL error: {first}")

    # -- facts -----------------------------------------------------------------------------------
    def server_version(self, conn: Connection) -> str:
        return "PostgreSQL " + str(conn.exec_driver_sql("SHOW server_version").scalar())

    def _server_major(self, conn: Connection) -> int:
        return int(conn.exec_driver_sql("SELECT current_setting('server_version_num')").scalar()) // 10000

    def size_bytes(self, conn: Connection) -> int:
        return int(conn.exec_driver_sql("SELECT pg_database_size(current_database())").scalar() or 0)

    def current_schema(self, conn: Connection) -> str:
        """The schema unqualified table names resolve to (first of search_path)."""
        schema = conn.exec_driver_sql("SELECT current_schema()").scalar()
        if schema is None:
            raise DatabaseError("no schema of search_path exists in this database",
                                "set search_path (e.g. ?options=-csearch_path%3Dpublic in --db)")
        return str(schema)

    def _table_name(self, conn: Connection, table: str) -> str:
        return _qname(self.current_schema(conn), table)

    def row_count(self, conn: Connection, table: str, estimate: bool = False) -> int:
        """Exact count(*), or the planner's estimate (pg_class.reltuples; the statistics
        collector's live tuples for a table never analyzed) when `estimate`."""
        qt = self._table_name(conn, table)
        if estimate:
            row = conn.exec_driver_sql(
                "SELECT c.reltuples, c.relpages, s.n_live_tup FROM pg_catalog.pg_class c "
                "LEFT JOIN pg_catalog.pg_stat_user_tables s ON s.relid = c.oid "
                "WHERE c.oid = %s::regclass", (qt,)).first()
            if row is not None:
                reltuples, relpages, live = row
                if reltuples is not None and reltuples >= 0 and (relpages or reltuples):
                    return int(reltuples)
                if live is not None:
                    return int(live)
        return int(conn.exec_driver_sql(f"SELECT count(*) FROM {qt}").scalar() or 0)

    def health(self, conn: Connection, tables: list[str] | None = None, *,
               long_after: float = 60.0) -> dict[str, Any]:
        """Load figures for the guards (numbers, None when not visible), as GitLab's health
        indicators read them:

        connections / max_connections / active   client backends (active: running a statement)
        lock_waits, lock_wait_max_ms              sessions waiting for a lock now, the longest wait
        blocked_by_safemigrate                    of those, sessions waiting on a safemigrate one
        long_transactions, oldest_transaction_s  transactions open longer than `long_after` s,
                                                  the age of the oldest open transaction
        replica_lag_s, replica_lag_bytes          replay lag of the slowest replica (None without
                                                  replicas), or of this server when a standby
        autovacuum_workers                        autovacuum running on `tables` (all when None)

        plus details that are not figures: `long_transaction_list` and `autovacuum_tables`.
        """
        x = conn.exec_driver_sql
        connections, active, waiting, max_conn = x(
            "SELECT count(*), count(*) FILTER (WHERE state = 'active' AND pid <> pg_backend_pid()), "
            "count(*) FILTER (WHERE wait_event_type = 'Lock'), "
            "current_setting('max_connections')::int "
            "FROM pg_catalog.pg_stat_activity WHERE backend_type = 'client backend'").one()
        wait_since = "waitstart" if self._server_major(conn) >= 14 else "NULL::timestamptz"
        longest_wait = x(f"SELECT EXTRACT(EPOCH FROM clock_timestamp() - min({wait_since}))::float8 "
                         "FROM pg_catalog.pg_locks WHERE NOT granted").scalar()
        oldest = x("SELECT EXTRACT(EPOCH FROM clock_timestamp() - min(xact_start))::float8 "
                   "FROM pg_catalog.pg_stat_activity WHERE backend_type = 'client backend' "
                   "AND pid <> pg_backend_pid()").scalar()
        long_rows = x(
            "SELECT pid, usename, application_name, state, wait_event_type, "
            "EXTRACT(EPOCH FROM clock_timestamp() - xact_start)::float8 "
            "FROM pg_catalog.pg_stat_activity WHERE backend_type = 'client backend' "
            "AND xact_start IS NOT NULL AND pid <> pg_backend_pid() "
            "AND clock_timestamp() - xact_start > make_interval(secs => %s) ORDER BY xact_start LIMIT 20",
            (float(long_after),)).all()
        blocked = x(
            "SELECT count(*) FROM pg_catalog.pg_stat_activity w WHERE w.wait_event_type = 'Lock' "
            "AND EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity b "
            "WHERE b.pid = ANY (pg_catalog.pg_blocking_pids(w.pid)) AND b.application_name = %s)",
            (APP_NAME,)).scalar()
        in_recovery = bool(x("SELECT pg_is_in_recovery()").scalar())
        replicas: int | None
        if in_recovery:
            lag = x("SELECT EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp())::float8").scalar()
            lag_bytes, replicas = None, None
        else:
            rows = x("SELECT EXTRACT(EPOCH FROM replay_lag)::float8, "
                     "pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::float8 "
                     "FROM pg_catalog.pg_stat_replication").all()
            replicas = len(rows)
            lags = [r[0] for r in rows if r[0] is not None]
            sizes = [r[1] for r in rows if r[1] is not None]
            lag = max(lags) if lags else (0.0 if rows else None)
            lag_bytes = int(max(sizes)) if sizes else None
        vacuum_sql = (
            "SELECT n.nspname, c.relname, p.phase, a.pid, "
            "position('wraparound' in coalesce(a.query, '')) > 0 "
            "FROM pg_catalog.pg_stat_progress_vacuum p "
            "JOIN pg_catalog.pg_class c ON c.oid = p.relid "
            "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
            "JOIN pg_catalog.pg_stat_activity a ON a.pid = p.pid "
            "WHERE p.datname = current_database() AND a.backend_type = 'autovacuum worker'")
        if tables is None:
            vacuum = x(vacuum_sql).all()
        else:
            vacuum = x(vacuum_sql + " AND n.nspname = current_schema() AND c.relname = ANY(%s)",
                       (list(tables),)).all()
        return {
            "connections": int(connections), "max_connections": int(max_conn),
            "active": int(active), "lock_waits": int(waiting),
            "lock_wait_max_ms": round(float(longest_wait) * 1000, 1) if longest_wait is not None else 0.0,
            "blocked_by_safemigrate": int(blocked or 0),
            "long_transactions": len(long_rows),
            "oldest_transaction_s": round(float(oldest), 3) if oldest is not None else 0.0,
            "replicas": replicas,
            "replica_lag_s": None if lag is None else float(lag),
            "replica_lag_bytes": lag_bytes,
            "autovacuum_workers": len(vacuum),
            "long_transaction_list": [
                {"pid": r[0], "user": r[1], "application": r[2], "state": r[3],
                 "waiting_on": r[4], "seconds": round(float(r[5]), 3)} for r in long_rows],
            "autovacuum_tables": [{"table": r[1], "schema": r[0], "phase": r[2], "pid": r[3],
                                   "wraparound": bool(r[4])} for r in vacuum],
        }

    # -- catalog introspection -------------------------------------------------------------------
    def _inspect(self, conn: Connection, schema: str, table: str, *,
                 values: bool = False) -> dict[str, Any] | None:
        """A table's definition from pg_catalog (None when it does not exist). Names, never
        column numbers, so a dropped column leaves no trace. With `values`, the current values
        of its sequences too (what a snapshot records)."""
        x = conn.exec_driver_sql
        row = x("SELECT c.oid, c.relkind, c.relpersistence, c.reloptions, c.relrowsecurity, "
                "c.relforcerowsecurity FROM pg_catalog.pg_class c "
                "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')",
                (schema, table)).first()
        if row is None:
            return None
        oid = int(row[0])
        columns = [
            {"name": r[0], "type": r[1], "notnull": bool(r[2]), "default": r[3],
             "identity": r[4] or "", "generated": r[5] or "", "collation": r[6]}
            for r in x(
                "SELECT a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod), a.attnotnull, "
                "pg_catalog.pg_get_expr(d.adbin, d.adrelid), a.attidentity, a.attgenerated, "
                "CASE WHEN a.attcollation <> 0 AND a.attcollation <> t.typcollation THEN "
                "pg_catalog.quote_ident(cn.nspname) || '.' || pg_catalog.quote_ident(co.collname) END "
                "FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type t ON t.oid = a.atttypid "
                "LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum "
                "LEFT JOIN pg_catalog.pg_collation co ON co.oid = a.attcollation "
                "LEFT JOIN pg_catalog.pg_namespace cn ON cn.oid = co.collnamespace "
                "WHERE a.attrelid = %s::oid AND a.attnum > 0 AND NOT a.attisdropped "
                "ORDER BY a.attnum", (oid,))
        ]
        primary_key = [r[0] for r in x(
            "SELECT a.attname FROM pg_catalog.pg_index i "
            "CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY k(attnum, ord) "
            "JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum "
            "WHERE i.indrelid = %s::oid AND i.indisprimary ORDER BY k.ord", (oid,))]
        constraints = [
            {"name": r[0], "type": r[1], "def": r[2]}
            for r in x("SELECT conname, contype::text, pg_catalog.pg_get_constraintdef(oid) "
                       "FROM pg_catalog.pg_constraint WHERE conrelid = %s::oid "
                       "AND contype IN ('p', 'u', 'x', 'c', 'f') ORDER BY conname", (oid,))
        ]
        indexes = [
            {"name": r[0], "def": r[1], "valid": bool(r[2]), "constraint": bool(r[3])}
            for r in x(
                "SELECT ci.relname, pg_catalog.pg_get_indexdef(i.indexrelid), "
                "i.indisvalid AND i.indisready, EXISTS (SELECT 1 FROM pg_catalog.pg_constraint k "
                "WHERE k.conindid = i.indexrelid AND k.conrelid = i.indrelid "
                "AND k.contype IN ('p', 'u', 'x')) "
                "FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class ci ON ci.oid = i.indexrelid "
                "WHERE i.indrelid = %s::oid ORDER BY ci.relname", (oid,))
        ]
        triggers = [
            {"name": r[0], "def": r[1], "enabled": str(r[2])}
            for r in x("SELECT tgname, pg_catalog.pg_get_triggerdef(oid), tgenabled::text "
                       "FROM pg_catalog.pg_trigger WHERE tgrelid = %s::oid AND NOT tgisinternal "
                       "ORDER BY tgname", (oid,))
        ]
        sequences = []
        for r in x(
            "SELECT sn.nspname, s.relname, a.attname, d.deptype = 'i', "
            "pg_catalog.format_type(sq.seqtypid, NULL), sq.seqstart, sq.seqincrement, sq.seqmin, "
            "sq.seqmax, sq.seqcache, sq.seqcycle FROM pg_catalog.pg_depend d "
            "JOIN pg_catalog.pg_class s ON s.oid = d.objid AND s.relkind = 'S' "
            "JOIN pg_catalog.pg_namespace sn ON sn.oid = s.relnamespace "
            "JOIN pg_catalog.pg_sequence sq ON sq.seqrelid = s.oid "
            "JOIN pg_catalog.pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid "
            "WHERE d.classid = 'pg_catalog.pg_class'::regclass "
            "AND d.refclassid = 'pg_catalog.pg_class'::regclass "
            "AND d.refobjid = %s::oid AND d.deptype IN ('a', 'i') ORDER BY a.attnum, s.relname",
            (oid,),
        ):
            seq = {"schema": r[0], "name": r[1], "column": r[2], "identity": bool(r[3]),
                   "type": r[4], "start": int(r[5]), "increment": int(r[6]), "min": int(r[7]),
                   "max": int(r[8]), "cache": int(r[9]), "cycle": bool(r[10])}
            if values:
                last, called = x(f"SELECT last_value, is_called FROM {_qname(r[0], r[1])}").one()
                seq.update(last_value=int(last), is_called=bool(called))
            sequences.append(seq)
        referenced_by = [
            {"schema": r[0], "table": r[1], "name": r[2], "def": r[3], "columns": list(r[4]),
             "ref_columns": list(r[5])}
            for r in x(
                "SELECT n.nspname, c.relname, con.conname, pg_catalog.pg_get_constraintdef(con.oid), "
                "ARRAY(SELECT a.attname::text FROM unnest(con.conkey) WITH ORDINALITY k(n, o) "
                "JOIN pg_catalog.pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.n "
                "ORDER BY k.o), "
                "ARRAY(SELECT a.attname::text FROM unnest(con.confkey) WITH ORDINALITY k(n, o) "
                "JOIN pg_catalog.pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.n "
                "ORDER BY k.o) "
                "FROM pg_catalog.pg_constraint con JOIN pg_catalog.pg_class c ON c.oid = con.conrelid "
                "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
                "WHERE con.contype = 'f' AND con.confrelid = %s::oid AND con.conrelid <> con.confrelid "
                "ORDER BY n.nspname, c.relname, con.conname", (oid,))
        ]
        return {
            "schema": schema, "table": table, "kind": str(row[1]), "persistence": str(row[2]),
            "options": list(row[3] or []), "rls": bool(row[4]), "force_rls": bool(row[5]),
            "columns": columns, "primary_key": primary_key, "constraints": constraints,
            "indexes": indexes, "triggers": triggers, "sequences": sequences,
            "referenced_by": referenced_by,
        }

    def schema_fingerprint(self, conn: Connection, tables: list[str]) -> dict[str, Any]:
        """Per table: columns (name, type, NOT NULL, default, identity, generated, collation) in
        order, primary key, constraints, indexes (definition, validity), triggers (not
        safemigrate's own), owned sequences, foreign keys of other tables pointing at it, and
        storage options. Built from names, so ADD COLUMN + DROP COLUMN leaves it unchanged."""
        schema = self.current_schema(conn)
        out: dict[str, Any] = {}
        for table in sorted(tables):
            spec = self._inspect(conn, schema, table)
            if spec is None:
                out[table] = None
                continue
            out[table] = {
                "kind": [spec["kind"], spec["persistence"], sorted(spec["options"]),
                         spec["rls"], spec["force_rls"]],
                "columns": [[c["name"], c["type"], c["notnull"], c["default"], c["identity"],
                             c["generated"], c["collation"]] for c in spec["columns"]],
                "primary_key": spec["primary_key"],
                "constraints": [[c["name"], c["type"], c["def"]] for c in spec["constraints"]],
                "indexes": [[i["name"], i["def"], i["valid"]] for i in spec["indexes"]],
                "triggers": [[t["name"], t["def"], t["enabled"]] for t in spec["triggers"]
                             if not t["name"].startswith(JOURNAL_PREFIX)],
                "sequences": [[s["column"], s["schema"], s["name"], s["identity"], s["type"],
                               s["start"], s["increment"], s["min"], s["max"], s["cache"],
                               s["cycle"]] for s in spec["sequences"]],
                "referenced_by": [[f"{r['schema']}.{r['table']}", r["name"], r["def"]]
                                  for r in spec["referenced_by"]],
            }
        return out

    # -- integrity ---------------------------------------------------------------------------------
    def integrity_check(self, conn: Connection) -> list[str]:
        """INVALID indexes, NOT VALID constraints, and amcheck's bt_index_check on every B-tree
        index of the user schemas when amcheck is installed (never installed by safemigrate)."""
        return self._invalid_indexes(conn) + self._unvalidated(conn) + self._amcheck(conn)

    def quick_integrity_check(self, conn: Connection) -> list[str]:
        """The catalog checks without amcheck (which reads every index)."""
        return self._invalid_indexes(conn) + self._unvalidated(conn)

    def index_problems(self, conn: Connection, tables: list[str]) -> list[str]:
        """INVALID indexes of `tables`, and amcheck's findings on their B-tree indexes (with the
        heap cross-check: every row is in the index) when amcheck is installed."""
        return self._invalid_indexes(conn, tables) + self._amcheck(conn, tables)

    def _table_filter(self, tables: list[str] | None, alias: str) -> tuple[str, tuple[Any, ...]]:
        if tables is None:
            return "", ()
        return (f" AND n.nspname = current_schema() AND {alias}.relname = ANY(%s)", (list(tables),))

    def _invalid_indexes(self, conn: Connection, tables: list[str] | None = None) -> list[str]:
        where, params = self._table_filter(tables, "t")
        return [
            f"index {r[0]}.{r[2]} on {r[1]} is INVALID (left by a failed CREATE INDEX "
            "CONCURRENTLY or REINDEX): drop it and build it again"
            for r in conn.exec_driver_sql(
                "SELECT n.nspname, t.relname, ci.relname FROM pg_catalog.pg_index i "
                "JOIN pg_catalog.pg_class ci ON ci.oid = i.indexrelid "
                "JOIN pg_catalog.pg_class t ON t.oid = i.indrelid "
                "JOIN pg_catalog.pg_namespace n ON n.oid = t.relnamespace "
                f"WHERE NOT (i.indisvalid AND i.indisready) AND {_USER_SCHEMA} "
                "AND i.indexrelid NOT IN (SELECT index_relid FROM "  # builds in progress
                "pg_catalog.pg_stat_progress_create_index WHERE index_relid IS NOT NULL)"
                f"{where} ORDER BY 1, 2, 3", params)
        ]

    def _unvalidated(self, conn: Connection) -> list[str]:
        return [
            f"constraint {r[2]} on {r[0]}.{r[1]} is NOT VALID: existing rows were never checked "
            "(ALTER TABLE ... VALIDATE CONSTRAINT)"
            for r in conn.exec_driver_sql(
                "SELECT n.nspname, c.relname, con.conname FROM pg_catalog.pg_constraint con "
                "JOIN pg_catalog.pg_class c ON c.oid = con.conrelid "
                "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
                f"WHERE NOT con.convalidated AND {_USER_SCHEMA} ORDER BY 1, 2, 3")
        ]

    def _amcheck(self, conn: Connection, tables: list[str] | None = None) -> list[str]:
        x = conn.exec_driver_sql
        amcheck = x("SELECT n.nspname FROM pg_catalog.pg_extension e "
                    "JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace "
                    "WHERE e.extname = 'amcheck'").scalar()
        if amcheck is None:
            return []
        where, params = self._table_filter(tables, "t")
        indexes = x(
            "SELECT ci.oid, n.nspname, ci.relname FROM pg_catalog.pg_index i "
            "JOIN pg_catalog.pg_class ci ON ci.oid = i.indexrelid "
            "JOIN pg_catalog.pg_class t ON t.oid = i.indrelid "
            "JOIN pg_catalog.pg_am am ON am.oid = ci.relam "
            "JOIN pg_catalog.pg_namespace n ON n.oid = t.relnamespace "
            "WHERE am.amname = 'btree' AND i.indisvalid AND i.indisready "
            f"AND ci.relpersistence <> 't' AND {_USER_SCHEMA}{where} ORDER BY 2, 3", params).all()
        heap = "true" if tables is not None else "false"
        problems = []
        for oid, schema, name in indexes:
            try:
                with conn.begin_nested():
                    x(f"SELECT {_ident(amcheck)}.bt_index_check(%s::oid::regclass, {heap})", (int(oid),))
            except sa.exc.DBAPIError as exc:
                if self.is_lock_timeout(exc):
                    continue  # busy, not broken: checked next time
                message = self._scrub(str(getattr(exc, "orig", exc))).splitlines()[0]
                problems.append(f"amcheck: index {schema}.{name}: {message}")
        return problems

    def foreign_key_violations(self, conn: Connection, limit: int = 100) -> list[str]:
        """Rows that NOT VALID foreign keys were never checked against and that point nowhere
        (validated foreign keys are enforced by the server)."""
        x = conn.exec_driver_sql
        out: list[str] = []
        for schema, table, name, ref_schema, ref_table, cols, ref_cols in x(
            "SELECT n.nspname, c.relname, con.conname, rn.nspname, r.relname, "
            "ARRAY(SELECT a.attname::text FROM unnest(con.conkey) WITH ORDINALITY k(n, o) "
            "JOIN pg_catalog.pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.n "
            "ORDER BY k.o), "
            "ARRAY(SELECT a.attname::text FROM unnest(con.confkey) WITH ORDINALITY k(n, o) "
            "JOIN pg_catalog.pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.n "
            "ORDER BY k.o) "
            "FROM pg_catalog.pg_constraint con JOIN pg_catalog.pg_class c ON c.oid = con.conrelid "
            "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
            "JOIN pg_catalog.pg_class r ON r.oid = con.confrelid "
            "JOIN pg_catalog.pg_namespace rn ON rn.oid = r.relnamespace "
            f"WHERE con.contype = 'f' AND NOT con.convalidated AND {_USER_SCHEMA} ORDER BY 1, 2, 3"):
            if len(out) >= limit:
                break
            present = " AND ".join(f"c.{_ident(col)} IS NOT NULL" for col in cols)
            match = " AND ".join(f"p.{_ident(b)} = c.{_ident(a)}"
                                 for a, b in zip(cols, ref_cols, strict=True))
            count = x(f"SELECT count(*) FROM {_qname(schema, table)} c WHERE {present} AND NOT EXISTS "
                      f"(SELECT 1 FROM {_qname(ref_schema, ref_table)} p WHERE {match})").scalar()
            if count:
                out.append(f"{count} rows of {schema}.{table} point nowhere through NOT VALID foreign "
                           f"key {name} ({', '.join(cols)} -> {ref_table})")
        return out

    # -- indexes -----------------------------------------------------------------------------------
    def create_index_sql(self, index: sa.Index) -> tuple[str, bool]:
        sql, _ = super().create_index_sql(index)
        return re.sub(r"^CREATE (UNIQUE )?INDEX ", r"CREATE \1INDEX CONCURRENTLY ", sql, count=1), True

    def drop_index_sql(self, index: sa.Index) -> tuple[str, bool]:
        sql, _ = super().drop_index_sql(index)
        return re.sub(r"^DROP INDEX ", "DROP INDEX CONCURRENTLY ", sql, count=1), True

    def _index_row(self, conn: Connection, table: str, name: str) -> Any:
        return conn.exec_driver_sql(
            "SELECT n.nspname, i.indisvalid AND i.indisready, pg_catalog.pg_get_indexdef(i.indexrelid) "
            "FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class ci ON ci.oid = i.indexrelid "
            "JOIN pg_catalog.pg_class t ON t.oid = i.indrelid "
            "JOIN pg_catalog.pg_namespace n ON n.oid = t.relnamespace "
            "WHERE n.nspname = current_schema() AND t.relname = %s AND ci.relname = %s",
            (table, name)).first()

    def has_index(self, conn: Connection, table: str, name: str) -> bool:
        """Only a usable index counts: an INVALID one (a failed concurrent build) is absent."""
        row = self._index_row(conn, table, name)
        return row is not None and bool(row[1])

    def prepare_index(self, conn: Connection, table: str, name: str) -> None:
        """Drop the INVALID index a failed CREATE INDEX CONCURRENTLY left under `name`, so the
        build can run again (concurrently when `conn` is in autocommit mode)."""
        row = self._index_row(conn, table, name)
        if row is None or row[1]:
            return
        raw = conn.connection.dbapi_connection
        concurrently = " CONCURRENTLY" if getattr(raw, "autocommit", False) else ""
        conn.exec_driver_sql(f"DROP INDEX{concurrently} IF EXISTS {_qname(row[0], name)}")

    def index_definition(self, conn: Connection, table: str, name: str) -> str | None:
        """pg_get_indexdef (as in pg_indexes.indexdef), made CONCURRENTLY: DropIndex's inverse
        runs outside a transaction here and must not block writes while it builds."""
        row = self._index_row(conn, table, name)
        if row is None:
            return None
        return re.sub(r"^CREATE (UNIQUE )?INDEX ", r"CREATE \1INDEX CONCURRENTLY ", row[2], count=1)

    # -- change capture ----------------------------------------------------------------------------
    def _schema_of_engine(self) -> str:
        if self._schema is None:
            with self.engine.connect() as conn:
                self._schema = self.current_schema(conn)
        return self._schema

    def capture_triggers_sql(self, table: str, log: str, keys: list[str], watched: list[str],
                             prefix: str) -> tuple[list[str], list[str]]:
        """Row triggers, each with its own SECURITY DEFINER function (the application's role
        need not be able to write the log) and a fixed search_path."""
        schema = self._schema_of_engine()
        qt, qlog = _qname(schema, table), _qname(schema, log)
        cols = ", ".join([_ident(f"k_{k}") for k in keys] + ["op"])
        new = ", ".join(f"NEW.{_ident(k)}" for k in keys)
        old = ", ".join(f"OLD.{_ident(k)}" for k in keys)
        insert = f"INSERT INTO {qlog} ({cols}) VALUES"
        names = [f"{prefix}_i", f"{prefix}_u", f"{prefix}_d"]
        bodies = [
            f"{insert} ({new}, 'I');",
            f"{insert} ({new}, 'U'); IF ROW({old}) IS DISTINCT FROM ROW({new}) THEN "
            f"{insert} ({old}, 'D'); END IF;",
            f"{insert} ({old}, 'D');",
        ]
        events = ["INSERT", "UPDATE OF " + ", ".join(_ident(c) for c in watched or keys), "DELETE"]
        statements = []
        for name, body, event in zip(names, bodies, events, strict=True):
            function = _qname(schema, name)
            statements.append(
                f"CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql "
                f"SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $sm$ BEGIN {body} "
                "RETURN NULL; END $sm$")
            statements.append(f"CREATE TRIGGER {_ident(name)} AFTER {event} ON {qt} "
                              f"FOR EACH ROW EXECUTE FUNCTION {function}()")
        return statements, names

    def trigger_names(self, conn: Connection, table: str) -> set[str]:
        rows = conn.exec_driver_sql(
            "SELECT tg.tgname FROM pg_catalog.pg_trigger tg "
            "JOIN pg_catalog.pg_class c ON c.oid = tg.tgrelid "
            "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = current_schema() AND c.relname = %s AND NOT tg.tgisinternal",
            (table,))
        return {r[0] for r in rows}

    def drop_trigger_sql(self, name: str, table: str) -> list[str]:
        schema = self._schema_of_engine()
        return [f"DROP TRIGGER IF EXISTS {_ident(name)} ON {_qname(schema, table)}",
                f"DROP FUNCTION IF EXISTS {_qname(schema, name)}()"]

    # -- client tools ------------------------------------------------------------------------------
    def _tool(self, name: str, server_major: int) -> str | None:
        """`name` (pg_dump, pg_restore) with a major version >= the server's, or None."""
        candidates: list[str] = []
        bindir = os.environ.get("SAFEMIGRATE_PG_BINDIR")
        if bindir:
            candidates.append(str(Path(bindir) / name))
        found = shutil.which(name)
        if found:
            candidates.append(found)
        versioned = [*glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), *glob.glob(f"/usr/pgsql-*/bin/{name}"),
                     *glob.glob(f"/opt/homebrew/opt/postgresql@*/bin/{name}"),
                     *glob.glob(f"/usr/local/opt/postgresql@*/bin/{name}")]
        candidates += sorted(versioned, key=lambda p: _tool_major(p) or 0, reverse=True)
        for path in candidates:
            major = _tool_major(path)
            if major is not None and major >= server_major:
                return path
        return None

    def _dump_tools(self, conn: Connection) -> tuple[str, str] | None:
        """(pg_dump, pg_restore) when both are usable for this server and not switched off."""
        if self.use_pg_dump is False or _falsy(os.environ.get("SAFEMIGRATE_PG_DUMP")):
            return None
        major = self._server_major(conn)
        dump, restore = self._tool("pg_dump", major), self._tool("pg_restore", major)
        return (dump, restore) if dump and restore else None

    def _restore_tool(self) -> str:
        with self.engine.connect() as conn:
            major = self._server_major(conn)
        tool = self._tool("pg_restore", major)
        if tool is None:
            raise BackupError(f"the snapshot is a pg_dump archive but no pg_restore {major} or newer "
                              "is installed", "install the PostgreSQL client tools "
                              "(or set SAFEMIGRATE_PG_BINDIR)")
        return tool

    def _run_tool(self, args: list[str], what: str, env: dict[str, str]) -> str:
        try:
            proc = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
        except OSError as exc:
            raise BackupError(f"cannot run {args[0]}: {exc.strerror or exc}") from None
        if proc.returncode != 0:
            raise BackupError(f"{what} failed: {self._tool_error(proc.stderr)}")
        return proc.stdout

    def _tool_error(self, stderr: str) -> str:
        lines = [line.strip() for line in stderr.splitlines() if line.strip()]
        errors = [line for line in lines if "error" in line.lower()] or lines or ["(no message)"]
        return self._scrub(errors[0])

    # -- snapshots ---------------------------------------------------------------------------------
    @staticmethod
    def snapshot_format(path: Path) -> str:
        """"pg_dump" (a pg_dump custom-format archive) or "export" (safemigrate's COPY export)."""
        with open(path, "rb") as handle:
            head = handle.read(len(EXPORT_MAGIC))
        if head.startswith(PGDUMP_MAGIC):
            return "pg_dump"
        if head == EXPORT_MAGIC:
            return "export"
        raise BackupError(f"{path.name} is neither a pg_dump archive nor a safemigrate export")

    def snapshot(self, dest: Path, tables: list[str]) -> dict[str, Any]:
        """pg_dump -Fc of `tables` on an exported snapshot (or the COPY export), with their
        digests taken in the same REPEATABLE READ transaction."""
        try:
            with self.engine.connect() as conn, conn.begin():
                conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                conn.exec_driver_sql("SET LOCAL statement_timeout = 0")
                schema = self.current_schema(conn)
                existing = set(self.user_tables(conn))
                missing = [t for t in tables if t not in existing]
                if missing:
                    raise DatabaseError(f"table {missing[0]} does not exist in schema {schema}")
                if tables:
                    conn.exec_driver_sql(f"LOCK TABLE {', '.join(_qname(schema, t) for t in tables)} "
                                         "IN ACCESS SHARE MODE")
                tools = self._dump_tools(conn) if tables else None
                if tools is None:
                    self._export(conn, dest, schema, tables)
                    return database_digest(conn, tables)
                snapshot_id = conn.exec_driver_sql("SELECT pg_export_snapshot()").scalar()
                return self._pg_dump(conn, tools[0], str(snapshot_id), dest, schema, tables)
        except sa.exc.DBAPIError as exc:
            raise self.translate_error(exc) from None

    def _pg_dump(self, conn: Connection, pg_dump: str, snapshot_id: str, dest: Path, schema: str,
                 tables: list[str]) -> dict[str, Any]:
        args = [pg_dump, "--format=custom", f"--snapshot={snapshot_id}", "--no-owner",
                "--no-privileges", "--strict-names",
                f"--lock-wait-timeout={max(int(self.lock_timeout * 1000), 1000)}", f"--file={dest}"]
        for table in tables:  # a pattern quoted part by part matches exactly that table
            args += ["--table", _qname(schema, table)]
        with tempfile.TemporaryFile() as stderr:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=stderr, env=self._libpq_env())
            try:
                digests = database_digest(conn, tables)  # meanwhile, on the same snapshot
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            code = proc.wait()
            stderr.seek(0)
            message = stderr.read().decode(errors="replace")
        if code != 0:
            raise BackupError(f"pg_dump failed: {self._tool_error(message)}")
        return digests

    def _export(self, conn: Connection, dest: Path, schema: str, tables: list[str]) -> None:
        """The COPY export (see EXPORT_MAGIC), streamed table by table."""
        raw = conn.connection.dbapi_connection
        with open(dest, "wb") as handle:
            writer = _ExportWriter(handle)
            writer.json(b"H", {"format": EXPORT_VERSION, "schema": schema, "tables": list(tables),
                               "server_version": self.server_version(conn)})
            for table in tables:
                spec = self._inspect(conn, schema, table, values=True)
                assert spec is not None
                if spec["kind"] != "r":
                    raise BackupError(f"table {table} is partitioned: the COPY export cannot copy it",
                                      "install pg_dump/pg_restore of the server's version")
                writer.json(b"T", spec)
                sql = f"COPY {_qname(schema, table)} ({_column_list(spec)}) TO STDOUT (FORMAT binary)"
                buffer = bytearray()
                with raw.cursor() as cur, cur.copy(sql) as copy:  # type: ignore[union-attr]
                    for chunk in copy:
                        buffer += chunk
                        if len(buffer) >= _CHUNK:
                            writer.frame(b"D", bytes(buffer))
                            buffer.clear()
                if buffer:
                    writer.frame(b"D", bytes(buffer))
                writer.frame(b"E", b"")
            writer.frame(b"Z", b"")
            handle.flush()
            os.fsync(handle.fileno())

    # -- scratch databases -------------------------------------------------------------------------
    def _source_settings(self) -> dict[str, str]:
        with self.engine.connect() as conn:
            return {name: str(conn.exec_driver_sql("SELECT current_setting(%s)", (name,)).scalar())
                    for name in _DIGEST_SETTINGS}

    @contextmanager
    def _scratch_database(self, prefix: str) -> Iterator[str]:
        """A new empty database on the same server with the source's encoding and collation
        (so text sorts, and digests compare, the same), dropped WITH (FORCE) on exit."""
        name = f"{prefix}{uuid.uuid4().hex[:12]}"
        with self.engine.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            major = self._server_major(conn)
            provider = ("datlocprovider::text, daticulocale" if major >= 15
                        else "'c'::text, NULL::text")
            encoding, collate, ctype, loc_provider, icu = conn.exec_driver_sql(
                f"SELECT pg_encoding_to_char(encoding), datcollate, datctype, {provider} "
                "FROM pg_catalog.pg_database WHERE datname = current_database()").one()
            sql = (f"CREATE DATABASE {_ident(name)} TEMPLATE template0 ENCODING {_literal(encoding)} "
                   f"LC_COLLATE {_literal(collate)} LC_CTYPE {_literal(ctype)}")
            if loc_provider == "i" and icu:
                sql += f" LOCALE_PROVIDER icu ICU_LOCALE {_literal(icu)}"
            try:
                conn.exec_driver_sql(sql)
            except sa.exc.DBAPIError as exc:
                first = self._scrub(str(getattr(exc, "orig", exc))).splitlines()[0]
                raise BackupError(
                    f"cannot create the scratch database {name} to check the snapshot: {first}",
                    "grant CREATEDB to the migration user: snapshots are proven by restoring them "
                    "into a scratch database that is dropped afterwards") from None
        failed = True
        try:
            yield name
            failed = False
        finally:
            try:
                with self.engine.connect() as conn:
                    conn = conn.execution_options(isolation_level="AUTOCOMMIT")
                    force = " WITH (FORCE)" if self._server_major(conn) >= 13 else ""
                    conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {_ident(name)}{force}")
            except sa.exc.DBAPIError:
                if not failed:  # never hide the error that brought us here
                    raise

    @contextmanager
    def _loaded_scratch(self, path: Path, prefix: str, schema: str
                        ) -> Iterator[tuple[Engine, str]]:
        """A scratch database holding the snapshot's tables (no foreign keys, no triggers), and
        the snapshot's format."""
        fmt = self.snapshot_format(path)
        archive = _ExportArchive(path) if fmt == "export" else None
        settings = self._source_settings()
        with self._scratch_database(prefix) as name:
            engine = self._private_engine(name, settings)
            try:
                with engine.connect() as conn, conn.begin():
                    conn.exec_driver_sql("SET LOCAL statement_timeout = 0")
                    conn.exec_driver_sql(f"CREATE SCHEMA IF NOT EXISTS {_ident(schema)}")
                if archive is not None:
                    self._load_export(engine, archive)
                else:
                    self._load_dump(name, path)
                yield engine, fmt
            finally:
                engine.dispose()

    def _load_export(self, engine: Engine, archive: _ExportArchive) -> None:
        with engine.connect() as conn, conn.begin():
            conn.exec_driver_sql("SET LOCAL statement_timeout = 0")
            for table, (spec, _) in archive.tables.items():
                for statement in self._create_sql(spec):
                    conn.exec_driver_sql(statement)
                self._copy_in(conn, _qname(spec["schema"], table), spec, archive.data(table))
                for statement in self._finish_sql(spec):
                    conn.exec_driver_sql(statement)

    def _scaffold(self, database: str) -> None:
        """Best effort: the source's objects other than tables (schemas, types, domains,
        functions, collations, extensions) in the scratch database, so tables whose columns use
        an enum or a domain load there. Failures are ignored: the snapshot's own restore, run
        next, reports what is really missing."""
        with self.engine.connect() as conn:
            major = self._server_major(conn)
        pg_dump, pg_restore = self._tool("pg_dump", major), self._tool("pg_restore", major)
        if pg_dump is None or pg_restore is None:
            return
        with tempfile.TemporaryDirectory(prefix="safemigrate-") as tmp:
            out = Path(tmp) / "scaffold.dump"
            dumped = subprocess.run(
                [pg_dump, "--schema-only", "--format=custom", "--exclude-table=*.*", "--no-owner",
                 "--no-privileges", "--no-publications", "--no-subscriptions", f"--file={out}"],
                capture_output=True, env=self._libpq_env(), check=False)
            if dumped.returncode == 0:
                subprocess.run([pg_restore, "--dbname", database, "--no-owner", "--no-privileges",
                                str(out)], capture_output=True, env=self._libpq_env(database),
                               check=False)

    def _load_dump(self, database: str, path: Path) -> None:
        pg_restore = self._restore_tool()
        self._scaffold(database)
        env = self._libpq_env(database)
        toc = self._run_tool([pg_restore, "--list", str(path)], "reading the pg_dump archive", env)
        keep = [line for line, desc, _ in _toc_entries(toc) if desc in _SCRATCH_ENTRIES]
        with tempfile.TemporaryDirectory(prefix="safemigrate-") as tmp:
            listing = Path(tmp) / "toc.list"
            listing.write_text("\n".join(keep) + "\n")
            self._run_tool([pg_restore, "--dbname", database, "--use-list", str(listing),
                            "--no-owner", "--no-privileges", "--exit-on-error",
                            "--single-transaction", str(path)], "restoring the pg_dump archive", env)

    def _post_scripts(self, path: Path, schema: str, tables: list[str]) -> dict[str, str]:
        """Per table, the SQL of the archive's foreign keys and triggers (safemigrate's own
        change-capture triggers left out)."""
        pg_restore = self._restore_tool()
        env = self._libpq_env()
        toc = self._run_tool([pg_restore, "--list", str(path)], "reading the pg_dump archive", env)
        by_table: dict[str, list[str]] = {}
        for line, desc, rest in _toc_entries(toc):
            if desc not in _POST_ENTRIES:
                continue
            for table in sorted(tables, key=len, reverse=True):
                head = f"{schema} {table} "
                if rest.startswith(head):
                    name = rest[len(head):].rsplit(" ", 1)[0]
                    if not (desc == "TRIGGER" and name.startswith(JOURNAL_PREFIX)):
                        by_table.setdefault(table, []).append(line)
                    break
        scripts = {}
        with tempfile.TemporaryDirectory(prefix="safemigrate-") as tmp:
            for table, lines in by_table.items():
                listing = Path(tmp) / "post.list"
                listing.write_text("\n".join(lines) + "\n")
                script = self._run_tool([pg_restore, "--file", "-", "--use-list", str(listing),
                                         "--no-owner", "--no-privileges", str(path)],
                                        "reading the pg_dump archive", env)
                # keep our lock timeout (the archive's header would wait for locks forever);
                # psql meta-commands (\restrict since 15.14) are not SQL
                scripts[table] = "\n".join(
                    line for line in script.splitlines()
                    if not re.match(r"^(SET (lock_timeout|idle_in_transaction_session_timeout)|\\)",
                                    line))
        return scripts

    @contextmanager
    def snapshot_reader(self, path: Path) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            schema = self.current_schema(conn)
        with ExitStack() as stack:
            try:
                engine, _ = stack.enter_context(self._loaded_scratch(path, SCRATCH_PREFIX, schema))
                conn = stack.enter_context(engine.connect())
            except BackupError as exc:
                raise BackupError(f"snapshot {path.name} cannot be loaded: {exc.message}",
                                  exc.hint) from None
            except sa.exc.DBAPIError as exc:
                first = self._scrub(str(getattr(exc, "orig", exc))).splitlines()[0]
                raise BackupError(f"snapshot {path.name} cannot be loaded: {first}") from None
            yield conn

    # -- DDL from a spec -----------------------------------------------------------------------------
    def _create_sql(self, spec: dict[str, Any]) -> list[str]:
        """Serial sequences, the table with its columns, and sequence ownership."""
        schema, table = spec["schema"], spec["table"]
        qt = _qname(schema, table)
        identity = {s["column"]: s for s in spec["sequences"] if s["identity"]}
        statements = []
        for seq in spec["sequences"]:
            if not seq["identity"]:
                statements.append(f"CREATE SEQUENCE IF NOT EXISTS {_qname(seq['schema'], seq['name'])} "
                                  f"AS {seq['type']} {self._sequence_options(seq)}")
        columns = []
        for col in spec["columns"]:
            parts = [_ident(col["name"]), col["type"]]
            if col["collation"]:
                parts.append(f"COLLATE {col['collation']}")
            if col["generated"]:
                parts.append(f"GENERATED ALWAYS AS ({col['default']}) STORED")
            elif col["identity"]:
                seq = identity.get(col["name"])
                kind = "ALWAYS" if col["identity"] == "a" else "BY DEFAULT"
                options = "" if seq is None else (
                    f" (SEQUENCE NAME {_qname(seq['schema'], seq['name'])} {self._sequence_options(seq)})")
                parts.append(f"GENERATED {kind} AS IDENTITY{options}")
            elif col["default"] is not None:
                parts.append(f"DEFAULT {col['default']}")
            if col["notnull"] and not col["identity"]:
                parts.append("NOT NULL")
            columns.append(" ".join(parts))
        unlogged = "UNLOGGED " if spec["persistence"] == "u" else ""
        sql = f"CREATE {unlogged}TABLE {qt} ({', '.join(columns)})"
        if spec["options"]:
            sql += f" WITH ({', '.join(spec['options'])})"
        statements.append(sql)
        for seq in spec["sequences"]:
            if not seq["identity"]:
                statements.append(f"ALTER SEQUENCE {_qname(seq['schema'], seq['name'])} "
                                  f"OWNED BY {qt}.{_ident(seq['column'])}")
        return statements

    @staticmethod
    def _sequence_options(seq: dict[str, Any]) -> str:
        return (f"INCREMENT BY {seq['increment']} MINVALUE {seq['min']} MAXVALUE {seq['max']} "
                f"START WITH {seq['start']} CACHE {seq['cache']} {'' if seq['cycle'] else 'NO '}CYCLE")

    def _finish_sql(self, spec: dict[str, Any], *, skip_constraints: set[str] | None = None,
                    skip_indexes: set[str] | None = None) -> list[str]:
        """After the data: constraints (not foreign keys), indexes, sequence values, RLS."""
        qt = _qname(spec["schema"], spec["table"])
        order = {"p": 0, "u": 1, "x": 2, "c": 3}
        statements = [
            f"ALTER TABLE {qt} ADD CONSTRAINT {_ident(c['name'])} {c['def']}"
            for c in sorted(spec["constraints"], key=lambda c: (order.get(c["type"], 9), c["name"]))
            if c["type"] != "f" and c["name"] not in (skip_constraints or set())
        ]
        statements += [i["def"] for i in spec["indexes"]
                       if not i["constraint"] and i["valid"] and i["name"] not in (skip_indexes or set())]
        statements += [
            f"SELECT pg_catalog.setval({_literal(_qname(s['schema'], s['name']))}, "
            f"{s['last_value']}, {'true' if s['is_called'] else 'false'})"
            for s in spec["sequences"] if "last_value" in s
        ]
        if spec["rls"]:
            statements.append(f"ALTER TABLE {qt} ENABLE ROW LEVEL SECURITY")
        if spec["force_rls"]:
            statements.append(f"ALTER TABLE {qt} FORCE ROW LEVEL SECURITY")
        return statements

    def _links_sql(self, spec: dict[str, Any]) -> list[str]:
        """Foreign keys and triggers (with their enabled state) of a spec: they refer to other
        objects, so they come last."""
        qt = _qname(spec["schema"], spec["table"])
        statements = [f"ALTER TABLE {qt} ADD CONSTRAINT {_ident(c['name'])} {c['def']}"
                      for c in spec["constraints"] if c["type"] == "f"]
        states = {"D": "DISABLE TRIGGER", "R": "ENABLE REPLICA TRIGGER", "A": "ENABLE ALWAYS TRIGGER"}
        for trigger in spec["triggers"]:
            if trigger["name"].startswith(JOURNAL_PREFIX):
                continue
            statements.append(trigger["def"])
            if trigger["enabled"] in states:
                statements.append(f"ALTER TABLE {qt} {states[trigger['enabled']]} {_ident(trigger['name'])}")
        return statements

    @staticmethod
    def _copy_in(conn: Connection, target: str, spec: dict[str, Any], chunks: Iterator[bytes]) -> None:
        raw = conn.connection.dbapi_connection
        sql = f"COPY {target} ({_column_list(spec)}) FROM STDIN (FORMAT binary)"
        with raw.cursor() as cur, cur.copy(sql) as copy:  # type: ignore[union-attr]
            for chunk in chunks:
                copy.write(chunk)

    # -- restore -------------------------------------------------------------------------------------
    @contextmanager
    def _restore_source(self, path: Path, schema: str, tables: list[str]) -> Iterator[_Source]:
        if self.snapshot_format(path) == "export":
            yield _ExportSource(self, _ExportArchive(path))
            return
        post = self._post_scripts(path, schema, tables)
        with self._loaded_scratch(path, RESTORE_PREFIX, schema) as (engine, _), engine.connect() as conn:
            yield _ScratchSource(self, conn, schema, post)

    def restore_tables(self, snapshot: Path, tables: list[str], drop: list[str]) -> None:
        """Put `tables` back as the snapshot has them, and drop `drop`, in ONE transaction.

        Tables are restored in place, not dropped and recreated, so what refers to them from
        outside the snapshot survives: foreign keys of other tables, views, grants, owner,
        comments, policies. In that transaction:

        1. ACCESS EXCLUSIVE locks on every table involved (within lock_timeout), then the
           `drop` tables go (CASCADE: whatever depends on a table the migration created was
           created after the snapshot too).
        2. The restored tables' own foreign keys and triggers are dropped (the snapshot's come
           back at the end; safemigrate's change-capture triggers are left alone), as are
           constraints and indexes the snapshot does not have, and columns it does not have.
        3. Content. A table referenced by foreign keys of tables that are not restored is
           merged by primary key through a temporary table: rows not in the snapshot are
           deleted (refused with a clear error if another table still references them), rows
           that differ are updated, missing rows inserted, so referenced rows keep existing
           and no ON DELETE action fires. Any other table is truncated and reloaded with COPY.
           User triggers are disabled meanwhile.
        4. Defaults and NOT NULL, then the snapshot's missing constraints and indexes, sequence
           values, and last the snapshot's foreign keys and triggers.

        A table whose columns cannot be brought back in place (a column's type, collation,
        identity or position changed, or it is missing) is recreated instead: foreign keys of
        other tables pointing at it are dropped and re-added, its owner and table grants
        reapplied; a view depending on it makes the restore fail (nothing is changed).

        The snapshot's definitions come from the COPY export itself, or from a scratch
        database the pg_dump archive is restored into (data is streamed from there with binary
        COPY); foreign keys and triggers of a pg_dump archive are replayed from the archive.
        """
        try:
            with self.engine.connect() as conn:
                schema = self.current_schema(conn)
            with self._restore_source(snapshot, schema, tables) as source:
                absent = [t for t in tables if t not in source.specs]
                if absent:
                    raise BackupError(f"table {absent[0]} is not in snapshot {snapshot.name}")
                engine = self._private_engine()
                try:
                    with engine.connect() as conn, conn.begin():
                        self._restore(conn, source, schema, tables, drop)
                finally:
                    engine.dispose()
        except sa.exc.DBAPIError as exc:
            raise self.translate_error(exc) from None

    def _restore(self, conn: Connection, source: _Source, schema: str, tables: list[str],
                 drop: list[str]) -> None:
        x = conn.exec_driver_sql
        x("SET LOCAL statement_timeout = 0")
        current = {t: self._inspect(conn, schema, t) for t in tables}
        dropping = [t for t in drop if t not in current and self._inspect(conn, schema, t) is not None]
        locked = [_qname(schema, t) for t in tables if current[t] is not None]
        locked += [_qname(schema, t) for t in dropping]
        if locked:
            x(f"LOCK TABLE {', '.join(locked)} IN ACCESS EXCLUSIVE MODE")
        for table in dropping:
            x(f"DROP TABLE IF EXISTS {_qname(schema, table)} CASCADE")
        restoring = set(tables)
        readd: list[str] = []
        for table in tables:
            qt = _qname(schema, table)
            spec = self._inspect(conn, schema, table)  # again: the drops may have changed it
            if spec is not None:
                for con in spec["constraints"]:
                    if con["type"] == "f":
                        x(f"ALTER TABLE {qt} DROP CONSTRAINT {_ident(con['name'])}")
                for trigger in spec["triggers"]:
                    if not trigger["name"].startswith(JOURNAL_PREFIX):
                        x(f"DROP TRIGGER {_ident(trigger['name'])} ON {qt}")
            current[table] = spec
        for table in tables:
            spec = current[table]
            if spec is None or self._reshapable(spec, source.specs[table]):
                continue
            outside = [r for r in spec["referenced_by"]
                       if not (r["schema"] == schema and r["table"] in restoring)]
            for ref in outside:
                x(f"ALTER TABLE {_qname(ref['schema'], ref['table'])} DROP CONSTRAINT {_ident(ref['name'])}")
                readd.append(f"ALTER TABLE {_qname(ref['schema'], ref['table'])} "
                             f"ADD CONSTRAINT {_ident(ref['name'])} {ref['def']}")
            readd += self._grants_sql(conn, schema, table)
            x(f"DROP TABLE {_qname(schema, table)}")
            current[table] = None
        for table in tables:
            snap = source.specs[table]
            if current[table] is None:
                for statement in self._create_sql(snap):
                    x(statement)
                self._copy_in(conn, _qname(schema, table), snap, source.data(table))
                for statement in self._finish_sql(snap):
                    x(statement)
            else:
                self._reshape(conn, source, schema, table, current[table], restoring)
        for statement in readd:
            x(statement)
        for table in tables:
            for statement in source.post_sql(table):
                x(statement)

    @staticmethod
    def _reshapable(now: dict[str, Any], snap: dict[str, Any]) -> bool:
        """Whether `now` becomes `snap` by dropping columns and fixing defaults/NOT NULL."""
        if (now["kind"], now["persistence"]) != (snap["kind"], snap["persistence"]):
            return False
        wanted = {c["name"] for c in snap["columns"]}
        kept = [c for c in now["columns"] if c["name"] in wanted]
        if [c["name"] for c in kept] != [c["name"] for c in snap["columns"]]:
            return False
        for a, b in zip(kept, snap["columns"], strict=True):
            if (a["type"], a["collation"], a["identity"], a["generated"]) != (
                    b["type"], b["collation"], b["identity"], b["generated"]):
                return False
            if a["generated"] and a["default"] != b["default"]:
                return False
        return True

    def _reshape(self, conn: Connection, source: _Source, schema: str, table: str,
                 now: dict[str, Any], restoring: set[str]) -> None:
        x = conn.exec_driver_sql
        snap = source.specs[table]
        qt = _qname(schema, table)
        wanted_cons = {(c["name"], c["type"], c["def"]) for c in snap["constraints"] if c["type"] != "f"}
        kept_cons = set()
        for con in now["constraints"]:
            if con["type"] == "f":
                continue
            if (con["name"], con["type"], con["def"]) in wanted_cons:
                kept_cons.add(con["name"])
            else:
                x(f"ALTER TABLE {qt} DROP CONSTRAINT {_ident(con['name'])}")
        wanted_idx = {(i["name"], i["def"]) for i in snap["indexes"] if not i["constraint"] and i["valid"]}
        kept_idx = set()
        for index in now["indexes"]:
            if index["constraint"]:
                continue
            if index["valid"] and (index["name"], index["def"]) in wanted_idx:
                kept_idx.add(index["name"])
            else:
                x(f"DROP INDEX IF EXISTS {_qname(schema, index['name'])}")
        wanted_cols = {c["name"] for c in snap["columns"]}
        for col in now["columns"]:
            if col["name"] not in wanted_cols:
                x(f"ALTER TABLE {qt} DROP COLUMN {_ident(col['name'])}")
        x(f"ALTER TABLE {qt} DISABLE TRIGGER USER")
        outside = [r for r in now["referenced_by"] if not (r["schema"] == schema and r["table"] in restoring)]
        if outside and snap["primary_key"]:
            self._merge(conn, source, schema, table, outside)
        else:
            x(f"TRUNCATE TABLE {qt}")
            self._copy_in(conn, qt, snap, source.data(table))
        x(f"ALTER TABLE {qt} ENABLE TRIGGER USER")
        before = {c["name"]: c for c in now["columns"]}
        for col in snap["columns"]:
            old, qc = before[col["name"]], _ident(col["name"])
            if not col["generated"] and not col["identity"] and old["default"] != col["default"]:
                x(f"ALTER TABLE {qt} ALTER COLUMN {qc} "
                  + (f"SET DEFAULT {col['default']}" if col["default"] is not None else "DROP DEFAULT"))
            if not col["identity"] and old["notnull"] != col["notnull"]:
                x(f"ALTER TABLE {qt} ALTER COLUMN {qc} {'SET' if col['notnull'] else 'DROP'} NOT NULL")
        for seq in snap["sequences"]:
            if not seq["identity"]:
                x(f"CREATE SEQUENCE IF NOT EXISTS {_qname(seq['schema'], seq['name'])} "
                  f"AS {seq['type']} {self._sequence_options(seq)}")
                x(f"ALTER SEQUENCE {_qname(seq['schema'], seq['name'])} "
                  f"OWNED BY {qt}.{_ident(seq['column'])}")
        for statement in self._finish_sql(snap, skip_constraints=kept_cons, skip_indexes=kept_idx):
            x(statement)
        if now["rls"] and not snap["rls"]:
            x(f"ALTER TABLE {qt} DISABLE ROW LEVEL SECURITY")
        if now["force_rls"] and not snap["force_rls"]:
            x(f"ALTER TABLE {qt} NO FORCE ROW LEVEL SECURITY")

    def _merge(self, conn: Connection, source: _Source, schema: str, table: str,
               outside: list[dict[str, Any]]) -> None:
        """Content by primary key: delete, update what differs, insert what is missing."""
        x = conn.exec_driver_sql
        snap = source.specs[table]
        qt = _qname(schema, table)
        temp = _ident(f"safemigrate_restore_{uuid.uuid4().hex[:8]}")
        cols = _copy_columns(snap)
        collist = ", ".join(_ident(c) for c in cols)
        x(f"CREATE TEMPORARY TABLE {temp} ON COMMIT DROP AS SELECT {collist} FROM {qt} WITH NO DATA")
        self._copy_in(conn, temp, snap, source.data(table))
        x(f"ANALYZE {temp}")
        pk = snap["primary_key"]
        match = " AND ".join(f"s.{_ident(k)} = t.{_ident(k)}" for k in pk)
        gone = f"NOT EXISTS (SELECT 1 FROM {temp} s WHERE {match})"
        for ref in outside:
            pairs = " AND ".join(f"c.{_ident(a)} = t.{_ident(b)}"
                                 for a, b in zip(ref["columns"], ref["ref_columns"], strict=True))
            count = x(f"SELECT count(*) FROM {_qname(ref['schema'], ref['table'])} c "
                      f"JOIN {qt} t ON {pairs} WHERE {gone}").scalar()
            if count:
                raise DatabaseError(
                    f"cannot restore {table}: {count} rows of {ref['table']} reference rows of "
                    f"{table} that are not in the snapshot (foreign key {ref['name']})",
                    f"delete or re-point those rows of {ref['table']} first, or restore "
                    f"{ref['table']} too; nothing was changed")
        x(f"DELETE FROM {qt} t WHERE {gone}")
        always = {c["name"] for c in snap["columns"] if c["identity"] == "a"}
        updatable = [c for c in cols if c not in pk and c not in always]
        if updatable:
            sets = ", ".join(f"{_ident(c)} = s.{_ident(c)}" for c in updatable)
            row_t = ", ".join(f"t.{_ident(c)}" for c in updatable)
            row_s = ", ".join(f"s.{_ident(c)}" for c in updatable)
            x(f"UPDATE {qt} t SET {sets} FROM {temp} s WHERE {match} "
              f"AND ROW({row_t})::text IS DISTINCT FROM ROW({row_s})::text")
        overriding = " OVERRIDING SYSTEM VALUE" if always else ""
        x(f"INSERT INTO {qt} ({collist}){overriding} SELECT {collist} FROM {temp} s "
          f"WHERE NOT EXISTS (SELECT 1 FROM {qt} t WHERE {match})")
        x(f"DROP TABLE {temp}")

    def _grants_sql(self, conn: Connection, schema: str, table: str) -> list[str]:
        """Owner and table-level grants of a table about to be recreated."""
        qt = _qname(schema, table)
        owner, me = conn.exec_driver_sql(
            "SELECT pg_catalog.pg_get_userbyid(relowner), current_user FROM pg_catalog.pg_class "
            "WHERE oid = %s::regclass", (qt,)).one()
        statements = [] if owner == me else [f"ALTER TABLE {qt} OWNER TO {_ident(owner)}"]
        for grantee, privilege, grantable in conn.exec_driver_sql(
            "SELECT CASE WHEN a.grantee = 0 THEN NULL ELSE pg_catalog.pg_get_userbyid(a.grantee) END, "
            "a.privilege_type, a.is_grantable FROM pg_catalog.pg_class c "
            "CROSS JOIN LATERAL aclexplode(c.relacl) a WHERE c.oid = %s::regclass", (qt,)):
            if grantee == owner:
                continue
            who = "PUBLIC" if grantee is None else _ident(grantee)
            statements.append(f"GRANT {privilege} ON {qt} TO {who}"
                              + (" WITH GRANT OPTION" if grantable else ""))
        return statements


__all__ = ["PostgreSQLDialect", "EXPORT_MAGIC", "PGDUMP_MAGIC"]
