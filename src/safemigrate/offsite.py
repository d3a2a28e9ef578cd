"""Layer 3 of a backup: an off-site copy on any fsspec URL (s3://, gs://, file://, sftp://, ...).

A narrow interface between the backup and its storage (as Litestream keeps one): upload, read
back, download, remove. Every transfer is proven by its SHA-256: an upload is read back whole
and hashed; a download is hashed as it streams and deleted when it does not match.
"""

from __future__ import annotations

import hashlib
import os
import time
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from ._exceptions import BackupError, ConfigError

if TYPE_CHECKING:
    from .backup import BackupSettings

CHUNK = 8 << 20


def redact_url(url: str) -> str:
    """An fsspec URL as it may be printed or journaled: any password replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    netloc = f"{parts.username}:***@{host}" if parts.username else f"***@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


def _filesystem(url: str, options: dict[str, Any]) -> tuple[Any, str]:
    try:
        from fsspec.core import url_to_fs
    except ImportError:  # pragma: no cover - fsspec is a dependency
        raise ConfigError("off-site backups need fsspec", "pip install fsspec") from None
    try:
        return url_to_fs(url, **options)
    except ImportError as exc:
        raise ConfigError(f"the off-site URL {redact_url(url)} needs a package that is not "
                          f"installed: {exc}", "for s3:// install 'safemigrate[s3]' (s3fs); "
                          "gcsfs for gs://, paramiko for sftp://") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"bad off-site URL {redact_url(url)}: {exc}",
                          "use an fsspec URL such as s3://bucket/backups or file:///mnt/backups") from None


def remote_root(config: BackupSettings) -> tuple[Any, str]:
    fs, root = _filesystem(config.offsite, dict(config.offsite_options))
    return fs, root.rstrip("/")


def _join(root: str, name: str) -> str:
    return f"{root}/{name}" if root else name


def _ensure_folder(fs: Any, root: str) -> None:
    with suppress(Exception):  # object stores have no folders; a missing bucket fails the upload
        fs.makedirs(root, exist_ok=True)


def probe_offsite(config: BackupSettings) -> str:
    """Write, read back and delete a small object at the off-site root."""
    fs, root = remote_root(config)
    _ensure_folder(fs, root)
    path = _join(root, f".safemigrate-probe-{os.getpid()}-{time.time_ns()}")
    payload = b"safemigrate probe"
    with fs.open(path, "wb") as handle:
        handle.write(payload)
    try:
        with fs.open(path, "rb") as handle:
            if handle.read() != payload:
                raise BackupError("the probe object read back differs from what was written")
    finally:
        with suppress(Exception):
            fs.rm(path)
    return f"{config.redacted_offsite} writable"


def _hash_remote(fs: Any, path: str) -> tuple[str, int]:
    with suppress(Exception):  # read what is there now, not a cached listing
        fs.invalidate_cache(path)
    digest = hashlib.sha256()
    size = 0
    with fs.open(path, "rb", block_size=CHUNK) as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def upload(config: BackupSettings, local: Path, sha256: str, size: int) -> dict[str, Any]:
    """Copy `local` to the off-site root, read it back and compare: the layer's record
    (status "verified", or "failed" with the error)."""
    layer: dict[str, Any] = {"layer": "offsite", "name": local.name,
                             "location": f"{config.redacted_offsite.rstrip('/')}/{local.name}",
                             "size": size, "sha256": sha256, "status": "failed"}
    try:
        fs, root = remote_root(config)
        _ensure_folder(fs, root)
        path = _join(root, local.name)
        fs.put_file(str(local), path)
        actual, actual_size = _hash_remote(fs, path)
        if actual != sha256 or actual_size != size:
            raise BackupError(f"read back {actual_size} bytes with sha256 {actual[:12]}, "
                              f"sent {size} bytes with sha256 {sha256[:12]}")
    except Exception as exc:  # noqa: BLE001 - the caller decides whether this is fatal
        layer["error"] = _describe(exc)
        return layer
    layer["status"] = "verified"
    layer["verified_at"] = time.time()
    return layer


def upload_file(config: BackupSettings, local: Path) -> None:
    """Copy a small companion file (the manifest) next to the backup; no read-back."""
    fs, root = remote_root(config)
    fs.put_file(str(local), _join(root, local.name))


def _layer_path(config: BackupSettings, layer: dict[str, Any]) -> tuple[Any, str]:
    if config.offsite:
        fs, root = remote_root(config)
        return fs, _join(root, layer["name"])
    # the config no longer names an off-site root: the recorded URL (without credentials)
    location = layer["location"]
    fs, path = _filesystem(location, dict(config.offsite_options))
    return fs, path


def verify(config: BackupSettings, layer: dict[str, Any], backup_id: str) -> None:
    """Read the off-site copy back whole; a missing, truncated or changed copy is an error
    naming the layer."""
    where = f"backup {backup_id}: layer offsite ({layer['location']})"
    try:
        fs, path = _layer_path(config, layer)
        with suppress(Exception):
            fs.invalidate_cache(path)
        if not fs.exists(path):
            raise BackupError(f"{where} is missing", "take a new backup: safemigrate backup create")
        actual, size = _hash_remote(fs, path)
    except BackupError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise BackupError(f"{where} cannot be read: {_describe(exc)}",
                          "check the off-site URL, credentials and network") from None
    if size != layer["size"]:
        raise BackupError(f"{where} is truncated: {size} bytes, the manifest says {layer['size']}",
                          "do not use this copy; the local snapshot may still be good")
    if actual != layer["sha256"]:
        raise BackupError(f"{where} is corrupted: sha256 {actual[:12]} != recorded "
                          f"{layer['sha256'][:12]}",
                          "do not use this copy; the local snapshot may still be good")


def download(config: BackupSettings, layer: dict[str, Any], dest: Path, backup_id: str) -> None:
    """Fetch the off-site copy to `dest` (mode 0600), proven by its checksum."""
    where = f"backup {backup_id}: layer offsite ({layer['location']})"
    digest = hashlib.sha256()
    size = 0
    try:
        fs, path = _layer_path(config, layer)
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out, fs.open(path, "rb", block_size=CHUNK) as handle:
            while chunk := handle.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
    except Exception as exc:  # noqa: BLE001
        with suppress(OSError):
            dest.unlink()
        raise BackupError(f"{where} cannot be downloaded: {_describe(exc)}",
                          "check the off-site URL, credentials and network") from None
    if digest.hexdigest() != layer["sha256"] or size != layer["size"]:
        with suppress(OSError):
            dest.unlink()
        raise BackupError(f"{where} is corrupted: sha256 {digest.hexdigest()[:12]} != recorded "
                          f"{layer['sha256'][:12]}", "do not use this copy")


def remove(config: BackupSettings, layer: dict[str, Any], manifest_name: str | None) -> None:
    fs, path = _layer_path(config, layer)
    fs.rm(path)
    if manifest_name:
        with suppress(Exception):
            fs.rm(path.rsplit("/", 1)[0] + "/" + manifest_name if "/" in path else manifest_name)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BackupError):
        return exc.message
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
