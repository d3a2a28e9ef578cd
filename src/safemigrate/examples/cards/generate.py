"""Build a v2 flashcard database: folders and cards with realistic, deterministic content.

``python -m safemigrate.examples.cards.generate --rows 1000000 --bad-rate 0.001 cards.db``

A fraction ``bad_rate`` of the cards is malformed, in the ways a real card store rots and the
migration must reject (quarantine) rather than guess: invalid JSON, JSON that is not an object,
``tags`` that is not a list, content without ``text``, a style without ``type``.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from pathlib import Path
from random import Random
from typing import Any

from .schema import create_indexes, create_tables

CHUNK = 10_000

_VOCABULARY_TEXT = """
the a of to and in is what which who when where why how does do define explain name list cell
membrane nucleus protein enzyme gene chromosome mitosis meiosis photosynthesis respiration
osmosis diffusion molecule atom electron proton neutron isotope ion bond acid base salt oxygen
carbon hydrogen nitrogen energy force mass velocity acceleration momentum gravity friction wave
frequency light sound heat temperature pressure volume density circuit voltage current
resistance magnet field planet star galaxy orbit moon comet telescope river mountain ocean
desert forest climate weather volcano earthquake continent island capital country city empire
king queen war treaty revolution republic democracy parliament constitution law trade market
price money bank tax economy supply demand verb noun adjective adverb pronoun tense past present
future plural singular subject object clause sentence paragraph essay poem novel author
character theme metaphor rhyme chapter word meaning translate spelling grammar pronunciation
accent vocabulary number fraction decimal percent ratio equation variable function graph slope
angle triangle circle square area perimeter radius diameter theorem proof prime integer matrix
vector derivative integral limit probability statistics mean median algorithm array loop
variable pointer compiler memory network protocol database query index table column row key
value cache thread process kernel file bit byte first second third main largest smallest
important common example difference between causes effects process structure role purpose result
type part café naïve résumé façade über straße 学习 记忆 单词 复习 カード 日本語 смысл слово
"""
VOCABULARY = list(dict.fromkeys(_VOCABULARY_TEXT.split()))

_TAGS_TEXT = """
biology chemistry physics geography history economics grammar vocabulary literature math algebra
geometry calculus statistics programming databases networks exam-prep chapter-1 chapter-2
chapter-3 chapter-4 review hard easy important formula definition date person place language
french spanish german japanese chinese medicine anatomy law music art
"""
TAGS = _TAGS_TEXT.split()

STYLE_TYPES = ["basic"] * 12 + ["cloze"] * 4 + ["image"] * 2 + ["reversed", "typing"]
COLORS = ['"#ffffff"', '"#fef3c7"', '"#dbeafe"', '"#dcfce7"', '"#fce7f3"', "null"]
ENDINGS = ["", "", "?", ".", "!", ":"]
BAD_KINDS = ("invalid_json", "not_object", "tags_not_list", "missing_text", "style_missing_type")

_BASE_TIME = 1_640_995_200  # 2022-01-01T00:00:00Z: fixed, so a seed always gives the same file


def _quoted(values: list[str]) -> list[str]:
    out = [json.dumps(v, ensure_ascii=False) for v in values]
    for value, quoted in zip(values, out, strict=True):
        if quoted != f'"{value}"':  # the generator splices strings into JSON unescaped
            raise ValueError(f"vocabulary entry {value!r} needs JSON escaping")
    return out


_QUOTED_TAGS = _quoted(TAGS)
_quoted(VOCABULARY)
_WORD_TABLE = (VOCABULARY * (256 // len(VOCABULARY) + 1))[:256]  # a random byte picks a word


_DAYS = [
    time.strftime("%Y-%m-%dT", time.gmtime(_BASE_TIME + day * 86_400)) for day in range(4 * 366)
]
_SECONDS = [f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}Z" for s in range(86_400)]


def _timestamp(seconds: int) -> str:
    """ISO-8601 UTC for `seconds` after _BASE_TIME, from lookup tables (strftime is slow)."""
    return _DAYS[seconds // 86_400] + _SECONDS[seconds % 86_400]


def _folders(rng: Random, count: int) -> list[tuple[int, str, int | None]]:
    rows: list[tuple[int, str, int | None]] = []
    for folder_id in range(1, count + 1):
        name = f"{rng.choice(TAGS).replace('-', ' ').title()} {rng.choice(VOCABULARY)}"
        parent = None
        if folder_id > 5 and rng.random() < 0.5:
            parent = rng.randint(1, folder_id - 1)
        rows.append((folder_id, name, parent))
    return rows


def _malform(rng: Random, kind: str, front: str, back: str, style: str) -> tuple[str, str, str]:
    """Break one card in the given way; the result must be rejected by optimize_card."""
    if kind == "invalid_json":
        which = rng.randrange(3)
        if which == 0:
            return front[: rng.randrange(1, len(front))], back, style
        if which == 1:
            return front, back[: rng.randrange(1, len(back))], style
        return front, back, style[: rng.randrange(1, len(style))]
    if kind == "not_object":
        payload = json.loads(back)
        choice = rng.randrange(3)
        if choice == 0:
            broken = json.dumps(payload["text"], ensure_ascii=False)
        elif choice == 1:
            broken = json.dumps([payload["text"], *payload["tags"]], ensure_ascii=False)
        else:
            broken = "null"
        return front, broken, style
    if kind == "tags_not_list":
        payload = json.loads(front)
        payload["tags"] = ",".join(payload["tags"]) or "untagged"
        return json.dumps(payload, ensure_ascii=False), back, style
    if kind == "missing_text":
        payload = json.loads(back)
        del payload["text"]
        payload["body"] = "moved here by an old client"
        return front, json.dumps(payload, ensure_ascii=False), style
    if kind == "style_missing_type":
        return front, back, '{"color":"#ffffff"}'
    raise ValueError(f"unknown malformation {kind!r}")


def _tag_pool(rng: Random, size: int = 4096) -> list[list[str]]:
    """Pre-drawn tag lists for 0..3 tags (drawing a sample per card is the slow part)."""
    return [[",".join(rng.sample(_QUOTED_TAGS, k)) for _ in range(size)] for k in range(4)]


def _cards(
    rng: Random,
    first_id: int,
    last_id: int,
    folder_count: int,
    bad: set[int],
    kinds: dict[str, int],
    tag_pool: list[list[str]],
) -> list[tuple]:
    rnd = rng.random
    word = _WORD_TABLE.__getitem__
    pool_size = len(tag_pool[0])
    endings = ENDINGS
    styles = STYLE_TYPES
    colors = COLORS
    stamp = _timestamp
    # One byte per word: 12 slots for the front text, 20 for the back, per card.
    word_bytes = rng.randbytes((last_id - first_id + 1) * 32)
    rows = []
    for offset, card_id in enumerate(range(first_id, last_id + 1)):
        at = offset * 32
        front_words = word_bytes[at : at + 3 + int(rnd() * 10)]
        back_words = word_bytes[at + 12 : at + 13 + int(rnd() * 20)]
        front_text = " ".join(map(word, front_words)) + endings[int(rnd() * 6)]
        back_text = " ".join(map(word, back_words))
        front_tags = tag_pool[int(rnd() * 4)][int(rnd() * pool_size)]
        back_tags = tag_pool[int(rnd() * 3)][int(rnd() * pool_size)]
        front_images = back_images = ""
        if rnd() < 0.2:
            front_images = f'"img/{int(rnd() * 100_000):05d}.png"'
            if rnd() < 0.5:
                front_images += f',"img/{int(rnd() * 100_000):05d}.png"'
        if rnd() < 0.1:
            back_images = f'"img/{int(rnd() * 100_000):05d}.jpg"'
        front = f'{{"text":"{front_text}","tags":[{front_tags}],"images":[{front_images}]}}'
        back = f'{{"text":"{back_text}","tags":[{back_tags}],"images":[{back_images}]}}'
        style = f'{{"type":"{styles[int(rnd() * 20)]}","color":{colors[int(rnd() * 6)]}}}'
        folder_id = 1 + int(rnd() * folder_count) if folder_count and rnd() >= 0.1 else None
        created = int(rnd() * 94_608_000)  # within three years of _BASE_TIME
        updated = created + int(rnd() * 31_536_000) if rnd() < 0.4 else created
        if card_id in bad:
            kind = BAD_KINDS[int(rnd() * len(BAD_KINDS))]
            kinds[kind] += 1
            front, back, style = _malform(rng, kind, front, back, style)
        rows.append((card_id, folder_id, front, back, style, stamp(created), stamp(updated)))
    return rows


def generate(
    path: str | Path, rows: int, bad_rate: float = 0.0, seed: int = 42, folders: int = 50
) -> dict[str, Any]:
    """Create a fresh v2 card database at `path` (FileExistsError if it exists).

    Deterministic for a seed. Exactly ``round(rows * bad_rate)`` cards are malformed. Returns
    ``{"rows", "bad_rows", "folders", "path", "bad_kinds"}``.
    """
    path = Path(path)
    if rows < 0:
        raise ValueError("rows must be >= 0")
    if not 0.0 <= bad_rate <= 1.0:
        raise ValueError("bad_rate must be between 0 and 1")
    if folders < 0:
        raise ValueError("folders must be >= 0")
    path.open("xb").close()  # atomically refuse to overwrite anything
    rng = Random(seed)
    bad_count = round(rows * bad_rate)
    bad = set(rng.sample(range(1, rows + 1), bad_count)) if bad_count else set()
    kinds = dict.fromkeys(BAD_KINDS, 0)
    tag_pool = _tag_pool(rng)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("BEGIN")
        create_tables(conn)
        conn.executemany("INSERT INTO folders VALUES (?, ?, ?)", _folders(rng, folders))
        insert = "INSERT INTO cards VALUES (?, ?, ?, ?, ?, ?, ?)"
        for first in range(1, rows + 1, CHUNK):
            last = min(first + CHUNK - 1, rows)
            conn.executemany(insert, _cards(rng, first, last, folders, bad, kinds, tag_pool))
        create_indexes(conn)
        conn.execute("COMMIT")
        conn.execute("PRAGMA synchronous=FULL")
    except BaseException:
        conn.close()
        path.unlink(missing_ok=True)
        raise
    conn.close()
    return {
        "rows": rows,
        "bad_rows": bad_count,
        "folders": folders,
        "path": str(path),
        "bad_kinds": kinds,
    }


def generate_into(
    url: str, rows: int, bad_rate: float = 0.0, seed: int = 42, folders: int = 50
) -> dict[str, Any]:
    """The same cards as `generate`, into an existing empty server database (PostgreSQL,
    MySQL/MariaDB) given by a SQLAlchemy URL; the tables must not exist yet."""
    import sqlalchemy as sa

    from .schema import metadata

    if rows < 0 or not 0.0 <= bad_rate <= 1.0 or folders < 0:
        raise ValueError("rows and folders must be >= 0 and bad_rate between 0 and 1")
    rng = Random(seed)
    bad_count = round(rows * bad_rate)
    bad = set(rng.sample(range(1, rows + 1), bad_count)) if bad_count else set()
    kinds = dict.fromkeys(BAD_KINDS, 0)
    tag_pool = _tag_pool(rng)
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    folders_t, cards_t = metadata.tables["folders"], metadata.tables["cards"]
    names = [c.name for c in cards_t.columns]
    try:
        with engine.begin() as conn:
            metadata.create_all(conn)
            if folders:
                conn.execute(folders_t.insert(), [
                    {"id": i, "name": n, "parent_id": p} for i, n, p in _folders(rng, folders)
                ])
            for first in range(1, rows + 1, CHUNK):
                last = min(first + CHUNK - 1, rows)
                batch = _cards(rng, first, last, folders, bad, kinds, tag_pool)
                conn.execute(cards_t.insert(), [dict(zip(names, r, strict=True)) for r in batch])
    finally:
        engine.dispose()
    return {"rows": rows, "bad_rows": bad_count, "folders": folders, "path": url,
            "bad_kinds": kinds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m safemigrate.examples.cards.generate",
        description="Build a v2 flashcard SQLite database for the safemigrate example.",
    )
    parser.add_argument("path", metavar="PATH", help="database file to create (must not exist)")
    parser.add_argument("--rows", type=int, default=100_000, help="number of cards (100000)")
    parser.add_argument(
        "--bad-rate", type=float, default=0.0, help="fraction of malformed cards (0.0)"
    )
    parser.add_argument("--seed", type=int, default=42, help="random seed (42)")
    parser.add_argument("--folders", type=int, default=50, help="number of folders (50)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        summary = generate(args.path, args.rows, args.bad_rate, args.seed, args.folders)
    except FileExistsError:
        print(f"error: {args.path} already exists; choose a new path", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - started
    print(
        f"wrote {summary['rows']} cards ({summary['bad_rows']} malformed) in "
        f"{summary['folders']} folders to {summary['path']} in {elapsed:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
