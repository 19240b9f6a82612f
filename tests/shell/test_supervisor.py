"""Supervisor: start, restart and stop workers, with a fake worker instead of popguard.

The fake worker (FAKE_WORKER, written to tmp_path) takes the options the
supervisor adds (``--worker I/N:READY_FD:LIFELINE_FD`` and
``--inherit-listener NAME=FD[,FD]``), reports ready, and answers each
connection with ``worker I pid P listener NAME``.  It notes what happens to
it (started, ready, signals, orphaned, exit) in ``control/wI.log``; files in
``control/`` tell it to fail before ready or to take its time.

Tests that signal the supervisor run it in a child process (SUPERVISE,
auditing to a JSON-lines file); the others run it in the test's trio loop
with an in-memory audit sink.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from popguard.audit import AuditLog
from popguard.shell.workers import FIRST_BACKOFF, ListenerSockets, Supervisor, bind_reuseport
from tests.listsink import ListSink

LIMIT = 15.0  # seconds any one wait may take

FAKE_WORKER = '''
import os, selectors, signal, socket, sys, time

from popguard.shell.workers import parse_worker_arg

control = sys.argv[1]
role, listeners, rest = None, {}, sys.argv[2:]
while rest:
    option, value, rest = rest[0], rest[1], rest[2:]
    if option == "--worker":
        role = parse_worker_arg(value)
    elif option == "--inherit-listener":
        name, _, fds = value.partition("=")
        listeners[name] = [int(fd) for fd in fds.split(",")]
    else:
        sys.exit(f"fake worker: unexpected {option}")
assert role is not None, sys.argv
pid = os.getpid()


def note(what):
    with open(os.path.join(control, f"w{role.index}.log"), "a") as f:
        f.write(f"{pid} {what}\\n")


def setting(name):
    try:
        with open(os.path.join(control, name)) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None


signals = []


def catch(signum):
    signal.signal(signum, lambda signum, frame: signals.append(signal.Signals(signum).name))


# "late-hup": like popguard, no SIGHUP handler before ready (SIGHUP kills).
late_hup = setting("late-hup") is not None
for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    if not (late_hup and signum == signal.SIGHUP):
        catch(signum)
note(f"started {role.index}/{role.count} " + " ".join(f"{n}={fds}" for n, fds in listeners.items()))

selector = selectors.DefaultSelector()
if role.lifeline_fd >= 0:
    selector.register(role.lifeline_fd, selectors.EVENT_READ, None)
sockets = []
for name, fds in listeners.items():
    for fd in fds:
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        sockets.append((name, sock))
stop_at = None


def handle_signals():
    global stop_at
    while signals:
        what = signals.pop(0)
        if what == "SIGTERM" and stop_at is None:
            for _, sock in sockets:  # like popguard: refuse new connections at once
                try:
                    selector.unregister(sock)
                except KeyError:  # not ready yet: not registered
                    pass
                sock.close()
            sockets.clear()
            stop_at = time.monotonic() + float(setting("term-delay") or 0)
        elif what == "SIGINT":
            stop_at = time.monotonic()
        note(what)
    if stop_at is not None and time.monotonic() >= stop_at:
        note("exit")
        sys.exit(0)


def wait(timeout):
    """Handle signals, leave if the parent is gone; the listeners ready to accept."""
    handle_signals()
    ready = []
    for key, _ in selector.select(timeout):
        if key.data is None:
            note("orphaned")
            sys.exit(0)
        ready.append(key)
    return ready


if setting(f"fail-{role.index}") is not None:
    note("failing")
    sys.exit(3)
delay_until = time.monotonic() + float(setting("ready-delay") or 0)
while time.monotonic() < delay_until:
    wait(0.02)
if late_hup:
    catch(signal.SIGHUP)
note("ready")
os.write(role.ready_fd, b"R")
os.close(role.ready_fd)
for name, sock in sockets:
    selector.register(sock, selectors.EVENT_READ, name)
while True:
    for key in wait(0.02):
        try:
            conn, _ = key.fileobj.accept()
        except OSError:
            continue
        with conn:
            conn.setblocking(True)
            conn.sendall(f"worker {role.index} pid {pid} listener {key.data}\\r\\n".encode())
'''

SUPERVISE = """
import os, sys

import trio

from popguard.audit import open_audit_log_from_config
from popguard.config import AuditConfig
from popguard.shell.workers import Supervisor, bind_reuseport

workers, audit_file, port_file, startup_timeout = sys.argv[1:5]
command = sys.argv[5:]
workers = int(workers)
listeners = [bind_reuseport("pop3", "127.0.0.1", 0, workers)]
audit = open_audit_log_from_config(
    AuditConfig(file=audit_file, console=False, fsync="never"), worker=0
)
supervisor = Supervisor(
    command, listeners, audit, workers=workers, startup_timeout=float(startup_timeout)
)
with open(port_file + ".tmp", "w") as f:
    f.write(str(listeners[0].addresses[0][1]))
os.rename(port_file + ".tmp", port_file)
try:
    status = trio.run(supervisor.run)
finally:
    for sockets in listeners:
        sockets.close()
    audit.close()
sys.exit(status)
"""


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


@dataclass
class Control:
    """The fake worker's switches and notes."""

    directory: Path
    script: Path

    def command(self) -> list[str]:
        return [sys.executable, str(self.script), str(self.directory)]

    def set(self, name: str, value: str = "") -> None:
        (self.directory / name).write_text(value, encoding="utf-8")

    def notes(self, index: int) -> list[tuple[int, str]]:
        """(pid, what) noted by worker ``index``'s processes, in order."""
        try:
            text = (self.directory / f"w{index}.log").read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        notes = []
        for line in text.splitlines():
            pid, _, what = line.partition(" ")
            notes.append((int(pid), what))
        return notes

    def noted(self, index: int, what: str, pid: int | None = None) -> bool:
        return any(
            w.split(" ")[0] == what and (pid is None or p == pid) for p, w in self.notes(index)
        )

    def pids(self) -> set[int]:
        found = set()
        for log in self.directory.glob("w*.log"):
            for line in log.read_text(encoding="utf-8").splitlines():
                found.add(int(line.split(" ")[0]))
        return found

    def kill_leftovers(self) -> None:
        """SIGKILL fake workers still running (only ours: their argv names the script)."""
        for pid in self.pids():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if str(self.script).encode() in cmdline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def control(tmp_path: Path) -> Iterator[Control]:
    directory = tmp_path / "control"
    directory.mkdir()
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER, encoding="utf-8")
    made = Control(directory, script)
    yield made
    made.kill_leftovers()


@pytest.fixture
def listeners() -> Iterator[list[ListenerSockets]]:
    made: list[ListenerSockets] = []
    yield made
    for sockets in made:
        sockets.close()


async def wait_until(
    condition: Callable[[], object], what: str, limit: float = LIMIT, step: float = 0.02
) -> None:
    with trio.move_on_after(limit):
        while not condition():
            await trio.sleep(step)
        return
    raise AssertionError(f"timed out after {limit} s waiting for {what}")


def wait_until_sync(
    condition: Callable[[], object], what: str, limit: float = LIMIT, step: float = 0.02
) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit} s waiting for {what}")
        time.sleep(step)


async def ask(port: int, host: str = "127.0.0.1") -> str:
    """Connect and read the fake worker's one-line answer."""
    with trio.fail_after(LIMIT):
        stream = await trio.open_tcp_stream(host, port)
        async with stream:
            data = b""
            while not data.endswith(b"\r\n"):
                chunk = await stream.receive_some(100)
                if not chunk:
                    break
                data += chunk
    return data.decode()


def answer(pid: int, index: int, listener: str = "pop3") -> str:
    return f"worker {index} pid {pid} listener {listener}\r\n"


@dataclass
class Running:
    """A Supervisor running in the test's trio loop."""

    supervisor: Supervisor
    sink: ListSink
    port: int
    done: trio.Event = field(default_factory=trio.Event)
    status: int | None = None

    async def finish(self) -> int:
        with trio.fail_after(LIMIT):
            await self.done.wait()
        assert self.status is not None
        return self.status

    def pid_of(self, index: int) -> int:
        pid = self.supervisor.pids[index - 1]
        assert pid is not None, f"worker {index} is not running"
        return pid


@pytest.fixture
async def supervise(
    control: Control, listeners: list[ListenerSockets]
) -> AsyncIterator[Callable[..., Any]]:
    """Start a Supervisor here; stop it (and wait for it) at the end of the test."""
    running: list[Running] = []
    async with trio.open_nursery() as nursery:

        async def start(
            workers: int = 2,
            *,
            names: tuple[str, ...] = ("pop3",),
            wait_ready: bool = True,
            startup_timeout: float = LIMIT,
        ) -> Running:
            for name in names:
                listeners.append(bind_reuseport(name, "127.0.0.1", 0, workers))
            sink = ListSink()
            audit = AuditLog([sink], worker=0)
            supervisor = Supervisor(
                control.command(),
                listeners,
                audit,
                workers=workers,
                startup_timeout=startup_timeout,
            )
            run = Running(supervisor, sink, listeners[0].addresses[0][1])
            running.append(run)

            async def main(task_status: trio.TaskStatus[None]) -> None:
                try:
                    run.status = await supervisor.run(task_status=task_status)
                finally:
                    run.done.set()

            if wait_ready:
                with trio.fail_after(LIMIT + 5):
                    await nursery.start(main)
            else:
                nursery.start_soon(main, trio.TASK_STATUS_IGNORED)
            return run

        try:
            yield start
        finally:
            for run in running:
                if not run.done.is_set():
                    run.supervisor.stop(signal.SIGINT)
            # Wait for run() to return; give up a second after its last
            # worker is gone (a test that failed may have left it stuck).
            with trio.move_on_after(LIMIT):
                for run in running:
                    idle_since = None
                    while not run.done.is_set():
                        if any(run.supervisor.pids):
                            idle_since = None
                        elif idle_since is None:
                            idle_since = trio.current_time()
                        elif trio.current_time() - idle_since > 1:
                            break
                        await trio.sleep(0.02)
            if not all(run.done.is_set() for run in running):
                control.kill_leftovers()
                nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------
# In this process: start, answer, restart, start failures
# --------------------------------------------------------------------------


async def test_workers_start_become_ready_and_answer(
    supervise: Callable[..., Any], control: Control
) -> None:
    run = await supervise(2, names=("pop3", "pop3s"))
    sink = run.sink
    assert run.supervisor.stopping is False
    started = sink.named("popguard.workers.started")
    assert len(started) == 1
    assert started[0]["workers"] == 2
    assert started[0]["worker"] == 0
    ports = {ls.name: ls.addresses[0][1] for ls in run.supervisor.listeners}
    assert started[0]["listeners"] == {name: [f"127.0.0.1:{p}"] for name, p in ports.items()}

    pids = {e["slot"]: e["pid"] for e in sink.named("popguard.worker.started")}
    assert set(pids) == {1, 2}
    assert pids[1] != pids[2]
    assert run.supervisor.pids == [pids[1], pids[2]]
    assert sorted(e["slot"] for e in sink.named("popguard.worker.ready")) == [1, 2]
    (ready,) = sink.named("popguard.workers.ready")
    assert ready["workers"] == 2
    names = sink.names()
    assert names.index("popguard.workers.ready") > max(
        i for i, name in enumerate(names) if name == "popguard.worker.ready"
    )
    for index in (1, 2):
        pid = pids[index]
        assert control.noted(index, "ready", pid)
        assert os.getsid(pid) == pid, "a worker runs in a session of its own"
        (started_note,) = [w for p, w in control.notes(index) if w.startswith("started")]
        assert started_note.startswith(f"started {index}/2 pop3=[")
        assert "pop3s=[" in started_note

    # Connections are spread over the workers (SO_REUSEPORT hashes the
    # 4-tuple): keep connecting until both answered, on both listeners.
    for name, port in ports.items():
        seen: set[str] = set()
        with trio.fail_after(LIMIT):
            while len(seen) < 2:
                seen.add(await ask(port))
        assert seen == {answer(pids[1], 1, name), answer(pids[2], 2, name)}

    run.supervisor.stop()
    assert await run.finish() == 0
    exited = sink.named("popguard.worker.exited")
    assert sorted((e["slot"], e["pid"], e["exit_code"]) for e in exited) == [
        (1, pids[1], 0),
        (2, pids[2], 0),
    ]
    assert sink.named("popguard.worker.died") == []
    assert sink.names()[-1] == "popguard.stopped"
    assert run.supervisor.pids == [None, None]
    # Every record names its writer, the parent (worker 0); the worker a
    # record is about is its slot.
    assert {e["worker"] for e in sink.events} == {0}
    for index in (1, 2):
        assert control.noted(index, "SIGTERM", pids[index])
        assert control.noted(index, "exit", pids[index])


async def test_a_killed_worker_is_restarted(
    supervise: Callable[..., Any], control: Control
) -> None:
    run = await supervise(2)
    sink = run.sink
    old, other = run.pid_of(1), run.pid_of(2)
    os.kill(old, signal.SIGKILL)

    await wait_until(lambda: sink.named("popguard.worker.died"), "worker.died")
    (died,) = sink.named("popguard.worker.died")
    assert died["level"] == "error"
    assert (died["slot"], died["pid"], died["signal"]) == (1, old, "SIGKILL")
    assert died["upstream_quit"] is False
    assert "exit_code" not in died

    await wait_until(
        lambda: len(sink.named("popguard.worker.ready", slot=1)) == 2, "the new worker 1"
    )
    (restarting,) = sink.named("popguard.worker.restarting")
    assert restarting["level"] == "warning"
    assert (restarting["slot"], restarting["restarts"]) == (1, 1)
    assert restarting["delay"] == FIRST_BACKOFF  # it had run less than STABLE_AFTER
    starts = [e["pid"] for e in sink.named("popguard.worker.started", slot=1)]
    assert len(starts) == 2
    assert starts[0] == old
    new = starts[1]
    assert new != old
    assert run.supervisor.pids == [new, other]
    names = sink.names()
    assert (
        names.index("popguard.worker.died")
        < names.index("popguard.worker.restarting")
        < len(names) - 1 - names[::-1].index("popguard.worker.started")
    )
    # Worker 2 was not disturbed; the new worker 1 answers on the same port.
    assert [e["pid"] for e in sink.named("popguard.worker.started", slot=2)] == [other]
    seen: set[str] = set()
    with trio.fail_after(LIMIT):
        while answer(new, 1) not in seen:
            seen.add(await ask(run.port))
    assert seen <= {answer(new, 1), answer(other, 2)}
    # Only one workers.ready: a restart is not a start.
    assert len(sink.named("popguard.workers.ready")) == 1


async def test_early_crashes_back_off(supervise: Callable[..., Any]) -> None:
    run = await supervise(1)
    sink = run.sink
    for crash in (1, 2):
        os.kill(run.pid_of(1), signal.SIGKILL)
        await wait_until(
            lambda n=crash: len(sink.named("popguard.worker.ready", slot=1)) == n + 1,
            f"restart {crash}",
        )
    delays = [(e["restarts"], e["delay"]) for e in sink.named("popguard.worker.restarting")]
    assert delays == [(1, FIRST_BACKOFF), (2, FIRST_BACKOFF * 2)]


async def test_a_connection_while_the_worker_is_down_waits_for_the_next(
    supervise: Callable[..., Any], control: Control
) -> None:
    """The parent keeps the socket: a connection queued meanwhile is not reset."""
    run = await supervise(1)
    sink = run.sink
    old = run.pid_of(1)
    assert await ask(run.port) == answer(old, 1)
    control.set("ready-delay", "1.0")  # the next worker 1 takes its time
    os.kill(old, signal.SIGKILL)
    await wait_until(lambda: sink.named("popguard.worker.died"), "worker.died")

    with trio.fail_after(LIMIT):
        stream = await trio.open_tcp_stream("127.0.0.1", run.port)
    async with stream:
        # Made while no worker accepts: the old one is dead, the new one not ready.
        assert len(sink.named("popguard.worker.ready", slot=1)) == 1
        assert not any(w == "ready" and p != old for p, w in control.notes(1))
        data = b""
        with trio.fail_after(LIMIT):
            while not data.endswith(b"\r\n"):
                chunk = await stream.receive_some(100)
                assert chunk, f"connection closed without an answer (got {data!r})"
                data += chunk
    new = run.pid_of(1)
    assert new != old
    assert data.decode() == answer(new, 1)


async def test_a_worker_failing_before_ready_fails_the_start(
    supervise: Callable[..., Any], control: Control
) -> None:
    control.set("fail-2")
    with trio.fail_after(LIMIT):  # well before startup_timeout
        run = await supervise(2, wait_ready=False)
        status = await run.finish()
    assert status == 1
    sink = run.sink
    (failed,) = sink.named("popguard.workers.start_failed")
    assert failed["level"] == "error"
    assert failed["workers"] == 2
    assert failed["ready"] in (0, 1)
    assert sink.named("popguard.workers.ready") == []
    died = sink.named("popguard.worker.died", slot=2)
    assert len(died) == 1
    assert died[0]["exit_code"] == 3
    assert sink.named("popguard.worker.restarting") == []
    assert len(sink.named("popguard.worker.started", slot=2)) == 1
    assert sink.names()[-1] == "popguard.stopped"
    assert run.supervisor.pids == [None, None]
    assert control.noted(2, "failing")
    # The listening sockets were closed: nothing queues for a service that failed.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", run.port), timeout=LIMIT).close()


async def test_a_worker_that_cannot_be_spawned_fails_the_start(
    control: Control, listeners: list[ListenerSockets]
) -> None:
    # One worker: with two, the second slot's spawn races the stop the first
    # one's failure begins (see test_a_stop_while_a_worker_is_spawned_...).
    listeners.append(bind_reuseport("pop3", "127.0.0.1", 0, 1))
    sink = ListSink()
    missing = str(control.directory / "no-such-program")
    supervisor = Supervisor([missing], listeners, AuditLog([sink], worker=0), workers=1)
    with trio.fail_after(LIMIT):
        assert await supervisor.run() == 1
    (spawn_failed,) = sink.named("popguard.worker.spawn_failed")
    assert spawn_failed["level"] == "error"
    assert spawn_failed["slot"] == 1
    assert "No such file or directory" in spawn_failed["error"]
    assert "no-such-program" in spawn_failed["error"]
    (failed,) = sink.named("popguard.workers.start_failed")
    assert (failed["ready"], failed["workers"]) == (0, 1)
    assert sink.named("popguard.worker.started") == []
    assert sink.named("popguard.worker.restarting") == []
    assert sink.names()[-1] == "popguard.stopped"


@pytest.fixture
def stop_at_spawn(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Make the next worker spawn meet a stop, as a SIGTERM handled meanwhile would.

    trio spawns in a thread, so the signal task can run stop() while the
    worker is being forked: before the fork (``after_fork=False``) or after.
    """

    def arm(supervisor: Supervisor, *, after_fork: bool) -> None:
        real = trio.lowlevel.open_process

        async def open_process(*args: Any, **kwargs: Any) -> trio.Process:
            monkeypatch.setattr(trio.lowlevel, "open_process", real)  # once
            if not after_fork:
                supervisor.stop(signal.SIGTERM)
            process = await real(*args, **kwargs)
            if after_fork:
                supervisor.stop(signal.SIGTERM)
            return process

        monkeypatch.setattr(trio.lowlevel, "open_process", open_process)

    return arm


async def test_a_stop_while_a_worker_is_spawned_reaches_it(
    supervise: Callable[..., Any], control: Control, stop_at_spawn: Callable[..., None]
) -> None:
    run = await supervise(1)
    old = run.pid_of(1)
    stop_at_spawn(run.supervisor, after_fork=True)
    os.kill(old, signal.SIGKILL)  # the restart's spawn meets the stop
    await wait_until(lambda: len(run.sink.named("popguard.worker.started")) == 2, "the restart")
    new = run.sink.named("popguard.worker.started")[-1]["pid"]
    assert new != old
    with trio.fail_after(2):
        await run.done.wait()
    # Signalled as soon as it existed: it may not have had its handler yet
    # (then SIGTERM's default action ended it), but it did end, and run()
    # waited for it.
    (ended,) = [e for e in run.sink.events if e["event"] in _ENDED and e["pid"] == new]
    assert ended["event"] == "popguard.worker.exited"
    assert ended.get("signal") == "SIGTERM" or ended.get("exit_code") == 0
    assert control.noted(1, "SIGTERM", new) or ended.get("signal") == "SIGTERM"


async def test_a_stop_before_a_worker_is_forked_waits_for_it(
    supervise: Callable[..., Any], control: Control, stop_at_spawn: Callable[..., None]
) -> None:
    run = await supervise(1)
    stop_at_spawn(run.supervisor, after_fork=False)
    os.kill(run.pid_of(1), signal.SIGKILL)
    assert await run.finish() == 0
    sink = run.sink
    assert sink.named("popguard.worker.spawn_failed") == []
    # run() returns once every worker it started has ended.
    started = [e["pid"] for e in sink.named("popguard.worker.started")]
    ended = [e["pid"] for e in sink.events if e["event"] in _ENDED]
    assert sorted(started) == sorted(ended), sink.names()
    assert sink.names()[-1] == "popguard.stopped"


_ENDED = ("popguard.worker.exited", "popguard.worker.died")


async def test_a_stop_during_startup_is_prompt(
    supervise: Callable[..., Any], control: Control
) -> None:
    control.set("ready-delay", "30")
    run = await supervise(2, wait_ready=False)
    await wait_until(
        lambda: control.noted(1, "started") and control.noted(2, "started"), "both started"
    )
    run.supervisor.stop(signal.SIGTERM)  # what the first SIGTERM does
    # The workers exit at once (a SIGTERM ends their wait for ready), so the
    # supervisor has nothing left to wait for.  (With the bug it waits out
    # startup_timeout, LIMIT here, 60 s in popguard serve, then returns 1.)
    with trio.fail_after(2):
        await run.done.wait()
    assert control.noted(1, "SIGTERM")
    assert control.noted(2, "SIGTERM")


# --------------------------------------------------------------------------
# In a child process: signals to the supervisor, and its death
# --------------------------------------------------------------------------


@dataclass
class Child:
    """The supervisor in a process of its own, auditing to ``audit``."""

    process: subprocess.Popen[bytes]
    audit: Path
    port: int
    control: Control

    def records(self) -> list[dict[str, Any]]:
        try:
            text = self.audit.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.split("\n")[:-1]]

    def named(self, name: str, **match: object) -> list[dict[str, Any]]:
        return [
            r
            for r in self.records()
            if r["event"] == name and all(r.get(k) == v for k, v in match.items())
        ]

    def wait_for(self, name: str, count: int = 1, **match: object) -> list[dict[str, Any]]:
        wait_until_sync(lambda: len(self.named(name, **match)) >= count, f"{name} {match}")
        return self.named(name, **match)

    def pids(self) -> dict[int, int]:
        return {r["slot"]: r["pid"] for r in self.named("popguard.worker.started")}

    def ask(self) -> str:
        with socket.create_connection(("127.0.0.1", self.port), timeout=LIMIT) as conn:
            data = b""
            while not data.endswith(b"\r\n"):
                chunk = conn.recv(100)
                if not chunk:
                    break
                data += chunk
        return data.decode()

    def exit_status(self) -> int:
        return self.process.wait(timeout=LIMIT)


@pytest.fixture
def child(tmp_path: Path, control: Control) -> Iterator[Callable[..., Child]]:
    started: list[Child] = []

    def start(workers: int = 2, startup_timeout: float = LIMIT) -> Child:
        script = tmp_path / "supervise.py"
        script.write_text(SUPERVISE, encoding="utf-8")
        audit = tmp_path / "audit.jsonl"
        port_file = tmp_path / "port"
        process = subprocess.Popen(
            [
                sys.executable,
                str(script),
                str(workers),
                str(audit),
                str(port_file),
                str(startup_timeout),
                *control.command(),
            ],
        )
        made = Child(process, audit, 0, control)
        started.append(made)
        wait_until_sync(
            lambda: port_file.exists() or process.poll() is not None, "the supervisor's port"
        )
        assert process.poll() is None, f"the supervisor exited: {process.returncode}"
        made.port = int(port_file.read_text(encoding="utf-8"))
        made.wait_for("popguard.workers.ready")
        return made

    yield start
    for made in started:
        if made.process.poll() is None:
            made.process.kill()
            made.process.wait(timeout=LIMIT)


def test_sighup_is_passed_on(child: Callable[..., Child], control: Control) -> None:
    sup = child(2)
    pids = sup.pids()
    sup.process.send_signal(signal.SIGHUP)
    wait_until_sync(
        lambda: control.noted(1, "SIGHUP") and control.noted(2, "SIGHUP"), "SIGHUP in workers"
    )
    assert control.noted(1, "SIGHUP", pids[1])
    assert control.noted(2, "SIGHUP", pids[2])
    (record,) = sup.wait_for("popguard.signal")
    assert record["signal"] == "SIGHUP"
    # Nothing stopped or restarted.
    assert sup.process.poll() is None
    assert sup.named("popguard.worker.died") == []
    assert sup.named("popguard.worker.exited") == []
    assert not control.noted(1, "SIGTERM")
    assert sup.ask() in {answer(pids[1], 1), answer(pids[2], 2)}


def test_sighup_is_not_passed_to_a_worker_that_is_not_ready(
    child: Callable[..., Child], control: Control
) -> None:
    """A starting worker has no SIGHUP handler yet: the signal would kill it."""
    control.set("late-hup")
    sup = child(2)
    pids = sup.pids()
    control.set("ready-delay", "1.5")  # the next worker 2 takes its time
    os.kill(pids[2], signal.SIGKILL)
    sup.wait_for("popguard.worker.started", 2, slot=2)
    new = sup.pids()[2]
    wait_until_sync(lambda: control.noted(2, "started", new), "the new worker 2 to start")
    assert not control.noted(2, "ready", new)

    sup.process.send_signal(signal.SIGHUP)
    wait_until_sync(lambda: control.noted(1, "SIGHUP", pids[1]), "SIGHUP in worker 1")
    sup.wait_for("popguard.worker.ready", 2, slot=2)
    died = sup.named("popguard.worker.died")
    assert [(r["slot"], r["pid"], r["signal"]) for r in died] == [(2, pids[2], "SIGKILL")]
    assert sup.pids() == {1: pids[1], 2: new}
    assert not control.noted(2, "SIGHUP", new)
    # Once ready, it gets the next one.
    sup.process.send_signal(signal.SIGHUP)
    wait_until_sync(lambda: control.noted(2, "SIGHUP", new), "SIGHUP in the new worker 2")


def test_sigterm_stops_workers_and_closes_the_sockets_at_once(
    child: Callable[..., Child], control: Control
) -> None:
    control.set("term-delay", "2.0")  # the workers drain for 2 s
    sup = child(2)
    pids = sup.pids()
    assert sup.ask() in {answer(pids[1], 1), answer(pids[2], 2)}

    sup.process.send_signal(signal.SIGTERM)
    wait_until_sync(
        lambda: control.noted(1, "SIGTERM") and control.noted(2, "SIGTERM"), "SIGTERM in workers"
    )
    # The workers closed their sockets; so did the parent, while they drain.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", sup.port), timeout=LIMIT).close()
    assert sup.process.poll() is None, "the check must happen while the workers drain"
    assert not control.noted(1, "exit")
    assert not control.noted(2, "exit")

    assert sup.exit_status() == 0
    records = sup.records()
    assert all(r.get("worker") == 0 for r in records), "the parent's records say worker 0"
    (sig,) = sup.named("popguard.signal")
    assert sig["signal"] == "SIGTERM"
    exited = sup.named("popguard.worker.exited")
    assert sorted((r["slot"], r["pid"], r["exit_code"]) for r in exited) == [
        (1, pids[1], 0),
        (2, pids[2], 0),
    ]
    assert sup.named("popguard.worker.died") == []
    assert sup.named("popguard.worker.restarting") == []
    assert records[-1]["event"] == "popguard.stopped"
    for index in (1, 2):
        assert control.noted(index, "exit", pids[index])
        assert not control.noted(index, "SIGINT")


def test_a_second_sigterm_hurries_the_workers(
    child: Callable[..., Child], control: Control
) -> None:
    control.set("term-delay", "60")  # would drain for a minute
    sup = child(2)
    sup.process.send_signal(signal.SIGTERM)
    wait_until_sync(
        lambda: control.noted(1, "SIGTERM") and control.noted(2, "SIGTERM"), "SIGTERM in workers"
    )
    sup.process.send_signal(signal.SIGTERM)
    assert sup.exit_status() == 0
    for index in (1, 2):
        kinds = [w for _, w in control.notes(index)]
        # Once per signal: one SIGTERM, then SIGINT (the second ends the grace).
        assert kinds.count("SIGTERM") == 1, kinds
        assert kinds.count("SIGINT") == 1, kinds
        assert kinds[-1] == "exit"
    assert [r["signal"] for r in sup.named("popguard.signal")] == ["SIGTERM", "SIGTERM"]
    assert len(sup.named("popguard.worker.exited")) == 2


def test_workers_stop_when_the_supervisor_dies(
    child: Callable[..., Child], control: Control
) -> None:
    sup = child(2)
    pids = sup.pids()
    sup.process.kill()  # SIGKILL: no chance to signal anybody
    sup.process.wait(timeout=LIMIT)
    wait_until_sync(
        lambda: control.noted(1, "orphaned") and control.noted(2, "orphaned"),
        "the workers to notice the lifeline closed",
    )
    assert control.noted(1, "orphaned", pids[1])
    assert control.noted(2, "orphaned", pids[2])
    assert not control.noted(1, "SIGTERM")
