"""Where the safe run spends its time: cProfile of `safemigrate run` plus a per-row cost split.

    python bench/profile_safe.py [--rows 100000] [--workers N] [--out bench/out]

1. Generates a card database (seeded), runs the CLI `safemigrate run --json` under cProfile in
   this process (the parent only: worker processes are not profiled) and prints the top functions
   by own time and the cumulative time of the calls that matter. The profile is written to
   OUT/profile-safe.prof (open it with `python -m pstats` or snakeviz).
2. Times, in-process and without a profiler, the pieces of the per-row work on the same cards:
   optimize_card alone, validate_card alone, and the engine's transform_rows (both plus the
   engine's bookkeeping), and the parent-side cost of the write path for one batch (SQLAlchemy
   executemany with dict parameters versus the DBAPI executemany with tuples).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import shutil
import sqlite3
import sys
import time
from pathlib import Path

import sqlalchemy as sa

from safemigrate.engine import transform_rows
from safemigrate.examples.cards import MIGRATIONS_DIR, generate
from safemigrate.examples.cards.transform import optimize_card, validate_card
from safemigrate.migration import discover

HERE = Path(__file__).resolve().parent
FOCUS = (
    "runner.py:.*_phase_", "engine.py:.*(run|_write|_read_batches|_pooled)", "validate.py:.*check",
    "digest.py:.*table_digest", "backup.py:.*(take_snapshot|verify_snapshot_file|sha256_file)",
    "construct_params", "validate_card", "integrity_check", "'commit'", "executemany", "acquire",
)


def profile_run(db: Path, workers: int, out: Path) -> None:
    from safemigrate.cli import main as cli

    argv = ["run", "--db", str(db), "--migrations", str(MIGRATIONS_DIR), "--backup-dir",
            str(out / "profile-backups"), "--json", "--workers", str(workers)]
    profiler = cProfile.Profile()
    sink = io.StringIO()
    stdout, sys.stdout = sys.stdout, sink
    started = time.perf_counter()
    try:
        profiler.runcall(cli.main, argv, standalone_mode=False)
    finally:
        sys.stdout = stdout
    wall = time.perf_counter() - started
    path = out / "profile-safe.prof"
    profiler.dump_stats(path)
    shutil.rmtree(out / "profile-backups", ignore_errors=True)
    print(f"profiled safe run (workers={workers}): {wall:.1f}s wall under cProfile; {path}")
    stats = pstats.Stats(str(path))
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats("|".join(FOCUS))


def per_row_costs(db: Path, sample: int) -> None:
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT id, front_content, back_content, style FROM cards ORDER BY id"
                        " LIMIT ?", (sample,)).fetchall()
    conn.close()
    cards = [{"id": r[0], "front_content": r[1], "back_content": r[2], "style": r[3]} for r in rows]
    news = []
    t0 = time.perf_counter()
    for card in cards:
        try:
            news.append(optimize_card(card))
        except ValueError:
            news.append(None)
    t1 = time.perf_counter()
    for card, new in zip(cards, news, strict=True):
        if new is not None:
            validate_card(card, new)
    t2 = time.perf_counter()
    migration = discover(MIGRATIONS_DIR)[0]
    step_idx, step = next((i, s) for i, s in enumerate(migration.steps) if hasattr(s, "transform"))
    names = ["id", "front_content", "back_content", "style"]
    t3 = time.perf_counter()
    ok, bad = transform_rows(step, names, 1, rows)
    t4 = time.perf_counter()
    n = len(rows)
    print(f"\nper-row cost over {n:,} cards (in-process, no profiler):")
    print(f"  optimize_card          {(t1 - t0) / n * 1e6:6.1f} us/row")
    print(f"  validate_card          {(t2 - t1) / n * 1e6:6.1f} us/row")
    print(f"  engine transform_rows  {(t4 - t3) / n * 1e6:6.1f} us/row (both + bookkeeping)")

    # The parent's write path for one 2000-row batch, on a scratch copy.
    scratch = db.with_name("profile-write.db")
    shutil.copyfile(db, scratch)
    engine = sa.create_engine(f"sqlite:///{scratch}", poolclass=sa.pool.NullPool)
    with engine.begin() as c:
        for col, type_ in (("search_terms", "TEXT"), ("content_hash", "TEXT"), ("image_count", "INTEGER"),
                           ("tag_count", "INTEGER"), ("has_images", "INTEGER"), ("style_type", "TEXT")):
            c.exec_driver_sql(f"ALTER TABLE cards ADD COLUMN {col} {type_}")
    table = sa.Table("cards", sa.MetaData(), autoload_with=engine)
    batch = ok[:2000]
    update = sa.update(table).where(table.c.id == sa.bindparam("_k0")).values(
        {w: sa.bindparam(f"_w_{w}") for w in step.writes})
    repeats = 10
    t0 = time.perf_counter()
    for _ in range(repeats):
        params = []
        for key, new in batch:
            item = {f"_k{i}": v for i, v in enumerate(key)}
            item.update({f"_w_{w}": v for w, v in new.items()})
            params.append(item)
        with engine.begin() as c:
            c.execute(update, params)
    t1 = time.perf_counter()
    sql = ("UPDATE cards SET " + ", ".join(f"{w} = ?" for w in step.writes) + " WHERE id = ?")
    for _ in range(repeats):
        tuples = [(*(new[w] for w in step.writes), *key) for key, new in batch]
        with engine.begin() as c:
            c.exec_driver_sql(sql, tuples)
    t2 = time.perf_counter()
    engine.dispose()
    scratch.unlink(missing_ok=True)
    per = len(batch) * repeats
    print(f"\nwrite path, {len(batch)}-row batch x{repeats} (build params + executemany + commit):")
    print(f"  SQLAlchemy Core update, dict params (engine._write)  {(t1 - t0) / per * 1e6:6.1f} us/row")
    print(f"  exec_driver_sql, tuple params                         {(t2 - t1) / per * 1e6:6.1f} us/row")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--bad-rate", type=float, default=0.001)
    parser.add_argument("--sample", type=int, default=20_000, help="cards for the per-row split")
    parser.add_argument("--out", type=Path, default=HERE / "out")
    args = parser.parse_args(argv)
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = out / "profile-base.db"
    db = out / "profile-run.db"
    base.unlink(missing_ok=True)
    db.unlink(missing_ok=True)
    generate(base, args.rows, args.bad_rate, 42)
    shutil.copyfile(base, db)
    try:
        profile_run(db, args.workers, out)
        per_row_costs(base, min(args.sample, args.rows))
    finally:
        base.unlink(missing_ok=True)
        db.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
