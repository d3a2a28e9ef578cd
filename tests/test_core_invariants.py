"""The product's promises, checked through the library on real SQLite files."""

from __future__ import annotations

import json
import sqlite3
import stat
import textwrap
from pathlib import Path
from typing import Any

import pytest

import safemigrate.backup
from conftest import CARDS_MIGRATIONS, digest_db, query
from safemigrate import BackupError, MigrationFileError
from safemigrate.backup import sha256_file, verify_backup_record
from safemigrate.examples.cards.transform import WRITES, optimize_card
from safemigrate.migrator import Migrator
from safemigrate.settings import Settings

V2_COLUMNS = ["id", "folder_id", "front_content", "back_content", "style", "created_at", "updated_at"]


def settings(db: Path, tmp_path: Path, migrations: Path = CARDS_MIGRATIONS, **extra: Any) -> Settings:
    extra.setdefault("workers", 1)
    extra.setdefault("batch_size", 250)
    return Settings(db=str(db), migrations=migrations, backup_dir=tmp_path / "backups", **extra)


def migrate(db: Path, tmp_path: Path, **extra: Any) -> Any:
    with Migrator(settings(db, tmp_path, **extra)) as m:
        (result,) = m.run()
    return result


def write_migration(folder: Path, name: str, source: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(source))
    return path


def rows_by_id(db: Path, table: str = "cards") -> dict[Any, dict[str, Any]]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return {r["id"]: dict(r) for r in conn.execute(f"SELECT * FROM {table}")}
    finally:
        conn.close()


def expected_outcome(rows: dict[int, dict[str, Any]]) -> tuple[dict[int, dict[str, Any]], set[int]]:
    good, bad = {}, set()
    for card_id, row in rows.items():
        try:
            good[card_id] = dict(optimize_card(
                {k: row[k] for k in ("id", "front_content", "back_content", "style")}))
        except Exception:  # noqa: BLE001 - the card is malformed
            bad.add(card_id)
    return good, bad


# -- invariant 3 and 4: quarantine, nothing silently skipped, undeclared columns untouched --------
def test_malformed_rows_are_quarantined_counted_and_untouched(make_cards_db, tmp_path: Path) -> None:
    db = make_cards_db(2000, bad_rate=0.02)
    before_rows = rows_by_id(db)
    good, bad = expected_outcome(before_rows)
    assert len(bad) == 40
    before_cards = digest_db(db, ["cards"])["tables"]["cards"]
    before_folders = digest_db(db, ["folders"])["tables"]["folders"]

    result = migrate(db, tmp_path)

    assert result.status == "completed"
    assert result.rows == 2000
    assert result.quarantined == len(bad)
    quarantined = query(db, "SELECT pk, row_data, error, table_name FROM safemigrate_quarantine "
                            "WHERE run_id = ?", (result.run_id,))
    keys = [json.loads(pk)[0] for pk, *_ in quarantined]
    assert sorted(keys) == sorted(bad), "every malformed row is quarantined exactly once"
    for pk, row_data, error, table in quarantined:
        card_id = json.loads(pk)[0]
        assert table == "cards"
        assert error.strip(), "a quarantined row carries its error"
        kept = json.loads(row_data)
        assert kept["front_content"] == before_rows[card_id]["front_content"]
        assert kept["back_content"] == before_rows[card_id]["back_content"]

    after_rows = rows_by_id(db)
    assert set(after_rows) == set(before_rows), "no row dropped or added"
    for card_id, row in after_rows.items():
        assert {c: row[c] for c in V2_COLUMNS} == {c: before_rows[card_id][c] for c in V2_COLUMNS}
        new = {c: row[c] for c in WRITES}
        if card_id in bad:
            assert set(new.values()) == {None}, f"quarantined card {card_id} was modified"
        else:
            assert new == good[card_id], f"card {card_id} was not migrated correctly"

    # digests of the columns the migration does not declare as written: bit-for-bit equal
    after_cards = digest_db(db, ["cards"])["tables"]["cards"]
    assert after_cards["rows"] == before_cards["rows"]
    for column in V2_COLUMNS:
        assert after_cards["columns"][column] == before_cards["columns"][column], column
    assert digest_db(db, ["folders"])["tables"]["folders"] == before_folders
    steps = query(db, "SELECT rows_done, rows_quarantined, rows_total FROM safemigrate_steps "
                      "WHERE run_id = ? AND kind = 'backfill'", (result.run_id,))
    assert steps == [(2000, len(bad), 2000)]


# -- invariant 1: a verified, private backup before anything changes --------------------------------
def test_snapshot_is_private_and_verifies(make_cards_db, tmp_path: Path) -> None:
    db = make_cards_db(1500, bad_rate=0.01)
    original = digest_db(db)
    result = migrate(db, tmp_path)
    with Migrator(settings(db, tmp_path)) as m:
        records = m.journal.backups(result.run_id, kind="snapshot")
        assert len(records) == 1
        record = records[0]
        assert record["status"] == "verified"
        path = Path(record["location"])
        verify_backup_record(m.dialect, record)  # checksum, integrity, digests vs manifest
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.with_suffix(".json").stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) & 0o077 == 0, "backup folder is private"
    assert sha256_file(path) == record["sha256"]
    assert digest_db(path) == original, "the snapshot holds the pre-migration database"
    assert not list(path.parent.glob(".*.tmp")), "no temporary file left behind"


def test_nothing_changes_before_a_verified_backup(make_cards_db, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    db = make_cards_db(800, bad_rate=0.02)
    original = digest_db(db)

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise BackupError("snapshot does not verify (simulated)")

    monkeypatch.setattr(safemigrate.backup, "verify_snapshot_file", refuse)
    with Migrator(settings(db, tmp_path)) as m, pytest.raises(BackupError):
        m.run()
    assert digest_db(db) == original, "schema or data changed without a verified backup"
    assert not list((tmp_path / "backups").glob("*.db")), "an unverified snapshot was kept"
    assert not list((tmp_path / "backups").glob(".*.tmp"))
    assert query(db, "SELECT count(*) FROM safemigrate_steps WHERE status != 'pending'") == [(0,)]
    assert query(db, "SELECT status FROM safemigrate_runs") == [("failed",)]
    assert query(db, "SELECT count(*) FROM sqlite_master WHERE name LIKE 'safemigrate_shadow_%'") == [(0,)]
    # and once backups work again, the same migration runs from the start
    monkeypatch.undo()
    with Migrator(settings(db, tmp_path)) as m:
        results = m.run()
    assert [r.status for r in results] == ["completed"]


def test_restore_from_a_corrupted_snapshot_is_refused(make_cards_db, tmp_path: Path) -> None:
    db = make_cards_db(800, bad_rate=0.02)
    result = migrate(db, tmp_path)
    migrated = digest_db(db)
    snapshot = Path(query(db, "SELECT location FROM safemigrate_backups WHERE kind = 'snapshot'")[0][0])
    data = bytearray(snapshot.read_bytes())
    data[len(data) // 2] ^= 0xFF
    snapshot.write_bytes(bytes(data))
    with Migrator(settings(db, tmp_path)) as m, pytest.raises(BackupError) as info:
        m.rollback(result.run_id, strategy="restore")
    assert "corrupted" in info.value.message
    assert digest_db(db) == migrated, "a refused restore must not change anything"
    assert query(db, "SELECT status FROM safemigrate_runs") == [("completed",)]


# -- refusals with a hint ----------------------------------------------------------------------------
NO_PK_MIGRATION = """\
    from safemigrate import AddColumn, Backfill, Migration

    def length(row):
        return {"body_length": len(row["body"])}

    migration = Migration(
        id="0001_note_lengths",
        steps=[
            AddColumn("notes", "body_length", "INTEGER"),
            Backfill("notes", length, reads=["body"], writes=["body_length"]),
        ],
    )
"""


def test_table_without_primary_key_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "notes.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE notes (body TEXT NOT NULL, author TEXT)")
    conn.executemany("INSERT INTO notes VALUES (?, ?)", [(f"note {i}", "ann") for i in range(300)])
    conn.commit()
    conn.close()
    original = digest_db(db)
    folder = tmp_path / "migrations"
    write_migration(folder, "0001_note_lengths.py", NO_PK_MIGRATION)
    with Migrator(settings(db, tmp_path, migrations=folder)) as m, \
            pytest.raises(MigrationFileError) as info:
        m.run()
    assert "primary key" in info.value.message
    assert "primary key" in info.value.hint
    assert digest_db(db) == original, "the refusal must come before any change"


# -- composite primary keys ---------------------------------------------------------------------------
COMPOSITE_MIGRATION = """\
    from safemigrate import AddColumn, Backfill, Migration

    POINTS = {"A": 4, "B": 3, "C": 2, "D": 1, "F": 0}

    def normalize(row):
        grade = row["grade"].strip().upper()  # NULL grade: AttributeError, quarantined
        return {"grade": grade, "points": POINTS[grade] * 10 + row["course"] % 10,
                "key_echo": f"{row['student']}/{row['course']}"}

    migration = Migration(
        id="0001_grades",
        steps=[
            AddColumn("enrollments", "points", "INTEGER"),
            AddColumn("enrollments", "key_echo", "TEXT"),
            Backfill("enrollments", normalize, reads=["student", "course", "grade"],
                     writes=["grade", "points", "key_echo"]),
        ],
    )
"""
POINTS = {"A": 4, "B": 3, "C": 2, "D": 1, "F": 0}


def make_enrollments(db: Path) -> dict[tuple[str, int], str | None]:
    rows: dict[tuple[str, int], str | None] = {}
    for s in range(300):
        student = f"student-{s % 37:02d}-{s}" if s % 3 else f"é{s}"
        for course in (101, 7, 55, 999, 12)[: 2 + s % 4]:
            grade = None if (s * course) % 97 == 0 else " abcdf"[1 + (s + course) % 5]
            rows[(student, course)] = f" {grade} " if grade and s % 2 else grade
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE enrollments (student TEXT NOT NULL, course INTEGER NOT NULL, "
                 "grade TEXT, note TEXT, PRIMARY KEY (course, student))")
    conn.executemany("INSERT INTO enrollments VALUES (?, ?, ?, ?)",
                     [(s, c, g, f"n{c}") for (s, c), g in rows.items()])
    conn.commit()
    conn.close()
    return rows


@pytest.mark.parametrize("workers", [1, 2])
def test_composite_primary_key_backfill_and_rollback(tmp_path: Path, workers: int) -> None:
    db = tmp_path / "school.db"
    source = make_enrollments(db)
    assert len(source) > 700
    original = digest_db(db)
    folder = tmp_path / "migrations"
    write_migration(folder, "0001_grades.py", COMPOSITE_MIGRATION)
    cfg = settings(db, tmp_path, migrations=folder, workers=workers, batch_size=37)
    with Migrator(cfg) as m:
        (result,) = m.run()
    bad = {k for k, g in source.items() if g is None}
    assert bad, "the fixture must contain rows to quarantine"
    assert result.rows == len(source)
    assert result.quarantined == len(bad)
    conn = sqlite3.connect(db)
    after = {(s, c): (g, p, e, n) for s, c, g, p, e, n in
             conn.execute("SELECT student, course, grade, points, key_echo, note FROM enrollments")}
    quarantined = {tuple(json.loads(pk)) for (pk,) in
                   conn.execute("SELECT pk FROM safemigrate_quarantine WHERE run_id = ?", (result.run_id,))}
    conn.close()
    assert set(after) == set(source)
    # the journal keeps keys in primary-key column order: (course, student)
    assert quarantined == {(c, s) for s, c in bad}
    for (student, course), grade in source.items():
        got = after[(student, course)]
        assert got[3] == f"n{course}"
        if grade is None:
            assert got[:3] == (None, None, None)
        else:
            g = grade.strip().upper()
            assert got[:3] == (g, POINTS[g] * 10 + course % 10, f"{student}/{course}")
    with Migrator(cfg) as m:
        m.rollback(result.run_id)
    assert digest_db(db) == original, "the shadow copy restores composite-key rows exactly"


# -- worker count does not change the result ----------------------------------------------------------
def test_one_or_two_workers_give_identical_results(make_cards_db, tmp_path: Path) -> None:
    digests, quarantines = [], []
    for workers in (1, 2):
        db = make_cards_db(6000, bad_rate=0.02, seed=11, name=f"cards-{workers}.db")
        result = migrate(db, tmp_path / f"w{workers}", workers=workers, batch_size=250)
        assert result.rows == 6000
        digests.append(digest_db(db))
        quarantines.append(sorted(pk for (pk,) in query(db, "SELECT pk FROM safemigrate_quarantine")))
    assert digests[0] == digests[1]
    assert quarantines[0] == quarantines[1]
    assert len(quarantines[0]) == 120
