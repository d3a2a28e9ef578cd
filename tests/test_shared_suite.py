"""One shared suite, every backend: the core, safety-net, guards and rollback promises checked
through the `safemigrate` console script against SQLite, PostgreSQL and MariaDB alike (as
Litestream runs one suite against every replica backend).

Every test takes the `db_url` fixture (sqlite / postgresql / mysql): a fresh database of its own,
dropped afterwards; a server that does not answer skips the test unless
SAFEMIGRATE_REQUIRE_SERVERS=1. The helpers below are backend-neutral: a card database of N rows,
content digests plus the dialect's schema fingerprint of a URL, and the CLI run with `--db URL`.

SIGKILL trials are seeded (`random.Random`): killed after the k-th JSON event line or after a
random delay, resumed until `run` exits 0, and compared with an uninterrupted run on an
identical database of the same backend.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from backends import create_database, drop_database, engine_for
from conftest import CARDS_MIGRATIONS, assert_one_error_line, cli
from killing import run_and_kill
from live import RunProcess
from safemigrate.degrade import Degradation
from safemigrate.dialects import JOURNAL_PREFIX, dialect_for
from safemigrate.digest import database_digest
from safemigrate.examples.cards.generate import generate, generate_into
from safemigrate.examples.cards.transform import WRITES, optimize_card
from safemigrate.lock import RunLock
from safemigrate.migrator import Migrator
from safemigrate.rollback import STEPS, progress_of
from safemigrate.settings import Settings
from safemigrate.urls import normalize_url

ROWS = 2000
BAD_RATE = 0.02
BAD = round(ROWS * BAD_RATE)
SEED = 7
RUN_ARGS = ("--workers", "2", "--batch-size", "200")


# -- backend-neutral helpers -----------------------------------------------------------------------
def is_server(url: str) -> bool:
    return "://" in url


def make_cards(url: str, rows: int = ROWS, bad_rate: float = BAD_RATE, seed: int = SEED) -> None:
    """The v2 card database (folders, cards) with `bad_rate` malformed cards, on any backend."""
    if is_server(url):
        generate_into(url, rows, bad_rate=bad_rate, seed=seed)
    else:
        generate(url, rows, bad_rate=bad_rate, seed=seed)


def db_state(url: str, *, journal: bool = False) -> dict[str, Any]:
    """Content digests and schema fingerprint of the user tables (and with `journal`, the digests
    of the journal tables too)."""
    dialect = dialect_for(normalize_url(url))
    try:
        with dialect.engine.connect() as conn:
            names = dialect.user_tables(conn)
            state = {"tables": database_digest(conn, names),
                     "schema": dialect.schema_fingerprint(conn, names)}
            if journal:
                ours = sorted(n for n in sa.inspect(conn).get_table_names() if n.startswith(JOURNAL_PREFIX))
                state["journal"] = database_digest(conn, ours)
            return state
    finally:
        dialect.dispose()


def journal_tables(url: str) -> list[str]:
    engine = engine_for(url)
    try:
        with engine.connect() as conn:
            return sorted(n for n in sa.inspect(conn).get_table_names() if n.startswith(JOURNAL_PREFIX))
    finally:
        engine.dispose()


def fetch(url: str, sql: str, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
    engine = engine_for(url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text(sql), params or {})]
    finally:
        engine.dispose()


def execute(url: str, sql: str) -> None:
    engine = engine_for(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(sql))
    finally:
        engine.dispose()


def plain(value: Any) -> Any:
    """Drivers disagree on booleans (MariaDB has none): compare them as integers."""
    return int(value) if isinstance(value, bool) else value


def expected_cards(url: str) -> tuple[dict[int, dict[str, Any]], set[int]]:
    """What the card migration must write for each good card, and the cards it must reject."""
    good: dict[int, dict[str, Any]] = {}
    bad: set[int] = set()
    for card_id, front, back, style in fetch(
            url, "SELECT id, front_content, back_content, style FROM cards ORDER BY id"):
        try:
            out = optimize_card({"id": card_id, "front_content": front, "back_content": back,
                                 "style": style})
        except ValueError:
            bad.add(card_id)
            continue
        good[card_id] = {k: plain(v) for k, v in out.items()}
    return good, bad


def migrated_cards(url: str) -> dict[int, dict[str, Any]]:
    rows = fetch(url, f"SELECT id, {', '.join(WRITES)} FROM cards ORDER BY id")
    return {r[0]: {k: plain(v) for k, v in zip(WRITES, r[1:], strict=True)} for r in rows}


def quarantined_keys(url: str, run_id: str) -> list[int]:
    rows = fetch(url, "SELECT pk FROM safemigrate_quarantine WHERE run_id = :r", {"r": run_id})
    return sorted(json.loads(pk)[0] for (pk,) in rows)


def run_statuses(url: str) -> list[str]:
    return [s for (s,) in fetch(url, "SELECT status FROM safemigrate_runs ORDER BY started_at")]


@dataclass
class Workspace:
    """A folder with migrations/ (and optionally safemigrate.toml), and the database URL."""

    root: Path
    url: str

    @property
    def migrations(self) -> Path:
        return self.root / "migrations"

    @property
    def backups(self) -> Path:
        return self.root / "backups"

    def args(self, command: str, *args: Any) -> list[str]:
        words = command.split()
        return [*words, *map(str, args), "--db", self.url, "--migrations", str(self.migrations),
                "--backup-dir", str(self.backups)]

    def sm(self, command: str, *args: Any, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        return cli(*self.args(command, *args), cwd=self.root, timeout=timeout)

    def ok(self, command: str, *args: Any) -> subprocess.CompletedProcess[str]:
        proc = self.sm(command, *args)
        assert proc.returncode == 0, (command, proc.returncode, proc.stdout[-3000:], proc.stderr)
        return proc

    def status(self) -> dict[str, Any]:
        return json.loads(self.ok("status", "--json").stdout)

    def config(self, text: str) -> None:
        (self.root / "safemigrate.toml").write_text(textwrap.dedent(text))

    def write(self, name: str, source: str) -> Path:
        path = self.migrations / name
        path.write_text(textwrap.dedent(source))
        return path

    def settings(self, **extra: Any) -> Settings:
        return Settings(db=self.url, migrations=self.migrations, backup_dir=self.backups, workers=1,
                        **extra)


def workspace(db_url: str, tmp_path: Path, *files: tuple[str, str], cards: bool = True,
              rows: int = ROWS, bad_rate: float = BAD_RATE) -> Workspace:
    make_cards(db_url, rows, bad_rate)
    ws = Workspace(tmp_path / "ws", db_url)
    ws.migrations.mkdir(parents=True)
    if cards:
        shutil.copy(CARDS_MIGRATIONS / "0001_cards_v3.py", ws.migrations)
    for name, source in files:
        ws.write(name, source)
    return ws


def last_json(stdout: str) -> dict[str, Any]:
    return json.loads(stdout.strip().splitlines()[-1])


# -- migrations the tests write ---------------------------------------------------------------------
IRREVERSIBLE = ("0002_shout_folders.py", """\
    from safemigrate import Migration, RawSQL

    migration = Migration(
        id="0002_shout_folders",
        description="folder names in capitals",
        steps=[RawSQL("UPDATE folders SET name = upper(name)", touches=["folders"])],
    )
    """)

STRICT = ("0001_strict_cards.py", """\
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

SYNTAX_ERROR = ("0001_bad.py", """\
    from safemigrate import AddColumn, Migration

    migration = Migration(id="0001_bad", steps=[AddColumn("cards", "x", "TEXT")
    """)

NOTE = ("0001_note.py", """\
    from safemigrate import AddColumn, Migration

    migration = Migration(id="0001_note", steps=[AddColumn("cards", "note", "TEXT")])
    """)

GATED = ("0001_gated.py", """\
    from safemigrate import AddColumn, Migration

    def nightly_import_finished(conn):
        raise RuntimeError("nightly import is running")
    nightly_import_finished.hint = "wait for the nightly import to finish"

    def counts(conn):
        return "cards: " + str(conn.exec_driver_sql("SELECT count(*) FROM cards").scalar())

    migration = Migration(id="0001_gated", steps=[AddColumn("cards", "note", "TEXT")],
                          checks=[nightly_import_finished, counts])
    """)

LABEL = """\
    import time

    from safemigrate import AddColumn, Backfill, Migration

    def label(row):
{body}

    migration = Migration(
        id="0001_label",
        steps=[
            AddColumn("cards", "label", "TEXT"),
            Backfill("cards", label, reads=["front_content"], writes=["label"]),
        ],
    )
    """


def label_migration(body: str) -> tuple[str, str]:
    return "0001_label.py", LABEL.format(body=textwrap.indent(textwrap.dedent(body).strip(), "    " * 2))


FAIL_15 = label_migration("""\
    if row["id"] % 20 in (0, 1, 2):
        raise ValueError("bad row")
    return {"label": "L" + str(row["id"])}
    """)

SLOW_LABEL = label_migration("""\
    time.sleep(0.003)
    return {"label": "L" + str(row["id"])}
    """)


# -- plan ---------------------------------------------------------------------------------------------
def test_plan_counts_rows_and_flags_irreversible_sql(db_url: str, tmp_path: Path) -> None:
    ws = workspace(db_url, tmp_path, IRREVERSIBLE)
    before = db_state(db_url)
    planned = json.loads(ws.ok("plan", "--json").stdout)
    assert [p["id"] for p in planned] == ["0001_cards_v3", "0002_shout_folders"]
    cards, shout = planned
    assert [s["rows"] for s in cards["steps"] if s["kind"] == "backfill"] == [ROWS]
    sql = "\n".join(line for s in cards["steps"] for line in s["sql"])
    assert "search_terms" in sql and "idx_cards_content_hash" in sql
    assert cards["irreversible"] == [] and cards["disk_needed"] > 0
    assert shout["irreversible"] == [0] and shout["steps"][0]["reversible"] is False
    assert shout["steps"][0]["sql"] == ["UPDATE folders SET name = upper(name)"]
    text = ws.ok("plan").stdout
    assert f"{ROWS:,}" in text and "irreversible steps" in text
    dry = json.loads(ws.ok("run", "--dry-run", "--json").stdout)
    assert [p["id"] for p in dry] == ["0001_cards_v3", "0002_shout_folders"]
    assert db_state(db_url) == before, "plan and --dry-run change nothing"
    assert not ws.backups.exists() or not any(ws.backups.iterdir())


# -- run, status, verify, rollback (reverse and restore) --------------------------------------------
def test_run_values_quarantine_status_and_both_rollbacks(db_url: str, tmp_path: Path) -> None:
    ws = workspace(db_url, tmp_path)
    original = db_state(db_url)
    good, bad = expected_cards(db_url)
    assert len(bad) == BAD

    for strategy in ("reverse", "restore"):
        ws.ok("run", *RUN_ARGS)
        status = ws.status()
        run = status["run"]
        assert (run["status"], run["rows_done"], run["quarantined"]) == ("completed", ROWS, BAD)
        assert status["applied"] == ["0001_cards_v3"] and status["pending"] == []
        assert quarantined_keys(db_url, run["id"]) == sorted(bad)
        after = migrated_cards(db_url)
        assert set(after) == set(good) | bad, "no card dropped or added"
        wrong = [i for i in good if after[i] != good[i]]
        assert not wrong, f"{len(wrong)} cards migrated wrongly, e.g. {wrong[:5]}"
        assert all(set(after[i].values()) == {None} for i in bad), "a quarantined card was written"
        for table in ("folders",):  # not declared as written: bit-for-bit unchanged
            assert db_state(db_url)["tables"][table] == original["tables"][table]
        verified = json.loads(ws.ok("verify", "--json").stdout)
        assert verified["ok"] is True, [c for c in verified["checks"] if not c.get("passed", True)]

        back = ws.ok("rollback", "--yes", "--json", "--strategy", strategy)
        result = last_json(back.stdout)
        assert (result["status"], result["strategy"]) == ("rolled_back", strategy)
        assert db_state(db_url) == original, f"{strategy} rollback is not exact"
        status = ws.status()
        assert status["run"]["status"] == "rolled_back" and status["pending"] == ["0001_cards_v3"]
    again = ws.sm("rollback", "--yes")
    assert again.returncode == 0 and "already rolled back" in again.stdout, again.stderr
    assert db_state(db_url) == original
    assert run_statuses(db_url) == ["rolled_back", "rolled_back"]


# -- validation failure ---------------------------------------------------------------------------------
def test_failing_invariant_rolls_back_with_exit_3(db_url: str, tmp_path: Path) -> None:
    ws = workspace(db_url, tmp_path, STRICT, cards=False)
    original = db_state(db_url)
    proc = ws.sm("run", *RUN_ARGS)
    line = assert_one_error_line(proc, 3, ws.root, "run")
    assert "every_card_has_search_terms" in line
    assert db_state(db_url) == original, "the automatic rollback returns the original content and schema"
    assert run_statuses(db_url) == ["rolled_back"]
    assert fetch(db_url, "SELECT count(*) FROM safemigrate_applied") == [(0,)]
    assert not [t for t in journal_tables(db_url) if t.startswith("safemigrate_shadow_")]
    kinds = {k for (k,) in fetch(db_url, "SELECT kind FROM safemigrate_events")}
    assert {"validation.check", "rollback.started", "rollback.completed"} <= kinds


# -- bad migration files --------------------------------------------------------------------------------
def test_malformed_or_edited_migration_file_exits_2_and_changes_nothing(db_url: str, tmp_path: Path) -> None:
    ws = workspace(db_url, tmp_path, SYNTAX_ERROR, cards=False)
    original = db_state(db_url)
    for command in ("run", "plan"):
        line = assert_one_error_line(ws.sm(command), 2, ws.root, command)
        assert "0001_bad.py" in line
    assert db_state(db_url) == original
    assert journal_tables(db_url) == [], "a broken migration file must not touch the database"

    (ws.migrations / "0001_bad.py").unlink()
    path = ws.write(*NOTE)
    ws.ok("run", "--workers", "1")
    path.write_text(path.read_text() + "\n# a harmless-looking edit\n")
    applied = db_state(db_url, journal=True)
    for command in ("plan", "status", "verify"):  # read-only: they report or refuse, never write
        ws.sm(command)
    line = assert_one_error_line(ws.sm("run"), 2, ws.root, "run")
    assert "edited" in line and "0001_note" in line
    assert_one_error_line(ws.sm("rollback", "--yes"), 2, ws.root, "rollback")
    assert db_state(db_url, journal=True) == applied, "nothing changed, journal included"


# -- pre-migration checks -------------------------------------------------------------------------------
def test_check_passes_when_healthy_and_fails_on_a_held_lock_or_a_failing_check(
        db_url: str, tmp_path: Path) -> None:
    ws = workspace(db_url, tmp_path)
    original = db_state(db_url)
    proc = ws.sm("check", "--json")
    report = json.loads(proc.stdout)
    assert proc.returncode == (0 if report["ready"] else 1), proc.stderr
    failed = {c["name"]: c["details"] for c in report["checks"] if c["verdict"] == "failed"}
    # a busy test machine may fail a load check; nothing about this database may fail
    assert not failed.keys() - {"cpu-load", "memory"}, failed
    verdicts = {c["name"]: c["verdict"] for c in report["checks"]}
    assert verdicts["lock"] == "passed" and verdicts["migration-state"] == "passed"
    assert verdicts["sample:0001_cards_v3#6"] == "warning"  # 2% malformed: quarantined, not failed
    assert journal_tables(db_url) == [] and db_state(db_url) == original, "check writes nothing"

    # another run holds the migration lock
    with Migrator(ws.settings()) as other:
        other._open(write=True)
        lock = RunLock(other.journal, purpose="run")
        lock.acquire()
        try:
            proc = ws.sm("check", "--json")
            held = next(c for c in json.loads(proc.stdout)["checks"] if c["name"] == "lock")
            assert proc.returncode == 1, proc.stderr
            assert held["verdict"] == "failed" and f"pid {os.getpid()}" in held["details"]
            refused = ws.sm("run", *RUN_ARGS)
            assert refused.returncode != 0 and refused.returncode != 3, refused.stderr
        finally:
            lock.release()
    assert db_state(db_url) == original
    proc = ws.sm("check", "--json")
    assert {c["name"]: c["verdict"] for c in json.loads(proc.stdout)["checks"]}["lock"] == "passed"

    # a migration's own check fails: check exits 1, run refuses before anything changes
    (ws.migrations / "0001_cards_v3.py").unlink()
    ws.write(*GATED)
    proc = ws.sm("check", "--json")
    assert proc.returncode == 1, proc.stderr
    outcomes = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
    gate = outcomes["0001_gated:nightly_import_finished"]
    assert gate["verdict"] == "failed" and "nightly import is running" in gate["details"]
    assert gate["hint"] == "wait for the nightly import to finish"
    assert outcomes["0001_gated:counts"]["details"] == f"cards: {ROWS}"
    line = assert_one_error_line(ws.sm("run"), 1, ws.root, "run")
    assert "nightly_import_finished" in line
    assert db_state(db_url) == original
    assert not ws.backups.exists() or not [p for p in ws.backups.rglob("*") if p.is_file()], \
        "no snapshot before the checks pass"


# -- backups --------------------------------------------------------------------------------------------
def test_backup_create_verify_restore_and_a_flipped_byte(db_url: str, tmp_path: Path) -> None:
    ws = workspace(db_url, tmp_path)
    original = db_state(db_url)
    created = json.loads(ws.ok("backup create", "--json").stdout)
    assert created["tables"] == ["cards", "folders"]
    snapshot = Path(created["path"])
    assert snapshot.is_file()
    ws.ok("backup verify", created["id"])

    execute(db_url, "DELETE FROM cards WHERE id > 1500")
    execute(db_url, "UPDATE folders SET name = 'renamed'")
    assert db_state(db_url) != original
    restored = ws.ok("backup restore", created["id"], "--in-place", "--yes")
    assert "content digests equal" in " ".join(restored.stdout.split())
    assert db_state(db_url) == original

    data = bytearray(snapshot.read_bytes())
    data[len(data) // 2] ^= 0x01
    snapshot.write_bytes(bytes(data))
    proc = ws.sm("backup verify", created["id"])
    line = assert_one_error_line(proc, 1, ws.root, "backup")
    assert "layer snapshot" in line and "corrupted" in line and created["id"] in line
    execute(db_url, "DELETE FROM cards WHERE id > 1900")
    damaged = db_state(db_url)
    refused = ws.sm("backup restore", created["id"], "--in-place", "--yes")
    assert refused.returncode == 1 and "corrupted" in refused.stderr, refused.stderr
    assert db_state(db_url) == damaged, "a refused restore must not change anything"


# -- guards ---------------------------------------------------------------------------------------------
def test_error_rate_guard_trips_and_rolls_back_with_exit_3(db_url: str, tmp_path: Path) -> None:
    ws = workspace(db_url, tmp_path, FAIL_15, cards=False)
    ws.config("""\
        [guards]
        error_rate_min_rows = 300
        [checks]
        max_quarantine_rate = 1.0
        """)
    original = db_state(db_url)
    proc = ws.sm("run", *RUN_ARGS)
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr
    assert "guard error_rate tripped" in proc.stderr and "rolled back" in proc.stderr
    assert db_state(db_url) == original, "the original content and schema, exactly"
    assert ws.status()["run"]["status"] == "rolled_back"
    events = json.loads(ws.ok("history", "--json").stdout)[0]["events"]
    tripped = next(e for e in events if e["kind"] == "guard.tripped")
    figures = tripped["data"]["figures"]
    assert tripped["level"] == "critical" and figures["error_rate"] > 0.10
    assert figures["processed"] >= 300
    decision = next(e for e in events if e["kind"] == "guard.decision")
    assert decision["data"]["decision"] == "rollback"
    assert any(e["kind"] == "rollback.completed" for e in events)


# -- control from another process --------------------------------------------------------------------
def test_pause_resume_and_abort_from_another_process(db_url: str, tmp_path: Path) -> None:
    ws = workspace(db_url, tmp_path, SLOW_LABEL, cards=False)
    ws.config("[guards]\nautotune = false\n")
    done = "SELECT count(*) FROM cards WHERE label IS NOT NULL"
    run = RunProcess(ws.root, *ws.args("", "--workers", "1", "--batch-size", "100"))
    try:
        run.wait_event("batch")
        paused = ws.sm("pause", "--reason", "peak traffic", "--by", "ops")
        assert paused.returncode == 0, paused.stderr
        event = run.wait_event("control.paused")
        assert event["data"] == {"by": "ops", "reason": "peak traffic"}
        status = run.wait_for(lambda: (s := ws.status())["run"]["metrics"]["paused"] and s, 15,
                              "the paused state in status")
        assert status["control"]["paused"] and status["control"]["pause_reason"] == "peak traffic"
        frozen = fetch(db_url, done)[0][0]
        time.sleep(1.5)
        assert fetch(db_url, done)[0][0] == frozen < ROWS, "nothing moves while paused"
        assert run.proc.poll() is None
        assert ws.sm("resume").returncode == 0
        run.wait_event("control.resumed")
        run.wait_for(lambda: fetch(db_url, done)[0][0] > frozen, 30, "progress after resume")
        aborted = ws.sm("abort", "--reason", "wrong window")
        assert aborted.returncode == 0, aborted.stderr
        assert run.finish() == 1, run.stderr
        assert "aborted by" in run.stderr and "wrong window" in run.stderr
    finally:
        run.kill()
    status = ws.status()
    assert status["run"]["status"] == "interrupted" and status["control"]["abort"] is None
    assert 0 < fetch(db_url, done)[0][0] < ROWS
    again = ws.ok("run", "--workers", "1")
    assert "resuming run" in again.stdout
    assert fetch(db_url, "SELECT count(*) FROM cards WHERE label = " + concat_label(db_url)) == [(ROWS,)]
    kinds = {e["kind"] for e in json.loads(ws.ok("history", "--json").stdout)[0]["events"]}
    assert {"control.pause", "control.paused", "control.resume", "control.resumed"} <= kinds


def concat_label(url: str) -> str:
    """SQL for 'L' || id on this backend."""
    if url.startswith("mysql"):
        return "CONCAT('L', id)"
    if is_server(url):
        return "'L' || id::text"
    return "'L' || id"


# -- SIGKILL: resume and rollback ---------------------------------------------------------------------
CRASH_TRIALS = 3


def cards_result(url: str) -> dict[str, Any]:
    """What a finished card run must have produced: content of cards, quarantine, step counts."""
    runs = fetch(url, "SELECT id, status FROM safemigrate_runs WHERE status <> 'rolled_back'")
    assert len(runs) == 1, runs
    run_id, status = runs[0]
    steps = fetch(url, "SELECT rows_done, rows_quarantined, rows_total FROM safemigrate_steps "
                       "WHERE run_id = :r AND kind = 'backfill'", {"r": run_id})
    return {"status": status, "cards": db_state(url)["tables"]["cards"],
            "quarantine": quarantined_keys(url, run_id), "steps": [tuple(s) for s in steps]}


_REFERENCE: dict[str, dict[str, Any]] = {}


def reference(backend: str, tmp_path: Path) -> dict[str, Any]:
    """An uninterrupted run on an identical database of `backend` (computed once per backend)."""
    if backend not in _REFERENCE:
        where = tmp_path / "reference"
        where.mkdir()
        url = create_database(backend, where)
        try:
            ws = workspace(url, where)
            ws.ok("run", *RUN_ARGS, "--json")
            state = cards_result(url)
        finally:
            drop_database(backend, url)
        assert state["status"] == "completed"
        assert len(state["quarantine"]) == BAD
        assert state["steps"] == [(ROWS, BAD, ROWS)]
        _REFERENCE[backend] = state
    return _REFERENCE[backend]


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(CRASH_TRIALS))
def test_killed_runs_resume_to_the_uninterrupted_result(backend: str, db_url: str, tmp_path: Path,
                                                        trial: int) -> None:
    expected = reference(backend, tmp_path)
    rng = random.Random(5000 + trial)
    ws = workspace(db_url, tmp_path)
    original = db_state(db_url)
    args = ws.args("run", *RUN_ARGS, "--json")
    kills: list[str] = []  # the last event each killed process printed
    for _ in range(rng.randint(1, 3)):
        outcome = run_and_kill(args, ws.root, rng, max_lines=60, max_delay=4.0)
        if not outcome.killed:
            assert outcome.returncode == 0, f"an unkilled run failed: {outcome.lines[-3:]}"
            break
        kills.append(outcome.lines[-1]["kind"] if outcome.lines else "(startup)")
    final = ws.sm("run", *RUN_ARGS)
    assert final.returncode == 0, (kills, final.stderr)
    state = cards_result(db_url)
    assert state["status"] == "completed"
    assert state["cards"] == expected["cards"], f"content differs after kills at {kills}"
    assert state["quarantine"] == expected["quarantine"], f"quarantine differs after kills at {kills}"
    assert state["steps"] == expected["steps"], kills
    assert db_state(db_url)["tables"]["folders"] == original["tables"]["folders"]
    assert fetch(db_url, "SELECT count(*) FROM safemigrate_lock") == [(0,)]
    if trial == 0:  # and the result still rolls back to exactly the original
        back = ws.sm("rollback", "--yes")
        assert back.returncode == 0, back.stderr
        assert db_state(db_url) == original


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["reverse", "restore"])
def test_kill_then_rollback_restores_the_original(backend: str, db_url: str, tmp_path: Path,
                                                  strategy: str) -> None:
    rng = random.Random(6000 + ("reverse", "restore").index(strategy))
    ws = workspace(db_url, tmp_path)
    original = db_state(db_url)
    # killed at a random instant after the run exists (its first event is run.started)
    run_and_kill(ws.args("run", *RUN_ARGS, "--json"), ws.root, rng, max_lines=60, max_delay=4.0,
                 min_lines=1)
    back = ws.sm("rollback", "--yes", "--strategy", strategy)
    assert back.returncode == 0, back.stdout[-2000:] + back.stderr
    assert db_state(db_url) == original, f"{strategy} rollback after a kill is not exact"
    assert run_statuses(db_url) == ["rolled_back"]
    assert fetch(db_url, "SELECT count(*) FROM safemigrate_applied") == [(0,)]
    assert not [t for t in journal_tables(db_url) if t.startswith("safemigrate_shadow_")]


# -- SIGKILL during a rollback, then `rollback` again --------------------------------------------------
KILLED_ROLLBACK_TRIALS = 3


def degradation_level(url: str) -> str:
    with Degradation(url, ttl=0) as client:
        return client.level()


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(KILLED_ROLLBACK_TRIALS))
def test_killed_rollback_repeated_until_it_succeeds(backend: str, db_url: str, tmp_path: Path,
                                                    trial: int) -> None:
    rng = random.Random(f"killed-rollback-{backend}-{trial}")
    strategy = ("reverse", "restore")[trial % 2]
    ws = workspace(db_url, tmp_path)
    original = db_state(db_url)
    ws.ok("run", *RUN_ARGS)
    args = ws.args("rollback", "--yes", "--json", "--strategy", strategy)
    kills: list[str] = []  # the last event each killed rollback printed
    for _ in range(8):  # `rollback` again until one is not killed (after the end it says so)
        outcome = run_and_kill(args, ws.root, rng, max_lines=20, max_delay=0.4)
        if not outcome.killed:
            assert outcome.returncode == 0, (kills, outcome.lines[-3:])
            break
        kills.append(outcome.lines[-1].get("kind", "(result)") if outcome.lines else "(startup)")
        (status,) = run_statuses(db_url)
        if status == "rolling_back" and trial == 0:
            # a half-done rollback blocks new runs until it is finished
            blocked = ws.sm("run", *RUN_ARGS)
            assert blocked.returncode == 2, (kills, blocked.stderr)
            assert "rollback" in blocked.stderr
    else:
        final = ws.sm("rollback", "--yes", "--strategy", strategy)
        assert final.returncode == 0, (kills, final.stdout[-2000:], final.stderr)
    assert db_state(db_url) == original, f"{strategy} rollback killed at {kills} is not exact"
    assert run_statuses(db_url) == ["rolled_back"], kills
    assert fetch(db_url, "SELECT count(*) FROM safemigrate_applied") == [(0,)], kills
    # a rollback killed after its last commit may leave its lock: a dead runner's, taken over
    checked = ws.sm("check", "--json")
    lock = next(c for c in json.loads(checked.stdout)["checks"] if c["name"] == "lock")
    assert lock["verdict"] == "passed" or (lock["verdict"] == "warning"
                                           and "dead runner" in lock["details"]), (kills, lock)
    assert not [t for t in journal_tables(db_url) if t.startswith("safemigrate_shadow_")], kills
    assert degradation_level(db_url) == "normal", f"maintenance mode left on after kills at {kills}"


# -- each rollback step failing (fault injection) --------------------------------------------------------
@pytest.mark.parametrize("point", ["rollback.perform", "rollback.rebuild", "rollback.validate"])
def test_failed_rollback_step_loses_no_data_and_a_second_rollback_completes(
        db_url: str, tmp_path: Path, point: str) -> None:
    ws = workspace(db_url, tmp_path)
    original = db_state(db_url)
    ws.ok("run", *RUN_ARGS)
    migrated = db_state(db_url)
    step = point.split(".")[1]
    proc = cli(*ws.args("rollback", "--yes"), cwd=ws.root, env={"SAFEMIGRATE_FAULTS": point})
    line = assert_one_error_line(proc, 1, ws.root, "rollback")
    assert "fault injected" in line and step in line, line
    # never in between: before the data is restored the pre-rollback state (a failed validation
    # is recovered to it); a failed rebuild comes after the data is already the original
    assert db_state(db_url) == (original if step == "rebuild" else migrated), step
    with Migrator(ws.settings()) as m:
        run = m.journal.runs(1)[0]
        progress = progress_of(m.journal, run["id"])
        events = {e["kind"] for e in m.journal.events(run["id"])}
        applied = set(m.journal.applied())
    failed = next(s for s in progress["steps"] if s["name"] == step)
    assert failed["status"] == "failed" and "fault injected" in failed["details"]
    assert all(s["status"] == "done" for s in progress["steps"][:STEPS.index(step)])
    assert progress["status"] == ("recovered" if step == "validate" else "failed")
    assert "rollback.failed" in events
    assert degradation_level(db_url) == "maintenance", "writes stay stopped until it is finished"
    if step == "validate":
        assert "rollback.recovered" in events
        assert run["status"] == "completed" and applied == {"0001_cards_v3"}

    back = ws.ok("rollback", "--yes", "--json")
    result = last_json(back.stdout)
    assert result["status"] == "rolled_back"
    assert db_state(db_url) == original
    with Migrator(ws.settings()) as m:
        progress = progress_of(m.journal, result["run_id"])
        pre_rollback = m.journal.backups(kind="pre-rollback")
        assert m.journal.applied() == {}
    assert progress["status"] == "completed"
    assert [s["status"] for s in progress["steps"]] == ["done"] * len(STEPS)
    # a resumed attempt reuses its pre-rollback backup; a recovered one starts over
    assert len(pre_rollback) == (2 if step == "validate" else 1)
    assert degradation_level(db_url) == "normal"
    assert run_statuses(db_url) == ["rolled_back"]


# -- the run timeout guard -------------------------------------------------------------------------------
SLOWER_LABEL = label_migration("""\
    time.sleep(0.01)
    return {"label": "L" + str(row["id"])}
    """)


def test_run_timeout_guard_trips_rolls_back_and_exits_3(db_url: str, tmp_path: Path) -> None:
    ws = workspace(db_url, tmp_path, SLOWER_LABEL, cards=False)  # ~10 s of transform, 2 workers
    # a small pre-migration sample: the checks try the transform on it before the run's timer
    ws.config("[guards]\nmax_run_seconds = 2\nautotune = false\n[checks]\nsample_rows = 20\n")
    original = db_state(db_url)
    proc = ws.sm("run", *RUN_ARGS, "--json")
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr
    assert "guard timeout tripped" in proc.stderr and "maximum of 2s" in proc.stderr, proc.stderr
    assert "rolled back" in proc.stderr
    kinds = [json.loads(line)["kind"] for line in proc.stdout.splitlines()]
    assert "batch" in kinds[:kinds.index("guard.tripped")], "tripped in the middle of the backfill"
    assert db_state(db_url) == original, "the original content and schema, exactly"
    assert ws.status()["run"]["status"] == "rolled_back"
    events = json.loads(ws.ok("history", "--json").stdout)[0]["events"]
    tripped = next(e for e in events if e["kind"] == "guard.tripped")
    figures = tripped["data"]["figures"]
    assert tripped["data"]["guard"] == "timeout" and tripped["level"] == "critical"
    assert figures["limit"] == 2 and 2 < figures["elapsed"] < 8, figures
    decision = next(e for e in events if e["kind"] == "guard.decision")
    assert decision["data"]["decision"] == "rollback"
    assert any(e["kind"] == "rollback.completed" for e in events)


# -- user impact: a canary query made slow --------------------------------------------------------------
def slow_canary(url: str) -> str:
    """A canary that takes `canary_delay.delay` seconds (SQLite: a recursive count of about that)."""
    if url.startswith("mysql"):
        return "SELECT SLEEP(delay) FROM canary_delay"
    if is_server(url):
        return "SELECT pg_sleep(delay) FROM canary_delay"
    return ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c "
            "WHERE x < (SELECT delay FROM canary_delay) * 8000000) SELECT count(*) FROM c")


def test_slow_canary_throttles_the_run_until_it_is_fast_again(db_url: str, tmp_path: Path) -> None:
    ws = workspace(db_url, tmp_path, SLOW_LABEL, cards=False)
    execute(db_url, "CREATE TABLE canary_delay (id INTEGER PRIMARY KEY, delay FLOAT NOT NULL)")
    execute(db_url, "INSERT INTO canary_delay (id, delay) VALUES (1, 0)")
    sql = slow_canary(db_url)
    ws.config(f"""\
        [guards]
        autotune = false
        max_load = {{}}
        [canaries]
        queries = ["{sql}"]
        interval = 0.1
        throttle_ms = 200
        critical_ms = 60000
        recover_rounds = 3
        """)
    done = "SELECT count(*) FROM cards WHERE label IS NOT NULL"
    run = RunProcess(ws.root, *ws.args("", "--workers", "1", "--batch-size", "100"))
    try:
        run.wait_event("batch")
        seen = len(run.lines)  # a throttle before the canary was made slow does not count

        def after(kind: str) -> dict[str, Any] | None:
            return next((e for e in run.lines[seen:] if e.get("kind") == kind
                         and e["data"].get("guard") == "user_impact"), None)

        execute(db_url, "UPDATE canary_delay SET delay = 0.5")
        throttle = run.wait_for(lambda: after("guard.throttle"), 30, "a canary throttle")
        assert "canary query" in throttle["message"], throttle
        assert throttle["data"]["figures"]["throttle_ms"] == 200
        took = re.search(r"took (\d+) ms", throttle["message"])
        assert took and int(took.group(1)) > 200, throttle["message"]
        time.sleep(0.8)  # the batch in flight when the throttle began commits
        frozen = fetch(db_url, done)[0][0]
        time.sleep(1.0)
        assert fetch(db_url, done)[0][0] == frozen < ROWS, "no batch starts while throttled"
        seen = len(run.lines)
        execute(db_url, "UPDATE canary_delay SET delay = 0")
        run.wait_for(lambda: after("guard.healthy"), 30, "the canary healthy again")
        assert run.finish() == 0, run.stderr
    finally:
        run.kill()
    assert fetch(db_url, "SELECT count(*) FROM cards WHERE label = " + concat_label(db_url)) == [(ROWS,)]
    kinds = [e["kind"] for e in json.loads(ws.ok("history", "--json").stdout)[0]["events"]]
    assert "guard.throttle" in kinds and "guard.healthy" in kinds
    assert "guard.tripped" not in kinds


KILL_AT_SERVICE = """\
import os
import sys
from pathlib import Path

import safemigrate.degrade as degrade
from safemigrate.migrator import Migrator
from safemigrate.settings import Settings

real = degrade.DegradationManager.set_level


def set_level(self, level, *args, **kwargs):
    if level != "maintenance":  # the service step, after the run is marked rolled back
        os._exit(137)  # as SIGKILL: no cleanup, no more journal writes
    return real(self, level, *args, **kwargs)


degrade.DegradationManager.set_level = set_level
db, migrations, backups = sys.argv[1:]
settings = Settings(db=db, migrations=Path(migrations), backup_dir=Path(backups), workers=1)
with Migrator(settings) as m:
    m.rollback(reason="killed in the service step")
"""


def test_rollback_killed_after_marking_the_run_rolled_back_resumes_and_lifts_maintenance(
        db_url: str, tmp_path: Path) -> None:
    ws = workspace(db_url, tmp_path)
    original = db_state(db_url)
    ws.ok("run", *RUN_ARGS)
    killed = subprocess.run([sys.executable, "-c", KILL_AT_SERVICE, db_url, str(ws.migrations),
                             str(ws.backups)], cwd=ws.root, capture_output=True, text=True,
                            timeout=240)
    assert killed.returncode == 137, killed.stderr
    assert run_statuses(db_url) == ["rolled_back"] and db_state(db_url) == original
    assert degradation_level(db_url) == "maintenance", "killed before maintenance mode was lifted"
    again = ws.ok("rollback", "--yes")
    assert "nothing to do" not in again.stdout, again.stdout
    assert "finish the interrupted rollback" in again.stdout and "resuming the rollback" in again.stdout
    assert degradation_level(db_url) == "normal", "the second rollback finishes the service step"
    assert db_state(db_url) == original and run_statuses(db_url) == ["rolled_back"]
    with Migrator(ws.settings()) as m:
        progress = progress_of(m.journal, m.journal.runs(1)[0]["id"])
    assert progress["status"] == "completed"
    assert [s["status"] for s in progress["steps"]] == ["done"] * len(STEPS)
    third = ws.ok("rollback", "--yes")
    assert "already rolled back; nothing to do" in " ".join(third.stdout.split())
