"""Dialect registry: one class per engine, chosen from the URL."""

from __future__ import annotations

import importlib
import importlib.util

from sqlalchemy.engine import URL

from .._exceptions import ConfigError
from .base import JOURNAL_PREFIX, Dialect, SnapshotInfo
from .sqlite import SQLiteDialect

__all__ = ["JOURNAL_PREFIX", "Dialect", "SnapshotInfo", "SQLiteDialect", "dialect_for"]

# backend name -> (module, class, pip extra); server dialects load only when used.
_REGISTRY: dict[str, tuple[str, str, str]] = {
    "sqlite": ("sqlite", "SQLiteDialect", ""),
    "postgresql": ("postgresql", "PostgreSQLDialect", "postgres"),
    "mysql": ("mysql", "MySQLDialect", "mysql"),
}
_DRIVERS = {"postgresql": "psycopg", "mysql": "pymysql"}


def dialect_for(url: URL, *, lock_timeout: float = 10.0) -> Dialect:
    """The dialect that handles `url`'s engine (its driver must be installed)."""
    backend = url.get_backend_name()
    if backend not in _REGISTRY:
        raise ConfigError(f"no dialect for {backend!r}", "supported: " + ", ".join(sorted(_REGISTRY)))
    module_name, class_name, extra = _REGISTRY[backend]
    driver = _DRIVERS.get(backend)
    if driver is not None and importlib.util.find_spec(driver) is None:
        raise ConfigError(
            f"the {backend} driver ({driver}) is not installed",
            f"pip install 'safemigrate[{extra}]'",
        )
    module = importlib.import_module(f"{__name__}.{module_name}")
    cls: type[Dialect] = getattr(module, class_name)
    return cls(url, lock_timeout=lock_timeout)
