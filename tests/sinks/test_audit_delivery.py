"""AuditLog over queued sinks: the event loop never waits, health, durability."""

from __future__ import annotations

import datetime
import errno
import io
import json
import os
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from popguard.audit import (
    AuditLog,
    ConsoleSink,
    iso_utc,
    open_audit_log_from_config,
    session_context,
)
from popguard.config import AuditConfig
from popguard.core.records import AuditRecord, Event
from popguard.sinks.base import Entry, QueuedSink, ThreadedSink, jsonable, jsonable_record
from popguard.sinks.file import FileSink
from popguard.sinks.stream import StdoutSink
from tests.listsink import ListSink

# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


class GateSink(QueuedSink):
    """A queued sink whose deliveries can be held, slowed or failed."""

    durable = True

    def __init__(self, queue_size: int = 10000) -> None:
        super().__init__("gate", queue_size=queue_size)
        self.retry_initial = 0.01
        self.retry_max = 0.05
        self.open = threading.Event()
        self.open.set()
        self.fail = threading.Event()
        self.delay = 0.0
        self.delivered: list[dict[str, Any]] = []
        self.syncs = 0

    def _deliver(self, entry: Entry) -> None:
        self.open.wait()
        if self.delay:
            time.sleep(self.delay)
        if self.fail.is_set():
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        assert entry.event is not None
        self.delivered.append(dict(entry.event))

    def _sync(self, *, force: bool) -> None:
        self.syncs += 1

    def _commit(self, *, durable: bool) -> None:
        if durable:
            self.syncs += 1


def record(n: int, **fields: Any) -> AuditRecord:
    return AuditRecord(Event.DELE_MARKED, {"msg": n, **fields})


async def wait_for(condition: Callable[[], bool], limit: float = 10.0) -> None:
    with trio.fail_after(limit):
        while not condition():
            await trio.sleep(0.005)


class LoopWatch:
    """Measures how late the event loop runs a task that sleeps 5 ms at a time."""

    def __init__(self) -> None:
        self.worst = 0.0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            before = trio.current_time()
            await trio.sleep(0.005)
            self.worst = max(self.worst, trio.current_time() - before - 0.005)


# --------------------------------------------------------------------------
# Plain sinks keep working
# --------------------------------------------------------------------------


def test_plain_sinks_are_called_inline() -> None:
    sink = ListSink()
    log = AuditLog([sink])
    with session_context(session="abc", client="127.0.0.1:1"):
        log.emit(record(1))
    log.warning("w", x=1)
    log.error("e")
    assert [e["event"] for e in sink.events] == ["dele.marked", "w", "e"]
    first = sink.events[0]
    assert first["session"] == "abc"
    assert first["schema"] == 1
    assert first["instance"] == "popguard"
    assert [e["level"] for e in sink.events] == ["info", "warning", "error"]
    assert log.healthy
    assert log.accepting_sessions
    assert log.lost == 0
    assert not log.durable
    log.close()


async def test_emit_durable_without_a_durable_sink_is_true() -> None:
    sink = ListSink()
    log = AuditLog([sink])
    assert await log.emit_durable(record(1))
    assert sink.named("dele.marked")


def test_two_logs_do_not_mix() -> None:
    a, b = ListSink(), ListSink()
    log_a = AuditLog([a], instance="a")
    log_b = AuditLog([b], instance="b")
    log_a.event("x")
    log_b.event("y")
    assert [e["event"] for e in a.events] == ["x"]
    assert [e["event"] for e in b.events] == ["y"]


# --------------------------------------------------------------------------
# The event loop never waits for a sink
# --------------------------------------------------------------------------


async def test_a_slow_disk_does_not_block_the_event_loop(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    sink = FileSink(path, fsync="always")
    real_write = os.write

    def slow_write(fd: int, data: Any) -> int:
        if os.readlink(f"/proc/self/fd/{fd}") == str(path):
            time.sleep(0.5)  # a disk that takes half a second per write
        return real_write(fd, data)

    log = AuditLog([sink], instance="test")
    watch = LoopWatch()
    emit_times: list[float] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "write", slow_write)
        async with trio.open_nursery() as nursery:
            await nursery.start(watch.run)
            for n in range(5):
                started = time.perf_counter()
                log.emit(record(n))
                emit_times.append(time.perf_counter() - started)
                await trio.sleep(0.1)
            await wait_for(lambda: sink.written == 5)
            nursery.cancel_scope.cancel()
    assert max(emit_times) < 0.01, emit_times
    assert watch.worst < 0.1, f"the loop stalled for {watch.worst:.3f} s"
    log.close()
    assert len(path.read_text().splitlines()) == 6


async def test_emit_durable_lets_other_tasks_run() -> None:
    gate = GateSink()
    gate.delay = 0.3
    log = AuditLog([gate])
    watch = LoopWatch()
    async with trio.open_nursery() as nursery:
        await nursery.start(watch.run)
        started = trio.current_time()
        assert await log.emit_durable(record(1))
        assert trio.current_time() - started >= 0.25
        nursery.cancel_scope.cancel()
    assert watch.worst < 0.1
    assert gate.delivered[0]["msg"] == 1
    assert gate.syncs >= 1
    log.close()


async def test_emit_durable_gives_up_after_the_timeout() -> None:
    gate = GateSink()
    gate.open.clear()
    log = AuditLog([gate], durable_timeout=0.2)
    started = trio.current_time()
    assert not await log.emit_durable(record(1))
    assert 0.15 < trio.current_time() - started < 1.0
    gate.open.set()
    log.close()
    assert [e["msg"] for e in gate.delivered] == [1]  # written all the same


async def test_emit_durable_writes_and_fsyncs_the_file(tmp_path: Path) -> None:
    config = AuditConfig(file=str(tmp_path / "a.jsonl"), console=False, fsync="never")
    log = open_audit_log_from_config(config, instance="test")
    assert await log.emit_durable(record(7))
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["msg"] == 7
    log.close()


# --------------------------------------------------------------------------
# Queue overflow
# --------------------------------------------------------------------------


async def test_overflow_in_fail_open_counts_and_records_the_loss() -> None:
    gate = GateSink(queue_size=5)
    other = ListSink()
    log = AuditLog([gate, other], on_failure="fail-open")
    gate.open.clear()  # the writer is stuck on the first record
    for n in range(20):
        log.emit(record(n))
    assert gate.lost == 15
    assert log.lost == 15
    assert not gate.healthy
    assert not log.healthy
    assert log.accepting_sessions  # fail-open: keep serving
    failed = other.named("audit.sink.failed")
    assert len(failed) == 1  # one report for the whole overflow
    assert "queue full" in failed[0]["error"]
    assert "session" not in failed[0]
    gate.open.set()
    await wait_for(lambda: gate.healthy)
    recovered = other.named("audit.sink.recovered")
    assert len(recovered) == 1
    assert recovered[0]["lost"] == 15
    # The sink's own stream says where the gap is and how big it is.
    events = [e["event"] for e in gate.delivered]
    assert events == ["dele.marked"] * 5 + ["audit.records.lost"]
    marker = gate.delivered[5]
    assert marker["count"] == 15
    assert marker["sink"] == "gate"
    assert marker["level"] == "error"
    log.emit(record(99))
    log.close()
    assert gate.delivered[-1]["msg"] == 99


async def test_overflow_reports_carry_no_session_context() -> None:
    gate = GateSink(queue_size=1)
    other = ListSink()
    log = AuditLog([gate, other])
    gate.open.clear()
    with session_context(session="s1", client="c"):
        log.emit(record(1))
        log.emit(record(2))
    failed = other.named("audit.sink.failed")[0]
    assert "session" not in failed
    assert "client" not in failed
    assert failed["instance"] == "popguard"
    gate.open.set()
    log.close()


# --------------------------------------------------------------------------
# fail-closed
# --------------------------------------------------------------------------


async def test_fail_closed_refuses_sessions_and_durable_records() -> None:
    gate = GateSink()
    other = ListSink()
    log = AuditLog([gate, other], on_failure="fail-closed")
    assert log.accepting_sessions
    assert log.fail_closed
    assert await log.emit_durable(record(1))
    gate.fail.set()
    log.emit(record(2))
    await wait_for(lambda: not log.healthy)
    assert not log.accepting_sessions
    started = trio.current_time()
    assert not await log.emit_durable(record(3))
    assert trio.current_time() - started < 0.1  # refused at once, no waiting
    assert other.named("audit.sink.failed")
    gate.fail.clear()
    await wait_for(lambda: log.healthy)
    assert log.accepting_sessions
    assert await log.emit_durable(record(4))
    assert [e["msg"] for e in gate.delivered] == [1, 2, 3, 4]  # nothing lost
    assert other.named("audit.sink.recovered")[0]["lost"] == 0
    log.close()


async def test_fail_closed_with_a_full_queue() -> None:
    gate = GateSink(queue_size=2)
    log = AuditLog([gate], on_failure="fail-closed")
    gate.open.clear()
    for n in range(3):
        log.emit(record(n))  # never blocks, even in fail-closed mode
    assert not log.accepting_sessions
    assert not await log.emit_durable(record(9))
    gate.open.set()
    await wait_for(lambda: log.accepting_sessions)
    log.close()


async def test_a_failure_while_waiting_answers_false_at_once() -> None:
    gate = GateSink()
    gate.open.clear()
    log = AuditLog([gate], durable_timeout=5.0)
    gate.fail.set()

    async def unblock_later() -> None:
        await trio.sleep(0.1)
        gate.open.set()  # the write is attempted now, and fails

    async with trio.open_nursery() as nursery:
        nursery.start_soon(unblock_later)
        started = trio.current_time()
        assert not await log.emit_durable(record(1))
        assert trio.current_time() - started < 2.0
    gate.fail.clear()
    log.close()
    assert [e["msg"] for e in gate.delivered] == [1]


# --------------------------------------------------------------------------
# close() and flush()
# --------------------------------------------------------------------------


def test_close_drains_every_queue(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    out = io.StringIO()
    sinks: list[Any] = [FileSink(path, fsync="never"), StdoutSink(out)]
    log = AuditLog(sinks)
    for n in range(2000):
        log.emit(record(n))
    log.event("popguard.stopped")
    log.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 2002
    assert json.loads(lines[-1])["event"] == "popguard.stopped"
    stdout_lines = out.getvalue().splitlines()
    assert len(stdout_lines) == 2001
    assert json.loads(stdout_lines[-1])["event"] == "popguard.stopped"
    log.close()  # idempotent


def test_close_is_bounded_when_a_sink_is_stuck(capsys: pytest.CaptureFixture[str]) -> None:
    gate = GateSink()
    gate.fail.set()
    log = AuditLog([gate])
    log.emit(record(1))
    log.emit(record(2))
    started = time.monotonic()
    log.close(timeout=0.3)
    assert time.monotonic() - started < 2.0
    assert gate.lost == 2
    assert "2 record(s) not delivered" in capsys.readouterr().err


async def test_aflush() -> None:
    gate = GateSink()
    gate.delay = 0.01
    log = AuditLog([gate])
    for n in range(10):
        log.emit(record(n))
    assert await log.aflush()
    assert len(gate.delivered) == 10
    log.close()


def test_console_runs_on_a_writer_thread() -> None:
    out = io.StringIO()
    console = ThreadedSink(ConsoleSink(out), name="console")
    log = AuditLog([console])
    log.emit(record(3, user="bob"))
    log.close()
    text = out.getvalue()
    assert "dele.marked" in text
    assert "user=bob" in text
    assert console.written == 1


def test_stdout_sink_writes_json_lines() -> None:
    out = io.StringIO()
    log = AuditLog([StdoutSink(out)])
    log.emit(record(1, user="a\r\nb"))
    log.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0])["user"] == "a\r\nb"
    assert "chain" not in json.loads(lines[0])


def test_status() -> None:
    gate = GateSink()
    log = AuditLog([gate, ListSink()])
    log.emit(record(1))
    assert log.flush()
    (status,) = log.status()
    assert status == {
        "sink": "gate",
        "durable": True,
        "healthy": True,
        "lost": 0,
        "backlog": 0,
        "written": 1,
        "last_error": None,
    }
    log.close()


# --------------------------------------------------------------------------
# Cost on the event loop
# --------------------------------------------------------------------------


def test_emit_cost_on_the_event_loop(tmp_path: Path) -> None:
    """emit() only enqueues: its cost does not depend on the disk."""
    config = AuditConfig(file=str(tmp_path / "a.jsonl"), console=False, fsync="always")
    log = open_audit_log_from_config(config, instance="test")
    rec = record(1, user="alice")
    samples = []
    for _ in range(20):
        started = time.perf_counter()
        for _ in range(50):
            log.emit(rec)
        samples.append((time.perf_counter() - started) / 50)
    log.close()
    per_record = statistics.median(samples)
    print(f"emit(): {per_record * 1e6:.1f} us per record (fsync=always)")
    assert per_record < 500e-6


# --------------------------------------------------------------------------
# The pipeline's own processors: session fields and the timestamp
# --------------------------------------------------------------------------


async def test_session_context_nests_reaches_child_tasks_and_yields_to_record_fields() -> None:
    sink = ListSink()
    log = AuditLog([sink])

    async def child() -> None:
        log.event("in.child")

    with session_context(session="s1", client="192.0.2.1:1", listener="pop3"):
        with session_context(client="198.51.100.7:2", proxy="192.0.2.1:1"):
            log.event("inner")
        log.event("outer", listener="own")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(child)
    log.event("outside")
    inner, outer, in_child, outside = sink.events
    assert (inner["session"], inner["client"], inner["proxy"]) == (
        "s1",
        "198.51.100.7:2",
        "192.0.2.1:1",
    )
    assert (outer["client"], outer["listener"]) == ("192.0.2.1:1", "own")
    assert "proxy" not in outer
    assert in_child["session"] == "s1"
    assert not {"session", "client", "listener"} & outside.keys()
    log.close()


@pytest.mark.parametrize(
    ("seconds", "micro"),
    [(0, 0), (1, 5), (1_781_000_000, 0), (1_781_000_000, 123_456), (1_781_000_059, 999_999)],
)
def test_timestamps_are_structlogs_iso_utc_text(seconds: int, micro: int) -> None:
    # TimeStamper(fmt="iso", utc=True) writes datetime.isoformat() with "Z":
    # no fraction at all when the microseconds are 0.
    expected = (
        datetime.datetime.fromtimestamp(seconds, datetime.UTC)
        .replace(microsecond=micro)
        .isoformat()
        .replace("+00:00", "Z")
    )
    assert iso_utc(seconds + (micro + 0.5) / 1_000_000) == expected  # mid-microsecond


def test_a_records_timestamp_is_now_in_utc() -> None:
    sink = ListSink()
    log = AuditLog([sink])
    before = datetime.datetime.now(datetime.UTC)
    log.event("tick")
    after = datetime.datetime.now(datetime.UTC)
    stamp = sink.events[0]["timestamp"]
    assert stamp.endswith("Z")
    when = datetime.datetime.fromisoformat(stamp)
    assert before - datetime.timedelta(milliseconds=1) <= when <= after
    log.close()


def test_a_records_values_are_made_json_the_same_way_field_by_field_or_whole() -> None:
    event = {
        "event": Event.DELE_MARKED,  # a str subclass: kept as the string it is
        "msg": 3,
        "ok": True,
        "detail": None,
        "messages": ({"msg": 1, "uidl": "a"}, {"msg": 2}),
        "ratio": float("inf"),
        7: "a key that is not a string",
        "when": datetime.date(2026, 12, 7),
    }
    expected = {
        "event": "dele.marked",
        "msg": 3,
        "ok": True,
        "detail": None,
        "messages": [{"msg": 1, "uidl": "a"}, {"msg": 2}],
        "ratio": "inf",
        "7": "a key that is not a string",
        "when": "2026-12-07",
    }
    assert jsonable_record(event) == expected == jsonable(event)
    assert json.loads(json.dumps(jsonable_record(event))) == expected
