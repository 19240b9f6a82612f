"""TLSSocketStream: TLS with OpenSSL's record layer on the socket, over loopback TCP.

Both ends are :class:`TLSSocketStream` (or a plain ``ssl`` socket where a test
needs a peer popguard does not control); certificates come from trustme.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from popguard.audit import AuditLog
from popguard.config import ProxyProtocolConfig
from popguard.core.proxy_protocol import build_v1
from popguard.shell.server import Endpoint, ListenerSpec, ProxyServer, ServerSettings
from popguard.shell.tcp import TCPStream
from popguard.shell.tls import CertKey, ListenerTLS, UpstreamTLS, client_context, describe
from popguard.shell.tls import server_context as listener_context
from popguard.shell.tlssock import TLSSocketStream
from popguard.testing.demo_upstream import DemoUpstream, bound_port, sample_store

LIMIT = 10.0


def _write(issued: trustme.LeafCert, folder: Path, name: str) -> CertKey:
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    issued.private_key_pem.write_to_path(str(key))
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    return CertKey(str(cert), str(key))


@dataclass(frozen=True)
class PKI:
    ca_file: str
    default: CertKey  # localhost, 127.0.0.1
    other: CertKey  # mail.example.org (an sni: certificate)

    def server(self) -> ssl.SSLContext:
        """popguard's listener context: ALPN pop3, SNI certificates."""
        return listener_context(
            ListenerTLS(mode="implicit", cert=self.default, sni={"mail.example.org": self.other})
        )

    def client(self, alpn: bool = True) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca_file)
        if alpn:
            context.set_alpn_protocols(["pop3"])
        return context


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    folder = tmp_path_factory.mktemp("tlssock-pki")
    ca = trustme.CA()
    ca_file = folder / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    default = _write(ca.issue_cert("localhost", "127.0.0.1"), folder, "default")
    other = _write(ca.issue_cert("mail.example.org"), folder, "other")
    return PKI(str(ca_file), default, other)


async def tcp_pair(*, small_buffers: bool = False) -> tuple[TCPStream, TCPStream]:
    """A connected loopback TCP pair (client end, server end)."""
    listener = socket.create_server(("127.0.0.1", 0))
    with listener:
        client = socket.socket()
        if small_buffers:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(listener.getsockname())
        server, _ = listener.accept()
    if small_buffers:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    for sock in (client, server):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return TCPStream(client), TCPStream(server)


@asynccontextmanager
async def tls_pair(
    pki: PKI, *, server_hostname: str = "localhost", small_buffers: bool = False
) -> AsyncIterator[tuple[TLSSocketStream, TLSSocketStream]]:
    """(client, server), handshaken."""
    client_tcp, server_tcp = await tcp_pair(small_buffers=small_buffers)
    server = TLSSocketStream.wrap(server_tcp, pki.server(), server_side=True)
    client = TLSSocketStream.wrap(
        client_tcp, pki.client(), server_side=False, server_hostname=server_hostname
    )
    try:
        with trio.fail_after(LIMIT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.do_handshake)
                nursery.start_soon(client.do_handshake)
        yield client, server
    finally:
        client.close_now()
        server.close_now()


async def receive_exactly(stream: trio.abc.ReceiveStream, size: int, chunk: int = 65536) -> bytes:
    data = bytearray()
    while len(data) < size:
        more = await stream.receive_some(chunk)
        assert more, f"EOF after {len(data)} of {size} bytes"
        data += more
    return bytes(data)


# -- handshake, describe(), SNI, ALPN ------------------------------------------------


async def test_handshake_both_ways_and_what_describe_reports(pki: PKI) -> None:
    async with tls_pair(pki) as (client, server):
        server_info, client_info = describe(server), describe(client)
        await client.send_all(b"USER alice\r\n")
        assert await server.receive_some() == b"USER alice\r\n"
        await server.send_all(b"+OK\r\n")
        assert await client.receive_some() == b"+OK\r\n"
    assert server_info["tls_version"] in ("TLSv1.2", "TLSv1.3")
    assert server_info["cipher"] == client_info["cipher"]
    assert (server_info["sni"], server_info["alpn"]) == ("localhost", "pop3")
    assert (client_info["sni"], client_info["alpn"]) == ("localhost", "pop3")
    assert server.server_side
    assert not client.server_side


async def test_sni_chooses_the_certificate_and_is_recorded(pki: PKI) -> None:
    # The client verifies mail.example.org: only the sni: certificate passes.
    async with tls_pair(pki, server_hostname="mail.example.org") as (client, server):
        assert describe(server)["sni"] == "mail.example.org"
        assert describe(client)["sni"] == "mail.example.org"
        assert server.context is not pki.server()  # switched by the SNI callback


async def test_no_alpn_offered_selects_none(pki: PKI) -> None:
    client_tcp, server_tcp = await tcp_pair()
    server = TLSSocketStream.wrap(server_tcp, pki.server(), server_side=True)
    client = TLSSocketStream.wrap(
        client_tcp, pki.client(alpn=False), server_side=False, server_hostname="localhost"
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        nursery.start_soon(client.do_handshake)
    assert describe(server)["alpn"] is None
    client.close_now()
    server.close_now()


async def test_no_sni_for_an_address(pki: PKI) -> None:
    async with tls_pair(pki, server_hostname="127.0.0.1") as (client, server):
        assert describe(server)["sni"] is None  # RFC 6066 §3: never an address
        assert describe(client)["sni"] is None


async def test_upstream_verification_failure_is_broken(pki: PKI) -> None:
    client_tcp, server_tcp = await tcp_pair()
    server = TLSSocketStream.wrap(server_tcp, pki.server(), server_side=True)
    verify = client_context(UpstreamTLS(mode="implicit", ca_file=pki.ca_file))
    client = TLSSocketStream.wrap(
        client_tcp, verify, server_side=False, server_hostname="wrong.example.net"
    )

    async def server_side() -> None:
        with contextlib.suppress(trio.BrokenResourceError):  # the client's alert
            await server.do_handshake()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server_side)
        with pytest.raises(trio.BrokenResourceError) as caught:
            await client.do_handshake()
    assert isinstance(caught.value.__cause__, ssl.SSLCertVerificationError)
    client.close_now()
    server.close_now()


async def test_failed_handshake_leaves_a_plain_tcp_connection_to_linger_on(pki: PKI) -> None:
    client_tcp, server_tcp = await tcp_pair()
    server = TLSSocketStream.wrap(server_tcp, pki.server(), server_side=True)
    await client_tcp.send_all(b"USER demo\r\n" * 50)  # not a ClientHello
    with pytest.raises(trio.BrokenResourceError) as caught:
        await server.do_handshake()
    assert isinstance(caught.value.__cause__, ssl.SSLError)
    tcp = server.detach_tcp()
    with pytest.raises(trio.ClosedResourceError):
        await server.receive_some()
    await tcp.send_eof()
    drained = b""
    with trio.fail_after(LIMIT):
        await client_tcp.send_all(b"PASS secret\r\n")  # sent after the failure
        await client_tcp.send_eof()
        while chunk := await tcp.receive_some():
            drained += chunk
    # What came after the failure is read as plaintext (no RST on close).
    assert drained.endswith(b"PASS secret\r\n")
    tcp.close_now()
    client_tcp.close_now()


async def test_handshake_timeout_is_a_plain_cancellation(pki: PKI) -> None:
    client_tcp, server_tcp = await tcp_pair()
    server = TLSSocketStream.wrap(server_tcp, pki.server(), server_side=True)
    with pytest.raises(trio.TooSlowError), trio.fail_after(0.2):
        await server.do_handshake()  # the client never speaks
    server.close_now()
    client_tcp.close_now()


# -- transfers ---------------------------------------------------------------------


async def test_large_transfers_both_ways_with_a_slow_reader(
    pki: PKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Full duplex with want-write: small socket buffers, readers that sleep, and
    each end sending while it receives."""
    waits = 0
    wait_writable = trio.lowlevel.wait_writable

    async def counting(sock: Any) -> None:
        nonlocal waits
        waits += 1
        await wait_writable(sock)

    monkeypatch.setattr(trio.lowlevel, "wait_writable", counting)
    size = 3 * 1024 * 1024 + 17
    down = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    up = hashlib.sha256(b"up").digest() * (size // 32 + 1)
    got: dict[str, bytes] = {}

    async def slow_read(stream: TLSSocketStream, name: str, expected: int) -> None:
        data = bytearray()
        while len(data) < expected:
            await trio.sleep(0.001)
            chunk = await stream.receive_some(7000)
            assert chunk
            assert len(chunk) <= 7000
            data += chunk
        got[name] = bytes(data)

    async with tls_pair(pki, small_buffers=True) as (client, server):
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.send_all, down)
                nursery.start_soon(client.send_all, up)
                nursery.start_soon(slow_read, client, "down", len(down))
                nursery.start_soon(slow_read, server, "up", len(up))
    assert got["down"] == down
    assert got["up"] == up
    assert waits > 10  # OpenSSL said want-write, and the write was finished later


async def test_a_receive_gathers_every_record_already_there(pki: PKI) -> None:
    async with tls_pair(pki) as (client, server):
        for i in range(50):
            await server.send_all(bytes([65 + i % 26]) * 1000)  # 50 records
        await trio.sleep(0.05)
        data = await client.receive_some(65536)
        assert len(data) == 50_000  # one chunk, not one per record
        for _ in range(50):
            await server.send_all(b"y" * 1000)
        await trio.sleep(0.05)
        assert len(await client.receive_some(12_345)) == 12_345  # the size asked for
        assert len(await receive_exactly(client, 50_000 - 12_345)) == 50_000 - 12_345


async def test_receive_nowait_reads_without_yielding_and_says_when_to_wait(pki: PKI) -> None:
    async with tls_pair(pki) as (client, server):
        assert client.receive_nowait(65536) is None  # nothing sent yet
        for _ in range(20):
            await server.send_all(b"r" * 1000)  # 20 records
        with trio.fail_after(LIMIT):
            await client.wait_receivable()
        await trio.sleep(0.05)  # every record in the kernel
        before = trio.lowlevel.current_statistics().tasks_runnable
        assert client.receive_nowait(65536) == b"r" * 20_000  # one chunk
        assert trio.lowlevel.current_statistics().tasks_runnable == before
        # The read drained the kernel: until a wait, no further SSL_read is
        # tried (None at once), even though more has arrived meanwhile.
        await server.send_all(b"+OK\r\n")
        await trio.sleep(0.05)
        assert client.receive_nowait(65536) is None
        with trio.fail_after(LIMIT):
            await client.wait_receivable()  # returns at once: the data is there
        assert client.receive_nowait(65536) == b"+OK\r\n"
        await server.send_eof()
        with trio.fail_after(LIMIT):
            while (data := client.receive_nowait(65536)) is None:
                await client.wait_receivable()
        assert data == b""  # close_notify
        assert client.receive_nowait(65536) == b""


async def test_wait_receivable_is_one_waiter_at_a_time(pki: PKI) -> None:
    async with tls_pair(pki) as (client, server), trio.open_nursery() as nursery:
        nursery.start_soon(server.wait_receivable)
        await trio.sleep(0.01)
        with pytest.raises(trio.BusyResourceError):
            server.receive_nowait(100)
        with pytest.raises(trio.BusyResourceError):
            await server.receive_some()
        await client.send_all(b"x")


async def test_a_large_send_is_corked_then_flushed(pki: PKI) -> None:
    async with tls_pair(pki) as (client, server):
        payload = b"z" * 200_000  # more than one record: corked
        await server.send_all(payload)
        assert await receive_exactly(client, len(payload)) == payload
        await server.send_all(b"+OK\r\n")  # not held behind the cork
        with trio.fail_after(LIMIT):
            assert await client.receive_some() == b"+OK\r\n"


async def test_one_receiver_and_one_sender_at_a_time(pki: PKI) -> None:
    async with tls_pair(pki) as (client, server), trio.open_nursery() as nursery:
        nursery.start_soon(server.receive_some)
        await trio.sleep(0.01)
        with pytest.raises(trio.BusyResourceError):
            await server.receive_some()
        await client.send_all(b"x")


# -- the end: close_notify, EOF without it, close ----------------------------------


async def test_send_eof_is_close_notify_and_the_other_direction_stays_open(pki: PKI) -> None:
    async with tls_pair(pki) as (client, server):
        await server.send_all(b"+OK bye\r\n")
        await server.send_eof()
        with pytest.raises(trio.ClosedResourceError):
            await server.send_all(b"more")
        assert await client.receive_some() == b"+OK bye\r\n"
        assert await client.receive_some() == b""  # close_notify: a clean end
        assert await client.receive_some() == b""
        await client.send_all(b"QUIT\r\n")  # half-closed: still readable
        assert await server.receive_some() == b"QUIT\r\n"
        await client.send_eof()
        assert await server.receive_some() == b""


async def test_send_eof_keeps_what_the_peer_had_already_sent(pki: PKI) -> None:
    """SSL_shutdown would fail on application data (APPLICATION_DATA_AFTER_CLOSE_NOTIFY)
    and lose it: send_eof decrypts it first and keeps it for the next receive."""
    async with tls_pair(pki) as (client, server):
        await client.send_all(b"NOOP\r\n")
        await trio.sleep(0.05)  # in the server's socket, unread
        await server.send_eof()
        assert await server.receive_some() == b"NOOP\r\n"
        assert await client.receive_some() == b""


async def test_eof_without_close_notify_is_broken(pki: PKI) -> None:
    async with tls_pair(pki) as (client, server):
        await client.send_all(b"last words")
        client.socket.shutdown(socket.SHUT_WR)  # a truncation (TCP FIN), not a TLS close
        assert await server.receive_some() == b"last words"
        with pytest.raises(trio.BrokenResourceError) as caught:
            await server.receive_some()
        assert isinstance(caught.value.__cause__, ssl.SSLEOFError)
        with pytest.raises(trio.BrokenResourceError):
            await server.receive_some()  # and it stays broken


async def test_reset_after_data_is_broken(pki: PKI) -> None:
    """The client closes with the server's TLS 1.3 session tickets unread,
    so the kernel sends RST: the data before it is delivered, then Broken."""
    async with tls_pair(pki) as (client, server):
        await client.send_all(b"last words")
        client.close_now()
        assert await server.receive_some() == b"last words"
        with pytest.raises(trio.BrokenResourceError) as caught:
            await server.receive_some()
        assert isinstance(caught.value.__cause__, OSError)


async def test_aclose_sends_close_notify(pki: PKI) -> None:
    async with tls_pair(pki) as (client, server):
        await server.aclose()
        assert await client.receive_some() == b""
        with pytest.raises(trio.ClosedResourceError):
            await server.receive_some()
        await server.aclose()  # again: nothing happens


async def test_close_now_wakes_a_waiting_receiver(pki: PKI) -> None:
    async with tls_pair(pki) as (_, server):

        async def close_soon() -> None:
            await trio.sleep(0.05)
            server.close_now()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(close_soon)
            with pytest.raises(trio.ClosedResourceError):
                await server.receive_some()


# -- through the server: POP3S behind a PROXY header --------------------------------


async def test_pop3s_behind_a_proxy_header_in_the_same_segment(pki: PKI) -> None:
    """The PROXY header is peeked and only it is taken, so the ClientHello that
    follows it in the same segment is read by OpenSSL from the socket."""
    demo = DemoUpstream(sample_store())
    events: list[dict[str, Any]] = []

    class Sink:
        def write(self, event: Any) -> None:
            events.append(dict(event))

        def close(self) -> None:
            pass

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(demo.serve, "127.0.0.1", 0)
        spec = ListenerSpec(
            "lb",
            Endpoint("127.0.0.1", 0),
            ListenerTLS(mode="implicit", cert=pki.default),
            proxy_protocol=ProxyProtocolConfig((ipaddress.ip_network("127.0.0.0/8"),)),
        )
        settings = ServerSettings(
            listeners=(spec,), upstream=Endpoint("127.0.0.1", bound_port(listeners))
        )
        proxy = ProxyServer(settings, AuditLog([Sink()]))
        await nursery.start(proxy.run)
        port = proxy.bound["lb"][0].port

        def header_and_hello() -> bytes:
            sock = socket.create_connection(("127.0.0.1", port), timeout=LIMIT)
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            tls = pki.client().wrap_bio(incoming, outgoing, server_hostname="localhost")
            header = build_v1(("192.0.2.7", 40000), ("127.0.0.1", port))
            sent_header = False
            with sock:
                while True:
                    try:
                        tls.do_handshake()
                        break
                    except ssl.SSLWantReadError:
                        pending = outgoing.read()
                        if not sent_header:
                            pending = header + pending  # header + ClientHello together
                            sent_header = True
                        if pending:
                            sock.sendall(pending)
                        data = sock.recv(65536)
                        assert data
                        incoming.write(data)
                if outgoing.pending:
                    sock.sendall(outgoing.read())
                greeting = b""
                while not greeting.endswith(b"\r\n"):
                    try:
                        greeting += tls.read(4096)
                    except ssl.SSLWantReadError:
                        incoming.write(sock.recv(65536))
                tls.write(b"QUIT\r\n")
                sock.sendall(outgoing.read())
                return greeting

        greeting = await trio.to_thread.run_sync(header_and_hello)
        proxy.request_shutdown(immediate=True)
        with trio.fail_after(LIMIT):
            while proxy.active_sessions:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert greeting.startswith(b"+OK")
    (established,) = [e for e in events if e["event"] == "tls.established"]
    assert established["side"] == "client"
    (opened,) = [e for e in events if e["event"] == "session.opened"]
    assert opened["client"] == "192.0.2.7:40000"
