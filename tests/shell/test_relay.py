"""The trio shell, on memory streams and a virtual clock (no sockets)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing

from popguard.core.records import AuditRecord, EndReason
from popguard.core.replies import (
    REPLY_AUDIT_UNAVAILABLE,
    REPLY_IDLE,
    REPLY_SHUTDOWN,
    REPLY_UPSTREAM_UNAVAILABLE,
)
from popguard.core.session import ProxySession
from popguard.retention import RetentionStore
from popguard.shell.relay import Relay, set_nodelay

GREETING = b"+OK ready <1.2@test>\r\n"


@dataclass
class Rig:
    client: trio.abc.Stream  # the test's end, playing the POP3 client
    server: trio.abc.Stream  # the test's end, playing the upstream server
    relay: Relay
    records: list[AuditRecord] = field(default_factory=list)
    done: trio.Event = field(default_factory=trio.Event)

    def events(self) -> list[str]:
        return [r.event.value for r in self.records]

    def record(self, name: str) -> AuditRecord:
        found = [r for r in self.records if r.event.value == name]
        assert len(found) == 1, self.events()
        return found[0]


async def recv_until(stream: trio.abc.Stream, marker: bytes, limit: float = 5) -> bytes:
    data = bytearray()
    with trio.fail_after(limit):
        while marker not in data:
            chunk = await stream.receive_some()
            if not chunk:
                raise AssertionError(f"EOF before {marker!r}; got {bytes(data)!r}")
            data += chunk
    return bytes(data)


async def recv_all(stream: trio.abc.Stream, limit: float = 5) -> bytes:
    """Everything until EOF."""
    data = bytearray()
    with trio.fail_after(limit):
        while chunk := await stream.receive_some():
            data += chunk
    return bytes(data)


@asynccontextmanager
async def rig(
    *,
    pair: Callable[[], tuple[trio.abc.Stream, trio.abc.Stream]] = trio.testing.memory_stream_pair,
    idle_timeout: float = 600.0,
    connect_timeout: float = 10.0,
    connect: Callable[[], object] | None = None,
    emit_durable: Callable[[AuditRecord], Awaitable[bool]] | None = None,
    durable_deletions: bool = False,
    retain: bool = False,
    retention: RetentionStore | None = None,
) -> AsyncIterator[Rig]:
    client_test, client_proxy = pair()
    upstream_proxy, server_test = pair()
    records: list[AuditRecord] = []

    async def connect_upstream() -> trio.abc.Stream:
        if connect is not None:
            await connect()  # type: ignore[misc]
        return upstream_proxy

    session = ProxySession(
        client="192.0.2.1:5000", listener="mem", durable_deletions=durable_deletions, retain=retain
    )
    relay = Relay(
        session,
        client_proxy,
        connect_upstream=connect_upstream,
        upstream_label="mem-upstream",
        connect_timeout=connect_timeout,
        idle_timeout=idle_timeout,
        emit=records.append,
        emit_durable=emit_durable,
        retention=retention,
    )
    r = Rig(client_test, server_test, relay, records)

    async def run() -> None:
        try:
            await relay.run()
        finally:
            r.done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        yield r
        with trio.fail_after(30):
            await r.done.wait()


async def login(r: Rig) -> None:
    await r.server.send_all(GREETING)
    assert await recv_until(r.client, b"\r\n") == GREETING
    await r.client.send_all(b"USER alice\r\nPASS pw\r\n")
    assert await recv_until(r.server, b"PASS pw\r\n") == b"USER alice\r\nPASS pw\r\n"
    await r.server.send_all(b"+OK\r\n+OK Logged in.\r\n")
    await recv_until(r.client, b"Logged in.\r\n")


async def mark(r: Rig, n: int = 1) -> None:
    await r.client.send_all(b"DELE %d\r\n" % n)
    assert await recv_until(r.server, b"\r\n") == b"DELE %d\r\n" % n
    await r.server.send_all(b"+OK\r\n")
    await recv_until(r.client, b"+OK\r\n")


async def test_session_relays_and_quit_commits() -> None:
    async with rig() as r:
        await login(r)
        await r.client.send_all(b"RETR 1\r\n")
        await recv_until(r.server, b"RETR 1\r\n")
        body = b"+OK\r\nSubject: hi\r\n\r\n..dot\r\n.\r\n"
        for i in range(len(body)):  # one byte per read
            await r.server.send_all(body[i : i + 1])
        assert await recv_until(r.client, b"\r\n.\r\n") == body
        await mark(r)
        await r.client.send_all(b"QUIT\r\n")
        assert await recv_until(r.server, b"\r\n") == b"QUIT\r\n"
        await r.server.send_all(b"+OK bye\r\n")
        assert await recv_all(r.client) == b"+OK bye\r\n"
        assert await recv_all(r.server) == b""
    assert r.events()[-2:] == ["deletions.committed", "session.closed"]
    closed = r.record("session.closed")
    assert closed["reason"] == "quit"
    assert isinstance(closed["duration_ms"], int)


async def test_client_drop_closes_upstream_without_quit() -> None:
    async with rig() as r:
        await login(r)
        await mark(r)
        await r.client.aclose()
        assert await recv_all(r.server) == b""  # EOF, and no QUIT before it
    assert r.record("deletions.discarded")["reason"] == "client_closed"


async def test_idle_timeout_closes_both_sides_without_quit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with rig(idle_timeout=60) as r:
        await login(r)
        await mark(r)
        start = trio.current_time()
        assert await recv_all(r.client, limit=120) == REPLY_IDLE
        assert 59 <= trio.current_time() - start <= 61
        assert await recv_all(r.server, limit=5) == b""
    assert r.record("deletions.discarded")["reason"] == "idle_timeout"
    assert r.record("session.closed")["reason"] == "idle_timeout"


async def test_activity_keeps_the_session_alive(autojump_clock: trio.testing.MockClock) -> None:
    async with rig(idle_timeout=60) as r:
        await login(r)
        for _ in range(5):
            await trio.sleep(45)
            await r.client.send_all(b"NOOP\r\n")
            await recv_until(r.server, b"NOOP\r\n")
            await r.server.send_all(b"+OK\r\n")
            assert await recv_until(r.client, b"\r\n") == b"+OK\r\n"
        assert not r.relay.session.finished
        await r.client.aclose()


async def test_shutdown_abort_tells_client_and_sends_no_quit() -> None:
    async with rig() as r:
        await login(r)
        await mark(r, 2)
        r.relay.abort(EndReason.SHUTDOWN)
        assert await recv_all(r.client) == REPLY_SHUTDOWN
        assert await recv_all(r.server) == b""
    assert r.record("deletions.discarded")["messages"] == ({"msg": 2},)


async def test_unreachable_upstream_gets_sys_temp() -> None:
    async def refuse() -> None:
        raise ConnectionRefusedError(111, "Connection refused")

    async with rig(connect=refuse) as r:
        assert await recv_all(r.client) == REPLY_UPSTREAM_UNAVAILABLE
    assert r.record("upstream.failed")["error"] == "Connection refused"


async def test_connect_timeout(autojump_clock: trio.testing.MockClock) -> None:
    async def hang() -> None:
        await trio.sleep_forever()

    async with rig(connect=hang, connect_timeout=7) as r:
        start = trio.current_time()
        assert await recv_all(r.client, limit=60) == REPLY_UPSTREAM_UNAVAILABLE
        assert trio.current_time() - start == pytest.approx(7, abs=0.5)
    assert r.record("upstream.failed")["error"] == "connect timed out"


async def test_upstream_drop_mid_session_tells_client() -> None:
    async with rig() as r:
        await login(r)
        await r.client.send_all(b"STAT\r\n")
        await recv_until(r.server, b"STAT\r\n")
        await r.server.aclose()
        assert (
            await recv_all(r.client)
            == b"-ERR [SYS/TEMP] Connection to the upstream POP3 server was lost\r\n"
        )


async def test_client_that_never_reads_holds_bounded_data(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A slow reader: popguard stops reading the server instead of buffering."""
    async with rig(pair=trio.testing.lockstep_stream_pair, idle_timeout=30) as r:
        await r.server.send_all(GREETING)
        await recv_until(r.client, b"\r\n")
        await r.client.send_all(b"RETR 1\r\n")
        await recv_until(r.server, b"\r\n")
        sent = 0
        chunk = b"x" * 65536

        async def flood() -> None:
            nonlocal sent
            await r.server.send_all(b"+OK\r\n")
            with trio.move_on_after(25):
                while True:
                    await r.server.send_all(chunk)
                    sent += len(chunk)

        await flood()
        # The proxy holds one read from the server plus the one it is trying
        # to hand to the client: a few chunks, not 25 s of flood.
        assert sent <= 4 * 256 * 1024
        # The idle timer then ends the session, without QUIT upstream.
    assert r.record("session.closed")["reason"] == "idle_timeout"


async def test_pipelined_flood_stops_being_read_until_replies_drain(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with rig(pair=trio.testing.lockstep_stream_pair) as r:
        await r.server.send_all(GREETING)
        await recv_until(r.client, b"\r\n")
        written = 0

        async def writer() -> None:
            nonlocal written
            for _ in range(1000):
                await r.client.send_all(b"NOOP\r\n")
                written += 1

        answering = False
        owed = 0

        async def upstream_server() -> None:
            nonlocal owed
            while data := await r.server.receive_some():
                owed += data.count(b"NOOP\r\n")
                if answering and owed:
                    count, owed = owed, 0
                    await r.server.send_all(b"+OK\r\n" * count)

        async def client_reader() -> None:
            while await r.client.receive_some():
                pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            nursery.start_soon(upstream_server)
            nursery.start_soon(client_reader)
            await trio.sleep(10)
            # The server has answered nothing: the client's writes stall at
            # the pipelining bound instead of filling memory.
            assert written <= r.relay.session.limits.max_pipelined + 1
            assert owed == written
            answering = True
            count, owed = owed, 0
            await r.server.send_all(b"+OK\r\n" * count)
            # From here on the server answers as it reads.
            with trio.fail_after(30):
                while written < 1000:
                    await trio.sleep(1)
            nursery.cancel_scope.cancel()
        assert written == 1000
        await r.client.aclose()


async def test_set_nodelay_turns_nagle_off_on_real_sockets() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        server_side = await listeners[0].accept()
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, False)
        assert stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        set_nodelay(stream)
        assert stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        await stream.aclose()
        await server_side.aclose()
        await listeners[0].aclose()
        nursery.cancel_scope.cancel()


async def test_fail_closed_dele_refused_when_audit_cannot_write() -> None:
    async def broken_sink(record: AuditRecord) -> bool:
        return False

    async with rig(emit_durable=broken_sink, durable_deletions=True) as r:
        await login(r)
        await r.client.send_all(b"DELE 1\r\nNOOP\r\n")
        assert await recv_until(r.server, b"\r\n") == b"NOOP\r\n"  # DELE never went
        await r.server.send_all(b"+OK\r\n")
        assert await recv_until(r.client, b"+OK\r\n") == REPLY_AUDIT_UNAVAILABLE + b"+OK\r\n"
        await r.client.aclose()
    assert "dele.marked" not in r.events()


async def test_fail_closed_dele_waits_for_a_slow_durable_write(
    autojump_clock: trio.testing.MockClock,
) -> None:
    written: list[str] = []

    async def slow_sink(record: AuditRecord) -> bool:
        await trio.sleep(3)
        written.append(record.event.value)
        return True

    async with rig(emit_durable=slow_sink, durable_deletions=True) as r:
        await login(r)
        start = trio.current_time()
        await r.client.send_all(b"DELE 1\r\n")
        assert await recv_until(r.server, b"\r\n") == b"DELE 1\r\n"
        assert trio.current_time() - start >= 3
        assert written == ["dele.requested"]
        await r.server.send_all(b"+OK\r\n")
        await recv_until(r.client, b"+OK\r\n")
        await r.client.aclose()
    assert r.record("dele.marked")["msg"] == 1


async def test_a_flood_in_one_read_is_forwarded_only_up_to_the_bound(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """20,000 NOOPs in one write: at most max_pipelined reach the server
    before it answers, and the rest waits (22,000 were forwarded at once)."""
    async with rig() as r:
        limit = r.relay.session.limits.max_pipelined
        await r.server.send_all(GREETING)
        await recv_until(r.client, b"\r\n")
        await r.client.send_all(b"NOOP\r\n" * 20_000)
        await trio.sleep(5)
        forwarded = await r.server.receive_some()
        assert forwarded.count(b"NOOP\r\n") == limit
        # The core holds at most one client read beyond what it forwarded.
        session = r.relay.session
        assert len(session._client_buf) <= 32 * 1024
        assert not session.wants_client_data
        # Each answer lets one more through, never more than the bound owed.
        await r.server.send_all(b"+OK\r\n" * 10)
        await trio.sleep(1)
        assert (await r.server.receive_some()).count(b"NOOP\r\n") == 10
        assert session.replies_owed <= limit
        await r.server.aclose()
    assert r.record("session.closed")["reason"] == "upstream_closed"
