"""Status of the current or last run, read from the journal, so any process can watch."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .control import control_status
from .lock import current_holder
from .supervisor import metrics_key

if TYPE_CHECKING:
    from .migrator import Migrator


def _progress(step: dict[str, Any], now: float) -> dict[str, Any]:
    total, done = step["rows_total"], step["rows_done"]
    started, updated = step["started_at"], step["updated_at"]
    rate = eta = None
    if step["kind"] == "backfill" and started and done:
        elapsed = max((updated if step["status"] != "running" else now) - started, 1e-6)
        rate = done / elapsed
        if total is not None and step["status"] == "running" and rate > 0:
            eta = max(total - done, 0) / rate
    return {
        "index": step["idx"], "kind": step["kind"], "description": step["description"],
        "phase": step["phase"], "status": step["status"], "rows_total": total, "rows_done": done,
        "rows_quarantined": step["rows_quarantined"], "rate": rate, "eta_seconds": eta,
        "percent": (100.0 * done / total) if total else (100.0 if step["status"] == "done" else 0.0),
    }


def build_status(migrator: Migrator) -> dict[str, Any]:
    out: dict[str, Any] = {"database": migrator.display_url, "run": None, "pending": []}
    try:
        out["pending"] = [m.id for m in migrator.pending()]
    except Exception as exc:  # noqa: BLE001 - status reports a broken folder, it does not fail
        out["pending_error"] = str(exc)
    journal = migrator.journal
    if not migrator.journal_ready:
        return out
    out["applied"] = sorted(journal.applied())
    holder = current_holder(journal)
    out["lock"] = holder
    out.update(control_status(journal))  # pause/abort state, open rollback requests
    runs = journal.runs(limit=1)
    if not runs:
        return out
    run = runs[0]
    now = time.time()
    steps = [_progress(s, now) for s in journal.steps(run["id"])]
    status = run["status"]
    alive = holder is not None and holder.get("run_id") == run["id"]
    if status == "running" and not alive:
        status = "interrupted"  # journal says running but no process holds the lock
    errors = [e for e in journal.events(run["id"]) if e["level"] in ("error", "critical")]
    out["run"] = {
        "id": run["id"], "migration_id": run["migration_id"], "status": status,
        "phase": run["phase"], "started_at": run["started_at"], "updated_at": run["updated_at"],
        "finished_at": run["finished_at"], "elapsed": (run["finished_at"] or now) - run["started_at"],
        "error": run["error"], "hostname": run["hostname"], "pid": run["pid"], "alive": alive,
        "phases": journal.phases(run["id"]), "steps": steps,
        "rows_done": sum(s["rows_done"] for s in steps),
        "rows_total": sum(s["rows_total"] or 0 for s in steps),
        "quarantined": journal.quarantine_count(run["id"]),
        "quarantine_examples": [
            {"pk": q["pk"], "error": q["error"]} for q in journal.quarantined(run["id"], limit=5)
        ],
        "errors": [{"ts": e["ts"], "kind": e["kind"], "message": e["message"]} for e in errors[-5:]],
        "backups": [{"id": b["id"], "kind": b["kind"], "location": b["location"],
                     "status": b["status"]} for b in journal.backups(run["id"])],
    }
    running = [s for s in steps if s["status"] == "running"]
    out["run"]["rate"] = running[0]["rate"] if running else None
    out["run"]["eta_seconds"] = running[0]["eta_seconds"] if running else None
    out["run"]["metrics"] = journal.get_state(metrics_key(run["id"]))  # the runner's last snapshot
    out["run"]["rollback"] = _rollback(journal, run["id"])
    return out


def _rollback(journal: Any, run_id: str) -> dict[str, Any] | None:
    """The latest rollback attempt of the run: its eight steps, so a crashed one is visible."""
    from .rollback import progress_of

    progress = progress_of(journal, run_id)
    if progress is None:
        return None
    keep = ("attempt", "status", "strategy", "why", "reason", "started", "finished", "error", "backup")
    return {**{k: progress.get(k) for k in keep},
            "steps": [{k: s.get(k) for k in ("name", "status", "started", "finished", "details")}
                      for s in progress.get("steps") or []]}
