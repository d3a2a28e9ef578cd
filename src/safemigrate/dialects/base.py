"""What differs per engine, behind one interface: connect, snapshot, restore, integrity, DDL quirks.

Everything generic (reading, batching, digests, the journal) is written once against SQLAlchemy
Core; a dialect class only holds what the engines really do differently.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
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

    @abstractmethod
    def index_definition(self, conn: Connection, table: str, name: str) -> str | None:
        """SQL that recreates an existing index exactly, so DropIndex can be undone."""

    # -- snapshots -----------------------------------------------------------------------------
    @abstractmethod
    def snapshot(self, conn: Connection, dest: Path) -> None:
        """Write a consistent copy of the database to `dest` (already a temp name)."""

    @abstractmethod
    def open_snapshot(self, path: Path) -> Engine:
        """A read-only engine over a snapshot file, for verification and restore."""

    @abstractmethod
    def restore_tables(self, snapshot: Path, tables: list[str], drop: list[str]) -> None:
        """Replace `tables` with their content and definition in the snapshot; drop `drop`."""
