"""Behaviours of issue 2 that no other test pins: the remaining step kinds and their inverses,
the stale-heartbeat lock takeover, validator rejections, the worker default, rollback without
the snapshot file, each way a run's validation can fail, `rollback --run`, plain output off a
terminal, and the demo's --rows/--bad-rate."""

from __future__ import annotations

import json
import os
import re
import socket
import sqlite3
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import CARDS_MIGRATIONS, assert_one_error_line, cli, digest_db, query
from safemigrate import LockHeldError, Migrator, Settings
from safemigrate.examples.cards import generate

ROWS = 600
INDEX_SQL = ("CREATE UNIQUE INDEX idx_items_name ON items (name COLLATE NOCASE, id DESC) "
             "WHERE note IS NOT NULL")
BUMP_TRIGGER = ("CREATE TRIGGER items_bump_version AFTER UPDATE OF name ON items BEGIN "
                "UPDATE items SET version = version + 1 WHERE id = NEW.id; END")


# -- helpers -------------------------------------------------------------------------------------------
def make_items(db: Path, rows: int = ROWS, *, trigger: bool = False) -> Path:
    """An application table: integer key, a name, a sometimes-NULL note, a version column, a
    partial unique index (and optionally a trigger that bumps `version` when `name` changes)."""
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL, note TEXT, "
                 "version INTEGER NOT NULL DEFAULT 0)")
    conn.execute(INDEX_SQL)
    if trigger:
        conn.execute(BUMP_TRIGGER)
    conn.executemany("INSERT INTO items VALUES (?, ?, ?, 0)",
                     [(i, f"item-{i:04d}", None if i % 7 == 0 else f"note {i}")
                      for i in range(1, rows + 1)])
    conn.commit()
    conn.close()
    return db


def write_migration(folder: Path, name: str, source: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(source))
    return path


def settings(db: Path, tmp_path: Path, **extra: Any) -> Settings:
    extra.setdefault("workers", 1)
    extra.setdefault("batch_size", 100)
    return Settings(db=str(db), migrations=tmp_path / "migrations",
                    backup_dir=tmp_path / "backups", **extra)


def run_one(db: Path, tmp_path: Path, **extra: Any) -> Any:
    with Migrator(settings(db, tmp_path, **extra)) as m:
        (result,) = m.run()
    assert result.status == "completed"
    return result


def sm(tmp_path: Path, db: Path, *args: Any, env: dict[str, str] | None = None,
       timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return cli(*args, "--db", db, "--migrations", tmp_path / "migrations", cwd=tmp_path, env=env,
               timeout=timeout)


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, (proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:])
    return proc


def index_sql(db: Path, name: str) -> str | None:
    rows = query(db, "SELECT sql FROM sqlite_master WHERE type = 'index' AND name = ?", (name,))
    return rows[0][0] if rows else None


def table_names(db: Path) -> set[str]:
    return {n for (n,) in query(db, "SELECT name FROM sqlite_master WHERE type = 'table'")}


UPPER_NAMES = """\
    from safemigrate import Backfill, Migration

    def shout(row):
        return {"name": row["name"].upper()}

    migration = Migration(
        id="0001_upper_names",
        steps=[Backfill("items", shout, reads=["name"], writes=["name"])],
    )
"""


# -- 1. CreateTable ------------------------------------------------------------------------------------
CREATE_TABLE = """\
    import sqlalchemy as sa

    from safemigrate import CreateTable, Migration, RawSQL

    migration = Migration(
        id="0001_labels",
        steps=[
            CreateTable("labels", [
                sa.Column("id", sa.Integer, primary_key=True),
                sa.Column("item_id", sa.Integer, nullable=False, index=True),
                sa.Column("label", sa.Text),
            ]),
            RawSQL("INSERT INTO labels (item_id, label) SELECT id, upper(name) FROM items",
                   down="DELETE FROM labels", touches=["labels"]),
        ],
    )
"""


def test_create_table_is_planned_created_and_dropped_by_rollback(tmp_path: Path) -> None:
    db = make_items(tmp_path / "app.db")
    write_migration(tmp_path / "migrations", "0001_labels.py", CREATE_TABLE)
    original = digest_db(db)
    with Migrator(settings(db, tmp_path)) as m:
        (planned,) = m.plan()
    create = planned.steps[0]
    assert create.kind == "create_table" and create.reversible
    assert "labels" in create.description
    sql = "\n".join(create.sql)
    assert "CREATE TABLE labels" in sql and "item_id INTEGER NOT NULL" in sql
    assert "CREATE INDEX ix_labels_item_id ON labels (item_id)" in sql
    assert planned.irreversible == []
    assert "labels" not in table_names(db), "plan must not create anything"

    result = run_one(db, tmp_path)
    assert "labels" in table_names(db)
    assert index_sql(db, "ix_labels_item_id") is not None
    assert query(db, "SELECT count(*), min(label) FROM labels") == [(ROWS, "ITEM-0001")]

    with Migrator(settings(db, tmp_path)) as m:
        rolled = m.rollback(result.run_id)
    assert rolled.status == "rolled_back" and rolled.strategy == "reverse"
    assert "labels" not in table_names(db), "rollback drops the created table"
    assert index_sql(db, "ix_labels_item_id") is None
    assert digest_db(db) == original, "content and schema equal the original"


# -- 2. RawSQL with a down ----------------------------------------------------------------------------
RAW_SQL = """\
    from safemigrate import Migration, RawSQL

    migration = Migration(
        id="0001_prefix_notes",
        steps=[RawSQL("UPDATE items SET note = 'n:' || note WHERE note IS NOT NULL",
                      down="UPDATE items SET note = substr(note, 3) WHERE note LIKE 'n:%'",
                      touches=["items"])],
    )
"""


def test_raw_sql_with_down_is_reversed_by_its_down(tmp_path: Path) -> None:
    db = make_items(tmp_path / "app.db")
    write_migration(tmp_path / "migrations", "0001_prefix_notes.py", RAW_SQL)
    original = digest_db(db)
    result = run_one(db, tmp_path)
    assert query(db, "SELECT note FROM items WHERE id = 1") == [("n:note 1",)]
    assert query(db, "SELECT count(*) FROM items WHERE note NOT LIKE 'n:%'") == [(0,)]
    with Migrator(settings(db, tmp_path)) as m:
        plan = m.rollback_plan(result.run_id)
        assert plan.strategy == "reverse"
        assert plan.actions == ["UPDATE items SET note = substr(note, 3) WHERE note LIKE 'n:%'"]
        rolled = m.rollback(result.run_id)
    assert rolled.strategy == "reverse", "a RawSQL with a down is reversed, not restored"
    assert digest_db(db) == original


# -- 3. DropIndex --------------------------------------------------------------------------------------
DROP_INDEX = """\
    from safemigrate import DropIndex, Migration

    migration = Migration(id="0001_drop_name_index", steps=[DropIndex("items", "idx_items_name")])
"""


def test_drop_index_is_recreated_with_the_same_definition(tmp_path: Path) -> None:
    db = make_items(tmp_path / "app.db")
    write_migration(tmp_path / "migrations", "0001_drop_name_index.py", DROP_INDEX)
    original = digest_db(db)
    definition = index_sql(db, "idx_items_name")
    columns = query(db, "PRAGMA index_xinfo(idx_items_name)")
    assert definition is not None and "WHERE note IS NOT NULL" in definition
    result = run_one(db, tmp_path)
    assert index_sql(db, "idx_items_name") is None, "run drops the index"
    with Migrator(settings(db, tmp_path)) as m:
        m.rollback(result.run_id)
    assert index_sql(db, "idx_items_name") == definition, "partial, unique, collation, DESC kept"
    assert query(db, "PRAGMA index_xinfo(idx_items_name)") == columns
    assert query(db, "SELECT count(*) FROM items INDEXED BY idx_items_name "
                     "WHERE note IS NOT NULL AND name = 'item-0002'") == [(1,)]
    assert digest_db(db) == original


# -- 4. the lock: a stale heartbeat is taken over, a fresh one is not -------------------------------------
def _plant_lock(db: Path, tmp_path: Path, heartbeat_age: float) -> None:
    """A lock held by a live process on this host (this test's own pid), last heartbeat
    `heartbeat_age` seconds ago."""
    with Migrator(settings(db, tmp_path)) as m:
        m.journal.ensure()
    now = time.time()
    conn = sqlite3.connect(db)
    conn.execute("DELETE FROM safemigrate_lock")
    conn.execute("INSERT INTO safemigrate_lock VALUES ('migrate', 'run:elsewhere', 'r-held', ?, ?, ?, ?)",
                 (socket.gethostname(), os.getpid(), now - heartbeat_age - 5, now - heartbeat_age))
    conn.commit()
    conn.close()


def test_lock_with_a_stale_heartbeat_is_taken_over_and_a_fresh_one_is_not(tmp_path: Path) -> None:
    db = make_items(tmp_path / "app.db")
    write_migration(tmp_path / "migrations", "0001_upper_names.py", UPPER_NAMES)
    stale_after = 60.0  # Settings.lock_stale_after, the RunLock threshold

    # fresh heartbeat (holder pid alive): refused, naming the holder, nothing changed
    _plant_lock(db, tmp_path, heartbeat_age=1)
    before = digest_db(db)
    with Migrator(settings(db, tmp_path, lock_stale_after=stale_after)) as m, \
            pytest.raises(LockHeldError) as info:
        m.run()
    assert f"pid {os.getpid()} on {socket.gethostname()}" in info.value.message
    assert "run r-held" in info.value.message
    assert digest_db(db) == before
    assert query(db, "SELECT owner, pid FROM safemigrate_lock") == [("run:elsewhere", os.getpid())]
    line = assert_one_error_line(sm(tmp_path, db, "run", "--workers", "1"), 1, tmp_path, "run")
    assert f"pid {os.getpid()}" in line and "holds the lock" in line
    assert digest_db(db) == before
    assert query(db, "SELECT count(*) FROM safemigrate_events WHERE kind = 'lock.takeover'") == [(0,)]

    # the same live pid, but silent for longer than the threshold: taken over, and journaled
    _plant_lock(db, tmp_path, heartbeat_age=stale_after * 3)
    ok(sm(tmp_path, db, "run", "--workers", "1"))
    assert query(db, "SELECT count(*) FROM items WHERE name != upper(name)") == [(0,)]
    takeovers = query(db, "SELECT message, level, data FROM safemigrate_events "
                          "WHERE kind = 'lock.takeover'")
    assert len(takeovers) == 1, takeovers
    message, level, data = takeovers[0]
    assert level == "warning"
    assert "no heartbeat for" in message and f"stale after {stale_after:.0f}s" in message
    facts = json.loads(data)
    assert facts["pid"] == os.getpid() and facts["previous_owner"] == "run:elsewhere"
    assert facts["run_id"] == "r-held"
    assert query(db, "SELECT count(*) FROM safemigrate_lock") == [(0,)], "released after the run"


def test_lock_takeover_is_reported_to_the_operator(tmp_path: Path) -> None:
    db = make_items(tmp_path / "app.db")
    write_migration(tmp_path / "migrations", "0001_upper_names.py", UPPER_NAMES)
    _plant_lock(db, tmp_path, heartbeat_age=600)
    proc = ok(sm(tmp_path, db, "run", "--workers", "1"))
    assert "took over the lock" in proc.stdout + proc.stderr
    assert "lock.takeover" in ok(sm(tmp_path, db, "history")).stdout


# -- 5. a validator that raises quarantines the row ---------------------------------------------------------
VALIDATOR_REJECTS = """\
    from safemigrate import Backfill, Migration

    def shout(row):
        return {"name": row["name"].upper()}

    def check(row, new):
        if row["id"] % 50 == 0:
            raise ValueError(f"item {row['id']} is reserved")
        if row["id"] % 70 == 0:
            return False
        assert new["name"] == row["name"].upper()

    migration = Migration(
        id="0001_upper_checked",
        steps=[Backfill("items", shout, reads=["name"], writes=["name"], validate=check)],
    )
"""


def test_row_rejected_by_validate_is_quarantined_with_its_error_and_unchanged(tmp_path: Path) -> None:
    db = make_items(tmp_path / "app.db")
    write_migration(tmp_path / "migrations", "0001_upper_checked.py", VALIDATOR_REJECTS)
    before = {i: (n, note, v) for i, n, note, v in query(db, "SELECT * FROM items")}
    raised = {i for i in before if i % 50 == 0}
    returned_false = {i for i in before if i % 70 == 0 and i not in raised}
    result = run_one(db, tmp_path)
    assert result.rows == ROWS
    assert result.quarantined == len(raised) + len(returned_false)
    quarantined = {json.loads(pk)[0]: (json.loads(row), error) for pk, row, error in query(
        db, "SELECT pk, row_data, error FROM safemigrate_quarantine WHERE run_id = ?", (result.run_id,))}
    assert set(quarantined) == raised | returned_false
    for item_id, (row, error) in quarantined.items():
        assert row["name"] == before[item_id][0]
        if item_id in raised:
            assert error == f"ValueError: item {item_id} is reserved"
        else:
            assert "validate() returned False" in error
    after = {i: (n, note, v) for i, n, note, v in query(db, "SELECT * FROM items")}
    for item_id, (name, note, version) in after.items():
        expected = before[item_id][0] if item_id in quarantined else before[item_id][0].upper()
        assert (name, note, version) == (expected, *before[item_id][1:]), item_id


# -- 6. --workers defaults to the CPU count ----------------------------------------------------------------
def test_workers_default_is_the_cpu_count(tmp_path: Path) -> None:
    assert Settings().workers == os.cpu_count()
    db = make_items(tmp_path / "app.db")
    write_migration(tmp_path / "migrations", "0001_upper_names.py", UPPER_NAMES)
    assert not (tmp_path / "safemigrate.toml").exists()
    ok(sm(tmp_path, db, "run", "--json"))  # no --workers
    ((options,),) = query(db, "SELECT options FROM safemigrate_runs")
    assert json.loads(options)["workers"] == os.cpu_count()
    ok(sm(tmp_path, db, "rollback", "--yes"))
    ok(sm(tmp_path, db, "run", "--json", "--workers", "1"))  # and the option is honoured
    options = [json.loads(o)["workers"] for (o,) in
               query(db, "SELECT options FROM safemigrate_runs ORDER BY started_at")]
    assert options == [os.cpu_count(), 1]


# -- 7. reverse rollback needs only the in-database shadow copy ------------------------------------------
def test_reverse_rollback_without_the_snapshot_file(tmp_path: Path) -> None:
    db = make_items(tmp_path / "app.db")
    write_migration(tmp_path / "migrations", "0001_upper_names.py", UPPER_NAMES)
    original = digest_db(db)
    result = run_one(db, tmp_path)
    assert query(db, "SELECT name FROM items WHERE id = 3") == [("ITEM-0003",)]
    snapshot = Path(query(db, "SELECT location FROM safemigrate_backups WHERE kind = 'snapshot'")[0][0])
    assert snapshot.is_file()
    for path in snapshot.parent.iterdir():  # the snapshot and its manifest: gone
        path.unlink()
    with Migrator(settings(db, tmp_path)) as m:
        plan = m.rollback_plan(result.run_id)
        assert plan.strategy == "reverse"
        assert any("shadow copy" in a for a in plan.actions), plan.actions
        rolled = m.rollback(result.run_id)
    assert rolled.status == "rolled_back" and rolled.strategy == "reverse"
    assert all(c.passed for c in rolled.checks), [c for c in rolled.checks if not c.passed]
    assert not snapshot.exists()
    assert digest_db(db) == original, "the shadow copy alone restores content and schema"


# -- 8. each kind of failed validation rolls back with exit 3 --------------------------------------------
FAILING_SMOKE = """\
    from safemigrate import AddColumn, Backfill, Migration

    def name_length(row):
        return {"name_length": len(row["name"])}

    def check_long_names_exist(conn):
        longest = conn.exec_driver_sql("SELECT max(name_length) FROM items").scalar()
        assert longest > 100, f"longest name is {longest} characters"

    migration = Migration(
        id="0001_lengths",
        steps=[AddColumn("items", "name_length", "INTEGER"),
               Backfill("items", name_length, reads=["name"], writes=["name_length"])],
        smoke_checks=[check_long_names_exist],
    )
"""
# Passes on the transform's output ("0007"), fails on what is stored: INTEGER affinity keeps 7.
FAILING_REVALIDATION = """\
    from safemigrate import AddColumn, Backfill, Migration

    def code(row):
        return {"code": f"{row['id']:04d}"}

    def code_is_padded(row, new):
        return new["code"] == f"{row['id']:04d}"

    migration = Migration(
        id="0001_codes",
        steps=[AddColumn("items", "code", "INTEGER"),
               Backfill("items", code, reads=["name"], writes=["code"], validate=code_is_padded)],
    )
"""
# The application's trigger bumps `version` whenever `name` changes; the migration does not
# declare `version` as written.
TRIGGER_CHANGES_UNTOUCHED = UPPER_NAMES
# The per-batch corruption guard would trip first (exit 3 as well); with it off, the validation
# phase is what must catch the problem.
NO_CORRUPTION_GUARD = "[guards]\ncorruption_sample = 0\ncorruption_digest = false\n"
OFFLINE_NO_GUARD = "online = false\n" + NO_CORRUPTION_GUARD
ROLLBACK_KEEPS_TRIGGER_CHANGES = (
    "the automatic reverse rollback restores `name` through the table, so the application's "
    "trigger bumps `version` again; the rollback's proof now fails instead of passing that off "
    "(see test_untouched_column_changed_by_a_trigger_is_caught_and_never_passed_off), so the "
    "run ends with exit 1 and the pre-rollback state recovered, not exit 3 and the original: an "
    "automatic fall-back to the restore strategy is not implemented")


def _assert_rolled_back_by_validation(tmp_path: Path, db: Path, original: dict[str, Any],
                                      check_names: tuple[str, ...]) -> None:
    proc = sm(tmp_path, db, "run", "--workers", "1", "--batch-size", "100")
    line = assert_one_error_line(proc, 3, tmp_path, "run")
    assert any(name in line for name in check_names), line
    assert digest_db(db) == original, "rolled back to the original content and schema"
    assert query(db, "SELECT status FROM safemigrate_runs") == [("rolled_back",)]
    assert query(db, "SELECT count(*) FROM safemigrate_applied") == [(0,)]
    status = json.loads(ok(sm(tmp_path, db, "status", "--json")).stdout)
    assert status["run"]["status"] == "rolled_back" and len(status["pending"]) == 1


@pytest.mark.parametrize(("source", "trigger", "config", "check_name"), [
    (FAILING_SMOKE, False, "", "smoke:check_long_names_exist"),
    (FAILING_REVALIDATION, False, NO_CORRUPTION_GUARD, "backfill:items#1"),
    pytest.param(TRIGGER_CHANGES_UNTOUCHED, True, OFFLINE_NO_GUARD, "untouched-columns",
                 marks=pytest.mark.xfail(strict=True, reason=ROLLBACK_KEEPS_TRIGGER_CHANGES)),
], ids=["smoke-check", "row-revalidation", "untouched-column"])
def test_failed_validation_rolls_back_with_exit_3(tmp_path: Path, source: str, trigger: bool,
                                                  config: str, check_name: str) -> None:
    db = make_items(tmp_path / "app.db", trigger=trigger)
    write_migration(tmp_path / "migrations", "0001_m.py", source)
    (tmp_path / "safemigrate.toml").write_text(config)
    original = digest_db(db)
    _assert_rolled_back_by_validation(tmp_path, db, original, (check_name,))
    failures = [json.loads(d) for (d,) in query(
        db, "SELECT data FROM safemigrate_events WHERE kind = 'validation.check' AND level = 'error'")]
    assert [f["name"] for f in failures] == [check_name]


def test_untouched_column_changed_by_a_trigger_is_caught_and_never_passed_off(tmp_path: Path) -> None:
    """An application trigger rewrites an undeclared column in response to the backfill's own
    UPDATE, in a run that is not online. Validation catches it (the check named); the automatic
    reverse rollback fires the trigger again, so its proof fails rather than passing the
    difference off as the application's: the pre-rollback state is recovered, exit 1, and the
    hint offers the restore strategy, which gives the exact original back."""
    db = make_items(tmp_path / "app.db", trigger=True)
    original = digest_db(db)
    write_migration(tmp_path / "migrations", "0001_m.py", UPPER_NAMES)
    (tmp_path / "safemigrate.toml").write_text(OFFLINE_NO_GUARD)
    proc = sm(tmp_path, db, "run", "--workers", "1")
    line = assert_one_error_line(proc, 1, tmp_path, "rollback")  # its hint names rollback's flags
    assert "changed in version" in line and "not online" in line, line
    assert "--strategy restore" in line, line
    failures = [json.loads(d)["name"] for (d,) in query(
        db, "SELECT data FROM safemigrate_events WHERE kind = 'validation.check' AND level = 'error'")]
    assert failures == ["untouched-columns"]
    assert query(db, "SELECT count(*) FROM safemigrate_events WHERE kind = 'rollback.completed'") \
        == [(0,)], "never reported rolled back"
    ok(sm(tmp_path, db, "rollback", "--strategy", "restore"))
    assert digest_db(db) == original, "the snapshot gives the exact original back"
    assert query(db, "SELECT status FROM safemigrate_runs") == [("rolled_back",)]


@pytest.mark.xfail(strict=True, reason=(
    "online change capture (the default) logs the rows an application trigger rewrites in an "
    "undeclared column in response to the backfill's own UPDATE as application writes, so the "
    "corruption guard and untouched-columns both leave them out and the run completes with the "
    "column changed (capture.py / validate.untouched_columns / guards._compare_digests)"))
def test_trigger_changing_an_undeclared_column_fails_with_default_settings(tmp_path: Path) -> None:
    db = make_items(tmp_path / "app.db", trigger=True)
    write_migration(tmp_path / "migrations", "0001_m.py", UPPER_NAMES)
    original = digest_db(db)
    _assert_rolled_back_by_validation(tmp_path, db, original, ("untouched-columns", "corruption"))


# -- 9. rollback --run ID ------------------------------------------------------------------------------------
PREFIX_NOTES = RAW_SQL.replace("0001_prefix_notes", "0002_prefix_notes")


def test_cli_rollback_run_targets_that_run(tmp_path: Path) -> None:
    db = make_items(tmp_path / "app.db")
    folder = tmp_path / "migrations"
    original = digest_db(db)
    write_migration(folder, "0001_upper_names.py", UPPER_NAMES)
    ok(sm(tmp_path, db, "run", "--workers", "1"))
    after_first = digest_db(db)
    write_migration(folder, "0002_prefix_notes.py", PREFIX_NOTES)
    ok(sm(tmp_path, db, "run", "--workers", "1"))
    runs = dict(query(db, "SELECT migration_id, id FROM safemigrate_runs"))
    first, second = runs["0001_upper_names"], runs["0002_prefix_notes"]
    migrated = digest_db(db)

    # the earlier run while the later one is applied: refused, naming the later run
    line = assert_one_error_line(sm(tmp_path, db, "rollback", "--run", first, "--yes"), 2,
                                 tmp_path, "rollback")
    assert second in line
    assert digest_db(db) == migrated

    proc = ok(sm(tmp_path, db, "rollback", "--run", second, "--yes"))
    assert f"run {second} rolled back" in " ".join(proc.stdout.split())
    assert digest_db(db) == after_first, "only the named run was undone"
    assert dict(query(db, "SELECT id, status FROM safemigrate_runs")) == {
        first: "completed", second: "rolled_back"}

    # without --run: the last run, already rolled back; with --run: the one named
    again = ok(sm(tmp_path, db, "rollback", "--yes"))
    assert "already rolled back" in again.stdout and second in again.stdout
    assert digest_db(db) == after_first
    proc = ok(sm(tmp_path, db, "rollback", "--run", first, "--yes"))
    assert f"run {first} rolled back" in " ".join(proc.stdout.split())
    assert digest_db(db) == original
    assert dict(query(db, "SELECT id, status FROM safemigrate_runs")) == {
        first: "rolled_back", second: "rolled_back"}


# -- 10. plain output when stdout is not a terminal ----------------------------------------------------------
SPINNERS = re.compile(r"[\u2800-\u28ff\u2500-\u257f\u2580-\u259f\r\b]")  # braille, box/bar, blocks


def test_run_output_off_a_terminal_is_plain_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "CLICOLOR_FORCE"):
        monkeypatch.delenv(name, raising=False)
    rows, bad_rate = 1500, 0.02
    db = tmp_path / "cards.db"
    generate(db, rows=rows, bad_rate=bad_rate, seed=7)
    folder = tmp_path / "migrations"
    folder.mkdir()
    (folder / "0001_cards_v3.py").write_bytes((CARDS_MIGRATIONS / "0001_cards_v3.py").read_bytes())
    proc = ok(sm(tmp_path, db, "run", "--workers", "1", "--batch-size", "250",
                 env={"TERM": "xterm-256color", "COLUMNS": "200"}))
    out = proc.stdout
    assert "\x1b" not in out + proc.stderr, "no ANSI escape codes off a terminal"
    assert not SPINNERS.search(out), f"spinner or bar characters: {SPINNERS.findall(out)[:10]}"
    lines = out.splitlines()
    for phase in ("preparation", "structure", "transformation", "validation", "cleanup"):
        assert any(line.strip().endswith(phase) for line in lines), phase
    progress = [m.groups() for m in re.finditer(
        r"^\s+(\d+)/(\d+) rows, [\d,-]+ rows/s, ETA \S+, (\d+) quarantined$", out, re.M)]
    assert progress, out
    assert progress[-1] == (str(rows), str(rows), str(round(rows * bad_rate)))
    assert re.search(rf"0001_cards_v3 run \w+: {rows:,} rows in \S+, {round(rows * bad_rate)} "
                     "quarantined", " ".join(out.split())), out


# -- 11. demo --rows N --bad-rate X -----------------------------------------------------------------------
def test_demo_honours_rows_and_bad_rate(tmp_path: Path) -> None:
    rows, bad_rate = 1200, 0.05
    expected_bad = round(rows * bad_rate)
    proc = ok(cli("demo", "--rows", rows, "--bad-rate", bad_rate, "--workers", "1", cwd=tmp_path,
                  env={"COLUMNS": "200"}, timeout=300))
    text = " ".join(proc.stdout.split())
    assert f"{rows:,} flashcards, {bad_rate:.1%} malformed" in text
    assert re.search(rf"cards generated\W+{rows:,} \({expected_bad} malformed\)", text), text
    assert re.search(rf"migrated\W+{rows - expected_bad:,}\b", text), text
    assert re.search(rf"quarantined\W+{expected_bad} \(left unchanged", text), text
    assert "content identical to v2: yes" in text
