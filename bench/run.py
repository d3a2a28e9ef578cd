"""The core benchmark: a safe `safemigrate run` against the naive script, on the card example.

    python bench/run.py [--rows 1000000] [--repeat 3] [--workers N] [--out bench/out]

The v2 card database is generated once (seeded). For each repetition it is copied (not timed)
to two fresh files, then the naive script (bench/naive_cards.py) and the safe CLI run
(`safemigrate run --json`, backup + verification + transformation + validation) are measured
one after the other, interleaved (naive, safe, naive, safe, ...), each as its own subprocess:
wall time, and peak memory of the parent, of each worker process, and of the whole tree. The
safe run's phases are timed from its JSON event lines. Both results are checked to hold the
same v3 columns (not timed). Finally one safe run with --workers 1 gives the scaling figure.

The source tree under test is frozen first: src/safemigrate (the working tree, or a git
revision with --rev) is copied to OUT/src and every subprocess runs with PYTHONPATH pointing
there, so edits made to src/ while the benchmark runs cannot change what later repetitions
measure.

Prints a table and the medians; writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

from measure import MB, Measurement, gnu_time_available, measure

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NAIVE = HERE / "naive_cards.py"
V3_COLUMNS = ("search_terms", "content_hash", "image_count", "tag_count", "has_images", "style_type")
PHASES = ("preparation", "structure", "transformation", "validation", "cleanup")
SAFE_CLI = "import sys; from safemigrate.cli import main; sys.exit(main())"


class Frozen:
    """A private copy of src/safemigrate, and how to run Python against it."""

    def __init__(self, out: Path, rev: str | None) -> None:
        self.src = out / "src"
        shutil.rmtree(self.src, ignore_errors=True)
        self.src.mkdir(parents=True)
        self.rev = rev
        if rev is None:
            shutil.copytree(ROOT / "src" / "safemigrate", self.src / "safemigrate",
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            archive = subprocess.run(["git", "archive", "--format=tar", rev, "src/safemigrate"],
                                     cwd=ROOT, capture_output=True, check=True).stdout
            tmp = out / "src-archive.tar"
            tmp.write_bytes(archive)
            with tarfile.open(tmp) as tar:
                tar.extractall(out / "src-rev", filter="data")
            tmp.unlink()
            shutil.move(out / "src-rev" / "src" / "safemigrate", self.src / "safemigrate")
            shutil.rmtree(out / "src-rev")
        self.migrations = self.src / "safemigrate" / "examples" / "cards" / "migrations"
        digest = hashlib.sha256()
        for path in sorted((self.src / "safemigrate").rglob("*.py")):
            digest.update(str(path.relative_to(self.src)).encode() + b"\0" + path.read_bytes())
        self.tree_sha256 = digest.hexdigest()
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(
            [str(self.src), *filter(None, [os.environ.get("PYTHONPATH")])])
        self.env["PYTHONDONTWRITEBYTECODE"] = "1"
        where = subprocess.run([sys.executable, "-c", "import safemigrate; print(safemigrate.__file__)"],
                               env=self.env, capture_output=True, text=True, check=True).stdout.strip()
        if not Path(where).resolve().is_relative_to(self.src.resolve()):
            raise SystemExit(f"the frozen copy is not the one imported ({where})")
        sys.path.insert(0, str(self.src))  # generate() in this process comes from the copy too

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.src), "rev": self.rev or "working tree", "tree_sha256": self.tree_sha256}


# -- helpers ---------------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "sqlite": sqlite3.sqlite_version,
    }
    try:
        info["nproc_cmd"] = subprocess.run(["nproc"], capture_output=True, text=True,
                                           check=False).stdout.strip()
        info["free_h"] = subprocess.run(["free", "-h"], capture_output=True, text=True,
                                        check=False).stdout.rstrip()
    except OSError:
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    with contextlib.suppress(OSError):
        info["loadavg_at_start"] = os.getloadavg()
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=ROOT,
                               capture_output=True, text=True, check=False).stdout.strip()
        info["git_head"] = head
        info["src_dirty"] = bool(dirty)
    except OSError:
        pass
    return info


def v3_digest(path: Path) -> dict[str, Any]:
    """sha256 over the v3 columns in id order, and how many cards got them (not timed)."""
    digest = hashlib.sha256()
    migrated = 0
    conn = sqlite3.connect(path)
    try:
        cols = ", ".join(V3_COLUMNS)
        cursor = conn.execute(f"SELECT id, {cols} FROM cards ORDER BY id")
        while chunk := cursor.fetchmany(10_000):
            digest.update(repr(chunk).encode())
            migrated += sum(1 for row in chunk if row[2] is not None)
        indexes = sorted(r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'cards'"
            " AND name NOT LIKE 'sqlite_%'"))
    finally:
        conn.close()
    return {"sha256": digest.hexdigest(), "migrated": migrated, "indexes": indexes}


def parse_naive(stdout: str) -> dict[str, Any]:
    for line in stdout.splitlines():
        if line.startswith("naive:"):
            fields = dict(item.split("=", 1) for item in line.split()[1:])
            return {k: float(v) if "." in v else int(v) for k, v in fields.items()}
    return {}


def phase_at(ts: float, spans: dict[str, tuple[float, float]]) -> str:
    for phase, (begin, end) in spans.items():
        if begin <= ts <= end:
            return phase
    return "outside the phases (start-up or shut-down)"


def parse_safe(stdout: str, started_at: float, finished_at: float,
               peaks: dict[str, float] | None = None) -> dict[str, Any]:
    """Phase durations, backup time, per-check validation times and rows/s from the JSON lines."""
    events: list[dict[str, Any]] = []
    result: dict[str, Any] = {}
    for line in stdout.splitlines():
        if not line.startswith("{"):
            continue
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if item.get("kind") == "result":
            result = item
        else:
            events.append(item)
    started: dict[str, float] = {}
    phases: dict[str, float] = {}
    first = {}
    for event in events:
        kind, ts = event["kind"], event["ts"]
        first.setdefault(kind, ts)
        if kind == "phase.started":
            started[event["data"]["phase"]] = ts
        elif kind == "phase.completed":
            phase = event["data"]["phase"]
            phases[phase] = ts - started[phase]
    spans = {p: (started[p], started[p] + d) for p, d in phases.items()}
    out: dict[str, Any] = {"phases": phases, "events": len(events)}
    for name, ts in (peaks or {}).items():
        if ts:
            out[f"{name}_in_phase"] = phase_at(ts, spans)
    if events:
        out["startup"] = events[0]["ts"] - started_at  # interpreter, imports, journal, lock
        out["teardown"] = finished_at - events[-1]["ts"]
    if "backup.started" in first and "backup.verified" in first:
        out["backup"] = first["backup.verified"] - first["backup.started"]
        if "preparation" in started:
            out["pre_backup_checks"] = first["backup.started"] - started["preparation"]
    backfill = [e for e in events if e["kind"] == "step.completed" and "done" in e.get("data", {})]
    backfill_start = [e for e in events if e["kind"] == "step.started" and "total" in e.get("data", {})]
    if backfill and backfill_start:
        out["backfill_rows"] = backfill[-1]["data"]["done"]
        out["quarantined"] = backfill[-1]["data"]["quarantined"]
        out["backfill_seconds"] = backfill[-1]["ts"] - backfill_start[0]["ts"]
    if "transformation" in phases and out.get("backfill_rows"):
        out["transformation_rows_per_s"] = out["backfill_rows"] / phases["transformation"]
    batches = [e for e in events if e["kind"] == "batch"]
    out["batches"] = len(batches)
    if result:
        runs = result.get("runs") or []
        if runs:
            out["run_seconds"] = runs[0].get("seconds")
            out["status"] = runs[0].get("status")
            out["checks"] = {c["name"]: round(c["seconds"], 3) for c in runs[0].get("checks", [])}
            out["checks_failed"] = [c["name"] for c in runs[0].get("checks", []) if not c["passed"]]
    return out


def fmt_mb(value: float | int | None) -> str:
    return "-" if not value else f"{value / MB:,.0f}"


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# -- one measurement --------------------------------------------------------------------------------
def run_naive(db: Path, work: Path, label: str, frozen: Frozen) -> dict[str, Any]:
    m = measure([sys.executable, str(NAIVE), str(db)], cwd=work, stdout_path=work / f"{label}.out",
                env=frozen.env)
    record = _record("naive", label, m)
    record["naive"] = parse_naive(Path(m.stdout_path).read_text())
    return record


def run_safe(db: Path, work: Path, label: str, workers: int, frozen: Frozen) -> dict[str, Any]:
    backups = work / f"{label}-backups"
    argv = [sys.executable, "-c", SAFE_CLI, "run", "--db", str(db), "--migrations", str(frozen.migrations),
            "--backup-dir", str(backups), "--json", "--workers", str(workers)]
    m = measure(argv, cwd=work, stdout_path=work / f"{label}.out", env=frozen.env)
    record = _record("safe", label, m)
    record["workers_requested"] = workers
    record["safe"] = parse_safe(Path(m.stdout_path).read_text(), m.started_at, m.finished_at,
                                {"parent_peak": m.parent_peak_at, "tree_peak": m.tree_peak_at})
    shutil.rmtree(backups, ignore_errors=True)
    return record


def _record(kind: str, label: str, m: Measurement) -> dict[str, Any]:
    record: dict[str, Any] = {"kind": kind, "label": label, **m.as_dict()}
    gnu_max = int(m.gnu_time.get("max_rss_kb", 0)) * 1024
    # Largest single process: kernel ru_maxrss (exact) when GNU time ran, else the sampled HWMs.
    record["largest_process_peak_rss"] = max(gnu_max, m.parent_peak_rss, m.workers_peak_rss)
    if kind == "naive":  # one process: whatever the kernel saw is the parent's peak
        record["parent_peak_rss"] = max(m.parent_peak_rss, gnu_max)
        record["tree_peak_rss_sum"] = max(m.tree_peak_rss_sum, record["parent_peak_rss"])
    if m.returncode != 0:
        print(f"  !! {label} exited {m.returncode}:\n{m.stderr_tail}", file=sys.stderr)
    return record


def describe(record: dict[str, Any]) -> str:
    extra = ""
    if record["kind"] == "safe":
        s = record["safe"]
        phases = " ".join(f"{p[:5]}={s['phases'].get(p, 0):.1f}" for p in PHASES)
        extra = (f" | {phases} | {s.get('transformation_rows_per_s', 0):,.0f} rows/s"
                 f" | peaks: parent in {s.get('parent_peak_in_phase', '?')},"
                 f" tree in {s.get('tree_peak_in_phase', '?')}")
    else:
        n = record["naive"]
        extra = (f" | read={n.get('read', 0):.1f} transform={n.get('transform', 0):.1f}"
                 f" write={n.get('write', 0):.1f} index={n.get('index', 0):.1f}")
    load = record.get("machine", {})
    cpu = (f"  cpu {load.get('own_cpu_seconds', 0):.0f}s, others {load.get('other_load_cores', 0):.1f} cores"
           if load else "")
    return (f"  {record['label']:<14} {record['wall_seconds']:7.1f}s{cpu}"
            f"  parent {fmt_mb(record['parent_peak_rss'])} MB"
            f"  workers {fmt_mb(record['workers_peak_rss'])} MB"
            f"  tree {fmt_mb(record['tree_peak_rss_sum'])} MB"
            f" (pss {fmt_mb(record['tree_peak_pss_sum'])}){extra}")


# -- main ------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="cards in the database (1000000)")
    parser.add_argument("--repeat", type=int, default=3, help="naive/safe pairs to measure (3)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="transform processes of the safe run (CPU count)")
    parser.add_argument("--out", type=Path, default=HERE / "out", help="output folder (bench/out)")
    parser.add_argument("--bad-rate", type=float, default=0.001, help="malformed cards (0.001)")
    parser.add_argument("--seed", type=int, default=42, help="generator seed (42)")
    parser.add_argument("--no-scaling", action="store_true", help="skip the --workers 1 safe run")
    parser.add_argument("--rev", default=None,
                        help="measure this git revision of src/safemigrate (default: the working tree)")
    args = parser.parse_args(argv)
    if args.rows < 1 or args.repeat < 1 or args.workers < 1:
        parser.error("--rows, --repeat and --workers must be positive")

    out: Path = args.out.resolve()
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    frozen = Frozen(out, args.rev)
    from safemigrate.examples.cards import generate  # from the frozen copy

    info = machine_info()
    info["source"] = frozen.describe()
    print(f"source under test: {info['source']['rev']} (git HEAD {info.get('git_head', '?')[:12]},"
          f" src dirty: {info.get('src_dirty')}), frozen in {frozen.src}")
    print(f"machine: {info.get('cpu_model', '?')}, {info['nproc']} CPUs, Python {info['python']},"
          f" SQLite {info['sqlite']}; memory via {'GNU time -v + ' if gnu_time_available() else ''}"
          "psutil sampling")

    base = work / "base.db"
    t0 = time.perf_counter()
    summary = generate(base, args.rows, args.bad_rate, args.seed)
    print(f"generated {summary['rows']:,} cards ({summary['bad_rows']:,} malformed), "
          f"{base.stat().st_size / MB:,.0f} MB, in {time.perf_counter() - t0:.1f}s")

    records: list[dict[str, Any]] = []
    failures = 0
    for rep in range(1, args.repeat + 1):
        dbs = {kind: work / f"{kind}-{rep}.db" for kind in ("naive", "safe")}
        for db in dbs.values():
            shutil.copyfile(base, db)  # the copies are not timed
        pair = [run_naive(dbs["naive"], work, f"naive-{rep}", frozen),
                run_safe(dbs["safe"], work, f"safe-{rep}", args.workers, frozen)]
        digests = {kind: v3_digest(db) for kind, db in dbs.items()}
        same = digests["naive"] == digests["safe"]
        for record in pair:
            record["rep"] = rep
            record["output"] = digests[record["kind"]]
            record["output_matches_other"] = same
            failures += record["returncode"] != 0
            print(describe(record))
        print(f"  rep {rep}: safe/naive = {pair[1]['wall_seconds'] / pair[0]['wall_seconds']:.2f};"
              f" v3 columns identical: {'yes' if same else 'NO'}"
              f" ({digests['safe']['migrated']:,} cards migrated)")
        failures += not same
        records += pair
        # Written after every pair, so an interrupted benchmark still leaves its measurements.
        (out / "results.partial.json").write_text(json.dumps(
            {"args": {k: str(v) for k, v in vars(args).items()}, "machine": info, "runs": records},
            indent=2, default=str))
        for db in dbs.values():
            db.unlink(missing_ok=True)

    scaling = None
    if not args.no_scaling and args.workers != 1:
        db = work / "safe-w1.db"
        shutil.copyfile(base, db)
        scaling = run_safe(db, work, "safe-workers1", 1, frozen)
        scaling["output"] = v3_digest(db)
        failures += scaling["returncode"] != 0
        print(describe(scaling))
        db.unlink(missing_ok=True)

    naive = [r for r in records if r["kind"] == "naive"]
    safe = [r for r in records if r["kind"] == "safe"]
    med_naive = median([r["wall_seconds"] for r in naive])
    med_safe = median([r["wall_seconds"] for r in safe])
    medians: dict[str, Any] = {
        "naive_wall_seconds": med_naive,
        "safe_wall_seconds": med_safe,
        "ratio_safe_over_naive": med_safe / med_naive if med_naive else None,
        "ratio_per_pair": [s["wall_seconds"] / n["wall_seconds"] for n, s in zip(naive, safe, strict=True)],
        "naive_cpu_seconds": median([r["machine"].get("own_cpu_seconds") for r in naive]),
        "safe_cpu_seconds": median([r["machine"].get("own_cpu_seconds") for r in safe]),
        "other_load_cores_naive": median([r["machine"].get("other_load_cores") for r in naive]),
        "other_load_cores_safe": median([r["machine"].get("other_load_cores") for r in safe]),
        "naive_peak_rss": median([r["parent_peak_rss"] for r in naive]),
        "safe_parent_peak_rss": median([r["parent_peak_rss"] for r in safe]),
        "safe_worker_peak_rss": median([r["workers_peak_rss"] for r in safe]),
        "safe_largest_process_peak_rss": median([r["largest_process_peak_rss"] for r in safe]),
        "safe_tree_peak_rss_sum": median([r["tree_peak_rss_sum"] for r in safe]),
        "safe_tree_peak_pss_sum": median([r["tree_peak_pss_sum"] for r in safe]),
        "safe_phases": {p: median([r["safe"]["phases"].get(p) for r in safe]) for p in PHASES},
        "safe_backup_seconds": median([r["safe"].get("backup") for r in safe]),
        "safe_startup_seconds": median([r["safe"].get("startup") for r in safe]),
        "safe_checks": {name: median([r["safe"].get("checks", {}).get(name) for r in safe])
                        for name in (safe[0]["safe"].get("checks") or {})},
        "transformation_rows_per_s": median([r["safe"].get("transformation_rows_per_s") for r in safe]),
        "naive_phases": {k: median([r["naive"].get(k) for r in naive])
                         for k in ("read", "transform", "write", "index", "total")},
        "naive_transform_rows_per_s": median([
            r["naive"]["rows"] / r["naive"]["transform"] for r in naive if r["naive"].get("transform")]),
    }
    ratio = medians["ratio_safe_over_naive"]
    targets = {
        "ratio_le_1": ratio is not None and ratio <= 1.0,
        "safe_tree_rss_under_200mb": medians["safe_tree_peak_rss_sum"] < 200 * MB,
        "safe_largest_process_under_200mb": medians["safe_largest_process_peak_rss"] < 200 * MB,
    }

    print()
    print(f"{'':16}{'median wall':>12}{'peak RSS':>12}")
    print(f"{'naive':16}{med_naive:11.1f}s{fmt_mb(medians['naive_peak_rss']):>9} MB")
    print(f"{'safe':16}{med_safe:11.1f}s{fmt_mb(medians['safe_tree_peak_rss_sum']):>9} MB (tree RSS sum;"
          f" parent {fmt_mb(medians['safe_parent_peak_rss'])} MB,"
          f" largest worker {fmt_mb(medians['safe_worker_peak_rss'])} MB,"
          f" tree PSS {fmt_mb(medians['safe_tree_peak_pss_sum'])} MB)")
    print(f"ratio safe/naive (medians): {medians['ratio_safe_over_naive']:.2f}"
          f"  per pair: {', '.join(f'{r:.2f}' for r in medians['ratio_per_pair'])}")
    print(f"CPU seconds (median): naive {medians['naive_cpu_seconds'] or 0:.0f}, safe"
          f" {medians['safe_cpu_seconds'] or 0:.0f}; other processes on the machine used"
          f" {medians['other_load_cores_naive'] or 0:.2f} / {medians['other_load_cores_safe'] or 0:.2f}"
          " cores during the naive / safe runs")
    phases = medians["safe_phases"]
    shown = ", ".join(f"{p} {phases[p]:.1f}" for p in PHASES if phases[p] is not None)
    print(f"safe phases (median s): {shown}; of which backup {medians['safe_backup_seconds'] or 0:.1f}")
    print(f"transformation phase: {medians['transformation_rows_per_s']:,.0f} rows/s"
          f" (naive transform loop alone: {medians['naive_transform_rows_per_s']:,.0f} rows/s)")
    if scaling is not None:
        s1 = scaling["safe"].get("transformation_rows_per_s") or 0
        speedup = (medians["transformation_rows_per_s"] or 0) / s1 if s1 else 0
        print(f"--workers 1: wall {scaling['wall_seconds']:.1f}s, transformation {s1:,.0f} rows/s"
              f" (x{speedup:.2f} with {args.workers} workers)")
    print("targets: " + ", ".join(f"{k}={'met' if v else 'NOT met'}" for k, v in targets.items()))

    results = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": info,
        "database": {k: v for k, v in summary.items() if k != "path"} | {"size_bytes": base.stat().st_size},
        "runs": records,
        "scaling_workers1": scaling,
        "medians": medians,
        "targets": targets,
        "finished_at": time.time(),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "results.partial.json").unlink(missing_ok=True)
    print(f"wrote {out / 'results.json'}")
    base.unlink(missing_ok=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
