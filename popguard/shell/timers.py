"""One task for every session's timers.

Each session has timers (the idle timer of RFC 1939 §3, the login and
greeting limits, a policy's ``idle_timeout`` and ``max_session``).  A task
per session to watch them cost a task, a cancel scope and an event per
session, and a wake-up per re-arm.  :class:`SessionTimers` keeps one heap of
``(when, session)`` for a whole server and one task that sleeps until the
earliest.

Timers are lazy: activity only moves a session's ``last_activity``
timestamp (no heap operation on the hot path).  When a session's entry
comes due, the service asks it (:meth:`TimedSession.timer_due`); the session
either fires (ends itself, or records a dry-run rule) or answers when to ask
again, later, because there was activity meanwhile.  Re-arming (a login, a
policy reload) pushes a new entry and makes the older one stale.
"""

from __future__ import annotations

import heapq
import itertools
import math
from typing import Final, Protocol

import trio

#: A stale entry count past this (and past half the heap) rebuilds the heap,
#: so sessions that ended do not stay referenced until their old deadline.
_REBUILD_MIN: Final = 64


class TimedSession(Protocol):
    #: When the entry this session counts on comes due (None: none).
    timer_at: float | None

    def timer_due(self) -> float | None:
        """The entry came due: fire, and return when to look again (None: never)."""
        ...


class SessionTimers:
    """The timers of many sessions, on one task (:meth:`run`)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, TimedSession]] = []
        self._order = itertools.count()
        self._wakeup = trio.Event()
        self._sleeping_until = math.inf
        self._stale = 0

    def __len__(self) -> int:
        return len(self._heap)

    def schedule(self, session: TimedSession, when: float) -> None:
        """Look at ``session`` at ``when`` (any earlier entry of it is dropped)."""
        if session.timer_at is not None:
            self._stale += 1
        session.timer_at = when
        heapq.heappush(self._heap, (when, next(self._order), session))
        if when < self._sleeping_until:
            self._wakeup.set()
        self._maybe_rebuild()

    def cancel(self, session: TimedSession) -> None:
        """Forget ``session`` (it ended)."""
        if session.timer_at is not None:
            session.timer_at = None
            self._stale += 1
            self._maybe_rebuild()

    def _maybe_rebuild(self) -> None:
        heap = self._heap
        if self._stale > _REBUILD_MIN and self._stale * 2 > len(heap):
            self._heap = [entry for entry in heap if entry[2].timer_at == entry[0]]
            heapq.heapify(self._heap)
            self._stale = 0

    async def run(self) -> None:
        """Fire due timers, forever (cancel the task to stop)."""
        while True:
            now = trio.current_time()
            heap = self._heap
            while heap and heap[0][0] <= now:
                when, _, session = heapq.heappop(heap)
                if session.timer_at != when:
                    self._stale = max(0, self._stale - 1)
                    continue  # re-armed since, or ended
                session.timer_at = None
                again = session.timer_due()
                if again is not None:
                    self.schedule(session, again)
                heap = self._heap  # a rebuild may have replaced it
            self._sleeping_until = heap[0][0] if heap else math.inf
            self._wakeup = trio.Event()
            with trio.move_on_at(self._sleeping_until):
                await self._wakeup.wait()
            self._sleeping_until = math.inf
