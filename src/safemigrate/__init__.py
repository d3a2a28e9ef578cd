"""safemigrate: data migrations on live SQL databases that never lose a row."""

from __future__ import annotations

from ._exceptions import (
    AbortedError,
    BackupError,
    ChecksumMismatchError,
    ConfigError,
    DatabaseError,
    DatabaseLockedError,
    DiskFullError,
    GuardTrippedError,
    IrreversibleError,
    LockHeldError,
    MigrationFileError,
    NotADatabaseError,
    NotReadyError,
    RollbackError,
    SafeMigrateError,
    UsageError,
    ValidationError,
)
from ._version import __version__
from .degrade import Degradation
from .events import Event, EventBus
from .migration import Migration
from .migrator import Migrator
from .settings import Settings, load_settings
from .steps import AddColumn, Backfill, CreateIndex, CreateTable, DropIndex, RawSQL, Step

__all__ = [
    "AbortedError",
    "AddColumn",
    "Backfill",
    "BackupError",
    "ChecksumMismatchError",
    "ConfigError",
    "CreateIndex",
    "CreateTable",
    "DatabaseError",
    "DatabaseLockedError",
    "Degradation",
    "DiskFullError",
    "DropIndex",
    "Event",
    "EventBus",
    "GuardTrippedError",
    "IrreversibleError",
    "load_settings",
    "LockHeldError",
    "Migration",
    "MigrationFileError",
    "Migrator",
    "NotADatabaseError",
    "NotReadyError",
    "RawSQL",
    "RollbackError",
    "SafeMigrateError",
    "Settings",
    "Step",
    "UsageError",
    "ValidationError",
    "__version__",
]
