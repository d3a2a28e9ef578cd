"""Multi-layer, verified backups: nothing changes before one exists and has been proven good.

The seed's MultiLayerBackup. A backup has up to three layers:

1. shadow   in-database copy of the key and old values of the columns a Backfill writes
            (`shadow.py`; taken by the runner, recorded here in the manifest).
2. snapshot a file in the backup folder. Written to a temporary name (mode 0600), fsynced,
            renamed, then proven: its SHA-256 is recorded, it is reopened, the engine's integrity
            check runs on it, and its per-table digests must equal the source's, taken in the same
            read transaction as the copy. With `[backup] compress = "zstd"` it is compressed once
            proven; both checksums are recorded, and verification or restore decompress it to a
            temporary file first (streaming) and check the content checksum.
3. offsite  a copy at any fsspec URL (`[backup] offsite`), uploaded, read back whole and its
            checksum compared. Best effort like the seed's cloud layer: a failure is a warning
            event, unless `offsite_required = true`.

A JSON manifest beside each snapshot (`<name>.json`, mode 0600; uploaded next to the off-site
copy too) records the tool version, migration, source identity (redacted URL), every layer with
its location, size, checksum and status, the table digests, and when it was created and verified.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._exceptions import BackupError, ConfigError, DiskFullError, SafeMigrateError
from ._version import __version__
from .dialects import Dialect
from .digest import database_digest, diff_digests
from .journal import Journal, new_id
from .urls import redact

# Room for the journal and the file system's own overhead on top of the data itself.
_DISK_MARGIN = 1.1
CHUNK = 1 << 20
MANIFEST_FORMAT = 2
COMPRESSIONS = ("none", "zstd")

Notify = Callable[[str, str, str], None]  # (event kind, message, level)


# -- configuration ---------------------------------------------------------------------------------
@dataclass
class BackupSettings:
    """The `[backup]` table of safemigrate.toml (the folder itself is the top-level backup_dir)."""

    compress: str = "none"  # "none" | "zstd": the snapshot layer, once verified
    compress_level: int = 3
    offsite: str = ""  # fsspec URL of a folder for layer 3, e.g. s3://bucket/backups; "" = off
    offsite_required: bool = False  # a failed off-site copy fails the backup (else a warning)
    offsite_options: dict[str, Any] = field(default_factory=dict)  # fsspec storage options

    def __post_init__(self) -> None:
        if self.compress not in COMPRESSIONS:
            raise ConfigError(f"[backup] compress must be one of {', '.join(COMPRESSIONS)}, "
                              f"got {self.compress!r}")
        if not 1 <= self.compress_level <= 22:
            raise ConfigError(f"[backup] compress_level must be 1..22, got {self.compress_level!r}")
        if self.offsite and "://" not in self.offsite:
            raise ConfigError(f"[backup] offsite must be an fsspec URL, got {self.offsite!r}",
                              "e.g. s3://bucket/backups, gs://bucket/x, file:///mnt/backups")

    @property
    def redacted_offsite(self) -> str:
        from .offsite import redact_url

        return redact_url(self.offsite)


def backup_settings(settings: Any) -> BackupSettings:
    from .settings import section_settings

    return section_settings(BackupSettings, settings.section("backup"), "backup")


@dataclass
class Snapshot:
    """A verified snapshot on disk, with the source digests taken at snapshot time."""

    id: str
    path: Path  # the stored file (compressed when compression is on)
    sha256: str  # of the stored file
    size: int
    digests: dict[str, Any]
    manifest_path: Path
    raw_sha256: str = ""
    compression: str = "none"
    layers: list[dict[str, Any]] = field(default_factory=list)


# -- files -----------------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
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


def _open_private(path: Path) -> Any:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    return os.fdopen(fd, "wb")


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
    return directory.resolve()  # the journal records absolute locations, usable from any cwd


def check_free_space(directory: Path, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise DiskFullError(
            f"backup needs {needed / 1e6:.1f} MB but {directory} has {free / 1e6:.1f} MB free"
        )


def manifest_path_for(location: str | Path) -> Path:
    """`<name>.json` beside `<name>.db` or `<name>.db.zst`."""
    path = Path(location)
    name = path.name
    if name.endswith(".zst"):
        name = name[: -len(".zst")]
    if name.endswith(".db"):
        name = name[: -len(".db")]
    return path.with_name(name + ".json")


def load_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the snapshot stored at `path`."""
    try:
        return json.loads(manifest_path_for(path).read_text())
    except (OSError, ValueError) as exc:
        raise BackupError(f"manifest of {Path(path).name} is unreadable: {exc}") from None


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Replace a manifest atomically (temp, fsync, rename), mode 0600."""
    temp = path.with_name(f".{path.name}.tmp")
    _write_private(temp, json.dumps(manifest, indent=2, sort_keys=True, default=str))
    os.replace(temp, path)


# -- compression -----------------------------------------------------------------------------------
class _HashingWriter:
    """A file-like sink that hashes what passes through (and writes it on, when given a file)."""

    def __init__(self, out: Any = None) -> None:
        self.out = out
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        if self.out is not None:
            self.out.write(data)
        return len(data)

    def flush(self) -> None:
        if self.out is not None:
            self.out.flush()


def _zstd() -> Any:
    try:
        import zstandard
    except ImportError:  # pragma: no cover - zstandard is a dependency
        raise ConfigError("compress = \"zstd\" needs the zstandard package",
                          "pip install zstandard") from None
    return zstandard


def compress_file(raw: Path, dest: Path, level: int = 3) -> tuple[str, int]:
    """Stream `raw` into `dest` (zstd, with frame checksums), fsynced; (sha256, size) of `dest`."""
    zstd = _zstd()
    compressor = zstd.ZstdCompressor(level=level, threads=-1, write_checksum=True)
    with open(raw, "rb") as source, _open_private(dest) as out:
        sink = _HashingWriter(out)
        compressor.copy_stream(source, sink, read_size=CHUNK, write_size=CHUNK)
        out.flush()
        os.fsync(out.fileno())
    return sink.digest.hexdigest(), sink.size


def decompress_file(stored: Path, dest: Path | None) -> tuple[str, int]:
    """Stream-decompress `stored` into `dest` (None: only hash); (sha256, size) of the content."""
    zstd = _zstd()
    decompressor = zstd.ZstdDecompressor()
    with open(stored, "rb") as source:
        if dest is None:
            sink = _HashingWriter()
            decompressor.copy_stream(source, sink, read_size=CHUNK, write_size=CHUNK)
        else:
            with _open_private(dest) as out:
                sink = _HashingWriter(out)
                decompressor.copy_stream(source, sink, read_size=CHUNK, write_size=CHUNK)
                out.flush()
                os.fsync(out.fileno())
    return sink.digest.hexdigest(), sink.size


# -- taking a snapshot -------------------------------------------------------------------------------
def take_snapshot(dialect: Dialect, journal: Journal, directory: Path, *, run_id: str | None,
                  kind: str, tables: list[str] | None = None, label: str = "snapshot",
                  config: BackupSettings | None = None, migration: str | None = None,
                  notify: Notify | None = None) -> Snapshot:
    """Copy the database and prove the copy (layer 2), compress it and copy it off-site (layer 3)
    as configured. On any failure of a required layer nothing is left behind."""
    config = config or BackupSettings()
    directory = prepare_dir(directory)
    backup_id = new_id()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    base = f"{stamp}-{label}-{backup_id}"
    raw = directory / f"{base}.db"
    temp = directory / f".{raw.name}.tmp"
    packed = directory / f"{base}.db.zst"
    packed_temp = directory / f".{packed.name}.tmp"
    manifest_path = directory / f"{base}.json"
    created = time.time()
    try:
        with dialect.engine.connect() as conn:
            check_free_space(directory, int(dialect.size_bytes(conn) * _DISK_MARGIN))
            names = tables if tables is not None else dialect.user_tables(conn)
            version = dialect.server_version(conn)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        source_digests = dialect.snapshot(temp, names)
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, raw)
        _fsync_dir(directory)
        raw_sha = verify_snapshot_file(dialect, raw, None, source_digests)
        raw_size = raw.stat().st_size
        stored, sha, size = raw, raw_sha, raw_size
        if config.compress == "zstd":
            sha, size = compress_file(raw, packed_temp, config.compress_level)
            content_sha, _ = decompress_file(packed_temp, None)
            if content_sha != raw_sha:
                raise BackupError(f"compressed snapshot {packed.name} does not decompress to the "
                                  "verified snapshot", "set [backup] compress = \"none\"")
            os.replace(packed_temp, packed)
            _fsync_dir(directory)
            raw.unlink()
            stored = packed
    except OSError as exc:
        _discard(temp, raw, packed_temp, packed)
        if exc.errno == errno.ENOSPC:
            raise DiskFullError(f"disk full while writing the snapshot in {directory}") from None
        raise BackupError(f"cannot write snapshot {raw}: {exc.strerror or exc}") from None
    except SafeMigrateError:
        _discard(temp, raw, packed_temp, packed)
        raise
    except Exception as exc:
        _discard(temp, raw, packed_temp, packed)
        translated = dialect.translate_error(exc)
        raise translated from None
    verified = time.time()
    snapshot_layer = {"layer": "snapshot", "location": str(stored), "size": size, "sha256": sha,
                      "compression": config.compress, "raw_sha256": raw_sha, "raw_size": raw_size,
                      "status": "verified", "verified_at": verified}
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "tool_version": __version__,
        "backup_id": backup_id,
        "run_id": run_id,
        "kind": kind,
        "migration": migration,
        "source": redact(dialect.url),
        "engine": dialect.name,
        "server_version": version,
        "file": stored.name,
        "sha256": sha,
        "size": size,
        "compression": config.compress,
        "raw_sha256": raw_sha,
        "raw_size": raw_size,
        "tables": source_digests,
        "layers": [snapshot_layer],
        "created_at": created,
        "verified_at": verified,
    }
    try:
        write_manifest(manifest_path, manifest)
        if config.offsite:
            _offsite_layer(config, manifest, manifest_path, stored, journal, run_id, notify)
    except BaseException:
        _discard(stored, manifest_path)
        raise
    journal.record_backup(run_id, kind, str(stored), sha256=sha, size=size, status="verified",
                          manifest=journal_summary(manifest, manifest_path), backup_id=backup_id)
    return Snapshot(backup_id, stored, sha, size, source_digests, manifest_path, raw_sha,
                    config.compress, manifest["layers"])


def _offsite_layer(config: BackupSettings, manifest: dict[str, Any], manifest_path: Path,
                   stored: Path, journal: Journal, run_id: str | None, notify: Notify | None) -> None:
    from . import offsite

    layer = offsite.upload(config, stored, manifest["sha256"], manifest["size"])
    manifest["layers"].append(layer)
    write_manifest(manifest_path, manifest)
    if layer["status"] == "verified":
        try:
            offsite.upload_file(config, manifest_path)
        except Exception as exc:  # noqa: BLE001 - the data is verified; the manifest is a copy
            layer["manifest_error"] = str(exc)[:200]
            write_manifest(manifest_path, manifest)
        return
    message = f"off-site copy to {layer['location']} failed: {layer.get('error')}"
    if config.offsite_required:
        raise BackupError(message, "fix the off-site URL or credentials, or set "
                          "[backup] offsite_required = false")
    journal.event(run_id, "backup.offsite_failed", message + " (not required: going on)",
                  level="warning", data={"location": layer["location"], "error": layer.get("error")})
    if notify is not None:
        notify("backup.offsite_failed", message + " (not required: going on)", "warning")


def journal_summary(manifest: dict[str, Any], manifest_path: Path) -> dict[str, Any]:
    """What the journal row keeps of a manifest (the file stays authoritative)."""
    return {"manifest": str(manifest_path), "tables": sorted(manifest.get("tables") or {}),
            "compression": manifest.get("compression", "none"),
            "migration": manifest.get("migration"),
            "layers": [{"layer": la["layer"], "status": la["status"]} for la in layers_of(manifest)]}


def record_layer(journal: Journal, backup_id: str, manifest_path: Path, layer: dict[str, Any]) -> None:
    """Add (or replace) a layer in a backup's manifest and journal row: the runner records its
    shadow copies this way."""
    from .journal import backups as backups_table

    manifest = json.loads(manifest_path.read_text())
    manifest["layers"] = [la for la in layers_of(manifest)
                          if (la["layer"], la.get("location")) != (layer["layer"], layer.get("location"))]
    manifest["layers"].append(layer)
    write_manifest(manifest_path, manifest)
    with journal.engine.begin() as conn:
        conn.execute(backups_table.update().where(backups_table.c.id == backup_id).values(
            manifest=json.dumps(journal_summary(manifest, manifest_path), sort_keys=True)))


# -- proving a snapshot ------------------------------------------------------------------------------
def verify_snapshot_file(dialect: Dialect, path: Path, sha256: str | None,
                         digests: dict[str, Any] | None, *, where: str | None = None) -> str:
    """Prove a plain snapshot: checksum (`sha256` None: computed and returned), reopen,
    integrity check, digests equal to the recorded ones. The checksum is computed in a thread
    while the file is checked; on SQLite the integrity check gets its own reader and thread."""
    where = where or f"snapshot {path.name}"
    if not path.is_file():
        raise BackupError(f"{where} is missing", "restore it from the off-site copy")
    parallel = dialect.name == "sqlite"

    def integrity() -> str | None:
        with dialect.snapshot_reader(path) as conn:
            problems = dialect.integrity_check(conn)
        return problems[0] if problems else None

    def content(check_integrity: bool) -> tuple[str | None, str | None]:
        with dialect.snapshot_reader(path) as conn:
            problem = None
            if check_integrity:
                problems = dialect.integrity_check(conn)
                problem = problems[0] if problems else None
            if problem is None and digests is not None:
                copy = database_digest(conn, sorted(digests))
                for table, expected in digests.items():
                    diff = diff_digests(expected, copy[table])
                    if diff:
                        return None, f"{where} differs from the source in {table}: {diff[0]}"
            return problem, None

    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="safemigrate-verify") as pool:
        sha_future = pool.submit(sha256_file, path)
        integrity_future = pool.submit(integrity) if parallel else None
        error: BaseException | None = None
        problem = difference = None
        try:
            problem, difference = content(check_integrity=not parallel)
        except Exception as exc:  # noqa: BLE001 - reported after the checksum, which comes first
            error = exc
        if integrity_future is not None:
            try:
                problem = integrity_future.result() or problem
            except Exception as exc:  # noqa: BLE001
                error = error or exc
        actual = sha_future.result()
    if sha256 is not None and actual != sha256:
        raise _corrupted(where, actual, sha256)
    if error is not None:
        if isinstance(error, SafeMigrateError):
            raise error
        raise BackupError(f"{where} cannot be read: {error}") from None
    if problem is not None:
        raise BackupError(f"{where} fails the integrity check: {problem}")
    if difference is not None:
        raise BackupError(difference)
    return actual


def layers_of(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The manifest's layers; a manifest of the first format had one snapshot layer."""
    if "layers" in manifest:
        return list(manifest["layers"])
    return [{"layer": "snapshot", "location": manifest.get("file"), "size": manifest.get("size"),
             "sha256": manifest.get("sha256"), "compression": "none",
             "raw_sha256": manifest.get("sha256"), "raw_size": manifest.get("size"),
             "status": "verified", "verified_at": manifest.get("verified_at")}]


def layer(manifest: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((la for la in layers_of(manifest) if la["layer"] == name), None)


def _stored_path(manifest: dict[str, Any], manifest_path: Path) -> Path:
    """The snapshot file: beside the manifest (folders may move), else where it was written."""
    snap = layer(manifest, "snapshot") or {}
    beside = manifest_path.with_name(manifest.get("file") or Path(str(snap.get("location"))).name)
    if beside.exists() or not snap.get("location"):
        return beside
    return Path(snap["location"])


def _check_size(path: Path, snap: dict[str, Any], where: str) -> None:
    """Missing or truncated: said before anything is read."""
    if not path.is_file():
        raise BackupError(f"{where} is missing", "`safemigrate backup verify` can repair it from "
                          "the off-site copy; else take a new backup")
    size = path.stat().st_size
    if snap.get("size") is not None and size != snap["size"]:
        raise BackupError(f"{where} is truncated: {size} bytes, the manifest says {snap['size']}",
                          "do not use this snapshot; take a new backup or use another layer")


def _corrupted(where: str, actual: str, recorded: str) -> BackupError:
    return BackupError(f"{where} is corrupted: sha256 {actual[:12]} != recorded {recorded[:12]}",
                       "do not use this snapshot; take a new backup or use another layer")


@contextmanager
def _plain(dialect: Dialect, manifest: dict[str, Any], stored: Path, where: str, *,
           full: bool) -> Iterator[Path]:
    """The plain snapshot behind a stored file (whose size was checked): itself, or decompressed
    into a temporary file (streaming, content checksum compared), proven by checksum, integrity
    and (with `full`) table digests; temporary files are removed afterwards."""
    snap = layer(manifest, "snapshot") or {}
    digests = manifest.get("tables") if full else None
    if snap.get("compression", "none") == "none":
        verify_snapshot_file(dialect, stored, snap["sha256"], digests, where=where)
        yield stored
        return
    actual = sha256_file(stored)
    if actual != snap["sha256"]:
        raise _corrupted(where, actual, snap["sha256"])
    temp = stored.with_name(f".{stored.name}.{os.getpid()}.{new_id()}.plain.tmp")
    try:
        check_free_space(stored.parent, int((snap.get("raw_size") or 0) * _DISK_MARGIN))
        try:
            content_sha, _ = decompress_file(stored, temp)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise DiskFullError(f"disk full while decompressing {stored.name}") from None
            raise
        except Exception as exc:  # noqa: BLE001 - a zstd error is a corrupted layer
            raise BackupError(f"{where} is corrupted: cannot decompress: {exc}",
                              "do not use this snapshot; use another layer") from None
        if content_sha != snap.get("raw_sha256"):
            raise BackupError(f"{where} is corrupted: it decompresses to sha256 {content_sha[:12]}, "
                              f"the verified snapshot had {str(snap.get('raw_sha256'))[:12]}",
                              "do not use this snapshot; use another layer")
        verify_snapshot_file(dialect, temp, content_sha, digests, where=where)
        yield temp
    finally:
        _discard(temp)


def verify_snapshot_layer(dialect: Dialect, manifest: dict[str, Any], manifest_path: Path, *,
                          full: bool = True, backup_id: str | None = None) -> Path:
    """Re-check layer 2 against its manifest: size, checksum, (decompressed) content checksum,
    integrity, and with `full` the table digests. Errors name the layer. Returns its path."""
    stored = _stored_path(manifest, manifest_path)
    where = f"backup {backup_id or manifest.get('backup_id')}: layer snapshot ({stored})"
    _check_size(stored, layer(manifest, "snapshot") or {}, where)
    with _plain(dialect, manifest, stored, where, full=full):
        pass
    return stored


@contextmanager
def materialize(dialect: Dialect, manifest: dict[str, Any], manifest_path: Path, *,
                source: str = "snapshot", config: BackupSettings | None = None, full: bool = True,
                backup_id: str | None = None) -> Iterator[Path]:
    """A verified plain snapshot file to restore from, from layer 2 (`source="snapshot"`) or
    downloaded from layer 3 (`source="offsite"`); temporary files are removed on exit."""
    from . import offsite

    backup_id = backup_id or manifest.get("backup_id") or "?"
    if source == "snapshot":
        stored = _stored_path(manifest, manifest_path)
        where = f"backup {backup_id}: layer snapshot ({stored})"
        _check_size(stored, layer(manifest, "snapshot") or {}, where)
        with _plain(dialect, manifest, stored, where, full=full) as path:
            yield path
        return
    if source != "offsite":
        raise BackupError(f"unknown backup layer {source!r}", "use snapshot or offsite")
    remote = layer(manifest, "offsite")
    if remote is None or remote.get("status") != "verified":
        raise BackupError(f"backup {backup_id} has no verified off-site layer",
                          "restore from the snapshot layer")
    folder = manifest_path.parent
    check_free_space(folder, int((remote.get("size") or 0) * _DISK_MARGIN))
    fetched = folder / f".{remote['name']}.{os.getpid()}.{new_id()}.fetch.tmp"
    try:
        offsite.download(config or BackupSettings(), remote, fetched, backup_id)
        where = f"backup {backup_id}: layer offsite ({remote['location']})"
        with _plain(dialect, manifest, fetched, where, full=full) as path:
            yield path
    finally:
        _discard(fetched)


def verify_backup_record(dialect: Dialect, record: dict[str, Any], *, full: bool = True) -> None:
    """Re-check a journaled backup's snapshot layer against its manifest (checksum, integrity,
    digests); a corrupted, truncated or missing file is an error naming the layer."""
    path = Path(record["location"])
    manifest_path = manifest_path_for(path)
    if not manifest_path.exists() and not path.exists():
        raise BackupError(f"backup {record['id']}: layer snapshot ({path}) is missing",
                          "restore it from the off-site copy or take a new backup")
    manifest = load_manifest(path)
    if manifest.get("sha256") != record["sha256"]:
        raise BackupError(f"manifest of {path.name} does not match the journal")
    verify_snapshot_layer(dialect, manifest, manifest_path, full=full, backup_id=record["id"])


def _discard(*paths: Path) -> None:
    for path in paths:
        with suppress(OSError):
            path.unlink()


def verify_run_backup(dialect: Dialect, journal: Journal, record: dict[str, Any],
                      config: BackupSettings, *, notify: Notify | None = None,
                      full: bool = False) -> Snapshot:
    """Before a run uses its backup again (on resume): the snapshot layer must verify (else
    BackupError naming the layer: the run refuses to go on); the off-site copy is read back too,
    and a bad one is an error when required, otherwise a journaled warning."""
    from . import offsite

    path = Path(record["location"])
    manifest_path = manifest_path_for(path)
    if not manifest_path.exists() and not path.exists():
        raise BackupError(f"backup {record['id']}: layer snapshot ({path}) is missing",
                          "`safemigrate backup verify` can repair it from the off-site copy; or roll "
                          "the run back with the reverse strategy, which needs no snapshot")
    manifest = load_manifest(path)
    if manifest.get("sha256") != record["sha256"]:
        raise BackupError(f"backup {record['id']}: the manifest of {path.name} does not match the journal")
    verify_snapshot_layer(dialect, manifest, manifest_path, full=full, backup_id=record["id"])
    remote = layer(manifest, "offsite")
    if remote is not None and remote.get("status") == "verified":
        try:
            offsite.verify(config, remote, record["id"])
        except BackupError as exc:
            if config.offsite_required:
                raise
            message = f"{exc.message} (off-site layer not required: going on)"
            journal.event(record["run_id"], "backup.offsite_failed", message, level="warning",
                          data={"backup_id": record["id"], "location": remote["location"]})
            if notify is not None:
                notify("backup.offsite_failed", message, "warning")
    return Snapshot(record["id"], path, record["sha256"], record["size"], manifest["tables"],
                    manifest_path, manifest.get("raw_sha256", record["sha256"]),
                    manifest.get("compression", "none"), layers_of(manifest))


@contextmanager
def plain_snapshot(dialect: Dialect, location: str | Path | None, *,
                   needed: bool = True) -> Iterator[Path | None]:
    """The plain database file of a recorded snapshot, for code that reads it directly
    (restore, the online checks): the file itself, or for a compressed snapshot its content
    decompressed beside it as `<name>.db` (content checksum compared), removed on exit.
    With `needed` False a compressed snapshot yields None (nothing is decompressed)."""
    if location is None:
        yield None
        return
    path = Path(location)
    if not path.name.endswith(".zst"):
        yield path
        return
    if not needed:
        yield None
        return
    manifest = load_manifest(path)
    snap = layer(manifest, "snapshot") or {}
    where = f"backup {manifest.get('backup_id')}: layer snapshot ({path})"
    _check_size(path, snap, where)
    target = path.with_name(path.name[: -len(".zst")])
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
    except FileExistsError:  # someone else's copy: use a private name
        target = path.with_name(f".{path.name}.{os.getpid()}.{new_id()}.plain.tmp")
    try:
        check_free_space(path.parent, int((snap.get("raw_size") or 0) * _DISK_MARGIN))
        try:
            content_sha, _ = decompress_file(path, target)
        except OSError:
            raise
        except Exception as exc:  # noqa: BLE001 - a zstd error is a corrupted layer
            raise BackupError(f"{where} is corrupted: cannot decompress: {exc}",
                              "do not use this snapshot; use another layer") from None
        if content_sha != snap.get("raw_sha256"):
            raise BackupError(f"{where} is corrupted: it decompresses to sha256 {content_sha[:12]}, "
                              f"the verified snapshot had {str(snap.get('raw_sha256'))[:12]}",
                              "do not use this snapshot; use another layer")
        yield target
    finally:
        _discard(target)
