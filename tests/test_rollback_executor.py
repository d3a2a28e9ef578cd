"""The safe rollback executor (seed 3.2.1) and the rollback validator (3.3.1): eight journaled,
resumable steps; each one failing in turn (SAFEMIGRATE_FAULTS) leaves the database either at
the pre-rollback state or fully rolled back after a re-run, never in between."""

from __future__ import annotations

import http.server
import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from backends import create_database, drop_database
from conftest import CARDS_MIGRATIONS, cli, digest_db
from live import project
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
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], handler
    server.shutdown()
    server.server_close()


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
