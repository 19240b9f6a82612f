"""popguard, in process, between real clients and the real Dovecot.

Every test gets a fresh mailbox on the shared private Dovecot and its own
popguard (the ``popguard`` fixture).  Where the question is "did popguard
change anything?", the same conversation is also held with Dovecot directly
and the bytes are compared exactly as they were on the wire.  Where the
question is "was anything deleted?", the answer comes from the Maildir on
disk and from Dovecot's own log, not from popguard's word for it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import poplib
import re
import secrets
import socket
import time

import pytest
import trio

from popguard.testing.dovecot import DovecotInstance, stored_form, wire_form

in_thread = trio.to_thread.run_sync

# Dovecot's words for the end of a mail session (its pop3 logout line).
DOVECOT_QUIT = "Disconnected: Logged out"
DOVECOT_DROPPED = "Disconnected: Connection closed"


def numbers(messages) -> list[int]:
    """Message numbers from a record's ``messages`` field.

    The field holds plain numbers or, with message identity, one mapping per
    message (``{"msg": n, "uidl": ..., "size": ...}``); JSON makes tuples lists.
    """
    return [m["msg"] if isinstance(m, dict) else m for m in messages]


@pytest.fixture(autouse=True)
def _allow_long_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    # poplib refuses lines over 2048 bytes; the samples carry a 10,000-byte line.
    monkeypatch.setattr(poplib, "_MAXLINE", 1 << 20)


def stuffed(message: bytes) -> bytes:
    """``message`` dot-stuffed, as RFC 1939 §3 puts it on the wire."""
    return re.sub(rb"(?m)^\.", b"..", message)


def unstuffed_body(reply: bytes) -> bytes:
    """The content of a raw multi-line reply: no status line, no terminator, dots undone."""
    _status, _, body = reply.partition(b"\r\n")
    assert body.endswith(b".\r\n"), reply[-50:]
    return re.sub(rb"(?m)^\.", b"", body[:-3])


def poplib_bytes(lines: list[bytes]) -> bytes:
    return b"".join(line + b"\r\n" for line in lines)


def timestamp_of(greeting: bytes) -> bytes:
    match = re.search(rb"<[^<>@\s]+@[^<>\s]+>", greeting)
    assert match, greeting
    return match.group(0)


def dele_login(w, user: str, password: str) -> None:
    """Log in and mark message 1 for deletion, checking each reply."""
    assert w.readline().startswith(b"+OK")
    assert w.command(f"USER {user}").startswith(b"+OK")
    assert w.command(f"PASS {password}").startswith(b"+OK")
    assert w.command("DELE 1") == b"+OK Marked to be deleted.\r\n"


# -- 1. transparency: every byte as Dovecot sends it ---------------------------


async def test_poplib_and_raw_wire_match_direct_dovecot(
    dovecot, mailbox, make_messages, popguard, wire
):
    messages = make_messages(10, seed=21)  # every kind of sample, twice
    user, password, _ = mailbox(messages)
    proxy = await popguard()
    count = len(messages)
    script: list[tuple[str, bool]] = [
        (f"USER {user}", False),
        (f"PASS {password}", False),
        ("CAPA", True),
        ("STAT", False),
        ("LIST", True),
        ("UIDL", True),
    ]
    for i in range(1, count + 1):
        script += [
            (f"LIST {i}", False),
            (f"UIDL {i}", False),
            (f"TOP {i} 0", True),
            (f"TOP {i} 4", True),
            (f"RETR {i}", True),
        ]
    script += [("LIST 99", False), ("NOOP", False), ("QUIT", False)]

    def transcript(address: tuple[str, int]) -> tuple[bytes, list[bytes]]:
        w = wire(*address)
        greeting = w.readline()
        replies = [w.command(line, multiline) for line, multiline in script]
        assert w.read_to_eof() == b""  # the server hangs up after QUIT
        w.close()
        return greeting, replies

    direct_greeting, direct = await in_thread(transcript, dovecot.address)
    proxied_greeting, proxied = await in_thread(transcript, proxy.address)

    # The raw reader is right about the wire: RETR is the stuffed original.
    retr = {line: reply for (line, _), reply in zip(script, direct, strict=True)}
    for i, original in enumerate(messages, 1):
        assert (
            retr[f"RETR {i}"] == b"+OK %d octets\r\n" % len(original) + stuffed(original) + b".\r\n"
        )
    assert any(b"\r\n..\r\n" in retr[f"RETR {i}"] for i in range(1, count + 1))

    # Through popguard every reply is byte for byte what Dovecot sends directly.
    assert proxied_greeting.startswith(b"+OK")
    assert proxied_greeting.endswith(b"\r\n")
    for (line, _), d, p in zip(script, direct, proxied, strict=True):
        assert p == d, f"{line.split()[0]} differs: direct {d[:120]!r}... proxied {p[:120]!r}..."
    assert direct_greeting != proxied_greeting  # a fresh APOP timestamp each time

    # poplib through popguard: its un-stuffed results agree with the raw wire.
    def with_poplib() -> dict[str, object]:
        pop = poplib.POP3(*proxy.address, timeout=30)
        try:
            pop.user(user)
            pop.pass_(password)
            got: dict[str, object] = {
                "stat": pop.stat(),
                "list": pop.list()[1],
                "uidl": pop.uidl()[1],
                "top": [poplib_bytes(pop.top(i, 4)[1]) for i in range(1, count + 1)],
                "retr": [poplib_bytes(pop.retr(i)[1]) for i in range(1, count + 1)],
            }
            got["quit"] = pop.quit()
            return got
        finally:
            pop.close()

    got = await in_thread(with_poplib)
    replies = dict(zip((line for line, _ in script), direct, strict=True))
    assert got["stat"] == (count, sum(len(wire_form(m)) for m in messages))
    assert replies["STAT"] == b"+OK %d %d\r\n" % got["stat"]
    assert poplib_bytes(got["list"]) + b".\r\n" == replies["LIST"].partition(b"\r\n")[2]
    assert poplib_bytes(got["uidl"]) + b".\r\n" == replies["UIDL"].partition(b"\r\n")[2]
    for i, original in enumerate(messages, 1):
        assert got["retr"][i - 1] == original == unstuffed_body(replies[f"RETR {i}"])
        assert got["top"][i - 1] == unstuffed_body(replies[f"TOP {i} 4"])
        assert original.startswith(got["top"][i - 1])
    assert got["quit"].startswith(b"+OK")

    # The audit trail saw it all, and nothing was deleted.
    sink = proxy.sink
    await proxy.wait_for("session.closed", 2)
    assert [e["mechanism"] for e in sink.named("auth.succeeded")] == ["USER"] * 2
    assert {e["user"] for e in sink.named("auth.succeeded")} == {user}
    retrieved = [e for e in sink.named("message.retrieved") if e["command"] == "RETR"]
    assert [(e["msg"], e["bytes"]) for e in retrieved[:count]] == [
        (i, len(replies[f"RETR {i}"])) for i in range(1, count + 1)
    ]
    assert [e["reason"] for e in sink.named("session.closed")] == ["quit", "quit"]
    assert not sink.named("deletions.committed")
    assert dovecot.maildir_messages(user) == [stored_form(m) for m in messages]


async def test_deep_pipeline_is_framed_like_direct(dovecot, mailbox, make_messages, popguard, wire):
    """Far more commands in one write than popguard keeps in flight (64 by default)."""
    messages = make_messages(5, seed=24)
    user, password, _ = mailbox(messages)
    proxy = await popguard()
    script: list[tuple[str, bool]] = [(f"USER {user}", False), (f"PASS {password}", False)]
    for round_ in range(12):
        for i in range(1, 6):
            script += [
                (f"LIST {i}", False),
                (f"UIDL {i}", False),
                (f"TOP {i} {round_}", True),
                (f"RETR {i}", True),
            ]
        script += [("STAT", False), ("LIST", True), ("UIDL", True), ("NOOP", False)]
    script.append(("QUIT", False))
    assert len(script) > 4 * 64

    def pipelined(address: tuple[str, int]) -> list[bytes]:
        w = wire(*address)
        w.readline()
        w.send("".join(line + "\r\n" for line, _ in script))
        replies = [w.reply(multiline) for _, multiline in script]
        assert w.read_to_eof() == b""
        w.close()
        return replies

    direct = await in_thread(pipelined, dovecot.address)
    proxied = await in_thread(pipelined, proxy.address)
    assert all(reply.startswith(b"+OK") for reply in direct)
    for (line, _), d, p in zip(script, direct, proxied, strict=True):
        assert p == d, f"{line} differs"
    await proxy.wait_for("session.closed")
    retrieved = proxy.sink.named("message.retrieved")
    assert len(retrieved) == 12 * 5 * 2


async def test_concurrent_sessions_never_cross(dovecot, mailbox, make_messages, popguard):
    """Twenty clients at once, each with its own mail: every reply reaches its own client."""
    boxes = [
        (mailbox(make_messages(3, seed=100 + n)), make_messages(3, seed=100 + n)) for n in range(20)
    ]
    proxy = await popguard()

    def client(box, messages) -> bool:
        pop = poplib.POP3(*proxy.address, timeout=60)
        try:
            pop.user(box.user)
            pop.pass_(box.password)
            for _ in range(3):
                for i, original in enumerate(messages, 1):
                    assert poplib_bytes(pop.retr(i)[1]) == original
            return pop.quit().startswith(b"+OK")
        finally:
            pop.close()

    results: list[bool] = []

    async def one(box, messages) -> None:
        results.append(await in_thread(client, box, messages))

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for box, messages in boxes:
                nursery.start_soon(one, box, messages)
    assert results == [True] * len(boxes)
    closed = await proxy.wait_for("session.closed", len(boxes))
    assert {e["reason"] for e in closed} == {"quit"}
    assert sorted(e["user"] for e in proxy.sink.named("auth.succeeded")) == sorted(
        box.user for box, _ in boxes
    )


# -- 2. APOP: Dovecot's timestamp reaches the client untouched -----------------


async def test_apop_with_dovecots_own_timestamp(
    dovecot, mailbox, make_messages, popguard, tap, wire, dovecot_log
):
    messages = make_messages(2, seed=22)
    user, password, _ = mailbox(messages)
    recorder = await tap()  # popguard -> tap -> Dovecot: shows what Dovecot sent
    proxy = await popguard(upstream=recorder.address)

    def client() -> dict[str, bytes]:
        direct = wire(*dovecot.address)
        direct_greeting = direct.readline()
        direct.command("QUIT")
        direct.close()
        w = wire(*proxy.address)
        greeting = w.readline()
        digest = hashlib.md5(timestamp_of(greeting) + password.encode()).hexdigest()
        apop = w.command(f"APOP {user} {digest}")
        stat = w.command("STAT")
        retr = w.command("RETR 2", multiline=True)
        quit_ = w.command("QUIT")
        w.close()
        # A digest over another connection's timestamp must not work.
        stale = wire(*proxy.address)
        stale_greeting = stale.readline()
        stale_digest = hashlib.md5(timestamp_of(greeting) + password.encode()).hexdigest()
        refused = stale.command(f"APOP {user} {stale_digest}")
        stale.command("QUIT")
        stale.close()
        return {
            "direct_greeting": direct_greeting,
            "greeting": greeting,
            "digest": digest.encode(),
            "apop": apop,
            "stat": stat,
            "retr": retr,
            "quit": quit_,
            "stale_greeting": stale_greeting,
            "refused": refused,
        }

    got = await in_thread(client)
    await recorder.wait_closed()
    upstream_greeting = bytes(recorder.connections[0].from_server).partition(b"\r\n")[0] + b"\r\n"

    # Byte for byte the greeting Dovecot sent on popguard's upstream connection.
    assert got["greeting"] == upstream_greeting
    # The same shape as a direct greeting; only the timestamp differs.
    assert re.sub(rb"<[^<>]*>", b"<>", got["greeting"]) == re.sub(
        rb"<[^<>]*>", b"<>", got["direct_greeting"]
    )
    direct_ts = timestamp_of(got["direct_greeting"])
    ts = timestamp_of(got["greeting"])
    assert ts != direct_ts
    assert ts.split(b"@")[1] == direct_ts.split(b"@")[1]
    assert timestamp_of(got["stale_greeting"]) != ts  # never cached or replayed

    assert got["apop"].startswith(b"+OK"), got["apop"]
    assert got["stat"] == b"+OK 2 %d\r\n" % sum(len(m) for m in messages)
    assert unstuffed_body(got["retr"]) == messages[1]
    assert got["quit"].startswith(b"+OK")
    assert got["refused"].startswith(b"-ERR"), got["refused"]

    await proxy.wait_for("session.closed", 2)
    assert [(e["user"], e["mechanism"]) for e in proxy.sink.named("auth.succeeded")] == [
        (user, "APOP")
    ]
    assert [(e["user"], e["mechanism"]) for e in proxy.sink.named("auth.failed")] == [
        (user, "APOP")
    ]
    assert any("method=APOP" in line for line in dovecot_log.logins(user))
    proxy.assert_never_logged([password, got["digest"]])


# -- 3. SASL: AUTH PLAIN, LOGIN and CRAM-MD5 -----------------------------------


def b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def sasl_login(w, how: str, user: str, password: str) -> tuple[list[bytes], list[str]]:
    """Authenticate on ``w`` (greeting already read) as ``how`` says.

    Returns the server's lines, and every secret the client put on the wire.
    """
    lines: list[bytes] = []
    secrets: list[str] = [password]
    if how == "PLAIN-initial":
        response = b64(f"\0{user}\0{password}")
        secrets.append(response)
        lines.append(w.command(f"AUTH PLAIN {response}"))
    elif how in ("PLAIN-continuation", "PLAIN-wrong-password"):
        secret = password if how == "PLAIN-continuation" else "wrong-" + password[::-1]
        response = b64(f"{user}\0{user}\0{secret}")
        secrets += [secret, response]
        lines.append(w.command("AUTH PLAIN"))
        lines.append(w.command(response))
    elif how == "LOGIN":
        lines.append(w.command("AUTH LOGIN"))
        lines.append(w.command(b64(user)))
        secrets.append(b64(password))
        lines.append(w.command(b64(password)))
    elif how == "CRAM-MD5":
        challenge_line = w.command("AUTH CRAM-MD5")
        lines.append(challenge_line)
        challenge = base64.b64decode(challenge_line[2:].strip())
        digest = hmac.new(password.encode(), challenge, hashlib.md5).hexdigest()
        response = b64(f"{user} {digest}")
        secrets += [digest, response]
        lines.append(w.command(response))
    else:
        raise AssertionError(how)
    return lines, secrets


@pytest.mark.parametrize(
    ("how", "mechanism"),
    [
        ("PLAIN-initial", "PLAIN"),
        ("PLAIN-continuation", "PLAIN"),
        ("LOGIN", "LOGIN"),
        ("CRAM-MD5", "CRAM-MD5"),
        ("PLAIN-wrong-password", "PLAIN"),
    ],
)
async def test_sasl_through_popguard(
    dovecot, mailbox, make_messages, popguard, wire, dovecot_log, caplog, capsys, how, mechanism
):
    messages = make_messages(3, seed=23)
    user, password, _ = mailbox(messages)
    proxy = await popguard()
    succeed = how != "PLAIN-wrong-password"

    def client() -> tuple[list[bytes], list[str], bytes, bytes]:
        w = wire(*proxy.address)
        assert w.readline().startswith(b"+OK")
        lines, secrets = sasl_login(w, how, user, password)
        stat = w.command("STAT")
        quit_ = w.command("QUIT")
        w.close()
        return lines, secrets, stat, quit_

    lines, secrets, stat, quit_ = await in_thread(client)
    # Challenges come through as "+ ..." continuations, then the final result.
    assert all(line.startswith(b"+ ") for line in lines[:-1]), lines
    assert quit_.startswith(b"+OK")
    await proxy.wait_for("session.closed")
    if succeed:
        assert lines[-1] == b"+OK Logged in.\r\n"
        assert stat == b"+OK 3 %d\r\n" % sum(len(m) for m in messages)
        assert [(e["user"], e["mechanism"]) for e in proxy.sink.named("auth.succeeded")] == [
            (user, mechanism)
        ]
        assert not proxy.sink.named("auth.failed")
        assert any(f"method={mechanism}," in line for line in dovecot_log.logins(user))
    else:
        assert lines[-1].startswith(b"-ERR [AUTH]"), lines
        assert stat.startswith(b"-ERR")  # still in AUTHORIZATION
        assert not proxy.sink.named("auth.succeeded")
        assert [(e["user"], e["mechanism"]) for e in proxy.sink.named("auth.failed")] == [
            (user, mechanism)
        ]
    captured = capsys.readouterr()
    proxy.assert_never_logged(secrets, caplog.text, captured.out, captured.err)


@pytest.mark.parametrize(
    "name", ["PLAIN", "LOGIN", "PLAIN-cancelled-then-USER", "PLAIN-wrong-then-USER"]
)
async def test_pipelined_sasl_like_direct(dovecot, mailbox, make_messages, popguard, wire, name):
    """SASL responses sent before the challenge arrives: held, then relayed in order."""
    user, password, _ = mailbox(make_messages(3, seed=25))
    proxy = await popguard()
    plain = b64(f"\0{user}\0{password}")
    wrong = b64(f"\0{user}\0not-{password}")
    user_pass = f"USER {user}\r\nPASS {password}\r\n"
    script = {
        "PLAIN": f"AUTH PLAIN\r\n{plain}\r\n",
        "LOGIN": f"AUTH LOGIN\r\n{b64(user)}\r\n{b64(password)}\r\n",
        "PLAIN-cancelled-then-USER": f"AUTH PLAIN\r\n*\r\n{user_pass}",
        "PLAIN-wrong-then-USER": f"AUTH PLAIN\r\n{wrong}\r\n{user_pass}",
    }[name] + "STAT\r\nQUIT\r\n"

    def pipelined(address: tuple[str, int]) -> bytes:
        w = wire(*address)
        w.readline()
        w.send(script)
        out = w.read_to_eof()
        w.close()
        return out

    direct = await in_thread(pipelined, dovecot.address)
    proxied = await in_thread(pipelined, proxy.address)
    assert proxied == direct
    assert b"+OK Logged in.\r\n+OK 3 " in proxied
    await proxy.wait_for("session.closed")
    (succeeded,) = proxy.sink.named("auth.succeeded")
    assert succeeded["user"] == user
    assert len(proxy.sink.named("auth.failed")) == (1 if "-then-" in name else 0)
    proxy.assert_never_logged([password, plain, wrong, b64(password)])


# -- 5. deletion safety, checked on disk and in Dovecot's log ------------------


async def test_dele_then_quit_deletes(dovecot, mailbox, make_messages, popguard, wire, dovecot_log):
    messages = make_messages(3, seed=51)
    user, password, _ = mailbox(messages)
    proxy = await popguard()

    def client() -> bytes:
        w = wire(*proxy.address)
        dele_login(w, user, password)
        quit_ = w.command("QUIT")
        w.close()
        return quit_

    assert await in_thread(client) == b"+OK Logging out, messages deleted.\r\n"
    await proxy.wait_for("session.closed")
    assert dovecot.maildir_messages(user) == [stored_form(m) for m in messages[1:]]
    assert [numbers(e["messages"]) for e in proxy.sink.named("deletions.committed")] == [[1]]
    (end,) = await in_thread(dovecot_log.wait_session_ends, user)
    assert DOVECOT_QUIT in end, end
    assert "del=1/3" in end, end


async def test_client_drops_connection_after_dele(
    dovecot, mailbox, make_messages, popguard, tap, wire, dovecot_log
):
    messages = make_messages(3, seed=52)
    user, password, _ = mailbox(messages)
    recorder = await tap()
    proxy = await popguard(upstream=recorder.address)

    def client() -> None:
        w = wire(*proxy.address)
        dele_login(w, user, password)
        w.close()  # no QUIT: the client just goes away

    await in_thread(client)
    (closed,) = await proxy.wait_for("session.closed")
    assert closed["reason"] == "client_closed"
    (discarded,) = proxy.sink.named("deletions.discarded")
    assert (discarded["reason"], numbers(discarded["messages"])) == ("client_closed", [1])
    assert not proxy.sink.named("deletions.committed")
    (end,) = await in_thread(dovecot_log.wait_session_ends, user)
    assert DOVECOT_DROPPED in end, end
    assert "del=0/3" in end, end
    await recorder.wait_closed()
    assert b"QUIT" not in bytes(recorder.connections[0].from_client).upper()
    assert dovecot.maildir_messages(user) == [stored_form(m) for m in messages]


async def test_dele_rset_quit_keeps_the_message(
    dovecot, mailbox, make_messages, popguard, wire, dovecot_log
):
    messages = make_messages(3, seed=53)
    user, password, _ = mailbox(messages)
    proxy = await popguard()

    def client() -> tuple[bytes, bytes]:
        w = wire(*proxy.address)
        dele_login(w, user, password)
        replies = w.command("RSET"), w.command("QUIT")
        w.close()
        return replies

    rset, quit_ = await in_thread(client)
    assert rset.startswith(b"+OK")
    assert quit_ == b"+OK Logging out.\r\n"
    await proxy.wait_for("session.closed")
    assert [numbers(e["messages"]) for e in proxy.sink.named("dele.unmarked")] == [[1]]
    assert not proxy.sink.named("deletions.committed")
    (end,) = await in_thread(dovecot_log.wait_session_ends, user)
    assert DOVECOT_QUIT in end, end
    assert "del=0/3" in end, end
    assert dovecot.maildir_messages(user) == [stored_form(m) for m in messages]


async def test_idle_timeout_after_dele_keeps_the_message(
    dovecot, mailbox, make_messages, popguard, tap, wire, dovecot_log
):
    messages = make_messages(3, seed=54)
    user, password, _ = mailbox(messages)
    recorder = await tap()
    proxy = await popguard(upstream=recorder.address, idle_timeout=1.0)

    def client() -> bytes:
        w = wire(*proxy.address, timeout=20)
        dele_login(w, user, password)
        rest = w.read_to_eof()  # say nothing more, and wait
        w.close()
        return rest

    assert await in_thread(client) == b"-ERR Disconnected for inactivity.\r\n"
    (closed,) = await proxy.wait_for("session.closed")
    assert closed["reason"] == "idle_timeout"
    (discarded,) = proxy.sink.named("deletions.discarded")
    assert (discarded["reason"], numbers(discarded["messages"])) == ("idle_timeout", [1])
    (end,) = await in_thread(dovecot_log.wait_session_ends, user)
    assert DOVECOT_DROPPED in end, end
    assert "del=0/3" in end, end
    await recorder.wait_closed()
    assert b"QUIT" not in bytes(recorder.connections[0].from_client).upper()
    assert dovecot.maildir_messages(user) == [stored_form(m) for m in messages]


async def test_shutdown_after_dele_keeps_the_message(
    dovecot, mailbox, make_messages, popguard, tap, wire, dovecot_log
):
    messages = make_messages(3, seed=55)
    user, password, _ = mailbox(messages)
    recorder = await tap()
    proxy = await popguard(upstream=recorder.address, shutdown_grace=0.2)
    marked = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def client() -> bytes:
        w = wire(*proxy.address, timeout=20)
        dele_login(w, user, password)
        trio.from_thread.run_sync(marked.set, trio_token=token)
        rest = w.read_to_eof()
        w.close()
        return rest

    async with trio.open_nursery() as nursery:
        result: list[bytes] = []

        async def run_client() -> None:
            result.append(await in_thread(client))

        nursery.start_soon(run_client)
        with trio.fail_after(20):
            await marked.wait()
        proxy.server.request_shutdown()  # graceful: 0.2 s, then sessions end
    assert result == [b"-ERR [SYS/TEMP] popguard is shutting down, try again later\r\n"]
    await proxy.wait_for("popguard.stopped")
    (closed,) = proxy.sink.named("session.closed")
    assert closed["reason"] == "shutdown"
    (discarded,) = proxy.sink.named("deletions.discarded")
    assert (discarded["reason"], numbers(discarded["messages"])) == ("shutdown", [1])
    (end,) = await in_thread(dovecot_log.wait_session_ends, user)
    assert DOVECOT_DROPPED in end, end
    assert "del=0/3" in end, end
    await recorder.wait_closed()
    assert b"QUIT" not in bytes(recorder.connections[0].from_client).upper()
    assert dovecot.maildir_messages(user) == [stored_form(m) for m in messages]


async def test_pipelined_deletions_in_one_packet(
    dovecot, mailbox, make_messages, popguard, wire, dovecot_log
):
    messages = make_messages(4, seed=56)
    proxied_box = mailbox(messages)
    direct_box = mailbox(messages)
    proxy = await popguard()

    def pipelined(address: tuple[str, int], user: str, password: str) -> list[bytes]:
        w = wire(*address)
        w.send(f"USER {user}\r\nPASS {password}\r\nDELE 1\r\nDELE 2\r\nQUIT\r\n")
        replies = w.read_to_eof().splitlines(keepends=True)
        w.close()
        return replies

    through = await in_thread(pipelined, proxy.address, proxied_box.user, proxied_box.password)
    direct = await in_thread(pipelined, dovecot.address, direct_box.user, direct_box.password)
    assert through[1:] == [
        b"+OK\r\n",
        b"+OK Logged in.\r\n",
        b"+OK Marked to be deleted.\r\n",
        b"+OK Marked to be deleted.\r\n",
        b"+OK Logging out, messages deleted.\r\n",
    ]
    assert through[0].startswith(b"+OK")
    assert through[1:] == direct[1:]
    await proxy.wait_for("session.closed")
    assert [e["msg"] for e in proxy.sink.named("dele.marked")] == [1, 2]
    assert [numbers(e["messages"]) for e in proxy.sink.named("deletions.committed")] == [[1, 2]]
    for box in (proxied_box, direct_box):
        assert dovecot.maildir_messages(box.user) == [stored_form(m) for m in messages[2:]]
    (end,) = await in_thread(dovecot_log.wait_session_ends, proxied_box.user)
    assert DOVECOT_QUIT in end, end
    assert "del=2/4" in end, end


# -- message identity: records name messages as Dovecot does ---------------------


def dovecot_identities(w) -> dict[int, dict[str, object]]:
    """``{n: {"msg": n, "uidl": ..., "size": ...}}`` from a logged-in raw client."""
    uidl = w.command("UIDL", multiline=True).split(b"\r\n")[1:-2]
    sizes = w.command("LIST", multiline=True).split(b"\r\n")[1:-2]
    found: dict[int, dict[str, object]] = {}
    for u, s in zip(uidl, sizes, strict=True):
        n, uid = u.split()
        m, size = s.split()
        assert n == m
        found[int(n)] = {"msg": int(n), "uidl": uid.decode(), "size": int(size)}
    return found


async def identity_session(
    dovecot, proxy, wire, user: str, password: str, script: list[tuple[str, bool]]
):
    """What Dovecot says the messages are (direct), then ``script`` through popguard."""

    def client() -> tuple[dict[int, dict[str, object]], list[bytes]]:
        direct = wire(*dovecot.address)
        direct.readline()
        direct.command(f"USER {user}")
        direct.command(f"PASS {password}")
        identities = dovecot_identities(direct)
        direct.command("QUIT")
        direct.close()
        w = wire(*proxy.address)
        w.readline()
        replies = [w.command(line, multiline) for line, multiline in script]
        w.close()
        return identities, replies

    identities, replies = await in_thread(client)
    await proxy.wait_for("session.closed")
    return identities, replies


async def test_records_name_messages_by_dovecots_uidl_and_size(
    dovecot, mailbox, make_messages, popguard, wire
):
    messages = make_messages(4, seed=61)
    user, password, _ = mailbox(messages)
    proxy = await popguard()
    script = [
        (f"USER {user}", False),
        (f"PASS {password}", False),
        ("RETR 2", True),
        ("TOP 4 0", True),
        ("DELE 3", False),
        ("QUIT", False),
    ]
    ids, replies = await identity_session(dovecot, proxy, wire, user, password, script)
    # The client sees only the answers to its own commands.
    assert unstuffed_body(replies[2]) == messages[1]
    assert replies[4] == b"+OK Marked to be deleted.\r\n"
    assert replies[5] == b"+OK Logging out, messages deleted.\r\n"
    retrieved = proxy.sink.named("message.retrieved")
    assert [{k: e.get(k) for k in ("msg", "uidl", "size")} for e in retrieved] == [ids[2], ids[4]]
    (marked,) = proxy.sink.named("dele.marked")
    assert {k: marked.get(k) for k in ("msg", "uidl", "size")} == ids[3]
    (committed,) = proxy.sink.named("deletions.committed")
    assert [dict(m) for m in committed["messages"]] == [ids[3]]
    remaining = dovecot.maildir_messages(user)
    assert remaining == [stored_form(m) for i, m in enumerate(messages, 1) if i != 3]


async def test_a_retr_walk_is_named_from_one_listing_of_dovecots(
    dovecot, mailbox, make_messages, popguard, wire
):
    """A client that walks the maildrop with RETR alone (a poplib loop):
    popguard asks Dovecot STAT and one bare UIDL and LIST, never relayed,
    and names every message as Dovecot's own listings do."""
    messages = make_messages(6, seed=63)
    user, password, _ = mailbox(messages)
    proxy = await popguard()
    walk = [(f"RETR {n}", True) for n in range(1, 7)]
    script = [(f"USER {user}", False), (f"PASS {password}", False), *walk, ("QUIT", False)]
    ids, replies = await identity_session(dovecot, proxy, wire, user, password, script)
    assert [unstuffed_body(reply) for reply in replies[2:8]] == messages
    retrieved = proxy.sink.named("message.retrieved")
    assert [{k: e.get(k) for k in ("msg", "uidl", "size")} for e in retrieved] == [
        ids[n] for n in range(1, 7)
    ]
    # Exactly the client's lines, plus: UIDL 1 + LIST 1 (the first message),
    # STAT + UIDL 2 + LIST 2 (the second), then one bare UIDL and LIST.
    sent = b"".join(line.encode() + b"\r\n" for line, _ in script)
    own = b"UIDL 1\r\nLIST 1\r\nSTAT\r\nUIDL 2\r\nLIST 2\r\nUIDL\r\nLIST\r\n"
    (closed,) = proxy.sink.named("session.closed")
    assert closed["bytes_to_upstream"] == len(sent) + len(own)


async def test_uidl_survives_a_request_for_a_missing_message(
    dovecot, mailbox, make_messages, popguard, wire
):
    messages = make_messages(3, seed=62)
    user, password, _ = mailbox(messages)
    proxy = await popguard()
    script = [
        (f"USER {user}", False),
        (f"PASS {password}", False),
        ("RETR 99", True),  # a typo: there is no message 99
        ("DELE 1", False),
        ("QUIT", False),
    ]
    ids, replies = await identity_session(dovecot, proxy, wire, user, password, script)
    assert replies[2] == b"-ERR There's no message 99.\r\n"
    assert replies[3] == b"+OK Marked to be deleted.\r\n"
    (committed,) = proxy.sink.named("deletions.committed")
    assert [dict(m) for m in committed["messages"]] == [ids[1]]  # fails: no "uidl"


# -- a Dovecot that offers STLS ---------------------------------------------------


@pytest.fixture
def tls_dovecot(dovecot, tmp_path_factory, require_tool):
    """A second private Dovecot with STLS on its plain port (``tls=True``)."""
    require_tool("openssl")
    instance = DovecotInstance(tmp_path_factory.mktemp("dovecot-tls"), tls=True)
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()


async def test_stls_is_hidden_and_refused_in_front_of_a_tls_dovecot(
    tls_dovecot, make_messages, popguard, tap, wire
):
    messages = make_messages(2, seed=71)
    user, password = f"tls-{secrets.token_hex(3)}", secrets.token_urlsafe(12)
    tls_dovecot.add_user(user, password, messages)
    recorder = await tap(tls_dovecot.address)
    proxy = await popguard(upstream=recorder.address)
    script = [
        ("CAPA", True),
        ("STLS", False),
        (f"USER {user}", False),
        (f"PASS {password}", False),
        ("CAPA", True),
        ("RETR 1", True),
        ("QUIT", False),
    ]

    def transcript(address: tuple[str, int]) -> list[bytes]:
        w = wire(*address)
        w.readline()
        replies = [w.command(line, multiline) for line, multiline in script if line != "STLS"]
        w.close()
        return replies

    def stls_through_proxy() -> tuple[bytes, bytes]:
        w = wire(*proxy.address)
        w.readline()
        refused = w.command("STLS")
        capa = w.command("CAPA", multiline=True)
        w.command("QUIT")
        w.close()
        return refused, capa

    direct = await in_thread(transcript, tls_dovecot.address)
    proxied = await in_thread(transcript, proxy.address)
    refused, capa = await in_thread(stls_through_proxy)

    assert b"\r\nSTLS\r\n" in direct[0]  # Dovecot offers STLS before login...
    assert proxied[0] == direct[0].replace(b"\r\nSTLS\r\n", b"\r\n")  # ...popguard does not
    assert proxied[1:] == direct[1:]  # everything else is untouched
    assert unstuffed_body(proxied[4]) == messages[0]
    assert refused == b"-ERR STLS is not available through this proxy\r\n"
    assert capa == proxied[0]  # the session goes on, in plain text
    await recorder.wait_closed()
    upstream = b"".join(bytes(c.from_client) for c in recorder.connections)
    assert b"STLS" not in upstream.upper()
    rejected = proxy.sink.named("command.rejected")
    assert [e.get("command") for e in rejected] == ["STLS"]
    proxy.assert_never_logged([password])


# -- 9. IPv6 in front, IPv4 behind ----------------------------------------------


def ipv6_loopback_unavailable() -> str | None:
    if not socket.has_ipv6:
        return "Python has no IPv6 support"
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError as exc:
        return f"::1 is not usable here: {exc}"
    return None


async def test_ipv6_listener_relays_to_ipv4_dovecot(dovecot, mailbox, make_messages, popguard):
    reason = ipv6_loopback_unavailable()
    if reason is not None:
        pytest.skip(reason)
    messages = make_messages(2, seed=9)
    user, password, _ = mailbox(messages)
    proxy = await popguard(host="::1")
    assert proxy.host == "::1"

    def client() -> tuple[tuple[int, int], bytes, bytes]:
        pop = poplib.POP3("::1", proxy.port, timeout=30)
        assert pop.sock.family == socket.AF_INET6
        pop.user(user)
        pop.pass_(password)
        stat = pop.stat()
        body = poplib_bytes(pop.retr(1)[1])
        return stat, body, pop.quit()

    stat, body, quit_ = await in_thread(client)
    assert stat == (2, sum(len(m) for m in messages))
    assert body == messages[0]
    assert quit_.startswith(b"+OK")
    (opened,) = proxy.sink.named("session.opened")
    assert str(opened["client"]).startswith("[::1]:")
    (connected,) = proxy.sink.named("upstream.connected")
    assert connected["upstream"] == f"{dovecot.host}:{dovecot.port}"


# -- 10. upstream down -----------------------------------------------------------


async def test_unreachable_upstream_answers_sys_temp_at_once(popguard, wire):
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    proxy = await popguard(upstream=("127.0.0.1", dead))

    def client() -> tuple[bytes, float]:
        start = time.monotonic()
        w = wire(*proxy.address, timeout=20)
        answer = w.read_to_eof()
        w.close()
        return answer, time.monotonic() - start

    answer, elapsed = await in_thread(client)
    assert answer == b"-ERR [SYS/TEMP] Upstream POP3 server is unavailable\r\n"
    assert elapsed < 5.0, f"took {elapsed:.1f} s"  # refused at once, not a timeout
    (failed,) = await proxy.wait_for("upstream.failed")
    assert failed["upstream"] == f"127.0.0.1:{dead}"
    (closed,) = await proxy.wait_for("session.closed")
    assert closed["reason"] == "upstream_unreachable"
