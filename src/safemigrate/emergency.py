"""Emergency response: the seed's `EmergencyRollbackHandler` (4.1.1).

`handle_emergency(m, reason)` does, in order, each step timestamped in a timeline and
journaled (events ``emergency.*``):

1. emergency_stop     every running migration is asked to stop through the control channel
                      (bounded wait); a dead runner's lock is taken over by the rollback
2. emergency_mode     the `emergency` degradation level, for every application process
3. notify_team        a critical notification through every configured channel ([notify] urls:
                      e-mail, Slack, SMS gateways, webhooks… — apprise)
4. emergency_rollback the latest run is rolled back (strategy auto: restore when reverse is
                      impossible, also when the migration file was edited since)
5. system_validation  the rollback validator's verdict (or integrity checks when there was
                      nothing to roll back)
6. restore_services   degradation back to normal, only when the validation passed

Works when the runner process is dead. Nothing here prints: the CLI renders the timeline.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ._exceptions import ChecksumMismatchError, SafeMigrateError
from .control import who
from .events import Event
from .rollback import AlreadyRolledBack, stop_live_runner
from .validate import CheckResult, failed, integrity

if TYPE_CHECKING:
    from .migrator import Migrator


@dataclass
class Action:
    action: str
    status: str  # completed | failed | skipped
    timestamp: float
    details: str = ""


@dataclass
class EmergencyResponse:
    reason: str
    by: str
    started: float
    status: str = "responding"  # resolved | failed (validation failed: service not restored)
    finished: float | None = None
    run_id: str | None = None
    actions: list[Action] = field(default_factory=list)
    checks: list[CheckResult] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "resolved"

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ok"] = self.ok
        return out


class EmergencyHandler:
    def __init__(self, m: Migrator, reason: str, by: str | None = None) -> None:
        self.m = m
        self.reason = reason
        self.by = by or who()
        self.response = EmergencyResponse(reason, self.by, time.time())

    def record(self, action: str, status: str, details: str = "", level: str = "warning") -> None:
        entry = Action(action, status, time.time(), details)
        self.response.actions.append(entry)
        message = f"emergency: {action} {status}" + (f": {details}" if details else "")
        self.m.journal.event(self.response.run_id, f"emergency.{action}", message,
                             level="error" if status == "failed" else level,
                             data={"status": status, "details": details, "reason": self.reason,
                                   "by": self.by})
        self.m.bus.emit(Event("emergency.action", message, self.response.run_id, "info",
                              {"action": action, "status": status, "details": details}))

    def handle(self, stop_timeout: float) -> EmergencyResponse:
        from .degrade import DegradationManager

        r = self.response
        self.m._open(write=True)
        latest = self.m.journal.runs(limit=1)
        r.run_id = latest[0]["id"] if latest else None
        self.m.journal.event(r.run_id, "emergency.started", f"EMERGENCY declared by {self.by}: "
                             f"{self.reason}", level="critical", data={"by": self.by})
        # 1. stop every running migration
        try:
            stopped = stop_live_runner(self.m, reason=f"emergency: {self.reason}", timeout=stop_timeout)
            self.record("emergency_stop", "completed",
                        f"running migration stopped (run {stopped.get('run_id')}, pid {stopped['pid']})"
                        if stopped else "no migration process alive (a dead runner's lock is taken over)")
        except SafeMigrateError as exc:
            self.record("emergency_stop", "failed", exc.message)
        # 2. the emergency degradation level
        degradation = DegradationManager(self.m)
        try:
            degradation.set_level("emergency", f"emergency: {self.reason}", self.by, run_id=r.run_id)
            self.record("emergency_mode", "completed", "degradation level emergency")
        except SafeMigrateError as exc:
            self.record("emergency_mode", "failed", exc.message)
        # 3. tell the team on every channel
        self.record("notify_team", *self._notify())
        # 4. roll back the latest run
        result = None
        try:
            if r.run_id is None:
                raise AlreadyRolledBack("there is no run to roll back")
            result = self._rollback()
            self.record("emergency_rollback", "completed",
                        f"run {result.run_id} rolled back ({result.strategy}) in {result.seconds:.1f}s")
        except AlreadyRolledBack as exc:
            self.record("emergency_rollback", "skipped", exc.message)
        except SafeMigrateError as exc:
            r.error = exc.message
            self.record("emergency_rollback", "failed", exc.one_line())
        # 5. validate the system
        if result is not None:
            r.checks = result.checks
        elif r.error is None:
            r.checks = [integrity(self.m.dialect)]
        bad = failed(r.checks)
        if r.error is not None:
            self.record("system_validation", "failed", "the rollback did not complete")
        elif bad:
            self.record("system_validation", "failed",
                        "; ".join(f"{c.name}: {c.details}" for c in bad))
        else:
            self.record("system_validation", "completed",
                        f"{len(r.checks)} checks passed: {', '.join(c.name for c in r.checks)}")
        # 6. restore service only when the system is proven healthy
        healthy = r.error is None and not bad
        if healthy:
            try:
                degradation.off(f"emergency resolved: {self.reason}", self.by, run_id=r.run_id)
                self.record("restore_services", "completed", "degradation level normal")
            except SafeMigrateError as exc:
                healthy = False
                self.record("restore_services", "failed", exc.message)
        else:
            level = degradation.status().level
            self.record("restore_services", "skipped",
                        f"validation failed: the application stays at level {level}; "
                        "`safemigrate degrade off` once it is safe")
        r.status = "resolved" if healthy else "failed"
        r.finished = time.time()
        self.m.journal.event(r.run_id, "emergency.finished",
                             f"emergency {r.status} in {r.finished - r.started:.1f}s",
                             level="warning" if healthy else "critical",
                             data={"status": r.status, "actions": [asdict(a) for a in r.actions]})
        return r

    def _notify(self) -> tuple[str, str]:
        notifier = self.m.outputs.notifier
        text = (f"EMERGENCY: migration rollback initiated by {self.by}: {self.reason} "
                f"(database {self.m.display_url}, run {self.response.run_id or '-'})")
        self.m.bus.emit(Event("emergency", text, self.response.run_id, "critical",
                              {"reason": self.reason, "by": self.by, "severity": "critical",
                               "trigger": "manual", "timestamp": self.response.started}))
        if not notifier.enabled:
            return "skipped", "no [notify] urls configured"
        count = len(notifier.s.urls)
        schemes = sorted({u.split("://")[0] for u in notifier.s.urls})
        return "completed", f"critical notification queued for {count} channels ({', '.join(schemes)})"

    def _rollback(self) -> Any:
        reason = f"emergency: {self.reason} (by {self.by})"
        try:
            return self.m.rollback(None, "auto", reason)
        except ChecksumMismatchError as exc:
            # an emergency does not refuse: the file was edited, so restore from the snapshot
            self.m.journal.event(self.response.run_id, "emergency.strategy",
                                 f"{exc.message}: restoring from the snapshot instead", level="warning")
            return self.m.rollback(None, "restore", reason)


def handle_emergency(m: Migrator, reason: str, *, by: str | None = None,
                     stop_timeout: float | None = None) -> EmergencyResponse:
    """Stop, emergency mode, notify, roll back, validate, restore service if healthy."""
    from ._exceptions import UsageError
    from .rollback_validate import RollbackSettings

    if not reason or not reason.strip():
        raise UsageError("an emergency needs a reason", "pass --reason TEXT")
    timeout = stop_timeout if stop_timeout is not None else \
        RollbackSettings.from_settings(m.settings).stop_timeout
    return EmergencyHandler(m, reason, by).handle(timeout)
