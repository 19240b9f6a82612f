"""Many POP3 sessions at once from one thread: a small epoll state machine.

Each connection runs a *script*: read the greeting, then send each command
and wait for its whole reply (lock step, as in :mod:`bench.wire`).  Two
scripts: USER/PASS/STAT/RETR 1/QUIT (the concurrency case) and
USER/PASS/DELE 1/QUIT (the DELE-heavy case).  A
selector loop drives up to ``parallel`` connections and starts a new one
whenever one finishes, until ``sessions`` have run.  No asyncio or trio:
per session this costs a few recv/send calls and little else, so the
client stays far from saturating a core (the benchmark reports its CPU).

Against a TLS target (POP3S) the same loop makes each connection's TLS
handshake without blocking and reads through OpenSSL (``ssl`` sockets in
non-blocking mode); a full handshake per session costs the client far more
than the POP3 commands do, which the reported client CPU shows.

:class:`SwarmPool` runs the same loop in several worker processes.
"""

from __future__ import annotations

import contextlib
import errno
import multiprocessing
import os
import selectors
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from bench.procs import BenchError, own_cpu_seconds, raise_nofile
from bench.target import Address, Target, as_target, client_context, tls_description

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


#: Connection states.  A plaintext connection is READY from the start
#: (waiting to read covers the connect); a TLS one first waits for the
#: connect, then for its handshake.
CONNECTING, HANDSHAKE, READY = 0, 1, 2


class _Conn:
    __slots__ = ("buf", "events", "index", "out", "script", "sock", "started", "state", "step")

    def __init__(self, sock: socket.socket, script: Script, index: int) -> None:
        self.sock = sock
        self.script = script
        self.index = index
        self.step = 0
        self.buf = bytearray()
        self.started = time.perf_counter()
        self.state = READY
        #: The selector events registered for, 0 when not registered.
        self.events = 0
        #: A command a TLS socket could not take yet (SSLWantWrite/ReadError).
        self.out = b""


@dataclass
class SwarmResult:
    ok: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    wall: float = 0.0
    cpu: float = 0.0
    held: list[socket.socket] = field(default_factory=list)
    #: Protocol and cipher of the first TLS session ("" in plaintext).
    tls: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "failed": self.failed,
            "errors": self.errors[:5],
            "latencies": self.latencies,
            "wall": self.wall,
            "cpu": self.cpu,
            "tls": self.tls,
        }


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def run_swarm(
    address: Target | Address,
    scripts: Callable[[int], Script],
    sessions: Sequence[int],
    parallel: int,
    *,
    hold: bool = False,
    time_limit: float = 120.0,
) -> SwarmResult:
    """Run one script per session index in ``sessions``, ``parallel`` at a time.

    ``address`` may be a :class:`~bench.target.Target` with TLS: each session
    then connects, makes a full TLS handshake without blocking (retrying on
    ``SSLWantReadError``/``SSLWantWriteError`` when the selector says so)
    and speaks POP3S.  A TLS socket is read until OpenSSL holds no more
    decrypted bytes (``pending()``): the selector only sees the kernel's
    buffer.

    With ``hold=True`` the sockets are left open after their script and
    returned in ``result.held`` (the caller closes them).
    """
    result = SwarmResult()
    target = as_target(address)
    addr = target.address
    spec = target.tls
    ctx = client_context(spec) if spec is not None else None
    sel = selectors.DefaultSelector()
    todo = list(reversed(sessions))
    active = 0
    cpu0 = own_cpu_seconds()
    started = time.perf_counter()
    deadline = started + time_limit
    read_ev, write_ev = selectors.EVENT_READ, selectors.EVENT_WRITE

    def want(conn: _Conn, events: int) -> None:
        if conn.events == events:
            return
        if conn.events:
            sel.modify(conn.sock, events, conn)
        else:
            sel.register(conn.sock, events, conn)
        conn.events = events

    def fail(conn: _Conn, why: str) -> None:
        nonlocal active
        result.failed += 1
        if len(result.errors) < 20:
            result.errors.append(f"session {conn.index} step {conn.step}: {why}")
        if conn.events:
            with contextlib.suppress(KeyError, ValueError):
                sel.unregister(conn.sock)
            conn.events = 0
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
        err = sock.connect_ex(addr)
        if err not in (0, errno.EINPROGRESS):
            fail(conn, os.strerror(err))
            return
        if ctx is None:
            # The greeting arrives only once connected, so waiting to read
            # covers the connect too (a refused connect makes recv fail).
            want(conn, read_ev)
        else:
            conn.state = CONNECTING
            want(conn, write_ev)

    def handshake(conn: _Conn) -> None:
        assert spec is not None
        assert ctx is not None
        if conn.state == CONNECTING:
            err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                fail(conn, os.strerror(err))
                return
            # wrap_socket takes the descriptor over: unregister it first.
            sel.unregister(conn.sock)
            conn.events = 0
            try:
                conn.sock = ctx.wrap_socket(
                    conn.sock, server_hostname=spec.server_name, do_handshake_on_connect=False
                )
            except OSError as exc:
                fail(conn, f"TLS: {_why(exc)}")
                return
            conn.state = HANDSHAKE
        sock = conn.sock
        assert isinstance(sock, ssl.SSLSocket)
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            want(conn, read_ev)
            return
        except ssl.SSLWantWriteError:
            want(conn, write_ev)
            return
        except OSError as exc:
            fail(conn, f"TLS handshake: {_why(exc)}")
            return
        conn.state = READY
        if not result.tls:
            result.tls = tls_description(sock)
        want(conn, read_ev)

    def send(conn: _Conn, line: bytes) -> None:
        """Send a command; a TLS socket that cannot take it yet keeps it in ``out``."""
        try:
            sent = conn.sock.send(line)
        except ssl.SSLWantWriteError:
            conn.out = line
            want(conn, write_ev)
            return
        except ssl.SSLWantReadError:
            conn.out = line
            want(conn, read_ev)
            return
        except OSError as exc:
            fail(conn, _why(exc))
            return
        if sent != len(line):
            fail(conn, "short send of a command")
            return
        conn.out = b""
        if conn.events != read_ev:
            want(conn, read_ev)

    def receive_tls(conn: _Conn) -> bytes | None:
        """Everything OpenSSL can give now; None when the connection failed or must wait."""
        sock = conn.sock
        assert isinstance(sock, ssl.SSLSocket)
        chunks = []
        wait_write = False
        while True:
            try:
                data = sock.recv(65536)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLWantWriteError:
                wait_write = True
                break
            except OSError as exc:
                fail(conn, _why(exc))
                return None
            if not data:
                fail(conn, "connection closed")
                return None
            chunks.append(data)
            if not sock.pending():
                break
        want(conn, write_ev if wait_write else read_ev)
        return b"".join(chunks) if chunks else None

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
                if ctx is None:
                    try:
                        data = conn.sock.recv(65536)
                    except OSError as exc:
                        fail(conn, _why(exc))
                        continue
                    if not data:
                        fail(conn, "connection closed")
                        continue
                else:
                    if conn.state != READY:
                        handshake(conn)
                        continue
                    if conn.out:
                        send(conn, conn.out)
                        continue
                    tls_data = receive_tls(conn)
                    if not tls_data:
                        continue  # a TLS record without data (a session ticket), or failed
                    data = tls_data
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
                    send(conn, line)
                    continue
                # Script done.
                sel.unregister(conn.sock)
                conn.events = 0
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
    address: Target
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
        address: Target | Address,
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
            jobs.append(
                SwarmJob(as_target(address), tuple(users), share, max(1, par), time_limit, kind)
            )
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
            "tls": next((r["tls"] for r in results if r["tls"]), ""),
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
