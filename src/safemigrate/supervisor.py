"""The supervisor: a running migration watches itself and can be steered.

Installed by `Migrator.run()` for the duration of a run, it composes the monitor (metrics,
alerts), the guards (ok / throttle / trip), the control channel (pause, resume, abort, rollback
requests, the pause file) and batch-size tuning. The engine calls `between_batches(stats)`
after every committed batch and the runner calls `between_steps()` between phases and schema
steps; both may block (paused, throttled), raise (AbortedError on abort, GuardTrippedError on a
trip or an immediate rollback request) or, after a batch, return a new batch size.

A timer thread samples metrics every `[monitor] interval` seconds, evaluates the guards that
need no batch (timeout, database load, canaries), emits `metrics` and `alert` events, and
hands the snapshot to a writer thread that stores it in the journal (`metrics:<run_id>`), so
`safemigrate status` in another process shows it.

`Outputs` (notifications, hooks) are subscribers every Migrator has, whatever the command.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._exceptions import AbortedError, GuardTrippedError, NotReadyError, SafeMigrateError
from .control import ControlChannel, finish_request, read_control, update_control
from .events import Event
from .guards import (
    OK,
    THROTTLE,
    TRIP,
    CanaryGuard,
    CanarySettings,
    CorruptionGuard,
    DegradationGuard,
    ErrorRateGuard,
    GuardSettings,
    LoadGuard,
    TimeoutGuard,
    Verdict,
    worst,
)
from .hooks import Hooks, HookSettings, describe_failure
from .monitor import Monitor, MonitorSettings
from .notify import Notifier, NotifySettings
from .steps import Backfill

if TYPE_CHECKING:
    from .engine import BatchStats
    from .migration import Migration
    from .migrator import Migrator
    from .prometheus import MetricsExporter


def metrics_key(run_id: str) -> str:
    return f"metrics:{run_id}"


class Outputs:
    """Notifications and hooks, subscribed to a Migrator's event bus."""

    def __init__(self, m: Migrator) -> None:
        self.notifier = Notifier(NotifySettings.from_settings(m.settings), m.display_url)
        self.hooks = Hooks(HookSettings.from_settings(m.settings), m.journal, m.bus, m.display_url)
        m.bus.subscribe(self.notifier)
        m.bus.subscribe(self.hooks)

    def close(self) -> None:
        self.notifier.close()


def attach_outputs(m: Migrator) -> Outputs:
    return Outputs(m)


class BatchTuner:
    """Batch size tuned to a target batch duration (pt-osc --chunk-time), at most halved or
    doubled per batch, within [min_batch_size, max_batch_size] (widened to the starting size).
    A Backfill that sets its own batch_size keeps it."""

    def __init__(self, settings: GuardSettings) -> None:
        self.s = settings
        self._key: tuple[str, int] | None = None
        self._per_row: float | None = None
        self.initial = 0
        self.pinned = False

    def start_step(self, pinned: bool) -> None:
        self._key, self.pinned = None, pinned

    def next_size(self, stats: BatchStats) -> int | None:
        key = (stats.run_id, stats.step_idx)
        if key != self._key:
            self._key, self._per_row, self.initial = key, None, stats.batch_size
        if not self.s.autotune or self.pinned or self.s.target_batch_seconds <= 0:
            return None
        if stats.rows == 0 or stats.rows < stats.batch_size or stats.seconds <= 0:
            return None  # the short last batch says nothing about the pace
        per_row = stats.seconds / stats.rows
        self._per_row = per_row if self._per_row is None else 0.5 * per_row + 0.5 * self._per_row
        size = stats.batch_size
        ideal = self.s.target_batch_seconds / self._per_row
        new = min(max(ideal, size / 2), size * 2)
        low = min(self.s.min_batch_size, self.initial)
        high = max(self.s.max_batch_size, self.initial)
        return max(1, int(max(low, min(high, new))))


class Supervisor:
    """Monitor + guards + control for one `Migrator.run()` (a context manager)."""

    def __init__(self, m: Migrator) -> None:
        self.m = m
        self.gs = GuardSettings.from_settings(m.settings)
        self.ms = MonitorSettings.from_settings(m.settings)
        self.cs = CanarySettings.from_settings(m.settings)
        self.monitor = Monitor(self.ms)
        pause_file = Path(self.gs.pause_file).expanduser()
        self.control = ControlChannel(m.journal, pause_file if pause_file.is_absolute()
                                      else Path.cwd() / pause_file)
        self.error_rate = ErrorRateGuard(self.gs)
        self.degradation = DegradationGuard(self.gs)
        self.corruption = CorruptionGuard(self.gs, m.dialect, m.journal)
        self.timeout = TimeoutGuard(self.gs)
        self.load = LoadGuard(self.gs, m.dialect)
        self.canaries = (CanaryGuard(self.cs, m.dialect, self._canary_problem)
                         if self.cs.queries and self.gs.enabled else None)
        self.tuner = BatchTuner(self.gs)
        self.exporter: MetricsExporter | None = None
        self.run_id: str | None = None
        self.run_started: float | None = None
        self._migrations: dict[str, Migration] = {}
        self.migration: Migration | None = None
        self._lock = threading.RLock()
        self._pending_trip: Verdict | None = None
        self._pending_error: SafeMigrateError | None = None
        self._live: dict[str, Verdict] = {}
        self._muted: set[str] = set()
        self._tripped_paused: set[str] = set()
        self._held: dict[str, Any] | None = None  # the pause or throttle being waited out
        self._backoff: Verdict | None = None
        self._request_id: str | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()  # a pause or throttle is published at once
        self._threads: list[threading.Thread] = []
        self._dirty = False
        self._latest: dict[str, Any] = {}
        self._last_status_hook = time.monotonic()
        self.errors: list[str] = []

    # -- lifecycle ----------------------------------------------------------------------------
    def __enter__(self) -> Supervisor:
        self.m.bus.subscribe(self._on_event)
        if self.ms.metrics_port:
            from .prometheus import MetricsExporter

            self.exporter = MetricsExporter(self.ms.metrics_port, self.ms.metrics_host)
            self.m.bus.subscribe(self.exporter)
            self.m.bus.emit(Event("monitor.endpoint", f"Prometheus metrics on {self.exporter.url}",
                                  None, data={"url": self.exporter.url}))
        self.load.meter.thread = threading.get_ident()
        self.load.meter.install()
        for target, name in ((self._timer, "safemigrate-monitor"), (self._writer, "safemigrate-metrics")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        if self.canaries is not None:
            self.canaries.start()
        self.m.outputs.hooks.state = self.monitor.snapshot
        self.m.supervisor = self
        self.m.between_batches = self.between_batches
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self._stop.set()
        self._wake.set()
        if self.canaries is not None:
            self.canaries.stop()
        for thread in self._threads:
            thread.join(timeout=10)
        self.load.meter.remove()
        self.m.between_batches = self.m._check_lock
        self.m.supervisor = None
        self.m.outputs.hooks.state = None
        if self._request_id is not None:  # the runner's rollback for a request did not finish
            message = str(getattr(exc, "message", exc) or "the run ended before the rollback")
            try:
                finish_request(self.m.journal, self._request_id, False, message)
            except Exception as err:  # noqa: BLE001 - reported, the original error wins
                self.errors.append(f"request {self._request_id}: {err}")
        try:
            self._with_state()
            self._persist(self.monitor.snapshot())
        except Exception as err:  # noqa: BLE001 - the last snapshot is best effort
            self.errors.append(f"final metrics: {err}")
        if self.run_id is not None:  # an abort that came too late for this run is void
            self._clear_abort(lambda target: target in (None, self.run_id))
        self.m.bus.unsubscribe(self._on_event)
        if self.exporter is not None:
            self.m.bus.unsubscribe(self.exporter)
            self.exporter.close()

    # -- events ---------------------------------------------------------------------------------
    def _on_event(self, event: Event) -> None:
        if event.kind in ("metrics", "batch"):
            return
        self.monitor.on_event(event)
        if event.kind in ("run.started", "run.resumed"):
            self._run_begins(event)
        elif event.kind == "step.started" and event.data.get("total") is not None:
            self._backfill_begins(event)
        elif event.kind == "rollback.completed" and self._request_id is not None:
            request_id, self._request_id = self._request_id, None
            finish_request(self.m.journal, request_id, True, event.message)
            self.m.bus.emit(Event("request.done", f"rollback request {request_id} done: "
                                  f"{event.message}", event.run_id, "warning",
                                  {"request_id": request_id}))

    def _run_begins(self, event: Event) -> None:
        self.run_id = event.run_id
        self.control.run_id = event.run_id
        self.run_started = time.time()
        migration_id = event.data.get("migration")
        self.migration = self._find_migration(migration_id)
        self._clear_abort(lambda target: target != event.run_id)  # one meant for an earlier run
        results = self.m.outputs.hooks.fire("on-start", event)
        failed = [r for r in results if not r.ok]
        if failed:
            first = failed[0]
            self.m.bus.emit(Event("hook.failed", f"on-start hook {Path(first.path).name} "
                                  f"{describe_failure(first)}", event.run_id, "error",
                                  {"hook": "on-start", "path": first.path,
                                   "returncode": first.returncode, "output": first.output}))
            self._pending_error = NotReadyError(
                f"the on-start hook {Path(first.path).name} {describe_failure(first)}; "
                "the run stopped before any change",
                "fix or remove the hook, then `safemigrate run` again")

    def _clear_abort(self, stale: Any) -> None:
        try:
            pending = read_control(self.m.journal).get("abort")
            if pending and stale(pending.get("run_id")):
                self.control.consume_abort()
        except Exception as exc:  # noqa: BLE001 - a busy journal leaves it for status to show
            self.errors.append(f"abort flag: {exc}")

    def _find_migration(self, migration_id: str | None) -> Migration | None:
        if migration_id is None:
            return None
        if migration_id not in self._migrations:
            try:
                self._migrations = {mig.id: mig for mig in self.m.migrations()}
            except SafeMigrateError:
                return None
        return self._migrations.get(migration_id)

    def _backfill_begins(self, event: Event) -> None:
        idx = event.data.get("step")
        step = None
        if self.migration is not None and isinstance(idx, int) and idx < len(self.migration.steps):
            candidate = self.migration.steps[idx]
            step = candidate if isinstance(candidate, Backfill) else None
        self.tuner.start_step(pinned=step is not None and step.batch_size is not None)
        if step is None or not self.gs.enabled or event.run_id is None:
            self.corruption.step = None
            return
        size = step.batch_size or self.m.settings.batch_size
        try:
            self.corruption.begin_step(event.run_id, idx, step, event.data.get("resumed_from"), size)
        except Exception as exc:  # noqa: BLE001 - a guard that cannot start is reported, not fatal
            self.corruption.step = None
            self.m.bus.emit(Event("guard.disabled", f"corruption guard off for step {idx}: {exc}",
                                  event.run_id, "warning", {"guard": "corruption"}))

    def _canary_problem(self, message: str) -> None:
        self.m.bus.emit(Event("alert", message, self.run_id, "warning", {"alert": "canary"}))

    # -- the timer ------------------------------------------------------------------------------
    def _timer(self) -> None:
        while not self._stop.wait(self.ms.interval):
            try:
                self.tick()
            except Exception as exc:  # noqa: BLE001 - the monitor must never stop the run
                self.errors.append(f"monitor: {type(exc).__name__}: {exc}")

    def tick(self) -> dict[str, Any]:
        """One sample: live guards, metrics, alerts, the snapshot out to every output."""
        if self.gs.enabled:
            # canaries first: reading the database's health may wait behind the same lock
            self._note(self.canaries.check() if self.canaries is not None else None)
            self._note(self.timeout.check(time.time(), self.run_started, self.monitor.phase,
                                          self.monitor.phase_started))
            self._note(self.load.check())
        else:
            self.load.sample()
        self.monitor.database = {**self.load.figures}
        if self.load.health_error:
            self.monitor.database["health_error"] = self.load.health_error
        self._with_state()
        snapshot, alerts = self.monitor.tick()
        for alert in alerts:
            self.m.bus.emit(alert)
        self.m.bus.emit(Event("metrics", "metrics", self.run_id, data=snapshot))
        with self._lock:
            self._latest = snapshot
            self._dirty = True
        self._status_hook(snapshot)
        return snapshot

    def _note(self, verdict: Verdict | None) -> None:
        """Keep a timer guard's verdict; a trip waits for the writer thread to act on it."""
        if verdict is None:
            return
        with self._lock:
            self._live[verdict.guard] = verdict
            if verdict.action == TRIP and verdict.guard not in self._ignored \
                    and self._pending_trip is None:
                self._pending_trip = verdict

    def _live_verdicts(self) -> list[Verdict]:
        """The timer guards' latest verdicts, the canaries' as of now."""
        with self._lock:
            verdicts = dict(self._live)
        if self.canaries is not None and self.gs.enabled:
            verdicts[self.canaries.name] = self.canaries.check()
        return [v for v in verdicts.values() if v.guard not in self._ignored]

    def _publish_soon(self) -> None:
        self._with_state()
        snapshot = self.monitor.snapshot()
        with self._lock:
            self._latest, self._dirty = snapshot, True
        self._wake.set()

    def _with_state(self) -> None:
        with self._lock:
            live = {name: v.as_dict() for name, v in self._live.items() if v.action != OK}
            held = dict(self._held) if self._held else None
        self.monitor.supervisor_state = {
            "throttle": held if held and held.get("kind") == "throttle" else None,
            "paused": held if held and held.get("kind") == "pause" else None,
            "guards": live, "muted_guards": sorted(self._muted),
            "auto_rollback": self.m.settings.auto_rollback, "sleep_ratio": self.gs.sleep_ratio,
            "control_error": self.control.broken,
        }

    def _writer(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.ms.persist_interval)
            self._wake.clear()
            with self._lock:
                snapshot = self._latest if self._dirty else None
                self._dirty = False
            if snapshot is not None and snapshot.get("run_id"):
                try:
                    self._persist(snapshot)
                except Exception as exc:  # noqa: BLE001 - a busy journal skips one snapshot
                    self.errors.append(f"metrics writer: {exc}")

    def _persist(self, snapshot: dict[str, Any]) -> None:
        run_id = snapshot.get("run_id") or self.run_id
        if run_id and self.m.journal_ready:
            self.m.journal.set_state(metrics_key(run_id), snapshot)

    def _status_hook(self, snapshot: dict[str, Any]) -> None:
        hooks = self.m.outputs.hooks
        interval = hooks.s.status_interval
        if not interval or self.run_id is None or time.monotonic() - self._last_status_hook < interval:
            return
        self._last_status_hook = time.monotonic()
        if hooks.find("on-status"):
            hooks.fire("on-status", Event("status", f"{snapshot.get('rows_done')} rows processed",
                                          self.run_id, data={"phase": snapshot.get("phase")}))

    # -- between batches and steps (the writer thread) -----------------------------------------
    def between_batches(self, stats: BatchStats) -> int | None:
        self.m._check_lock(stats)
        self.monitor.after_batch(stats)
        for alert in self.monitor.check_alerts():
            self.m.bus.emit(alert)
        next_size = self.tuner.next_size(stats)
        if self.gs.enabled:
            verdicts = [self._safely(self.error_rate.after_batch, stats),
                        self._safely(self.degradation.after_batch, stats),
                        self._safely(self.corruption.after_batch, stats, next_size or stats.batch_size),
                        self.timeout.check(time.time(), self.run_started, self.monitor.phase,
                                           self.monitor.phase_started)]
            found = worst([v for v in verdicts if v.guard not in self._ignored])
            if found is not None and found.action == TRIP:
                self._trip(found)
            self._back_off(found if found is not None and found.action == THROTTLE else None, stats)
        if not self.m.stop.is_set():
            self._gate()
        if self.gs.sleep_ratio > 0 and not self.m.stop.is_set():
            began = time.monotonic()
            self._stop_aware_sleep(stats.seconds * self.gs.sleep_ratio)
            self.monitor.yielded(time.monotonic() - began)
        return next_size

    def between_steps(self) -> None:
        if self.m.stop.is_set():
            raise AbortedError(f"stopped before the next step: {self.m.stop.reason}")
        if self.gs.enabled:
            verdict = self.timeout.check(time.time(), self.run_started, self.monitor.phase,
                                         self.monitor.phase_started)
            if verdict.action == TRIP and verdict.guard not in self._ignored:
                self._trip(verdict)
        self._gate()
        if self.m.stop.is_set():
            raise AbortedError(f"stopped before the next step: {self.m.stop.reason}")

    @property
    def _ignored(self) -> set[str]:
        """Guards muted by an operator, or whose trip is waiting for one (auto_rollback off)."""
        return self._muted | self._tripped_paused

    def _safely(self, func: Any, *args: Any) -> Verdict:
        try:
            return func(*args)
        except Exception as exc:  # noqa: BLE001 - a guard that cannot look is reported, not fatal
            name = getattr(func, "__self__", None)
            guard = getattr(name, "name", "guard")
            self.m.bus.emit(Event("guard.error", f"guard {guard} could not evaluate: "
                                  f"{type(exc).__name__}: {exc}", self.run_id, "warning",
                                  {"guard": guard}))
            return Verdict(guard)

    def _stop_aware_sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.m.stop.is_set() and (left := end - time.monotonic()) > 0:
            time.sleep(min(left, 0.1))

    def _back_off(self, verdict: Verdict | None, stats: BatchStats) -> None:
        """A batch guard that throttles (degradation): yield for about one batch's time."""
        if verdict is None:
            if self._backoff is not None:
                self._emit("guard.healthy", f"guard {self._backoff.guard} is healthy again",
                           "info", guard=self._backoff.guard)
                self._backoff = None
            return
        if self._backoff is None or self._backoff.guard != verdict.guard:
            self._emit("guard.throttle", f"throttling ({verdict.guard}): {verdict.reason}", "warning",
                       guard=verdict.guard, reason=verdict.reason, figures=verdict.figures)
        self._backoff = verdict
        self._stop_aware_sleep(min(max(stats.seconds, self.gs.throttle_poll), self.gs.max_backoff))

    def _emit(self, kind: str, message: str, level: str = "info", **data: Any) -> None:
        self.m.bus.emit(Event(kind, message, self.run_id, level, data))

    def _trip(self, verdict: Verdict) -> None:
        """Roll back (raise) when auto_rollback is on; else pause the run and say so."""
        with self._lock:
            self._pending_trip = None
        auto = self.m.settings.auto_rollback
        self._emit("guard.tripped", f"guard {verdict.guard} tripped: {verdict.reason}", "critical",
                   guard=verdict.guard, reason=verdict.reason, figures=verdict.figures,
                   auto_rollback=auto, strategy=verdict.strategy)
        if auto:
            raise GuardTrippedError(f"guard {verdict.guard} tripped: {verdict.reason}",
                                    guard=verdict.guard, figures=verdict.figures,
                                    strategy=verdict.strategy)
        self._tripped_paused.add(verdict.guard)
        update_control(self.m.journal, paused=True, paused_by=f"guard:{verdict.guard}",
                       pause_reason=verdict.reason, paused_at=time.time())
        self._emit("guard.decision", f"auto_rollback is off: run paused after guard {verdict.guard} "
                   "tripped (`safemigrate resume` continues with the guard muted, `safemigrate "
                   "rollback --priority high` rolls back, `safemigrate abort` stops)", "critical",
                   guard=verdict.guard, decision="pause", figures=verdict.figures)
        self.control.poll(force=True)

    def _gate(self) -> None:
        """Wait while paused or throttled; act on abort, rollback requests and trips."""
        while True:
            if self._pending_error is not None:
                error, self._pending_error = self._pending_error, None
                raise error
            with self._lock:
                pending = self._pending_trip
            if pending is not None and pending.guard not in self._ignored:
                self._trip(pending)
            cmd = self.control.poll(force=self._held is not None)
            if cmd.kind == "abort":
                self.control.consume_abort()
                self._release("abort")
                self._emit("control.aborted", f"aborted by {cmd.by}" + (f": {cmd.reason}" if cmd.reason
                                                                       else ""), "warning", by=cmd.by)
                raise AbortedError(f"aborted by {cmd.by}" + (f": {cmd.reason}" if cmd.reason else ""))
            if cmd.kind == "rollback" and cmd.request is not None:
                request = cmd.request
                if self.control.claim(request["id"]):
                    self._release("rollback")
                    self._request_id = request["id"]
                    message = (f"rollback requested by {request['requested_by']} "
                               f"({request['priority']}): {request['reason']}")
                    self._emit("request.executing", f"rolling back for request {request['id']}: "
                               f"{message}", "warning", request_id=request["id"])
                    raise GuardTrippedError(message, guard="rollback_request", strategy=request["strategy"],
                                            request_id=request["id"],
                                            figures={"request_id": request["id"],
                                                     "priority": request["priority"],
                                                     "requested_by": request["requested_by"]})
                continue
            hold: dict[str, Any] | None = None
            if cmd.kind == "pause":
                hold = {"kind": "pause", "by": cmd.by, "reason": cmd.reason}
            else:
                if self._tripped_paused:  # an operator resumed after a trip: mute those guards
                    self._muted |= self._tripped_paused
                    self._emit("guard.acknowledged", f"resumed by an operator; guard(s) "
                               f"{', '.join(sorted(self._tripped_paused))} muted for this run", "warning",
                               guards=sorted(self._tripped_paused))
                    self._tripped_paused = set()
                live = worst(self._live_verdicts())
                if live is not None and live.action == TRIP:
                    self._trip(live)
                    continue
                if live is not None and live.action == THROTTLE:
                    hold = {"kind": "throttle", "guard": live.guard, "reason": live.reason,
                            "figures": live.figures}
            if hold is None:
                self._release("healthy")
                return
            self._hold(hold)
            if self.m.stop.is_set():
                return
            time.sleep(self.gs.throttle_poll)

    def _hold(self, hold: dict[str, Any]) -> None:
        with self._lock:
            current = self._held
            keys = ("kind", "guard", "by") + (("reason",) if hold["kind"] == "pause" else ())
            same = current is not None and all(current.get(k) == hold.get(k) for k in keys)
            hold["since"] = current["since"] if current and current["kind"] == hold["kind"] else time.time()
            self._held = hold  # the latest figures, for status
            if same:
                return
        self._publish_soon()
        if hold["kind"] == "pause":
            self._emit("control.paused", f"paused by {hold['by']}" + (f": {hold['reason']}" if hold["reason"]
                                                                     else "")
                       + " (`safemigrate resume` continues)", "warning", by=hold["by"], reason=hold["reason"])
        else:
            self._emit("guard.throttle", f"throttling ({hold['guard']}): {hold['reason']}", "warning",
                       guard=hold["guard"], reason=hold["reason"], figures=hold["figures"])

    def _release(self, why: str) -> None:
        with self._lock:
            held, self._held = self._held, None
        if held is None:
            return
        self._publish_soon()
        waited = time.time() - held["since"]
        if why != "healthy":
            return
        if held["kind"] == "pause":
            self._emit("control.resumed", f"resumed after {waited:.1f}s paused", "info", waited=waited)
        else:
            self._emit("guard.healthy", f"{held['guard']} is healthy again after {waited:.1f}s of "
                       "throttling", "info", guard=held["guard"], waited=waited)
