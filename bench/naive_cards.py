"""The v2 -> v3 card migration as a developer would write it by hand: the benchmark's baseline.

    python bench/naive_cards.py cards.db

One connection, add the six columns, read every card into memory, one loop over
``optimize_card`` + ``validate_card`` (rows that raise are skipped: left NULL), one
``executemany`` UPDATE, commit, build the two indexes. No backup, no checks, no resume, no
progress. It runs the very same transformation functions as the safe migration, so the benchmark
compares the machinery around them, not the transformation itself.
"""

from __future__ import annotations

import sqlite3
import sys
import time
from typing import Any

from safemigrate.examples.cards.transform import optimize_card, validate_card

COLUMNS = (
    ("search_terms", "TEXT"),
    ("content_hash", "TEXT"),
    ("image_count", "INTEGER"),
    ("tag_count", "INTEGER"),
    ("has_images", "INTEGER"),
    ("style_type", "TEXT"),
)


def migrate(conn: Any, mark: str) -> str:
    """The whole naive migration on one DB-API connection; ``mark`` is its placeholder (? or %s).

    Returns the one summary line the benchmark parses.
    """
    started = time.perf_counter()
    cur = conn.cursor()
    for name, type_ in COLUMNS:
        cur.execute(f"ALTER TABLE cards ADD COLUMN {name} {type_}")

    cur.execute("SELECT id, front_content, back_content, style FROM cards")
    rows = cur.fetchall()
    loaded = time.perf_counter()

    updates = []
    skipped = 0
    for card_id, front, back, style in rows:
        card = {"id": card_id, "front_content": front, "back_content": back, "style": style}
        try:
            new = optimize_card(card)
            validate_card(card, new)
        except ValueError:
            skipped += 1
            continue
        updates.append((new["search_terms"], new["content_hash"], new["image_count"],
                        new["tag_count"], new["has_images"], new["style_type"], card_id))
    transformed = time.perf_counter()

    assignments = ", ".join(f"{name} = {mark}" for name, _ in COLUMNS)
    cur.executemany(f"UPDATE cards SET {assignments} WHERE id = {mark}", updates)
    conn.commit()
    written = time.perf_counter()

    cur.execute("CREATE INDEX idx_cards_content_hash ON cards(content_hash)")
    cur.execute("CREATE INDEX idx_cards_style_type ON cards(style_type)")
    conn.commit()
    conn.close()
    done = time.perf_counter()

    # One line for the benchmark (the phases of the naive script, for comparison).
    return (
        f"naive: rows={len(rows)} updated={len(updates)} skipped={skipped}"
        f" read={loaded - started:.3f} transform={transformed - loaded:.3f}"
        f" write={written - transformed:.3f} index={done - written:.3f} total={done - started:.3f}"
    )


def main(path: str) -> int:
    print(migrate(sqlite3.connect(path), "?"))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python bench/naive_cards.py DB", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
