"""Helpers for the supervision tests (guards, control, monitoring): a small `items` database,
a migration whose transform the test writes, and a `safemigrate run` in a subprocess whose
JSON event lines are collected as they come."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import sqlite3
import subprocess
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conftest import SAFEMIGRATE, cli, digest_db
from safemigrate.events import Event, EventBus
from safemigrate.migrator import Migrator
from safemigrate.settings import load_settings

HEADER = """\
import os
import time

from safemigrate import Backfill, Migration
"""


def make_items_db(path: Path, rows: int) -> Path:
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                     "n INTEGER NOT NULL, note TEXT, label TEXT)")
        conn.executemany("INSERT INTO items (id, name, n, note, label) VALUES (?, ?, ?, ?, ?)",
                         [(i, f"item-{i}", i, f"note {i}", "old") for i in range(1, rows + 1)])
    conn.close()
    return path


@dataclass
class Project:
    root: Path
    db: Path

    @property
    def migrations(self) -> Path:
        return self.root / "migrations"

    def digest(self) -> dict[str, Any]:
        return digest_db(self.db, ["items"])

    def cli(self, *args: Any, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return cli(*args, cwd=self.root, timeout=timeout)

    def status(self) -> dict[str, Any]:
        result = self.cli("status", "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def start(self, *args: Any) -> RunProcess:
        return RunProcess(self.root, *args)

    def migrator(self, bus: EventBus | None = None) -> Migrator:
        return Migrator(load_settings(self.root), bus)

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(self.db)
        try:
            return conn.execute(sql).fetchall()
        finally:
            conn.close()


def project(tmp_path: Path, transform: str, *, rows: int = 2000, config: str = "",
            extra: str = "", backfill_args: str = "", batch_size: int = 100) -> Project:
    """A folder with safemigrate.toml, migrations/0001_label.py and items.db.

    `transform` is the body of `def transform(row)`; `extra` goes before it (a validator, a
    counter); `backfill_args` is appended to the Backfill call (", validate=check")."""
    root = tmp_path / "proj"
    (root / "migrations").mkdir(parents=True)
    db = make_items_db(root / "items.db", rows)
    body = textwrap.indent(textwrap.dedent(transform).strip("\n"), "    ")
    (root / "migrations" / "0001_label.py").write_text(
        HEADER + textwrap.dedent(extra) + f"\n\ndef transform(row):\n{body}\n\n\n"
        "migration = Migration(\n"
        '    id="0001_label",\n'
        f'    steps=[Backfill("items", transform, reads=["name", "n"], writes=["label"]{backfill_args})],\n'
        ")\n")
    (root / "safemigrate.toml").write_text(
        f'db = "{db}"\nmigrations = "migrations"\nbackup_dir = "backups"\nworkers = 1\n'
        f"batch_size = {batch_size}\n\n" + textwrap.dedent(config))
    return Project(root, db)


class RunProcess:
    """`safemigrate run --json` in the background; its events as they arrive."""

    def __init__(self, cwd: Path, *args: Any) -> None:
        env = {k: v for k, v in os.environ.items() if k != "SAFEMIGRATE_DB"}
        self.proc = subprocess.Popen([str(SAFEMIGRATE), "run", "--json", *map(str, args)], cwd=cwd,
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, text=True)
        self.lines: list[dict[str, Any]] = []
        self.stderr = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.lines.append(json.loads(line))
            except json.JSONDecodeError:
                continue

    def kinds(self) -> list[str]:
        return [e.get("kind", "") for e in list(self.lines)]

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in list(self.lines) if e.get("kind") == kind]

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 60, what: str = "") -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            if self.proc.poll() is not None:
                self._reader.join(timeout=5)
                value = predicate()
                if value:
                    return value
                stderr = self.proc.stderr.read() if self.proc.stderr else ""
                raise AssertionError(f"run exited {self.proc.returncode} before {what}: "
                                     f"{self.kinds()[-15:]} {stderr}")
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}: {self.kinds()[-15:]}")

    def wait_event(self, kind: str, timeout: float = 60, **match: Any) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            for e in self.events(kind):
                if all(e.get("data", {}).get(k) == v for k, v in match.items()):
                    return e
            return None
        return self.wait_for(found, timeout, f"event {kind} {match or ''}")

    def finish(self, timeout: float = 120) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        self._reader.join(timeout=10)
        assert self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def collect(bus: EventBus) -> list[Event]:
    events: list[Event] = []
    bus.subscribe(events.append)
    return events


def hold_exclusive(db: Path, seconds: float) -> threading.Thread:
    """Hold SQLite's exclusive lock on `db` for `seconds`, in a thread (started)."""
    ready = threading.Event()

    def hold() -> None:
        conn = sqlite3.connect(db, timeout=30, isolation_level=None)
        try:
            conn.execute("BEGIN EXCLUSIVE")
            ready.set()
            time.sleep(seconds)
            conn.execute("COMMIT")
        finally:
            conn.close()

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    assert ready.wait(30), "could not take the exclusive lock"
    return thread


SLOW = "time.sleep(0.002)\nreturn {'label': row['name'].upper()}"


@contextlib.contextmanager
def local_http_server(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[int]:
    """A real HTTP server on 127.0.0.1 (a free port) in a thread, for notification endpoints
    and health URLs; yields its port and shuts it down after."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
