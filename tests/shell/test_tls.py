"""TLS toward clients over loopback: POP3S, STLS, the STLS injection class, require_tls.

Certificates come from trustme (a throwaway CA).  The upstream is the demo
server in plaintext; TLS to a real upstream (Dovecot's STLS and POP3S) is
covered by the integration tests.
"""

from __future__ import annotations

import poplib
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
from popguard.policy.model import Match, PolicySet, Rule
from popguard.policy.session import PolicyHolder, PolicyShared
from popguard.shell.server import Endpoint, ListenerSpec, ProxyServer, ServerSettings
from popguard.shell.tls import CertKey, ListenerTLS
from popguard.testing.demo_upstream import DemoUpstream, bound_port, sample_store


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
class TLSStack:
    proxy: ProxyServer
    demo: DemoUpstream
    port: int
    sink: ListSink
    client_context: ssl.SSLContext


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def cert_files(ca: trustme.CA, tmp_path: Path) -> CertKey:
    issued = ca.issue_cert("localhost", "127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    issued.private_key_pem.write_to_path(str(key))
    with cert.open("wb") as out:
        for blob in issued.cert_chain_pems:
            out.write(blob.bytes())
    return CertKey(str(cert), str(key))


@asynccontextmanager
async def tls_stack(
    ca: trustme.CA, certs: CertKey, mode: str, policies: PolicySet | None = None
) -> AsyncIterator[TLSStack]:
    demo = DemoUpstream(sample_store())
    sink = ListSink()
    audit = AuditLog([sink])
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(demo.serve, "127.0.0.1", 0)
        tls = ListenerTLS(mode=mode, cert=certs)  # type: ignore[arg-type]
        settings = ServerSettings(
            listeners=(ListenerSpec("test", Endpoint("127.0.0.1", 0), tls),),
            upstream=Endpoint("127.0.0.1", bound_port(listeners)),
        )
        shared = None
        if policies is not None:
            shared = PolicyShared(PolicyHolder(policies), trio.current_time)
        proxy = ProxyServer(settings, audit, policies=shared)
        await nursery.start(proxy.run)
        context = ssl.create_default_context()
        ca.configure_trust(context)
        yield TLSStack(proxy, demo, proxy.bound["test"][0].port, sink, context)
        proxy.request_shutdown(immediate=True)
        with trio.fail_after(10):
            while proxy.active_sessions:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()


def in_thread(fn: Any, *args: Any) -> Any:
    return trio.to_thread.run_sync(fn, *args)


def read_line(sock: Any) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def read_multiline(sock: Any) -> bytes:
    data = b""
    while not data.endswith(b"\r\n.\r\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


async def test_pop3s_with_poplib(ca: trustme.CA, cert_files: CertKey) -> None:
    async with tls_stack(ca, cert_files, "implicit") as s:

        def session() -> tuple[bytes, list[bytes]]:
            pop = poplib.POP3_SSL("127.0.0.1", s.port, context=s.client_context, timeout=10)
            pop.user("demo")
            pop.pass_("demo")
            _, lines, _ = pop.retr(1)
            welcome = pop.getwelcome()
            pop.quit()
            return welcome, lines

        welcome, lines = await in_thread(session)
    assert welcome.startswith(b"+OK")
    assert lines
    (record,) = s.sink.named("tls.established")
    assert (record["side"], record["stls"], record["alpn"]) == ("client", False, None)
    assert record["tls_version"] in ("TLSv1.2", "TLSv1.3")
    assert s.sink.named("message.retrieved")


async def test_stls_with_poplib_and_alpn(ca: trustme.CA, cert_files: CertKey) -> None:
    async with tls_stack(ca, cert_files, "starttls") as s:

        def session() -> tuple[dict[str, Any], dict[str, Any]]:
            pop = poplib.POP3("127.0.0.1", s.port, timeout=10)
            before = pop.capa()
            s.client_context.set_alpn_protocols(["pop3"])
            pop.stls(context=s.client_context)
            after = pop.capa()
            pop.user("demo")
            pop.pass_("demo")
            pop.stat()
            pop.quit()
            return before, after

        before, after = await in_thread(session)
    assert "STLS" in before
    assert "STLS" not in after  # RFC 2595 §4: not offered once TLS is active
    assert b"STLS" not in b"".join(s.demo.received_commands)  # never forwarded
    (record,) = s.sink.named("tls.established")
    assert (record["side"], record["stls"], record["alpn"]) == ("client", True, "pop3")


async def test_bytes_pipelined_after_stls_are_never_executed(
    ca: trustme.CA, cert_files: CertKey
) -> None:
    # CVE-2011-0411 class: "STLS\r\nUSER x\r\n" in one plaintext packet must
    # not run USER x after the handshake.
    async with tls_stack(ca, cert_files, "starttls") as s:

        def session() -> tuple[bytes, bytes]:
            raw = socket.create_connection(("127.0.0.1", s.port), timeout=10)
            read_line(raw)  # greeting
            raw.sendall(b"STLS\r\nUSER injected\r\n")
            ok = read_line(raw)
            tls = s.client_context.wrap_socket(raw, server_hostname="localhost")
            tls.sendall(b"USER demo\r\n")
            noop = read_line(tls)
            tls.sendall(b"QUIT\r\n")
            read_line(tls)
            tls.close()
            return ok, noop

        ok, noop = await in_thread(session)
    assert ok == b"+OK Begin TLS negotiation\r\n"
    assert noop.startswith(b"+OK")
    assert b"USER injected" not in s.demo.received_commands
    assert b"USER demo" in s.demo.received_commands  # sent after the handshake
    (rejected,) = s.sink.named("command.rejected")
    assert "discarded" in rejected["reason"]
    assert "CVE-2011-0411" in rejected["reason"]


async def test_stls_is_refused_where_it_is_not_allowed(ca: trustme.CA, cert_files: CertKey) -> None:
    async with tls_stack(ca, cert_files, "starttls") as s:

        def session() -> list[bytes]:
            raw = socket.create_connection(("127.0.0.1", s.port), timeout=10)
            read_line(raw)
            replies = []
            # Behind a command still in progress: refused (no reply may be
            # owed across the handshake).
            raw.sendall(b"USER demo\r\nSTLS\r\n")
            replies += [read_line(raw), read_line(raw)]
            raw.sendall(b"PASS demo\r\n")
            read_line(raw)
            raw.sendall(b"STLS\r\n")  # after login
            replies.append(read_line(raw))
            raw.close()
            return replies

        replies = await in_thread(session)
    assert replies[0].startswith(b"+OK")
    assert replies[1] == b"-ERR STLS must not follow commands still in progress\r\n"
    assert replies[2] == b"-ERR STLS is only allowed before login\r\n"


async def test_failed_handshake_ends_only_that_session(ca: trustme.CA, cert_files: CertKey) -> None:
    async with tls_stack(ca, cert_files, "implicit") as s:

        def plaintext_client() -> bytes:
            raw = socket.create_connection(("127.0.0.1", s.port), timeout=10)
            raw.sendall(b"USER demo\r\n" * 50)  # not a ClientHello
            data = b""
            while chunk := raw.recv(4096):
                data += chunk
            return data

        out = await in_thread(plaintext_client)

        def good() -> bytes:
            pop = poplib.POP3_SSL("127.0.0.1", s.port, context=s.client_context, timeout=10)
            welcome = pop.getwelcome()
            pop.quit()
            return welcome

        welcome = await in_thread(good)
    assert b"+OK" not in out  # no POP3 reply in plaintext
    assert welcome.startswith(b"+OK")
    closed = s.sink.named("session.closed")
    assert closed[0]["reason"] == "client_error"
    assert "TLS handshake failed" in closed[0]["detail"]
    assert s.demo.received_commands.count(b"QUIT") == 1  # only the good session's


async def test_require_tls_policy(ca: trustme.CA, cert_files: CertKey) -> None:
    rules = PolicySet((Rule("tls-first", "p.yaml", 1, Match(), "enforce", {"require_tls": True}),))
    async with tls_stack(ca, cert_files, "starttls", policies=rules) as s:

        def session() -> tuple[bytes, bytes, bytes, bytes]:
            raw = socket.create_connection(("127.0.0.1", s.port), timeout=10)
            read_line(raw)
            raw.sendall(b"CAPA\r\n")
            capa = read_multiline(raw)
            raw.sendall(b"USER demo\r\nPASS demo\r\n")
            refused = read_line(raw) + read_line(raw)
            raw.sendall(b"STLS\r\n")
            read_line(raw)
            tls = s.client_context.wrap_socket(raw, server_hostname="localhost")
            tls.sendall(b"CAPA\r\n")
            capa_tls = read_multiline(tls)
            tls.sendall(b"USER demo\r\nPASS demo\r\n")
            accepted = read_line(tls) + read_line(tls)
            tls.close()
            return capa, refused, capa_tls, accepted

        capa, refused, capa_tls, accepted = await in_thread(session)
    assert b"STLS\r\n" in capa
    assert b"\r\nUSER\r\n" not in capa
    assert b"\r\nSASL" not in capa
    assert refused.count(b"-ERR [AUTH] Plaintext authentication disallowed") == 2
    assert b"USER\r\n" in capa_tls
    assert accepted.count(b"+OK") == 2
    # The password never went upstream in clear: USER/PASS reached the demo
    # server once, after TLS.
    assert s.demo.received_commands.count(b"USER demo") == 1
    assert s.sink.named("policy.denied")[0]["setting"] == "require_tls"
