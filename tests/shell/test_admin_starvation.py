"""The admin listener cannot be starved: idle and slowloris connections never keep a probe out.

A health check (kubelet, HAProxy) must get its answer however many
connections an attacker holds open with unfinished request heads.  Real
loopback sockets, default limits unless a test says otherwise.
"""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
import trio

from popguard.metrics import Metrics
from popguard.shell.admin import MAX_CONNECTIONS, REQUEST_TIMEOUT, AdminServer
from tests.shell.test_admin import admin, always, exchange, get, parse_reply, until

#: Attackers' connections: well beyond the cap.
FLOOD = 100
#: The answer a probe must get, at the latest, under a flood.
PROBE_BOUND = 1.0


async def open_partial(port: int, count: int) -> list[trio.SocketStream]:
    """``count`` connections that each send ``GET /metr`` and never finish the head."""
    streams = []
    for _ in range(count):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET /metr")
        streams.append(stream)
    return streams


async def closed_by_server(streams: list[trio.SocketStream], wait: float = 0.3) -> list[bool]:
    """Which of ``streams`` the server has closed (EOF or reset), watching for ``wait`` s."""
    closed = [False] * len(streams)

    async def watch(index: int, stream: trio.SocketStream) -> None:
        try:
            data = await stream.receive_some(1)
        except trio.BrokenResourceError:
            data = b""
        closed[index] = data == b""

    with trio.move_on_after(wait):
        async with trio.open_nursery() as nursery:
            for index, stream in enumerate(streams):
                nursery.start_soon(watch, index, stream)
    return closed


async def close_all(streams: list[trio.SocketStream]) -> None:
    for stream in streams:
        await stream.aclose()


async def probe(port: int, path: str = "/healthz") -> tuple[int, float]:
    """A health check's request: (status, seconds), failing after :data:`PROBE_BOUND`."""
    started = trio.current_time()
    with trio.fail_after(PROBE_BOUND):
        reply = await get(port, path)
    return reply.status, trio.current_time() - started


async def test_a_probe_is_answered_while_100_partial_requests_hold_on() -> None:
    # A long header timeout: the probe must get in by shedding, not by waiting
    # for the attackers to time out.
    async with admin(request_timeout=30) as (server, port):
        flood = await open_partial(port, FLOOD)
        try:
            await until(lambda: server.shed == FLOOD - MAX_CONNECTIONS)
            assert server.connections == MAX_CONNECTIONS  # every slot held by an attacker

            status, elapsed = await probe(port)

            assert status == 200
            assert elapsed < PROBE_BOUND
            # The probe pushed out one more attacker, the oldest; the newest
            # attackers are still connected, still waiting for their heads.
            shed = FLOOD - MAX_CONNECTIONS + 1
            assert server.shed == shed
            await until(lambda: server.connections == MAX_CONNECTIONS - 1)
            assert await closed_by_server(flood) == [True] * shed + [False] * (FLOOD - shed)
        finally:
            await close_all(flood)
        await until(lambda: server.connections == 0)
    assert server.errors == 0


async def test_probes_keep_getting_in_while_the_flood_keeps_coming() -> None:
    """New attackers arrive all the time; each probe still gets its answer."""
    async with admin(request_timeout=30) as (server, port):
        flood: list[trio.SocketStream] = []
        statuses = []
        async with trio.open_nursery() as nursery:

            async def attack() -> None:
                while True:
                    flood.extend(await open_partial(port, 10))
                    while len(flood) > 2 * FLOOD:
                        await flood.pop(0).aclose()

            nursery.start_soon(attack)
            await until(lambda: server.shed > FLOOD)
            for _ in range(20):
                status, _ = await probe(port)
                statuses.append(status)
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        await close_all(flood)
        assert statuses == [200] * 20
        assert server.shed > FLOOD
    assert server.errors == 0


async def test_a_slowloris_sending_a_byte_every_half_second_is_cut_at_the_timeout() -> None:
    """The deadline is for the whole head, not for each read, and it is short."""
    assert REQUEST_TIMEOUT <= 2.0
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"  # never the blank line
    async with admin() as (server, port):
        started = trio.current_time()
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            answer = b""
            with trio.fail_after(REQUEST_TIMEOUT + 2):
                async with trio.open_nursery() as nursery:

                    async def dribble() -> None:
                        for byte in request:
                            try:
                                await stream.send_all(bytes([byte]))
                            except trio.BrokenResourceError:
                                return
                            await trio.sleep(0.5)

                    nursery.start_soon(dribble)
                    answer = await stream.receive_some(65536)
                    elapsed = trio.current_time() - started
                    nursery.cancel_scope.cancel()
        assert parse_reply(answer).status == 408
        assert REQUEST_TIMEOUT - 0.05 <= elapsed < 2.5
        await until(lambda: server.connections == 0)
    assert server.errors == 0


async def test_ordinary_clients_are_served_as_before_during_a_flood() -> None:
    async with admin(always({"listeners": True, "upstream": True})) as (server, port):
        flood = await open_partial(port, FLOOD)
        try:
            await until(lambda: server.connections == MAX_CONNECTIONS)
            metrics = await get(port, "/metrics")
            assert metrics.status == 200
            assert b"popguard_build_info" in metrics.body
            assert (await get(port, "/readyz")).json()["status"] == "ready"
            head = await get(port, "/healthz", method="HEAD")
            assert (head.status, head.body) == (200, b"")
            assert (await get(port, "/nope")).status == 404
            assert parse_reply(await exchange(port, b"GET /healthz HTTP/1.0\n\n")).status == 200

            def fetch() -> tuple[int, bytes]:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                        return r.status, r.read()
                except urllib.error.HTTPError as exc:
                    return exc.code, exc.read()

            assert await trio.to_thread.run_sync(fetch) == (200, b"ok\n")
            # Concurrent scrapes in the middle of it: all answered.
            results: list[int] = []

            async def scrape() -> None:
                results.append((await get(port, "/metrics")).status)

            with trio.fail_after(5):
                async with trio.open_nursery() as nursery:
                    for _ in range(20):
                        nursery.start_soon(scrape)
            assert results == [200] * 20
        finally:
            await close_all(flood)
        await until(lambda: server.connections == 0)
        assert (await get(port, "/healthz")).status == 200
    assert server.errors == 0


async def test_a_request_being_answered_is_not_shed_for_an_idle_connection() -> None:
    """Shedding picks the oldest connection without a request head, not the oldest one."""
    checking = trio.Event()
    release = trio.Event()

    async def slow_ready() -> dict[str, bool]:
        checking.set()
        await release.wait()
        return {"listeners": True}

    async with admin(slow_ready, max_connections=2, request_timeout=30) as (server, port):
        async with trio.open_nursery() as nursery:
            replies: list[int] = []

            async def readyz() -> None:
                replies.append((await get(port, "/readyz")).status)

            nursery.start_soon(readyz)  # the oldest connection, being answered
            with trio.fail_after(5):
                await checking.wait()
            (idle,) = await open_partial(port, 1)
            await until(lambda: server.connections == 2)
            status, _ = await probe(port)
            assert status == 200
            assert await closed_by_server([idle]) == [True]
            assert replies == []  # still waiting for its checks, still connected
            release.set()
        assert replies == [200]
        await idle.aclose()
    assert server.shed == 1
    assert server.errors == 0


async def test_when_every_slot_is_busy_the_oldest_makes_room() -> None:
    """A newcomer is always served, even if every slot holds a request being answered."""

    checking = trio.Event()

    async def hangs() -> dict[str, bool]:
        checking.set()
        await trio.sleep_forever()
        raise AssertionError

    async with admin(hangs, max_connections=1, ready_timeout=30) as (server, port):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
            with trio.fail_after(5):
                await checking.wait()  # its head is read: it waits for the checks
            status, _ = await probe(port)
            assert status == 200
            assert await closed_by_server([stream]) == [True]
    assert server.shed == 1
    assert server.errors == 0


def test_the_connection_cap_must_admit_someone() -> None:
    with pytest.raises(ValueError, match="max_connections"):
        AdminServer(Metrics(), always({}), max_connections=0)
