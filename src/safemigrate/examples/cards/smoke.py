"""Functional smoke checks for the v3 card store: the seed's RollbackValidator.testFunctionality
(card CRUD, search, folder operations, tag operations) plus an invariant.

Each check takes a SQLAlchemy ``Connection`` and raises AssertionError with a message when the
database is wrong. Smoke checks run inside a transaction the caller rolls back, so they may write.
The SQL is plain and portable (no SQLite-only functions).
"""

from __future__ import annotations

import json

from sqlalchemy import text
from sqlalchemy.engine import Connection

from .transform import optimize_card, parse_content

SAMPLE = 1000

_MIGRATED = "content_hash IS NOT NULL"


def _fail(message: str) -> None:
    raise AssertionError(message)


def check_card_crud(conn: Connection) -> None:
    """Insert a card with its v3 fields, read it back, update it, delete it."""
    next_id = conn.execute(text("SELECT COALESCE(MAX(id), 0) + 1 FROM cards")).scalar_one()
    folder_id = conn.execute(text("SELECT MIN(id) FROM folders")).scalar()
    front = json.dumps({"text": "Smoke test: capital of France?", "tags": ["smoke"], "images": []})
    back = json.dumps({"text": "Paris", "tags": ["geography"], "images": ["img/paris.png"]})
    style = json.dumps({"type": "basic", "color": None})
    stamp = "2000-01-01T00:00:00Z"
    derived = optimize_card({"id": next_id, "front_content": front, "back_content": back,
                             "style": style})
    conn.execute(
        text(
            "INSERT INTO cards (id, folder_id, front_content, back_content, style, created_at,"
            " updated_at, search_terms, content_hash, image_count, tag_count, has_images,"
            " style_type) VALUES (:id, :folder_id, :front, :back, :style, :stamp, :stamp,"
            " :search_terms, :content_hash, :image_count, :tag_count, :has_images, :style_type)"
        ),
        {"id": next_id, "folder_id": folder_id, "front": front, "back": back, "style": style,
         "stamp": stamp, **derived},
    )
    row = conn.execute(
        text(
            "SELECT front_content, back_content, search_terms, content_hash, image_count,"
            " tag_count, has_images, style_type FROM cards WHERE id = :id"
        ),
        {"id": next_id},
    ).mappings().one_or_none()
    if row is None:
        _fail(f"card CRUD: inserted card {next_id} cannot be read back")
    if row["front_content"] != front or row["back_content"] != back:
        _fail(f"card CRUD: card {next_id} content changed between insert and read")
    for key, value in derived.items():
        if row[key] != value:
            _fail(f"card CRUD: card {next_id} {key} reads back {row[key]!r}, wrote {value!r}")

    new_back = json.dumps({"text": "Paris, on the Seine", "tags": [], "images": []})
    updated = optimize_card({"id": next_id, "front_content": front, "back_content": new_back,
                             "style": style})
    result = conn.execute(
        text(
            "UPDATE cards SET back_content = :back, updated_at = :stamp,"
            " search_terms = :search_terms, content_hash = :content_hash,"
            " image_count = :image_count, tag_count = :tag_count, has_images = :has_images,"
            " style_type = :style_type WHERE id = :id"
        ),
        {"id": next_id, "back": new_back, "stamp": "2000-01-02T00:00:00Z", **updated},
    )
    if result.rowcount != 1:
        _fail(f"card CRUD: update of card {next_id} touched {result.rowcount} rows")
    got = conn.execute(
        text("SELECT back_content, image_count, tag_count, has_images FROM cards WHERE id = :id"),
        {"id": next_id},
    ).one()
    expected = (new_back, 0, 1, 0)
    if tuple(got) != expected:
        _fail(f"card CRUD: card {next_id} after update is {tuple(got)!r}, expected {expected!r}")

    result = conn.execute(text("DELETE FROM cards WHERE id = :id"), {"id": next_id})
    if result.rowcount != 1:
        _fail(f"card CRUD: delete of card {next_id} touched {result.rowcount} rows")
    left = conn.execute(
        text("SELECT COUNT(*) FROM cards WHERE id = :id"), {"id": next_id}
    ).scalar_one()
    if left:
        _fail(f"card CRUD: card {next_id} still exists after delete")


def check_search(conn: Connection) -> None:
    """Search by a term of an existing migrated card: the card is found, and every hit really
    contains the term (its search_terms agree with its content)."""
    card = conn.execute(
        text(
            f"SELECT id, search_terms FROM cards WHERE {_MIGRATED} AND search_terms <> ''"
            " ORDER BY id LIMIT 1"
        )
    ).one_or_none()
    if card is None:
        return  # no migrated card has any text: nothing to search for
    term = card.search_terms.split(" ")[0]
    escaped = term.replace("!", "!!").replace("%", "!%").replace("_", "!_")
    pattern = f"% {escaped} %"
    spaced = ("CONCAT(' ', search_terms, ' ')" if conn.dialect.name == "mysql"  # || is OR there
              else "(' ' || search_terms || ' ')")
    match = f"{spaced} LIKE :pattern ESCAPE '!'"
    found = conn.execute(
        text(f"SELECT COUNT(*) FROM cards WHERE id = :id AND {match}"),
        {"id": card.id, "pattern": pattern},
    ).scalar_one()
    if found != 1:
        _fail(f"search: card {card.id} is not found by its own term {term!r}")
    hits = conn.execute(
        text(
            f"SELECT id, front_content, back_content, style FROM cards WHERE {match}"
            " ORDER BY id LIMIT 50"
        ),
        {"pattern": pattern},
    ).mappings().all()
    for hit in hits:
        try:
            terms = optimize_card(hit)["search_terms"].split(" ")
        except ValueError as exc:
            _fail(f"search: card {hit['id']} matches {term!r} but its content is broken: {exc}")
        if term not in terms:
            _fail(f"search: card {hit['id']} matches {term!r} but its content does not have it")


def check_folder_query(conn: Connection) -> None:
    """Cards per folder add up to the cards that have a folder, and every folder reference
    (card → folder, folder → parent) resolves."""
    per_folder = conn.execute(
        text(
            "SELECT f.id, COUNT(c.id) FROM folders f LEFT JOIN cards c ON c.folder_id = f.id"
            " GROUP BY f.id"
        )
    ).all()
    in_folders = sum(count for _, count in per_folder)
    with_folder = conn.execute(
        text("SELECT COUNT(*) FROM cards WHERE folder_id IS NOT NULL")
    ).scalar_one()
    if in_folders != with_folder:
        _fail(
            f"folders: per-folder counts add up to {in_folders}, but {with_folder} cards have"
            " a folder (some reference a missing folder)"
        )
    orphans = conn.execute(
        text(
            "SELECT COUNT(*) FROM folders f WHERE f.parent_id IS NOT NULL"
            " AND NOT EXISTS (SELECT 1 FROM folders p WHERE p.id = f.parent_id)"
        )
    ).scalar_one()
    if orphans:
        _fail(f"folders: {orphans} folders have a parent that does not exist")


def check_tag_query(conn: Connection) -> None:
    """Over a sample of up to 1000 migrated cards spread over the table, the sum of tag_count
    (and image_count) equals a recount from the content."""
    total = conn.execute(text(f"SELECT COUNT(*) FROM cards WHERE {_MIGRATED}")).scalar_one()
    if not total:
        return
    step = max(1, total // SAMPLE)
    rows = conn.execute(
        text(
            "SELECT id, front_content, back_content, tag_count, image_count FROM cards"
            f" WHERE {_MIGRATED} AND id % :step = 0 ORDER BY id LIMIT :limit"
        ),
        {"step": step, "limit": SAMPLE},
    ).mappings().all()
    stored_tags = recount_tags = stored_images = recount_images = 0
    wrong: list[int] = []
    for row in rows:
        try:
            _, _, front_tags, front_images = parse_content(row["front_content"], "front_content")
            _, _, back_tags, back_images = parse_content(row["back_content"], "back_content")
        except ValueError as exc:
            _fail(f"tags: migrated card {row['id']} has unreadable content: {exc}")
        tags = len(front_tags) + len(back_tags)
        images = len(front_images) + len(back_images)
        stored_tags += row["tag_count"] or 0
        stored_images += row["image_count"] or 0
        recount_tags += tags
        recount_images += images
        if row["tag_count"] != tags or row["image_count"] != images:
            wrong.append(row["id"])
    if stored_tags != recount_tags or stored_images != recount_images or wrong:
        _fail(
            f"tags: over {len(rows)} sampled cards tag_count sums to {stored_tags} (recount"
            f" {recount_tags}) and image_count to {stored_images} (recount {recount_images});"
            f" wrong cards: {wrong[:10]}{' …' if len(wrong) > 10 else ''}"
        )


def check_counts_consistent(conn: Connection) -> None:
    """Invariant: every migrated card has has_images = (image_count > 0) and both are set."""
    bad = conn.execute(
        text(
            f"SELECT COUNT(*) FROM cards WHERE {_MIGRATED} AND (image_count IS NULL"
            " OR has_images IS NULL"
            " OR has_images <> CASE WHEN image_count > 0 THEN 1 ELSE 0 END)"
        )
    ).scalar_one()
    if bad:
        _fail(f"{bad} migrated cards have has_images inconsistent with image_count")


# -- after a rollback: the same operations on the v2 schema ------------------------------------
V3_COLUMNS = ("search_terms", "content_hash", "image_count", "tag_count", "has_images", "style_type")


def check_card_crud_v2(conn: Connection) -> None:
    """Card CRUD as the v2 application does it: no derived column exists any more."""
    columns = {r[0] for r in conn.execute(text("SELECT * FROM cards LIMIT 0")).cursor.description}
    left = sorted(columns & set(V3_COLUMNS))
    if left:
        _fail(f"card CRUD (v2): cards still has the v3 columns {left}")
    next_id = conn.execute(text("SELECT COALESCE(MAX(id), 0) + 1 FROM cards")).scalar_one()
    folder_id = conn.execute(text("SELECT MIN(id) FROM folders")).scalar()
    front = json.dumps({"text": "Smoke test v2: capital of Italy?", "tags": ["smoke"], "images": []})
    conn.execute(
        text("INSERT INTO cards (id, folder_id, front_content, back_content, style, created_at,"
             " updated_at) VALUES (:id, :folder, :front, :back, :style, :stamp, :stamp)"),
        {"id": next_id, "folder": folder_id, "front": front, "stamp": "2000-01-01T00:00:00Z",
         "back": json.dumps({"text": "Rome", "tags": [], "images": []}),
         "style": json.dumps({"type": "basic", "color": None})},
    )
    got = conn.execute(text("SELECT front_content FROM cards WHERE id = :id"), {"id": next_id}).scalar()
    if got != front:
        _fail(f"card CRUD (v2): card {next_id} reads back {got!r}")
    updated = conn.execute(text("UPDATE cards SET updated_at = :stamp WHERE id = :id"),
                           {"id": next_id, "stamp": "2000-01-02T00:00:00Z"})
    deleted = conn.execute(text("DELETE FROM cards WHERE id = :id"), {"id": next_id})
    if updated.rowcount != 1 or deleted.rowcount != 1:
        _fail(f"card CRUD (v2): update/delete of card {next_id} touched "
              f"{updated.rowcount}/{deleted.rowcount} rows")


def check_search_v2(conn: Connection) -> None:
    """The v2 search scans the content: a card is found by a word of its own front text."""
    rows = conn.execute(text("SELECT id, front_content FROM cards ORDER BY id LIMIT 20")).all()
    for card_id, raw in rows:
        try:
            _, words, _, _ = parse_content(raw, "front_content")
        except ValueError:
            continue  # a malformed card (quarantined by the migration) is not searchable
        word = next((w for w in words.split() if len(w) > 2 and w.isalnum()), None)
        if word is None:
            continue
        found = conn.execute(text("SELECT COUNT(*) FROM cards WHERE id = :id AND front_content LIKE :p"),
                             {"id": card_id, "p": f"%{word}%"}).scalar_one()
        if found != 1:
            _fail(f"search (v2): card {card_id} is not found by its own word {word!r}")
        return


def check_tag_query_v2(conn: Connection) -> None:
    """Tags are read from the content again (v2 has no tag_count): a sample parses."""
    rows = conn.execute(text("SELECT id, front_content, back_content FROM cards ORDER BY id"
                             " LIMIT 200")).all()
    readable = 0
    for _card_id, front, back in rows:
        try:
            parse_content(front, "front_content")
            parse_content(back, "back_content")
            readable += 1
        except ValueError:
            continue
    if rows and not readable:
        _fail(f"tags (v2): none of {len(rows)} sampled cards has readable content")


SMOKE_CHECKS = (check_card_crud, check_search, check_folder_query, check_tag_query)
ROLLBACK_SMOKE_CHECKS = (check_card_crud_v2, check_search_v2, check_folder_query,
                         check_tag_query_v2)
INVARIANTS = (check_counts_consistent,)
