"""The migration monitor (seed 2.3.1): metrics every second and after each batch, and alerts.

Metrics: rows total / processed / failed (quarantined), current phase and step, rate over the
last interval and smoothed, average, ETA, elapsed, process and system CPU and memory (psutil),
database health figures, the supervisor's throttle and pause state, and the time slept between
batches to yield to users (`yielded_seconds`: `[guards] sleep_ratio` × `batch_seconds_total`).
Alerts are events (`alert`, and `alert.cleared` once the condition is gone) with thresholds from
`[monitor]`: rate below a floor (seed: 10 rows/s), error rate above 5%, memory above 90%.

The monitor only computes; the supervisor's timer calls `tick()` and publishes the snapshot
(a `metrics` event, the journal, Prometheus).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psutil

from ._exceptions import ConfigError
from .events import Event

if TYPE_CHECKING:
    from .engine import BatchStats
    from .settings import Settings


@dataclass
class MonitorSettings:
    """`[monitor]`: sampling, alert thresholds and the Prometheus endpoint."""

    interval: float = 1.0  # seconds between samples
    rate_floor: float = 10.0  # rows/s (seed); alert below it while a backfill runs
    rate_floor_grace: float = 10.0  # seconds into a backfill before the floor applies
    error_rate_alert: float = 0.05
    error_rate_min_rows: int = 100
    memory_alert: float = 90.0  # percent of system memory
    alert_repeat: float = 60.0  # seconds before the same alert is raised again
    smoothing: float = 0.3  # weight of the newest interval in the smoothed rate
    persist_interval: float = 1.0  # seconds between metrics snapshots written to the journal
    metrics_port: int = 0  # Prometheus endpoint (0 = none; `run --metrics-port`)
    metrics_host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if self.interval <= 0 or self.persist_interval <= 0:
            raise ConfigError("[monitor] interval and persist_interval must be positive")
        if not 0 < self.smoothing <= 1:
            raise ConfigError("[monitor] smoothing must be in (0, 1]")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"[monitor] metrics_port must be a TCP port, got {self.metrics_port}")
        for name in ("rate_floor", "rate_floor_grace", "error_rate_alert", "memory_alert",
                     "alert_repeat", "error_rate_min_rows"):
            if getattr(self, name) < 0:
                raise ConfigError(f"[monitor] {name} must not be negative")

    @classmethod
    def from_settings(cls, settings: Settings) -> MonitorSettings:
        from .settings import section_settings

        return section_settings(cls, settings.section("monitor"), "monitor")


class _Processes:
    """CPU and memory of this process and its children (transform workers)."""

    def __init__(self) -> None:
        self.me = psutil.Process(os.getpid())
        self.me.cpu_percent(None)
        self._children: dict[int, psutil.Process] = {}
        psutil.cpu_percent(None)

    def sample(self) -> dict[str, Any]:
        cpu, rss = 0.0, 0
        try:
            procs = [self.me, *self._track_children()]
        except psutil.Error:
            procs = [self.me]
        for proc in procs:
            try:
                cpu += proc.cpu_percent(None)
                rss += proc.memory_info().rss
            except psutil.Error:
                continue
        memory = psutil.virtual_memory()
        try:
            load1 = os.getloadavg()[0]
        except OSError:  # pragma: no cover - not on every platform
            load1 = None
        return {
            "process": {"cpu_percent": round(cpu, 1), "rss_bytes": rss,
                        "memory_percent": round(100.0 * rss / memory.total, 2) if memory.total else 0.0,
                        "workers": len(procs) - 1},
            "system": {"cpu_percent": psutil.cpu_percent(None), "memory_percent": memory.percent,
                       "load1": load1, "cpus": psutil.cpu_count()},
        }

    def _track_children(self) -> list[psutil.Process]:
        alive = {}
        for child in self.me.children(recursive=True):
            proc = self._children.get(child.pid)
            if proc is None:
                proc = child
                proc.cpu_percent(None)
            alive[child.pid] = proc
        self._children = alive
        return list(alive.values())


class Monitor:
    """Holds the run's live metrics. Fed by events and batch statistics; sampled by `tick()`."""

    def __init__(self, settings: MonitorSettings) -> None:
        self.s = settings
        self._lock = threading.Lock()
        self._procs = _Processes()
        self.started = time.time()
        self.run_id: str | None = None
        self.migration: str | None = None
        self.phase: str | None = None
        self.phase_started: float | None = None
        self.step: int | None = None
        self.step_description: str | None = None
        self.step_started: float | None = None
        self.step_done_at_start = 0
        self.table: str | None = None
        self.total: int | None = None
        self.done = 0
        self.quarantined = 0
        self.batch_size: int | None = None
        self.last_batch_seconds: float | None = None
        self.batches = 0
        self.batch_seconds = 0.0  # summed duration of the batches (what sleep_ratio scales)
        self.yielded_seconds = 0.0  # slept between batches to yield to users (sleep_ratio)
        self.backfilling = False
        self.rate_last = 0.0
        self.rate_smoothed: float | None = None
        self._prev: tuple[float, int] | None = None
        self.system: dict[str, Any] = {}
        self.database: dict[str, Any] = {}
        self.supervisor_state: dict[str, Any] = {}
        self.active_alerts: dict[str, dict[str, Any]] = {}
        self._alerted_at: dict[str, float] = {}

    # -- inputs --------------------------------------------------------------------------------
    def on_event(self, event: Event) -> None:
        data = event.data
        with self._lock:
            if event.kind in ("run.started", "run.resumed"):
                self.run_id = event.run_id
                self.migration = data.get("migration")
                self.phase = data.get("phase") or "preparation"
            elif event.kind == "phase.started":
                self.phase, self.phase_started = data.get("phase"), event.ts
            elif event.kind == "step.started":
                self.step, self.step_description = data.get("step"), event.message
                self.step_started = event.ts
                self.backfilling = data.get("total") is not None
                if self.backfilling:
                    self.total, self.done = data.get("total"), data.get("done", 0)
                    self.step_done_at_start = self.done
                    self.quarantined = 0
                    self._prev = (time.monotonic(), self.done)
                    self.rate_smoothed = None
                    self.rate_last = 0.0
            elif event.kind == "step.completed":
                self.backfilling = False

    def after_batch(self, stats: BatchStats) -> None:
        with self._lock:
            self.run_id = stats.run_id
            self.step, self.table = stats.step_idx, stats.table
            self.total, self.done, self.quarantined = stats.total, stats.done, stats.quarantined
            self.batch_size, self.last_batch_seconds = stats.batch_size, stats.seconds
            self.batches += 1
            self.batch_seconds += stats.seconds
            self.backfilling = True

    def yielded(self, seconds: float) -> None:
        """Time slept between batches to yield to users (`[guards] sleep_ratio`)."""
        with self._lock:
            self.yielded_seconds += seconds

    # -- sampling ------------------------------------------------------------------------------
    def tick(self) -> tuple[dict[str, Any], list[Event]]:
        """Sample rates and the system; return the snapshot and the alerts to emit."""
        system = self._procs.sample()
        now = time.monotonic()
        with self._lock:
            self.system = system
            if self._prev is not None and self.backfilling:
                then, done = self._prev
                if now - then > 0:
                    self.rate_last = max(self.done - done, 0) / (now - then)
                    alpha = self.s.smoothing
                    self.rate_smoothed = (self.rate_last if self.rate_smoothed is None
                                          else alpha * self.rate_last + (1 - alpha) * self.rate_smoothed)
            self._prev = (now, self.done)
            snapshot = self._snapshot()
            alerts = self._alerts(snapshot)
            snapshot["alerts"] = self._active()
        return snapshot, alerts

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return self._snapshot()

    def check_alerts(self) -> list[Event]:
        """Alerts as of now, without sampling the system again (after each batch)."""
        with self._lock:
            return self._alerts(self._snapshot())

    def _snapshot(self) -> dict[str, Any]:
        now = time.time()
        average = None
        if self.backfilling and self.step_started:
            span = now - self.step_started
            average = (self.done - self.step_done_at_start) / span if span > 0 else None
        remaining = max((self.total or 0) - self.done, 0) if self.total is not None else None
        basis = self.rate_smoothed or average
        eta = remaining / basis if remaining is not None and basis else None
        error_rate = self.quarantined / self.done if self.done else 0.0
        return {
            "run_id": self.run_id, "migration": self.migration, "phase": self.phase,
            "phase_elapsed": now - self.phase_started if self.phase_started else None,
            "step": self.step, "step_description": self.step_description, "table": self.table,
            "backfilling": self.backfilling,
            "rows_total": self.total, "rows_done": self.done, "rows_failed": self.quarantined,
            "error_rate": round(error_rate, 6),
            "percent": round(100.0 * self.done / self.total, 2) if self.total else None,
            "rate_last": round(self.rate_last, 3),
            "rate_smoothed": round(self.rate_smoothed, 3) if self.rate_smoothed is not None else None,
            "rate_average": round(average, 3) if average is not None else None,
            "eta_seconds": round(eta, 1) if eta is not None else None,
            "elapsed_seconds": round(now - self.started, 3),
            "batch_size": self.batch_size, "batches": self.batches,
            "last_batch_seconds": self.last_batch_seconds,
            "batch_seconds_total": round(self.batch_seconds, 3),
            "yielded_seconds": round(self.yielded_seconds, 3),
            **self.system,
            "database": dict(self.database),
            **self.supervisor_state,
            "alerts": self._active(),
            "updated_at": now,
        }

    def _active(self) -> list[dict[str, Any]]:
        return [dict(a) for a in sorted(self.active_alerts.values(), key=lambda a: a["since"])]

    def _alerts(self, snap: dict[str, Any]) -> list[Event]:
        conditions: dict[str, tuple[bool, str, str, float | None, float]] = {}
        held = bool(snap.get("paused") or snap.get("throttle"))
        in_step = self.backfilling and self.step_started is not None \
            and time.time() - self.step_started >= self.s.rate_floor_grace
        rate = snap["rate_smoothed"]
        conditions["rate_floor"] = (
            self.s.rate_floor > 0 and in_step and not held and rate is not None and rate < self.s.rate_floor
            and (self.total or 0) > self.done,
            "warning", f"migration speed is slow: {rate or 0:,.1f} rows/s, below {self.s.rate_floor:g}",
            rate, self.s.rate_floor)
        error_rate = snap["error_rate"]
        conditions["error_rate"] = (
            self.s.error_rate_alert > 0 and self.done >= self.s.error_rate_min_rows
            and error_rate > self.s.error_rate_alert,
            "warning", f"high error rate: {error_rate:.2%} of rows quarantined "
            f"(alert above {self.s.error_rate_alert:.0%})", error_rate, self.s.error_rate_alert)
        memory = (snap.get("system") or {}).get("memory_percent")
        conditions["memory"] = (
            self.s.memory_alert > 0 and memory is not None and memory > self.s.memory_alert,
            "critical", f"high memory usage: {memory}% of system memory "
            f"(alert above {self.s.memory_alert:g}%)", memory, self.s.memory_alert)
        out = []
        now = time.time()
        for name, (active, level, message, value, threshold) in conditions.items():
            data = {"alert": name, "value": value, "threshold": threshold}
            if active:
                if name not in self.active_alerts:
                    self.active_alerts[name] = {"alert": name, "level": level, "message": message,
                                                "since": now}
                self.active_alerts[name]["message"] = message
                if now - self._alerted_at.get(name, 0.0) >= self.s.alert_repeat:
                    self._alerted_at[name] = now
                    out.append(Event("alert", message, self.run_id, level, data))
            elif name in self.active_alerts:
                del self.active_alerts[name]
                self._alerted_at.pop(name, None)
                out.append(Event("alert.cleared", f"cleared: {name}", self.run_id, "info", data))
        return out
