"""Verified snapshots: nothing changes before one exists and has been proven good.

A snapshot is written to a temporary name (mode 0600), fsynced, renamed, then verified: its
SHA-256 is recorded, it is reopened, the engine's integrity check runs on it, and its per-table
digests must equal the source's, taken in the same read transaction as the copy.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._exceptions import BackupError, DiskFullError, SafeMigrateError
from ._version import __version__
from .dialects import Dialect
from .digest import database_digest, diff_digests
from .journal import Journal, new_id
from .urls import redact

# Room for the journal and the file system's own overhead on top of the data itself.
_DISK_MARGIN = 1.1


@dataclass
class Snapshot:
    """A verified snapshot on disk, with the source digests taken at snapshot time."""

    id: str
    path: Path
    sha256: str
    size: int
    digests: dict[str, Any]
    manifest_path: Path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def prepare_dir(directory: Path) -> Path:
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        probe = directory / f".probe-{os.getpid()}"
        _write_private(probe, "ok")
        probe.unlink()
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise DiskFullError(f"backup folder {directory} is full") from None
        raise BackupError(
            f"backup folder {directory} is not writable: {exc.strerror}",
            "point --backup-dir at a writable folder",
        ) from None
    return directory


def check_free_space(directory: Path, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise DiskFullError(
            f"backup needs {needed / 1e6:.1f} MB but {directory} has {free / 1e6:.1f} MB free"
        )


def take_snapshot(dialect: Dialect, journal: Journal, directory: Path, *, run_id: str | None,
                  kind: str, tables: list[str] | None = None,
                  label: str = "snapshot") -> Snapshot:
    """Copy the database and prove the copy; on any failure nothing is left behind."""
    directory = prepare_dir(directory)
    backup_id = new_id()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    final = directory / f"{stamp}-{label}-{backup_id}.db"
    temp = directory / f".{final.name}.tmp"
    try:
        with dialect.engine.connect() as conn:
            check_free_space(directory, int(dialect.size_bytes(conn) * _DISK_MARGIN))
            names = tables if tables is not None else dialect.user_tables(conn)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        source_digests = dialect.snapshot(temp, names)
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, final)
        _fsync_dir(directory)
        sha = sha256_file(final)
        size = final.stat().st_size
        verify_snapshot_file(dialect, final, sha, source_digests)
    except OSError as exc:
        _discard(temp, final)
        if exc.errno == errno.ENOSPC:
            raise DiskFullError(f"disk full while writing the snapshot in {directory}") from None
        raise BackupError(f"cannot write snapshot {final}: {exc.strerror or exc}") from None
    except SafeMigrateError:
        _discard(temp, final)
        raise
    except Exception as exc:
        _discard(temp, final)
        translated = dialect.translate_error(exc)
        raise translated from None
    manifest = {
        "tool_version": __version__,
        "backup_id": backup_id,
        "run_id": run_id,
        "kind": kind,
        "source": redact(dialect.url),
        "engine": dialect.name,
        "file": final.name,
        "sha256": sha,
        "size": size,
        "tables": source_digests,
        "created_at": time.time(),
        "verified_at": time.time(),
    }
    manifest_path = final.with_suffix(".json")
    _write_private(manifest_path, json.dumps(manifest, indent=2, sort_keys=True))
    journal.record_backup(run_id, kind, str(final), sha256=sha, size=size, status="verified",
                          manifest={"manifest": str(manifest_path), "tables": sorted(source_digests)},
                          backup_id=backup_id)
    return Snapshot(backup_id, final, sha, size, source_digests, manifest_path)


def verify_snapshot_file(dialect: Dialect, path: Path, sha256: str,
                         digests: dict[str, Any] | None) -> None:
    """Prove a snapshot: checksum, reopen, integrity check, digests equal to the recorded ones."""
    if not path.is_file():
        raise BackupError(f"snapshot {path} is missing", "restore it from the off-site copy")
    actual = sha256_file(path)
    if actual != sha256:
        raise BackupError(
            f"snapshot {path.name} is corrupted: sha256 {actual[:12]} != recorded {sha256[:12]}",
            "do not use this snapshot; take a new backup or use another layer",
        )
    try:
        with dialect.snapshot_reader(path) as conn:
            problems = dialect.integrity_check(conn)
            if problems:
                raise BackupError(f"snapshot {path.name} fails the integrity check: {problems[0]}")
            if digests is not None:
                copy = database_digest(conn, sorted(digests))
                for table, expected in digests.items():
                    diff = diff_digests(expected, copy[table])
                    if diff:
                        raise BackupError(
                            f"snapshot {path.name} differs from the source in {table}: {diff[0]}"
                        )
    except SafeMigrateError:
        raise
    except Exception as exc:
        raise BackupError(f"snapshot {path.name} cannot be read: {exc}") from None


def load_manifest(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.with_suffix(".json").read_text())
    except (OSError, ValueError) as exc:
        raise BackupError(f"manifest of {path.name} is unreadable: {exc}") from None


def verify_backup_record(dialect: Dialect, record: dict[str, Any], *, full: bool = True) -> None:
    """Re-check a journaled backup against its manifest (checksum, integrity, digests)."""
    path = Path(record["location"])
    manifest = load_manifest(path)
    if manifest.get("sha256") != record["sha256"]:
        raise BackupError(f"manifest of {path.name} does not match the journal")
    verify_snapshot_file(dialect, path, record["sha256"], manifest["tables"] if full else None)


def _discard(*paths: Path) -> None:
    for path in paths:
        with suppress(OSError):
            path.unlink()
