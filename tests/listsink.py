"""An audit sink for tests that keeps every record in a list."""

from __future__ import annotations

import threading
from typing import Any


class ListSink:
    """A plain sink (``write``/``close``) that keeps a copy of every event dict.

    Thread-safe: a writer thread (a queued sink's) may write while the test
    reads.
    """

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def write(self, event_dict: Any) -> None:
        with self._lock:
            self.events.append(dict(event_dict))

    def close(self) -> None:
        pass

    def named(self, name: str, **match: object) -> list[dict[str, Any]]:
        """The records of event *name* whose fields equal *match*."""
        with self._lock:
            return [
                e
                for e in self.events
                if e["event"] == name and all(e.get(k) == v for k, v in match.items())
            ]

    def names(self) -> list[str]:
        with self._lock:
            return [str(e["event"]) for e in self.events]
