"""The backup catalog: `safemigrate backup create|list|verify|restore|prune`, as a library.

Every backup is a row of the journal (`safemigrate_backups`) and a manifest beside its snapshot
file (see `backup.py` for the layers). The CLI is a few lines over these functions.

Pruning rule (`prune_backups`):
- never pruned: the backups of a run that is not completed (running, interrupted, failed,
  rolling back or rolled back): resume, rollback and the audit of a rollback need them. That
  includes every pre-rollback backup (its run is rolled back).
- a completed run's snapshot is what `rollback --strategy restore` needs: `--older-than` alone
  never prunes it; it goes only when `--keep N` counts it out, i.e. it is not among the N newest
  prunable backups (and, with `--older-than` as well, it is also older than that).
- manual and pre-restore backups go when they are not among the N newest (`--keep N`) and/or
  are older than the age (`--older-than 7d`); with both options, both must hold.
A pruned backup's files (snapshot, manifest, off-site copy) are deleted, its journal row is kept
with status "pruned", and the decision is journaled with who made it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from . import offsite
from ._exceptions import BackupError, UsageError
from .backup import (
    BackupSettings,
    Notify,
    Snapshot,
    _discard,
    _fsync_dir,
    backup_settings,
    journal_summary,
    layer,
    layers_of,
    load_manifest,
    manifest_path_for,
    materialize,
    take_snapshot,
    verify_snapshot_layer,
    write_manifest,
)
from .digest import database_digest, diff_digests
from .journal import backups as backups_table

if TYPE_CHECKING:
    from .migrator import Migrator

_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 86400, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> float:
    """'7d', '12h', '30m', '2w', '90s' (a bare number is days) -> seconds."""
    match = _AGE.match(str(text))
    if not match:
        raise UsageError(f"cannot read the age {text!r}", "use a number and a unit: 7d, 12h, 30m, 2w")
    return float(match.group(1)) * _UNITS[match.group(2)]


@dataclass
class BackupInfo:
    id: str
    kind: str
    run_id: str | None
    migration: str | None
    run_status: str | None
    status: str  # verified | pruned | missing (files gone)
    created_at: float
    verified_at: float | None
    location: str
    size: int | None
    sha256: str | None
    compression: str
    layers: list[dict[str, Any]] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)
    protected: str | None = None  # why prune never removes it

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LayerCheck:
    layer: str
    location: str
    status: str  # verified | failed | released | not recorded
    details: str = ""
    error_hint: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RestoreResult:
    backup_id: str
    target: str
    tables: list[str]
    source: str
    pre_restore_backup: str | None
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PruneResult:
    pruned: list[BackupInfo]
    kept: list[tuple[BackupInfo, str]]
    dry_run: bool

    def as_dict(self) -> dict[str, Any]:
        return {"dry_run": self.dry_run, "pruned": [b.as_dict() for b in self.pruned],
                "kept": [{**b.as_dict(), "reason": why} for b, why in self.kept]}


# -- reading the catalog --------------------------------------------------------------------------
def _manifest_of(record: dict[str, Any]) -> tuple[dict[str, Any] | None, Path]:
    path = manifest_path_for(record["location"])
    summary = record.get("manifest") or {}
    if summary.get("manifest"):
        path = Path(summary["manifest"])
    try:
        return load_manifest(Path(record["location"])), path
    except BackupError:
        return None, path


def _protection(record: dict[str, Any], run: dict[str, Any] | None) -> str | None:
    if record["run_id"] is None:
        return None
    if run is None:
        return None
    if run["status"] != "completed":
        return f"its run {run['id']} is {run['status']}"
    return None


def _info(record: dict[str, Any], runs: dict[str, dict[str, Any]]) -> BackupInfo:
    manifest, _path = _manifest_of(record)
    run = runs.get(record["run_id"]) if record["run_id"] else None
    summary = record.get("manifest") or {}
    status = record["status"]
    if status == "verified" and not Path(record["location"]).exists():
        status = "missing"
    layers = layers_of(manifest) if manifest else summary.get("layers", [])
    return BackupInfo(
        id=record["id"], kind=record["kind"], run_id=record["run_id"],
        migration=(manifest or {}).get("migration") or summary.get("migration")
        or (run or {}).get("migration_id"),
        run_status=(run or {}).get("status"), status=status, created_at=record["created_at"],
        verified_at=record["verified_at"], location=record["location"], size=record["size"],
        sha256=record["sha256"], compression=(manifest or summary).get("compression", "none"),
        layers=[{"layer": la["layer"], "status": la.get("status"), "location": la.get("location")}
                for la in layers],
        tables=sorted((manifest or {}).get("tables") or summary.get("tables") or []),
        protected=_protection(record, run),
    )


def list_backups(m: Migrator, *, include_pruned: bool = False) -> list[BackupInfo]:
    """Every backup in the journal, newest first."""
    m._open(write=False)
    if not m.journal_ready:
        return []
    runs = {r["id"]: r for r in m.journal.runs()}
    out = [_info(r, runs) for r in m.journal.backups() if r["kind"] != "shadow"]
    if not include_pruned:
        out = [b for b in out if b.status != "pruned"]
    return sorted(out, key=lambda b: b.created_at, reverse=True)


def find_backup(m: Migrator, backup_id: str) -> dict[str, Any]:
    """The journal record of a backup, by id or unique id prefix."""
    m._open(write=False)
    records = m.journal.backups() if m.journal_ready else []
    matches = [r for r in records if r["id"] == backup_id] or \
        [r for r in records if backup_id and r["id"].startswith(backup_id)]
    if not matches:
        raise UsageError(f"no backup {backup_id!r}", "see `safemigrate backup list`")
    if len(matches) > 1:
        raise UsageError(f"backup id {backup_id!r} is ambiguous: "
                         f"{', '.join(r['id'] for r in matches[:5])}", "give more characters")
    record = matches[0]
    if record["status"] == "pruned":
        raise BackupError(f"backup {record['id']} was pruned; its files are gone",
                          "see `safemigrate backup list --all`")
    return record


def _update_record(m: Migrator, backup_id: str, **values: Any) -> None:
    with m.journal.engine.begin() as conn:
        conn.execute(backups_table.update().where(backups_table.c.id == backup_id).values(**values))


# -- create -------------------------------------------------------------------------------------------
def create_backup(m: Migrator, *, label: str = "manual", notify: Notify | None = None) -> Snapshot:
    """A manual, verified backup of every user table, through every configured layer."""
    m._open(write=True)
    snapshot = take_snapshot(m.dialect, m.journal, m.settings.backup_dir, run_id=None,
                             kind="manual", tables=None, label=_slug(label),
                             config=backup_settings(m.settings), notify=notify)
    m.journal.event(None, "backup.created", f"manual backup {snapshot.id} verified: {snapshot.path}",
                    data={"backup_id": snapshot.id, "sha256": snapshot.sha256, "size": snapshot.size,
                          "who": _who()})
    return snapshot


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "manual"


def _who() -> str:
    from .checks import who

    return who()


# -- verify ---------------------------------------------------------------------------------------------
def verify_backup(m: Migrator, backup_id: str, *, full: bool = True,
                  repair: bool = False) -> list[LayerCheck]:
    """Re-check every layer of a backup against its manifest. Returns one result per layer;
    the caller fails when any failed. With `repair`, a bad snapshot layer is replaced by the
    verified off-site copy (downloaded, proven, then moved into place)."""
    record = find_backup(m, backup_id)
    config = backup_settings(m.settings)
    path = Path(record["location"])
    manifest_path = manifest_path_for(path)
    if not manifest_path.exists():
        raise BackupError(f"backup {record['id']}: manifest {manifest_path} is missing",
                          "a backup without its manifest cannot be proven; take a new one")
    manifest = load_manifest(path)
    if manifest.get("sha256") != record["sha256"]:
        raise BackupError(f"backup {record['id']}: the manifest does not match the journal")
    results: list[LayerCheck] = []
    snap = layer(manifest, "snapshot") or {}
    try:
        verify_snapshot_layer(m.dialect, manifest, manifest_path, full=full, backup_id=record["id"])
        results.append(LayerCheck("snapshot", str(path), "verified", _snapshot_details(snap, full)))
    except BackupError as exc:
        if repair and _repair_snapshot(m, record, manifest, manifest_path, config):
            verify_snapshot_layer(m.dialect, manifest, manifest_path, full=full,
                                  backup_id=record["id"])
            results.append(LayerCheck("snapshot", str(path), "verified",
                                      f"repaired from the off-site copy ({exc.message})"))
        else:
            results.append(LayerCheck("snapshot", str(path), "failed", exc.message, exc.hint))
    remote = layer(manifest, "offsite")
    if remote is not None:
        if remote.get("status") != "verified":
            results.append(LayerCheck("offsite", remote["location"], "failed",
                                      f"backup {record['id']}: layer offsite was never verified: "
                                      f"{remote.get('error')}", "take a new backup"))
        else:
            try:
                offsite.verify(config, remote, record["id"])
                results.append(LayerCheck("offsite", remote["location"], "verified",
                                          f"{remote['size']:,} bytes, sha256 {remote['sha256'][:12]}"))
            except BackupError as exc:
                results.append(LayerCheck("offsite", remote["location"], "failed", exc.message,
                                          exc.hint))
    for shadow in (la for la in layers_of(manifest) if la["layer"] == "shadow"):
        results.append(_verify_shadow(m, record, shadow))
    now = time.time()
    if all(r.status != "failed" for r in results):
        manifest["verified_at"] = now
        for la in manifest.get("layers", []):
            if any(r.layer == la["layer"] and r.status == "verified" for r in results):
                la["verified_at"] = now
        write_manifest(manifest_path, manifest)
        _update_record(m, record["id"], verified_at=now)
    if m.journal_ready:
        bad = [r for r in results if r.status == "failed"]
        m.journal.event(record["run_id"], "backup.verify",
                        f"backup {record['id']}: " + ("all layers verified" if not bad else
                                                      "; ".join(r.details for r in bad)),
                        level="info" if not bad else "error",
                        data={"backup_id": record["id"], "layers": [r.as_dict() for r in results]})
    return results


def _snapshot_details(snap: dict[str, Any], full: bool) -> str:
    packed = f", zstd of {snap.get('raw_size', 0):,} bytes" if snap.get("compression") == "zstd" else ""
    proof = "integrity and table digests" if full else "integrity"
    return f"{snap.get('size', 0):,} bytes{packed}, sha256 {str(snap.get('sha256'))[:12]}, {proof} ok"


def _verify_shadow(m: Migrator, record: dict[str, Any], shadow: dict[str, Any]) -> LayerCheck:
    name = str(shadow.get("location", "")).removeprefix("table ")
    run = m.journal.run(record["run_id"]) if record["run_id"] else None
    with m.dialect.engine.connect() as conn:
        exists = sa.inspect(conn).has_table(name)
        rows = None
        if exists:
            rows = int(conn.execute(sa.select(sa.func.count()).select_from(sa.table(name))).scalar() or 0)
    if not exists:
        if run is not None and run["status"] == "rolled_back":
            return LayerCheck("shadow", name, "released", "dropped when the run was rolled back")
        return LayerCheck("shadow", name, "failed",
                          f"backup {record['id']}: layer shadow ({name}) is missing",
                          "roll back with the restore strategy (from the snapshot)")
    if rows != shadow.get("rows"):
        return LayerCheck("shadow", name, "failed",
                          f"backup {record['id']}: layer shadow ({name}) holds {rows} rows, "
                          f"the manifest says {shadow.get('rows')}",
                          "roll back with the restore strategy (from the snapshot)")
    return LayerCheck("shadow", name, "verified", f"{rows:,} rows of {shadow.get('table')} "
                      f"({', '.join(shadow.get('columns') or [])})")


def _repair_snapshot(m: Migrator, record: dict[str, Any], manifest: dict[str, Any],
                     manifest_path: Path, config: BackupSettings) -> bool:
    remote = layer(manifest, "offsite")
    if remote is None or remote.get("status") != "verified":
        return False
    stored = Path(record["location"])
    temp = stored.with_name(f".{stored.name}.{os.getpid()}.repair.tmp")
    try:
        offsite.download(config, remote, temp, record["id"])  # proven by the stored checksum
        os.replace(temp, stored)
        _fsync_dir(stored.parent)
    finally:
        _discard(temp)
    m.journal.event(record["run_id"], "backup.repaired",
                    f"backup {record['id']}: snapshot layer replaced by the verified off-site copy",
                    level="warning", data={"backup_id": record["id"], "who": _who()})
    return True


# -- restore -----------------------------------------------------------------------------------------
def restore_backup(m: Migrator, backup_id: str, *, to: Path | None = None, in_place: bool = False,
                   source: str = "snapshot", notify: Notify | None = None) -> RestoreResult:
    """Restore a backup into a new SQLite file (`to`) or in place (the current state is saved
    first as a pre-restore backup, then the backup's tables are replaced). The result's content
    digests are compared with the manifest's."""
    if (to is None) == (not in_place):
        raise UsageError("say where to restore: --to FILE (a new SQLite file) or --in-place",
                         "e.g. safemigrate backup restore ID --to restored.db")
    started = time.time()
    record = find_backup(m, backup_id)
    config = backup_settings(m.settings)
    path = Path(record["location"])
    manifest_path = manifest_path_for(path)
    manifest = load_manifest(path)
    tables = sorted(manifest.get("tables") or {})
    if to is not None:
        return _restore_to_file(m, record, manifest, manifest_path, Path(to), source, config, started)
    m._open(write=True)
    with m._locked("restore"):
        unfinished = m.journal.unfinished_run()
        if unfinished is not None:
            raise UsageError(f"run {unfinished['id']} of {unfinished['migration_id']} is "
                             f"{unfinished['status']}: restoring under it would confuse it",
                             "finish it (`safemigrate run`) or roll it back first")
        with materialize(m.dialect, manifest, manifest_path, source=source, config=config,
                         backup_id=record["id"]) as plain:
            pre = take_snapshot(m.dialect, m.journal, m.settings.backup_dir, run_id=None,
                                kind="pre-restore", tables=None,
                                label=f"pre-restore-{record['id']}", config=config, notify=notify)
            m.journal.event(None, "backup.pre_restore",
                            f"current state saved to {pre.path} before restoring {record['id']}",
                            level="warning", data={"backup_id": pre.id, "restoring": record["id"]})
            m.dialect.restore_tables(plain, tables, [])
        with m.dialect.engine.connect() as conn:
            now = database_digest(conn, tables)
        problems = [f"{t}: {p}" for t in tables for p in diff_digests(manifest["tables"][t], now[t])]
        if problems:
            m.journal.event(None, "backup.restore_unproven", "; ".join(problems[:5]), level="critical")
            raise BackupError(f"restored content differs from backup {record['id']}: {problems[0]}",
                              f"the state before the restore is in backup {pre.id} ({pre.path})")
        m.journal.event(None, "backup.restored",
                        f"restored {', '.join(tables)} in place from backup {record['id']} "
                        f"({source} layer); content digests equal", level="warning",
                        data={"backup_id": record["id"], "tables": tables, "source": source,
                              "pre_restore_backup": pre.id, "who": _who()})
    return RestoreResult(record["id"], m.display_url, tables, source, pre.id, time.time() - started)


def _restore_to_file(m: Migrator, record: dict[str, Any], manifest: dict[str, Any],
                     manifest_path: Path, target: Path, source: str, config: BackupSettings,
                     started: float) -> RestoreResult:
    if manifest.get("engine", "sqlite") != "sqlite":
        raise UsageError(f"backup {record['id']} is a {manifest.get('engine')} dump, not a SQLite file",
                         "restore a server backup with --in-place")
    target = target.expanduser().resolve()
    if target.exists():
        raise UsageError(f"{target} exists; restore never overwrites a file",
                         "give a new file name (or --in-place to restore the database itself)")
    if not target.parent.is_dir():
        raise UsageError(f"folder {target.parent} does not exist")
    temp = target.with_name(f".{target.name}.{os.getpid()}.restore.tmp")
    tables = sorted(manifest.get("tables") or {})
    try:
        with materialize(m.dialect, manifest, manifest_path, source=source, config=config,
                         backup_id=record["id"]) as plain:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as out, open(plain, "rb") as src:
                shutil.copyfileobj(src, out, 8 << 20)
                out.flush()
                os.fsync(out.fileno())
        with m.dialect.snapshot_reader(temp) as conn:
            now = database_digest(conn, tables)
        problems = [f"{t}: {p}" for t in tables for p in diff_digests(manifest["tables"][t], now[t])]
        if problems:
            raise BackupError(f"restored file differs from backup {record['id']}: {problems[0]}")
        os.replace(temp, target)
        _fsync_dir(target.parent)
    except OSError as exc:
        raise BackupError(f"cannot write {target}: {exc.strerror or exc}") from None
    finally:
        _discard(temp)
    if m.journal_ready:
        m.journal.event(None, "backup.restored",
                        f"backup {record['id']} restored to the new file {target} ({source} layer); "
                        "content digests equal",
                        data={"backup_id": record["id"], "to": str(target), "source": source,
                              "who": _who()})
    return RestoreResult(record["id"], str(target), tables, source, None, time.time() - started)


# -- prune ----------------------------------------------------------------------------------------------
def prune_backups(m: Migrator, *, keep: int | None = None, older_than: float | None = None,
                  dry_run: bool = False) -> PruneResult:
    """Delete old backups by the rule in this module's docstring."""
    if keep is None and older_than is None:
        raise UsageError("say what to keep: --keep N and/or --older-than AGE")
    if keep is not None and keep < 0:
        raise UsageError("--keep must be 0 or more")
    if not dry_run:
        m._open(write=True)
    backups = list_backups(m)
    now = time.time()
    kept: list[tuple[BackupInfo, str]] = []
    pruned: list[BackupInfo] = []
    candidates = []
    for info in backups:
        if info.protected:
            kept.append((info, f"protected: {info.protected}"))
        else:
            candidates.append(info)
    for rank, info in enumerate(candidates):  # newest first
        if keep is not None and rank < keep:
            kept.append((info, f"among the {keep} newest"))
            continue
        if older_than is not None and now - info.created_at < older_than:
            kept.append((info, "younger than the age given"))
            continue
        if info.kind == "snapshot" and keep is None:
            kept.append((info, "a completed run's snapshot (rollback --strategy restore needs it): "
                               "pruned only when --keep counts it out"))
            continue
        pruned.append(info)
    if not dry_run:
        config = backup_settings(m.settings)
        for info in pruned:
            _delete(m, info, config)
    return PruneResult(pruned, kept, dry_run)


def _delete(m: Migrator, info: BackupInfo, config: BackupSettings) -> None:
    record = next(r for r in m.journal.backups() if r["id"] == info.id)
    manifest, manifest_path = _manifest_of(record)
    errors = []
    remote = layer(manifest, "offsite") if manifest else None
    if remote is not None and remote.get("status") == "verified":
        try:
            offsite.remove(config, remote, manifest_path.name)
        except Exception as exc:  # noqa: BLE001 - reported, the local files still go
            errors.append(f"off-site copy not removed: {type(exc).__name__}: {exc}")
    for path in (Path(record["location"]), manifest_path):
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            errors.append(f"{path} not removed: {exc.strerror}")
    summary = dict(record.get("manifest") or {})
    summary["pruned_at"] = time.time()
    if errors:
        summary["prune_errors"] = errors
    _update_record(m, info.id, status="pruned", manifest=json.dumps(summary, sort_keys=True))
    m.journal.event(info.run_id, "backup.pruned",
                    f"backup {info.id} ({info.kind}) pruned by {_who()}"
                    + (f"; {'; '.join(errors)}" if errors else ""),
                    level="warning" if errors else "info",
                    data={"backup_id": info.id, "kind": info.kind, "location": info.location,
                          "who": _who(), "errors": errors})


__all__ = [
    "BackupInfo",
    "LayerCheck",
    "PruneResult",
    "RestoreResult",
    "create_backup",
    "find_backup",
    "journal_summary",
    "list_backups",
    "parse_age",
    "prune_backups",
    "restore_backup",
    "verify_backup",
]
