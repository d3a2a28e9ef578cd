"""One exception tree; every error names the problem and carries a hint.

    SafeMigrateError                      exit 1 unless a subclass says otherwise
    ├── UsageError                        exit 2: the operator must change what they typed
    │   ├── ConfigError                   bad config value, unknown key, wrong URL
    │   ├── MigrationFileError            a migration file that does not load or is malformed
    │   └── ChecksumMismatchError         an applied migration file was edited afterwards
    ├── DatabaseError                     the database cannot be reached or read
    │   ├── NotADatabaseError             the file is not a database of the expected engine
    │   └── DatabaseLockedError           another connection holds a lock we need
    ├── LockHeldError                     another safemigrate run holds the journal lock
    ├── BackupError                       a backup could not be written or does not verify
    │   └── DiskFullError                 no space left where the backup goes
    ├── NotReadyError                     pre-migration checks failed
    ├── IrreversibleError                 a rollback would need an inverse that does not exist
    ├── ValidationError                   the migrated data does not validate (exit 3 after auto-rollback)
    ├── RollbackError                     rollback could not prove the original state
    ├── GuardTrippedError                 a guard tripped or a rollback was requested (exit 3)
    └── AbortedError                      the run was stopped on request (resumable)
"""

from __future__ import annotations


class SafeMigrateError(Exception):
    """Base of every error safemigrate raises on purpose."""

    exit_code = 1
    default_hint = "see `safemigrate status` and `safemigrate history` for the journal"

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint or self.default_hint

    def one_line(self) -> str:
        """The form the CLI prints: problem, then what to do about it."""
        return f"error: {self.message} (hint: {self.hint})"


class UsageError(SafeMigrateError):
    exit_code = 2
    default_hint = "see `safemigrate --help`"


class ConfigError(UsageError):
    default_hint = "check --db, SAFEMIGRATE_DB and safemigrate.toml"


class MigrationFileError(UsageError):
    default_hint = "a migration file must define `migration = Migration(id=..., steps=[...])`"


class ChecksumMismatchError(UsageError):
    default_hint = "restore the applied file from version control and put changes in a new migration"


class DatabaseError(SafeMigrateError):
    default_hint = "check that the database exists and the URL is right"


class NotADatabaseError(DatabaseError):
    default_hint = "point --db at a database file or a server URL"


class DatabaseLockedError(DatabaseError):
    default_hint = ("another connection holds a write lock; finish it, or retry with a longer "
                    "lock_timeout in safemigrate.toml")


class LockHeldError(SafeMigrateError):
    default_hint = "wait for the other run, or check `safemigrate status`; a dead runner's lock is taken over"


class BackupError(SafeMigrateError):
    default_hint = "check the backup folder and `safemigrate history`"


class DiskFullError(BackupError):
    default_hint = "free space at the backup location or point --backup-dir elsewhere"


class NotReadyError(SafeMigrateError):
    default_hint = "fix the failed checks shown by `safemigrate check`, or --skip-check NAME with a reason"


class IrreversibleError(SafeMigrateError):
    default_hint = "use `safemigrate rollback --strategy restore` to restore from the verified snapshot"


class ValidationError(SafeMigrateError):
    exit_code = 3
    default_hint = "the run was rolled back; see `safemigrate history` for the failed checks"


class RollbackError(SafeMigrateError):
    default_hint = "the pre-rollback backup is listed in `safemigrate history`; do not write to the database"


class GuardTrippedError(SafeMigrateError):
    """A guard tripped (or an operator asked for an immediate rollback) during a run; the runner
    rolls the run back and exits 3. Carries the guard's name, figures and rollback strategy."""

    exit_code = 3
    default_hint = "the run was rolled back; `safemigrate history` shows the guard's figures"

    def __init__(self, message: str, hint: str | None = None, *, guard: str = "",
                 figures: dict | None = None, strategy: str = "reverse",
                 request_id: str | None = None) -> None:
        super().__init__(message, hint)
        self.guard = guard
        self.figures = dict(figures or {})
        self.strategy = strategy
        self.request_id = request_id


class AbortedError(SafeMigrateError):
    default_hint = "run `safemigrate run` to resume, or `safemigrate rollback` to undo"
