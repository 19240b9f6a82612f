"""What a worker process knows of its place among ``workers: N``.

Its own module, so that the server (which a worker runs) and the
supervisor (which starts workers) both use it without importing each
other.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import trio

from popguard.audit import AuditLog

__all__ = ["WorkerRole", "parse_worker_arg"]


@dataclass(frozen=True, slots=True)
class WorkerRole:
    """What a worker process knows about its place (``--worker I/N:FD:PPID``)."""

    index: int
    count: int
    #: Write end of the pipe the parent waits on for "ready" (-1: none).
    ready_fd: int
    #: Read end of a pipe whose write end only the parent holds: it turns
    #: readable (end of file) when the parent is gone, however it died.
    lifeline_fd: int

    def ready(self, admin: tuple[str, int] | None = None) -> None:
        """Tell the parent this worker accepts connections, and where its
        admin listener is (``R host port``; ``R`` alone: none)."""
        if self.ready_fd >= 0:
            message = b"R" if admin is None else f"R {admin[0]} {admin[1]}".encode()
            try:
                os.write(self.ready_fd, message)
            except OSError:
                pass  # the parent is gone; watch_parent stops us
            finally:
                os.close(self.ready_fd)

    async def watch_parent(self, stop: Callable[[], None], audit: AuditLog) -> None:
        """Stop gracefully (sessions drain, no QUIT) if the parent dies."""
        if self.lifeline_fd < 0:
            return
        await trio.lowlevel.wait_readable(self.lifeline_fd)
        audit.error("popguard.worker.orphaned", reason="the supervising parent is gone")
        stop()


def parse_worker_arg(text: str) -> WorkerRole:
    """``I/N:READY_FD:LIFELINE_FD``, as the supervisor writes it."""
    try:
        place, ready, lifeline = text.split(":")
        index, count = (int(part) for part in place.split("/"))
        role = WorkerRole(index, count, int(ready), int(lifeline))
    except ValueError:
        raise ValueError(f"expected I/N:FD:FD, got {text!r}") from None
    if not 1 <= role.index <= role.count:
        raise ValueError(f"worker {role.index} of {role.count}")
    return role
