"""The MySQL/MariaDB dialect against a real server (a fresh database per test, dropped after).

Skipped with the reason when no server answers, unless SAFEMIGRATE_REQUIRE_SERVERS=1.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymysql
import pytest
import sqlalchemy as sa

from backends import MY_ADMIN, create_database, drop_database
from safemigrate import ConfigError, DatabaseError
from safemigrate.backup import take_snapshot, verify_snapshot_file
from safemigrate.capture import install
from safemigrate.dialects import dialect_for
from safemigrate.dialects.mysql import (
    CLIENTS_ENV,
    STATEMENT_TIMEOUT_ENV,
    MySQLDialect,
    iter_statements,
)
from safemigrate.digest import database_digest
from safemigrate.events import EventBus
from safemigrate.examples.cards import MIGRATIONS_DIR
from safemigrate.examples.cards.generate import generate_into
from safemigrate.examples.cards.transform import WRITES, optimize_card
from safemigrate.journal import Journal
from safemigrate.migrator import Migrator
from safemigrate.settings import Settings
from safemigrate.steps import AddColumn, CreateIndex
from safemigrate.urls import normalize_url

HAVE_CLIENTS = MySQLDialect(normalize_url(MY_ADMIN))._clients() is not None
METHODS = [
    pytest.param("mysqldump", marks=pytest.mark.skipif(not HAVE_CLIENTS,
                                                       reason="mysqldump/mysql not installed")),
    "export",
]


# -- fixtures and helpers -----------------------------------------------------------------------
@pytest.fixture
def my_url(tmp_path: Path) -> Iterator[str]:
    url = create_database("mysql", tmp_path)
    try:
        yield url
    finally:
        drop_database("mysql", url)


@pytest.fixture
def method(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Parametrised snapshot writer: "mysqldump" (client programs) or "export" (built in)."""
    chosen = request.param
    if chosen == "export":
        monkeypatch.setenv(CLIENTS_ENV, "0")
    else:
        monkeypatch.delenv(CLIENTS_ENV, raising=False)
    return chosen


def dialect(url: str, lock_timeout: float = 10.0) -> MySQLDialect:
    found = dialect_for(normalize_url(url), lock_timeout=lock_timeout)
    assert isinstance(found, MySQLDialect)
    return found


def raw(url: str) -> pymysql.connections.Connection:
    """A plain PyMySQL connection (statements without arguments are sent as they are)."""
    params = MySQLDialect(normalize_url(url))._connect_params()
    params["autocommit"] = False
    return pymysql.connect(**params)


def execute(url: str, *statements: str) -> None:
    """Run statements in one transaction on a connection of their own."""
    conn = raw(url)
    try:
        with conn.cursor() as cursor:
            for statement in statements:
                cursor.execute(statement)
        conn.commit()
    finally:
        conn.close()


def fetch(url: str, sql: str, params: tuple[Any, ...] | None = None) -> list[tuple[Any, ...]]:
    conn = raw(url)
    try:
        with conn.cursor() as cursor:
            cursor.execute(sql, params)
            return [tuple(r) for r in cursor.fetchall()]
    finally:
        conn.close()


def state(url: str, tables: list[str]) -> dict[str, Any]:
    """Content digests and schema fingerprint: what a rollback must give back exactly."""
    d = dialect(url)
    try:
        with d.engine.connect() as conn:
            return {"digests": database_digest(conn, tables),
                    "schema": json.loads(json.dumps(d.schema_fingerprint(conn, tables)))}
    finally:
        d.dispose()


def admin(sql: str, *args: Any) -> None:
    """One statement as the server's admin user, through PyMySQL itself (no %-formatting
    unless there are arguments)."""
    conn = raw(MY_ADMIN)
    try:
        conn.cursor().execute(sql, args or None)
    finally:
        conn.close()


def scratch_databases() -> set[str]:
    return {r[0] for r in fetch(MY_ADMIN, "SHOW DATABASES") if r[0].startswith("safemigrate_")}


def settings(url: str, tmp_path: Path, migrations: Path = MIGRATIONS_DIR, **extra: Any) -> Settings:
    return Settings(db=url, migrations=migrations, backup_dir=tmp_path / "backups", workers=2,
                    **extra)


def write_migration(folder: Path, body: str, name: str = "0001_test.py") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(textwrap.dedent(body))
    return folder


TYPES_TABLE = """
CREATE TABLE kinds (
  id INT NOT NULL AUTO_INCREMENT PRIMARY KEY,
  small TINYINT, big BIGINT UNSIGNED, money DECIMAL(20,6), f FLOAT, d DOUBLE,
  name VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin, body TEXT, raw BLOB, fixed BINARY(4),
  day DATE, moment DATETIME(6), stamp TIMESTAMP NULL DEFAULT NULL, span TIME(3), yr YEAR,
  flags BIT(10), mood ENUM('sad','ok','glad'), tags SET('a','b','c'), doc JSON,
  name_len INT AS (CHAR_LENGTH(name)) VIRTUAL,
  UNIQUE KEY uq_name (name), KEY ix_body (body(20)), KEY ix_multi (day, moment DESC)
) ENGINE=InnoDB AUTO_INCREMENT=1000
"""

TYPES_ROWS = [
    "INSERT INTO kinds (small, big, money, f, d, name, body, raw, fixed, day, moment, stamp, span, yr,"
    " flags, mood, tags, doc) VALUES (-128, 18446744073709551615, -12345678901234.123456, 0.1,"
    " 0.1, 'héllo wörld ☃ 😀', 'multi\\nline; with ''quotes'' and \\\\ backslash -- not a comment"
    " /* nor this */ #nor this', X'00FF27225C0A0D1A', X'00010203', '2024-02-29',"
    " '2024-03-31 02:30:00.123456', '2024-03-31 02:30:00', '-838:59:59.000', 2155, b'1010101010',"
    " 'glad', 'a,c', '{\"k\": [1, 2.5, null, \"x\"]}')",
    "INSERT INTO kinds (name, body) VALUES (NULL, NULL)",
    "INSERT INTO kinds (name, body, raw, d, f) VALUES ('', '', X'', -0.0, 3.4028234e38)",
    "INSERT INTO kinds (name, d) VALUES ('50% off; DELIMITER ;;', 1.7976931348623157e308)",
]


def make_types(url: str) -> None:
    execute(url, TYPES_TABLE, *TYPES_ROWS,
            "CREATE TRIGGER kinds_bi BEFORE INSERT ON kinds FOR EACH ROW "
            "BEGIN IF NEW.body IS NULL THEN SET NEW.body = 'default; body'; END IF; END")
    rows = 2000
    execute(url, "INSERT INTO kinds (name, body, raw, d) SELECT CONCAT('n', seq), REPEAT('x', seq % 50),"
                 " UNHEX(SHA2(seq, 256)), seq / 7 FROM seq_1_to_" + str(rows))


def journal_for(d: MySQLDialect) -> Journal:
    journal = Journal(d.engine)
    journal.ensure()
    return journal


# -- server-less units --------------------------------------------------------------------------
def test_statement_splitter_follows_the_mysql_client_rules() -> None:
    script = textwrap.dedent("""\
        -- a comment; with a semicolon
        SET NAMES utf8mb4;
        /*!40101 SET @x = 1 */;
        INSERT INTO `t;1` VALUES ('a;b', 'it''s', 'back\\\\slash\\';', "dq;\\"", `c`), -- tail
          ('line
        break;');
        # hash comment;
        DELIMITER ;;
        CREATE TRIGGER tr BEFORE INSERT ON t FOR EACH ROW BEGIN SET NEW.a = ';'; END;;
        DELIMITER ;
        SELECT 1""")
    got = list(iter_statements(script.splitlines(keepends=True)))
    assert got[0] == "SET NAMES utf8mb4"
    assert got[1] == "/*!40101 SET @x = 1 */"
    assert got[2].startswith("INSERT INTO `t;1` VALUES ('a;b', 'it''s', 'back\\\\slash\\';'")
    assert "('line\nbreak;')" in got[2] and "-- tail" not in got[2]
    assert got[3] == "CREATE TRIGGER tr BEFORE INSERT ON t FOR EACH ROW BEGIN SET NEW.a = ';'; END"
    assert got[4] == "SELECT 1"
    assert len(got) == 5


def test_unreachable_server_gives_a_clear_error_without_the_password() -> None:
    d = dialect("mysql://app:s3cr3t-pw@127.0.0.1:1/shop")
    with pytest.raises(DatabaseError) as info:
        d.ping()
    assert "127.0.0.1:1" in info.value.message and "refused" in info.value.message
    assert "s3cr3t-pw" not in info.value.one_line()
    assert "host and port" in info.value.hint
    assert d.is_lock_timeout(pymysql.err.OperationalError(1205, "Lock wait timeout exceeded"))
    assert d.is_lock_timeout(pymysql.err.OperationalError(1213, "Deadlock found"))
    assert not d.is_lock_timeout(pymysql.err.OperationalError(1062, "Duplicate entry"))


# -- connections, errors, journal ------------------------------------------------------------------
def test_ping_names_unknown_database_and_denied_access(my_url: str) -> None:
    missing = sa.make_url(my_url).set(database="sm_does_not_exist")
    with pytest.raises(DatabaseError) as info:
        dialect(missing.render_as_string(hide_password=False)).ping()
    assert "sm_does_not_exist" in info.value.message and "does not exist" in info.value.message
    wrong = sa.make_url(my_url).set(password="n0t-the-pw")
    with pytest.raises(DatabaseError) as info:
        dialect(wrong.render_as_string(hide_password=False)).ping()
    assert "access denied" in info.value.message
    assert "n0t-the-pw" not in info.value.one_line()
    dialect(my_url).ping()


def test_sessions_journal_and_identity(my_url: str) -> None:
    d = dialect(my_url, lock_timeout=2.5)
    try:
        journal = journal_for(d)
        with d.engine.connect() as conn:
            row = conn.exec_driver_sql("SELECT @@innodb_lock_wait_timeout, @@lock_wait_timeout, "
                                       "@@character_set_connection").one()
            assert tuple(row) == (3, 3, "utf8mb4")
            assert d.server_version(conn).split()[0] in ("MariaDB", "MySQL")
            kinds = dict(conn.exec_driver_sql(
                "SELECT COLUMN_NAME, DATA_TYPE FROM information_schema.COLUMNS WHERE "
                "TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'safemigrate_runs'").all())
            assert kinds["started_at"] == "double" and kinds["baseline"] == "longtext"
            assert d.user_tables(conn) == []
        now = time.time()
        journal.event(None, "test", "precise timestamps")
        (event,) = journal.events()
        assert abs(event["ts"] - now) < 5  # a FLOAT column would be off by up to 64 s
        stamp = 1_760_000_000.123456
        with d.engine.begin() as conn:
            conn.exec_driver_sql("UPDATE safemigrate_events SET ts = %s", (stamp,))
        assert journal.events()[0]["ts"] == stamp
        from safemigrate.lock import RunLock, current_holder

        with RunLock(journal, interval=0.2) as lock:
            holder = current_holder(journal)
            assert holder is not None and holder["owner"] == lock.owner
        assert current_holder(journal) is None
    finally:
        d.dispose()


def test_statement_timeout_stops_a_long_statement(my_url: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Every session has a statement timeout besides the lock ones (PostgreSQL's
    statement_timeout): a statement running past it fails fast, with the error and hint the
    PostgreSQL dialect gives, and is not taken for a lock wait (not retried)."""
    monkeypatch.delenv(STATEMENT_TIMEOUT_ENV, raising=False)
    assert dialect(my_url).statement_timeout == 3600.0
    monkeypatch.setenv(STATEMENT_TIMEOUT_ENV, "nonsense")
    with pytest.raises(ConfigError):
        dialect(my_url)
    monkeypatch.setenv(STATEMENT_TIMEOUT_ENV, "1")
    monkeypatch.setenv(CLIENTS_ENV, "0")
    d = dialect(my_url)
    try:
        assert d.statement_timeout == 1.0
        with d.engine.connect() as conn:
            mariadb = "mariadb" in str(conn.exec_driver_sql("SELECT VERSION()").scalar()).lower()
        # MariaDB limits every statement (seconds); MySQL only SELECTs (milliseconds)
        variable, value = ("max_statement_time", 1.0) if mariadb else ("max_execution_time", 1000)
        slow = ("SELECT SLEEP(5)" if mariadb  # MySQL's SLEEP() returns 1 instead of failing
                else "SELECT BENCHMARK(5000000000, SHA2('x', 512))")

        def session_limit() -> float:
            with d.engine.connect() as conn:
                return float(conn.exec_driver_sql(f"SELECT @@SESSION.{variable}").scalar())

        assert session_limit() == value
        started = time.monotonic()
        with d.engine.connect() as conn, pytest.raises(sa.exc.DBAPIError) as err:
            conn.exec_driver_sql(slow).all()
        assert time.monotonic() - started < 4
        assert not d.is_lock_timeout(err.value)
        translated = d.translate_error(err.value)
        assert type(translated) is DatabaseError
        assert "a statement ran longer than 1s" in translated.message
        assert STATEMENT_TIMEOUT_ENV in translated.hint and "0 = no limit" in translated.hint
        # a snapshot lifts the limit on its own session only, and puts it back after
        with d.engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE t (id INT PRIMARY KEY)")
        dest = tmp_path / "snap.sql"
        dest.touch(mode=0o600)
        d.snapshot(dest, ["t"])
        assert d.last_snapshot_method == "export"
        assert session_limit() == value
    finally:
        d.dispose()


def test_health_reports_load_and_lock_waits(my_url: str) -> None:
    execute(my_url, "CREATE TABLE t (id INT PRIMARY KEY, v INT)", "INSERT INTO t VALUES (1, 0)")
    d = dialect(my_url)
    holder = pymysql.connect(**d._connect_params())
    waiter = pymysql.connect(**d._connect_params())
    try:
        holder.autocommit(False)
        holder.cursor().execute("SELECT * FROM t WHERE id = 1 FOR UPDATE")
        waiter.cursor().execute("SET SESSION innodb_lock_wait_timeout = 5")
        blocked = threading.Thread(target=lambda: _swallow(
            lambda: waiter.cursor().execute("UPDATE t SET v = 1 WHERE id = 1")))
        blocked.start()
        time.sleep(0.5)
        with d.engine.connect() as conn:
            figures = d.health(conn)
        assert figures["Threads_running"] >= 1 and figures["Threads_connected"] >= 3
        assert figures["innodb_lock_waits"] >= 1 and figures["innodb_lock_wait_ms"] >= 100
        assert figures["oldest_transaction_s"] is not None
        assert figures["replica_lag_s"] is None  # not a replica
        holder.rollback()
        blocked.join()
        with d.engine.connect() as conn:
            assert d.row_count(conn, "t") == 1 and d.row_count(conn, "t", estimate=True) >= 0
            assert d.size_bytes(conn) > 0
    finally:
        holder.close()
        waiter.close()
        d.dispose()


def _swallow(action: Any) -> None:
    with contextlib.suppress(pymysql.err.MySQLError):
        action()


# -- structure ----------------------------------------------------------------------------------
def test_fingerprint_indexes_and_integrity(my_url: str) -> None:
    make_types(my_url)
    d = dialect(my_url)
    try:
        with d.engine.connect() as conn:
            before = d.schema_fingerprint(conn, ["kinds", "absent"])
            assert before["absent"] is None
            kinds = before["kinds"]
            assert [c[0] for c in kinds["columns"]][:3] == ["id", "small", "big"]
            assert kinds["primary_key"] == ["id"]
            assert [t[0] for t in kinds["triggers"]] == ["kinds_bi"]
            assert d.integrity_check(conn) == []
            assert d.has_index(conn, "kinds", "ix_multi") and not d.has_index(conn, "kinds", "nope")
            definitions = {n: d.index_definition(conn, "kinds", n)
                           for n in ("uq_name", "ix_body", "ix_multi")}
        assert definitions["uq_name"] == "CREATE UNIQUE INDEX `uq_name` ON `kinds` (`name`)"
        assert definitions["ix_body"] == "CREATE INDEX `ix_body` ON `kinds` (`body`(20))"
        assert definitions["ix_multi"] == "CREATE INDEX `ix_multi` ON `kinds` (`day`, `moment` DESC)"
        with d.engine.connect() as conn:  # as the steps run them: through exec_driver_sql
            for name, definition in definitions.items():
                conn.exec_driver_sql(f"DROP INDEX `{name}` ON kinds")
                conn.exec_driver_sql(definition)
            conn.exec_driver_sql(d.add_column_sql("kinds", "extra", "VARCHAR(10)", "'x%%'", False))
            assert fetch(my_url, "SELECT DISTINCT extra FROM kinds") == [("x%",)]
            conn.exec_driver_sql(d.drop_column_sql("kinds", "extra"))
            after = d.schema_fingerprint(conn, ["kinds", "absent"])
        assert json.dumps(after, default=str) == json.dumps(before, default=str)
    finally:
        d.dispose()


def test_change_capture_triggers(my_url: str) -> None:
    execute(my_url, "CREATE TABLE t (id INT PRIMARY KEY, a TEXT, derived TEXT)",
            "INSERT INTO t VALUES (1, 'x', NULL), (2, 'y', NULL)")
    d = dialect(my_url)
    try:
        capture = install(d, "run0000000001", "t", ["derived"])
        assert len(capture.triggers) == 3
        assert install(d, "run0000000001", "t", ["derived"]).triggers == capture.triggers  # idempotent
        execute(my_url, "INSERT INTO t VALUES (3, 'z', NULL)", "UPDATE t SET a = 'X' WHERE id = 1",
                "UPDATE t SET derived = 'd' WHERE id = 2", "UPDATE t SET a = a WHERE id = 2",
                "UPDATE t SET id = 20 WHERE id = 2", "DELETE FROM t WHERE id = 3")
        with d.engine.connect() as conn:
            logged = [((k,), op) for k, op in conn.exec_driver_sql(
                f"SELECT k_id, op FROM {capture.log} ORDER BY seq")]
            assert d.schema_fingerprint(conn, ["t"])["t"]["triggers"] == []  # safemigrate's own
        assert logged == [((3,), "I"), ((1,), "U"), ((20,), "U"), ((2,), "D"), ((3,), "D")]
    finally:
        d.dispose()


# -- snapshots ----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS, indirect=True)
def test_snapshot_round_trip_and_restore(my_url: str, tmp_path: Path, method: str) -> None:
    make_types(my_url)
    execute(my_url, "CREATE TABLE other (id INT PRIMARY KEY)", "INSERT INTO other VALUES (1)")
    before = state(my_url, ["kinds"])
    counter = fetch(my_url, "SELECT AUTO_INCREMENT FROM information_schema.TABLES "
                    "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'kinds'")[0][0]
    d = dialect(my_url)
    try:
        journal = journal_for(d)
        leftovers = scratch_databases()
        snap = take_snapshot(d, journal, tmp_path / "b", run_id=None, kind="snapshot",
                             tables=["kinds"])
        assert d.last_snapshot_method == method
        head = snap.path.read_bytes()[:200]
        assert head.startswith(b"-- safemigrate logical export") == (method == "export")
        assert snap.digests == before["digests"]
        assert oct(snap.path.stat().st_mode & 0o777) == "0o600"
        assert scratch_databases() == leftovers  # the verify database is gone
        # change everything about the table, then restore it
        execute(my_url, "ALTER TABLE kinds ADD COLUMN junk INT, DROP INDEX ix_multi",
                "DELETE FROM kinds WHERE id % 3 = 0", "UPDATE kinds SET body = 'changed'",
                "INSERT INTO kinds (name) VALUES ('new row')", "DROP TRIGGER kinds_bi",
                "CREATE TABLE made_by_migration (id INT PRIMARY KEY)")
        d.restore_tables(snap.path, ["kinds"], ["made_by_migration"])
        assert state(my_url, ["kinds"]) == before
        tables = {r[0] for r in fetch(my_url, "SHOW TABLES")}
        assert "made_by_migration" not in tables and "other" in tables
        assert not [t for t in tables if t.startswith("safemigrate_stage_")]
        assert scratch_databases() == leftovers
        # the trigger works again, and the counter continues where it was
        execute(my_url, "INSERT INTO kinds (name) VALUES ('after restore')")
        body, new_id = fetch(my_url, "SELECT body, id FROM kinds WHERE name = 'after restore'")[0]
        assert body == "default; body"
        assert new_id == counter > 1000 + 4 + 2000 - 1  # not 1 + the largest id after the changes
    finally:
        d.dispose()


@pytest.mark.parametrize("method", METHODS, indirect=True)
def test_snapshot_is_consistent_under_concurrent_writes(my_url: str, tmp_path: Path,
                                                        method: str) -> None:
    """Writers keep going during the snapshot; its digests must still equal the file exactly."""
    execute(my_url, "CREATE TABLE hot (id INT PRIMARY KEY, n BIGINT NOT NULL, pad VARCHAR(200))",
            "INSERT INTO hot SELECT seq, 0, REPEAT('p', 200) FROM seq_1_to_20000")
    d = dialect(my_url)
    stop = threading.Event()
    writes = [0]

    def writer() -> None:
        conn = pymysql.connect(**d._connect_params())
        try:
            i = 0
            while not stop.is_set():
                i += 1
                cursor = conn.cursor()
                cursor.execute("UPDATE hot SET n = n + 1 WHERE id = %s", (i % 20000 + 1,))
                cursor.execute("INSERT INTO hot VALUES (%s, 0, 'new')", (100000 + i,))
                writes[0] += 1
        finally:
            conn.close()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(0.2)
        journal = journal_for(d)
        for _ in range(2):
            snap = take_snapshot(d, journal, tmp_path / "b", run_id=None, kind="snapshot",
                                 tables=["hot"])  # verified against the file inside
            assert d.last_snapshot_method == method
    finally:
        stop.set()
        thread.join()
        d.dispose()
    assert writes[0] > 50
    assert snap.digests["hot"]["rows"] > 20000
    if method == "mysqldump":  # writers waited only while mysqldump started its transaction
        assert 0 < d.last_write_hold < 2.0


@pytest.mark.skipif(not HAVE_CLIENTS, reason="mysqldump/mysql not installed")
def test_busy_tables_get_the_export_instead_of_a_write_freeze(my_url: str, tmp_path: Path) -> None:
    """An open transaction has written to the table: LOCK TABLES would have to wait for it (and
    new writers would queue behind us), so after 1 s the snapshot uses the export instead."""
    execute(my_url, "CREATE TABLE t (id INT PRIMARY KEY, v INT)",
            "INSERT INTO t SELECT seq, 0 FROM seq_1_to_100")
    committed = state(my_url, ["t"])["digests"]
    writer = raw(my_url)
    d = dialect(my_url)
    try:
        writer.cursor().execute("UPDATE t SET v = 1 WHERE id = 1")  # not committed
        started = time.monotonic()
        snap = take_snapshot(d, journal_for(d), tmp_path / "b", run_id=None, kind="snapshot",
                             tables=["t"])
        assert d.last_snapshot_method == "export"
        assert snap.digests == committed  # the uncommitted write is not in it
        assert time.monotonic() - started < 8
        writer.cursor().execute("UPDATE t SET v = 2 WHERE id = 2")  # the writer was never blocked
        writer.commit()
    finally:
        writer.close()
        d.dispose()


@pytest.mark.parametrize("method", METHODS, indirect=True)
def test_verify_detects_a_flipped_byte(my_url: str, tmp_path: Path, method: str) -> None:
    execute(my_url, "CREATE TABLE notes (id INT PRIMARY KEY, body TEXT)",
            "INSERT INTO notes VALUES (1, 'the quick brown fox'), (2, 'jumps over')")
    d = dialect(my_url)
    try:
        snap = take_snapshot(d, journal_for(d), tmp_path / "b", run_id=None, kind="snapshot",
                             tables=["notes"])
        data = bytearray(snap.path.read_bytes())
        at = data.index(b"quick")
        data[at] ^= 0x01  # 'q' -> 'p': still a loadable file, one value changed
        snap.path.write_bytes(bytes(data))
        with pytest.raises(Exception, match="corrupted"):
            verify_snapshot_file(d, snap.path, snap.sha256, snap.digests)
        from safemigrate.backup import sha256_file

        with pytest.raises(Exception, match="differs from the source in notes"):
            verify_snapshot_file(d, snap.path, sha256_file(snap.path), snap.digests)
        snap.path.write_bytes(bytes(data[: len(data) // 2]))  # truncated
        with pytest.raises(Exception, match="truncated|cannot be"):
            verify_snapshot_file(d, snap.path, sha256_file(snap.path), snap.digests)
    finally:
        d.dispose()


@pytest.mark.skipif(not HAVE_CLIENTS, reason="mysqldump/mysql not installed")
def test_built_in_loader_reads_a_mysqldump_file(my_url: str, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    make_types(my_url)
    d = dialect(my_url)
    try:
        snap = take_snapshot(d, journal_for(d), tmp_path / "b", run_id=None, kind="snapshot",
                             tables=["kinds"])
        assert d.last_snapshot_method == "mysqldump"
        monkeypatch.setenv(CLIENTS_ENV, "0")
        verify_snapshot_file(d, snap.path, snap.sha256, snap.digests)  # loaded without `mysql`
    finally:
        d.dispose()


@pytest.mark.skipif(not HAVE_CLIENTS, reason="mysqldump/mysql not installed")
def test_credentials_never_reach_the_command_line(my_url: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    user = f"sm_{uuid.uuid4().hex[:8]}"
    password = 'p"a\\ss#w;rd x\'%'
    database = sa.make_url(my_url).database
    admin(f"CREATE USER '{user}'@'127.0.0.1' IDENTIFIED BY %s", password)
    admin(f"GRANT ALL ON `{database}`.* TO '{user}'@'127.0.0.1'")
    admin(f"GRANT ALL ON `safemigrate\\_%`.* TO '{user}'@'127.0.0.1'")
    try:
        execute(my_url, "CREATE TABLE t (id INT PRIMARY KEY)", "INSERT INTO t VALUES (1), (2)")
        url = sa.make_url(my_url).set(username=user, password=password)
        d = dialect(url.render_as_string(hide_password=False))
        seen: list[list[str]] = []
        real_popen, real_run = subprocess.Popen, subprocess.run

        def popen(args: list[str], *a: Any, **k: Any) -> Any:
            seen.append(list(args))
            return real_popen(args, *a, **k)

        def run(args: list[str], *a: Any, **k: Any) -> Any:
            seen.append(list(args))
            return real_run(args, *a, **k)

        monkeypatch.setattr(subprocess, "Popen", popen)
        monkeypatch.setattr(subprocess, "run", run)
        try:
            snap = take_snapshot(d, journal_for(d), tmp_path / "b", run_id=None, kind="snapshot",
                                 tables=["t"])
            assert d.last_snapshot_method == "mysqldump"
            d.restore_tables(snap.path, ["t"], [])
        finally:
            d.dispose()
        assert len(seen) >= 3  # mysqldump, mysql (verify), mysql (restore)
        assert not [a for a in seen if any(password in part or "p\"a" in part for part in a)]
        assert all(a[1].startswith("--defaults-file=") for a in seen)
    finally:
        admin(f"DROP USER '{user}'@'127.0.0.1'")


@pytest.mark.skipif(not HAVE_CLIENTS, reason="mysqldump/mysql not installed")
def test_without_lock_tables_privilege_the_export_is_used(my_url: str, tmp_path: Path) -> None:
    """mysqldump cannot be tied to our snapshot without LOCK TABLES: the built-in export is
    written instead (and loaded back by the `mysql` client)."""
    user = f"sm_{uuid.uuid4().hex[:8]}"
    database = sa.make_url(my_url).database
    admin(f"CREATE USER '{user}'@'127.0.0.1' IDENTIFIED BY 'pw'")
    admin(f"GRANT SELECT, INSERT, UPDATE, DELETE, CREATE, DROP, ALTER, INDEX, TRIGGER "
          f"ON `{database}`.* TO '{user}'@'127.0.0.1'")
    admin(f"GRANT ALL ON `safemigrate\\_%`.* TO '{user}'@'127.0.0.1'")
    try:
        make_types(my_url)
        d = dialect(sa.make_url(my_url).set(username=user, password="pw")
                    .render_as_string(hide_password=False))
        try:
            snap = take_snapshot(d, journal_for(d), tmp_path / "b", run_id=None, kind="snapshot",
                                 tables=["kinds"])  # verified: loaded by `mysql`, digests equal
            assert d.last_snapshot_method == "export"
            assert snap.path.read_bytes().startswith(b"-- safemigrate logical export")
            before = state(my_url, ["kinds"])
            execute(my_url, "DROP TRIGGER kinds_bi", "DELETE FROM kinds WHERE id > 1500")
            d.restore_tables(snap.path, ["kinds"], [])  # the trigger comes back, as this user's
            assert state(my_url, ["kinds"]) == before
            assert fetch(my_url, "SELECT DEFINER FROM information_schema.TRIGGERS "
                         "WHERE TRIGGER_NAME = 'kinds_bi'") == [(f"{user}@127.0.0.1",)]
        finally:
            d.dispose()
    finally:
        admin(f"DROP USER '{user}'@'127.0.0.1'")


def test_restore_keeps_foreign_keys_from_other_tables_and_is_restartable(
        my_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CLIENTS_ENV, "0")  # the built-in path end to end; mysqldump is tested above
    execute(
        my_url,
        "CREATE TABLE parent (id INT AUTO_INCREMENT PRIMARY KEY, name VARCHAR(20)) AUTO_INCREMENT=50",
        "CREATE TABLE child (id INT PRIMARY KEY, parent_id INT, CONSTRAINT fk_child_parent "
        "FOREIGN KEY (parent_id) REFERENCES parent (id) ON DELETE CASCADE)",
        "CREATE TABLE grand (id INT PRIMARY KEY, child_id INT NOT NULL, "
        "CONSTRAINT fk_grand_child FOREIGN KEY (child_id) REFERENCES child (id))",
        "INSERT INTO parent (name) VALUES ('a'), ('b'), ('c')",
        "INSERT INTO child VALUES (1, 50), (2, 51)", "INSERT INTO grand VALUES (1, 1)",
    )
    tables = ["child", "grand", "parent"]
    before = state(my_url, tables)
    d = dialect(my_url)
    try:
        snap = take_snapshot(d, journal_for(d), tmp_path / "b", run_id=None, kind="snapshot",
                             tables=["child", "parent"])
        execute(my_url, "ALTER TABLE parent ADD COLUMN extra INT",
                "INSERT INTO parent (name) VALUES ('d'), ('e')", "ALTER TABLE parent AUTO_INCREMENT = 900",
                "UPDATE child SET parent_id = 53 WHERE id = 2")

        # a crash between dropping the live table and renaming the restored one into place
        real = pymysql.cursors.Cursor.execute
        crashed = []

        def crash_once(self: Any, query: str, args: Any = None) -> Any:
            if query.startswith("RENAME TABLE `safemigrate_stage_") and not crashed:
                crashed.append(query)
                raise pymysql.err.OperationalError(2013, "Lost connection to server (simulated)")
            return real(self, query, args)

        monkeypatch.setattr(pymysql.cursors.Cursor, "execute", crash_once)
        with pytest.raises(DatabaseError):
            d.restore_tables(snap.path, ["child", "parent"], [])
        assert crashed
        monkeypatch.setattr(pymysql.cursors.Cursor, "execute", real)
        d.restore_tables(snap.path, ["child", "parent"], [])  # starts again from the file
        assert state(my_url, tables) == before
        create = fetch(my_url, "SHOW CREATE TABLE parent")[0][1]
        assert "AUTO_INCREMENT=53" in create  # the snapshot's counter, not 900
        # the constraints of the other tables point at the restored tables and are enforced
        assert "REFERENCES `child` (`id`)" in fetch(my_url, "SHOW CREATE TABLE grand")[0][1]
        with pytest.raises(pymysql.err.IntegrityError):
            execute(my_url, "INSERT INTO child VALUES (9, 777)")
        with pytest.raises(pymysql.err.IntegrityError):
            execute(my_url, "INSERT INTO grand VALUES (9, 777)")
        execute(my_url, "DELETE FROM parent WHERE id = 51")  # ON DELETE CASCADE still there
        assert fetch(my_url, "SELECT id FROM child ORDER BY id") == [(1,)]
        assert not [t for (t,) in fetch(my_url, "SHOW TABLES") if t.startswith("safemigrate_stage")]
    finally:
        d.dispose()


# -- the card migration, end to end ---------------------------------------------------------------
def test_card_flow_run_values_quarantine_and_both_rollbacks(my_url: str, tmp_path: Path) -> None:
    summary = generate_into(my_url, 3000, bad_rate=0.02, seed=7)
    assert summary["bad_rows"] == 60
    tables = ["cards", "folders"]
    original = state(my_url, tables)
    leftovers = scratch_databases()
    with Migrator(settings(my_url, tmp_path)) as m:
        (result,) = m.run()
        assert (result.status, result.rows, result.quarantined) == ("completed", 3000, 60)
        assert not [c for c in result.checks if not c.passed]
        assert m.journal.quarantine_count(result.run_id) == 60
        method = m.dialect.last_snapshot_method
    assert method == ("mysqldump" if HAVE_CLIENTS else "export")
    rows = fetch(my_url, "SELECT id, front_content, back_content, style, "
                 + ", ".join(WRITES) + " FROM cards ORDER BY id")
    migrated = rejected = 0
    for row in rows:
        source = dict(zip(("id", "front_content", "back_content", "style"), row[:4], strict=True))
        try:
            expected = optimize_card(source)
        except ValueError:
            assert row[4:] == (None,) * len(WRITES), f"quarantined card {row[0]} was written"
            rejected += 1
            continue
        got = dict(zip(WRITES, row[4:], strict=True))
        assert got == {k: (int(v) if isinstance(v, bool) else v) for k, v in expected.items()}, row[0]
        migrated += 1
    assert (migrated, rejected) == (2940, 60)
    indexes = {r[2] for r in fetch(my_url, "SHOW INDEX FROM cards")}
    assert {"idx_cards_content_hash", "idx_cards_style_type"} <= indexes
    assert fetch(my_url, "SHOW TRIGGERS") == []  # change capture is out again

    with Migrator(settings(my_url, tmp_path)) as m:
        back = m.rollback(strategy="reverse")
        assert back.status == "rolled_back", back.checks
    assert state(my_url, tables) == original

    with Migrator(settings(my_url, tmp_path)) as m:
        (again,) = m.run()
        assert again.status == "completed"
        back = m.rollback(strategy="restore")
        assert back.status == "rolled_back", back.checks
    assert state(my_url, tables) == original
    assert scratch_databases() == leftovers


# -- non-transactional DDL: interrupted between the statement and its journal entry -------------------
DDL_MIGRATION = """
    from safemigrate import AddColumn, Backfill, CreateIndex, Migration

    def fill(row):
        return {"label": f"item-{row['id']}"}

    migration = Migration(
        id="0001_label",
        description="a label column, filled and indexed",
        steps=[
            AddColumn("items", "label", "VARCHAR(40)"),
            Backfill("items", fill, reads=["id"], writes=["label"]),
            CreateIndex("items", ["label"], name="ix_items_label"),
        ],
    )
"""


class Crash(BaseException):
    """The process dies here (nothing catches a BaseException on the way out)."""


def crash_around(monkeypatch: pytest.MonkeyPatch, cls: type, when: str) -> None:
    real = cls.apply

    def apply(self: Any, conn: Any, dialect: Any, state: Any) -> None:
        if when == "before":
            raise Crash(f"died before {self.describe()}")
        real(self, conn, dialect, state)
        raise Crash(f"died after {self.describe()}, before its journal entry")

    monkeypatch.setattr(cls, "apply", apply)


@pytest.mark.parametrize(("cls", "when", "then"), [
    (AddColumn, "after", "run"), (AddColumn, "after", "rollback"),
    (AddColumn, "before", "run"), (AddColumn, "before", "rollback"),
    (CreateIndex, "after", "run"), (CreateIndex, "after", "rollback"),
])
def test_ddl_interrupted_before_its_journal_entry_is_repaired(
        my_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        cls: type, when: str, then: str) -> None:
    execute(my_url, "CREATE TABLE items (id INT PRIMARY KEY, n INT)",
            "INSERT INTO items SELECT seq, seq * 2 FROM seq_1_to_300")
    original = state(my_url, ["items"])
    folder = write_migration(tmp_path / "migrations", DDL_MIGRATION)
    idx = 0 if cls is AddColumn else 2
    with monkeypatch.context() as patch:
        crash_around(patch, cls, when)
        m = Migrator(settings(my_url, tmp_path, folder))
        with pytest.raises(Crash):
            m.run()
        m.close()
    # the journal as a dead process left it: the step is "applying", its effect there or not
    with Migrator(settings(my_url, tmp_path, folder)) as m:
        m._open(write=False)
        run = m.journal.unfinished_run()
        assert run is not None and run["status"] == "running"
        step = m.journal.steps(run["id"])[idx]
        assert step["status"] == "applying"
        with m.dialect.engine.connect() as conn:
            applied = migration_step(folder, idx).is_applied(conn, m.dialect)
        assert applied is (when == "after")

        if then == "run":
            (result,) = m.run()
            assert result.status == "completed"
            steps = m.journal.steps(run["id"])
            assert [s["status"] for s in steps] == ["done", "done", "done"]
            repaired = [e for e in m.journal.events(run["id"]) if e["kind"] == "step.done"
                        and e["data"]["step"] == idx]
            assert repaired[-1]["data"]["repaired"] is (when == "after")
            labels = fetch(my_url, "SELECT COUNT(*), COUNT(DISTINCT label) FROM items")[0]
            assert labels == (300, 300)
            assert fetch(my_url, "SHOW INDEX FROM items WHERE Key_name = 'ix_items_label'")
        else:
            back = m.rollback(strategy="reverse")
            assert back.status == "rolled_back", back.checks
            steps = {s["idx"]: s["status"] for s in m.journal.steps(run["id"])}
            assert steps[idx] == "reverted"
    if then == "rollback":
        assert state(my_url, ["items"]) == original


def migration_step(folder: Path, idx: int) -> Any:
    from safemigrate.migration import discover

    (migration,) = discover(folder)
    return migration.steps[idx]


# -- lock waits: retried with backoff, never a long block -----------------------------------------
def test_backfill_retries_a_lock_wait_and_completes(my_url: str, tmp_path: Path) -> None:
    execute(my_url, "CREATE TABLE items (id INT PRIMARY KEY, n INT)",
            "INSERT INTO items SELECT seq, seq * 2 FROM seq_1_to_300")
    folder = write_migration(tmp_path / "migrations", DDL_MIGRATION)
    d = dialect(my_url)
    holder = pymysql.connect(**d._connect_params())
    held = threading.Event()

    def hold_rows() -> None:
        holder.autocommit(False)
        holder.cursor().execute("SELECT * FROM items WHERE id BETWEEN 1 AND 20 FOR UPDATE")
        held.set()
        time.sleep(3)
        holder.rollback()

    bus = EventBus()
    alerts: list[str] = []
    thread = threading.Thread(target=hold_rows)

    def on_event(event: Any) -> None:
        if event.kind == "step.started" and event.data.get("step") == 1 and not thread.is_alive():
            thread.start()  # the backfill starts: an application transaction locks its first rows
            assert held.wait(10)
        if event.kind == "alert" and "lock wait" in event.message:
            alerts.append(event.message)

    bus.subscribe(on_event)
    try:
        started = time.monotonic()
        with Migrator(settings(my_url, tmp_path, folder, lock_timeout=1.0), bus=bus) as m:
            (result,) = m.run()
        assert result.status == "completed"
        assert alerts, "the blocked batch should have been retried"
        assert time.monotonic() - started < 60
        assert fetch(my_url, "SELECT COUNT(*) FROM items WHERE label = CONCAT('item-', id)") == [(300,)]
    finally:
        thread.join()
        holder.close()
        d.dispose()


def test_server_figures_reach_the_guards(my_url: str) -> None:
    """The load guard reads health() numbers; None figures (no privilege, no replica) are skipped."""
    from safemigrate.guards import GuardSettings, LoadGuard

    d = dialect(my_url)
    try:
        guard = LoadGuard(GuardSettings(max_load={"Threads_running": 10_000}), d)
        figures = guard.sample()
        assert figures["Threads_running"] >= 1 and "replica_lag_s" not in figures
        assert guard.check().action == "ok"
        guard = LoadGuard(GuardSettings(max_load={"Threads_running": 0.5}), d)
        assert guard.check().action == "throttle"
    finally:
        d.dispose()



def test_schema_step_retries_a_metadata_lock_wait(my_url: str, tmp_path: Path) -> None:
    """An open application transaction on the table blocks ALTER TABLE; the ALTER gives up after
    lock_timeout (so users never queue long behind it) and is retried with backoff."""
    execute(my_url, "CREATE TABLE items (id INT PRIMARY KEY, n INT)",
            "INSERT INTO items SELECT seq, seq FROM seq_1_to_50")
    folder = write_migration(tmp_path / "migrations", DDL_MIGRATION)
    holder = raw(my_url)
    held = threading.Event()
    thread = threading.Thread(target=lambda: (
        holder.cursor().execute("SELECT COUNT(*) FROM items"), held.set(), time.sleep(2.5),
        holder.rollback()))
    bus = EventBus()
    waits: list[float] = []

    def on_event(event: Any) -> None:
        if event.kind == "step.started" and event.data.get("step") == 0 and not thread.is_alive():
            thread.start()  # an application transaction has read the table: it holds its MDL
            assert held.wait(10)
            waits.append(time.time())

    bus.subscribe(on_event)
    try:
        with Migrator(settings(my_url, tmp_path, folder, lock_timeout=1.0), bus=bus) as m:
            (result,) = m.run()
            assert result.status == "completed"
            done = [e for e in m.journal.events(result.run_id) if e["kind"] == "step.done"
                    and e["data"]["step"] == 0]
        # without the retries the ALTER would have failed after 1 s; it went through once the
        # application transaction ended, 2.5 s later
        assert done and done[0]["ts"] - waits[0] >= 2.0
    finally:
        thread.join()
        holder.close()


DROP_INDEX_MIGRATION = """
    from safemigrate import DropIndex, Migration

    migration = Migration(id="0001_drop", description="drop two indexes",
                          steps=[DropIndex("items", "ix_items_tag_n"), DropIndex("items", "uq_items_code")])
"""


def test_drop_index_is_undone_exactly(my_url: str, tmp_path: Path) -> None:
    execute(my_url, "CREATE TABLE items (id INT PRIMARY KEY, tag TEXT, n INT, code VARCHAR(20), "
            "KEY ix_items_tag_n (tag(12), n DESC), UNIQUE KEY uq_items_code (code))",
            "INSERT INTO items SELECT seq, CONCAT('t', seq % 7), seq, CONCAT('c', seq) FROM seq_1_to_100")
    original = state(my_url, ["items"])
    folder = write_migration(tmp_path / "migrations", DROP_INDEX_MIGRATION)
    with Migrator(settings(my_url, tmp_path, folder)) as m:
        (result,) = m.run()
        assert result.status == "completed"
        assert {r[2] for r in fetch(my_url, "SHOW INDEX FROM items")} == {"PRIMARY"}
        assert m.rollback(strategy="reverse").status == "rolled_back"
    assert state(my_url, ["items"]) == original

if os.environ.get("SAFEMIGRATE_MYSQL_DEBUG"):  # pragma: no cover - handy when a test fails
    print("clients:", HAVE_CLIENTS)
