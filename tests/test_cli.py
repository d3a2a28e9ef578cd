"""Every command through the console script (and CliRunner where a subprocess adds nothing)."""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from conftest import (
    CARDS_MIGRATIONS,
    SAFEMIGRATE,
    assert_one_error_line,
    cli,
    digest_db,
    file_sha256,
    query,
)
from safemigrate.cli import main
from safemigrate.examples.cards import generate

ROWS = 1500
BAD_RATE = 0.02
BAD = round(ROWS * BAD_RATE)


def workspace(tmp_path: Path, *extra: tuple[str, str], cards: bool = True,
              rows: int = ROWS) -> tuple[Path, Path]:
    """A folder with cards.db (v2) and migrations/ (the cards migration, plus `extra` files)."""
    db = tmp_path / "cards.db"
    generate(db, rows=rows, bad_rate=BAD_RATE, seed=7)
    folder = tmp_path / "migrations"
    folder.mkdir()
    if cards:
        shutil.copy(CARDS_MIGRATIONS / "0001_cards_v3.py", folder)
    for name, source in extra:
        (folder / name).write_text(textwrap.dedent(source))
    return db, folder


def sm(tmp_path: Path, db: Path, *args: Any,
       env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """A command against the workspace's database and migrations."""
    return cli(*args, "--db", db, "--migrations", tmp_path / "migrations", cwd=tmp_path, env=env,
               timeout=timeout)


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, (proc.returncode, proc.stdout[-2000:], proc.stderr)
    return proc


# -- init / new ---------------------------------------------------------------------------------------
def test_init_creates_folder_and_config_and_new_numbers_files(tmp_path: Path) -> None:
    ok(cli("init", "--db", "app.db", cwd=tmp_path))
    assert (tmp_path / "migrations").is_dir()
    config = (tmp_path / "safemigrate.toml").read_text()
    assert 'db = "app.db"' in config
    again = ok(cli("init", cwd=tmp_path))
    assert "left as it is" in again.stdout
    assert (tmp_path / "safemigrate.toml").read_text() == config

    ok(cli("new", "add search fields", cwd=tmp_path))
    ok(cli("new", "second_thing", cwd=tmp_path))
    names = sorted(p.name for p in (tmp_path / "migrations").glob("*.py"))
    assert names == ["0001_add_search_fields.py", "0002_second_thing.py"]
    assert 'id="0002_second_thing"' in (tmp_path / "migrations" / "0002_second_thing.py").read_text()
    assert_one_error_line(cli("new", "!!!", cwd=tmp_path), 2, tmp_path, "new")


def test_config_db_is_used_by_later_commands(tmp_path: Path) -> None:
    generate(tmp_path / "cards.db", rows=ROWS, bad_rate=BAD_RATE, seed=7)
    ok(cli("init", "--db", "cards.db", cwd=tmp_path))
    shutil.copy(CARDS_MIGRATIONS / "0001_cards_v3.py", tmp_path / "migrations")
    plan = json.loads(ok(cli("plan", "--json", cwd=tmp_path)).stdout)
    assert [p["id"] for p in plan] == ["0001_cards_v3"]
    ok(cli("run", "--workers", "1", cwd=tmp_path))
    status = json.loads(ok(cli("status", "--json", cwd=tmp_path)).stdout)
    assert status["database"].endswith("cards.db")
    assert status["run"]["status"] == "completed"
    assert status["pending"] == []


def test_safemigrate_db_environment_variable(tmp_path: Path) -> None:
    db, _ = workspace(tmp_path)
    env = {"SAFEMIGRATE_DB": str(db)}
    status = json.loads(ok(cli("status", "--json", cwd=tmp_path, env=env)).stdout)
    assert status["database"].endswith("cards.db")
    assert status["pending"] == ["0001_cards_v3"]
    ok(cli("run", "--workers", "1", cwd=tmp_path, env=env))
    status = json.loads(ok(cli("status", "--json", cwd=tmp_path, env=env)).stdout)
    assert status["run"]["status"] == "completed"
    # --db still wins over the environment
    other = tmp_path / "other.db"
    generate(other, rows=10)
    status = json.loads(ok(cli("status", "--json", "--db", other, cwd=tmp_path, env=env)).stdout)
    assert status["database"].endswith("other.db") and status["run"] is None


# -- check / plan / dry run ----------------------------------------------------------------------------
IRREVERSIBLE = ("0002_shout_folders.py", """\
    from safemigrate import Migration, RawSQL

    migration = Migration(
        id="0002_shout_folders",
        description="folder names in capitals",
        steps=[RawSQL("UPDATE folders SET name = upper(name)", touches=["folders"])],
    )
    """)


def test_check_reports_ready(tmp_path: Path) -> None:
    db, _ = workspace(tmp_path)
    before = file_sha256(db)
    proc = sm(tmp_path, db, "check", "--json")
    report = json.loads(proc.stdout)
    assert proc.returncode == (0 if report["ready"] else 1), proc.stderr
    failed = {c["name"]: c["details"] for c in report["checks"] if not c["passed"]}
    # a busy test machine may fail a load check; nothing about this database may fail
    assert not failed.keys() & {"database", "migration-state", "integrity", "lock"}, failed
    assert file_sha256(db) == before


def test_plan_shows_rows_sql_and_irreversible_steps(tmp_path: Path) -> None:
    db, _ = workspace(tmp_path, IRREVERSIBLE)
    before = file_sha256(db)
    planned = json.loads(ok(sm(tmp_path, db, "plan", "--json")).stdout)
    assert [p["id"] for p in planned] == ["0001_cards_v3", "0002_shout_folders"]
    cards, shout = planned
    backfill = [s for s in cards["steps"] if s["kind"] == "backfill"]
    assert [s["rows"] for s in backfill] == [ROWS]
    sql = "\n".join(line for s in cards["steps"] for line in s["sql"])
    assert "ALTER TABLE cards ADD COLUMN search_terms TEXT" in sql
    assert "CREATE INDEX idx_cards_content_hash ON cards (content_hash)" in sql
    assert cards["irreversible"] == []
    assert cards["disk_needed"] > db.stat().st_size
    assert shout["irreversible"] == [0]
    assert shout["steps"][0]["reversible"] is False
    assert shout["steps"][0]["sql"] == ["UPDATE folders SET name = upper(name)"]

    text = ok(sm(tmp_path, db, "plan")).stdout
    assert "0001_cards_v3" in text and "0002_shout_folders" in text
    assert f"{ROWS:,}" in text
    assert "irreversible steps" in text
    assert file_sha256(db) == before


def test_run_dry_run_changes_nothing(tmp_path: Path) -> None:
    db, _ = workspace(tmp_path)
    before = file_sha256(db)
    proc = ok(sm(tmp_path, db, "run", "--dry-run"))
    assert "0001_cards_v3" in proc.stdout
    planned = json.loads(ok(sm(tmp_path, db, "run", "--dry-run", "--json")).stdout)
    assert planned[0]["id"] == "0001_cards_v3"
    assert file_sha256(db) == before
    assert not (tmp_path / ".safemigrate").exists()


# -- run / status / history / verify / rollback ----------------------------------------------------------
def test_run_status_history_verify_rollback(tmp_path: Path) -> None:
    db, _ = workspace(tmp_path)
    original = digest_db(db)
    proc = ok(sm(tmp_path, db, "run", "--workers", "2", "--batch-size", "200"))
    assert "0001_cards_v3" in proc.stdout
    status = json.loads(ok(sm(tmp_path, db, "status", "--json")).stdout)
    run = status["run"]
    assert run["status"] == "completed"
    assert run["rows_done"] == ROWS
    assert run["quarantined"] == BAD
    assert sum(s["rows_quarantined"] for s in run["steps"]) == BAD
    assert status["applied"] == ["0001_cards_v3"] and status["pending"] == []
    text = ok(sm(tmp_path, db, "status")).stdout
    assert "completed" in text and f"{BAD:,} rows quarantined" in text

    history = ok(sm(tmp_path, db, "history")).stdout
    for kind in ("run.started", "backup.verified", "phase.completed", "run.completed"):
        assert kind in history
    runs = json.loads(ok(sm(tmp_path, db, "history", "--json")).stdout)
    assert [r["id"] for r in runs] == [run["id"]]
    kinds = [e["kind"] for e in runs[0]["events"]]
    assert kinds[0] == "run.started" and "run.completed" in kinds

    verified = json.loads(ok(sm(tmp_path, db, "verify", "--json")).stdout)
    assert verified["ok"] is True
    names = {c["name"] for c in verified["checks"]}
    assert "integrity" in names and "invariant:check_counts_consistent" in names
    ok(sm(tmp_path, db, "verify"))

    migrated = file_sha256(db)
    dry = ok(sm(tmp_path, db, "rollback", "--dry-run"))
    assert "ALTER TABLE cards DROP COLUMN search_terms" in dry.stdout
    assert file_sha256(db) == migrated, "rollback --dry-run must not write"

    ok(sm(tmp_path, db, "rollback", "--yes"))
    assert digest_db(db) == original
    status = json.loads(ok(sm(tmp_path, db, "status", "--json")).stdout)
    assert status["run"]["status"] == "rolled_back"
    assert status["pending"] == ["0001_cards_v3"]
    again = sm(tmp_path, db, "rollback", "--yes")  # idempotent: says so, changes nothing
    assert again.returncode == 0 and "already rolled back" in again.stdout
    assert digest_db(db) == original


def test_run_with_worker_pools_ends_under_the_cli_signal_handlers(tmp_path: Path) -> None:
    """Both pools (transform and re-validation) run here; forked workers must not inherit the
    CLI's "stop after this batch" SIGTERM handler, or the pool's shutdown would hang the run."""
    db, _ = workspace(tmp_path)
    proc = sm(tmp_path, db, "run", "--json", "--workers", "2", "--batch-size", "100", timeout=120)
    ok(proc)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["runs"][0]["status"] == "completed"
    assert query(db, "SELECT COUNT(*) FROM cards WHERE search_terms IS NOT NULL")[0][0] == ROWS - BAD


def test_rollback_strategy_restore_from_another_directory(tmp_path: Path) -> None:
    """The journal is read from anywhere: a restore started in another folder finds the snapshot
    the run took with the default (relative) backup folder."""
    db, folder = workspace(tmp_path)
    original = digest_db(db)
    ok(sm(tmp_path, db, "run", "--workers", "1"))
    assert digest_db(db) != original
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = ok(cli("rollback", "--strategy", "restore", "--yes", "--json", "--db", db,
                  "--migrations", folder, cwd=elsewhere))
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["status"] == "rolled_back" and result["strategy"] == "restore"
    assert result["pre_rollback_backup"] and Path(result["pre_rollback_backup"]).is_file()
    assert all(c["passed"] for c in result["checks"])
    assert digest_db(db) == original


def test_status_from_another_process_while_running(tmp_path: Path) -> None:
    slow = ("0001_slow_cards.py", """\
        import time

        from safemigrate import AddColumn, Backfill, Migration
        from safemigrate.examples.cards.transform import optimize_card

        def slow_optimize(row):
            if row["id"] % 100 == 0:  # one pause per batch of 100
                time.sleep(0.2)
            return optimize_card(row)

        migration = Migration(
            id="0001_slow_cards",
            steps=[
                AddColumn("cards", "search_terms", "TEXT"),
                AddColumn("cards", "content_hash", "TEXT"),
                AddColumn("cards", "image_count", "INTEGER"),
                AddColumn("cards", "tag_count", "INTEGER"),
                AddColumn("cards", "has_images", "INTEGER"),
                AddColumn("cards", "style_type", "TEXT"),
                Backfill("cards", slow_optimize, reads=["front_content", "back_content", "style"],
                         writes=["search_terms", "content_hash", "image_count", "tag_count",
                                 "has_images", "style_type"], batch_size=100),
            ],
        )
        """)
    db, folder = workspace(tmp_path, slow, cards=False, rows=2500)
    runner = subprocess.Popen(
        [str(SAFEMIGRATE), "run", "--db", str(db), "--migrations", str(folder), "--workers", "1"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen: list[tuple[str, int]] = []
    try:
        deadline = time.monotonic() + 60
        while runner.poll() is None and time.monotonic() < deadline:
            proc = sm(tmp_path, db, "status", "--json")
            if proc.returncode == 0:
                info = json.loads(proc.stdout)
                if info.get("run"):
                    seen.append((info["run"]["status"], info["run"]["rows_done"]))
            time.sleep(0.1)
        assert runner.wait(timeout=60) == 0, runner.stderr.read() if runner.stderr else ""
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
    running = [done for state, done in seen if state == "running"]
    assert len(running) >= 2, seen
    assert running == sorted(running), f"rows_done went backwards: {seen}"
    assert running[-1] > running[0], f"rows_done did not grow while running: {seen}"
    assert 0 < running[-1] <= 2500
    final = json.loads(ok(sm(tmp_path, db, "status", "--json")).stdout)
    assert final["run"]["status"] == "completed" and final["run"]["rows_done"] == 2500


def test_failing_invariant_rolls_back_with_exit_3(tmp_path: Path) -> None:
    strict = ("0001_strict_cards.py", """\
        from safemigrate import AddColumn, Backfill, Migration
        from safemigrate.examples.cards.transform import optimize_card

        def every_card_has_search_terms(conn):
            missing = conn.exec_driver_sql(
                "SELECT count(*) FROM cards WHERE search_terms IS NULL").scalar()
            assert missing == 0, f"{missing} cards without search terms"

        migration = Migration(
            id="0001_strict_cards",
            steps=[
                AddColumn("cards", "search_terms", "TEXT"),
                AddColumn("cards", "content_hash", "TEXT"),
                AddColumn("cards", "image_count", "INTEGER"),
                AddColumn("cards", "tag_count", "INTEGER"),
                AddColumn("cards", "has_images", "INTEGER"),
                AddColumn("cards", "style_type", "TEXT"),
                Backfill("cards", optimize_card, reads=["front_content", "back_content", "style"],
                         writes=["search_terms", "content_hash", "image_count", "tag_count",
                                 "has_images", "style_type"]),
            ],
            invariants=[every_card_has_search_terms],
        )
        """)
    db, _ = workspace(tmp_path, strict, cards=False)
    original = digest_db(db)
    proc = sm(tmp_path, db, "run", "--workers", "2")
    line = assert_one_error_line(proc, 3, tmp_path, "run")
    assert "every_card_has_search_terms" in line
    assert digest_db(db) == original, "an automatic rollback returns the original content and schema"
    assert query(db, "SELECT status FROM safemigrate_runs") == [("rolled_back",)]
    assert query(db, "SELECT count(*) FROM safemigrate_applied") == [(0,)]
    kinds = {k for (k,) in query(db, "SELECT kind FROM safemigrate_events")}
    assert {"validation.check", "rollback.started", "rollback.completed"} <= kinds


def test_failing_pre_check_changes_nothing(tmp_path: Path) -> None:
    guarded = ("0001_guarded.py", """\
        from safemigrate import AddColumn, Migration

        def no_empty_folders(conn):
            assert conn.exec_driver_sql("SELECT count(*) FROM folders").scalar() > 10**6, \\
                "not enough folders"

        migration = Migration(id="0001_guarded", steps=[AddColumn("cards", "x", "TEXT")],
                              checks=[no_empty_folders])
        """)
    db, _ = workspace(tmp_path, guarded, cards=False)
    original = digest_db(db)
    proc = sm(tmp_path, db, "run")
    line = assert_one_error_line(proc, 1, tmp_path, "run")
    assert "no_empty_folders" in line
    assert digest_db(db) == original
    assert not list((tmp_path / ".safemigrate").glob("**/*.db")), "no snapshot before the checks pass"


# -- demo -------------------------------------------------------------------------------------------------
def test_demo(tmp_path: Path) -> None:
    proc = ok(cli("demo", "--rows", "3000", "--workers", "2", cwd=tmp_path, timeout=300))
    assert "demo summary" in proc.stdout
    assert "content identical to v2: yes" in proc.stdout


def test_demo_keep_refuses_a_used_folder(tmp_path: Path) -> None:
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "cards.db").write_text("x")
    result = CliRunner().invoke(main, ["demo", "--rows", "10", "--keep", str(keep)])
    assert result.exit_code == 2
    assert (keep / "cards.db").read_text() == "x"


def test_version_and_help() -> None:
    runner = CliRunner()
    assert runner.invoke(main, ["--version"]).exit_code == 0
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("init", "new", "check", "plan", "run", "status", "rollback", "history",
                    "verify", "demo"):
        assert command in result.output


# -- passwords are never printed -----------------------------------------------------------------------------
SECRET_URL = "postgresql://u:secret@127.0.0.1:1/x"


@pytest.mark.parametrize("args", [
    ("run",), ("run", "--json"), ("plan",), ("plan", "--json"), ("status",), ("status", "--json"),
    ("check",), ("check", "--json"), ("verify",), ("history",), ("rollback", "--yes"),
    ("rollback", "--dry-run"),
])
def test_password_never_printed(tmp_path: Path, args: tuple[str, ...]) -> None:
    proc = cli(*args, "--db", SECRET_URL, "--migrations", CARDS_MIGRATIONS, cwd=tmp_path, timeout=60)
    assert proc.returncode != 0
    assert "secret" not in proc.stdout + proc.stderr
    env = {"SAFEMIGRATE_DB": "mysql://admin:secret@127.0.0.1:1/x"}
    proc = cli(*args, "--migrations", CARDS_MIGRATIONS, cwd=tmp_path, env=env, timeout=60)
    assert proc.returncode != 0
    assert "secret" not in proc.stdout + proc.stderr
