"""Two proxies, one store: limits and throttles hold across them.

Two :class:`ProxyServer` instances (as two popguard processes would be) in
front of one demo upstream, counting in one shared store: the in-process
:class:`LocalState` here (its semantics are the Redis store's, tested
against a real redis-server in tests/sharedstate and tests/integration).
The upstream's record of the commands it received shows what never
reached it.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from popguard.policy.model import Match, PolicySet, Throttle
from popguard.sharedstate import LocalState, RedisState, ResilientState
from popguard.shell.shared import REPLY_SHARED_STATE_DOWN
from popguard.testing.demo_upstream import DemoUpstream, bound_port, sample_store

from .test_server import Stack, in_thread, policy_rule, raw_session, stack

REPLY_IN_USE = b"-ERR [IN-USE] Too many sessions for this user\r\n"
REPLY_LOGIN_DELAY = b"-ERR [LOGIN-DELAY] Too many failed logins, try again later\r\n"


@asynccontextmanager
async def two_proxies(rules: PolicySet, state: object) -> AsyncIterator[tuple[Stack, Stack]]:
    demo = DemoUpstream(sample_store())
    async with trio.open_nursery() as nursery:
        port = bound_port(await nursery.start(demo.serve, "127.0.0.1", 0))
        async with (
            stack(policies=rules, shared_state=state, demo=demo, upstream_port=port) as a,
            stack(policies=rules, shared_state=state, demo=demo, upstream_port=port) as b,
        ):
            yield a, b
        nursery.cancel_scope.cancel()


def login(port: int, user: bytes, password: bytes) -> tuple[socket.socket, bytes]:
    """Log in and stay: the socket, and what the client got."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"USER " + user + b"\r\nPASS " + password + b"\r\n")
    data = b""
    while data.count(b"\r\n") < 3 and (chunk := sock.recv(4096)):
        data += chunk
    return sock, data


async def test_one_session_per_user_across_both_proxies() -> None:
    rules = PolicySet((policy_rule("one-each", max_sessions_per_user=1),))
    state = LocalState()
    async with two_proxies(rules, state) as (a, b):
        held, first = await in_thread(login, a.port, b"demo", b"demo")
        assert first.endswith(b"+OK Logged in.\r\n") or b"+OK" in first.splitlines()[-1]
        refused = await in_thread(raw_session, b.port, b"USER demo\r\nPASS demo\r\nQUIT\r\n")
        assert REPLY_IN_USE in refused
        # The refused session never sent a name or password upstream.
        assert [c for c in a.demo.received_commands if c.startswith(b"PASS")] == [b"PASS demo"]
        held.sendall(b"QUIT\r\n")
        await in_thread(held.recv, 100)
        held.close()
        with trio.fail_after(5):
            while state.user_sessions("demo") or state.total:
                await trio.sleep(0.01)
        again = await in_thread(raw_session, b.port, b"USER demo\r\nPASS demo\r\nQUIT\r\n")
        assert REPLY_IN_USE not in again
        assert b"+OK" in again.splitlines()[2]
    assert state.total == 0  # every lease went with its session
    assert b.sink.named("policy.denied")[0]["setting"] == "max_sessions_per_user"


async def test_the_fourth_failed_login_through_either_proxy_is_refused() -> None:
    throttle = Throttle(failures=3, window=300.0, block=900.0, by=("user",))
    rules = PolicySet((policy_rule("throttle", login_throttle=throttle),))
    state = LocalState()
    async with two_proxies(rules, state) as (a, b):
        for port in (a.port, b.port, a.port):
            out = await in_thread(raw_session, port, b"USER demo\r\nPASS wrong\r\nQUIT\r\n")
            assert b"-ERR" in out.splitlines()[2]
            assert REPLY_LOGIN_DELAY not in out
        fourth = await in_thread(raw_session, b.port, b"USER demo\r\nPASS demo\r\nQUIT\r\n")
    assert REPLY_LOGIN_DELAY in fourth
    passwords = [c for c in a.demo.received_commands if c.startswith(b"PASS")]
    assert passwords == [b"PASS wrong"] * 3  # the fourth password never left popguard
    started = a.sink.named("policy.login_blocked") + b.sink.named("policy.login_blocked")
    assert len(started) == 1
    assert started[0]["key"] == "user:demo"


async def test_the_total_holds_across_both_proxies() -> None:
    rules = PolicySet((policy_rule("cap", max_sessions_total=1),))
    state = LocalState()
    async with two_proxies(rules, state) as (a, b):
        held = socket.create_connection(("127.0.0.1", a.port), timeout=10)
        assert (await in_thread(held.recv, 100)).startswith(b"+OK")
        second = await in_thread(raw_session, b.port, b"")
        held.close()
    assert second == b"-ERR [SYS/TEMP] Too many connections, try again later\r\n"


def unreachable_store(on_failure: str, events: list[str]) -> ResilientState:
    """A real Redis client pointed at a loopback port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    return ResilientState(
        RedisState(f"redis://127.0.0.1:{dead}/0", op_timeout=0.3),
        LocalState(),
        on_failure,  # type: ignore[arg-type]
        lambda name, fields: events.append(name),
    )


async def test_fail_closed_refuses_new_sessions_while_the_store_is_down() -> None:
    events: list[str] = []
    state = unreachable_store("fail-closed", events)
    rules = PolicySet((policy_rule("cap", max_sessions_total=100),))
    async with stack(policies=rules, shared_state=state) as s:
        out = await in_thread(raw_session, s.port, b"")
    assert out == REPLY_SHARED_STATE_DOWN
    assert not s.demo.received_commands
    await state.aclose()


async def test_fail_open_counts_in_this_process_and_says_so() -> None:
    events: list[str] = []
    state = unreachable_store("fail-open", events)
    rules = PolicySet((policy_rule("one-each", max_sessions_per_user=1, match=Match()),))
    async with stack(policies=rules, shared_state=state) as s:
        out = await in_thread(raw_session, s.port, b"USER demo\r\nPASS demo\r\nQUIT\r\n")
    assert b"+OK" in out.splitlines()[2]
    assert events.count("shared_state.unavailable") == 1
    await state.aclose()
