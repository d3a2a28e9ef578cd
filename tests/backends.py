"""Real database servers for the tests: a fresh database per test, dropped afterwards.

PostgreSQL and MariaDB tests skip with a reason when no server answers, unless
SAFEMIGRATE_REQUIRE_SERVERS=1 (CI), where a missing server is a failure.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

PG_ADMIN = os.environ.get("SAFEMIGRATE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
MY_ADMIN = os.environ.get("SAFEMIGRATE_TEST_MYSQL", "mysql+pymysql://root@127.0.0.1:3306/test")
BACKENDS = ("sqlite", "postgresql", "mysql")


def _require() -> bool:
    return os.environ.get("SAFEMIGRATE_REQUIRE_SERVERS") == "1"


def _unavailable(kind: str, exc: Exception) -> None:
    reason = f"{kind} server not answering ({type(exc).__name__}: {str(exc).splitlines()[0]})"
    if _require():
        pytest.fail(f"{reason}; SAFEMIGRATE_REQUIRE_SERVERS=1 requires it")
    pytest.skip(reason)


def _admin_engine(url: str) -> sa.Engine:
    return sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)


def create_database(kind: str, tmp_path: Path) -> str:
    """A URL to a new, empty database of `kind` (for SQLite, a file path)."""
    if kind == "sqlite":
        return str(tmp_path / "test.db")
    name = f"sm_{uuid.uuid4().hex[:12]}"
    admin = PG_ADMIN if kind == "postgresql" else MY_ADMIN
    engine = _admin_engine(admin)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {name}")
    except sa.exc.OperationalError as exc:
        _unavailable(kind, exc)
    finally:
        engine.dispose()
    return str(sa.make_url(admin).set(database=name).render_as_string(hide_password=False))


def drop_database(kind: str, url: str) -> None:
    if kind == "sqlite":
        return
    name = sa.make_url(url).database
    admin = PG_ADMIN if kind == "postgresql" else MY_ADMIN
    engine = _admin_engine(admin)
    try:
        with engine.connect() as conn:
            if kind == "postgresql":
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            else:
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}")
    finally:
        engine.dispose()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Parameterise a test over SQLite, PostgreSQL and MariaDB."""
    return request.param


@pytest.fixture
def db_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """A fresh empty database of the current backend; dropped after the test."""
    url = create_database(backend, tmp_path)
    try:
        yield url
    finally:
        drop_database(backend, url)


def engine_for(url: str) -> sa.Engine:
    """A plain SQLAlchemy engine for arranging test data (not safemigrate's own)."""
    if "://" not in url:
        url = f"sqlite:///{url}"
    return sa.create_engine(url, poolclass=sa.pool.NullPool)
