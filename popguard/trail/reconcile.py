"""What a dead worker left open: sessions without an end, marks without a fate.

Theory of operation
===================

With ``workers: N`` each worker process writes its own audit file
(``audit.wN.jsonl``).  A worker that is killed outright (SIGKILL, the OOM
killer, a host crash) writes nothing more: its open sessions keep their
``session.opened`` and never get a ``session.closed``, and a ``dele.marked``
of theirs never gets its fate (``dele.unmarked``, ``deletions.*``).  The
supervisor reads that worker's records once it is gone and writes the
missing ends into its *own* trail (``session.orphaned``, ``deletions.unknown``;
docs/audit.md).  This module is the reading side: pure, synchronous, and
streaming (memory grows with the sessions left open, never with the file).
The supervisor calls it in a thread.

Whose records: a worker file holds the records of every process that ever
ran in that slot, one after the other, on one hash chain.  Each process
begins with ``audit.chain.start`` whose ``reason`` is ``new`` or ``restart``
(the file sink writes one when it opens the file); a ``reopen`` start (after
logrotate renamed the file) continues the same process in a new file.  So
the records of the *last* process are those from the last ``new``/``restart``
start on, which may begin in a rotated file (``audit.w2.jsonl.1``,
``audit.w2.jsonl-20261127``, gzip'd or not) when the file was rotated while
that process ran: :func:`last_process_tail` reads the current file and, only
if it finds no process start there, the rotated ones before it.

What counts as open: a session with ``session.opened`` and no
``session.closed`` after it.  Its marks are the messages of its
``dele.marked`` records not listed since in ``dele.unmarked`` or any
``deletions.*`` record.  With ``audit.on_failure: fail-closed`` a DELE is
forwarded only after its ``dele.requested`` record is on disk, so a
``dele.requested`` with neither ``dele.marked`` nor ``dele.refused`` after
it is a DELE the server may have acted on: it is listed too, and named in
``unanswered``, as the session core does for a DELE still owed its reply.

Why ``deletions.unknown`` and never ``deletions.discarded``: a killed
worker's kernel closes its upstream connections without QUIT, so the server
normally discards the marks (RFC 1939 section 6).  But the core forwards a
client's QUIT the moment it reads it, and records nothing until the reply;
the worker may have forwarded one just before it died, and the server then
deleted.  Nothing in the trail tells the two apart.

Idempotency: :func:`reconciled_sessions` reads the supervisor's own trail
for the sessions it has reported already, so a supervisor that restarts
does not report them twice.
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from popguard.trail.chain import START_EVENT
from popguard.trail.reader import (
    TrailReadError,
    iter_lines,
    order_rotated,
    parse_record,
    parse_time,
)

__all__ = [
    "DELETIONS_UNKNOWN_EVENT",
    "ORPHANED_EVENT",
    "PROCESS_START_REASONS",
    "REASON_WORKER_DIED",
    "OpenSession",
    "ParentTrail",
    "ProcessTail",
    "last_process_tail",
    "open_sessions",
    "orphan_records",
    "read_parent_trail",
    "rotated_files",
    "worker_files",
]

#: The supervisor's record of a session a dead worker left open.
ORPHANED_EVENT: Final = "session.orphaned"
#: The supervisor's record of the marks such a session held.
DELETIONS_UNKNOWN_EVENT: Final = "deletions.unknown"
#: ``reason`` of both: the worker process serving the session is gone.
REASON_WORKER_DIED: Final = "worker_died"
#: ``audit.chain.start`` reasons that begin a new writing process.
PROCESS_START_REASONS: Final = frozenset({"new", "restart"})
#: The supervisor's record of a worker it started (``slot``, ``pid``).
WORKER_STARTED_EVENT: Final = "popguard.worker.started"

_OPENED: Final = "session.opened"
_CLOSED: Final = "session.closed"
_MARKED: Final = "dele.marked"
_REQUESTED: Final = "dele.requested"
_REFUSED: Final = "dele.refused"
#: Records whose ``messages`` no longer hold a mark (undone, or a fate told).
_SETTLING: Final = frozenset(
    {
        "dele.unmarked",
        "deletions.committed",
        "deletions.failed",
        "deletions.discarded",
        DELETIONS_UNKNOWN_EVENT,
    }
)
#: What a message is named by in records (docs/audit.md "Message identity").
_IDENTITY_FIELDS: Final = ("msg", "uidl", "size")

#: The only lines worth parsing: any other event changes nothing here.  Lines
#: are written with sorted keys and no spaces, so the event's value appears
#: as exactly these bytes; a line that has none of them is skipped unparsed.
_WANTED: Final = tuple(
    f'"{name}"'.encode()
    for name in (
        START_EVENT,
        _OPENED,
        _CLOSED,
        _MARKED,
        _REQUESTED,
        _REFUSED,
        "auth.succeeded",
        *_SETTLING,
    )
)


@dataclass(slots=True)
class OpenSession:
    """A session opened and not closed, as far as its records tell."""

    session: str
    client: str | None = None
    listener: str | None = None
    #: The account, once a record named it (``auth.succeeded`` on).
    user: str | None = None
    #: Messages marked by ``dele.marked``, by number, as the record named them.
    marked: dict[int, dict[str, Any]] = field(default_factory=dict)
    #: ``dele.requested`` (fail-closed) not yet answered by marked/refused.
    requested: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def unanswered(self) -> list[int]:
        """DELEs that may have reached the server, with no reply recorded."""
        return sorted(msg for msg in self.requested if msg not in self.marked)

    @property
    def messages(self) -> list[dict[str, Any]]:
        """Every message that may be marked on the server, by number."""
        every = {**self.requested, **self.marked}
        return [every[msg] for msg in sorted(every)]


@dataclass(slots=True)
class ProcessTail:
    """The records of the last process that wrote a worker's trail."""

    #: Its sessions left open, in the order they were opened.
    sessions: list[OpenSession]
    #: When that process started (its start record's ``timestamp``), if found.
    started: datetime.datetime | None
    #: The files read, oldest first.
    files: list[str]
    #: Lines that could not be read as records (a torn last line after a crash).
    skipped: int = 0


def _message_number(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _identity(record: Mapping[str, Any]) -> dict[str, Any]:
    return {name: record[name] for name in _IDENTITY_FIELDS if name in record}


def _numbers(messages: object) -> Iterator[int]:
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, Mapping):
                msg = _message_number(message.get("msg"))
                if msg is not None:
                    yield msg


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


class _Tracker:
    """Follows sessions through one process's records; keeps only the open ones."""

    __slots__ = ("open", "processes", "started")

    def __init__(self) -> None:
        self.open: dict[str, OpenSession] = {}
        #: How many process starts were seen.
        self.processes = 0
        self.started: datetime.datetime | None = None

    def feed(self, record: Mapping[str, Any]) -> None:
        event = record.get("event")
        if event == START_EVENT:
            if record.get("reason") in PROCESS_START_REASONS:
                # A new process: whatever the one before left open is not
                # this process's (it was reconciled when that one died).
                self.open.clear()
                self.processes += 1
                self.started = _time(record.get("timestamp"))
            return
        session_id = record.get("session")
        if not isinstance(session_id, str):
            return
        if event == _OPENED:
            self.open[session_id] = OpenSession(
                session_id, _text(record.get("client")), _text(record.get("listener"))
            )
            return
        session = self.open.get(session_id)
        if session is None:
            return
        user = record.get("user")
        if isinstance(user, str):
            session.user = user
        if event == _CLOSED:
            del self.open[session_id]
            return
        msg = _message_number(record.get("msg"))
        if event == _MARKED and msg is not None:
            session.marked[msg] = _identity(record)
            session.requested.pop(msg, None)
        elif event == _REQUESTED and msg is not None:
            session.requested[msg] = _identity(record)
        elif event == _REFUSED and msg is not None:
            session.requested.pop(msg, None)
        elif event in _SETTLING:
            for number in _numbers(record.get("messages")):
                session.marked.pop(number, None)
                session.requested.pop(number, None)


def _time(stamp: object) -> datetime.datetime | None:
    if not isinstance(stamp, str):
        return None
    try:
        return parse_time(stamp)
    except ValueError:
        return None


def open_sessions(records: Iterable[Mapping[str, Any]]) -> list[OpenSession]:
    """The sessions of the last process in *records* that were never closed."""
    tracker = _Tracker()
    for record in records:
        tracker.feed(record)
    return list(tracker.open.values())


def _records(path: str, counter: list[int]) -> Iterator[dict[str, Any]]:
    """The records of one file worth following; unreadable lines counted."""
    try:
        for line in iter_lines(path):
            data = line.data
            if not any(wanted in data for wanted in _WANTED):
                continue
            try:
                yield parse_record(data)
            except ValueError:
                counter[0] += 1
    except TrailReadError:
        counter[0] += 1


def _has_process_start(path: str) -> bool:
    """Whether *path* holds a ``new``/``restart`` start record."""
    for record in _records(path, [0]):
        if record.get("event") == START_EVENT and record.get("reason") in PROCESS_START_REASONS:
            return True
    return False


def _follow(tracker: _Tracker, paths: Iterable[str], skipped: list[int]) -> _Tracker:
    for name in paths:
        for record in _records(name, skipped):
            tracker.feed(record)
    return tracker


_ROTATION_SUFFIX: Final = re.compile(r"(?:\.\d+|-\d{4}-?\d{2}-?\d{2}(?:[-_T]?\d+)*)?(?:\.gz)?")


def rotated_files(path: str) -> list[str]:
    """*path* and its rotated copies (``.1``, ``.2.gz``, ``-20261127``), oldest first.

    Only *path* itself if it exists and nothing was rotated; an empty list
    if there is nothing at all.  Files moved aside as broken
    (``.broken-<time>``) are not rotations and are left out.
    """
    directory, name = os.path.split(path)
    try:
        entries = os.listdir(directory or ".")
    except FileNotFoundError:
        return []
    found = [
        os.path.join(directory, entry)
        for entry in entries
        if entry.startswith(name) and _ROTATION_SUFFIX.fullmatch(entry[len(name) :])
    ]
    return order_rotated(found)


def last_process_tail(path: str) -> ProcessTail:
    """The open sessions of the last process that wrote the trail at *path*.

    Reads *path* and, when the last process began before a rotation (no
    process start in *path*), the rotated files back to the one where it
    began.  Missing files give an empty tail.
    """
    files = rotated_files(path)
    if not files:
        return ProcessTail([], None, [])
    skipped = [0]
    tracker = _follow(_Tracker(), files[-1:], skipped)
    begin = len(files) - 1
    if not tracker.processes and begin > 0:
        # The last process began before a rotation: find the file it began in.
        begin -= 1
        while begin > 0 and not _has_process_start(files[begin]):
            begin -= 1
        skipped = [0]
        tracker = _follow(_Tracker(), files[begin:], skipped)
    return ProcessTail(list(tracker.open.values()), tracker.started, files[begin:], skipped[0])


def orphan_records(
    session: OpenSession, *, slot: int, pid: int | None, ended: Mapping[str, Any]
) -> list[tuple[str, dict[str, Any]]]:
    """The supervisor's records for one session its worker left open.

    ``session.orphaned``, then ``deletions.unknown`` if the session may hold
    marks.  *ended* says how the worker ended (``signal`` or ``exit_status``,
    or that it was found at start-up).  Every record names the session,
    client, listener and user as the worker's records did.
    """
    who: dict[str, Any] = {
        "session": session.session,
        "client": session.client,
        "listener": session.listener,
        "user": session.user,
    }
    records: list[tuple[str, dict[str, Any]]] = [
        (
            ORPHANED_EVENT,
            {**who, "slot": slot, "pid": pid, "reason": REASON_WORKER_DIED, **ended},
        )
    ]
    messages = session.messages
    if messages:
        fields: dict[str, Any] = {**who, "messages": messages, "reason": REASON_WORKER_DIED}
        if session.unanswered:
            fields["unanswered"] = session.unanswered
        records.append((DELETIONS_UNKNOWN_EVENT, fields))
    return records


_WORKER_FILE: Final = re.compile(r"\.w(?P<slot>[1-9]\d*)(?P<extension>\.[^.]*)?")


def worker_files(parent_path: str) -> dict[int, str]:
    """The worker files beside the supervisor's *parent_path* that exist, by slot.

    ``audit.jsonl`` -> ``{1: "audit.w1.jsonl", 2: ...}`` (the naming of
    :func:`popguard.shell.workers.worker_audit_file`), whatever the number of
    workers now: files of slots a previous run had count too.
    """
    directory, name = os.path.split(parent_path)
    stem, dot, extension = name.rpartition(".")
    if not dot or not stem:
        stem, extension = name, ""
    try:
        entries = os.listdir(directory or ".")
    except FileNotFoundError:
        return {}
    found: dict[int, str] = {}
    for entry in entries:
        if not entry.startswith(stem):
            continue
        match = _WORKER_FILE.fullmatch(entry[len(stem) :])
        if match is None or (match["extension"] or "") != (f".{extension}" if extension else ""):
            continue
        found[int(match["slot"])] = os.path.join(directory, entry)
    return dict(sorted(found.items()))


@dataclass(slots=True)
class ParentTrail:
    """What the supervisor's own trail says about earlier reconciliations."""

    #: Sessions already reported as ``session.orphaned``.
    reconciled: set[str] = field(default_factory=set)
    #: The pid of the last worker started in each slot.
    pids: dict[int, int] = field(default_factory=dict)


def read_parent_trail(path: str, *, since: datetime.datetime | None) -> ParentTrail:
    """Read the supervisor's trail at *path* (and its rotated files).

    A report of a process's sessions is written after that process started,
    so rotated files last changed before *since* (the earliest start of the
    processes about to be reconciled, less a margin for the supervisor's
    ``popguard.worker.started``, written just before) are not read.
    """
    trail = ParentTrail()
    wanted = (f'"{ORPHANED_EVENT}"'.encode(), f'"{WORKER_STARTED_EVENT}"'.encode())
    cutoff = None if since is None else (since - _MTIME_MARGIN).timestamp()
    for name in rotated_files(path):
        try:
            if cutoff is not None and os.stat(name).st_mtime < cutoff:
                continue
            for line in iter_lines(name):
                if not any(w in line.data for w in wanted):
                    continue
                try:
                    record = parse_record(line.data)
                except ValueError:
                    continue
                _note_parent(trail, record)
        except (OSError, TrailReadError):
            continue  # an unreadable old file: at worst a session is reported again
    return trail


#: How far before a process's start a rotated supervisor file may have last
#: changed and still hold its worker's ``popguard.worker.started``.
_MTIME_MARGIN: Final = datetime.timedelta(minutes=1)


def _note_parent(trail: ParentTrail, record: Mapping[str, Any]) -> None:
    event = record.get("event")
    if event == ORPHANED_EVENT:
        session = record.get("session")
        if isinstance(session, str):
            trail.reconciled.add(session)
    elif event == WORKER_STARTED_EVENT:
        slot, pid = record.get("slot"), record.get("pid")
        if isinstance(slot, int) and isinstance(pid, int):
            trail.pids[slot] = pid
