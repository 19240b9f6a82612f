"""Policy enforcement through popguard, against the real Dovecot.

The policies are YAML files in a directory of the test's own, loaded with
``load_policies`` as ``popguard serve --policies DIR`` loads them, and given
to an in-process :class:`ProxyServer` (the ``policy_proxy`` fixture below:
the shared ``popguard`` fixture takes no policies) or to a real
``python -m popguard serve --policies DIR`` process (``popguard_process``)
where SIGHUP is the point.

Witnesses, besides what the client sees: a recording tap between popguard
and Dovecot (what reached Dovecot, byte for byte), Dovecot's own log (its
``auth failed, N attempts`` and logout lines), the Maildir on disk, and
popguard's audit records (in memory and in the JSON-lines file).

Client source addresses: Linux routes all of 127.0.0.0/8 to loopback, so a
client socket bound to 127.0.0.2 or 127.0.0.3 is a distinct client address
for popguard.
"""

from __future__ import annotations

import base64
import json
import math
import os
import poplib
import re
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from popguard.audit import AuditLog, JsonLinesSink
from popguard.policy.load import load_policies
from popguard.policy.session import PolicyHolder, PolicyShared
from popguard.shell.server import Endpoint, ListenerSpec, ProxyServer, ServerSettings
from popguard.testing.dovecot import stored_form
from tests.listsink import ListSink

in_thread = trio.to_thread.run_sync

#: Every wait is generous: the machine may be small and busy.
WAIT = 60.0

# popguard's own replies (popguard/policy/session.py, popguard/core/session.py).
REPLY_TOO_MANY_CONNECTIONS = b"-ERR [SYS/TEMP] Too many connections, try again later\r\n"
REPLY_LOGIN_DELAY = b"-ERR [LOGIN-DELAY] Too many failed logins, try again later\r\n"
REPLY_IDLE = b"-ERR Disconnected for inactivity.\r\n"
# Dovecot's.
DOVECOT_AUTH_FAILED = b"-ERR [AUTH] Authentication failed.\r\n"
DOVECOT_MARKED = b"+OK Marked to be deleted.\r\n"


# -- the policy directory ---------------------------------------------------------


def write_policies(directory: Path, files: dict[str, str]) -> None:
    """Make ``directory`` hold exactly ``files`` (name -> YAML text).

    Each file is written under a dot-name (which the loader skips) and
    renamed into place, so a reload never reads a half-written file; policy
    files not named are removed.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        temporary = directory / f".{name}.tmp"
        temporary.write_text(text)
        os.replace(temporary, directory / name)
    for path in directory.iterdir():
        if path.suffix in (".yaml", ".yml") and path.name not in files:
            path.unlink()


def rule_line(path: Path, name: str) -> str:
    """``file:line`` of the rule called ``name``, as records name it."""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if re.fullmatch(rf"\s*- name: {re.escape(name)}\s*", line):
            return f"{path}:{number}"
    raise AssertionError(f"no rule {name} in {path}")


# -- popguard with policies, in process ---------------------------------------------


@dataclass
class PolicyProxy:
    server: ProxyServer
    shared: PolicyShared
    sink: ListSink
    json_path: Path
    directory: Path
    host: str = "127.0.0.1"
    port: int = 0

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def json_events(self, name: str) -> list[dict[str, Any]]:
        # The file is written by a writer thread, in batches: wait for it.
        assert self.server.audit.flush(), "the audit file did not catch up"
        lines = self.json_path.read_text().splitlines()
        return [e for e in map(json.loads, lines) if e["event"] == name]

    async def wait_for(self, name: str, count: int = 1, limit: float = WAIT) -> list[dict]:
        with trio.fail_after(limit):
            while len(self.sink.named(name)) < count:
                await trio.sleep(0.01)
        return self.sink.named(name)

    async def wait_idle(self, limit: float = WAIT) -> None:
        """Until no session is open and none counts against a limit."""
        with trio.fail_after(limit):
            while self.server.active_sessions or self.shared.counts.total:
                await trio.sleep(0.01)


@pytest.fixture
async def policy_proxy(dovecot, mailbox, nursery, tmp_path):
    started: list[PolicyProxy] = []

    async def start(
        directory: Path, *, upstream: tuple[str, int] | None = None, **settings: Any
    ) -> PolicyProxy:
        initial, _warnings = load_policies(directory)
        shared = PolicyShared(PolicyHolder(initial), trio.current_time)
        sink = ListSink()
        json_path = tmp_path / f"policy-audit-{len(started)}.jsonl"
        audit = AuditLog([sink, JsonLinesSink(str(json_path))])
        config = ServerSettings(
            listeners=(ListenerSpec("it", Endpoint("127.0.0.1", 0)),),
            upstream=Endpoint(*(upstream or dovecot.address)),
            **settings,
        )
        server = ProxyServer(
            config,
            audit,
            policies=shared,
            policy_loader=lambda: load_policies(directory)[0],
        )
        await nursery.start(server.run)
        proxy = PolicyProxy(server, shared, sink, json_path, directory)
        proxy.port = server.bound["it"][0].port
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.server.request_shutdown(immediate=True)
        with trio.fail_after(WAIT):
            while proxy.server.active_sessions or not proxy.sink.named("popguard.stopped"):
                await trio.sleep(0.01)
        proxy.server.audit.close()
        logged = "\n".join(map(repr, proxy.sink.events)) + proxy.json_path.read_text()
        for box in mailbox.created:
            assert box.password not in logged, "a password was logged"
        assert not proxy.sink.named("session.internal_error")


# -- async clients from a chosen loopback address ----------------------------------


class Client:
    """A POP3 client connection (trio), from a chosen source address."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._buf = bytearray()

    @classmethod
    async def connect(cls, address: tuple[str, int], source: str = "127.0.0.1") -> Client:
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
        try:
            await sock.bind((source, 0))
            await sock.connect(address)
        except BaseException:
            sock.close()
            raise
        return cls(trio.SocketStream(sock))

    async def readline(self) -> bytes:
        """One line; b"" at EOF (with nothing buffered)."""
        while (end := self._buf.find(b"\n")) == -1:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                rest = bytes(self._buf)
                self._buf.clear()
                return rest
            self._buf += chunk
        line = bytes(self._buf[: end + 1])
        del self._buf[: end + 1]
        return line

    async def command(self, line: str) -> bytes:
        await self.stream.send_all(line.encode() + b"\r\n")
        return await self.readline()

    async def read_to_eof(self) -> bytes:
        data = bytes(self._buf)
        self._buf.clear()
        try:
            while chunk := await self.stream.receive_some(65536):
                data += chunk
        except trio.BrokenResourceError:  # a reset after the last words
            pass
        return data

    async def login(self, user: str, password: str) -> None:
        assert (await self.readline()).startswith(b"+OK")
        assert (await self.command(f"USER {user}")).startswith(b"+OK")
        reply = await self.command(f"PASS {password}")
        assert reply.startswith(b"+OK"), reply

    @property
    def local(self) -> str:
        """``host:port`` of this end, as popguard's records name the client."""
        host, port = self.stream.socket.getsockname()[:2]
        return f"{host}:{port}"

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


def upstream_sessions(recorder: Any, user: str) -> list[bytes]:
    """What popguard sent to Dovecot in each tapped connection that named ``user``."""
    sent = [bytes(c.from_client) for c in recorder.connections]
    return [s for s in sent if f"USER {user}\r\n".encode() in s]


def verbs(upstream: bytes) -> list[bytes]:
    return [line.split(b" ")[0].upper() for line in upstream.split(b"\r\n") if line]


# -- fetchmail ----------------------------------------------------------------------


def fetchmail_messages(make_messages) -> list[bytes]:
    # fetchmail 6.4 breaks lines longer than ~8 kB; leave the long sample out.
    return [m for m in make_messages(6, seed=77) if b"[long]" not in m]


async def fetchmail(
    tool: str, tmp_path: Path, name: str, address: tuple[str, int], user: str, password: str
) -> tuple[int, list[bytes], str]:
    """fetchmail once, without --keep: (exit status, delivered messages, its output)."""
    work = tmp_path / name
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
        tool,
        "--fetchmailrc",
        str(rc),
        "--nosyslog",
        "--nodetach",
        "--sslproto",
        "",  # do not try STLS
        "--all",
        "--invisible",
        "--norewrite",
        "--verbose",
        "--mda",
        str(mda),
    ]
    with trio.fail_after(WAIT):
        proc = await trio.run_process(
            argv,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env={**os.environ, "HOME": str(home)},
        )
    delivered = [p.read_bytes() for p in sorted(out.iterdir())]
    output = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
    return proc.returncode, delivered, output


def auth_failures(dovecot, user: str) -> int:
    """Failed logins of ``user`` that Dovecot logged (its login process's words)."""
    pattern = rf"\(auth failed, (\d+) attempts in \d+ secs\): user=<{re.escape(user)}>"
    return sum(int(n) for n in re.findall(pattern, dovecot.log_text()))


# -- 1. deny DELE: poplib and fetchmail get -ERR, the Maildir stays -----------------


async def test_deny_dele_for_alice_with_poplib_and_fetchmail_while_bob_deletes(
    dovecot, mailbox, make_messages, policy_proxy, tap, require_tool, tmp_path, dovecot_log
):
    tool = require_tool("fetchmail")
    messages = fetchmail_messages(make_messages)
    alice = mailbox(messages)
    bob = mailbox(messages)
    directory = tmp_path / "policies"
    write_policies(
        directory,
        {
            "50-alice.yaml": f"""\
rules:
  - name: alice-read-only
    match:
      user: {alice.user}
    set:
      deny_commands: [DELE]
      deny_reply: "Deletion is not permitted for this mailbox"
"""
        },
    )
    recorder = await tap()
    proxy = await policy_proxy(directory, upstream=recorder.address)
    denied_reply = b"-ERR [SYS/PERM] Deletion is not permitted for this mailbox"

    def poplib_session(user: str, password: str) -> tuple[bytes, bytes, bytes]:
        pop = poplib.POP3(*proxy.address, timeout=WAIT)
        try:
            pop.user(user)
            pop.pass_(password)
            try:
                dele = pop.dele(1)
            except poplib.error_proto as exc:
                dele = exc.args[0]
            stat = pop.stat()
            return dele, b"%d %d" % stat, pop.quit()
        finally:
            pop.close()

    # Alice with poplib: DELE refused by popguard, the session goes on.
    dele, stat, quit_reply = await in_thread(poplib_session, alice.user, alice.password)
    assert dele == denied_reply
    assert stat.startswith(b"%d " % len(messages))
    assert quit_reply.startswith(b"+OK")
    # Alice with fetchmail (no --keep): it fetches all and tries to delete.
    status, delivered, log = await fetchmail(
        tool, tmp_path, "alice", proxy.address, alice.user, alice.password
    )
    # It gets message 1, its DELE 1 is refused, and it stops with an error.
    assert status != 0, log
    assert delivered == [stored_form(messages[0])], log
    assert (
        "POP3> DELE 1\nfetchmail: POP3< -ERR [SYS/PERM] Deletion is not permitted for this mailbox"
        "\nfetchmail: POP3> QUIT\nfetchmail: POP3< +OK Logging out.\n"
    ) in log, log
    assert dovecot.maildir_messages(alice.user) == [stored_form(m) for m in messages]

    # Bob, whom the policy does not cover: poplib deletes message 1 ...
    dele, _, quit_reply = await in_thread(poplib_session, bob.user, bob.password)
    assert dele.startswith(b"+OK"), dele
    assert quit_reply.startswith(b"+OK")
    assert dovecot.maildir_messages(bob.user) == [stored_form(m) for m in messages[1:]]
    # ... and fetchmail takes (and deletes) the rest.
    status, delivered, log = await fetchmail(
        tool, tmp_path, "bob", proxy.address, bob.user, bob.password
    )
    assert status == 0, log
    assert delivered == [stored_form(m) for m in messages[1:]], log
    assert dovecot.maildir_messages(bob.user) == []

    # Dovecot never saw a DELE from Alice's sessions; it saw Bob's.  The four
    # sessions ran one after the other: Alice's two (poplib with USER/PASS,
    # fetchmail with AUTH CRAM-MD5), then Bob's two.
    await recorder.wait_closed()
    upstream = [verbs(bytes(c.from_client)) for c in recorder.connections]
    assert len(upstream) == 4
    assert [sent.count(b"DELE") for sent in upstream] == [0, 0, 1, len(messages) - 1], upstream
    assert [sent.count(b"RETR") for sent in upstream] == [0, 1, 0, len(messages) - 1]
    ends = await in_thread(dovecot_log.wait_session_ends, alice.user, 2)
    assert all("Logged out" in end and "del=0/" in end for end in ends), ends

    await proxy.wait_for("session.closed", 4)  # records follow the last reply
    denied = proxy.sink.named("policy.denied")
    assert denied, "no policy.denied record"
    assert {(e["user"], e["command"], e["rule"]) for e in denied} == {
        (alice.user, "DELE", "alice-read-only")
    }
    assert len(denied) == 2  # poplib's DELE and fetchmail's
    assert not [e for e in proxy.sink.named("dele.marked") if e.get("user") == alice.user]
    committed = [e for e in proxy.sink.named("deletions.committed") if e["user"] == bob.user]
    assert len(committed) == 2


async def test_deny_dele_pipelined_behind_the_login_is_checked_against_the_user(
    dovecot, mailbox, make_messages, policy_proxy, tap, tmp_path
):
    """A DELE sent in the same packet as the login waits for it, then is refused."""
    messages = make_messages(3, seed=2)
    alice = mailbox(messages)
    directory = tmp_path / "policies"
    write_policies(
        directory,
        {
            "50-alice.yaml": f"""\
rules:
  - name: alice-read-only
    match: {{user: {alice.user}}}
    set: {{deny_commands: [DELE]}}
"""
        },
    )
    recorder = await tap()
    proxy = await policy_proxy(directory, upstream=recorder.address)
    denied = b"-ERR [SYS/PERM] DELE is not permitted by policy\r\n"
    plain = b64(f"\0{alice.user}\0{alice.password}")
    logins = [
        f"USER {alice.user}\r\nPASS {alice.password}\r\n",
        f"AUTH PLAIN {plain}\r\n",
    ]
    for login in logins:
        c = await Client.connect(proxy.address)
        try:
            assert (await c.readline()).startswith(b"+OK")
            await c.stream.send_all((login + "DELE 1\r\nDELE 3\r\nQUIT\r\n").encode())
            with trio.fail_after(WAIT):
                replies = await c.read_to_eof()
        finally:
            await c.aclose()
        lines = replies.splitlines(keepends=True)
        assert lines[-3:] == [denied, denied, b"+OK Logging out.\r\n"], replies
        assert all(line.startswith(b"+OK") for line in lines[:-3]), replies
    assert dovecot.maildir_messages(alice.user) == [stored_form(m) for m in messages]
    await recorder.wait_closed()
    assert len(recorder.connections) == 2
    for conn in recorder.connections:
        assert b"DELE" not in verbs(bytes(conn.from_client))
    await proxy.wait_for("session.closed", 2)
    assert len(proxy.sink.named("policy.denied")) == 4


# -- 2. idle timeout: a short real timer ----------------------------------------------


async def test_policy_idle_timeout_closes_idle_session_and_keeps_marked_mail(
    dovecot, mailbox, make_messages, policy_proxy, tap, dovecot_log, tmp_path
):
    messages = make_messages(4, seed=5)
    alice = mailbox(messages)
    bob = mailbox(messages)
    directory = tmp_path / "policies"
    write_policies(
        directory,
        {
            "10-idle.yaml": f"""\
rules:
  - name: alice-short-idle
    match: {{user: {alice.user}}}
    set: {{idle_timeout: 1}}
"""
        },
    )
    recorder = await tap()
    proxy = await policy_proxy(directory, upstream=recorder.address, idle_timeout=60)

    a = await Client.connect(proxy.address)
    b = await Client.connect(proxy.address)
    try:
        await a.login(alice.user, alice.password)
        await b.login(bob.user, bob.password)
        assert await a.command("DELE 1") == DOVECOT_MARKED
        assert await a.command("DELE 3") == DOVECOT_MARKED
        assert await b.command("DELE 2") == DOVECOT_MARKED
        idle_since = trio.current_time()
        with trio.fail_after(WAIT):
            rest = await a.read_to_eof()
        elapsed = trio.current_time() - idle_since
        assert rest == REPLY_IDLE
        assert 0.9 <= elapsed < 30, elapsed
        # Bob is not covered: popguard's 60 s apply, his session goes on.
        assert (await b.command("NOOP")).startswith(b"+OK")
        assert (await b.command("QUIT")).startswith(b"+OK")
    finally:
        await a.aclose()
        await b.aclose()

    # Alice's marks were discarded: nothing was deleted, no QUIT reached Dovecot.
    assert dovecot.maildir_messages(alice.user) == [stored_form(m) for m in messages]
    assert dovecot.maildir_messages(bob.user) == [
        stored_form(m) for i, m in enumerate(messages, 1) if i != 2
    ]
    await recorder.wait_closed()
    (alice_upstream,) = upstream_sessions(recorder, alice.user)
    assert b"QUIT" not in verbs(alice_upstream)
    (end,) = await in_thread(dovecot_log.wait_session_ends, alice.user)
    assert "Disconnected: Connection closed" in end, end

    await proxy.wait_for("session.closed", 2)
    (denied,) = proxy.sink.named("policy.denied")
    assert denied["setting"] == "idle_timeout"
    assert denied["rule"] == "alice-short-idle"
    assert denied["policy_file"] == rule_line(directory / "10-idle.yaml", "alice-short-idle")
    assert denied["user"] == alice.user
    (discarded,) = proxy.sink.named("deletions.discarded")
    assert discarded["reason"] == "idle_timeout"
    assert [m["msg"] for m in discarded["messages"]] == [1, 3]
    reasons = {e["user"]: e["reason"] for e in proxy.sink.named("session.closed")}
    assert reasons == {alice.user: "idle_timeout", bob.user: "quit"}


# -- 3. login throttle: one address blocked, another not ------------------------------


async def test_login_throttle_blocks_one_address_and_not_another(
    dovecot, mailbox, make_messages, policy_proxy, tap, tmp_path
):
    alice = mailbox(make_messages(2, seed=9))
    directory = tmp_path / "policies"
    write_policies(
        directory,
        {
            "40-login.yaml": """\
rules:
  - name: throttle-logins
    set:
      login_throttle: {failures: 3, window: 300, block: 300, by: [client]}
"""
        },
    )
    recorder = await tap()
    proxy = await policy_proxy(directory, upstream=recorder.address)
    attacker, pipeliner, other = "127.0.0.2", "127.0.0.4", "127.0.0.3"

    # A burst of wrong passwords from 127.0.0.2, one connection each.
    outcomes: list[bytes] = []
    for _ in range(8):
        c = await Client.connect(proxy.address, attacker)
        try:
            greeting = await c.readline()
            if not greeting.startswith(b"+OK"):
                outcomes.append(greeting + await c.read_to_eof())
                continue
            assert (await c.command(f"USER {alice.user}")).startswith(b"+OK")
            outcomes.append(await c.command("PASS wrong-password"))
            assert (await c.command("QUIT")).startswith(b"+OK")
        finally:
            await c.aclose()
    assert outcomes == [DOVECOT_AUTH_FAILED] * 3 + [REPLY_LOGIN_DELAY] * 5
    # The right password does not help the blocked address either.
    c = await Client.connect(proxy.address, attacker)
    assert await c.read_to_eof() == REPLY_LOGIN_DELAY
    await c.aclose()

    # Another address logs in as the same user.
    c = await Client.connect(proxy.address, other)
    try:
        await c.login(alice.user, alice.password)
        assert (await c.command("STAT")).startswith(b"+OK 2 ")
        assert (await c.command("QUIT")).startswith(b"+OK")
    finally:
        await c.aclose()

    # A pipelined burst in one connection from a third address: cut off in it.
    c = await Client.connect(proxy.address, pipeliner)
    try:
        assert (await c.readline()).startswith(b"+OK")
        script = f"USER {alice.user}\r\nPASS wrong-again\r\n" * 6 + "QUIT\r\n"
        await c.stream.send_all(script.encode())
        with trio.fail_after(WAIT):
            replies = [await c.readline() for _ in range(13)]
    finally:
        await c.aclose()
    assert replies[:6] == [b"+OK\r\n", DOVECOT_AUTH_FAILED] * 3
    assert replies[6:12] == [REPLY_LOGIN_DELAY] * 6  # USER and PASS, three times
    assert replies[12].startswith(b"+OK")

    # What reached Dovecot: 3 + 3 wrong passwords, and the one right one.
    await recorder.wait_closed()
    sent = b"".join(bytes(conn.from_client) for conn in recorder.connections)
    assert sent.count(b"PASS wrong-password\r\n") == 3
    assert sent.count(b"PASS wrong-again\r\n") == 3
    assert verbs(sent).count(b"PASS") == 7
    assert verbs(sent).count(b"USER") == 7
    # 3 + 1 + 1 connections reached Dovecot; the 6 refused at connect did not.
    assert len(recorder.connections) == 5
    with trio.fail_after(WAIT):
        while auth_failures(dovecot, alice.user) < 6:
            await trio.sleep(0.05)
    await trio.sleep(0.5)
    assert auth_failures(dovecot, alice.user) == 6

    await proxy.wait_for("session.closed", 3 + 1 + 1)
    blocked = proxy.sink.named("policy.login_blocked")
    assert [(e["key"], e["rule"], e["seconds"]) for e in blocked] == [
        (f"client:{attacker}", "throttle-logins", 300),
        (f"client:{pipeliner}", "throttle-logins", 300),
    ]
    assert blocked[0]["policy_file"] == rule_line(directory / "40-login.yaml", "throttle-logins")
    refused = proxy.sink.named("session.refused")
    assert len(refused) == 6
    assert {e["reason"] for e in refused} == {"policy"}
    denied = proxy.sink.named("policy.denied")
    assert {e["setting"] for e in denied} == {"login_throttle"}
    at_connect = [e for e in denied if e["command"] is None]
    assert len(at_connect) == 6
    assert {e["client"].rpartition(":")[0] for e in at_connect} == {attacker}
    in_session = [e for e in denied if e["command"] is not None]
    assert sorted(e["command"] for e in in_session) == ["USER"] * 3  # PASS just gets the reply


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


async def test_login_throttle_cancels_sasl_logins_once_the_address_is_blocked(
    dovecot, mailbox, make_messages, policy_proxy, tap, tmp_path
):
    """In one connection: after the block, no SASL response reaches Dovecot."""
    alice = mailbox(make_messages(2, seed=10))
    directory = tmp_path / "policies"
    write_policies(
        directory,
        {
            "40-login.yaml": """\
rules:
  - name: throttle-logins
    set:
      login_throttle: {failures: 3, window: 300, block: 300, by: [client]}
"""
        },
    )
    recorder = await tap()
    proxy = await policy_proxy(directory, upstream=recorder.address)
    c = await Client.connect(proxy.address, "127.0.0.5")
    try:
        assert (await c.readline()).startswith(b"+OK")
        for n in range(3):
            plain = b64(f"\0{alice.user}\0wrong-{n}")
            assert await c.command(f"AUTH PLAIN {plain}") == DOVECOT_AUTH_FAILED
        # Blocked now.  With an initial response: refused, nothing forwarded.
        plain = b64(f"\0{alice.user}\0blocked-initial")
        assert await c.command(f"AUTH PLAIN {plain}") == REPLY_LOGIN_DELAY
        # Without one: Dovecot asks, and popguard cancels instead of answering.
        assert (await c.command("AUTH PLAIN")).startswith(b"+")
        plain = b64(f"\0{alice.user}\0blocked-response")
        assert await c.command(plain) == REPLY_LOGIN_DELAY
        # AUTH LOGIN: cancelled at the user name, before the password is asked.
        assert (await c.command("AUTH LOGIN")).startswith(b"+")
        assert await c.command(b64(alice.user)) == REPLY_LOGIN_DELAY
        # The right password through USER/PASS does not pass either.
        assert await c.command(f"USER {alice.user}") == REPLY_LOGIN_DELAY
        assert await c.command(f"PASS {alice.password}") == REPLY_LOGIN_DELAY
        assert (await c.command("QUIT")).startswith(b"+OK")
    finally:
        await c.aclose()
    await recorder.wait_closed()
    (conn,) = recorder.connections
    sent = bytes(conn.from_client)
    for secret in ("blocked-initial", "blocked-response"):
        assert b64(f"\0{alice.user}\0{secret}").encode() not in sent
    assert alice.password.encode() not in sent
    lines = sent.split(b"\r\n")
    assert lines.count(b"*") == 2  # the two exchanges cancelled (RFC 5034 section 4)
    assert verbs(sent).count(b"AUTH") == 3 + 2
    assert b"USER" not in verbs(sent)
    await proxy.wait_for("session.closed")
    (blocked,) = proxy.sink.named("policy.login_blocked")
    assert blocked["key"] == "client:127.0.0.5"
    denied = proxy.sink.named("policy.denied")
    assert [e["command"] for e in denied] == ["AUTH", "AUTH", "AUTH", "USER"]
    assert {e["setting"] for e in denied} == {"login_throttle"}


async def test_login_throttle_by_user_blocks_the_user_from_every_address(
    dovecot, mailbox, make_messages, policy_proxy, tap, tmp_path
):
    alice = mailbox(make_messages(2, seed=11))
    bob = mailbox(make_messages(2, seed=12))
    directory = tmp_path / "policies"
    write_policies(
        directory,
        {
            "40-login.yaml": """\
rules:
  - name: throttle-users
    set:
      login_throttle: {failures: 2, window: 300, block: 300, by: [user]}
"""
        },
    )
    recorder = await tap()
    proxy = await policy_proxy(directory, upstream=recorder.address)
    for _ in range(2):
        c = await Client.connect(proxy.address, "127.0.0.2")
        try:
            assert (await c.readline()).startswith(b"+OK")
            assert (await c.command(f"USER {alice.user}")).startswith(b"+OK")
            assert await c.command("PASS wrong-password") == DOVECOT_AUTH_FAILED
            assert (await c.command("QUIT")).startswith(b"+OK")
        finally:
            await c.aclose()
    # Alice is blocked from another address too, with the right password;
    # the attacking address may still log in as Bob.
    c = await Client.connect(proxy.address, "127.0.0.3")
    try:
        assert (await c.readline()).startswith(b"+OK")
        assert await c.command(f"USER {alice.user}") == REPLY_LOGIN_DELAY
        assert await c.command(f"PASS {alice.password}") == REPLY_LOGIN_DELAY
        assert (await c.command("QUIT")).startswith(b"+OK")
    finally:
        await c.aclose()
    c = await Client.connect(proxy.address, "127.0.0.2")
    try:
        await c.login(bob.user, bob.password)
        assert (await c.command("QUIT")).startswith(b"+OK")
    finally:
        await c.aclose()
    await recorder.wait_closed()
    sent = b"".join(bytes(conn.from_client) for conn in recorder.connections)
    assert sent.count(f"USER {alice.user}\r\n".encode()) == 2
    assert alice.password.encode() not in sent
    await proxy.wait_for("session.closed", 4)
    (blocked,) = proxy.sink.named("policy.login_blocked")
    assert blocked["key"] == f"user:{alice.user}"


# -- 4. connection limits under a burst ------------------------------------------------


@dataclass
class Burst:
    served: list[str] = field(default_factory=list)
    refused: list[tuple[str, bytes]] = field(default_factory=list)
    open_now: int = 0
    peak: int = 0
    answered: int = 0
    all_answered: trio.Event = field(default_factory=trio.Event)


async def burst(address: tuple[str, int], sources: list[str], user: str, password: str) -> Burst:
    """Connect from every source at once; the served hold on until all are answered."""
    result = Burst()

    async def one(source: str) -> None:
        c = await Client.connect(address, source)
        try:
            first = await c.readline()
            if first.startswith(b"+OK"):
                result.open_now += 1
                result.peak = max(result.peak, result.open_now)
                result.served.append(source)
                assert (await c.command(f"USER {user}")).startswith(b"+OK")
                assert (await c.command(f"PASS {password}")).startswith(b"+OK")
                assert (await c.command("STAT")).startswith(b"+OK")
            else:
                result.refused.append((source, first + await c.read_to_eof()))
            result.answered += 1
            if result.answered == len(sources):
                result.all_answered.set()
            if first.startswith(b"+OK"):
                await result.all_answered.wait()
                assert (await c.command("QUIT")).startswith(b"+OK")
                result.open_now -= 1
        finally:
            await c.aclose()

    with trio.fail_after(WAIT * 2):
        async with trio.open_nursery() as nursery:
            for source in sources:
                nursery.start_soon(one, source)
    return result


async def test_max_sessions_total_holds_under_a_burst_of_parallel_connects(
    dovecot, mailbox, make_messages, policy_proxy, tap, tmp_path
):
    box = mailbox(make_messages(2, seed=3))
    directory = tmp_path / "policies"
    write_policies(
        directory,
        {
            "20-limits.yaml": """\
rules:
  - name: five-at-once
    set:
      max_sessions_total: 5
"""
        },
    )
    recorder = await tap()
    proxy = await policy_proxy(directory, upstream=recorder.address)

    for wave in range(2):  # the second wave: the counts went back to zero
        result = await burst(proxy.address, ["127.0.0.1"] * 30, box.user, box.password)
        assert len(result.served) == 5
        assert result.peak == 5
        assert [reply for _, reply in result.refused] == [REPLY_TOO_MANY_CONNECTIONS] * 25
        await proxy.wait_idle()
        assert len(recorder.connections) == 5 * (wave + 1)  # refused never reached Dovecot

    refused = proxy.sink.named("session.refused")
    assert len(refused) == 50
    denied = proxy.sink.named("policy.denied")
    assert len(denied) == 50
    assert {(e["setting"], e["rule"], e["mode"], e["command"]) for e in denied} == {
        ("max_sessions_total", "five-at-once", "enforce", None)
    }
    closed = proxy.sink.named("session.closed")
    assert [e["reason"] for e in closed] == ["quit"] * 10

    # Churn: 40 clients, each retrying until served once, sessions ending and
    # starting all the time.  A client counts as open from its greeting to
    # the reply to its QUIT, which comes before popguard counts the session
    # closed, so the client-side count can never exceed popguard's limit.
    open_now = peak = 0

    async def until_served() -> int:
        nonlocal open_now, peak
        tries = 0
        while True:
            tries += 1
            c = await Client.connect(proxy.address)
            try:
                first = await c.readline()
                if first == REPLY_TOO_MANY_CONNECTIONS:
                    assert await c.read_to_eof() == b""
                    await trio.sleep(0.01)
                    continue
                assert first.startswith(b"+OK"), first
                open_now += 1
                peak = max(peak, open_now)
                assert (await c.command(f"USER {box.user}")).startswith(b"+OK")
                assert (await c.command(f"PASS {box.password}")).startswith(b"+OK")
                assert (await c.command("STAT")).startswith(b"+OK 2 ")
                assert (await c.command("QUIT")).startswith(b"+OK")
                open_now -= 1
                return tries
            finally:
                await c.aclose()

    tries: list[int] = []

    async def client() -> None:
        tries.append(await until_served())

    with trio.fail_after(WAIT * 2):
        async with trio.open_nursery() as nursery:
            for _ in range(40):
                nursery.start_soon(client)
    assert len(tries) == 40
    assert 1 <= peak <= 5
    assert sum(tries) > 40  # some were turned away and came back
    await proxy.wait_idle()
    assert len(recorder.connections) == 10 + 40
    assert len(proxy.sink.named("session.refused")) == 50 + sum(tries) - 40


async def test_max_sessions_per_client_holds_per_address_under_a_burst(
    dovecot, mailbox, make_messages, policy_proxy, tmp_path
):
    box = mailbox(make_messages(2, seed=4))
    directory = tmp_path / "policies"
    write_policies(
        directory,
        {
            "20-limits.yaml": """\
rules:
  - name: two-per-address
    set:
      max_sessions_per_client: 2
"""
        },
    )
    proxy = await policy_proxy(directory)
    sources = ["127.0.0.2", "127.0.0.3"] * 12
    result = await burst(proxy.address, sources, box.user, box.password)
    assert sorted(result.served) == ["127.0.0.2"] * 2 + ["127.0.0.3"] * 2
    assert result.peak == 4
    assert sorted(result.refused) == sorted(
        [(s, REPLY_TOO_MANY_CONNECTIONS) for s in ["127.0.0.2", "127.0.0.3"] * 10]
    )
    await proxy.wait_idle()
    denied = proxy.sink.named("policy.denied")
    assert len(denied) == 20
    assert {e["setting"] for e in denied} == {"max_sessions_per_client"}
    assert sorted(e["client"].rpartition(":")[0] for e in denied) == sorted(
        ["127.0.0.2", "127.0.0.3"] * 10
    )


async def test_max_sessions_per_user_holds_when_logins_race(
    dovecot, mailbox, make_messages, policy_proxy, tap, tmp_path
):
    """Ten sessions of one user log in at once; two may stay (IN-USE for the rest)."""
    box = mailbox(make_messages(2, seed=13))
    other = mailbox(make_messages(2, seed=14))
    directory = tmp_path / "policies"
    write_policies(
        directory,
        {
            "20-limits.yaml": """\
rules:
  - name: two-per-user
    set:
      max_sessions_per_user: 2
"""
        },
    )
    recorder = await tap()
    proxy = await policy_proxy(directory, upstream=recorder.address)
    in_use = b"-ERR [IN-USE] Too many sessions for this user\r\n"
    outcomes: list[tuple[bytes, bytes]] = []
    logged_in: list[Client] = []
    all_tried = trio.Event()
    released = trio.Event()

    async def one() -> None:
        c = await Client.connect(proxy.address)
        try:
            assert (await c.readline()).startswith(b"+OK")
            await c.stream.send_all(f"USER {box.user}\r\nPASS {box.password}\r\n".encode())
            user_reply, pass_reply = await c.readline(), await c.readline()
            outcomes.append((user_reply, pass_reply))
            if len(outcomes) == 10:
                all_tried.set()
            if pass_reply.startswith(b"+OK"):
                logged_in.append(c)
                await released.wait()
                assert (await c.command("STAT")).startswith(b"+OK 2 ")
                assert (await c.command("QUIT")).startswith(b"+OK")
            elif user_reply.startswith(b"+OK"):
                assert await c.read_to_eof() == b""  # refused at login: the session is over
            else:
                assert (await c.command("QUIT")).startswith(b"+OK")  # refused at USER
        finally:
            await c.aclose()

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(one)
            await all_tried.wait()
            # With two logged in, the next is refused as soon as it names the
            # user: its PASS gets the same answer and never reaches Dovecot.
            late_comer = await Client.connect(proxy.address)
            assert (await late_comer.readline()).startswith(b"+OK")
            assert await late_comer.command(f"USER {box.user}") == in_use
            assert await late_comer.command("PASS never-forwarded") == in_use
            assert (await late_comer.command("QUIT")).startswith(b"+OK")
            await late_comer.aclose()
            # Another user is not affected by this user's limit.
            c = await Client.connect(proxy.address)
            await c.login(other.user, other.password)
            assert (await c.command("QUIT")).startswith(b"+OK")
            await c.aclose()
            released.set()

    assert len(logged_in) == 2
    refused = [o for o in outcomes if not o[1].startswith(b"+OK")]
    assert len(refused) == 8
    for user_reply, pass_reply in refused:
        # Refused when the name is given (the PASS then gets the same answer),
        # or, if the logins raced past that, in place of Dovecot's +OK.
        assert (user_reply, pass_reply) in ((in_use, in_use), (b"+OK\r\n", in_use))
    await proxy.wait_idle()
    denied = proxy.sink.named("policy.denied")
    assert len(denied) == 8 + 1
    assert {(e["setting"], e["rule"]) for e in denied} == {
        ("max_sessions_per_user", "two-per-user")
    }
    assert b"never-forwarded" not in b"".join(bytes(c.from_client) for c in recorder.connections)
    # A session refused after Dovecot's +OK is closed without QUIT: nothing
    # can be deleted by it.
    await recorder.wait_closed()
    for conn in recorder.connections:
        sent = verbs(bytes(conn.from_client))
        if f"USER {box.user}".encode() in bytes(conn.from_client) and b"STAT" not in sent:
            assert b"QUIT" not in sent, sent
    closed = proxy.sink.named("session.closed")
    reasons = sorted(e["reason"] for e in closed)
    late = sum(1 for o in refused if o[0] == b"+OK\r\n")
    assert reasons.count("policy_denied") == late
    assert reasons.count("quit") == 3 + 1 + len(refused) - late


# -- 4b. a dry-run rule must not switch off other rules' enforced settings ------------
#
# docs/policies.md: from a dry-run rule "popguard enforces nothing"; the
# settings other rules win are still enforced.
WATCH_ACCESS = """\
rules:
  - name: watch-loopback
    mode: dry-run
    match: {client: 127.0.0.0/8}
    set: {access: deny}
"""


async def test_dry_run_access_rule_does_not_switch_off_an_enforced_connection_limit(
    dovecot, mailbox, make_messages, policy_proxy, tmp_path
):
    directory = tmp_path / "policies"
    cap = "  - name: one-at-once\n    set: {max_sessions_total: 1}\n"
    write_policies(directory, {"20-limits.yaml": WATCH_ACCESS + cap})
    proxy = await policy_proxy(directory)
    held = await Client.connect(proxy.address)
    try:
        assert (await held.readline()).startswith(b"+OK")
        second = await Client.connect(proxy.address)
        try:
            with trio.fail_after(WAIT):
                first = await second.readline()
        finally:
            await second.aclose()
        # Without the dry-run rule this is what the second client gets.
        assert first == REPLY_TOO_MANY_CONNECTIONS
    finally:
        await held.aclose()


async def test_dry_run_access_rule_does_not_switch_off_a_login_throttle_block(
    dovecot, mailbox, make_messages, policy_proxy, tap, tmp_path
):
    alice = mailbox(make_messages(2, seed=15))
    directory = tmp_path / "policies"
    throttle = (
        "  - name: throttle-users\n"
        "    set: {login_throttle: {failures: 1, window: 300, block: 300, by: [user]}}\n"
    )
    write_policies(directory, {"40-login.yaml": WATCH_ACCESS + throttle})
    recorder = await tap()
    proxy = await policy_proxy(directory, upstream=recorder.address)
    for attempt in ("first-wrong", "second-wrong"):
        c = await Client.connect(proxy.address)
        try:
            assert (await c.readline()).startswith(b"+OK")
            user_reply = await c.command(f"USER {alice.user}")
            pass_reply = await c.command(f"PASS {attempt}")
            assert (await c.command("QUIT")).startswith(b"+OK")
        finally:
            await c.aclose()
        if attempt == "first-wrong":
            assert pass_reply == DOVECOT_AUTH_FAILED
            (blocked,) = await proxy.wait_for("policy.login_blocked")
            assert blocked["key"] == f"user:{alice.user}"
    # Blocked after the first failure: the second try must stop at USER.
    assert (user_reply, pass_reply) == (REPLY_LOGIN_DELAY, REPLY_LOGIN_DELAY)
    await recorder.wait_closed()
    sent = b"".join(bytes(conn.from_client) for conn in recorder.connections)
    assert b"second-wrong" not in sent


async def test_dry_run_auth_mechanisms_rule_does_not_skip_the_check_of_the_claimed_user(
    dovecot, mailbox, make_messages, policy_proxy, tap, tmp_path
):
    box = mailbox(make_messages(2, seed=16))
    directory = tmp_path / "policies"
    rules = f"""\
rules:
  - name: try-plain-only
    mode: dry-run
    set: {{auth_mechanisms: [PLAIN]}}
  - name: no-login-for-box
    match: {{claimed_user: {box.user}}}
    set: {{access: deny}}
"""
    write_policies(directory, {"30-auth.yaml": rules})
    recorder = await tap()
    proxy = await policy_proxy(directory, upstream=recorder.address)
    c = await Client.connect(proxy.address)
    try:
        assert (await c.readline()).startswith(b"+OK")
        user_reply = await c.command(f"USER {box.user}")
        pass_reply = await c.command(f"PASS {box.password}")
    finally:
        await c.aclose()
    await recorder.wait_closed()
    sent = b"".join(bytes(conn.from_client) for conn in recorder.connections)
    # The client sees a refusal either way; the point is where it comes from.
    assert pass_reply == b"-ERR [SYS/PERM] Access denied by policy\r\n"
    # docs/policies.md: a claimed_user rule refuses "as soon as the name is
    # given, before a password is sent".
    assert user_reply == b"-ERR [SYS/PERM] Access denied by policy\r\n"
    assert box.password.encode() not in sent


# -- 5. reload under load ----------------------------------------------------------------


def policy_set(tag: str) -> dict[str, str]:
    """A valid set in two files: DELE denied by one, its reply set by the other.

    A set half of one and half of the other would deny with the wrong rule
    for its reply: every reply is checked against the rule its record names.
    """
    return {
        "10-deny.yaml": f"""\
rules:
  - name: deny-{tag}
    set:
      deny_commands: [DELE]
""",
        "20-reply.yaml": f"""\
rules:
  - name: reply-{tag}
    set:
      deny_commands: [XTND]
      deny_reply: "DELE refused by policy set {tag}"
""",
    }


BROKEN = {
    "30-broken.yaml": """\
rules:
  - name: broken
    set:
      deny_commands: [QUIT]
"""
}


def reply_of(tag: str) -> bytes:
    return f"-ERR [SYS/PERM] DELE refused by policy set {tag}\r\n".encode()


@dataclass
class Timeline:
    """When each reload was asked for and seen done, and the set in force after it."""

    changes: list[tuple[float, float, str]] = field(default_factory=list)
    first: str = "A"

    def allowed(self, sent: float, answered: float) -> set[str]:
        """The sets that may have answered a command sent and answered then."""
        certain = self.first
        possible: set[str] = set()
        for asked, done, tag in self.changes:
            if done <= sent:
                certain = tag
            elif asked <= answered:
                possible.add(tag)
        return {certain} | possible


@dataclass
class Load:
    sessions: int
    ready: int = 0
    all_ready: trio.Event = field(default_factory=trio.Event)
    stop: trio.Event = field(default_factory=trio.Event)
    replies: int = 0
    bad: list[str] = field(default_factory=list)
    seen: dict[str, int] = field(default_factory=dict)
    finished: int = 0
    #: The sets each client's DELEs were refused by, in order, by client address.
    answers: dict[str, list[str]] = field(default_factory=dict)


async def dele_noop_session(
    address: tuple[str, int],
    user: str,
    password: str,
    load: Load,
    timeline: Timeline,
    final: Callable[[], Awaitable[str]],
    logins: trio.Semaphore,
) -> None:
    """Log in, then DELE 1 and NOOP over and over until told to stop."""
    c = await Client.connect(address)
    try:
        async with logins:
            await c.login(user, password)
        answers = load.answers[c.local] = []
        load.ready += 1
        if load.ready == load.sessions:
            load.all_ready.set()
        await load.all_ready.wait()
        while not load.stop.is_set():
            sent = trio.current_time()
            reply = await c.command("DELE 1")
            answered = trio.current_time()
            tags = [t for t in ("A", "B") if reply == reply_of(t)]
            if len(tags) != 1:
                load.bad.append(f"DELE got {reply!r}")
                return
            if tags[0] not in timeline.allowed(sent, answered):
                load.bad.append(f"DELE got set {tags[0]}, not in force then")
            load.seen[tags[0]] = load.seen.get(tags[0], 0) + 1
            answers.append(tags[0])
            load.replies += 1
            noop = await c.command("NOOP")
            if not noop.startswith(b"+OK"):
                load.bad.append(f"NOOP got {noop!r}")
                return
        tag = await final()
        if (reply := await c.command("DELE 1")) != reply_of(tag):
            load.bad.append(f"final DELE got {reply!r}, not set {tag}")
        answers.append(tag)
        if not (reply := await c.command("QUIT")).startswith(b"+OK"):
            load.bad.append(f"QUIT got {reply!r}")
        load.finished += 1
    finally:
        await c.aclose()


async def run_reloads_under_load(
    *,
    address: tuple[str, int],
    boxes: list[Any],
    sessions: int,
    reloads: int,
    directory: Path,
    reload: Callable[[], Awaitable[bool]],
    active_sessions: Callable[[], Awaitable[int]],
) -> tuple[Load, list[bool]]:
    """``sessions`` sessions doing DELE/NOOP while the policies are reloaded."""
    load = Load(sessions)
    timeline = Timeline()
    results: list[bool] = []
    done_reloading = trio.Event()
    final_tag = "A"

    async def final() -> str:
        await done_reloading.wait()
        return final_tag

    async def driver() -> None:
        nonlocal final_tag
        await load.all_ready.wait()
        assert await active_sessions() == sessions
        current = "A"
        for i in range(reloads):
            other = "B" if current == "A" else "A"
            invalid = i % 5 == 3  # every fifth reload has an invalid file: nothing changes
            files = policy_set(other) | (BROKEN if invalid else {})
            write_policies(directory, files)
            # In progress: the sessions may see the new set from now on.
            timeline.changes.append((trio.current_time(), math.inf, current if invalid else other))
            ok = await reload()
            results.append(ok)
            if ok:
                current = other
            asked, _, _ = timeline.changes[-1]
            timeline.changes[-1] = (asked, trio.current_time(), current)
            # Some load under each set before the next reload.
            floor = load.replies + sessions // 2
            with trio.fail_after(WAIT):
                while load.replies < floor and not load.bad:
                    await trio.sleep(0.005)
        assert await active_sessions() == sessions
        final_tag = current
        load.stop.set()
        done_reloading.set()

    logins = trio.Semaphore(20)
    with trio.fail_after(WAIT * 5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(driver)
            for n in range(sessions):
                box = boxes[n % len(boxes)]
                nursery.start_soon(
                    dele_noop_session,
                    address,
                    box.user,
                    box.password,
                    load,
                    timeline,
                    final,
                    logins,
                )
    return load, results


def assert_records_match_replies(load: Load, denied: list[dict[str, Any]]) -> None:
    """Each session's DELE replies came from the rules its records name, in order.

    The deny rule is in one file and the reply in another: a set loaded
    half from each would pair ``deny-A`` with B's reply, or the reverse.
    """
    by_client: dict[str, list[str]] = {}
    for event in denied:
        assert (event["setting"], event["command"], event["mode"]) == (
            "deny_commands",
            "DELE",
            "enforce",
        )
        by_client.setdefault(event["client"], []).append(event["rule"])
    assert by_client == {
        client: [f"deny-{tag}" for tag in tags] for client, tags in load.answers.items()
    }


async def test_reload_under_load_200_sessions_in_process(
    dovecot, mailbox, make_messages, policy_proxy, tap, tmp_path
):
    """200 Dovecot sessions at once (its process_limit is 2000) while 50 reloads run."""
    messages = make_messages(3, seed=8)
    boxes = [mailbox(messages) for _ in range(20)]
    directory = tmp_path / "policies"
    write_policies(directory, policy_set("A"))
    recorder = await tap()
    proxy = await policy_proxy(directory, upstream=recorder.address)

    async def reload() -> bool:
        return proxy.server.reload_policies()

    async def active() -> int:
        return proxy.server.active_sessions

    load, results = await run_reloads_under_load(
        address=proxy.address,
        boxes=boxes,
        sessions=200,
        reloads=50,
        directory=directory,
        reload=reload,
        active_sessions=active,
    )
    assert load.bad == []
    assert load.finished == 200
    assert set(load.seen) == {"A", "B"}
    assert results.count(False) == 10
    assert len(proxy.sink.named("policy.reloaded")) == 40
    failed = proxy.sink.named("policy.reload_failed")
    assert len(failed) == 10
    for event in failed:
        assert event["kept"] == "previous policy set"
        assert any(
            "30-broken.yaml" in error and "QUIT can never be denied" in error
            for error in event["errors"]
        ), event["errors"]

    await proxy.wait_idle()
    closed = proxy.sink.named("session.closed")
    assert [e["reason"] for e in closed] == ["quit"] * 200
    # Each reply matches the rule its record names: never half of each set.
    denied = proxy.sink.named("policy.denied")
    assert len(denied) == load.replies + 200
    assert_records_match_replies(load, denied)
    # Not one DELE reached Dovecot; nothing was deleted.
    await recorder.wait_closed()
    assert len(recorder.connections) == 200
    for conn in recorder.connections:
        assert b"DELE" not in verbs(bytes(conn.from_client))
    for box in boxes:
        assert dovecot.maildir_messages(box.user) == [stored_form(m) for m in messages]


async def test_reload_by_sighup_under_load_real_process(
    dovecot, mailbox, make_messages, popguard_process, tmp_path
):
    """The real ``popguard serve --policies DIR``: SIGHUP while 20 sessions work."""
    messages = make_messages(2, seed=12)
    boxes = [mailbox(messages) for _ in range(4)]
    directory = tmp_path / "policies"
    write_policies(directory, policy_set("A"))
    proxy = popguard_process("--policies", str(directory), "--idle-timeout", "120")
    sighups = 0

    async def reload() -> bool:
        nonlocal sighups
        before = len(proxy.named("policy.reloaded"))
        sighups += 1
        proxy.proc.send_signal(signal.SIGHUP)
        with trio.fail_after(WAIT):
            while True:
                loaded = proxy.named("policy.reloaded")
                failed = proxy.named("policy.reload_failed")
                if len(loaded) + len(failed) >= sighups:
                    return len(loaded) > before
                assert proxy.proc.poll() is None, proxy.stderr()
                await trio.sleep(0.01)

    async def active() -> int:
        opened = len(proxy.named("session.opened"))
        return opened - len(proxy.named("session.closed"))

    load, results = await run_reloads_under_load(
        address=proxy.address,
        boxes=boxes,
        sessions=20,
        reloads=15,
        directory=directory,
        reload=reload,
        active_sessions=active,
    )
    assert load.bad == []
    assert load.finished == 20
    assert set(load.seen) == {"A", "B"}
    assert results.count(False) == 3
    assert proxy.proc.poll() is None
    assert proxy.terminate() == 0
    events = proxy.events()
    signals = [e["signal"] for e in events if e["event"] == "popguard.signal"]
    assert signals == ["SIGHUP"] * 15 + ["SIGTERM"]
    assert [e["reason"] for e in events if e["event"] == "session.closed"] == ["quit"] * 20
    assert not [e for e in events if e["event"] == "session.internal_error"]
    assert_records_match_replies(load, [e for e in events if e["event"] == "policy.denied"])
    failed = [e for e in events if e["event"] == "policy.reload_failed"]
    assert len(failed) == 3
    assert all(e["kept"] == "previous policy set" for e in failed)
    for box in boxes:
        assert dovecot.maildir_messages(box.user) == [stored_form(m) for m in messages]


def test_reload_failed_record_names_the_error_even_after_many_warnings(tmp_path):
    directory = tmp_path / "policies"
    # 20 rules that can never apply (each a warning), in a valid set.
    many = "rules:\n" + "".join(
        f"  - name: idle-{n}\n    set: {{idle_timeout: 900}}\n" for n in range(21)
    )
    write_policies(directory, {"10-many.yaml": many})
    initial, warnings = load_policies(directory)
    assert len(warnings) == 20
    sink = ListSink()
    server = ProxyServer(
        ServerSettings(listeners=(), upstream=Endpoint("127.0.0.1", 110)),
        AuditLog([sink]),
        policies=PolicyShared(PolicyHolder(initial), trio.current_time),
        policy_loader=lambda: load_policies(directory)[0],
    )
    broken = "rules:\n  - name: broken\n    set: {deny_commands: [QUIT]}\n"
    write_policies(directory, {"10-many.yaml": many, "90-broken.yaml": broken})
    assert not server.reload_policies()
    assert server.policies is not None
    assert server.policies.holder.current is initial  # the old set stays
    (failed,) = sink.named("policy.reload_failed")
    assert any("90-broken.yaml" in e and "QUIT can never be denied" in e for e in failed["errors"])


# -- 6. the audit records of denied and dry-run rules -----------------------------------


async def test_policy_denied_and_dry_run_records_and_dry_run_forwards_dele(
    dovecot, mailbox, make_messages, policy_proxy, tap, dovecot_log, tmp_path
):
    messages = make_messages(3, seed=6)
    alice = mailbox(messages)
    carol = mailbox(messages)
    directory = tmp_path / "policies"
    write_policies(
        directory,
        {
            "50-mail.yaml": f"""\
rules:
  - name: alice-read-only
    match: {{user: {alice.user}}}
    set:
      deny_commands: [DELE, RSET]
  - name: carol-try-read-only
    mode: dry-run
    match: {{user: {carol.user}}}
    set:
      deny_commands: [DELE]
      deny_reply: "Carol may not delete"
"""
        },
    )
    recorder = await tap()
    proxy = await policy_proxy(directory, upstream=recorder.address)
    policy_file = directory / "50-mail.yaml"

    a = await Client.connect(proxy.address)
    try:
        await a.login(alice.user, alice.password)
        assert await a.command("DELE 2") == b"-ERR [SYS/PERM] DELE is not permitted by policy\r\n"
        assert await a.command("RSET") == b"-ERR [SYS/PERM] RSET is not permitted by policy\r\n"
        assert (await a.command("QUIT")).startswith(b"+OK")
    finally:
        await a.aclose()
    c = await Client.connect(proxy.address)
    try:
        await c.login(carol.user, carol.password)
        assert await c.command("DELE 2") == DOVECOT_MARKED  # forwarded: a dry run
        assert (await c.command("QUIT")).startswith(b"+OK")
    finally:
        await c.aclose()

    # Dovecot deleted Carol's message 2 on QUIT; Alice's mail is whole.
    kept = [stored_form(messages[0]), stored_form(messages[2])]
    assert dovecot.maildir_messages(carol.user) == kept
    assert dovecot.maildir_messages(alice.user) == [stored_form(m) for m in messages]
    await recorder.wait_closed()
    (carol_upstream,) = upstream_sessions(recorder, carol.user)
    assert b"DELE 2\r\n" in carol_upstream
    (end,) = await in_thread(dovecot_log.wait_session_ends, carol.user)
    assert "del=1/3" in end, end

    await proxy.wait_for("session.closed", 2)
    expected_denied = [
        {
            "rule": "alice-read-only",
            "policy_file": rule_line(policy_file, "alice-read-only"),
            "setting": "deny_commands",
            "mode": "enforce",
            "reason": f"{verb} denied",
            "command": verb,
            "user": alice.user,
        }
        for verb in ("DELE", "RSET")
    ]
    expected_dry = [
        {
            "rule": "carol-try-read-only",
            "policy_file": rule_line(policy_file, "carol-try-read-only"),
            "setting": "deny_commands",
            "mode": "dry-run",
            "reason": "DELE denied",
            "command": "DELE",
            "user": carol.user,
        }
    ]
    keys = ("rule", "policy_file", "setting", "mode", "reason", "command", "user")
    for source in (proxy.sink.named, proxy.json_events):
        denied = [{k: e.get(k) for k in keys} for e in source("policy.denied")]
        dry = [{k: e.get(k) for k in keys} for e in source("policy.dry_run")]
        assert denied == expected_denied
        assert dry == expected_dry
    (committed,) = proxy.sink.named("deletions.committed")
    assert committed["user"] == carol.user
    assert [m["msg"] for m in committed["messages"]] == [2]
    # The dry-run record comes before the DELE's own outcome.
    names = [e["event"] for e in proxy.sink.events]
    assert names.index("policy.dry_run") < names.index("dele.marked")
