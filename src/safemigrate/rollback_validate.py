"""Proof after a rollback: the seed's `RollbackValidator` (3.3.1), run by step 7 of every
rollback and by `safemigrate verify --after-rollback`.

| check            | passes when                                                              |
|------------------|--------------------------------------------------------------------------|
| integrity        | the engine's own integrity check finds nothing                           |
| foreign-keys     | no row points at a missing parent                                        |
| schema, content  | schema and content digests equal the pre-migration ones, apart from rows |
|                  | the application changed meanwhile (listed)                               |
| smoke:*          | the smoke checks that describe the rolled-back schema pass, each in a    |
|                  | transaction that is rolled back: those of the migrations still applied, |
|                  | plus the rolled-back migration's `rollback_smoke_checks`                 |
| performance      | each `[canaries]` query runs no slower than its pre-migration baseline   |
|                  | (recorded in the preparation phase) beyond the tolerance                 |
| access           | `[rollback] app_url`: the affected tables are readable as the app's role |
| health           | `[rollback] health_url`: the application answers 2xx                     |
| check:*          | `[rollback] checks = ["module:function"]`: each user check passes        |

Every check runs even when another fails, and reports passed/failed with its details.

    [rollback]
    checks = ["myapp.checks:orders_readable"]   # called with a Connection, rolled back after
    app_url = "postgresql://app@db/shop"          # the application's own role
    app_query = ""                                # default: SELECT * FROM each table LIMIT 1
    health_url = "http://127.0.0.1:8000/health"
    health_timeout = 5.0
    canary_tolerance = 0.5                        # 50% slower than the baseline is still fine
    canary_slack_ms = 20.0                        # plus this much (tiny queries are noisy)
    canary_runs = 3                               # the best of N runs is compared
    stop_timeout = 60.0                           # seconds a running migration has to stop
"""

from __future__ import annotations

import importlib
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Connection

from ._exceptions import ChecksumMismatchError, ConfigError, MigrationFileError, UsageError
from .backup import plain_snapshot
from .checks import call_read_only
from .guards import CanarySettings
from .migration import Migration
from .steps import Backfill
from .validate import CheckResult, integrity, schema_and_content, smoke_checks, timed

if TYPE_CHECKING:
    from .migrator import Migrator

CANARY_KEY = "canaries:{run_id}"


@dataclass
class RollbackSettings:
    """`[rollback]`: the user-defined checks of the rollback validator and its tolerances."""

    checks: list[str] = field(default_factory=list)
    app_url: str = ""
    app_query: str = ""
    health_url: str = ""
    health_timeout: float = 5.0
    canary_tolerance: float = 0.5
    canary_slack_ms: float = 20.0
    canary_runs: int = 3
    stop_timeout: float = 60.0

    def __post_init__(self) -> None:
        if not all(isinstance(c, str) and ":" in c for c in self.checks):
            raise ConfigError("[rollback] checks must be a list of \"module:function\" strings")
        if self.health_url and not self.health_url.startswith(("http://", "https://")):
            raise ConfigError(f"[rollback] health_url must be an http(s) URL, got {self.health_url!r}")
        if self.health_timeout <= 0 or self.stop_timeout <= 0 or self.canary_runs < 1:
            raise ConfigError("[rollback] health_timeout and stop_timeout must be positive, "
                              "canary_runs at least 1")
        if self.canary_tolerance < 0 or self.canary_slack_ms < 0:
            raise ConfigError("[rollback] canary_tolerance and canary_slack_ms must not be negative")

    @classmethod
    def from_settings(cls, settings: Any) -> RollbackSettings:
        from .settings import section_settings

        return section_settings(cls, settings.section("rollback"), "rollback")


# -- canary baseline ---------------------------------------------------------------------------
def measure_canaries(m: Migrator, runs: int) -> dict[str, Any]:
    """Best-of-`runs` milliseconds of each `[canaries]` query (None and the error if it fails)."""
    queries = CanarySettings.from_settings(m.settings).queries
    out: dict[str, Any] = {}
    if not queries:
        return out
    with m.dialect.engine.connect() as conn:
        for sql in queries:
            best: float | None = None
            try:
                for _ in range(runs):
                    started = time.perf_counter()
                    conn.exec_driver_sql(sql).fetchall()
                    ms = (time.perf_counter() - started) * 1000
                    best = ms if best is None else min(best, ms)
                    conn.rollback()
                out[sql] = {"ms": best}
            except Exception as exc:  # noqa: BLE001 - a failing canary is a finding
                conn.rollback()
                out[sql] = {"ms": None, "error": str(exc).splitlines()[0]}
    return out


def record_canary_baseline(m: Migrator, run_id: str) -> None:
    """Called by the runner's preparation phase, before any change: the canary timings the
    rollback validator compares with (once per run; a resumed run keeps the first)."""
    key = CANARY_KEY.format(run_id=run_id)
    if not CanarySettings.from_settings(m.settings).queries or m.journal.get_state(key) is not None:
        return
    baseline = measure_canaries(m, RollbackSettings.from_settings(m.settings).canary_runs)
    m.journal.set_state(key, {"at": time.time(), "queries": baseline})
    m.journal.event(run_id, "canaries.baseline",
                    f"canary baseline recorded for {len(baseline)} queries", data=baseline)


# -- the validator -------------------------------------------------------------------------------
def load_callable(spec: str) -> Callable[[Connection], object]:
    module_name, _, attr = spec.partition(":")
    module = importlib.import_module(module_name)
    func = getattr(module, attr, None)
    if not callable(func):
        raise AssertionError(f"{spec} is not a function")
    return func  # type: ignore[no-any-return]


class RollbackValidator:
    """Runs every check after the rollback of `run`; `migration` may be None (file gone)."""

    def __init__(self, m: Migrator, run: dict[str, Any], migration: Migration | None,
                 strategy: str = "reverse") -> None:
        self.m = m
        self.run = run
        self.migration = migration
        self.strategy = strategy
        self.dialect = m.dialect
        self.settings = RollbackSettings.from_settings(m.settings)

    def validate(self) -> list[CheckResult]:
        results = [integrity(self.dialect), timed("foreign-keys", self._foreign_keys)]
        results += self._consistency()
        results += self._functionality()
        results.append(timed("performance", self._performance))
        if self.settings.app_url:
            results.append(timed("access", self._access))
        if self.settings.health_url:
            results.append(timed("health", self._health))
        for spec in self.settings.checks:
            results.append(timed(f"check:{spec}", lambda spec=spec: self._user_check(spec)))
        return results

    # -- data integrity and consistency ----------------------------------------------------------
    def _foreign_keys(self) -> str:
        with self.dialect.engine.connect() as conn:
            problems = self.dialect.foreign_key_violations(conn)
        if problems:
            raise AssertionError(f"{len(problems)} rows point at missing parents: "
                                 f"{'; '.join(problems[:3])}")
        return "every foreign key resolves"

    def _restored_columns(self) -> dict[str, set[str]]:
        restored: dict[str, set[str]] = {}
        if self.strategy == "reverse" and self.migration is not None:
            for row in self.m.journal.steps(self.run["id"]):
                step = self.migration.steps[row["idx"]]
                if isinstance(step, Backfill) and row["state"].get("columns"):
                    restored.setdefault(step.table, set()).update(row["state"]["columns"])
        return restored

    def _consistency(self) -> list[CheckResult]:
        baseline = self.run.get("baseline")
        if not baseline:
            return [CheckResult("consistency", True, "the run recorded no baseline: it changed nothing")]
        snapshot = next((Path(b["location"]) for b in self.m.journal.backups(self.run["id"],
                                                                            kind="snapshot")
                         if b["id"] == baseline.get("snapshot_id")), None)
        if snapshot is not None and not snapshot.exists():
            snapshot = None
        try:
            with plain_snapshot(self.dialect, snapshot) as path:
                online = (self.run.get("options") or {}).get("online", True)
                return schema_and_content(self.dialect, baseline, path, self._restored_columns(),
                                          application_wrote=bool(online))
        except Exception as exc:  # noqa: BLE001 - a broken snapshot is a failed check, not a crash
            return [CheckResult("consistency", False, f"cannot compare with the snapshot: {exc}")]

    # -- functionality -----------------------------------------------------------------------------
    def _functionality(self) -> list[CheckResult]:
        try:
            migrations = self.m.migrations()
            applied = self.m.journal.applied()
        except (MigrationFileError, ChecksumMismatchError) as exc:
            return [CheckResult("smoke", False, f"cannot load the migrations: {exc.message}")]
        results: list[CheckResult] = []
        for migration in migrations:
            if migration.id in applied and migration.id != self.run["migration_id"]:
                results += smoke_checks(self.dialect, migration)
        if self.migration is not None and self.migration.rollback_smoke_checks:
            results += smoke_checks(self.dialect, replace(
                self.migration, smoke_checks=list(self.migration.rollback_smoke_checks)))
        if not results:
            results.append(CheckResult("smoke", True, "no smoke checks describe the rolled-back "
                                       "schema (declare rollback_smoke_checks in the migration)"))
        return results

    # -- performance -------------------------------------------------------------------------------
    def _performance(self) -> str:
        recorded = self.m.journal.get_state(CANARY_KEY.format(run_id=self.run["id"]))
        if not recorded or not recorded.get("queries"):
            return "no canary baseline recorded for this run (no [canaries] queries)"
        now = measure_canaries(self.m, self.settings.canary_runs)
        tolerance, slack = self.settings.canary_tolerance, self.settings.canary_slack_ms
        problems, lines = [], []
        for sql, before in recorded["queries"].items():
            after = now.get(sql)
            if before.get("ms") is None:
                lines.append(f"{sql!r}: no baseline ({before.get('error')})")
                continue
            if after is None:
                lines.append(f"{sql!r}: no longer configured")
                continue
            if after.get("ms") is None:
                problems.append(f"{sql!r} fails: {after.get('error')}")
                continue
            limit = before["ms"] * (1 + tolerance) + slack
            line = f"{sql!r}: {after['ms']:.1f} ms (baseline {before['ms']:.1f} ms, limit {limit:.1f})"
            (problems if after["ms"] > limit else lines).append(line)
        if problems:
            raise AssertionError("slower than before the migration: " + "; ".join(problems))
        return "; ".join(lines)

    # -- access and integration ----------------------------------------------------------------------
    def _access(self) -> str:
        from .dialects import dialect_for
        from .urls import normalize_url, redact

        url = normalize_url(self.settings.app_url)
        app = dialect_for(url, lock_timeout=self.m.settings.lock_timeout)
        try:
            with app.engine.connect() as conn:
                if self.settings.app_query:
                    rows = conn.exec_driver_sql(self.settings.app_query).fetchall()
                    return f"{self.settings.app_query!r} as {redact(url)}: {len(rows)} rows"
                tables = list((self.run.get("baseline") or {}).get("tables") or [])
                for table in tables:
                    conn.exec_driver_sql(f"SELECT * FROM {app.quote(table)} LIMIT 1").fetchall()
                return f"{', '.join(tables) or 'no tables'} readable as {redact(url)}"
        finally:
            app.dispose()

    def _health(self) -> str:
        url = self.settings.health_url
        started = time.perf_counter()
        try:
            with urllib.request.urlopen(url, timeout=self.settings.health_timeout) as response:  # noqa: S310
                status = response.status
                body = response.read(200).decode("utf-8", "replace").strip()
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{url} answered HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise AssertionError(f"{url} unreachable: {reason}") from None
        ms = (time.perf_counter() - started) * 1000
        if not 200 <= status < 300:
            raise AssertionError(f"{url} answered HTTP {status}")
        return f"{url}: HTTP {status} in {ms:.0f} ms" + (f" ({body[:80]})" if body else "")

    def _user_check(self, spec: str) -> str:
        func = load_callable(spec)
        with self.dialect.engine.connect() as conn:
            return call_read_only(conn, func, spec)


def verify_after_rollback(m: Migrator, run_id: str | None = None) -> tuple[dict[str, Any],
                                                                           list[CheckResult]]:
    """`safemigrate verify --after-rollback`: the validator over the last rolled-back run (or
    `run_id`). Reads only."""
    from .rollback import migration_for_run, progress_of

    m._open(write=False)
    if not m.journal_ready:
        raise UsageError("this database has no safemigrate journal: nothing was rolled back")
    if run_id is not None:
        run = m.journal.run(run_id)
        if run is None:
            raise UsageError(f"no run {run_id!r}", "see `safemigrate history` for run ids")
    else:
        run = next((r for r in m.journal.runs() if r["status"] in ("rolled_back", "rolling_back")),
                   None)
        if run is None:
            raise UsageError("no run was rolled back", "see `safemigrate history`")
    if run["status"] not in ("rolled_back", "rolling_back"):
        raise UsageError(f"run {run['id']} is {run['status']}, not rolled back",
                         "plain `safemigrate verify` checks an applied migration")
    try:
        migration = migration_for_run(m.migrations(), run)
    except (ChecksumMismatchError, MigrationFileError):
        migration = None
    progress = progress_of(m.journal, run["id"]) or {}
    strategy = progress.get("strategy") or "reverse"
    return run, RollbackValidator(m, run, migration, strategy).validate()
