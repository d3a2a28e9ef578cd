"""Pre-migration checks: is this database in a state where a migration may start?

Each check is a function returning details or raising; `run_checks` turns them into a report.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from typing import TYPE_CHECKING

from .lock import current_holder
from .validate import CheckResult, timed

if TYPE_CHECKING:
    from .migrator import Migrator


def _database(m: Migrator) -> str:
    with m.dialect.engine.connect() as conn:
        return f"{m.display_url}: {m.dialect.server_version(conn)}"


def _migration_state(m: Migrator) -> str:
    pending = m.pending()  # raises on edited or missing applied files
    if m.journal_ready:
        unfinished = m.journal.unfinished_run()
        if unfinished is not None:
            raise AssertionError(
                f"run {unfinished['id']} of {unfinished['migration_id']} is {unfinished['status']}: "
                "`safemigrate run` resumes it, `safemigrate rollback` undoes it"
            )
    return f"{len(pending)} pending: {', '.join(p.id for p in pending) or 'none'}"


def _disk(m: Migrator) -> str:
    with m.dialect.engine.connect() as conn:
        size = m.dialect.size_bytes(conn)
    needed = int(size * m.settings.disk_factor)
    folder = m.settings.backup_dir
    probe = folder if folder.exists() else next((p for p in folder.parents if p.exists()), folder)
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise AssertionError(
            f"{free / 1e6:.1f} MB free at {probe}, need {needed / 1e6:.1f} MB "
            f"({m.settings.disk_factor:g} x {size / 1e6:.1f} MB of data)"
        )
    return f"{free / 1e6:.0f} MB free at {probe}, need {needed / 1e6:.1f} MB"


def _integrity(m: Migrator) -> str:
    with m.dialect.engine.connect() as conn:
        problems = m.dialect.integrity_check(conn)
    if problems:
        raise AssertionError(f"{len(problems)} problems: {'; '.join(problems[:3])}")
    return "ok"


def _lock(m: Migrator) -> str:
    if not m.journal_ready:
        return "no journal yet"
    holder = current_holder(m.journal)
    if holder is not None:
        raise AssertionError(
            f"lock held by {holder['owner']} (pid {holder['pid']} on {holder['hostname']})"
        )
    return "free"


CHECKS: list[tuple[str, Callable[[Migrator], str]]] = [
    ("database", _database),
    ("migration-state", _migration_state),
    ("disk-space", _disk),
    ("integrity", _integrity),
    ("lock", _lock),
]


def run_checks(m: Migrator) -> list[CheckResult]:
    m._open(write=False)
    results = [timed(name, lambda f=func: f(m)) for name, func in CHECKS]
    try:
        pending = m.pending()
    except Exception:  # noqa: BLE001 - already reported by migration-state
        pending = []
    for migration in pending:
        for check in migration.checks:
            def run(check: Callable = check) -> str:
                with m.dialect.engine.connect() as conn:
                    if check(conn) is False:
                        raise AssertionError(f"{check.__name__} returned False")
                return "ok"
            results.append(timed(f"{migration.id}:{check.__name__}", run))
    return results
