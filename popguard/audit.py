"""Where audit records go: structlog, then each sink on its own writer thread.

Records are built by structlog's processors on the caller's thread (the
trio event loop): the session's fields (the session id, client and
listener, bound once per connection task by :func:`session_context`; trio
copies the context into the session's child tasks), the level, an ISO 8601
UTC timestamp with microseconds (NIST AU-8) and the schema version.  The last processor hands
the finished record to every sink:

* A *queued* sink (:class:`~popguard.sinks.base.QueuedSink`: the file,
  stdout, syslog and the console as built by :func:`open_audit_log_from_config`)
  only enqueues on this thread; its writer thread does the I/O.  So
  :meth:`AuditLog.emit` never waits for a disk or a network.  When a queue
  is full the record is dropped for that sink, counted in ``lost``, and the
  gap is written into that sink's stream as ``audit.records.lost``.
* A *plain* sink (anything with ``write`` and ``close``, e.g. a test's list)
  is called inline, as before.

Health (``docs/audit-delivery.md``): every queued sink tracks ``healthy``,
``lost`` and ``last_error``; when one fails or recovers, the log writes
``audit.sink.failed`` / ``audit.sink.recovered`` to the *other* sinks
(PCI DSS 10.7.2).  :attr:`AuditLog.healthy` covers the durable sinks (the
file); with ``on_failure="fail-closed"``, :attr:`AuditLog.accepting_sessions`
is False while one is unhealthy.  :meth:`AuditLog.emit_durable` waits
(without blocking other trio tasks) until the file has written *and*
fsynced a record.
"""

from __future__ import annotations

import atexit
import contextvars
import datetime
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from contextlib import suppress
from typing import Any, Final, Literal, Protocol, TextIO

import structlog
import trio

from popguard.config import AuditConfig
from popguard.core.records import AuditRecord
from popguard.sinks.base import DurableTicket, QueuedSink, ThreadedSink
from popguard.sinks.file import FileSink
from popguard.sinks.stream import StdoutSink
from popguard.sinks.syslog import SyslogTCPSink, SyslogUDPSink
from popguard.trail.chain import load_key

__all__ = [
    "SCHEMA_VERSION",
    "AuditLog",
    "ConsoleSink",
    "EventDict",
    "FileSink",
    "JsonLinesSink",
    "OnFailure",
    "Sink",
    "StdoutSink",
    "SyslogTCPSink",
    "SyslogUDPSink",
    "ThreadedSink",
    "open_audit_log",
    "open_audit_log_from_config",
    "session_context",
]

#: Bumped whenever a record's fields change meaning; every record carries it.
SCHEMA_VERSION = 1

EventDict = MutableMapping[str, Any]

OnFailure = Literal["fail-open", "fail-closed"]

#: How long :meth:`AuditLog.close` waits for the queues to drain by default.
DEFAULT_CLOSE_TIMEOUT: Final = 5.0


class Sink(Protocol):
    def write(self, event_dict: EventDict) -> None: ...
    def close(self) -> None: ...


#: The JSON-lines file sink under its original name: ``JsonLinesSink(path)``.
JsonLinesSink = FileSink

_CONSOLE_HIDDEN = frozenset({"schema", "instance"})


class ConsoleSink:
    """Readable lines for a person watching the proxy (``make run``).

    A plain sink: it writes where it is called.  :func:`open_audit_log_from_config`
    runs it on a writer thread, so that a stalled terminal or pipe cannot
    stall the proxy.
    """

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


#: Keys that carry dispatch options through structlog (never written).
_TICKET: Final = "__popguard_ticket"
_EXCLUDE: Final = "__popguard_exclude"


class _SinkLogger:
    """The logger at the end of an :class:`AuditLog`'s own structlog pipeline.

    The pipeline's last processor (``AuditLog._deliver``) hands each finished
    event dict to the log's sinks and renders it as ``""``, so structlog
    calls this logger with nothing left to do: the record is not repacked
    into keyword arguments on its way out.  Each ``AuditLog`` has its own
    pipeline, so a second instance (a test, a worker) never rewires the
    first, and nothing configures structlog for the whole process.
    """

    __slots__ = ()

    def msg(self, *_rendered: str) -> None:
        """Nothing: the last processor delivered the record."""

    info = warning = error = msg


def _add_schema(logger: object, method: str, event_dict: EventDict) -> EventDict:
    event_dict.setdefault("schema", SCHEMA_VERSION)
    return event_dict


def iso_utc(now: float) -> str:
    """``now`` (seconds since the epoch) as structlog's ISO UTC stamp.

    The same text as ``TimeStamper(fmt="iso", utc=True)``: to the
    microsecond, ``Z`` for UTC, and (as ``datetime.isoformat``) no
    fraction when the microseconds are 0.  The date and time of day are
    formatted once per second, not once per record: half the cost.
    """
    global _second_text
    seconds = int(now)
    cached_second, text = _second_text  # one tuple: a consistent pair on any thread
    if cached_second != seconds:
        moment = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
        text = moment.replace(tzinfo=None).isoformat()
        _second_text = (seconds, text)
    micro = int((now - seconds) * 1_000_000)
    return f"{text}.{micro:06d}Z" if micro else text + "Z"


#: The last second :func:`iso_utc` formatted, and its text.
_second_text: tuple[int, str] = (-1, "")


def _add_timestamp(logger: object, method: str, event_dict: EventDict) -> EventDict:
    """The record's time (NIST AU-8), as :func:`iso_utc` writes it."""
    event_dict["timestamp"] = iso_utc(time.time())
    return event_dict


class AuditLog:
    """Turns core records into log events and delivers them to every sink."""

    def __init__(
        self,
        sinks: Sequence[Sink | QueuedSink],
        *,
        instance: str = "popguard",
        worker: int | None = None,
        on_failure: OnFailure = "fail-open",
        durable_timeout: float = 5.0,
    ) -> None:
        if on_failure not in ("fail-open", "fail-closed"):
            raise ValueError(f"on_failure must be fail-open or fail-closed, got {on_failure!r}")
        self.sinks = list(sinks)
        self.instance = instance
        self.on_failure: OnFailure = on_failure
        #: Seconds :meth:`emit_durable` waits for the fsync before giving up.
        self.durable_timeout = durable_timeout
        self._queued: list[QueuedSink] = [s for s in self.sinks if isinstance(s, QueuedSink)]
        self._plain: list[Sink] = [s for s in self.sinks if not isinstance(s, QueuedSink)]
        self._durable = [s for s in self._queued if s.durable]
        self._plain_lock = threading.RLock()
        self._closed = False
        for sink in self._queued:
            sink.attach(self, instance=instance, worker=worker)
            sink.start()
        identity: dict[str, Any] = {"instance": instance}
        if worker is not None:
            identity["worker"] = worker  # one chain and file per worker process
        self._log = structlog.wrap_logger(
            _SinkLogger(),
            processors=[
                _merge_session,
                structlog.processors.add_log_level,
                _add_timestamp,
                _add_schema,
                self._deliver,
            ],
            wrapper_class=structlog.make_filtering_bound_logger(0),
            cache_logger_on_first_use=False,
        ).bind(**identity)
        if self._queued:
            atexit.register(_close_at_exit, weakref.ref(self))

    # -- health ------------------------------------------------------------

    @property
    def durable(self) -> bool:
        """Whether a durable sink (an audit file) is configured."""
        return bool(self._durable)

    @property
    def healthy(self) -> bool:
        """Every durable sink writes, and has recorded every record it dropped."""
        return all(sink.healthy for sink in self._durable)

    @property
    def lost(self) -> int:
        """Records dropped, summed over the sinks (a record lost by two counts twice)."""
        return sum(sink.lost for sink in self._queued)

    @property
    def fail_closed(self) -> bool:
        return self.on_failure == "fail-closed"

    @property
    def accepting_sessions(self) -> bool:
        """False in fail-closed mode while a durable sink is unhealthy."""
        return not self.fail_closed or self.healthy

    def observe_writes(self, callback: Callable[[float], None]) -> None:
        """Call ``callback(seconds)`` after each record a durable sink writes."""
        for sink in self._durable:
            sink.on_write = callback

    def status(self) -> list[dict[str, Any]]:
        """Each queued sink's health: name, healthy, lost, backlog, last_error."""
        return [sink.status() for sink in self._queued]

    # -- records -----------------------------------------------------------

    def emit(self, record: AuditRecord) -> None:
        if self.sinks:  # with no sink at all, skip structlog's processors
            # _value_, not .value: an enum's value property costs a
            # descriptor call per record.
            self._log.info(record.event._value_, **record.fields)

    def event(self, name: str, **fields: Any) -> None:
        """A record from the shell itself (start, stop, listener errors)."""
        self._log.info(name, **fields)

    def warning(self, name: str, **fields: Any) -> None:
        self._log.warning(name, **fields)

    def error(self, name: str, **fields: Any) -> None:
        self._log.error(name, **fields)

    async def emit_durable(self, record: AuditRecord) -> bool:
        """Emit ``record`` and wait until every durable sink has fsynced it.

        Other trio tasks run meanwhile: the writer threads wake this task
        through the trio token.  Returns False, promptly, when a durable
        sink is unhealthy (the record is still queued and written once the
        sink recovers), when the record was dropped (queue full), or when
        it is not durable within :attr:`durable_timeout` seconds.  The
        caller decides what that means (the proxy refuses the DELE in
        fail-closed mode, see :attr:`fail_closed`).

        Without a durable sink (no audit file configured) there is nothing
        to wait for: the record is emitted and True is returned.
        """
        durable = self._durable
        if not durable:
            self.emit(record)
            await trio.lowlevel.checkpoint()
            return True
        if not self.healthy:
            self.emit(record)
            await trio.lowlevel.checkpoint()
            return False
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()

        def notify() -> None:
            with suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        ticket = DurableTicket(len(durable), notify)
        self._log.info(record.event.value, **record.fields, **{_TICKET: ticket})
        if ticket.done.is_set():
            await trio.lowlevel.checkpoint()
        else:
            with trio.move_on_after(self.durable_timeout):
                await done.wait()
        return ticket.done.is_set() and ticket.ok

    def _deliver(self, logger: object, method: str, event_dict: EventDict) -> str:
        """The pipeline's last processor: hand the finished record to the sinks."""
        self._dispatch(event_dict)
        return ""

    def _dispatch(self, event_dict: EventDict) -> None:
        """Fan a finished event out (from :meth:`_deliver`, on any thread)."""
        ticket = event_dict.pop(_TICKET, None)
        exclude = event_dict.pop(_EXCLUDE, None)
        if self._queued:
            # The dict is this record's own (structlog built it for this
            # call); every queued sink shares it and none changes it.  A
            # plain sink may, so it comes last.
            for sink in self._queued:
                if sink is not exclude:
                    sink.submit(event_dict, ticket if sink.durable else None)
        if self._plain:
            shown = dict(event_dict) if self._queued else event_dict
            with self._plain_lock:
                for plain in self._plain:
                    if plain is not exclude:
                        plain.write(shown)

    # -- sink health reports (called from writer threads) -------------------

    def sink_failed(self, sink: QueuedSink, error: str) -> None:
        self._internal(
            "error",
            "audit.sink.failed",
            sink,
            sink=sink.name,
            error=error,
            durable=sink.durable,
            backlog=sink.backlog,
            lost=sink.lost,
        )

    def sink_recovered(self, sink: QueuedSink, *, lost: int, down_ms: int) -> None:
        self._internal(
            "warning" if lost else "info",
            "audit.sink.recovered",
            sink,
            sink=sink.name,
            lost=lost,
            down_ms=down_ms,
            backlog=sink.backlog,
        )

    def _internal(self, level: str, name: str, exclude: object, **fields: Any) -> None:
        """A record about the trail itself, to every sink but ``exclude``.

        Built in an empty context, so it never carries the session id of
        whichever task happened to overflow a queue.
        """
        method: Callable[..., Any] = getattr(self._log, level)
        contextvars.Context().run(method, name, **fields, **{_EXCLUDE: exclude})

    # -- operations --------------------------------------------------------

    def reopen(self) -> None:
        """Reopen files (after logrotate) and reconnect syslog; returns at once.

        Takes effect in each sink exactly between the records emitted
        before and after this call.  The server calls it on SIGHUP/SIGUSR1.
        """
        for sink in self._queued:
            sink.request_reopen()
        for plain in self._plain:
            reopen = getattr(plain, "reopen", None)
            if callable(reopen):
                reopen()

    def flush(self, timeout: float = DEFAULT_CLOSE_TIMEOUT) -> bool:
        """Block until every record so far is delivered (and synced per policy).

        Not for the trio thread: use :meth:`aflush` there.
        """
        deadline = time.monotonic() + timeout
        ok = True
        for sink in self._queued:
            ok = sink.flush(max(0.0, deadline - time.monotonic())) and ok
        return ok

    async def aflush(self) -> bool:
        """:meth:`flush` from trio, without blocking the event loop.

        Waits at most :data:`DEFAULT_CLOSE_TIMEOUT`; wrap it in
        ``trio.move_on_after`` to wait less.
        """
        return await trio.to_thread.run_sync(self.flush, abandon_on_cancel=True)

    def close(self, timeout: float = DEFAULT_CLOSE_TIMEOUT) -> None:
        """Deliver every queued record (for at most ``timeout`` s), then close.

        Records still queued at the deadline (a disk that stays full) are
        counted as lost and reported on stderr.  Idempotent.
        """
        if self._closed:
            return
        self._closed = True
        for sink in self._queued:
            sink.begin_close()
        deadline = time.monotonic() + timeout
        for sink in self._queued:
            sink.finish_close(deadline)
        for plain in self._plain:
            plain.close()


def _close_at_exit(ref: weakref.ref[AuditLog]) -> None:
    log = ref()
    if log is not None:
        log.close()


def open_audit_log_from_config(
    config: AuditConfig,
    *,
    instance: str = "popguard",
    worker: int | None = None,
    extra_sinks: Sequence[Sink] = (),
) -> AuditLog:
    """The sinks ``config`` (the ``audit:`` section) asks for, in one log.

    Opens the audit file (raises ``OSError`` if it cannot) and loads the
    HMAC key (raises :class:`popguard.trail.chain.KeyFileError`) here, so
    problems show at startup.  Syslog connections are made by the writer
    threads, and retried.
    """
    key = load_key(config.hmac_key_file) if config.hmac_key_file else None
    size = config.queue_size
    sinks: list[QueuedSink] = []
    try:
        if config.file:
            sinks.append(
                FileSink(
                    config.file,
                    fsync=config.fsync,
                    fsync_interval_ms=config.fsync_interval_ms,
                    queue_size=size,
                    key=key,
                )
            )
        if config.stdout:
            sinks.append(StdoutSink(queue_size=size))
        for target in config.syslog:
            kind = SyslogUDPSink if target.transport == "udp" else SyslogTCPSink
            sinks.append(
                kind(
                    target.address.host,
                    target.address.port,
                    facility=target.facility,
                    max_message=target.max_message,
                    sd_id=target.sd_id,
                    queue_size=size,
                )
            )
        if config.console:
            sinks.append(ThreadedSink(ConsoleSink(), name="console", queue_size=size))
    except BaseException:
        for sink in sinks:
            sink.close(timeout=1.0)
        raise
    return AuditLog(
        [*sinks, *extra_sinks],
        instance=instance,
        worker=worker,
        on_failure=config.on_failure,
        durable_timeout=config.durable_timeout_ms / 1000,
    )


def open_audit_log(*, file: str | None, console: bool, instance: str = "popguard") -> AuditLog:
    """The original builder: a file and/or the console, all other keys default."""
    return open_audit_log_from_config(AuditConfig(file=file, console=console), instance=instance)


#: The fields :func:`session_context` binds for the records of one session's
#: task (and of its child tasks, which trio starts in a copy of its context).
_SESSION_FIELDS: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "popguard_session_fields"
)


def _merge_session(logger: object, method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: add the fields :func:`session_context` bound.

    Like ``structlog.contextvars.merge_contextvars`` (a record's own field
    wins), but one context variable holds a session's fields, so a record
    reads one variable instead of walking every variable in the context.
    """
    fields = _SESSION_FIELDS.get(None)
    if fields:
        for key, value in fields.items():
            event_dict.setdefault(key, value)
    return event_dict


class _SessionContext:
    """What :func:`session_context` returns (a class: it lives as long as the
    session, and a generator-based context manager costs ~0.7 kB more)."""

    __slots__ = ("_fields", "_token")

    def __init__(self, fields: dict[str, Any]) -> None:
        self._fields = fields
        self._token: contextvars.Token[Mapping[str, Any]] | None = None

    def __enter__(self) -> None:
        outer = _SESSION_FIELDS.get(None)
        fields = self._fields if not outer else {**outer, **self._fields}
        self._token = _SESSION_FIELDS.set(fields)

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            _SESSION_FIELDS.reset(self._token)
            self._token = None


def session_context(**fields: Any) -> _SessionContext:
    """Bind fields (session id, client, listener) to every record in this task."""
    return _SessionContext(fields)
