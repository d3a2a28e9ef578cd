"""Degradation levels: the shared level in the journal, the cached client, the ASGI middleware
(through a real uvicorn server on 127.0.0.1 and a real HTTP client) and `safemigrate degrade`."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import socket
import sqlite3
import subprocess
import textwrap
import threading
import time
import tomllib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import uvicorn

import safemigrate
from backends import create_database, drop_database
from conftest import cli, file_sha256
from safemigrate import ConfigError, UsageError
from safemigrate.asgi import DegradationMiddleware
from safemigrate.degrade import LEVELS, Degradation, DegradationManager
from safemigrate.journal import Journal
from safemigrate.migrator import Migrator
from safemigrate.settings import Settings

ROUTES = {
    "/search": "search",
    "/search/advanced": "advanced_search",
    "/export": "export",
    "/batch": "batch_operations",
    "/cards": "core",
}
PATHS = ["/search", "/search/advanced?q=x", "/export/all", "/batch", "/cards/1", "/other", "/health"]

# What each level lets through (the seed's table; features of lower levels stay disabled).
EXPECTED = {
    "normal": {p: 200 for p in PATHS},
    "minimal": {**{p: 200 for p in PATHS}, "/search/advanced?q=x": 503, "/batch": 503},
    "essential": {**{p: 200 for p in PATHS}, "/search/advanced?q=x": 503, "/batch": 503,
                  "/search": 503, "/export/all": 503},
    "emergency": {**{p: 503 for p in PATHS}, "/cards/1": 200, "/other": 200, "/health": 200},
    "maintenance": {**{p: 503 for p in PATHS}, "/health": 200},
}
RETRY_AFTER = {"minimal": 60, "essential": 120, "emergency": 300, "maintenance": 300}


# -- helpers ----------------------------------------------------------------------------------------
@pytest.fixture
def app_db(tmp_path: Path) -> Path:
    """An application database with no journal yet."""
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE cards (id INTEGER PRIMARY KEY, front TEXT)")
        conn.execute("INSERT INTO cards (front) VALUES ('hello')")
    conn.close()
    return path


def manager(db: Path, sections: dict[str, Any] | None = None) -> DegradationManager:
    settings = Settings(db=str(db), sections={"degradation": sections} if sections else {})
    return DegradationManager(Migrator(settings))


def sqlite_engine(path: Path) -> sa.Engine:
    return sa.create_engine(f"sqlite:///{path.resolve()}", poolclass=sa.pool.NullPool)


def journal_tables(db: Path) -> list[str]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE name LIKE 'safemigrate_%'").fetchall()
    conn.close()
    return [r[0] for r in rows]


class App:
    """The application behind the middleware: 200 everywhere; /slow waits to be released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.in_flight = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        if scope["path"].startswith("/slow"):
            self.in_flight += 1
            try:
                while not self.release.is_set():
                    await asyncio.sleep(0.01)
            finally:
                self.in_flight -= 1
        body = json.dumps({"path": scope["path"]}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


@contextmanager
def serve(app: Any) -> Iterator[str]:
    """A real uvicorn server on 127.0.0.1, on a free port, in a thread."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def middleware(db: Path, app: Any = None, ttl: float = 0, **kwargs: Any) -> DegradationMiddleware:
    return DegradationMiddleware(app or App(), Degradation(db, ttl=ttl), feature_routes=ROUTES, **kwargs)


def assert_one_error_line(proc: subprocess.CompletedProcess[str], code: int) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:") and "hint:" in lines[0], lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    return lines[0]


# -- every level through the middleware --------------------------------------------------------------
@pytest.mark.parametrize("level", LEVELS)
def test_every_level_through_the_middleware(app_db: Path, level: str) -> None:
    if level != "normal":
        manager(app_db).set_level(level, f"testing {level}", "pytest")
    with serve(middleware(app_db)) as base, httpx.Client(base_url=base) as http:
        for path in PATHS:
            response = http.get(path)
            assert response.status_code == EXPECTED[level][path], (level, path, response.text)
            assert response.headers["x-degradation-level"] == level
            if response.status_code == 503:
                assert int(response.headers["retry-after"]) == RETRY_AFTER[level]
                body = response.json()
                assert body["level"] == level
                assert body["error"] == ("maintenance" if level == "maintenance" else "feature_disabled")
            else:
                assert "retry-after" not in response.headers
                assert response.json() == {"path": path.split("?")[0]}


def test_rate_limit_answers_429_after_the_configured_number(app_db: Path) -> None:
    manager(app_db, {"levels": {"minimal": {"requests_per_minute": 3}}}).set_level(
        "minimal", "small rate limit", "pytest")
    with serve(middleware(app_db)) as base, httpx.Client(base_url=base) as http:
        assert [http.get("/cards").status_code for _ in range(3)] == [200, 200, 200]
        limited = http.get("/cards/2")
        assert limited.status_code == 429
        assert 1 <= int(limited.headers["retry-after"]) <= 60
        assert limited.headers["x-degradation-level"] == "minimal"
        assert limited.json()["limit"] == 3
        assert http.get("/health").status_code == 200  # never limited
        manager(app_db).off("done", "pytest")
        assert [http.get("/cards").status_code for _ in range(10)] == [200] * 10


def test_rate_limit_is_per_client(app_db: Path) -> None:
    manager(app_db, {"levels": {"minimal": {"requests_per_minute": 2}}}).set_level(
        "minimal", "per client", "pytest")
    by_header = middleware(app_db, client_key=lambda scope: dict(scope["headers"])[b"x-user"].decode())
    with serve(by_header) as base, httpx.Client(base_url=base) as http:
        alice = [http.get("/cards", headers={"x-user": "alice"}).status_code for _ in range(3)]
        bob = [http.get("/cards", headers={"x-user": "bob"}).status_code for _ in range(2)]
    assert alice == [200, 200, 429]
    assert bob == [200, 200]


def _get(url: str, headers: dict[str, str] | None = None) -> httpx.Response:
    with httpx.Client(timeout=10) as http:
        return http.get(url, headers=headers)


def _wait_for(predicate: Any, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_concurrent_connection_limit(app_db: Path) -> None:
    manager(app_db).set_level("emergency", "two connections per client", "pytest")
    app = App()
    with serve(middleware(app_db, app)) as base, ThreadPoolExecutor(4) as pool:
        slow = [pool.submit(_get, f"{base}/slow") for _ in range(2)]
        _wait_for(lambda: app.in_flight == 2)
        third = _get(f"{base}/slow")
        assert third.status_code == 503
        assert third.headers["retry-after"] == "1"
        assert third.headers["x-degradation-level"] == "emergency"
        assert third.json()["error"] == "too_many_connections"
        app.release.set()
        assert [f.result().status_code for f in slow] == [200, 200]
        assert _get(f"{base}/slow").status_code == 200  # the slots are given back


def test_concurrent_users_limit(app_db: Path) -> None:
    manager(app_db, {"levels": {"emergency": {"max_concurrent_users": 1, "concurrent_connections": 0}}}
            ).set_level("emergency", "one user at a time", "pytest")
    app = App()
    mw = middleware(app_db, app, client_key=lambda scope: dict(scope["headers"])[b"x-user"].decode())
    with serve(mw) as base, ThreadPoolExecutor(4) as pool:
        first = pool.submit(_get, f"{base}/slow", {"x-user": "alice"})
        _wait_for(lambda: app.in_flight == 1)
        other = _get(f"{base}/cards", {"x-user": "bob"})
        assert other.status_code == 503 and other.json()["error"] == "too_many_users"
        second = pool.submit(_get, f"{base}/slow", {"x-user": "alice"})  # alice is already in
        _wait_for(lambda: app.in_flight == 2)
        app.release.set()
        assert first.result().status_code == 200 and second.result().status_code == 200
        assert _get(f"{base}/cards", {"x-user": "bob"}).status_code == 200


def test_callable_feature_routes_and_app_headers_kept(app_db: Path) -> None:
    manager(app_db).set_level("essential", "callable routes", "pytest")

    def features(scope: dict[str, Any]) -> list[str]:
        return ["sync", "core"] if scope["path"].startswith("/api/sync") else []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"x-degradation-level", b"spoofed"), (b"x-app", b"1")]})
        await send({"type": "http.response.body", "body": b"ok"})

    mw = DegradationMiddleware(app, str(app_db), feature_routes=features, health_path=["/healthz"], ttl=0)
    with serve(mw) as base, httpx.Client(base_url=base) as http:
        assert http.get("/api/sync/now").status_code == 503
        ok = http.get("/api/cards")
        assert ok.status_code == 200 and ok.headers["x-app"] == "1"
        assert ok.headers.get_list("x-degradation-level") == ["essential"]
        manager(app_db).set_level("maintenance", "healthz stays up", "pytest")
        assert http.get("/healthz").status_code == 200
        assert http.get("/health").status_code == 503


# -- the client: cached, read-only -------------------------------------------------------------------
def test_client_ttl_cache_costs_no_query_per_call(app_db: Path) -> None:
    manager(app_db).set_level("minimal", "cache test", "pytest")
    now = [1000.0]
    client = Degradation(f"sqlite:///{app_db}", ttl=5, clock=lambda: now[0])
    queries: list[str] = []
    sa.event.listen(client.engine, "before_cursor_execute",
                    lambda conn, cursor, statement, *rest: queries.append(statement))
    try:
        for _ in range(500):
            assert client.level() == "minimal"
            assert not client.is_enabled("advanced_search") and client.is_enabled("search")
            assert client.limits()["requests_per_minute"] == 60
        assert len(queries) == 1

        manager(app_db).set_level("essential", "changed behind the cache", "pytest")
        now[0] += 4.9
        assert client.level() == "minimal"  # still the cached value
        assert len(queries) == 1
        now[0] += 0.2
        assert client.level() == "essential"
        assert not client.is_enabled("search")
        assert len(queries) == 2
    finally:
        client.close()


def test_client_default_ttl_with_the_real_clock(app_db: Path) -> None:
    manager(app_db).set_level("minimal", "real clock", "pytest")
    with Degradation(str(app_db)) as default:
        assert default.ttl == 2.0
    with Degradation(str(app_db), ttl=0.3) as client:
        assert client.level() == "minimal"
        manager(app_db).off("real clock", "pytest")
        assert client.level() == "minimal"
        time.sleep(0.35)
        assert client.level() == "normal"


def test_middleware_queries_the_database_once_per_ttl(app_db: Path) -> None:
    manager(app_db).set_level("minimal", "middleware cache", "pytest")
    mw = middleware(app_db, ttl=60)
    queries: list[str] = []
    sa.event.listen(mw.degradation.engine, "before_cursor_execute",
                    lambda conn, cursor, statement, *rest: queries.append(statement))
    with serve(mw) as base, httpx.Client(base_url=base) as http:
        codes = [http.get("/search/advanced" if i % 2 else "/search").status_code for i in range(40)]
    assert codes == [200, 503] * 20
    assert len(queries) == 1


def test_client_without_a_journal_is_normal_and_creates_nothing(app_db: Path, tmp_path: Path) -> None:
    before = file_sha256(app_db)
    for url in (str(app_db), f"sqlite:///{app_db}"):
        with Degradation(url) as client:
            assert client.level() == "normal"
            assert client.is_enabled("search") and client.is_enabled("anything")
            assert set(client.limits().values()) == {None}
            assert client.error is None
    assert journal_tables(app_db) == []
    assert file_sha256(app_db) == before

    missing = tmp_path / "not-yet.db"
    with Degradation(str(missing)) as client:
        assert client.level() == "normal"
    assert not missing.exists()


def test_client_keeps_the_last_level_when_the_database_cannot_be_read(app_db: Path) -> None:
    manager(app_db).set_level("essential", "fail open", "pytest")
    with Degradation(str(app_db), ttl=0) as client:
        assert client.level() == "essential"
        client.engine.dispose()
        app_db.write_bytes(b"this is not a database" * 100)
        assert client.level() == "essential"
        assert client.error


def test_degradation_is_public() -> None:
    assert "Degradation" in safemigrate.__all__
    assert safemigrate.Degradation is Degradation


# -- across processes: the CLI --------------------------------------------------------------------------
def test_level_set_by_another_process_is_seen(app_db: Path, tmp_path: Path) -> None:
    with Degradation(str(app_db), ttl=0) as client, serve(middleware(app_db)) as base, \
            httpx.Client(base_url=base) as http:
        assert client.level() == "normal" and http.get("/search").status_code == 200

        proc = cli("degrade", "essential", "--reason", "backfill of cards", "--by", "ops",
                   "--db", app_db, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert "essential" in proc.stdout
        state = client.state()
        assert (state.level, state.by, state.reason) == ("essential", "ops", "backfill of cards")
        response = http.get("/search")
        assert response.status_code == 503 and response.headers["x-degradation-level"] == "essential"

        manager(app_db).set_level("maintenance", "set in this process", "pytest")
        proc = cli("degrade", "status", "--json", "--db", app_db, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        status = json.loads(proc.stdout)
        assert status["level"] == "maintenance" and status["previous"] == "essential"
        assert [h["data"]["level"] for h in status["history"]] == ["maintenance", "essential"]

        proc = cli("degrade", "off", "--db", f"sqlite:///{app_db}", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert client.level() == "normal"
        assert http.get("/search").status_code == 200

        text = cli("degrade", "status", "--db", app_db, cwd=tmp_path)
        assert "degradation level: normal" in text.stdout and "back to normal" in text.stdout


def test_cli_status_without_a_journal_creates_nothing(app_db: Path, tmp_path: Path) -> None:
    before = file_sha256(app_db)
    proc = cli("degrade", "status", "--db", app_db, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "normal" in proc.stdout
    assert file_sha256(app_db) == before


def test_cli_usage_errors(app_db: Path, tmp_path: Path) -> None:
    line = assert_one_error_line(cli("degrade", "essential", "--db", app_db, cwd=tmp_path), 2)
    assert "--reason" in line
    line = assert_one_error_line(cli("degrade", "panic", "--reason", "x", "--db", app_db, cwd=tmp_path), 2)
    assert "panic" in line and "maintenance" in line
    assert_one_error_line(cli("degrade", "status", "--db", tmp_path / "missing.db", cwd=tmp_path), 1)
    assert journal_tables(app_db) == []


# -- config overrides --------------------------------------------------------------------------------------
def write_config(folder: Path, db: Path, body: str) -> None:
    (folder / "safemigrate.toml").write_text(f'db = "{db}"\n' + textwrap.dedent(body))


def test_config_overrides_reach_the_application(app_db: Path, tmp_path: Path) -> None:
    write_config(tmp_path, app_db, """
        [degradation]
        core_features = ["core", "review"]

        [degradation.levels.minimal]
        requests_per_minute = 2
        disabled_features = ["reports"]
        session_timeout = 120

        [degradation.levels.emergency]
        retry_after = 7
    """)
    levels = json.loads(cli("degrade", "levels", "--json", cwd=tmp_path).stdout)
    assert levels["core_features"] == ["core", "review"]
    assert levels["levels"]["minimal"]["requests_per_minute"] == 2
    assert levels["levels"]["minimal"]["disabled_features"] == ["reports"]
    assert levels["levels"]["minimal"]["session_timeout"] == 120
    assert levels["levels"]["minimal"]["concurrent_connections"] == 10  # default kept
    assert levels["levels"]["essential"]["disabled_features"] == ["reports", "search", "sync", "export"]

    proc = cli("degrade", "minimal", "--reason", "configured", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    with Degradation(str(app_db), ttl=0) as client:  # no config here: the journal carries it
        assert not client.is_enabled("reports") and client.is_enabled("advanced_search")
        assert client.limits()["requests_per_minute"] == 2
        assert client.limits()["session_timeout"] == 120
    with serve(middleware(app_db)) as base, httpx.Client(base_url=base) as http:
        assert [http.get("/cards").status_code for _ in range(3)] == [200, 200, 429]

    assert cli("degrade", "emergency", "--reason", "core stays", cwd=tmp_path).returncode == 0
    with Degradation(str(app_db), ttl=0) as client:
        assert client.is_enabled("review") and client.is_enabled("core")
        assert not client.is_enabled("search") and not client.is_enabled("something_else")
        assert client.limits()["retry_after"] == 7


@pytest.mark.parametrize(("body", "words"), [
    ("[degradation.levels.minimal]\nrequests_per_minute = \"lots\"\n", ["requests_per_minute", "lots"]),
    ("[degradation.levels.minimal]\nrequests_per_minute = -5\n", ["requests_per_minute", "-5"]),
    ("[degradation.levels.minimal]\nrequests_per_minute = 1.5\n", ["requests_per_minute", "1.5"]),
    ("[degradation.levels.essential]\nrate = 5\n", ["rate", "essential"]),
    ("[degradation.levels.panic]\nrequests_per_minute = 5\n", ["panic"]),
    ("[degradation.levels]\nminimal = 5\n", ["minimal", "table"]),
    ("[degradation.levels.minimal]\ndisabled_features = \"search\"\n", ["disabled_features"]),
    ("[degradation.levels.minimal]\ndisabled_features = [1, 2]\n", ["disabled_features"]),
    ("[degradation]\nclient_ttl = -1\n", ["client_ttl"]),
    ("[degradation]\nclient_ttl = \"soon\"\n", ["client_ttl"]),
])
def test_bad_override_is_a_one_line_error(app_db: Path, tmp_path: Path, body: str, words: list[str]) -> None:
    write_config(tmp_path, app_db, body)
    before = file_sha256(app_db)
    line = assert_one_error_line(cli("degrade", "minimal", "--reason", "x", cwd=tmp_path), 2)
    for word in words:
        assert word in line, line
    assert file_sha256(app_db) == before
    settings = Settings(db=str(app_db), sections={"degradation": tomllib.loads(body)["degradation"]})
    with pytest.raises(ConfigError):
        Degradation(str(app_db), settings=settings)
    with pytest.raises(ConfigError):
        DegradationManager(Journal(sqlite_engine(app_db)), settings=settings)


def test_every_degrade_command_rejects_a_bad_config(app_db: Path, tmp_path: Path) -> None:
    write_config(tmp_path, app_db, "[degradation.levels.essential]\nrequests_per_minute = -1\n")
    for args in (["status"], ["levels"], ["off"], ["maintenance", "--reason", "x"]):
        line = assert_one_error_line(cli("degrade", *args, cwd=tmp_path), 2)
        assert "[degradation.levels.essential] requests_per_minute" in line
    assert journal_tables(app_db) == []


# -- the library: journal, events, API for rollback and emergency ---------------------------------------
def test_every_change_is_a_journal_event(app_db: Path) -> None:
    mgr = manager(app_db)
    mgr.set_level("minimal", "warming up", "alice", run_id="run1")
    mgr.set_level("essential", "guard: error rate", "safemigrate guards", run_id="run1")
    mgr.off("run completed", "alice")
    journal = Journal(sqlite_engine(app_db))
    events = [e for e in journal.events() if e["kind"] == "degradation.set"]
    assert [(e["data"]["previous"], e["data"]["level"]) for e in events] == [
        ("normal", "minimal"), ("minimal", "essential"), ("essential", "normal")]
    assert [e["run_id"] for e in events] == ["run1", "run1", None]
    assert [e["level"] for e in events] == ["warning", "warning", "info"]
    assert events[1]["data"]["by"] == "safemigrate guards"
    assert "guard: error rate" in events[1]["message"] and "essential" in events[1]["message"]
    assert events[1]["data"]["config"]["requests_per_minute"] == 30
    stored = journal.get_state("degradation")
    assert stored["level"] == "normal" and stored["reason"] == "run completed"
    assert stored["since"] == pytest.approx(time.time(), abs=60)
    assert [h["data"]["level"] for h in mgr.history()] == ["normal", "essential", "minimal"]


def test_events_reach_the_migrators_bus(app_db: Path) -> None:
    seen: list[Any] = []
    migrator = Migrator(Settings(db=str(app_db)))
    migrator.bus.subscribe(seen.append)
    DegradationManager(migrator).set_level("emergency", "guard tripped", "guards", run_id="r2")
    assert [(e.kind, e.level, e.run_id) for e in seen] == [("degradation.set", "critical", "r2")]


def test_hold_restores_the_previous_level_only_on_success(app_db: Path) -> None:
    mgr = manager(app_db)
    mgr.set_level("minimal", "before rollback", "ops")
    with mgr.hold("maintenance", "rollback of run r1", "safemigrate rollback", run_id="r1") as held:
        assert held.level == "maintenance" and mgr.status().level == "maintenance"
    after = mgr.status()
    assert after.level == "minimal" and "rollback of run r1" in after.reason

    with pytest.raises(RuntimeError), mgr.hold("maintenance", "rollback of run r2", "rollback"):
        raise RuntimeError("validation failed")
    assert mgr.status().level == "maintenance"  # stays protected until an operator says off

    mgr.off("recovered", "ops")
    with mgr.hold("maintenance", "rollback of run r3", "rollback"):
        mgr.set_level("emergency", "raised meanwhile", "emergency")
    assert mgr.status().level == "emergency"  # someone else's level is left alone


def test_set_level_joins_the_callers_transaction(app_db: Path) -> None:
    mgr = manager(app_db)
    mgr.off("create the journal", "pytest")
    engine = sqlite_engine(app_db)
    with engine.connect() as conn:
        trans = conn.begin()
        mgr.set_level("maintenance", "inside a transaction", "pytest", conn=conn)
        trans.rollback()
    assert mgr.status().level == "normal"
    with engine.begin() as conn:
        mgr.set_level("maintenance", "committed with the caller", "pytest", conn=conn)
    assert mgr.status().level == "maintenance"


def test_library_rejects_bad_levels_and_missing_reasons(app_db: Path) -> None:
    mgr = manager(app_db)
    with pytest.raises(UsageError, match="unknown degradation level"):
        mgr.set_level("panic", "x")
    with pytest.raises(UsageError, match="reason"):
        mgr.set_level("minimal", "  ")
    assert journal_tables(app_db) == []
    state = mgr.set_level("minimal", "default actor")
    assert "@" in state.by


@pytest.mark.parametrize("kind", ["postgresql", "mysql"])
def test_server_databases(kind: str, tmp_path: Path) -> None:
    """The client takes the URLs people type (postgres://, mysql://), finds no journal on a fresh
    database without creating one, then sees the level set by another process."""
    url = create_database(kind, tmp_path)
    plain = sa.make_url(url).set(drivername="postgres" if kind == "postgresql" else "mysql")
    typed = plain.render_as_string(hide_password=False)
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with Degradation(typed, ttl=0) as client:
            assert client.level() == "normal" and client.error is None
            with client.engine.connect() as conn:
                assert not any(t.startswith("safemigrate_") for t in sa.inspect(conn).get_table_names())
            mgr = DegradationManager(Journal(engine))
            mgr.set_level("emergency", "server test", "pytest")
            assert client.level() == "emergency" and not client.is_enabled("search")
            assert client.limits()["concurrent_connections"] == 2
            mgr.off("server test done", "pytest")
            assert client.level() == "normal"
            assert [h["data"]["level"] for h in mgr.history()] == ["normal", "emergency"]

            if importlib.util.find_spec(f"safemigrate.dialects.{kind}") is None:
                pytest.skip(f"the {kind} dialect is not in this tree yet: CLI part not run")
            proc = cli("degrade", "essential", "--reason", "server CLI", "--db", typed, cwd=tmp_path)
            assert proc.returncode == 0, proc.stderr
            assert client.level() == "essential"
    finally:
        engine.dispose()
        drop_database(kind, url)
