"""Fault injection: a test hook, not an operator feature.

`fault(point)` raises `FaultInjected` when the environment variable ``SAFEMIGRATE_FAULTS``
(comma-separated point names) names `point`. The rollback executor calls it at the start of
each of its steps, so tests (and rehearsals on a copy of production) can make any step fail and
check that the recovery leaves no data lost::

    SAFEMIGRATE_FAULTS=rollback.validate safemigrate rollback --yes

Points: ``rollback.prerequisites``, ``rollback.stop_writes``, ``rollback.backup``,
``rollback.perform``, ``rollback.rebuild``, ``rollback.version``, ``rollback.validate``,
``rollback.service``. Unset (the normal case) it costs one dictionary lookup.
"""

from __future__ import annotations

import os

from ._exceptions import SafeMigrateError

ENV_VAR = "SAFEMIGRATE_FAULTS"
ROLLBACK_POINTS = tuple(f"rollback.{step}" for step in (
    "prerequisites", "stop_writes", "backup", "perform", "rebuild", "version", "validate", "service"))


class FaultInjected(SafeMigrateError):
    """A failure injected on purpose through SAFEMIGRATE_FAULTS (tests only)."""

    default_hint = f"unset {ENV_VAR}: it is a test hook"


def active() -> set[str]:
    return {p.strip() for p in os.environ.get(ENV_VAR, "").split(",") if p.strip()}


def fault(point: str) -> None:
    """Raise FaultInjected when `point` is listed in SAFEMIGRATE_FAULTS."""
    if point in active():
        raise FaultInjected(f"fault injected at {point} ({ENV_VAR})")
