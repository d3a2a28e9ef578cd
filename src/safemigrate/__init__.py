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
from .migration import Migration
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
    "GuardTrippedError",
    "IrreversibleError",
    "LockHeldError",
    "Migration",
    "MigrationFileError",
    "NotADatabaseError",
    "NotReadyError",
    "RawSQL",
    "RollbackError",
    "SafeMigrateError",
    "Step",
    "UsageError",
    "ValidationError",
    "__version__",
]
