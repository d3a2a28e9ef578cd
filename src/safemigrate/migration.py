"""Migrations: a list of steps plus the checks that prove them; loaded from NNNN_name.py files."""

from __future__ import annotations

import hashlib
import importlib.util
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import Connection

from ._exceptions import MigrationFileError
from .steps import Backfill, Step

FILE_PATTERN = re.compile(r"^(\d{4,})_([A-Za-z0-9_]+)\.py$")
PHASES = ("preparation", "structure", "transformation", "validation", "cleanup")

ConnectionCheck = Callable[[Connection], object]


@dataclass
class Migration:
    """A migration as data. `invariants` and `smoke_checks` are functions given a connection
    that raise (or return False) when the migrated database is wrong; smoke checks run inside a
    transaction that is rolled back, so they may write. `checks` run before anything changes.
    `rollback_smoke_checks` are smoke checks for the schema as it is after a rollback (the
    `smoke_checks` describe the migrated one); the rollback validator runs them."""

    id: str
    steps: Sequence[Step] = field(default_factory=list)
    description: str = ""
    invariants: Sequence[ConnectionCheck] = field(default_factory=list)
    smoke_checks: Sequence[ConnectionCheck] = field(default_factory=list)
    checks: Sequence[ConnectionCheck] = field(default_factory=list)
    rollback_smoke_checks: Sequence[ConnectionCheck] = field(default_factory=list)
    path: Path | None = None
    checksum: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise MigrationFileError("Migration needs an id, e.g. id='0001_add_search_fields'")
        self.steps = list(self.steps)
        if not self.steps:
            raise MigrationFileError(f"migration {self.id} has no steps")
        for step in self.steps:
            if not isinstance(step, Step):
                raise MigrationFileError(
                    f"migration {self.id}: {step!r} is not a step",
                    "use AddColumn, CreateTable, CreateIndex, DropIndex, RawSQL or Backfill",
                )
        for name in ("invariants", "smoke_checks", "checks", "rollback_smoke_checks"):
            funcs = list(getattr(self, name))
            if not all(callable(f) for f in funcs):
                raise MigrationFileError(f"migration {self.id}: every entry of {name} must be callable")
            setattr(self, name, funcs)

    @property
    def reversible(self) -> bool:
        return all(step.reversible for step in self.steps)

    def tables(self) -> set[str]:
        """Tables the migration touches (those that exist before it runs get snapshotted)."""
        out: set[str] = set()
        for step in self.steps:
            out |= step.tables()
        return out

    def created_tables(self) -> set[str]:
        out: set[str] = set()
        for step in self.steps:
            out |= step.creates_tables()
        return out

    def written_columns(self) -> dict[str, set[str]]:
        """Columns each table may see changed: backfilled and added ones."""
        out: dict[str, set[str]] = {}
        for step in self.steps:
            if isinstance(step, Backfill):
                out.setdefault(step.table, set()).update(step.writes)
        return out

    def phase_of(self, index: int) -> str:
        """Schema steps before the first backfill shape the structure; backfills transform;
        steps after the last backfill (typically indexes) are built in cleanup, once the data
        is in place and validated."""
        backfills = [i for i, s in enumerate(self.steps) if isinstance(s, Backfill)]
        if not backfills or index < backfills[0]:
            return "structure"
        if index <= backfills[-1]:
            return "transformation"
        return "cleanup"


def file_checksum(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_file(path: Path) -> Migration:
    """Import one migration file and return its `migration`, with path and checksum set."""
    match = FILE_PATTERN.match(path.name)
    if not match:
        raise MigrationFileError(
            f"migration file name {path.name!r} is not NNNN_name.py",
            "name files like 0001_add_search_fields.py",
        )
    module_name = f"safemigrate_migrations.m{match.group(1)}_{match.group(2)}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise MigrationFileError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except MigrationFileError as exc:
        sys.modules.pop(module_name, None)
        raise MigrationFileError(f"{path.name}: {exc.message}", exc.hint) from None
    except Exception as exc:  # a migration file is user code: any failure is a file error
        sys.modules.pop(module_name, None)
        where = ""
        if isinstance(exc, SyntaxError):
            where = f" (line {exc.lineno})"
        raise MigrationFileError(
            f"{path.name} does not load{where}: {type(exc).__name__}: {exc}",
        ) from None
    migration = getattr(module, "migration", None)
    if not isinstance(migration, Migration):
        raise MigrationFileError(f"{path.name} does not define `migration = Migration(...)`")
    migration.path = path.resolve()
    migration.checksum = file_checksum(path)
    return migration


def discover(folder: Path) -> list[Migration]:
    """All migrations in a folder, in file order; ids must be unique."""
    if not folder.is_dir():
        raise MigrationFileError(
            f"migrations folder {folder} does not exist",
            "run `safemigrate init` or pass --migrations DIR",
        )
    migrations = []
    seen: dict[str, Path] = {}
    for path in sorted(folder.glob("*.py")):
        if path.name.startswith("_"):
            continue
        migration = load_file(path)
        if migration.id in seen:
            raise MigrationFileError(
                f"migration id {migration.id!r} is defined twice ({seen[migration.id].name}, {path.name})"
            )
        seen[migration.id] = path
        migrations.append(migration)
    return migrations
