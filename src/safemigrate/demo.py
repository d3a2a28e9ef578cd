"""The flashcard demo, end to end: generate v2 cards, check, plan, run, verify, roll back.

Returns figures for a summary; rendering is the CLI's business.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checks import run_checks
from .digest import database_digest
from .events import EventBus
from .migrator import Migrator
from .settings import Settings
from .validate import failed


@dataclass
class DemoSummary:
    database: str
    rows: int = 0
    bad_rows: int = 0
    migrated: int = 0
    quarantined: int = 0
    run_seconds: float = 0.0
    rollback_seconds: float = 0.0
    snapshot_bytes: int = 0
    validation: list[dict[str, Any]] = field(default_factory=list)
    verify: list[dict[str, Any]] = field(default_factory=list)
    restored_identical: bool = False
    stages: list[tuple[str, float]] = field(default_factory=list)


def run_demo(workdir: Path, *, rows: int, bad_rate: float, workers: int | None = None,
             bus: EventBus | None = None, rollback: bool = True, seed: int = 42) -> DemoSummary:
    from .examples.cards import MIGRATIONS_DIR, generate

    db = workdir / "cards.db"
    summary = DemoSummary(str(db))

    def stage(name: str, started: float) -> None:
        summary.stages.append((name, time.time() - started))

    started = time.time()
    made = generate(db, rows=rows, bad_rate=bad_rate, seed=seed)
    summary.rows, summary.bad_rows = made["rows"], made["bad_rows"]
    stage("generate", started)
    settings = Settings(db=str(db), migrations=MIGRATIONS_DIR, backup_dir=workdir / "backups",
                        **({"workers": workers} if workers else {}))
    with Migrator(settings, bus) as migrator:
        started = time.time()
        bad_checks = failed(run_checks(migrator))
        if bad_checks:
            raise RuntimeError(f"demo database not ready: {bad_checks[0].details}")
        stage("check", started)
        with migrator.dialect.engine.connect() as conn:
            before = database_digest(conn, migrator.dialect.user_tables(conn))
        started = time.time()
        (result,) = migrator.run()
        summary.run_seconds = time.time() - started
        stage("run", started)
        summary.migrated = result.rows - result.quarantined
        summary.quarantined = result.quarantined
        summary.validation = [c.as_dict() for c in result.checks]
        summary.snapshot_bytes = sum(b["size"] or 0 for b in migrator.journal.backups(result.run_id))
        started = time.time()
        summary.verify = [c.as_dict() for c in migrator.verify()]
        stage("verify", started)
        if rollback:
            started = time.time()
            migrator.rollback(result.run_id, reason="demo: show that rollback restores v2")
            summary.rollback_seconds = time.time() - started
            stage("rollback", started)
            with migrator.dialect.engine.connect() as conn:
                after = database_digest(conn, migrator.dialect.user_tables(conn))
            summary.restored_identical = before == after
    return summary
