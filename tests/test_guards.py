"""Guards (the rollback conditions): each one trips, or throttles, in a test built for it.

A trip rolls the run back automatically (exit 3, original content), journals the decision with
its figures, and reaches hooks; with auto_rollback off the run pauses instead."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from live import SLOW, collect, hold_exclusive, make_items_db, project
from safemigrate import GuardTrippedError
from safemigrate.dialects import SQLiteDialect
from safemigrate.engine import BatchStats
from safemigrate.events import EventBus
from safemigrate.guards import (
    OK,
    THROTTLE,
    TRIP,
    CorruptionGuard,
    DegradationGuard,
    GuardSettings,
    LoadGuard,
    TimeoutGuard,
)
from safemigrate.journal import Journal
from safemigrate.settings import ConfigError, load_settings
from safemigrate.steps import Backfill
from safemigrate.urls import normalize_url

FAIL_15 = """\
if row["n"] % 20 in (0, 1, 2):
    raise ValueError("bad row")
return {"label": row["name"].upper()}
"""

ENV_DUMP = """#!/bin/sh
env | grep '^SAFEMIGRATE_' > "{out}/$SAFEMIGRATE_HOOK.$$.env"
"""


def history_events(p: Any) -> list[dict[str, Any]]:
    result = p.cli("history", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)[0]["events"]


def hook_env(folder: Path, hook: str) -> list[dict[str, str]]:
    out = []
    for path in sorted(folder.glob(f"{hook}.*.env")):
        out.append(dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line))
    return out


def install_hooks(root: Path, names: list[str], script: str = ENV_DUMP) -> Path:
    folder = root / ".safemigrate" / "hooks"
    folder.mkdir(parents=True)
    out = root / "hook-out"
    out.mkdir()
    for name in names:
        path = folder / name
        path.write_text(script.format(out=out))
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return out


def add_trigger(db: Path, action: str) -> None:
    """An application trigger that rewrites what the migration writes, for 1 row in 10."""
    conn = sqlite3.connect(db)
    conn.execute(f"CREATE TRIGGER tamper AFTER UPDATE OF label ON items WHEN NEW.id % 10 = 3 "
                 f"BEGIN {action}; END")
    conn.commit()
    conn.close()


def stats(**kw: Any) -> BatchStats:
    base = dict(run_id="r1", step_idx=0, table="items", rows=100, quarantined_in_batch=0, seconds=0.01,
                write_seconds=0.005, done=100, total=1000, quarantined=0, rate=10000.0, batch_size=100,
                first_key=[1], last_key=[100])
    base.update(kw)
    return BatchStats(**base)


# -- error rate ---------------------------------------------------------------------------------------
def test_error_rate_trips_rolls_back_and_exits_3(tmp_path):
    p = project(tmp_path, FAIL_15, config="[guards]\nerror_rate_min_rows = 300\n")
    out = install_hooks(p.root, ["on-guard", "on-rollback", "on-failure"])
    before = p.digest()
    result = p.cli("run")
    assert result.returncode == 3, result.stdout + result.stderr
    assert "guard error_rate tripped" in result.stderr and "rolled back" in result.stderr
    assert p.digest() == before  # the original content and schema, exactly
    status = p.status()
    assert status["run"]["status"] == "rolled_back"
    events = history_events(p)
    tripped = next(e for e in events if e["kind"] == "guard.tripped")
    figures = tripped["data"]["figures"]
    assert tripped["level"] == "critical" and figures["error_rate"] > 0.10
    assert figures["processed"] >= 300 and figures["failed"] == round(figures["processed"] * 0.15)
    decision = next(e for e in events if e["kind"] == "guard.decision")
    assert decision["data"]["decision"] == "rollback" and decision["data"]["figures"] == figures
    assert any(e["kind"] == "rollback.completed" for e in events)
    guard_env = hook_env(out, "on-guard")
    assert any(e["SAFEMIGRATE_EVENT"] == "guard.tripped" and e["SAFEMIGRATE_GUARD"] == "error_rate"
               for e in guard_env)
    rollback_env = hook_env(out, "on-rollback")
    assert {e["SAFEMIGRATE_EVENT"] for e in rollback_env} >= {"rollback.started", "rollback.completed"}
    assert any(e["SAFEMIGRATE_STATUS"] == "rolled_back" for e in rollback_env)


def test_error_rate_below_the_trip_only_alerts(tmp_path):
    transform = """\
if row["n"] % 25 in (0, 1):
    raise ValueError("bad row")
return {"label": row["name"].upper()}
"""
    p = project(tmp_path, transform, config="[guards]\nerror_rate_min_rows = 300\n")
    with p.migrator() as m:
        events = collect(m.bus)
        m.run()
    assert p.query("SELECT count(*) FROM items WHERE label = upper(name)")[0][0] == 1840
    alerts = [e for e in events if e.kind == "alert" and e.data["alert"] == "error_rate"]
    assert alerts and alerts[0].level == "warning"
    assert alerts[0].data["value"] == pytest.approx(0.08, abs=0.01)
    assert not [e for e in events if e.kind == "guard.tripped"]


def test_auto_rollback_off_pauses_and_notifies_instead(tmp_path):
    p = project(tmp_path, FAIL_15, config="auto_rollback = false\n[guards]\nerror_rate_min_rows = 300\n")
    run = p.start()
    run.wait_event("guard.decision", decision="pause")
    run.wait_event("control.paused")
    assert p.status()["control"]["paused_by"] == "guard:error_rate"
    resumed = p.cli("resume")
    assert resumed.returncode == 0, resumed.stderr
    assert run.finish() == 0, run.stderr
    run.wait_event("guard.acknowledged")
    assert p.status()["run"]["status"] == "completed"


# -- throughput degradation ------------------------------------------------------------------------
SLOWS_DOWN = """\
if row["n"] > 600:
    time.sleep(0.003)
return {"label": row["name"].upper()}
"""


def test_degradation_trips_when_the_transform_slows_down(tmp_path):
    p = project(tmp_path, SLOWS_DOWN, rows=3000, config="[guards]\nautotune = false\n")
    before = p.digest()
    result = p.cli("run")
    assert result.returncode == 3, result.stdout + result.stderr
    assert "guard degradation tripped" in result.stderr
    assert p.digest() == before
    tripped = next(e for e in history_events(p) if e["kind"] == "guard.tripped")
    figures = tripped["data"]["figures"]
    assert figures["degradation"] > 0.8 and figures["current_rate"] < figures["baseline_rate"] / 5


def test_degradation_throttle_backs_off_and_the_run_completes(tmp_path):
    p = project(tmp_path, SLOWS_DOWN, rows=1200,
                config="[guards]\nautotune = false\ndegradation_trip = 0\ndegradation_throttle = 0.5\n"
                       "max_backoff = 0.2\n")
    with p.migrator() as m:
        events = collect(m.bus)
        (result,) = m.run()
    assert result.status == "completed"
    throttles = [e for e in events if e.kind == "guard.throttle" and e.data["guard"] == "degradation"]
    assert len(throttles) == 1 and throttles[0].data["figures"]["degradation"] > 0.5


def test_degradation_guard_against_a_configured_baseline():
    guard = DegradationGuard(GuardSettings(baseline_rate=1000.0, degradation_window=3))
    for _ in range(3):
        verdict = guard.after_batch(stats(rows=100, seconds=0.1))  # 1000 rows/s
    assert verdict.action == OK
    for _ in range(3):
        verdict = guard.after_batch(stats(rows=100, seconds=1.0))  # 100 rows/s: 90% slower
    assert verdict.action == TRIP and verdict.figures["baseline_rate"] == 1000.0


# -- corruption --------------------------------------------------------------------------------------
def test_corruption_trigger_altering_written_values_trips(tmp_path):
    p = project(tmp_path, "return {'label': row['name'].upper()}",
                config="[guards]\ncorruption_sample = 1000\n")
    add_trigger(p.db, "UPDATE items SET label = 'tampered' WHERE id = NEW.id")
    before = p.digest()
    result = p.cli("run")
    assert result.returncode == 3, result.stdout + result.stderr
    assert "guard corruption tripped" in result.stderr and "differ from the transform" in result.stderr
    assert p.digest() == before


def test_corruption_validator_rejecting_on_reread_trips(tmp_path):
    extra = """

def check(row, new):
    return new["label"] == row["name"].upper()
"""
    p = project(tmp_path, "return {'label': row['name'].upper()}", extra=extra,
                backfill_args=", validate=check",
                config="[guards]\ncorruption_recompute = false\ncorruption_sample = 1000\n")
    add_trigger(p.db, "UPDATE items SET label = lower(label) WHERE id = NEW.id")
    before = p.digest()
    with p.migrator() as m, pytest.raises(GuardTrippedError) as err:
        m.run()
    assert err.value.exit_code == 3 and err.value.guard == "corruption"
    assert "validate() returned False" in err.value.message
    assert err.value.figures["revalidation_failures"] == 10 and err.value.figures["revalidated"] == 100
    assert p.digest() == before


def test_corruption_digest_of_untouched_columns(tmp_path):
    db = make_items_db(tmp_path / "items.db", 50)
    dialect = SQLiteDialect(normalize_url(str(db)))
    journal = Journal(dialect.engine)
    journal.ensure()
    step = Backfill("items", lambda row: {"label": "x"}, reads=["name"], writes=["label"])
    guard = CorruptionGuard(GuardSettings(corruption_sample=0), dialect, journal)
    try:
        guard.begin_step("r1", 0, step, None, 10)
        with dialect.engine.begin() as conn:  # the "batch": writes label (allowed) on 1..10
            conn.execute(sa.text("UPDATE items SET label = 'x' WHERE id <= 10"))
        clean = guard.after_batch(stats(rows=10, first_key=[1], last_key=[10], batch_size=10), 10)
        assert clean.action == OK and clean.figures["digest_rows"] == 10
        with dialect.engine.begin() as conn:  # next batch 11..20, and a column it must not touch
            conn.execute(sa.text("UPDATE items SET label = 'x' WHERE id BETWEEN 11 AND 20"))
            conn.execute(sa.text("UPDATE items SET note = 'changed behind our back' WHERE id = 15"))
        bad = guard.after_batch(stats(rows=10, first_key=[11], last_key=[20], batch_size=10), 10)
        assert bad.action == TRIP and bad.strategy == "restore"
        assert bad.figures["digest_mismatches"] == 1 and "key [15] changed" in bad.reason
    finally:
        dialect.dispose()


# -- timeout --------------------------------------------------------------------------------------------
def test_run_timeout_trips_on_the_timer(tmp_path):
    p = project(tmp_path, SLOW, config="[guards]\nmax_run_seconds = 1\n")
    before = p.digest()
    result = p.cli("run")
    assert result.returncode == 3, result.stdout + result.stderr
    assert "guard timeout tripped" in result.stderr and "maximum of 1s" in result.stderr
    assert p.digest() == before


def test_phase_timeout():
    guard = TimeoutGuard(GuardSettings(phase_timeouts={"transformation": 5.0}, max_phase_seconds=100))
    now = time.time()
    assert guard.check(now, now - 50, "transformation", now - 4).action == OK
    verdict = guard.check(now, now - 50, "transformation", now - 6)
    assert verdict.action == TRIP and verdict.figures == {"elapsed": 6.0, "limit": 5.0,
                                                          "scope": "transformation"}
    assert guard.check(now, now, "validation", now - 101).action == TRIP


# -- user impact (canaries) and database load -------------------------------------------------------------
CANARY = """
[canaries]
queries = ["SELECT count(*) FROM items"]
interval = 0.1
throttle_ms = 300
critical_ms = {critical}
critical_consecutive = 2
recover_rounds = 10
[guards]
max_load = {{}}
"""


def test_canary_made_slow_by_a_held_lock_throttles_then_recovers(tmp_path):
    p = project(tmp_path, SLOW, config=CANARY.format(critical=60000))
    run = p.start()
    run.wait_event("batch")
    holder = hold_exclusive(p.db, 1.5)
    holder.join()
    throttle = run.wait_event("guard.throttle", guard="user_impact")
    assert "canary query" in throttle["message"] and throttle["data"]["figures"]["throttle_ms"] == 300
    run.wait_event("guard.healthy", guard="user_impact")
    assert run.finish() == 0, run.stderr
    assert p.query("SELECT count(*) FROM items WHERE label = upper(name)")[0][0] == 2000


def test_canary_far_above_the_threshold_trips(tmp_path):
    p = project(tmp_path, SLOW, config=CANARY.format(critical=1500))
    before = p.digest()
    run = p.start()
    run.wait_event("batch")
    hold_exclusive(p.db, 4.0).join()
    assert run.finish() == 3, run.stderr
    tripped = run.wait_event("guard.tripped")
    assert tripped["data"]["guard"] == "user_impact"
    assert p.digest() == before


def test_sqlite_lock_waits_throttle_then_clear(tmp_path):
    p = project(tmp_path, SLOW, config="[guards]\nmax_load = {lock_wait_ms = 300}\nload_window = 2\n")
    run = p.start()
    run.wait_event("batch")
    hold_exclusive(p.db, 1.5).join()
    throttle = run.wait_event("guard.throttle", guard="database_load")
    assert throttle["data"]["figures"]["lock_wait_ms"] > 300
    run.wait_event("guard.healthy", guard="database_load")
    assert run.finish() == 0, run.stderr


def test_sqlite_lock_waits_above_the_critical_level_trip(tmp_path):
    p = project(tmp_path, SLOW, config="[guards]\ncritical_load = {lock_wait_ms = 500}\n"
                                       "critical_consecutive = 1\n")
    before = p.digest()
    run = p.start()
    run.wait_event("batch")
    hold_exclusive(p.db, 2.0).join()
    assert run.finish() == 3, run.stderr
    assert run.wait_event("guard.tripped")["data"]["guard"] == "database_load"
    assert p.digest() == before


class _ServerLike(SQLiteDialect):
    """A dialect whose health() reports server figures (as PostgreSQL's and MySQL's do)."""

    threads = 0

    def health(self, conn: Any) -> dict[str, Any]:
        return {"Threads_running": self.threads, "replica_lag_s": None}


def test_load_guard_reads_dialect_health_with_throttle_and_critical_levels(tmp_path):
    db = make_items_db(tmp_path / "items.db", 5)
    dialect = _ServerLike(normalize_url(str(db)))
    guard = LoadGuard(GuardSettings(max_load={"Threads_running": 25}, critical_load={"Threads_running": 40},
                                    critical_consecutive=2), dialect)
    try:
        dialect.threads = 10
        assert guard.check().action == OK
        dialect.threads = 30
        verdict = guard.check()
        assert verdict.action == THROTTLE and "Threads_running=30 > 25" in verdict.reason
        dialect.threads = 50
        assert guard.check().action == THROTTLE  # one critical reading is not enough
        verdict = guard.check()
        assert verdict.action == TRIP and verdict.figures["Threads_running"] == 50
    finally:
        dialect.dispose()


# -- configuration -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("section", "message"), [
    ("[guards]\nerror_rate_trip = 2\n", "between 0 and 1"),
    ("[guards]\nbogus = 1\n", "unknown setting 'bogus' in [guards]"),
    ("[canaries]\nqueries = 'SELECT 1'\n", "[canaries] queries must be list"),
    ("[monitor]\nmetrics_port = 70000\n", "TCP port"),
    ("[notify]\nmin_severity = 'loud'\n", "min_severity"),
    ("[notify]\nurls = ['nosuchscheme://x']\n", "apprise"),
])
def test_bad_supervision_config_is_a_one_line_error(tmp_path, section, message):
    p = project(tmp_path, "return {'label': 'x'}", config=section)
    result = p.cli("run")
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and result.stderr.count("\n") == 1
    with pytest.raises(ConfigError):
        from safemigrate.supervisor import Supervisor

        with p.migrator() as m:
            Supervisor(m)
    assert load_settings(p.root).db == str(p.db)
    assert os.path.exists(p.db)


def test_guards_can_be_switched_off(tmp_path):
    p = project(tmp_path, FAIL_15, config="[guards]\nenabled = false\n")
    with p.migrator(EventBus()) as m:
        (result,) = m.run()
    assert result.status == "completed" and result.quarantined == 300
