"""Dialect registry: one class per engine, chosen from the URL."""

from __future__ import annotations

from sqlalchemy.engine import URL

from .._exceptions import ConfigError
from .base import JOURNAL_PREFIX, Dialect, SnapshotInfo
from .sqlite import SQLiteDialect

__all__ = ["JOURNAL_PREFIX", "Dialect", "SnapshotInfo", "SQLiteDialect", "dialect_for"]

_REGISTRY: dict[str, type[Dialect]] = {"sqlite": SQLiteDialect}


def dialect_for(url: URL, *, lock_timeout: float = 10.0) -> Dialect:
    """The dialect that handles `url`'s engine."""
    backend = url.get_backend_name()
    try:
        cls = _REGISTRY[backend]
    except KeyError:
        raise ConfigError(
            f"no dialect for {backend!r} yet",
            "supported: " + ", ".join(sorted(_REGISTRY)),
        ) from None
    return cls(url, lock_timeout=lock_timeout)
