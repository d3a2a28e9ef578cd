"""Settings from (in order of precedence) arguments, environment, safemigrate.toml, pyproject.toml."""

from __future__ import annotations

import os
import tomllib
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

from ._exceptions import ConfigError

CONFIG_FILE = "safemigrate.toml"

# Tables in the config file, each read by the module that owns it (see `section_settings`).
SECTIONS = ("backup", "checks", "guards", "monitor", "notify", "hooks", "degradation", "canaries",
            "rollback")


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
    online: bool = True  # capture application writes during the migration (triggers)
    # The drain of captured writes after a scan: passes while the backlog shrinks, at most
    # this many (then a final pass) or this long; what is left waits for the next drain.
    drain_passes: int = 10
    drain_seconds: float = 60.0
    sections: dict[str, Any] = field(default_factory=dict)

    def section(self, name: str) -> dict[str, Any]:
        """The raw `[name]` table of the config (validated by its owner's dataclass)."""
        return dict(self.sections.get(name) or {})

    def __post_init__(self) -> None:
        self.migrations = Path(self.migrations)
        self.backup_dir = Path(self.backup_dir)
        _positive_int("batch_size", self.batch_size)
        _positive_int("workers", self.workers)
        _positive_int("drain_passes", self.drain_passes)
        for name in ("lock_timeout", "lock_stale_after", "disk_factor", "drain_seconds"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        for name in ("auto_rollback", "online"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")


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
    known = {f.name for f in fields(Settings)} - {"sections"}
    sections = {k: data.pop(k) for k in list(data) if k in SECTIONS}
    for name, table in sections.items():
        if not isinstance(table, dict):
            raise ConfigError(f"[{name}] in {path.name if path else 'config'} must be a table")
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"unknown setting {unknown[0]!r} in {path.name if path else 'config'}",
            "known settings: " + ", ".join(sorted(known)),
        )
    merged: dict[str, Any] = dict(data)
    merged["sections"] = sections
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


S = TypeVar("S")


def section_settings(cls: type[S], data: dict[str, Any], name: str) -> S:
    """Build a section dataclass from its config table, with one-line errors for unknown
    keys and wrongly typed values (ints are accepted where floats are expected)."""
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"unknown setting {key!r} in [{name}]",
                              "known: " + ", ".join(sorted(known)))
        expected = hints[key]
        origin = getattr(expected, "__origin__", None) or expected
        ok = True
        if expected is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        elif expected is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif expected is bool:
            ok = isinstance(value, bool)
        elif expected is str:
            ok = isinstance(value, str)
        elif origin in (list, dict):
            ok = isinstance(value, origin)
        if not ok:
            raise ConfigError(f"[{name}] {key} must be {getattr(expected, '__name__', expected)}, "
                              f"got {value!r}")
    kwargs = {k: (float(v) if hints[k] is float else v) for k, v in data.items()}
    missing = [f.name for f in known.values() if f.default is MISSING
               and f.default_factory is MISSING and f.name not in kwargs]
    if missing:
        raise ConfigError(f"[{name}] needs {missing[0]}")
    return cls(**kwargs)
