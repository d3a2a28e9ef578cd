"""`safemigrate emergency` (seed 4.1.1): stop, emergency level, notify every channel, roll back,
validate, restore service only when the validation passed; with the runner killed mid-backfill."""

from __future__ import annotations

import http.server
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from live import SLOW, local_http_server, project
from safemigrate.degrade import Degradation
from safemigrate.emergency import handle_emergency
from safemigrate.rollback import progress_of


class _Collector(http.server.BaseHTTPRequestHandler):
    received: list[dict[str, Any]]

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        type(self).received.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802 - the health URL of the "application"
        status = type(self).health
        self.send_response(status)
        self.end_headers()
        self.wfile.write(b"ok" if status == 200 else b"down")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def endpoint() -> Iterator[tuple[int, type[_Collector]]]:
    handler = type("Collector", (_Collector,), {"received": [], "health": 200})
    with local_http_server(handler) as port:
        yield port, handler


def _levels(p) -> list[str]:
    with p.migrator() as m:
        return [e["data"]["level"] for e in m.journal.events() if e["kind"] == "degradation.set"]


def test_emergency_with_the_runner_killed(tmp_path, endpoint) -> None:
    port, collector = endpoint
    p = project(tmp_path, SLOW, config=f'[notify]\nurls = ["json://127.0.0.1:{port}/"]\n'
                'min_severity = "critical"\n')
    before = p.digest()
    run = p.start()
    run.wait_event("batch")
    run.kill()  # SIGKILL in the middle of the backfill: the runner is dead, its lock stays
    assert p.status()["run"]["status"] == "running"
    proc = p.cli("emergency", "--reason", "checkout errors spiking", "--by", "oncall")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert p.digest() == before, "rolled back to the original content and schema"
    # the timeline, with timestamps, in order
    actions = re.findall(r"^\s+\d\d:\d\d:\d\d\.\d{3}\s+(\w+)\s+(\w+)", proc.stdout, re.M)
    assert actions == [("emergency_stop", "completed"), ("emergency_mode", "completed"),
                       ("notify_team", "completed"), ("emergency_rollback", "completed"),
                       ("system_validation", "completed"), ("restore_services", "completed")]
    assert "resolved" in proc.stdout
    with Degradation(p.db, ttl=0) as client:
        assert client.level() == "normal", "validation passed: service restored"
    assert _levels(p) == ["emergency", "maintenance", "emergency", "normal"]
    with p.migrator() as m:
        run_id = m.journal.runs(1)[0]["id"]
        kinds = [e["kind"] for e in m.journal.events()]
        assert m.journal.run(run_id)["status"] == "rolled_back"
        assert progress_of(m.journal, run_id)["status"] == "completed"
    assert "lock.takeover" in kinds
    for action in ("started", "emergency_stop", "emergency_mode", "notify_team",
                   "emergency_rollback", "system_validation", "restore_services", "finished"):
        assert f"emergency.{action}" in kinds
    # the team was told, on the configured channel, with what happened
    emergencies = [n for n in collector.received if "EMERGENCY" in n.get("message", "")]
    assert len(emergencies) == 1, collector.received
    assert "checkout errors spiking" in emergencies[0]["message"]
    assert "oncall" in emergencies[0]["message"]
    assert "critical" in emergencies[0]["title"]


def test_emergency_keeps_the_application_degraded_when_validation_fails(tmp_path, endpoint) -> None:
    port, collector = endpoint
    collector.health = 503  # the application does not come back healthy
    p = project(tmp_path, "return {'label': row['name'].upper()}", rows=300,
                config=f'[notify]\nurls = ["json://127.0.0.1:{port}/"]\nmin_severity = "critical"\n\n'
                f'[rollback]\nhealth_url = "http://127.0.0.1:{port}/health"\n')
    before = p.digest()
    assert p.cli("run").returncode == 0
    migrated = p.digest()
    proc = p.cli("emergency", "--reason", "data looks wrong")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert re.search(r"emergency_rollback\s+failed", proc.stdout)
    assert re.search(r"restore_services\s+skipped", proc.stdout)
    assert "NOT resolved" in proc.stdout
    assert p.digest() == migrated, "recovered: back at the state before the rollback"
    with Degradation(p.db, ttl=0) as client:
        assert client.level() == "maintenance"
    messages = [n["message"] for n in collector.received]
    assert any("EMERGENCY: migration rollback initiated" in m for m in messages)
    assert any("failed at step validate" in m and "HTTP 503" in m for m in messages), messages
    # the application is healthy again: the rollback completes; the operator ends the emergency
    collector.health = 200
    again = p.cli("rollback", "--yes")
    assert again.returncode == 0, again.stderr
    assert p.digest() == before
    with Degradation(p.db, ttl=0) as client:
        assert client.level() == "emergency", "back to the level before the rollback"
    assert p.cli("degrade", "off", "--reason", "all clear").returncode == 0


def test_emergency_with_nothing_to_roll_back(tmp_path) -> None:
    p = project(tmp_path, "return {'label': row['name'].upper()}", rows=50)
    with p.migrator() as m:
        response = handle_emergency(m, "false alarm")
    assert response.ok
    statuses = {a.action: a.status for a in response.actions}
    assert statuses["emergency_rollback"] == "skipped"
    assert statuses["notify_team"] == "skipped"  # no channel configured
    assert statuses["restore_services"] == "completed"
    blank = p.cli("emergency", "--reason", " ")
    assert blank.returncode == 2 and blank.stderr.startswith("error:") and "hint:" in blank.stderr


def test_emergency_stops_a_live_runner_through_the_control_channel(tmp_path) -> None:
    p = project(tmp_path, "time.sleep(0.003)\nreturn {'label': row['name'].upper()}")
    before = p.digest()
    run = p.start()
    run.wait_event("batch")
    assert run.proc.poll() is None, "the runner is alive when the emergency is declared"
    proc = p.cli("emergency", "--reason", "latency alarms", "--stop-timeout", "60")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert run.finish() == 1 and "aborted" in run.stderr, run.stderr
    assert p.digest() == before, "rolled back to the original content and schema"
    # the timeline: the live runner was stopped first, by its pid, then the rest in order
    timeline = re.findall(r"^\s+\d\d:\d\d:\d\d\.\d{3}\s+(\w+)\s+(\w+)\s*(.*)$", proc.stdout, re.M)
    assert [(a, s) for a, s, _ in timeline] == [
        ("emergency_stop", "completed"), ("emergency_mode", "completed"),
        ("notify_team", "skipped"), ("emergency_rollback", "completed"),
        ("system_validation", "completed"), ("restore_services", "completed")]
    with p.migrator() as m:
        run_id = m.journal.runs(1)[0]["id"]
        events = m.journal.events()
        assert m.journal.run(run_id)["status"] == "rolled_back"
        assert progress_of(m.journal, run_id)["status"] == "completed"
    assert f"running migration stopped (run {run_id}, pid {run.proc.pid})" in timeline[0][2], \
        timeline[0]
    stop = next(e for e in events if e["kind"] == "emergency.emergency_stop")
    assert stop["data"]["status"] == "completed"
    assert f"(run {run_id}, pid {run.proc.pid})" in stop["data"]["details"], stop
    kinds = [e["kind"] for e in events]
    abort = next(e for e in events if e["kind"] == "control.abort")
    assert abort["data"]["pid"] == run.proc.pid and "latency alarms" in abort["data"]["reason"]
    assert kinds.index("control.abort") < kinds.index("emergency.emergency_stop") \
        < kinds.index("emergency.emergency_rollback")
    assert "lock.takeover" not in kinds, "the runner let go of its lock: nothing to take over"
    with Degradation(p.db, ttl=0) as client:
        assert client.level() == "normal", "validation passed: service restored"
