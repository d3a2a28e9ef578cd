"""Settings from (in order of precedence) arguments, environment, safemigrate.toml, pyproject.toml."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ._exceptions import ConfigError

CONFIG_FILE = "safemigrate.toml"


@dataclass
class Settings:
    """Everything a run can be tuned with. Validated on construction."""

    db: str | None = None
    migrations: Path = Path("migrations")
    backup_dir: Path = Path(".safemigrate/backups")
    batch_size: int = 2000
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    lock_timeout: float = 10.0
    lock_stale_after: float = 60.0
    disk_factor: float = 3.0
    auto_rollback: bool = True

    def __post_init__(self) -> None:
        self.migrations = Path(self.migrations)
        self.backup_dir = Path(self.backup_dir)
        _positive_int("batch_size", self.batch_size)
        _positive_int("workers", self.workers)
        for name in ("lock_timeout", "lock_stale_after", "disk_factor"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        if not isinstance(self.auto_rollback, bool):
            raise ConfigError(f"auto_rollback must be true or false, got {self.auto_rollback!r}")


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive whole number, got {value!r}")


def _read_config(directory: Path) -> tuple[dict[str, Any], Path | None]:
    for path, section in ((directory / CONFIG_FILE, None), (directory / "pyproject.toml", "tool")):
        if not path.is_file():
            continue
        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path.name} is not valid TOML: {exc}") from None
        if section is not None:
            data = data.get("tool", {}).get("safemigrate")
            if data is None:
                continue
        if not isinstance(data, dict):
            raise ConfigError(f"{path.name}: [tool.safemigrate] must be a table")
        return data, path
    return {}, None


def load_settings(directory: Path | None = None, **overrides: Any) -> Settings:
    """Merge config file, SAFEMIGRATE_DB and explicit overrides (None means not given)."""
    directory = directory or Path.cwd()
    data, path = _read_config(directory)
    known = {f.name for f in fields(Settings)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"unknown setting {unknown[0]!r} in {path.name if path else 'config'}",
            "known settings: " + ", ".join(sorted(known)),
        )
    merged: dict[str, Any] = dict(data)
    for key in ("migrations", "backup_dir"):
        if key in merged and path is not None and not Path(merged[key]).is_absolute():
            merged[key] = path.parent / merged[key]
    if os.environ.get("SAFEMIGRATE_DB"):
        merged["db"] = os.environ["SAFEMIGRATE_DB"]
    merged.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return Settings(**merged)
    except TypeError as exc:
        raise ConfigError(f"bad setting: {exc}") from None
