"""The admin listener: /metrics, /healthz, /readyz, and its defences, over loopback TCP."""

from __future__ import annotations

import json
import poplib
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from popguard.audit import AuditLog
from popguard.metrics import Metrics
from popguard.shell.admin import (
    DEFAULT_ADMIN_ADDRESS,
    MAX_REQUEST_HEAD,
    AdminServer,
    Readiness,
    serve_admin,
)
from popguard.shell.server import Endpoint, ListenerSpec, ProxyServer, ServerSettings
from popguard.testing.demo_upstream import DemoUpstream, bound_port, sample_store


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def parse_reply(raw: bytes) -> Reply:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    version, status, _reason = lines[0].split(" ", 2)
    assert version == "HTTP/1.1"
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Reply(int(status), headers, body)


async def exchange(port: int, data: bytes, *, half_close: bool = True) -> bytes:
    """Send ``data``, then read until the server closes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        if half_close:
            await stream.send_eof()
        chunks = []
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                chunks.append(chunk)
    return b"".join(chunks)


async def get(port: int, path: str, *, method: str = "GET", headers: str = "") -> Reply:
    request = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{headers}\r\n"
    return parse_reply(await exchange(port, request.encode()))


async def until(condition: Callable[[], bool]) -> None:
    with trio.fail_after(10):
        while not condition():
            await trio.sleep(0.01)


def always(checks: dict[str, bool]) -> Callable[[], Awaitable[dict[str, bool]]]:
    async def ready() -> dict[str, bool]:
        return dict(checks)

    return ready


@asynccontextmanager
async def admin(
    ready: Callable[[], Awaitable[dict[str, bool]]] | None = None,
    metrics: Metrics | None = None,
    **options: Any,
) -> AsyncIterator[tuple[AdminServer, int]]:
    server = AdminServer(
        metrics if metrics is not None else Metrics(),
        ready if ready is not None else always({"listeners": True}),
        **options,
    )
    await server.open(("127.0.0.1", 0))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        yield server, server.bound[0][1]
        nursery.cancel_scope.cancel()


# -- the endpoints -------------------------------------------------------------


async def test_metrics_endpoint_serves_parseable_prometheus_text() -> None:
    metrics = Metrics()
    metrics.sink.write({"event": "session.opened"})
    metrics.sink.write({"event": "session.closed", "reason": "quit", "bytes_to_client": 10})
    async with admin(metrics=metrics) as (_, port):
        reply = await get(port, "/metrics")
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert reply.headers["connection"] == "close"
    assert int(reply.headers["content-length"]) == len(reply.body)
    families = {f.name: f for f in text_string_to_metric_families(reply.body.decode())}
    sessions = families["popguard_sessions"]
    (quit_sample,) = [s for s in sessions.samples if s.labels.get("outcome") == "quit"]
    assert quit_sample.value == 1
    assert "popguard_sessions_active" in families
    assert "process_cpu_seconds" in families  # the process collector, in our own registry


async def test_metrics_endpoint_negotiates_openmetrics() -> None:
    async with admin() as (_, port):
        reply = await get(port, "/metrics", headers="Accept: application/openmetrics-text\r\n")
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("application/openmetrics-text")
    assert reply.body.endswith(b"# EOF\n")


async def test_urllib_can_scrape() -> None:
    """A stock HTTP client (in a thread) gets the same answers."""
    async with admin() as (_, port):

        def fetch(path: str) -> tuple[int, bytes]:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
                    return r.status, r.read()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read()

        assert await trio.to_thread.run_sync(fetch, "/healthz") == (200, b"ok\n")
        status, body = await trio.to_thread.run_sync(fetch, "/metrics")
        assert status == 200
        assert b"popguard_build_info" in body
        assert (await trio.to_thread.run_sync(fetch, "/nope"))[0] == 404


async def test_healthz() -> None:
    async with admin() as (_, port):
        reply = await get(port, "/healthz")
    assert (reply.status, reply.body) == (200, b"ok\n")


async def test_readyz_200_when_every_check_passes() -> None:
    ready = always({"listeners": True, "upstream": True, "audit": True})
    async with admin(ready) as (_, port):
        reply = await get(port, "/readyz")
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/json"
    assert reply.json() == {
        "status": "ready",
        "checks": {"listeners": True, "upstream": True, "audit": True},
    }


async def test_readyz_503_names_the_failing_check() -> None:
    ready = always({"listeners": True, "upstream": False, "audit": True})
    async with admin(ready) as (_, port):
        reply = await get(port, "/readyz")
    assert reply.status == 503
    assert reply.json()["status"] == "not ready"
    assert reply.json()["checks"]["upstream"] is False


async def test_readyz_503_when_the_checks_hang() -> None:
    async def hangs() -> dict[str, bool]:
        await trio.sleep_forever()
        raise AssertionError

    async with admin(hangs, ready_timeout=0.2) as (_, port):
        reply = await get(port, "/readyz")
    assert reply.status == 503


async def test_readyz_500_when_the_check_raises_and_server_keeps_serving() -> None:
    async def broken() -> dict[str, bool]:
        raise RuntimeError("bug")

    async with admin(broken) as (_, port):
        assert (await get(port, "/readyz")).status == 500
        assert (await get(port, "/healthz")).status == 200


async def test_head_has_headers_and_no_body() -> None:
    async with admin() as (_, port):
        reply = await get(port, "/healthz", method="HEAD")
    assert reply.status == 200
    assert reply.headers["content-length"] == "3"
    assert reply.body == b""


async def test_query_string_is_ignored() -> None:
    async with admin() as (_, port):
        assert (await get(port, "/healthz?verbose=1")).status == 200


# -- errors --------------------------------------------------------------------


async def test_unknown_path_is_404() -> None:
    async with admin() as (_, port):
        assert (await get(port, "/admin")).status == 404


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS", "TRACE"])
async def test_other_methods_are_405_with_allow(method: str) -> None:
    async with admin() as (_, port):
        reply = await get(port, "/metrics", method=method)
    assert reply.status == 405
    assert reply.headers["allow"] == "GET, HEAD"


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /metrics\r\n\r\n",  # HTTP/0.9
        b"GET  /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\n\r\n",  # no Host
        b"GET /metrics HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nHost : x\r\n\r\n",  # space before colon
        b"GET /metrics HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nNoColon\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n",
        b"GET metrics HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /m\x7fetrics HTTP/1.1\r\nHost: x\r\n\r\n",
        b"G(T /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /metrics HTTP/x.y\r\nHost: x\r\n\r\n",
        b"\r\n\r\n",
    ],
)
async def test_malformed_requests_are_400(request_bytes: bytes) -> None:
    async with admin() as (_, port):
        reply = parse_reply(await exchange(port, request_bytes))
    assert reply.status == 400


async def test_http2_is_505() -> None:
    async with admin() as (_, port):
        reply = parse_reply(await exchange(port, b"GET / HTTP/2.0\r\nHost: x\r\n\r\n"))
    assert reply.status == 505


async def test_http10_without_host_and_bare_lf_are_accepted() -> None:
    async with admin() as (_, port):
        reply = parse_reply(await exchange(port, b"GET /healthz HTTP/1.0\n\n"))
    assert reply.status == 200


async def test_oversized_header_block_is_431() -> None:
    headers = "".join(f"X-Filler-{i}: {'a' * 100}\r\n" for i in range(MAX_REQUEST_HEAD // 100))
    request = f"GET /metrics HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode()
    async with admin() as (_, port):
        reply = parse_reply(await exchange(port, request, half_close=False))
    assert reply.status == 431


async def test_oversized_request_line_is_414() -> None:
    request = b"GET /" + b"a" * (2 * MAX_REQUEST_HEAD) + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    async with admin() as (_, port):
        reply = parse_reply(await exchange(port, request, half_close=False))
    assert reply.status == 414


async def test_too_many_header_lines_is_431() -> None:
    headers = "".join(f"X{i}: y\r\n" for i in range(100))
    request = f"GET /metrics HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode()
    async with admin() as (_, port):
        reply = parse_reply(await exchange(port, request))
    assert reply.status == 431


async def test_slow_client_gets_408_and_is_closed() -> None:
    """Slowloris: a head that never completes is cut off at the request timeout."""
    async with admin(request_timeout=0.3) as (_, port):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            started = trio.current_time()
            chunks = []
            with trio.fail_after(5):
                while chunk := await stream.receive_some(65536):
                    chunks.append(chunk)
                    await trio.sleep(0.05)
                    # Keep dribbling: the deadline is for the whole head.
                    try:
                        await stream.send_all(b"X: y\r\n")
                    except trio.BrokenResourceError:
                        break
            elapsed = trio.current_time() - started
    assert parse_reply(b"".join(chunks)).status == 408
    assert elapsed < 3


async def test_a_client_that_closes_early_gets_nothing_and_harms_nothing() -> None:
    async with admin() as (server, port):
        assert await exchange(port, b"GET /metr") == b""
        assert await exchange(port, b"") == b""
        assert (await get(port, "/healthz")).status == 200
    assert server.errors == 0


async def test_at_the_limit_the_oldest_idle_connection_makes_room() -> None:
    """The newcomer is served; the oldest connection without a request head is shed."""
    async with admin(max_connections=2, request_timeout=5) as (server, port):
        held = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
        await until(lambda: server.connections == 2)  # both wait for a head
        assert (await get(port, "/healthz")).status == 200
        assert server.shed == 1
        assert await held[0].receive_some(1) == b""  # the oldest: closed, unanswered
        with trio.move_on_after(0.2) as still_open:
            await held[1].receive_some(1)
        assert still_open.cancelled_caught
        for stream in held:
            await stream.aclose()
        await until(lambda: server.connections == 0)
        assert (await get(port, "/healthz")).status == 200
    assert server.errors == 0


async def test_serve_admin_reports_the_bound_address() -> None:
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(serve_admin, ("127.0.0.1", 0), Metrics(), always({}))
        host, port = bound[0]
        assert host == "127.0.0.1"
        assert port != 0
        # No checks at all is not "ready".
        assert (await get(port, "/readyz")).status == 503
        nursery.cancel_scope.cancel()


def test_default_address_is_loopback() -> None:
    assert DEFAULT_ADMIN_ADDRESS[0] == "127.0.0.1"


async def test_bind_error_is_a_plain_oserror() -> None:
    first = AdminServer(Metrics(), always({}))
    ((_, port),) = await first.open(("127.0.0.1", 0))
    try:
        with pytest.raises(OSError, match="admin"):
            await AdminServer(Metrics(), always({})).open(("127.0.0.1", port))
    finally:
        for listener in first.listeners:
            await listener.aclose()


# -- Readiness ----------------------------------------------------------------


async def test_readiness_probes_the_upstream_and_caches_the_answer() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    readiness = Readiness(
        listeners_up=lambda: True,
        audit_healthy=lambda: True,
        upstream=("127.0.0.1", port),
        cache_seconds=60,
    )
    assert await readiness() == {"listeners": True, "upstream": True, "audit": True}
    assert await readiness() == {"listeners": True, "upstream": True, "audit": True}
    assert readiness.probes == 1  # cached
    for listener in listeners:
        await listener.aclose()
    fresh = Readiness(
        listeners_up=lambda: True, audit_healthy=lambda: True, upstream=("127.0.0.1", port)
    )
    assert (await fresh())["upstream"] is False


async def test_readiness_concurrent_scrapes_share_one_probe() -> None:
    calls = 0

    async def slow_connect(host: str, port: int) -> trio.abc.Stream:
        nonlocal calls
        calls += 1
        await trio.sleep(0.1)
        raise OSError("refused")

    readiness = Readiness(
        listeners_up=lambda: True,
        audit_healthy=lambda: True,
        upstream=("192.0.2.1", 110),  # never contacted: the connector is fake
        connect=slow_connect,
    )
    results: list[bool] = []

    async def check() -> None:
        results.append(await readiness.upstream_reachable())

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(check)
    assert results == [False] * 5
    assert calls == 1


async def test_readiness_probe_timeout(autojump_clock: trio.testing.MockClock) -> None:
    async def black_hole(host: str, port: int) -> trio.abc.Stream:
        await trio.sleep_forever()
        raise AssertionError

    readiness = Readiness(
        listeners_up=lambda: True,
        audit_healthy=lambda: True,
        upstream=("192.0.2.1", 110),
        connect=black_hole,
        probe_timeout=2.0,
        cache_seconds=5.0,
    )
    started = trio.current_time()
    assert await readiness.upstream_reachable() is False
    assert trio.current_time() - started == pytest.approx(2.0)
    await trio.sleep(6)
    assert await readiness.upstream_reachable() is False
    assert readiness.probes == 2  # the cache expired


async def test_readiness_a_raising_check_fails_it() -> None:
    def boom() -> bool:
        raise RuntimeError

    readiness = Readiness(listeners_up=boom, audit_healthy=lambda: False)
    assert await readiness() == {"listeners": False, "upstream": True, "audit": False}


# -- the whole stack -------------------------------------------------------------


async def test_a_proxied_session_shows_in_the_scrape() -> None:
    """Audit records alone drive the counters: no proxy code knows about metrics."""
    metrics = Metrics()
    audit = AuditLog([metrics.sink])
    demo = DemoUpstream(sample_store())
    async with trio.open_nursery() as nursery:
        upstream_port = bound_port(await nursery.start(demo.serve, "127.0.0.1", 0))
        settings = ServerSettings(
            listeners=(ListenerSpec("test", Endpoint("127.0.0.1", 0)),),
            upstream=Endpoint("127.0.0.1", upstream_port),
        )
        proxy = ProxyServer(settings, audit)
        await nursery.start(proxy.run)
        metrics.bind_active(lambda: proxy.active_sessions)
        metrics.watch_audit(audit)
        readiness = Readiness(
            listeners_up=lambda: bool(proxy.bound),
            audit_healthy=lambda: audit.healthy,
            upstream=("127.0.0.1", upstream_port),
            cache_seconds=0,
        )
        admin_port = (await nursery.start(serve_admin, ("127.0.0.1", 0), metrics, readiness))[0][1]
        proxy_port = proxy.bound["test"][0].port

        def client() -> None:
            pop = poplib.POP3("127.0.0.1", proxy_port, timeout=10)
            pop.user("demo")
            pop.pass_("demo")
            pop.retr(1)
            pop.dele(1)
            pop.quit()
            bad = poplib.POP3("127.0.0.1", proxy_port, timeout=10)
            bad.user("demo")
            with pytest.raises(poplib.error_proto):
                bad.pass_("wrong")
            bad.quit()

        await trio.to_thread.run_sync(client)
        with trio.fail_after(5):
            while proxy.active_sessions:
                await trio.sleep(0.01)
        assert (await get(admin_port, "/readyz")).status == 200
        reply = await get(admin_port, "/metrics")
        proxy.request_shutdown(immediate=True)
        nursery.cancel_scope.cancel()

    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(reply.body.decode())
        for sample in family.samples
    }
    assert samples[("popguard_sessions_total", (("outcome", "quit"),))] == 2
    assert samples[("popguard_sessions_active", ())] == 0
    assert samples[("popguard_logins_total", (("mechanism", "USER"), ("result", "ok")))] == 1
    assert samples[("popguard_logins_total", (("mechanism", "USER"), ("result", "failed")))] == 1
    assert samples[("popguard_deletions_total", (("fate", "committed"),))] == 1
    assert samples[("popguard_messages_retrieved_total", (("command", "RETR"),))] == 1
    assert samples[("popguard_upstream_connections_total", (("result", "ok"),))] == 2
    assert samples[("popguard_bytes_total", (("direction", "upstream_to_client"),))] > 100
    assert samples[("popguard_bytes_total", (("direction", "client_to_upstream"),))] > 10
    assert all("demo" not in value for _, labels in samples for _, value in labels)
