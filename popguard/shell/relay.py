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
import math
import socket
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from popguard.core.records import AuditRecord, EndReason, Event
from popguard.core.session import ProxySession

#: One read from either peer.  Large enough that bulk RETR costs few trips
#: through Python; the core forwards each read as one chunk.
RECEIVE_SIZE: Final = 256 * 1024

#: How long a closing session may spend delivering its last words (a final
#: +OK, or the -ERR saying why it closes) to a client that is not reading.
FINAL_FLUSH_TIMEOUT: Final = 2.0

RecordSink = Callable[[AuditRecord], None]
Connector = Callable[[], Awaitable[trio.abc.Stream]]

_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


def set_nodelay(stream: trio.abc.Stream) -> None:
    """Turn Nagle off: a POP3 reply is one write and must leave at once.

    Proxies that leave Nagle on stall about 40 ms on every multi-packet
    reply against a delayed-ACK client (measured on nginx 1.22 and
    perdition 2.2).  trio already sets TCP_NODELAY on its SocketStreams;
    this makes the guarantee explicit and visible to a test.
    """
    if isinstance(stream, trio.SocketStream):
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)


class Relay:
    """Runs one session: connect upstream, pump bytes, close without QUIT."""

    def __init__(
        self,
        session: ProxySession,
        client: trio.abc.Stream,
        *,
        connect_upstream: Connector,
        upstream_label: str,
        connect_timeout: float,
        idle_timeout: float,
        emit: RecordSink,
    ) -> None:
        self.session = session
        self.client = client
        self.upstream: trio.abc.Stream | None = None
        self._connect_upstream = connect_upstream
        self._upstream_label = upstream_label
        self._connect_timeout = connect_timeout
        self._idle_timeout = idle_timeout
        self._emit = emit
        self._scope = trio.CancelScope()
        self._abort_reason: EndReason | None = None
        self._client_lock = trio.Lock()
        self._upstream_lock = trio.Lock()
        self._client_may_send = trio.Event()
        self._started_at = 0.0

    # ------------------------------------------------------------------
    def abort(self, reason: EndReason) -> None:
        """End the session from outside (shutdown), without QUIT upstream."""
        if self._abort_reason is None:
            self._abort_reason = reason
        self._scope.cancel()

    def _touch(self) -> None:
        """Activity: push the idle deadline forward (RFC 1939 §3 autologout)."""
        self._scope.deadline = trio.current_time() + self._idle_timeout

    # ------------------------------------------------------------------
    async def run(self) -> None:
        session = self.session
        self._started_at = trio.current_time()
        set_nodelay(self.client)
        self._emit_records()
        try:
            with self._scope:
                self._touch()
                if await self._connect():
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._pump_client, nursery.cancel_scope)
                        nursery.start_soon(self._pump_upstream, nursery.cancel_scope)
            if self._scope.cancelled_caught and not session.finished:
                session.end(self._abort_reason or EndReason.IDLE_TIMEOUT)
        except Exception as exc:  # a bug must end this session only, never the server
            session.end(EndReason.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
            raise
        finally:
            await self._close()

    async def _connect(self) -> bool:
        session = self.session
        try:
            with trio.fail_after(self._connect_timeout):
                upstream = await self._connect_upstream()
        except trio.TooSlowError:
            session.upstream_failed(self._upstream_label, "connect timed out")
            return False
        except OSError as exc:
            session.upstream_failed(self._upstream_label, exc.strerror or str(exc))
            return False
        set_nodelay(upstream)
        self.upstream = upstream
        session.upstream_connected(self._upstream_label)
        self._emit_records()
        # Commands the client sent before the upstream answered may wait.
        await self._flush_upstream()
        return True

    async def _pump_client(self, done: trio.CancelScope) -> None:
        session = self.session
        while not session.finished:
            if not session.wants_client_data:
                if not session.client_input_open:
                    return  # QUIT sent or input closed: the other pump finishes
                self._client_may_send = trio.Event()
                await self._client_may_send.wait()
                continue
            try:
                data = await self.client.receive_some(RECEIVE_SIZE)
            except _STREAM_ERRORS as exc:
                session.end(EndReason.CLIENT_ERROR, _describe(exc))
                break
            if not data:
                session.client_eof()
                if not session.finished:
                    self._emit_records()
                    return  # half-closed: owed replies still flow
                break
            self._touch()
            session.receive_client(bytes(data) if isinstance(data, bytearray) else data)
            if not await self._flush_both():
                break
        done.cancel()

    async def _pump_upstream(self, done: trio.CancelScope) -> None:
        session = self.session
        upstream = self.upstream
        assert upstream is not None
        while not session.finished:
            try:
                data = await upstream.receive_some(RECEIVE_SIZE)
            except _STREAM_ERRORS as exc:
                session.end(EndReason.UPSTREAM_ERROR, _describe(exc))
                break
            if not data:
                session.server_eof()
                break
            session.receive_server(bytes(data) if isinstance(data, bytearray) else data)
            if not await self._flush_both():
                break
            if session.wants_client_data:
                self._client_may_send.set()
        done.cancel()

    async def _flush_both(self) -> bool:
        """Send what the core produced; False once the session is over."""
        await self._flush_client()
        await self._flush_upstream()
        self._emit_records()
        return not self.session.finished

    async def _flush_client(self) -> None:
        session = self.session
        async with self._client_lock:
            while data := session.take_client_output():
                try:
                    await self.client.send_all(data)
                except _STREAM_ERRORS as exc:
                    session.end(EndReason.CLIENT_ERROR, _describe(exc))
                    return
                self._touch()

    async def _flush_upstream(self) -> None:
        session = self.session
        upstream = self.upstream
        if upstream is None:
            return  # not connected yet: the core keeps the bytes
        async with self._upstream_lock:
            while data := session.take_upstream_output():
                try:
                    await upstream.send_all(data)
                except _STREAM_ERRORS as exc:
                    session.end(EndReason.UPSTREAM_ERROR, _describe(exc))
                    return

    async def _close(self) -> None:
        """Last words to the client, then close both sides.  Never a QUIT."""
        session = self.session
        if not session.finished:
            session.end(self._abort_reason or EndReason.CLIENT_ERROR, "session task ended")
        with trio.CancelScope(shield=True):
            with trio.move_on_after(FINAL_FLUSH_TIMEOUT):
                data = session.take_client_output()
                if data:
                    # If the client is gone, the close record already says why.
                    with contextlib.suppress(*_STREAM_ERRORS):
                        await self.client.send_all(data)
            # Anything the core still held for the server is dropped with the
            # connection: the session is over (and the core never queues QUIT).
            session.take_upstream_output()
            if self.upstream is not None:
                await trio.aclose_forcefully(self.upstream)
            await trio.aclose_forcefully(self.client)
        self._emit_records()

    def _emit_records(self) -> None:
        for record in self.session.take_records():
            if record.event is Event.SESSION_CLOSED:
                duration = trio.current_time() - self._started_at
                fields = dict(record.fields)
                fields["duration_ms"] = math.floor(duration * 1000)
                record = AuditRecord(record.event, fields)
            self._emit(record)


def _describe(exc: BaseException) -> str:
    cause = exc.__cause__ or exc
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return type(cause).__name__
