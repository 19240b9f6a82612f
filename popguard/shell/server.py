"""Listeners, the accept loop, and graceful shutdown.

Like trio's ``serve_listeners``, the server loop is small and separate from
the per-session handler.  A handler catches its own errors, so one broken
session never takes the server down, and always closes its streams.

Shutdown (SIGTERM/SIGINT, or :meth:`ProxyServer.request_shutdown`): stop
accepting and close the listeners, give open sessions ``shutdown_grace``
seconds to finish on their own, then end the rest.  Ending a session closes
its upstream connection without QUIT, so the server deletes nothing.

Live sessions: every session is in a registry by its id, so the admin
listener can list them (``GET /sessions``: figures read on demand from the
session's own counters, nothing kept per byte) and end one
(``POST /sessions/ID/close``): the same close as at shutdown, without QUIT,
after a ``session.close_requested`` record naming who asked and why.

SIGHUP and SIGUSR1 reopen the audit file (logrotate renames it, then
signals).  With ``audit.on_failure: fail-closed`` a new connection is
refused with ``-ERR [SYS/TEMP]`` while the audit file cannot be written,
and a DELE is forwarded only once its record is on disk.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import secrets
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from functools import lru_cache, partial
from typing import Any, Final, NamedTuple

import trio

from popguard.audit import AuditLog, session_context
from popguard.config import ProxyProtocolConfig, SharedStateConfig
from popguard.core.identity import DEFAULT_IDENTITY, IdentityRules
from popguard.core.limits import Limits
from popguard.core.proxy_protocol import (
    V1_UNKNOWN,
    ProxyHeaderParser,
    ProxyProtocolError,
    build_v1,
    build_v2,
    build_v2_local,
    is_trusted,
)
from popguard.core.records import AuditRecord, EndReason, Event, FieldValue
from popguard.core.replies import REPLY_AUDIT_DOWN
from popguard.core.session import ProxySession
from popguard.metrics import Metrics
from popguard.policy.model import PolicySet, client_address
from popguard.policy.session import PolicyHolder, PolicyShared, SessionPolicy
from popguard.retention import RetentionStore
from popguard.sharedstate import SharedState, open_shared_state
from popguard.shell import shared
from popguard.shell.admin import AdminServer, Readiness
from popguard.shell.relay import Connector, Relay, UpstreamSecurity
from popguard.shell.role import WorkerRole
from popguard.shell.tcp import TCPStream
from popguard.shell.timers import SessionTimers
from popguard.shell.tls import ListenerTLS, TLSContexts, UpstreamTLS, legacy_warnings
from popguard.shell.tlssock import TLSSocketStream


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ListenerSpec:
    name: str
    endpoint: Endpoint
    #: TLS toward clients: none, implicit (POP3S) or starttls (STLS offered).
    tls: ListenerTLS = field(default_factory=ListenerTLS)
    #: Accept a PROXY header from trusted load balancers (None: never).
    proxy_protocol: ProxyProtocolConfig | None = None
    #: Send a PROXY header (v1/v2) to the upstream for these sessions.
    send_proxy: str = "none"
    #: Listening sockets bound by a supervising parent (file descriptors):
    #: used instead of binding ``endpoint`` (a worker, see shell/workers.py).
    fds: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class ServerSettings:
    listeners: tuple[ListenerSpec, ...]
    upstream: Endpoint
    connect_timeout: float = 10.0
    #: Seconds from the upstream's TCP connection to its greeting.
    greeting_timeout: float = 30.0
    idle_timeout: float = 600.0
    #: Seconds from the client's connection to a successful login (0: no limit).
    login_timeout: float = 60.0
    idle_notice: bool = True
    shutdown_grace: float = 10.0
    limits: Limits = field(default_factory=Limits)
    #: Look up UIDL and size upstream so records name messages durably.
    message_identity: bool = True
    #: With message identity, the SHA-256 of each message retrieved whole.
    content_digests: bool = True
    #: TLS toward the upstream: none, implicit or starttls.
    upstream_tls: UpstreamTLS = field(default_factory=UpstreamTLS)
    #: How the upstream maps a login name to an account (config ``identity:``).
    identity: IdentityRules = DEFAULT_IDENTITY
    #: Where copies go before a DELE under a ``retain`` policy (config
    #: ``retention.store``); None: such a DELE is refused (docs/retention.md).
    retention: RetentionStore | None = None
    #: Where limits and failed logins are counted across processes (config
    #: ``shared_state:``); None: in this process (docs/shared-state.md).
    shared_state: SharedStateConfig | None = None


def format_peer(sockaddr: object) -> str:
    """'host:port' for IPv4, '[host]:port' for IPv6, from a socket address."""
    if isinstance(sockaddr, tuple) and len(sockaddr) >= 2:
        return str(Endpoint(str(sockaddr[0]), int(sockaddr[1])))
    return str(sockaddr)


#: Loads the policy set again (SIGHUP); raises on an invalid set.
PolicyLoader = Callable[[], PolicySet]

#: Random octets in a session id (16 hex digits, docs/audit.md).  A worker's
#: ids start with its slot (one octet, ``workers`` is at most 256) so that ids
#: are unique across workers and a supervisor knows whose session it is.
SESSION_ID_OCTETS: Final = 8
#: Seconds ``POST /sessions/ID/close`` waits for the session to be gone (its
#: last words to the client and the lingering close take up to about 3 s).
CLOSE_WAIT: Final = 5.0


def session_id_prefix(worker: int | None) -> str:
    """The first hex digits of worker ``worker``'s session ids ("" alone)."""
    return "" if worker is None else f"{worker - 1:02x}"


def worker_of_session(session_id: str) -> int:
    """Which worker (1-based) a session id made by :func:`session_id_prefix` names."""
    return int(session_id[:2], 16) + 1


class LiveSession(NamedTuple):
    """A session in the registry: its record context (``session``, ``client``,
    ``listener``) and its relay.  A tuple: the registry costs an idle session
    a few pointers."""

    context: dict[str, str]
    relay: Relay


def _utc(timestamp: float) -> str:
    """ISO 8601 UTC to the second, as the records' timestamps."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


class ProxyServer:
    def __init__(
        self,
        settings: ServerSettings,
        audit: AuditLog,
        *,
        policies: PolicyShared | None = None,
        policy_loader: PolicyLoader | None = None,
        metrics: Metrics | None = None,
        worker: int | None = None,
        shared_state: SharedState | None = None,
    ) -> None:
        self.settings = settings
        self.audit = audit
        self.metrics = metrics
        #: Where limits and failed logins are counted across processes
        #: (popguard.shell.shared); None: in this process only.
        self.shared_state = shared_state
        #: This process's worker slot (1-based; None: a single process).
        self.worker = worker
        self._id_prefix = session_id_prefix(worker)
        #: Policies shared by every session (None: no policy engine at all).
        self.policies = policies
        self._policy_loader = policy_loader
        #: SSL contexts, built here so a bad certificate fails at startup.
        self.tls = TLSContexts(
            {spec.name: spec.tls for spec in settings.listeners}, settings.upstream_tls
        )
        self._listener_tls = {spec.name: spec.tls.mode for spec in settings.listeners}
        self._specs = {spec.name: spec for spec in settings.listeners}
        #: The live sessions by id, oldest first; and, for sessions being
        #: closed by an operator, the event their end sets.
        self._sessions: dict[str, LiveSession] = {}
        self._closing: dict[str, trio.Event] = {}
        #: Every session's timers, on one task (popguard.shell.timers).
        self.timers = SessionTimers()
        self._all_closed = trio.Event()
        self._all_closed.set()
        self._shutdown = trio.Event()
        self._grace_over = trio.Event()
        #: The bound address of each listener, once serving (port 0 resolved).
        self.bound: dict[str, list[Endpoint]] = {}
        self._opened: list[tuple[ListenerSpec, list[socket.socket]]] = []
        # What every session's relay is given, made once rather than per
        # session: an idle session keeps each of them.
        upstream = settings.upstream
        connect: Connector = partial(connect_tcp, upstream.host, upstream.port)
        if metrics is not None:
            connect = metrics.timed_connector(connect, trio.current_time)
        self._connect: Connector = connect
        self._upstream_label = str(upstream)
        self._emit = audit.emit
        self._emit_durable = audit.emit_durable
        #: Message identity (UIDL and size lookups, content digests) is work
        #: for the records: skipped when no sink would receive one (the
        #: metrics sink only counts events), unless a retention store names
        #: its copies by UIDL.
        recording = [sink for sink in audit.sinks if metrics is None or sink is not metrics.sink]
        self._message_identity = settings.message_identity and (
            bool(recording) or settings.retention is not None
        )

    @property
    def active_sessions(self) -> int:
        return len(self._sessions)

    @property
    def accepting(self) -> bool:
        """Listeners are bound and not draining (for /readyz)."""
        return bool(self.bound) and not self._shutdown.is_set()

    def reload_policies(self) -> bool:
        """Load the policies again; keep the old set if the new one is invalid.

        Open sessions see the new set from their next command; their timers
        are re-read at once.
        """
        if self.policies is None or self._policy_loader is None:
            return False
        try:
            policies = self._policy_loader()
        except Exception as exc:
            issues = getattr(exc, "errors", None) or getattr(exc, "issues", None)
            errors = [str(issue) for issue in issues][:20] if issues else [str(exc)]
            self.audit.error("policy.reload_failed", errors=errors, kept="previous policy set")
            return False
        self.policies.holder.replace(policies)
        self.audit.event("policy.reloaded", rules=len(policies.rules), source=policies.source)
        for live in self._sessions.values():
            live.relay.rearm()
        return True

    def reload_tls(self) -> bool:
        """Read certificates and keys again; keep the old ones on error."""
        try:
            self.tls.reload()
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            self.audit.error("tls.reload_failed", error=str(exc)[:300], kept="previous contexts")
            return False
        if self.tls.listeners or self.tls.upstream is not None:
            self.audit.event("tls.reloaded", listeners=sorted(self.tls.listeners))
        return True

    def request_shutdown(self, *, immediate: bool = False) -> None:
        self._shutdown.set()
        if immediate:
            self._grace_over.set()

    async def open_listeners(self) -> None:
        """Bind every listener (port 0 is resolved here).  Raises OSError."""
        if self._opened:
            return
        for spec in self.settings.listeners:
            try:
                if spec.fds:
                    listeners = [_inherited_listener(fd) for fd in spec.fds]
                else:
                    listeners = await _open_listeners(spec.endpoint)
            except OSError as exc:
                for _, opened in self._opened:
                    for sock in opened:
                        sock.close()
                raise OSError(
                    exc.errno, f"cannot listen on {spec.endpoint}: {exc.strerror or exc}"
                ) from exc
            self._opened.append((spec, listeners))
            self.bound[spec.name] = [Endpoint(*sock.getsockname()[:2]) for sock in listeners]

    async def run(
        self, *, task_status: trio.TaskStatus[ProxyServer] = trio.TASK_STATUS_IGNORED
    ) -> None:
        settings = self.settings
        await self.open_listeners()
        opened = self._opened
        for spec, _ in opened:
            for endpoint in self.bound[spec.name]:
                self.audit.event("popguard.listening", listener=spec.name, address=str(endpoint))
        policies = self.policies.holder.current if self.policies is not None else None
        for warning in legacy_warnings(settings.upstream_tls):
            self.audit.warning("popguard.tls_warning", warning=warning)
        self.audit.event(
            "popguard.started",
            upstream=str(settings.upstream),
            idle_timeout=settings.idle_timeout,
            policies=policies.source if policies is not None else None,
            policy_rules=len(policies.rules) if policies is not None else None,
        )
        async with trio.open_nursery() as service:
            service.start_soon(self.timers.run)
            await self._serve(settings, opened, task_status)
            service.cancel_scope.cancel()

    async def _serve(
        self,
        settings: ServerSettings,
        opened: list[tuple[ListenerSpec, list[socket.socket]]],
        task_status: trio.TaskStatus[ProxyServer],
    ) -> None:
        """Accept until asked to stop, then give sessions their grace period."""
        async with trio.open_nursery() as sessions:
            async with trio.open_nursery() as acceptors:
                for spec, listeners in opened:
                    for sock in listeners:
                        acceptors.start_soon(self._accept, spec.name, sock, sessions)
                task_status.started(self)
                await self._shutdown.wait()
                acceptors.cancel_scope.cancel()
            # Stop queueing new connections for the grace period: a balancer
            # (or a client) is refused at once and tries elsewhere.
            for _, listeners in opened:
                for sock in listeners:
                    sock.close()
            self.audit.event(
                "popguard.stopping",
                active_sessions=len(self._sessions),
                grace_period=settings.shutdown_grace,
            )
            with trio.move_on_after(settings.shutdown_grace):
                async with trio.open_nursery() as waiters:
                    waiters.start_soon(_wait_then_cancel, self._all_closed, waiters.cancel_scope)
                    waiters.start_soon(_wait_then_cancel, self._grace_over, waiters.cancel_scope)
            for live in list(self._sessions.values()):
                live.relay.abort(EndReason.SHUTDOWN)
        self.audit.event("popguard.stopped")

    async def _accept(self, listener: str, sock: socket.socket, sessions: trio.Nursery) -> None:
        """Accept connections on one listening socket, each into a session task.

        The socket is used directly (as the relay's pumps do): ``accept``
        until it would block, then one wait.  Running out of file
        descriptors or memory pauses accepting briefly instead of ending
        the server (as trio's ``serve_listeners`` does).
        """
        accepted = 0
        while True:
            try:
                conn, peername = sock.accept()
            except BlockingIOError:
                accepted = 0
                await trio.lowlevel.wait_readable(sock)
                continue
            except OSError as exc:
                if exc.errno in _ACCEPT_RESOURCE_ERRNOS:
                    self.audit.error("popguard.accept_failed", error=exc.strerror or str(exc))
                    await trio.sleep(_ACCEPT_SLEEP)
                    continue
                if exc.errno in _ACCEPT_TRANSIENT_ERRNOS:
                    continue
                raise
            sessions.start_soon(self._handle, listener, conn, peername)
            accepted += 1
            if accepted >= _ACCEPT_BATCH:
                accepted = 0
                await trio.lowlevel.checkpoint()  # let the sessions run

    async def _handle(self, listener: str, conn: socket.socket, peername: object) -> None:
        tcp = TCPStream(conn)
        try:
            sockname = conn.getsockname()
        except OSError:
            tcp.close_now()  # gone before we could look
            return
        assert isinstance(peername, tuple)
        client = format_peer(peername)
        endpoints = ((str(peername[0]), int(peername[1])), (str(sockname[0]), int(sockname[1])))
        session_id = self._new_session_id()
        context: dict[str, str] = {"session": session_id, "client": client, "listener": listener}
        spec = self._specs[listener]
        if spec.proxy_protocol is not None:
            relayed = await self._proxy_header(tcp, spec.proxy_protocol, context, endpoints)
            if relayed is None:
                return
            endpoints = relayed
            client = context["client"]
        with session_context(**context):
            if not self.audit.accepting_sessions:
                await self._refuse(tcp, "audit_unavailable", REPLY_AUDIT_DOWN)
                return
            policy: SessionPolicy | None = None
            if self.policies is not None:
                policy = SessionPolicy(
                    self.policies,
                    peer=client,
                    client=client_address(client),
                    listener=listener,
                    tls=self._listener_tls.get(listener) == "implicit",
                )
                if self.shared_state is not None and policy.uses_shared_state:
                    verdict = await shared.check_connect(policy, self.shared_state, session_id)
                else:
                    verdict = policy.check_connect()
                if verdict is not None:
                    name = "policy.denied" if verdict.enforced else "policy.dry_run"
                    self.audit.warning(name, **verdict.fields(), command=None)
                    if verdict.enforced:
                        await self._refuse(tcp, "policy", verdict.reply)
                        return
            # Run here, not in a coroutine of its own: a frame fewer for
            # every idle session to keep.
            relay = self._relay(tcp, client, listener, policy, endpoints, session_id)
            sessions = self._sessions
            sessions[session_id] = LiveSession(context, relay)
            self._all_closed = trio.Event() if len(sessions) == 1 else self._all_closed
            try:
                await relay.run()
            except Exception as exc:
                self.audit.error("session.internal_error", error=f"{type(exc).__name__}: {exc}")
            finally:
                del sessions[session_id]
                if self._closing:
                    gone = self._closing.pop(session_id, None)
                    if gone is not None:
                        gone.set()
                if not sessions:
                    self._all_closed.set()
                if policy is not None:
                    policy.closed()
                    if self.shared_state is not None and policy.uses_shared_state:
                        # Even when cancelled (shutdown): a lease not removed
                        # only expires with its heartbeat.
                        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_WAIT):
                            await shared.close(
                                policy, self.shared_state, session_id, relay.session.user
                            )

    def _new_session_id(self) -> str:
        """A random id no live session has (a worker's starts with its slot)."""
        prefix = self._id_prefix
        octets = SESSION_ID_OCTETS - len(prefix) // 2
        while (session_id := prefix + secrets.token_hex(octets)) in self._sessions:
            pass
        return session_id

    # -- live sessions (the admin listener's /sessions) ------------------------

    def live_sessions(self, user: str | None = None) -> list[dict[str, Any]]:
        """Every live session (``user``: only that account's), oldest first."""
        now, wall = trio.current_time(), time.time()
        return [
            self._describe(session_id, live, now, wall)
            for session_id, live in self._sessions.items()
            if user is None or live.relay.session.user == user
        ]

    def _describe(
        self, session_id: str, live: LiveSession, now: float, wall: float
    ) -> dict[str, Any]:
        """One session's figures, read now from what the session keeps anyway."""
        relay = live.relay
        session = relay.session
        started = relay.started_at or now
        active = relay.last_activity or now
        return {
            "id": session_id,
            "worker": self.worker,
            "account": session.user,
            "client": live.context["client"],
            "listener": live.context["listener"],
            "tls": session.client_tls,
            "upstream_tls": isinstance(relay.upstream, TLSSocketStream | trio.SSLStream),
            "state": session.state.value,
            "since": _utc(wall - (now - started)),
            "idle_seconds": round(max(now - active, 0.0), 1),
            "bytes_from_client": session.bytes_from_client,
            "bytes_to_client": session.bytes_to_client,
            "bytes_from_upstream": session.bytes_from_upstream,
            "bytes_to_upstream": session.bytes_to_upstream,
            "marked": len(session.marked_for_deletion),
        }

    async def list_sessions(self, user: str | None) -> tuple[int, dict[str, Any]]:
        """``GET /sessions`` (:class:`popguard.shell.admin.SessionControl`)."""
        return 200, {"sessions": self.live_sessions(user)}

    async def close_session(
        self, session_id: str, *, requested_by: str, relayed_by: str | None, reason: str | None
    ) -> tuple[int, dict[str, Any]]:
        """``POST /sessions/ID/close``: end the session without QUIT.

        Records ``session.close_requested`` (who asked, why) in the session's
        context, then ends it as a shutdown would: the upstream connection is
        closed without QUIT, so the server deletes nothing and the marks are
        recorded as discarded (``operator_close``).  Answers once the session
        is gone (``closed``), or after :data:`CLOSE_WAIT` seconds.
        """
        live = self._sessions.get(session_id)
        if live is None:
            return 404, {"error": "no such session", "id": session_id}
        now = trio.current_time()
        described = self._describe(session_id, live, now, time.time())
        fields: dict[str, FieldValue] = {"requested_by": requested_by, "reason": reason}
        if relayed_by is not None:
            fields["relayed_by"] = relayed_by
        with session_context(**live.context):
            self.audit.emit(AuditRecord(Event.SESSION_CLOSE_REQUESTED, fields))
        detail = f"closed by {requested_by}" + (f": {reason}" if reason else "")
        gone = self._closing.setdefault(session_id, trio.Event())
        live.relay.abort(EndReason.OPERATOR_CLOSE, detail)
        with trio.move_on_after(CLOSE_WAIT):
            await gone.wait()
        return 200, {"closed": gone.is_set(), "session": described}

    def _relay(
        self,
        stream: TCPStream,
        client: str,
        listener: str,
        policy: SessionPolicy | None,
        endpoints: tuple[tuple[str, int], tuple[str, int]],
        session_id: str = "",
    ) -> Relay:
        """The session's core and its relay."""
        settings = self.settings
        proxy_header = None
        send_proxy = self._specs[listener].send_proxy
        if send_proxy != "none":
            build = build_v2 if send_proxy == "v2" else build_v1
            proxy_header = build(*endpoints)
        mode = self._listener_tls.get(listener, "none")
        session = ProxySession(
            stls=mode == "starttls",
            tls=mode == "implicit",
            client=client,
            listener=listener,
            limits=settings.limits,
            idle_notice=settings.idle_notice,
            message_identity=self._message_identity,
            content_digests=settings.content_digests,
            identity=settings.identity,
            durable_deletions=self.audit.fail_closed,
            policy=policy,
            observer=self.metrics.command_timer(trio.current_time) if self.metrics else None,
        )
        return Relay(
            session,
            stream,
            connect_upstream=self._connect,
            upstream_label=self._upstream_label,
            connect_timeout=settings.connect_timeout,
            idle_timeout=settings.idle_timeout,
            login_timeout=settings.login_timeout,
            greeting_timeout=settings.greeting_timeout,
            emit=self._emit,
            emit_durable=self._emit_durable,
            policy=policy,
            client_tls=self.tls.listeners.get(listener),
            implicit_tls=mode == "implicit",
            upstream_tls=self._upstream_security(),
            proxy_header=proxy_header,
            timers=self.timers,
            retention=settings.retention,
            shared_state=self.shared_state if policy is not None else None,
            session_id=session_id,
        )

    def _upstream_security(self) -> UpstreamSecurity | None:
        tls = self.settings.upstream_tls
        context = self.tls.upstream
        if context is None or tls.mode == "none":
            return None
        name = tls.server_name or self.settings.upstream.host
        return UpstreamSecurity(tls.mode, context, name)

    async def _proxy_header(
        self,
        stream: TCPStream,
        config: ProxyProtocolConfig,
        context: dict[str, str],
        endpoints: tuple[tuple[str, int], tuple[str, int]],
    ) -> tuple[tuple[str, int], tuple[str, int]] | None:
        """Read a PROXY header from a trusted peer; None if the connection is refused.

        Updates ``context`` (client, proxy) and returns the session's real
        (client, destination) endpoints.
        """
        peer = endpoints[0][0]
        trusted = is_trusted(peer, config.trusted)
        reason: str | None = None
        if not trusted:
            if not config.required:
                return endpoints  # served as itself; a PROXY line is just a bad command
            reason = "PROXY header required, but the peer is not a trusted network"
        else:
            parser = ProxyHeaderParser()
            result = None
            with trio.move_on_after(config.timeout):
                try:
                    while result is None:
                        # Peeked, then only the header taken: the session's
                        # first bytes (a TLS ClientHello) stay in the socket.
                        data = await stream.peek_some(4096)
                        if not data:
                            parser.eof()
                        result = parser.feed(data)
                        stream.discard(len(data) - len(result.remainder) if result else len(data))
                except ProxyProtocolError as exc:
                    reason = exc.reason
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    reason = "connection lost while reading the PROXY header"
            if result is None and reason is None:
                if not config.required and parser.buffered == 0:
                    return endpoints  # no header from a trusted peer: it speaks for itself
                reason = f"no PROXY header within {config.timeout:g} s"
            if result is not None:
                if result.source is None or result.destination is None:
                    return endpoints  # LOCAL / UNKNOWN: the connection's own addresses
                context["proxy"] = context["client"]
                context["client"] = format_peer(result.source)
                return (result.source, result.destination)
        with session_context(**context):
            self.audit.warning("proxy_protocol.rejected", reason=reason)
        stream.close_now()
        return None

    async def _refuse(self, stream: TCPStream, reason: str, reply: bytes) -> None:
        """Answer a connection popguard will not serve, and close it."""
        self.audit.warning("session.refused", reason=reason)
        with trio.move_on_after(1), suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(reply)
        stream.close_now()


async def connect_tcp(host: str, port: int) -> TCPStream:
    """Connect to the upstream.

    An address literal is connected directly, on a plain non-blocking
    socket that trio only waits on (no trio socket made and detached again
    per session); a name goes through ``trio.open_tcp_stream`` (resolver
    thread, happy eyeballs across its addresses).
    """
    family = _literal_family(host)
    if family is None:
        return TCPStream.adopt(await trio.open_tcp_stream(host, port))
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        try:
            sock.connect((host, port))
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                raise OSError(error, os.strerror(error), f"{host}:{port}") from None
    except BaseException:
        sock.close()
        raise
    return TCPStream(sock)


@lru_cache(maxsize=64)
def _literal_family(host: str) -> socket.AddressFamily | None:
    """The family of an address literal, or None for a name (cached: the
    upstream's host is the same for every session)."""
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return None


#: accept() errors that mean "out of a resource": wait, then accept again.
_ACCEPT_RESOURCE_ERRNOS: Final = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
)
#: accept() errors about one connection (gone before it was accepted).
_ACCEPT_TRANSIENT_ERRNOS: Final = frozenset(
    {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR}
)
_ACCEPT_SLEEP: Final = 0.1
#: Connections accepted in a row before the accept loop lets sessions run.
_ACCEPT_BATCH: Final = 16
#: The listen queue (trio's open_tcp_listeners default: the kernel's maximum).
_BACKLOG: Final = 0xFFFF


def _inherited_listener(fd: int) -> socket.socket:
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    return sock


async def _open_listeners(endpoint: Endpoint) -> list[socket.socket]:
    """Listening sockets for ``endpoint`` (each address it resolves to), as
    ``trio.open_tcp_listeners`` makes them, but plain non-blocking sockets."""
    infos = await trio.socket.getaddrinfo(
        endpoint.host, endpoint.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    seen: set[tuple[int, object]] = set()
    listeners: list[socket.socket] = []
    try:
        for family, kind, proto, _, sockaddr in infos:
            if (family, sockaddr) in seen:
                continue
            seen.add((family, sockaddr))
            sock = socket.socket(family, kind, proto)
            listeners.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(sockaddr)
            sock.listen(_BACKLOG)
            sock.setblocking(False)
    except OSError:
        for sock in listeners:
            sock.close()
        raise
    return listeners


async def _wait_then_cancel(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


async def serve(
    settings: ServerSettings,
    audit: AuditLog,
    *,
    policies: PolicySet | None = None,
    policy_loader: PolicyLoader | None = None,
    metrics: Metrics | None = None,
    admin: tuple[str, int] | None = None,
    after_bind: Callable[[], None] | None = None,
    worker: WorkerRole | None = None,
    task_status: trio.TaskStatus[ProxyServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the proxy until SIGTERM or SIGINT (a second signal skips the grace).

    SIGHUP and SIGUSR1 reopen the audit file and reload the policies.
    """
    shared = None
    state: SharedState | None = None
    if policies is not None:
        state = _open_shared_state(settings.shared_state, audit)
        shared = PolicyShared(
            PolicyHolder(policies), trio.current_time, shared_state=state is not None
        )
    server = ProxyServer(
        settings,
        audit,
        policies=shared,
        policy_loader=policy_loader,
        metrics=metrics,
        worker=worker.index if worker is not None else None,
        shared_state=state,
    )
    await server.open_listeners()  # a bind error surfaces here, not in a group
    admin_server: AdminServer | None = None
    if metrics is not None:
        metrics.bind_active(lambda: server.active_sessions)
        if state is not None:
            metrics.bind_shared_state(lambda: bool(getattr(state, "healthy", True)))
        metrics.watch_audit(audit)
        if admin is not None:
            readiness = Readiness(
                listeners_up=lambda: server.accepting,
                upstream=(settings.upstream.host, settings.upstream.port),
                audit_healthy=lambda: audit.healthy,
                connect=probe_connector(settings),
                shared_state_healthy=(
                    None if state is None else lambda: bool(getattr(state, "healthy", True))
                ),
            )
            admin_server = AdminServer(metrics, readiness, sessions=server)
            bound = await admin_server.open(admin)  # likewise a plain OSError
            for host, port in bound:
                audit.event("admin.listening", address=str(Endpoint(host, port)))
    if after_bind is not None:
        after_bind()  # e.g. drop root once ports 110/995 are bound
    try:
        with trio.open_signal_receiver(*HANDLED_SIGNALS) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_on_signals, signals, server, audit)
                if state is not None:
                    await nursery.start(state.run)  # the leases' heartbeat
                if admin_server is not None:
                    await nursery.start(admin_server.run)

                async def run_server(task_status: trio.TaskStatus[ProxyServer]) -> None:
                    await server.run(task_status=task_status)
                    nursery.cancel_scope.cancel()

                await nursery.start(run_server)
                task_status.started(server)
                if worker is not None:
                    # The supervisor's admin listener asks this one about sessions.
                    worker.ready(admin_server.bound[0] if admin_server is not None else None)
                    nursery.start_soon(worker.watch_parent, server.request_shutdown, audit)
    finally:
        if state is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_WAIT):
                await state.aclose()


def _open_shared_state(config: SharedStateConfig | None, audit: AuditLog) -> SharedState | None:
    """The store limits are counted in, from ``shared_state:`` (None: this process)."""
    if config is None:
        return None

    def on_event(name: str, fields: dict[str, object]) -> None:
        audit.warning(name, **fields)  # shared_state.unavailable / .recovered

    return open_shared_state(
        config.url,
        password_file=config.password_file,
        ca_file=config.ca_file,
        on_failure=config.on_failure,
        on_event=on_event,
        lease_seconds=config.lease_seconds,
        op_timeout=config.timeout_ms / 1000,
    )


def probe_connector(
    settings: ServerSettings,
) -> Callable[[str, int], Awaitable[trio.abc.Stream]] | None:
    """How /readyz reaches the upstream: with a PROXY "local" header where the
    upstream expects PROXY headers from popguard (send_proxy), so a server
    like Dovecot with haproxy = yes does not log every probe as broken."""
    versions = {spec.send_proxy for spec in settings.listeners} - {"none"}
    if not versions:
        return None
    header = build_v2_local() if "v2" in versions else V1_UNKNOWN

    async def connect(host: str, port: int) -> trio.abc.Stream:
        stream = await connect_tcp(host, port)
        await stream.send_all(header)
        return stream

    return connect


#: Reopen the audit file, reload policies and certificates.
RELOAD_SIGNALS = frozenset({signal.SIGHUP, signal.SIGUSR1})
#: Everything a serving process (or the workers' parent) handles.
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, *RELOAD_SIGNALS)


async def _on_signals(signals: AsyncIterator[int], server: ProxyServer, audit: AuditLog) -> None:
    count = 0
    async for signum in signals:
        audit.event("popguard.signal", signal=signal.Signals(signum).name)
        if signum in RELOAD_SIGNALS:
            audit.reopen()
            server.reload_policies()
            server.reload_tls()
            continue
        count += 1
        server.request_shutdown(immediate=count > 1)


def listener_specs(pairs: Sequence[tuple[str, str, int]]) -> tuple[ListenerSpec, ...]:
    return tuple(ListenerSpec(name, Endpoint(host, port)) for name, host, port in pairs)
