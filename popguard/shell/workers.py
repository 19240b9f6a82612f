"""Several worker processes on the same listeners (``workers: N``).

The parent (:class:`Supervisor`) binds every listener N times with
``SO_REUSEPORT`` -- one socket per worker, so the kernel spreads new
connections over the workers -- and keeps all of them open.  Each worker is
a fresh ``popguard serve`` process (same arguments, plus ``--worker``) that
inherits its own sockets and accepts on them; it never binds a POP3
listener itself.  Because the parent holds the sockets, a worker that
crashes loses only the sessions it was serving (their upstream connections
are closed by the kernel, without QUIT, so the server deletes nothing):
connections queued on its socket wait for the replacement instead of being
reset, and a restarted worker needs no privilege to bind port 110 or 995.

Signals: SIGHUP/SIGUSR1 reopen the parent's audit file and are passed on
(each worker reopens its file and reloads policies and certificates).
SIGTERM/SIGINT are passed on once per signal: the workers drain for the
grace period, a second signal closes their sessions at once.  The parent
closes its copies of the listening sockets as soon as a stop begins, so
nothing new queues behind workers that no longer accept.  Workers run in a
session of their own (a terminal's Ctrl-C reaches the parent only, which
passes it on once) and stop gracefully if the parent disappears.

Audit: each process writes its own file and hash chain (see
:func:`worker_audit_file`): one chain per writer keeps every chain strictly
ordered without locks shared between processes.  Every record carries
``worker`` (0 is the parent; its records about worker N say ``slot: N``);
the parent's ``popguard.workers.started`` record says how many workers
there are, which ``popguard audit verify`` uses to report a worker whose
trail is missing.

Reconciliation: a worker killed outright leaves sessions with
``session.opened`` and no ``session.closed`` in its file, and marks with no
fate.  When a worker exits, and at start-up for the files a previous run
left, the parent reads the last worker process's records
(:mod:`popguard.trail.reconcile`, in a thread) and writes the missing ends
into its own trail: ``session.orphaned`` and, for marks, ``deletions.unknown``
(reason ``worker_died``).  Sessions it reported once (in its trail) are not
reported again.  The slot's replacement starts only after that, so the
records read are exactly the dead process's.

Counters (connection limits, failed-login throttling, Prometheus metrics)
are per process: see docs/deploy.md "Several workers".

Admin: the parent serves ``admin.listen`` itself: ``/healthz``, ``/readyz``
(every worker's ``/readyz``) and the live sessions of all workers.  Worker N serves
its own admin listener (``/metrics`` among others) on ``admin.listen``'s
port + N (see :func:`worker_admin_address`) and tells the parent where, in
its "ready" message.  ``GET /sessions`` asks every worker and merges the
lists; ``POST /sessions/ID/close`` goes to the worker whose slot the id
starts with (:func:`popguard.shell.server.worker_of_session`), naming the
original requester.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import signal
import socket
import sys
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import trio

from popguard.audit import AuditLog
from popguard.metrics import merge_scrapes
from popguard.shell.admin import (
    REQUESTED_BY_HEADER,
    AdminServer,
    Document,
    admin_request,
)
from popguard.shell.role import WorkerRole, parse_worker_arg
from popguard.shell.server import (
    HANDLED_SIGNALS,
    RELOAD_SIGNALS,
    Endpoint,
    format_peer,
    worker_of_session,
)
from popguard.sinks.file import FileSink
from popguard.trail.reconcile import (
    DELETIONS_UNKNOWN_EVENT,
    ORPHANED_EVENT,
    ParentTrail,
    ProcessTail,
    last_process_tail,
    orphan_records,
    read_parent_trail,
    worker_files,
)

__all__ = [
    "LISTEN_BACKLOG",
    "ListenerSockets",
    "Supervisor",
    "WorkerRole",
    "bind_reuseport",
    "cpu_count",
    "parse_worker_arg",
    "worker_admin_address",
    "worker_audit_file",
    "worker_command",
]

LISTEN_BACKLOG: Final = 4096
#: A worker that ran at least this long before exiting is restarted at once.
STABLE_AFTER: Final = 10.0
#: Restart delays for a worker that keeps failing early: 0.1 s doubling to 30 s.
FIRST_BACKOFF: Final = 0.1
MAX_BACKOFF: Final = 30.0
#: The longest "ready" message a worker sends: ``R``, then its admin address.
MAX_READY_MESSAGE: Final = 512


def cpu_count() -> int:
    """The CPUs this process may run on (``workers: auto``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def worker_audit_file(path: str, index: int) -> str:
    """Worker *index*'s audit file: ``audit.jsonl`` -> ``audit.w2.jsonl``.

    The parent keeps *path* itself.  The worker's number goes before the
    extension so that rotated names (``audit.w2.jsonl.1``, ``...-20261127``)
    and a ``*.jsonl`` logrotate glob keep working.
    """
    directory, name = os.path.split(path)
    stem, dot, extension = name.rpartition(".")
    if not dot or not stem:
        return os.path.join(directory, f"{name}.w{index}")
    return os.path.join(directory, f"{stem}.w{index}.{extension}")


def worker_admin_address(address: tuple[str, int], index: int) -> tuple[str, int]:
    """Worker *index*'s admin listener: ``admin.listen``'s port + index (the
    parent serves ``admin.listen`` itself); port 0 stays 0 (any free port)."""
    host, port = address
    return (host, port + index if port else 0)


def _reachable(address: tuple[str, int]) -> tuple[str, int]:
    """Where the parent reaches a listener bound to ``address``: a wildcard
    (0.0.0.0, ::) through loopback."""
    host, port = address
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return (host, port)  # localhost
    if ip.is_unspecified:
        return ("::1" if ip.version == 6 else "127.0.0.1", port)
    return (host, port)


# -- the parent's sockets ------------------------------------------------------


@dataclass(slots=True)
class ListenerSockets:
    """One listener (by name) bound once per worker."""

    name: str
    #: ``per_worker[i]``: worker i+1's sockets (one per resolved address).
    per_worker: list[list[socket.socket]] = field(default_factory=list)

    def close(self) -> None:
        for sockets in self.per_worker:
            for sock in sockets:
                sock.close()

    @property
    def addresses(self) -> list[tuple[str, int]]:
        if not self.per_worker:
            return []
        return [sock.getsockname()[:2] for sock in self.per_worker[0]]


def bind_reuseport(name: str, host: str, port: int, workers: int) -> ListenerSockets:
    """Bind ``host:port`` ``workers`` times with SO_REUSEPORT, listening.

    Every address ``host`` resolves to is bound (like trio's
    ``open_tcp_listeners``); port 0 is resolved by the first bind and the
    other sockets share the port.  Raises OSError, with the sockets closed.
    """
    if not hasattr(socket, "SO_REUSEPORT"):
        raise OSError(errno.ENOTSUP, "workers need SO_REUSEPORT, which this system lacks")
    infos = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV
    )
    seen: set[tuple[int, str]] = set()
    result = ListenerSockets(name, [[] for _ in range(workers)])
    try:
        for family, kind, proto, _, sockaddr in infos:
            key = (family, str(sockaddr[0]))
            if key in seen:
                continue
            seen.add(key)
            address: tuple[object, ...] = tuple(sockaddr)
            for sockets in result.per_worker:
                sock = socket.socket(family, kind, proto)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
                sock.listen(LISTEN_BACKLOG)
                address = sock.getsockname()  # port 0 -> the port the kernel chose
    except OSError as exc:
        result.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return result


# -- the worker side -----------------------------------------------------------


# -- the parent ----------------------------------------------------------------


@dataclass(slots=True)
class _Slot:
    index: int
    fds: dict[str, list[int]]
    process: trio.Process | None = None
    started_at: float = 0.0
    backoff: float = FIRST_BACKOFF
    restarts: int = 0
    ready: bool = False
    #: Being started (``open_process`` runs in a thread).
    spawning: bool = False
    #: Where the running worker's admin listener answers (from its ready message).
    admin: tuple[str, int] | None = None
    #: The exited worker's trail is being reconciled (its replacement waits).
    reconciling: bool = False


class Supervisor:
    """Start N workers, restart the ones that die, pass signals on.

    *command* is the worker's argv without ``--worker`` and the inherited
    listener options, which the supervisor adds per worker.

    Starting a process runs in a thread (trio's ``open_process``), so a stop
    can begin while a worker is being started: such a slot counts as
    running (``spawning``), the listening sockets stay open until the start
    is over (the child must inherit the right descriptors), and the new
    worker is sent the stop signal as soon as it exists.
    """

    def __init__(
        self,
        command: Sequence[str],
        listeners: Sequence[ListenerSockets],
        audit: AuditLog,
        *,
        workers: int,
        startup_timeout: float = 60.0,
        admin: tuple[str, int] | None = None,
    ) -> None:
        self.command = list(command)
        #: The address the parent's admin listener binds (None: none).
        self.admin = admin
        self.listeners = list(listeners)
        self.audit = audit
        self.workers = workers
        self.startup_timeout = startup_timeout
        self.slots = [
            _Slot(
                index,
                {
                    ls.name: [sock.fileno() for sock in ls.per_worker[index - 1]]
                    for ls in self.listeners
                },
            )
            for index in range(1, workers + 1)
        ]
        self.stopping = False
        #: The signal a stop sends workers (SIGTERM, then SIGINT to hurry).
        self._stop_signal: int = signal.SIGTERM
        self._stop_signals = 0
        self._ready_count = 0
        self._startup_over = False
        self._failed_start = False
        self._sockets_closed = False
        #: Set on any change run() waits for: all ready, a failure, a stop, an exit.
        self._changed = trio.Event()
        # Workers hold the read end; the write end dies with this process.
        self._lifeline_read, self._lifeline_write = os.pipe()
        #: The parent's audit file; the workers' files are named after it.
        self.audit_file = _audit_file_of(audit)
        #: Sessions already reported as ``session.orphaned``.
        self._reconciled: set[str] = set()

    @property
    def pids(self) -> list[int | None]:
        return [slot.process.pid if slot.process else None for slot in self.slots]

    # -- running -------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> int:
        """Supervise until every worker has exited after a stop; the exit status.

        Returns 1 when a worker fails before it is first ready (a broken
        configuration shows at once instead of as a restart loop).
        """
        audit = self.audit
        audit.event(
            "popguard.workers.started",
            workers=self.workers,
            listeners={ls.name: [format_peer(a) for a in ls.addresses] for ls in self.listeners},
        )
        status = 0
        try:
            await self._reconcile_previous_run()
            admin = await self._open_admin()
            if admin is None and self.admin is not None:
                status = 1  # recorded as popguard.workers.start_failed
            else:
                with trio.open_signal_receiver(*HANDLED_SIGNALS) as signals:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._on_signals, signals)
                        if admin is not None:
                            await nursery.start(admin.run)
                        for slot in self.slots:
                            nursery.start_soon(self._keep, slot)
                        status = await self._startup()
                        task_status.started()
                        while not self._all_exited():
                            await self._wait_change()
                        nursery.cancel_scope.cancel()
        finally:
            os.close(self._lifeline_read)
            os.close(self._lifeline_write)
        audit.event("popguard.stopped")
        return status

    # -- the admin listener --------------------------------------------------

    async def _open_admin(self) -> AdminServer | None:
        """Bind the parent's admin listener; None (and recorded) if it cannot."""
        if self.admin is None:
            return None
        server = self.admin_server()
        try:
            bound = await server.open(self.admin)
        except OSError as exc:
            self.audit.error(
                "popguard.workers.start_failed", ready=0, workers=self.workers, error=str(exc)
            )
            return None
        for host, port in bound:
            self.audit.event("admin.listening", address=str(Endpoint(host, port)))
        return server

    def admin_server(self) -> AdminServer:
        """The parent's admin listener (not yet bound): no metrics of its own;
        readiness and sessions asked of the workers."""
        return AdminServer(None, self._readiness, sessions=self, scrape=self._scrape)

    async def _scrape(self, accept: str | None) -> tuple[bytes, str]:
        """``/metrics``: every running worker's, merged, each sample labelled ``worker``.

        A worker that does not answer is left out (its absence shows as the
        missing ``worker`` label, and in ``/readyz``).
        """
        scrapes: dict[int, str] = {}

        async def ask(slot: _Slot) -> None:
            address = slot.admin
            if address is None or not slot.ready:
                return
            try:
                status, body = await admin_request(address, "GET", "/metrics")
            except OSError:
                return
            if status == 200:
                scrapes[slot.index] = body.decode("utf-8", "replace")

        async with trio.open_nursery() as nursery:
            for slot in self.slots:
                nursery.start_soon(ask, slot)
        return merge_scrapes(scrapes, accept)

    async def _readiness(self) -> dict[str, bool]:
        """``/readyz``: no stop began, every worker is ready, and each worker's
        own ``/readyz`` (listeners, upstream, audit) says ready."""
        checks = {"workers": not self.stopping and all(slot.ready for slot in self.slots)}
        answers: dict[int, bool] = {}

        async def ask(slot: _Slot) -> None:
            status, _ = await self._call_worker(slot, "GET", "/readyz")
            answers[slot.index] = status == 200

        async with trio.open_nursery() as nursery:
            for slot in self.slots:
                nursery.start_soon(ask, slot)
        checks.update({f"worker_{index}": ok for index, ok in sorted(answers.items())})
        return checks

    async def list_sessions(self, user: str | None) -> tuple[int, Document]:
        """``GET /sessions``: every worker's, merged, oldest first.

        ``workers`` says which workers answered; a worker that did not (not
        running, or no answer within the time limit) makes ``complete`` false.
        """
        target = "/sessions" + (f"?{urllib.parse.urlencode({'user': user})}" if user else "")
        answers: dict[int, Document | str] = {}

        async def ask(slot: _Slot) -> None:
            answers[slot.index] = await self._ask_worker(slot, "GET", target)

        async with trio.open_nursery() as nursery:
            for slot in self.slots:
                nursery.start_soon(ask, slot)
        sessions: list[Any] = []
        workers: list[Document] = []
        for index in sorted(answers):
            answer = answers[index]
            if isinstance(answer, str):
                workers.append({"worker": index, "ok": False, "error": answer})
            else:
                workers.append({"worker": index, "ok": True})
                sessions += answer.get("sessions", [])
        sessions.sort(key=lambda session: str(session.get("since", "")))
        complete = all(worker["ok"] for worker in workers)
        return 200, {"sessions": sessions, "workers": workers, "complete": complete}

    async def close_session(
        self, session_id: str, *, requested_by: str, relayed_by: str | None, reason: str | None
    ) -> tuple[int, Document]:
        """``POST /sessions/ID/close``: passed to the worker the id names."""
        index = worker_of_session(session_id)
        if not 1 <= index <= self.workers:
            return 404, {"error": "no such session", "id": session_id}
        slot = self.slots[index - 1]
        target = f"/sessions/{session_id}/close"
        if reason:
            target += f"?{urllib.parse.urlencode({'reason': reason})}"
        status, answer = await self._call_worker(
            slot, "POST", target, {REQUESTED_BY_HEADER: requested_by}
        )
        if isinstance(answer, str):
            return 503, {"error": answer, "id": session_id, "worker": index}
        return status, answer

    async def _ask_worker(self, slot: _Slot, method: str, target: str) -> Document | str:
        """A worker's JSON answer (status 200), or why there is none."""
        status, answer = await self._call_worker(slot, method, target)
        if isinstance(answer, str) or status == 200:
            return answer
        return f"worker {slot.index} answered {status}"

    async def _call_worker(
        self,
        slot: _Slot,
        method: str,
        target: str,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Document | str]:
        """(status, the worker's JSON answer), or (0, why there is none)."""
        address = slot.admin  # None once the worker exits, until its successor is ready
        if address is None or not slot.ready:
            return 0, f"worker {slot.index} is not running"
        try:
            status, body = await admin_request(address, method, target, headers)
            document = json.loads(body)
        except (OSError, ValueError) as exc:
            return 0, f"worker {slot.index}: {exc}"
        if not isinstance(document, dict):
            return 0, f"worker {slot.index}: not a JSON object"
        return status, document

    async def _startup(self) -> int:
        with trio.move_on_after(self.startup_timeout):
            while not (self.stopping or self._failed_start or self._ready_count == self.workers):
                await self._wait_change()
        self._startup_over = True
        if self._ready_count == self.workers:
            self.audit.event("popguard.workers.ready", workers=self.workers)
            return 0
        if self.stopping and not self._failed_start:
            return 0  # asked to stop while starting: not a failure
        self.audit.error(
            "popguard.workers.start_failed", ready=self._ready_count, workers=self.workers
        )
        self.stop(signal.SIGTERM)
        return 1

    async def _wait_change(self) -> None:
        await self._changed.wait()
        self._changed = trio.Event()

    def _all_exited(self) -> bool:
        return self.stopping and all(
            slot.process is None and not slot.spawning and not slot.reconciling
            for slot in self.slots
        )

    def _signal_workers(self, signum: int, *, ready_only: bool = False) -> None:
        for slot in self.slots:
            if ready_only and not slot.ready:
                continue
            if slot.process is not None and slot.process.returncode is None:
                slot.process.send_signal(signum)

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Begin (SIGTERM) or hurry (SIGINT, the second time) a stop of every worker."""
        self.stopping = True
        self._stop_signal = signum
        self._close_sockets()
        self._signal_workers(signum)
        self._changed.set()

    def _close_sockets(self) -> None:
        """Nothing new queues once stopping; not while a child is being forked."""
        if self._sockets_closed or any(slot.spawning for slot in self.slots):
            return
        self._sockets_closed = True
        for ls in self.listeners:
            ls.close()

    async def _on_signals(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            self.audit.event("popguard.signal", signal=signal.Signals(signum).name)
            if signum in RELOAD_SIGNALS:
                self.audit.reopen()
                # Only to ready workers: before that a worker has no handler
                # yet (SIGHUP would kill it), and it reads everything fresh.
                self._signal_workers(signal.SIGHUP, ready_only=True)
                continue
            self._stop_signals += 1
            # A worker counts signals like a single process: the second one
            # ends its grace period.
            self.stop(signal.SIGTERM if self._stop_signals == 1 else signal.SIGINT)

    async def _keep(self, slot: _Slot) -> None:
        """Run worker ``slot`` and restart it whenever it dies, until a stop."""
        while not self.stopping:
            await self._run_once(slot)
            if self.stopping:
                break
            if not slot.ready and not self._startup_over:
                self._failed_start = True  # failed before its first ready: give up
                self._changed.set()
                break
            ran = trio.current_time() - slot.started_at
            if ran >= STABLE_AFTER:
                delay, slot.backoff = 0.0, FIRST_BACKOFF
            else:
                delay, slot.backoff = slot.backoff, min(slot.backoff * 2, MAX_BACKOFF)
            slot.restarts += 1
            self.audit.warning(
                "popguard.worker.restarting", slot=slot.index, delay=delay, restarts=slot.restarts
            )
            await trio.sleep(delay)

    def _argv(self, slot: _Slot, ready_fd: int) -> list[str]:
        role = f"{slot.index}/{self.workers}:{ready_fd}:{self._lifeline_read}"
        argv = [*self.command, "--worker", role]
        for name, fds in slot.fds.items():
            argv += ["--inherit-listener", f"{name}={','.join(map(str, fds))}"]
        return argv

    async def _spawn(self, slot: _Slot, write_end: int) -> trio.Process:
        inherited = [fd for fds in slot.fds.values() for fd in fds]
        slot.spawning = True
        try:
            return await trio.lowlevel.open_process(
                self._argv(slot, write_end),
                pass_fds=(*inherited, write_end, self._lifeline_read),
                start_new_session=True,
            )
        finally:
            slot.spawning = False
            os.close(write_end)  # the worker has its copy
            if self.stopping:
                self._close_sockets()  # deferred by stop() while forking
                self._changed.set()

    async def _run_once(self, slot: _Slot) -> None:
        read_end, write_end = os.pipe()
        slot.ready = False
        slot.started_at = trio.current_time()
        try:
            process = await self._spawn(slot, write_end)
        except OSError as exc:
            os.close(read_end)
            self.audit.error("popguard.worker.spawn_failed", slot=slot.index, error=str(exc))
            return
        slot.process = process
        self.audit.event("popguard.worker.started", slot=slot.index, pid=process.pid)
        if self.stopping:
            process.send_signal(self._stop_signal)  # the stop began while it started
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._await_ready, slot, read_end)
                code = await process.wait()
                nursery.cancel_scope.cancel()
        finally:
            os.close(read_end)
        slot.process = None
        slot.admin = None
        fields: dict[str, object] = {"slot": slot.index, "pid": process.pid}
        if code < 0:
            fields["signal"] = signal.Signals(-code).name
        else:
            fields["exit_code"] = code
        if self.stopping and (code == 0 or not slot.ready):
            self.audit.event("popguard.worker.exited", **fields)
        else:
            # Its sessions' upstream connections were closed by the kernel,
            # without QUIT (RFC 1939 section 6): none of their DELEs took effect.
            self.audit.error("popguard.worker.died", **fields, upstream_quit=False)
        ended: dict[str, object] = (
            {"signal": fields["signal"]} if code < 0 else {"exit_status": code}
        )
        await self._reconcile_exit(slot, process.pid, ended)
        self._changed.set()

    async def _await_ready(self, slot: _Slot, fd: int) -> None:
        """Wait for the worker's ready message (up to its end of file)."""
        message = b""
        while len(message) < MAX_READY_MESSAGE:
            await trio.lowlevel.wait_readable(fd)
            chunk = os.read(fd, MAX_READY_MESSAGE)
            if not chunk:
                break
            message += chunk
        if not message.startswith(b"R"):
            return  # exited first
        slot.admin = _admin_of(message)
        slot.ready = True
        self.audit.event("popguard.worker.ready", slot=slot.index)
        if not self._startup_over:
            self._ready_count += 1
            self._changed.set()

    # -- reconciliation (docs/audit.md, "session.orphaned") --------------------
    # Kept apart from the supervising above: these read worker files
    # (popguard.trail.reconcile, in a thread) and write the parent's records.

    async def _reconcile_previous_run(self) -> None:
        """At start-up, before any worker runs: what a previous run's workers left
        open (the host, or the supervisor, died with them)."""
        if self.audit_file is None:
            return
        tails, parent = await trio.to_thread.run_sync(_previous_run, self.audit_file)
        self._reconciled |= parent.reconciled
        for slot, tail in tails.items():
            self._report_tail(slot, parent.pids.get(slot), tail, {"previous_run": True})
        if tails:
            await self.audit.aflush()

    async def _reconcile_exit(self, slot: _Slot, pid: int, ended: dict[str, object]) -> None:
        """After worker ``slot`` exited: the sessions it left open.

        Runs before the slot's replacement starts (so the last process in the
        file is the one that exited), and to its end even during a stop: a
        reconciliation begun is never cut short.
        """
        if self.audit_file is None:
            return
        path = worker_audit_file(self.audit_file, slot.index)
        slot.reconciling = True
        try:
            with trio.CancelScope(shield=True):
                tail = await trio.to_thread.run_sync(last_process_tail, path)
                self._report_tail(slot.index, pid, tail, ended)
                await self.audit.aflush()
        finally:
            slot.reconciling = False

    def _report_tail(
        self, slot: int, pid: int | None, tail: ProcessTail, ended: dict[str, object]
    ) -> None:
        """Write the parent's records for the sessions *tail* left open, once each."""
        if not tail.files:
            return
        orphaned = unknown = 0
        for session in tail.sessions:
            if session.session in self._reconciled:
                continue
            self._reconciled.add(session.session)
            for event, fields in orphan_records(session, slot=slot, pid=pid, ended=ended):
                self.audit.warning(event, **fields)
                orphaned += event == ORPHANED_EVENT
                unknown += event == DELETIONS_UNKNOWN_EVENT
        self.audit.event(
            "popguard.worker.reconciled",
            slot=slot,
            pid=pid,
            orphaned=orphaned,
            deletions_unknown=unknown,
            files=tail.files,
            unreadable_lines=tail.skipped,
        )


def _audit_file_of(audit: AuditLog) -> str | None:
    """The path of the parent's audit file, if it writes one."""
    for sink in audit.sinks:
        if isinstance(sink, FileSink):
            return sink.path
    return None


def _previous_run(path: str) -> tuple[dict[int, ProcessTail], ParentTrail]:
    """Every worker file's last process (left by an earlier run), and what
    the parent's trail says was reported already.  Runs in a thread."""
    tails = {slot: last_process_tail(name) for slot, name in worker_files(path).items()}
    starts = [tail.started for tail in tails.values() if tail.sessions]
    if not starts:
        return tails, ParentTrail()
    since = None if None in starts else min(start for start in starts if start is not None)
    return tails, read_parent_trail(path, since=since)


def _admin_of(message: bytes) -> tuple[str, int] | None:
    """The admin address in a ready message (``R host port``), reachable from here."""
    parts = message[1:].split()
    if len(parts) != 2 or not parts[1].isdigit():
        return None
    return _reachable((parts[0].decode("ascii", "replace"), int(parts[1])))


def worker_command(argv: Sequence[str]) -> list[str]:
    """How to start a worker: this interpreter, ``-m popguard``, the serve args."""
    return [sys.executable, "-m", "popguard", *argv]
