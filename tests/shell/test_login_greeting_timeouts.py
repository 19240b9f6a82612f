"""``session.login_timeout`` and ``upstream.greeting_timeout`` in the trio shell.

Memory streams and trio's autojump clock, as in ``test_relay.py``: the test
plays both the POP3 client and the upstream server, so "cut at exactly the
configured time" and "nothing, in particular no QUIT, reached the server"
are exact assertions.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing

from popguard.core.records import AuditRecord
from popguard.core.replies import (
    REPLY_LOGIN_TIMEOUT,
    REPLY_UPSTREAM_TIMEOUT,
    REPLY_UPSTREAM_UNAVAILABLE,
)
from popguard.core.session import ProxySession
from popguard.shell.relay import Relay, UpstreamSecurity
from tests.shell.test_relay import recv_all, recv_until

GREETING = b"+OK ready <1.2@test>\r\n"


@dataclass
class Rig:
    client: trio.abc.Stream  # the test's end, playing the POP3 client
    server: trio.abc.Stream  # the test's end, playing the upstream server
    relay: Relay
    started: float
    records: list[AuditRecord] = field(default_factory=list)
    done: trio.Event = field(default_factory=trio.Event)

    def events(self) -> list[str]:
        return [r.event.value for r in self.records]

    def record(self, name: str) -> AuditRecord:
        found = [r for r in self.records if r.event.value == name]
        assert len(found) == 1, self.events()
        return found[0]


@asynccontextmanager
async def rig(
    *,
    login_timeout: float = 0.0,
    greeting_timeout: float = 0.0,
    idle_timeout: float = 600.0,
    connect_delay: float = 0.0,
    upstream_tls: UpstreamSecurity | None = None,
) -> AsyncIterator[Rig]:
    client_test, client_proxy = trio.testing.memory_stream_pair()
    upstream_proxy, server_test = trio.testing.memory_stream_pair()
    records: list[AuditRecord] = []

    async def connect_upstream() -> trio.abc.Stream:
        await trio.sleep(connect_delay)
        return upstream_proxy

    session = ProxySession(client="192.0.2.1:5000", listener="mem")
    relay = Relay(
        session,
        client_proxy,
        connect_upstream=connect_upstream,
        upstream_label="mem-upstream",
        connect_timeout=10,
        idle_timeout=idle_timeout,
        login_timeout=login_timeout,
        greeting_timeout=greeting_timeout,
        emit=records.append,
        upstream_tls=upstream_tls,
    )
    r = Rig(client_test, server_test, relay, trio.current_time(), records)

    async def run() -> None:
        try:
            await relay.run()
        finally:
            r.done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        yield r
        with trio.fail_after(600):
            await r.done.wait()


async def greet(r: Rig) -> None:
    await r.server.send_all(GREETING)
    assert await recv_until(r.client, b"\r\n") == GREETING


async def exchange(r: Rig, command: bytes, reply: bytes) -> None:
    await r.client.send_all(command)
    assert await recv_until(r.server, b"\r\n") == command
    await r.server.send_all(reply)
    assert await recv_until(r.client, reply[-2:]) == reply


async def drip(r: Rig, data: bytes, every: float) -> None:
    """One byte every ``every`` seconds, until done or the proxy is gone."""
    for i in range(len(data)):
        await trio.sleep(every)
        if r.relay.session.finished:
            return
        await r.client.send_all(data[i : i + 1])


def elapsed(r: Rig) -> float:
    return trio.current_time() - r.started


# -- login_timeout -------------------------------------------------------------


async def test_slow_drip_client_is_cut_at_login_timeout_without_quit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """One byte every 5 s, never a whole line: never idle, yet cut at 60 s."""
    async with rig(login_timeout=60, idle_timeout=600) as r:
        await greet(r)
        # A failed login does not restart the login timer.
        await exchange(r, b"USER alice\r\n", b"+OK\r\n")
        await exchange(r, b"PASS wrong\r\n", b"-ERR [AUTH] Authentication failed.\r\n")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drip, r, b"USER " + b"a" * 100, 5.0)
            got = await recv_all(r.client, limit=120)
            cut_at = elapsed(r)
        assert got == REPLY_LOGIN_TIMEOUT
        assert cut_at == pytest.approx(60, abs=0.01)
        # The dripped line was never forwarded, and nothing else was: no QUIT.
        assert await recv_all(r.server) == b""
    closed = r.record("session.closed")
    assert closed["reason"] == "login_timeout"
    assert closed["detail"] == "no login within 60 s"
    assert closed["state"] == "AUTHORIZATION"
    assert closed["bytes_to_upstream"] == len(b"USER alice\r\nPASS wrong\r\n")
    assert r.events() == [
        "session.opened",
        "upstream.connected",
        "auth.failed",
        "session.closed",
    ]


async def test_login_timeout_runs_from_the_client_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The upstream's connect time counts: the bound is connect-to-login."""
    async with rig(login_timeout=30, connect_delay=8) as r:
        await r.server.send_all(GREETING)  # as soon as popguard connects, at 8 s
        assert await recv_until(r.client, b"\r\n", limit=60) == GREETING
        assert elapsed(r) == pytest.approx(8, abs=0.01)
        assert await recv_all(r.client, limit=60) == REPLY_LOGIN_TIMEOUT
        assert elapsed(r) == pytest.approx(30, abs=0.01)
        assert await recv_all(r.server) == b""
    assert r.record("session.closed")["reason"] == "login_timeout"


async def test_a_client_that_logs_in_in_time_is_not_cut(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with rig(login_timeout=60, idle_timeout=600) as r:
        await greet(r)
        await trio.sleep(50)
        await exchange(r, b"USER alice\r\n", b"+OK\r\n")
        await exchange(r, b"PASS pw\r\n", b"+OK Logged in.\r\n")
        assert r.relay.session.logged_in
        # Well past the login bound, well within the idle timer.
        for _ in range(4):
            await trio.sleep(100)
            await exchange(r, b"NOOP\r\n", b"+OK\r\n")
        assert not r.relay.session.finished
        await r.client.send_all(b"QUIT\r\n")
        assert await recv_until(r.server, b"\r\n") == b"QUIT\r\n"  # the client's own
        await r.server.send_all(b"+OK bye\r\n")
        assert await recv_all(r.client) == b"+OK bye\r\n"
    assert r.record("session.closed")["reason"] == "quit"
    assert elapsed(r) > 400


async def test_login_timeout_zero_means_no_limit(autojump_clock: trio.testing.MockClock) -> None:
    async with rig(login_timeout=0, idle_timeout=600) as r:
        await greet(r)
        await drip(r, b"USER " + b"a" * 100, 5.0)  # 525 s, never idle
        assert not r.relay.session.finished
        await r.client.aclose()
    assert r.record("session.closed")["reason"] == "client_closed"


async def test_login_timeout_never_cuts_into_a_multiline_reply(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A CAPA listing half-relayed when the timer fires stays cut short, no -ERR in it."""
    async with rig(login_timeout=60) as r:
        await greet(r)
        await r.client.send_all(b"CAPA\r\n")
        assert await recv_until(r.server, b"\r\n") == b"CAPA\r\n"
        await r.server.send_all(b"+OK\r\nUSER\r\n")
        assert await recv_until(r.client, b"USER\r\n") == b"+OK\r\nUSER\r\n"
        assert await recv_all(r.client, limit=120) == b""
        assert elapsed(r) == pytest.approx(60, abs=0.01)
        assert await recv_all(r.server) == b""
    assert r.record("session.closed")["reason"] == "login_timeout"


# -- greeting_timeout ----------------------------------------------------------


async def test_upstream_that_never_greets_is_given_up_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Measured from the TCP connection (5 s after the client's), then SYS/TEMP."""
    async with rig(greeting_timeout=30, login_timeout=60, connect_delay=5) as r:
        got = await recv_all(r.client, limit=120)
        assert got == REPLY_UPSTREAM_TIMEOUT
        assert got.startswith(b"-ERR [SYS/TEMP] ")
        assert elapsed(r) == pytest.approx(35, abs=0.01)
        assert await recv_all(r.server) == b""  # closed, and never a QUIT
    assert r.events() == ["session.opened", "upstream.connected", "session.closed"]
    closed = r.record("session.closed")
    assert closed["reason"] == "upstream_timeout"
    assert closed["detail"] == "no greeting from the upstream within 30 s"


async def test_half_a_greeting_is_no_greeting(autojump_clock: trio.testing.MockClock) -> None:
    async with rig(greeting_timeout=30) as r:
        await r.server.send_all(b"+OK rea")
        assert await recv_all(r.client, limit=120) == REPLY_UPSTREAM_TIMEOUT
        assert elapsed(r) == pytest.approx(30, abs=0.01)
        assert await recv_all(r.server) == b""
    assert r.record("session.closed")["reason"] == "upstream_timeout"


async def test_commands_sent_before_the_greeting_still_get_no_quit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with rig(greeting_timeout=30) as r:
        await r.client.send_all(b"CAPA\r\n")
        assert await recv_all(r.client, limit=120) == REPLY_UPSTREAM_TIMEOUT
        assert await recv_all(r.server) == b"CAPA\r\n"  # forwarded, nothing after it
    assert r.record("session.closed")["reason"] == "upstream_timeout"


async def test_a_late_but_timely_greeting_keeps_the_session(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with rig(greeting_timeout=30) as r:
        await trio.sleep(29)
        await greet(r)
        await trio.sleep(100)
        await exchange(r, b"NOOP\r\n", b"+OK\r\n")
        assert not r.relay.session.finished
        await r.client.aclose()
    assert r.record("session.closed")["reason"] == "client_closed"


def _stls_upstream() -> UpstreamSecurity:
    # Never used for a handshake here: the tests end before TLS starts.
    return UpstreamSecurity("starttls", ssl.create_default_context(), "upstream.test")


async def test_upstream_stls_greeting_is_bounded_by_greeting_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """With upstream STLS the greeting is read before the pumps: bounded there too."""
    async with rig(greeting_timeout=25, connect_delay=2, upstream_tls=_stls_upstream()) as r:
        assert await recv_all(r.client, limit=120) == REPLY_UPSTREAM_TIMEOUT
        assert elapsed(r) == pytest.approx(27, abs=0.01)
        assert await recv_all(r.server) == b""  # no STLS, no QUIT
    assert r.events() == ["session.opened", "upstream.connected", "session.closed"]
    closed = r.record("session.closed")
    assert closed["reason"] == "upstream_timeout"
    assert closed["detail"] == "no greeting from the upstream within 25 s"


async def test_upstream_stls_unanswered_is_bounded(autojump_clock: trio.testing.MockClock) -> None:
    async with rig(greeting_timeout=30, upstream_tls=_stls_upstream()) as r:
        await r.server.send_all(GREETING)
        assert await recv_until(r.server, b"\r\n") == b"STLS\r\n"
        sent_stls = elapsed(r)
        assert await recv_all(r.client, limit=120) == REPLY_UPSTREAM_UNAVAILABLE
        assert elapsed(r) - sent_stls == pytest.approx(10, abs=0.01)
        assert await recv_all(r.server) == b""
    assert r.record("upstream.failed")["error"] == "no reply to STLS within 10 s"
    assert r.record("session.closed")["reason"] == "upstream_unreachable"
