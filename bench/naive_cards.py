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

from safemigrate.examples.cards.transform import optimize_card, validate_card

COLUMNS = (
    ("search_terms", "TEXT"),
    ("content_hash", "TEXT"),
    ("image_count", "INTEGER"),
    ("tag_count", "INTEGER"),
    ("has_images", "INTEGER"),
    ("style_type", "TEXT"),
)


def main(path: str) -> int:
    started = time.perf_counter()
    conn = sqlite3.connect(path)
    cur = conn.cursor()
    for name, type_ in COLUMNS:
        cur.execute(f"ALTER TABLE cards ADD COLUMN {name} {type_}")

    rows = cur.execute("SELECT id, front_content, back_content, style FROM cards").fetchall()
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

    cur.executemany(
        "UPDATE cards SET search_terms = ?, content_hash = ?, image_count = ?, tag_count = ?,"
        " has_images = ?, style_type = ? WHERE id = ?",
        updates,
    )
    conn.commit()
    written = time.perf_counter()

    cur.execute("CREATE INDEX idx_cards_content_hash ON cards(content_hash)")
    cur.execute("CREATE INDEX idx_cards_style_type ON cards(style_type)")
    conn.commit()
    conn.close()
    done = time.perf_counter()

    # One line for the benchmark (the phases of the naive script, for comparison).
    print(
        f"naive: rows={len(rows)} updated={len(updates)} skipped={skipped}"
        f" read={loaded - started:.3f} transform={transformed - loaded:.3f}"
        f" write={written - transformed:.3f} index={done - written:.3f} total={done - started:.3f}"
    )
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python bench/naive_cards.py DB", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
