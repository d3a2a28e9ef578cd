"""Degradation levels: switch features off and limit load while a migration or rollback runs.

The seed's `DegradationManager` (4.2.1), made shared: the current level lives in the journal
(`safemigrate_state`, key ``degradation``) with who set it, why and when, and every change is an
event in the audit trail, so every process of the application sees the same level.

    normal       nothing disabled, no limits
    minimal      advanced_search, batch_operations, real_time_sync off; 60 requests/min per client
    essential    + search, sync, export off; 30 requests/min
    emergency    every feature except the core ones off; 10 requests/min
    maintenance  everything off: 503 for every route but the health check

Disabled features are cumulative: a level disables its own list plus those of the levels below
it; ``"*"`` means every feature not listed in ``core_features``. Every value can be overridden::

    [degradation]
    client_ttl = 2.0                    # seconds the application client caches the level
    core_features = ["core", "review"]

    [degradation.levels.minimal]
    requests_per_minute = 120
    disabled_features = ["advanced_search"]

A number 0 means "no limit". The values in force are the ones resolved by whoever set the level:
they are journaled with it, so the application needs no copy of the config.

Operators and library code change the level with `DegradationManager`; applications read it with
`Degradation` (a cached client) or `safemigrate.asgi.DegradationMiddleware`.
"""

from __future__ import annotations

import getpass
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection, Engine

from ._exceptions import ConfigError, DatabaseError, UsageError
from .events import Event, EventBus
from .journal import Journal, loads
from .journal import events as events_table
from .journal import state as state_table
from .settings import Settings, section_settings
from .urls import normalize_url, redact

if TYPE_CHECKING:
    from .migrator import Migrator

__all__ = [
    "LEVELS",
    "STATE_KEY",
    "Degradation",
    "DegradationManager",
    "DegradationSettings",
    "DegradationState",
    "LevelConfig",
]

log = logging.getLogger(__name__)

LEVELS = ("normal", "minimal", "essential", "emergency", "maintenance")
STATE_KEY = "degradation"
EVENT_KIND = "degradation.set"
ALL_FEATURES = "*"


@dataclass
class LevelConfig:
    """What one level disables and limits. Numbers of 0 mean no limit; times are seconds."""

    disabled_features: list[str] = field(default_factory=list)
    max_concurrent_users: int = 0
    session_timeout: float = 0.0
    cache_ttl: float = 0.0
    requests_per_minute: int = 0
    concurrent_connections: int = 0
    retry_after: int = 0
    message: str = "This feature is temporarily unavailable; please retry later."

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def limits(self) -> dict[str, Any]:
        """The limits, with None where there is none."""
        return {
            "max_concurrent_users": self.max_concurrent_users or None,
            "session_timeout": self.session_timeout or None,
            "cache_ttl": self.cache_ttl or None,
            "requests_per_minute": self.requests_per_minute or None,
            "concurrent_connections": self.concurrent_connections or None,
            "retry_after": self.retry_after or None,
        }


# The seed's table (4.2.1), in seconds; its `all_except_core` is "*" here.
DEFAULT_LEVELS: dict[str, LevelConfig] = {
    "normal": LevelConfig(),
    "minimal": LevelConfig(
        disabled_features=["advanced_search", "batch_operations", "real_time_sync"],
        max_concurrent_users=100, session_timeout=300, cache_ttl=3600,
        requests_per_minute=60, concurrent_connections=10, retry_after=60),
    "essential": LevelConfig(
        disabled_features=["search", "sync", "export"],
        max_concurrent_users=50, session_timeout=180, cache_ttl=7200,
        requests_per_minute=30, concurrent_connections=5, retry_after=120),
    "emergency": LevelConfig(
        disabled_features=[ALL_FEATURES],
        max_concurrent_users=10, session_timeout=60, cache_ttl=14400,
        requests_per_minute=10, concurrent_connections=2, retry_after=300),
    "maintenance": LevelConfig(
        disabled_features=[ALL_FEATURES], retry_after=300,
        message="The service is down for maintenance; please retry later."),
}

_NUMBERS = ("max_concurrent_users", "session_timeout", "cache_ttl", "requests_per_minute",
            "concurrent_connections", "retry_after")


@dataclass
class DegradationSettings:
    """The `[degradation]` table of the config."""

    client_ttl: float = 2.0
    core_features: list[str] = field(default_factory=lambda: ["core"])
    levels: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings | None) -> DegradationSettings:
        data = settings.section("degradation") if settings is not None else {}
        out = section_settings(cls, data, "degradation")
        if out.client_ttl < 0:
            raise ConfigError(f"[degradation] client_ttl must be >= 0, got {out.client_ttl!r}")
        _check_names(out.core_features, "[degradation] core_features")
        for name, table in out.levels.items():
            where = f"[degradation.levels.{name}]"
            if name not in LEVELS:
                raise ConfigError(f"unknown degradation level {name!r} in [degradation.levels]",
                                  "levels: " + ", ".join(LEVELS))
            if not isinstance(table, dict):
                raise ConfigError(f"{where} must be a table, got {table!r}")
            section_settings(LevelConfig, table, where.strip("[]"))
            for key in _NUMBERS:
                if key in table and table[key] < 0:
                    raise ConfigError(f"{where} {key} must be >= 0 (0 means no limit), "
                                      f"got {table[key]!r}")
            if "disabled_features" in table:
                _check_names(table["disabled_features"], f"{where} disabled_features")
        return out

    def resolve(self) -> dict[str, LevelConfig]:
        """Every level with the overrides applied and the lower levels' features included."""
        out: dict[str, LevelConfig] = {}
        inherited: list[str] = []
        for name in LEVELS:
            table = dict(self.levels.get(name) or {})
            for key in ("session_timeout", "cache_ttl"):
                if key in table:
                    table[key] = float(table[key])
            level = replace(DEFAULT_LEVELS[name], **table)
            features = list(dict.fromkeys([*inherited, *level.disabled_features]))
            if name == "maintenance":
                features = [ALL_FEATURES]
            level.disabled_features = features
            inherited = features
            out[name] = level
        return out


def _check_names(value: Any, where: str) -> None:
    if not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where} must be a list of feature names, got {value!r}")


def check_level(level: str) -> str:
    if level not in LEVELS:
        raise UsageError(f"unknown degradation level {level!r}", "levels: " + ", ".join(LEVELS))
    return level


def default_actor() -> str:
    """Who is changing the level when nobody says: user@host."""
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name in some containers
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


@dataclass(frozen=True)
class DegradationState:
    """The level in force, who set it, why, when, and what it disables and limits."""

    level: str = "normal"
    reason: str | None = None
    by: str | None = None
    since: float | None = None
    previous: str | None = None
    run_id: str | None = None
    config: LevelConfig = field(default_factory=LevelConfig)
    core_features: tuple[str, ...] = ("core",)

    @property
    def maintenance(self) -> bool:
        return self.level == "maintenance"

    def is_enabled(self, feature: str) -> bool:
        if self.maintenance:
            return False
        disabled = self.config.disabled_features
        if feature in disabled:
            return False
        return not (ALL_FEATURES in disabled and feature not in self.core_features)

    def limits(self) -> dict[str, Any]:
        return self.config.limits()

    def as_dict(self) -> dict[str, Any]:
        return {"level": self.level, "reason": self.reason, "by": self.by, "since": self.since,
                "previous": self.previous, "run_id": self.run_id, "config": self.config.as_dict(),
                "core_features": list(self.core_features)}

    @classmethod
    def from_journal(cls, value: Any, levels: Mapping[str, LevelConfig],
                     core_features: list[str]) -> DegradationState:
        """The journaled state; the reader's own config fills in what the record lacks."""
        if not isinstance(value, dict) or value.get("level") not in LEVELS:
            if value is not None:
                log.warning("ignoring a malformed degradation state in the journal: %r", value)
            return cls(config=levels["normal"], core_features=tuple(core_features))
        level = value["level"]
        config = levels[level]
        stored = value.get("config")
        if isinstance(stored, dict):
            known = {f.name for f in fields(LevelConfig)}
            try:
                config = replace(config, **{k: v for k, v in stored.items() if k in known})
            except TypeError:
                log.warning("ignoring a malformed degradation config in the journal: %r", stored)
        core = value.get("core_features")
        return cls(level=level, reason=value.get("reason"), by=value.get("by"),
                   since=value.get("since"), previous=value.get("previous"),
                   run_id=value.get("run_id"), config=config,
                   core_features=tuple(core if isinstance(core, list) else core_features))


class DegradationManager:
    """Sets and reads the shared degradation level (operators, rollback, emergency).

    `target` is a `Migrator` (its settings, dialect and event bus are used) or a `Journal`.
    """

    def __init__(self, target: Migrator | Journal, *, settings: Settings | None = None,
                 bus: EventBus | None = None) -> None:
        if isinstance(target, Journal):
            self.journal = target
            self._migrator = None
        else:
            self.journal = target.journal
            self._migrator = target
            settings = settings if settings is not None else target.settings
            bus = bus if bus is not None else target.bus
        self.bus = bus
        self.config = DegradationSettings.from_settings(settings)
        self._levels = self.config.resolve()

    def levels(self) -> dict[str, LevelConfig]:
        """Every level as configured (defaults plus overrides)."""
        return {name: replace(cfg, disabled_features=list(cfg.disabled_features))
                for name, cfg in self._levels.items()}

    # -- reading -------------------------------------------------------------------------------
    def status(self) -> DegradationState:
        """The level in force; normal when none was ever set (creates no tables)."""
        with self._errors():
            if self._migrator is not None:
                self._migrator.dialect.ping()
            if not self.journal.exists():
                return self._state(None)
            return self._state(self.journal.get_state(STATE_KEY))

    def history(self, limit: int = 20) -> list[dict[str, Any]]:
        """The latest level changes, newest first."""
        with self._errors():
            if not self.journal.exists():
                return []
            query = (sa.select(events_table).where(events_table.c.kind == EVENT_KIND)
                     .order_by(events_table.c.id.desc()).limit(limit))
            with self.journal.engine.connect() as conn:
                rows = [dict(r) for r in conn.execute(query).mappings()]
        for row in rows:
            row["data"] = loads(row["data"])
        return rows

    # -- changing ------------------------------------------------------------------------------
    def set_level(self, level: str, reason: str, by: str | None = None, *,
                  run_id: str | None = None, conn: Connection | None = None) -> DegradationState:
        """Switch every application process to `level`; journaled with who, why and when.

        Pass `conn` to join the caller's transaction (the change then commits with it)."""
        check_level(level)
        if not reason or not reason.strip():
            raise UsageError("a reason is required to change the degradation level",
                             "say why, e.g. --reason 'rollback of run 1a2b'")
        by = by or default_actor()
        config = self._levels[level]
        with self._errors():
            if conn is None:
                if self._migrator is not None:
                    self._migrator.dialect.ping()
                self.journal.ensure()
                with self.journal.engine.begin() as own:
                    value = self._write(own, level, reason, by, run_id, config)
            else:
                value = self._write(conn, level, reason, by, run_id, config)
        if self.bus is not None:
            self.bus.emit(Event(EVENT_KIND, _message(value), run_id, _event_level(level), value))
        return self._state(value)

    def off(self, reason: str = "back to normal", by: str | None = None, *,
            run_id: str | None = None, conn: Connection | None = None) -> DegradationState:
        """Back to normal: every feature on, no limits."""
        return self.set_level("normal", reason, by, run_id=run_id, conn=conn)

    @contextmanager
    def hold(self, level: str, reason: str, by: str | None = None, *,
             run_id: str | None = None) -> Iterator[DegradationState]:
        """`level` for the duration of the block; the previous level comes back when the block
        succeeds. When it raises, the level stays (the application remains protected) and the
        operator ends it with `safemigrate degrade off`. A level changed by someone else during
        the block is left as it is."""
        before = self.status()
        now = self.set_level(level, reason, by, run_id=run_id)
        yield now
        current = self.status()
        if current.level != level or current.since != now.since:
            return
        self.set_level(before.level, f"{level} ended: {reason}"
                       + (f" (restoring: {before.reason})" if before.reason else ""),
                       by, run_id=run_id)

    # -- helpers ---------------------------------------------------------------------------------
    def _state(self, value: Any) -> DegradationState:
        return DegradationState.from_journal(value, self._levels, self.config.core_features)

    def _write(self, conn: Connection, level: str, reason: str, by: str, run_id: str | None,
               config: LevelConfig) -> dict[str, Any]:
        old = loads(conn.execute(sa.select(state_table.c.value)
                                 .where(state_table.c.key == STATE_KEY)).scalar())
        previous = old.get("level") if isinstance(old, dict) else None
        value = {"level": level, "reason": reason, "by": by, "since": time.time(),
                 "previous": previous or "normal", "run_id": run_id, "config": config.as_dict(),
                 "core_features": list(self.config.core_features)}
        self.journal.set_state(STATE_KEY, value, conn=conn)
        self.journal.event(run_id, EVENT_KIND, _message(value), _event_level(level), value, conn=conn)
        return value

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except sa.exc.DBAPIError as exc:
            if self._migrator is not None:
                raise self._migrator.dialect.translate_error(exc) from None
            raise DatabaseError(f"database error: {str(exc.orig or exc).splitlines()[0]}") from None


def _message(value: Mapping[str, Any]) -> str:
    return (f"degradation level {value['level']} (was {value['previous']}) "
            f"by {value['by']}: {value['reason']}")


def _event_level(level: str) -> str:
    return {"normal": "info", "emergency": "critical"}.get(level, "warning")


class Degradation:
    """The application's view of the level: one query per `ttl` seconds at most.

        degradation = Degradation("postgresql://app@db/cards")
        if not degradation.is_enabled("search"): ...
        degradation.limits()["requests_per_minute"]

    Accepts the URLs the CLI accepts. Never creates tables (nor a missing SQLite file): with no
    journal yet the level is normal. When the database cannot be read the last known level is
    kept (normal if none) and the read is retried after `ttl`. Thread-safe.
    """

    def __init__(self, url: str | os.PathLike[str] | URL | None = None, *, ttl: float | None = None,
                 settings: Settings | None = None, engine: Engine | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        config = DegradationSettings.from_settings(settings)
        self.ttl = float(config.client_ttl if ttl is None else ttl)
        if self.ttl < 0:
            raise ConfigError(f"ttl must be >= 0, got {ttl!r}")
        self._levels = config.resolve()
        self._core = config.core_features
        if engine is None:
            raw = url if url is not None else (settings.db if settings is not None else None)
            self.url = raw if isinstance(raw, URL) else normalize_url(os.fspath(raw or ""))
            self.engine = _reader_engine(self.url)
            self._owns_engine = True
        else:
            self.url = engine.url
            self.engine = engine
            self._owns_engine = False
        self._journal = Journal(self.engine)
        self._clock = clock
        self._lock = threading.Lock()
        self._state: DegradationState | None = None
        self._expires = 0.0
        self.error: str | None = None  # the last read's error, None when it succeeded

    def __repr__(self) -> str:
        return f"Degradation({redact(self.url)!r}, ttl={self.ttl})"

    # -- the application's questions ----------------------------------------------------------
    def level(self) -> str:
        return self.state().level

    def is_enabled(self, feature: str) -> bool:
        return self.state().is_enabled(feature)

    def limits(self) -> dict[str, Any]:
        return self.state().limits()

    @property
    def fresh(self) -> bool:
        """Whether `state()` would answer from the cache (no query)."""
        return self._state is not None and self._clock() < self._expires

    def state(self) -> DegradationState:
        if self.fresh:
            return self._state  # type: ignore[return-value]
        with self._lock:
            if not self.fresh:
                self._state = self._read()
                self._expires = self._clock() + self.ttl
            return self._state  # type: ignore[return-value]

    def refresh(self) -> DegradationState:
        """Read now, whatever the cache holds."""
        with self._lock:
            self._expires = 0.0
        return self.state()

    def close(self) -> None:
        if self._owns_engine:
            self.engine.dispose()

    def __enter__(self) -> Degradation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading ---------------------------------------------------------------------------------
    def _default(self) -> DegradationState:
        return DegradationState.from_journal(None, self._levels, self._core)

    def _read(self) -> DegradationState:
        if _missing_sqlite_file(self.url):
            self.error = None
            return self._default()
        try:
            value = self._journal.get_state(STATE_KEY)
        except sa.exc.DBAPIError as exc:
            try:
                with self.engine.connect() as conn:
                    has_journal = sa.inspect(conn).has_table(state_table.name)
            except sa.exc.DBAPIError:
                has_journal = True
            if not has_journal:
                self.error = None
                return self._default()
            self.error = str(getattr(exc, "orig", exc) or exc).splitlines()[0]
            log.warning("cannot read the degradation level (%s); keeping %s", self.error,
                        self._state.level if self._state else "normal")
            return self._state or self._default()
        self.error = None
        return DegradationState.from_journal(value, self._levels, self._core)


def _reader_engine(url: URL) -> Engine:
    if url.get_backend_name() == "sqlite":
        return sa.create_engine(url, connect_args={"timeout": 5.0, "check_same_thread": False})
    return sa.create_engine(url, pool_pre_ping=True, pool_size=2, max_overflow=2)


def _missing_sqlite_file(url: URL) -> bool:
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return False
    return not Path(url.database).exists()
