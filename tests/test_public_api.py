"""The public API is deliberate: this pins it, so a change to it is a conscious one."""

from __future__ import annotations

import safemigrate

PUBLIC = {
    "AbortedError", "AddColumn", "Backfill", "BackupError", "ChecksumMismatchError", "ConfigError",
    "CreateIndex", "CreateTable", "DatabaseError", "DatabaseLockedError", "Degradation",
    "DiskFullError", "DropIndex", "Event", "EventBus", "GuardTrippedError", "IrreversibleError",
    "LockHeldError", "Migration", "MigrationFileError", "Migrator", "NotADatabaseError",
    "NotReadyError", "RawSQL", "RollbackError", "SafeMigrateError", "Settings", "Step",
    "UsageError", "ValidationError", "__version__", "load_settings",
}


def test_all_is_pinned() -> None:
    assert set(safemigrate.__all__) == PUBLIC
    for name in safemigrate.__all__:
        assert hasattr(safemigrate, name), name


def test_every_error_is_a_safemigrate_error_with_a_hint() -> None:
    errors = [getattr(safemigrate, n) for n in PUBLIC if n.endswith("Error")]
    for cls in errors:
        assert issubclass(cls, safemigrate.SafeMigrateError)
        exc = cls("something is wrong")
        assert exc.hint and exc.one_line().startswith("error: something is wrong (hint: ")
        assert exc.exit_code in (0, 1, 2, 3)
