"""The JSON-lines audit file: append-only, hash-chained, fsync by policy.

* The file is opened with ``O_APPEND`` (every write lands at the end) and
  ``O_CLOEXEC``, mode 0640 less the umask.  popguard never seeks in it or
  rewrites it -- except to cut off the torn tail of a write that failed
  half-way (``ENOSPC``), so that the retry does not leave half a record in
  front of the whole one.
* Every record is sealed by :class:`popguard.trail.chain.Chain` (``chain``,
  ``seq``, ``prev``, ``alg``, ``hash``; HMAC-SHA256 when a key is
  configured) in the writer thread, in file order, exactly once: a retried
  write repeats the same bytes.  Lines are in the chain module's fixed form
  (:func:`~popguard.trail.chain.render`), so ``verify`` holds.
* A new file begins with ``audit.chain.start`` (reason ``new``).  On startup
  the chain of an existing file is resumed (reason ``restart``).  A file
  whose chain cannot be resumed (not a popguard trail, a torn last line,
  HMAC with another key) is *never appended to*: it is renamed to
  ``<file>.broken-<UTC time>`` and a new file with a new chain takes its
  place, whose start record names it, followed by ``audit.chain.resume_failed``.
* :meth:`FileSink.request_reopen` (SIGHUP/SIGUSR1 after logrotate renamed
  the file): ``audit.chain.rotate`` goes to the old file, which is fsynced
  and closed; the path is opened anew and ``audit.chain.start`` (reason
  ``reopen``) continues the chain there.  When the path still is the open
  file (nothing was rotated), nothing happens.
* fsync policy: ``always`` after every write (a record, or the run of
  records the writer found queued and wrote at once); ``interval``: at most
  ``fsync_interval_ms`` after a record was written (the writer wakes up for
  it); ``never`` leaves it to the kernel.  A record submitted with a
  durability ticket (``AuditLog.emit_durable``) is fsynced before the ticket
  resolves, whatever the policy.  A newly created file's directory is
  fsynced too (except with ``never``).
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from collections.abc import Mapping
from typing import Any, Final, Literal

from popguard.sinks.base import (
    Entry,
    Kind,
    QueuedSink,
    describe_error,
    jsonable_record,
    utc_timestamp,
)
from popguard.trail import chain as trail

__all__ = ["FSYNC_POLICIES", "FileSink", "FsyncPolicy"]

FsyncPolicy = Literal["always", "interval", "never"]
FSYNC_POLICIES: Final[tuple[FsyncPolicy, ...]] = ("always", "interval", "never")

#: How long the writer, once woken, gathers records before writing them.
#: With ``interval`` (200 ms by default) or ``never``, a record written 20 ms
#: later is no less durable, and each wake-up of the writer costs GIL
#: hand-offs with the event loop: 5 -> 30 ms took the writer's CPU per
#: session from about 200 to 110 us (concurrency bench, audit file on).
#: With ``always`` every record should reach the disk at once: 5 ms.
BATCH_DELAY: Final = 0.020
BATCH_DELAY_ALWAYS: Final = 0.005

_OPEN_FLAGS: Final = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
_MODE: Final = 0o640
_SCHEMA: Final = 1


class FileSink(QueuedSink):
    """Appends sealed JSON lines to ``path`` from a writer thread.

    The file is opened (and its chain resumed) here, in the caller's thread,
    so that a path that cannot be opened (missing directory, permissions) is
    an error at startup rather than a sink that fails from its first record.
    """

    durable = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        fsync: FsyncPolicy = "interval",
        fsync_interval_ms: int = 200,
        queue_size: int = 10000,
        key: bytes | None = None,
        chain_id: str | None = None,
        name: str | None = None,
    ) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_POLICIES)}, got {fsync!r}")
        if fsync_interval_ms < 1:
            raise ValueError(f"fsync_interval_ms must be at least 1, got {fsync_interval_ms}")
        self.path = os.fspath(path)
        super().__init__(name or f"file:{self.path}", queue_size=queue_size)
        self.fsync_policy: FsyncPolicy = fsync
        self.batch_delay = BATCH_DELAY_ALWAYS if fsync == "always" else BATCH_DELAY
        self.fsync_interval = fsync_interval_ms / 1000
        self._key = key
        #: Time of the oldest write not yet fsynced (``time.monotonic()``).
        self._dirty_since: float | None = None
        #: A failed write left part of a line behind that could not be cut off.
        self._torn = False
        #: Set when an existing file had to be moved aside: (new name, why).
        self.moved_aside: tuple[str, str] | None = None
        self._fd = -1
        self._fd, resumed = self._open(resume=True)
        if resumed is not None:
            self.chain = resumed
            reason, previous = "restart", None
        else:
            self.chain = trail.Chain(key=key, chain_id=chain_id or trail.new_chain_id())
            reason, previous = "new", None
            if self.moved_aside is not None:
                previous = self.moved_aside[0]
        # The start record is written by the writer thread, like every line.
        self._queue.append(Entry(Kind.START, {"reason": reason, "previous_file": previous}))

    # -- opening -----------------------------------------------------------

    def _open(self, *, resume: bool) -> tuple[int, trail.Chain | None]:
        """Open the path for appending; resume or move aside what is there.

        Returns the descriptor and, if ``resume`` and the file holds a
        chain that can be continued, that chain.
        """
        chain: trail.Chain | None = None
        try:
            size = os.stat(self.path).st_size
        except FileNotFoundError:
            size = 0
        if size > 0:
            try:
                if not resume:
                    raise trail.ChainError("a non-empty file appeared where a new one was due")
                chain = trail.resume(self.path, key=self._key)
            except (trail.ChainError, ValueError) as exc:
                self._move_aside(describe_error(exc))
        existed = os.path.exists(self.path)
        fd = os.open(self.path, _OPEN_FLAGS, _MODE)
        if not existed and self.fsync_policy != "never":
            try:
                self._sync_directory()
            except OSError:
                os.close(fd)
                raise
        return fd, chain

    def _move_aside(self, problem: str) -> None:
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        target = f"{self.path}.broken-{stamp}"
        counter = 1
        while os.path.exists(target):
            counter += 1
            target = f"{self.path}.broken-{stamp}-{counter}"
        os.rename(self.path, target)
        self.moved_aside = (target, problem)
        sys.stderr.write(
            f"popguard: {self.path}: cannot continue its hash chain ({problem}); "
            f"moved it to {target} and started a new file\n"
        )

    def _sync_directory(self) -> None:
        """Make a newly created file's directory entry durable too."""
        directory = os.path.dirname(os.path.abspath(self.path))
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    # -- writing -----------------------------------------------------------

    def _line(self, record: dict[str, Any]) -> bytes:
        return (self.chain.seal_line(record) + "\n").encode("ascii")

    def _seal(self, event: Mapping[str, Any]) -> bytes:
        record = jsonable_record(event)
        for name in trail.CHAIN_FIELDS:
            if name in record:  # never let a field pose as a chain field
                record[f"{name}_"] = record.pop(name)
        return self._line(record)

    def _write_all(self, data: bytes) -> None:
        """Write ``data`` completely, or undo the part written and raise."""
        fd = self._fd
        if self._torn:
            os.write(fd, b"\n")  # end the fragment we could not cut off
            self._torn = False
        done = 0
        try:
            while done < len(data):
                done += os.write(fd, data[done:])
        except OSError:
            if done:
                self._cut_torn_tail(fd, done)
            raise
        if self._dirty_since is None:
            self._dirty_since = time.monotonic()

    def _cut_torn_tail(self, fd: int, written: int) -> None:
        try:
            size = os.fstat(fd).st_size
            if size >= written:
                os.ftruncate(fd, size - written)
                return
        except OSError:
            pass
        self._torn = True

    def _deliver(self, entry: Entry) -> None:
        if entry.payload is None:
            assert entry.event is not None
            entry.payload = self._seal(entry.event)
        self._write_all(entry.payload)

    def _deliver_batch(self, batch: list[Entry]) -> None:
        # Sealed one by one (in file order, once each: the payloads are kept
        # for a retry), written with one call: all of them or, with the torn
        # tail cut off, none.
        payloads = []
        for entry in batch:
            if entry.payload is None:
                assert entry.event is not None
                entry.payload = self._seal(entry.event)
            payloads.append(entry.payload)
        self._write_all(b"".join(payloads))

    # -- fsync -------------------------------------------------------------

    def _fsync(self) -> None:
        if self._dirty_since is None:
            return
        os.fsync(self._fd)
        self._dirty_since = None

    def _commit(self, *, durable: bool) -> None:
        policy = self.fsync_policy
        due = (
            policy == "interval"
            and self._dirty_since is not None
            and time.monotonic() - self._dirty_since >= self.fsync_interval
        )
        if durable or policy == "always" or due:
            self._fsync()

    def _sync(self, *, force: bool) -> None:
        if force or self.fsync_policy != "never":
            self._fsync()

    def _idle_deadline(self) -> float | None:
        if self.fsync_policy == "interval" and self._dirty_since is not None:
            return self._dirty_since + self.fsync_interval
        return None

    def _idle(self) -> None:
        self._fsync()

    # -- start and rotation ------------------------------------------------

    def _process(self, entry: Entry) -> None:
        if entry.kind is Kind.START:
            self._write_start(entry)
        else:
            super()._process(entry)

    def _extra(self) -> dict[str, Any]:
        return {"schema": _SCHEMA, **self.identity()}

    def _write_start(self, entry: Entry) -> None:
        """``audit.chain.start`` (and the reason for a move), once; retryable."""
        assert entry.event is not None
        if entry.stage == 0:
            if entry.payload is None:
                record = trail.start_record(
                    self.chain,
                    reason=str(entry.event["reason"]),
                    previous_file=entry.event["previous_file"],
                    **self._extra(),
                )
                entry.payload = (trail.render(record) + "\n").encode("ascii")
            self._write_all(entry.payload)
            entry.payload = None
            entry.stage = 1
        if entry.stage == 1 and self.moved_aside is not None:
            moved_to, problem = self.moved_aside
            if entry.payload is None:
                entry.payload = self._line(
                    {
                        "timestamp": utc_timestamp(),
                        "level": "warning",
                        "event": "audit.chain.resume_failed",
                        "file": self.path,
                        "moved_to": moved_to,
                        "error": problem,
                        **self._extra(),
                    }
                )
            self._write_all(entry.payload)
            entry.payload = None
            self.moved_aside = None
        entry.stage = 2
        self._sync(force=False)

    def _reopen(self, entry: Entry) -> None:
        """After logrotate: rotate record to the old file, start the new one."""
        if entry.stage == 0:
            if self._same_file():
                return  # nothing was rotated: keep writing here
            if entry.payload is None:
                record = trail.rotate_record(self.chain, self.path, **self._extra())
                entry.payload = (trail.render(record) + "\n").encode("ascii")
            self._write_all(entry.payload)
            entry.payload = None
            entry.stage = 1
        if entry.stage == 1:
            self._sync(force=False)
            entry.stage = 2
        if entry.stage == 2:
            fd, _ = self._open(resume=False)
            old, self._fd = self._fd, fd
            self._dirty_since = None
            self._torn = False
            os.close(old)
            entry.stage = 3
            start = Entry(Kind.START, {"reason": "reopen", "previous_file": self.path})
            with self._cond:  # the next line of the new file
                self._queue.insert(1, start)

    def _same_file(self) -> bool:
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(self._fd)
        return (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino)

    def _release(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
