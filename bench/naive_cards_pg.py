"""The v2 -> v3 card migration as a developer would write it by hand, on PostgreSQL: the baseline
of bench/run_pg.py.

    python bench/naive_cards_pg.py postgresql://postgres@127.0.0.1:5432/DB

psycopg 3, one connection, one transaction: add the six columns, fetch every card with a plain
cursor ``fetchall()``, one loop over ``optimize_card`` + ``validate_card`` (rows that raise are
skipped: left NULL), one ``executemany`` UPDATE, commit, build the two indexes. No backup, no
checks, no resume, no progress. The same transformation functions as the safe migration, so the
benchmark compares the machinery around them. The PostgreSQL twin of bench/naive_cards.py.
"""

from __future__ import annotations

import sys

import psycopg
from naive_cards import migrate


def main(url: str) -> int:
    print(migrate(psycopg.connect(url), "%s"))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python bench/naive_cards_pg.py POSTGRESQL_URL", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
