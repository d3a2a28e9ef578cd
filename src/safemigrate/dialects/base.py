"""What differs per engine, behind one interface: connect, snapshot, restore, integrity, DDL quirks.

Everything generic (reading, batching, digests, the journal) is written once against SQLAlchemy
Core; a dialect class only holds what the engines really do differently.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection, Engine

from .._exceptions import DatabaseError, SafeMigrateError

JOURNAL_PREFIX = "safemigrate_"


@dataclass(frozen=True)
class SnapshotInfo:
    """A snapshot file written by a dialect: where it is and how big."""

    path: Path
    size: int


class Dialect(ABC):
    """Per-engine behaviour. One instance per database URL."""

    name: str = "generic"

    def __init__(self, url: URL, *, lock_timeout: float = 10.0) -> None:
        self.url = url
        self.lock_timeout = lock_timeout
        self._engine: Engine | None = None

    # -- connections -------------------------------------------------------------------
    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = self.create_engine()
        return self._engine

    @abstractmethod
    def create_engine(self) -> Engine:
        """A SQLAlchemy engine whose transactions really are transactions (DDL included)."""

    def dispose(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    @abstractmethod
    def ping(self) -> None:
        """Fail with a clear error when the database cannot be reached or is not a database."""

    def translate_error(self, exc: BaseException) -> SafeMigrateError:
        """Map a driver error onto the exception tree (locks, missing files, wrong engine)."""
        return DatabaseError(f"database error: {str(exc).splitlines()[0]}")

    # -- facts about the database ------------------------------------------------------------
    @abstractmethod
    def server_version(self, conn: Connection) -> str: ...

    @abstractmethod
    def size_bytes(self, conn: Connection) -> int:
        """Bytes the data occupies: what a snapshot will need."""

    def row_count(self, conn: Connection, table: str, estimate: bool = False) -> int:
        """Rows in `table`: exact (COUNT(*)), or with `estimate` the engine's cheap statistic
        where it has one (for plans and progress, never for correctness)."""
        return int(conn.execute(sa.select(sa.func.count()).select_from(sa.table(table))).scalar() or 0)

    def user_tables(self, conn: Connection) -> list[str]:
        """Tables that belong to the application (not the journal, not the engine's own)."""
        names = sa.inspect(conn).get_table_names()
        return sorted(n for n in names if not n.startswith(JOURNAL_PREFIX))

    @abstractmethod
    def schema_fingerprint(self, conn: Connection, tables: list[str]) -> dict[str, Any]:
        """A structural description of tables (columns, indexes, triggers) to compare before/after."""

    @abstractmethod
    def integrity_check(self, conn: Connection) -> list[str]:
        """Problems the engine's own integrity check reports; empty when healthy."""

    # -- DDL the engines spell differently -----------------------------------------------------
    def quote(self, name: str) -> str:
        return self.engine.dialect.identifier_preparer.quote(name)

    def add_column_sql(self, table: str, column: str, type_sql: str, default_sql: str | None,
                       nullable: bool) -> str:
        sql = f"ALTER TABLE {self.quote(table)} ADD COLUMN {self.quote(column)} {type_sql}"
        if default_sql is not None:
            sql += f" DEFAULT {default_sql}"
        if not nullable:
            sql += " NOT NULL"
        return sql

    def drop_column_sql(self, table: str, column: str) -> str:
        return f"ALTER TABLE {self.quote(table)} DROP COLUMN {self.quote(column)}"

    def create_index_sql(self, index: sa.Index) -> tuple[str, bool]:
        """CREATE INDEX for this engine, and whether it must run outside a transaction."""
        return str(sa.schema.CreateIndex(index).compile(dialect=self.engine.dialect)).strip(), False

    def drop_index_sql(self, index: sa.Index) -> tuple[str, bool]:
        return str(sa.schema.DropIndex(index).compile(dialect=self.engine.dialect)).strip(), False

    def analyze_sql(self, table: str) -> str:
        """Refresh the planner statistics of a table (MySQL spells it ANALYZE TABLE)."""
        return f"ANALYZE {self.quote(table)}"

    def rebuild_indexes_sql(self, conn: Connection, table: str) -> list[str]:
        """Statements that rebuild the indexes of `table` (after a rollback); statistics are
        refreshed separately with `analyze_sql`. SQLite spells it REINDEX."""
        return [f"REINDEX {self.quote(table)}"]

    def has_index(self, conn: Connection, table: str, name: str) -> bool:
        return name in {i["name"] for i in sa.inspect(conn).get_indexes(table)}

    def prepare_index(self, conn: Connection, table: str, name: str) -> None:
        """Clear what a failed earlier build of index `name` left behind, before it is built
        (PostgreSQL: the INVALID index of an interrupted CREATE INDEX CONCURRENTLY)."""
        return None

    @abstractmethod
    def index_definition(self, conn: Connection, table: str, name: str) -> str | None:
        """SQL that recreates an existing index exactly, so DropIndex can be undone."""

    # -- snapshots -----------------------------------------------------------------------------
    @abstractmethod
    def snapshot(self, dest: Path, tables: list[str]) -> dict[str, Any]:
        """Write a consistent copy of the database (at least `tables`) to `dest`, a temp file
        already created with mode 0600, and return the digests of `tables` taken at the same
        instant (same transaction / exported snapshot), so the copy can be proven equal."""

    @abstractmethod
    def snapshot_reader(self, path: Path) -> AbstractContextManager[Connection]:
        """A read connection over a snapshot's content: the file itself for SQLite, a scratch
        database restored from the dump for servers (dropped on exit)."""

    @abstractmethod
    def restore_tables(self, snapshot: Path, tables: list[str], drop: list[str]) -> None:
        """Replace `tables` with their content and definition in the snapshot; drop `drop`."""

    # -- change capture (online migrations) -------------------------------------------------
    def capture_triggers_sql(self, table: str, log: str, keys: list[str], watched: list[str],
                             prefix: str) -> tuple[list[str], list[str]]:
        """CREATE TRIGGER statements (and their names) that append the key and 'I'/'U'/'D' of
        every application write to `log`; updates count only when they set a `watched` column."""
        raise NotImplementedError(f"change capture is not implemented for {self.name}")

    def trigger_names(self, conn: Connection, table: str) -> set[str]:
        raise NotImplementedError(f"change capture is not implemented for {self.name}")

    def drop_trigger_sql(self, name: str, table: str) -> list[str]:
        raise NotImplementedError(f"change capture is not implemented for {self.name}")

    @property
    def snapshot_read_options(self) -> dict[str, Any]:
        """Execution options for a transaction whose reads all see one snapshot (validation
        reads the change log and the table in it, so the two agree)."""
        return {"isolation_level": "REPEATABLE READ"}

    # -- behaviour under load ------------------------------------------------------------------
    transactional_ddl = True

    def is_lock_timeout(self, exc: BaseException) -> bool:
        """Whether a driver error means "gave up waiting for a lock" (worth a retry)."""
        return False

    def health(self, conn: Connection) -> dict[str, Any]:
        """Load and health figures for the guards (name -> number, None when unknown), compared
        with [guards] max_load / critical_load like gh-ost's --max-load. None to report here."""
        return {}

    # -- pre-migration checks (safemigrate.checks) ---------------------------------------------
    def quick_integrity_check(self, conn: Connection) -> list[str]:
        """A cheaper integrity check for `safemigrate check` without --full (SQLite: quick_check,
        which skips matching index content to table content). Defaults to the full check."""
        return self.integrity_check(conn)

    def foreign_key_violations(self, conn: Connection, limit: int = 100) -> list[str]:
        """Rows whose foreign keys point nowhere (at most `limit` descriptions). Servers enforce
        foreign keys on every write, so there is nothing to find; SQLite does not."""
        return []

    def index_problems(self, conn: Connection, tables: list[str]) -> list[str]:
        """Indexes of `tables` that are invalid or do not match their table's rows (empty when
        healthy, or when the engine keeps them valid by itself)."""
        return []

    def pending_writers(self, conn: Connection) -> list[str]:
        """Writers holding or waiting for locks right now that a migration would queue behind,
        for engines whose `health()` figures do not already show them (SQLite's write lock)."""
        return []
