"""Invariant 2 under SIGKILL: `safemigrate run` killed at random instants and resumed ends exactly
where an uninterrupted run ends; `rollback` after a kill (or killed itself, then repeated)
returns the original content and schema.

Kills are seeded (`random.Random`): after the k-th JSON event line, or after a random delay.
A SIGKILLed runner's lock is taken over by the next run because its pid is gone.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest

from conftest import CARDS_MIGRATIONS, cli, digest_db, query
from killing import run_and_kill
from safemigrate.examples.cards import generate

ROWS = 5000
BAD_RATE = 0.02
SEED = 2024
RUN_ARGS = ("--workers", "2", "--batch-size", "200", "--json")
RUN_TRIALS = 8
MAX_KILLS = 4


def cards_state(db: Path) -> dict[str, Any]:
    """What a finished run must have produced: content digest of cards and the quarantine."""
    runs = query(db, "SELECT id, status FROM safemigrate_runs WHERE status != 'rolled_back'")
    assert len(runs) == 1, runs
    run_id, status = runs[0]
    pks = sorted(json.loads(pk)[0] for (pk,) in
                 query(db, "SELECT pk FROM safemigrate_quarantine WHERE run_id = ?", (run_id,)))
    steps = query(db, "SELECT rows_done, rows_quarantined, rows_total FROM safemigrate_steps "
                      "WHERE run_id = ? AND kind = 'backfill'", (run_id,))
    return {"status": status, "cards": digest_db(db, ["cards"])["tables"]["cards"],
            "quarantine": pks, "steps": steps}


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "cards.db"
    generate(path, rows=ROWS, bad_rate=BAD_RATE, seed=SEED)
    return path


@pytest.fixture(scope="module")
def reference(template: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An uninterrupted run on an identical database (same seed)."""
    work = tmp_path_factory.mktemp("reference")
    db = work / "cards.db"
    generate(db, rows=ROWS, bad_rate=BAD_RATE, seed=SEED)
    proc = cli("run", "--db", db, "--migrations", CARDS_MIGRATIONS, "--backup-dir", work / "b",
               *RUN_ARGS, cwd=work)
    assert proc.returncode == 0, proc.stderr
    state = cards_state(db)
    assert state["status"] == "completed"
    assert len(state["quarantine"]) == round(ROWS * BAD_RATE)
    assert state["steps"] == [(ROWS, round(ROWS * BAD_RATE), ROWS)]
    return state


def fresh(template: Path, work: Path) -> tuple[Path, dict[str, Any]]:
    work.mkdir(parents=True, exist_ok=True)
    db = work / "cards.db"
    shutil.copyfile(template, db)
    return db, digest_db(db)


def run_args(db: Path, work: Path) -> list[str]:
    return ["run", "--db", str(db), "--migrations", str(CARDS_MIGRATIONS),
            "--backup-dir", str(work / "b"), *RUN_ARGS]


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(RUN_TRIALS))
def test_killed_runs_resume_to_the_uninterrupted_result(template: Path, reference: dict[str, Any],
                                                        tmp_path: Path, trial: int) -> None:
    rng = random.Random(1000 + trial)
    db, original = fresh(template, tmp_path)
    kills: list[str] = []  # the last event each killed process printed
    for _ in range(rng.randint(1, MAX_KILLS)):
        outcome = run_and_kill(run_args(db, tmp_path), tmp_path, rng, max_lines=70, max_delay=2.5)
        if not outcome.killed:
            assert outcome.returncode == 0, f"an unkilled run failed: {outcome.lines[-3:]}"
            break
        kills.append(outcome.lines[-1]["kind"] if outcome.lines else "(startup)")
    final = cli(*run_args(db, tmp_path), cwd=tmp_path)
    assert final.returncode == 0, (kills, final.stderr)
    state = cards_state(db)
    assert state["status"] == "completed"
    assert state["cards"] == reference["cards"], f"content differs after kills at {kills}"
    assert state["quarantine"] == reference["quarantine"], f"quarantine differs after kills at {kills}"
    assert state["steps"] == reference["steps"], kills
    # folders (not migrated) untouched; no shadow table left behind
    assert digest_db(db, ["folders"])["tables"] == {"folders": original["tables"]["folders"]}
    assert query(db, "SELECT count(*) FROM safemigrate_lock") == [(0,)]
    if trial % 4:
        return
    # and the result still rolls back to exactly the original
    back = cli("rollback", "--yes", "--db", db, "--migrations", CARDS_MIGRATIONS,
               "--backup-dir", tmp_path / "b", cwd=tmp_path)
    assert back.returncode == 0, back.stderr
    assert digest_db(db) == original


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(3))
def test_kill_then_rollback_restores_the_original(template: Path, reference: dict[str, Any],
                                                  tmp_path: Path, trial: int) -> None:
    rng = random.Random(2000 + trial)
    db, original = fresh(template, tmp_path)
    strategy = ("reverse", "restore")[trial % 2]
    # killed at a random instant after the run exists (its first event is run.started)
    run_and_kill(run_args(db, tmp_path), tmp_path, rng, max_lines=70, max_delay=2.0, min_lines=1)
    back = cli("rollback", "--yes", "--strategy", strategy, "--db", db, "--migrations",
               CARDS_MIGRATIONS, "--backup-dir", tmp_path / "b", cwd=tmp_path)
    assert back.returncode == 0, back.stderr
    assert digest_db(db) == original, f"{strategy} rollback after a kill is not exact"
    assert query(db, "SELECT status FROM safemigrate_runs") == [("rolled_back",)]
    assert query(db, "SELECT count(*) FROM sqlite_master WHERE name LIKE 'safemigrate_shadow_%'") == [(0,)]
    if trial == 0:  # a rolled-back database migrates again, to the uninterrupted result
        again = cli(*run_args(db, tmp_path), cwd=tmp_path)
        assert again.returncode == 0, again.stderr
        state = cards_state(db)
        assert (state["cards"], state["quarantine"]) == (reference["cards"], reference["quarantine"])


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(3))
def test_killed_rollback_repeated_until_it_succeeds(template: Path, tmp_path: Path, trial: int) -> None:
    rng = random.Random(3000 + trial)
    db, original = fresh(template, tmp_path)
    strategy = ("reverse", "restore")[trial % 2]
    done = cli(*run_args(db, tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    args = ["rollback", "--yes", "--json", "--strategy", strategy, "--db", str(db),
            "--migrations", str(CARDS_MIGRATIONS), "--backup-dir", str(tmp_path / "b")]
    kills = 0
    for _ in range(8):
        outcome = run_and_kill(args, tmp_path, rng, max_lines=16, max_delay=1.2)
        if not outcome.killed:
            assert outcome.returncode == 0, outcome.lines[-3:]
            break
        kills += 1
        status = query(db, "SELECT status FROM safemigrate_runs")[0][0]
        if status == "rolled_back":
            break  # killed after its last commit: the rollback is complete
        if status == "rolling_back" and trial == 0:
            # a half-done rollback blocks new runs until it is finished
            blocked = cli(*run_args(db, tmp_path), cwd=tmp_path)
            assert blocked.returncode == 2, blocked.stderr
            assert "rollback" in blocked.stderr
    else:
        final = cli(*args, cwd=tmp_path)
        assert final.returncode == 0, final.stderr
    assert digest_db(db) == original, f"{strategy} rollback killed {kills} times is not exact"
    assert query(db, "SELECT status FROM safemigrate_runs") == [("rolled_back",)]
    assert query(db, "SELECT count(*) FROM safemigrate_applied") == [(0,)]
