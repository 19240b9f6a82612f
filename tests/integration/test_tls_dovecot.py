"""TLS on both sides: real clients, popguard, and a real Dovecot with TLS.

A trustme CA issues popguard's certificate (for ``localhost`` and
``127.0.0.1``); a second private Dovecot runs with ``tls=True`` (its own
self-signed certificate, STLS on the plain port, POP3S on ``tls_port``).

The matrix is every client side (a POP3S listener, an STLS listener) times
every upstream side (plain to Dovecot's plain port, implicit TLS to its
POP3S port, STLS on its plain port).  Through each, real clients (poplib,
curl, fetchmail, ``openssl s_client``) must get exactly what they get
straight from Dovecot, and the records must say what was encrypted how.
"""

from __future__ import annotations

import hashlib
import poplib
import re
import secrets
import shutil
import socket
import ssl
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

from popguard.core.replies import REPLY_UPSTREAM_UNAVAILABLE
from popguard.shell.tls import CertKey, ListenerTLS, UpstreamTLS
from popguard.testing.dovecot import DovecotInstance, stored_form
from tests.ci import in_ci

in_thread = trio.to_thread.run_sync

CLIENT_MODES = ("implicit", "starttls")
CLIENT_LIMIT = 60  # seconds any one external client run may take
#: Seconds any one read may take (loopback answers in milliseconds).
READ_LIMIT = 15
UPSTREAM_MODES = ("none", "implicit", "starttls")


@pytest.fixture(autouse=True)
def _allow_long_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    # poplib refuses lines over 2048 bytes; the samples carry a 10,000-byte line.
    monkeypatch.setattr(poplib, "_MAXLINE", 1 << 20)


def tool(name: str) -> str:
    """Path of ``name``; skip without it, fail in CI (where nothing may be skipped)."""
    path = shutil.which(name)
    if path is None:
        if in_ci():
            pytest.fail(f"{name} is required in CI but not installed", pytrace=False)
        pytest.skip(f"{name} is not installed")
    return path


# -- certificates and the TLS Dovecot -----------------------------------------


@dataclass(frozen=True)
class PKI:
    """A throwaway CA, popguard's certificate from it, and the PEM files."""

    ca: trustme.CA
    ca_file: str
    ca_unit: str  # the CA's OU: what an issuer line must show
    leaf_unit: str
    certs: CertKey

    def client_context(self, *, alpn: bool = True) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca_file)
        if alpn:
            context.set_alpn_protocols(["pop3"])
        return context


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    tag = secrets.token_hex(4)
    ca_unit, leaf_unit = f"popguard test CA {tag}", f"popguard listener {tag}"
    ca = trustme.CA(organization_unit_name=ca_unit)
    issued = ca.issue_cert(
        "localhost", "127.0.0.1", common_name="localhost", organization_unit_name=leaf_unit
    )
    folder = tmp_path_factory.mktemp("pki")
    cert, key, ca_file = folder / "cert.pem", folder / "key.pem", folder / "ca.pem"
    issued.private_key_pem.write_to_path(str(key))
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    ca.cert_pem.write_to_path(str(ca_file))
    return PKI(ca, str(ca_file), ca_unit, leaf_unit, CertKey(str(cert), str(key)))


@pytest.fixture(scope="module")
def tls_dovecot(dovecot: DovecotInstance, tmp_path_factory: pytest.TempPathFactory):
    """A private Dovecot with STLS on ``port`` and POP3S on ``tls_port``.

    It asks for ``dovecot`` so that a missing Dovecot skips (or fails in CI)
    exactly as every other integration test does.
    """
    tool("openssl")  # Dovecot's certificate is made with it
    instance = DovecotInstance(tmp_path_factory.mktemp("dovecot-tls"), tls=True)
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()


@dataclass
class TLSMailboxes:
    dovecot: DovecotInstance
    passwords: list[str] = field(default_factory=list)

    def __call__(self, messages: Sequence[bytes]) -> tuple[str, str]:
        user = f"t{len(self.passwords)}-{secrets.token_hex(3)}"
        password = secrets.token_urlsafe(12)
        self.dovecot.add_user(user, password, messages)
        self.passwords.append(password)
        return user, password


@pytest.fixture
def tls_mailbox(tls_dovecot: DovecotInstance) -> TLSMailboxes:
    return TLSMailboxes(tls_dovecot)


def upstream_settings(
    dovecot: DovecotInstance,
    mode: str,
    *,
    via: tuple[str, int] | None = None,
    **tls: Any,
) -> dict[str, Any]:
    """``popguard(...)`` keywords for an upstream ``mode`` toward the TLS Dovecot."""
    if via is not None:
        address = via
    elif mode == "implicit":
        assert dovecot.tls_port is not None
        address = (dovecot.host, dovecot.tls_port)
    else:
        address = dovecot.address
    if mode != "none":
        tls.setdefault("ca_file", str(dovecot.cert_path))
    return {"upstream": address, "upstream_tls": UpstreamTLS(mode=mode, **tls)}  # type: ignore[arg-type]


async def start_proxy(
    popguard: Callable[..., Any],
    pki: PKI,
    dovecot: DovecotInstance,
    client_mode: str,
    upstream_mode: str,
    **upstream: Any,
) -> Any:
    listener = ListenerTLS(mode=client_mode, cert=pki.certs)  # type: ignore[arg-type]
    return await popguard(tls=listener, **upstream_settings(dovecot, upstream_mode, **upstream))


# -- clients ---------------------------------------------------------------------


def pop_connect(
    address: tuple[str, int], client_mode: str, context: ssl.SSLContext
) -> tuple[poplib.POP3, dict[str, list[str]] | None]:
    """poplib over POP3S, or plain then ``.stls()``; with CAPA before STLS."""
    host, port = address
    if client_mode == "implicit":
        return poplib.POP3_SSL(host, port, context=context, timeout=READ_LIMIT), None
    pop = poplib.POP3(host, port, timeout=READ_LIMIT)
    before = pop.capa()
    pop.stls(context=context)
    return pop, before


class Wire:
    """A raw, blocking POP3 client: the bytes exactly as on the wire, TLS or not."""

    def __init__(self, address: tuple[str, int], timeout: float = READ_LIMIT) -> None:
        self.sock: socket.socket = socket.create_connection(address, timeout=timeout)
        self._buf = bytearray()

    def tls(self, context: ssl.SSLContext, hostname: str = "127.0.0.1") -> None:
        assert not self._buf, f"plaintext left over before the handshake: {bytes(self._buf)!r}"
        self.sock = context.wrap_socket(self.sock, server_hostname=hostname)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def readline(self) -> bytes:
        while (end := self._buf.find(b"\n")) == -1:
            chunk = self.sock.recv(262144)
            if not chunk:
                raise EOFError(f"connection closed; unread: {bytes(self._buf[-200:])!r}")
            self._buf += chunk
        line = bytes(self._buf[: end + 1])
        del self._buf[: end + 1]
        return line

    def reply(self, multiline: bool = False) -> bytes:
        status = self.readline()
        if not (multiline and status.startswith(b"+OK")):
            return status
        parts = [status]
        while (line := self.readline()) != b".\r\n":
            parts.append(line)
        return b"".join([*parts, line])

    def command(self, line: str, multiline: bool = False) -> bytes:
        self.send(line.encode() + b"\r\n")
        return self.reply(multiline)

    def read_to_eof(self) -> bytes:
        data = bytes(self._buf)
        self._buf.clear()
        try:
            while chunk := self.sock.recv(262144):
                data += chunk
        except (ConnectionResetError, ssl.SSLError):
            pass
        return data

    def close(self) -> None:
        self.sock.close()


def secure_wire(
    address: tuple[str, int], client_mode: str, context: ssl.SSLContext
) -> tuple[Wire, bytes]:
    """A Wire through popguard's TLS; returns it and the greeting."""
    w = Wire(address)
    if client_mode == "implicit":
        w.tls(context)
        return w, w.readline()
    greeting = w.readline()
    assert w.command("STLS") == b"+OK Begin TLS negotiation\r\n"
    w.tls(context)
    return w, greeting


def poplib_bytes(lines: list[bytes]) -> bytes:
    return b"".join(line + b"\r\n" for line in lines)


def timestamp_of(greeting: bytes) -> bytes:
    match = re.search(rb"<[^<>@\s]+@[^<>\s]+>", greeting)
    assert match, greeting
    return match.group(0)


def without_timestamp(greeting: bytes) -> bytes:
    return re.sub(rb"<[^<>]*>", b"<>", greeting)


async def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(CLIENT_LIMIT):
        return await trio.run_process(
            argv, capture_stdout=True, capture_stderr=True, check=False, **kwargs
        )


def output(proc: subprocess.CompletedProcess[bytes]) -> str:
    return proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")


def tls_records(proxy: Any, side: str) -> list[dict[str, Any]]:
    return [e for e in proxy.sink.named("tls.established") if e["side"] == side]


def check_tls_records(
    proxy: Any, client_mode: str, upstream_mode: str, sessions: int = 1
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Each session has one client-side record, and one upstream-side where encrypted."""
    client, upstream = tls_records(proxy, "client"), tls_records(proxy, "upstream")
    assert len(client) == sessions, proxy.sink.names()
    assert len(upstream) == (0 if upstream_mode == "none" else sessions), proxy.sink.names()
    for record in client:
        assert record["stls"] is (client_mode == "starttls")
        assert record["tls_version"] in ("TLSv1.2", "TLSv1.3")
        assert record["cipher"]
    for record in upstream:
        assert record["stls"] is (upstream_mode == "starttls")
        assert record["tls_version"] in ("TLSv1.2", "TLSv1.3")
        assert record["cipher"]
        assert record["alpn"] is None  # Dovecot 2.3 selects none for POP3
    return client, upstream


# -- 1. the matrix with poplib and a raw TLS wire ---------------------------------


@pytest.mark.parametrize("upstream_mode", UPSTREAM_MODES)
@pytest.mark.parametrize("client_mode", CLIENT_MODES)
async def test_poplib_through_every_tls_combination_matches_direct(
    tls_dovecot, tls_mailbox, make_messages, popguard, pki, client_mode, upstream_mode
):
    messages = make_messages(5, seed=101)  # every kind of sample
    user, password = tls_mailbox(messages)
    proxy = await start_proxy(popguard, pki, tls_dovecot, client_mode, upstream_mode)
    count = len(messages)
    script = [
        (f"USER {user}", False),
        (f"PASS {password}", False),
        ("CAPA", True),
        ("STAT", False),
        ("LIST", True),
        ("UIDL", True),
        *((f"RETR {i}", True) for i in range(1, count + 1)),
        ("TOP 2 3", True),
        ("QUIT", False),
    ]

    def direct_wire() -> tuple[bytes, list[bytes]]:
        w = Wire(tls_dovecot.address)
        greeting = w.readline()
        replies = [w.command(line, multiline) for line, multiline in script]
        w.close()
        return greeting, replies

    def proxied_wire() -> tuple[bytes, list[bytes]]:
        w, greeting = secure_wire(proxy.address, client_mode, pki.client_context())
        replies = [w.command(line, multiline) for line, multiline in script]
        assert w.read_to_eof() == b""
        w.close()
        return greeting, replies

    def with_poplib(address: tuple[str, int], mode: str | None) -> dict[str, Any]:
        if mode is None:
            pop, before = poplib.POP3(*address, timeout=READ_LIMIT), None
        else:
            pop, before = pop_connect(address, mode, pki.client_context())
        try:
            pop.user(user)
            pop.pass_(password)
            got = {
                "before": before,
                "stat": pop.stat(),
                "list": pop.list()[1],
                "uidl": pop.uidl()[1],
                "retr": [poplib_bytes(pop.retr(i)[1]) for i in range(1, count + 1)],
                "quit": pop.quit(),
            }
            return got
        finally:
            pop.close()

    direct_greeting, direct = await in_thread(direct_wire)
    proxied_greeting, proxied = await in_thread(proxied_wire)
    direct_pop = await in_thread(with_poplib, tls_dovecot.address, None)
    proxied_pop = await in_thread(with_poplib, proxy.address, client_mode)

    # Every reply byte for byte as Dovecot sends it in plaintext, whatever
    # was encrypted on either side; the greeting differs in its timestamp only.
    assert without_timestamp(proxied_greeting) == without_timestamp(direct_greeting)
    for (line, _), d, p in zip(script, direct, proxied, strict=True):
        assert p == d, f"{line.split()[0]} differs: direct {d[:120]!r}, proxied {p[:120]!r}"
    before = proxied_pop.pop("before")
    assert direct_pop.pop("before") is None
    assert proxied_pop == direct_pop
    assert proxied_pop["retr"] == list(messages)
    if client_mode == "starttls":
        assert "STLS" in before  # popguard's own, on the STLS listener

    await proxy.wait_for("session.closed", 2)
    client, _ = check_tls_records(proxy, client_mode, upstream_mode, sessions=2)
    assert {r["alpn"] for r in client} == {"pop3"}  # RFC 8314 §7 (ALPACA)
    assert [e["reason"] for e in proxy.sink.named("session.closed")] == ["quit", "quit"]
    assert [e["user"] for e in proxy.sink.named("auth.succeeded")] == [user, user]
    assert tls_dovecot.maildir_messages(user) == [stored_form(m) for m in messages]
    proxy.assert_never_logged([password])


# -- 2. curl: --ssl-reqd (STLS) and pop3:// ----------------------------------------


@pytest.mark.parametrize("upstream_mode", UPSTREAM_MODES)
@pytest.mark.parametrize("client_mode", CLIENT_MODES)
async def test_curl_through_tls_matches_direct(
    tls_dovecot, tls_mailbox, make_messages, popguard, pki, client_mode, upstream_mode
):
    curl = tool("curl")
    messages = make_messages(3, seed=102)
    user, password = tls_mailbox(messages)
    proxy = await start_proxy(popguard, pki, tls_dovecot, client_mode, upstream_mode)

    async def fetch(scheme: str, port: int, path: str, *options: str) -> bytes:
        # The name in the URL is what curl checks the certificate against and
        # sends as SNI: "localhost", pinned to 127.0.0.1.
        url = f"{scheme}://{user}:{password}@localhost:{port}/{path}"
        argv = [curl, "--silent", "--show-error", "--max-time", "30", *options, url]
        # The connect phase includes the greeting: no greeting, no wait past this.
        argv += ["--connect-timeout", str(READ_LIMIT)]
        argv += ["--resolve", f"localhost:{port}:127.0.0.1"]
        proc = await run(argv)
        assert proc.returncode == 0, output(proc)
        return proc.stdout

    tls_options = ["--cacert", pki.ca_file]
    if client_mode == "implicit":
        scheme = "pop3s"
    else:
        scheme = "pop3"
        tls_options.append("--ssl-reqd")  # STLS, or fail: never plaintext
    direct_list = await fetch("pop3", tls_dovecot.port, "")
    direct_1 = await fetch("pop3", tls_dovecot.port, "1")
    proxied_list = await fetch(scheme, proxy.port, "", *tls_options)
    proxied_1 = await fetch(scheme, proxy.port, "1", *tls_options)

    assert proxied_list == direct_list
    assert proxied_list == b"".join(b"%d %d\r\n" % (i, len(m)) for i, m in enumerate(messages, 1))
    assert proxied_1 == direct_1 == messages[0]
    await proxy.wait_for("session.closed", 2)
    client, _ = check_tls_records(proxy, client_mode, upstream_mode, sessions=2)
    assert {r["sni"] for r in client} == {"localhost"}
    assert [e["reason"] for e in proxy.sink.named("session.closed")] == ["quit", "quit"]
    proxy.assert_never_logged([password])


async def test_curl_ssl_reqd_refuses_a_plain_listener(
    tls_dovecot, tls_mailbox, make_messages, popguard, pki
):
    """popguard hides Dovecot's STLS on a plain listener, so --ssl-reqd must stop."""
    curl = tool("curl")
    user, password = tls_mailbox(make_messages(1, seed=103))
    proxy = await popguard(upstream=tls_dovecot.address)
    url = f"pop3://{user}:{password}@127.0.0.1:{proxy.port}/"
    proc = await run([curl, "--silent", "--max-time", "30", "--ssl-reqd", url])
    assert proc.returncode != 0, output(proc)
    await proxy.wait_for("session.closed")
    assert not proxy.sink.named("auth.succeeded")  # no password in plaintext
    assert not proxy.sink.named("tls.established")


# -- 3. fetchmail: --ssl, --sslproto ----------------------------------------------

# fetchmail 6.4 semantics (man fetchmail, "--sslproto"): --ssl is implicit
# TLS; without --ssl, any non-empty --sslproto makes STLS mandatory, and
# "tls1.2" means exactly TLS 1.2 while "tls1.2+" means 1.2 or newer.
FETCHMAIL_CASES = [
    pytest.param("implicit", ["--ssl"], None, id="ssl"),
    pytest.param("implicit", ["--ssl", "--sslproto", "tls1.2"], "TLSv1.2", id="ssl-tls1.2"),
    pytest.param("starttls", ["--sslproto", "tls1.2"], "TLSv1.2", id="stls-tls1.2"),
    pytest.param("starttls", ["--sslproto", "tls1.2+"], None, id="stls-tls1.2+"),
]


def fetchmail_messages(make_messages) -> list[bytes]:
    # fetchmail 6.4 breaks lines longer than ~8 kB; leave the long sample out.
    return [m for m in make_messages(6, seed=104) if b"[long]" not in m]


async def fetchmail(
    argv0: str,
    work: Path,
    address: tuple[str, int],
    user: str,
    password: str,
    options: Sequence[str],
) -> tuple[list[bytes], str]:
    """Run fetchmail once with --keep; return the delivered messages and its output."""
    home, out = work / "home", work / "out"
    home.mkdir(parents=True)
    out.mkdir()
    mda = work / "mda.sh"
    mda.write_text(f'#!/bin/sh\nn=$(ls "{out}" | wc -l)\nexec cat > "{out}/$(printf %04d "$n")"\n')
    mda.chmod(0o755)
    rc = work / "fetchmailrc"
    rc.touch(mode=0o600)
    rc.write_text(
        f"poll {address[0]} protocol pop3 port {address[1]}\n"
        f'  user "{user}" there with password "{password}"\n'
    )
    argv = [
        argv0,
        "--fetchmailrc",
        str(rc),
        "--nosyslog",
        "--nodetach",
        *options,
        "--keep",
        "--all",
        "--invisible",
        "--norewrite",
        "--verbose",
        "--mda",
        str(mda),
    ]
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin"}
    proc = await run(argv, env=env)
    log = output(proc)
    assert proc.returncode == 0, log
    return [p.read_bytes() for p in sorted(out.iterdir())], log


@pytest.mark.parametrize("upstream_mode", ["none", "implicit"])
@pytest.mark.parametrize(("client_mode", "options", "version"), FETCHMAIL_CASES)
async def test_fetchmail_through_tls_matches_direct(
    tls_dovecot,
    tls_mailbox,
    make_messages,
    popguard,
    pki,
    tmp_path,
    client_mode,
    options,
    version,
    upstream_mode,
):
    argv0 = tool("fetchmail")
    messages = fetchmail_messages(make_messages)
    user, password = tls_mailbox(messages)
    proxy = await start_proxy(popguard, pki, tls_dovecot, client_mode, upstream_mode)
    # --sslcertfile replaces the system store: only the trustme CA is trusted.
    # fetchmail checks the name it polls as a host name, never as an IP
    # address, so the name to expect in the certificate is given explicitly.
    checked = [*options, "--sslcertck", "--sslcertfile", pki.ca_file]
    checked += ["--sslcommonname", "localhost"]

    direct, _ = await fetchmail(
        argv0, tmp_path / "direct", tls_dovecot.address, user, password, ["--sslproto", ""]
    )
    proxied, log = await fetchmail(
        argv0, tmp_path / "proxy", proxy.address, user, password, checked
    )

    assert proxied == direct == [stored_form(m) for m in messages], log
    (closed,) = await proxy.wait_for("session.closed")
    assert closed["reason"] == "quit"
    (client,), _ = check_tls_records(proxy, client_mode, upstream_mode)
    if version is not None:
        assert client["tls_version"] == version
    assert [e["user"] for e in proxy.sink.named("auth.succeeded")] == [user]
    assert tls_dovecot.maildir_messages(user) == [stored_form(m) for m in messages]  # --keep
    proxy.assert_never_logged([password])


async def test_fetchmail_sslcertck_refuses_an_untrusted_listener(
    tls_dovecot, tls_mailbox, make_messages, popguard, pki, tmp_path
):
    """The check is real: a CA that did not issue popguard's certificate fails."""
    argv0 = tool("fetchmail")
    user, password = tls_mailbox(fetchmail_messages(make_messages)[:1])
    proxy = await start_proxy(popguard, pki, tls_dovecot, "implicit", "none")
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    rc = tmp_path / "fetchmailrc"
    rc.touch(mode=0o600)
    rc.write_text(
        f"poll 127.0.0.1 protocol pop3 port {proxy.port}\n"
        f'  user "{user}" there with password "{password}"\n'
    )
    argv = [argv0, "--fetchmailrc", str(rc), "--nosyslog", "--nodetach", "--ssl"]
    argv += ["--sslcertck", "--sslcertfile", str(other), "--sslcommonname", "localhost"]
    argv += ["--keep", "--mda", "cat"]
    proc = await run(argv, env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert proc.returncode != 0, output(proc)
    assert "certificate" in output(proc).lower()
    await proxy.wait_for("session.closed")
    assert not proxy.sink.named("auth.succeeded")
    assert not proxy.sink.named("upstream.connected")  # POP3S: TLS first, upstream after


# -- 4. openssl s_client: the certificate and the protocol versions --------------


@pytest.mark.parametrize("client_mode", CLIENT_MODES)
async def test_openssl_s_client_sees_the_trustme_certificate_and_tls12_or_newer_only(
    tls_dovecot, popguard, pki, client_mode
):
    openssl = tool("openssl")
    proxy = await start_proxy(popguard, pki, tls_dovecot, client_mode, "none")
    # -ign_eof: after QUIT, wait for the server to close instead of leaving at once.
    base = [openssl, "s_client", "-connect", f"127.0.0.1:{proxy.port}", "-crlf", "-ign_eof"]
    if client_mode == "starttls":
        base += ["-starttls", "pop3"]
    base += ["-CAfile", pki.ca_file, "-verify_return_error", "-verify_ip", "127.0.0.1"]
    base += ["-servername", "localhost", "-alpn", "pop3"]

    async def s_client(flag: str) -> tuple[int, str]:
        argv = [*base, flag]
        if flag in ("-tls1", "-tls1_1"):
            # Make OpenSSL really offer the old version (its security level 2
            # forbids the SHA-1 suites); the refusal must then come from popguard.
            argv += ["-cipher", "DEFAULT:@SECLEVEL=0"]
        proc = await run(argv, stdin=b"QUIT\n")
        return proc.returncode, output(proc)

    for flag, version in (("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")):
        code, out = await s_client(flag)
        assert code == 0, out  # a clean end: close_notify after QUIT's +OK
        assert "unexpected eof" not in out, out
        assert re.search(rf"Protocol\s*: {re.escape(version)}\b", out), out
        assert "Verify return code: 0 (ok)" in out, out
        (subject,) = re.findall(r"^subject=(.*)$", out, re.M)
        (issuer,) = re.findall(r"^issuer=(.*)$", out, re.M)
        assert pki.leaf_unit in subject, subject
        assert "CN = localhost" in subject, subject
        assert pki.ca_unit in issuer, issuer
        assert "ALPN protocol: pop3" in out, out
        assert "+OK Logging out" in out, out  # QUIT went through to Dovecot and back
    for flag in ("-tls1", "-tls1_1"):
        code, out = await s_client(flag)
        assert code != 0, out
        assert "Cipher is (NONE)" in out, out  # no session was established
        assert "Logging out" not in out
        # (No protocol_version alert reaches the client: trio's SSLStream drops
        # the alert OpenSSL queued when the handshake fails.  popguard's record
        # below shows the refusal was its own, for the version.)

    await proxy.wait_for("session.closed", 4)
    closed = proxy.sink.named("session.closed")
    assert sorted(e["reason"] for e in closed) == ["client_error"] * 2 + ["quit"] * 2
    refused = [e for e in closed if e["reason"] == "client_error"]
    for e in refused:
        assert e["detail"].startswith("TLS handshake failed"), e
        assert "unsupported protocol" in e["detail"].lower(), e
    versions = sorted(r["tls_version"] for r in tls_records(proxy, "client"))
    assert versions == ["TLSv1.2", "TLSv1.3"]
    assert {r["sni"] for r in tls_records(proxy, "client")} == {"localhost"}
    # A refused handshake never opened an upstream connection for POP3S.
    connected = len(proxy.sink.named("upstream.connected"))
    assert connected == (2 if client_mode == "implicit" else 4)


# -- 5. APOP through STLS toward Dovecot: the greeting is relayed unchanged -------


def check_stls_tap(conn: Any, user: str) -> bytes:
    """What the tap saw of an STLS upstream session; returns Dovecot's greeting."""
    greeting, _, after = bytes(conn.from_server).partition(b"\r\n")
    # popguard read Dovecot's greeting, said STLS and nothing else in plaintext.
    assert after.startswith(b"+OK Begin TLS negotiation now.\r\n"), after[:60]
    assert bytes(conn.from_client).startswith(b"STLS\r\n")
    assert user.encode() not in bytes(conn.from_client)  # the rest went encrypted
    return greeting + b"\r\n"


@pytest.mark.parametrize("client_mode", CLIENT_MODES)
async def test_apop_with_poplib_through_an_stls_upstream(
    tls_dovecot, tls_mailbox, make_messages, popguard, pki, tap, client_mode
):
    messages = make_messages(2, seed=105)
    user, password = tls_mailbox(messages)
    recorder = await tap(tls_dovecot.address)
    proxy = await start_proxy(
        popguard, pki, tls_dovecot, client_mode, "starttls", via=recorder.address
    )

    def session() -> tuple[bytes, bytes, tuple[int, int], list[bytes]]:
        if client_mode == "implicit":
            pop = poplib.POP3_SSL(*proxy.address, context=pki.client_context(), timeout=READ_LIMIT)
        else:
            pop = poplib.POP3(*proxy.address, timeout=READ_LIMIT)
        greeting = pop.getwelcome()
        if client_mode == "starttls":
            pop.stls(context=pki.client_context())
        apop = pop.apop(user, password)  # the digest over the greeting's timestamp
        stat = pop.stat()
        _, lines, _ = pop.retr(2)
        pop.quit()
        return greeting, apop, stat, lines

    greeting, apop, stat, lines = await in_thread(session)
    await proxy.wait_for("session.closed")
    await recorder.wait_closed()
    (conn,) = recorder.connections
    # The client got Dovecot's greeting byte for byte, APOP timestamp included.
    assert greeting + b"\r\n" == check_stls_tap(conn, user)
    assert apop.startswith(b"+OK")
    assert stat == (2, sum(len(m) for m in messages))
    assert poplib_bytes(lines) == messages[1]
    assert [(e["user"], e["mechanism"]) for e in proxy.sink.named("auth.succeeded")] == [
        (user, "APOP")
    ]
    check_tls_records(proxy, client_mode, "starttls")
    digest = hashlib.md5(timestamp_of(greeting) + password.encode()).hexdigest()
    proxy.assert_never_logged([password, digest])


@pytest.mark.parametrize("client_mode", [*CLIENT_MODES, "none"])
async def test_apop_on_the_wire_through_an_stls_upstream_keeps_dovecots_timestamp(
    tls_dovecot, tls_mailbox, make_messages, popguard, pki, tap, client_mode
):
    """The same on a raw wire, also behind a plain listener: exact bytes."""
    messages = make_messages(2, seed=105)
    user, password = tls_mailbox(messages)
    recorder = await tap(tls_dovecot.address)
    proxy = await start_proxy(
        popguard, pki, tls_dovecot, client_mode, "starttls", via=recorder.address
    )

    def session() -> tuple[bytes, bytes, bytes, bytes, bytes]:
        w = Wire(proxy.address)
        if client_mode == "implicit":
            w.tls(pki.client_context())
            greeting = w.readline()
        elif client_mode == "starttls":
            greeting = w.readline()
            assert w.command("STLS") == b"+OK Begin TLS negotiation\r\n"
            w.tls(pki.client_context())
        else:
            greeting = w.readline()
            # A plain listener still refuses STLS, whatever the upstream does.
            assert w.command("STLS") == b"-ERR STLS is not available through this proxy\r\n"
        capa = w.command("CAPA", multiline=True)
        digest = hashlib.md5(timestamp_of(greeting) + password.encode()).hexdigest()
        apop = w.command(f"APOP {user} {digest}")
        stat = w.command("STAT")
        retr = w.command("RETR 2", multiline=True)
        w.command("QUIT")
        w.close()
        return greeting, capa, apop, stat, retr

    greeting, capa, apop, stat, retr = await in_thread(session)
    await proxy.wait_for("session.closed")
    await recorder.wait_closed()
    (conn,) = recorder.connections
    assert greeting == check_stls_tap(conn, user)  # byte for byte, timestamp included
    assert timestamp_of(greeting)
    assert b"\r\nSTLS\r\n" not in capa  # Dovecot's under TLS, popguard's never here
    assert apop.startswith(b"+OK"), apop
    assert stat == b"+OK 2 %d\r\n" % sum(len(m) for m in messages)
    assert retr.partition(b"\r\n")[2].replace(b"\r\n..", b"\r\n.") == messages[1] + b".\r\n"
    assert [(e["user"], e["mechanism"]) for e in proxy.sink.named("auth.succeeded")] == [
        (user, "APOP")
    ]
    if client_mode == "none":
        (upstream,) = tls_records(proxy, "upstream")
        assert upstream["stls"] is True
        assert not tls_records(proxy, "client")
    else:
        check_tls_records(proxy, client_mode, "starttls")
    proxy.assert_never_logged([password])


# -- 6. records on both sides ------------------------------------------------------


@pytest.mark.parametrize("client_mode", CLIENT_MODES)
async def test_records_carry_version_cipher_and_sni_on_both_sides(
    tls_dovecot, tls_mailbox, make_messages, popguard, pki, client_mode
):
    user, password = tls_mailbox(make_messages(1, seed=106))
    proxy = await start_proxy(
        popguard, pki, tls_dovecot, client_mode, "implicit", server_name="localhost"
    )

    def session() -> str:
        w = Wire(proxy.address)
        if client_mode == "starttls":
            w.readline()
            assert w.command("STLS") == b"+OK Begin TLS negotiation\r\n"
            w.tls(pki.client_context(), hostname="localhost")
        else:
            w.tls(pki.client_context(), hostname="localhost")
            w.readline()
        version = w.sock.version()  # type: ignore[attr-defined]
        assert w.command(f"USER {user}").startswith(b"+OK")
        assert w.command(f"PASS {password}").startswith(b"+OK")
        assert w.command("QUIT").startswith(b"+OK")
        w.close()
        return version

    version = await in_thread(session)
    await proxy.wait_for("session.closed")
    (client,), (upstream,) = check_tls_records(proxy, client_mode, "implicit")
    assert client["tls_version"] == version
    assert (client["sni"], client["alpn"]) == ("localhost", "pop3")
    assert upstream["sni"] == "localhost"  # server_name: sent, and verified
    # POP3S: the client's handshake comes first, before any upstream connection;
    # STLS: the upstream is secured first, the client's STLS comes later.
    sides = [e["side"] for e in proxy.sink.named("tls.established")]
    assert sides == (
        ["client", "upstream"] if client_mode == "implicit" else ["upstream", "client"]
    )
    assert not proxy.sink.named("popguard.tls_warning")
    proxy.assert_never_logged([password])


# -- 7. verification toward Dovecot ---------------------------------------------


@pytest.mark.parametrize("upstream_mode", ["implicit", "starttls"])
@pytest.mark.parametrize(
    ("settings", "error"),
    [
        pytest.param({"ca_file": None}, "certificate verify failed", id="system-store"),
        pytest.param({"server_name": "mail.example.org"}, "mismatch", id="wrong-name"),
    ],
)
async def test_untrusted_upstream_certificate_gives_sys_temp(
    tls_dovecot, tls_mailbox, make_messages, popguard, pki, upstream_mode, settings, error
):
    _, password = tls_mailbox(make_messages(1, seed=107))
    proxy = await start_proxy(popguard, pki, tls_dovecot, "starttls", upstream_mode, **settings)

    def session() -> bytes:
        w = Wire(proxy.address)
        data = w.read_to_eof()
        w.close()
        return data

    assert await in_thread(session) == REPLY_UPSTREAM_UNAVAILABLE
    (failed,) = await proxy.wait_for("upstream.failed")
    assert "TLS handshake failed" in failed["error"], failed
    assert error in failed["error"].lower(), failed
    (closed,) = await proxy.wait_for("session.closed")
    assert closed["reason"] == "upstream_unreachable"
    assert not proxy.sink.named("upstream.connected")
    assert not proxy.sink.named("tls.established")
    proxy.assert_never_logged([password])


async def test_pop3s_client_gets_sys_temp_over_tls_when_upstream_is_untrusted(
    tls_dovecot, popguard, pki
):
    proxy = await popguard(
        tls=ListenerTLS(mode="implicit", cert=pki.certs),
        upstream=(tls_dovecot.host, tls_dovecot.tls_port),
        upstream_tls=UpstreamTLS(mode="implicit"),  # the system store
    )

    def session() -> bytes:
        w = Wire(proxy.address)
        w.tls(pki.client_context())
        data = w.read_to_eof()
        w.close()
        return data

    assert await in_thread(session) == REPLY_UPSTREAM_UNAVAILABLE
    (failed,) = await proxy.wait_for("upstream.failed")
    assert "certificate verify failed" in failed["error"].lower()
    assert [e["side"] for e in proxy.sink.named("tls.established")] == ["client"]


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
@pytest.mark.parametrize("upstream_mode", ["implicit", "starttls"])
async def test_verify_off_is_an_explicit_logged_opt_in(
    tls_dovecot, tls_mailbox, make_messages, popguard, pki, upstream_mode
):
    messages = make_messages(2, seed=108)
    user, password = tls_mailbox(messages)
    proxy = await start_proxy(
        popguard,
        pki,
        tls_dovecot,
        "implicit",
        upstream_mode,
        ca_file=None,
        verify=False,
        min_version="TLSv1.1",
    )
    # Both weakenings are announced once, at start, before any session.
    warnings = [e["warning"] for e in proxy.sink.named("popguard.tls_warning")]
    assert len(warnings) == 2, warnings
    assert any("verification is OFF" in w for w in warnings)
    assert any("TLSv1.1" in w for w in warnings)
    names = proxy.sink.names()
    assert names.index("popguard.tls_warning") < names.index("popguard.started")

    def session() -> list[bytes]:
        pop = poplib.POP3_SSL(*proxy.address, context=pki.client_context(), timeout=READ_LIMIT)
        pop.user(user)
        pop.pass_(password)
        lines = [poplib_bytes(pop.retr(i)[1]) for i in (1, 2)]
        pop.quit()
        return lines

    assert await in_thread(session) == messages
    await proxy.wait_for("session.closed")
    (_, (upstream,)) = check_tls_records(proxy, "implicit", upstream_mode)
    # Only the floor was lowered: Dovecot and popguard still agree on 1.2+.
    assert upstream["tls_version"] in ("TLSv1.2", "TLSv1.3")
    proxy.assert_never_logged([password])


# -- 8. the STLS injection class against the real Dovecot -------------------------


@pytest.mark.parametrize("upstream_mode", UPSTREAM_MODES)
async def test_stls_command_injection_never_reaches_dovecot(
    tls_dovecot, tls_mailbox, make_messages, popguard, pki, tap, upstream_mode
):
    """CVE-2011-0411 class: ``STLS\\r\\nUSER x\\r\\n`` in one plaintext packet."""
    messages = make_messages(1, seed=109)
    user, password = tls_mailbox(messages)
    if upstream_mode == "implicit":
        recorder = await tap((tls_dovecot.host, tls_dovecot.tls_port))
    else:
        recorder = await tap(tls_dovecot.address)
    proxy = await start_proxy(
        popguard, pki, tls_dovecot, "starttls", upstream_mode, via=recorder.address
    )

    def session() -> list[bytes]:
        w = Wire(proxy.address)
        w.readline()
        w.send(b"STLS\r\nUSER injected\r\n")  # one segment: TCP_NODELAY, one sendall
        replies = [w.readline()]
        w.tls(pki.client_context())
        # Had "USER injected" run, the next command would get a reply too early
        # (and USER after USER is allowed, so Dovecot would not complain).
        replies.append(w.command("NOOP"))
        replies.append(w.command(f"USER {user}"))
        replies.append(w.command(f"PASS {password}"))
        replies.append(w.command("STAT"))
        replies.append(w.command("QUIT"))
        w.close()
        return replies

    replies = await in_thread(session)
    assert replies[0] == b"+OK Begin TLS negotiation\r\n"
    assert replies[1].startswith(b"-ERR")  # NOOP before login: Dovecot's own answer
    assert replies[2].startswith(b"+OK")
    assert replies[3].startswith(b"+OK")
    assert replies[4] == b"+OK 1 %d\r\n" % len(messages[0])
    await proxy.wait_for("session.closed")
    await recorder.wait_closed()
    (conn,) = recorder.connections
    sent = bytes(conn.from_client)
    assert b"injected" not in sent
    if upstream_mode == "none":
        # Plaintext toward Dovecot: the tap shows every command it received.
        assert sent.startswith(b"NOOP\r\nUSER " + user.encode() + b"\r\n"), sent[:80]
    elif upstream_mode == "starttls":
        assert sent.startswith(b"STLS\r\n\x16\x03")  # popguard's own, then only TLS
    else:
        assert sent.startswith(b"\x16\x03")  # a ClientHello: nothing ever in plaintext
    (rejected,) = proxy.sink.named("command.rejected")
    assert "CVE-2011-0411" in rejected["reason"]
    assert rejected["reason"].startswith("15 octets pipelined after STLS discarded")
    proxy.assert_never_logged([password])
