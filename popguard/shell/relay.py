"""The trio shell around one :class:`~popguard.core.session.ProxySession`.

It owns the two streams and does only I/O: two pumps (client to upstream,
upstream to client) feed bytes into the core and send whatever the core
produced.  Protocol decisions stay in the core.

Ordering: either pump can make the core produce bytes for either side (a
local ``-ERR`` for a bad line is produced while reading the client, yet it is
client output).  Each direction therefore has one lock, and output is taken
from the core only *while holding that lock* and sent before releasing it,
so bytes reach each peer in exactly the order the core produced them.

Backpressure: a pump awaits ``send_all`` before it reads again, so a peer
that does not read stops the other peer being read; the core's own buffers
hold at most one read's worth.  The client pump also stops reading while
the core reports ``wants_client_data`` false (too many pipelined commands).

Deletion safety: this module writes to the upstream only bytes that the core
produced from client input.  Every way out of :meth:`Relay.run` closes the
upstream socket without sending anything (RFC 1939 §6: no QUIT, so no
UPDATE, so nothing is deleted).
"""

from __future__ import annotations

import contextlib
import enum
import math
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import trio

from popguard.core.grammar import Status, parse_status
from popguard.core.records import AuditRecord, EndReason, Event
from popguard.core.session import ProxySession
from popguard.policy.session import Deadline, SessionPolicy
from popguard.retention import RetentionStore
from popguard.sharedstate import SharedState
from popguard.shell import shared
from popguard.shell.archive import SessionArchive
from popguard.shell.tcp import TCPStream
from popguard.shell.timers import SessionTimers
from popguard.shell.tls import HANDSHAKE_TIMEOUT, describe
from popguard.shell.tlssock import TLSSocketStream

#: One read from the upstream.  Large enough that bulk RETR costs few trips
#: through Python; the core forwards each read as one chunk.
RECEIVE_SIZE: Final = 256 * 1024

#: Reads in a row a pump may make without waiting before it lets other
#: sessions run (a peer that always has data must not starve the others).
FAIRNESS_READS: Final = 16

#: One read from the client: commands are small, and whatever a read holds
#: beyond the pipelining bound waits in the core's buffer, so this bounds
#: what a client that pipelines without reading costs (the longest line the
#: core holds, a SASL response, is 16 KiB).
CLIENT_RECEIVE_SIZE: Final = 32 * 1024

#: How long a closing session may spend delivering its last words (a final
#: +OK, or the -ERR saying why it closes) to a client that is not reading.
FINAL_FLUSH_TIMEOUT: Final = 2.0

#: Lingering close: how long, and how much, to drain from a client after
#: popguard's last reply and FIN, so that closing does not turn into an RST
#: that destroys that reply (the reason nginx has ``lingering_close``).
LINGER_TIMEOUT: Final = 1.0
LINGER_MAX_BYTES: Final = 1024 * 1024

#: The longest line popguard reads from the upstream before TLS (greeting,
#: the reply to STLS): RFC 1939 says 512, legacy servers say more.
MAX_PRE_TLS_LINE: Final = 4096


@dataclass(frozen=True, slots=True)
class UpstreamSecurity:
    """How to secure the upstream connection."""

    mode: str  # "implicit" or "starttls"
    context: ssl.SSLContext
    server_name: str


class UpstreamTLSError(Exception):
    """The upstream's TLS could not be set up; the session gets SYS/TEMP."""


class _GreetingTimeout(Exception):
    """The upstream sent no greeting (before STLS) within ``greeting_timeout``."""


RecordSink = Callable[[AuditRecord], None]
#: Writes a record and reports whether it is durably stored (fail-closed).
DurableSink = Callable[[AuditRecord], Awaitable[bool]]
Connector = Callable[[], Awaitable[trio.abc.Stream]]

_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class _Blocked(enum.Enum):
    """A socket read that would block (see ``Relay._read_socket``)."""

    BLOCKED = enum.auto()


_BLOCKED: Final = _Blocked.BLOCKED

#: What a pump's wait for input raises when the connection is gone.
_WAIT_ERRORS = (trio.ClosedResourceError, trio.BrokenResourceError)


def _source(
    stream: trio.abc.Stream | None, tcp: TCPStream | None
) -> socket.socket | TLSSocketStream | None:
    """What a pump reads without entering trio (``Relay._read_socket``): the
    plain TCP socket, or the TLS connection (a :class:`TLSSocketStream`
    returns every record the kernel already holds as one chunk, so one
    network read costs one pass through the core and one write); None for
    a stream read through trio (trio's TLS, a test's stream, or bytes a
    PROXY header read left over)."""
    if tcp is not None:
        return None if tcp.pushback else tcp.socket
    return stream if isinstance(stream, TLSSocketStream) else None


def set_nodelay(stream: trio.abc.Stream) -> None:
    """Turn Nagle off: a POP3 reply is one write and must leave at once.

    Proxies that leave Nagle on stall about 40 ms on every multi-packet
    reply against a delayed-ACK client (measured on nginx 1.22 and
    perdition 2.2).  trio already sets TCP_NODELAY on its SocketStreams;
    this makes the guarantee explicit and visible to a test.
    """
    if isinstance(stream, trio.SocketStream | TCPStream):
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)


class Relay:
    """Runs one session: connect upstream, pump bytes, close without QUIT."""

    # Slots: a session's two objects are most of what an idle session
    # costs (an instance dict of ~55 attributes is ~1.6 kB each).
    __slots__ = (
        "_abort_detail",
        "_abort_reason",
        "_archive",
        "_before_login",
        "_claiming",
        "_client_drained",
        "_client_may_send",
        "_client_run",
        "_client_scope",
        "_client_sending",
        "_client_tcp",
        "_client_tls",
        "_client_waiting",
        "_connect_timeout",
        "_connect_upstream",
        "_connected_at",
        "_dry_reported",
        "_emit",
        "_emit_durable",
        "_greeting_timeout",
        "_idle_timeout",
        "_implicit_tls",
        "_last_activity",
        "_login_timeout",
        "_own_timers",
        "_policy_epoch",
        "_proxy_header",
        "_pump_nursery",
        "_pumps_left",
        "_retaining",
        "_retention",
        "_scope",
        "_session_id",
        "_settling",
        "_shared",
        "_started_at",
        "_timed",
        "_timers",
        "_upstream_drained",
        "_upstream_label",
        "_upstream_run",
        "_upstream_scope",
        "_upstream_sending",
        "_upstream_tcp",
        "_upstream_tls",
        "_upstream_waiting",
        "client",
        "policy",
        "session",
        "timer_at",
        "upstream",
    )

    def __init__(
        self,
        session: ProxySession,
        client: trio.abc.Stream,
        *,
        connect_upstream: Connector,
        upstream_label: str,
        connect_timeout: float,
        idle_timeout: float,
        login_timeout: float = 0.0,
        greeting_timeout: float = 0.0,
        emit: RecordSink,
        emit_durable: DurableSink | None = None,
        policy: SessionPolicy | None = None,
        client_tls: ssl.SSLContext | None = None,
        implicit_tls: bool = False,
        upstream_tls: UpstreamSecurity | None = None,
        proxy_header: bytes | None = None,
        timers: SessionTimers | None = None,
        retention: RetentionStore | None = None,
        shared_state: SharedState | None = None,
        session_id: str = "",
    ) -> None:
        self.session = session
        #: The store that counts sessions and failed logins across processes
        #: (popguard.shell.shared), and this session's id in it.
        self._shared = shared_state
        self._session_id = session_id
        self._claiming = False
        #: The copies this session makes under a ``retain`` policy (made on
        #: first use; without a store every DELE under retain is refused).
        self._retention = retention
        self._archive: SessionArchive | None = None
        self._retaining = False
        self.policy = policy
        #: The context for the client's TLS: POP3S (``implicit_tls``) or STLS.
        self._client_tls = client_tls
        self._implicit_tls = implicit_tls
        self._upstream_tls = upstream_tls
        #: Sent to the upstream before anything else (HAProxy's PROXY protocol).
        self._proxy_header = proxy_header
        self.client = client
        self.upstream: trio.abc.Stream | None = None
        self._connect_upstream = connect_upstream
        self._upstream_label = upstream_label
        self._connect_timeout = connect_timeout
        self._idle_timeout = idle_timeout
        #: Seconds from the client's connection to a successful login (0: no limit).
        self._login_timeout = login_timeout
        #: Seconds from the upstream's TCP connection to its greeting (0: no limit).
        self._greeting_timeout = greeting_timeout
        #: While the login timer runs: a login must re-read the timers.
        self._before_login = login_timeout > 0
        self._connected_at = 0.0
        self._emit = emit
        self._emit_durable = emit_durable
        self._settling = False
        self._scope = trio.CancelScope()
        self._abort_reason: EndReason | None = None
        self._abort_detail: str | None = None
        #: Whether a task is draining the core's output for that side.
        self._client_sending = False
        self._upstream_sending = False
        self._last_activity = 0.0
        #: Set when the core wants the client's input again (made when the
        #: client pump waits for it; None before: an idle session keeps none).
        self._client_may_send: trio.Event | None = None
        #: Each pump's cancel scope, and whether the pump is parked in a wait
        #: for input: only such a wait is ever cancelled (see _stop_receiving).
        self._client_scope = trio.CancelScope()
        self._upstream_scope = trio.CancelScope()
        self._client_waiting = False
        self._upstream_waiting = False
        #: Reads in a row that found data without waiting (fairness).
        self._client_run = 0
        self._upstream_run = 0
        #: The last read of that plain socket was short: the kernel had no
        #: more, so the next read waits first instead of failing (a recv that
        #: raises BlockingIOError costs a system call and an exception).
        self._client_drained = False
        self._upstream_drained = False
        #: The plain TCP connections, read directly on the hot path.
        self._client_tcp = client if isinstance(client, TCPStream) else None
        self._upstream_tcp: TCPStream | None = None
        self._started_at = 0.0
        #: The timer service (the server's; else one of this relay's own),
        #: and the deadline it will look at this session (its bookkeeping).
        self._own_timers = timers is None
        self._timers = SessionTimers() if timers is None else timers
        self.timer_at: float | None = None
        self._timed = False
        #: The pumps still running, and their nursery (see _pump_finished).
        self._pumps_left = 2
        self._pump_nursery: trio.Nursery | None = None
        self._policy_epoch = 0
        #: Dry-run timers already reported (each once per session; made on
        #: first use, as most sessions report none).
        self._dry_reported: set[str] | None = None

    # ------------------------------------------------------------------
    def abort(self, reason: EndReason, detail: str | None = None) -> None:
        """End the session from outside (shutdown, a timer), without QUIT upstream."""
        if self._abort_reason is None:
            self._abort_reason = reason
            self._abort_detail = detail
        self._scope.cancel()

    def _touch(self) -> None:
        """Activity: the idle timer (RFC 1939 §3 autologout) starts again.

        Only a timestamp is written here, on the hot path; the timer service
        task compares it with the clock when its own sleep ends.
        """
        self._last_activity = trio.current_time()

    @property
    def started_at(self) -> float:
        """When the session task started, on trio's clock (0 before it runs)."""
        return self._started_at

    @property
    def last_activity(self) -> float:
        """The idle timer's last activity, on trio's clock: read, never kept
        up to date for anyone else (the live sessions list, ``idle for``)."""
        return self._last_activity

    def rearm(self) -> None:
        """Re-read the session's timers now (the policy may have changed)."""
        if self._timed:
            self._arm()

    def _deadlines(self) -> list[Deadline]:
        """When each timer fires: (time, setting, the policy rule or None).

        Before the upstream's greeting, ``greeting_timeout`` (from the TCP
        connection); before a login, ``login_timeout`` (from the client's
        connection).  On a tie these come first: they say more than idle.
        """
        session = self.session
        timers: list[Deadline] = []
        if self._greeting_timeout and session.awaiting_greeting:
            timers.append((self._connected_at + self._greeting_timeout, "greeting_timeout", None))
        if self._login_timeout and not session.logged_in:
            timers.append((self._started_at + self._login_timeout, "login_timeout", None))
        idle: Deadline = (self._last_activity + self._idle_timeout, "idle_timeout", None)
        policy = self.policy
        if policy is None or not policy.active:
            timers.append(idle)
        else:
            timers += policy.deadlines(
                idle, self._last_activity, self._started_at, skip_dry_run=self._dry_reported or ()
            )
        return timers

    def _timer_end(self, name: str) -> tuple[EndReason, str | None]:
        """How a server-wide timer (``rule`` None) or an enforced one ends the session."""
        if name == "login_timeout":
            return EndReason.LOGIN_TIMEOUT, f"no login within {self._login_timeout:g} s"
        if name == "greeting_timeout":
            return (
                EndReason.UPSTREAM_TIMEOUT,
                f"no greeting from the upstream within {self._greeting_timeout:g} s",
            )
        if name == "max_session":
            return EndReason.MAX_SESSION, None
        return EndReason.IDLE_TIMEOUT, None

    def _arm(self) -> None:
        """Have the timer service look at this session at its next deadline."""
        self._timers.schedule(self, min(timer[0] for timer in self._deadlines()))

    def timer_due(self) -> float | None:
        """The timer service's call at the scheduled time (see popguard.shell.timers).

        Fires what is due: the idle timer (RFC 1939 §3 autologout), the
        greeting and login limits, a policy's ``idle_timeout`` and
        ``max_session`` (an enforced rule ends the session; a dry-run one is
        recorded once).  Returns when to look again, or None once the
        session is ending.
        """
        while True:
            when, name, rule = min(self._deadlines(), key=lambda timer: timer[0])
            if trio.current_time() < when:
                return when  # there was activity meanwhile, or nothing is due yet
            if rule is not None:
                event = Event.POLICY_DENIED if rule.mode == "enforce" else Event.POLICY_DRY_RUN
                self._emit(
                    AuditRecord(
                        event,
                        {
                            "rule": rule.name,
                            "policy_file": rule.where,
                            "setting": name,
                            "mode": rule.mode,
                            "reason": f"{name} reached",
                            "user": self.session.user,
                        },
                    )
                )
                if rule.mode != "enforce":
                    if self._dry_reported is None:
                        self._dry_reported = set()
                    self._dry_reported.add(name)
                    continue
            self.abort(*self._timer_end(name))
            return None

    # ------------------------------------------------------------------
    async def run(self) -> None:
        session = self.session
        self._started_at = trio.current_time()
        set_nodelay(self.client)
        self._emit_records()
        try:
            with self._scope:
                self._touch()
                if self._implicit_tls and not await self._client_handshake(stls=False):
                    pass  # the session has ended; nothing was sent upstream
                elif await self._connect():
                    # One nursery, and the upstream pump in this task: each
                    # task and nursery fewer is ~2 kB less per idle session.
                    # The timers are the server's task's (a relay on its own
                    # runs a service of its own here, ended with the pumps).
                    async with trio.open_nursery() as nursery:
                        self._pump_nursery = nursery
                        if self._own_timers:
                            nursery.start_soon(self._timers.run)
                        self._timed = True
                        self._arm()
                        nursery.start_soon(self._pump_client)
                        await self._pump_upstream()
                    self._pump_nursery = None
            if self._scope.cancelled_caught and not session.finished:
                session.end(self._abort_reason or EndReason.IDLE_TIMEOUT, self._abort_detail)
        except Exception as exc:  # a bug must end this session only, never the server
            session.end(EndReason.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
            raise
        finally:
            self._timed = False
            self._timers.cancel(self)
            if self._archive is not None:
                self._archive.close()  # copies no DELE needed are not kept
            await self._close()

    async def _connect(self) -> bool:
        """Connect (``connect_timeout``), and set up the upstream's TLS if any.

        The greeting is awaited for ``greeting_timeout`` from the TCP
        connection: here before STLS, else by the timer service while the pumps run.
        """
        session = self.session
        greeting = b""
        upstream: trio.abc.Stream | None = None
        try:
            with trio.fail_after(self._connect_timeout):
                upstream = await self._connect_upstream()
                set_nodelay(upstream)
                if self._proxy_header is not None:
                    await upstream.send_all(self._proxy_header)
            self._connected_at = trio.current_time()
            if self._upstream_tls is not None:
                upstream, greeting = await self._secure_upstream(upstream, self._upstream_tls)
        except _GreetingTimeout as exc:
            assert upstream is not None
            await trio.aclose_forcefully(upstream)  # nothing was sent: no QUIT
            session.upstream_connected(self._upstream_label)  # TCP was up
            session.end(EndReason.UPSTREAM_TIMEOUT, str(exc))
            return False
        except (trio.TooSlowError, OSError, UpstreamTLSError, trio.BrokenResourceError) as exc:
            if upstream is not None:
                await trio.aclose_forcefully(upstream)
            if isinstance(exc, trio.TooSlowError):
                error = "connect timed out"
            elif isinstance(exc, OSError):
                error = exc.strerror or str(exc)
            else:
                error = str(exc) or type(exc).__name__
            session.upstream_failed(self._upstream_label, error)
            return False
        self.upstream = upstream
        if isinstance(upstream, TCPStream):
            self._upstream_tcp = upstream
        session.upstream_connected(self._upstream_label)
        if isinstance(upstream, TLSSocketStream | trio.SSLStream):
            assert self._upstream_tls is not None
            stls = self._upstream_tls.mode == "starttls"
            session.tls_established("upstream", stls=stls, **describe(upstream))
        if greeting:
            session.receive_server(greeting)  # read before STLS; relayed unchanged
        # The greeting read before STLS goes to the client now, and commands
        # the client sent before the upstream answered may be waiting.
        await self._flush_both()
        return True

    async def _pump_client(self) -> None:
        """Client to core.  One cancel scope for the pump, entered again only
        after :meth:`_interrupt_client` woke it from a wait for input."""
        session = self.session
        try:
            while not session.finished:
                scope = self._client_scope = trio.CancelScope()
                with scope:
                    await self._client_loop()
                if not scope.cancelled_caught:
                    break
                if session.starttls_pending and not session.finished:
                    # An STLS that was held (behind a login) was answered from
                    # the upstream pump: the handshake is this task's to do.
                    if not await self._client_handshake(stls=True):
                        break
                    continue
                break  # woken to stop: the session is over
            if session.finished:
                self._stop_receiving()
            # Else the client half-closed, or sent QUIT: the replies it is
            # owed still flow, and the upstream pump finishes the session.
        finally:
            self._pump_finished()

    async def _client_loop(self) -> None:
        session = self.session
        while not session.finished:
            if session.starttls_pending:
                # Answered while this pump was busy: no interrupt was needed.
                if not await self._client_handshake(stls=True):
                    return
                continue
            if session.wants_client_data:
                tcp = self._client_tcp
                source = _source(self.client, tcp)
                data: bytes | _Blocked | None
                if source is None:
                    data = await self._receive_client_stream(tcp)
                else:
                    data = self._read_socket(source, client=True)
                    if data is _BLOCKED:
                        # The wait is made here, not in a helper coroutine, and
                        # holds no chunk: an idle session keeps one frame less.
                        self._client_waiting = True
                        try:
                            if isinstance(source, socket.socket):
                                await trio.lowlevel.wait_readable(source)
                            else:
                                await source.wait_receivable()
                        except _WAIT_ERRORS as exc:
                            session.end(EndReason.CLIENT_ERROR, _describe(exc))
                            return
                        finally:
                            self._client_waiting = False
                        continue
                    if self._client_run >= FAIRNESS_READS:
                        self._client_run = 0
                        await trio.lowlevel.checkpoint()  # never starve other sessions
            elif session.client_input_open:
                self._client_may_send = event = trio.Event()
                self._client_waiting = True
                try:
                    await event.wait()
                finally:
                    self._client_waiting = False
                continue
            else:
                return  # QUIT sent: the upstream pump finishes the session
            if data is None:
                return
            if not data:
                session.client_eof()
                if not session.finished:
                    self._emit_records()
                return  # half-closed: owed replies still flow
            self._touch()
            session.receive_client(data)
            await self._flush_both()

    def _read_socket(
        self, source: socket.socket | TLSSocketStream, *, client: bool
    ) -> bytes | _Blocked | None:
        """One read from a pump's plain TCP socket (``recv``) or TLS
        connection (``receive_nowait``), without entering trio.

        Returns the bytes (b"" at EOF), ``_BLOCKED`` when there is nothing
        to read (the caller waits, then calls again), or None when the read
        failed and the session has ended.  Every trio stream call is a
        scheduler pass even when the data is already there, so the socket
        is read directly, as bench/floor.py does.
        """
        size = CLIENT_RECEIVE_SIZE if client else RECEIVE_SIZE
        try:
            # socket.socket, not the TLS class, first: an isinstance check
            # against a trio stream (an ABC) is a Python-level call.
            if not isinstance(source, socket.socket):
                data = source.receive_nowait(size)
            elif client and self._client_drained:
                self._client_drained = False
                data = None  # wait first (the wait ends at once if data came)
            elif not client and self._upstream_drained:
                self._upstream_drained = False
                data = None
            else:
                data = source.recv(size)
                if len(data) < size:
                    if client:
                        self._client_drained = True
                    else:
                        self._upstream_drained = True
        except BlockingIOError:
            data = None
        except _STREAM_ERRORS as exc:
            reason = EndReason.CLIENT_ERROR if client else EndReason.UPSTREAM_ERROR
            self.session.end(reason, _describe(exc))
            return None
        if data is None:
            if client:
                self._client_run = 0
            else:
                self._upstream_run = 0
            return _BLOCKED
        if client:
            self._client_run += 1
        else:
            self._upstream_run += 1
        return data

    async def _receive_client_stream(self, tcp: TCPStream | None) -> bytes | None:
        """One read from trio's TLS or a test's client stream, or what a TCP
        connection's PROXY header read left over (b"" at EOF; None: the
        session ended)."""
        if tcp is not None:
            return tcp.take_pushback(CLIENT_RECEIVE_SIZE)
        self._client_waiting = True
        try:
            data = await self.client.receive_some(CLIENT_RECEIVE_SIZE)
        except _STREAM_ERRORS as exc:
            self.session.end(EndReason.CLIENT_ERROR, _describe(exc))
            return None
        finally:
            self._client_waiting = False
        return bytes(data) if isinstance(data, bytearray) else data

    async def _client_handshake(self, *, stls: bool) -> bool:
        """TLS with the client: POP3S at connect, or after popguard's +OK to STLS.

        Nothing else writes to the client meanwhile.  On failure the session
        ends (before any upstream connection for POP3S).
        """
        session = self.session
        context = self._client_tls
        assert context is not None
        client = self.client
        tls: TLSSocketStream | trio.SSLStream[trio.abc.Stream] | None = None
        self._client_sending = True
        try:
            # OpenSSL reads the ClientHello from the kernel socket itself: for
            # STLS, plaintext the core already read (and discarded) is never
            # fed to TLS.  Bytes given back with TCPStream.unread (none from
            # the server: it peeks PROXY headers) need trio's memory-BIO
            # stream, as does a stream that is not TCP.
            if isinstance(client, TCPStream) and not client.pushback:
                tls = TLSSocketStream.wrap(client, context, server_side=True)
            else:
                tls = trio.SSLStream(client, context, server_side=True)
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                await tls.do_handshake()
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            cause = exc.__cause__ or exc
            detail = "timed out" if isinstance(exc, trio.TooSlowError) else str(cause)
            session.end(EndReason.CLIENT_ERROR, f"TLS handshake failed: {detail}"[:200])
            if isinstance(tls, TLSSocketStream):
                self.client = tls.detach_tcp()  # closed as plain TCP (lingering)
            self._emit_records()
            return False
        finally:
            self._client_sending = False
        self.client = tls
        self._client_tcp = None
        if stls:
            session.tls_started(**describe(tls))
        else:
            session.tls_established("client", stls=False, **describe(tls))
        self._emit_records()
        return True

    async def _secure_upstream(
        self, stream: trio.abc.Stream, security: UpstreamSecurity
    ) -> tuple[TLSSocketStream | trio.SSLStream[trio.abc.Stream], bytes]:
        """Implicit TLS, or STLS after the greeting (which is kept for the client).

        The greeting gets ``greeting_timeout`` from the TCP connection; the
        STLS exchange and the handshake then get ``HANDSHAKE_TIMEOUT`` together.
        """
        greeting = b""
        if security.mode == "starttls":
            greeting, rest = await self._read_greeting(stream)
            if rest:
                raise UpstreamTLSError("upstream sent data after its greeting, before STLS")
            if parse_status(greeting) is not Status.OK:
                # popguard was told to encrypt: it never goes on in plaintext.
                raise UpstreamTLSError("upstream greeting was not +OK")
        deadline = trio.current_time() + HANDSHAKE_TIMEOUT
        if security.mode == "starttls":
            with trio.move_on_at(deadline) as exchange:
                await stream.send_all(b"STLS\r\n")
                reply, rest = await _read_line(stream, b"")
                if rest:
                    # Bytes injected before the handshake must never reach anyone.
                    raise UpstreamTLSError("upstream sent data after +OK to STLS, before TLS")
                if parse_status(reply) is not Status.OK:
                    raise UpstreamTLSError(
                        "upstream refused STLS: " + reply[:80].decode("ascii", "replace").strip()
                    )
            if exchange.cancelled_caught:
                raise UpstreamTLSError(f"no reply to STLS within {HANDSHAKE_TIMEOUT:g} s")
        tls: TLSSocketStream | trio.SSLStream[trio.abc.Stream] | None = None
        try:
            if isinstance(stream, TCPStream) and not stream.pushback:
                name = security.server_name
                tls = TLSSocketStream.wrap(
                    stream, security.context, server_side=False, server_hostname=name
                )
            else:
                tls = trio.SSLStream(stream, security.context, server_hostname=security.server_name)
            with trio.fail_at(deadline):
                await tls.do_handshake()
        except trio.BrokenResourceError as exc:
            if isinstance(tls, TLSSocketStream):
                tls.close_now()  # it owns the connection now
            raise UpstreamTLSError(f"TLS handshake failed: {exc.__cause__ or exc}"[:200]) from exc
        except trio.TooSlowError as exc:
            if isinstance(tls, TLSSocketStream):
                tls.close_now()
            raise UpstreamTLSError("TLS handshake timed out") from exc
        return tls, greeting

    async def _read_greeting(self, stream: trio.abc.Stream) -> tuple[bytes, bytes]:
        """The greeting line before STLS, within ``greeting_timeout`` of the connection."""
        timeout = self._greeting_timeout
        deadline = self._connected_at + timeout if timeout else math.inf
        with trio.move_on_at(deadline):
            return await _read_line(stream, b"")
        raise _GreetingTimeout(f"no greeting from the upstream within {timeout:g} s")

    async def _pump_upstream(self) -> None:
        """Upstream to core; see :meth:`_pump_client` and :meth:`_client_loop`."""
        session = self.session
        scope = self._upstream_scope = trio.CancelScope()
        try:
            with scope:
                while not session.finished:
                    source = _source(self.upstream, self._upstream_tcp)
                    data: bytes | _Blocked | None
                    if source is None:
                        data = await self._receive_upstream_stream()
                    else:
                        data = self._read_socket(source, client=False)
                        if data is _BLOCKED:
                            # Waited for here, as in _client_loop: a helper
                            # coroutine would be a frame more per idle session.
                            self._upstream_waiting = True
                            try:
                                if isinstance(source, socket.socket):
                                    await trio.lowlevel.wait_readable(source)
                                else:
                                    await source.wait_receivable()
                            except _WAIT_ERRORS as exc:
                                session.end(EndReason.UPSTREAM_ERROR, _describe(exc))
                                break
                            finally:
                                self._upstream_waiting = False
                            continue
                        if self._upstream_run >= FAIRNESS_READS:
                            self._upstream_run = 0
                            await trio.lowlevel.checkpoint()  # never starve other sessions
                    if data is None:
                        break
                    if not data:
                        session.server_eof()
                        break
                    session.receive_server(data)
                    await self._flush_both()
                    if session.starttls_pending:
                        self._interrupt_client()  # the client pump does the handshake
                    elif session.wants_client_data and self._client_may_send is not None:
                        self._client_may_send.set()
            self._stop_receiving()
        finally:
            self._pump_finished()

    def _pump_finished(self) -> None:
        """The last pump to end ends the nursery (and a relay's own timer task)."""
        self._pumps_left -= 1
        if self._pumps_left == 0 and self._pump_nursery is not None:
            self._pump_nursery.cancel_scope.cancel()

    async def _receive_upstream_stream(self) -> bytes | None:
        """One read from trio's TLS or a test's upstream stream."""
        upstream = self.upstream
        assert upstream is not None
        self._upstream_waiting = True
        try:
            data = await upstream.receive_some(RECEIVE_SIZE)
        except _STREAM_ERRORS as exc:
            self.session.end(EndReason.UPSTREAM_ERROR, _describe(exc))
            return None
        finally:
            self._upstream_waiting = False
        return bytes(data) if isinstance(data, bytearray) else data

    def _interrupt_client(self) -> None:
        """Wake the client pump from its wait for input (never from a send)."""
        if self._client_waiting:
            self._client_scope.cancel()

    def _stop_receiving(self) -> None:
        """Wake both pumps from their waits for input, once the session has ended.

        Only waits for input are cancelled that way, never a send in
        progress: the last reply (QUIT's +OK) must reach the client whole.
        A pump that is sending sees the session finished when it is done.
        """
        self._interrupt_client()
        if self._upstream_waiting:
            self._upstream_scope.cancel()

    async def _flush_both(self) -> None:
        """Send what the core produced, in order, to each side.

        Each step is entered only when there is something for it: this runs
        after every read, and a coroutine that has nothing to do still costs.
        """
        session = self.session
        if session.policy_epoch != self._policy_epoch:
            self._policy_epoch = session.policy_epoch
            self.rearm()  # logged in: the user's timers apply from now
        if self._before_login and session.logged_in:
            self._before_login = False
            self.rearm()  # the login timer no longer applies
        if session.pending_claim is not None:
            await self._settle_claim()
        policy = self.policy
        if policy is not None and policy.has_failures:
            await self._record_failures(policy)
        if session.has_archive_events:
            self._write_archive()
        if session.pending_retention is not None:
            await self._settle_retention()
        if session.pending_durable is not None:
            await self._settle_durable()
        if session.has_records:
            # Queued before the client hears of it: a worker killed between
            # the two has its record in the queue, not only the +OK sent.
            self._emit_records()
        if session.has_client_output:
            await self._flush_client()
        if session.has_upstream_output:
            await self._flush_upstream()
        if session.has_records:
            self._emit_records()  # what sending produced (an error ending the session)

    async def _settle_claim(self) -> None:
        """The core named an account: ask the shared state whether it may log in."""
        if self._claiming:
            return  # the task already asking will see any new request
        session = self.session
        policy = self.policy
        shared_state = self._shared
        self._claiming = True
        try:
            while (account := session.pending_claim) is not None:
                verdict = None
                if policy is not None and shared_state is not None:
                    verdict = await shared.check_claim(
                        policy, shared_state, self._session_id, account
                    )
                session.claim_result(verdict)
        finally:
            self._claiming = False

    async def _record_failures(self, policy: SessionPolicy) -> None:
        """Count failed logins in the shared state; record the blocks they start."""
        if self._shared is None:
            policy.take_failures()
            return
        started = await shared.record_failures(policy, self._shared, self._session_id)
        for label, seconds, rule in started:
            self._emit(
                AuditRecord(
                    Event.POLICY_LOGIN_BLOCKED,
                    {
                        "key": label,
                        "seconds": round(seconds),
                        "rule": rule.name if rule else None,
                        "policy_file": rule.where if rule else None,
                        "mode": rule.mode if rule else None,
                        "user": self.session.user,
                    },
                )
            )

    def _write_archive(self) -> None:
        """Hand the core's archive events to this session's copies."""
        events = self.session.take_archive_events()
        store = self._retention
        if store is None:
            return  # nowhere to copy to: the DELE's gate says so
        archive = self._archive
        if archive is None:
            archive = self._archive = SessionArchive(store)
        archive.apply(events)

    async def _settle_retention(self) -> None:
        """A DELE waits at the gate: make its message's copy durable first."""
        if self._retaining:
            return  # the task already settling will see any new request
        session = self.session
        self._retaining = True
        try:
            while (gate := session.pending_retention) is not None:
                self._emit_records()  # everything before it, in order
                archive = self._archive
                if archive is None:
                    if self._retention is None:
                        reason = "no retention store is configured"
                    else:
                        reason = "no copy of the message was made"
                    session.retention_result(False, reason=reason)
                    continue
                result = await archive.commit(gate)
                session.retention_result(
                    result.ok, path=result.path, stored=result.stored, reason=result.reason
                )
        finally:
            self._retaining = False

    async def _settle_durable(self) -> None:
        """Write the records the core wants durable before it goes on."""
        if self._settling:
            return  # the task already settling will see any new request
        session = self.session
        self._settling = True
        try:
            while (record := session.pending_durable) is not None:
                self._emit_records()  # everything before it, in order
                if self._emit_durable is None:
                    self._emit(record)
                    ok = True
                else:
                    ok = await self._emit_durable(record)
                session.durable_result(ok)
        finally:
            self._settling = False

    async def _flush_client(self) -> None:
        """Send the core's client output.

        Both pumps can make output for either side.  Whichever task finds
        no one sending becomes the sender and drains the core's buffer until
        it is empty, so bytes leave in the order the core produced them; a
        task that finds a sender busy leaves its bytes to it.  (A trio.Lock
        would do the same with two extra scheduling points per reply.)
        """
        if self._client_sending:
            return
        session = self.session
        self._client_sending = True
        try:
            while chunks := session.take_client_chunks():
                try:
                    await _send_chunks(self.client, self._client_tcp, chunks)
                except _STREAM_ERRORS as exc:
                    session.end(EndReason.CLIENT_ERROR, _describe(exc))
                    return
                self._touch()
        finally:
            self._client_sending = False

    async def _flush_upstream(self) -> None:
        """Send the core's upstream output; see :meth:`_flush_client`."""
        upstream = self.upstream
        if upstream is None or self._upstream_sending:
            return  # not connected yet (the core keeps the bytes), or busy
        session = self.session
        self._upstream_sending = True
        try:
            while data := session.take_upstream_output():
                try:
                    await _send(upstream, self._upstream_tcp, data)
                except _STREAM_ERRORS as exc:
                    session.end(EndReason.UPSTREAM_ERROR, _describe(exc))
                    return
        finally:
            self._upstream_sending = False

    async def _close(self) -> None:
        """Last words to the client, then close both sides.  Never a QUIT."""
        session = self.session
        if not session.finished:
            session.end(self._abort_reason or EndReason.CLIENT_ERROR, "session task ended")
        with trio.CancelScope(shield=True):
            data = session.take_client_output()
            if data:  # (most sessions have said everything: no scope then)
                with trio.move_on_after(FINAL_FLUSH_TIMEOUT):
                    # If the client is gone, the close record already says why.
                    with contextlib.suppress(*_STREAM_ERRORS):
                        await self.client.send_all(data)
            # Anything the core still held for the server is dropped with the
            # connection: the session is over (and the core never queues QUIT).
            session.take_upstream_output()
            if isinstance(self.upstream, TCPStream | TLSSocketStream):
                self.upstream.close_now()
            elif self.upstream is not None:
                await trio.aclose_forcefully(self.upstream)
            await self._lingering_close()
        self._emit_records()

    async def _lingering_close(self) -> None:
        """Close the client so that our last reply is not lost.

        Closing a socket with unread input makes the kernel send RST, and a
        client that receives RST may discard the final ``-ERR`` that was
        already on its way.  So, like nginx's lingering close: send FIN,
        read and discard what the client still sends, briefly, then close.
        """
        client = self.client
        deadline = trio.current_time() + LINGER_TIMEOUT
        if isinstance(client, TLSSocketStream):
            # TLS ends with close_notify (RFC 8446 §6.1), so the client can
            # tell our close from a truncation.  Then the TCP connection is
            # closed as below: what the client still sends is read, not
            # decrypted, and discarded.
            with trio.move_on_at(deadline):
                with contextlib.suppress(*_STREAM_ERRORS, trio.BusyResourceError):
                    await client.send_eof()
            client = client.detach_tcp()
        if isinstance(client, trio.SSLStream):
            # trio's TLS (over a stream that is not TCP): close_notify, then close.
            with trio.move_on_after(LINGER_TIMEOUT):
                try:
                    await client.aclose()
                    return
                except (*_STREAM_ERRORS, trio.BusyResourceError):
                    pass
            await trio.aclose_forcefully(client)
            return
        if isinstance(client, trio.abc.HalfCloseableStream):
            with trio.move_on_at(deadline):
                try:
                    await client.send_eof()
                    discarded = 0
                    while discarded < LINGER_MAX_BYTES:
                        data = await client.receive_some(RECEIVE_SIZE)
                        if not data:
                            break
                        discarded += len(data)
                except (*_STREAM_ERRORS, trio.BusyResourceError):
                    pass
        if isinstance(client, TCPStream):
            client.close_now()
        else:
            await trio.aclose_forcefully(client)

    def _emit_records(self) -> None:
        for record in self.session.take_records():
            if record.event is Event.SESSION_CLOSED:
                duration = trio.current_time() - self._started_at
                fields = dict(record.fields)
                fields["duration_ms"] = math.floor(duration * 1000)
                record = AuditRecord(record.event, fields)
            self._emit(record)


#: Chunks gathered into one sendmsg (well under IOV_MAX, 1024 on Linux).
_MAX_GATHER: Final = 64


async def _send_chunks(stream: trio.abc.Stream, tcp: TCPStream | None, chunks: list[bytes]) -> None:
    """Send ``chunks`` in order, gathered into one write on a plain socket
    (no copy of a large reply into its status line's buffer)."""
    if len(chunks) == 1 or tcp is None or len(chunks) > _MAX_GATHER:
        await _send(stream, tcp, chunks[0] if len(chunks) == 1 else b"".join(chunks))
        return
    try:
        sent = tcp.socket.sendmsg(chunks)
    except BlockingIOError:
        sent = 0
    total = sum(map(len, chunks))
    if sent < total:
        await tcp.send_all(memoryview(b"".join(chunks))[sent:])


async def _send(stream: trio.abc.Stream, tcp: TCPStream | None, data: bytes) -> None:
    """Send all of ``data``: straight to a plain TCP socket, entering trio
    only when the kernel will not take it all at once."""
    if tcp is None:
        await stream.send_all(data)
        return
    try:
        sent = tcp.socket.send(data)
    except BlockingIOError:
        sent = 0
    if sent < len(data):
        await tcp.send_all(memoryview(data)[sent:])


async def _read_line(stream: trio.abc.Stream, buffered: bytes) -> tuple[bytes, bytes]:
    """One line (with its CRLF), and whatever came after it in the same reads."""
    data = buffered
    while (end := data.find(b"\n")) == -1:
        if len(data) > MAX_PRE_TLS_LINE:
            raise UpstreamTLSError(f"upstream line longer than {MAX_PRE_TLS_LINE} octets")
        chunk = await stream.receive_some(MAX_PRE_TLS_LINE)
        if not chunk:
            raise UpstreamTLSError("upstream closed the connection before TLS")
        data += chunk
    return data[: end + 1], data[end + 1 :]


def _describe(exc: BaseException) -> str:
    cause = exc.__cause__ or exc
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return type(cause).__name__
