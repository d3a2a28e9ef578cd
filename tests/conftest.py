"""Shared helpers: real SQLite card databases, digests, and the `safemigrate` console script."""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from safemigrate.dialects import SQLiteDialect
from safemigrate.digest import database_digest
from safemigrate.examples.cards import MIGRATIONS_DIR, generate

# `backend` and `db_url` fixtures (every engine, a fresh database each) for any test module.
pytest_plugins = ["backends"]

SAFEMIGRATE = Path(sys.executable).parent / "safemigrate"
CARDS_MIGRATIONS = MIGRATIONS_DIR


def cli(*args: Any, cwd: Path, env: dict[str, str] | None = None,
        timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run the console script; SAFEMIGRATE_DB comes only from `env`, never from the caller's shell."""
    full_env = {k: v for k, v in os.environ.items() if k != "SAFEMIGRATE_DB"}
    full_env.update(env or {})
    return subprocess.run([str(SAFEMIGRATE), *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def assert_one_error_line(proc: subprocess.CompletedProcess[str], code: int, cwd: Path,
                          command: str) -> str:
    """Exactly one stderr line, `error: ... (hint: ...)`, the exact exit code, and every
    --option the line mentions really exists on that command."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("error:"), line
    assert "hint:" in line, line
    assert "Traceback" not in proc.stdout + proc.stderr
    options = set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", line))
    if options:
        helptext = cli(command, "--help", cwd=cwd).stdout
        for option in options:
            assert option in helptext, f"the hint names {option}, which `{command}` does not have: {line}"
    return line


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def user_tables(path: Path) -> list[str]:
    with sqlite3.connect(path) as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    return sorted(n for n in names if not n.startswith(("sqlite_", "safemigrate_")))


def digest_db(path: Path, tables: list[str] | None = None) -> dict[str, Any]:
    """Per-table content digests plus the dialect's schema fingerprint of the user tables."""
    names = tables if tables is not None else user_tables(path)
    dialect = SQLiteDialect(sa.make_url(f"sqlite:///{Path(path).resolve()}"))
    try:
        with dialect.engine.connect() as conn:
            return {"tables": database_digest(conn, names),
                    "schema": dialect.schema_fingerprint(conn, names)}
    finally:
        dialect.dispose()


def query(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


@pytest.fixture
def make_cards_db(tmp_path: Path) -> Callable[..., Path]:
    """make_cards_db(rows, bad_rate=0.0, seed=42, name="cards.db") -> path of a fresh v2 card db."""

    def make(rows: int = 1000, bad_rate: float = 0.0, seed: int = 42, name: str = "cards.db") -> Path:
        path = tmp_path / name
        generate(path, rows=rows, bad_rate=bad_rate, seed=seed)
        return path

    return make


@pytest.fixture
def cards_db(make_cards_db: Callable[..., Path]) -> Path:
    """A 2,000-card v2 database with 2% malformed cards."""
    return make_cards_db(2000, bad_rate=0.02)
