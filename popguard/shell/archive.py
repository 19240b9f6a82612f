"""The shell's half of retention: one session's copies, on their way into the store.

The core (``popguard.core.retention``) says what to copy and when a DELE
waits; this writes it.  Each message's bytes go straight into a temporary
file of the retention store as they are relayed (never held in memory);
when a DELE waits at the gate, the copy is made durable (fsync, rename into
the account's Maildir, fsync of the directory) on a worker thread, so the
event loop never waits for a disk flush.  Writes into the temporary file
are plain ``write(2)`` calls from the event loop: they land in the page
cache.

Whatever is not committed when the session ends is removed: a copy only
counts once a DELE needed it.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

from popguard.core.retention import (
    ArchiveBegin,
    ArchiveData,
    ArchiveEnd,
    ArchiveEvent,
    RetentionGate,
)
from popguard.retention import ArchiveWriter, RetentionError, RetentionStore

__all__ = ["CommitResult", "SessionArchive"]

#: Why a copy is missing when nothing more precise is known.
_NO_COPY = "no copy of the message was made"


@dataclass(frozen=True, slots=True)
class CommitResult:
    """What :meth:`SessionArchive.commit` tells the core."""

    ok: bool
    path: str | None = None
    stored: bool = False
    reason: str | None = None


class SessionArchive:
    """The copies one session is making (at most one open, any number complete)."""

    __slots__ = ("_complete", "_failed", "_open", "_open_msg", "_store")

    def __init__(self, store: RetentionStore) -> None:
        self._store = store
        self._open: ArchiveWriter | None = None
        self._open_msg = 0
        #: Copies whole and not yet committed, by message number.
        self._complete: dict[int, ArchiveWriter] = {}
        #: Why the copy of a message failed (the next gate says so).
        self._failed: dict[int, str] = {}

    def apply(self, events: list[ArchiveEvent]) -> None:
        """Write what the core handed over (never raises: failures are kept)."""
        for event in events:
            if isinstance(event, ArchiveData):
                writer = self._open
                if writer is not None and event.msg == self._open_msg:
                    try:
                        writer.write(event.data)
                    except (RetentionError, OSError) as exc:
                        self._fail(event.msg, _reason(exc))
            elif isinstance(event, ArchiveBegin):
                self._discard(event.msg)
                try:
                    self._open = self._store.open(event.account, event.uidl)
                    self._open_msg = event.msg
                except (RetentionError, OSError) as exc:
                    self._failed[event.msg] = _reason(exc)
            elif isinstance(event, ArchiveEnd):
                writer = self._open
                if writer is not None and event.msg == self._open_msg:
                    self._open = None
                    try:
                        writer.finish()  # no descriptor held while it waits for a DELE
                    except (RetentionError, OSError) as exc:
                        self._fail(event.msg, _reason(exc))
                        writer.abort()
                        continue
                    self._complete[event.msg] = writer

    async def commit(self, gate: RetentionGate) -> CommitResult:
        """Make the copy of ``gate.msg`` durable in the store (on a thread)."""
        writer = self._complete.pop(gate.msg, None)
        if writer is None:
            return CommitResult(False, reason=self._failed.pop(gate.msg, _NO_COPY))
        try:
            archived = await trio.to_thread.run_sync(writer.commit, gate.digest, gate.size)
        except (RetentionError, OSError) as exc:
            writer.abort()
            return CommitResult(False, reason=_reason(exc))
        return CommitResult(True, path=archived.path, stored=archived.stored)

    def close(self) -> None:
        """The session is over: remove every copy not committed."""
        writers = list(self._complete.values())
        if self._open is not None:
            writers.append(self._open)
        self._open = None
        self._complete.clear()
        for writer in writers:
            writer.abort()

    def _discard(self, msg: int) -> None:
        """A new copy of ``msg`` starts: any earlier one is void."""
        self._failed.pop(msg, None)
        stale = self._complete.pop(msg, None)
        if stale is not None:
            stale.abort()
        if self._open is not None:
            self._open.abort()  # its body never ended (the session moved on)
            self._open = None

    def _fail(self, msg: int, reason: str) -> None:
        if self._open is not None:
            self._open.abort()
            self._open = None
        self._failed[msg] = reason


def _reason(exc: BaseException) -> str:
    """A short reason for a record: the store's own words, or the OS error's name."""
    if isinstance(exc, RetentionError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__
