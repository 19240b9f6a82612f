"""STARTTLS hardening: one regression test per known bug class, named after it.

The classes come from the public record of mail servers and proxies:

* CVE-2011-0411 (Postfix) and its relatives (nginx mail CVE-2014-3556,
  Dovecot submission CVE-2021-33515): plaintext pipelined behind STARTTLS
  executed as if it had come over TLS.
* Poddebniak et al., "Why TLS is better without STARTTLS" (USENIX Security
  2021, "NO STARTTLS"): *response injection* (a client, here popguard toward
  its upstream, accepting bytes sent before the handshake as if they came
  after it), *STARTTLS stripping* (a refused or missing STARTTLS making the
  client go on in plaintext), and STARTTLS in the wrong state.
* nginx's mail proxy tests: over-long lines and garbage around STARTTLS.

Each test runs popguard in process between a client written here and, where
the upstream must misbehave, a small hostile upstream written here (a trio
listener).  Certificates come from trustme.

Four tests here began as strict xfails for bugs they found, since fixed:
the greeting held back with STLS upstream, a held STLS whose handshake
stalled, an IP literal recorded as the upstream's SNI, and TLS sessions
ended without close_notify.  They now guard the fixes.  (A strict xfail that
must fail for one exact reason cannot use ``raises=`` in a pytest-trio test,
which wraps every error in an ExceptionGroup: write it as a plain test that
calls ``trio.run`` itself.)
"""

from __future__ import annotations

import contextlib
import ipaddress
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import trustme
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from popguard.audit import AuditLog
from popguard.core.grammar import (
    CommandSyntaxError,
    Status,
    escape_text,
    parse_command,
    parse_status,
    reply_text,
)
from popguard.core.identity import IdentityRefused
from popguard.core.limits import Limits
from popguard.core.records import EndReason
from popguard.core.replies import (
    REPLY_STLS_ACTIVE,
    REPLY_STLS_BEGIN,
    REPLY_STLS_PIPELINED,
    REPLY_STLS_STATE,
    REPLY_STLS_UNAVAILABLE,
    REPLY_UPSTREAM_BROKEN,
    REPLY_UPSTREAM_UNAVAILABLE,
)
from popguard.core.sasl import decode_base64
from popguard.core.session import ProxySession
from popguard.policy.model import Match, PolicySet, Rule, Throttle
from popguard.policy.session import PolicyHolder, PolicyShared, SessionPolicy
from popguard.shell.relay import MAX_PRE_TLS_LINE, UpstreamTLSError, _read_line
from popguard.shell.server import Endpoint, ListenerSpec, ProxyServer, ServerSettings
from popguard.shell.tls import CertKey, ListenerTLS, UpstreamTLS

LIMIT = 10.0  # seconds for anything that should take milliseconds on loopback
GREETING = b"+OK hostile.test POP3 ready <1896.697170952@hostile.test>\r\n"


# -- certificates ----------------------------------------------------------------


@dataclass(frozen=True)
class PKI:
    ca: trustme.CA
    ca_file: str
    listener: CertKey  # popguard's, for "localhost" and 127.0.0.1
    upstream: CertKey  # the hostile upstream's, for 127.0.0.1

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca_file)
        context.set_alpn_protocols(["pop3"])
        return context

    def upstream_context(self, **versions: ssl.TLSVersion) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.upstream.cert, self.upstream.key)
        if versions:
            context.set_ciphers("DEFAULT:@SECLEVEL=0")
            context.minimum_version = versions["minimum"]
            context.maximum_version = versions["maximum"]
        return context


def _write(issued: trustme.LeafCert, folder: Path, name: str) -> CertKey:
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    issued.private_key_pem.write_to_path(str(key))
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    return CertKey(str(cert), str(key))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    folder = tmp_path_factory.mktemp("hardening-pki")
    ca = trustme.CA()
    ca_file = folder / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    listener = _write(ca.issue_cert("localhost", "127.0.0.1"), folder, "listener")
    upstream = _write(ca.issue_cert("127.0.0.1", "upstream.test"), folder, "upstream")
    return PKI(ca, str(ca_file), listener, upstream)


# -- a hostile upstream ----------------------------------------------------------


class Peer:
    """The upstream's end of one connection: lines in, bytes out, TLS on demand."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = bytearray()
        #: Everything popguard sent, decrypted where TLS was on.
        self.received = bytearray()

    async def line(self) -> bytes:
        while (end := self.buf.find(b"\n")) == -1:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise EOFError
            self.received += chunk
            self.buf += chunk
        line = bytes(self.buf[: end + 1])
        del self.buf[: end + 1]
        return line

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def start_tls(self, context: ssl.SSLContext) -> None:
        assert not self.buf, bytes(self.buf)
        tls = trio.SSLStream(self.stream, context, server_side=True)
        await tls.do_handshake()
        self.stream = tls

    async def drain(self) -> None:
        """Read until popguard closes the connection."""
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while chunk := await self.stream.receive_some(65536):
                self.received += chunk


Script = Callable[[Peer], Awaitable[None]]


async def serve_pop3(peer: Peer, *, capa: bytes = b"", greet: bool = True) -> None:
    """A well-behaved POP3 server: every command +OK, CAPA with ``capa``, QUIT ends."""
    if greet:
        await peer.send(GREETING)
    while True:
        line = await peer.line()
        verb = line.split(None, 1)[0].upper() if line.strip() else b""
        if verb == b"CAPA":
            await peer.send(b"+OK Capability list follows\r\n" + capa + b"TOP\r\nUSER\r\n.\r\n")
        elif verb == b"AUTH":
            await peer.send(b"-ERR Unsupported authentication mechanism\r\n")
        elif verb == b"QUIT":
            await peer.send(b"+OK bye\r\n")
            return
        else:
            await peer.send(b"+OK " + verb + b" done\r\n")


@dataclass
class Upstream:
    script: Script
    port: int = 0
    peers: list[Peer] = field(default_factory=list)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        peer = Peer(stream)
        self.peers.append(peer)
        try:
            await self.script(peer)
            await peer.drain()
        except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(peer.stream)

    def commands(self) -> list[bytes]:
        """Every line popguard sent, over every connection."""
        return [line for peer in self.peers for line in bytes(peer.received).splitlines()]


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
    proxy: ProxyServer
    upstream: Upstream
    sink: ListSink
    port: int

    async def wait_for(self, name: str, count: int = 1) -> list[dict[str, Any]]:
        with trio.fail_after(LIMIT):
            while len(self.sink.named(name)) < count:
                await trio.sleep(0.01)
        return self.sink.named(name)


@asynccontextmanager
async def stack(
    pki: PKI,
    *,
    listener: str = "starttls",
    upstream: str = "none",
    script: Script = serve_pop3,
    policies: PolicySet | None = None,
    **upstream_tls: Any,
) -> AsyncIterator[Stack]:
    fake = Upstream(script)
    sink = ListSink()
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.serve)
        upstream_tls.setdefault("ca_file", pki.ca_file)
        settings = ServerSettings(
            listeners=(
                ListenerSpec(
                    "h",
                    Endpoint("127.0.0.1", 0),
                    ListenerTLS(mode=listener, cert=pki.listener),  # type: ignore[arg-type]
                ),
            ),
            upstream=Endpoint("127.0.0.1", fake.port),
            upstream_tls=UpstreamTLS(mode=upstream, **upstream_tls),  # type: ignore[arg-type]
        )
        shared = None
        if policies is not None:
            shared = PolicyShared(PolicyHolder(policies), trio.current_time)
        proxy = ProxyServer(settings, AuditLog([sink]), policies=shared)
        await nursery.start(proxy.run)
        yield Stack(proxy, fake, sink, proxy.bound["h"][0].port)
        proxy.request_shutdown(immediate=True)
        with trio.fail_after(LIMIT):
            while proxy.active_sessions:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()


class Client:
    """The test's POP3 client: one ``send`` is one write (one segment: TCP_NODELAY)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = bytearray()

    @classmethod
    async def connect(cls, port: int) -> Client:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def line(self) -> bytes:
        with trio.fail_after(LIMIT):
            while (end := self.buf.find(b"\n")) == -1:
                chunk = await self.stream.receive_some(65536)
                if not chunk:
                    raise EOFError(bytes(self.buf))
                self.buf += chunk
        line = bytes(self.buf[: end + 1])
        del self.buf[: end + 1]
        return line

    async def reply(self, multiline: bool = False) -> bytes:
        status = await self.line()
        if not (multiline and status.startswith(b"+OK")):
            return status
        parts = [status]
        while (line := await self.line()) != b".\r\n":
            parts.append(line)
        return b"".join([*parts, line])

    async def command(self, line: bytes, multiline: bool = False) -> bytes:
        await self.send(line + b"\r\n")
        return await self.reply(multiline)

    async def starttls(self, context: ssl.SSLContext, limit: float = LIMIT) -> None:
        assert not self.buf, f"plaintext queued before the handshake: {bytes(self.buf)!r}"
        tls = trio.SSLStream(self.stream, context, server_hostname="localhost")
        with trio.fail_after(limit):
            await tls.do_handshake()
        self.stream = tls

    async def rest(self) -> bytes:
        """Everything until the connection ends (EOF, reset or a TLS error)."""
        data = bytes(self.buf)
        self.buf.clear()
        with trio.fail_after(LIMIT):
            try:
                while chunk := await self.stream.receive_some(65536):
                    data += chunk
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        return data

    async def close(self) -> None:
        await trio.aclose_forcefully(self.stream)


# -- 1. CVE-2011-0411: plaintext command injection after STLS --------------------

INJECTION = b"STLS\r\nUSER injected\r\n"


@pytest.mark.parametrize(
    "chunks",
    [
        pytest.param([INJECTION], id="one-packet"),
        pytest.param([b"ST", b"LS\r\nUSER injected\r\n"], id="split-in-verb"),
        pytest.param([b"STLS\r", b"\nUSER injected\r\n"], id="split-in-crlf"),
        pytest.param([b"stls\nuser injected\n"], id="lowercase-bare-lf"),
        pytest.param([b"STLS now please\r\nUSER injected\r\n"], id="stls-with-arguments"),
    ],
)
async def test_cve_2011_0411_plaintext_command_injection_after_stls(
    pki: PKI, chunks: list[bytes]
) -> None:
    """Whatever follows STLS in the read that completes its line is thrown away."""
    async with stack(pki) as s:
        c = await Client.connect(s.port)
        assert await c.line() == GREETING
        for i, chunk in enumerate(chunks):
            if i:
                await trio.sleep(0.05)  # a separate read, as far as TCP allows
            await c.send(chunk)
        ok = await c.line()
        await c.starttls(pki.client_context())
        noop = await c.command(b"NOOP")
        user = await c.command(b"USER alice")
        await c.command(b"QUIT")
        await c.close()
        await s.wait_for("session.closed")
    assert ok == REPLY_STLS_BEGIN
    # Had "USER injected" run, NOOP would have got its reply.
    assert noop == b"+OK NOOP done\r\n"
    assert user == b"+OK USER done\r\n"
    assert s.upstream.commands() == [b"NOOP", b"USER alice", b"QUIT"]
    (rejected,) = s.sink.named("command.rejected")
    injected = len(b"".join(chunks).split(b"\n", 1)[1])
    assert rejected["reason"] == (
        f"{injected} octets pipelined after STLS discarded (CVE-2011-0411)"
    )
    (tls,) = s.sink.named("tls.established")
    assert (tls["side"], tls["stls"]) == ("client", True)


async def test_cve_2011_0411_injection_split_across_reads(pki: PKI) -> None:
    """The injected line split over two reads: the head is discarded with STLS, the
    tail (if TCP kept it apart) reaches the TLS layer and breaks the handshake."""
    async with stack(pki) as s:
        c = await Client.connect(s.port)
        await c.line()
        await c.send(b"STLS\r\nUSER inj")
        await trio.sleep(0.05)
        await c.send(b"ected\r\n")
        assert await c.line() == REPLY_STLS_BEGIN
        try:
            await c.starttls(pki.client_context())
            assert await c.command(b"NOOP") == b"+OK NOOP done\r\n"  # coalesced by TCP
            await c.command(b"QUIT")
        except trio.BrokenResourceError:
            pass  # the usual case: "ected\r\n" was read as a TLS record
        await c.close()
        (closed,) = await s.wait_for("session.closed")
    assert not any(b"inj" in line or b"ected" in line for line in s.upstream.commands())
    if closed["reason"] != "quit":
        assert closed["reason"] == "client_error"
        assert closed["detail"].startswith("TLS handshake failed")
        assert s.upstream.commands() == []


async def test_cve_2011_0411_injection_sent_after_the_ok_is_never_a_command(pki: PKI) -> None:
    """Plaintext that arrives after popguard's +OK is read as TLS, and fails as TLS."""
    async with stack(pki) as s:
        c = await Client.connect(s.port)
        await c.line()
        await c.send(b"STLS\r\n")
        assert await c.line() == REPLY_STLS_BEGIN
        await c.send(b"USER injected\r\nPASS secret\r\n")  # not a ClientHello
        rest = await c.rest()
        await c.close()
        (closed,) = await s.wait_for("session.closed")
    assert b"+OK" not in rest
    assert closed["reason"] == "client_error"
    assert closed["detail"].startswith("TLS handshake failed")
    assert s.upstream.commands() == []  # the upstream heard nothing at all
    assert not s.sink.named("tls.established")


# -- 2. NO STARTTLS: response injection toward the upstream -----------------------


def hostile_stls(reply: bytes, *, split: bool = False, after_greeting: bytes = b"") -> Script:
    """An upstream that answers STLS with ``reply`` (and then does TLS if asked to)."""

    async def script(peer: Peer) -> None:
        await peer.send(GREETING + after_greeting)
        if await peer.line() != b"STLS\r\n":
            return
        first, _, injected = reply.partition(b"\r\n")
        if split:
            await peer.send(first + b"\r\n")
            await trio.sleep(0.1)
            await peer.send(injected)
        else:
            await peer.send(reply)
        await peer.drain()

    return script


@pytest.mark.parametrize("listener", ["none", "starttls", "implicit"])
@pytest.mark.parametrize(
    "script",
    [
        pytest.param(hostile_stls(b"+OK\r\n+OK injected\r\n"), id="one-packet"),
        pytest.param(hostile_stls(b"+OK\r\n+OK injected\r\n", split=True), id="split"),
        pytest.param(hostile_stls(b"+OK\r\n", after_greeting=b"+OK injected\r\n"), id="greeting"),
    ],
)
async def test_no_starttls_response_injection_upstream(
    pki: PKI, listener: str, script: Script
) -> None:
    async with stack(pki, listener=listener, upstream="starttls", script=script) as s:
        c = await Client.connect(s.port)
        if listener == "implicit":
            await c.starttls(pki.client_context())
        got = await c.rest()
        await c.close()
        (failed,) = await s.wait_for("upstream.failed")
        (closed,) = await s.wait_for("session.closed")
    assert got == REPLY_UPSTREAM_UNAVAILABLE  # no greeting, nothing injected
    assert closed["reason"] == "upstream_unreachable"
    assert failed["error"].startswith(
        (
            "upstream sent data after its greeting, before STLS",
            "upstream sent data after +OK to STLS, before TLS",
            "TLS handshake failed",  # TCP kept the injection apart: it is not TLS
        )
    ), failed
    assert not [e for e in s.sink.named("tls.established") if e["side"] == "upstream"]
    # popguard said STLS (or nothing, the greeting being suspect), then at most
    # started a handshake: never a command in plaintext.
    (peer,) = s.upstream.peers
    heard = bytes(peer.received)
    assert heard in (b"", b"STLS\r\n") or heard.startswith(b"STLS\r\n\x16\x03"), heard


# -- 3. NO STARTTLS: stripping (the upstream will not do TLS) -------------------


def refusing(greeting: bytes, stls_reply: bytes | None) -> Script:
    async def script(peer: Peer) -> None:
        await peer.send(greeting)
        if stls_reply is None:
            await peer.stream.aclose()  # hang up instead of answering
            return
        await peer.line()
        await peer.send(stls_reply)
        # A stripping attacker would now happily take plaintext commands.
        await serve_pop3(peer, greet=False)

    return script


@pytest.mark.parametrize(
    ("script", "error"),
    [
        pytest.param(refusing(GREETING, b"-ERR not now\r\n"), "refused STLS", id="err"),
        pytest.param(
            refusing(GREETING, b"-ERR [SYS/TEMP] TLS unavailable\r\n"),
            "refused STLS",
            id="err-sys-temp",
        ),
        pytest.param(refusing(GREETING, b"garbage\r\n"), "refused STLS", id="garbage"),
        pytest.param(refusing(GREETING, None), "closed|reset", id="hang-up"),
        pytest.param(
            refusing(b"-ERR go away\r\n", None), "greeting was not +OK", id="err-greeting"
        ),
    ],
)
async def test_no_starttls_downgrade_upstream_refuses_stls(
    pki: PKI, script: Script, error: str
) -> None:
    async with stack(pki, listener="none", upstream="starttls", script=script) as s:
        c = await Client.connect(s.port)
        # A client that does not wait: its credentials must never go out in clear.
        await c.send(b"USER alice\r\nPASS secret\r\n")
        got = await c.rest()
        await c.close()
        (failed,) = await s.wait_for("upstream.failed")
    assert got == REPLY_UPSTREAM_UNAVAILABLE
    assert any(word in failed["error"] for word in error.split("|")), failed
    assert s.upstream.commands() in ([b"STLS"], [])
    assert not s.sink.named("auth.succeeded")


async def test_no_starttls_downgrade_upstream_speaks_plaintext_after_ok(pki: PKI) -> None:
    """+OK to STLS, then plaintext POP3 instead of a ServerHello: the handshake fails."""

    async def script(peer: Peer) -> None:
        await peer.send(GREETING)
        await peer.line()
        await peer.send(b"+OK go ahead\r\n")
        await peer.line()  # whatever popguard sends next is taken as a command
        await peer.send(b"+OK\r\n")

    async with stack(pki, listener="none", upstream="starttls", script=script) as s:
        c = await Client.connect(s.port)
        got = await c.rest()
        await c.close()
        (failed,) = await s.wait_for("upstream.failed")
    assert got == REPLY_UPSTREAM_UNAVAILABLE
    assert failed["error"].startswith("TLS handshake failed")


async def test_no_starttls_downgrade_implicit_upstream_speaks_plaintext(pki: PKI) -> None:
    async with stack(pki, listener="none", upstream="implicit") as s:  # serve_pop3: no TLS
        c = await Client.connect(s.port)
        got = await c.rest()
        await c.close()
        (failed,) = await s.wait_for("upstream.failed")
    assert got == REPLY_UPSTREAM_UNAVAILABLE
    assert failed["error"].startswith("TLS handshake failed")
    (peer,) = s.upstream.peers
    assert bytes(peer.received).startswith(b"\x16\x03")  # a ClientHello, nothing in clear


@pytest.mark.skipif(not ssl.HAS_TLSv1_1, reason="this OpenSSL has no TLS 1.1 at all")
@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
@pytest.mark.parametrize("opt_in", [False, True])
async def test_legacy_tls_upstream_needs_the_explicit_opt_in(pki: PKI, opt_in: bool) -> None:
    """An upstream stuck at TLS 1.1 is refused unless tls_min_version says TLSv1.1."""
    context = pki.upstream_context(minimum=ssl.TLSVersion.TLSv1_1, maximum=ssl.TLSVersion.TLSv1_1)

    async def script(peer: Peer) -> None:
        await peer.start_tls(context)
        await serve_pop3(peer)

    extra = {"min_version": "TLSv1.1"} if opt_in else {}
    async with stack(pki, listener="none", upstream="implicit", script=script, **extra) as s:
        c = await Client.connect(s.port)
        greeting = await c.line()
        if opt_in:
            assert await c.command(b"QUIT") == b"+OK bye\r\n"
        await c.close()
        await s.wait_for("session.closed")
    warnings = [e["warning"] for e in s.sink.named("popguard.tls_warning")]
    if opt_in:
        assert greeting == GREETING
        (tls,) = s.sink.named("tls.established")
        assert (tls["side"], tls["tls_version"]) == ("upstream", "TLSv1.1")
        assert warnings == ["upstream TLS allows TLSv1.1 (upstream.tls_min_version)"]
    else:
        assert greeting == REPLY_UPSTREAM_UNAVAILABLE
        (failed,) = s.sink.named("upstream.failed")
        assert "TLS handshake failed" in failed["error"]
        assert warnings == []


# -- 4. STLS in the wrong state --------------------------------------------------


async def test_stls_after_auth_refused(pki: PKI) -> None:
    async with stack(pki) as s:
        c = await Client.connect(s.port)
        await c.line()
        assert (await c.command(b"USER alice")).startswith(b"+OK")
        assert (await c.command(b"PASS secret")).startswith(b"+OK")
        refused = await c.command(b"STLS")
        after = await c.command(b"NOOP")  # the session goes on, in the same state
        await c.command(b"QUIT")
        await c.close()
        await s.wait_for("session.closed")
    assert refused == REPLY_STLS_STATE
    assert after == b"+OK NOOP done\r\n"
    assert b"STLS" not in s.upstream.commands()
    assert not s.sink.named("tls.established")
    (rejected,) = s.sink.named("command.rejected")
    assert (rejected["command"], rejected["reason"]) == ("STLS", "STLS after login")


@pytest.mark.parametrize(
    ("listener", "reply"),
    [("implicit", REPLY_STLS_ACTIVE), ("none", REPLY_STLS_UNAVAILABLE)],
)
async def test_stls_where_not_offered_or_already_encrypted_refused(
    pki: PKI, listener: str, reply: bytes
) -> None:
    async with stack(pki, listener=listener) as s:
        c = await Client.connect(s.port)
        if listener == "implicit":
            await c.starttls(pki.client_context())
        await c.line()
        got = await c.command(b"STLS")
        await c.command(b"QUIT")
        await c.close()
        await s.wait_for("session.closed")
    assert got == reply
    assert s.upstream.commands() == [b"QUIT"]


async def test_stls_twice_refused(pki: PKI) -> None:
    async with stack(pki) as s:
        c = await Client.connect(s.port)
        await c.line()
        assert await c.command(b"STLS") == REPLY_STLS_BEGIN
        await c.starttls(pki.client_context())
        again = await c.command(b"STLS")
        await c.command(b"QUIT")
        await c.close()
        await s.wait_for("session.closed")
    assert again == REPLY_STLS_ACTIVE
    assert len(s.sink.named("tls.established")) == 1


@pytest.mark.parametrize("before", [b"NOOP", b"CAPA", b"USER alice", b"STAT"])
async def test_stls_pipelined_behind_command_refused(pki: PKI, before: bytes) -> None:
    async with stack(pki) as s:
        c = await Client.connect(s.port)
        await c.line()
        await c.send(before + b"\r\nSTLS\r\nNOOP\r\n")  # one packet
        first = await c.reply(multiline=before == b"CAPA")
        refused = await c.line()
        noop = await c.line()  # still plaintext, still in order
        await c.command(b"QUIT")
        await c.close()
        await s.wait_for("session.closed")
    assert first.startswith(b"+OK")
    assert refused == REPLY_STLS_PIPELINED
    assert noop == b"+OK NOOP done\r\n"
    assert b"STLS" not in s.upstream.commands()
    assert not s.sink.named("tls.established")


async def _refusing_logins(peer: Peer) -> None:
    await peer.send(GREETING)
    while True:
        line = await peer.line()
        if line.startswith((b"AUTH", b"PASS")):
            await peer.send(b"-ERR [AUTH] no\r\n")
        else:
            await peer.send(b"+OK " + line.split()[0] + b" done\r\n")


@pytest.mark.parametrize(
    ("opening", "with_policy"),
    [
        pytest.param(b"AUTH PLAIN\r\n", False, id="behind-auth"),
        pytest.param(b"USER alice\r\nPASS wrong\r\n", True, id="behind-login-with-policy"),
    ],
)
async def test_stls_held_behind_a_pending_login_starts_tls_when_released(
    pki: PKI, opening: bytes, with_policy: bool
) -> None:
    """A held STLS (the lines behind AUTH, or with a policy behind a login, wait for
    its reply) is answered from the upstream's side of the relay; the handshake must
    still start at once, and the ClientHello must not be thrown away as "pipelined
    after STLS" (regression: it stalled until the handshake timeout)."""
    policies = None
    if with_policy:
        # Any loaded policy holds commands behind a login until its reply.
        rule = Rule("any", "p.yaml", 1, Match(), "enforce", {"deny_commands": ("TOP",)})
        policies = PolicySet((rule,))
    async with stack(pki, script=_refusing_logins, policies=policies) as s:
        c = await Client.connect(s.port)
        await c.line()
        await c.send(opening + b"STLS\r\n")  # one packet
        replies = [await c.line() for _ in opening.splitlines()]
        ok = await c.line()
        await c.starttls(pki.client_context(), limit=5)  # well before HANDSHAKE_TIMEOUT
        noop = await c.command(b"NOOP")
        await c.command(b"QUIT")
        await c.close()
        await s.wait_for("session.closed")
    assert replies[-1] == b"-ERR [AUTH] no\r\n"
    assert ok == REPLY_STLS_BEGIN
    assert noop == b"+OK NOOP done\r\n"
    (tls,) = s.sink.named("tls.established")
    assert (tls["side"], tls["stls"]) == ("client", True)
    assert not [e for e in s.sink.named("command.rejected") if "discarded" in e["reason"]]
    assert b"STLS" not in s.upstream.commands()


# -- 5. CAPA: STLS only where popguard offers it ------------------------------------

UPSTREAM_CAPA = b"STLS\r\nstls\r\nSTLS extra words\r\nSASL PLAIN\r\n"


@pytest.mark.parametrize("listener", ["none", "implicit", "starttls"])
async def test_capa_stls_stripped_when_not_offered(pki: PKI, listener: str) -> None:
    async def script(peer: Peer) -> None:
        await serve_pop3(peer, capa=UPSTREAM_CAPA)

    async with stack(pki, listener=listener, script=script) as s:
        c = await Client.connect(s.port)
        if listener == "implicit":
            await c.starttls(pki.client_context())
        await c.line()
        before = await c.command(b"CAPA", multiline=True)
        after = None
        if listener == "starttls":
            assert await c.command(b"STLS") == REPLY_STLS_BEGIN
            await c.starttls(pki.client_context())
            after = await c.command(b"CAPA", multiline=True)
        await c.command(b"QUIT")
        await c.close()
        await s.wait_for("session.closed")
    expected = b"+OK Capability list follows\r\nSASL PLAIN\r\nTOP\r\nUSER\r\n"
    if listener == "starttls":
        assert before == expected + b"STLS\r\n.\r\n"  # popguard's own, once
        assert after == expected + b".\r\n"  # RFC 2595 §4: not under TLS
    else:
        assert before == expected + b".\r\n"


# -- 6. NO STARTTLS: response injection from before the client's handshake ---------


@pytest.mark.parametrize(
    "injected", [b"+OK injected\r\n", b"-ERR injected\r\n", b"+OK\r\nbody\r\n.\r\n"]
)
async def test_no_starttls_response_injection_client_side(pki: PKI, injected: bytes) -> None:
    """An upstream line sent while the client does STLS never reaches it after TLS."""
    go = trio.Event()
    sent = trio.Event()

    async def script(peer: Peer) -> None:
        await peer.send(GREETING)
        await go.wait()
        await peer.send(injected)  # unsolicited, right after the client's STLS
        sent.set()
        await peer.drain()

    async with stack(pki, script=script) as s:
        c = await Client.connect(s.port)
        assert await c.line() == GREETING
        assert await c.command(b"STLS") == REPLY_STLS_BEGIN
        go.set()
        with trio.fail_after(LIMIT):
            await sent.wait()
        await trio.sleep(0.2)  # let popguard read it before the handshake ends
        await c.starttls(pki.client_context())
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await c.send(b"NOOP\r\n")
        rest = await c.rest()
        await c.close()
        (closed,) = await s.wait_for("session.closed")
    assert b"injected" not in rest
    assert b"body" not in rest
    assert rest == b""  # nothing at all: no reply is owed across the handshake
    assert closed["reason"] in ("upstream_protocol_error", "upstream_closed")
    assert s.upstream.commands() == []  # NOOP never went out either


async def test_no_starttls_response_injection_greeting_with_trailer(pki: PKI) -> None:
    """Bytes glued behind the greeting are never relayed as a later reply.

    Nor is the greeting itself: nothing of a read that holds bytes no
    command asked for reaches the client, which gets -ERR [SYS/TEMP].
    """

    async def script(peer: Peer) -> None:
        await peer.send(GREETING + b"+OK injected\r\n")
        await peer.drain()

    async with stack(pki, script=script) as s:
        c = await Client.connect(s.port)
        got = await c.rest()
        await c.close()
        (closed,) = await s.wait_for("session.closed")
    assert got == REPLY_UPSTREAM_BROKEN
    assert closed["reason"] == "upstream_protocol_error"


# -- 7. nginx-mail style: over-long lines and garbage around STLS --------------------


@pytest.mark.parametrize(
    "packet",
    [
        pytest.param(b"STLS\r\n" + b"A" * 5000, id="garbage-no-newline"),
        pytest.param(b"STLS\r\n" + b"\x16\x03\x01\x00\x05hello" * 10, id="fake-record"),
        pytest.param(b"STLS\r\n" + (b"USER x\r\n" * 200), id="many-lines"),
        pytest.param(b"STLS\r\n\x00\xff\r\n\r\n", id="binary"),
    ],
)
async def test_overlong_or_garbage_after_stls_never_executed(pki: PKI, packet: bytes) -> None:
    async with stack(pki) as s:
        c = await Client.connect(s.port)
        await c.line()
        await c.send(packet)
        assert await c.line() == REPLY_STLS_BEGIN
        # What followed STLS in the same read is gone; TCP may have delivered
        # the tail in a later read, which then is not TLS: either way no
        # command runs, and popguard does not fall over.
        try:
            await c.starttls(pki.client_context())
            assert await c.command(b"NOOP") == b"+OK NOOP done\r\n"
            await c.command(b"QUIT")
        except (trio.BrokenResourceError, EOFError):
            pass
        await c.close()
        await s.wait_for("session.closed")
        # The server is fine: the next session works.
        c = await Client.connect(s.port)
        assert await c.line() == GREETING
        await c.close()
    assert set(s.upstream.commands()) <= {b"NOOP", b"QUIT"}
    assert not s.sink.named("session.internal_error")


@pytest.mark.parametrize(
    "line",
    [
        pytest.param(b"S" * 300 + b"\r\nSTLS\r\n", id="overlong-then-stls"),
        pytest.param(b"STLS" + b" x" * 200 + b"\r\n", id="overlong-stls"),
        pytest.param(b"STLS\x00\r\n", id="nul-in-stls"),
        pytest.param(b"STLSX\r\n", id="five-letter-verb"),
    ],
)
async def test_overlong_or_garbled_stls_line_is_refused_as_a_line(pki: PKI, line: bytes) -> None:
    async with stack(pki) as s:
        c = await Client.connect(s.port)
        await c.line()
        await c.send(line)
        first = await c.line()
        second = await c.line() if line.endswith(b"\r\nSTLS\r\n") else None
        await c.close()
        await s.wait_for("session.closed")
    assert first.startswith(b"-ERR")
    assert first != REPLY_STLS_BEGIN
    if second is not None:
        assert second == REPLY_STLS_BEGIN  # a rejected line owes nothing: STLS may go
    assert s.upstream.commands() == []


# -- 8. what the records say about the upstream's SNI -----------------------------


async def test_upstream_record_sni_is_what_was_sent(pki: PKI) -> None:
    """No SNI goes out for an IP literal (RFC 6066 §3), and the record says so
    (regression: it named the address as if it had been sent)."""
    seen: list[str | None] = []
    context = pki.upstream_context()
    context.sni_callback = lambda _sock, name, _ctx: seen.append(name)  # type: ignore[assignment,misc,return-value]

    async def script(peer: Peer) -> None:
        await peer.start_tls(context)
        await serve_pop3(peer)

    async with stack(pki, listener="none", upstream="implicit", script=script) as s:
        c = await Client.connect(s.port)
        assert await c.line() == GREETING
        await c.command(b"QUIT")
        await c.close()
        await s.wait_for("session.closed")
    assert seen == [None]  # verified against the IP SAN, without SNI
    (record,) = s.sink.named("tls.established")
    assert record["sni"] is None


async def test_upstream_server_name_is_sent_as_sni_and_verified(pki: PKI) -> None:
    seen: list[str | None] = []
    context = pki.upstream_context()
    context.sni_callback = lambda _sock, name, _ctx: seen.append(name)  # type: ignore[assignment,misc,return-value]

    async def script(peer: Peer) -> None:
        await peer.start_tls(context)
        await serve_pop3(peer)

    async with stack(
        pki, listener="none", upstream="implicit", script=script, server_name="upstream.test"
    ) as s:
        c = await Client.connect(s.port)
        assert await c.line() == GREETING
        await c.command(b"QUIT")
        await c.close()
        await s.wait_for("session.closed")
    assert seen == ["upstream.test"]
    (record,) = s.sink.named("tls.established")
    assert record["sni"] == "upstream.test"


# -- 9. upstream STLS: the greeting read before STLS must reach the client ----------


async def _stls_upstream(peer: Peer, context: ssl.SSLContext) -> None:
    await peer.send(GREETING)
    assert await peer.line() == b"STLS\r\n"
    await peer.send(b"+OK Begin TLS\r\n")
    await peer.start_tls(context)
    await serve_pop3(peer, greet=False)


@pytest.mark.parametrize("listener", ["none", "starttls", "implicit"])
async def test_stls_upstream_greeting_reaches_a_client_that_waits_for_it(
    pki: PKI, listener: str
) -> None:
    """Regression: the greeting read before STLS upstream was held back until the
    client spoke, so every real client hung."""

    async def script(peer: Peer) -> None:
        await _stls_upstream(peer, pki.upstream_context())

    async with stack(pki, listener=listener, upstream="starttls", script=script) as s:
        c = await Client.connect(s.port)
        if listener == "implicit":
            await c.starttls(pki.client_context())
        with trio.fail_after(5):
            greeting = await c.line()
        if listener == "starttls":
            assert await c.command(b"STLS") == REPLY_STLS_BEGIN
            await c.starttls(pki.client_context())
        noop = await c.command(b"NOOP")
        await c.command(b"QUIT")
        await c.close()
        await s.wait_for("session.closed")
    assert greeting == GREETING  # unchanged, APOP timestamp included
    assert noop == b"+OK NOOP done\r\n"
    assert s.upstream.commands() == [b"STLS", b"NOOP", b"QUIT"]
    sides = {(e["side"], e["stls"]) for e in s.sink.named("tls.established")}
    assert ("upstream", True) in sides


async def test_stls_upstream_with_a_client_that_speaks_first(pki: PKI) -> None:
    """Commands sent before the upstream is secured wait, in order, behind the greeting."""

    async def script(peer: Peer) -> None:
        await _stls_upstream(peer, pki.upstream_context())

    async with stack(pki, listener="none", upstream="starttls", script=script) as s:
        c = await Client.connect(s.port)
        await c.send(b"NOOP\r\n")
        greeting = await c.line()
        noop = await c.line()
        await c.command(b"QUIT")
        await c.close()
        await s.wait_for("session.closed")
    assert greeting == GREETING
    assert noop == b"+OK NOOP done\r\n"
    assert s.upstream.commands() == [b"STLS", b"NOOP", b"QUIT"]


# -- 10. the end of a TLS session: close_notify ------------------------------------


@pytest.mark.parametrize("listener", ["implicit", "starttls"])
async def test_tls_session_end_sends_close_notify(pki: PKI, listener: str) -> None:
    """RFC 8446 §6.1: close_notify before closing (regression: the alert was dropped,
    and OpenSSL 3 clients reported an unexpected EOF after a clean QUIT)."""
    async with stack(pki, listener=listener) as s:
        c = await Client.connect(s.port)
        if listener == "implicit":
            await c.starttls(pki.client_context())
            await c.line()
        else:
            await c.line()
            assert await c.command(b"STLS") == REPLY_STLS_BEGIN
            await c.starttls(pki.client_context())
        assert await c.command(b"QUIT") == b"+OK bye\r\n"
        with trio.fail_after(LIMIT):
            # trio raises BrokenResourceError for an EOF without close_notify.
            rest = await c.stream.receive_some()
        await c.close()
        await s.wait_for("session.closed")
    assert rest == b""


@pytest.mark.parametrize("listener", ["implicit", "starttls"])
async def test_close_notify_when_the_client_pipelined_past_quit(pki: PKI, listener: str) -> None:
    """Bytes the client sent after QUIT are still unread when popguard closes: the
    close is still close_notify (OpenSSL would fail SSL_shutdown on such data, and
    an unread close turns into RST), then FIN, and QUIT's +OK arrives whole."""
    async with stack(pki, listener=listener) as s:
        c = await Client.connect(s.port)
        if listener == "implicit":
            await c.starttls(pki.client_context())
            await c.line()
        else:
            await c.line()
            assert await c.command(b"STLS") == REPLY_STLS_BEGIN
            await c.starttls(pki.client_context())
        await c.send(b"QUIT\r\n" + b"NOOP\r\n" * 200)
        assert await c.line() == b"+OK bye\r\n"
        assert not c.buf
        with trio.fail_after(LIMIT):
            # trio raises BrokenResourceError for an EOF without close_notify.
            rest = await c.stream.receive_some()
        await c.close()
        await s.wait_for("session.closed")
    assert rest == b""
    assert s.upstream.commands()[-1] == b"QUIT"


# -- 11. fuzzing the core with STLS, TLS and policies -----------------------------

CLIENT_CHUNKS = [
    b"STLS\r\n",
    b"stls\r\n",
    INJECTION,
    b"STLS\r\nPASS x\r\n",
    b"STLS extra\r\n",
    b"ST",
    b"LS\r\n",
    b"USER alice\r\n",
    b"PASS pw\r\n",
    b"APOP alice 0123456789abcdef0123456789abcdef\r\n",
    b"AUTH PLAIN\r\n",
    b"AUTH PLAIN AGFsaWNlAHB3\r\n",
    b"AGFsaWNlAHB3\r\n",
    b"CAPA\r\n",
    b"NOOP\r\n",
    b"STAT\r\n",
    b"LIST\r\n",
    b"RETR 1\r\n",
    b"TOP 1 0\r\n",
    b"DELE 1\r\n",
    b"RSET\r\n",
    b"UIDL 1\r\n",
    b"*\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # the start of a ClientHello
    b"x" * 300 + b"\r\n",
]
LONGEST_CHUNK = max(map(len, CLIENT_CHUNKS))
SERVER_CHUNKS = [
    b"+OK\r\n",
    b"-ERR no\r\n",
    b"+ \r\n",
    b"+OK injected\r\n",
    b"+OK\r\nSTLS\r\nUSER\r\nSASL PLAIN\r\n.\r\n",
    b"+OK\r\nbody\r\n.\r\n",
    b"+OK 1 deadbeef\r\n",
    b"+OK 1 120\r\n",
    b"+OK Begin TLS negotiation\r\n",
    b"\x16\x03\x03\x00\x02\x02\x46",  # a TLS alert record
    b"-ERR [SYS/TEMP] Server shutting down.\r\n",
    b"+OK partial",
]


POLICIES: dict[str, tuple[str, dict[str, object]] | None] = {
    "none": None,
    "require_tls": ("enforce", {"require_tls": True}),
    "dry": ("dry-run", {"require_tls": True, "deny_commands": ("DELE",)}),
    "deny": ("enforce", {"deny_commands": ("DELE", "TOP"), "auth_mechanisms": ("USER",)}),
    "throttle": ("enforce", {"login_throttle": Throttle(failures=1, window=60, block=60)}),
}


def _policy(kind: str) -> SessionPolicy | None:
    chosen = POLICIES[kind]
    if chosen is None:
        return None
    mode, values = chosen
    rule = Rule("fuzz", "fuzz.yaml", 1, Match(), mode, values)  # type: ignore[arg-type]
    shared = PolicyShared(PolicyHolder(PolicySet((rule,))), lambda: 1000.0)
    return SessionPolicy(
        shared, peer="192.0.2.7:40000", client=ipaddress.ip_address("192.0.2.7"), listener="fuzz"
    )


step = st.one_of(
    # STLS itself, often, so that many examples get past it and its handshake.
    st.tuples(st.sampled_from(["c", "c+tls"]), st.sampled_from([b"STLS\r\n", INJECTION])),
    st.tuples(st.just("c"), st.sampled_from(CLIENT_CHUNKS)),
    st.tuples(st.just("s"), st.sampled_from(SERVER_CHUNKS)),
    st.tuples(st.sampled_from(["c", "s"]), st.binary(max_size=64)),
    st.tuples(st.just("tls"), st.just(b"")),
    st.tuples(st.just("durable"), st.sampled_from([b"ok", b"fail"])),
    st.tuples(st.just("eof"), st.just(b"")),
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    steps=st.lists(step, max_size=40),
    listener=st.sampled_from(["starttls", "starttls", "implicit"]),
    policy=st.sampled_from(sorted(POLICIES)),
    identity=st.booleans(),
    durable=st.booleans(),
    ending=st.sampled_from(list(EndReason)),
)
def test_fuzz_session_with_stls_tls_and_policies(
    steps: list[tuple[str, bytes]],
    listener: str,
    policy: str,
    identity: bool,
    durable: bool,
    ending: EndReason,
) -> None:
    """Random client and server bytes and handshakes, driven the way the relay does.

    No exception escapes, buffers stay bounded, and the STLS rules hold:
    nothing goes anywhere while a handshake is pending, nothing follows the
    +OK to STLS, and ``tls_started`` means something only when one is pending.
    """
    limits = Limits()
    session = ProxySession(
        client="192.0.2.7:40000",
        listener="fuzz",
        limits=limits,
        message_identity=identity,
        durable_deletions=durable,
        policy=_policy(policy),
        stls=listener == "starttls",
        tls=listener == "implicit",
    )
    session.receive_server(b"+OK ready <1.2@fuzz>\r\n")
    session.take_client_output()
    sent_client = bytearray()
    for side, data in steps:
        pending = session.starttls_pending
        if side in ("c", "c+tls"):
            if not session.wants_client_data:
                continue  # the relay does not read from the client then
            sent_client += data
            session.receive_client(data)
        elif side == "s":
            session.receive_server(data)
        elif side == "tls":
            records_before = len(session._records)
            session.tls_started(tls_version="TLSv1.3", cipher="TLS_AES_128_GCM_SHA256")
            if not pending:
                assert len(session._records) == records_before  # a no-op
            elif not session.finished:
                event("handshake done")
                assert session.client_tls
                assert not session.starttls_pending
        elif side == "durable":
            if session.pending_durable is not None:
                session.durable_result(data == b"ok")
        else:
            session.client_eof()
        to_client = session.take_client_output()
        to_upstream = session.take_upstream_output()
        if pending and side in ("c", "c+tls", "s", "eof"):
            # Across the handshake: no reply is owed and no command may pass.
            assert to_client == b"", to_client
            assert to_upstream == b"", to_upstream
        if session.starttls_pending and not pending:
            event("STLS accepted")
            # Nothing after popguard's +OK: the next bytes the client gets are TLS.
            assert to_client.endswith(REPLY_STLS_BEGIN), to_client
            assert session.replies_owed == 0
        if side == "c+tls" and session.starttls_pending:
            # The relay's own order: the handshake right after the +OK went out.
            session.tls_started(tls_version="TLSv1.3")
            assert session.client_tls
            event("handshake done")
            assert session.take_client_output() == b""
            assert session.take_upstream_output() == b""
        if b"AUTH" not in sent_client.upper():
            lines = [line.strip().upper() for line in to_upstream.split(b"\n")]
            assert not any(line == b"STLS" or line.startswith(b"STLS ") for line in lines)
        held = limits.max_sasl_line + limits.max_command_line + LONGEST_CHUNK
        assert len(session._client_buf) <= held
        assert (
            len(session._server_buf)
            <= max(limits.max_server_status_line, limits.max_listing_line) + LONGEST_CHUNK
        )
        assert session.replies_owed <= limits.max_pipelined + 3 * 64
    session.end(ending)
    session.take_client_output()
    assert session.take_upstream_output() == b""
    assert session.finished
    closed = [r for r in session.take_records() if r.event.value == "session.closed"]
    assert len(closed) <= 1


# -- 12. fuzzing the parsers on their own -------------------------------------------

line_bytes = st.one_of(
    st.binary(max_size=300),
    st.builds(
        lambda verb, rest, end: verb + rest + end,
        st.sampled_from([b"STLS", b"stls", b"USER", b"AUTH", b"QUIT", b"RETR", b"ST", b"STLSX"]),
        st.binary(max_size=40),
        st.sampled_from([b"\r\n", b"\n", b"\r", b""]),
    ),
)


@settings(max_examples=1000, deadline=None)
@given(raw=line_bytes)
def test_fuzz_command_parser_raises_only_its_own_error(raw: bytes) -> None:
    try:
        command = parse_command(raw)
    except CommandSyntaxError as exc:
        error = str(exc)  # becomes the -ERR text
    else:
        error = None
    if error is not None:
        assert error
        assert "\r" not in error
        assert "\n" not in error
        return
    assert command.line.endswith(b"\r\n")
    assert b"\r" not in command.line[:-2]
    assert b"\n" not in command.line[:-2]
    assert 3 <= len(command.verb) <= 4
    assert command.verb.isalpha()
    assert command.verb.isupper()
    escape_text(command.rest)


@settings(max_examples=1000, deadline=None)
@given(
    line=st.one_of(
        st.binary(max_size=300),
        st.builds(
            lambda head, rest: head + rest,
            st.sampled_from([b"+OK", b"-ERR", b"+", b"+ok", b"-err", b"+OKAY", b"."]),
            st.binary(max_size=40),
        ),
    )
)
def test_fuzz_reply_parser_never_raises(line: bytes) -> None:
    status = parse_status(line)
    assert status is None or isinstance(status, Status)
    reply_text(line)
    with contextlib.suppress(IdentityRefused):
        decode_base64(line)  # SASL responses: refuses what it cannot read, never raises else
    text = escape_text(line)
    assert "\r" not in text
    assert "\n" not in text


async def _read_pre_tls_line(chunks: list[bytes]) -> tuple[bytes, bytes] | str:
    ours, theirs = trio.testing.memory_stream_pair()

    async def feed() -> None:
        for chunk in chunks:
            await theirs.send_all(chunk)
        await theirs.aclose()

    result: tuple[bytes, bytes] | str = "nothing"
    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed)
        try:
            result = await _read_line(ours, b"")
        except UpstreamTLSError as exc:
            result = str(exc)
        nursery.cancel_scope.cancel()
    return result


@settings(max_examples=300, deadline=None)
@given(chunks=st.lists(st.binary(min_size=1, max_size=3000), max_size=6))
def test_fuzz_pre_tls_line_reader_raises_only_its_own_error(chunks: list[bytes]) -> None:
    """The reader of the upstream's greeting and STLS reply, before any TLS."""
    result = trio.run(_read_pre_tls_line, chunks)
    data = b"".join(chunks)
    if isinstance(result, str):
        assert result.startswith(("upstream line longer than", "upstream closed the connection"))
        return
    line, rest = result
    assert line.endswith(b"\n")
    assert b"\n" not in line[:-1]
    assert line + rest == data[: len(line) + len(rest)]
    assert len(line) <= 2 * MAX_PRE_TLS_LINE + 1
