"""Events out: the runner emits, subscribers render (console, JSON lines, journal, hooks)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Event:
    """Something that happened during a run. `kind` is dotted: phase.started, batch, alert…"""

    kind: str
    message: str
    run_id: str | None = None
    level: str = "info"
    data: dict[str, Any] = field(default_factory=dict)
    ts: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


Subscriber = Callable[[Event], None]

# High-frequency kinds: progress lives in the steps table, not in the audit trail.
PROGRESS_KINDS = frozenset({"batch", "progress"})


class EventBus:
    """Fan-out of events. A subscriber that fails never stops the migration."""

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []
        self.errors: list[str] = []

    def subscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.append(subscriber)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        if subscriber in self._subscribers:
            self._subscribers.remove(subscriber)

    def emit(self, event: Event) -> None:
        for subscriber in list(self._subscribers):
            try:
                subscriber(event)
            except Exception as exc:  # noqa: BLE001 - a renderer must not break the run
                self.errors.append(f"{getattr(subscriber, '__name__', subscriber)}: {exc}")
