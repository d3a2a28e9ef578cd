"""Pre-migration checks: each check passes on a healthy database and fails on one arranged for
it; the report, its JSON, exit codes, timeouts, crashes, skips (journaled) and the runner's
refusal to change anything when not ready."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import safemigrate.checks as checks
from conftest import CARDS_MIGRATIONS, assert_one_error_line, cli, digest_db, query
from safemigrate import ConfigError, DiskFullError, NotReadyError
from safemigrate.checks import CheckReport, latency_verdict, preflight
from safemigrate.lock import RunLock
from safemigrate.migrator import Migrator
from safemigrate.settings import Settings

ROWS = 1500


def settings(db: Path, tmp_path: Path, migrations: Path = CARDS_MIGRATIONS, **sections: Any) -> Settings:
    return Settings(db=str(db), migrations=migrations, backup_dir=tmp_path / "backups", workers=1,
                    sections=sections)


def report_for(db: Path, tmp_path: Path, migrations: Path = CARDS_MIGRATIONS, *, full: bool = False,
               **sections: Any) -> CheckReport:
    with Migrator(settings(db, tmp_path, migrations, **sections)) as m:
        return preflight(m, full=full)


def outcome(report: CheckReport, name: str) -> checks.CheckOutcome:
    return next(c for c in report.checks if c.name == name)


def write_migration(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(body))
    return path


@pytest.fixture
def db(make_cards_db) -> Path:
    return make_cards_db(ROWS, bad_rate=0.02)


# -- the healthy case ----------------------------------------------------------------------------
def test_healthy_database_is_ready_and_every_check_reports(db: Path, tmp_path: Path) -> None:
    report = report_for(db, tmp_path)
    names = [c.name for c in report.checks]
    assert names[:6] == ["database", "migration-state", "disk-space", "cpu-load", "memory",
                         "backup-destinations"]
    for name in ("integrity", "foreign-keys", "indexes", "sample:0001_cards_v3#6", "lock", "activity"):
        assert name in names
    assert "latency" not in names, "an embedded database has no network round trips"
    assert report.ready, [(c.name, c.details) for c in report.checks if c.verdict == "failed"]
    for c in report.checks:
        assert c.verdict in checks.VERDICTS
        assert c.category in checks.CATEGORIES
        assert c.seconds >= 0
        if c.verdict in ("failed", "warning"):
            assert c.hint, c.name
    assert "SQLite 3." in outcome(report, "database").details
    assert "1 pending: 0001_cards_v3" in outcome(report, "migration-state").details
    sample = outcome(report, "sample:0001_cards_v3#6")
    assert sample.verdict == "warning"  # 2% of the cards are malformed: quarantined, not a failure
    assert sample.data["rows"] == 1000 and 0 < sample.data["would_quarantine"] < 100
    assert sample.data["examples"] and all("error" in e and e["key"] for e in sample.data["examples"])
    assert "would be quarantined" in sample.details


def test_check_command_table_json_and_exit_code(db: Path, tmp_path: Path) -> None:
    before = digest_db(db)
    proc = cli("check", "--db", db, "-m", CARDS_MIGRATIONS, "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["ready"] is True
    assert {"checks", "recommendations", "counts", "timestamp", "database"} <= set(data)
    first = data["checks"][0]
    assert {"name", "verdict", "details", "seconds", "hint", "category", "required"} <= set(first)
    proc = cli("check", "--db", db, "-m", CARDS_MIGRATIONS, cwd=tmp_path)
    assert proc.returncode == 0 and "ready" in proc.stdout and "sample:0001_cards_v3#6" in proc.stdout
    assert digest_db(db) == before
    assert not (tmp_path / ".safemigrate").exists(), "check writes nothing"
    assert query(db, "SELECT count(*) FROM sqlite_master WHERE name LIKE 'safemigrate_%'") == [(0,)]


def test_full_check_runs_every_row_and_counts_exactly(make_cards_db, tmp_path: Path) -> None:
    db = make_cards_db(2500, bad_rate=0.04)
    expected = round(2500 * 0.04)
    report = report_for(db, tmp_path, full=True)
    sample = outcome(report, "sample:0001_cards_v3#6")
    assert sample.data["rows"] == 2500 and sample.data["full"] is True
    assert sample.data["would_quarantine"] == expected
    assert outcome(report, "integrity").details.startswith("full integrity check")


# -- environment -------------------------------------------------------------------------------------
def fake_disk(free: int) -> Any:
    def usage(path: object) -> Any:
        return shutil._ntuple_diskusage(10**12, 10**12 - free, free)  # type: ignore[attr-defined]
    return usage


def test_disk_space_fails_when_full_and_run_changes_nothing(db: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    assert outcome(report_for(db, tmp_path), "disk-space").verdict == "passed"
    monkeypatch.setattr(shutil, "disk_usage", fake_disk(100_000))
    report = report_for(db, tmp_path)
    disk = outcome(report, "disk-space")
    assert disk.verdict == "failed" and not report.ready
    assert "backup folder" in disk.details and "MB" in disk.details
    before = digest_db(db)
    with Migrator(settings(db, tmp_path)) as m, pytest.raises(DiskFullError) as info:
        m.run()
    assert "--backup-dir" in info.value.hint
    assert digest_db(db) == before
    assert not (tmp_path / "backups").exists() or not list((tmp_path / "backups").iterdir())


def test_disk_factor_comes_from_the_checks_section(db: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    size = db.stat().st_size
    monkeypatch.setattr(shutil, "disk_usage", fake_disk(int(size * 2)))
    assert outcome(report_for(db, tmp_path), "disk-space").verdict == "failed"  # default 3 x
    assert outcome(report_for(db, tmp_path, checks={"disk_factor": 1.5}), "disk-space").verdict == "passed"


def test_database_folder_is_checked_too(db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The backup folder on a roomy disk does not hide a full disk under the database."""
    backups = tmp_path / "roomy"
    backups.mkdir()
    real_usage, real_stat = shutil.disk_usage, os.stat

    def usage(path: Any) -> Any:
        return fake_disk(1000)(path) if Path(path) == db.parent else real_usage(path)

    def stat(path: Any, *args: Any, **kwargs: Any) -> Any:
        result = real_stat(path, *args, **kwargs)
        if Path(path) == db.parent:  # the database folder on a device of its own
            values = list(result)
            values[2] = result.st_dev + 1
            return os.stat_result(values)
        return result

    monkeypatch.setattr(shutil, "disk_usage", usage)
    monkeypatch.setattr(os, "stat", stat)
    s = Settings(db=str(db), migrations=CARDS_MIGRATIONS, backup_dir=backups, workers=1)
    with Migrator(s) as m:
        disk = outcome(preflight(m), "disk-space")
    assert disk.verdict == "failed"
    assert "database folder" in disk.details and "backup folder" not in disk.details.split(";")[0]


def test_cpu_load_is_advisory_by_default(db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(psutil, "cpu_percent", lambda interval=None: 99.0)
    report = report_for(db, tmp_path)
    cpu = outcome(report, "cpu-load")
    assert cpu.verdict == "warning" and not cpu.required and report.ready
    assert "99%" in cpu.details
    report = report_for(db, tmp_path, checks={"advisory": []})
    assert outcome(report, "cpu-load").verdict == "failed" and not report.ready
    monkeypatch.setattr(psutil, "cpu_percent", lambda interval=None: 10.0)
    assert outcome(report_for(db, tmp_path, checks={"advisory": []}), "cpu-load").verdict == "passed"


def test_memory_above_threshold_fails(db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = psutil.virtual_memory()
    relaxed = report_for(db, tmp_path, checks={"max_memory_percent": 99.9})
    assert outcome(relaxed, "memory").verdict == "passed"
    monkeypatch.setattr(psutil, "virtual_memory", lambda: real._replace(percent=97.0))
    memory = outcome(report_for(db, tmp_path), "memory")
    assert memory.verdict == "failed" and "97%" in memory.details and memory.hint


def test_backup_destination_not_writable(db: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the backup folder should be")
    s = Settings(db=str(db), migrations=CARDS_MIGRATIONS, backup_dir=blocker, workers=1)
    with Migrator(s) as m:
        report = preflight(m)
    dest = outcome(report, "backup-destinations")
    assert dest.verdict == "failed" and "not a folder" in dest.details


def test_offsite_destination_failure_is_a_warning_unless_required(db: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    url = f"file://{blocker}/sub"  # below a regular file: cannot be created
    warn = outcome(report_for(db, tmp_path, backup={"offsite": url}), "backup-destinations")
    assert warn.verdict == "warning" and "layer offsite" in warn.details
    required = report_for(db, tmp_path, backup={"offsite": url, "offsite_required": True})
    assert outcome(required, "backup-destinations").verdict == "failed" and not required.ready
    good = f"file://{tmp_path / 'offsite'}"
    ok = outcome(report_for(db, tmp_path, backup={"offsite": good}), "backup-destinations")
    assert ok.verdict == "passed" and "offsite:" in ok.details


def test_latency_verdicts() -> None:
    assert latency_verdict([1.0, 1.2, 0.9, 1.1, 1.0], 200)[0] == "passed"
    assert latency_verdict([300.0, 310.0, 305.0], 200)[0] == "failed"
    verdict, details = latency_verdict([2.0, 2.1, 1.9, 90.0, 2.0], 200)
    assert verdict == "warning" and "unstable" in details


def test_latency_check_measures_round_trips(db: Path, tmp_path: Path) -> None:
    with Migrator(settings(db, tmp_path)) as m:
        ctx = checks.CheckContext(m, checks.CheckSettings(latency_rounds=4), False, [], [], None, None)
        assert "4 round trips" in checks._latency(ctx)
        slow = checks.CheckContext(m, checks.CheckSettings(max_latency_ms=0.000001), False, [], [],
                                   None, None)
        with pytest.raises(checks.CheckFailed):
            checks._latency(slow)


def test_migration_state_edited_file_and_unfinished_run(db: Path, tmp_path: Path) -> None:
    folder = tmp_path / "migrations"
    path = write_migration(folder, "0001_lengths.py", """\
        from safemigrate import AddColumn, Migration
        migration = Migration(id="0001_lengths", steps=[AddColumn("cards", "note", "TEXT")])
        """)
    with Migrator(settings(db, tmp_path, folder)) as m:
        m.run()
    path.write_text(path.read_text() + "\n# edited after it was applied\n")
    state = outcome(report_for(db, tmp_path, folder), "migration-state")
    assert state.verdict == "failed" and "edited" in state.details
    path.write_text(path.read_text().replace("\n# edited after it was applied\n", ""))
    conn = sqlite3.connect(db)
    conn.execute("UPDATE safemigrate_runs SET status = 'interrupted'")
    conn.commit()
    conn.close()
    state = outcome(report_for(db, tmp_path, folder), "migration-state")
    assert state.verdict == "failed" and "interrupted" in state.details and "resumes" in state.hint


# -- data --------------------------------------------------------------------------------------------
def test_integrity_fails_on_a_damaged_file(make_cards_db, tmp_path: Path) -> None:
    db = make_cards_db(3000)
    page = query(db, "PRAGMA page_size")[0][0]
    root = query(db, "SELECT rootpage FROM sqlite_master WHERE name = 'cards'")[0][0]
    with open(db, "r+b") as handle:  # the table's root page: an interior b-tree page
        handle.seek((root - 1) * page)
        handle.write(b"\x0d" + b"\xff" * 64)
    report = report_for(db, tmp_path)
    integrity = outcome(report, "integrity")
    assert integrity.verdict == "failed" and not report.ready
    assert integrity.details


def corrupt_index(db: Path) -> None:
    """Point the index's definition at another column: its entries no longer match the rows
    (what a torn write or a buggy tool leaves behind); quick_check cannot see it."""
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA writable_schema = ON")
    conn.execute("UPDATE sqlite_master SET sql = 'CREATE INDEX idx_cards_folder_id ON cards(created_at)' "
                 "WHERE name = 'idx_cards_folder_id'")
    conn.commit()
    conn.close()


def test_corrupt_index_is_found(db: Path, tmp_path: Path) -> None:
    assert outcome(report_for(db, tmp_path), "indexes").verdict == "passed"
    corrupt_index(db)
    report = report_for(db, tmp_path)
    indexes = outcome(report, "indexes")
    assert indexes.verdict == "failed" and not report.ready
    assert "idx_cards_folder_id" in indexes.details and "REINDEX" in indexes.hint
    assert outcome(report_for(db, tmp_path, full=True), "integrity").verdict == "failed"


def test_index_presence_for_the_migration(db: Path, tmp_path: Path) -> None:
    folder = tmp_path / "migrations"
    write_migration(folder, "0001_indexes.py", """\
        from safemigrate import CreateIndex, DropIndex, Migration
        migration = Migration(id="0001_indexes", steps=[
            DropIndex("cards", "idx_no_such_index"),
            CreateIndex("cards", ["folder_id"], name="idx_cards_folder_id"),
        ])
        """)
    indexes = outcome(report_for(db, tmp_path, folder), "indexes")
    assert indexes.verdict == "failed"
    assert "idx_no_such_index" in indexes.details and "already exists" in indexes.details


def test_foreign_key_violation(db: Path, tmp_path: Path) -> None:
    assert outcome(report_for(db, tmp_path), "foreign-keys").verdict == "passed"
    conn = sqlite3.connect(db)  # foreign keys are not enforced by default: orphans happen
    conn.execute("UPDATE cards SET folder_id = 99999 WHERE id IN (5, 7)")
    conn.commit()
    conn.close()
    fk = outcome(report_for(db, tmp_path), "foreign-keys")
    assert fk.verdict == "failed"
    assert fk.details.startswith("2 rows") and "folder_id -> folders(id)" in fk.details
    assert "cards rowid 5" in fk.details


def test_sample_fails_when_most_rows_would_be_quarantined(make_cards_db, tmp_path: Path) -> None:
    db = make_cards_db(1200, bad_rate=0.7)
    report = report_for(db, tmp_path)
    sample = outcome(report, "sample:0001_cards_v3#6")
    assert sample.verdict == "failed" and not report.ready
    assert sample.data["examples"] and "would be quarantined" in sample.details
    clean = make_cards_db(1200, name="clean.db")
    sample = outcome(report_for(clean, tmp_path), "sample:0001_cards_v3#6")
    assert sample.verdict == "passed" and "every row transforms and validates" in sample.details
    lenient = report_for(db, tmp_path, checks={"max_quarantine_rate": 0.9})
    assert outcome(lenient, "sample:0001_cards_v3#6").verdict == "warning"


def test_sample_streams_a_spread_of_keys(make_cards_db, tmp_path: Path) -> None:
    db = make_cards_db(5000)
    report = report_for(db, tmp_path, checks={"sample_rows": 200})
    sample = outcome(report, "sample:0001_cards_v3#6")
    assert sample.data["rows"] == 200
    seen = []
    with Migrator(settings(db, tmp_path)) as m, m.dialect.engine.connect() as conn:
        from safemigrate.digest import reflect

        table = reflect(conn, "cards")
        for batch in checks._sample_keys(conn, table, [table.c.id], 200):
            seen += [row[0] for row in batch]
    assert len(seen) == len(set(seen)) == 200
    assert min(seen) < 500 and max(seen) > 4000, "the sample covers the whole key range"


# -- business ------------------------------------------------------------------------------------------
def test_lock_held_by_another_run(db: Path, tmp_path: Path) -> None:
    with Migrator(settings(db, tmp_path)) as other:
        other._open(write=True)
        lock = RunLock(other.journal, purpose="run")
        lock.acquire()
        try:
            report = report_for(db, tmp_path)
            held = outcome(report, "lock")
            assert held.verdict == "failed" and not report.ready
            assert f"pid {os.getpid()}" in held.details
        finally:
            lock.release()
    assert outcome(report_for(db, tmp_path), "lock").verdict == "passed"


def test_lock_of_a_dead_runner_is_a_warning(db: Path, tmp_path: Path) -> None:
    with Migrator(settings(db, tmp_path)) as m:
        m._open(write=True)
    conn = sqlite3.connect(db)
    conn.execute("INSERT INTO safemigrate_lock VALUES ('migrate', 'run:dead', NULL, ?, 999999999, ?, ?)",
                 (os.uname().nodename, time.time() - 5, time.time() - 5))
    conn.commit()
    conn.close()
    lock = outcome(report_for(db, tmp_path), "lock")
    assert lock.verdict == "warning" and "dead runner" in lock.details


@pytest.fixture
def write_lock(db: Path) -> Iterator[sqlite3.Connection]:
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("UPDATE folders SET name = name WHERE id = 1")
    yield holder
    holder.execute("ROLLBACK")
    holder.close()


def test_held_write_lock_is_a_pending_writer(db: Path, tmp_path: Path,
                                             write_lock: sqlite3.Connection) -> None:
    report = report_for(db, tmp_path)
    activity = outcome(report, "activity")
    assert activity.verdict == "failed" and not report.ready
    assert "write lock" in activity.details
    proc = cli("check", "--db", db, "-m", CARDS_MIGRATIONS, cwd=tmp_path)
    assert proc.returncode == 1 and "NOT READY" in proc.stdout


def test_long_transaction_from_server_health(db: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Servers report their oldest transaction through the dialect's health() figures."""
    with Migrator(settings(db, tmp_path)) as m:
        monkeypatch.setattr(m.dialect, "health", lambda conn: {"oldest_transaction_s": 900.0,
                                                                "innodb_lock_waits": 0})
        activity = outcome(preflight(m), "activity")
        assert activity.verdict == "failed" and "900s" in activity.details
        monkeypatch.setattr(m.dialect, "health", lambda conn: {"oldest_transaction_s": 2.0,
                                                                "innodb_lock_waits": 3})
        activity = outcome(preflight(m), "activity")
        assert activity.verdict == "warning" and "innodb_lock_waits" in activity.details


USER_CHECKS = """\
    from safemigrate import AddColumn, Migration

    def sync_queue_empty(conn):
        '''drain the sync queue first (the mobile clients upload through it)'''
        pending = conn.exec_driver_sql("SELECT count(*) FROM folders WHERE name = 'QUEUED'").scalar()
        return f"{pending} queued" if not pending else False

    def no_batch_job(conn):
        raise RuntimeError("nightly import is running")
    no_batch_job.hint = "wait for the nightly import to finish"

    def counts(conn):
        return "cards: " + str(conn.exec_driver_sql("SELECT count(*) FROM cards").scalar())

    migration = Migration(id="0001_note", steps=[AddColumn("cards", "note", "TEXT")],
                          checks=[sync_queue_empty, no_batch_job, counts])
"""


def test_migration_user_checks(db: Path, tmp_path: Path) -> None:
    folder = tmp_path / "migrations"
    write_migration(folder, "0001_note.py", USER_CHECKS)
    report = report_for(db, tmp_path, folder)
    assert outcome(report, "0001_note:sync_queue_empty").verdict == "passed"
    failed = outcome(report, "0001_note:no_batch_job")
    assert failed.verdict == "failed" and "nightly import is running" in failed.details
    assert failed.hint == "wait for the nightly import to finish"
    assert outcome(report, "0001_note:counts").details == f"cards: {ROWS}"
    conn = sqlite3.connect(db)
    conn.execute("UPDATE folders SET name = 'QUEUED' WHERE id = 3")
    conn.commit()
    conn.close()
    queue = outcome(report_for(db, tmp_path, folder), "0001_note:sync_queue_empty")
    assert queue.verdict == "failed" and "returned False" in queue.details
    assert queue.hint.startswith("drain the sync queue"), "the docstring is the hint"


def test_custom_checks_from_config(db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "opschecks.py").write_text(textwrap.dedent("""\
        def maintenance_window(conn):
            return "inside the window"

        def third_party_up(conn):
            return False
        """))
    monkeypatch.chdir(project)
    report = report_for(db, tmp_path, checks={"custom": ["opschecks:maintenance_window",
                                                          "opschecks:third_party_up",
                                                          "nosuchmodule:check"]})
    assert outcome(report, "custom:maintenance_window").details == "inside the window"
    assert outcome(report, "custom:third_party_up").verdict == "failed"
    missing = outcome(report, "custom:check")
    assert missing.verdict == "failed" and "cannot import nosuchmodule" in missing.details
    with pytest.raises(ConfigError):
        report_for(db, tmp_path, checks={"custom": ["no colon here"]})
    with pytest.raises(ConfigError):
        report_for(db, tmp_path, checks={"no_such_setting": 1})


def test_checks_run_concurrently_with_a_timeout_and_crashes_are_failures(
        db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "slowchecks.py").write_text(textwrap.dedent("""\
        import time

        def slow_a(conn):
            time.sleep(0.6)
            return "a"

        def slow_b(conn):
            time.sleep(0.6)
            return "b"

        def stuck(conn):
            time.sleep(5)

        def crash(conn):
            return 1 / 0
        """))
    monkeypatch.chdir(project)
    started = time.monotonic()
    report = report_for(db, tmp_path, checks={
        "custom": ["slowchecks:slow_a", "slowchecks:slow_b", "slowchecks:stuck", "slowchecks:crash"],
        "timeout_seconds": 1.5})
    elapsed = time.monotonic() - started
    assert outcome(report, "custom:slow_a").verdict == "passed"
    assert outcome(report, "custom:slow_b").verdict == "passed"
    stuck = outcome(report, "custom:stuck")
    assert stuck.verdict == "failed" and "timed out after 1.5s" in stuck.details
    crash = outcome(report, "custom:crash")
    assert crash.verdict == "failed" and "ZeroDivisionError" in crash.details and crash.data["crashed"]
    assert elapsed < 4.5, f"checks ran one after the other ({elapsed:.1f}s)"


def test_sqlite_statement_of_a_timed_out_check_is_interrupted(db: Path, tmp_path: Path) -> None:
    """A check stuck in SQLite is interrupted at its timeout instead of running on."""
    with Migrator(settings(db, tmp_path)) as m:
        ctx = checks.CheckContext(m, checks.CheckSettings(), False, [], [], None, None)
        errors: list[BaseException] = []

        def endless() -> None:
            try:
                with ctx.read("endless") as conn:
                    conn.exec_driver_sql("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) "
                                         "SELECT count(*) FROM n").scalar()
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

        thread = threading.Thread(target=endless)
        thread.start()
        time.sleep(0.3)
        ctx.interrupt("endless")
        thread.join(5)
        assert not thread.is_alive() and errors and "interrupt" in str(errors[0]).lower()


# -- inside `run` --------------------------------------------------------------------------------------
def test_run_refuses_when_not_ready_and_journals_every_check(db: Path, tmp_path: Path) -> None:
    corrupt_index(db)
    before = digest_db(db)
    with Migrator(settings(db, tmp_path)) as m, pytest.raises(NotReadyError) as info:
        m.run()
    assert "indexes" in info.value.message and "--skip-check indexes" in info.value.hint
    assert digest_db(db) == before, "nothing changes when the checks fail"
    assert not (tmp_path / "backups").exists() or not list((tmp_path / "backups").glob("*.db"))
    assert query(db, "SELECT status, phase FROM safemigrate_runs") == [("failed", "preparation")]
    kinds = {k for (k,) in query(db, "SELECT kind FROM safemigrate_events")}
    assert {"check.passed", "check.failed", "check.warning"} <= kinds


def test_skip_check_is_journaled_with_who_and_why(db: Path, tmp_path: Path) -> None:
    (tmp_path / "gate.py").write_text("def closed(conn):\n    return False\n")
    (tmp_path / "safemigrate.toml").write_text(
        f'db = "{db}"\nmigrations = "{CARDS_MIGRATIONS}"\nworkers = 1\n'
        '[checks]\ncustom = ["gate:closed"]\n')
    proc = cli("run", cwd=tmp_path)
    line = assert_one_error_line(proc, 1, tmp_path, "run")
    assert "custom:closed" in line and "--skip-check custom:closed" in line
    proc = cli("run", "--skip-check", "custom:closed", cwd=tmp_path)
    assert "--reason" in assert_one_error_line(proc, 2, tmp_path, "run")
    proc = cli("run", "--skip-check", "no-such-check", "--reason", "x", cwd=tmp_path)
    assert "no check named" in assert_one_error_line(proc, 2, tmp_path, "run")
    proc = cli("run", "--skip-check", "custom:*", "--reason", "gate is manual today, ticket OPS-12",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (message, data), = query(db, "SELECT message, data FROM safemigrate_events WHERE kind = 'check.skipped'")
    data = json.loads(data)
    assert data["check"] == "custom:closed" and data["reason"] == "gate is manual today, ticket OPS-12"
    assert "@" in data["who"] and data["who"] in message
    last = query(db, "SELECT status FROM safemigrate_runs ORDER BY started_at DESC LIMIT 1")
    assert last == [("completed",)]


def test_skipped_required_check_shows_as_skipped(db: Path, tmp_path: Path) -> None:
    corrupt_index(db)
    with Migrator(settings(db, tmp_path)) as m:
        report = preflight(m, skip={"indexes": "REINDEX scheduled tonight"})
    skipped = outcome(report, "indexes")
    assert skipped.verdict == "skipped" and skipped.required
    assert "REINDEX scheduled tonight" in skipped.details
    assert report.ready


# -- every backend ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["postgresql", "mysql"])
def test_check_suite_on_a_server(kind: str, tmp_path: Path) -> None:
    """The same suite on a server: latency is measured, the server enforces foreign keys, and
    the Backfill sample reads through SQLAlchemy Core like on SQLite."""
    from backends import create_database, drop_database
    from safemigrate.examples.cards.generate import generate_into

    url = create_database(kind, tmp_path)
    try:
        generate_into(url, rows=600, bad_rate=0.05)
        s = Settings(db=url, migrations=CARDS_MIGRATIONS, backup_dir=tmp_path / "backups", workers=1)
        with Migrator(s) as m:
            report = preflight(m)
        names = [c.name for c in report.checks]
        assert "latency" in names
        assert outcome(report, "latency").verdict in ("passed", "warning")
        assert "round trips" in outcome(report, "latency").details
        assert "enforces foreign keys" in outcome(report, "foreign-keys").details
        sample = outcome(report, "sample:0001_cards_v3#6")
        assert sample.data["rows"] == 600 and sample.data["would_quarantine"] == 30
        assert outcome(report, "disk-space").verdict == "passed"
        assert report.ready, [(c.name, c.details) for c in report.failed]
    finally:
        drop_database(kind, url)


# -- audit of issue 3: the failing database check, --full through the CLI, a real long transaction ------
def free_port() -> int:
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    return port


def test_unreachable_database_is_one_clear_line(tmp_path: Path) -> None:
    """The database check failing: `check` cannot reach the database, so it reports one line
    naming where it looked and what to do (a report of checks against nothing would say less)."""
    port = free_port()
    url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/nowhere"
    for extra in ([], ["--json"]):
        proc = cli("check", *extra, "--db", url, "-m", CARDS_MIGRATIONS, cwd=tmp_path, timeout=60)
        line = assert_one_error_line(proc, 1, tmp_path, "check")
        assert f"127.0.0.1:{port}" in line and "connection refused" in line, line
        assert "--db" in line.split("hint:")[1], "the remedy names the option to fix"
        assert proc.stdout == "", "no report (nor JSON) for a database that is not there"
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(os.urandom(8192))
    proc = cli("check", "--db", garbage, "-m", CARDS_MIGRATIONS, cwd=tmp_path)
    line = assert_one_error_line(proc, 1, tmp_path, "check")
    assert str(garbage) in line and "not a SQLite database" in line, line
    gone = tmp_path / "gone" / "cards.db"
    proc = cli("check", "--db", gone, "-m", CARDS_MIGRATIONS, cwd=tmp_path)
    line = assert_one_error_line(proc, 1, tmp_path, "check")
    assert str(gone) in line and "does not exist" in line, line
    assert not gone.parent.exists(), "check never creates the database"


def test_full_check_command_dry_runs_every_row(make_cards_db, tmp_path: Path) -> None:
    """`check --full` through the CLI: every row of the table goes through the Backfill's
    transform and validator, so bad rows the sample would miss are counted exactly."""
    db = make_cards_db(2300)  # no malformed cards of its own
    # the sample (1000 rows) reads ten windows of 100 keys from 1, 230, 460, ...: only id 50 is
    # inside one of them
    bad = [50, 150, 151, 400, 1100, 2250]
    conn = sqlite3.connect(db)
    conn.executemany("UPDATE cards SET style = '{\"color\":\"#ffffff\"}' WHERE id = ?",
                     [(i,) for i in bad])  # a style without "type": rejected by the validator
    conn.commit()
    conn.close()
    (total,) = query(db, "SELECT count(*) FROM cards")[0]
    name = "sample:0001_cards_v3#6"
    proc = cli("check", "--full", "--json", "--db", db, "-m", CARDS_MIGRATIONS, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["full"] is True
    sample = next(c for c in report["checks"] if c["name"] == name)
    assert sample["data"]["full"] is True
    assert sample["data"]["rows"] == total == 2300
    assert sample["data"]["would_quarantine"] == len(bad)
    assert sample["verdict"] == "warning" and f"all {total:,} rows of cards" in sample["details"]
    assert {e["key"][0] for e in sample["data"]["examples"]} <= set(bad)
    integrity = next(c for c in report["checks"] if c["name"] == "integrity")
    assert integrity["details"].startswith("full integrity check")
    sampled = json.loads(cli("check", "--json", "--db", db, "-m", CARDS_MIGRATIONS, cwd=tmp_path).stdout)
    sample = next(c for c in sampled["checks"] if c["name"] == name)
    assert sample["data"]["rows"] == 1000 and sample["data"]["would_quarantine"] == 1, \
        "without --full only a sample is tried"
    text = cli("check", "--full", "--db", db, "-m", CARDS_MIGRATIONS, cwd=tmp_path,
               env={"COLUMNS": "400"})
    assert text.returncode == 0 and f"all {total:,} rows of cards: {len(bad)} would be quarantined" \
        in text.stdout, text.stdout


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_long_transaction_and_waiting_writer_on_a_real_server(backend: str, db_url: str,
                                                              tmp_path: Path) -> None:
    """A second connection keeps a transaction open past [checks] max_transaction_seconds: the
    activity check fails and names it (pid, application); a writer queued behind its row lock
    is a warning. No stand-in for the server's figures."""
    import sqlalchemy as sa

    from backends import engine_for
    from safemigrate.examples.cards.generate import generate_into

    generate_into(db_url, rows=50)
    engine = engine_for(db_url)
    s = Settings(db=db_url, migrations=CARDS_MIGRATIONS, backup_dir=tmp_path / "backups", workers=1,
                 sections={"checks": {"max_transaction_seconds": 1.0}})
    holder = engine.connect()
    try:
        holder.exec_driver_sql("SET application_name = 'sm-test-long-tx'")
        holder.commit()
        pid = holder.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        holder.exec_driver_sql("UPDATE folders SET name = name WHERE id = 1")  # opens the transaction
        time.sleep(1.5)
        with Migrator(s) as m:
            report = preflight(m)
        activity = outcome(report, "activity")
        assert activity.verdict == "failed" and not report.ready, activity
        assert "a transaction has been open for" in activity.details and "limit 1s" in activity.details
        assert f"pid {pid}" in activity.details and "sm-test-long-tx" in activity.details, activity.details
        assert activity.hint
        listed = activity.data["health"]["long_transaction_list"]
        assert any(t["pid"] == pid and t["seconds"] > 1.0 for t in listed), listed

        errors: list[BaseException] = []

        def wait_for_the_row() -> None:
            try:
                with engine.connect() as waiter:
                    waiter.exec_driver_sql("SET lock_timeout = '20s'")
                    waiter.exec_driver_sql("UPDATE folders SET name = name WHERE id = 1")
                    waiter.rollback()
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        writer = threading.Thread(target=wait_for_the_row)
        writer.start()
        try:
            deadline = time.monotonic() + 10
            with engine.connect() as probe:
                while time.monotonic() < deadline and not probe.execute(sa.text(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                        "AND datname = current_database()")).scalar():
                    time.sleep(0.05)
            relaxed = Settings(db=db_url, migrations=CARDS_MIGRATIONS, backup_dir=tmp_path / "backups",
                               workers=1, sections={"checks": {"max_transaction_seconds": 600}})
            with Migrator(relaxed) as m:
                activity = outcome(preflight(m), "activity")
            assert activity.verdict == "warning", activity
            assert "writers are waiting for locks" in activity.details and "lock_waits = " in activity.details
        finally:
            holder.rollback()
            writer.join(30)
        assert not writer.is_alive() and not errors, errors
    finally:
        holder.close()
        engine.dispose()
