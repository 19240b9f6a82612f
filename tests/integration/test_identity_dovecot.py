"""Which account did this login open?  popguard's answer against Dovecot's.

popguard keys policies, limits, throttles and records by the account the
upstream server opens (``popguard.core.identity``).  Each row of the table
below logs in through popguard to a real Dovecot with a raw socket client
(every byte chosen: spellings, base64 with whitespace or without padding,
initial responses split across words, master users...) and must end in
exactly one of:

(a) Dovecot rejected the login: popguard recorded ``auth.failed``, and
    Dovecot logged no ``Login:`` line;
(b) Dovecot opened an account (``user=<...>`` of its ``Login:`` line), and
    popguard's ``auth.succeeded`` names exactly that account;
(c) popguard refused the login itself (``auth.refused``, or
    ``command.rejected`` where the command line was malformed): the client
    got popguard's ``-ERR``, the credentials never reached Dovecot (a
    recording tap between the two shows every byte), and Dovecot logged no
    login.

Dovecot is configured several ways (``popguard.testing.dovecot``): its
defaults (``%Lu``: names lower-cased), master users with separator ``*``, a
default realm, ``%Ln`` (domain dropped) and ``%u`` (exact); popguard is
given the matching :class:`IdentityRules` (and, for master logins, also the
default rules, which must refuse ``*``).

Then the same logins against policies (``deny_commands``, ``access``,
``max_sessions_per_user``, ``login_throttle``): a rule for ``alice`` must
hold whichever spelling and mechanism opened alice's mailbox; and the audit
report counts what ``ALICE`` did under ``alice``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import re
import secrets
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any

import pytest
import trio

from popguard.core.identity import IdentityRules, login_text
from popguard.testing.dovecot import DovecotInstance, stored_form

in_thread = trio.to_thread.run_sync

#: Every wait is generous: the machine may be small and busy.
WAIT = 30.0

PASSWORD = "pw-alice-" + secrets.token_hex(6)
BOB_PASSWORD = "pw-bob-" + secrets.token_hex(6)
MASTER = "master"
MASTER_PASSWORD = "pw-master-" + secrets.token_hex(6)
ALL_PASSWORDS = (PASSWORD, BOB_PASSWORD, MASTER_PASSWORD)

MESSAGE = b"Subject: identity\r\nFrom: a@example.org\r\n\r\nhello, whoever you are\r\n"

#: Each Dovecot configuration (DovecotInstance keywords) and its alice.
SERVERS: dict[str, dict[str, Any]] = {
    "lower": {},  # Dovecot's defaults: auth_username_format = %Lu
    "master": {"master_users": {MASTER: MASTER_PASSWORD}, "master_user_separator": "*"},
    "realm": {"default_realm": "example.org"},
    "strip": {"username_format": "%Ln"},
    "exact": {"username_format": "%u"},
}
ALICE = {kind: "alice" for kind in SERVERS} | {"realm": "alice@example.org"}
BOB = {kind: "bob" for kind in SERVERS} | {"realm": "bob@example.org"}

DEFAULT = IdentityRules()
MASTERS = IdentityRules(master_separator="*")
REALM = IdentityRules(default_domain="example.org")
STRIP = IdentityRules(domain="strip")
EXACT = IdentityRules(case="exact")

# Dovecot's log: a connection ends with exactly one "Disconnected" line,
# from pop3-login (no login) or from pop3(user) (after one).
_DISCONNECTED = re.compile(rb": Info: Disconnected\b")


# -- the Dovecot instances, started when a row first needs one ----------------------


class Servers:
    """One Dovecot per configuration in :data:`SERVERS`, for the whole module."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.running: dict[str, DovecotInstance] = {}
        self._users = count(1)

    def __call__(self, kind: str) -> DovecotInstance:
        instance = self.running.get(kind)
        if instance is None:
            instance = DovecotInstance(self.base / kind, **SERVERS[kind])
            instance.start()
            self.running[kind] = instance
            instance.add_user(ALICE[kind], PASSWORD, [MESSAGE])
            instance.add_user(BOB[kind], BOB_PASSWORD, [MESSAGE])
        return instance

    def new_alice(self, kind: str = "lower") -> str:
        """A fresh alice (``alice<n>``, one message) for a test that changes mail."""
        name = f"alice{next(self._users)}"
        self(kind).add_user(name, PASSWORD, [MESSAGE])
        return name

    def stop(self) -> None:
        for instance in self.running.values():
            instance.stop()


@pytest.fixture(scope="module")
def servers(dovecot, tmp_path_factory) -> Iterator[Servers]:
    # ``dovecot`` (the shared instance) skips the module where Dovecot cannot
    # run, and fails it in CI.
    started = Servers(tmp_path_factory.mktemp("identity"))
    try:
        yield started
    finally:
        started.stop()


# -- what the client sends ------------------------------------------------------------


@dataclass(frozen=True)
class Ctx:
    """What a step may depend on: the greeting and the reply just read."""

    greeting: bytes
    last: bytes


Step = bytes | Callable[[Ctx], bytes]


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def spaced(encoded: bytes, gap: bytes = b" ", every: int = 4) -> bytes:
    """Base64 with ``gap`` after every ``every`` characters (not at the ends)."""
    return gap.join(encoded[i : i + every] for i in range(0, len(encoded), every))


def unpadded(encoded: bytes) -> bytes:
    stripped = encoded.rstrip(b"=")
    assert stripped != encoded, "pick data whose encoding has padding"
    return stripped


def plain(authcid: bytes, password: str, authzid: bytes = b"") -> bytes:
    return authzid + b"\0" + authcid + b"\0" + password.encode()


def apop(name: bytes, password: str, gap: bytes = b" ", tail: bytes = b"") -> Step:
    """APOP with the digest of the greeting's timestamp (RFC 1939 §7)."""

    def step(ctx: Ctx) -> bytes:
        stamp = re.search(rb"<[^<>]*>", ctx.greeting)
        assert stamp is not None, ctx.greeting
        digest = hashlib.md5(stamp.group(0) + password.encode()).hexdigest().encode()
        return b"APOP " + name + gap + digest + tail

    return step


def cram(name: bytes, password: str) -> Step:
    """The CRAM-MD5 response to the challenge just read (RFC 2195)."""

    def step(ctx: Ctx) -> bytes:
        assert ctx.last.startswith(b"+ "), ctx.last
        challenge = base64.b64decode(ctx.last[2:].strip())
        digest = hmac.new(password.encode(), challenge, "md5").hexdigest().encode()
        return b64(name + b" " + digest)

    return step


def user_pass(name: bytes, password: str) -> tuple[Step, ...]:
    return (b"USER " + name, b"PASS " + password.encode())


def plain_ir(authcid: bytes, password: str, authzid: bytes = b"") -> tuple[Step, ...]:
    return (b"AUTH PLAIN " + b64(plain(authcid, password, authzid)),)


def plain_continued(authcid: bytes, password: str, authzid: bytes = b"") -> tuple[Step, ...]:
    return (b"AUTH PLAIN", b64(plain(authcid, password, authzid)))


def login(name: bytes, password: str) -> tuple[Step, ...]:
    return (b"AUTH LOGIN", b64(name), b64(password.encode()))


def login_ir(name: bytes, password: str) -> tuple[Step, ...]:
    return (b"AUTH LOGIN " + b64(name), b64(password.encode()))


def cram_md5(name: bytes, password: str) -> tuple[Step, ...]:
    return (b"AUTH CRAM-MD5", cram(name, password))


# -- the raw client -----------------------------------------------------------------


@dataclass(repr=False)  # the repr is the readable form below
class Transcript:
    greeting: bytes = b""
    #: (line sent, reply line) for each step, and the "*" of a cancel.
    exchange: list[tuple[bytes, bytes]] = field(default_factory=list)
    logged_in: bool = False
    #: Everything after the login: QUIT's reply, or popguard's last words.
    rest: bytes = b""

    @property
    def final(self) -> bytes:
        """The reply that ended the login attempt."""
        return self.exchange[-1][1] if self.exchange else b""

    def __repr__(self) -> str:
        lines = [f"S: {self.greeting!r}"]
        for sent, reply in self.exchange:
            lines += [f"C: {sent!r}", f"S: {reply!r}"]
        lines.append(f"then: {self.rest!r}")
        return "\n".join(lines)


def converse(wire: Any, steps: Sequence[Step], then: Sequence[bytes] = (b"QUIT",)) -> Transcript:
    """Log in with ``steps`` (blocking; run it in a thread), then send ``then``.

    A ``+`` challenge is answered by the next step; ``+OK`` to anything but
    USER ends the login, and so does ``-ERR`` to anything but USER (after a
    refused USER the client sends PASS anyway, as careless clients do: the
    password must go nowhere).  Steps left over after a challenge: the
    exchange is cancelled with ``*``.  ``then`` is sent only after a login;
    otherwise just QUIT.
    """
    t = Transcript()
    t.greeting = wire.readline()
    ctx = Ctx(t.greeting, t.greeting)
    try:
        for step in steps:
            line = step(ctx) if callable(step) else step
            wire.send(line + b"\r\n")
            reply = wire.readline()
            t.exchange.append((line, reply))
            ctx = Ctx(t.greeting, reply)
            naming_user = line[:5].upper() == b"USER "
            if reply.startswith(b"+OK"):
                if naming_user:
                    continue
                t.logged_in = True
                break
            if reply.startswith(b"-ERR"):
                if naming_user:
                    continue
                break
        else:
            if ctx.last.startswith(b"+ ") or ctx.last == b"+\r\n":
                wire.send(b"*\r\n")
                t.exchange.append((b"*", wire.readline()))
        for line in then if t.logged_in else (b"QUIT",):
            wire.send(line + b"\r\n")
        t.rest = wire.read_to_eof()
    except (EOFError, OSError) as exc:  # popguard may end a session itself
        t.rest += f"<{type(exc).__name__}: {exc}>".encode()
    return t


# -- what each side saw ---------------------------------------------------------------


@dataclass(repr=False)  # the repr is the readable form below
class Evidence:
    transcript: Transcript
    records: list[dict[str, Any]]
    #: What popguard sent to Dovecot, and what Dovecot sent back (the tap).
    upstream: bytes
    downstream: bytes
    #: The accounts Dovecot logged in, and its whole log for this connection.
    logins: list[str]
    log: str

    def named(self, event: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["event"] == event]

    def upstream_lines(self) -> list[bytes]:
        return [line for line in self.upstream.split(b"\r\n") if line]

    def __repr__(self) -> str:
        keep = ("event", "user", "login", "mechanism", "master", "reason", "reply", "detail")
        records = [{k: r[k] for k in keep if k in r} for r in self.records]
        return (
            f"\n--- client transcript\n{self.transcript}"
            f"\n--- popguard -> Dovecot\n{self.upstream!r}"
            f"\n--- Dovecot -> popguard\n{self.downstream!r}"
            "\n--- popguard records\n" + "\n".join(map(str, records)) + "\n--- Dovecot log\n"
            f"{self.log}"
        )


async def run_login(
    servers: Servers,
    popguard: Any,
    tap: Any,
    wire: Any,
    server: str,
    steps: Sequence[Step],
    *,
    rules: IdentityRules = DEFAULT,
    then: Sequence[bytes] = (b"QUIT",),
    **settings: Any,
) -> Evidence:
    """One session through a fresh popguard (with ``rules``) to Dovecot ``server``."""
    dovecot = servers(server)
    recorder = await tap(dovecot.address)
    proxy = await popguard(
        upstream=recorder.address, identity=rules, secrets=ALL_PASSWORDS, **settings
    )
    mark = dovecot.log_position()
    client = wire(*proxy.address, timeout=WAIT)
    transcript = await in_thread(converse, client, steps, then)
    client.close()
    await proxy.wait_for("session.closed", limit=WAIT)
    await recorder.wait_closed(WAIT)
    log = await in_thread(wait_for_disconnect, dovecot, mark)
    connection = recorder.connections[0] if recorder.connections else None
    return Evidence(
        transcript=transcript,
        records=list(proxy.sink.events),
        upstream=bytes(connection.from_client) if connection else b"",
        downstream=bytes(connection.from_server) if connection else b"",
        logins=dovecot.login_users(since=mark),
        log=log,
    )


def wait_for_disconnect(dovecot: DovecotInstance, mark: int, connections: int = 1) -> str:
    """Dovecot's log since ``mark``, once it logged the end of ``connections``."""
    deadline = time.monotonic() + WAIT
    while True:
        log = dovecot.log_bytes(mark)
        if len(_DISCONNECTED.findall(log)) >= connections or time.monotonic() > deadline:
            return log.decode("utf-8", "backslashreplace")
        time.sleep(0.02)


# -- the instances themselves, without popguard ---------------------------------------


@pytest.mark.parametrize(
    ("kind", "name", "setting", "account"),
    [
        ("lower", b"ALICE", None, "alice"),
        ("master", b"ALICE*MASTER", "auth_master_user_separator = *", "alice"),
        ("realm", b"ALICE", "auth_default_realm = example.org", "alice@example.org"),
        ("strip", b"ALICE@other.test", "auth_username_format = %Ln", "alice"),
        ("exact", b"alice", "auth_username_format = %u", "alice"),
    ],
)
async def test_dovecot_maps_names_as_configured(
    kind: str, name: bytes, setting: str | None, account: str, servers, wire
) -> None:
    dovecot = servers(kind)
    doveconf = await trio.run_process(
        ["doveconf", "-c", str(dovecot.conf_path), "-n"], capture_stdout=True, check=False
    )
    config = doveconf.stdout.decode()
    assert doveconf.returncode == 0, config
    for key in ("auth_username_format", "auth_default_realm", "auth_master_user_separator"):
        if setting is None or not setting.startswith(key):
            assert key not in config, config  # Dovecot's default, not written
    if setting is not None:
        assert setting in config.splitlines(), config
    assert ("master = yes" in config) == (kind == "master"), config
    mark = dovecot.log_position()
    password = MASTER_PASSWORD if kind == "master" else PASSWORD
    client = wire(*dovecot.address, timeout=WAIT)
    transcript = await in_thread(converse, client, user_pass(name, password))
    assert transcript.logged_in, transcript
    await in_thread(wait_for_disconnect, dovecot, mark)
    assert dovecot.login_users(since=mark) == [account]


# -- the table ------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    id: str
    server: str
    steps: tuple[Step, ...]
    #: The outcome: "a", "b" or "c"; two letters where either is right.
    expect: str
    #: The records' ``mechanism`` (None: not checked).
    mechanism: str | None
    #: (b) the account; (a) auth.failed's ``user`` (None: not checked).
    account: str | None = None
    #: The name as typed, which ``login`` records (b).
    typed: bytes | None = None
    master: str | None = None
    rules: IdentityRules = DEFAULT
    #: (c) the record of popguard's refusal.
    refusal: str = "auth.refused"


def row(
    id: str, server: str, steps: tuple[Step, ...], expect: str, mechanism: str | None, **kw: Any
) -> Any:
    return pytest.param(Row(id, server, steps, expect, mechanism, **kw), id=id)


A, B = b"alice", b"ALICE"
LONG = b"a" * 300

# One row per line where it fits: (id, Dovecot, client steps, outcome, mechanism, ...).
# fmt: off
ROWS = [
    # -- spellings, through every mechanism, Dovecot's defaults (%Lu) ---------------------
    row("user-lower", "lower", user_pass(A, PASSWORD), "b", "USER", account="alice", typed=A),
    row("user-upper", "lower", user_pass(B, PASSWORD), "b", "USER", account="alice", typed=B),
    row("user-mixed", "lower", user_pass(b"AlIcE", PASSWORD), "b", "USER", account="alice"),
    row("apop-lower", "lower", (apop(A, PASSWORD),), "b", "APOP", account="alice", typed=A),
    row("apop-upper", "lower", (apop(B, PASSWORD),), "b", "APOP", account="alice", typed=B),
    row("apop-two-spaces", "lower", (apop(B, PASSWORD, gap=b"  "),), "c", "APOP"),
    row("apop-third-word", "lower", (apop(B, PASSWORD, tail=b" x"),), "c", "APOP"),
    row("plain-ir-upper", "lower", plain_ir(B, PASSWORD), "b", "PLAIN", account="alice", typed=B),
    row("plain-continued-upper", "lower", plain_continued(B, PASSWORD), "b", "PLAIN",
        account="alice", typed=B),
    row("plain-lowercase-mechanism", "lower", (b"AUTH plain " + b64(plain(B, PASSWORD)),), "b",
        "PLAIN", account="alice"),
    row("login-upper", "lower", login(B, PASSWORD), "b", "LOGIN", account="alice", typed=B),
    row("login-ir-upper", "lower", login_ir(B, PASSWORD), "b", "LOGIN", account="alice"),
    row("cram-upper", "lower", cram_md5(B, PASSWORD), "b", "CRAM-MD5", account="alice", typed=B),
    # -- base64 as lenient decoders read it ------------------------------------------------
    row("plain-ir-spaces", "lower", (b"AUTH PLAIN " + spaced(b64(plain(B, PASSWORD))),), "b",
        "PLAIN", account="alice"),
    # A tab is a control character: the AUTH line is refused as a command.
    row("plain-ir-tab", "lower", (b"AUTH PLAIN " + spaced(b64(plain(B, PASSWORD)), b"\t"),),
        "c", "PLAIN", refusal="command.rejected"),
    row("plain-continued-spaces", "lower", (b"AUTH PLAIN", spaced(b64(plain(B, PASSWORD)))),
        "b", "PLAIN", account="alice"),
    # Dovecot alone refuses tabs in a continuation; popguard skips them and
    # forwards the canonical encoding, so Dovecot reads the name popguard read.
    row("plain-continued-tab", "lower", (b"AUTH PLAIN", spaced(b64(plain(B, PASSWORD)), b"\t")),
        "b", "PLAIN", account="alice"),
    row("plain-ir-unpadded", "lower", (b"AUTH PLAIN " + unpadded(b64(plain(B, PASSWORD))),),
        "b", "PLAIN", account="alice"),
    row("plain-continued-unpadded", "lower",
        (b"AUTH PLAIN", unpadded(b64(plain(B, PASSWORD)))), "b", "PLAIN", account="alice"),
    row("login-unpadded", "lower", (b"AUTH LOGIN", unpadded(b64(B)), b64(PASSWORD.encode())),
        "b", "LOGIN", account="alice"),
    # "=", the empty initial response: Dovecot's PLAIN fails it at once (an empty
    # message), where its LOGIN takes it as "no initial response" and asks.
    row("plain-empty-ir-then-continued", "lower", (b"AUTH PLAIN =", b64(plain(B, PASSWORD))),
        "a", "PLAIN"),
    row("login-empty-ir", "lower", (b"AUTH LOGIN =", b64(B), b64(PASSWORD.encode())), "c",
        "LOGIN"),
    row("login-ir-split-words", "lower", (b"AUTH LOGIN " + spaced(b64(B)), b64(PASSWORD.encode())),
        "b", "LOGIN", account="alice", typed=B),
    row("cram-after-empty-ir", "lower", (b"AUTH CRAM-MD5 =", cram(B, PASSWORD)), "c", "CRAM-MD5"),
    row("cram-with-ir", "lower", (b"AUTH CRAM-MD5 " + b64(A), cram(A, PASSWORD)), "c",
        "CRAM-MD5"),
    # -- PLAIN's authorization identity ----------------------------------------------------
    row("plain-authzid-equal", "lower", plain_ir(A, PASSWORD, authzid=A), "b", "PLAIN",
        account="alice"),
    row("plain-authzid-equal-upper", "lower", plain_ir(B, PASSWORD, authzid=B), "b", "PLAIN",
        account="alice"),
    # Dovecot compares the two byte for byte: ALICE != alice asks for a login
    # as ALICE (lower-cased: alice) by alice as a master user, which she is not.
    row("plain-authzid-differently-cased", "lower", plain_ir(A, PASSWORD, authzid=B), "a",
        "PLAIN", account="alice"),
    row("plain-authzid-other-user", "lower", plain_ir(A, PASSWORD, authzid=b"bob"), "a",
        "PLAIN", account="bob"),
    # -- names the server cannot take, or popguard cannot tell --------------------------------
    row("user-with-domain-no-realm", "lower", user_pass(b"Alice@Example.org", PASSWORD), "a",
        "USER", account="alice@example.org"),
    # Command lines over 255 octets (RFC 2449 §4) are refused as commands.
    row("user-300", "lower", user_pass(LONG, PASSWORD), "c", "USER", refusal="command.rejected"),
    row("apop-300", "lower", (apop(LONG, PASSWORD),), "c", "APOP", refusal="command.rejected"),
    row("plain-continued-300", "lower", plain_continued(LONG, PASSWORD), "c", "PLAIN"),
    row("login-300", "lower", login(LONG, PASSWORD), "c", "LOGIN"),
    row("plain-control-char", "lower", plain_ir(b"ali\x01ce", PASSWORD), "c", "PLAIN"),
    row("plain-crlf-in-name", "lower", plain_continued(b"ali\r\nce", PASSWORD), "c", "PLAIN"),
    row("login-del-char", "lower", login(b"ALI\x7fCE", PASSWORD), "c", "LOGIN"),
    row("login-nul-in-name", "lower", login(b"alice\0bob", PASSWORD), "c", "LOGIN"),
    row("cram-control-char", "lower", cram_md5(b"ali\x1bce", PASSWORD), "c", "CRAM-MD5"),
    row("plain-not-utf8", "lower", plain_ir(b"ali\xffce", PASSWORD), "c", "PLAIN"),
    row("login-latin1", "lower", login(b"\xe9lise", PASSWORD), "c", "LOGIN"),
    row("user-not-utf8", "lower", user_pass(b"ali\xffce", PASSWORD), "c", "USER"),
    row("user-kelvin-sign", "lower", user_pass("alic\u212a".encode(), PASSWORD), "c", "USER"),
    row("user-space", "lower", user_pass(b"ali ce", PASSWORD), "c", "USER"),
    row("user-trailing-space", "lower", user_pass(b"ALICE ", PASSWORD), "c", "USER"),
    row("plain-space-in-name", "lower", plain_ir(b"ali ce", PASSWORD), "c", "PLAIN"),
    row("login-trailing-space", "lower", login(b"ALICE ", PASSWORD), "c", "LOGIN"),
    row("plain-empty-authcid", "lower", plain_ir(b"", PASSWORD, authzid=A), "c", "PLAIN"),
    # -- the AUTH line itself ------------------------------------------------------------------
    row("auth-double-space", "lower", (b"AUTH  PLAIN " + b64(plain(B, PASSWORD)),), "c", None),
    row("auth-empty-trailing-ir", "lower", (b"AUTH PLAIN ", b64(plain(B, PASSWORD))), "c",
        "PLAIN"),
    row("auth-scram-sha-1", "lower", (b"AUTH SCRAM-SHA-1 " + b64(b"n,,n=alice,r=" + b"x" * 24),),
        "c", "SCRAM-SHA-1"),
    row("auth-xoauth2", "lower",
        (b"AUTH XOAUTH2 " + b64(b"user=alice\x01auth=Bearer t0k3n\x01\x01"),), "c", "XOAUTH2"),
    row("auth-made-up-with-ir", "lower", (b"AUTH X-POPGUARD-TEST " + b64(A),), "c",
        "X-POPGUARD-TEST"),
    row("auth-made-up", "lower", (b"AUTH FOOBAR", b64(A)), "c", "FOOBAR"),
    row("user-separator-without-masters", "lower", user_pass(b"alice*master", PASSWORD), "c",
        "USER"),
    # -- master users: Dovecot with separator "*", popguard told so -----------------------------
    row("master-user", "master", user_pass(b"alice*master", MASTER_PASSWORD), "b", "USER",
        account="alice", master="master", typed=b"alice*master", rules=MASTERS),
    row("master-user-upper", "master", user_pass(b"ALICE*MASTER", MASTER_PASSWORD), "b", "USER",
        account="alice", master="master", rules=MASTERS),
    row("master-plain-ir", "master", plain_ir(b"Alice*Master", MASTER_PASSWORD), "b", "PLAIN",
        account="alice", master="master", rules=MASTERS),
    row("master-plain-continued", "master", plain_continued(b"alice*master", MASTER_PASSWORD),
        "b", "PLAIN", account="alice", master="master", rules=MASTERS),
    row("master-login", "master", login(b"ALICE*master", MASTER_PASSWORD), "b", "LOGIN",
        account="alice", master="master", rules=MASTERS),
    row("master-login-ir", "master", login_ir(b"alice*MASTER", MASTER_PASSWORD), "b", "LOGIN",
        account="alice", master="master", rules=MASTERS),
    row("master-plain-authzid", "master", plain_ir(b"master", MASTER_PASSWORD, authzid=A), "b",
        "PLAIN", account="alice", master="master", typed=A, rules=MASTERS),
    row("master-plain-authzid-upper", "master", plain_ir(b"MASTER", MASTER_PASSWORD, authzid=B),
        "b", "PLAIN", account="alice", master="master", typed=B, rules=MASTERS),
    # Equal identities are no authorization identity (Dovecot: strcmp): the
    # separator in them still splits off the master user.
    row("master-plain-authzid-equal-with-separator", "master",
        plain_ir(b"alice*master", MASTER_PASSWORD, authzid=b"alice*master"), "b", "PLAIN",
        account="alice", master="master", rules=MASTERS),
    row("master-plain-authzid-and-separator", "master",
        plain_ir(b"bob*master", MASTER_PASSWORD, authzid=A), "c", "PLAIN", rules=MASTERS),
    # Dovecot refuses master logins by APOP and CRAM-MD5 ("Authorization failed").
    row("master-apop", "master", (apop(b"alice*master", MASTER_PASSWORD),), "a", "APOP",
        account="alice", rules=MASTERS),
    row("master-cram", "master", cram_md5(b"alice*master", MASTER_PASSWORD), "a", "CRAM-MD5",
        account="alice", rules=MASTERS),
    row("master-two-separators", "master", user_pass(b"alice*master*master", MASTER_PASSWORD),
        "c", "USER", rules=MASTERS),
    row("master-empty-account", "master", user_pass(b"*master", MASTER_PASSWORD), "c", "USER",
        rules=MASTERS),
    row("master-empty-master", "master", user_pass(b"alice*", PASSWORD), "c", "USER",
        rules=MASTERS),
    row("master-wrong-password", "master", user_pass(b"alice*master", PASSWORD), "a", "USER",
        account="alice", rules=MASTERS),
    row("master-unknown-account", "master", user_pass(b"nobody*master", MASTER_PASSWORD), "a",
        "USER", account="nobody", rules=MASTERS),
    row("master-self-authzid-differently-cased", "master", plain_ir(A, PASSWORD, authzid=B),
        "a", "PLAIN", account="alice", rules=MASTERS),
    row("master-instance-plain-user", "master", user_pass(B, PASSWORD), "b", "USER",
        account="alice", rules=MASTERS),
    # -- the same Dovecot, popguard NOT told of the separator: "*" is refused -----------------
    row("master-unconfigured-user", "master", user_pass(b"alice*master", MASTER_PASSWORD), "c",
        "USER"),
    row("master-unconfigured-plain", "master", plain_ir(b"alice*master", MASTER_PASSWORD), "c",
        "PLAIN"),
    row("master-unconfigured-login", "master", login(b"alice*master", MASTER_PASSWORD), "c",
        "LOGIN"),
    # An authorization identity needs no separator: it names the account.
    row("master-unconfigured-plain-authzid", "master",
        plain_ir(b"master", MASTER_PASSWORD, authzid=B), "b", "PLAIN", account="alice",
        master="master"),
    row("master-authzid-refused-by-rules", "master",
        plain_ir(b"master", MASTER_PASSWORD, authzid=A), "c", "PLAIN",
        rules=IdentityRules(plain_authzid="refuse")),
    # -- auth_default_realm = example.org -----------------------------------------------------
    row("realm-user", "realm", user_pass(A, PASSWORD), "b", "USER", account="alice@example.org",
        rules=REALM),
    row("realm-user-upper", "realm", user_pass(B, PASSWORD), "b", "USER",
        account="alice@example.org", rules=REALM),
    row("realm-user-domain", "realm", user_pass(b"Alice@Example.ORG", PASSWORD), "b", "USER",
        account="alice@example.org", rules=REALM),
    row("realm-user-other-domain", "realm", user_pass(b"alice@other.test", PASSWORD), "a",
        "USER", account="alice@other.test", rules=REALM),
    row("realm-plain-ir", "realm", plain_ir(B, PASSWORD), "b", "PLAIN",
        account="alice@example.org", rules=REALM),
    row("realm-login", "realm", login(b"Alice", PASSWORD), "b", "LOGIN",
        account="alice@example.org", rules=REALM),
    row("realm-apop", "realm", (apop(B, PASSWORD),), "b", "APOP", account="alice@example.org",
        rules=REALM),
    row("realm-cram", "realm", cram_md5(B, PASSWORD), "b", "CRAM-MD5",
        account="alice@example.org", rules=REALM),
    # -- auth_username_format = %Ln: the domain is dropped ------------------------------------
    row("strip-user", "strip", user_pass(A, PASSWORD), "b", "USER", account="alice",
        rules=STRIP),
    row("strip-user-domain", "strip", user_pass(b"ALICE@EXAMPLE.ORG", PASSWORD), "b", "USER",
        account="alice", rules=STRIP),
    row("strip-user-other-domain", "strip", user_pass(b"alice@other.test", PASSWORD), "b",
        "USER", account="alice", rules=STRIP),
    row("strip-user-empty-domain", "strip", user_pass(b"alice@", PASSWORD), "b", "USER",
        account="alice", rules=STRIP),
    row("strip-user-only-domain", "strip", user_pass(b"@example.org", PASSWORD), "c", "USER",
        rules=STRIP),
    row("strip-plain-ir", "strip", plain_ir(b"Alice@Example.org", PASSWORD), "b", "PLAIN",
        account="alice", rules=STRIP),
    row("strip-login", "strip", login(b"ALICE@x.test", PASSWORD), "b", "LOGIN",
        account="alice", rules=STRIP),
    # -- auth_username_format = %u: names are exact --------------------------------------------
    row("exact-user", "exact", user_pass(A, PASSWORD), "b", "USER", account="alice",
        rules=EXACT),
    row("exact-user-upper", "exact", user_pass(B, PASSWORD), "a", "USER", account="ALICE",
        rules=EXACT),
    row("exact-plain-upper", "exact", plain_ir(B, PASSWORD), "a", "PLAIN", account="ALICE",
        rules=EXACT),
    row("exact-apop-upper", "exact", (apop(B, PASSWORD),), "a", "APOP", account="ALICE",
        rules=EXACT),
]
# fmt: on


def outcome(evidence: Evidence) -> str:
    if evidence.logins:
        return "b"
    if evidence.named("auth.failed"):
        return "a"
    if evidence.named("auth.refused") or evidence.named("command.rejected"):
        return "c"
    return "?"


def strictly_base64(word: bytes) -> bool:
    """``word`` is canonical base64: strict decoding, and encoding it back, give it."""
    try:
        return base64.b64encode(base64.b64decode(word, validate=True)) == word
    except (binascii.Error, ValueError):
        return False


def check_forwarded_sasl(evidence: Evidence) -> None:
    """What popguard forwarded in an AUTH exchange is canonical base64 throughout."""
    lines = evidence.upstream_lines()
    for index, line in enumerate(lines):
        if not line.upper().startswith(b"AUTH "):
            continue
        words = line.split(b" ")
        assert len(words) <= 3, f"AUTH forwarded with extra words: {line!r}{evidence}"
        if len(words) == 3 and words[2] != b"=":
            assert strictly_base64(words[2]), f"initial response {line!r}{evidence}"
        for response in lines[index + 1 :]:
            if response in (b"*", b"QUIT") or response.upper().startswith(b"CAPA"):
                break
            if re.fullmatch(rb"[A-Z]{3,4}( .*)?", response):
                break  # a command: the exchange is over
            assert strictly_base64(response), f"SASL response {response!r}{evidence}"


def check_nothing_reached_dovecot(evidence: Evidence) -> None:
    """(c): no credentials in what popguard sent to Dovecot, raw or in base64."""
    for line in evidence.upstream_lines():
        verb = line.split(b" ")[0].upper()
        assert verb not in (b"USER", b"PASS", b"APOP"), f"{line!r} reached Dovecot{evidence}"
        pieces = [line, *line.split(b" ")]
        decoded = []
        for piece in pieces:
            with contextlib.suppress(binascii.Error, ValueError):
                decoded.append(base64.b64decode(piece + b"=" * (-len(piece) % 4)))
        for password in ALL_PASSWORDS:
            for text in [*pieces, *decoded]:
                assert password.encode() not in text, f"a password reached Dovecot{evidence}"
    auths = [i for i, line in enumerate(evidence.upstream_lines()) if line[:5].upper() == b"AUTH "]
    for index in auths:
        after = evidence.upstream_lines()[index + 1 : index + 2]
        words = evidence.upstream_lines()[index].split(b" ")
        # An AUTH that reached Dovecot carried no name-bearing response, or
        # was cancelled at once.
        assert after == [b"*"] or len(words) == 2, f"AUTH not cancelled{evidence}"


@pytest.mark.parametrize("case", ROWS)
async def test_popguard_names_the_account_dovecot_opens(
    case: Row, servers, popguard, tap, wire
) -> None:
    evidence = await run_login(
        servers, popguard, tap, wire, case.server, case.steps, rules=case.rules
    )
    got = outcome(evidence)
    assert got in case.expect, f"outcome {got}, expected {case.expect}{evidence}"
    succeeded = evidence.named("auth.succeeded")
    failed = evidence.named("auth.failed")
    refused = evidence.named("auth.refused")
    rejected = evidence.named("command.rejected")
    final = evidence.transcript.final
    assert not evidence.named("session.internal_error"), evidence
    if got == "b":
        # Dovecot opened one account; popguard names exactly that one.
        assert len(evidence.logins) == 1, evidence
        assert [r["user"] for r in succeeded] == evidence.logins, evidence
        assert evidence.transcript.logged_in, evidence
        assert final.startswith(b"+OK"), evidence
        assert not failed, evidence
        assert not refused, evidence
        record = succeeded[0]
        assert record["user"] == case.account, evidence
        assert record["mechanism"] == case.mechanism, evidence
        assert record.get("master") == case.master, evidence
        if case.typed is not None:
            assert record["login"] == login_text(case.typed), evidence
        check_forwarded_sasl(evidence)
    elif got == "a":
        assert not evidence.logins, evidence
        assert not succeeded, evidence
        assert not refused, evidence
        assert len(failed) == 1, evidence
        # The client's -ERR is Dovecot's own.
        assert final.startswith(b"-ERR"), evidence
        assert final in evidence.downstream, evidence
        assert failed[0]["mechanism"] == case.mechanism, evidence
        if case.account is not None:
            assert failed[0]["user"] == case.account, evidence
        check_forwarded_sasl(evidence)
    else:
        assert not evidence.logins, evidence
        assert not succeeded, evidence
        assert not failed, evidence
        refusals = refused if refused else rejected
        assert len(refusals) == 1, evidence
        assert refusals[0]["event"] == case.refusal, evidence
        if refused and case.mechanism is not None:
            assert refused[0]["mechanism"] == case.mechanism, evidence
            assert refused[0]["reason"], evidence
        # The client's -ERR is popguard's: Dovecot never sent such a line.
        assert final.startswith(b"-ERR"), evidence
        assert final not in evidence.downstream, evidence
        check_nothing_reached_dovecot(evidence)


# -- policies keyed by the account ------------------------------------------------------------


def write_policies(directory: Path, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "50-test.yaml").write_text(text)
    return directory


def mechanisms(name: bytes, password: str) -> dict[str, tuple[Step, ...]]:
    """Every way popguard lets a login through, for ``name``."""
    return {
        "USER": user_pass(name, password),
        "APOP": (apop(name, password),),
        "PLAIN": plain_ir(name, password),
        "PLAIN-continued": plain_continued(name, password),
        "LOGIN": login(name, password),
        "LOGIN-ir": login_ir(name, password),
        "CRAM-MD5": cram_md5(name, password),
    }


MECHANISMS = list(mechanisms(b"", "x"))
REPLY_IN_USE = b"-ERR [IN-USE] Too many sessions for this user\r\n"
REPLY_LOGIN_DELAY = b"-ERR [LOGIN-DELAY] Too many failed logins, try again later\r\n"
REPLY_ACCESS_DENIED = b"-ERR [SYS/PERM] Access denied by policy\r\n"


@pytest.mark.parametrize("mechanism", [*MECHANISMS, "master-USER", "master-PLAIN-authzid"])
async def test_deny_dele_for_alice_holds_for_ALICE(
    mechanism: str, servers, popguard, tap, wire, tmp_path
) -> None:
    kind = "master" if mechanism.startswith("master") else "lower"
    alice = servers.new_alice(kind)
    upper = alice.upper().encode()
    if mechanism == "master-USER":
        steps = user_pass(upper + b"*MASTER", MASTER_PASSWORD)
    elif mechanism == "master-PLAIN-authzid":
        steps = plain_ir(b"Master", MASTER_PASSWORD, authzid=upper)
    else:
        steps = mechanisms(upper, PASSWORD)[mechanism]
    directory = write_policies(
        tmp_path / "policies",
        f"rules:\n  - name: {alice}-read-only\n    match: {{user: {alice}}}\n"
        "    set: {deny_commands: [DELE]}\n",
    )
    evidence = await run_login(
        servers,
        popguard,
        tap,
        wire,
        kind,
        steps,
        rules=MASTERS,
        policies=directory,
        then=[b"DELE 1", b"QUIT"],
    )
    assert evidence.logins == [alice], evidence
    assert [r["user"] for r in evidence.named("auth.succeeded")] == [alice], evidence
    assert evidence.transcript.rest.startswith(b"-ERR [SYS/PERM]"), evidence
    assert b"DELE" not in evidence.upstream, evidence
    assert not evidence.named("dele.marked"), evidence
    denied = evidence.named("policy.denied")
    assert [(d["command"], d["user"]) for d in denied] == [("DELE", alice)], evidence
    assert servers(kind).maildir_messages(alice) == [stored_form(MESSAGE)]


@pytest.mark.parametrize("match", ["user", "claimed_user"])
@pytest.mark.parametrize("mechanism", ["USER", "PLAIN", "LOGIN", "CRAM-MD5", "APOP"])
async def test_access_deny_for_alice_refuses_Alice(
    match: str, mechanism: str, servers, popguard, tap, wire, tmp_path
) -> None:
    alice = servers.new_alice()
    directory = write_policies(
        tmp_path / "policies",
        f"rules:\n  - name: no-{alice}\n    match: {{{match}: {alice}}}\n"
        "    set: {access: deny}\n",
    )
    steps = mechanisms(alice.capitalize().encode(), PASSWORD)[mechanism]
    evidence = await run_login(servers, popguard, tap, wire, "lower", steps, policies=directory)
    assert not evidence.transcript.logged_in, evidence
    assert REPLY_ACCESS_DENIED in [reply for _, reply in evidence.transcript.exchange], evidence
    assert [d["setting"] for d in evidence.named("policy.denied")] == ["access"], evidence
    if match == "claimed_user":
        # Refused when the name is given: Dovecot never sees a login.
        assert evidence.logins == [], evidence
    else:
        # Dovecot logged alice in; popguard refused her and closed without QUIT.
        assert evidence.logins == [alice], evidence
        assert b"QUIT" not in evidence.upstream, evidence
        assert evidence.named("session.closed")[0]["reason"] == "policy_denied", evidence


async def login_and_hold(address: tuple[str, int], wire: Any, steps: Sequence[Step]) -> Any:
    """A client logged in through ``steps``, left open."""
    client = wire(*address, timeout=WAIT)

    def go() -> Transcript:
        return converse_open(client, steps)

    transcript = await in_thread(go)
    return client, transcript


def converse_open(client: Any, steps: Sequence[Step]) -> Transcript:
    """Like :func:`converse`, but leaves the session open (no QUIT, no read to EOF)."""
    t = Transcript()
    t.greeting = client.readline()
    ctx = Ctx(t.greeting, t.greeting)
    for step in steps:
        line = step(ctx) if callable(step) else step
        client.send(line + b"\r\n")
        reply = client.readline()
        t.exchange.append((line, reply))
        ctx = Ctx(t.greeting, reply)
        if reply.startswith(b"+ "):
            continue
        if reply.startswith(b"+OK") and line[:5].upper() != b"USER ":
            t.logged_in = True
            break
        if reply.startswith(b"-ERR"):
            break
    return t


@pytest.mark.parametrize(
    ("first", "second"),
    [(b"alice", b"ALICE"), (b"ALICE", b"alice"), (b"Alice", b"aLICE")],
    ids=["alice-then-ALICE", "ALICE-then-alice", "Alice-then-aLICE"],
)
@pytest.mark.parametrize("mechanism", ["USER", "PLAIN", "LOGIN", "CRAM-MD5", "APOP"])
async def test_one_session_per_user_counts_ALICE_as_alice(
    first: bytes, second: bytes, mechanism: str, servers, popguard, tmp_path, wire
) -> None:
    alice = servers.new_alice()
    suffix = alice.removeprefix("alice").encode()
    directory = write_policies(
        tmp_path / "policies",
        "rules:\n  - name: one-each\n    set: {max_sessions_per_user: 1}\n",
    )
    dovecot = servers("lower")
    proxy = await popguard(upstream=dovecot.address, policies=directory, secrets=ALL_PASSWORDS)
    holder, held = await login_and_hold(
        proxy.address, wire, mechanisms(first + suffix, PASSWORD)["USER"]
    )
    assert held.logged_in, held
    _second, refused = await login_and_hold(
        proxy.address, wire, mechanisms(second + suffix, PASSWORD)[mechanism]
    )
    assert not refused.logged_in, refused
    assert REPLY_IN_USE in [reply for _, reply in refused.exchange], refused
    assert [r["user"] for r in proxy.sink.named("auth.succeeded")] == [alice]
    denied = proxy.sink.named("policy.denied")
    assert [d["setting"] for d in denied] == ["max_sessions_per_user"], denied
    holder.close()


@pytest.mark.parametrize("blocked_by", ["USER", "PLAIN", "LOGIN", "CRAM-MD5", "APOP"])
@pytest.mark.parametrize("failing_by", ["USER", "PLAIN"])
async def test_throttle_after_failures_as_alice_blocks_ALICE(
    failing_by: str, blocked_by: str, servers, popguard, tmp_path, wire
) -> None:
    alice = servers.new_alice()
    directory = write_policies(
        tmp_path / "policies",
        "rules:\n  - name: throttle\n"
        "    set: {login_throttle: {failures: 2, window: 300, block: 300, by: [user]}}\n",
    )
    dovecot = servers("lower")
    proxy = await popguard(upstream=dovecot.address, policies=directory, secrets=ALL_PASSWORDS)
    for _ in range(2):
        client = wire(*proxy.address, timeout=WAIT)
        steps = mechanisms(alice.encode(), "wrong-" + PASSWORD)[failing_by]
        failed = await in_thread(converse, client, steps)
        assert not failed.logged_in, failed
    await proxy.wait_for("policy.login_blocked", limit=WAIT)
    client = wire(*proxy.address, timeout=WAIT)
    mark = dovecot.log_position()
    steps = mechanisms(alice.upper().encode(), PASSWORD)[blocked_by]
    blocked = await in_thread(converse, client, steps)
    assert not blocked.logged_in, blocked
    assert REPLY_LOGIN_DELAY in [reply for _, reply in blocked.exchange], blocked
    assert dovecot.login_users(since=mark) == []
    assert [r["user"] for r in proxy.sink.named("auth.failed")] == [alice, alice]
    assert not proxy.sink.named("auth.succeeded")


@pytest.mark.parametrize("mechanism", MECHANISMS)
async def test_audit_report_counts_ALICE_deletions_under_alice(
    mechanism: str, servers, popguard, tap, wire, tmp_path
) -> None:
    alice = servers.new_alice()
    steps = mechanisms(alice.upper().encode(), PASSWORD)[mechanism]
    directory = write_policies(
        tmp_path / "policies",
        f"rules:\n  - name: {alice}-may-delete\n    match: {{user: {alice}}}\n"
        "    set: {deny_commands: []}\n",
    )
    dovecot = servers("lower")
    proxy = await popguard(upstream=dovecot.address, policies=directory, secrets=ALL_PASSWORDS)
    client = wire(*proxy.address, timeout=WAIT)
    transcript = await in_thread(converse, client, steps, [b"DELE 1", b"QUIT"])
    assert transcript.logged_in, transcript
    assert b"+OK" in transcript.rest, transcript
    await proxy.wait_for("deletions.committed", limit=WAIT)
    assert dovecot.maildir_messages(alice) == []
    assert proxy.server.audit.flush(), "the audit file did not catch up"
    result = await trio.run_process(
        [
            sys.executable,
            "-m",
            "popguard",
            "audit",
            "report",
            "--format",
            "json",
            str(proxy.json_path),
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.decode().splitlines()]
    by_user = {r["user"]: r for r in rows}
    assert set(by_user) == {alice}, rows
    assert (by_user[alice]["logins"], by_user[alice]["deleted"]) == (1, 1), rows
