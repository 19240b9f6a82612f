"""The hash-chained JSON-lines file sink: chain, rotation, fsync, disk failures."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from popguard.audit import AuditLog, JsonLinesSink, open_audit_log, open_audit_log_from_config
from popguard.config import AuditConfig
from popguard.core.records import AuditRecord, Event
from popguard.sinks.file import BATCH_DELAY, BATCH_DELAY_ALWAYS, FileSink
from popguard.trail import chain as trail
from tests.listsink import ListSink

# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def read_records(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="ascii")
    assert text == "" or text.endswith("\n"), "a torn last line"
    return [json.loads(line) for line in text.splitlines()]


def check_chain(
    records: list[dict[str, Any]],
    *,
    key: bytes | None = None,
    prev: str = trail.GENESIS,
    seq: int = 0,
) -> tuple[str, int]:
    """Every record verifies and links to the one before; returns (prev, seq)."""
    for record in records:
        assert record["prev"] == prev, f"broken link at seq {record['seq']}"
        assert record["seq"] == seq + 1
        assert record["alg"] == (trail.ALG_HMAC if key else trail.ALG_SHA256)
        assert record["hash"] == trail.digest(trail.canonical(record), key)
        prev, seq = record["hash"], record["seq"]
    return prev, seq


def record(n: int, **fields: Any) -> AuditRecord:
    return AuditRecord(Event.DELE_MARKED, {"msg": n, **fields})


def wait_until(condition: Callable[[], bool], limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


class DiskFaults:
    """Wraps ``os.write`` / ``os.fsync`` for one file descriptor's path.

    Only calls on descriptors of the watched file are affected, so trio's
    and pytest's own writes go through untouched.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
        self.path = str(path)
        self.fail_writes = 0  # fail this many writes with ...
        self.write_error = errno.ENOSPC
        self.partial_next = False  # write half of the next buffer, then fail
        self.fail_all = threading.Event()
        self.block = threading.Event()
        self.block.set()
        self.delay = 0.0
        self.writes = 0
        self.fsyncs = 0
        self.fsync_errors = 0
        self._real_write = os.write
        self._real_fsync = os.fsync
        monkeypatch.setattr(os, "write", self._write)
        monkeypatch.setattr(os, "fsync", self._fsync)

    def _ours(self, fd: int) -> bool:
        try:
            return os.readlink(f"/proc/self/fd/{fd}").startswith(self.path)
        except OSError:
            return False

    def _write(self, fd: int, data: Any) -> int:
        if not self._ours(fd):
            return self._real_write(fd, data)
        self.block.wait()
        if self.delay:
            time.sleep(self.delay)
        if self.partial_next:
            self.partial_next = False
            self.fail_writes = max(self.fail_writes, 1)
            return self._real_write(fd, bytes(data)[: len(data) // 2])
        if self.fail_all.is_set() or self.fail_writes > 0:
            self.fail_writes = max(0, self.fail_writes - 1)
            raise OSError(self.write_error, os.strerror(self.write_error))
        self.writes += 1
        return self._real_write(fd, data)

    def _fsync(self, fd: int) -> None:
        if self._ours(fd):
            if self.fsync_errors > 0:
                self.fsync_errors -= 1
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            self.fsyncs += 1
        self._real_fsync(fd)


@pytest.fixture
def audit_path(tmp_path: Path) -> Path:
    return tmp_path / "audit.jsonl"


def file_log(path: Path, **options: Any) -> tuple[AuditLog, FileSink, ListSink]:
    on_failure = options.pop("on_failure", "fail-open")
    other = ListSink()
    sink = FileSink(path, **options)
    sink.retry_initial = 0.01
    sink.retry_max = 0.05
    return AuditLog([sink, other], instance="test", on_failure=on_failure), sink, other


# --------------------------------------------------------------------------
# The chain
# --------------------------------------------------------------------------


def test_records_are_sealed_and_chained(audit_path: Path) -> None:
    log, sink, _ = file_log(audit_path)
    for n in range(1, 6):
        log.emit(record(n, user="alice"))
    log.event("popguard.stopped")
    log.close()

    records = read_records(audit_path)
    assert [r["event"] for r in records] == [
        "audit.chain.start",
        *["dele.marked"] * 5,
        "popguard.stopped",
    ]
    start = records[0]
    assert start["reason"] == "new"
    assert start["previous_file"] is None
    assert start["instance"] == "test"
    check_chain(records)
    assert len({r["chain"] for r in records}) == 1
    assert [r["msg"] for r in records[1:6]] == [1, 2, 3, 4, 5]
    # Lines are in the chain module's fixed form (verify).
    for line, parsed in zip(audit_path.read_text().splitlines(), records, strict=True):
        assert line == trail.render(parsed)
    assert sink.lost == 0
    assert sink.healthy


def test_file_is_opened_append_only(audit_path: Path) -> None:
    sink = FileSink(audit_path)
    try:
        flags = int(
            next(
                line.split()[1]
                for line in Path(f"/proc/self/fdinfo/{sink._fd}").read_text().splitlines()
                if line.startswith("flags:")
            ),
            8,
        )
        assert flags & os.O_APPEND
        assert flags & os.O_CLOEXEC
        assert flags & os.O_ACCMODE == os.O_WRONLY
    finally:
        sink.close()
    assert (audit_path.stat().st_mode & 0o777) & ~0o640 == 0


def test_hmac_chain(audit_path: Path, tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_bytes(b"k" * 40 + b"\n")
    key_file.chmod(0o600)
    config = AuditConfig(file=str(audit_path), console=False, hmac_key_file=str(key_file))
    log = open_audit_log_from_config(config, instance="test")
    log.emit(record(1))
    log.close()
    records = read_records(audit_path)
    check_chain(records, key=b"k" * 40)
    with pytest.raises(AssertionError):
        check_chain(records)  # a plain digest does not verify it


def test_restart_resumes_the_chain(audit_path: Path) -> None:
    for run in range(3):
        log, _, _ = file_log(audit_path)
        log.emit(record(run))
        log.close()
    records = read_records(audit_path)
    assert [(r["event"], r.get("reason")) for r in records] == [
        ("audit.chain.start", "new"),
        ("dele.marked", None),
        ("audit.chain.start", "restart"),
        ("dele.marked", None),
        ("audit.chain.start", "restart"),
        ("dele.marked", None),
    ]
    check_chain(records)


@pytest.mark.parametrize(
    "content",
    [
        pytest.param('{"event": "session.opened"}\n', id="unchained-records"),
        pytest.param("not json at all\n", id="garbage"),
        pytest.param("TORN", id="torn-last-line"),
    ],
)
def test_a_file_that_cannot_be_resumed_is_moved_aside(audit_path: Path, content: str) -> None:
    audit_path.write_text(content)
    log, _sink, _ = file_log(audit_path)
    log.emit(record(1))
    log.close()
    moved = sorted(audit_path.parent.glob("audit.jsonl.broken-*"))
    assert len(moved) == 1
    assert moved[0].read_text() == content  # untouched
    records = read_records(audit_path)
    assert records[0]["event"] == "audit.chain.start"
    assert records[0]["reason"] == "new"
    assert records[0]["previous_file"] == str(moved[0])
    assert records[1]["event"] == "audit.chain.resume_failed"
    assert records[1]["moved_to"] == str(moved[0])
    assert records[1]["error"]
    assert records[2]["event"] == "dele.marked"
    check_chain(records)


def test_fields_named_like_chain_fields_do_not_break_the_chain(audit_path: Path) -> None:
    log, _, _ = file_log(audit_path)
    log.event("odd", seq=5, hash="x", prev="y")
    log.close()
    records = read_records(audit_path)
    check_chain(records)
    assert records[1]["seq_"] == 5
    assert records[1]["hash_"] == "x"


def test_legacy_json_lines_sink_and_open_audit_log(audit_path: Path, tmp_path: Path) -> None:
    log = AuditLog([JsonLinesSink(str(audit_path))])
    log.event("popguard.started")
    log.close()
    assert [r["event"] for r in read_records(audit_path)][-1] == "popguard.started"

    other = tmp_path / "other.jsonl"
    log = open_audit_log(file=str(other), console=False)
    log.event("popguard.started")
    log.close()
    check_chain(read_records(other))


# --------------------------------------------------------------------------
# Reopen (logrotate)
# --------------------------------------------------------------------------


def test_reopen_after_rename_links_both_files(audit_path: Path) -> None:
    log, _, _ = file_log(audit_path)
    log.emit(record(1))
    log.emit(record(2))
    assert log.flush()
    rotated = audit_path.with_name("audit.jsonl.1")
    audit_path.rename(rotated)  # what logrotate does
    log.emit(record(3))  # still goes to the open (renamed) file
    log.reopen()
    log.emit(record(4))
    log.close()

    old = read_records(rotated)
    new = read_records(audit_path)
    assert [r["event"] for r in old] == [
        "audit.chain.start",
        "dele.marked",
        "dele.marked",
        "dele.marked",
        "audit.chain.rotate",
    ]
    assert old[-1]["next_file"] == str(audit_path)
    assert [r["event"] for r in new] == ["audit.chain.start", "dele.marked"]
    assert new[0]["reason"] == "reopen"
    assert new[0]["previous_file"] == str(audit_path)
    assert new[0]["prev"] == old[-1]["hash"]
    assert [r["msg"] for r in old[1:4]] == [1, 2, 3]
    assert new[1]["msg"] == 4
    check_chain(old + new)


def test_reopen_without_rotation_changes_nothing(audit_path: Path) -> None:
    log, _, _ = file_log(audit_path)
    log.emit(record(1))
    log.reopen()
    log.emit(record(2))
    log.close()
    assert [r["event"] for r in read_records(audit_path)] == [
        "audit.chain.start",
        "dele.marked",
        "dele.marked",
    ]


def test_reopen_when_logrotate_created_the_new_file(audit_path: Path) -> None:
    log, _, _ = file_log(audit_path)
    log.emit(record(1))
    assert log.flush()
    audit_path.rename(audit_path.with_name("audit.jsonl.1"))
    audit_path.touch(mode=0o640)  # logrotate's "create"
    log.reopen()
    log.emit(record(2))
    log.close()
    old = read_records(audit_path.with_name("audit.jsonl.1"))
    new = read_records(audit_path)
    assert new[0]["event"] == "audit.chain.start"
    check_chain(old + new)


# --------------------------------------------------------------------------
# fsync policies
# --------------------------------------------------------------------------


def test_fsync_always_syncs_every_write(audit_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The writer writes a run of queued records with one write; "always"
    # fsyncs after every write, before it takes more work, so no record
    # is ever written and not yet synced while the writer goes on.
    disk = DiskFaults(monkeypatch, audit_path)
    log, sink, _ = file_log(audit_path, fsync="always")
    assert log.flush()
    writes, fsyncs = disk.writes, disk.fsyncs
    for n in range(5):
        written = sink.written
        log.emit(record(n))
        deadline = time.monotonic() + 5
        while sink.written == written and time.monotonic() < deadline:
            time.sleep(0.001)
        assert sink.written == written + 1
        assert disk.writes - writes == n + 1
        assert disk.fsyncs - fsyncs == n + 1  # synced before the writer went idle
    for n in range(20):
        log.emit(record(n))  # queued together: fewer writes, each synced
    assert log.flush()
    assert disk.fsyncs - fsyncs == disk.writes - writes
    log.close()


def test_queued_records_go_out_in_few_writes(
    audit_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One write per batch, not per record: each write is a hand-off of the
    # GIL between the writer thread and the event loop.
    disk = DiskFaults(monkeypatch, audit_path)
    log, _sink, _ = file_log(audit_path, fsync="never")
    assert log.flush()
    writes = disk.writes
    disk.block.clear()  # the writer stalls in its next write ...
    log.emit(record(0))
    for n in range(1, 100):
        log.emit(record(n))  # ... while these queue up behind it
    disk.block.set()
    assert log.flush()
    assert disk.writes - writes <= 3
    log.close()
    check_chain(read_records(audit_path))


def test_fsync_interval_batches(audit_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    disk = DiskFaults(monkeypatch, audit_path)
    log, sink, _ = file_log(audit_path, fsync="interval", fsync_interval_ms=100)
    wait_until(lambda: sink.written == 0 and sink._dirty_since is None)
    before = disk.fsyncs
    for n in range(200):
        log.emit(record(n))
    wait_until(lambda: sink.written == 200)
    # Within the interval: at most a couple of fsyncs for 200 records ...
    assert disk.fsyncs - before <= 3
    # ... and the writer wakes up by itself to sync the rest.
    wait_until(lambda: sink._dirty_since is None, limit=2.0)
    assert disk.fsyncs - before >= 1
    log.close()


def test_fsync_never(audit_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    disk = DiskFaults(monkeypatch, audit_path)
    log, _, _ = file_log(audit_path, fsync="never")
    for n in range(50):
        log.emit(record(n))
    log.close()
    assert disk.fsyncs == 0
    assert len(read_records(audit_path)) == 51


async def test_emit_durable_fsyncs_even_with_never(
    audit_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = DiskFaults(monkeypatch, audit_path)
    log, _, _ = file_log(audit_path, fsync="never")
    log.emit(record(1))
    assert await log.emit_durable(record(2))
    assert disk.fsyncs == 1
    # Both records are on disk: the fsync covers what was written before.
    assert [r.get("msg") for r in read_records(audit_path)] == [None, 1, 2]
    log.close()


# --------------------------------------------------------------------------
# Disk failures
# --------------------------------------------------------------------------


def test_enospc_is_retried_and_nothing_is_lost(
    audit_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = DiskFaults(monkeypatch, audit_path)
    log, sink, other = file_log(audit_path)
    assert log.flush()
    disk.fail_all.set()
    for n in range(1, 11):
        log.emit(record(n))
    wait_until(lambda: bool(other.named("audit.sink.failed")))
    assert not log.healthy
    assert not sink.healthy
    assert sink.last_error is not None
    assert sink.last_error.startswith("ENOSPC")
    failed = other.named("audit.sink.failed")[0]
    assert failed["sink"] == sink.name
    assert failed["error"].startswith("ENOSPC")
    assert failed["level"] == "error"
    time.sleep(0.1)  # a few retries
    for n in range(11, 21):
        log.emit(record(n))  # the backlog grows while the disk is full
    disk.fail_all.clear()  # space again
    wait_until(lambda: bool(other.named("audit.sink.recovered")))
    recovered = other.named("audit.sink.recovered")[0]
    assert recovered["lost"] == 0
    assert recovered["down_ms"] >= 100
    log.close()
    records = read_records(audit_path)
    assert [r["msg"] for r in records[1:]] == list(range(1, 21))
    check_chain(records)
    assert log.lost == 0
    assert log.healthy


def test_a_torn_write_is_cut_off_before_the_retry(
    audit_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = DiskFaults(monkeypatch, audit_path)
    log, _, other = file_log(audit_path)
    assert log.flush()
    disk.partial_next = True  # half a line gets out, then ENOSPC
    log.emit(record(1, user="a" * 500))
    log.emit(record(2))
    wait_until(lambda: bool(other.named("audit.sink.recovered")))
    log.close()
    records = read_records(audit_path)  # every line parses
    assert [r["msg"] for r in records[1:]] == [1, 2]
    check_chain(records)


def test_fsync_error_is_reported_and_retried(
    audit_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = DiskFaults(monkeypatch, audit_path)
    log, _, other = file_log(audit_path, fsync="always")
    assert log.flush()
    disk.fsync_errors = 2
    log.emit(record(1))
    wait_until(lambda: bool(other.named("audit.sink.recovered")))
    assert other.named("audit.sink.failed")[0]["error"].startswith("EIO")
    log.close()
    records = read_records(audit_path)
    assert [r.get("msg") for r in records] == [None, 1]  # written once, not twice


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs, or a skip where mounting is not allowed."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k,mode=0755", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_really_full_disk(tiny_tmpfs: Path) -> None:
    """ENOSPC from a real (tiny) file system, then space is freed."""
    path = tiny_tmpfs / "audit.jsonl"
    log, _sink, other = file_log(path, fsync="always")
    assert log.flush()
    filler = tiny_tmpfs / "filler"
    with open(filler, "wb", buffering=0) as f:
        written = 1
        while written:
            try:
                written = f.write(b"\0" * 4096)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                written = 0
    n = 0
    while not other.named("audit.sink.failed"):
        n += 1
        log.emit(record(n, user="u" * 200))
        if n % 10 == 0:
            time.sleep(0.01)
        assert n < 2000, "the disk never filled up"
    for _ in range(5):
        n += 1
        log.emit(record(n, user="u" * 200))
    assert not log.healthy
    filler.unlink()
    wait_until(lambda: bool(other.named("audit.sink.recovered")))
    log.close()
    records = read_records(path)
    assert [r["msg"] for r in records[1:]] == list(range(1, n + 1))
    check_chain(records)
    assert log.lost == 0


def test_overflow_is_counted_and_the_gap_sealed_into_the_chain(
    audit_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = DiskFaults(monkeypatch, audit_path)
    log, _, other = file_log(audit_path, queue_size=3)
    assert log.flush()
    disk.block.clear()  # the disk hangs
    for n in range(1, 11):
        log.emit(record(n))
    assert log.lost == 7
    assert not log.healthy
    assert log.accepting_sessions  # fail-open
    assert "queue full" in other.named("audit.sink.failed")[0]["error"]
    disk.block.set()
    wait_until(lambda: bool(other.named("audit.sink.recovered")))
    assert other.named("audit.sink.recovered")[0]["lost"] == 7
    log.emit(record(11))
    log.close()
    records = read_records(audit_path)
    assert [(r["event"], r.get("msg"), r.get("count")) for r in records[1:]] == [
        ("dele.marked", 1, None),
        ("dele.marked", 2, None),
        ("dele.marked", 3, None),
        ("audit.records.lost", None, 7),
        ("dele.marked", 11, None),
    ]
    check_chain(records)


async def test_fail_closed_on_a_full_disk(
    audit_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = DiskFaults(monkeypatch, audit_path)
    log, _, _ = file_log(audit_path, on_failure="fail-closed", fsync="never")
    assert await log.emit_durable(record(1))
    disk.fail_all.set()
    log.emit(record(2))
    while log.healthy:
        await trio.sleep(0.005)
    assert not log.accepting_sessions
    assert not await log.emit_durable(record(3))
    disk.fail_all.clear()
    while not log.accepting_sessions:
        await trio.sleep(0.005)
    assert await log.emit_durable(record(4))
    log.close()
    assert [r.get("msg") for r in read_records(audit_path)] == [None, 1, 2, 3, 4]


@pytest.mark.parametrize(
    ("policy", "delay"),
    [("always", BATCH_DELAY_ALWAYS), ("interval", BATCH_DELAY), ("never", BATCH_DELAY)],
)
def test_the_writer_gathers_records_longer_unless_every_record_is_synced(
    audit_path: Path, policy: Any, delay: float
) -> None:
    # Each wake-up of the writer trades the GIL with the event loop: with
    # fsync interval or never it gathers 20 ms of records, with always 5 ms.
    sink = FileSink(audit_path, fsync=policy)
    try:
        assert sink.batch_delay == delay
        assert BATCH_DELAY_ALWAYS < BATCH_DELAY
    finally:
        sink.close()
