"""One thread that runs every blocking Redis call of a process, in order.

redis-py blocks; trio must not.  Each call is queued to this thread and its
result handed back through the trio token, the way ``trio.to_thread`` does
it, but with one long-lived thread and one connection instead of a thread
(and a connection) per call in flight.  Measured, this is faster and
cheaper (``popguard/sharedstate/redis.py`` has the numbers).

A caller that gives up (its cancel scope, ``op_timeout``) returns at once;
its call is skipped if the thread has not started it yet, and its result is
dropped if it has.  So a stalled Redis holds up the thread, never a caller.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import outcome
import trio

T = TypeVar("T")


@dataclass(slots=True, eq=False)
class _Job:
    operation: Callable[[], Any]
    task: trio.lowlevel.Task
    token: trio.lowlevel.TrioToken
    abandoned: bool = False


class RedisThread:
    """Runs blocking calls in one daemon thread; :meth:`call` awaits one."""

    def __init__(self, name: str, on_exit: Callable[[], object]) -> None:
        self._name = name
        self._on_exit = on_exit
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False

    async def call(self, operation: Callable[[], T]) -> T:
        """``operation()`` in the thread; cancelling the caller abandons it."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._closed:
            raise RuntimeError("the Redis thread is closed")
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
            self._thread.start()
        job = _Job(operation, trio.lowlevel.current_task(), trio.lowlevel.current_trio_token())
        self._queue.put(job)

        def abort(_: object) -> trio.lowlevel.Abort:
            job.abandoned = True
            return trio.lowlevel.Abort.SUCCEEDED

        return cast(T, await trio.lowlevel.wait_task_rescheduled(abort))

    async def aclose(self) -> None:
        """Finish the call in progress, skip the rest, run ``on_exit``, end the thread."""
        if self._closed:
            return
        self._closed = True
        thread = self._thread
        if thread is None:
            self._on_exit()
            return
        self._queue.put(None)
        await trio.to_thread.run_sync(thread.join, abandon_on_cancel=True)

    def _serve(self) -> None:
        try:
            while (job := self._queue.get()) is not None:
                if job.abandoned:
                    continue
                result = outcome.capture(job.operation)
                # If the caller's trio run is over, nobody waits for the result.
                with contextlib.suppress(trio.RunFinishedError):
                    job.token.run_sync_soon(_deliver, job, result)
        finally:
            self._on_exit()


def _deliver(job: _Job, result: outcome.Outcome[Any]) -> None:
    """In the trio thread: wake the caller, unless it gave up meanwhile."""
    if not job.abandoned:
        trio.lowlevel.reschedule(job.task, result)
