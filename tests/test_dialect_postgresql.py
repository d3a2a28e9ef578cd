"""The PostgreSQL dialect against a real server: snapshots (pg_dump and the COPY export),
verification in scratch databases, restores that keep other tables' foreign keys, concurrent
index builds and their leftovers, lock timeouts with retries, health figures, clear errors.

Every test gets its own database (dropped afterwards) and skips when no server answers, unless
SAFEMIGRATE_REQUIRE_SERVERS=1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

from backends import PG_ADMIN, create_database, drop_database
from conftest import SAFEMIGRATE, cli
from safemigrate import BackupError, DatabaseError, DatabaseLockedError, ddl
from safemigrate.backup import sha256_file, take_snapshot, verify_snapshot_file
from safemigrate.dialects import dialect_for
from safemigrate.dialects.postgresql import EXPORT_MAGIC, PGDUMP_MAGIC, PostgreSQLDialect
from safemigrate.digest import database_digest
from safemigrate.engine import BackfillExecutor
from safemigrate.events import EventBus
from safemigrate.examples.cards import MIGRATIONS_DIR
from safemigrate.examples.cards.generate import generate_into
from safemigrate.examples.cards.transform import WRITES, optimize_card
from safemigrate.journal import Journal
from safemigrate.migrator import Migrator
from safemigrate.settings import Settings
from safemigrate.urls import normalize_url

CARD_TABLES = ["cards", "folders"]


# -- fixtures and helpers -------------------------------------------------------------------------
@pytest.fixture
def pg_url(tmp_path: Path) -> Iterator[str]:
    """A fresh empty PostgreSQL database, dropped after the test."""
    url = create_database("postgresql", tmp_path)
    try:
        yield url
    finally:
        drop_database("postgresql", url)


@pytest.fixture
def dialect(pg_url: str) -> Iterator[PostgreSQLDialect]:
    d = PostgreSQLDialect(normalize_url(pg_url), lock_timeout=5)
    try:
        yield d
    finally:
        d.dispose()


@pytest.fixture(params=["pg_dump", "export"])
def snapshot_format(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both snapshot paths: pg_dump -Fc, and the COPY export forced by SAFEMIGRATE_PG_DUMP=0."""
    if request.param == "export":
        monkeypatch.setenv("SAFEMIGRATE_PG_DUMP", "0")
    else:
        monkeypatch.delenv("SAFEMIGRATE_PG_DUMP", raising=False)
    return request.param


def state(d: PostgreSQLDialect, tables: list[str]) -> dict[str, Any]:
    with d.engine.connect() as conn:
        return {"digests": database_digest(conn, tables), "schema": d.schema_fingerprint(conn, tables)}


def execute(url: str, *statements: str) -> None:
    """Run SQL as written (no placeholders) in one transaction on a connection of its own."""
    with raw(url) as conn:
        for statement in statements:
            conn.execute(statement)


def raw(url: str, **kwargs: Any) -> psycopg.Connection:
    u = sa.make_url(url)
    return psycopg.connect(host=u.host, port=u.port or 5432, user=u.username, dbname=u.database,
                           **kwargs)


def magic_of(path: Path) -> bytes:
    return path.read_bytes()[: len(EXPORT_MAGIC)]


def assert_format(path: Path, fmt: str) -> None:
    if fmt == "export":
        assert magic_of(path) == EXPORT_MAGIC
    else:
        assert magic_of(path).startswith(PGDUMP_MAGIC)


def settings(url: str, tmp_path: Path, **kw: Any) -> Settings:
    kw.setdefault("migrations", MIGRATIONS_DIR)
    kw.setdefault("workers", 2)
    return Settings(db=url, backup_dir=tmp_path / "backups", **kw)


def write_migration(folder: Path, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "0001_change.py").write_text(body)
    return folder


# -- the card example end to end ------------------------------------------------------------------
@pytest.mark.parametrize("strategies", [("reverse", "restore")], ids=["reverse+restore"])
def test_card_flow_run_and_rollbacks(pg_url: str, tmp_path: Path, snapshot_format: str,
                                     strategies: tuple[str, ...]) -> None:
    info = generate_into(pg_url, 3000, bad_rate=0.02, seed=7)
    assert info["bad_rows"] == 60
    check = PostgreSQLDialect(normalize_url(pg_url))
    try:
        before = state(check, CARD_TABLES)
        with check.engine.connect() as conn:
            cards = [dict(r) for r in conn.exec_driver_sql(
                "SELECT id, front_content, back_content, style FROM cards ORDER BY id").mappings()]
        expected, rejected = {}, set()
        for card in cards:
            try:
                expected[card["id"]] = optimize_card(card)
            except ValueError:
                rejected.add(card["id"])
        assert len(rejected) == 60

        for strategy in strategies if snapshot_format == "pg_dump" else ("restore",):
            with Migrator(settings(pg_url, tmp_path, batch_size=500)) as m:  # worker pool in use
                assert type(m.dialect) is PostgreSQLDialect
                (result,) = m.run()
                assert (result.status, result.rows, result.quarantined) == ("completed", 3000, 60)
                assert all(c.passed for c in result.checks), [c for c in result.checks if not c.passed]
                assert_format(Path(result.snapshot), snapshot_format)
                quarantined = {tuple(json.loads(q["pk"])) for q in m.journal.quarantined(result.run_id)}
                assert quarantined == {(i,) for i in rejected}
                with check.engine.connect() as conn:
                    rows = conn.exec_driver_sql(
                        f"SELECT id, {', '.join(WRITES)} FROM cards ORDER BY id").mappings().all()
                    assert check.has_index(conn, "cards", "idx_cards_content_hash")
                    assert check.has_index(conn, "cards", "idx_cards_style_type")
                    assert check.integrity_check(conn) == []
                for row in rows:
                    got = {w: row[w] for w in WRITES}
                    if row["id"] in rejected:
                        assert set(got.values()) == {None}
                    else:
                        assert got == expected[row["id"]]
                rolled = m.rollback(strategy=strategy)
                assert rolled.status == "rolled_back"
                assert all(c.passed for c in rolled.checks), rolled.checks
            assert state(check, CARD_TABLES) == before, f"{strategy} rollback"
            with check.engine.connect() as conn:
                assert not check.has_index(conn, "cards", "idx_cards_content_hash")
                leftovers = conn.exec_driver_sql(
                    "SELECT proname FROM pg_proc WHERE proname LIKE 'safemigrate%'").all()
                assert leftovers == []
    finally:
        check.dispose()


def test_application_writes_during_the_backfill_are_migrated(pg_url: str, tmp_path: Path) -> None:
    """Change capture on PostgreSQL: the application (a role that cannot touch safemigrate's
    log table) updates a migrated row, deletes one and inserts one while the backfill runs."""
    generate_into(pg_url, 3000, bad_rate=0.0)
    role = f"sm_app_{uuid.uuid4().hex[:8]}"
    execute(pg_url, f"CREATE ROLE {role} LOGIN", f"GRANT SELECT, INSERT, UPDATE, DELETE ON cards TO {role}")
    front = json.dumps({"text": "Zebra crossing", "tags": ["roads"], "images": []})
    bus, fired = EventBus(), []

    def application(event: Any) -> None:
        if event.kind == "batch" and event.data.get("done", 0) >= 1000 and not fired:
            fired.append(event.data["done"])
            with raw(pg_url.replace("postgres@", f"{role}@")) as conn:
                conn.execute("UPDATE cards SET front_content = %s WHERE id = 1", (front,))
                conn.execute("DELETE FROM cards WHERE id = 2")
                conn.execute("INSERT INTO cards SELECT 5000, folder_id, front_content, back_content, "
                             "style, created_at, updated_at FROM cards WHERE id = 3")

    bus.subscribe(application)
    try:
        with Migrator(settings(pg_url, tmp_path, workers=1, batch_size=500), bus) as m:
            (result,) = m.run()
        assert fired and result.status == "completed"
        with raw(pg_url) as conn:
            rows = {r[0]: r for r in conn.execute(
                "SELECT id, front_content, back_content, style, search_terms, content_hash FROM cards "
                "WHERE id IN (1, 2, 3, 5000)")}
            assert conn.execute("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'safemigrate%'"
                                ).fetchone() == (0,)
        assert set(rows) == {1, 3, 5000}
        for key in (1, 5000):
            card = dict(zip(["id", "front_content", "back_content", "style"], rows[key][:4], strict=True))
            assert rows[key][5] == optimize_card(card)["content_hash"]
        assert "zebra" in rows[1][4].split()
    finally:
        execute(pg_url, f"REVOKE ALL ON cards FROM {role}", f"DROP ROLE {role}")


# -- snapshots --------------------------------------------------------------------------------------
def test_snapshot_verify_detects_a_flipped_byte(pg_url: str, dialect: PostgreSQLDialect,
                                                tmp_path: Path, snapshot_format: str) -> None:
    generate_into(pg_url, 800, bad_rate=0.0)
    journal = Journal(dialect.engine)
    journal.ensure()
    snap = take_snapshot(dialect, journal, tmp_path / "b", run_id=None, kind="snapshot",
                         tables=CARD_TABLES)
    assert_format(snap.path, snapshot_format)
    assert snap.digests == state(dialect, CARD_TABLES)["digests"]
    verify_snapshot_file(dialect, snap.path, snap.sha256, snap.digests)

    data = bytearray(snap.path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    snap.path.write_bytes(bytes(data))
    with pytest.raises(BackupError, match="corrupted"):
        verify_snapshot_file(dialect, snap.path, snap.sha256, snap.digests)
    # even when the checksum was taken after the damage, restoring the copy catches it
    with pytest.raises(BackupError, match=snap.path.name):
        verify_snapshot_file(dialect, snap.path, sha256_file(snap.path), snap.digests)


def test_snapshot_is_consistent_while_the_application_writes(
        pg_url: str, dialect: PostgreSQLDialect, tmp_path: Path, snapshot_format: str) -> None:
    """The file and the digests come from one snapshot: verification passes under writes."""
    generate_into(pg_url, 2000, bad_rate=0.0)
    stop, writes = threading.Event(), [0]

    def writer() -> None:
        with raw(pg_url, autocommit=True) as conn:
            while not stop.is_set():
                conn.execute("UPDATE cards SET updated_at = clock_timestamp()::text "
                             "WHERE id = (random() * 1999)::int + 1")
                conn.execute("INSERT INTO folders (id, name) SELECT max(id) + 1, 'new' FROM folders")
                writes[0] += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(0.2)
        journal = Journal(dialect.engine)
        journal.ensure()
        snap = take_snapshot(dialect, journal, tmp_path / "b", run_id=None, kind="snapshot",
                             tables=CARD_TABLES)
    finally:
        stop.set()
        thread.join()
    assert writes[0] > 10
    assert_format(snap.path, snapshot_format)
    verify_snapshot_file(dialect, snap.path, snap.sha256, snap.digests)
    assert snap.digests != state(dialect, CARD_TABLES)["digests"]  # the writes went on after it


def test_reader_uses_a_scratch_database_with_the_sources_settings(
        pg_url: str, tmp_path: Path, snapshot_format: str) -> None:
    """Values render the same in the scratch database (the source's TimeZone, DateStyle...),
    and the scratch database is gone afterwards."""
    name = sa.make_url(pg_url).database
    execute(pg_url, f"ALTER DATABASE {name} SET timezone = 'Asia/Kathmandu'",
            f"ALTER DATABASE {name} SET intervalstyle = 'iso_8601'")
    execute(pg_url, "CREATE TABLE events (id bigint PRIMARY KEY, at timestamptz, took interval, "
                    "price numeric(12, 3), ratio double precision, raw bytea, tags text[], doc jsonb)",
            "INSERT INTO events SELECT i, timestamptz '2024-03-01 12:00:00+00' + i * interval '1 hour', "
            "i * interval '90 seconds', i / 7.0, i / 3.0, decode(md5(i::text), 'hex'), "
            "ARRAY['a', i::text], jsonb_build_object('n', i) FROM generate_series(1, 300) i")
    if snapshot_format == "pg_dump":  # types of the application's own: recreated in the scratch db
        execute(pg_url, "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy')",
                "CREATE DOMAIN positive AS integer CHECK (VALUE > 0)",
                "ALTER TABLE events ADD COLUMN feeling mood DEFAULT 'ok', ADD COLUMN score positive",
                "UPDATE events SET feeling = 'happy', score = id WHERE id % 2 = 0")
    d = PostgreSQLDialect(normalize_url(pg_url))
    try:
        dest = tmp_path / "snap.db"
        dest.touch(mode=0o600)
        digests = d.snapshot(dest, ["events"])
        assert_format(dest, snapshot_format)
        with d.snapshot_reader(dest) as conn:
            scratch = conn.engine.url.database
            assert scratch.startswith("safemigrate_verify_")
            assert conn.exec_driver_sql("SHOW timezone").scalar() == "Asia/Kathmandu"
            assert database_digest(conn, ["events"]) == digests
        with d.engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM pg_database WHERE datname = %s",
                                        (scratch,)).scalar() == 0
    finally:
        d.dispose()


def test_copy_export_format(pg_url: str, dialect: PostgreSQLDialect, tmp_path: Path,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    """use_pg_dump=False forces the export; a truncated export is refused; no tables, no pg_dump."""
    monkeypatch.delenv("SAFEMIGRATE_PG_DUMP", raising=False)
    generate_into(pg_url, 300, bad_rate=0.0)
    forced = PostgreSQLDialect(normalize_url(pg_url), use_pg_dump=False)
    try:
        dest = tmp_path / "export.db"
        dest.touch()
        digests = forced.snapshot(dest, CARD_TABLES)
        assert PostgreSQLDialect.snapshot_format(dest) == "export"
        with forced.snapshot_reader(dest) as conn:
            assert database_digest(conn, CARD_TABLES) == digests
            assert forced.integrity_check(conn) == []
        truncated = tmp_path / "truncated.db"
        truncated.write_bytes(dest.read_bytes()[: dest.stat().st_size - 7])
        with pytest.raises(BackupError, match="truncated"), forced.snapshot_reader(truncated):
            pass
    finally:
        forced.dispose()
    empty = tmp_path / "empty.db"
    empty.touch()
    assert dialect.snapshot(empty, []) == {}
    assert PostgreSQLDialect.snapshot_format(empty) == "export"
    dump = tmp_path / "dump.db"
    dump.touch()
    dialect.snapshot(dump, ["folders"])
    assert PostgreSQLDialect.snapshot_format(dump) == "pg_dump"  # the client tools are installed


# -- restore ----------------------------------------------------------------------------------------
PARENT_SCHEMA = (
    "CREATE TABLE parent (id serial PRIMARY KEY, code text UNIQUE NOT NULL, "
    "qty integer CHECK (qty >= 0), note text DEFAULT 'n', label text COLLATE \"C\", "
    "made timestamptz DEFAULT now(), twice integer GENERATED ALWAYS AS (qty * 2) STORED, "
    "ext bigint GENERATED BY DEFAULT AS IDENTITY)",
    "CREATE INDEX parent_note_x ON parent (note) WHERE note LIKE 'x%'",
    "CREATE TABLE child (id integer PRIMARY KEY, "
    "parent_id integer NOT NULL REFERENCES parent (id) ON DELETE CASCADE)",
    "CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS "
    "$$ BEGIN NEW.note := 'touched'; RETURN NEW; END $$",
    "CREATE TRIGGER parent_touch BEFORE UPDATE ON parent FOR EACH ROW EXECUTE FUNCTION touch()",
    "ALTER TABLE parent DISABLE TRIGGER parent_touch",
    "GRANT SELECT ON parent TO PUBLIC",
    "INSERT INTO parent (code, qty, note, label) "
    "SELECT 'c' || i, i, CASE WHEN i % 3 = 0 THEN 'x' || i END, 'L' || i FROM generate_series(1, 50) i",
    "INSERT INTO child SELECT i, i FROM generate_series(1, 20) i",
)


def parent_extras(url: str) -> dict[str, Any]:
    with raw(url) as conn:
        return {
            "acl": conn.execute("SELECT relacl::text FROM pg_class WHERE relname = 'parent'").fetchone(),
            "serial": conn.execute("SELECT last_value, is_called FROM parent_id_seq").fetchone(),
            "identity": conn.execute(
                "SELECT last_value FROM pg_sequences WHERE sequencename = 'parent_ext_seq'").fetchone(),
            "fk": conn.execute("SELECT conname, convalidated FROM pg_constraint "
                               "WHERE conrelid = 'child'::regclass AND contype = 'f'").fetchall(),
            "children": conn.execute("SELECT count(*) FROM child").fetchone(),
        }


def test_restore_keeps_foreign_keys_from_other_tables(pg_url: str, dialect: PostgreSQLDialect,
                                                      tmp_path: Path, snapshot_format: str) -> None:
    execute(pg_url, *PARENT_SCHEMA)
    tables = ["child", "parent"]
    before, extras = state(dialect, tables), parent_extras(pg_url)
    assert before["schema"]["parent"]["referenced_by"]
    journal = Journal(dialect.engine)
    journal.ensure()
    snap = take_snapshot(dialect, journal, tmp_path / "b", run_id=None, kind="snapshot",
                         tables=["parent"])
    assert_format(snap.path, snapshot_format)

    # the migration (and the application) change the table every way a migration can
    execute(pg_url,
            "ALTER TABLE parent ADD COLUMN extra text DEFAULT 'e'",
            "ALTER TABLE parent ENABLE TRIGGER parent_touch",
            "UPDATE parent SET qty = qty + 1 WHERE id <= 10",
            "INSERT INTO parent (code, qty) SELECT 'new' || i, i FROM generate_series(1, 5) i",
            "DELETE FROM parent WHERE id = 45",
            "DROP INDEX parent_note_x",
            "CREATE INDEX parent_extra ON parent (extra)",
            "ALTER TABLE parent ALTER COLUMN note SET DEFAULT 'changed'",
            "ALTER TABLE parent ADD CONSTRAINT qty_small CHECK (qty < 1000)",
            "CREATE TRIGGER parent_touch2 BEFORE INSERT ON parent FOR EACH ROW EXECUTE FUNCTION touch()")
    dialect.restore_tables(snap.path, ["parent"], [])
    assert state(dialect, tables) == before
    assert parent_extras(pg_url) == extras

    # rows the snapshot lacks that another table references: refused, nothing changed
    execute(pg_url, "INSERT INTO parent (id, code, qty) VALUES (100, 'kept', 1)",
            "INSERT INTO child VALUES (100, 100)")
    changed = state(dialect, tables)
    with pytest.raises(DatabaseError, match="child") as err:
        dialect.restore_tables(snap.path, ["parent"], [])
    assert "not in the snapshot" in err.value.message
    assert state(dialect, tables) == changed
    execute(pg_url, "DELETE FROM child WHERE id = 100")

    # a column type changed: the table is recreated, the foreign key re-pointed, grants kept
    execute(pg_url, "ALTER TABLE parent ALTER COLUMN label TYPE varchar(40)")
    dialect.restore_tables(snap.path, ["parent"], [])
    assert state(dialect, tables) == before
    assert parent_extras(pg_url) == extras


def test_restore_drops_created_tables_in_the_same_transaction(
        pg_url: str, dialect: PostgreSQLDialect, tmp_path: Path, snapshot_format: str) -> None:
    generate_into(pg_url, 200, bad_rate=0.0)
    before = state(dialect, CARD_TABLES)
    dest = tmp_path / "snap.db"
    dest.touch()
    dialect.snapshot(dest, CARD_TABLES)
    execute(pg_url, "CREATE TABLE tags (id int PRIMARY KEY, card_id int REFERENCES cards (id))",
            "INSERT INTO tags VALUES (1, 1)", "DELETE FROM cards WHERE id > 100",
            "UPDATE folders SET name = 'renamed'")
    dialect.restore_tables(dest, CARD_TABLES, ["tags"])
    assert state(dialect, CARD_TABLES) == before
    with dialect.engine.connect() as conn:
        assert "tags" not in dialect.user_tables(conn)


# -- indexes ----------------------------------------------------------------------------------------
INDEX_MIGRATION = """
from safemigrate import CreateIndex, Migration

migration = Migration(id="0001_change", description="index cards by style",
                      steps=[CreateIndex("cards", ["style"], name="idx_cards_style")])
"""


def index_state(url: str) -> list[tuple[Any, ...]]:
    with raw(url) as conn:
        return conn.execute("SELECT c.relname, i.indisvalid FROM pg_index i "
                            "JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname = 'idx_cards_style'"
                            ).fetchall()


def wait_for_concurrent_build(url: str, timeout: float = 60) -> int:
    """The pid of a CREATE INDEX CONCURRENTLY waiting for older transactions."""
    deadline = time.monotonic() + timeout
    with raw(url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE query LIKE 'CREATE INDEX CONCURRENTLY%' "
                "AND wait_event_type = 'Lock' AND datname = current_database()").fetchone()
            if row:
                return int(row[0])
            time.sleep(0.05)
    raise AssertionError("CREATE INDEX CONCURRENTLY never started waiting")


def test_index_ddl(pg_url: str, dialect: PostgreSQLDialect) -> None:
    generate_into(pg_url, 100, bad_rate=0.0)
    table = sa.Table("cards", sa.MetaData(), sa.Column("style"))
    sql, autocommit = dialect.create_index_sql(sa.Index("ix_style", table.c.style, unique=True))
    assert sql.startswith("CREATE UNIQUE INDEX CONCURRENTLY ix_style ON cards") and autocommit
    sql, autocommit = dialect.drop_index_sql(sa.Index("ix_style", table.c.style))
    assert sql == "DROP INDEX CONCURRENTLY ix_style" and autocommit
    with dialect.engine.connect() as conn:
        definition = dialect.index_definition(conn, "cards", "ix_cards_folder_id")
        assert definition == ("CREATE INDEX CONCURRENTLY ix_cards_folder_id ON public.cards "
                              "USING btree (folder_id)")
        assert dialect.index_definition(conn, "cards", "nope") is None
        assert dialect.has_index(conn, "cards", "ix_cards_folder_id")


def test_drop_index_with_percent_in_its_definition_is_undone_exactly(
        pg_url: str, dialect: PostgreSQLDialect, tmp_path: Path) -> None:
    """DropIndex captures pg_get_indexdef (a % in it must survive) and its inverse rebuilds the
    index CONCURRENTLY outside a transaction."""
    generate_into(pg_url, 300, bad_rate=0.0)
    execute(pg_url, "CREATE INDEX idx_cloze ON cards (id) WHERE style LIKE '%cloze%'")
    before = state(dialect, CARD_TABLES)
    migrations = write_migration(tmp_path / "migrations", """
from safemigrate import DropIndex, Migration

migration = Migration(id="0001_change", description="drop a partial index",
                      steps=[DropIndex("cards", "idx_cloze")])
""")
    with Migrator(settings(pg_url, tmp_path, migrations=migrations, workers=1)) as m:
        (result,) = m.run()
        assert result.status == "completed"
        with dialect.engine.connect() as conn:
            assert not dialect.has_index(conn, "cards", "idx_cloze")
        assert m.rollback(strategy="reverse").status == "rolled_back"
    assert state(dialect, CARD_TABLES) == before


def test_invalid_index_left_by_a_crash_is_repaired_on_resume(pg_url: str, dialect: PostgreSQLDialect,
                                                             tmp_path: Path) -> None:
    """`safemigrate run` is killed while CREATE INDEX CONCURRENTLY waits for an older
    transaction and its backend dies with it: an INVALID index is left. The next run resumes
    the same run, drops the leftover and builds the index."""
    generate_into(pg_url, 1000, bad_rate=0.0)
    migrations = write_migration(tmp_path / "migrations", INDEX_MIGRATION)
    blocker = raw(pg_url)
    blocker.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
    blocker.execute("SELECT count(*) FROM folders")  # holds a snapshot the build must outwait
    proc = subprocess.Popen(
        [str(SAFEMIGRATE), "run", "--db", pg_url, "--migrations", str(migrations), "--workers", "1",
         "--backup-dir", str(tmp_path / "backups")], cwd=tmp_path, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={k: v for k, v in os.environ.items() if k != "SAFEMIGRATE_DB"})
    try:
        build = wait_for_concurrent_build(pg_url)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        with raw(pg_url, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(%s)", (build,))
    finally:
        if proc.poll() is None:
            proc.kill()
        blocker.rollback()
        blocker.close()
    deadline = time.monotonic() + 10
    while index_state(pg_url) != [("idx_cards_style", False)] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert index_state(pg_url) == [("idx_cards_style", False)]
    with dialect.engine.connect() as conn:
        assert not dialect.has_index(conn, "cards", "idx_cards_style")
        assert any("INVALID" in p for p in dialect.integrity_check(conn))

    with Migrator(settings(pg_url, tmp_path, migrations=migrations, workers=1)) as m:
        crashed = m.journal.runs()[0]
        assert crashed["status"] == "running"
        assert [s["status"] for s in m.journal.steps(crashed["id"])] == ["applying"]
        (result,) = m.run()
    assert result.run_id == crashed["id"] and result.status == "completed"
    assert index_state(pg_url) == [("idx_cards_style", True)]
    with dialect.engine.connect() as conn:
        assert dialect.integrity_check(conn) == []


def test_index_build_that_timed_out_is_cleaned_by_rollback(pg_url: str, dialect: PostgreSQLDialect,
                                                           tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A concurrent build that gives up on its lock wait leaves an INVALID index (each retry
    drops it first); rolling the failed run back removes it and the database is as before; the
    next run builds it."""
    monkeypatch.setattr(ddl, "LOCK_BACKOFF", 0.05, raising=False)
    generate_into(pg_url, 500, bad_rate=0.0)
    before = state(dialect, CARD_TABLES)
    migrations = write_migration(tmp_path / "migrations", INDEX_MIGRATION)
    blocker = raw(pg_url)
    blocker.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
    blocker.execute("SELECT count(*) FROM folders")
    try:
        with Migrator(settings(pg_url, tmp_path, migrations=migrations, workers=1,
                               lock_timeout=1)) as m, pytest.raises(DatabaseLockedError):
            m.run()
    finally:
        blocker.rollback()
        blocker.close()
    assert index_state(pg_url) == [("idx_cards_style", False)]
    with Migrator(settings(pg_url, tmp_path, migrations=migrations, workers=1)) as m:
        rolled = m.rollback(strategy="reverse")
        assert rolled.status == "rolled_back" and all(c.passed for c in rolled.checks)
        assert index_state(pg_url) == []
        assert state(dialect, CARD_TABLES) == before
        (result,) = m.run()
        assert result.status == "completed"
    assert index_state(pg_url) == [("idx_cards_style", True)]


# -- lock timeouts ------------------------------------------------------------------------------------
def lock_cards_during_backfill(url: str, bus: EventBus,
                               hold: float) -> tuple[threading.Thread, threading.Event]:
    """On the first committed batch, another session takes ACCESS EXCLUSIVE on cards for `hold`
    seconds (or until released)."""
    locked, release = threading.Event(), threading.Event()

    def holder() -> None:
        with raw(url) as conn:
            conn.execute("LOCK TABLE cards IN ACCESS EXCLUSIVE MODE")
            locked.set()
            release.wait(hold)
            conn.rollback()

    thread = threading.Thread(target=holder, daemon=True)

    def on_event(event: Any) -> None:
        if event.kind == "batch" and not thread.is_alive() and not locked.is_set():
            thread.start()
            assert locked.wait(10)

    bus.subscribe(on_event)
    return thread, release


def test_lock_timeout_is_retried_with_backoff(pg_url: str, tmp_path: Path) -> None:
    generate_into(pg_url, 3000, bad_rate=0.0)
    bus = EventBus()
    alerts: list[str] = []
    bus.subscribe(lambda e: alerts.append(e.message) if e.kind == "alert" else None)
    thread, _ = lock_cards_during_backfill(pg_url, bus, hold=3.0)
    with Migrator(settings(pg_url, tmp_path, workers=1, batch_size=100, lock_timeout=0.5), bus) as m:
        (result,) = m.run()
        journaled = [e["message"] for e in m.journal.events(result.run_id) if e["kind"] == "alert"]
    thread.join()
    assert result.status == "completed" and result.rows == 3000
    retries = [a for a in alerts if a.startswith("lock wait: retrying batch")]
    assert retries and len(retries) <= BackfillExecutor.lock_retries
    assert any(j.startswith("lock wait: retrying batch") for j in journaled)


def test_lock_held_longer_than_the_retries_fails_clearly(pg_url: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(BackfillExecutor, "lock_backoff", 0.2)
    generate_into(pg_url, 3000, bad_rate=0.0)
    bus = EventBus()
    thread, release = lock_cards_during_backfill(pg_url, bus, hold=60.0)
    started = time.monotonic()
    try:
        with Migrator(settings(pg_url, tmp_path, workers=1, batch_size=100, lock_timeout=0.5), bus) as m, \
                pytest.raises(DatabaseLockedError) as err:
            m.run()
    finally:
        release.set()
        thread.join()
    assert time.monotonic() - started < 45
    assert "lock wait: gave up on a batch" in err.value.message and "cards" in err.value.message
    assert "lock timeout" in err.value.message or "waiting for a lock" in err.value.message


def test_lock_timeout_detection_and_translation(pg_url: str) -> None:
    execute(pg_url, "CREATE TABLE t (id int PRIMARY KEY)")
    d = PostgreSQLDialect(normalize_url(pg_url), lock_timeout=0.3)
    holder = raw(pg_url)
    try:
        holder.execute("LOCK TABLE t IN ACCESS EXCLUSIVE MODE")
        with d.engine.connect() as conn, pytest.raises(sa.exc.DBAPIError) as err:
            conn.exec_driver_sql("SELECT * FROM t")
        assert d.is_lock_timeout(err.value)
        translated = d.translate_error(err.value)
        assert isinstance(translated, DatabaseLockedError) and "0.3s" in translated.message
        with d.engine.connect() as conn:
            assert conn.exec_driver_sql("SHOW lock_timeout").scalar() == "300ms"
            assert conn.exec_driver_sql("SHOW application_name").scalar() == "safemigrate"
            assert conn.exec_driver_sql("SHOW statement_timeout").scalar() == "1h"
            with pytest.raises(sa.exc.DBAPIError) as other:
                conn.exec_driver_sql("SELECT * FROM missing_table")
            assert not d.is_lock_timeout(other.value)
    finally:
        holder.close()
        d.dispose()


# -- health, facts, integrity ------------------------------------------------------------------------
def test_health_figures(pg_url: str, dialect: PostgreSQLDialect) -> None:
    execute(pg_url, "CREATE TABLE t (id int PRIMARY KEY)", "INSERT INTO t VALUES (1)")
    long_tx = raw(pg_url)
    long_tx.execute("SELECT 1")  # a transaction left open
    long_pid = long_tx.info.backend_pid
    holder = raw(pg_url, application_name="safemigrate")
    holder.execute("LOCK TABLE t IN ACCESS EXCLUSIVE MODE")
    waiter_done = threading.Event()

    def waiter() -> None:
        with raw(pg_url, autocommit=True) as conn:
            conn.execute("SELECT * FROM t")
        waiter_done.set()

    thread = threading.Thread(target=waiter)
    thread.start()
    try:
        time.sleep(1.0)
        with dialect.engine.connect() as conn:
            figures = dialect.health(conn, ["t"], long_after=0.5)
    finally:
        holder.rollback()
        holder.close()
        thread.join()
        long_tx.close()
    assert waiter_done.is_set()
    assert figures["connections"] >= 3 and figures["max_connections"] > 0
    assert figures["lock_waits"] >= 1 and figures["blocked_by_safemigrate"] >= 1
    assert figures["lock_wait_max_ms"] >= 500
    assert figures["long_transactions"] >= 2 and figures["oldest_transaction_s"] >= 0.5
    assert long_pid in {t["pid"] for t in figures["long_transaction_list"]}
    assert figures["replicas"] == 0 and figures["replica_lag_s"] is None
    assert figures["autovacuum_workers"] == 0 and figures["autovacuum_tables"] == []
    numeric = {k for k, v in figures.items() if isinstance(v, int | float)}
    assert {"connections", "lock_waits", "oldest_transaction_s", "autovacuum_workers"} <= numeric


def test_facts_and_row_counts(pg_url: str) -> None:
    generate_into(pg_url, 1234, bad_rate=0.0)
    d = dialect_for(normalize_url(pg_url.replace("postgresql+psycopg://", "postgres://")))
    try:
        assert isinstance(d, PostgreSQLDialect) and d.name == "postgresql"
        with d.engine.connect() as conn:
            assert d.server_version(conn).startswith("PostgreSQL ")
            assert d.size_bytes(conn) > 1_000_000
            assert d.row_count(conn, "cards") == 1234
            conn.exec_driver_sql("ANALYZE cards")
            assert d.row_count(conn, "cards", estimate=True) == 1234
            assert d.user_tables(conn) == CARD_TABLES
    finally:
        d.dispose()


def test_integrity_check(pg_url: str, dialect: PostgreSQLDialect) -> None:
    execute(pg_url, "CREATE TABLE t (id int PRIMARY KEY, v int)",
            "INSERT INTO t SELECT i, i FROM generate_series(1, 100) i",
            "INSERT INTO t VALUES (101, 1)")
    with dialect.engine.connect() as conn:
        assert dialect.integrity_check(conn) == []
    with raw(pg_url, autocommit=True) as conn, pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute("CREATE UNIQUE INDEX CONCURRENTLY t_v ON t (v)")  # fails: leaves it INVALID
    execute(pg_url, "ALTER TABLE t ADD CONSTRAINT v_positive CHECK (v > 0) NOT VALID",
            "CREATE TABLE u (id int PRIMARY KEY, t_id int)",
            "INSERT INTO u VALUES (1, 1), (2, 999), (3, NULL)",
            "ALTER TABLE u ADD CONSTRAINT u_t FOREIGN KEY (t_id) REFERENCES t (id) NOT VALID")
    with dialect.engine.connect() as conn:
        problems = dialect.integrity_check(conn)
        assert dialect.quick_integrity_check(conn) == problems  # no amcheck installed
        assert not dialect.has_index(conn, "t", "t_v")
        assert dialect.index_problems(conn, ["t"]) == problems[:1]
        assert dialect.index_problems(conn, ["u"]) == []
        violations = dialect.foreign_key_violations(conn)
    assert len(problems) == 3
    assert "t_v" in problems[0] and "INVALID" in problems[0]
    assert "v_positive" in problems[1] and "NOT VALID" in problems[1]
    assert "u_t" in problems[2] and "NOT VALID" in problems[2]
    assert violations == ["1 rows of public.u point nowhere through NOT VALID foreign key u_t (t_id -> t)"]

    # amcheck is used when installed (safemigrate never installs it)
    execute(pg_url, "DROP INDEX t_v", "ALTER TABLE t VALIDATE CONSTRAINT v_positive",
            "DROP TABLE u", "CREATE EXTENSION amcheck")
    seen: list[str] = []
    sa.event.listen(dialect.engine, "before_cursor_execute",
                    lambda conn, cur, statement, *a: seen.append(statement))
    with dialect.engine.connect() as conn:
        assert dialect.integrity_check(conn) == []
        assert dialect.index_problems(conn, ["t"]) == []
    assert any("bt_index_check" in s for s in seen)


# -- clear errors, no password -----------------------------------------------------------------------
def test_connection_errors_are_clear_and_never_show_the_password(tmp_path: Path) -> None:
    url = "postgresql://alice:S3cretPw99@127.0.0.1:1/appdb"
    d = PostgreSQLDialect(normalize_url(url))
    with pytest.raises(DatabaseError) as err:
        d.ping()
    line = err.value.one_line()
    assert "127.0.0.1:1" in line and "refused" in line and "S3cretPw99" not in line
    with pytest.raises(DatabaseError) as err, Migrator(Settings(db=url, backup_dir=tmp_path)) as m:
        m.run()
    assert "S3cretPw99" not in err.value.one_line()
    proc = cli("check", "--db", url, cwd=tmp_path)
    assert proc.returncode != 0
    assert "S3cretPw99" not in proc.stdout + proc.stderr
    assert "127.0.0.1:1" in proc.stdout + proc.stderr


def test_server_errors_are_clear(pg_url: str) -> None:
    missing = sa.make_url(pg_url).set(database="no_such_db_here", password="Pw0rd!x")
    d = PostgreSQLDialect(missing)
    with pytest.raises(DatabaseError, match="'no_such_db_here' does not exist") as err:
        d.ping()
    assert "Pw0rd!x" not in err.value.one_line()
    nobody = PostgreSQLDialect(sa.make_url(PG_ADMIN).set(username="no_such_role_x"))
    with pytest.raises(DatabaseError, match="refused user 'no_such_role_x'"):
        nobody.ping()
