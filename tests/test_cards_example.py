"""The flashcard example: generator, transformation, smoke checks and the v3 migration file."""

from __future__ import annotations

import hashlib
import json
import pickle
import sqlite3
from pathlib import Path

import pytest
import sqlalchemy as sa

from safemigrate import Backfill
from safemigrate.examples.cards import MIGRATIONS_DIR, create_schema, generate, smoke
from safemigrate.examples.cards.generate import BAD_KINDS, main
from safemigrate.examples.cards.transform import WRITES, optimize_card, validate_card
from safemigrate.migration import discover

FRONT = {
    "text": "What is the Capital of France?",
    "tags": ["Geography", "europe"],
    "images": ["img/map.png"],
}
BACK = {"text": "Paris — capital city", "tags": ["capitals"], "images": []}
STYLE = {"type": "basic", "color": "#fff"}


def card(front=FRONT, back=BACK, style=STYLE, card_id=1) -> dict:
    def dump(value):
        return value if isinstance(value, str) else json.dumps(value)

    return {
        "id": card_id,
        "front_content": dump(front),
        "back_content": dump(back),
        "style": dump(style),
    }


def db_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with sqlite3.connect(path) as conn:
        for table in ("folders", "cards"):
            for row in conn.execute(f"SELECT * FROM {table} ORDER BY id"):
                digest.update(repr(row).encode())
    return digest.hexdigest()


def read_cards(path: Path) -> list[dict]:
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    rows = [dict(r) for r in conn.execute("SELECT * FROM cards ORDER BY id")]
    conn.close()
    return rows


# --- generator ---------------------------------------------------------------------------


def test_generate_is_deterministic_per_seed(tmp_path):
    a = generate(tmp_path / "a.db", 3000, bad_rate=0.01, seed=7)
    b = generate(tmp_path / "b.db", 3000, bad_rate=0.01, seed=7)
    generate(tmp_path / "c.db", 3000, bad_rate=0.01, seed=8)
    assert a["bad_kinds"] == b["bad_kinds"]
    assert db_digest(tmp_path / "a.db") == db_digest(tmp_path / "b.db")
    assert db_digest(tmp_path / "a.db") != db_digest(tmp_path / "c.db")


def test_generate_counts_and_schema(tmp_path):
    path = tmp_path / "cards.db"
    summary = generate(path, 1234, folders=20)
    assert summary == {
        "rows": 1234,
        "bad_rows": 0,
        "folders": 20,
        "path": str(path),
        "bad_kinds": dict.fromkeys(BAD_KINDS, 0),
    }
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM cards").fetchone() == (1234,)
        assert conn.execute("SELECT COUNT(*) FROM folders").fetchone() == (20,)
        assert conn.execute("SELECT MIN(id), MAX(id) FROM cards").fetchone() == (1, 1234)
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert "idx_cards_folder_id" in indexes
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)
        with_folder, without = conn.execute(
            "SELECT SUM(folder_id IS NOT NULL), SUM(folder_id IS NULL) FROM cards"
        ).fetchone()
        assert with_folder > 1000 and without > 50


def test_generated_content_is_realistic(tmp_path):
    generate(tmp_path / "cards.db", 2000)
    results = [optimize_card(row) for row in read_cards(tmp_path / "cards.db")]
    tags = [r["tag_count"] for r in results]
    images = [r["image_count"] for r in results]
    assert min(tags) == 0 and max(tags) == 5
    assert min(images) == 0 and max(images) == 3
    assert {r["style_type"] for r in results} >= {"basic", "cloze", "image"}
    assert len({r["content_hash"] for r in results}) == 2000
    assert all(r["search_terms"] for r in results)


@pytest.mark.parametrize("rows, rate", [(2000, 0.05), (1000, 0.0), (500, 1.0), (333, 0.1)])
def test_generate_bad_rate(tmp_path, rows, rate):
    summary = generate(tmp_path / "cards.db", rows, bad_rate=rate, seed=3)
    assert summary["bad_rows"] == round(rows * rate)
    assert sum(summary["bad_kinds"].values()) == summary["bad_rows"]
    rejected = 0
    for row in read_cards(tmp_path / "cards.db"):
        try:
            new = optimize_card(row)
        except ValueError:
            rejected += 1
            continue
        assert set(new) == set(WRITES)
        validate_card(row, new)
    assert rejected == summary["bad_rows"]


def test_generate_produces_every_bad_kind(tmp_path):
    summary = generate(tmp_path / "cards.db", 1000, bad_rate=0.2)
    assert all(count > 10 for count in summary["bad_kinds"].values()), summary["bad_kinds"]
    messages = set()
    for row in read_cards(tmp_path / "cards.db"):
        try:
            optimize_card(row)
        except ValueError as exc:
            messages.add(str(exc).split(":")[0])
    text = " | ".join(messages)
    for expected in ("not valid JSON", "expected an object", "tags is a string", "no 'text'",
                     "style has no 'type'"):
        assert expected in text, (expected, messages)


def test_generate_refuses_existing_file(tmp_path):
    path = tmp_path / "cards.db"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        generate(path, 10)
    assert path.read_bytes() == b"precious"


def test_generate_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        generate(tmp_path / "x.db", 10, bad_rate=1.5)
    assert not (tmp_path / "x.db").exists()


def test_generate_main(tmp_path, capsys):
    path = tmp_path / "cli.db"
    assert main(["--rows", "50", "--bad-rate", "0.1", "--seed", "1", str(path)]) == 0
    assert "50 cards (5 malformed)" in capsys.readouterr().out
    assert main(["--rows", "50", str(path)]) == 2
    assert "already exists" in capsys.readouterr().err


# --- transformation ------------------------------------------------------------------------


def test_optimize_card_values():
    new = optimize_card(card())
    canonical = (
        '{"back":{"images":[],"tags":["capitals"],"text":"Paris — capital city"},'
        '"front":{"images":["img/map.png"],"tags":["Geography","europe"],'
        '"text":"What is the Capital of France?"},"style":{"color":"#fff","type":"basic"}}'
    )
    assert new == {
        "search_terms": "capital capitals city europe france geography is of paris the what",
        "content_hash": hashlib.sha256(canonical.encode("utf-8")).hexdigest(),
        "image_count": 1,
        "tag_count": 3,
        "has_images": 1,
        "style_type": "basic",
    }
    assert list(new) == list(WRITES)


def test_content_hash_ignores_json_formatting():
    reformatted = card(
        front=json.dumps(dict(reversed(FRONT.items())), indent=2, ensure_ascii=False),
        back=json.dumps(BACK, ensure_ascii=True),
        style='{ "color" : "#fff", "type" : "basic" }',
    )
    assert optimize_card(reformatted) == optimize_card(card())
    changed = card(back={**BACK, "text": "Lyon"})
    assert optimize_card(changed)["content_hash"] != optimize_card(card())["content_hash"]


def test_optimize_card_edge_cases():
    plain = optimize_card(card(front={"text": "Hi"}, back={"text": "", "tags": []}))
    assert plain["search_terms"] == "hi"
    assert (plain["tag_count"], plain["image_count"], plain["has_images"]) == (0, 0, 0)
    unicode = optimize_card(card(front={"text": "Straße 学习 café", "tags": ["Über"]}))
    assert unicode["search_terms"].split() == sorted(
        ["straße", "学习", "café", "über", "paris", "capital", "city", "capitals"]
    )
    assert optimize_card(card(back={**BACK, "text": "x_y, x-y"}))["search_terms"].split()[-3:] == [
        "x", "x_y", "y"
    ]


@pytest.mark.parametrize(
    "row, message",
    [
        (card(front='{"text": "broken'), "front_content is not valid JSON"),
        (card(style="{"), "style is not valid JSON"),
        (card(back='["Paris", "capital"]'), "back_content is a JSON array, expected an object"),
        (card(back='"Paris"'), "back_content is a JSON string, expected an object"),
        (card(back="null"), "back_content is a JSON null, expected an object"),
        (card(front={**FRONT, "tags": "geo,europe"}), "front_content.tags is a string"),
        (card(front={**FRONT, "tags": None}), "front_content.tags is null"),
        (card(back={**BACK, "tags": ["ok", 3]}), "back_content.tags contains a number"),
        (card(back={**BACK, "images": {"a": 1}}), "back_content.images is a dict"),
        (card(back={"tags": [], "images": []}), "back_content has no 'text'"),
        (card(front={**FRONT, "text": 42}), "front_content.text is a number"),
        (card(style={"color": "#fff"}), "style has no 'type'"),
        (card(style={"type": ""}), "style.type must be a non-empty string"),
        (card(style="[1]"), "style is a JSON array"),
        ({"id": 1, "front_content": None, "back_content": "{}", "style": "{}"},
         "front_content is missing"),
    ],
)
def test_optimize_card_rejects_malformed(row, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace("[", r"\[")):
        optimize_card(row)


def test_validate_card():
    row = card()
    good = optimize_card(row)
    assert validate_card(row, good) is None
    with pytest.raises(ValueError, match=r"^Card validation failed: Tag count mismatch \(4 != 3\)"):
        validate_card(row, {**good, "tag_count": 4})
    with pytest.raises(ValueError, match="Image count mismatch"):
        validate_card(row, {**good, "image_count": 0})
    with pytest.raises(ValueError, match="has_images mismatch"):
        validate_card(row, {**good, "has_images": 0})
    with pytest.raises(ValueError, match="Card ID is required"):
        validate_card({**row, "id": None}, good)
    with pytest.raises(ValueError, match="Front content is required, Back content is required"):
        validate_card({**row, "front_content": None, "back_content": ""}, good)


def test_functions_are_picklable():
    for func in (optimize_card, validate_card):
        assert pickle.loads(pickle.dumps(func)) is func


# --- smoke checks ----------------------------------------------------------------------------


CHECKS = [*smoke.SMOKE_CHECKS, *smoke.INVARIANTS]


def migrate_by_hand(path: Path) -> int:
    """Apply v3 with plain SQL + optimize_card; malformed cards stay NULL. Returns migrated."""
    conn = sqlite3.connect(path)
    for column, type_ in zip(WRITES, ["TEXT", "TEXT", "INTEGER", "INTEGER", "INTEGER", "TEXT"],
                             strict=True):
        conn.execute(f"ALTER TABLE cards ADD COLUMN {column} {type_}")
    conn.row_factory = sqlite3.Row
    updates = []
    for row in conn.execute("SELECT id, front_content, back_content, style FROM cards"):
        try:
            new = optimize_card(dict(row))
        except ValueError:
            continue
        updates.append({**new, "id": row["id"]})
    sets = ", ".join(f"{c} = :{c}" for c in WRITES)
    conn.executemany(f"UPDATE cards SET {sets} WHERE id = :id", updates)
    conn.commit()
    conn.close()
    return len(updates)


def run_check(engine: sa.Engine, check) -> None:
    with engine.connect() as conn:
        transaction = conn.begin()
        try:
            check(conn)
        finally:
            transaction.rollback()


@pytest.fixture
def migrated(tmp_path) -> tuple[Path, sa.Engine]:
    path = tmp_path / "cards.db"
    generate(path, 400, bad_rate=0.05, folders=12, seed=11)
    assert migrate_by_hand(path) == 380
    engine = sa.create_engine(f"sqlite:///{path}")
    yield path, engine
    engine.dispose()


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_smoke_checks_pass(migrated, check):
    path, engine = migrated
    before = db_digest(path)
    run_check(engine, check)
    assert db_digest(path) == before  # whatever the check wrote was rolled back


def test_smoke_checks_pass_on_empty_store(tmp_path):
    path = tmp_path / "empty.db"
    with sqlite3.connect(path) as conn:
        create_schema(conn)
    migrate_by_hand(path)
    engine = sa.create_engine(f"sqlite:///{path}")
    for check in CHECKS:
        run_check(engine, check)
    engine.dispose()


@pytest.mark.parametrize(
    "sql, check, message",
    [
        ("UPDATE cards SET tag_count = tag_count + 1 WHERE id % 7 = 0", smoke.check_tag_query,
         "tag_count sums to"),
        ("UPDATE cards SET image_count = 5 WHERE id = 3", smoke.check_tag_query,
         "image_count"),
        ("UPDATE cards SET has_images = 1 - has_images WHERE id = 10",
         smoke.check_counts_consistent, "has_images inconsistent"),
        ("UPDATE cards SET folder_id = 999 WHERE id = 5", smoke.check_folder_query,
         "reference a missing folder"),
        ("UPDATE folders SET parent_id = 999 WHERE id = 1", smoke.check_folder_query,
         "parent that does not exist"),
        ("UPDATE cards SET search_terms = 'aaaa ' || search_terms WHERE id = 1", smoke.check_search,
         "its content does not have it"),
        ("CREATE TRIGGER no_delete BEFORE DELETE ON cards BEGIN SELECT RAISE(IGNORE); END",
         smoke.check_card_crud, "delete of card"),
    ],
)
def test_smoke_check_fails_on_broken_db(migrated, sql, check, message):
    path, engine = migrated
    with sqlite3.connect(path) as conn:
        conn.execute(sql)
    with pytest.raises(AssertionError, match=message):
        run_check(engine, check)


# --- the migration file ------------------------------------------------------------------------


def test_migration_file_loads():
    assert not (MIGRATIONS_DIR / "__init__.py").exists()
    (migration,) = discover(MIGRATIONS_DIR)
    assert migration.id == "0001_cards_v3"
    (backfill,) = [s for s in migration.steps if isinstance(s, Backfill)]
    assert backfill.transform is optimize_card and backfill.validate is validate_card
    assert list(backfill.writes) == list(WRITES)
    assert migration.smoke_checks == list(smoke.SMOKE_CHECKS)
    assert migration.invariants == list(smoke.INVARIANTS)
    assert migration.reversible


def test_repo_symlink_points_at_the_package():
    link = Path(__file__).resolve().parents[1] / "examples" / "cards"
    if not link.exists():
        pytest.skip("not running from a source checkout")
    assert link.resolve() == MIGRATIONS_DIR.parent.resolve()
