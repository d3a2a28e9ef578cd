"""Backups and checks: safemigrate's verified snapshot against `sqlite3 .backup` + `sha256sum`,
and `safemigrate check` on a million-card database.

    python bench/bench_backup.py [--gb 1.0] [--check-rows 1000000] [--repeat 3] [--out DIR]

1. A v2 card database of about `--gb` GB is generated once (seeded; ~3.1M cards per GB) and kept
   in OUT. Each repetition, interleaved:
   - baseline: `sqlite3 db ".backup x"` then `sha256sum x` (two processes, wall time);
   - safemigrate: `backup.take_snapshot` of every user table (online backup API in one read
     transaction with the source digests, fsync, SHA-256, reopen, integrity check, copy
     digests equal), wall time in this process, with its phases;
   - safemigrate with `compress = "zstd"` once (size and time, for information).
2. `safemigrate check --json` (the console script, sampled: 1000 rows per Backfill) on a
   `--check-rows` card database, wall time of the whole process.

Medians of `--repeat` runs are printed and written to OUT/results.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

import safemigrate.backup as backup
import safemigrate.digest as digest
from safemigrate.backup import BackupSettings, take_snapshot
from safemigrate.dialects import SQLiteDialect
from safemigrate.examples.cards import MIGRATIONS_DIR, generate
from safemigrate.journal import Journal

HERE = Path(__file__).resolve().parent
ROWS_PER_GB = 3_100_000


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"nproc": os.cpu_count(), "python": platform.python_version(),
                            "sqlite": sqlite3.sqlite_version, "platform": platform.platform()}
    with contextlib.suppress(OSError):
        info["loadavg_at_start"] = os.getloadavg()
    return info


def database(path: Path, rows: int) -> Path:
    if not path.exists():
        started = time.perf_counter()
        generate(path, rows=rows, seed=7)
        print(f"generated {rows:,} cards in {path} ({path.stat().st_size / 1e9:.2f} GB) "
              f"in {time.perf_counter() - started:.0f}s", flush=True)
    return path


def baseline(db: Path, work: Path) -> dict[str, float]:
    copy = work / "baseline-copy.db"
    copy.unlink(missing_ok=True)
    started = time.perf_counter()
    subprocess.run(["sqlite3", str(db), f".backup '{copy}'"], check=True)
    copied = time.perf_counter()
    out = subprocess.run(["sha256sum", str(copy)], check=True, capture_output=True, text=True)
    done = time.perf_counter()
    assert len(out.stdout.split()[0]) == 64
    copy.unlink()
    return {"total": done - started, "backup": copied - started, "sha256sum": done - copied}


class Timer:
    """Wall time spent inside a few functions of safemigrate.backup (the snapshot's phases)."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = {}
        self._saved: list[tuple[Any, str, Any]] = []

    def wrap(self, module: Any, name: str, label: str) -> None:
        original = getattr(module, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.spent[label] = self.spent.get(label, 0.0) + time.perf_counter() - started

        self._saved.append((module, name, original))
        setattr(module, name, timed)

    def restore(self) -> None:
        for module, name, original in reversed(self._saved):
            setattr(module, name, original)


def safemigrate_snapshot(db: Path, work: Path, compress: str = "none") -> dict[str, Any]:
    folder = work / f"snapshots-{compress}"
    shutil.rmtree(folder, ignore_errors=True)
    dialect = SQLiteDialect(sa.make_url(f"sqlite:///{db}"))
    journal = Journal(dialect.engine)
    journal.ensure()
    timer = Timer()
    timer.wrap(SQLiteDialect, "snapshot", "copy + source digests (one read transaction)")
    timer.wrap(backup, "verify_snapshot_file", "verify: sha256 | integrity_check | copy digests")
    timer.wrap(backup, "compress_file", "zstd compress")
    timer.wrap(backup, "decompress_file", "zstd round-trip check")
    try:
        started = time.perf_counter()
        snapshot = take_snapshot(dialect, journal, folder, run_id=None, kind="bench", tables=None,
                                 label="bench", config=BackupSettings(compress=compress))
        total = time.perf_counter() - started
    finally:
        timer.restore()
        dialect.dispose()
    result = {"total": total, "size": snapshot.size, "phases": timer.spent,
              "tables": {t: d["rows"] for t, d in snapshot.digests.items()}}
    shutil.rmtree(folder, ignore_errors=True)
    return result


def digest_alone(db: Path) -> float:
    """One Python digest pass over the database (what the copy is proven with)."""
    engine = sa.create_engine(f"sqlite:///{db}", poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            started = time.perf_counter()
            digest.database_digest(conn, ["cards", "folders"])
            return time.perf_counter() - started
    finally:
        engine.dispose()


def check_cli(db: Path, work: Path) -> dict[str, Any]:
    exe = Path(sys.executable).parent / "safemigrate"
    env = {k: v for k, v in os.environ.items() if k != "SAFEMIGRATE_DB"}
    started = time.perf_counter()
    proc = subprocess.run([str(exe), "check", "--json", "--db", str(db), "-m", str(MIGRATIONS_DIR),
                           "--backup-dir", str(work / "check-backups")],
                          capture_output=True, text=True, env=env, cwd=work)
    wall = time.perf_counter() - started
    report = json.loads(proc.stdout)
    return {"wall": wall, "exit": proc.returncode, "ready": report["ready"],
            "checks": {c["name"]: round(c["seconds"], 3) for c in report["checks"]}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0, help="size of the snapshot database")
    parser.add_argument("--check-rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "out" / "backup")
    parser.add_argument("--no-zstd", action="store_true", help="skip the compressed snapshot")
    args = parser.parse_args()
    if shutil.which("sqlite3") is None or shutil.which("sha256sum") is None:
        print("error: the baseline needs the sqlite3 and sha256sum programs "
              "(apt-get install sqlite3 coreutils)", file=sys.stderr)
        return 2
    work = args.out.resolve()
    work.mkdir(parents=True, exist_ok=True)
    big = database(work / f"cards-{args.gb:g}gb.db", int(args.gb * ROWS_PER_GB))
    small = database(work / f"cards-{args.check_rows}.db", args.check_rows)
    results: dict[str, Any] = {"machine": machine(), "database_bytes": big.stat().st_size,
                               "baseline": [], "safemigrate": [], "check": []}
    print(f"snapshot + verification of {big.name} ({big.stat().st_size / 1e9:.2f} GB), "
          f"{args.repeat} rounds", flush=True)
    for i in range(args.repeat):
        base = baseline(big, work)
        ours = safemigrate_snapshot(big, work)
        results["baseline"].append(base)
        results["safemigrate"].append(ours)
        print(f"  round {i + 1}: sqlite3 .backup + sha256sum {base['total']:.1f}s "
              f"(backup {base['backup']:.1f}s, sha256sum {base['sha256sum']:.1f}s); "
              f"safemigrate {ours['total']:.1f}s "
              + ", ".join(f"{k} {v:.1f}s" for k, v in ours["phases"].items()), flush=True)
    results["digest_pass"] = digest_alone(big)
    if not args.no_zstd:
        results["safemigrate_zstd"] = safemigrate_snapshot(big, work, "zstd")
    for i in range(args.repeat):
        run = check_cli(small, work)
        results["check"].append(run)
        print(f"  check round {i + 1}: {run['wall']:.2f}s exit {run['exit']} "
              f"(slowest: {max(run['checks'].items(), key=lambda kv: kv[1])})", flush=True)
    base_median = statistics.median(r["total"] for r in results["baseline"])
    ours_median = statistics.median(r["total"] for r in results["safemigrate"])
    check_median = statistics.median(r["wall"] for r in results["check"])
    results["summary"] = {"baseline_median_s": base_median, "safemigrate_median_s": ours_median,
                          "ratio": ours_median / base_median, "check_median_s": check_median,
                          "digest_pass_s": results["digest_pass"]}
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nmedian: sqlite3 .backup + sha256sum {base_median:.1f}s, safemigrate snapshot + "
          f"verification {ours_median:.1f}s ({ours_median / base_median:.1f}x); one Python digest "
          f"pass {results['digest_pass']:.1f}s")
    if "safemigrate_zstd" in results:
        z = results["safemigrate_zstd"]
        print(f"zstd: {z['total']:.1f}s, {z['size'] / 1e6:.0f} MB stored "
              f"({z['size'] / big.stat().st_size:.0%} of the database)")
    print(f"check on {args.check_rows:,} cards: median {check_median:.2f}s (target < 5s)")
    print(f"results: {work / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
