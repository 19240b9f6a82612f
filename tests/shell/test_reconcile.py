"""Reconciling a dead worker's trail (popguard.trail.reconcile, and the
supervisor that writes the result).

The reading side is tested over hand-built, sealed trails
(tests/trail/trail_helpers.py): which process's records count, what is
open, what a mark's fate is, rotation, torn lines, the supervisor's own
trail.  The supervisor side runs a real :class:`Supervisor` in this trio loop
with a small fake worker (FAKE_WORKER) that writes its trail through
popguard's own audit file sink, then is SIGKILLed or stops cleanly.
"""

from __future__ import annotations

import contextlib
import datetime
import gzip
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from popguard.audit import open_audit_log_from_config
from popguard.config import AuditConfig
from popguard.shell.workers import Supervisor, bind_reuseport
from popguard.trail.chain import Chain
from popguard.trail.reconcile import (
    last_process_tail,
    open_sessions,
    orphan_records,
    read_parent_trail,
    rotated_files,
    worker_files,
)
from tests.trail.trail_helpers import T0, seal_lines, stamp, write_lines

LIMIT = 20.0


def rec(event: str, session: str | None = None, **fields: Any) -> dict[str, Any]:
    record: dict[str, Any] = {"event": event, "timestamp": stamp(T0), "level": "info"}
    if session is not None:
        record["session"] = session
    record.update(fields)
    return record


def opened(session: str, client: str = "127.0.0.1:40000") -> dict[str, Any]:
    return rec("session.opened", session, client=client, listener="pop3")


def login(session: str, user: str) -> dict[str, Any]:
    return rec("auth.succeeded", session, user=user, mechanism="USER")


def marked(session: str, msg: int, user: str = "alice") -> dict[str, Any]:
    return rec("dele.marked", session, user=user, msg=msg, uidl=f"u{msg}", size=100 + msg)


def closed(session: str) -> dict[str, Any]:
    return rec("session.closed", session, reason="quit")


def identity(msg: int) -> dict[str, Any]:
    return {"msg": msg, "uidl": f"u{msg}", "size": 100 + msg}


# -- what is open -----------------------------------------------------------


def test_only_sessions_never_closed_are_open() -> None:
    records = [
        opened("a"),
        login("a", "alice"),
        opened("b"),
        closed("a"),
        opened("c"),
        login("c", "carol"),
    ]
    found = open_sessions(records)
    assert [s.session for s in found] == ["b", "c"]
    assert [s.user for s in found] == [None, "carol"]
    assert found[0].client == "127.0.0.1:40000"
    assert found[0].listener == "pop3"


def test_a_marks_fate_settles_it_and_only_the_messages_it_names() -> None:
    records = [
        opened("s"),
        login("s", "alice"),
        marked("s", 1),
        marked("s", 2),
        rec("dele.unmarked", "s", messages=[identity(1), identity(2)]),
        marked("s", 3),
        marked("s", 4),
        # A fate that names 3 only leaves 4 without one.
        rec("deletions.discarded", "s", messages=[identity(3)], reason="client_closed"),
        marked("s", 5),
    ]
    [session] = open_sessions(records)
    assert session.messages == [identity(4), identity(5)]
    assert session.unanswered == []


@pytest.mark.parametrize(
    "fate", ["deletions.committed", "deletions.failed", "deletions.discarded", "deletions.unknown"]
)
def test_every_deletions_record_is_a_fate(fate: str) -> None:
    records = [opened("s"), marked("s", 1), rec(fate, "s", messages=[identity(1)])]
    [session] = open_sessions(records)
    assert session.messages == []


def test_a_requested_dele_without_its_reply_is_listed_as_unanswered() -> None:
    """Fail-closed: dele.requested is on disk before the DELE goes upstream."""
    records = [
        opened("s"),
        rec("dele.requested", "s", msg=1, uidl="u1", size=101),
        marked("s", 1),  # answered: a mark
        rec("dele.requested", "s", msg=2, uidl="u2", size=102),
        rec("dele.refused", "s", msg=2, reply="no such message"),  # answered: nothing
        rec("dele.requested", "s", msg=3, uidl="u3", size=103),  # never answered
    ]
    [session] = open_sessions(records)
    assert session.messages == [identity(1), identity(3)]
    assert session.unanswered == [3]


def test_a_new_process_start_forgets_what_the_previous_process_left() -> None:
    records = [
        rec("audit.chain.start", reason="new"),
        opened("old"),
        marked("old", 1),
        rec("audit.chain.start", reason="reopen"),  # same process, new file
        opened("kept"),
        rec("audit.chain.start", reason="restart"),  # a new process
        opened("new"),
    ]
    assert [s.session for s in open_sessions(records)] == ["new"]
    assert [s.session for s in open_sessions(records[:5])] == ["old", "kept"]


# -- the records the supervisor writes ---------------------------------------


def test_orphan_records_name_the_session_and_its_marks() -> None:
    [session] = open_sessions(
        [
            opened("s", client="[::1]:5000"),
            login("s", "alice"),
            marked("s", 2),
            rec("dele.requested", "s", msg=7, uidl="u7", size=107),
        ]
    )
    made = orphan_records(session, slot=2, pid=4242, ended={"signal": "SIGKILL"})
    assert made == [
        (
            "session.orphaned",
            {
                "session": "s",
                "client": "[::1]:5000",
                "listener": "pop3",
                "user": "alice",
                "slot": 2,
                "pid": 4242,
                "reason": "worker_died",
                "signal": "SIGKILL",
            },
        ),
        (
            "deletions.unknown",
            {
                "session": "s",
                "client": "[::1]:5000",
                "listener": "pop3",
                "user": "alice",
                "messages": [identity(2), identity(7)],
                "reason": "worker_died",
                "unanswered": [7],
            },
        ),
    ]


def test_a_session_without_marks_gets_no_deletions_record() -> None:
    [session] = open_sessions([opened("s"), login("s", "bob")])
    made = orphan_records(session, slot=1, pid=None, ended={"exit_status": 1})
    assert [event for event, _ in made] == ["session.orphaned"]
    assert made[0][1]["exit_status"] == 1


# -- reading files ------------------------------------------------------------


def write_trail(path: Path, processes: list[list[dict[str, Any]]], chain: Chain) -> Path:
    """One file: each process begins with its start record (new, then restart)."""
    lines: list[str] = []
    for number, records in enumerate(processes):
        lines += seal_lines(chain, records, start="new" if number == 0 else "restart")
    return write_lines(path, lines)


def test_the_tail_is_the_last_process_in_the_file(tmp_path: Path) -> None:
    path = write_trail(
        tmp_path / "audit.w1.jsonl",
        [[opened("first"), marked("first", 1)], [opened("second"), opened("done"), closed("done")]],
        Chain(chain_id="w1"),
    )
    tail = last_process_tail(str(path))
    assert [s.session for s in tail.sessions] == ["second"]
    assert tail.files == [str(path)]
    assert tail.started is not None
    assert tail.skipped == 0


def test_a_torn_last_line_is_skipped_and_counted(tmp_path: Path) -> None:
    path = write_trail(
        tmp_path / "audit.w1.jsonl", [[opened("s"), marked("s", 1)]], Chain(chain_id="w")
    )
    with path.open("ab") as f:
        f.write(b'{"event":"session.closed","session":"s","reas')  # the crash cut it here
    tail = last_process_tail(str(path))
    assert [s.session for s in tail.sessions] == ["s"]
    assert tail.sessions[0].messages == [identity(1)]
    assert tail.skipped == 1


def test_a_process_that_began_before_a_rotation_is_read_from_the_rotated_file(
    tmp_path: Path,
) -> None:
    chain = Chain(chain_id="w2")
    base = tmp_path / "audit.w2.jsonl"
    # Oldest: an earlier process, whose leftovers must not count.
    old = seal_lines(chain, [opened("gone")], start="new", rotate_to=str(base))
    with gzip.open(tmp_path / "audit.w2.jsonl.2.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(old) + "\n")
    # The last process starts in .1 and goes on (reopen) in the live file.
    middle = seal_lines(
        chain, [opened("a"), marked("a", 1), opened("b")], start="restart", rotate_to=str(base)
    )
    write_lines(tmp_path / "audit.w2.jsonl.1", middle)
    live = seal_lines(chain, [closed("b"), marked("a", 2), opened("c")], start="reopen")
    write_lines(base, live)
    (tmp_path / "audit.w2.jsonl.broken-20261126T080000Z").write_text("not a rotation\n")

    assert [Path(p).name for p in rotated_files(str(base))] == [
        "audit.w2.jsonl.2.gz",
        "audit.w2.jsonl.1",
        "audit.w2.jsonl",
    ]
    tail = last_process_tail(str(base))
    assert [Path(p).name for p in tail.files] == ["audit.w2.jsonl.1", "audit.w2.jsonl"]
    assert [s.session for s in tail.sessions] == ["a", "c"]
    assert tail.sessions[0].messages == [identity(1), identity(2)]


def test_no_file_no_tail(tmp_path: Path) -> None:
    tail = last_process_tail(str(tmp_path / "audit.w1.jsonl"))
    assert (tail.sessions, tail.files, tail.started) == ([], [], None)


def test_worker_files_are_found_by_the_parents_name(tmp_path: Path) -> None:
    for name in [
        "audit.jsonl",
        "audit.w1.jsonl",
        "audit.w12.jsonl",
        "audit.w2.jsonl.1",  # rotated: read through its live file
        "audit.wx.jsonl",
        "audit.w0.jsonl",
        "other.w1.jsonl",
        "audit.w3.log",
    ]:
        (tmp_path / name).write_text("")
    found = worker_files(str(tmp_path / "audit.jsonl"))
    assert found == {1: str(tmp_path / "audit.w1.jsonl"), 12: str(tmp_path / "audit.w12.jsonl")}
    (tmp_path / "trail.w4").write_text("")
    assert worker_files(str(tmp_path / "trail")) == {4: str(tmp_path / "trail.w4")}


def test_the_parents_trail_tells_what_was_reported_and_which_pids_ran(tmp_path: Path) -> None:
    chain = Chain(chain_id="parent")
    base = tmp_path / "audit.jsonl"
    older = seal_lines(
        chain,
        [
            rec("popguard.worker.started", slot=1, pid=100),
            rec("session.orphaned", "s-old", slot=1, pid=100, reason="worker_died"),
        ],
        rotate_to=str(base),
    )
    write_lines(tmp_path / "audit.jsonl.1", older)
    newer = seal_lines(
        chain,
        [
            rec("popguard.worker.started", slot=1, pid=101),
            rec("popguard.worker.started", slot=2, pid=200),
            rec("session.orphaned", "s-new", slot=1, pid=101, reason="worker_died"),
        ],
        start="reopen",
    )
    write_lines(base, newer)

    every = read_parent_trail(str(base), since=None)
    assert every.reconciled == {"s-old", "s-new"}
    assert every.pids == {1: 101, 2: 200}

    # A rotated file last written long before the process started is not read.
    long_ago = (T0 - datetime.timedelta(days=2)).timestamp()
    os.utime(tmp_path / "audit.jsonl.1", (long_ago, long_ago))
    recent = read_parent_trail(str(base), since=T0)
    assert recent.reconciled == {"s-new"}


# -- the supervisor ---------------------------------------------------------------

FAKE_WORKER = """
import json, os, selectors, signal, sys

from popguard.audit import open_audit_log_from_config
from popguard.config import AuditConfig
from popguard.shell.workers import parse_worker_arg, worker_audit_file

control, parent_file = sys.argv[1], sys.argv[2]
rest = sys.argv[3:]
role = None
while rest:
    option, value, rest = rest[0], rest[1], rest[2:]
    if option == "--worker":
        role = parse_worker_arg(value)
plan = os.path.join(control, f"plan-{role.index}.json")
steps = {"records": [], "die": False}
if os.path.exists(plan):  # one process plays a plan; its replacement does not
    with open(plan) as f:
        steps = json.load(f)
    os.unlink(plan)
if steps["die"]:  # before it opens its audit file
    os.kill(os.getpid(), signal.SIGKILL)
audit = open_audit_log_from_config(
    AuditConfig(file=worker_audit_file(parent_file, role.index), console=False, fsync="never"),
    worker=role.index,
)
for event, fields in steps["records"]:
    audit.event(event, **fields)
audit.flush()
os.write(role.ready_fd, b"R")
os.close(role.ready_fd)
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
selector = selectors.DefaultSelector()
selector.register(role.lifeline_fd, selectors.EVENT_READ)
while not stop and not selector.select(0.05):
    pass
audit.close()
"""


def plan(control: Path, slot: int, records: list[dict[str, Any]], *, die: bool) -> None:
    steps = [
        [r["event"], {k: v for k, v in r.items() if k not in ("event", "timestamp", "level")}]
        for r in records
    ]
    (control / f"plan-{slot}.json").write_text(json.dumps({"records": steps, "die": die}))


def records_of(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.endswith("}")]


class Setup:
    def __init__(self, tmp_path: Path) -> None:
        self.control = tmp_path / "control"
        self.control.mkdir()
        self.script = tmp_path / "fake_worker.py"
        self.script.write_text(FAKE_WORKER, encoding="utf-8")
        self.audit_file = tmp_path / "logs" / "audit.jsonl"
        self.audit_file.parent.mkdir()

    def command(self) -> list[str]:
        return [sys.executable, str(self.script), str(self.control), str(self.audit_file)]

    def worker_file(self, slot: int) -> Path:
        return self.audit_file.with_name(f"audit.w{slot}.jsonl")

    def parent(self) -> list[dict[str, Any]]:
        return records_of(self.audit_file)

    def named(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.parent() if r["event"] == name]

    def verify(self) -> subprocess.CompletedProcess[str]:
        files = [str(self.audit_file), *map(str, sorted(self.audit_file.parent.glob("audit.w*")))]
        return subprocess.run(
            [sys.executable, "-m", "popguard", "audit", "verify", *files],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


@contextlib.asynccontextmanager
async def supervising(setup: Setup, workers: int = 2) -> AsyncIterator[Supervisor]:
    """A Supervisor running in this trio loop until the block ends (then stopped)."""
    listeners = [bind_reuseport("pop3", "127.0.0.1", 0, workers)]
    audit = open_audit_log_from_config(
        AuditConfig(file=str(setup.audit_file), console=False, fsync="never"), worker=0
    )
    try:
        supervisor = Supervisor(setup.command(), listeners, audit, workers=workers)
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.run)
            yield supervisor
            supervisor.stop()  # run() returns once every worker has exited
    finally:
        audit.close()
        for sockets in listeners:
            sockets.close()


async def wait_for(setup: Setup, name: str, count: int = 1) -> list[dict[str, Any]]:
    with trio.fail_after(LIMIT):
        while len(found := setup.named(name)) < count:
            await trio.sleep(0.02)
    return found


async def test_a_killed_workers_open_sessions_are_reported_once(
    setup: Setup,
) -> None:
    plan(
        setup.control,
        1,
        [
            opened("01aa"),
            login("01aa", "alice"),
            marked("01aa", 1),
            marked("01aa", 2),
            opened("01bb"),  # logged in, no marks
            login("01bb", "bob"),
            opened("01cc"),  # closed properly: not an orphan
            marked("01cc", 1),
            rec("deletions.committed", "01cc", messages=[identity(1)]),
            closed("01cc"),
        ],
        die=False,
    )
    async with supervising(setup) as supervisor:
        slot1 = supervisor.pids[0]
        # The first worker played its plan and is ready.  Its replacement
        # dies before it opens its audit file: the file's last process is
        # still the first one, read again, and not reported twice.
        plan(setup.control, 1, [], die=True)
        assert slot1 is not None
        os.kill(slot1, 9)
        reconciled = await wait_for(setup, "popguard.worker.reconciled")
        assert reconciled[0]["slot"] == 1
        assert reconciled[0]["pid"] == slot1
        await wait_for(setup, "popguard.worker.reconciled", count=2)
        await wait_for(setup, "popguard.worker.ready", count=3)

    orphaned = setup.named("session.orphaned")
    assert [(o["session"], o["user"], o["slot"], o["pid"]) for o in orphaned] == [
        ("01aa", "alice", 1, slot1),
        ("01bb", "bob", 1, slot1),
    ]
    assert all(o["signal"] == "SIGKILL" and o["reason"] == "worker_died" for o in orphaned)
    [unknown] = setup.named("deletions.unknown")
    assert unknown["session"] == "01aa"
    assert unknown["messages"] == [identity(1), identity(2)]
    assert unknown["reason"] == "worker_died"
    assert all(r["worker"] == 0 for r in setup.parent())  # written by the parent
    # Every clean exit at the stop is reconciled too, and finds nothing.
    assert [r["orphaned"] for r in setup.named("popguard.worker.reconciled")] == [2, 0, 0, 0]
    result = setup.verify()
    assert result.returncode == 0, result.stdout + result.stderr


async def test_start_up_reconciles_what_a_previous_run_left_once(
    setup: Setup,
) -> None:
    """Slot 3's file is from a run with three workers; this run has two, so
    nothing ever writes slot 3's file again: only the parent's own trail keeps
    a second start-up from reporting its sessions again."""
    chain = Chain(chain_id="w3")
    write_trail(
        setup.worker_file(3),
        [[opened("02aa"), login("02aa", "carol"), marked("02aa", 4)], [opened("02bb")]],
        chain,
    )
    parent_chain = Chain(chain_id="parent")
    write_lines(
        setup.audit_file,
        seal_lines(parent_chain, [rec("popguard.worker.started", slot=3, pid=777)]),
    )
    async with supervising(setup):
        pass
    async with supervising(setup):
        pass
    orphaned = setup.named("session.orphaned")
    assert [(o["session"], o["slot"], o["pid"], o["previous_run"]) for o in orphaned] == [
        ("02bb", 3, 777, True)
    ]
    assert setup.named("deletions.unknown") == []  # 02aa was the earlier process's
    result = setup.verify()
    assert result.returncode == 0, result.stdout + result.stderr


async def test_start_up_reports_marks_of_a_crashed_run(setup: Setup) -> None:
    write_trail(
        setup.worker_file(1),
        [[opened("03aa"), login("03aa", "dave"), marked("03aa", 9, user="dave")]],
        Chain(chain_id="w1"),
    )
    async with supervising(setup):
        pass
    [unknown] = setup.named("deletions.unknown")
    assert (unknown["session"], unknown["user"], unknown["messages"]) == (
        "03aa",
        "dave",
        [identity(9)],
    )
    # The new worker 1 continued the chain of the file it read.
    assert records_of(setup.worker_file(1))[-1]["worker"] == 1
    result = setup.verify()
    assert result.returncode == 0, result.stdout + result.stderr
