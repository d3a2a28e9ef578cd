"""A Prometheus endpoint for a running migration (`safemigrate run --metrics-port N`).

Bound to 127.0.0.1 unless `[monitor] metrics_host` says otherwise; fed by the same events as
every other output (`metrics` snapshots, alerts, guard decisions, throttling, pauses).
"""

from __future__ import annotations

from typing import Any

from ._exceptions import UsageError
from .events import Event

PHASES = ("preparation", "structure", "transformation", "validation", "cleanup")


class MetricsExporter:
    """Own registry (no global state), HTTP server in a daemon thread, stopped by `close()`."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

        self.registry = CollectorRegistry()
        r = self.registry

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(f"safemigrate_{name}", doc, labels, registry=r)

        self.info = gauge("run_info", "The run being migrated (value 1)", ("run_id", "migration"))
        self.phase = gauge("phase", "1 for the current phase", ("phase",))
        self.rows_total = gauge("rows_total", "Rows the current backfill processes")
        self.rows_done = gauge("rows_processed", "Rows processed by the current backfill")
        self.rows_failed = gauge("rows_quarantined", "Rows quarantined by the current backfill")
        self.error_rate = gauge("error_rate", "Quarantined / processed rows")
        self.rate = gauge("rate_rows_per_second", "Backfill rate", ("window",))
        self.eta = gauge("eta_seconds", "Estimated seconds left in the current backfill")
        self.elapsed = gauge("elapsed_seconds", "Seconds since this process started the run")
        self.batch_size = gauge("batch_size", "Rows per batch (auto-tuned)")
        self.yielded = gauge("yielded_seconds", "Seconds slept between batches to yield to users "
                             "([guards] sleep_ratio)")
        self.process = gauge("process", "This process and its workers", ("figure",))
        self.system = gauge("system", "The machine", ("figure",))
        self.database = gauge("database", "Database health figures", ("figure",))
        self.throttled = gauge("throttled", "1 while a guard holds the migration back")
        self.paused = gauge("paused", "1 while paused by an operator or the pause file")
        self.alerts = Counter("safemigrate_alerts", "Alerts raised", ("alert",), registry=r)
        self.guards = Counter("safemigrate_guard_events", "Guard throttles and trips",
                              ("guard", "action"), registry=r)
        try:
            self.server, self.thread = start_http_server(port, addr=host, registry=r)
        except OSError as exc:
            raise UsageError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}",
                             "pick a free port for --metrics-port") from None
        self.host, self.port = host, self.server.server_port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def __call__(self, event: Event) -> None:
        data = event.data or {}
        if event.kind == "metrics":
            self._snapshot(data)
        elif event.kind == "alert":
            self.alerts.labels(data.get("alert") or "other").inc()
        elif event.kind in ("guard.throttle", "guard.tripped"):
            self.guards.labels(data.get("guard") or "other", event.kind.split(".")[1]).inc()

    def _snapshot(self, s: dict[str, Any]) -> None:
        if s.get("run_id"):
            self.info.labels(s["run_id"], s.get("migration") or "").set(1)
        for phase in PHASES:
            self.phase.labels(phase).set(1 if s.get("phase") == phase else 0)
        for gauge, key in ((self.rows_total, "rows_total"), (self.rows_done, "rows_done"),
                           (self.rows_failed, "rows_failed"), (self.error_rate, "error_rate"),
                           (self.eta, "eta_seconds"), (self.elapsed, "elapsed_seconds"),
                           (self.batch_size, "batch_size"), (self.yielded, "yielded_seconds")):
            if isinstance(s.get(key), int | float):
                gauge.set(s[key])
        for window in ("last", "smoothed", "average"):
            value = s.get(f"rate_{window}")
            if isinstance(value, int | float):
                self.rate.labels(window).set(value)
        for gauge, key in ((self.process, "process"), (self.system, "system"),
                           (self.database, "database")):
            for figure, value in (s.get(key) or {}).items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    gauge.labels(figure).set(value)
        self.throttled.set(1 if s.get("throttle") else 0)
        self.paused.set(1 if s.get("paused") else 0)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
