"""Online migrations: an application process keeps inserting, updating and deleting cards while
the migration runs; nothing it writes is lost, deleted rows stay deleted, every surviving row
ends up migrated (or quarantined), and a rollback keeps the application's writes."""

from __future__ import annotations

import json
import multiprocessing
import random
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from backends import create_database, drop_database, engine_for
from safemigrate.examples.cards.generate import generate, generate_into
from safemigrate.examples.cards.transform import optimize_card
from safemigrate.migrator import Migrator
from safemigrate.settings import Settings

ROWS = 3000
V3 = ["search_terms", "content_hash", "image_count", "tag_count", "has_images", "style_type"]

MIGRATION = '''
import time
from safemigrate import AddColumn, Backfill, CreateIndex, Migration
from safemigrate.examples.cards.transform import optimize_card, validate_card

def slow_optimize(row):
    time.sleep(0.0015)  # long enough for the writer to work behind and ahead of the cursor
    return optimize_card(row)

migration = Migration(
    id="0001_cards_v3_online",
    steps=[
        AddColumn("cards", "search_terms", "TEXT"),
        AddColumn("cards", "content_hash", "TEXT"),
        AddColumn("cards", "image_count", "INTEGER"),
        AddColumn("cards", "tag_count", "INTEGER"),
        AddColumn("cards", "has_images", "INTEGER"),
        AddColumn("cards", "style_type", "TEXT"),
        Backfill("cards", slow_optimize, reads=["front_content", "back_content", "style"],
                 writes=["search_terms", "content_hash", "image_count", "tag_count", "has_images",
                         "style_type"], validate=validate_card),
        CreateIndex("cards", ["content_hash"], name="idx_cards_content_hash"),
    ],
)
'''


def _card(text: str) -> tuple[str, str, str]:
    front = json.dumps({"text": text, "tags": ["t1", "t2"], "images": ["a.png"]})
    back = json.dumps({"text": "answer " + text, "tags": [], "images": []})
    return front, back, json.dumps({"type": "basic", "color": None})


def writer(url: str, stop_file: str, log_file: str, seed: int) -> None:
    """The application: random inserts, updates and deletes until told to stop."""
    rng = random.Random(seed)
    engine = engine_for(url)
    final: dict[int, str | None] = {}
    next_id = ROWS + 1
    deadline = time.time() + 60
    with engine.connect() as conn:
        while not Path(stop_file).exists() and time.time() < deadline:
            op = rng.random()
            try:
                with conn.begin():
                    if op < 0.4:
                        card_id = rng.randint(1, ROWS)
                        front, _, _ = _card(f"updated {card_id} {rng.random():.6f}")
                        res = conn.execute(sa.text("UPDATE cards SET front_content = :f WHERE id = :i"),
                                           {"f": front, "i": card_id})
                        if res.rowcount:
                            final[card_id] = front
                    elif op < 0.75:
                        front, back, style = _card(f"new card {next_id}")
                        conn.execute(sa.text(
                            "INSERT INTO cards (id, folder_id, front_content, back_content, style, "
                            "created_at, updated_at) VALUES (:i, NULL, :f, :b, :s, 'now', 'now')"),
                            {"i": next_id, "f": front, "b": back, "s": style})
                        final[next_id] = front
                        next_id += 1
                    else:
                        card_id = rng.randint(1, ROWS)
                        conn.execute(sa.text("DELETE FROM cards WHERE id = :i"), {"i": card_id})
                        final[card_id] = None
            except sa.exc.OperationalError:
                continue  # busy: the application retries later, as real ones do
            time.sleep(0.002)
    engine.dispose()
    Path(log_file).write_text(json.dumps({str(k): v for k, v in final.items()}))


@pytest.fixture(params=["sqlite", "postgresql", "mysql"])
def cards_url(request: pytest.FixtureRequest, tmp_path: Path):
    url = create_database(request.param, tmp_path)
    if request.param == "sqlite":
        generate(url, ROWS, bad_rate=0.02, seed=7)
    else:
        generate_into(url, ROWS, bad_rate=0.02, seed=7)
    yield url
    drop_database(request.param, url)


def _migrator(url: str, tmp_path: Path) -> Migrator:
    folder = tmp_path / "migrations"
    folder.mkdir(exist_ok=True)
    (folder / "0001_cards_v3_online.py").write_text(MIGRATION)
    return Migrator(Settings(db=url, migrations=folder, backup_dir=tmp_path / "backups",
                             workers=1, batch_size=150))


def _start_writer(url: str, tmp_path: Path) -> tuple[multiprocessing.Process, Path, Path]:
    stop, log = tmp_path / "stop", tmp_path / "writes.json"
    process = multiprocessing.get_context("spawn").Process(
        target=writer, args=(url, str(stop), str(log), 11))
    process.start()
    return process, stop, log


def _stop_writer(process: multiprocessing.Process, stop: Path, log: Path) -> dict[int, str | None]:
    stop.touch()
    process.join(30)
    assert process.exitcode == 0
    return {int(k): v for k, v in json.loads(log.read_text()).items()}


def _rows(url: str) -> dict[int, dict]:
    engine = engine_for(url)
    with engine.connect() as conn:
        rows = {r["id"]: dict(r) for r in conn.execute(sa.text("SELECT * FROM cards")).mappings()}
    engine.dispose()
    return rows


def _assert_writes_kept(rows: dict[int, dict], writes: dict[int, str | None]) -> None:
    for card_id, front in writes.items():
        if front is None:
            assert card_id not in rows, f"deleted card {card_id} came back"
        else:
            assert rows[card_id]["front_content"] == front, f"write to card {card_id} was lost"


def test_concurrent_writer_during_migration(cards_url: str, tmp_path: Path) -> None:
    migrator = _migrator(cards_url, tmp_path)
    process, stop, log = _start_writer(cards_url, tmp_path)
    writes: dict[int, str | None] = {}

    def stop_at_cleanup(event) -> None:  # the application writes until the very end of the run
        if event.kind == "phase.started" and event.data.get("phase") == "cleanup":
            writes.update(_stop_writer(process, stop, log))

    migrator.bus.subscribe(stop_at_cleanup)
    try:
        (result,) = migrator.run()
    finally:
        if process.is_alive():
            writes.update(_stop_writer(process, stop, log))
    assert result.status == "completed"
    assert len(writes) > 50, "the writer must have written during the run"
    rows = _rows(cards_url)
    _assert_writes_kept(rows, writes)
    quarantined = {tuple(json.loads(q["pk"])) for q in migrator.journal.quarantined(result.run_id)}
    unmigrated = []
    for card_id, row in rows.items():
        try:
            expected = optimize_card(row)
        except ValueError:
            assert (card_id,) in quarantined, f"malformed card {card_id} neither migrated nor quarantined"
            continue
        if {c: row[c] for c in V3} != expected:
            unmigrated.append(card_id)
    assert not unmigrated, f"{len(unmigrated)} surviving rows not migrated correctly: {unmigrated[:10]}"
    migrator.close()


def test_rollback_in_the_middle_keeps_application_writes(cards_url: str, tmp_path: Path) -> None:
    before = _rows(cards_url)
    migrator = _migrator(cards_url, tmp_path)
    process, stop, log = _start_writer(cards_url, tmp_path)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            migrator.run()
        except BaseException as exc:  # noqa: BLE001 - the abort is expected
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            runs = migrator.journal.runs(1)
            steps = migrator.journal.steps(runs[0]["id"]) if runs else []
        except sa.exc.DBAPIError:  # the journal is not there yet
            steps = []
        if any(s["kind"] == "backfill" and s["rows_done"] > ROWS // 3 for s in steps):
            break
        time.sleep(0.05)
    migrator.stop.set("test: stop in the middle")
    thread.join(60)
    assert errors and "stopped" in str(errors[0])
    rollback = Migrator(migrator.settings)
    result = rollback.rollback(reason="test: rollback with the application writing")
    writes = _stop_writer(process, stop, log)
    assert result.status == "rolled_back", result
    after = _rows(cards_url)
    _assert_writes_kept(after, writes)
    sample = next(iter(after.values()))
    assert not set(V3) & set(sample), "the migration's columns must be gone"
    untouched = [i for i in before if i not in writes]
    assert all(after[i] == before[i] for i in untouched)
    rollback.close()
    migrator.close()


# -- the drains: every row the application writes is validated; a writer cannot hold the run ---
# A code copied from text into an INTEGER column: the transform's own output ("0042") passes
# the validator, but the database stores 42, which does not. Only a check of what was STORED
# catches it, as the validation phase does for the scanned rows.
CODES = '''
from safemigrate import AddColumn, Backfill, Migration

def code(row):
    return {"code": row["code_src"][:4]}

def same_code(row, new):
    if str(new["code"]) != row["code_src"][:4]:
        raise ValueError(f"code {new['code']!r} does not match {row['code_src'][:4]!r}")

migration = Migration(
    id="0001_codes",
    steps=[
        AddColumn("items", "code", "INTEGER"),
        Backfill("items", code, reads=["code_src"], writes=["code"], validate=same_code),
    ],
)
'''


def _items(url: str, rows: int) -> None:
    engine = engine_for(url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE items (id INTEGER PRIMARY KEY, "
                             "code_src VARCHAR(40) NOT NULL, touched INTEGER NOT NULL DEFAULT 0)"))
        conn.execute(sa.text("INSERT INTO items (id, code_src) VALUES (:i, :c)"),
                     [{"i": i, "c": f"{1000 + i}-item"} for i in range(1, rows + 1)])
    engine.dispose()


def _codes_migrator(url: str, tmp_path: Path, **settings) -> tuple[Migrator, list]:
    folder = tmp_path / "migrations"
    folder.mkdir(exist_ok=True)
    (folder / "0001_codes.py").write_text(CODES)
    migrator = Migrator(Settings(db=url, migrations=folder, backup_dir=tmp_path / "backups",
                                 workers=1, **settings))
    events: list = []
    migrator.bus.subscribe(events.append)
    return migrator, events


def _app_write(url: str, statements: list[tuple[str, dict]]) -> None:
    """The application, on its own connection."""
    engine = engine_for(url)
    with engine.begin() as conn:
        for sql, params in statements:
            conn.execute(sa.text(sql), params)
    engine.dispose()


def _write_at(point: str, url: str, migrator: Migrator, monkeypatch: pytest.MonkeyPatch,
              statements: list[tuple[str, dict]]) -> None:
    """Make the application write once, at `point` of the cleanup phase: as it starts (after
    validation's snapshot), or right before the triggers are removed (after the last drain
    made while they were in)."""
    if point == "cleanup-start":
        def on_event(event) -> None:
            if event.kind == "phase.started" and event.data.get("phase") == "cleanup":
                _app_write(url, statements)
        migrator.bus.subscribe(on_event)
    else:
        import safemigrate.capture as capture_module

        original, done = capture_module.remove_triggers, []

        def remove_triggers(dialect, cap) -> None:
            if not done:
                done.append(True)
                _app_write(url, statements)
            original(dialect, cap)
        monkeypatch.setattr(capture_module, "remove_triggers", remove_triggers)


def _code_rows(url: str) -> dict[int, tuple[str, object]]:
    engine = engine_for(url)
    with engine.connect() as conn:
        rows = {r[0]: (r[1], r[2]) for r in conn.execute(sa.text("SELECT id, code_src, code FROM items"))}
    engine.dispose()
    return rows


@pytest.mark.parametrize("point", ["cleanup-start", "before-trigger-removal"])
def test_rows_written_after_validation_are_validated(db_url: str, tmp_path: Path, point: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    _items(db_url, 20)
    migrator, events = _codes_migrator(db_url, tmp_path, batch_size=5)
    _write_at(point, db_url, migrator, monkeypatch, [
        ("UPDATE items SET code_src = :c WHERE id = 3", {"c": "7777-updated"}),
        ("INSERT INTO items (id, code_src) VALUES (21, :c)", {"c": "8888-new"}),
    ])
    (result,) = migrator.run()
    assert result.status == "completed"
    rows = _code_rows(db_url)
    assert rows[3] == ("7777-updated", 7777) and rows[21] == ("8888-new", 8888)
    assert all(code == int(src[:4]) for src, code in rows.values())
    drain_checks = [c for c in result.checks if c.name == "drain:items#1"]
    assert drain_checks and drain_checks[0].passed, [c.name for c in result.checks]
    assert "2 rows written by the application after validation" in drain_checks[0].details
    assert "2 validated as stored" in drain_checks[0].details
    journaled = [e for e in migrator.journal.events(result.run_id)
                 if e["kind"] == "validation.check" and "drain:items#1" in e["message"]]
    assert journaled, "the check of the drained rows is in the audit trail"
    migrator.close()


@pytest.mark.parametrize("point", ["cleanup-start", "before-trigger-removal"])
def test_row_written_after_validation_that_fails_validation_rolls_back(
        db_url: str, tmp_path: Path, point: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from safemigrate import ValidationError

    _items(db_url, 20)
    migrator, events = _codes_migrator(db_url, tmp_path, batch_size=5)
    _write_at(point, db_url, migrator, monkeypatch, [
        ("INSERT INTO items (id, code_src) VALUES (21, :c)", {"c": "0042-stored-as-42"})])
    with pytest.raises(ValidationError, match=r"drain:items#1.*\[21\]"):
        migrator.run()
    failed = [e for e in events if e.kind == "validation.failed"]
    assert failed and failed[0].data["failures"][0]["name"] == "drain:items#1"
    engine = engine_for(db_url)
    with engine.connect() as conn:  # rolled back: the column is gone, the application's row kept
        assert "code" not in {c["name"] for c in sa.inspect(conn).get_columns("items")}
        rows = dict(conn.execute(sa.text("SELECT id, code_src FROM items")).all())
    engine.dispose()
    assert rows[21] == "0042-stored-as-42" and len(rows) == 21
    migrator.close()


@pytest.mark.parametrize("drain_passes", [None, 1])
def test_a_writer_that_never_stops_does_not_hold_the_drain(
        db_url: str, tmp_path: Path, drain_passes: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The application writes two rows every time the drain commits a batch of one: the log
    never empties while the triggers are in. The drain gives up after a bounded number of
    passes, says so, and the run still ends with every row migrated and validated."""
    import safemigrate.engine as engine_module

    _items(db_url, 20)
    bound = {"drain_passes": drain_passes} if drain_passes else {}  # None: the default (10)
    migrator, events = _codes_migrator(db_url, tmp_path, batch_size=1, **bound)
    original, calls = engine_module.capture_mark_drained, []

    def mark_drained(conn, drained, seqs) -> None:
        original(conn, drained, seqs)
        calls.append(len(seqs))
        if len(calls) > 300:
            raise RuntimeError("the drain never stops while the application writes")
        ids = [(len(calls) * 2) % 20 + 1, (len(calls) * 2 + 1) % 20 + 1]
        conn.execute(sa.text("UPDATE items SET touched = touched + 1 WHERE id IN (:a, :b)"),
                     {"a": ids[0], "b": ids[1]})

    monkeypatch.setattr(engine_module, "capture_mark_drained", mark_drained)

    def seed(event) -> None:  # one application write during the scan starts the log
        if event.kind == "step.started" and event.data.get("step") == 1:
            _app_write(db_url, [("UPDATE items SET code_src = :c WHERE id = 5", {"c": "5555-x"})])
    migrator.bus.subscribe(seed)
    (result,) = migrator.run()
    assert result.status == "completed"
    bounded = [e for e in events if e.kind == "queue.bounded"]
    assert len(bounded) == 2, [e.kind for e in events]  # after the scan, and in cleanup
    assert all(e.level == "warning" and e.data["remaining"] > 0 for e in bounded)
    assert bounded[0].data["passes"] == (drain_passes or 2)  # 1 → 2 entries: not shrinking
    assert len(calls) < 50
    rows = _code_rows(db_url)
    assert rows[5] == ("5555-x", 5555)
    assert all(code == int(src[:4]) for src, code in rows.values())
    assert all(c.passed for c in result.checks), [c for c in result.checks if not c.passed]
    migrator.close()
