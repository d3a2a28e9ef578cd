"""Monitoring and its outputs, all fed from the one event stream: metrics and alerts, `status`
from another process, batch-size tuning, hooks, notifications (apprise) and Prometheus."""

from __future__ import annotations

import http.server
import json
import socket
import stat
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from live import SLOW, collect, local_http_server, project
from safemigrate import GuardTrippedError
from safemigrate.engine import BatchStats
from safemigrate.events import Event
from safemigrate.guards import GuardSettings
from safemigrate.hooks import ENV_VARS
from safemigrate.monitor import Monitor, MonitorSettings
from safemigrate.supervisor import BatchTuner

FAIL_15 = """\
if row["n"] % 20 in (0, 1, 2):
    raise ValueError("bad row")
return {"label": row["name"].upper()}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- status from another process ----------------------------------------------------------------------
def test_status_json_from_another_process_reports_live_progress_and_metrics(tmp_path):
    p = project(tmp_path, SLOW)
    run = p.start()

    def live() -> dict[str, Any] | None:
        info = p.status()
        metrics = (info.get("run") or {}).get("metrics") or {}
        ok = info["run"] and info["run"]["alive"] and metrics.get("rows_done", 0) > 0 \
            and metrics.get("rate_smoothed") and metrics.get("rows_done") < 2000
        return info if ok else None

    info = run.wait_for(live, 60, "live metrics in status --json")
    run_info, metrics = info["run"], info["run"]["metrics"]
    assert run_info["status"] == "running" and run_info["rows_total"] == 2000
    assert metrics["phase"] == "transformation" and metrics["rows_total"] == 2000
    for key in ("rate_last", "rate_smoothed", "rate_average", "eta_seconds", "elapsed_seconds",
                "batch_size", "rows_failed", "error_rate", "database", "updated_at"):
        assert key in metrics, key
    assert metrics["eta_seconds"] > 0 and metrics["elapsed_seconds"] > 0
    assert metrics["process"]["rss_bytes"] > 0 and metrics["process"]["cpu_percent"] >= 0
    assert 0 < metrics["system"]["memory_percent"] < 100 and metrics["system"]["cpus"] >= 1
    assert "lock_wait_ms" in metrics["database"]
    assert metrics["throttle"] is None and metrics["paused"] is None
    text = p.cli("status").stdout
    assert "live: phase transformation" in text and "rows/s" in text and "CPU" in text
    assert run.finish() == 0, run.stderr
    assert any(e["kind"] == "metrics" for e in run.lines)  # the same snapshots, as JSON lines
    final = p.status()["run"]
    assert final["status"] == "completed" and final["metrics"]["rows_done"] == 2000


# -- batch-size tuning ---------------------------------------------------------------------------------
def test_batch_size_converges_towards_the_target_duration(tmp_path):
    transform = "time.sleep(0.001)\nreturn {'label': row['name'].upper()}"
    p = project(tmp_path, transform, rows=2500, batch_size=10,
                config="[guards]\ntarget_batch_seconds = 0.1\nmin_batch_size = 5\n")
    with p.migrator() as m:
        events = collect(m.bus)
        m.run()
    sizes = [e.data["batch_rows"] for e in events if e.kind == "batch"]
    assert sizes[0] == 10 and all(b <= 2 * a for a, b in zip(sizes, sizes[1:], strict=False))
    steady = sizes[-6:-1]  # the last, short batch aside
    # ~1 ms a row plus overhead: about 100 rows make 0.1 s
    assert all(40 <= s <= 130 for s in steady), sizes


def stats(**kw: Any) -> BatchStats:
    base = dict(run_id="r", step_idx=1, table="t", rows=100, quarantined_in_batch=0, seconds=1.0,
                write_seconds=0.1, done=100, total=10_000, quarantined=0, rate=100.0, batch_size=100,
                first_key=[1], last_key=[100])
    base.update(kw)
    return BatchStats(**base)


def test_tuner_bounds_and_pinned_steps():
    tuner = BatchTuner(GuardSettings(target_batch_seconds=0.5, min_batch_size=50, max_batch_size=400))
    size = 100
    for _ in range(10):  # 10 ms a row: 50 rows make 0.5 s
        size = tuner.next_size(stats(rows=size, batch_size=size, seconds=size * 0.01)) or size
    assert size == 50
    for _ in range(10):  # 0.1 ms a row would want 5,000: capped
        size = tuner.next_size(stats(rows=size, batch_size=size, seconds=size * 0.0001)) or size
    assert size == 400
    assert tuner.next_size(stats(rows=7, batch_size=400, seconds=1.0)) is None  # short last batch
    tuner.start_step(pinned=True)
    assert tuner.next_size(stats(step_idx=2, rows=100, seconds=5.0)) is None
    assert BatchTuner(GuardSettings(autotune=False)).next_size(stats()) is None



def test_sleep_ratio_yields_in_proportion_to_each_batch(tmp_path):
    transform = "time.sleep(0.001)\nreturn {'label': row['name'].upper()}"
    p = project(tmp_path, transform, rows=500,
                config="[guards]\nautotune = false\nsleep_ratio = 2\n")
    with p.migrator() as m:
        events = collect(m.bus)
        (result,) = m.run()
    assert [e.data["batch_rows"] for e in events if e.kind == "batch"] == [100] * 5
    metrics = p.status()["run"]["metrics"]  # the run's last snapshot, from the journal
    assert metrics["sleep_ratio"] == 2 and metrics["batches"] == 5
    batches, yielded = metrics["batch_seconds_total"], metrics["yielded_seconds"]
    assert batches >= 5 * 100 * 0.001  # each batch sleeps 0.1 s in the transform
    # slept twice each batch's duration: never less, and not much more (timer slack)
    assert 2 * batches - 0.01 <= yielded <= 2 * batches * 1.25 + 0.1, (batches, yielded)
    assert result.seconds > yielded


def test_without_sleep_ratio_nothing_is_yielded(tmp_path):
    p = project(tmp_path, "return {'label': row['name'].upper()}", rows=300,
                config="[guards]\nautotune = false\n")
    with p.migrator() as m:
        m.run()
    metrics = p.status()["run"]["metrics"]
    assert metrics["batches"] == 3 and metrics["sleep_ratio"] == 0
    assert metrics["batch_seconds_total"] > 0 and metrics["yielded_seconds"] == 0


def test_rate_floor_alert_from_the_config_file_in_a_real_run(tmp_path):
    transform = "time.sleep(0.005)\nreturn {'label': row['name'].upper()}"  # < 200 rows/s
    p = project(tmp_path, transform, rows=250,
                config="[monitor]\nrate_floor = 1000\nrate_floor_grace = 0\ninterval = 0.2\n")
    result = p.cli("run", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    alerts = [e for e in lines if e["kind"] == "alert" and e["data"]["alert"] == "rate_floor"]
    assert alerts, [e["kind"] for e in lines]
    alert = alerts[0]
    assert alert["level"] == "warning" and alert["data"]["threshold"] == 1000
    assert 0 <= alert["data"]["value"] < 1000
    assert "migration speed is slow" in alert["message"] and "below 1000" in alert["message"]
    cleared = [e for e in lines if e["kind"] == "alert.cleared" and e["data"]["alert"] == "rate_floor"]
    assert cleared and lines.index(cleared[0]) > lines.index(alert)  # once the backfill is over
    (run,) = json.loads(p.cli("history", "--json").stdout)
    journaled = [e for e in run["events"] if e["kind"] == "alert"]
    assert [(e["data"]["alert"], e["data"]["threshold"]) for e in journaled] == \
        [("rate_floor", 1000)] * len(alerts)
    assert run["status"] == "completed"  # an alert only tells

# -- alerts -----------------------------------------------------------------------------------------------
def test_monitor_alerts_rate_floor_and_memory_and_clears_them():
    monitor = Monitor(MonitorSettings(rate_floor=10, rate_floor_grace=0, memory_alert=0.01,
                                      alert_repeat=0))
    monitor.on_event(Event("run.started", "", "r", data={"migration": "m"}))
    monitor.on_event(Event("step.started", "backfill", "r", data={"step": 0, "total": 1000, "done": 0}))
    time.sleep(0.05)  # and no row done
    snapshot, alerts = monitor.tick()
    by_name = {a.data["alert"]: a for a in alerts}
    assert by_name["rate_floor"].level == "warning" and "below 10" in by_name["rate_floor"].message
    assert by_name["memory"].level == "critical" and "memory" in by_name["memory"].message
    assert {a["alert"] for a in snapshot["alerts"]} == {"rate_floor", "memory"}
    monitor.s.memory_alert = 0
    monitor.supervisor_state = {"paused": {"by": "ops"}}  # a paused run is not slow
    _, alerts = monitor.tick()
    assert {(a.kind, a.data["alert"]) for a in alerts} == {("alert.cleared", "rate_floor"),
                                                          ("alert.cleared", "memory")}


# -- hooks -----------------------------------------------------------------------------------------------
DUMP = """#!/bin/sh
env | grep '^SAFEMIGRATE_' > "{out}/$SAFEMIGRATE_HOOK.$SAFEMIGRATE_EVENT.$$.env"
"""


def install_hooks(root: Path, scripts: dict[str, str]) -> Path:
    folder = root / ".safemigrate" / "hooks"
    folder.mkdir(parents=True, exist_ok=True)
    out = root / "hook-out"
    out.mkdir(exist_ok=True)
    for name, script in scripts.items():
        path = folder / name
        path.write_text(script.format(out=out))
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return out


def read_env(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def test_hooks_receive_the_documented_variables(tmp_path, monkeypatch):
    p = project(tmp_path, FAIL_15.replace("(0, 1, 2)", "(0,)"), rows=400)
    monkeypatch.chdir(p.root)  # the hooks folder is relative to the working directory
    out = install_hooks(p.root, {name: DUMP for name in ("on-start", "on-status", "on-success.sh")})
    with p.migrator() as m:
        (result,) = m.run()
    start = read_env(next(out.glob("on-start.run.started.*.env")))
    assert set(ENV_VARS) <= set(start)  # every documented variable, set even when empty
    assert start["SAFEMIGRATE_RUN_ID"] == result.run_id and start["SAFEMIGRATE_MIGRATION"] == "0001_label"
    assert start["SAFEMIGRATE_STATUS"] == "running" and start["SAFEMIGRATE_PHASE"] == "preparation"
    assert start["SAFEMIGRATE_DATABASE"].endswith("items.db")
    success = read_env(next(out.glob("on-success.run.completed.*.env")))
    assert success["SAFEMIGRATE_STATUS"] == "completed" and success["SAFEMIGRATE_LEVEL"] == "info"
    assert success["SAFEMIGRATE_ROWS_DONE"] == "400" and success["SAFEMIGRATE_ROWS_TOTAL"] == "400"
    assert success["SAFEMIGRATE_QUARANTINED"] == "20"
    assert "completed" in success["SAFEMIGRATE_MESSAGE"]
    assert json.loads(success["SAFEMIGRATE_DATA"])["rows"] == 400
    assert float(success["SAFEMIGRATE_ELAPSED_SECONDS"]) > 0
    phases = {read_env(f)["SAFEMIGRATE_EVENT"] for f in out.glob("on-status.*.env")}
    assert {"phase.started", "phase.completed"} <= phases


def test_a_failing_on_start_hook_stops_the_run_before_any_change(tmp_path):
    p = project(tmp_path, SLOW, rows=200)
    install_hooks(p.root, {"on-start": "#!/bin/sh\necho 'change freeze until Monday' >&2\nexit 7\n"})
    before = p.digest()
    result = p.cli("run")
    assert result.returncode == 1
    assert "on-start hook on-start exited 7: change freeze until Monday" in result.stderr
    assert result.stderr.count("\n") == 1
    assert p.digest() == before
    assert not (p.root / "backups").exists() or not list((p.root / "backups").iterdir())
    status = p.status()
    assert status["run"]["status"] == "failed" and status["run"]["backups"] == []
    assert not [ph for ph in status["run"]["phases"] if ph["status"] == "completed"]



FAIL_8 = FAIL_15.replace("% 20 in (0, 1, 2)", "% 25 in (0, 1)")  # 8%: alerts (> 5%), no trip (< 10%)


def test_on_alert_hook_gets_the_alert_and_the_run_state(tmp_path):
    p = project(tmp_path, FAIL_8, rows=1000)
    out = install_hooks(p.root, {"on-alert": DUMP})
    result = p.cli("run", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    run_id = json.loads(result.stdout.splitlines()[-1])["runs"][0]["run_id"]
    envs = [read_env(f) for f in out.glob("on-alert.alert.*.env")]
    (env,) = [e for e in envs if e["SAFEMIGRATE_GUARD"] == "error_rate"]  # alert_repeat: once
    assert set(ENV_VARS) <= set(env)
    assert env["SAFEMIGRATE_HOOK"] == "on-alert" and env["SAFEMIGRATE_EVENT"] == "alert"
    assert env["SAFEMIGRATE_LEVEL"] == "warning"
    # raised after the first batch: 8 of its 100 rows quarantined
    assert env["SAFEMIGRATE_MESSAGE"] == "high error rate: 8.00% of rows quarantined (alert above 5%)"
    assert json.loads(env["SAFEMIGRATE_DATA"]) == {"alert": "error_rate", "value": 0.08,
                                                   "threshold": 0.05}
    assert env["SAFEMIGRATE_RUN_ID"] == run_id and env["SAFEMIGRATE_MIGRATION"] == "0001_label"
    assert env["SAFEMIGRATE_STATUS"] == "running" and env["SAFEMIGRATE_PHASE"] == "transformation"
    assert env["SAFEMIGRATE_ROWS_TOTAL"] == "1000"
    done, quarantined = int(env["SAFEMIGRATE_ROWS_DONE"]), int(env["SAFEMIGRATE_QUARANTINED"])
    assert 100 <= done < 1000 and quarantined == round(done * 0.08)
    assert env["SAFEMIGRATE_DATABASE"].endswith("items.db")
    assert float(env["SAFEMIGRATE_ELAPSED_SECONDS"]) > 0
    assert p.status()["run"]["status"] == "completed"


FAILS_IN_CLEANUP = """\
from safemigrate import Backfill, Migration, RawSQL

migration = Migration(
    id="0001_label",
    steps=[Backfill("items", lambda row: {"label": row["name"].upper()}, reads=["name"],
                    writes=["label"]),
           RawSQL("INSERT INTO audit_log (note) VALUES ('labels done')")],
)
"""


def test_on_failure_hook_gets_the_failed_run(tmp_path):
    p = project(tmp_path, "return {'label': 'x'}", rows=200)
    (p.migrations / "0001_label.py").write_text(FAILS_IN_CLEANUP)
    out = install_hooks(p.root, {name: DUMP for name in ("on-failure", "on-success")})
    result = p.cli("run")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "no such table: audit_log" in result.stderr
    run_id = p.status()["run"]["id"]
    (path,) = out.glob("on-failure.*.env")
    env = read_env(path)
    assert set(ENV_VARS) <= set(env)
    assert env["SAFEMIGRATE_HOOK"] == "on-failure" and env["SAFEMIGRATE_EVENT"] == "run.failed"
    assert env["SAFEMIGRATE_LEVEL"] == "error" and env["SAFEMIGRATE_STATUS"] == "failed"
    assert env["SAFEMIGRATE_PHASE"] == "cleanup" and "no such table: audit_log" in env["SAFEMIGRATE_MESSAGE"]
    assert json.loads(env["SAFEMIGRATE_DATA"]) == {"phase": "cleanup"}
    assert env["SAFEMIGRATE_RUN_ID"] == run_id and env["SAFEMIGRATE_MIGRATION"] == "0001_label"
    assert env["SAFEMIGRATE_ROWS_DONE"] == env["SAFEMIGRATE_ROWS_TOTAL"] == "200"
    assert not list(out.glob("on-success.*"))

# -- notifications ----------------------------------------------------------------------------------------
class _Collector(http.server.BaseHTTPRequestHandler):
    received: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        type(self).received.append(json.loads(body))
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def endpoint():
    _Collector.received = []
    with local_http_server(_Collector) as port:
        yield port, _Collector.received


def test_notifications_reach_an_apprise_url_filtered_by_severity(tmp_path, endpoint):
    port, received = endpoint
    p = project(tmp_path, FAIL_15, config=f'[guards]\nerror_rate_min_rows = 300\n'
                                          f'[notify]\nurls = ["json://127.0.0.1:{port}/"]\n'
                                          f'min_severity = "critical"\n')
    with p.migrator() as m, pytest.raises(GuardTrippedError):
        m.run()
    titles = [r["title"] for r in received]
    assert "safemigrate critical: guard.tripped" in titles
    assert "safemigrate critical: guard.decision" in titles
    assert all(t.startswith("safemigrate critical:") for t in titles)  # nothing below critical
    tripped = next(r for r in received if r["title"].endswith("guard.tripped"))
    assert tripped["type"] == "failure"
    assert "guard error_rate tripped: error rate 15.0% is above 10%" in tripped["message"]
    assert "run: " in tripped["message"] and '"error_rate": 0.15' in tripped["message"]


def test_every_rollback_request_is_notified(tmp_path, endpoint):
    port, received = endpoint
    p = project(tmp_path, "return {'label': row['name'].upper()}", rows=200,
                config=f'[notify]\nurls = ["json://127.0.0.1:{port}/"]\n')
    assert p.cli("run").returncode == 0
    assert p.cli("rollback", "--priority", "low", "--reason", "typo in labels",
                 "--requested-by", "carol").returncode == 0
    created = next(r for r in received if r["title"].endswith("request.created"))
    assert created["type"] == "warning"
    assert "requested by carol (low): typo in labels" in created["message"]
    assert '"priority": "low"' in created["message"]



def test_a_trip_with_auto_rollback_off_pauses_and_notifies(tmp_path, endpoint):
    port, received = endpoint
    p = project(tmp_path, FAIL_15, config=f'auto_rollback = false\n'
                                          f'[guards]\nerror_rate_min_rows = 300\n'
                                          f'[notify]\nurls = ["json://127.0.0.1:{port}/"]\n')
    run = p.start()
    try:
        run.wait_event("guard.decision", decision="pause")
        run.wait_event("control.paused")

        def titles() -> list[str]:
            return [r["title"] for r in list(received)]

        run.wait_for(lambda: "safemigrate warning: control.paused" in titles(), 30,
                     "the pause notification")
        assert run.proc.poll() is None  # paused, not rolled back
        run_id = p.status()["run"]["id"]
        assert not any("rollback" in t for t in titles())
        tripped = next(r for r in received if r["title"] == "safemigrate critical: guard.tripped")
        assert tripped["type"] == "failure"
        assert "guard error_rate tripped: error rate 15.0% is above 10%" in tripped["message"]
        assert '"auto_rollback": false' in tripped["message"] and f"run: {run_id}" in tripped["message"]
        decision = next(r for r in received if r["title"] == "safemigrate critical: guard.decision")
        assert decision["type"] == "failure"
        assert decision["message"].startswith("auto_rollback is off: run paused after guard "
                                              "error_rate tripped")
        assert "`safemigrate resume`" in decision["message"]
        assert '"decision": "pause"' in decision["message"] and f"run: {run_id}" in decision["message"]
        paused = next(r for r in received if r["title"] == "safemigrate warning: control.paused")
        assert paused["type"] == "warning" and "paused by guard:error_rate" in paused["message"]
        assert p.cli("abort", "--reason", "looked at it").returncode == 0
        assert run.finish() == 1
    finally:
        run.kill()
    assert p.status()["run"]["status"] == "interrupted"

# -- Prometheus ---------------------------------------------------------------------------------------------
def test_prometheus_endpoint_serves_the_metrics_during_a_run(tmp_path):
    port = free_port()
    p = project(tmp_path, SLOW)
    run = p.start("--metrics-port", port)
    endpoint = run.wait_event("monitor.endpoint")
    assert endpoint["data"]["url"] == f"http://127.0.0.1:{port}/metrics"

    def scrape() -> str | None:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
        return text if "safemigrate_rows_processed" in text and "safemigrate_rows_processed 0.0" not in text \
            and 'safemigrate_phase{phase="transformation"} 1.0' in text else None

    text = run.wait_for(scrape, 60, "metrics from the endpoint")
    assert "safemigrate_rows_total 2000.0" in text
    assert 'safemigrate_rate_rows_per_second{window="smoothed"}' in text
    assert 'safemigrate_process{figure="rss_bytes"}' in text
    assert 'safemigrate_system{figure="memory_percent"}' in text
    assert "safemigrate_throttled 0.0" in text and "safemigrate_paused 0.0" in text
    assert 'safemigrate_run_info{migration="0001_label"' in text
    assert run.finish() == 0, run.stderr
    with pytest.raises(OSError):  # the endpoint goes away with the run
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_metrics_port_in_use_is_a_usage_error(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        p = project(tmp_path, SLOW, rows=10)
        result = p.cli("run", "--metrics-port", busy.getsockname()[1])
    assert result.returncode == 2 and "cannot serve metrics on 127.0.0.1" in result.stderr
