"""Real-world SQLite files made by other applications, not by us.

Each shape is built with plain `sqlite3`, migrated through `Migrator` from a migration file in a
temporary folder, checked (backfilled values right, everything else bit-for-bit unchanged), then
rolled back with both strategies; afterwards every user table's content digest, its schema
fingerprint and the views/triggers/indexes in sqlite_master must equal the original.

Decisions these tests pin down:
- App triggers FIRE on the backfill's UPDATEs. The tool issues ordinary UPDATEs (SQLite cannot
  switch triggers off per connection), and triggers that keep derived data in step (audit logs,
  counters, search indexes) should see the migration like any other write. Tables written by
  those triggers are therefore part of what a rollback must give back: after either strategy
  the audit table must equal its original content too. It does not yet (strict xfail below).
- A table without a primary key, or whose key holds NULLs, is refused before anything changes.
- A collation or SQL function only the application registers is a clear error, with a hint,
  before anything changes, when the tool would need it (an index ordered by it, a trigger the
  backfill fires that calls it); when nothing compares with it, the migration works.
- Values are read and compared exactly as stored, whatever the declared type (text in DATETIME
  or NUMERIC columns, unknown type names, no type at all).
- Foreign keys: a restore never cascades into children, even where every connection enforces
  foreign keys (SQLITE_DEFAULT_FOREIGN_KEYS=1 builds).

sqlite_stat* tables are left out of the sqlite_master comparison: the cleanup phase runs ANALYZE,
whose planner statistics (sqlite_stat1) stay after a rollback. They are neither schema nor data.
"""

from __future__ import annotations

import json
import sqlite3
import textwrap
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from safemigrate import DatabaseError, MigrationFileError, NotReadyError, SafeMigrateError
from safemigrate.dialects import SQLiteDialect
from safemigrate.digest import database_digest
from safemigrate.migrator import Migrator
from safemigrate.settings import Settings
from safemigrate.urls import normalize_url

STRATEGIES = ["reverse", "restore"]

HEADER = "from safemigrate import AddColumn, Backfill, CreateIndex, DropIndex, Migration, RawSQL\n"


# -- helpers ---------------------------------------------------------------------------------
def write_migration(tmp_path: Path, body: str, name: str = "0001_shape.py") -> Path:
    folder = tmp_path / "migrations"
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text(HEADER + textwrap.dedent(body))
    return folder


def migrator(tmp_path: Path, db: Path, **settings: Any) -> Migrator:
    settings.setdefault("workers", 1)
    return Migrator(Settings(db=str(db), migrations=tmp_path / "migrations",
                             backup_dir=tmp_path / "b", **settings))


def dialect_for_file(db: Path) -> SQLiteDialect:
    return SQLiteDialect(normalize_url(str(db)))


def capture(db: Path, collations: dict[str, Any] | None = None) -> dict[str, Any]:
    """Content digests and schema fingerprints of every user table, plus every application
    object in sqlite_master (tables, indexes, views, triggers) and sqlite_sequence."""
    dialect = dialect_for_file(db)
    if collations:
        @sa.event.listens_for(dialect.engine, "connect")
        def _register(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
            for name, func in collations.items():
                dbapi_connection.create_collation(name, func)

    try:
        with dialect.engine.connect() as conn:
            tables = dialect.user_tables(conn)
            master = sorted(tuple(r) for r in conn.exec_driver_sql(
                "SELECT type, name, tbl_name, sql FROM sqlite_master "
                "WHERE tbl_name NOT LIKE 'safemigrate\\_%' ESCAPE '\\' "
                "AND name NOT LIKE 'sqlite\\_stat%' ESCAPE '\\'"))
            has_seq = conn.exec_driver_sql(
                "SELECT 1 FROM sqlite_master WHERE name = 'sqlite_sequence'").first()
            sequence = (sorted(tuple(r) for r in conn.exec_driver_sql("SELECT * FROM sqlite_sequence"))
                        if has_seq else None)
            return {
                "tables": tables,
                "digests": database_digest(conn, tables),
                "schema": dialect.schema_fingerprint(conn, tables),
                "master": master,
                "sequence": sequence,
            }
    finally:
        dialect.dispose()


def assert_same_state(before: dict[str, Any], after: dict[str, Any],
                      content_not_compared: frozenset[str] = frozenset()) -> None:
    """Same tables, schemas, views, triggers, indexes and AUTOINCREMENT counters; same content
    in every table but `content_not_compared` (whose schema is still compared)."""
    assert after["tables"] == before["tables"]
    for table in before["tables"]:
        assert after["schema"][table] == before["schema"][table], f"schema of {table} differs"
        if table not in content_not_compared:
            assert after["digests"][table] == before["digests"][table], f"content of {table} differs"
    views_triggers = [r for r in before["master"] if r[0] in ("view", "trigger")]
    assert [r for r in after["master"] if r[0] in ("view", "trigger")] == views_triggers
    assert after["master"] == before["master"]
    if before["sequence"] is None:
        assert after["sequence"] is None
    else:
        def counters(state: dict[str, Any]) -> list[tuple[Any, ...]]:
            return [r for r in state["sequence"] if r[0] not in content_not_compared]
        assert counters(after) == counters(before)


def rows(db: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def run_and_roll_back(tmp_path: Path, db: Path, strategy: str, after_run: Any = None,
                      content_not_compared: frozenset[str] = frozenset(), **settings: Any) -> None:
    """Run the migration in tmp_path/migrations (the run's own checks must all pass), call
    after_run(state before), roll back with `strategy`, check the database equals the original."""
    before = capture(db)
    with migrator(tmp_path, db, **settings) as m:
        (result,) = m.run()
        assert result.status == "completed", result
        assert all(c.passed for c in result.checks), [c for c in result.checks if not c.passed]
    if after_run is not None:
        after_run(before)
    with migrator(tmp_path, db, **settings) as m:
        rolled = m.rollback(strategy=strategy)
        assert rolled.status == "rolled_back"
        assert all(c.passed for c in rolled.checks), [c for c in rolled.checks if not c.passed]
    assert_same_state(before, capture(db), content_not_compared)


def untouched(before: dict[str, Any], db: Path, table: str, written: set[str],
              side_effects: frozenset[str] = frozenset()) -> None:
    """Every other table byte-identical (but the `side_effects` tables app triggers write); in
    `table` every column but `written` identical."""
    now = capture(db)
    for name in before["tables"]:
        if name == table or name in side_effects:
            continue
        assert now["digests"][name] == before["digests"][name], f"{name} changed"
    old, new = before["digests"][table], now["digests"][table]
    assert new["rows"] == old["rows"]
    for column, digest in old["columns"].items():
        if column not in written:
            assert new["columns"][column] == digest, f"{table}.{column} changed"


# -- (a) WAL mode with another connection reading --------------------------------------------
def build_wal(db: Path) -> None:
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
    conn.executescript("""
        CREATE TABLE notes(id INTEGER PRIMARY KEY, title TEXT NOT NULL, body TEXT);
        CREATE TABLE tags(note_id INTEGER, tag TEXT, PRIMARY KEY(note_id, tag));
        CREATE INDEX notes_title ON notes(title);
    """)
    conn.executemany("INSERT INTO notes VALUES (?, ?, ?)",
                     [(i, f"Note {i} ünïcode", "body " * (i % 5)) for i in range(1, 101)])
    conn.executemany("INSERT INTO tags VALUES (?, ?)", [(i, t) for i in range(1, 101, 3) for t in "ab"])
    conn.commit()
    conn.close()


WAL_MIGRATION = """
def shout(row):
    return {"title_upper": row["title"].upper()}

migration = Migration(id="0001_shape", steps=[
    AddColumn("notes", "title_upper", "TEXT"),
    Backfill("notes", shout, reads=["title"], writes=["title_upper"], batch_size=7),
])
"""


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_wal_database_with_a_reader_open(tmp_path, strategy):
    db = tmp_path / "app.db"
    build_wal(db)
    write_migration(tmp_path, WAL_MIGRATION)
    # The application keeps a connection reading in an open transaction throughout.
    reader = sqlite3.connect(db, isolation_level=None)
    reader.execute("BEGIN")
    seen = reader.execute("SELECT id, title FROM notes ORDER BY id").fetchall()
    try:
        def check(before):
            # the reader's snapshot is unaffected while it stays open ...
            assert reader.execute("SELECT id, title FROM notes ORDER BY id").fetchall() == seen
            reader.execute("COMMIT")
            # ... and sees the migrated rows once it starts a new transaction
            got = reader.execute("SELECT title, title_upper FROM notes ORDER BY id").fetchall()
            assert got and all(upper == title.upper() for title, upper in got)
            untouched(before, db, "notes", {"title_upper"})
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM notes").fetchone()

        run_and_roll_back(tmp_path, db, strategy, after_run=check)
        reader.execute("COMMIT")
    finally:
        reader.close()
    assert rows(db, "PRAGMA journal_mode") == [("wal",)]
    assert rows(db, "PRAGMA integrity_check") == [("ok",)]


# -- (b) triggers writing another table, and views over the migrated table ----------------------
def build_triggers(db: Path) -> None:
    conn = sqlite3.connect(db)
    conn.executescript("""
        CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT NOT NULL, price INTEGER NOT NULL);
        CREATE TABLE audit(id INTEGER PRIMARY KEY AUTOINCREMENT, item_id INTEGER,
                           old_name TEXT, new_name TEXT, old_price INTEGER, new_price INTEGER);
        CREATE TRIGGER items_audit AFTER UPDATE ON items BEGIN
            INSERT INTO audit(item_id, old_name, new_name, old_price, new_price)
            VALUES (old.id, old.name, new.name, old.price, new.price);
        END;
        CREATE TRIGGER items_no_delete BEFORE DELETE ON items BEGIN
            SELECT RAISE(ABORT, 'items are never deleted');
        END;
        CREATE VIEW expensive AS SELECT id, name FROM items WHERE price > 500;
        CREATE VIEW everything AS SELECT * FROM items;
    """)
    conn.executemany("INSERT INTO items VALUES (?, ?, ?)",
                     [(i, f"item {i}", i * 10) for i in range(1, 81)])
    conn.execute("UPDATE items SET price = price + 1 WHERE id <= 3")  # the app's own audit rows
    conn.commit()
    conn.close()


TRIGGER_MIGRATION = """
def price_band(row):
    return {"band": "high" if row["price"] > 500 else "low", "name": row["name"].title()}

migration = Migration(id="0001_shape", steps=[
    AddColumn("items", "band", "TEXT"),
    Backfill("items", price_band, reads=["price", "name"], writes=["band", "name"], batch_size=16),
])
"""


def trigger_run_check(db: Path, audit_before: int):
    def check(before):
        got = rows(db, "SELECT id, name, price, band FROM items ORDER BY id")
        assert [(i, n, b) for i, n, _, b in got] == [
            (i, f"Item {i}", "high" if p > 500 else "low") for i, _, p, _ in got]
        untouched(before, db, "items", {"band", "name"}, side_effects=frozenset({"audit"}))
        # the backfill's UPDATEs are ordinary updates: the app's audit trigger saw each row once
        audit = rows(db, "SELECT item_id, old_name, new_name FROM audit WHERE id > ?", (audit_before,))
        assert sorted(audit) == [(i, f"item {i}", f"Item {i}") for i in range(1, 81)]
        # views over the migrated table keep working, and see the new column through SELECT *
        assert rows(db, "SELECT count(*) FROM expensive") == [(30,)]
        assert "band" in [d[1] for d in rows(db, "PRAGMA table_info(everything)")]
    return check


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_triggers_fire_and_views_survive(tmp_path, strategy):
    """Everything but the audit table's rows is back after the rollback: items, its triggers,
    the views, the audit table's schema (see the xfail below for its rows)."""
    db = tmp_path / "app.db"
    build_triggers(db)
    write_migration(tmp_path, TRIGGER_MIGRATION)
    audit_before = rows(db, "SELECT count(*) FROM audit")[0][0]
    assert audit_before == 3
    run_and_roll_back(tmp_path, db, strategy, after_run=trigger_run_check(db, audit_before),
                      content_not_compared=frozenset({"audit"}))
    assert rows(db, "SELECT count(*) FROM everything") == [(80,)]
    assert rows(db, "SELECT * FROM expensive ORDER BY id") == [(i, f"item {i}") for i in range(51, 81)]
    # the triggers are back and still work for the application
    conn = sqlite3.connect(db)
    with pytest.raises(sqlite3.IntegrityError, match="never deleted"):
        conn.execute("DELETE FROM items WHERE id = 1")
    conn.close()


@pytest.mark.xfail(strict=True, reason=(
    "rows that app triggers write to OTHER tables during the backfill (audit) are not rolled "
    "back: the audit table is not part of the run's baseline, so restore does not restore it, "
    "reverse re-fires the trigger, and the rollback's proof does not look at it"))
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_rows_written_by_app_triggers_are_rolled_back_too(tmp_path, strategy):
    db = tmp_path / "app.db"
    build_triggers(db)
    write_migration(tmp_path, TRIGGER_MIGRATION)
    audit_before = rows(db, "SELECT * FROM audit ORDER BY id")
    run_and_roll_back(tmp_path, db, strategy, after_run=trigger_run_check(db, len(audit_before)))
    assert rows(db, "SELECT * FROM audit ORDER BY id") == audit_before


# -- (c) WITHOUT ROWID table with a TEXT primary key ---------------------------------------------
def build_without_rowid(db: Path) -> None:
    conn = sqlite3.connect(db)
    conn.executescript("""
        CREATE TABLE kv(key TEXT PRIMARY KEY, value TEXT, hits INTEGER NOT NULL DEFAULT 0)
            WITHOUT ROWID;
        CREATE TABLE other(id INTEGER PRIMARY KEY, x REAL);
    """)
    keys = [f"k{i:03d}" for i in range(60)] + ["Zeta", "alpha", "Alpha", "ß", "日本", "a b", "", "%_"]
    conn.executemany("INSERT INTO kv VALUES (?, ?, ?)",
                     [(k, f"value of {k}" * (i % 3), i) for i, k in enumerate(keys)])
    conn.executemany("INSERT INTO other VALUES (?, ?)", [(i, i / 7) for i in range(20)])
    conn.commit()
    conn.close()


WITHOUT_ROWID_MIGRATION = """
def measure(row):
    return {"value_len": len(row["value"] or ""), "hits": row["hits"] + 1000}

migration = Migration(id="0001_shape", steps=[
    AddColumn("kv", "value_len", "INTEGER"),
    Backfill("kv", measure, reads=["value", "hits"], writes=["value_len", "hits"], batch_size=5),
    CreateIndex("kv", ["value_len"], name="kv_value_len"),
])
"""


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_without_rowid_text_key(tmp_path, strategy):
    db = tmp_path / "app.db"
    build_without_rowid(db)
    write_migration(tmp_path, WITHOUT_ROWID_MIGRATION)
    original = dict(rows(db, "SELECT key, hits FROM kv"))

    def check(before):
        got = rows(db, "SELECT key, value, hits, value_len FROM kv")
        assert len(got) == len(original)
        for key, value, hits, value_len in got:
            assert value_len == len(value or "")
            assert hits == original[key] + 1000  # every row exactly once
        untouched(before, db, "kv", {"hits", "value_len"})

    run_and_roll_back(tmp_path, db, strategy, after_run=check)
    assert "WITHOUT ROWID" in rows(db, "SELECT sql FROM sqlite_master WHERE name='kv'")[0][0]


# -- (d) composite primary key, pages crossing key boundaries ------------------------------------
def build_composite(db: Path) -> None:
    conn = sqlite3.connect(db)
    conn.executescript("""
        CREATE TABLE scores(game INTEGER NOT NULL, player TEXT NOT NULL, points INTEGER,
                            note TEXT, PRIMARY KEY(player, game));
        CREATE TABLE players(name TEXT PRIMARY KEY, joined TEXT);
    """)
    data = [(g, p, g * 10 + len(p), None if g % 2 else "n")
            for p in ["ann", "bob", "Cy", "dee", "ed"] for g in range(1, 1 + len(p) + 2)]
    conn.executemany("INSERT INTO scores VALUES (?, ?, ?, ?)", data)
    conn.executemany("INSERT INTO players VALUES (?, ?)", [(p, "2020") for p in ["ann", "bob"]])
    conn.commit()
    conn.close()


COMPOSITE_MIGRATION = """
def double(row):
    return {"points": row["points"] * 2}

migration = Migration(id="0001_shape", steps=[
    Backfill("scores", double, reads=["points"], writes=["points"]),
])
"""


@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_composite_key_pages_cross_key_boundaries(tmp_path, strategy, batch_size):
    db = tmp_path / "app.db"
    build_composite(db)
    write_migration(tmp_path, COMPOSITE_MIGRATION)
    original = {(g, p): pts for g, p, pts in rows(db, "SELECT game, player, points FROM scores")}

    def check(before):
        got = {(g, p): pts for g, p, pts in rows(db, "SELECT game, player, points FROM scores")}
        # doubled exactly once: a row read twice would be quadrupled, a skipped one unchanged
        assert got == {k: v * 2 for k, v in original.items()}
        untouched(before, db, "scores", {"points"})

    run_and_roll_back(tmp_path, db, strategy, after_run=check, batch_size=batch_size)


NEW_COLUMN_MIGRATION = """
def bonus(row):
    return {"bonus": row["points"] * 10}

migration = Migration(id="0001_shape", steps=[
    AddColumn("scores", "bonus", "INTEGER"),
    Backfill("scores", bonus, reads=["points"], writes=["bonus"], batch_size=2),
])
"""


@pytest.mark.parametrize("migration", [COMPOSITE_MIGRATION, NEW_COLUMN_MIGRATION],
                         ids=["existing-column", "new-column"])
def test_null_in_a_composite_key_is_refused_before_any_change(tmp_path, migration):
    """SQLite lets non-INTEGER primary key columns hold NULL (a legacy quirk): such rows can
    be neither paged past nor updated by key, so they would be silently skipped."""
    db = tmp_path / "app.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE scores(game INTEGER, player TEXT, points INTEGER, PRIMARY KEY(player, game))")
    conn.executemany("INSERT INTO scores VALUES (?, ?, ?)",
                     [(1, "ann", 1), (2, None, 2), (3, "bob", 3), (4, None, 4), (5, "cy", 5)])
    conn.commit()
    conn.close()
    write_migration(tmp_path, migration)
    before = capture(db)
    with migrator(tmp_path, db, batch_size=3) as m, pytest.raises(MigrationFileError) as err:
        m.run()
    assert "NULL" in err.value.message and "scores" in err.value.message
    assert "key" in err.value.hint
    assert_same_state(before, capture(db))


# -- (e) collations: NOCASE, and one only the application registers -----------------------------
def build_nocase(db: Path) -> None:
    conn = sqlite3.connect(db)
    conn.executescript("""
        CREATE TABLE users(email TEXT PRIMARY KEY COLLATE NOCASE, name TEXT COLLATE NOCASE,
                           city TEXT);
        CREATE INDEX users_name ON users(name COLLATE NOCASE);
    """)
    emails = ["a@x.org", "B@x.org", "c@x.org", "D@x.org", "e@x.org", "F@x.org", "g@X.org",
              "H@x.org", "i@x.org", "j@x.org", "Kk@x.org", "kl@x.org"]
    conn.executemany("INSERT INTO users VALUES (?, ?, ?)",
                     [(e, e.split("@")[0].swapcase(), "Paris") for e in emails])
    conn.commit()
    conn.close()


NOCASE_MIGRATION = """
def lower(row):
    return {"email_lower": row["email"].lower()}

migration = Migration(id="0001_shape", steps=[
    AddColumn("users", "email_lower", "TEXT"),
    Backfill("users", lower, reads=["email"], writes=["email_lower"], batch_size=5),
])
"""


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_nocase_collated_key(tmp_path, strategy):
    db = tmp_path / "app.db"
    build_nocase(db)
    write_migration(tmp_path, NOCASE_MIGRATION)

    def check(before):
        got = rows(db, "SELECT email, email_lower FROM users")
        assert len(got) == 12 and all(low == e.lower() for e, low in got)
        untouched(before, db, "users", {"email_lower"})

    run_and_roll_back(tmp_path, db, strategy, after_run=check)


def app_collation(a: str, b: str) -> int:
    """The application's own ordering: by length, then reversed text."""
    ka, kb = (len(a), a[::-1]), (len(b), b[::-1])
    return (ka > kb) - (ka < kb)


def build_custom_collation(db: Path, indexed: bool) -> None:
    conn = sqlite3.connect(db)
    conn.create_collation("APP_ORDER", app_collation)
    conn.executescript("""
        CREATE TABLE tracks(id INTEGER PRIMARY KEY, title TEXT COLLATE APP_ORDER, artist TEXT);
    """)
    if indexed:
        conn.execute("CREATE INDEX tracks_title ON tracks(title)")
    conn.executemany("INSERT INTO tracks VALUES (?, ?, ?)",
                     [(i, f"title {i * 37 % 101}", f"artist {i % 4}") for i in range(1, 41)])
    conn.commit()
    conn.close()


CUSTOM_COLLATION_MIGRATION = """
def initial(row):
    return {"artist_initial": row["artist"][:1].upper()}

migration = Migration(id="0001_shape", steps=[
    AddColumn("tracks", "artist_initial", "TEXT"),
    Backfill("tracks", initial, reads=["artist"], writes=["artist_initial"], batch_size=9),
])
"""


def app_slug(text: str) -> str:
    return text.lower().replace(" ", "-")


def build_app_only(db: Path, kind: str) -> None:
    """tracks with something only the application defines: an index ordered by its collation,
    a trigger calling its SQL function, or an index on an expression using that function."""
    if kind == "collation-index":
        build_custom_collation(db, indexed=True)
        return
    conn = sqlite3.connect(db)
    conn.create_function("app_slug", 1, app_slug, deterministic=True)
    conn.executescript("""
        CREATE TABLE tracks(id INTEGER PRIMARY KEY, title TEXT, artist TEXT);
        CREATE TABLE slugs(track_id INTEGER, slug TEXT);
    """)
    if kind == "function-trigger":
        conn.execute("CREATE TRIGGER tracks_slug AFTER UPDATE ON tracks BEGIN "
                     "INSERT INTO slugs VALUES (new.id, app_slug(new.title)); END")
    else:
        conn.execute("CREATE INDEX tracks_slug ON tracks(app_slug(title))")
    conn.executemany("INSERT INTO tracks VALUES (?, ?, ?)",
                     [(i, f"Title {i}", f"artist {i % 4}") for i in range(1, 41)])
    conn.commit()
    conn.close()


@pytest.mark.parametrize(("kind", "name"), [("collation-index", "APP_ORDER"),
                                            ("function-trigger", "app_slug"),
                                            ("function-index", "app_slug")])
def test_app_only_collation_or_function_is_a_clear_error_before_any_change(tmp_path, kind, name):
    """SQLite cannot check or maintain an index ordered by a collation it does not know, nor
    run a trigger calling a function it does not know: the tool must say so up front, naming
    it, with a hint, and leave the file as it was (not fail half-way through the backfill)."""
    db = tmp_path / "app.db"
    build_app_only(db, kind)
    write_migration(tmp_path, CUSTOM_COLLATION_MIGRATION)
    before = capture(db, {"APP_ORDER": app_collation})
    with migrator(tmp_path, db) as m, pytest.raises(SafeMigrateError) as err:
        m.run()
    assert isinstance(err.value, NotReadyError | DatabaseError)
    assert name in err.value.message
    assert ("collation" if "collation" in kind else "function") in err.value.message
    assert "application" in err.value.hint
    assert_same_state(before, capture(db, {"APP_ORDER": app_collation}))
    assert [r[1] for r in rows(db, "PRAGMA table_info(tracks)")] == ["id", "title", "artist"]


def test_restore_never_compares_with_a_placeholder_collation(tmp_path):
    """Restore recreates tables naming an app-only collation with a placeholder that refuses
    to compare: rebuilding an index ordered by it fails (and rolls back), never guesses."""
    snap, db = tmp_path / "snap.db", tmp_path / "app.db"
    build_custom_collation(snap, indexed=True)
    build_custom_collation(db, indexed=False)
    conn = sqlite3.connect(db)
    conn.execute("UPDATE tracks SET artist = 'changed'")
    conn.commit()
    conn.close()
    before = capture(db)
    dialect = dialect_for_file(db)
    try:
        with pytest.raises(DatabaseError, match="APP_ORDER"):
            dialect.restore_tables(snap, ["tracks"], [])
    finally:
        dialect.dispose()
    assert_same_state(before, capture(db))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_unknown_collation_on_an_unindexed_column_works(tmp_path, strategy):
    """Nothing the tool does compares values of the custom-collated column: it must work."""
    db = tmp_path / "app.db"
    build_custom_collation(db, indexed=False)
    write_migration(tmp_path, CUSTOM_COLLATION_MIGRATION)

    def check(before):
        got = rows(db, "SELECT artist, artist_initial FROM tracks")
        assert len(got) == 40 and all(i == a[:1].upper() for a, i in got)
        untouched(before, db, "tracks", {"artist_initial"})

    run_and_roll_back(tmp_path, db, strategy, after_run=check)


# -- (f) types the tool does not know, and generated columns -------------------------------------
def build_odd_types(db: Path) -> None:
    conn = sqlite3.connect(db)
    conn.executescript("""
        CREATE TABLE events(
            id INTEGER PRIMARY KEY,
            payload JSONB_CUSTOM,
            happened DATETIME2,
            created DATETIME,
            amount MONEY(10, 2),
            ratio NUMERIC,
            flags BITSET,
            raw BLOB,
            extra,
            n_twice INTEGER GENERATED ALWAYS AS (json_extract(payload, '$.n') * 2) VIRTUAL,
            kind TEXT GENERATED ALWAYS AS (upper(json_extract(payload, '$.kind'))) STORED
        );
        CREATE INDEX events_kind ON events(kind);
    """)
    odd_values = ["2024-01-02T03:04:05Z", "yesterday", 1700000000, 1.5, None, b"\x00\xff"]
    conn.executemany(
        "INSERT INTO events(id, payload, happened, created, amount, ratio, flags, raw, extra) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(i, f'{{"n": {i}, "kind": "k{i % 3}"}}', odd_values[i % 6], odd_values[(i + 1) % 6],
          "12.30" if i % 2 else 12.3, 1e-12 * i if i % 3 else "n/a", "0b1010", bytes([i]) * i,
          odd_values[(i + 2) % 6]) for i in range(1, 31)])
    conn.commit()
    conn.close()


ODD_TYPES_MIGRATION = """
import json

def extract(row):
    return {"label": f"{json.loads(row['payload'])['kind']}:{row['n_twice']}"}

def as_text(row):  # rewrite columns of a declared (DATETIME) and of no declared type, in place
    return {c: None if row[c] is None else f"<{row[c]!r}>" for c in ("created", "extra")}

migration = Migration(id="0001_shape", steps=[
    AddColumn("events", "label", "VARCHAR(32)"),
    Backfill("events", extract, reads=["payload", "n_twice"], writes=["label"], batch_size=7),
    Backfill("events", as_text, reads=["created", "extra"], writes=["created", "extra"], batch_size=4),
])
"""


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_unknown_types_and_generated_columns(tmp_path, strategy):
    db = tmp_path / "app.db"
    build_odd_types(db)
    write_migration(tmp_path, ODD_TYPES_MIGRATION)
    raw_before = rows(db, "SELECT *, typeof(happened), typeof(created), typeof(amount), "
                          "typeof(ratio), typeof(extra) FROM events ORDER BY id")
    stored = rows(db, "SELECT created, extra FROM events ORDER BY id")

    def check(before):
        got = rows(db, "SELECT id, label, n_twice, kind FROM events ORDER BY id")
        assert [(i, label) for i, label, _, _ in got] == [
            (i, f"k{i % 3}:{2 * i}") for i in range(1, 31)]
        # the transform saw the values exactly as stored (no datetime/Decimal conversion)
        assert rows(db, "SELECT created, extra FROM events ORDER BY id") == [
            tuple(None if v is None else f"<{v!r}>" for v in row) for row in stored]
        untouched(before, db, "events", {"label", "created", "extra"})

    run_and_roll_back(tmp_path, db, strategy, after_run=check)
    # values of every storage class came back exactly (the digest compares them too)
    assert rows(db, "SELECT *, typeof(happened), typeof(created), typeof(amount), "
                    "typeof(ratio), typeof(extra) FROM events ORDER BY id") == raw_before


def test_digest_sees_tiny_differences_in_unknown_and_numeric_columns(tmp_path):
    """The digest must hash the stored values, not a lossy conversion of them."""
    db = tmp_path / "app.db"
    build_odd_types(db)
    first = capture(db)["digests"]["events"]["columns"]
    conn = sqlite3.connect(db)
    conn.execute("UPDATE events SET ratio = ratio + 1e-13 WHERE id = 1")
    conn.execute("UPDATE events SET happened = 'yesterday ' WHERE happened = 'yesterday'")
    conn.commit()
    conn.close()
    second = capture(db)["digests"]["events"]["columns"]
    assert second["ratio"] != first["ratio"]
    assert second["happened"] != first["happened"]


# -- (g) foreign keys ON in the app, ON DELETE CASCADE children ----------------------------------
def build_foreign_keys(db: Path) -> None:
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA foreign_keys=ON")
    conn.executescript("""
        CREATE TABLE authors(id INTEGER PRIMARY KEY, name TEXT NOT NULL);
        CREATE TABLE books(id INTEGER PRIMARY KEY,
                           author_id INTEGER NOT NULL REFERENCES authors(id) ON DELETE CASCADE,
                           title TEXT);
        CREATE TABLE reviews(book_id INTEGER REFERENCES books(id) ON DELETE CASCADE,
                             stars INTEGER);
        CREATE INDEX books_author ON books(author_id);
    """)
    conn.executemany("INSERT INTO authors VALUES (?, ?)", [(i, f"author {i}") for i in range(1, 11)])
    conn.executemany("INSERT INTO books VALUES (?, ?, ?)",
                     [(i, 1 + i % 10, f"book {i}") for i in range(1, 41)])
    conn.executemany("INSERT INTO reviews VALUES (?, ?)", [(1 + i % 40, i % 5) for i in range(60)])
    conn.commit()
    conn.close()


FK_MIGRATION = """
def slug(row):
    return {"slug": row["name"].replace(" ", "-")}

migration = Migration(id="0001_shape", steps=[
    AddColumn("authors", "slug", "TEXT"),
    Backfill("authors", slug, reads=["name"], writes=["slug"], batch_size=4),
])
"""


@pytest.fixture(params=["default", "foreign_keys_on_by_default"])
def fk_build(request, monkeypatch):
    """Also run as if SQLite were built with SQLITE_DEFAULT_FOREIGN_KEYS=1, so every
    connection the tool opens enforces foreign keys."""
    if request.param == "foreign_keys_on_by_default":
        real_connect = sqlite3.connect

        def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
            conn = real_connect(*args, **kwargs)
            conn.execute("PRAGMA foreign_keys=ON")
            return conn

        monkeypatch.setattr(sqlite3, "connect", connect)
        monkeypatch.setattr(sqlite3.dbapi2, "connect", connect)
    return request.param


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_foreign_key_children_survive(tmp_path, strategy, fk_build):
    db = tmp_path / "app.db"
    build_foreign_keys(db)
    write_migration(tmp_path, FK_MIGRATION)
    # the application is connected with foreign keys enforced the whole time
    app = sqlite3.connect(db)
    app.execute("PRAGMA foreign_keys=ON")
    try:
        def check(before):
            assert rows(db, "SELECT id, slug FROM authors ORDER BY id") == [
                (i, f"author-{i}") for i in range(1, 11)]
            untouched(before, db, "authors", {"slug"})
            assert app.execute("SELECT count(*) FROM books").fetchone() == (40,)

        run_and_roll_back(tmp_path, db, strategy, after_run=check)
        assert app.execute("SELECT count(*) FROM books").fetchone() == (40,)
        assert app.execute("SELECT count(*) FROM reviews").fetchone() == (60,)
        assert app.execute("PRAGMA foreign_key_check").fetchall() == []
        # the cascade still works for the application after the rollback
        app.execute("DELETE FROM authors WHERE id = 1")
        assert app.execute("SELECT count(*) FROM books WHERE author_id = 1").fetchone() == (0,)
        app.rollback()
    finally:
        app.close()


# -- (h) no primary key: refused, with a hint, before any change ---------------------------------
def test_table_without_primary_key_is_refused_before_any_change(tmp_path):
    db = tmp_path / "app.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE log(at TEXT, message TEXT)")
    conn.executemany("INSERT INTO log VALUES (?, ?)", [(f"t{i}", f"m{i}") for i in range(10)])
    conn.commit()
    conn.close()
    write_migration(tmp_path, """
        def size(row):
            return {"size": len(row["message"])}

        migration = Migration(id="0001_shape", steps=[
            AddColumn("log", "size", "INTEGER"),
            Backfill("log", size, reads=["message"], writes=["size"]),
        ])
    """)
    before = capture(db)
    with migrator(tmp_path, db) as m, pytest.raises(MigrationFileError) as err:
        m.run()
    assert "log" in err.value.message and "primary key" in err.value.message
    assert "primary key" in err.value.hint
    # nothing changed: no column added, nothing to roll back
    assert_same_state(before, capture(db))
    assert [r[1] for r in rows(db, "PRAGMA table_info(log)")] == ["at", "message"]


# -- (i) AUTOINCREMENT: the sqlite_sequence counter comes back ----------------------------------
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_autoincrement_counter_preserved(tmp_path, strategy):
    db = tmp_path / "app.db"
    conn = sqlite3.connect(db)
    conn.executescript("""
        CREATE TABLE tickets(id INTEGER PRIMARY KEY AUTOINCREMENT, title TEXT, status TEXT);
        CREATE TABLE counters(id INTEGER PRIMARY KEY AUTOINCREMENT, v INTEGER);
    """)
    conn.executemany("INSERT INTO tickets(title, status) VALUES (?, ?)",
                     [(f"t{i}", "open" if i % 2 else "closed") for i in range(50)])
    conn.execute("DELETE FROM tickets WHERE id > 40")  # the counter stays at 50
    conn.executemany("INSERT INTO counters(v) VALUES (?)", [(i,) for i in range(7)])
    conn.commit()
    conn.close()
    write_migration(tmp_path, """
        def flag(row):
            return {"status": row["status"].upper()}

        migration = Migration(id="0001_shape", steps=[
            Backfill("tickets", flag, reads=["status"], writes=["status"], batch_size=6),
        ])
    """)
    assert rows(db, "SELECT name, seq FROM sqlite_sequence ORDER BY name") == [
        ("counters", 7), ("tickets", 50)]

    def check(before):
        assert {s for (s,) in rows(db, "SELECT status FROM tickets")} == {"OPEN", "CLOSED"}
        untouched(before, db, "tickets", {"status"})

    run_and_roll_back(tmp_path, db, strategy, after_run=check)
    assert rows(db, "SELECT name, seq FROM sqlite_sequence ORDER BY name") == [
        ("counters", 7), ("tickets", 50)]
    conn = sqlite3.connect(db)
    conn.execute("INSERT INTO tickets(title) VALUES ('next')")
    assert conn.execute("SELECT max(id) FROM tickets").fetchone() == (51,)
    conn.close()


# -- the journal is never part of the user's tables ---------------------------------------------
def test_journal_tables_never_in_user_digests_or_fingerprints(tmp_path):
    db = tmp_path / "app.db"
    build_composite(db)
    write_migration(tmp_path, COMPOSITE_MIGRATION)
    with migrator(tmp_path, db, batch_size=4) as m:
        (result,) = m.run()
        assert result.status == "completed"
        with m.dialect.engine.connect() as conn:
            every = [r[0] for r in conn.exec_driver_sql(
                "SELECT name FROM sqlite_master WHERE type='table'")]
            assert any(n.startswith("safemigrate_shadow_") for n in every)  # the shadow copy
            assert any(n.startswith("safemigrate_") for n in every)
            tables = m.dialect.user_tables(conn)
            fingerprint = m.dialect.schema_fingerprint(conn, tables)
            digests = database_digest(conn, tables)
        run = m.journal.run(result.run_id)
    assert tables == ["players", "scores"]
    assert sorted(fingerprint) == sorted(digests) == tables
    for table in tables:
        assert not any("safemigrate" in (obj[1] + obj[2]) for obj in fingerprint[table]["objects"])
    assert not [t for t in run["baseline"]["digests"] if t.startswith("safemigrate_")]
    assert not [t for t in run["baseline"]["schema"] if t.startswith("safemigrate_")]
    (manifest,) = (tmp_path / "b").glob("*.json")
    assert not [t for t in json.loads(manifest.read_text())["tables"] if t.startswith("safemigrate_")]
    # and the state captured for comparisons ignores the journal as well
    state = capture(db)
    assert not [r for r in state["master"] if "safemigrate" in r[1] or "safemigrate" in r[2]]
