"""Control comes back through the journal (seed 3.1.2, ManualRollbackManager, and gh-ost-style
interactive commands), so any terminal or machine that reaches the database can steer a run.

- pause / resume / abort: the `control` key of `safemigrate_state`; the runner obeys between
  batches and steps. A pause file (`[guards] pause_file`, default `.safemigrate/pause`) pauses
  too, for as long as it exists.
- rollback requests: rows of `safemigrate_requests` with reason, requester and priority. High
  and critical ones are approved at once: a live runner rolls its run back after the current
  batch (and exits 3); with no runner alive the requesting process rolls back itself. Low and
  medium ones wait for `safemigrate rollback approve ID` (or `reject ID`).

Every command and request is an event (journaled, notified, passed to hooks).
"""

from __future__ import annotations

import getpass
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from ._exceptions import SafeMigrateError, UsageError
from .events import Event
from .guards import read_connection
from .journal import Journal, loads, new_id, requests, state
from .lock import _owner_is_dead, current_holder

if TYPE_CHECKING:
    from .migrator import Migrator

CONTROL_KEY = "control"
PRIORITIES = ("low", "medium", "high", "critical")
IMMEDIATE = frozenset({"high", "critical"})
OPEN = ("pending", "approved", "executing")


def who() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


# -- the control key ------------------------------------------------------------------------------
def read_control(journal: Journal, conn: sa.Connection | None = None) -> dict[str, Any]:
    query = sa.select(state.c.value).where(state.c.key == CONTROL_KEY)
    if conn is None:
        with read_connection(journal.engine) as own:
            value = own.execute(query).scalar()
    else:
        value = conn.execute(query).scalar()
    out = {"paused": False, "paused_by": None, "pause_reason": None, "paused_at": None, "abort": None}
    out.update(loads(value) or {})
    return out


def update_control(journal: Journal, **changes: Any) -> dict[str, Any]:
    """Read-modify-write of the control key in one transaction."""
    with journal.engine.begin() as conn:
        current = read_control(journal, conn)
        current.update(changes)
        journal.set_state(CONTROL_KEY, current, conn)
    return current


def live_holder(journal: Journal, stale_after: float = 60.0) -> dict[str, Any] | None:
    """The holder of the run lock when it is alive (purpose, run id, pid, host), else None."""
    holder = current_holder(journal)
    if holder is None or _owner_is_dead(SimpleNamespace(**holder), stale_after) is not None:
        return None
    return {**holder, "purpose": str(holder["owner"]).split(":")[0]}


def live_run(journal: Journal, stale_after: float = 60.0) -> dict[str, Any] | None:
    """The live runner of a migration (`safemigrate run`), else None."""
    holder = live_holder(journal, stale_after)
    return holder if holder is not None and holder["purpose"] == "run" else None


def _prepare(m: Migrator) -> None:
    m._open(write=True)  # control works on a database that has a journal (created if missing)


def _emit(m: Migrator, kind: str, message: str, run_id: str | None, level: str = "info",
          **data: Any) -> None:
    m.bus.emit(Event(kind, message, run_id, level, data))


def pause(m: Migrator, *, by: str | None = None, reason: str = "") -> dict[str, Any]:
    _prepare(m)
    by = by or who()
    live = live_run(m.journal, m.settings.lock_stale_after)
    update_control(m.journal, paused=True, paused_by=by, pause_reason=reason or None,
                   paused_at=time.time())
    run_id = live["run_id"] if live else None
    _emit(m, "control.pause", f"pause requested by {by}" + (f": {reason}" if reason else ""),
          run_id, "warning", by=by, reason=reason, live=bool(live))
    return {"paused": True, "run": live}


def resume(m: Migrator, *, by: str | None = None) -> dict[str, Any]:
    _prepare(m)
    by = by or who()
    live = live_run(m.journal, m.settings.lock_stale_after)
    update_control(m.journal, paused=False, paused_by=None, pause_reason=None, paused_at=None,
                   resumed_by=by, resumed_at=time.time())
    run_id = live["run_id"] if live else None
    _emit(m, "control.resume", f"resume requested by {by}", run_id, by=by, live=bool(live))
    return {"paused": False, "run": live}


def abort(m: Migrator, *, by: str | None = None, reason: str = "") -> dict[str, Any]:
    _prepare(m)
    by = by or who()
    live = live_run(m.journal, m.settings.lock_stale_after)
    if live is None or not live.get("run_id"):
        raise UsageError("no migration is running: nothing to abort",
                         "see `safemigrate status`; `safemigrate rollback` undoes a finished run")
    update_control(m.journal, abort={"run_id": live["run_id"], "by": by, "reason": reason,
                                     "at": time.time()})
    _emit(m, "control.abort", f"abort requested by {by}" + (f": {reason}" if reason else ""),
          live["run_id"], "warning", by=by, reason=reason)
    return {"run": live}


# -- the runner's side ----------------------------------------------------------------------------
@dataclass
class Command:
    """What the runner must do now: abort, roll back (a request), pause, or carry on."""

    kind: str | None = None  # "abort" | "rollback" | "pause" | None
    by: str | None = None
    reason: str = ""
    request: dict[str, Any] | None = None


class ControlChannel:
    """Polled by the supervisor between batches (at most every `min_interval` seconds)."""

    def __init__(self, journal: Journal, pause_file: Path, min_interval: float = 0.2) -> None:
        self.journal = journal
        self.pause_file = pause_file
        self.min_interval = min_interval
        self.run_id: str | None = None
        self._last_poll = 0.0
        self._last: Command = Command()
        self.broken: str | None = None

    def poll(self, force: bool = False) -> Command:
        now = time.monotonic()
        file_paused = self.pause_file.exists()
        if not force and now - self._last_poll < self.min_interval:
            cmd = self._last
        else:
            self._last_poll = now
            try:
                cmd = self._read()
                self.broken = None
            except sa.exc.DBAPIError as exc:  # a busy journal delays a command, never the run
                self.broken = str(exc).splitlines()[0]
                cmd = self._last
            self._last = cmd
        if cmd.kind is None and file_paused:
            return Command("pause", f"pause file {self.pause_file}", "the pause file exists")
        return cmd

    def _read(self) -> Command:
        with read_connection(self.journal.engine) as conn:
            control = read_control(self.journal, conn)
            request = None
            if self.run_id is not None and sa.inspect(conn).has_table(requests.name):
                row = conn.execute(sa.select(requests).where(
                    requests.c.run_id == self.run_id, requests.c.status == "approved",
                ).order_by(requests.c.created_at)).mappings().first()
                request = dict(row) if row is not None else None
        abort_ = control.get("abort")
        if abort_ and abort_.get("run_id") in (None, self.run_id):
            return Command("abort", abort_.get("by"), abort_.get("reason") or "")
        if request is not None:
            return Command("rollback", request["requested_by"], request["reason"], request)
        if control.get("paused"):
            return Command("pause", control.get("paused_by"), control.get("pause_reason") or "")
        return Command()

    def consume_abort(self) -> None:
        update_control(self.journal, abort=None)
        self._last = Command()

    def claim(self, request_id: str) -> bool:
        """Take an approved request for execution (only one process may)."""
        self._last = Command()
        return claim_request(self.journal, request_id)


# -- rollback requests ----------------------------------------------------------------------------
def _request_row(journal: Journal, request_id: str) -> dict[str, Any]:
    with read_connection(journal.engine) as conn:
        row = conn.execute(sa.select(requests).where(requests.c.id == request_id)).mappings().first()
    if row is None:
        raise UsageError(f"no rollback request {request_id!r}", "`safemigrate status` lists pending ones")
    return dict(row)


def _set_request(journal: Journal, request_id: str, *, expect: tuple[str, ...] | None = None,
                 **values: Any) -> bool:
    values["updated_at"] = time.time()
    query = requests.update().where(requests.c.id == request_id)
    if expect is not None:
        query = query.where(requests.c.status.in_(expect))
    with journal.engine.begin() as conn:
        return bool(conn.execute(query.values(**values)).rowcount)


def claim_request(journal: Journal, request_id: str) -> bool:
    return _set_request(journal, request_id, expect=("approved",), status="executing")


def finish_request(journal: Journal, request_id: str, ok: bool, outcome: str) -> None:
    _set_request(journal, request_id, expect=("executing", "approved"),
                 status="done" if ok else "failed", outcome=outcome)


def list_requests(journal: Journal, statuses: tuple[str, ...] | None = None,
                  run_id: str | None = None) -> list[dict[str, Any]]:
    with read_connection(journal.engine) as conn:
        if not sa.inspect(conn).has_table(requests.name):
            return []
        query = sa.select(requests).order_by(requests.c.created_at)
        if statuses is not None:
            query = query.where(requests.c.status.in_(statuses))
        if run_id is not None:
            query = query.where(requests.c.run_id == run_id)
        return [dict(r) for r in conn.execute(query).mappings()]


def _target_run(m: Migrator, run_id: str | None, live: dict[str, Any] | None) -> dict[str, Any]:
    if live is not None and live.get("run_id"):
        if run_id is not None and run_id != live["run_id"]:
            raise UsageError(f"run {live['run_id']} is running, not {run_id}",
                             "abort it first (`safemigrate abort`), or request its own rollback")
        run_id = live["run_id"]
    run = m._rollback_target(run_id)
    if run["status"] == "rolled_back":
        raise UsageError(f"run {run['id']} is already rolled back")
    return run


def request_rollback(m: Migrator, *, reason: str, priority: str, requested_by: str | None = None,
                     run_id: str | None = None, strategy: str = "reverse") -> dict[str, Any]:
    """Record a rollback request. High and critical ones are approved at once (the caller then
    runs `execute_request`); low and medium ones wait for approval."""
    if priority not in PRIORITIES:
        raise UsageError(f"unknown priority {priority!r}", "use " + ", ".join(PRIORITIES))
    if not reason.strip():
        raise UsageError("a rollback request needs a reason", "pass --reason TEXT")
    _prepare(m)
    requested_by = requested_by or who()
    live = live_run(m.journal, m.settings.lock_stale_after)
    run = _target_run(m, run_id, live)
    now = time.time()
    request_id = new_id()
    immediate = priority in IMMEDIATE
    with m.journal.engine.begin() as conn:
        conn.execute(requests.insert().values(
            id=request_id, run_id=run["id"], priority=priority,
            status="approved" if immediate else "pending", strategy=strategy, reason=reason,
            requested_by=requested_by, created_at=now, updated_at=now,
            decided_by="policy: high and critical run at once" if immediate else None,
            decided_at=now if immediate else None))
    request = _request_row(m.journal, request_id)
    _emit(m, "request.created", f"rollback of run {run['id']} requested by {requested_by} "
          f"({priority}): {reason}", run["id"], "warning" if not immediate else "critical",
          request_id=request_id, priority=priority, requested_by=requested_by, reason=reason,
          status=request["status"], run_alive=bool(live))
    return request


def approve(m: Migrator, request_id: str, *, by: str | None = None) -> dict[str, Any]:
    _prepare(m)
    by = by or who()
    request = _request_row(m.journal, request_id)
    if request["status"] != "pending":
        raise UsageError(f"request {request_id} is {request['status']}, not pending")
    _set_request(m.journal, request_id, expect=("pending",), status="approved", decided_by=by,
                 decided_at=time.time())
    _emit(m, "request.approved", f"rollback request {request_id} approved by {by}",
          request["run_id"], "warning", request_id=request_id, by=by, priority=request["priority"])
    return _request_row(m.journal, request_id)


def reject(m: Migrator, request_id: str, *, by: str | None = None, note: str = "") -> dict[str, Any]:
    _prepare(m)
    by = by or who()
    request = _request_row(m.journal, request_id)
    if request["status"] != "pending":
        raise UsageError(f"request {request_id} is {request['status']}, not pending")
    _set_request(m.journal, request_id, expect=("pending",), status="rejected", decided_by=by,
                 decided_at=time.time(), outcome=note or None)
    _emit(m, "request.rejected", f"rollback request {request_id} rejected by {by}"
          + (f": {note}" if note else ""), request["run_id"], "warning", request_id=request_id,
          by=by, note=note)
    return _request_row(m.journal, request_id)


def execute_request(m: Migrator, request_id: str, *, wait: float = 600.0,
                    poll: float = 0.3) -> dict[str, Any]:
    """Carry out an approved request: a live runner of its run does it after its current batch
    (we wait up to `wait` seconds for the outcome); with none alive, we roll back here."""
    deadline = time.monotonic() + wait
    while True:
        request = _request_row(m.journal, request_id)
        if request["status"] in ("done", "failed", "rejected", "pending"):
            return request
        live = live_holder(m.journal, m.settings.lock_stale_after)
        busy = live is not None and (live["purpose"] == "rollback" or (
            live["purpose"] == "run" and live.get("run_id") == request["run_id"]))
        if busy:
            if time.monotonic() >= deadline:
                return request  # the runner will do it; the caller reports "in progress"
            time.sleep(poll)
            continue
        # nobody is running it: do it here (a rollback is resumable, so a dead executor's
        # half-done rollback is finished too) unless the run was rolled back meanwhile
        run = m.journal.run(request["run_id"]) if request["run_id"] else None
        if run is not None and run["status"] == "rolled_back":
            finish_request(m.journal, request_id, True, f"run {run['id']} is rolled back")
            return _request_row(m.journal, request_id)
        _set_request(m.journal, request_id, expect=("approved", "executing"), status="executing")
        _emit(m, "request.executing", f"rolling back run {request['run_id']} for request "
              f"{request_id}", request["run_id"], "warning", request_id=request_id)
        try:
            result = m.rollback(request["run_id"], request["strategy"],
                                f"request {request_id} by {request['requested_by']} "
                                f"({request['priority']}): {request['reason']}")
        except SafeMigrateError as exc:
            finish_request(m.journal, request_id, False, exc.message)
            _emit(m, "request.failed", f"rollback request {request_id} failed: {exc.message}",
                  request["run_id"], "error", request_id=request_id)
            raise
        finish_request(m.journal, request_id, True, f"rolled back ({result.strategy}) in "
                       f"{result.seconds:.1f}s")
        _emit(m, "request.done", f"rollback request {request_id} done: run {request['run_id']} "
              "rolled back", request["run_id"], "warning", request_id=request_id)
        return _request_row(m.journal, request_id)


def control_status(journal: Journal) -> dict[str, Any]:
    """Pause/abort state and open rollback requests, for `safemigrate status`."""
    try:
        control = read_control(journal)
    except sa.exc.DBAPIError:
        control = {}
    return {"control": control,
            "requests": list_requests(journal, OPEN)}

