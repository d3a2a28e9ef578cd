"""Issue 6 on PostgreSQL: the safe `safemigrate run` against a naive psycopg script, worker scaling,
and safemigrate's verified snapshot against plain `pg_dump -Fc`, on the card example.

    python bench/run_pg.py [--rows 1000000] [--repeat 3] [--workers N] [--url postgresql://...]

1. A template database is created once and filled with the generated v2 cards (seeded,
   `generate_into`), then VACUUM ANALYZEd.
2. Pairs, interleaved (naive, safe, naive, safe, ...): for each repetition the template is cloned
   twice with `CREATE DATABASE x TEMPLATE tpl` (not timed); bench/naive_cards_pg.py runs on one,
   `safemigrate run --db URL --migrations <cards> --backup-dir <tmp> --json --workers N` on the
   other, each its own subprocess measured by measure.py (wall, CPU-seconds of the process tree,
   memory, machine load). Phases come from the JSON events. The v3 columns of both clones are
   then hashed in id order (not timed) and must be identical.
3. Scaling: one safe run with `--workers 1` and one with `--workers 2`, back to back.
4. Snapshot: per round a fresh clone; `pg_dump -Fc -t cards -t folders` and safemigrate's
   `backup.take_snapshot(tables=["cards", "folders"])` (dump on an exported snapshot + source
   digests, then restore into a scratch database + copy digests + sha256), each its own
   subprocess, order alternating per round.
5. `--profile`: one extra safe run of the parent under cProfile (workers are not profiled).

Every database created here is named `bench_pg_<pid>_*` and dropped at the end (also on error).
The source under test is frozen in OUT/src first, as in bench/run.py. Writes OUT/pg-results.json.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
from measure import MB, measure
from run import Frozen, _record, machine_info, median, parse_naive, parse_safe

HERE = Path(__file__).resolve().parent
NAIVE = HERE / "naive_cards_pg.py"
V3_COLUMNS = ("search_terms", "content_hash", "image_count", "tag_count", "has_images", "style_type")
PHASES = ("preparation", "structure", "transformation", "validation", "cleanup")
SNAPSHOT_TABLES = ("cards", "folders")
SAFE_CLI = "import sys; from safemigrate.cli import main; sys.exit(main())"

SNAPSHOT_CHILD = r"""
import json, sys, time
from pathlib import Path
import sqlalchemy as sa
import safemigrate.backup as backup
from safemigrate.backup import BackupSettings, take_snapshot
from safemigrate.dialects import dialect_for
from safemigrate.journal import Journal

url, folder = sys.argv[1], Path(sys.argv[2])
spent = {}
def wrap(owner, name, label):
    original = getattr(owner, name)
    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            spent[label] = spent.get(label, 0.0) + time.perf_counter() - t
    setattr(owner, name, timed)
dialect = dialect_for(sa.make_url(url))
wrap(type(dialect), "snapshot", "dump + source digests (one snapshot transaction)")
wrap(backup, "verify_snapshot_file", "verify: restore to scratch db + copy digests | sha256")
journal = Journal(dialect.engine)
journal.ensure()
t0 = time.perf_counter()
snap = take_snapshot(dialect, journal, folder, run_id=None, kind="bench", tables=TABLES,
                     label="bench", config=BackupSettings(compress="none"))
total = time.perf_counter() - t0
dialect.dispose()
print(json.dumps({"total": total, "phases": spent, "size": snap.size,
                  "rows": {t: d["rows"] for t, d in snap.digests.items()}}))
""".replace("TABLES", repr(list(SNAPSHOT_TABLES)))


class Server:
    """The PostgreSQL server: admin connection, databases named with this run's prefix."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.prefix = f"bench_pg_{os.getpid()}_"
        self.created: list[str] = []

    def db_url(self, name: str) -> str:
        return f"{self.url}/{name}"

    def admin(self, sql: str) -> None:
        with psycopg.connect(self.db_url("postgres"), autocommit=True) as conn:
            conn.execute(sql)

    def create(self, suffix: str, template: str | None = None) -> str:
        name = self.prefix + suffix
        self.admin(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
        self.created.append(name)
        return name

    def drop(self, name: str) -> None:
        self.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        with contextlib.suppress(ValueError):
            self.created.remove(name)

    def drop_all(self) -> None:
        with psycopg.connect(self.db_url("postgres"), autocommit=True) as conn:
            names = [r[0] for r in conn.execute(
                "SELECT datname FROM pg_database WHERE starts_with(datname, %s)", (self.prefix,))]
        for name in set(names) | set(self.created):
            self.drop(name)

    def size(self, name: str) -> int:
        with psycopg.connect(self.db_url("postgres")) as conn:
            return int(conn.execute("SELECT pg_database_size(%s)", (name,)).fetchone()[0])

    def settings(self) -> dict[str, str]:
        keys = ("server_version", "shared_buffers", "work_mem", "maintenance_work_mem",
                "synchronous_commit", "fsync", "wal_level", "max_wal_size", "checkpoint_timeout")
        with psycopg.connect(self.db_url("postgres")) as conn:
            return {k: conn.execute(f"SHOW {k}").fetchone()[0] for k in keys}


def v3_digest(url: str) -> dict[str, Any]:
    """sha256 over the v3 columns in id order, how many cards got them, the cards indexes."""
    digest = hashlib.sha256()
    migrated = 0
    with psycopg.connect(url) as conn:
        with conn.cursor(name="v3") as cur:
            cur.itersize = 20_000
            cur.execute(f"SELECT id, {', '.join(V3_COLUMNS)} FROM cards ORDER BY id")
            while chunk := cur.fetchmany(20_000):
                digest.update(repr(chunk).encode())
                migrated += sum(1 for row in chunk if row[2] is not None)
        indexes = sorted(r[0] for r in conn.execute(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'cards'"))
    return {"sha256": digest.hexdigest(), "migrated": migrated, "indexes": indexes}




def run_naive(url: str, work: Path, label: str, frozen: Frozen) -> dict[str, Any]:
    m = measure([sys.executable, str(NAIVE), url], cwd=work, stdout_path=work / f"{label}.out",
                env=frozen.env)
    record = _record("naive", label, m)
    record["naive"] = parse_naive(Path(m.stdout_path).read_text())
    return record


def safe_argv(url: str, work: Path, label: str, workers: int, frozen: Frozen) -> list[str]:
    return ["run", "--db", url, "--migrations", str(frozen.migrations),
            "--backup-dir", str(work / f"{label}-backups"), "--json", "--workers", str(workers)]


def run_safe(url: str, work: Path, label: str, workers: int, frozen: Frozen) -> dict[str, Any]:
    argv = [sys.executable, "-c", SAFE_CLI, *safe_argv(url, work, label, workers, frozen)]
    m = measure(argv, cwd=work, stdout_path=work / f"{label}.out", env=frozen.env)
    record = _record("safe", label, m)
    record["workers_requested"] = workers
    record["safe"] = parse_safe(Path(m.stdout_path).read_text(), m.started_at, m.finished_at,
                                {"parent_peak": m.parent_peak_at, "tree_peak": m.tree_peak_at})
    shutil.rmtree(work / f"{label}-backups", ignore_errors=True)
    return record


def run_pg_dump(server: Server, db: str, work: Path, label: str) -> dict[str, Any]:
    dest = work / f"{label}.dump"
    argv = ["pg_dump", "-Fc", "-t", "cards", "-t", "folders", "-f", str(dest), server.db_url(db)]
    m = measure(argv, cwd=work, stdout_path=work / f"{label}.out")
    out = {"label": label, "wall_seconds": m.wall_seconds, "returncode": m.returncode,
           "cpu_seconds": m.machine.get("own_cpu_seconds"),
           "other_load_cores": m.machine.get("other_load_cores"),
           "size": dest.stat().st_size if dest.exists() else 0}
    if m.returncode:
        print(f"  !! pg_dump exited {m.returncode}: {m.stderr_tail}", file=sys.stderr)
    dest.unlink(missing_ok=True)
    return out


def run_snapshot(server: Server, db: str, work: Path, label: str, frozen: Frozen) -> dict[str, Any]:
    folder = work / f"{label}-snapshots"
    argv = [sys.executable, "-c", SNAPSHOT_CHILD, server.db_url(db), str(folder)]
    m = measure(argv, cwd=work, stdout_path=work / f"{label}.out", env=frozen.env)
    out: dict[str, Any] = {"label": label, "wall_seconds": m.wall_seconds, "returncode": m.returncode,
                           "cpu_seconds": m.machine.get("own_cpu_seconds"),
                           "other_load_cores": m.machine.get("other_load_cores")}
    lines = [ln for ln in Path(m.stdout_path).read_text().splitlines() if ln.startswith("{")]
    if lines:
        out.update(json.loads(lines[-1]))
    if m.returncode:
        print(f"  !! snapshot exited {m.returncode}: {m.stderr_tail}", file=sys.stderr)
    shutil.rmtree(folder, ignore_errors=True)
    return out


def run_profile(url: str, work: Path, frozen: Frozen, workers: int) -> dict[str, Any]:
    script = work / "safe_cli.py"
    script.write_text(SAFE_CLI.replace("; ", "\n") + "\n")
    prof = work.parent / "pg-profile-safe.prof"
    argv = [sys.executable, "-m", "cProfile", "-o", str(prof), str(script),
            *safe_argv(url, work, "profile", workers, frozen)]
    m = measure(argv, cwd=work, stdout_path=work / "profile.out", env=frozen.env)
    shutil.rmtree(work / "profile-backups", ignore_errors=True)
    return {"wall_seconds": m.wall_seconds, "returncode": m.returncode, "profile": str(prof),
            "cpu_seconds": m.machine.get("own_cpu_seconds"),
            "safe": parse_safe(Path(m.stdout_path).read_text(), m.started_at, m.finished_at)}


def line(record: dict[str, Any]) -> str:
    mach = record.get("machine", {})
    head = (f"  {record['label']:<12} {record['wall_seconds']:7.1f}s"
            f"  cpu {mach.get('own_cpu_seconds', 0):5.1f}s"
            f"  others {mach.get('other_load_cores', 0):.1f} cores"
            f"  parent {record['parent_peak_rss'] / MB:,.0f} MiB"
            f"  tree {record['tree_peak_rss_sum'] / MB:,.0f} MiB")
    if record["kind"] == "safe":
        s = record["safe"]
        phases = " ".join(f"{p[:5]}={s['phases'].get(p, 0):.1f}" for p in PHASES)
        return f"{head} | {phases} | {s.get('transformation_rows_per_s', 0):,.0f} rows/s"
    n = record["naive"]
    return (f"{head} | read={n.get('read', 0):.1f} transform={n.get('transform', 0):.1f}"
            f" write={n.get('write', 0):.1f} index={n.get('index', 0):.1f}")


def cpu_split(record: dict[str, Any]) -> dict[str, float]:
    """CPU-seconds of the parent and of the workers (sampled per process)."""
    parent = record.get("gnu_time", {})
    workers = sum(w["cpu_seconds"] for w in record.get("workers", []))
    total = record["machine"].get("own_cpu_seconds", 0.0)
    return {"total": total, "workers": workers, "parent": total - workers,
            "gnu_user": parent.get("user_seconds", 0.0)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="cards (1000000)")
    parser.add_argument("--repeat", type=int, default=3, help="naive/safe pairs and snapshot rounds (3)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="transform processes of the paired safe runs (CPU count)")
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432",
                        help="server URL without a database name")
    parser.add_argument("--out", type=Path, default=HERE / "out", help="output folder (bench/out)")
    parser.add_argument("--bad-rate", type=float, default=0.001, help="malformed cards (0.001)")
    parser.add_argument("--seed", type=int, default=42, help="generator seed (42)")
    parser.add_argument("--no-scaling", action="store_true", help="skip the --workers 1 / 2 runs")
    parser.add_argument("--no-snapshot", action="store_true", help="skip the snapshot comparison")
    parser.add_argument("--profile", action="store_true", help="one extra safe run under cProfile")
    parser.add_argument("--rev", default=None, help="measure this git revision of src/safemigrate")
    args = parser.parse_args(argv)
    if shutil.which("pg_dump") is None:
        parser.error("pg_dump is not on PATH")

    out: Path = args.out.resolve()
    work = out / "pg-work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    frozen = Frozen(out / "pg", args.rev)  # not OUT/src: bench/run.py freezes its copy there
    from safemigrate.examples.cards.generate import generate_into  # from the frozen copy

    server = Server(args.url)
    info = machine_info()
    info["source"] = frozen.describe()
    info["postgres"] = server.settings()
    info["pg_dump"] = subprocess.run(["pg_dump", "--version"], capture_output=True, text=True).stdout.strip()
    print(f"source: {info['source']['rev']} (HEAD {info.get('git_head', '?')[:12]}, src dirty:"
          f" {info.get('src_dirty')}); {info['nproc']} CPUs; PostgreSQL {info['postgres']['server_version']};"
          f" load {info.get('loadavg_at_start')}", flush=True)
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": info}
    records: list[dict[str, Any]] = []
    failures = 0
    started = time.perf_counter()
    try:
        tpl = server.create("tpl")
        t0 = time.perf_counter()
        summary = generate_into(server.db_url(tpl), args.rows, args.bad_rate, args.seed)
        server.admin("SELECT 1")
        with psycopg.connect(server.db_url(tpl), autocommit=True) as conn:
            conn.execute("VACUUM (ANALYZE) cards")
            conn.execute("VACUUM (ANALYZE) folders")
        results["database"] = {k: v for k, v in summary.items() if k != "path"} | {
            "size_bytes": server.size(tpl), "generate_seconds": time.perf_counter() - t0}
        print(f"generated {args.rows:,} cards ({summary['bad_rows']:,} malformed) in {tpl},"
              f" {server.size(tpl) / MB:,.0f} MiB, in {time.perf_counter() - t0:.0f}s", flush=True)

        def save(partial: bool = True) -> None:
            name = "pg-results.partial.json" if partial else "pg-results.json"
            (out / name).write_text(json.dumps(results | {"runs": records}, indent=2, default=str))

        for rep in range(1, args.repeat + 1):
            dbs = {kind: server.create(f"{kind}_{rep}", tpl) for kind in ("naive", "safe")}
            pair = [run_naive(server.db_url(dbs["naive"]), work, f"naive-{rep}", frozen),
                    run_safe(server.db_url(dbs["safe"]), work, f"safe-{rep}", args.workers, frozen)]
            digests = {kind: v3_digest(server.db_url(db)) for kind, db in dbs.items()}
            same = digests["naive"]["sha256"] == digests["safe"]["sha256"]
            for record in pair:
                record["rep"] = rep
                record["output"] = digests[record["kind"]]
                record["output_matches_other"] = same
                failures += record["returncode"] != 0
                print(line(record), flush=True)
            print(f"  rep {rep}: safe/naive = {pair[1]['wall_seconds'] / pair[0]['wall_seconds']:.2f};"
                  f" v3 columns identical: {'yes' if same else 'NO'}"
                  f" ({digests['safe']['migrated']:,} migrated; indexes {digests['safe']['indexes']})",
                  flush=True)
            failures += not same
            records.extend(pair)
            for db in dbs.values():
                server.drop(db)
            save()

        scaling: list[dict[str, Any]] = []
        if not args.no_scaling:
            for workers in (1, 2):
                db = server.create(f"scale_w{workers}", tpl)
                record = run_safe(server.db_url(db), work, f"safe-w{workers}", workers, frozen)
                record["output"] = v3_digest(server.db_url(db))
                failures += record["returncode"] != 0
                print(line(record), flush=True)
                scaling.append(record)
                server.drop(db)
            results["scaling"] = scaling
            save()

        snapshots: list[dict[str, Any]] = []
        if not args.no_snapshot:
            for rnd in range(1, args.repeat + 1):
                db = server.create(f"snap_{rnd}", tpl)
                order = ("pg_dump", "safemigrate") if rnd % 2 else ("safemigrate", "pg_dump")
                entry: dict[str, Any] = {"round": rnd, "order": order}
                for who in order:
                    if who == "pg_dump":
                        entry[who] = run_pg_dump(server, db, work, f"pg_dump-{rnd}")
                    else:
                        entry[who] = run_snapshot(server, db, work, f"snapshot-{rnd}", frozen)
                    failures += entry[who]["returncode"] != 0
                server.drop(db)
                d, s = entry["pg_dump"], entry["safemigrate"]
                print(f"  snapshot round {rnd}: pg_dump -Fc {d['wall_seconds']:.1f}s"
                      f" (cpu {d['cpu_seconds']:.1f}s,"
                      f" {d['size'] / MB:,.0f} MiB); safemigrate {s['wall_seconds']:.1f}s"
                      f" (cpu {s['cpu_seconds']:.1f}s) "
                      + ", ".join(f"{k} {v:.1f}s" for k, v in s.get("phases", {}).items()), flush=True)
                snapshots.append(entry)
            results["snapshots"] = snapshots
            save()

        if args.profile:
            db = server.create("profile", tpl)
            results["profile"] = run_profile(server.db_url(db), work, frozen, args.workers)
            server.drop(db)
            print(f"  profile: {results['profile']}", flush=True)
    finally:
        server.drop_all()

    naive = [r for r in records if r["kind"] == "naive"]
    safe = [r for r in records if r["kind"] == "safe"]
    med_naive = median([r["wall_seconds"] for r in naive])
    med_safe = median([r["wall_seconds"] for r in safe])
    splits = [cpu_split(r) for r in safe]
    medians: dict[str, Any] = {
        "naive_wall_seconds": med_naive,
        "safe_wall_seconds": med_safe,
        "ratio_safe_over_naive": med_safe / med_naive if med_naive else None,
        "ratio_per_pair": [s["wall_seconds"] / n["wall_seconds"] for n, s in zip(naive, safe, strict=True)],
        "naive_cpu_seconds": median([r["machine"].get("own_cpu_seconds") for r in naive]),
        "safe_cpu_seconds": median([s["total"] for s in splits]),
        "safe_parent_cpu_seconds": median([s["parent"] for s in splits]),
        "safe_workers_cpu_seconds": median([s["workers"] for s in splits]),
        "other_load_cores_naive": median([r["machine"].get("other_load_cores") for r in naive]),
        "other_load_cores_safe": median([r["machine"].get("other_load_cores") for r in safe]),
        "naive_peak_rss": median([r["parent_peak_rss"] for r in naive]),
        "safe_parent_peak_rss": median([r["parent_peak_rss"] for r in safe]),
        "safe_tree_peak_rss_sum": median([r["tree_peak_rss_sum"] for r in safe]),
        "safe_phases": {p: median([r["safe"]["phases"].get(p) for r in safe]) for p in PHASES},
        "safe_backup_seconds": median([r["safe"].get("backup") for r in safe]),
        "safe_pre_backup_checks_seconds": median([r["safe"].get("pre_backup_checks") for r in safe]),
        "safe_startup_seconds": median([r["safe"].get("startup") for r in safe]),
        "safe_checks": {name: median([r["safe"].get("checks", {}).get(name) for r in safe])
                        for name in ((safe[0]["safe"].get("checks") or {}) if safe else {})},
        "transformation_rows_per_s": median([r["safe"].get("transformation_rows_per_s") for r in safe]),
        "naive_phases": {k: median([r["naive"].get(k) for r in naive])
                         for k in ("read", "transform", "write", "index", "total")},
        "naive_transform_rows_per_s": median([
            r["naive"]["rows"] / r["naive"]["transform"] for r in naive if r["naive"].get("transform")]),
    }
    if results.get("scaling"):
        medians["scaling_rows_per_s"] = {
            r["workers_requested"]: r["safe"].get("transformation_rows_per_s") for r in results["scaling"]}
        medians["scaling_cpu"] = {r["workers_requested"]: cpu_split(r) for r in results["scaling"]}
    if results.get("snapshots"):
        snaps = results["snapshots"]
        dump = statistics.median(e["pg_dump"]["wall_seconds"] for e in snaps)
        ours = statistics.median(e["safemigrate"]["wall_seconds"] for e in snaps)
        medians["snapshot"] = {
            "pg_dump_wall_seconds": dump, "safemigrate_wall_seconds": ours, "ratio": ours / dump,
            "ratio_in_process": statistics.median(e["safemigrate"].get("total", 0) for e in snaps) / dump,
            "pg_dump_cpu_seconds": median([e["pg_dump"]["cpu_seconds"] for e in snaps]),
            "safemigrate_cpu_seconds": median([e["safemigrate"]["cpu_seconds"] for e in snaps]),
            "safemigrate_phases": {k: median([e["safemigrate"].get("phases", {}).get(k) for e in snaps])
                                   for k in snaps[0]["safemigrate"].get("phases", {})},
        }
    results["medians"] = medians
    results["wall_seconds_total"] = time.perf_counter() - started
    results["finished_at"] = time.time()
    (out / "pg-results.json").write_text(json.dumps(results | {"runs": records}, indent=2, default=str))
    (out / "pg-results.partial.json").unlink(missing_ok=True)

    print()
    if med_naive and med_safe:
        print(f"median wall: naive {med_naive:.1f}s, safe {med_safe:.1f}s,"
              f" ratio {medians['ratio_safe_over_naive']:.2f}"
              f" (per pair {', '.join(f'{r:.2f}' for r in medians['ratio_per_pair'])})")
        print(f"CPU-s: naive {medians['naive_cpu_seconds']:.1f}, safe {medians['safe_cpu_seconds']:.1f}"
              f" (parent {medians['safe_parent_cpu_seconds']:.1f},"
              f" workers {medians['safe_workers_cpu_seconds']:.1f}); other load"
              f" {medians['other_load_cores_naive']:.2f} / {medians['other_load_cores_safe']:.2f} cores")
        print("safe phases: " + ", ".join(f"{p} {v:.1f}" for p, v in medians["safe_phases"].items() if v))
        print(f"transformation {medians['transformation_rows_per_s']:,.0f} rows/s; naive loop"
              f" {medians['naive_transform_rows_per_s']:,.0f} rows/s")
    if "scaling_rows_per_s" in medians:
        print("scaling rows/s: "
              + ", ".join(f"w{k}={v:,.0f}" for k, v in medians["scaling_rows_per_s"].items()))
    if "snapshot" in medians:
        s = medians["snapshot"]
        print(f"snapshot: pg_dump {s['pg_dump_wall_seconds']:.1f}s,"
              f" safemigrate {s['safemigrate_wall_seconds']:.1f}s, ratio {s['ratio']:.2f}")
    print(f"wrote {out / 'pg-results.json'} (total {results['wall_seconds_total']:.0f}s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
