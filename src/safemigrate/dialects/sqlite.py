"""SQLite: the embedded default. Online backup API for snapshots, ATTACH for restores."""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from .._exceptions import (
    DatabaseError,
    DatabaseLockedError,
    DiskFullError,
    NotADatabaseError,
    SafeMigrateError,
)
from ..digest import database_digest
from .base import Dialect


def _install_transaction_fix(engine: Engine) -> None:
    """Make pysqlite transactions real: DDL inside them, and write locks taken up front.

    The sqlite3 module otherwise commits before DDL and begins lazily, which would split a
    batch's writes from its checkpoint. BEGIN IMMEDIATE takes the write lock at the start so a
    transaction never fails half-way on a lock upgrade; readers ask for DEFERRED.
    """

    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @sa.event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "IMMEDIATE")
        conn.exec_driver_sql(f"BEGIN {mode}")


_COLLATE = re.compile(r"\bCOLLATE\s+[\"'`\[]?(\w+)", re.IGNORECASE)


def _placeholder_collations(db: sqlite3.Connection) -> None:
    """Let table definitions that name a collation only the application registers be
    recreated on restore; anything that would really compare with one fails (and rolls back)."""
    sql = [row[0] or "" for row in db.execute("SELECT sql FROM snap.sqlite_master")]
    for name in {m for text in sql for m in _COLLATE.findall(text)}:
        try:  # (PRAGMA collation_list also lists collations the schema merely names)
            db.execute(f"SELECT 'a' < 'b' COLLATE \"{name}\"")
        except sqlite3.OperationalError:
            def refuse(_a: str, _b: str, name: str = name) -> int:
                raise sqlite3.OperationalError(f"no such collation sequence: {name}")
            db.create_collation(name, refuse)


class SQLiteDialect(Dialect):
    name = "sqlite"

    @property
    def path(self) -> Path | None:
        db = self.url.database
        return None if db in (None, "", ":memory:") else Path(db)

    def create_engine(self) -> Engine:
        engine = sa.create_engine(
            self.url,
            connect_args={"timeout": self.lock_timeout, "check_same_thread": False},
            poolclass=sa.pool.NullPool,
        )
        _install_transaction_fix(engine)
        return engine

    def ping(self) -> None:
        path = self.path
        if path is not None and not path.exists():
            raise DatabaseError(
                f"database file {path} does not exist",
                "check the path given to --db (safemigrate never creates the target database)",
            )
        if path is not None and path.is_dir():
            raise NotADatabaseError(f"{path} is a directory, not a SQLite database file")
        try:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA schema_version").scalar()
        except sa.exc.DBAPIError as exc:
            raise self.translate_error(exc) from None

    @property
    def snapshot_read_options(self) -> dict[str, Any]:
        return {"sqlite_begin": "DEFERRED"}

    def is_lock_timeout(self, exc: BaseException) -> bool:
        return "database is locked" in str(getattr(exc, "orig", exc)).lower()

    def translate_error(self, exc: BaseException) -> SafeMigrateError:
        text = str(getattr(exc, "orig", exc) or exc)
        lower = text.lower()
        if "database is locked" in lower or "database table is locked" in lower:
            return DatabaseLockedError(f"database {self.path} is locked by another connection")
        if "file is not a database" in lower or "file is encrypted" in lower:
            return NotADatabaseError(f"{self.path} is not a SQLite database")
        if "disk is full" in lower or "disk i/o error" in lower:
            return DiskFullError(f"no space left writing {self.path}: {text}")
        if "unable to open database" in lower:
            return DatabaseError(f"cannot open database {self.path}: {text}")
        if any(s in lower for s in ("no such collation sequence", "no such function", "unknown function")):
            return DatabaseError(
                f"SQLite error: {text.splitlines()[0]} (the schema of {self.path} uses it)",
                "the application that made this database registers that collation or function on "
                "its own connections, so safemigrate cannot check or maintain what depends on it; "
                "drop or rebuild that index, trigger or view without it first",
            )
        return DatabaseError(f"SQLite error: {text.splitlines()[0]}")

    def server_version(self, conn: Connection) -> str:
        return "SQLite " + str(conn.exec_driver_sql("select sqlite_version()").scalar())

    def size_bytes(self, conn: Connection) -> int:
        pages = conn.exec_driver_sql("PRAGMA page_count").scalar() or 0
        size = conn.exec_driver_sql("PRAGMA page_size").scalar() or 0
        return int(pages) * int(size)

    def user_tables(self, conn: Connection) -> list[str]:
        rows = conn.exec_driver_sql(
            "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'"
        ).scalars()
        return sorted(r for r in rows if not r.startswith("safemigrate_"))

    def schema_fingerprint(self, conn: Connection, tables: list[str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        existing = set(self.user_tables(conn))
        for table in sorted(tables):
            if table not in existing:
                out[table] = None
                continue
            q = self.quote(table)
            cols = [list(r) for r in conn.exec_driver_sql(f"PRAGMA table_xinfo({q})")]
            fks = [list(r)[2:] for r in conn.exec_driver_sql(f"PRAGMA foreign_key_list({q})")]
            objs = conn.exec_driver_sql(
                "SELECT type, name, sql FROM sqlite_master WHERE tbl_name = ? AND type IN "
                "('index', 'trigger') AND name NOT LIKE 'safemigrate\\_%' ESCAPE '\\' "
                "ORDER BY type, name",
                (table,),
            ).all()
            out[table] = {
                "columns": cols,
                "foreign_keys": sorted(fks, key=repr),
                "objects": [[t, n, " ".join((s or "").split())] for t, n, s in objs],
            }
        return out

    def trigger_names(self, conn: Connection, table: str) -> set[str]:
        rows = conn.exec_driver_sql(
            "SELECT name FROM sqlite_master WHERE type='trigger' AND tbl_name = ?", (table,))
        return {r[0] for r in rows}

    def drop_trigger_sql(self, name: str, table: str) -> list[str]:
        return [f"DROP TRIGGER IF EXISTS {self.quote(name)}"]

    def capture_triggers_sql(self, table: str, log: str, keys: list[str], watched: list[str],
                             prefix: str) -> tuple[list[str], list[str]]:
        q = self.quote
        cols = ", ".join([q(f"k_{k}") for k in keys] + ["op"])
        new = ", ".join(f"NEW.{q(k)}" for k in keys)
        old = ", ".join(f"OLD.{q(k)}" for k in keys)
        moved = " OR ".join(f"OLD.{q(k)} IS NOT NEW.{q(k)}" for k in keys)
        names = [f"{prefix}_i", f"{prefix}_u", f"{prefix}_d"]
        insert = f"INSERT INTO {q(log)} ({cols})"
        return [
            f"CREATE TRIGGER {q(names[0])} AFTER INSERT ON {q(table)} "
            f"BEGIN {insert} VALUES ({new}, 'I'); END",
            f"CREATE TRIGGER {q(names[1])} AFTER UPDATE OF {', '.join(q(c) for c in watched)} "
            f"ON {q(table)} BEGIN {insert} VALUES ({new}, 'U'); "
            f"{insert} SELECT {old}, 'D' WHERE {moved}; END",
            f"CREATE TRIGGER {q(names[2])} AFTER DELETE ON {q(table)} "
            f"BEGIN {insert} VALUES ({old}, 'D'); END",
        ], names

    def integrity_check(self, conn: Connection) -> list[str]:
        rows = [r[0] for r in conn.exec_driver_sql("PRAGMA integrity_check")]
        return [] if rows == ["ok"] else rows

    # -- pre-migration checks ------------------------------------------------------------------
    def quick_integrity_check(self, conn: Connection) -> list[str]:
        rows = [r[0] for r in conn.exec_driver_sql("PRAGMA quick_check")]
        return [] if rows == ["ok"] else rows

    def foreign_key_violations(self, conn: Connection, limit: int = 100) -> list[str]:
        """PRAGMA foreign_key_check, described with the columns of each broken reference."""
        keys: dict[tuple[str, int], str] = {}
        out: list[str] = []
        result = conn.exec_driver_sql("PRAGMA foreign_key_check")
        try:
            for table, rowid, parent, fkid in result:
                if (table, fkid) not in keys:
                    cols = [(r[3], r[4]) for r in conn.exec_driver_sql(
                        f"PRAGMA foreign_key_list({self.quote(table)})") if r[0] == fkid]
                    keys[(table, fkid)] = (f"{', '.join(c for c, _ in cols)} -> {parent}"
                                           f"({', '.join(str(t or 'rowid') for _, t in cols)})")
                out.append(f"{table} rowid {rowid}: {keys[(table, fkid)]} has no parent row")
                if len(out) >= limit:
                    break
        finally:
            result.close()
        return out

    def index_problems(self, conn: Connection, tables: list[str]) -> list[str]:
        """integrity_check of each table: its b-tree and every index matched to its rows."""
        problems: list[str] = []
        for table in tables:
            name = table.replace("'", "''")
            rows = [r[0] for r in conn.exec_driver_sql(f"PRAGMA integrity_check('{name}')")]
            if rows != ["ok"]:
                problems += [f"{table}: {row}" for row in rows]
        return problems

    def pending_writers(self, conn: Connection) -> list[str]:
        """Whether another connection holds the write lock: BEGIN IMMEDIATE on a probe
        connection, three tries over about a second (a short application write is fine)."""
        if self.path is None:
            return []
        for attempt in range(3):
            probe = sqlite3.connect(self.path, timeout=0.2, isolation_level=None)
            try:
                probe.execute("BEGIN IMMEDIATE")
                probe.execute("ROLLBACK")
                return []
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc).lower():
                    raise
            finally:
                probe.close()
            if attempt < 2:
                time.sleep(0.3)
        return [f"another connection has held the write lock of {self.path.name} for over a second "
                "(an open write transaction)"]

    def index_definition(self, conn: Connection, table: str, name: str) -> str | None:
        return conn.exec_driver_sql(
            "SELECT sql FROM sqlite_master WHERE type='index' AND name = ? AND tbl_name = ?",
            (name, table),
        ).scalar()

    def snapshot(self, dest: Path, tables: list[str]) -> dict[str, Any]:
        """Online backup API inside one read transaction that also computes the digests."""
        with self.engine.connect() as conn, conn.execution_options(sqlite_begin="DEFERRED").begin():
            conn.exec_driver_sql("SELECT count(*) FROM sqlite_master").scalar()
            target = sqlite3.connect(dest)
            try:
                conn.connection.dbapi_connection.backup(target, pages=4096)
            except sqlite3.Error as exc:
                raise self.translate_error(exc) from None
            finally:
                target.close()
            return database_digest(conn, tables)

    @contextmanager
    def snapshot_reader(self, path: Path) -> Iterator[Connection]:
        uri = f"file:{path}?mode=ro"
        engine = sa.create_engine(
            "sqlite://",
            creator=lambda: sqlite3.connect(uri, uri=True, check_same_thread=False),
            poolclass=sa.pool.NullPool,
        )
        _install_transaction_fix(engine)
        try:
            with engine.connect() as conn:
                yield conn
        finally:
            engine.dispose()

    def restore_tables(self, snapshot: Path, tables: list[str], drop: list[str]) -> None:
        """Replace tables by their snapshot versions in one transaction (definition, rows,
        indexes, triggers, AUTOINCREMENT counter)."""
        db = sqlite3.connect(self.path, timeout=self.lock_timeout, isolation_level=None)
        try:
            db.execute("ATTACH DATABASE ? AS snap", (f"file:{snapshot}?mode=ro",))
        except sqlite3.Error:
            db.execute("ATTACH DATABASE ? AS snap", (str(snapshot),))
        q = self.quote
        # Dropping a parent table with foreign keys enforced would delete its ON DELETE CASCADE
        # children (builds with SQLITE_DEFAULT_FOREIGN_KEYS=1 enforce them on every connection).
        db.execute("PRAGMA foreign_keys=OFF")
        _placeholder_collations(db)
        try:
            db.execute("BEGIN IMMEDIATE")
            for table in drop:
                db.execute(f"DROP TABLE IF EXISTS main.{q(table)}")
            has_seq = db.execute(
                "SELECT 1 FROM snap.sqlite_master WHERE name='sqlite_sequence'"
            ).fetchone()
            for table in tables:
                create = db.execute(
                    "SELECT sql FROM snap.sqlite_master WHERE type='table' AND name=?", (table,)
                ).fetchone()
                db.execute(f"DROP TABLE IF EXISTS main.{q(table)}")
                if create is None:
                    continue
                db.execute(create[0])
                db.execute(f"INSERT INTO main.{q(table)} SELECT * FROM snap.{q(table)}")
                for (sql,) in db.execute(
                    "SELECT sql FROM snap.sqlite_master WHERE tbl_name=? AND type IN "
                    "('index','trigger') AND sql IS NOT NULL "
                    "AND name NOT LIKE 'safemigrate\\_%' ESCAPE '\\' ORDER BY type, name",
                    (table,),
                ).fetchall():
                    db.execute(sql)
                if has_seq:
                    row = db.execute(
                        "SELECT seq FROM snap.sqlite_sequence WHERE name=?", (table,)
                    ).fetchone()
                    if row is not None:
                        db.execute("DELETE FROM main.sqlite_sequence WHERE name=?", (table,))
                        db.execute(
                            "INSERT INTO main.sqlite_sequence(name, seq) VALUES (?, ?)",
                            (table, row[0]),
                        )
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise self.translate_error(exc) from None
        finally:
            db.close()
