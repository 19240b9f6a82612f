"""The writer-thread machinery shared by every delivering sink.

A :class:`QueuedSink` owns one writer thread and one bounded queue.  The
trio thread only ever *enqueues* (:meth:`QueuedSink.submit`: a lock, a deque
append, a condition notify; no system call that can block on a disk or a
network), and the writer thread does the I/O.

Guarantees, per sink:

* Records are delivered in the order they were submitted.
* A record whose delivery fails (``ENOSPC``, ``EIO``, a broken TCP
  connection) stays at the head of the queue and is retried with
  exponential backoff; the records behind it wait.  When the failure ends
  the backlog is delivered in order.  Nothing is lost unless the queue
  overflows.
* When the queue is full, :meth:`submit` never waits: the record is dropped
  and counted in :attr:`lost`, and a *loss marker* takes its place in the
  queue, so the sink itself writes an ``audit.records.lost`` record exactly
  where the gap is (consecutive drops share one marker).
* Health changes (a delivery starts or stops failing, records are dropped)
  are reported to a listener (the :class:`~popguard.audit.AuditLog`), which
  turns them into ``audit.sink.failed`` / ``audit.sink.recovered`` records
  for the other sinks.

Control entries (flush barriers, reopen requests, the final stop) travel
through the same queue, so they take effect exactly between the records
submitted before and after them; they never count against the size limit.
"""

from __future__ import annotations

import datetime
import enum
import errno
import itertools
import json
import math
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any, Final, Protocol

__all__ = [
    "DurableTicket",
    "Entry",
    "Kind",
    "QueuedSink",
    "SinkListener",
    "ThreadedSink",
    "describe_error",
    "jsonable",
    "render_json",
    "utc_timestamp",
]

EventDict = MutableMapping[str, Any]

#: The schema version of records the sinks make themselves (loss markers).
_SCHEMA: Final = 1

#: The most records a writer delivers with one write.
MAX_BATCH: Final = 256


def utc_timestamp() -> str:
    """Now, in the format of the records' ``timestamp`` field."""
    now = datetime.datetime.now(datetime.UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def describe_error(exc: BaseException) -> str:
    """``ENOSPC: No space left on device`` -- short, stable, greppable."""
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        text = exc.strerror or str(exc)
        if exc.filename is not None:
            text = f"{text}: {exc.filename!s}"
        return f"{name}: {text}"
    return f"{type(exc).__name__}: {exc}"


#: What JSON writes as it is.  Tuples of types, not ``str | bool | int``:
#: ``isinstance`` with a union made in the call builds the union every time.
_SCALARS: Final = (str, bool, int)
_SEQUENCES: Final = (list, tuple)
#: The exact types a record's values almost always have.
_PLAIN: Final = frozenset({str, int, bool, type(None)})


def jsonable(value: Any) -> Any:
    """``value`` with tuples as lists and anything exotic as its ``str``."""
    if value is None or isinstance(value, _SCALARS):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, _SEQUENCES):
        return [jsonable(item) for item in value]
    if isinstance(value, Mapping):
        return {str(key): jsonable(item) for key, item in value.items()}
    return str(value)


def jsonable_record(event: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`jsonable` for a record (a new dict), with one call for the
    whole record rather than one per field where every value is plain."""
    return {
        key if type(key) is str else str(key): (value if type(value) in _PLAIN else jsonable(value))
        for key, value in event.items()
    }


def render_json(event: Mapping[str, Any]) -> str:
    """One JSON line (without the newline).

    ``ensure_ascii`` keeps every line terminator that some reader might
    honour (CR, LF, NEL, U+2028, U+2029) escaped, so one record is always
    exactly one line (CWE-117).
    """
    return json.dumps(event, ensure_ascii=True, separators=(",", ":"), default=str)


# --------------------------------------------------------------------------
# Queue entries
# --------------------------------------------------------------------------


class Kind(enum.Enum):
    RECORD = "record"
    #: Consecutive records dropped because the queue was full.
    LOST = "lost"
    #: Deliver everything before this, make it durable, then signal.
    FLUSH = "flush"
    #: Reopen the destination (logrotate).
    REOPEN = "reopen"
    #: Begin a (new) file: its chain start record (file sinks only).
    START = "start"
    #: Deliver everything before this, then end the writer thread.
    STOP = "stop"


class DurableTicket:
    """Completion of one record on one or more durable sinks.

    ``resolve`` is called once per sink, from writer threads; the first
    ``False`` or the last ``True`` completes the ticket and calls ``notify``
    (once, from whichever thread completed it).
    """

    __slots__ = ("_lock", "_notify", "_pending", "done", "ok")

    def __init__(self, count: int, notify: Callable[[], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._notify = notify
        self._pending = count
        self.ok = count > 0
        self.done = threading.Event()
        if count <= 0:
            self.done.set()

    def resolve(self, ok: bool) -> None:
        with self._lock:
            if self.done.is_set():
                return
            self._pending -= 1
            if not ok:
                self.ok = False
            if ok and self._pending > 0:
                return
            self.done.set()
            notify = self._notify
        if notify is not None:
            notify()


class Entry:
    """One item in a sink's queue.  ``payload`` caches the bytes to retry."""

    __slots__ = ("count", "event", "first_lost", "kind", "payload", "stage", "ticket")

    def __init__(
        self,
        kind: Kind,
        event: Mapping[str, Any] | None = None,
        ticket: DurableTicket | None = None,
    ) -> None:
        self.kind = kind
        self.event = event
        self.ticket = ticket
        #: Rendered (and, for the file sink, sealed) bytes, made once, so a
        #: retry writes exactly what the first attempt tried to write.
        self.payload: bytes | None = None
        #: Progress of a multi-step entry (reopen), for retries.
        self.stage = 0
        #: For LOST: how many records, and when the first was dropped.
        self.count = 0
        self.first_lost = ""


# --------------------------------------------------------------------------
# Health
# --------------------------------------------------------------------------


class SinkListener(Protocol):
    def sink_failed(self, sink: QueuedSink, error: str) -> None: ...
    def sink_recovered(self, sink: QueuedSink, *, lost: int, down_ms: int) -> None: ...


# --------------------------------------------------------------------------
# The queued sink
# --------------------------------------------------------------------------


class QueuedSink:
    """A sink with its own writer thread and a bounded queue.

    Subclasses implement :meth:`_deliver` (raise ``OSError`` to have the
    entry retried) and, as needed, :meth:`_sync`, :meth:`_reopen`,
    :meth:`_release` and :meth:`_idle_deadline` / :meth:`_idle`.
    """

    #: Whether this sink makes records durable (fsync); only durable sinks
    #: count for :attr:`~popguard.audit.AuditLog.healthy` and ``emit_durable``.
    durable: bool = False
    #: First and longest pause between retries of a failing delivery.
    retry_initial: float = 0.05
    retry_max: float = 5.0
    #: Once woken from idle, the writer waits this long to gather a batch
    #: before writing, unless a record needs to be durable or a control
    #: entry (flush, reopen, stop) arrives.  Each wake-up costs two GIL
    #: hand-offs between the event loop and this thread; one per record
    #: cost ~1.5 ms of CPU per session (measured in bench --audit-compare).
    batch_delay: float = 0.005

    def __init__(self, name: str, *, queue_size: int = 10000) -> None:
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, got {queue_size}")
        self.name = name
        self.queue_size = queue_size
        self.instance = "popguard"
        #: The worker process's number (0: the supervisor) with ``workers:``.
        self.worker: int | None = None
        self.listener: SinkListener | None = None
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[Entry] = deque()
        #: Records (not control entries) in the queue.
        self._records = 0
        self._accepting = True
        self._abandoned = False
        self._lost = 0
        #: Records dropped since the sink was last healthy.
        self._lost_since_healthy = 0
        self._failing = False
        self._failed_at = 0.0
        self._overflowing = False
        self._last_error: str | None = None
        self._written = 0
        #: Called with the seconds each record took to write (metrics), on the writer thread.
        self.on_write: Callable[[float], None] | None = None
        self._thread: threading.Thread | None = None
        #: Something in the queue must not wait for a batch (a durable
        #: record, a flush, a reopen, a stop).
        self._urgent = False

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        """Start the writer thread (idempotent)."""
        with self._cond:
            if self._thread is not None:
                return
            self._thread = threading.Thread(
                target=self._run, name=f"popguard-audit {self.name}", daemon=True
            )
        self._thread.start()

    def attach(
        self, listener: SinkListener | None, *, instance: str, worker: int | None = None
    ) -> None:
        self.listener = listener
        self.instance = instance
        self.worker = worker

    def identity(self) -> dict[str, Any]:
        """The fields naming the writer, for records the sink makes itself."""
        if self.worker is None:
            return {"instance": self.instance}
        return {"instance": self.instance, "worker": self.worker}

    # -- health ------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """False while a delivery fails or dropped records are unrecorded."""
        return not (self._failing or self._overflowing)

    @property
    def lost(self) -> int:
        """Records dropped because the queue was full (or at an abandoned close)."""
        return self._lost

    @property
    def last_error(self) -> str | None:
        return self._last_error

    @property
    def backlog(self) -> int:
        """Records waiting in the queue."""
        return self._records

    @property
    def written(self) -> int:
        """Records delivered so far (loss markers and chain records included)."""
        return self._written

    def status(self) -> dict[str, Any]:
        """A snapshot of this sink's health, for diagnostics."""
        return {
            "sink": self.name,
            "durable": self.durable,
            "healthy": self.healthy,
            "lost": self.lost,
            "backlog": self.backlog,
            "written": self.written,
            "last_error": self.last_error,
        }

    # -- the trio side -----------------------------------------------------

    def write(self, event_dict: EventDict) -> None:
        """The plain :class:`~popguard.audit.Sink` interface: enqueue a copy."""
        self.submit(dict(event_dict))

    def submit(self, event: Mapping[str, Any], ticket: DurableTicket | None = None) -> bool:
        """Enqueue a record without ever waiting.  False: dropped (counted).

        ``event`` is not copied: the caller hands it over and must not
        change it afterwards.  A ``ticket`` is resolved once the record is
        delivered (and, on a durable sink, fsynced), or with False as soon
        as this sink fails.
        """
        if self._thread is None:
            self.start()
        became_unhealthy = False
        with self._cond:
            if not self._accepting:
                accepted = False
            elif self._records >= self.queue_size:
                accepted = False
                self._lost += 1
                self._lost_since_healthy += 1
                tail = self._queue[-1] if self._queue else None
                if tail is not None and tail.kind is Kind.LOST:
                    tail.count += 1
                else:
                    marker = Entry(Kind.LOST)
                    marker.count = 1
                    marker.first_lost = str(event.get("timestamp") or utc_timestamp())
                    self._queue.append(marker)
                    self._cond.notify()
                if not self._overflowing:
                    self._overflowing = True
                    became_unhealthy = not self._failing
                    if became_unhealthy:
                        self._failed_at = time.monotonic()
                    self._last_error = f"queue full ({self.queue_size} records)"
            else:
                accepted = True
                queue = self._queue
                queue.append(Entry(Kind.RECORD, event, ticket))
                self._records += 1
                if ticket is not None:
                    self._urgent = True
                    self._cond.notify()
                elif len(queue) == 1:
                    self._cond.notify()  # the writer may be idle: wake it
                # else: the writer is busy or gathering a batch, and will see it
        if ticket is not None and (not accepted or self._failing):
            # A failing sink cannot promise durability now (the record stays
            # queued and is retried all the same).
            ticket.resolve(False)
        if became_unhealthy:
            self._report_failed(f"queue full ({self.queue_size} records); records are dropped")
        return accepted

    def _control(self, kind: Kind, ticket: DurableTicket | None = None) -> bool:
        if self._thread is None:
            self.start()
        with self._cond:
            if not self._accepting:
                return False
            self._queue.append(Entry(kind, None, ticket))
            self._urgent = True
            self._cond.notify()
            return True

    def request_reopen(self) -> None:
        """Reopen the destination after the records submitted so far."""
        self._control(Kind.REOPEN)

    def flush(self, timeout: float | None = 5.0) -> bool:
        """Block until everything submitted so far is delivered and synced.

        Not for the trio thread (it waits); see ``AuditLog.aflush``.
        """
        ticket = DurableTicket(1)
        if not self._control(Kind.FLUSH, ticket):
            return self._thread is not None and not self._thread.is_alive()
        return ticket.done.wait(timeout) and ticket.ok

    def begin_close(self) -> None:
        """Stop accepting records; the writer drains the queue, then ends."""
        if self._thread is None:
            self.start()
        with self._cond:
            if not self._accepting:
                return
            self._queue.append(Entry(Kind.STOP))
            self._accepting = False
            self._urgent = True
            self._cond.notify()

    def finish_close(self, deadline: float) -> bool:
        """Wait (until ``deadline``, a ``time.monotonic()``) for the drain.

        Returns False when records were still queued at the deadline; those
        are abandoned and counted as lost.
        """
        thread = self._thread
        if thread is not None:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                with self._cond:
                    self._abandoned = True
                    stranded = self._records
                    self._lost += stranded
                    self._cond.notify()
                sys.stderr.write(
                    f"popguard: audit sink {self.name}: {stranded} record(s) not delivered "
                    f"at shutdown ({self._last_error or 'still busy'})\n"
                )
                return False
        else:
            self._release()
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued (for at most ``timeout`` seconds), then stop."""
        self.begin_close()
        self.finish_close(time.monotonic() + timeout)

    # -- the writer thread -------------------------------------------------

    def _run(self) -> None:
        delay = self.retry_initial
        #: After a batch failed with something other than OSError, take its
        #: records one by one, so that only the one that cannot be rendered
        #: is discarded.
        singly = False
        try:
            while True:
                with self._cond:
                    woken = False
                    while not self._queue and not self._abandoned:
                        woken = True
                        self._urgent = False
                        deadline = self._idle_deadline()
                        if deadline is None:
                            self._cond.wait()
                            continue
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        self._cond.wait(remaining)
                    if woken and self._queue and not self._urgent and self.batch_delay > 0:
                        # Gather what the event loop emits next; one
                        # wake-up then writes them all.
                        self._cond.wait(self.batch_delay)
                    if self._abandoned:
                        return
                    batch = self._take_batch(1 if singly else MAX_BATCH)
                entry = batch[0] if batch else None
                if entry is not None and entry.kind is Kind.STOP:
                    self._finish_stop()
                    return
                try:
                    if entry is None:
                        self._idle()
                    elif entry.kind is Kind.RECORD:
                        started = time.perf_counter()
                        self._process_records(batch)
                        on_write = self.on_write
                        if on_write is not None:
                            share = (time.perf_counter() - started) / len(batch)
                            for _ in batch:
                                on_write(share)
                    else:
                        self._process(entry)
                except OSError as exc:
                    # Transient by nature (disk full, I/O error, connection
                    # lost): keep the entries and retry after a pause.
                    self._failure(exc)
                    self._pause(delay)
                    delay = min(delay * 2, self.retry_max)
                    continue
                except Exception as exc:
                    if len(batch) > 1:
                        singly = True  # find the record at fault
                        continue
                    # A bug or a record that cannot be rendered: retrying
                    # cannot help, and must not block the records behind it.
                    self._failure(exc)
                    if entry is not None:
                        self._discard(entry)
                    else:
                        self._pause(delay)
                        delay = min(delay * 2, self.retry_max)
                    singly = False
                    continue
                delay = self.retry_initial
                singly = False
                self._succeeded(batch)
        finally:
            self._release_quietly()

    def _take_batch(self, limit: int) -> list[Entry]:
        """The entries to process next (call with the lock held).

        A control entry comes alone; records come as a run of up to
        ``limit``, so that the writer pays one write (and one hand-off of
        the GIL to and from the event loop) per batch, not per record.
        """
        queue = self._queue
        if not queue:
            return []
        head = queue[0]
        if head.kind is not Kind.RECORD or limit == 1:
            return [head]
        batch = [head]
        for entry in itertools.islice(queue, 1, limit):
            if entry.kind is not Kind.RECORD:
                break
            batch.append(entry)
        return batch

    def _pause(self, delay: float) -> None:
        with self._cond:
            if not self._abandoned:
                self._cond.wait(delay)

    def _process(self, entry: Entry) -> None:
        kind = entry.kind
        if kind is Kind.RECORD or kind is Kind.LOST:
            if entry.event is None:
                entry.event = self._loss_record(entry)
            if entry.stage == 0:
                self._deliver(entry)
                # Delivered: a retry from here on only repeats the sync.
                entry.stage = 1
            self._commit(durable=entry.ticket is not None)
        elif kind is Kind.FLUSH:
            self._sync(force=False)
        elif kind is Kind.REOPEN:
            self._reopen(entry)

    def _process_records(self, batch: list[Entry]) -> None:
        """Deliver a run of records, then sync once as the policy says."""
        pending = [entry for entry in batch if entry.stage == 0]
        if pending:
            self._deliver_batch(pending)
            for entry in pending:
                # Delivered: a retry from here on only repeats the sync.
                entry.stage = 1
        self._commit(durable=any(entry.ticket is not None for entry in batch))

    def _succeeded(self, batch: list[Entry]) -> None:
        """``batch`` (or the idle work) went through: dequeue, note recovery."""
        recovered = False
        lost = 0
        down_ms = 0
        with self._cond:
            queue = self._queue
            for entry in batch:
                queue.popleft()
                if entry.kind is Kind.RECORD:
                    self._records -= 1
                if entry.kind is Kind.RECORD or entry.kind is Kind.LOST:
                    self._written += 1
                if (
                    entry.kind is Kind.LOST
                    and self._overflowing
                    and not any(e.kind is Kind.LOST for e in queue)
                ):
                    # Every gap is on record now.
                    self._overflowing = False
                    recovered = not self._failing
            if self._failing:
                self._failing = False
                recovered = not self._overflowing
            if recovered:
                lost = self._lost_since_healthy
                self._lost_since_healthy = 0
                down_ms = int((time.monotonic() - self._failed_at) * 1000)
                self._last_error = None
        for entry in batch:
            if entry.ticket is not None:
                entry.ticket.resolve(True)
        if recovered:
            listener = self.listener
            if listener is not None:
                listener.sink_recovered(self, lost=lost, down_ms=down_ms)
            else:
                sys.stderr.write(f"popguard: audit sink {self.name} recovered\n")

    def _discard(self, entry: Entry) -> None:
        with self._cond:
            if self._queue and self._queue[0] is entry:
                self._queue.popleft()
            if entry.kind is Kind.RECORD:
                self._records -= 1
                self._lost += 1
                self._lost_since_healthy += 1
        if entry.ticket is not None:
            entry.ticket.resolve(False)

    def _failure(self, exc: BaseException) -> None:
        error = describe_error(exc)
        newly = False
        tickets: list[DurableTicket] = []
        with self._cond:
            self._last_error = error
            if not self._failing:
                self._failing = True
                newly = not self._overflowing
                if newly:
                    self._failed_at = time.monotonic()
                # Whoever waits for durability learns now, not after the retries.
                tickets = [e.ticket for e in self._queue if e.ticket is not None]
        for ticket in tickets:
            ticket.resolve(False)
        if newly:
            self._report_failed(error)

    def _report_failed(self, error: str) -> None:
        listener = self.listener
        if listener is not None:
            listener.sink_failed(self, error)
        else:
            sys.stderr.write(f"popguard: audit sink {self.name} failed: {error}\n")

    def _finish_stop(self) -> None:
        try:
            self._sync(force=False)
        except Exception as exc:
            self._last_error = describe_error(exc)
        with self._cond:
            self._queue.clear()

    def _loss_record(self, entry: Entry) -> dict[str, Any]:
        return {
            "event": "audit.records.lost",
            "count": entry.count,
            "reason": f"queue full ({self.queue_size} records)",
            "first_lost_at": entry.first_lost,
            "sink": self.name,
            "level": "error",
            "timestamp": utc_timestamp(),
            "schema": _SCHEMA,
            **self.identity(),
        }

    def _release_quietly(self) -> None:
        try:
            self._release()
        except Exception as exc:
            self._last_error = describe_error(exc)

    # -- for subclasses ----------------------------------------------------

    def _deliver(self, entry: Entry) -> None:
        """Deliver ``entry.event`` (a record or a loss marker); raise to retry."""
        raise NotImplementedError

    def _deliver_batch(self, batch: list[Entry]) -> None:
        """Deliver a run of records in order; raise to retry.

        Records delivered before the raise must be marked ``stage = 1`` so
        that the retry does not repeat them; a sink that overrides this to
        write a run at once must make the write all-or-nothing instead.
        """
        for entry in batch:
            self._deliver(entry)
            entry.stage = 1

    def _commit(self, *, durable: bool) -> None:
        """After each delivered record: sync as the policy (or ``durable``) says."""

    def _sync(self, *, force: bool) -> None:
        """Make delivered records durable (``force``: even if policy says never)."""

    def _reopen(self, entry: Entry) -> None:
        """Reopen the destination (may be retried; see ``entry.stage``)."""

    def _idle_deadline(self) -> float | None:
        """When the writer should wake up while idle (``time.monotonic()``)."""
        return None

    def _idle(self) -> None:
        """Periodic work when idle (the interval fsync)."""

    def _release(self) -> None:
        """Close files and sockets; called once, from the writer thread."""


class _PlainSink(Protocol):
    def write(self, event_dict: EventDict) -> None: ...
    def close(self) -> None: ...


class ThreadedSink(QueuedSink):
    """Runs any plain sink (``write``/``close``) on a writer thread."""

    def __init__(self, inner: _PlainSink, *, name: str, queue_size: int = 10000) -> None:
        super().__init__(name, queue_size=queue_size)
        self.inner = inner

    def _deliver(self, entry: Entry) -> None:
        assert entry.event is not None
        self.inner.write(dict(entry.event))

    def _release(self) -> None:
        self.inner.close()
