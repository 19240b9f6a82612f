"""The timer service: one task, one heap, lazy deadlines (popguard.shell.timers)."""

from __future__ import annotations

import gc
import weakref

import trio
import trio.testing

from popguard.shell.timers import SessionTimers


class Session:
    """A timed session whose deadline moves as it pleases the test."""

    def __init__(self, name: str, deadline: float, log: list[tuple[str, float]]) -> None:
        self.name = name
        self.deadline = deadline
        self.timer_at: float | None = None
        self.log = log
        self.calls = 0

    def timer_due(self) -> float | None:
        self.calls += 1
        now = trio.current_time()
        if now < self.deadline:
            return self.deadline  # activity moved it: look again then
        self.log.append((self.name, now))
        return None


async def test_each_session_fires_at_its_deadline(autojump_clock: trio.testing.MockClock) -> None:
    timers = SessionTimers()
    log: list[tuple[str, float]] = []
    start = trio.current_time()
    a, b = Session("a", start + 5, log), Session("b", start + 2, log)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timers.run)
        timers.schedule(a, a.deadline)
        timers.schedule(b, b.deadline)
        await trio.sleep(10)
        nursery.cancel_scope.cancel()
    assert [(name, round(at - start)) for name, at in log] == [("b", 2), ("a", 5)]


async def test_activity_moves_the_deadline_without_touching_the_heap(
    autojump_clock: trio.testing.MockClock,
) -> None:
    timers = SessionTimers()
    log: list[tuple[str, float]] = []
    start = trio.current_time()
    idle = Session("idle", start + 3, log)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timers.run)
        timers.schedule(idle, idle.deadline)
        await trio.sleep(2)
        idle.deadline = start + 8  # activity: only the session knows
        assert len(timers) == 1
        await trio.sleep(10)
        nursery.cancel_scope.cancel()
    assert [(name, round(at - start)) for name, at in log] == [("idle", 8)]
    assert idle.calls == 2  # looked at once at 3 (too early), then at 8


async def test_an_earlier_schedule_wakes_the_service_and_the_old_entry_goes_stale(
    autojump_clock: trio.testing.MockClock,
) -> None:
    timers = SessionTimers()
    log: list[tuple[str, float]] = []
    start = trio.current_time()
    s = Session("s", start + 100, log)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timers.run)
        timers.schedule(s, s.deadline)
        await trio.sleep(1)
        s.deadline = start + 4  # a login: a shorter policy timer applies
        timers.schedule(s, s.deadline)
        await trio.sleep(200)
        nursery.cancel_scope.cancel()
    assert [(name, round(at - start)) for name, at in log] == [("s", 4)]
    assert s.calls == 1  # the stale entry at 100 was skipped, not delivered


async def test_ended_sessions_are_not_kept_until_their_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    timers = SessionTimers()
    log: list[tuple[str, float]] = []
    refs = []
    for index in range(1000):
        session = Session(str(index), trio.current_time() + 600, log)
        timers.schedule(session, session.deadline)
        timers.cancel(session)
        refs.append(weakref.ref(session))
        del session
    gc.collect()
    # The heap is rebuilt once stale entries are most of it: memory stays
    # bounded under churn, long before the 600 s deadlines.
    assert len(timers) <= 130
    assert sum(ref() is not None for ref in refs) <= 130
    assert log == []
