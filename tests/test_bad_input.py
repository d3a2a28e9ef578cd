"""Invariant 7: bad input gets one clear `error: ... (hint: ...)` line, a documented non-zero exit
code, and leaves the database as it was (byte-identical whenever nothing needs to be written)."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import safemigrate.backup
from conftest import CARDS_MIGRATIONS, assert_one_error_line, cli, digest_db, file_sha256, query
from safemigrate import DiskFullError
from safemigrate.migrator import Migrator
from safemigrate.settings import Settings

ROWS = 600


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def db(make_cards_db) -> Path:
    return make_cards_db(ROWS, bad_rate=0.02)


# -- the database itself ------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["run", "plan", "status", "verify", "history"])
def test_missing_database_file(tmp_path: Path, command: str) -> None:
    missing = tmp_path / "nope.db"
    proc = cli(command, "--db", missing, "--migrations", CARDS_MIGRATIONS, cwd=tmp_path)
    line = assert_one_error_line(proc, 1, tmp_path, command)  # DatabaseError: exit 1
    assert "does not exist" in line
    assert not missing.exists(), "safemigrate must never create the target database"
    assert not (tmp_path / ".safemigrate").exists()


@pytest.mark.parametrize("command", ["run", "plan", "status"])
def test_not_a_sqlite_file(tmp_path: Path, command: str) -> None:
    bogus = tmp_path / "notes.db"
    bogus.write_text("these are my notes, not a database\n" * 200)
    before = file_sha256(bogus)
    proc = cli(command, "--db", bogus, "--migrations", CARDS_MIGRATIONS, cwd=tmp_path)
    line = assert_one_error_line(proc, 1, tmp_path, command)  # NotADatabaseError: exit 1
    assert "not a SQLite database" in line
    assert file_sha256(bogus) == before


def test_directory_as_database(tmp_path: Path) -> None:
    folder = tmp_path / "dir.db"
    folder.mkdir()
    proc = cli("run", "--db", folder, "--migrations", CARDS_MIGRATIONS, cwd=tmp_path)
    assert_one_error_line(proc, 1, tmp_path, "run")
    assert list(folder.iterdir()) == []


# -- migration files ----------------------------------------------------------------------------
BAD_MIGRATIONS = {
    "syntax_error": """\
        from safemigrate import AddColumn, Migration

        migration = Migration(id="0001_bad", steps=[AddColumn("cards", "x", "TEXT")
        """,
    "no_migration": """\
        from safemigrate import AddColumn

        step = AddColumn("cards", "x", "TEXT")
        """,
    "backfill_without_writes": """\
        from safemigrate import AddColumn, Backfill, Migration

        def f(row):
            return {}

        migration = Migration(id="0001_bad", steps=[
            AddColumn("cards", "x", "TEXT"),
            Backfill("cards", f, reads=["front_content"], writes=[]),
        ])
        """,
    "import_error": """\
        import a_module_that_does_not_exist_anywhere
        """,
    "not_a_step": """\
        from safemigrate import Migration

        migration = Migration(id="0001_bad", steps=["ALTER TABLE cards ADD COLUMN x TEXT"])
        """,
}


@pytest.mark.parametrize("command", ["run", "plan"])
@pytest.mark.parametrize("kind", sorted(BAD_MIGRATIONS))
def test_malformed_migration_file(db: Path, tmp_path: Path, kind: str, command: str) -> None:
    write(tmp_path / "migrations" / "0001_bad.py", BAD_MIGRATIONS[kind])
    before = file_sha256(db)
    proc = cli(command, "--db", db, "--migrations", tmp_path / "migrations", cwd=tmp_path)
    line = assert_one_error_line(proc, 2, tmp_path, command)
    assert "0001_bad.py" in line
    assert file_sha256(db) == before, "a broken migration file must not touch the database"
    assert not list((tmp_path / ".safemigrate").glob("**/*.db"))


def test_bad_migration_file_name(db: Path, tmp_path: Path) -> None:
    write(tmp_path / "migrations" / "add_x.py", BAD_MIGRATIONS["no_migration"])
    before = file_sha256(db)
    proc = cli("run", "--db", db, "--migrations", tmp_path / "migrations", cwd=tmp_path)
    line = assert_one_error_line(proc, 2, tmp_path, "run")
    assert "NNNN_name.py" in line
    assert file_sha256(db) == before


def test_missing_migrations_folder(db: Path, tmp_path: Path) -> None:
    before = file_sha256(db)
    proc = cli("run", "--db", db, "--migrations", tmp_path / "nowhere", cwd=tmp_path)
    assert_one_error_line(proc, 2, tmp_path, "run")
    assert file_sha256(db) == before


def test_migration_edited_after_it_was_applied(db: Path, tmp_path: Path) -> None:
    folder = tmp_path / "migrations"
    shutil.copytree(CARDS_MIGRATIONS, folder, ignore=shutil.ignore_patterns("__pycache__"))
    done = cli("run", "--db", db, "--migrations", folder, "--workers", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    path = folder / "0001_cards_v3.py"
    path.write_text(path.read_text() + "\n# a harmless-looking edit\n")

    dump_before = list(sqlite3.connect(db).iterdump())
    sha_before = file_sha256(db)
    for command in ("plan", "status", "verify"):
        # read-only commands report (or refuse) without writing a byte
        cli(command, "--db", db, "--migrations", folder, cwd=tmp_path)
        assert file_sha256(db) == sha_before, command
    proc = cli("run", "--db", db, "--migrations", folder, cwd=tmp_path)
    line = assert_one_error_line(proc, 2, tmp_path, "run")
    assert "edited" in line and "0001_cards_v3" in line
    proc = cli("rollback", "--yes", "--db", db, "--migrations", folder, cwd=tmp_path)
    assert_one_error_line(proc, 2, tmp_path, "rollback")
    proc = cli("plan", "--db", db, "--migrations", folder, cwd=tmp_path)
    assert_one_error_line(proc, 2, tmp_path, "plan")
    # nothing changed: every table, journal included, holds exactly what it held before
    assert list(sqlite3.connect(db).iterdump()) == dump_before


# -- URLs and configuration ---------------------------------------------------------------------
@pytest.mark.parametrize("url", ["foo://x", "foo://user:pw@host/db", "mongodb://localhost/cards"])
def test_wrong_url_scheme(tmp_path: Path, url: str) -> None:
    proc = cli("run", "--db", url, "--migrations", CARDS_MIGRATIONS, cwd=tmp_path)
    line = assert_one_error_line(proc, 2, tmp_path, "run")
    assert "scheme" in line
    assert ":pw@" not in proc.stdout + proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_no_database_given(tmp_path: Path) -> None:
    proc = cli("run", "--migrations", CARDS_MIGRATIONS, cwd=tmp_path)
    line = assert_one_error_line(proc, 2, tmp_path, "run")
    assert "--db" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("config, words", [
    ("batch_size = -1\n", "batch_size"),
    ("batch_size = \"many\"\n", "batch_size"),
    ("workers = 0\n", "workers"),
    ("lock_timeout = -5\n", "lock_timeout"),
    ("bach_size = 100\n", "bach_size"),
    ("batch_size = = 3\n", "TOML"),
])
def test_bad_config_value(db: Path, tmp_path: Path, config: str, words: str) -> None:
    (tmp_path / "safemigrate.toml").write_text(config)
    before = file_sha256(db)
    for command in ("run", "status"):
        proc = cli(command, "--db", db, "--migrations", CARDS_MIGRATIONS, cwd=tmp_path)
        line = assert_one_error_line(proc, 2, tmp_path, command)
        assert words in line
    assert file_sha256(db) == before


@pytest.mark.parametrize("option", [("--batch-size", "-1"), ("--workers", "0"), ("--batch-size", "0")])
def test_bad_option_value(db: Path, tmp_path: Path, option: tuple[str, str]) -> None:
    before = file_sha256(db)
    proc = cli("run", "--db", db, "--migrations", CARDS_MIGRATIONS, *option, cwd=tmp_path)
    assert_one_error_line(proc, 2, tmp_path, "run")
    assert file_sha256(db) == before


# -- a locked database --------------------------------------------------------------------------
@pytest.mark.parametrize("begin", ["BEGIN IMMEDIATE", "BEGIN EXCLUSIVE"])
def test_locked_database(db: Path, tmp_path: Path, begin: str) -> None:
    """Another connection holds a write lock (IMMEDIATE: readers still pass; EXCLUSIVE: even
    reads wait). No CLI flag sets the lock timeout, so safemigrate.toml does."""
    (tmp_path / "safemigrate.toml").write_text("lock_timeout = 1\n")
    before = file_sha256(db)
    holder = sqlite3.connect(db, isolation_level=None)
    try:
        holder.execute(begin)
        holder.execute("UPDATE folders SET name = name || ' (being edited)' WHERE id = 1")
        started = time.monotonic()
        proc = cli("run", "--db", db, "--migrations", CARDS_MIGRATIONS, "--workers", "1", cwd=tmp_path)
        elapsed = time.monotonic() - started
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    line = assert_one_error_line(proc, 1, tmp_path, "run")  # DatabaseLockedError: exit 1
    assert "locked" in line
    assert elapsed < 8, f"lock_timeout = 1 was not honoured ({elapsed:.1f}s)"
    assert file_sha256(db) == before
    assert not list(tmp_path.glob(".safemigrate/backups/*.db"))


# -- a full disk --------------------------------------------------------------------------------
@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    mountpoint = tmp_path / "tiny"
    mountpoint.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mountpoint)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a 200 KB tmpfs here (needs root and mount rights): "
                    f"{mount.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


def test_full_disk_during_backup_cli(make_cards_db, tmp_path: Path, tiny_fs: Path) -> None:
    db = make_cards_db(3000)  # ~1 MB: bigger than the 200 KB file system
    assert db.stat().st_size > 200 * 1024
    original = digest_db(db)
    proc = cli("run", "--db", db, "--migrations", CARDS_MIGRATIONS, "--backup-dir", tiny_fs,
               cwd=tmp_path)
    line = assert_one_error_line(proc, 1, tmp_path, "run")  # DiskFullError: exit 1
    assert "MB" in line or "full" in line
    assert list(tiny_fs.iterdir()) == [], "no snapshot (or temp file) may be left behind"
    assert digest_db(db) == original
    # the failed attempt is in the journal, and nothing was marked as started
    assert query(db, "SELECT status FROM safemigrate_runs") == [("failed",)]
    assert query(db, "SELECT count(*) FROM safemigrate_steps WHERE status != 'pending'") == [(0,)]


def test_full_disk_while_writing_snapshot(make_cards_db, tmp_path: Path, tiny_fs: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The free-space estimate says yes, the file system says no half-way: ENOSPC mid-copy."""
    db = make_cards_db(3000)
    original = digest_db(db)
    monkeypatch.setattr(safemigrate.backup, "check_free_space", lambda directory, needed: None)
    settings = Settings(db=str(db), migrations=CARDS_MIGRATIONS, backup_dir=tiny_fs, workers=1)
    with Migrator(settings) as m, pytest.raises(DiskFullError) as info:
        m.run()
    assert info.value.hint
    assert list(tiny_fs.iterdir()) == []
    assert digest_db(db) == original


def test_full_disk_during_backup_library(make_cards_db, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    db = make_cards_db(ROWS)
    original = digest_db(db)
    backups = tmp_path / "backups"

    def tiny(path: object) -> tuple[int, int, int]:
        return shutil._ntuple_diskusage(10**9, 10**9 - 4096, 4096)  # type: ignore[attr-defined]

    monkeypatch.setattr(safemigrate.backup.shutil, "disk_usage", tiny)
    settings = Settings(db=str(db), migrations=CARDS_MIGRATIONS, backup_dir=backups, workers=1)
    with Migrator(settings) as m, pytest.raises(DiskFullError) as info:
        m.run()
    assert "MB" in info.value.message
    assert "backup-dir" in info.value.hint
    assert not backups.exists() or list(backups.iterdir()) == []
    assert digest_db(db) == original
    assert query(db, "SELECT status FROM safemigrate_runs") == [("failed",)]
