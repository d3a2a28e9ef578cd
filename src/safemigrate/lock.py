"""The run lock: one row in `safemigrate_lock`, kept fresh by a heartbeat thread.

Two runs never overlap. A runner that died (its process is gone on this host, or its heartbeat
is older than `stale_after`) has its lock taken over, and the takeover is journaled.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from typing import Any

import psutil
import sqlalchemy as sa

from ._exceptions import LockHeldError
from .journal import Journal, lock

LOCK_NAME = "migrate"


def _owner_is_dead(row: Any, stale_after: float) -> str | None:
    """Why the current holder is dead, or None when it may still be alive."""
    age = time.time() - row.heartbeat_at
    if row.hostname == socket.gethostname() and not psutil.pid_exists(row.pid):
        return f"process {row.pid} on {row.hostname} is gone"
    if age > stale_after:
        return f"no heartbeat for {age:.0f}s (stale after {stale_after:.0f}s)"
    return None


class RunLock:
    """Context manager holding the journal lock with a heartbeat."""

    def __init__(self, journal: Journal, *, stale_after: float = 60.0, interval: float = 2.0,
                 purpose: str = "run") -> None:
        self.journal = journal
        self.stale_after = stale_after
        self.interval = interval
        self.purpose = purpose
        self.owner = f"{purpose}:{uuid.uuid4().hex[:12]}"
        self.run_id: str | None = None
        self.takeover: dict[str, Any] | None = None
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self, run_id: str | None = None) -> None:
        now = time.time()
        takeover = None
        with self.journal.engine.begin() as conn:
            row = conn.execute(sa.select(lock).where(lock.c.name == LOCK_NAME)).first()
            if row is not None:
                reason = _owner_is_dead(row, self.stale_after)
                if reason is None:
                    raise LockHeldError(
                        f"another safemigrate {row.owner.split(':')[0]} holds the lock "
                        f"(pid {row.pid} on {row.hostname}, run {row.run_id or '-'}, "
                        f"heartbeat {now - row.heartbeat_at:.0f}s ago)"
                    )
                takeover = {"previous_owner": row.owner, "pid": row.pid,
                            "hostname": row.hostname, "run_id": row.run_id, "reason": reason}
                conn.execute(lock.delete().where(lock.c.name == LOCK_NAME))
            conn.execute(lock.insert().values(
                name=LOCK_NAME, owner=self.owner, run_id=run_id, hostname=socket.gethostname(),
                pid=os.getpid(), acquired_at=now, heartbeat_at=now))
        self.run_id = run_id
        # Said once the run is known (see `pop_takeover`): the operator sees it in the run's
        # output and history, not in an event without a run.
        self.takeover = takeover
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="safemigrate-heartbeat",
                                        daemon=True)
        self._thread.start()

    def pop_takeover(self) -> dict[str, Any] | None:
        """The lock taken over from a dead or silent runner by `acquire`, once."""
        takeover, self.takeover = self.takeover, None
        return takeover

    def attach_run(self, run_id: str) -> None:
        self.run_id = run_id
        with self.journal.engine.begin() as conn:
            conn.execute(lock.update().where(lock.c.owner == self.owner).values(run_id=run_id))

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                with self.journal.engine.begin() as conn:
                    result = conn.execute(lock.update().where(lock.c.owner == self.owner)
                                          .values(heartbeat_at=time.time()))
                    if result.rowcount == 0:
                        self.lost.set()
                        return
            except Exception:  # a busy database delays one beat; the next one retries
                continue

    def release(self) -> None:
        unsaid = self.pop_takeover()  # no run was attached (a restore): journal it without one
        if unsaid is not None:
            self.journal.event(self.run_id, "lock.takeover", "took over the lock of a dead "
                               f"runner: {unsaid['reason']}", level="warning", data=unsaid)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 5)
            self._thread = None
        with self.journal.engine.begin() as conn:
            conn.execute(lock.delete().where(lock.c.owner == self.owner))

    def __enter__(self) -> RunLock:
        if self._thread is None:
            self.acquire(self.run_id)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def current_holder(journal: Journal) -> dict[str, Any] | None:
    with journal.engine.connect() as conn:
        row = conn.execute(sa.select(lock).where(lock.c.name == LOCK_NAME)).mappings().first()
    return None if row is None else dict(row)
