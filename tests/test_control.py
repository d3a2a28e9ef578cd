"""Control from another process, through the journal: pause, resume, abort, the pause file,
SIGINT, and rollback requests of each priority (recorded, notified, approved or rejected)."""

from __future__ import annotations

import json
import signal
import time

from live import SLOW, project

# ~4 s of backfill: 2,000 rows at 2 ms each
DONE = "SELECT count(*) FROM items WHERE label = upper(name)"


def last_json(stdout: str) -> dict:
    """--json prints the events as JSON lines, then the result."""
    return json.loads(stdout.strip().splitlines()[-1])


def done_rows(p) -> int:
    return p.query(DONE)[0][0]


def test_pause_and_resume_from_another_process(tmp_path):
    p = project(tmp_path, SLOW)
    run = p.start()
    run.wait_event("batch")
    paused = p.cli("pause", "--reason", "peak traffic", "--by", "ops")
    assert paused.returncode == 0, paused.stderr
    assert "pausing run" in paused.stdout
    event = run.wait_event("control.paused")
    assert event["data"] == {"by": "ops", "reason": "peak traffic"}
    status = run.wait_for(lambda: (s := p.status())["run"]["metrics"]["paused"] and s, 10,
                          "the paused state in status")
    assert status["control"]["paused"] and status["control"]["pause_reason"] == "peak traffic"
    assert status["run"]["metrics"]["paused"]["by"] == "ops"
    text = p.cli("status").stdout
    assert "paused by ops" in text and "peak traffic" in text
    frozen = done_rows(p)
    time.sleep(1.5)
    assert done_rows(p) == frozen < 2000  # nothing moves while paused
    assert run.proc.poll() is None
    resumed = p.cli("resume")
    assert resumed.returncode == 0, resumed.stderr
    assert run.finish() == 0, run.stderr
    run.wait_event("control.resumed")
    assert done_rows(p) == 2000
    kinds = [e["kind"] for e in json.loads(p.cli("history", "--json").stdout)[0]["events"]]
    assert {"control.pause", "control.paused", "control.resume", "control.resumed"} <= set(kinds)


def test_abort_from_another_process_is_resumable(tmp_path):
    p = project(tmp_path, SLOW)
    run = p.start()
    run.wait_event("batch")
    aborted = p.cli("abort", "--reason", "wrong window")
    assert aborted.returncode == 0, aborted.stderr
    assert run.finish() == 1
    assert "aborted by" in run.stderr and "wrong window" in run.stderr
    status = p.status()
    assert status["run"]["status"] == "interrupted" and status["control"]["abort"] is None
    assert 0 < done_rows(p) < 2000
    again = p.cli("run")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming run" in again.stdout
    assert done_rows(p) == 2000


def test_abort_with_nothing_running_is_a_usage_error(tmp_path):
    p = project(tmp_path, SLOW)
    result = p.cli("abort")
    assert result.returncode == 2 and "no migration is running" in result.stderr


def test_pause_file_holds_the_run_until_removed(tmp_path):
    p = project(tmp_path, SLOW, rows=300)
    pause_file = p.root / "hold-on"
    pause_file.write_text("")
    (p.root / "safemigrate.toml").write_text((p.root / "safemigrate.toml").read_text()
                                             + '\n[guards]\npause_file = "hold-on"\n')
    run = p.start()
    event = run.wait_event("control.paused")
    assert "pause file" in event["message"]
    time.sleep(1.0)
    assert run.proc.poll() is None
    assert "phase.started" not in run.kinds()  # held before anything changed
    assert not (p.root / "backups").exists() or not any((p.root / "backups").iterdir())
    pause_file.unlink()
    assert run.finish() == 0, run.stderr
    assert done_rows(p) == 300


def test_pause_before_a_run_starts_holds_it(tmp_path):
    p = project(tmp_path, SLOW, rows=200)
    result = p.cli("pause")
    assert result.returncode == 0 and "next run will wait" in result.stdout
    run = p.start()
    run.wait_event("control.paused")
    assert p.status()["control"]["paused"]
    assert p.cli("resume").returncode == 0
    assert run.finish() == 0, run.stderr


def test_first_sigint_finishes_the_batch_and_is_resumable(tmp_path):
    p = project(tmp_path, SLOW)
    run = p.start()
    run.wait_event("batch")
    run.proc.send_signal(signal.SIGINT)
    assert run.finish() == 1
    assert "SIGINT received" in run.stderr
    assert p.status()["run"]["status"] == "interrupted"
    assert p.cli("run").returncode == 0
    assert done_rows(p) == 2000



def test_sigterm_finishes_the_batch_checkpoints_and_a_second_run_resumes(tmp_path):
    p = project(tmp_path, SLOW, rows=1000)
    reference = project(tmp_path / "reference", "return {'label': row['name'].upper()}", rows=1000)
    assert reference.cli("run").returncode == 0  # the same migration, never interrupted
    run = p.start()
    run.wait_event("batch")
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 1
    assert "stopping after the current batch" in run.stderr
    assert "stopped after a committed batch: SIGTERM received" in run.stderr
    assert "error: interrupted" not in run.stderr  # a clean stop, not an abort
    (interrupted,) = run.events("run.interrupted")
    assert "SIGTERM received" in interrupted["message"]
    assert "run.completed" not in run.kinds()
    done = done_rows(p)
    assert 0 < done < 1000
    assert p.query("SELECT count(*) FROM items WHERE label = 'old'")[0][0] == 1000 - done
    status = p.status()
    assert status["run"]["status"] == "interrupted" and not status["run"]["alive"]
    assert status["run"]["rows_done"] == done  # the checkpoint committed with its batch
    run_id = status["run"]["id"]
    again = p.cli("run")
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resuming run {run_id}" in again.stdout
    final = p.status()["run"]
    assert final["id"] == run_id and final["status"] == "completed" and final["rows_done"] == 1000
    assert p.digest() == reference.digest()  # as if never interrupted


def test_a_second_sigint_aborts_at_once_and_the_run_stays_resumable(tmp_path):
    # the first batch is quick, the second takes 2 s and notes when it starts (the checks'
    # dry pass transforms row 101 too, earlier): both signals land inside it
    slow_second = """\
if row["n"] == 101:
    with open("row-101", "a") as f:
        f.write(f"{time.time()}\\n")
if row["n"] > 100:
    time.sleep(0.02)
return {"label": row["name"].upper()}
"""
    p = project(tmp_path, slow_second, rows=200, config="[guards]\nautotune = false\n")
    run = p.start()
    first = run.wait_event("batch")
    marker = p.root / "row-101"
    run.wait_for(lambda: marker.exists() and any(
        float(t) > first["ts"] for t in marker.read_text().split()), 60, "the second batch")
    run.proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    assert run.proc.poll() is None  # still in the batch
    run.proc.send_signal(signal.SIGINT)
    assert run.finish() == 1
    assert "stopping after the current batch (again to abort now)" in run.stderr
    assert "error: interrupted (hint: committed batches are safe; `safemigrate run` resumes)" \
        in run.stderr
    assert "stopped after a committed batch" not in run.stderr  # it did not wait for the batch
    (interrupted,) = run.events("run.interrupted")
    assert interrupted["message"] == "aborted at once by a second SIGINT"
    # the batch in flight was abandoned whole: only the first one is written and checkpointed
    assert done_rows(p) == 100
    assert p.query("SELECT count(*) FROM items WHERE label = 'old'")[0][0] == 100
    status = p.status()["run"]
    assert status["status"] == "interrupted" and status["rows_done"] == 100
    (journaled,) = json.loads(p.cli("history", "--json").stdout)
    assert journaled["status"] == "interrupted"
    assert journaled["error"] == "aborted at once by a second SIGINT"
    assert p.cli("status").returncode == 0  # no lock left behind
    again = p.cli("run")
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resuming run {status['id']}" in again.stdout
    assert done_rows(p) == 200

# -- rollback requests -----------------------------------------------------------------------------
def request(p, priority: str, *extra: str):
    return p.cli("rollback", "--priority", priority, "--reason", f"{priority} concern",
                 "--requested-by", "alice", "--json", *extra)


def test_low_priority_request_waits_for_approval_then_rolls_back(tmp_path):
    p = project(tmp_path, "return {'label': row['name'].upper()}")
    before = p.digest()
    assert p.cli("run").returncode == 0
    result = request(p, "low")
    assert result.returncode == 0, result.stderr
    created = last_json(result.stdout)
    assert created["status"] == "pending" and created["requested_by"] == "alice"
    assert done_rows(p) == 2000  # nothing happened yet
    status = p.status()
    assert [r["id"] for r in status["requests"]] == [created["id"]]
    text = p.cli("status").stdout
    assert "rollback requests" in text and created["id"] in text
    approved = p.cli("rollback", "approve", created["id"], "--by", "bob", "--json")
    assert approved.returncode == 0, approved.stderr
    outcome = last_json(approved.stdout)
    assert outcome["status"] == "done" and outcome["decided_by"] == "bob"
    assert p.digest() == before
    assert p.status()["requests"] == []
    kinds = [e["kind"] for e in json.loads(p.cli("history", "--json").stdout)[0]["events"]]
    assert {"request.created", "request.approved", "request.executing", "request.done"} <= set(kinds)


def test_medium_priority_request_can_be_rejected(tmp_path):
    p = project(tmp_path, "return {'label': row['name'].upper()}")
    assert p.cli("run").returncode == 0
    created = last_json(request(p, "medium").stdout)
    assert created["status"] == "pending"
    rejected = p.cli("rollback", "reject", created["id"], "--note", "not needed", "--json")
    assert rejected.returncode == 0, rejected.stderr
    assert last_json(rejected.stdout)["status"] == "rejected"
    assert done_rows(p) == 2000 and p.status()["requests"] == []
    again = p.cli("rollback", "approve", created["id"])
    assert again.returncode == 2 and "rejected, not pending" in again.stderr


def test_high_priority_request_stops_a_running_migration_which_rolls_back(tmp_path):
    p = project(tmp_path, SLOW)
    before = p.digest()
    run = p.start()
    run.wait_event("batch")
    result = request(p, "high")
    assert result.returncode == 0, (result.stderr, run.kinds())
    outcome = last_json(result.stdout)
    assert outcome["status"] == "done" and outcome["priority"] == "high"
    assert run.finish() == 3
    assert "rollback requested by alice (high): high concern" in run.stderr
    assert p.digest() == before
    decision = run.wait_event("guard.decision")
    assert decision["data"]["request_id"] == outcome["id"]


def test_critical_request_with_no_runner_rolls_back_at_once(tmp_path):
    p = project(tmp_path, SLOW, rows=400)
    before = p.digest()
    run = p.start()
    run.wait_event("batch")
    run.proc.send_signal(signal.SIGINT)  # leaves an interrupted, half-migrated run
    assert run.finish() == 1
    assert p.status()["run"]["status"] == "interrupted"
    result = request(p, "critical")
    assert result.returncode == 0, result.stderr
    assert last_json(result.stdout)["status"] == "done"
    assert p.digest() == before
    assert p.status()["run"]["status"] == "rolled_back"


def test_request_needs_a_reason_and_a_run(tmp_path):
    p = project(tmp_path, "return {'label': row['name'].upper()}", rows=100)
    none = p.cli("rollback", "--priority", "high", "--reason", "x")
    assert none.returncode == 2 and "no run to roll back" in none.stderr
    assert p.cli("run").returncode == 0
    blank = p.cli("rollback", "--priority", "low")
    assert blank.returncode == 2 and "needs a reason" in blank.stderr


def test_plain_rollback_still_works_with_its_options(tmp_path):
    p = project(tmp_path, "return {'label': row['name'].upper()}")
    before = p.digest()
    assert p.cli("run").returncode == 0
    dry = p.cli("rollback", "--dry-run", "--strategy", "restore")
    assert dry.returncode == 0 and "strategy restore" in dry.stdout
    result = p.cli("rollback", "--yes", "--json")
    assert result.returncode == 0, result.stderr
    assert last_json(result.stdout)["status"] == "rolled_back"
    assert p.digest() == before
