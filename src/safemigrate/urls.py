"""Database URLs as people type them, turned into SQLAlchemy URLs; passwords never printed."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from ._exceptions import ConfigError

# Schemes people type, mapped to the driver safemigrate installs for them.
_SCHEME_ALIASES = {
    "sqlite": "sqlite",
    "postgres": "postgresql+psycopg",
    "postgresql": "postgresql+psycopg",
    "mysql": "mysql+pymysql",
    "mariadb": "mysql+pymysql",
}


def normalize_url(raw: str) -> URL:
    """Accept a SQLAlchemy URL, a `postgres://`-style URL, or a plain SQLite file path."""
    if not raw or not raw.strip():
        raise ConfigError(
            "no database given", "pass --db URL, set SAFEMIGRATE_DB, or add db= to safemigrate.toml"
        )
    raw = raw.strip()
    if "://" not in raw:
        return URL.create("sqlite", database=str(Path(raw).expanduser().resolve()))
    try:
        url = make_url(raw)
    except ArgumentError as exc:
        raise ConfigError(f"cannot parse database URL {redact(raw)!r}: {exc}") from None
    backend = url.get_backend_name()
    if "+" not in url.drivername:
        if backend not in _SCHEME_ALIASES:
            raise ConfigError(
                f"unsupported database scheme {url.drivername!r}",
                "use sqlite:///file.db, postgresql://host/db or mysql://host/db",
            )
        url = url.set(drivername=_SCHEME_ALIASES[backend])
    elif backend == "mariadb":
        url = url.set(drivername="mysql+" + url.get_driver_name())
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        url = url.set(database=str(Path(url.database).expanduser().resolve()))
    return url


def redact(url: str | URL) -> str:
    """The URL as it may be printed or journaled: the password replaced by ***."""
    if isinstance(url, URL):
        return url.render_as_string(hide_password=True)
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable URL>"
