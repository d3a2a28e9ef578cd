"""The safe rollback executor (seed 3.2.1) and the rollback validator (3.3.1): eight journaled,
resumable steps; each one failing in turn (SAFEMIGRATE_FAULTS) leaves the database either at
the pre-rollback state or fully rolled back after a re-run, never in between."""

from __future__ import annotations

import http.server
import json
import re
import shutil
import sqlite3
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from backends import create_database, drop_database
from conftest import CARDS_MIGRATIONS, assert_one_error_line, cli, digest_db, query
from live import local_http_server, project
from safemigrate._exceptions import RollbackError
from safemigrate.degrade import Degradation
from safemigrate.examples.cards.generate import generate, generate_into
from safemigrate.faults import ROLLBACK_POINTS, FaultInjected
from safemigrate.migrator import Migrator
from safemigrate.rollback import STEPS, progress_of
from safemigrate.settings import Settings


def _settings(url: str, tmp_path: Path, **sections: Any) -> Settings:
    folder = tmp_path / "migrations"
    if not folder.exists():
        shutil.copytree(CARDS_MIGRATIONS, folder, ignore=shutil.ignore_patterns("__pycache__"))
    return Settings(db=url, migrations=folder, backup_dir=tmp_path / "backups", workers=1,
                    batch_size=250, sections=sections)


def _migrated_cards(tmp_path: Path, rows: int = 600) -> tuple[Path, Settings, dict, dict]:
    db = tmp_path / "cards.db"
    generate(db, rows=rows, bad_rate=0.02, seed=3)
    before = digest_db(db)
    settings = _settings(str(db), tmp_path)
    with Migrator(settings) as m:
        (result,) = m.run()
    assert result.status == "completed"
    return db, settings, before, digest_db(db)


def _level(settings: Settings) -> str:
    with Degradation(settings.db, ttl=0) as client:
        return client.level()


def _pre_rollback_backups(settings: Settings) -> int:
    with Migrator(settings) as m:
        return len(m.journal.backups(kind="pre-rollback"))


@pytest.mark.parametrize("point", ROLLBACK_POINTS)
def test_each_step_failing_recovers_without_losing_data(point: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    db, settings, original, migrated = _migrated_cards(tmp_path)
    step = point.split(".")[1]
    monkeypatch.setenv("SAFEMIGRATE_FAULTS", point)
    with Migrator(settings) as m, pytest.raises((RollbackError, FaultInjected)) as info:
        m.rollback(reason="test: fault injection")
    assert point in str(info.value) or step in str(info.value)
    now = digest_db(db)
    rolled_back_already = STEPS.index(step) > STEPS.index("perform") and step != "validate"
    # never in between: the migrated state (nothing done, or recovered), or fully rolled back
    assert now == (original if rolled_back_already else migrated), step
    with Migrator(settings) as m:
        run = m.journal.runs(1)[0]
        progress = progress_of(m.journal, run["id"])
        events = {e["kind"] for e in m.journal.events(run["id"])}
    if step == "prerequisites":
        assert progress is None, "a refused rollback writes nothing"
        assert _level(settings) == "normal"
    else:
        failed_entry = next(s for s in progress["steps"] if s["name"] == step)
        assert failed_entry["status"] == "failed" and "fault injected" in failed_entry["details"]
        assert all(s["status"] == "done" for s in progress["steps"][:STEPS.index(step)])
        # a fault at the start of perform changed nothing: that attempt simply resumes
        assert progress["status"] == ("recovered" if step == "validate" else "failed")
        assert "rollback.failed" in events
        protected = STEPS.index(step) > STEPS.index("stop_writes")
        assert _level(settings) == ("maintenance" if protected else "normal")
        if step == "validate":
            assert "rollback.recovered" in events
            assert run["status"] == "completed", "the journal facts are back too"
    monkeypatch.delenv("SAFEMIGRATE_FAULTS")
    with Migrator(settings) as m:
        result = m.rollback(reason="test: again")
        progress = progress_of(m.journal, result.run_id)
        assert m.journal.applied() == {}
        assert m.journal.get_state("schema_version")["version"] is None
    assert result.status == "rolled_back"
    assert digest_db(db) == original
    assert progress["status"] == "completed"
    assert [s["status"] for s in progress["steps"]] == ["done"] * len(STEPS)
    assert _level(settings) == "normal"
    # resumed attempts reuse their pre-rollback backup; a recovered one starts over
    assert _pre_rollback_backups(settings) == (2 if step == "validate" else 1)
    if step == "validate":
        assert progress["attempt"] == 2 and progress["attempts"][0]["status"] == "recovered"


def test_failure_half_way_through_perform_restores_the_pre_rollback_state(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db, settings, original, migrated = _migrated_cards(tmp_path, rows=300)

    def broken(*args: Any, **kwargs: Any) -> int:
        raise RuntimeError("disk went away")

    # the indexes are dropped first; then restoring the backfilled columns fails
    monkeypatch.setattr("safemigrate.rollback.restore_from_shadow", broken)
    with Migrator(settings) as m, pytest.raises(RollbackError, match="recovered"):
        m.rollback(reason="test: half-way")
    assert digest_db(db) == migrated, "the dropped indexes are back: not in between"
    with Migrator(settings) as m:
        run = m.journal.runs(1)[0]
        assert {s["status"] for s in m.journal.steps(run["id"])} == {"done"}
        assert progress_of(m.journal, run["id"])["status"] == "recovered"
    monkeypatch.undo()
    with Migrator(settings) as m:
        assert m.rollback(reason="test: again").status == "rolled_back"
    assert digest_db(db) == original


@pytest.mark.parametrize("kind", ["postgresql", "mysql"])
def test_validation_failure_recovers_on_servers(kind: str, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    url = create_database(kind, tmp_path)
    try:
        generate_into(url, 300, bad_rate=0.0, seed=5)
        settings = _settings(url, tmp_path)
        with Migrator(settings) as m:
            m.run()
            before = _server_rows(m)
        monkeypatch.setenv("SAFEMIGRATE_FAULTS", "rollback.validate")
        with Migrator(settings) as m, pytest.raises(RollbackError, match="recovered"):
            m.rollback(reason="test")
        with Migrator(settings) as m:
            assert _server_rows(m) == before, "back at the pre-rollback (migrated) state"
        monkeypatch.delenv("SAFEMIGRATE_FAULTS")
        with Migrator(settings) as m:
            result = m.rollback(reason="test: again")
            assert result.status == "rolled_back"
            assert all(c.passed for c in result.checks), result.checks
            names = {c.name for c in result.checks}
            assert {"integrity", "foreign-keys", "schema", "content", "performance"} <= names
            assert "smoke:check_card_crud_v2" in names
    finally:
        drop_database(kind, url)


def _server_rows(m: Migrator) -> list[tuple]:
    with m.dialect.engine.connect() as conn:
        return [tuple(r) for r in conn.exec_driver_sql("SELECT * FROM cards ORDER BY id")]


def test_rollback_under_concurrent_application_writes(tmp_path: Path) -> None:
    from test_online import _assert_writes_kept, _migrator, _rows, _start_writer, _stop_writer

    url = create_database("sqlite", tmp_path)
    generate(url, 3000, bad_rate=0.02, seed=7)
    migrator = _migrator(url, tmp_path)
    migrator.run()
    before = _rows(url)
    process, stop, log = _start_writer(url, tmp_path)
    deadline = time.time() + 60
    while time.time() < deadline and len(_rows(url)) == len(before):
        time.sleep(0.05)  # the application is writing before the rollback starts
    try:
        result = Migrator(migrator.settings).rollback(reason="test: writes during the rollback")
    finally:
        writes = _stop_writer(process, stop, log)
    assert result.status == "rolled_back"
    assert len(writes) > 10
    after = _rows(url)
    _assert_writes_kept(after, writes)
    assert "search_terms" not in next(iter(after.values()))
    v2 = list(after[next(iter(after))])
    assert all({c: after[i][c] for c in v2} == {c: before[i][c] for c in v2}
               for i in before if i not in writes)
    content = next(c for c in result.checks if c.name == "content")
    assert content.passed, content.details
    migrator.close()


def test_every_level_change_is_seen_by_the_application_client(tmp_path: Path) -> None:
    _db, settings, _original, _migrated = _migrated_cards(tmp_path, rows=200)
    seen: list[tuple[str, str]] = []
    client = Degradation(settings.db, ttl=0)

    def observe(event: Any) -> None:
        if event.kind == "degradation.set":  # committed before it is emitted
            seen.append((event.data["level"], client.level()))

    with Migrator(settings) as m:
        m.bus.subscribe(observe)
        m.rollback(reason="test: observe levels")
    client.close()
    assert seen == [("maintenance", "maintenance"), ("normal", "normal")]


def test_dry_run_prints_the_eight_steps_and_changes_nothing(tmp_path: Path) -> None:
    db, settings, _original, migrated = _migrated_cards(tmp_path, rows=200)
    proc = cli("rollback", "--dry-run", "--db", db, "--migrations", settings.migrations,
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for number, step in enumerate(STEPS, 1):
        assert f"{number}. {step}:" in proc.stdout
    assert "strategy reverse (default)" in proc.stdout
    assert digest_db(db) == migrated


def test_irreversible_step_makes_auto_choose_restore(tmp_path: Path) -> None:
    p = project(tmp_path, "return {'label': row['name'].upper()}", rows=200)
    path = p.migrations / "0001_label.py"
    path.write_text(path.read_text().replace(
        "from safemigrate import Backfill, Migration",
        "from safemigrate import Backfill, Migration, RawSQL").replace(
        'steps=[Backfill(', 'steps=[RawSQL("UPDATE items SET note = note || \'!\'", touches=["items"]), '
        'Backfill('))
    before = p.digest()
    assert p.cli("run").returncode == 0, p.cli("status").stdout
    dry = p.cli("rollback", "--dry-run")
    assert "strategy restore (reverse is impossible: step 0" in dry.stdout, dry.stdout
    done = p.cli("rollback", "--yes", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["strategy"] == "restore"
    assert p.digest() == before


def test_a_running_migration_is_stopped_through_the_control_channel(tmp_path: Path) -> None:
    p = project(tmp_path, "time.sleep(0.003)\nreturn {'label': row['name'].upper()}")
    before = p.digest()
    run = p.start()
    run.wait_event("batch")
    rolled = p.cli("rollback", "--yes", "--reason", "stop it")
    assert rolled.returncode == 0, rolled.stderr
    assert run.finish() == 1 and "aborted" in run.stderr
    assert p.digest() == before
    with p.migrator() as m:
        run_id = m.journal.runs(1)[0]["id"]
        progress = progress_of(m.journal, run_id)
    stop = next(s for s in progress["steps"] if s["name"] == "stop_writes")
    assert "stopped through the control channel" in stop["details"]


# -- verify --after-rollback ---------------------------------------------------------------------
class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        body = b'{"ok": true}' if type(self).status == 200 else b"down"
        self.send_response(type(self).status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def health() -> Iterator[tuple[int, type[_Health]]]:
    handler = type("Health", (_Health,), {"status": 200})
    with local_http_server(handler) as port:
        yield port, handler


def test_verify_after_rollback_reports_each_check(tmp_path: Path, health) -> None:
    port, handler = health
    db = tmp_path / "cards.db"
    generate(db, rows=300, bad_rate=0.0, seed=9)
    shutil.copytree(CARDS_MIGRATIONS, tmp_path / "migrations",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "appchecks.py").write_text(
        "def folders_exist(conn):\n"
        "    n = conn.exec_driver_sql('SELECT COUNT(*) FROM folders').scalar()\n"
        "    assert n > 0, 'no folders'\n"
        "    return f'{n} folders'\n")
    (tmp_path / "safemigrate.toml").write_text(
        f'db = "{db}"\nworkers = 1\n\n'
        '[canaries]\nqueries = ["SELECT COUNT(*) FROM cards WHERE folder_id = 1"]\n\n'
        f'[rollback]\nchecks = ["appchecks:folders_exist"]\napp_url = "{db}"\n'
        f'health_url = "http://127.0.0.1:{port}/health"\ncanary_slack_ms = 200.0\n')
    env = {"PYTHONPATH": str(tmp_path)}
    assert cli("run", cwd=tmp_path, env=env).returncode == 0
    assert cli("rollback", "--yes", cwd=tmp_path, env=env).returncode == 0
    proc = cli("verify", "--after-rollback", "--json", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    expected = {"integrity", "foreign-keys", "schema", "content", "smoke:check_card_crud_v2",
                "smoke:check_search_v2", "smoke:check_folder_query", "smoke:check_tag_query_v2",
                "performance", "access", "health", "check:appchecks:folders_exist"}
    assert expected <= set(checks), sorted(checks)
    assert all(c["passed"] for c in checks.values()), checks
    assert "baseline" in checks["performance"]["details"]
    assert "HTTP 200" in checks["health"]["details"]
    assert checks["check:appchecks:folders_exist"]["details"].endswith("folders")
    # the application goes down: that check fails, every other one still runs and passes
    handler.status = 503
    proc = cli("verify", "--after-rollback", cwd=tmp_path, env=env)
    assert proc.returncode == 1
    assert "HTTP 503" in proc.stdout and "FAILED" in proc.stdout
    assert proc.stdout.count("passed") >= len(expected) - 1
    usage = cli("verify", "--run", "abc", cwd=tmp_path, env=env)
    assert usage.returncode == 2 and "--after-rollback" in usage.stderr


def test_status_shows_a_failed_rollback_step_and_its_resumption(tmp_path: Path) -> None:
    db, settings, original, _migrated = _migrated_cards(tmp_path, rows=200)
    args = ("--db", db, "--migrations", settings.migrations, "--backup-dir", settings.backup_dir)
    failing = cli("rollback", "--yes", *args, cwd=tmp_path, env={"SAFEMIGRATE_FAULTS": "rollback.rebuild"})
    assert failing.returncode != 0
    status = json.loads(cli("status", "--json", *args, cwd=tmp_path).stdout)["run"]["rollback"]
    assert status["status"] == "failed" and status["attempt"] == 1
    by_name = {s["name"]: s["status"] for s in status["steps"]}
    assert by_name["perform"] == "done" and by_name["rebuild"] == "failed"
    assert by_name["validate"] == "pending"
    text = cli("status", *args, cwd=tmp_path).stdout
    assert "5. rebuild: failed" in text
    resumed = cli("rollback", "--yes", *args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    status = json.loads(cli("status", "--json", *args, cwd=tmp_path).stdout)["run"]["rollback"]
    assert status["status"] == "completed" and status["attempt"] == 1, "the same attempt resumed"
    assert [s["status"] for s in status["steps"]] == ["done"] * len(STEPS)
    assert digest_db(db) == original


# -- the restore strategy, step 5, the CLI after a failure, the validator's listings -------------
def _app_write(db: Path, *statements: str) -> None:
    """The application writes (its own connection; waits for the runner's batch to commit)."""
    conn = sqlite3.connect(db, timeout=30)
    try:
        with conn:
            for sql in statements:
                conn.execute(sql)
    finally:
        conn.close()


def test_restore_exports_the_rows_the_application_changed_during_the_migration(
        tmp_path: Path) -> None:
    p = project(tmp_path, "time.sleep(0.01)\nreturn {'label': row['name'].upper()}", rows=300)
    before = p.digest()
    run = p.start()
    run.wait_event("batch")
    _app_write(p.db,
               "INSERT INTO items (id, name, n, note, label) VALUES (9001, 'app-new', 7, "
               "'from the app', 'old')",
               "UPDATE items SET note = 'edited by the app' WHERE id = 5",
               "DELETE FROM items WHERE id = 7")
    assert run.proc.poll() is None, "the application wrote while the migration ran"
    assert run.finish() == 0, run.stderr
    assert p.query("SELECT label FROM items WHERE id = 9001") == [("APP-NEW",)], "migrated too"
    done = p.cli("rollback", "--strategy", "restore", "--yes", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["strategy"] == "restore"
    assert p.digest() == before, "the tables are the snapshot again"
    with p.migrator() as m:
        (snapshot,) = [b for b in m.journal.backups(result["run_id"], kind="snapshot")]
        exported = [e for e in m.journal.events(result["run_id"]) if e["kind"] == "rollback.exported"]
    location = Path(snapshot["location"])
    path = location.with_name(f"{location.stem}.application-changes.jsonl")
    assert path.exists(), sorted(location.parent.iterdir())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600, "it holds application data, like a backup"
    perform = next(s for s in result["steps"] if s["name"] == "perform")
    assert str(path) in perform["details"]
    assert len(exported) == 1 and exported[0]["data"] == {"file": str(path), "rows": 3}
    lines = {tuple(r["key"]): r for r in map(json.loads, path.read_text().splitlines())}
    # just the application's rows: the 300 labels the migration itself wrote are not in it
    assert set(lines) == {(5,), (7,), (9001,)}, sorted(lines)[:10]
    assert all(r["table"] == "items" for r in lines.values())
    assert lines[(9001,)]["change"] == "added"
    assert {k: lines[(9001,)]["row"][k] for k in ("id", "name", "n", "note")} == \
        {"id": 9001, "name": "app-new", "n": 7, "note": "from the app"}
    assert lines[(5,)]["change"] == "changed" and lines[(5,)]["columns"] == ["label", "note"]
    assert lines[(5,)]["row"]["note"] == "edited by the app"
    assert lines[(7,)]["change"] == "deleted" and lines[(7,)]["row"] is None
    # the restore replaced them: the file is where they survive
    assert p.query("SELECT note FROM items WHERE id IN (5, 9001)") == [("note 5",)]


def test_rebuild_step_reindexes_and_analyzes_the_affected_tables(tmp_path: Path) -> None:
    db, settings, original, _migrated = _migrated_cards(tmp_path, rows=300)
    # planner statistics gone stale while the migration ran
    _app_write(db, "UPDATE sqlite_stat1 SET stat = '1 1' WHERE idx = 'idx_cards_folder_id'")
    executed: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        executed.append(" ".join(statement.split()))

    sa.event.listen(sa.engine.Engine, "before_cursor_execute", record)
    try:
        with Migrator(settings) as m:
            result = m.rollback(reason="test: rebuild")
            progress = progress_of(m.journal, result.run_id)
            events = [e for e in m.journal.events(result.run_id)
                      if e["kind"] == "rollback.step.done" and e["data"]["step"] == "rebuild"]
    finally:
        sa.event.remove(sa.engine.Engine, "before_cursor_execute", record)
    assert digest_db(db) == original
    rebuild = next(s for s in progress["steps"] if s["name"] == "rebuild")
    assert rebuild["status"] == "done"
    assert re.search(r'REINDEX "?cards"?', rebuild["details"]), rebuild["details"]
    assert rebuild["details"].endswith("statistics refreshed: cards"), rebuild["details"]
    assert len(events) == 1 and events[0]["data"]["details"] == rebuild["details"]
    reindex = [i for i, sql in enumerate(executed) if re.fullmatch(r'REINDEX "?cards"?', sql)]
    analyze = [i for i, sql in enumerate(executed) if re.fullmatch(r'ANALYZE "?cards"?', sql)]
    assert reindex and analyze and reindex[-1] < analyze[-1], "rebuilt, then statistics"
    # the index of the v2 schema is there, valid and used; the migration's own are gone
    indexes = {r[1] for r in query(db, "PRAGMA index_list(cards)")}
    assert "idx_cards_folder_id" in indexes
    assert not indexes & {"idx_cards_content_hash", "idx_cards_style_type"}
    assert query(db, "PRAGMA integrity_check") == [("ok",)]
    plan = " ".join(r[-1] for r in query(db, "EXPLAIN QUERY PLAN SELECT id FROM cards "
                                             "WHERE folder_id = 1"))
    assert "idx_cards_folder_id" in plan, plan
    by_index = query(db, "SELECT id FROM cards INDEXED BY idx_cards_folder_id "
                         "WHERE folder_id = 1 ORDER BY id")
    assert by_index and by_index == query(db, "SELECT id FROM cards NOT INDEXED "
                                              "WHERE folder_id = 1 ORDER BY id")
    (count,) = query(db, "SELECT COUNT(*) FROM cards")[0]
    (stat1,) = query(db, "SELECT stat FROM sqlite_stat1 WHERE idx = 'idx_cards_folder_id'")
    assert stat1[0].split()[0] == str(count), "ANALYZE refreshed the stale statistics"


def test_cli_rollback_after_a_validation_failure_says_what_to_do_and_recovers(
        tmp_path: Path) -> None:
    db, settings, _original, migrated = _migrated_cards(tmp_path, rows=200)
    args = ("--db", db, "--migrations", settings.migrations, "--backup-dir", settings.backup_dir)
    proc = cli("rollback", "--yes", *args, cwd=tmp_path,
               env={"SAFEMIGRATE_FAULTS": "rollback.validate"})
    line = assert_one_error_line(proc, 1, tmp_path, "rollback")
    problem, hint = line.split("(hint:", 1)
    assert "step validate failed" in problem and "fault injected" in problem, line
    assert "recovered" in problem and "before the rollback" in problem, line
    assert "safemigrate rollback" in hint and "maintenance mode stays on" in hint, line
    assert digest_db(db) == migrated, "recovered: exactly the state before the rollback"
    with Migrator(settings) as m:
        run = m.journal.runs(1)[0]
        assert run["status"] == "completed"
        assert set(m.journal.applied()) == {"0001_cards_v3"}
        assert progress_of(m.journal, run["id"])["status"] == "recovered"
    assert _level(settings) == "maintenance"


def test_consistency_check_lists_the_rows_the_application_changed(tmp_path: Path) -> None:
    p = project(tmp_path, "return {'label': row['name'].upper()}", rows=100)
    with p.migrator() as m:
        (ran,) = m.run()
    assert ran.status == "completed"
    _app_write(p.db, "UPDATE items SET note = 'app' WHERE id IN (3, 42)",
               "INSERT INTO items (id, name, n, note, label) VALUES (501, 'new', 1, 'app', 'x')",
               "DELETE FROM items WHERE id = 17")
    with p.migrator() as m:
        result = m.rollback(reason="test: listing")
    content = next(c for c in result.checks if c.name == "content")
    assert content.passed, content.details
    listed = re.search(r"kept: items: (\d+) rows, e\.g\. (\[.*\])", content.details)
    assert listed, content.details
    assert int(listed.group(1)) == 4
    assert sorted(json.loads(listed.group(2))) == [[3], [17], [42], [501]]
    assert p.query("SELECT label, COUNT(*) FROM items GROUP BY label") == [("old", 99), ("x", 1)], \
        "labels restored; the application's rows kept"
    proc = p.cli("verify", "--after-rollback", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    checks = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
    assert checks["content"]["details"] == content.details


SLOW_CANARY = ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c "
               "WHERE x < (SELECT n FROM knob)) SELECT COUNT(*) FROM c")


def test_performance_check_compares_canaries_with_the_pre_migration_baseline(
        tmp_path: Path) -> None:
    p = project(tmp_path, "return {'label': row['name'].upper()}", rows=100,
                config=f'[canaries]\nqueries = ["{SLOW_CANARY}"]\n\n'
                '[rollback]\ncanary_tolerance = 0.5\ncanary_slack_ms = 20.0\n')
    _app_write(p.db, "CREATE TABLE knob (n INTEGER NOT NULL)", "INSERT INTO knob VALUES (1)")
    assert p.cli("run").returncode == 0
    with p.migrator() as m:
        run_id = m.journal.runs(1)[0]["id"]
        baseline = m.journal.get_state(f"canaries:{run_id}")
    assert baseline["queries"][SLOW_CANARY]["ms"] is not None, baseline
    # as fast as before: passes, and says what it compared
    with p.migrator() as m:
        result = m.rollback(reason="test: canaries")
    performance = next(c for c in result.checks if c.name == "performance")
    assert performance.passed, performance.details
    assert "baseline" in performance.details and "limit" in performance.details
    # the same canary made expensive: far beyond baseline * 1.5 + 20 ms
    _app_write(p.db, "UPDATE knob SET n = 400000")
    proc = p.cli("verify", "--after-rollback", "--json")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    checks = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
    assert not checks["performance"]["passed"]
    details = checks["performance"]["details"]
    assert details.startswith("slower than before the migration"), details
    after, before, limit = map(float, re.search(
        r"([\d.]+) ms \(baseline ([\d.]+) ms, limit ([\d.]+)\)", details).groups())
    assert after > limit >= before * 1.5 + 20.0 - 0.1
    assert all(c["passed"] for name, c in checks.items() if name != "performance"), checks
