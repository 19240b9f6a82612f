"""Where audit records go: structlog, rendered to one or more sinks.

Follows structlog's advice for production logs: ``merge_contextvars`` (the
session id, client and listener are bound once per connection task, and
trio copies the context into the session's child tasks), the level, an ISO
8601 UTC timestamp with microseconds (NIST AU-8), then rendering.  Each sink
renders for itself: a JSON-lines file for machines, a readable console line
for people.

Writes are synchronous and small (one ``write`` and ``flush`` per record to
the OS page cache).  The durable, non-blocking sink with fsync policies and
hash chaining is the audit-trail issue's work; this module keeps the record
flow and the rendering in one place so that work has one place to change.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any, Protocol, TextIO

import structlog

from popguard.core.records import AuditRecord

#: Bumped whenever a record's fields change meaning; every record carries it.
SCHEMA_VERSION = 1

EventDict = MutableMapping[str, Any]


class Sink(Protocol):
    def write(self, event_dict: EventDict) -> None: ...
    def close(self) -> None: ...


class JsonLinesSink:
    """Appends one JSON object per line.  JSON escapes CR/LF (CWE-117)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._render = structlog.processors.JSONRenderer(sort_keys=False)
        self._lock = threading.Lock()
        self._file: TextIO = open(path, "a", encoding="utf-8")  # noqa: SIM115

    def write(self, event_dict: EventDict) -> None:
        line = self._render(None, "", event_dict)
        assert isinstance(line, str)
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()


_CONSOLE_HIDDEN = frozenset({"schema", "instance"})


class ConsoleSink:
    """Readable lines for a person watching the proxy (``make run``)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        colors = self._stream.isatty()
        self._render = structlog.dev.ConsoleRenderer(colors=colors, sort_keys=False)

    def write(self, event_dict: EventDict) -> None:
        # A person needs the event and its facts; the fixed context (schema,
        # instance) and empty fields are for machines.  ConsoleRenderer
        # consumes keys as it goes, so it gets its own copy.
        shown = {
            key: value
            for key, value in event_dict.items()
            if value is not None and key not in _CONSOLE_HIDDEN
        }
        line = self._render(None, "", shown)
        assert isinstance(line, str)
        self._stream.write(line + "\n")
        self._stream.flush()

    def close(self) -> None:
        pass


class _FanOut:
    """The last processor: hand the finished event to every sink."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks

    def __call__(self, logger: object, method: str, event_dict: EventDict) -> EventDict:
        for sink in self.sinks:
            sink.write(event_dict)
        raise structlog.DropEvent


def _add_schema(logger: object, method: str, event_dict: EventDict) -> EventDict:
    event_dict.setdefault("schema", SCHEMA_VERSION)
    return event_dict


class AuditLog:
    """Configures structlog once and turns core records into log events."""

    def __init__(self, sinks: list[Sink], *, instance: str = "popguard") -> None:
        self.sinks = sinks
        self.instance = instance
        structlog.configure(
            processors=[
                structlog.contextvars.merge_contextvars,
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                _add_schema,
                _FanOut(sinks),
            ],
            cache_logger_on_first_use=False,
        )
        self._log = structlog.get_logger("popguard.audit").bind(instance=instance)

    def emit(self, record: AuditRecord) -> None:
        self._log.info(record.event.value, **record.fields)

    def event(self, name: str, **fields: Any) -> None:
        """A record from the shell itself (start, stop, listener errors)."""
        self._log.info(name, **fields)

    def warning(self, name: str, **fields: Any) -> None:
        self._log.warning(name, **fields)

    def error(self, name: str, **fields: Any) -> None:
        self._log.error(name, **fields)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def open_audit_log(*, file: str | None, console: bool, instance: str = "popguard") -> AuditLog:
    sinks: list[Sink] = []
    if file:
        sinks.append(JsonLinesSink(file))
    if console:
        sinks.append(ConsoleSink())
    return AuditLog(sinks, instance=instance)


@contextmanager
def session_context(**fields: Any) -> Iterator[None]:
    """Bind fields (session id, client, listener) to every record in this task."""
    with structlog.contextvars.bound_contextvars(**fields):
        yield
