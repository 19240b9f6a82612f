"""Many POP3 sessions at once from one thread: a small epoll state machine.

Each connection runs a *script*: read the greeting, then send each command
and wait for its whole reply (lock step, as in :mod:`bench.wire`).  Two
scripts: USER/PASS/STAT/RETR 1/QUIT (the concurrency case) and
USER/PASS/DELE 1/QUIT (the DELE-heavy case).  A
selector loop drives up to ``parallel`` connections and starts a new one
whenever one finishes, until ``sessions`` have run.  No asyncio or trio:
per session this costs a few recv/send calls and little else, so the
client stays far from saturating a core (the benchmark reports its CPU).

:class:`SwarmPool` runs the same loop in several worker processes.
"""

from __future__ import annotations

import contextlib
import errno
import multiprocessing
import os
import selectors
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from bench.procs import BenchError, own_cpu_seconds, raise_nofile

TERMINATOR = b"\r\n.\r\n"

#: One step: the command to send (None: the greeting) and whether its
#: +OK reply is multi-line.
Step = tuple[bytes | None, bool]
Script = Sequence[Step]


def session_script(user: str, password: str, *, quit: bool = True) -> list[Step]:
    """USER/PASS/STAT/RETR 1/QUIT (or, with quit=False, only the login)."""
    steps: list[Step] = [
        (None, False),
        (f"USER {user}\r\n".encode(), False),
        (f"PASS {password}\r\n".encode(), False),
    ]
    if quit:
        steps += [(b"STAT\r\n", False), (b"RETR 1\r\n", True), (b"QUIT\r\n", False)]
    return steps


def dele_script(user: str, password: str) -> list[Step]:
    """USER/PASS/DELE 1/QUIT: each session deletes one message.

    Every reply must be +OK (the loop fails a session on anything else), so
    a finished script means Dovecot accepted the DELE and answered QUIT
    after its UPDATE state, i.e. after expunging the message.
    """
    return [
        (None, False),
        (f"USER {user}\r\n".encode(), False),
        (f"PASS {password}\r\n".encode(), False),
        (b"DELE 1\r\n", False),
        (b"QUIT\r\n", False),
    ]


#: The scripts a :class:`SwarmPool` worker can run, by name.
SCRIPTS: dict[str, Callable[[str, str], list[Step]]] = {
    "retr": session_script,
    "dele": dele_script,
}


class _Conn:
    __slots__ = ("buf", "index", "script", "sock", "started", "step")

    def __init__(self, sock: socket.socket, script: Script, index: int) -> None:
        self.sock = sock
        self.script = script
        self.index = index
        self.step = 0
        self.buf = bytearray()
        self.started = time.perf_counter()


@dataclass
class SwarmResult:
    ok: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    wall: float = 0.0
    cpu: float = 0.0
    held: list[socket.socket] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "failed": self.failed,
            "errors": self.errors[:5],
            "latencies": self.latencies,
            "wall": self.wall,
            "cpu": self.cpu,
        }


def run_swarm(
    address: tuple[str, int],
    scripts: Callable[[int], Script],
    sessions: Sequence[int],
    parallel: int,
    *,
    hold: bool = False,
    time_limit: float = 120.0,
) -> SwarmResult:
    """Run one script per session index in ``sessions``, ``parallel`` at a time.

    With ``hold=True`` the sockets are left open after their script and
    returned in ``result.held`` (the caller closes them).
    """
    result = SwarmResult()
    sel = selectors.DefaultSelector()
    todo = list(reversed(sessions))
    active = 0
    cpu0 = own_cpu_seconds()
    started = time.perf_counter()
    deadline = started + time_limit

    def fail(conn: _Conn, why: str) -> None:
        nonlocal active
        result.failed += 1
        if len(result.errors) < 20:
            result.errors.append(f"session {conn.index} step {conn.step}: {why}")
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(conn.sock)
        conn.sock.close()
        active -= 1

    def launch() -> None:
        nonlocal active
        index = todo.pop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        conn = _Conn(sock, scripts(index), index)
        active += 1
        err = sock.connect_ex(address)
        if err not in (0, errno.EINPROGRESS):
            fail(conn, os.strerror(err))
            return
        # The greeting arrives only once connected, so waiting to read
        # covers the connect too (a refused connect makes recv fail).
        sel.register(sock, selectors.EVENT_READ, conn)

    try:
        while todo or active:
            while todo and active < parallel:
                launch()
            now = time.perf_counter()
            if now > deadline:
                raise BenchError(
                    f"swarm exceeded {time_limit:g} s with {active} sessions active, "
                    f"{len(todo)} not started"
                )
            if not active:
                continue
            for key, _mask in sel.select(timeout=min(1.0, deadline - now)):
                conn: _Conn = key.data
                try:
                    data = conn.sock.recv(65536)
                except OSError as exc:
                    fail(conn, exc.strerror or type(exc).__name__)
                    continue
                if not data:
                    fail(conn, "connection closed")
                    continue
                buf = conn.buf
                buf += data
                _command, multiline = conn.script[conn.step]
                if buf[:1] != b"+":
                    if buf.endswith(b"\r\n"):
                        fail(conn, bytes(buf[:100]).decode(errors="replace").strip())
                    continue
                if not buf.endswith(TERMINATOR if multiline else b"\r\n"):
                    continue
                buf.clear()
                conn.step += 1
                if conn.step < len(conn.script):
                    line = conn.script[conn.step][0]
                    assert line is not None
                    try:
                        if conn.sock.send(line) != len(line):
                            fail(conn, "short send of a command")
                    except OSError as exc:
                        fail(conn, exc.strerror or type(exc).__name__)
                    continue
                # Script done.
                sel.unregister(conn.sock)
                active -= 1
                result.ok += 1
                result.latencies.append(time.perf_counter() - conn.started)
                if hold:
                    result.held.append(conn.sock)
                else:
                    conn.sock.close()
    except BaseException:
        for key in list(sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        for sock in result.held:
            sock.close()
        raise
    finally:
        sel.close()
    result.wall = time.perf_counter() - started
    result.cpu = own_cpu_seconds() - cpu0
    return result


def release(
    socks: Sequence[socket.socket], *, send_quit: bool = True, timeout: float = 30.0
) -> int:
    """QUIT and close held sessions; return how many answered +OK to QUIT."""
    sel = selectors.DefaultSelector()
    answered = 0
    try:
        for sock in socks:
            try:
                if send_quit:
                    sock.send(b"QUIT\r\n")
                    sel.register(sock, selectors.EVENT_READ)
                else:
                    sock.close()
            except OSError:
                sock.close()
        deadline = time.monotonic() + timeout
        while sel.get_map() and time.monotonic() < deadline:
            for key, _mask in sel.select(timeout=0.5):
                held = key.fileobj
                assert isinstance(held, socket.socket)
                try:
                    data = held.recv(4096)
                except OSError:
                    data = b""
                if data.startswith(b"+OK"):
                    answered += 1
                sel.unregister(held)
                held.close()
    finally:
        for key in list(sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        sel.close()
    return answered


# -- worker processes ----------------------------------------------------------


@dataclass(frozen=True)
class SwarmJob:
    address: tuple[str, int]
    users: tuple[tuple[str, str], ...]
    sessions: tuple[int, ...]
    parallel: int
    time_limit: float
    kind: str = "retr"


def _worker_main(conn: Connection) -> None:  # pragma: no cover - child process
    raise_nofile()
    try:
        while True:
            job: SwarmJob | None = conn.recv()
            if job is None:
                return
            users = job.users
            make = SCRIPTS[job.kind]

            def script(
                index: int,
                users: tuple[tuple[str, str], ...] = users,
                make: Callable[[str, str], list[Step]] = make,
            ) -> Script:
                user, password = users[index % len(users)]
                return make(user, password)

            try:
                res = run_swarm(
                    job.address, script, job.sessions, job.parallel, time_limit=job.time_limit
                )
                conn.send(("ok", res.as_dict()))
            except Exception as exc:
                conn.send(("error", f"{type(exc).__name__}: {exc}"))
    except (KeyboardInterrupt, EOFError, BrokenPipeError):
        return


class SwarmPool:
    """``procs`` client processes, each running :func:`run_swarm` on its share."""

    def __init__(self, procs: int) -> None:
        self.procs = max(1, procs)
        ctx = multiprocessing.get_context("spawn")
        self._workers: list[tuple[Any, Connection]] = []
        for _ in range(self.procs):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(child,), daemon=True)
            proc.start()
            child.close()
            self._workers.append((proc, parent))

    def run(
        self,
        address: tuple[str, int],
        users: Sequence[tuple[str, str]],
        sessions: int,
        parallel: int,
        *,
        time_limit: float = 120.0,
        kind: str = "retr",
    ) -> dict[str, Any]:
        """Split ``sessions`` and ``parallel`` over the workers; wall time seen from here.

        ``kind`` names the script (:data:`SCRIPTS`): ``retr`` (USER/PASS/STAT/
        RETR 1/QUIT) or ``dele`` (USER/PASS/DELE 1/QUIT).  Session ``i`` logs
        in as ``users[i % len(users)]``; with at least ``sessions`` users no
        user has two sessions in one run.
        """
        if kind not in SCRIPTS:
            raise ValueError(f"unknown swarm script {kind!r}")
        n = self.procs
        jobs = []
        for w in range(n):
            share = tuple(range(w, sessions, n))
            par = parallel // n + (1 if w < parallel % n else 0)
            jobs.append(SwarmJob(address, tuple(users), share, max(1, par), time_limit, kind))
        started = time.perf_counter()
        for (_proc, pipe), job in zip(self._workers, jobs, strict=True):
            pipe.send(job)
        results = []
        for proc, pipe in self._workers:
            if not pipe.poll(time_limit + 30):
                raise BenchError(f"client worker {proc.pid} did not report")
            status, payload = pipe.recv()
            if status != "ok":
                raise BenchError(f"client worker {proc.pid}: {payload}")
            results.append(payload)
        wall = time.perf_counter() - started
        latencies = sorted(x for r in results for x in r["latencies"])
        ok = sum(r["ok"] for r in results)
        return {
            "ok": ok,
            "failed": sum(r["failed"] for r in results),
            "errors": [e for r in results for e in r["errors"]][:5],
            "wall": wall,
            "sessions_per_s": ok / wall if wall > 0 else 0.0,
            "latency_p50_ms": latencies[len(latencies) // 2] * 1e3 if latencies else 0.0,
            "latency_p99_ms": (
                latencies[min(len(latencies) - 1, len(latencies) * 99 // 100)] * 1e3
                if latencies
                else 0.0
            ),
            "client_cpu_s": [r["cpu"] for r in results],
            # Busiest client process: CPU seconds per second of its own run.
            "client_cpu_max_util": max(r["cpu"] / r["wall"] if r["wall"] else 0 for r in results),
        }

    def close(self) -> None:
        for _proc, pipe in self._workers:
            with contextlib.suppress(OSError):
                pipe.send(None)
            pipe.close()
        for proc, _pipe in self._workers:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        self._workers = []

    def __enter__(self) -> SwarmPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
