"""MySQL and MariaDB through PyMySQL: sessions with bounded lock waits, snapshots that provably
match their digests, restores that put tables back whole, and the figures the load guards read.

Sessions
    utf8mb4, REPEATABLE READ, and `innodb_lock_wait_timeout` (row locks) and `lock_wait_timeout`
    (metadata locks, i.e. DDL) set to ceil(lock_timeout) seconds on every connection, so no
    statement safemigrate issues waits long behind users, nor makes users queue long behind it.
    Error 1205 (lock wait timeout) and 1213 (deadlock) are reported as retryable.
    A generous statement timeout too (`SAFEMIGRATE_MYSQL_STATEMENT_TIMEOUT` seconds, default
    3600, 0 for none), as PostgreSQL's statement_timeout: MariaDB's `max_statement_time`
    (seconds, every statement), MySQL's `max_execution_time` (milliseconds, read-only SELECTs
    only: MySQL has no limit for other statements). Which server it is comes from the
    connection's handshake. A statement stopped by it (MariaDB error 1969, MySQL 3024) is not
    retried. Snapshots, loads and restores run without it, as on PostgreSQL.

DDL is not transactional here (`transactional_ddl = False`): ddl.py journals each schema step
    before and after it runs (and retries one that timed out waiting for its metadata lock).
    CREATE INDEX, and ADD COLUMN on MariaDB, are written with `LOCK=NONE`, so the server either
    does them online (in-place index build, instant ADD COLUMN) or refuses at once, instead of
    silently copying the table while it blocks writes. (MySQL 8 picks INSTANT or an online
    in-place ADD COLUMN by itself; LOCK=NONE would rule INSTANT out there.) Inverse steps
    (rollback) leave the algorithm to the server: finishing matters more there.

Snapshots (the contract: the digests returned describe exactly the data in the file)
    mysqldump path (when `mysqldump` and `mysql` are installed and SAFEMIGRATE_MYSQLDUMP is not
    "0"). mysqldump runs its own transaction, so the two snapshots are tied together:
      1. connection L: `LOCK TABLES t1 READ, ...` on the tables to copy. It waits until every
         transaction that wrote to them has committed (at most 1 s, as new writers queue behind
         it meanwhile; busy tables get the logical export instead), then holds new writes
         back; readers are not affected.
      2. connection D: `START TRANSACTION WITH CONSISTENT SNAPSHOT`.
      3. mysqldump `--single-transaction --skip-lock-tables`, and wait until its output holds
         "-- Table structure for table": mysqldump writes that only after its own
         START TRANSACTION WITH CONSISTENT SNAPSHOT returned, so its read view exists.
      4. L: `UNLOCK TABLES`. Writes were held back from before step 2 until after step 3, so
         both read views contain the same committed rows of those tables. D computes the
         digests while mysqldump writes the file. (Tables that are not InnoDB have no read
         view: the write lock is then held until the copy and the digests are done.)
    Writes wait only until mysqldump has connected, started its transaction and written its
    first few KB (milliseconds), never longer than lock_timeout (at least 2 s): past that
    mysqldump is stopped and the logical export is used instead. The file is then loaded into
    a scratch database and compared with the digests (backup.verify_snapshot_file), so even an
    impossible race could not go unnoticed. Without the LOCK TABLES privilege the logical
    export is used.
    Credentials reach the client programs through a temporary option file (mode 0600, given
    with `--defaults-file`, so a ~/.my.cnf cannot redirect the copy), never the command line.

    Logical export (no client programs needed; forced with SAFEMIGRATE_MYSQLDUMP=0): one
    connection, one `START TRANSACTION WITH CONSISTENT SNAPSHOT`; every table is opened at once
    (its metadata lock then keeps its definition still), SHOW CREATE TABLE and the rows are
    streamed to the file, and the digests are computed in that same transaction. No lock is
    taken that blocks writers. The file is a plain SQL script, loadable by the `mysql` client:
        -- safemigrate logical export 1            (first line; identifies the format)
        SET ... (utf8mb4, sql_mode NO_AUTO_VALUE_ON_ZERO, time_zone '+00:00', no FK checks)
        DROP TABLE IF EXISTS `t`; CREATE TABLE `t` (... AUTO_INCREMENT=n ...);
        INSERT INTO `t` (`c1`, ...) VALUES (...),(...);   (one line each, at most ~1 MB;
                                  strings backslash-escaped, bytes as X'hex', TIMESTAMPs in UTC)
        DELIMITER ;; / per trigger: SET sql_mode; CREATE TRIGGER ... ;; / DELIMITER ;
        -- safemigrate export complete             (last line; a file without it is refused)
    Change-capture triggers (named safemigrate_*) are left out: they are the migration's own.
    Triggers keep their DEFINER when loaded or restored if the user may set it (SUPER or
    SET USER); otherwise they are created with the migration user as their definer.

Reading and restoring
    A snapshot is loaded into a scratch database (`safemigrate_verify_<random>` for reading,
    dropped on exit) with the `mysql` client, or with a streaming statement splitter here when
    the client programs are not used. Either loader reads both formats.

    `restore_tables` is restartable from any point, because it always starts again from the
    file: load it into `safemigrate_restore_<hash>` (dropped first if a crashed attempt left
    it), drop each restored table's triggers and foreign keys there, and move the table into
    the live database under a staging name with RENAME TABLE (instant, no second copy). Then,
    per table, on a session with `foreign_key_checks = 0`: DROP the live table, RENAME the
    staged one into its place, re-add its foreign keys and triggers exactly as in the snapshot.
    Rows, indexes, table options and the AUTO_INCREMENT counter come with the renamed table.
    Why drop-and-rename rather than one atomic two-way RENAME: InnoDB moves the foreign keys of
    *other* tables along with a renamed parent, so a swap would leave them pointing at the old
    copy. A dropped parent (allowed only with foreign_key_checks = 0, on this session alone)
    leaves those constraints in place, by name, and they attach to the table renamed into its
    place. The price: for the instant between DROP and RENAME the table does not exist, and the
    restored rows are not re-checked against parents that changed since the snapshot. Writes
    the application made after the pre-rollback backup and before the swap are not kept.
"""

from __future__ import annotations

import datetime
import hashlib
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import IO, Any, TypeVar

import pymysql
import sqlalchemy as sa
from pymysql.converters import escape_string, escape_time, escape_timedelta
from sqlalchemy.engine import URL, Connection, Engine

from .._exceptions import (
    BackupError,
    ConfigError,
    DatabaseError,
    DatabaseLockedError,
    DiskFullError,
    SafeMigrateError,
)
from ..digest import database_digest
from ..urls import redact
from .base import JOURNAL_PREFIX, Dialect

T = TypeVar("T")

CLIENTS_ENV = "SAFEMIGRATE_MYSQLDUMP"  # "0": never use mysqldump / mysql, even when installed
LOCK_TIMEOUT_CODES = frozenset({1205, 1213})  # lock wait timeout, deadlock: both worth a retry
STATEMENT_TIMEOUT_ENV = "SAFEMIGRATE_MYSQL_STATEMENT_TIMEOUT"  # seconds; 0 = no limit
DEFAULT_STATEMENT_TIMEOUT = 3600.0
STATEMENT_TIMEOUT_CODES = frozenset({1969, 3024})  # MariaDB max_statement_time, MySQL max_execution_time
EXPORT_MAGIC = "-- safemigrate logical export 1"
EXPORT_END = "-- safemigrate export complete"
DUMP_END = "-- Dump completed"
DUMP_STARTED = b"-- Table structure for table"
EXPORT_SQL_MODE = "NO_AUTO_VALUE_ON_ZERO,NO_ENGINE_SUBSTITUTION"
VERIFY_PREFIX = "safemigrate_verify_"
RESTORE_PREFIX = "safemigrate_restore_"
STAGE_PREFIX = "safemigrate_stage_"
INSERT_BYTES = 1 << 20  # longest INSERT statement the export writes (one row may exceed it)
_CLIENT_ENV_DROP = ("MYSQL_PWD", "MYSQL_HOST", "MYSQL_TCP_PORT", "MYSQL_UNIX_PORT", "MYSQL_HOME",
                    "MARIADB_HOME")
_DEFINER = re.compile(
    r"/\*!\d+\s+DEFINER\s*=\s*[^*]*?\*/\s*"  # mysqldump: /*!50017 DEFINER=`u`@`h`*/
    r"|\bDEFINER\s*=\s*(?:CURRENT_USER(?:\(\))?|(?:`(?:[^`]|``)*`|'(?:[^']|'')*'|[^\s@]+)"
    r"@(?:`(?:[^`]|``)*`|'(?:[^']|'')*'|[^\s]+))\s*", re.IGNORECASE)
_NEEDS_DEFINER_PRIVILEGE = 1227  # "you need the SUPER, SET USER privilege" for another DEFINER
_FK_LINE = re.compile(r"^\s*CONSTRAINT `((?:[^`]|``)+)` FOREIGN KEY .*?,?$")


# -- small helpers ------------------------------------------------------------------------------
def q(name: str) -> str:
    """A MySQL identifier, always backtick-quoted."""
    return "`" + name.replace("`", "``") + "`"


def qp(name: str) -> str:
    """An identifier for SQL run through SQLAlchemy's exec_driver_sql: PyMySQL %-formats every
    statement it is given that way, so a % in a name is doubled."""
    return q(name).replace("%", "%%")


def error_code(exc: BaseException) -> int | None:
    orig = getattr(exc, "orig", None) or exc
    args = getattr(orig, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


def error_text(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    args = getattr(orig, "args", ())
    if len(args) >= 2 and isinstance(args[0], int):
        return str(args[1])
    return (str(orig) or type(orig).__name__).splitlines()[0]


def sql_literal(value: Any) -> str:
    """A value as MySQL reads it back exactly: strings backslash-escaped (the export's sql_mode
    keeps backslash escapes on), bytes as hex, floats by shortest round-trip repr."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise BackupError(f"cannot export the non-finite float {value!r}")
        return repr(value)
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, str):
        return "'" + escape_string(value) + "'"
    if isinstance(value, bytes | bytearray | memoryview):
        return "X'" + bytes(value).hex() + "'"
    if isinstance(value, datetime.datetime):
        return "'" + value.isoformat(sep=" ") + "'"
    if isinstance(value, datetime.date):
        return "'" + value.isoformat() + "'"
    if isinstance(value, datetime.timedelta):
        return escape_timedelta(value)
    if isinstance(value, datetime.time):
        return escape_time(value)
    if isinstance(value, set | frozenset):
        return "'" + escape_string(",".join(sorted(str(v) for v in value))) + "'"
    raise BackupError(f"cannot export a value of type {type(value).__name__}")


_SPECIAL = re.compile(r"['\"`#]|/\*|--(?=[ \t\r\n]|$)")


def iter_statements(lines: Iterable[str]) -> Iterator[str]:
    """Split a SQL script (mysqldump output or a logical export) into statements, streaming.

    Follows the mysql client's rules where they matter for dumps: `DELIMITER x` lines between
    statements, quotes ('…', "…" with backslash escapes, `…`), `--`/`#` line comments (dropped)
    and /* block comments */ (kept: /*!…*/ ones are executable).
    """
    delimiter = ";"
    parts: list[str] = []
    started = False
    quote: str | None = None
    in_comment = False

    def take() -> str:
        nonlocal parts, started
        statement = "".join(parts).strip()
        parts, started = [], False
        return statement

    for line in lines:
        if not started and quote is None and not in_comment:
            word = line.strip()
            if word[:10].upper() == "DELIMITER " or word.upper() == "DELIMITER":
                parts = []
                delimiter = word[10:].strip() or ";"
                continue
        pos, end = 0, len(line)
        while pos < end:
            if in_comment:
                close = line.find("*/", pos)
                if close < 0:
                    parts.append(line[pos:])
                    break
                parts.append(line[pos:close + 2])
                pos, in_comment = close + 2, False
                continue
            if quote is not None:
                i = pos
                while True:
                    j = line.find(quote, i)
                    k = line.find("\\", i) if quote != "`" else -1
                    if k >= 0 and (j < 0 or k < j):
                        i = k + 2
                        if i >= end:
                            j = -1
                            break
                        continue
                    break
                if j < 0:
                    parts.append(line[pos:])
                    break
                parts.append(line[pos:j + 1])
                pos, quote = j + 1, None
                continue
            match = _SPECIAL.search(line, pos)
            cut = line.find(delimiter, pos)
            if cut >= 0 and (match is None or cut < match.start()):
                chunk = line[pos:cut]
                parts.append(chunk)
                statement = take()
                if statement:
                    yield statement
                pos = cut + len(delimiter)
                continue
            stop = match.start() if match is not None else end
            chunk = line[pos:stop]
            if chunk.strip():
                started = True
            parts.append(chunk)
            if match is None:
                break
            token = match.group()
            if token in ("--", "#"):
                parts.append("\n")
                break
            parts.append(token)
            started = True
            pos = match.end()
            if token == "/*":
                in_comment = True
            else:
                quote = token
    tail = take()
    if tail:
        yield tail


def strip_definer(statement: str) -> str:
    """The statement without its DEFINER clause: the object then belongs to the current user.
    Used only when the current user may not create objects for the recorded definer."""
    return _DEFINER.sub("", statement, count=1)


def _option_value(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _client(names: tuple[str, ...]) -> str | None:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


class _DefinerRefused(Exception):
    """The mysql client stopped at a DEFINER this user may not set."""


class _CoordinationUnavailable(Exception):
    """mysqldump cannot be tied to our snapshot here (privileges): use the logical export."""


# -- the dialect --------------------------------------------------------------------------------
class MySQLDialect(Dialect):
    name = "mysql"
    transactional_ddl = False

    def __init__(self, url: URL, *, lock_timeout: float = 10.0,
                 statement_timeout: float | None = None) -> None:
        super().__init__(url.set(drivername="mysql+pymysql"), lock_timeout=lock_timeout)
        given: Any = statement_timeout
        if statement_timeout is None:
            given = os.environ.get(STATEMENT_TIMEOUT_ENV, "").strip() or DEFAULT_STATEMENT_TIMEOUT
        try:
            seconds = float(given)
        except ValueError:
            seconds = math.nan
        if not math.isfinite(seconds) or seconds < 0:
            raise ConfigError(f"the statement timeout ({STATEMENT_TIMEOUT_ENV}) must be a number "
                              f"of seconds, 0 for no limit; got {given!r}")
        self.statement_timeout = seconds
        self.last_snapshot_method: str | None = None  # "mysqldump" or "export", for the curious
        self.last_write_hold: float = 0.0  # seconds the last mysqldump snapshot held writes back

    # -- connections ---------------------------------------------------------------------------
    @property
    def lock_seconds(self) -> int:
        """lock_timeout as MySQL takes it: whole seconds, at least 1."""
        return max(1, math.ceil(self.lock_timeout))

    @staticmethod
    def _timeout_sql(dbapi_connection: Any, seconds: float) -> str:
        """The session variable that limits a statement's run time to `seconds` (0: no limit)
        on this server: MariaDB's max_statement_time (seconds), or MySQL's
        max_execution_time (milliseconds, SELECT only)."""
        if "mariadb" in str(dbapi_connection.get_server_info()).lower():
            return f"max_statement_time = {seconds:.6f}"
        return f"max_execution_time = {max(1, math.ceil(seconds * 1000)) if seconds > 0 else 0}"

    def _session_sql(self, dbapi_connection: Any, statement_timeout: float) -> str:
        return (f"SET SESSION innodb_lock_wait_timeout = {self.lock_seconds}, "
                f"lock_wait_timeout = {self.lock_seconds}, "
                + self._timeout_sql(dbapi_connection, statement_timeout))

    @contextmanager
    def _without_statement_timeout(self, conn: Connection) -> Iterator[None]:
        """No statement timeout on `conn` for the block (a snapshot's copy and digests may take
        longer than any statement of the migration should), the usual one again after it."""
        dbapi = conn.connection.dbapi_connection
        conn.exec_driver_sql("SET SESSION " + self._timeout_sql(dbapi, 0))
        try:
            yield
        finally:
            if not conn.invalidated:
                try:
                    conn.exec_driver_sql("SET SESSION " + self._timeout_sql(
                        dbapi, self.statement_timeout))
                except sa.exc.DBAPIError:
                    conn.invalidate()  # its session settings must not go back to the pool

    def create_engine(self) -> Engine:
        return self._build_engine(self.url)

    def _build_engine(self, url: URL) -> Engine:
        engine = sa.create_engine(
            url,
            pool_size=4,
            max_overflow=8,
            pool_pre_ping=True,
            pool_recycle=3600,
            isolation_level="REPEATABLE READ",
            connect_args={"charset": "utf8mb4", "binary_prefix": True, "connect_timeout": 10},
        )

        @sa.event.listens_for(engine, "connect")
        def _session(dbapi_connection: Any, _record: Any) -> None:
            with dbapi_connection.cursor() as cursor:
                cursor.execute(self._session_sql(dbapi_connection, self.statement_timeout))

        return engine

    def _connect_params(self, database: str | None = None) -> dict[str, Any]:
        _, params = self.engine.dialect.create_connect_args(self.url)
        params = dict(params)
        params.update(charset="utf8mb4", binary_prefix=True, connect_timeout=10, autocommit=True)
        if database is not None:
            params["database"] = database
        return params

    @contextmanager
    def _raw(self, database: str | None = None) -> Iterator[pymysql.connections.Connection]:
        """A plain PyMySQL session (autocommit) for the loader and the restore: its session
        settings (foreign_key_checks, sql_mode) die with it instead of returning to the pool."""
        try:
            conn = pymysql.connect(**self._connect_params(database))
        except pymysql.err.MySQLError as exc:
            raise self.translate_error(exc) from None
        try:
            with conn.cursor() as cursor:  # loads and restores: no statement timeout
                cursor.execute(self._session_sql(conn, 0))
            yield conn
        finally:
            conn.close()

    def ping(self) -> None:
        if not self.url.database:
            raise DatabaseError(f"no database named in the URL {redact(self.url)}",
                                "add it to --db: mysql://user@host:3306/DATABASE")
        try:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1").scalar()
        except sa.exc.DBAPIError as exc:
            raise self.translate_error(exc) from None

    @property
    def _where(self) -> str:
        params = self._connect_params()
        if params.get("unix_socket"):
            return str(params["unix_socket"])
        return f"{params.get('host') or 'localhost'}:{params.get('port') or 3306}"

    def is_lock_timeout(self, exc: BaseException) -> bool:
        return error_code(exc) in LOCK_TIMEOUT_CODES

    def translate_error(self, exc: BaseException) -> SafeMigrateError:
        if isinstance(exc, SafeMigrateError):
            return exc
        code = error_code(exc)
        text = self._scrub(error_text(exc))
        where, database = self._where, self.url.database or ""
        user = self.url.username or ""
        if code in (2003, 2002, 2005, 2006, 2013):
            lower = text.lower()
            reason = ("connection refused" if "refused" in lower else
                      "unknown host" if "name or service" in lower or "unknown" in lower
                      else "timed out" if "timed out" in lower else text)
            return DatabaseError(
                f"cannot reach the MySQL/MariaDB server at {where}: {reason}",
                "is the server running and listening there? check the host and port in --db",
            )
        if code == 1049:
            return DatabaseError(
                f"database {database!r} does not exist on the server at {where}",
                "create it first (safemigrate never creates the target database), "
                "or fix the database name in --db",
            )
        if code == 1045:
            return DatabaseError(
                f"access denied for user {user!r} on the server at {where}",
                "check the user name and password in --db (the password is never printed)",
            )
        if code in (1044, 1142, 1227, 1370):
            return DatabaseError(f"permission denied on {where}: {text}",
                                 "grant the missing privilege to the migration user")
        if code in LOCK_TIMEOUT_CODES:
            what = "a deadlock" if code == 1213 else f"waiting {self.lock_seconds}s for a lock"
            return DatabaseLockedError(f"gave up on {where}/{database}: {what} ({text})")
        if code in STATEMENT_TIMEOUT_CODES:
            return DatabaseError(
                f"a statement ran longer than {self.statement_timeout:g}s on {database} at {where}",
                f"raise {STATEMENT_TIMEOUT_ENV} (seconds; 0 = no limit)")
        if code == 1040:
            return DatabaseError(f"the server at {where} has too many connections",
                                 "retry later, or raise max_connections")
        if code in (1021, 1114):
            return DiskFullError(f"the server at {where} is out of space: {text}")
        if code == 1170:
            return DatabaseError(f"MySQL cannot index a TEXT/BLOB column without a length: {text}",
                                 "index a VARCHAR column, or use RawSQL with a prefix length")
        if code == 1846:
            return DatabaseError(
                f"the change cannot be made online (it would block writes): {text}",
                "run it in a maintenance window with RawSQL, or with an online schema "
                "change tool (gh-ost, pt-online-schema-change)",
            )
        prefix = f"MySQL error {code}" if code is not None else "MySQL error"
        return DatabaseError(f"{prefix}: {text}")

    def _scrub(self, text: str) -> str:
        """Never let a password through, whatever the driver put in a message."""
        password = self.url.password
        if password:
            text = text.replace(self.url.render_as_string(hide_password=False), redact(self.url))
            text = text.replace(str(password), "***")
        return text

    # -- facts about the database --------------------------------------------------------------
    def server_version(self, conn: Connection) -> str:
        version = str(conn.exec_driver_sql("SELECT VERSION()").scalar())
        product = "MariaDB" if "mariadb" in version.lower() else "MySQL"
        return f"{product} {version.split('-')[0]}"

    def size_bytes(self, conn: Connection) -> int:
        return int(conn.exec_driver_sql(
            "SELECT COALESCE(SUM(DATA_LENGTH + INDEX_LENGTH), 0) FROM information_schema.TABLES "
            "WHERE TABLE_SCHEMA = DATABASE()").scalar() or 0)

    def table_size_bytes(self, conn: Connection, table: str) -> int:
        return int(conn.exec_driver_sql(
            "SELECT COALESCE(SUM(DATA_LENGTH + INDEX_LENGTH), 0) FROM information_schema.TABLES "
            "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = %s", (table,)).scalar() or 0)

    def row_count(self, conn: Connection, table: str, estimate: bool = False) -> int:
        """COUNT(*), or with `estimate` InnoDB's statistics (instant, can be off by a lot)."""
        if estimate:
            found = conn.exec_driver_sql(
                "SELECT TABLE_ROWS FROM information_schema.TABLES "
                "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = %s", (table,)).first()
            if found is not None and found[0] is not None:
                return int(found[0])
        return int(conn.exec_driver_sql(f"SELECT COUNT(*) FROM {qp(table)}").scalar() or 0)

    def _table_names(self, conn: Connection, schema: str | None = None) -> list[str]:
        sql = ("SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_TYPE = 'BASE TABLE' AND "
               + ("TABLE_SCHEMA = %s" if schema else "TABLE_SCHEMA = DATABASE()"))
        return sorted(r[0] for r in conn.exec_driver_sql(sql, (schema,) if schema else ()))

    def user_tables(self, conn: Connection) -> list[str]:
        return [t for t in self._table_names(conn) if not t.startswith(JOURNAL_PREFIX)]

    def schema_fingerprint(self, conn: Connection, tables: list[str]) -> dict[str, Any]:
        """Per table: options, columns (in order, with type, nullability, default, collation,
        extra), indexes with their parts, foreign keys both ways, CHECK constraints, triggers.
        Names of other tables are given without the database when they are in the same one."""
        out: dict[str, Any] = {}
        existing = set(self._table_names(conn))
        mariadb = "mariadb" in str(conn.exec_driver_sql("SELECT VERSION()").scalar()).lower()
        for table in sorted(tables):
            if table not in existing:
                out[table] = None
                continue
            out[table] = self._describe(conn, table, mariadb)
        return out

    def _describe(self, conn: Connection, table: str, mariadb: bool) -> dict[str, Any]:
        def rows(sql: str, *params: Any) -> list[list[Any]]:
            return [list(r) for r in conn.exec_driver_sql(sql, (table, *params))]

        where = "TABLE_SCHEMA = DATABASE() AND TABLE_NAME = %s"
        options = rows(f"SELECT ENGINE, TABLE_COLLATION, CREATE_OPTIONS, TABLE_COMMENT "
                       f"FROM information_schema.TABLES WHERE {where}")
        columns = rows(
            "SELECT COLUMN_NAME, COLUMN_TYPE, IS_NULLABLE, COLUMN_DEFAULT, CHARACTER_SET_NAME, "
            "COLLATION_NAME, EXTRA, GENERATION_EXPRESSION, COLUMN_COMMENT "
            f"FROM information_schema.COLUMNS WHERE {where} ORDER BY ORDINAL_POSITION")
        index_rows = rows(
            "SELECT INDEX_NAME, NON_UNIQUE, INDEX_TYPE, INDEX_COMMENT, COLUMN_NAME, SUB_PART, "
            f"COLLATION FROM information_schema.STATISTICS WHERE {where} "
            "ORDER BY INDEX_NAME, SEQ_IN_INDEX")
        indexes: dict[str, list[Any]] = {}
        for name, non_unique, kind, comment, column, sub_part, collation in index_rows:
            entry = indexes.setdefault(name, [int(non_unique) == 0, kind, comment, []])
            entry[3].append([column, sub_part, collation])
        fk_rows = rows(
            "SELECT k.CONSTRAINT_NAME, k.COLUMN_NAME, "
            "IF(k.REFERENCED_TABLE_SCHEMA = DATABASE(), NULL, k.REFERENCED_TABLE_SCHEMA), "
            "k.REFERENCED_TABLE_NAME, k.REFERENCED_COLUMN_NAME, r.UPDATE_RULE, r.DELETE_RULE "
            "FROM information_schema.KEY_COLUMN_USAGE k "
            "JOIN information_schema.REFERENTIAL_CONSTRAINTS r "
            "ON r.CONSTRAINT_SCHEMA = k.CONSTRAINT_SCHEMA AND r.CONSTRAINT_NAME = k.CONSTRAINT_NAME "
            "AND r.TABLE_NAME = k.TABLE_NAME "
            "WHERE k.TABLE_SCHEMA = DATABASE() AND k.TABLE_NAME = %s "
            "AND k.REFERENCED_TABLE_NAME IS NOT NULL ORDER BY k.CONSTRAINT_NAME, k.ORDINAL_POSITION")
        foreign_keys: dict[str, list[Any]] = {}
        for name, column, ref_schema, ref_table, ref_column, on_update, on_delete in fk_rows:
            entry = foreign_keys.setdefault(name, [ref_schema, ref_table, on_update, on_delete, [], []])
            entry[4].append(column)
            entry[5].append(ref_column)
        referenced_by = rows(
            "SELECT DISTINCT TABLE_NAME, CONSTRAINT_NAME FROM information_schema.KEY_COLUMN_USAGE "
            "WHERE REFERENCED_TABLE_SCHEMA = DATABASE() AND REFERENCED_TABLE_NAME = %s "
            "AND TABLE_SCHEMA = DATABASE() ORDER BY TABLE_NAME, CONSTRAINT_NAME")
        same_table = "AND cc.TABLE_NAME = tc.TABLE_NAME " if mariadb else ""
        try:
            checks = rows(
                "SELECT tc.CONSTRAINT_NAME, cc.CHECK_CLAUSE FROM information_schema.TABLE_CONSTRAINTS tc "
                "JOIN information_schema.CHECK_CONSTRAINTS cc ON cc.CONSTRAINT_SCHEMA = tc.CONSTRAINT_SCHEMA "
                f"AND cc.CONSTRAINT_NAME = tc.CONSTRAINT_NAME {same_table}"
                "WHERE tc.TABLE_SCHEMA = DATABASE() AND tc.TABLE_NAME = %s "
                "AND tc.CONSTRAINT_TYPE = 'CHECK' ORDER BY tc.CONSTRAINT_NAME")
        except sa.exc.DBAPIError:  # servers before CHECK constraints
            checks = []
        triggers = [
            [name, timing, event, " ".join(str(body).split())]
            for name, timing, event, body in rows(
                "SELECT TRIGGER_NAME, ACTION_TIMING, EVENT_MANIPULATION, ACTION_STATEMENT "
                "FROM information_schema.TRIGGERS "
                "WHERE EVENT_OBJECT_SCHEMA = DATABASE() AND EVENT_OBJECT_TABLE = %s "
                "ORDER BY ACTION_TIMING, EVENT_MANIPULATION, ACTION_ORDER")
            if not str(name).startswith(JOURNAL_PREFIX)
        ]
        primary = indexes.get("PRIMARY")
        return {
            "options": options[0] if options else None,
            "columns": columns,
            "primary_key": [part[0] for part in primary[3]] if primary else [],
            "indexes": [[name, *entry] for name, entry in sorted(indexes.items())],
            "foreign_keys": [[name, *entry] for name, entry in sorted(foreign_keys.items())],
            "referenced_by": referenced_by,
            "checks": checks,
            "triggers": triggers,
        }

    def integrity_check(self, conn: Connection) -> list[str]:
        """CHECK TABLE over the user tables: every error or warning, and any status but OK."""
        problems: list[str] = []
        tables = self.user_tables(conn)
        for start in range(0, len(tables), 32):
            chunk = tables[start:start + 32]
            for name, _op, msg_type, text in conn.exec_driver_sql(
                    "CHECK TABLE " + ", ".join(qp(t) for t in chunk)):
                kind = str(msg_type).lower()
                if kind in ("error", "warning") or (kind == "status" and str(text).upper() != "OK"):
                    problems.append(f"{str(name).split('.', 1)[-1]}: {kind}: {text}")
        return problems

    # -- DDL -----------------------------------------------------------------------------------
    def quote(self, name: str) -> str:
        """Identifiers in the SQL the steps run through exec_driver_sql (see qp)."""
        return qp(name)

    def add_column_sql(self, table: str, column: str, type_sql: str, default_sql: str | None,
                       nullable: bool) -> str:
        sql = super().add_column_sql(table, column, type_sql, default_sql, nullable)
        # MariaDB does ADD COLUMN instantly under LOCK=NONE; MySQL 8 would then rule out its
        # INSTANT algorithm, and picks INSTANT or an online INPLACE by itself anyway.
        return sql + ", LOCK=NONE" if getattr(self.engine.dialect, "is_mariadb", False) else sql

    def create_index_sql(self, index: sa.Index) -> tuple[str, bool]:
        sql, autocommit = super().create_index_sql(index)
        return sql + " LOCK=NONE", autocommit

    def analyze_sql(self, table: str) -> str:
        return f"ANALYZE TABLE {self.quote(table)}"

    def rebuild_indexes_sql(self, conn: Connection, table: str) -> list[str]:
        """InnoDB keeps its B-trees valid and DROP COLUMN already rebuilt the table: nothing
        (ANALYZE TABLE refreshes the statistics). MyISAM/Aria tables are OPTIMIZEd."""
        engine = conn.exec_driver_sql(
            "SELECT ENGINE FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() "
            "AND TABLE_NAME = %s", (table,)).scalar()
        return [] if str(engine or "InnoDB").lower() == "innodb" else [f"OPTIMIZE TABLE {self.quote(table)}"]

    def has_index(self, conn: Connection, table: str, name: str) -> bool:
        return conn.exec_driver_sql(
            "SELECT 1 FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = DATABASE() "
            "AND TABLE_NAME = %s AND INDEX_NAME = %s LIMIT 1", (table, name)).first() is not None

    def index_definition(self, conn: Connection, table: str, name: str) -> str | None:
        parts = conn.exec_driver_sql(
            "SELECT * FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = DATABASE() "
            "AND TABLE_NAME = %s AND INDEX_NAME = %s ORDER BY SEQ_IN_INDEX", (table, name)
        ).mappings().all()
        if not parts:
            return None
        columns = []
        for part in parts:
            if part["COLUMN_NAME"] is None:  # MySQL 8 functional key part
                columns.append(f"({part.get('EXPRESSION')})")
                continue
            text = qp(part["COLUMN_NAME"])
            if part["SUB_PART"]:
                text += f"({int(part['SUB_PART'])})"
            if part["COLLATION"] == "D":
                text += " DESC"
            columns.append(text)
        first = parts[0]
        keys = ", ".join(columns)
        if name == "PRIMARY":
            return f"ALTER TABLE {qp(table)} ADD PRIMARY KEY ({keys})"
        kind = str(first["INDEX_TYPE"]).upper()
        prefix = {"FULLTEXT": "FULLTEXT ", "SPATIAL": "SPATIAL "}.get(kind, "")
        if not prefix and int(first["NON_UNIQUE"]) == 0:
            prefix = "UNIQUE "
        using = " USING HASH" if kind == "HASH" else ""
        sql = f"CREATE {prefix}INDEX {qp(name)}{using} ON {qp(table)} ({keys})"
        if first.get("INDEX_COMMENT"):
            sql += f" COMMENT '{escape_string(str(first['INDEX_COMMENT'])).replace('%', '%%')}'"
        return sql

    # -- change capture ------------------------------------------------------------------------
    def capture_triggers_sql(self, table: str, log: str, keys: list[str], watched: list[str],
                             prefix: str) -> tuple[list[str], list[str]]:
        """AFTER INSERT / UPDATE / DELETE triggers. MySQL has no UPDATE OF: an update is logged
        when a watched column's bytes changed (NULL-safe, blind to collations), which is what
        matters; an update that sets a column to the value it had is not logged."""
        cols = ", ".join([qp(f"k_{k}") for k in keys] + ["`op`"])
        new = ", ".join(f"NEW.{qp(k)}" for k in keys)
        old = ", ".join(f"OLD.{qp(k)}" for k in keys)
        insert = f"INSERT INTO {qp(log)} ({cols})"
        statements = [f"CREATE TRIGGER {qp(prefix + '_i')} AFTER INSERT ON {qp(table)} "
                      f"FOR EACH ROW {insert} VALUES ({new}, 'I')"]
        names = [prefix + "_i"]
        if watched:
            def differs(c: str) -> str:  # byte-wise: 'x' = 'X' under a _ci collation
                return f"NOT (CAST(OLD.{qp(c)} AS BINARY) <=> CAST(NEW.{qp(c)} AS BINARY))"

            changed = " OR ".join(differs(c) for c in watched)
            moved = " OR ".join(differs(k) for k in keys)
            statements.append(
                f"CREATE TRIGGER {qp(prefix + '_u')} AFTER UPDATE ON {qp(table)} FOR EACH ROW "
                f"BEGIN IF {changed} THEN {insert} VALUES ({new}, 'U'); "
                f"IF {moved} THEN {insert} VALUES ({old}, 'D'); END IF; END IF; END")
            names.append(prefix + "_u")
        statements.append(f"CREATE TRIGGER {qp(prefix + '_d')} AFTER DELETE ON {qp(table)} "
                          f"FOR EACH ROW {insert} VALUES ({old}, 'D')")
        names.append(prefix + "_d")
        return statements, names

    def trigger_names(self, conn: Connection, table: str) -> set[str]:
        return {r[0] for r in conn.exec_driver_sql(
            "SELECT TRIGGER_NAME FROM information_schema.TRIGGERS "
            "WHERE EVENT_OBJECT_SCHEMA = DATABASE() AND EVENT_OBJECT_TABLE = %s", (table,))}

    def drop_trigger_sql(self, name: str, table: str) -> list[str]:
        return [f"DROP TRIGGER IF EXISTS {qp(name)}"]

    # -- load and health -----------------------------------------------------------------------
    def health(self, conn: Connection) -> dict[str, Any]:
        """Figures for the load guards, named so gh-ost's habits carry over
        (`max_load = {Threads_running = 25}`):

        Threads_running / Threads_connected   server status counters
        innodb_lock_waits                     transactions waiting for a row lock now
        innodb_lock_wait_ms                   the longest of those waits so far
        oldest_transaction_s                  age of the oldest open transaction (purge lag)
        replica_lag_s                         Seconds_Behind_Master when this server is a
                                              replica (None otherwise, or when not visible)
        Figures that need a privilege the user lacks (PROCESS, REPLICATION CLIENT) are None.
        """
        status = {str(k): v for k, v in conn.exec_driver_sql(
            "SHOW GLOBAL STATUS WHERE Variable_name IN ('Threads_running', 'Threads_connected')")}
        out: dict[str, Any] = {
            "Threads_running": int(status.get("Threads_running") or 0),
            "Threads_connected": int(status.get("Threads_connected") or 0),
            "innodb_lock_waits": None, "innodb_lock_wait_ms": None,
            "oldest_transaction_s": None, "replica_lag_s": None,
        }
        try:
            waits, longest, oldest = conn.exec_driver_sql(
                "SELECT COALESCE(SUM(trx_state = 'LOCK WAIT'), 0), "
                "MAX(IF(trx_state = 'LOCK WAIT', "
                "TIMESTAMPDIFF(MICROSECOND, trx_wait_started, NOW(6)), NULL)), "
                "MAX(TIMESTAMPDIFF(SECOND, trx_started, NOW())) FROM information_schema.INNODB_TRX"
            ).one()
            out["innodb_lock_waits"] = int(waits or 0)
            out["innodb_lock_wait_ms"] = round(float(longest) / 1000, 1) if longest is not None else 0.0
            out["oldest_transaction_s"] = float(oldest) if oldest is not None else 0.0
        except sa.exc.DBAPIError:
            pass
        out["replica_lag_s"] = self._replica_lag(conn)
        return out

    def _replica_lag(self, conn: Connection) -> float | None:
        for statement in ("SHOW REPLICA STATUS", "SHOW SLAVE STATUS"):
            try:
                row = conn.exec_driver_sql(statement).mappings().first()
            except sa.exc.DBAPIError:
                continue
            if row is None:
                return None
            lag = row.get("Seconds_Behind_Master", row.get("Seconds_Behind_Source"))
            return float(lag) if lag is not None else None
        return None

    # -- client programs -----------------------------------------------------------------------
    def _clients(self) -> tuple[str, str] | None:
        """(mysqldump, mysql) when both are installed and allowed, else None."""
        if os.environ.get(CLIENTS_ENV, "").strip().lower() in ("0", "false", "no", "off"):
            return None
        dump = _client(("mysqldump", "mariadb-dump"))
        client = _client(("mysql", "mariadb"))
        return (dump, client) if dump and client else None

    @contextmanager
    def _defaults_file(self) -> Iterator[str]:
        """The connection settings for a client program, in a private temporary option file."""
        params = self._connect_params()
        lines = ["[client]"]
        if params.get("user"):
            lines.append(f"user={_option_value(str(params['user']))}")
        if params.get("password"):
            lines.append(f"password={_option_value(str(params['password']))}")
        if params.get("unix_socket"):
            lines += [f"socket={_option_value(str(params['unix_socket']))}", "protocol=SOCKET"]
        else:
            lines += [f"host={_option_value(str(params.get('host') or 'localhost'))}",
                      f"port={int(params.get('port') or 3306)}", "protocol=TCP"]
        for key, value in (params.get("ssl") or {}).items():
            if key in ("ca", "cert", "key", "cipher"):
                lines.append(f"ssl-{key}={_option_value(str(value))}")
        lines.append("default-character-set=utf8mb4")
        fd, path = tempfile.mkstemp(prefix="safemigrate-", suffix=".cnf")  # mode 0600
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write("\n".join(lines) + "\n")
            yield path
        finally:
            Path(path).unlink(missing_ok=True)

    @staticmethod
    def _client_env() -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if k not in _CLIENT_ENV_DROP}

    def _client_failure(self, program: str, code: int, stderr: bytes) -> str:
        lines = [ln for ln in stderr.decode("utf-8", "replace").splitlines() if ln.strip()]
        message = lines[-1] if lines else f"exit status {code}"
        return self._scrub(f"{Path(program).name} failed: {message}")

    # -- snapshots -----------------------------------------------------------------------------
    def snapshot(self, dest: Path, tables: list[str]) -> dict[str, Any]:
        tables = sorted(tables)
        clients = self._clients()
        if clients is not None and tables:
            try:
                digests = self._snapshot_mysqldump(dest, tables, clients[0])
                self.last_snapshot_method = "mysqldump"
                return digests
            except _CoordinationUnavailable:
                with open(dest, "wb"):
                    pass  # start the file again
        digests = self._snapshot_export(dest, tables)
        self.last_snapshot_method = "export"
        return digests

    def _retry_locks(self, action: Callable[[], T], attempts: int = 5) -> T:
        """Run `action`, retrying lock wait timeouts and deadlocks with exponential backoff."""
        delay = 0.25
        for attempt in range(attempts):
            try:
                return action()
            except (sa.exc.DBAPIError, pymysql.err.MySQLError) as exc:
                if not self.is_lock_timeout(exc) or attempt == attempts - 1:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 8.0)
        raise AssertionError("unreachable")

    def _snapshot_mysqldump(self, dest: Path, tables: list[str], program: str) -> dict[str, Any]:
        """mysqldump and our digests on the same data: see the module docstring."""
        database = str(self.url.database)
        with (self._defaults_file() as defaults,
              self.engine.connect() as conn,
              self._without_statement_timeout(conn),
              self.engine.connect() as locker,
              open(dest, "wb") as out,
              tempfile.TemporaryFile() as stderr):
            locker = locker.execution_options(isolation_level="AUTOCOMMIT")
            engines = {r[0] for r in conn.exec_driver_sql(
                "SELECT UPPER(ENGINE) FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() "
                f"AND TABLE_NAME IN ({', '.join(['%s'] * len(tables))})", tuple(tables))}
            hold = bool(engines - {"INNODB"})  # no read view outside InnoDB: keep writes out
            conn.rollback()
            # While LOCK TABLES waits, new writers queue behind it: wait 1 s at most, and when
            # a long transaction holds the tables, use the export (which blocks no one) instead.
            locker.exec_driver_sql("SET SESSION lock_wait_timeout = 1")
            try:
                locker.exec_driver_sql("LOCK TABLES " + ", ".join(f"{qp(t)} READ" for t in tables))
            except sa.exc.DBAPIError as exc:
                if error_code(exc) in (1044, 1142, 1227) or self.is_lock_timeout(exc):
                    raise _CoordinationUnavailable() from None  # no privilege, or busy tables
                raise
            finally:
                locker.exec_driver_sql(f"SET SESSION lock_wait_timeout = {self.lock_seconds}")
            proc: subprocess.Popen[bytes] | None = None
            locked, since = True, time.monotonic()
            try:
                conn.exec_driver_sql("START TRANSACTION WITH CONSISTENT SNAPSHOT")
                args = [program, f"--defaults-file={defaults}", "--single-transaction",
                        "--skip-lock-tables", "--quick", "--hex-blob", "--triggers",
                        "--no-tablespaces", "--skip-dump-date", "--tz-utc", "--add-drop-table",
                        "--max-allowed-packet=1G", "--", database, *tables]
                proc = subprocess.Popen(args, stdout=out, stderr=stderr, stdin=subprocess.DEVNULL,
                                        env=self._client_env())
                self._await_dump_snapshot(dest, proc, stderr, program)
                if not hold:
                    locker.exec_driver_sql("UNLOCK TABLES")
                    locked, self.last_write_hold = False, time.monotonic() - since
                digests = database_digest(conn, tables)
                code = proc.wait()
                proc = None
            finally:
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait()
                if locked:
                    locker.exec_driver_sql("UNLOCK TABLES")
                    self.last_write_hold = time.monotonic() - since
                conn.rollback()
            if code != 0:
                stderr.seek(0)
                raise BackupError(self._client_failure(program, code, stderr.read()))
        if DUMP_END not in _tail(dest):
            raise BackupError(f"mysqldump wrote an incomplete snapshot {dest.name}")
        return digests

    def _await_dump_snapshot(self, dest: Path, proc: subprocess.Popen[bytes], stderr: IO[bytes],
                             program: str) -> None:
        """Return once mysqldump's read view provably exists, holding writes back meanwhile.

        mysqldump runs START TRANSACTION WITH CONSISTENT SNAPSHOT before it dumps any table, and
        writes "-- Table structure for table" only while dumping one: once that line is in the
        file, its snapshot was taken. Its output is block-buffered, so the line shows up with
        the first few KB of data (or at exit for a tiny dump, which then ran entirely while
        writes were held back: just as good). Writes are never held back longer than
        lock_timeout for it: past that, mysqldump is stopped and the logical export is used.
        """
        deadline = time.monotonic() + max(2.0, float(self.lock_seconds))
        while True:
            code = proc.poll()
            if code is not None:
                if code == 0:
                    return
                stderr.seek(0)
                raise BackupError(self._client_failure(program, code, stderr.read()))
            with open(dest, "rb") as handle:
                if DUMP_STARTED in handle.read(1 << 16):
                    return
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise _CoordinationUnavailable()
            time.sleep(0.002)

    def _snapshot_export(self, dest: Path, tables: list[str]) -> dict[str, Any]:
        """The logical export: file and digests from one consistent-snapshot transaction."""
        with self.engine.connect() as conn, self._without_statement_timeout(conn):
            conn.rollback()
            conn.exec_driver_sql("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY")
            changed = False  # the session's sql_mode / time_zone differ from the pool's
            try:
                for table in tables:  # open them all now: their definitions stay put until the end
                    conn.exec_driver_sql(f"SELECT 1 FROM {qp(table)} LIMIT 0").all()
                mode, zone = conn.exec_driver_sql("SELECT @@SESSION.sql_mode, @@SESSION.time_zone").one()
                conn.exec_driver_sql("SET SESSION sql_mode = %s, time_zone = '+00:00', "
                                     "sql_quote_show_create = 1", (EXPORT_SQL_MODE,))
                changed = True
                with open(dest, "w", encoding="utf-8", newline="\n") as out:
                    version = self.server_version(conn)
                    out.write(f"{EXPORT_MAGIC}\n-- from {version}, database {q(str(self.url.database))}, "
                              f"tables: {', '.join(tables) or '-'}\n")
                    out.write("SET NAMES utf8mb4;\n"
                              f"SET SESSION sql_mode = '{EXPORT_SQL_MODE}';\n"
                              "SET SESSION time_zone = '+00:00';\n"
                              "SET SESSION foreign_key_checks = 0;\n"
                              "SET SESSION unique_checks = 0;\n")
                    rows = sum(self._export_table(conn, out, table) for table in tables)
                    out.write(f"{EXPORT_END}: {len(tables)} tables, {rows} rows\n")
                conn.exec_driver_sql("SET SESSION sql_mode = %s, time_zone = %s", (mode, zone))
                changed = False
                return database_digest(conn, tables)
            finally:
                if changed:
                    conn.invalidate()  # its session settings must not go back to the pool
                else:
                    conn.rollback()

    def _export_table(self, conn: Connection, out: IO[str], table: str) -> int:
        create = conn.exec_driver_sql(f"SHOW CREATE TABLE {qp(table)}").one()[1]
        out.write(f"\n-- table {q(table)}\nDROP TABLE IF EXISTS {q(table)};\n{create};\n")
        columns = [r[0] for r in conn.exec_driver_sql(
            "SELECT COLUMN_NAME FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() "
            "AND TABLE_NAME = %s AND COALESCE(GENERATION_EXPRESSION, '') = '' "
            "AND EXTRA NOT LIKE '%%VIRTUAL%%' AND EXTRA NOT LIKE '%%STORED%%' "
            "AND EXTRA NOT LIKE '%%PERSISTENT%%' ORDER BY ORDINAL_POSITION", (table,))]
        head = f"INSERT INTO {q(table)} ({', '.join(q(c) for c in columns)}) VALUES "
        result = conn.exec_driver_sql(f"SELECT {', '.join(qp(c) for c in columns)} FROM {qp(table)}",
                                      execution_options={"stream_results": True})
        batch: list[str] = []
        size = count = 0
        while chunk := result.fetchmany(1000):
            for row in chunk:
                values = "(" + ",".join(map(sql_literal, row)) + ")"
                if batch and size + len(values) > INSERT_BYTES:
                    out.write(head + ",".join(batch) + ";\n")
                    batch, size = [], 0
                batch.append(values)
                size += len(values) + 1
                count += 1
        if batch:
            out.write(head + ",".join(batch) + ";\n")
        triggers = [r[0] for r in conn.exec_driver_sql(
            "SELECT TRIGGER_NAME FROM information_schema.TRIGGERS WHERE EVENT_OBJECT_SCHEMA = DATABASE() "
            "AND EVENT_OBJECT_TABLE = %s ORDER BY ACTION_TIMING, EVENT_MANIPULATION, ACTION_ORDER",
            (table,)) if not str(r[0]).startswith(JOURNAL_PREFIX)]
        if triggers:
            out.write("DELIMITER ;;\n")
            for name in triggers:
                row = conn.exec_driver_sql(f"SHOW CREATE TRIGGER {qp(name)}").mappings().one()
                out.write(f"SET SESSION sql_mode = '{escape_string(str(row['sql_mode']))}';;\n"
                          f"{row['SQL Original Statement']};;\n")
            out.write(f"SET SESSION sql_mode = '{EXPORT_SQL_MODE}';;\nDELIMITER ;\n")
        return count

    # -- loading a snapshot --------------------------------------------------------------------
    def _check_file(self, path: Path) -> str:
        """Which writer made the file ("export" or "mysqldump"), and that it is complete."""
        try:
            with open(path, "rb") as handle:
                head = handle.read(4096)
        except OSError as exc:
            raise BackupError(f"snapshot {path.name} cannot be read: {exc.strerror}") from None
        tail = _tail(path)
        if head.startswith(EXPORT_MAGIC.encode()):
            if EXPORT_END not in tail:
                raise BackupError(f"snapshot {path.name} is truncated (no end marker)")
            return "export"
        if b"MariaDB dump" in head or b"MySQL dump" in head:
            if DUMP_END not in tail:
                raise BackupError(f"snapshot {path.name} is truncated (no end marker)")
            return "mysqldump"
        raise BackupError(f"{path.name} is not a MySQL/MariaDB snapshot written by safemigrate")

    def _load(self, path: Path, database: str) -> None:
        self._check_file(path)
        clients = self._clients()
        if clients is None:
            self._load_with_python(path, database)
            return
        try:
            self._load_with_client(clients[1], path, database)
        except _DefinerRefused:  # start again with the loader that can leave DEFINERs out
            self._drop_database(database)
            self._create_database(database)
            self._load_with_python(path, database)

    def _load_with_client(self, program: str, path: Path, database: str) -> None:
        with self._defaults_file() as defaults, open(path, "rb") as source:
            done = subprocess.run(
                [program, f"--defaults-file={defaults}", "--batch", "--max-allowed-packet=1G",
                 f"--database={database}"],
                stdin=source, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                env=self._client_env(), check=False)
        if done.returncode != 0:
            if f"ERROR {_NEEDS_DEFINER_PRIVILEGE} " in done.stderr.decode("utf-8", "replace"):
                raise _DefinerRefused()
            raise BackupError(f"snapshot {path.name} cannot be loaded: "
                              + self._client_failure(program, done.returncode, done.stderr))

    def _load_with_python(self, path: Path, database: str) -> None:
        with (self._raw(database) as db, db.cursor() as cursor,
              open(path, encoding="utf-8", newline="") as source):
            cursor.execute("SET SESSION foreign_key_checks = 0")
            for statement in iter_statements(source):
                try:
                    self._execute_as_owner(cursor, statement)
                except pymysql.err.MySQLError as exc:
                    if error_code(exc) == 1065:  # a statement of comments only
                        continue
                    raise BackupError(f"snapshot {path.name} cannot be loaded: "
                                      f"{self._scrub(error_text(exc))}") from None

    @staticmethod
    def _execute_as_owner(cursor: Any, statement: str) -> None:
        """Execute; a trigger whose DEFINER this user may not name is created as its own."""
        try:
            cursor.execute(statement)
        except pymysql.err.MySQLError as exc:
            stripped = strip_definer(statement)
            if error_code(exc) != _NEEDS_DEFINER_PRIVILEGE or stripped == statement:
                raise
            cursor.execute(stripped)

    def _create_database(self, name: str) -> None:
        with self._raw() as db, db.cursor() as cursor:
            cursor.execute("SELECT DEFAULT_CHARACTER_SET_NAME, DEFAULT_COLLATION_NAME "
                           "FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = %s",
                           (self.url.database,))
            found = cursor.fetchone()
            options = f" CHARACTER SET {found[0]} COLLATE {found[1]}" if found else ""
            cursor.execute(f"CREATE DATABASE {q(name)}{options}")

    def _drop_database(self, name: str) -> None:
        with self._raw() as db, db.cursor() as cursor:
            cursor.execute("SET SESSION foreign_key_checks = 0")
            self._retry_locks(lambda: cursor.execute(f"DROP DATABASE IF EXISTS {q(name)}"))

    @contextmanager
    def snapshot_reader(self, path: Path) -> Iterator[Connection]:
        """The snapshot loaded into a scratch database of its own, dropped on exit."""
        name = f"{VERIFY_PREFIX}{uuid.uuid4().hex[:16]}"
        self._create_database(name)
        try:
            self._load(path, name)
            engine = self._build_engine(self.url.set(database=name))
            try:
                with engine.connect() as conn:
                    yield conn
            finally:
                engine.dispose()
        finally:
            self._drop_database(name)

    # -- restore -------------------------------------------------------------------------------
    def restore_tables(self, snapshot: Path, tables: list[str], drop: list[str]) -> None:
        """Put `tables` back as they are in the snapshot and drop `drop` (module docstring:
        load into a scratch database, move in under staging names, drop-and-rename, re-add
        foreign keys and triggers). Restartable: a second call starts again from the file."""
        live = str(self.url.database)
        scratch = RESTORE_PREFIX + hashlib.sha256(
            f"{Path(snapshot).resolve()}|{live}".encode()).hexdigest()[:16]
        self._drop_database(scratch)
        self._create_database(scratch)
        try:
            self._load(Path(snapshot), scratch)
            with self._raw() as db, db.cursor() as cursor:
                def run(sql: str, *params: Any) -> list[tuple[Any, ...]]:
                    self._retry_locks(lambda: cursor.execute(sql, params or None))
                    return list(cursor.fetchall())

                run("SET SESSION foreign_key_checks = 0")
                present = {r[0] for r in run(
                    "SELECT TABLE_NAME FROM information_schema.TABLES "
                    "WHERE TABLE_SCHEMA = %s AND TABLE_TYPE = 'BASE TABLE'", scratch)}
                restored = [t for t in tables if t in present]
                plans: dict[str, tuple[list[str], list[tuple[str, str]]]] = {}
                for table in restored:
                    create = run(f"SHOW CREATE TABLE {q(scratch)}.{q(table)}")[0][1]
                    foreign = [m.group(0).strip().rstrip(",") for m in
                               (_FK_LINE.match(line) for line in create.splitlines()) if m]
                    names = [r[0] for r in run(
                        "SELECT TRIGGER_NAME FROM information_schema.TRIGGERS WHERE "
                        "EVENT_OBJECT_SCHEMA = %s AND EVENT_OBJECT_TABLE = %s "
                        "ORDER BY ACTION_TIMING, EVENT_MANIPULATION, ACTION_ORDER", scratch, table)]
                    triggers = []
                    for name in names:
                        row = run(f"SHOW CREATE TRIGGER {q(scratch)}.{q(name)}")[0]
                        if not name.startswith(JOURNAL_PREFIX):
                            triggers.append((str(row[1]), str(row[2])))  # sql_mode, statement
                        run(f"DROP TRIGGER {q(scratch)}.{q(name)}")
                    plans[table] = (foreign, triggers)
                # detach every restored table from the scratch database, then move it in
                for table in restored:
                    fk_names = [_FK_LINE.match(line).group(1).replace("``", "`")  # type: ignore[union-attr]
                                for line in plans[table][0]]
                    if fk_names:
                        run(f"ALTER TABLE {q(scratch)}.{q(table)} "
                            + ", ".join(f"DROP FOREIGN KEY {q(n)}" for n in fk_names))
                for table in restored:
                    stage = _stage_name(table)
                    run(f"DROP TABLE IF EXISTS {q(stage)}")
                    run(f"RENAME TABLE {q(scratch)}.{q(table)} TO {q(live)}.{q(stage)}")
                # the swap, table by table (foreign_key_checks = 0: see the module docstring)
                for table in tables:
                    run(f"DROP TABLE IF EXISTS {q(table)}")
                    if table not in plans:
                        continue
                    run(f"RENAME TABLE {q(_stage_name(table))} TO {q(table)}")
                    foreign, triggers = plans[table]
                    if foreign:
                        run(f"ALTER TABLE {q(table)} " + ", ".join(f"ADD {fk}" for fk in foreign))
                    for mode, statement in triggers:
                        run("SET SESSION sql_mode = %s", mode)
                        self._retry_locks(lambda s=statement: self._execute_as_owner(cursor, s))
                for table in drop:
                    run(f"DROP TABLE IF EXISTS {q(table)}")
        except pymysql.err.MySQLError as exc:
            raise self.translate_error(exc) from None
        finally:
            self._drop_database(scratch)


def _stage_name(table: str) -> str:
    return STAGE_PREFIX + hashlib.sha1(table.encode()).hexdigest()[:16]


def _tail(path: Path, size: int = 512) -> str:
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        handle.seek(max(0, handle.tell() - size))
        return handle.read().decode("utf-8", "replace")


__all__ = ["MySQLDialect", "iter_statements", "sql_literal"]
