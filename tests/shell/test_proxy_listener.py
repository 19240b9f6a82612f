"""HAProxy's PROXY protocol on a listener, and toward the upstream, over loopback."""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio

from popguard.audit import AuditLog
from popguard.config import ProxyProtocolConfig
from popguard.core.proxy_protocol import ProxyHeaderParser, build_v1, build_v2, build_v2_local
from popguard.shell.server import (
    Endpoint,
    ListenerSpec,
    ProxyServer,
    ServerSettings,
    probe_connector,
)
from popguard.testing.demo_upstream import DemoUpstream, bound_port, sample_store

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)
ELSEWHERE = (ipaddress.ip_network("192.0.2.0/24"),)


class ListSink:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def write(self, event_dict: Any) -> None:
        self.events.append(dict(event_dict))

    def close(self) -> None:
        pass

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == name]


@dataclass
class Stack:
    port: int
    sink: ListSink
    demo: DemoUpstream


@asynccontextmanager
async def stack(
    proxy_protocol: ProxyProtocolConfig | None, send_proxy: str = "none", upstream_port: int = 0
) -> AsyncIterator[Stack]:
    demo = DemoUpstream(sample_store())
    sink = ListSink()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(demo.serve, "127.0.0.1", 0)
        spec = ListenerSpec(
            "lb", Endpoint("127.0.0.1", 0), proxy_protocol=proxy_protocol, send_proxy=send_proxy
        )
        settings = ServerSettings(
            listeners=(spec,),
            upstream=Endpoint("127.0.0.1", upstream_port or bound_port(listeners)),
        )
        proxy = ProxyServer(settings, AuditLog([sink]))
        await nursery.start(proxy.run)
        yield Stack(proxy.bound["lb"][0].port, sink, demo)
        proxy.request_shutdown(immediate=True)
        nursery.cancel_scope.cancel()


def exchange(port: int, first: bytes, then: bytes = b"") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        data = b""
        try:
            if first:
                sock.sendall(first)
            if then:
                sock.sendall(then)
            sock.shutdown(socket.SHUT_WR)
            while chunk := sock.recv(4096):
                data += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass  # a refused connection may be reset: it had unread bytes
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:  # already closed by popguard
                raise
        return data


def in_thread(fn: Any, *args: Any) -> Any:
    return trio.to_thread.run_sync(fn, *args)


async def test_trusted_v1_header_names_the_real_client() -> None:
    header = build_v1(("203.0.113.9", 51000), ("198.51.100.1", 110))
    async with stack(ProxyProtocolConfig(LOOPBACK)) as s:
        out = await in_thread(exchange, s.port, header, b"USER demo\r\nPASS demo\r\nQUIT\r\n")
    assert out.count(b"+OK") == 4
    (opened,) = s.sink.named("session.opened")
    assert opened["client"] == "203.0.113.9:51000"
    assert opened["proxy"].startswith("127.0.0.1:")


async def test_v2_header_with_pop3_bytes_in_the_same_packet() -> None:
    header = build_v2(("2001:db8::7", 40000), ("2001:db8::1", 110))
    async with stack(ProxyProtocolConfig(LOOPBACK)) as s:
        out = await in_thread(exchange, s.port, header + b"USER demo\r\n")
    assert out.startswith(b"+OK")
    assert b"USER demo" in s.demo.received_commands  # the remainder was not lost
    assert s.sink.named("session.opened")[0]["client"] == "[2001:db8::7]:40000"


async def test_untrusted_peer_is_refused_when_a_header_is_required() -> None:
    header = build_v1(("203.0.113.9", 51000), ("198.51.100.1", 110))
    async with stack(ProxyProtocolConfig(ELSEWHERE)) as s:
        out = await in_thread(exchange, s.port, header)
    assert out == b""
    (rejected,) = s.sink.named("proxy_protocol.rejected")
    assert "not a trusted network" in rejected["reason"]
    assert s.demo.received_commands == []


async def test_untrusted_peer_may_speak_for_itself_when_not_required() -> None:
    async with stack(ProxyProtocolConfig(ELSEWHERE, required=False)) as s:
        forged = build_v1(("203.0.113.9", 1), ("198.51.100.1", 110))
        out = await in_thread(exchange, s.port, b"", forged + b"QUIT\r\n")
    assert out.startswith(b"+OK")
    assert b"-ERR Malformed command keyword" in out  # a forgery is never honoured
    assert s.sink.named("session.opened")[0]["client"].startswith("127.0.0.1:")
    assert not any(cmd.startswith(b"PROXY") for cmd in s.demo.received_commands)


async def test_garbage_instead_of_a_header_is_rejected() -> None:
    async with stack(ProxyProtocolConfig(LOOPBACK)) as s:
        out = await in_thread(exchange, s.port, b"USER demo\r\n")
    assert out == b""
    assert s.sink.named("proxy_protocol.rejected")
    assert s.demo.received_commands == []


async def test_send_proxy_v2_to_the_upstream() -> None:
    seen: list[bytes] = []

    async def upstream(stream: trio.SocketStream) -> None:
        parser = ProxyHeaderParser()
        result = None
        while result is None:
            result = parser.feed(await stream.receive_some(4096))
        seen.append(result.raw)
        await stream.send_all(b"+OK hello\r\n")
        await stream.receive_some(100)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, upstream, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        header = build_v1(("203.0.113.9", 51000), ("198.51.100.1", 110))
        async with stack(ProxyProtocolConfig(LOOPBACK), "v2", upstream_port=port) as s:
            out = await in_thread(exchange, s.port, header)
        nursery.cancel_scope.cancel()
    assert out.startswith(b"+OK hello")
    assert seen == [build_v2(("203.0.113.9", 51000), ("198.51.100.1", 110))]


async def test_readiness_probe_speaks_proxy_local_where_the_upstream_expects_it() -> None:
    plain = ServerSettings(
        listeners=(ListenerSpec("a", Endpoint("127.0.0.1", 0)),),
        upstream=Endpoint("127.0.0.1", 1),
    )
    assert probe_connector(plain) is None  # a plain TCP connect, as before
    seen: list[bytes] = []

    async def upstream(stream: trio.SocketStream) -> None:
        parser = ProxyHeaderParser()
        result = None
        while result is None:
            result = parser.feed(await stream.receive_some(4096))
        seen.append(result.raw)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, upstream, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        settings = ServerSettings(
            listeners=(ListenerSpec("a", Endpoint("127.0.0.1", 0), send_proxy="v2"),),
            upstream=Endpoint("127.0.0.1", port),
        )
        connect = probe_connector(settings)
        assert connect is not None
        stream = await connect("127.0.0.1", port)
        with trio.fail_after(5):
            while not seen:
                await trio.sleep(0.01)
        await stream.aclose()
        nursery.cancel_scope.cancel()
    assert seen == [build_v2_local()]
