"""Notifications through apprise (e-mail, Slack, Teams, ntfy, webhooks, ... one URL each).

`[notify] urls = ["mailto://…", "slack://…", "json://host/path"]` and `min_severity` (info,
warning, error, critical; default warning). Events at or above it are sent from a background
thread, so a slow endpoint never holds a batch back; `close()` delivers what is queued.
Progress kinds and per-batch quarantine notes are never sent.
"""

from __future__ import annotations

import json
import queue
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._exceptions import ConfigError
from .events import Event

if TYPE_CHECKING:
    from .settings import Settings

SEVERITY = {"info": 0, "warning": 1, "error": 2, "critical": 3}
NEVER = ("batch", "progress", "metrics", "quarantine", "step.started", "step.completed")


@dataclass
class NotifySettings:
    """`[notify]`: where notifications go and from which severity on."""

    urls: list[str] = field(default_factory=list)
    min_severity: str = "warning"
    exclude: list[str] = field(default_factory=list)  # further event kinds (or prefixes) to skip
    title: str = "safemigrate"
    flush_timeout: float = 15.0  # seconds `close()` waits for queued notifications

    def __post_init__(self) -> None:
        if self.min_severity not in SEVERITY:
            raise ConfigError(f"[notify] min_severity must be one of {', '.join(SEVERITY)}, "
                              f"got {self.min_severity!r}")
        if not all(isinstance(u, str) and u for u in self.urls):
            raise ConfigError("[notify] urls must be a list of apprise URLs")

    @classmethod
    def from_settings(cls, settings: Settings) -> NotifySettings:
        from .settings import section_settings

        return section_settings(cls, settings.section("notify"), "notify")


def format_event(event: Event, title: str, database: str = "") -> tuple[str, str]:
    """The notification's title and body for an event."""
    head = f"{title} {event.level}: {event.kind}"
    lines = [event.message]
    if event.run_id:
        lines.append(f"run: {event.run_id}")
    if database:
        lines.append(f"database: {database}")
    figures = {k: v for k, v in (event.data or {}).items() if v not in (None, "", [], {})}
    if figures:
        lines.append("details: " + json.dumps(figures, default=str, sort_keys=True))
    return head, "\n".join(lines)


class Notifier:
    """Event subscriber that forwards events to apprise URLs, filtered by severity."""

    def __init__(self, settings: NotifySettings, database: str = "") -> None:
        self.s = settings
        self.database = database
        self.sent: list[tuple[str, str, bool]] = []
        self.errors: list[str] = []
        self._queue: queue.Queue[Event | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._apprise: Any = None
        if settings.urls:
            import apprise

            self._apprise = apprise.Apprise()
            for url in settings.urls:
                if not self._apprise.add(url):
                    raise ConfigError(f"[notify] {url.split('://')[0]}:// URL is not one apprise knows "
                                      "or is malformed", "see https://github.com/caronc/apprise/wiki")

    @property
    def enabled(self) -> bool:
        return self._apprise is not None

    def wants(self, event: Event) -> bool:
        if event.kind.startswith(NEVER) or any(event.kind.startswith(x) for x in self.s.exclude):
            return False
        return SEVERITY.get(event.level, 0) >= SEVERITY[self.s.min_severity]

    def __call__(self, event: Event) -> None:
        if not self.enabled or not self.wants(event):
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._worker, name="safemigrate-notify", daemon=True)
            self._thread.start()
        self._queue.put(event)

    def _worker(self) -> None:
        import apprise

        types = {"info": apprise.NotifyType.INFO, "warning": apprise.NotifyType.WARNING,
                 "error": apprise.NotifyType.FAILURE, "critical": apprise.NotifyType.FAILURE}
        while True:
            event = self._queue.get()
            try:
                if event is None:
                    return
                title, body = format_event(event, self.s.title, self.database)
                try:
                    ok = bool(self._apprise.notify(body=body, title=title,
                                                   notify_type=types.get(event.level, types["info"])))
                except Exception as exc:  # noqa: BLE001 - a notification never breaks the run
                    ok = False
                    self.errors.append(f"{event.kind}: {exc}")
                if not ok:
                    self.errors.append(f"{event.kind}: not delivered to every URL")
                self.sent.append((title, body, ok))
            finally:
                self._queue.task_done()

    def close(self) -> None:
        """Deliver what is queued (up to flush_timeout seconds) and stop the worker."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(timeout=self.s.flush_timeout)
        self._thread = None
