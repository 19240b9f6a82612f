"""Tests for the demo / fault-injection POP3 upstream.

Most tests run the server over real TCP on 127.0.0.1 (port 0) inside the
test's nursery, and talk to it either with Python's own ``poplib`` (in a
worker thread) or with a tiny raw client that shows the exact bytes.
"""

from __future__ import annotations

import base64
import hashlib
import poplib
import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from popguard.testing.demo_upstream import (
    MAX_COMMAND_LINE,
    DemoUpstream,
    Faults,
    MailStore,
    bound_port,
    sample_store,
)

T = TypeVar("T")
TIMEOUT = 10


@pytest.fixture(autouse=True)
def _poplib_long_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    # The sample store has a 12,000-octet line; stock poplib stops at 2048.
    monkeypatch.setattr(poplib, "_MAXLINE", 1 << 20)


@pytest.fixture
def store() -> MailStore:
    return sample_store()


async def start(nursery: trio.Nursery, server: DemoUpstream) -> int:
    listeners = await nursery.start(server.serve, "127.0.0.1", 0)
    return bound_port(listeners)


async def in_thread(fn: Callable[[], T]) -> T:
    with trio.fail_after(TIMEOUT):
        return await trio.to_thread.run_sync(fn)


def pop_login(port: int, user: str = "demo", password: str = "demo") -> poplib.POP3:  # noqa: S107
    pop = poplib.POP3("127.0.0.1", port, timeout=TIMEOUT)
    pop.user(user)
    pop.pass_(password)
    return pop


class Raw:
    """A minimal POP3 client that exposes the bytes on the wire."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    @classmethod
    async def connect(cls, port: int) -> Raw:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def _fill(self) -> bool:
        with trio.fail_after(TIMEOUT):
            data = await self.stream.receive_some(65536)
        self.buffer += data
        return bool(data)

    async def line(self) -> bytes:
        """The next line, without CRLF."""
        while (end := self.buffer.find(b"\r\n")) < 0:
            if not await self._fill():
                raise EOFError(bytes(self.buffer))
        line = bytes(self.buffer[:end])
        del self.buffer[: end + 2]
        return line

    async def multiline(self) -> list[bytes]:
        """The body lines of a multi-line reply, un-stuffed."""
        lines = []
        while (line := await self.line()) != b".":
            lines.append(line[1:] if line.startswith(b".") else line)
        return lines

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def command(self, line: bytes) -> bytes:
        await self.send(line + b"\r\n")
        return await self.line()

    async def login(self, user: bytes = b"demo", password: bytes = b"demo") -> None:
        assert (await self.line()).startswith(b"+OK")
        assert (await self.command(b"USER " + user)).startswith(b"+OK")
        assert (await self.command(b"PASS " + password)).startswith(b"+OK")

    async def read_to_eof(self) -> bytes:
        while await self._fill():
            pass
        data = bytes(self.buffer)
        self.buffer.clear()
        return data

    async def aclose(self) -> None:
        await self.stream.aclose()


# --------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------


def test_sample_store_contents(store: MailStore) -> None:
    assert set(store.mailboxes) == {"demo", "alice"}
    assert store.mailboxes["demo"].password == "demo"
    assert store.mailboxes["alice"].password == "alicepw"
    demo = store.messages("demo")
    assert len(demo) == 5
    assert any(re.search(rb"(?m)^\.", m) for m in demo)
    assert max(len(m) for m in demo) > 200_000
    assert max(len(line) for m in demo for line in m.split(b"\r\n")) > 2048
    for data in demo + store.messages("alice"):
        assert data.endswith(b"\r\n")
        assert b"\n" not in data.replace(b"\r\n", b"")
        assert b"\r" not in data.replace(b"\r\n", b"")


def test_uids_are_valid_and_unique(store: MailStore) -> None:
    uids = store.uids("demo") + store.uids("alice")
    assert len(set(uids)) == len(uids)
    for uid in uids:
        assert re.fullmatch(r"[\x21-\x7e]{1,70}", uid)


def test_add_message_normalises_line_endings() -> None:
    store = MailStore()
    store.add_user("u", "p")
    message = store.add_message("u", b"Subject: x\n\nbare lf\rbare cr\r\nno final eol")
    assert message.data == b"Subject: x\r\n\r\nbare lf\r\nbare cr\r\nno final eol\r\n"
    assert message.size == len(message.data)
    with pytest.raises(ValueError, match="UIDL"):
        store.add_message("u", b"x", uid="has space")
    with pytest.raises(ValueError, match="duplicate"):
        store.add_message("u", b"x", uid=message.uid)


def test_load_maildir(tmp_path: Path) -> None:
    for sub in ("cur", "new", "tmp"):
        (tmp_path / sub).mkdir()
    (tmp_path / "cur" / "1700000001.M1P1.host:2,S").write_bytes(b"Subject: one\n\nfirst\n")
    (tmp_path / "new" / "1700000002.M2P2.host").write_bytes(b"Subject: two\n\n.dot\n")
    (tmp_path / "tmp" / "1700000003.M3P3.host").write_bytes(b"Subject: partial\n")
    (tmp_path / "new" / ".hidden").write_bytes(b"Subject: ignored\n")
    store = MailStore()
    assert store.load_maildir(tmp_path, user="bob", password="pw") == 2
    assert store.mailboxes["bob"].password == "pw"
    assert store.messages("bob") == [
        b"Subject: one\r\n\r\nfirst\r\n",
        b"Subject: two\r\n\r\n.dot\r\n",
    ]
    assert store.uids("bob") == ["1700000001.M1P1.host", "1700000002.M2P2.host"]


# --------------------------------------------------------------------------
# poplib against the server over TCP
# --------------------------------------------------------------------------


async def test_poplib_user_pass_retrieves_every_message(
    nursery: trio.Nursery, store: MailStore
) -> None:
    port = await start(nursery, DemoUpstream(store))
    expected = store.mailboxes["demo"].messages

    def session() -> tuple[tuple[int, int], list[bytes], list[bytes], list[bytes]]:
        pop = pop_login(port)
        stat = pop.stat()
        listing = pop.list()[1]
        uidl = pop.uidl()[1]
        bodies = []
        for number in range(1, stat[0] + 1):
            _, lines, _ = pop.retr(number)
            bodies.append(b"".join(line + b"\r\n" for line in lines))
        pop.quit()
        return stat, listing, uidl, bodies

    stat, listing, uidl, bodies = await in_thread(session)
    assert stat == (len(expected), sum(m.size for m in expected))
    assert listing == [f"{i} {m.size}".encode() for i, m in enumerate(expected, 1)]
    assert uidl == [f"{i} {m.uid}".encode() for i, m in enumerate(expected, 1)]
    assert bodies == [m.data for m in expected]
    assert len(store.messages("demo")) == 5  # nothing deleted


async def test_poplib_apop(nursery: trio.Nursery, store: MailStore) -> None:
    port = await start(nursery, DemoUpstream(store))

    def session() -> tuple[bytes, bytes, list[bytes]]:
        pop = poplib.POP3("127.0.0.1", port, timeout=TIMEOUT)
        welcome = pop.getwelcome()
        pop.apop("alice", "alicepw")
        _, lines, _ = pop.retr(1)
        pop.quit()
        timestamp = re.search(rb"<[^>]*>", welcome)
        assert timestamp is not None
        return welcome, timestamp.group(0), lines

    welcome, timestamp, lines = await in_thread(session)
    assert re.fullmatch(rb"\+OK popguard demo POP3 server ready <\d+\.\d+@popguard\.demo>", welcome)
    assert timestamp.startswith(b"<")
    assert b"".join(line + b"\r\n" for line in lines) == store.messages("alice")[0]

    def wrong_password() -> None:
        pop = poplib.POP3("127.0.0.1", port, timeout=TIMEOUT)
        try:
            pop.apop("alice", "wrong")
        finally:
            pop.close()

    with pytest.raises(poplib.error_proto, match="-ERR"):
        await in_thread(wrong_password)


async def test_greeting_timestamps_are_unique(nursery: trio.Nursery, store: MailStore) -> None:
    port = await start(nursery, DemoUpstream(store))
    greetings = set()
    for _ in range(3):
        client = await Raw.connect(port)
        greetings.add(await client.line())
        await client.aclose()
    assert len(greetings) == 3


async def test_dele_and_quit_removes_for_next_session(
    nursery: trio.Nursery, store: MailStore
) -> None:
    port = await start(nursery, DemoUpstream(store))
    doomed = store.uids("demo")[1]

    def delete_second() -> None:
        pop = pop_login(port)
        pop.dele(2)
        pop.quit()

    await in_thread(delete_second)
    assert doomed not in store.uids("demo")

    def list_uids() -> tuple[int, int]:
        pop = pop_login(port)
        try:
            return pop.stat()
        finally:
            pop.quit()

    count, size = await in_thread(list_uids)
    assert count == 4
    assert size == sum(len(m) for m in store.messages("demo"))


async def test_dele_then_dropped_connection_deletes_nothing(
    nursery: trio.Nursery, store: MailStore
) -> None:
    server = DemoUpstream(store)
    port = await start(nursery, server)
    before = store.uids("demo")

    def delete_and_drop() -> None:
        pop = pop_login(port)
        pop.dele(1)
        pop.dele(2)
        pop.close()  # no QUIT

    await in_thread(delete_and_drop)

    def count() -> int:
        pop = pop_login(port)
        try:
            return pop.stat()[0]
        finally:
            pop.quit()

    assert await in_thread(count) == 5
    assert store.uids("demo") == before
    assert b"QUIT" in server.received_commands  # from the second session only
    assert server.received_commands.count(b"QUIT") == 1


async def test_rset_undoes_dele(nursery: trio.Nursery, store: MailStore) -> None:
    port = await start(nursery, DemoUpstream(store))

    def session() -> None:
        pop = pop_login(port)
        pop.dele(1)
        assert pop.stat()[0] == 4
        pop.rset()
        assert pop.stat()[0] == 5
        pop.quit()

    await in_thread(session)
    assert len(store.messages("demo")) == 5


# --------------------------------------------------------------------------
# Protocol details, on the wire
# --------------------------------------------------------------------------


async def test_pipelined_commands_in_one_packet_are_answered_in_order(
    nursery: trio.Nursery, store: MailStore
) -> None:
    port = await start(nursery, DemoUpstream(store))
    messages = store.mailboxes["demo"].messages
    total = sum(m.size for m in messages)
    client = await Raw.connect(port)
    assert (await client.line()).startswith(b"+OK popguard demo")
    await client.send(
        b"USER demo\r\nPASS demo\r\nSTAT\r\nLIST 2\r\nUIDL 2\r\nDELE 1\r\nSTAT\r\n"
        b"LIST\r\nBOGUS\r\nRSET\r\nTOP 1 0\r\nNOOP\r\nQUIT\r\n"
    )
    assert await client.line() == b"+OK send PASS"
    assert await client.line() == f"+OK maildrop has 5 messages ({total} octets)".encode()
    assert await client.line() == f"+OK 5 {total}".encode()
    assert await client.line() == f"+OK 2 {messages[1].size}".encode()
    assert await client.line() == f"+OK 2 {messages[1].uid}".encode()
    assert await client.line() == b"+OK message 1 deleted"
    assert await client.line() == f"+OK 4 {total - messages[0].size}".encode()
    assert (await client.line()).startswith(b"+OK 4 messages")
    assert (
        await client.multiline()
        == [f"{i} {m.size}".encode() for i, m in enumerate(messages, 1)][1:]
    )
    assert (await client.line()).startswith(b"-ERR")
    assert await client.line() == f"+OK maildrop has 5 messages ({total} octets)".encode()
    assert await client.line() == b"+OK top of message follows"
    header = messages[0].data.split(b"\r\n\r\n", 1)[0]
    assert await client.multiline() == [*header.split(b"\r\n"), b""]
    assert await client.line() == b"+OK"
    assert (await client.line()).startswith(b"+OK popguard demo POP3 server signing off")
    assert await client.read_to_eof() == b""
    assert len(store.messages("demo")) == 5


async def test_dot_stuffing_on_the_wire(nursery: trio.Nursery, store: MailStore) -> None:
    port = await start(nursery, DemoUpstream(store))
    client = await Raw.connect(port)
    await client.login()
    size = store.mailboxes["demo"].messages[1].size
    await client.send(b"RETR 2\r\nQUIT\r\n")
    wire = await client.read_to_eof()
    reply, _, quit_reply = wire.partition(b"\r\n.\r\n")
    assert reply.startswith(f"+OK {size} octets\r\n".encode())
    body = reply.split(b"\r\n", 1)[1] + b"\r\n"
    assert b"\r\n..\r\n" in body  # a lone "."
    assert b"\r\n...\r\n" in body  # ".."
    assert b"\r\n..hidden-file\r\n" in body
    assert b"\r\n....and so on\r\n" in body
    assert b"\r\n.. a dot and a space\r\n" in body
    assert re.sub(rb"(?m)^\.", b"", body) == store.messages("demo")[1]
    assert quit_reply.startswith(b"+OK")


async def test_top(nursery: trio.Nursery, store: MailStore) -> None:
    port = await start(nursery, DemoUpstream(store))
    data = store.messages("demo")[1]
    header, body = data.split(b"\r\n\r\n", 1)
    client = await Raw.connect(port)
    await client.login()
    assert await client.command(b"TOP 2 3") == b"+OK top of message follows"
    assert await client.multiline() == [*header.split(b"\r\n"), b"", *body.split(b"\r\n")[:3]]
    assert await client.command(b"TOP 2 100000") == b"+OK top of message follows"
    assert await client.multiline() == data.split(b"\r\n")[:-1]
    assert (await client.command(b"TOP 2")).startswith(b"-ERR")
    assert (await client.command(b"TOP 2 -1")).startswith(b"-ERR")
    assert (await client.command(b"TOP 9 1")).startswith(b"-ERR")


async def test_list_uidl_retr_dele_errors(nursery: trio.Nursery, store: MailStore) -> None:
    port = await start(nursery, DemoUpstream(store))
    client = await Raw.connect(port)
    await client.login()
    for bad in (b"LIST 0", b"LIST 6", b"LIST x", b"LIST 1 2", b"UIDL 99", b"RETR", b"RETR -1"):
        assert (await client.command(bad)).startswith(b"-ERR"), bad
    assert await client.command(b"DELE 3") == b"+OK message 3 deleted"
    assert await client.command(b"DELE 3") == b"-ERR message 3 already deleted"
    assert await client.command(b"LIST 3") == b"-ERR message 3 already deleted"
    assert await client.command(b"UIDL 3") == b"-ERR message 3 already deleted"
    assert await client.command(b"RETR 3") == b"-ERR message 3 already deleted"
    assert (await client.command(b"UIDL")).startswith(b"+OK 4 messages")
    listed = [line.split()[0] for line in await client.multiline()]
    assert listed == [b"1", b"2", b"4", b"5"]
    size = store.mailboxes["demo"].messages[3].size
    assert await client.command(b"list 4") == b"+OK 4 %d" % size


async def test_wrong_state_commands(nursery: trio.Nursery, store: MailStore) -> None:
    port = await start(nursery, DemoUpstream(store))
    client = await Raw.connect(port)
    assert (await client.line()).startswith(b"+OK")
    for command in (b"STAT", b"LIST", b"RETR 1", b"DELE 1", b"NOOP", b"RSET", b"TOP 1 1"):
        assert (await client.command(command)).startswith(b"-ERR"), command
    assert (await client.command(b"PASS demo")).startswith(b"-ERR")  # no USER yet
    assert (await client.command(b"USER demo")).startswith(b"+OK")
    assert (await client.command(b"NOOP")).startswith(b"-ERR")
    assert (await client.command(b"PASS demo")).startswith(b"-ERR")  # USER was not just before
    assert (await client.command(b"USER demo")).startswith(b"+OK")
    assert (await client.command(b"PASS wrong")).startswith(b"-ERR")
    assert (await client.command(b"USER nobody")).startswith(b"+OK")
    assert (await client.command(b"PASS demo")).startswith(b"-ERR")
    assert (await client.command(b"USER demo")).startswith(b"+OK")
    assert (await client.command(b"PASS demo")).startswith(b"+OK maildrop has 5 messages")
    for command in (b"USER demo", b"PASS demo", b"APOP demo x", b"AUTH PLAIN", b"BOGUS"):
        assert (await client.command(command)).startswith(b"-ERR"), command
    assert (await client.command(b"NOOP")).startswith(b"+OK")


async def test_command_line_length_limit(nursery: trio.Nursery, store: MailStore) -> None:
    server = DemoUpstream(store)
    port = await start(nursery, server)
    client = await Raw.connect(port)
    assert (await client.line()).startswith(b"+OK")
    fits = b"USER " + b"a" * (MAX_COMMAND_LINE - len(b"USER ") - 2)  # 255 with CRLF
    assert (await client.command(fits)).startswith(b"+OK")
    assert (await client.command(fits + b"a")).startswith(b"-ERR command line longer")
    # A huge line in several pieces, pipelined with a command after it.
    await client.send(b"NOOP " + b"x" * 100_000)
    await client.send(b"x" * 100_000 + b"\r\nCAPA\r\n")
    assert (await client.line()).startswith(b"-ERR command line longer")
    assert await client.line() == b"+OK Capability list follows"
    assert b"TOP" in await client.multiline()
    assert len(server.received_commands[-2]) == MAX_COMMAND_LINE


async def test_capa_and_stls(nursery: trio.Nursery, store: MailStore) -> None:
    plain = await start(nursery, DemoUpstream(store))
    stls = await start(nursery, DemoUpstream(store, advertise_stls=True))
    expected = [
        b"TOP",
        b"UIDL",
        b"USER",
        b"SASL PLAIN",
        b"PIPELINING",
        b"RESP-CODES",
        b"IMPLEMENTATION popguard-demo",
    ]
    client = await Raw.connect(plain)
    assert (await client.line()).startswith(b"+OK")
    assert await client.command(b"CAPA") == b"+OK Capability list follows"
    assert await client.multiline() == expected
    assert (await client.command(b"STLS")).startswith(b"-ERR")

    client = await Raw.connect(stls)
    await client.login()
    assert await client.command(b"capa") == b"+OK Capability list follows"
    assert await client.multiline() == [*expected, b"STLS"]
    assert (await client.command(b"STLS")).startswith(b"-ERR")
    assert (await client.command(b"NOOP")).startswith(b"+OK")  # still plaintext, still fine


def _plain(authzid: bytes, authcid: bytes, password: bytes) -> bytes:
    return base64.b64encode(authzid + b"\0" + authcid + b"\0" + password)


async def test_auth_plain(nursery: trio.Nursery, store: MailStore) -> None:
    port = await start(nursery, DemoUpstream(store))

    client = await Raw.connect(port)
    assert (await client.line()).startswith(b"+OK")
    assert await client.command(b"AUTH") == b"+OK SASL mechanisms follow"
    assert await client.multiline() == [b"PLAIN"]
    assert (await client.command(b"AUTH CRAM-MD5")).startswith(b"-ERR")
    # Initial response, wrong password, then authzid that is not the authcid.
    bad = b"AUTH PLAIN " + _plain(b"", b"demo", b"nope")
    assert (await client.command(bad)).startswith(b"-ERR")
    bad = b"AUTH PLAIN " + _plain(b"alice", b"demo", b"demo")
    assert (await client.command(bad)).startswith(b"-ERR")
    assert (await client.command(b"AUTH PLAIN =")).startswith(b"-ERR")
    assert (await client.command(b"AUTH PLAIN !!notbase64")).startswith(b"-ERR")
    # Continuation, cancelled with "*".
    assert await client.command(b"AUTH PLAIN") == b"+ "
    assert (await client.command(b"*")).startswith(b"-ERR")
    # Continuation, successful.
    assert await client.command(b"AUTH PLAIN") == b"+ "
    reply = await client.command(_plain(b"", b"alice", b"alicepw"))
    assert reply == b"+OK maildrop has 2 messages (%d octets)" % sum(
        len(m) for m in store.messages("alice")
    )
    await client.aclose()

    client = await Raw.connect(port)
    assert (await client.line()).startswith(b"+OK")
    ok = b"AUTH PLAIN " + _plain(b"demo", b"demo", b"demo")
    assert (await client.command(ok)).startswith(b"+OK maildrop has 5 messages")
    assert (await client.command(b"STAT")).startswith(b"+OK 5 ")


async def test_apop_on_the_wire(nursery: trio.Nursery, store: MailStore) -> None:
    port = await start(nursery, DemoUpstream(store))
    client = await Raw.connect(port)
    greeting = await client.line()
    timestamp = re.search(rb"<[^>]*>", greeting).group(0)  # type: ignore[union-attr]
    digest = hashlib.md5(timestamp + b"demo").hexdigest().encode()
    wrong = digest.upper()[:-1] + (b"1" if digest.endswith(b"0") else b"0")
    assert (await client.command(b"APOP demo " + wrong)).startswith(b"-ERR")
    assert (await client.command(b"APOP demo")).startswith(b"-ERR")
    assert (await client.command(b"APOP demo " + digest)).startswith(b"+OK maildrop has 5")


async def test_exclusive_lock(nursery: trio.Nursery, store: MailStore) -> None:
    port = await start(nursery, DemoUpstream(store, lock_maildrops=True))
    first = await Raw.connect(port)
    await first.login()
    second = await Raw.connect(port)
    assert (await second.line()).startswith(b"+OK")
    assert (await second.command(b"USER demo")).startswith(b"+OK")
    assert await second.command(b"PASS demo") == b"-ERR [IN-USE] maildrop already locked"
    assert (await first.command(b"QUIT")).startswith(b"+OK")
    assert (await second.command(b"USER demo")).startswith(b"+OK")
    assert (await second.command(b"PASS demo")).startswith(b"+OK")


async def test_bad_clients_do_not_take_the_server_down(
    nursery: trio.Nursery, store: MailStore
) -> None:
    port = await start(nursery, DemoUpstream(store))
    # Hang up at once; hang up half way through a line; hang up mid-AUTH;
    # reset the connection with unread replies pending.
    client = await Raw.connect(port)
    await client.aclose()
    client = await Raw.connect(port)
    await client.send(b"\xff\xfe" * 50_000)
    await client.aclose()
    client = await Raw.connect(port)
    await client.send(b"AUTH PLAIN\r\n")
    await client.aclose()
    client = await Raw.connect(port)
    await client.send(b"USER demo\r\nPASS demo\r\n" + b"RETR 3\r\n" * 20)
    await trio.sleep(0.05)
    await trio.aclose_forcefully(client.stream)

    def still_serving() -> int:
        pop = pop_login(port)
        try:
            return pop.stat()[0]
        finally:
            pop.quit()

    assert await in_thread(still_serving) == 5


async def test_handle_on_memory_streams(store: MailStore) -> None:
    server = DemoUpstream(store)
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle, server_stream)
        client = Raw(client_stream)
        await client.login(b"alice", b"alicepw")
        assert await client.command(b"DELE 1") == b"+OK message 1 deleted"
        assert (await client.command(b"QUIT")).startswith(b"+OK")
        assert await client.read_to_eof() == b""
    assert len(store.messages("alice")) == 1
    assert server.received_commands == [
        b"USER alice",
        b"PASS alicepw",
        b"DELE 1",
        b"QUIT",
    ]


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=2000))
def test_retr_round_trips_any_message(data: bytes) -> None:
    store = MailStore()
    store.add_user("u", "p")
    stored = store.add_message("u", data)

    async def exchange() -> list[bytes]:
        client_stream, server_stream = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(DemoUpstream(store).handle, server_stream)
            client = Raw(client_stream)
            await client.login(b"u", b"p")
            assert await client.command(b"RETR 1") == b"+OK %d octets" % stored.size
            lines = await client.multiline()
            await client.command(b"QUIT")
            return lines

    lines = trio.run(exchange)
    assert b"".join(line + b"\r\n" for line in lines) == stored.data


# --------------------------------------------------------------------------
# Fault injection: one test per hook
# --------------------------------------------------------------------------


async def test_fault_drop_mid_reply(nursery: trio.Nursery, store: MailStore) -> None:
    server = DemoUpstream(store, Faults(drop_mid_reply_on="retr"))
    port = await start(nursery, server)
    full = store.messages("demo")[2]
    client = await Raw.connect(port)
    await client.login()
    assert await client.command(b"DELE 1") == b"+OK message 1 deleted"
    await client.send(b"RETR 3\r\n")
    partial = await client.read_to_eof()  # the server hangs up
    assert partial.startswith(b"+OK %d octets\r\n" % len(full))
    assert 100 < len(partial) < len(full)
    assert not partial.endswith(b"\r\n.\r\n")
    # Nothing was committed.
    assert len(store.messages("demo")) == 5

    def retr_with_poplib() -> None:
        pop = pop_login(port)
        pop.retr(3)

    with pytest.raises((poplib.error_proto, EOFError, OSError)):
        await in_thread(retr_with_poplib)


async def test_fault_stall(nursery: trio.Nursery, store: MailStore) -> None:
    server = DemoUpstream(store, Faults(stall_on="STAT"))
    port = await start(nursery, server)
    client = await Raw.connect(port)
    await client.login()
    await client.send(b"STAT\r\n")
    with trio.move_on_after(0.3) as waited:
        await client.stream.receive_some(1)  # b"" here would mean closed
    assert waited.cancelled_caught
    await client.send(b"NOOP\r\n")
    with trio.move_on_after(0.3) as waited:
        await client.stream.receive_some(1)
    assert waited.cancelled_caught
    assert server.received_commands[-2:] == [b"STAT", b"NOOP"]
    await client.aclose()

    # The stalled session noticed the hang-up; the server still serves.
    other = await Raw.connect(port)
    await other.login()
    assert await other.command(b"NOOP") == b"+OK"


async def test_fault_garbage(nursery: trio.Nursery, store: MailStore) -> None:
    port = await start(nursery, DemoUpstream(store, Faults(garbage_on="STAT")))
    client = await Raw.connect(port)
    await client.login()
    assert await client.command(b"STAT") == b"HELLO garbage"
    assert await client.command(b"NOOP") == b"+OK"
    assert (await client.command(b"LIST 1")).startswith(b"+OK 1 ")


async def test_fault_garbage_on_pass_does_not_log_in(
    nursery: trio.Nursery, store: MailStore
) -> None:
    port = await start(nursery, DemoUpstream(store, Faults(garbage_on="PASS")))
    client = await Raw.connect(port)
    assert (await client.line()).startswith(b"+OK")
    assert (await client.command(b"USER demo")).startswith(b"+OK")
    assert await client.command(b"PASS demo") == b"HELLO garbage"
    assert (await client.command(b"STAT")).startswith(b"-ERR")


async def test_fault_unsolicited_after_login(nursery: trio.Nursery, store: MailStore) -> None:
    faults = Faults(unsolicited_after_login=b"+OK you did not ask for this\r\n")
    port = await start(nursery, DemoUpstream(store, faults))
    client = await Raw.connect(port)
    assert (await client.line()).startswith(b"+OK")
    assert (await client.command(b"CAPA")).startswith(b"+OK")
    await client.multiline()  # nothing unsolicited before login
    await client.send(b"USER demo\r\nPASS demo\r\n")
    assert await client.line() == b"+OK send PASS"
    assert (await client.line()).startswith(b"+OK maildrop has 5 messages")
    assert await client.line() == b"+OK you did not ask for this"
    assert await client.command(b"NOOP") == b"+OK"


async def test_fault_slow_reads(nursery: trio.Nursery, store: MailStore) -> None:
    port = await start(nursery, DemoUpstream(store, Faults(slow_reads=0.1)))
    client = await Raw.connect(port)
    assert (await client.line()).startswith(b"+OK")
    started = trio.current_time()
    for _ in range(3):
        assert (await client.command(b"CAPA")).startswith(b"+OK")
        await client.multiline()
    assert trio.current_time() - started >= 0.3


class RecordingStream(trio.abc.Stream):
    """Wraps a stream and records the size of every send_all."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.sends: list[int] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.sends.append(len(data))
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return bytes(await self.inner.receive_some(max_bytes))

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_fault_send_chunk(nursery: trio.Nursery, store: MailStore) -> None:
    # Every write is split: observe the writes themselves on a memory stream.
    client_stream, server_stream = trio.testing.memory_stream_pair()
    recorder = RecordingStream(server_stream)
    server = DemoUpstream(store, Faults(send_chunk=7))
    nursery.start_soon(server.handle, recorder)
    client = Raw(client_stream)
    await client.login()
    assert await client.command(b"RETR 2") == b"+OK %d octets" % len(store.messages("demo")[1])
    lines = await client.multiline()
    assert b"".join(line + b"\r\n" for line in lines) == store.messages("demo")[1]
    assert max(recorder.sends) == 7
    assert len(recorder.sends) > len(store.messages("demo")[1]) // 7

    # And a real client reassembles a large message written in small chunks.
    port = await start(nursery, DemoUpstream(store, Faults(send_chunk=1000)))

    def retr_large() -> bytes:
        pop = pop_login(port)
        _, lines, _ = pop.retr(3)
        pop.quit()
        return b"".join(line + b"\r\n" for line in lines)

    assert await in_thread(retr_large) == store.messages("demo")[2]


async def test_fault_greeting(nursery: trio.Nursery, store: MailStore) -> None:
    refusing = await start(nursery, DemoUpstream(store, Faults(greeting=b"-ERR go away\r\n")))
    client = await Raw.connect(refusing)
    assert await client.line() == b"-ERR go away"

    def connect() -> None:
        poplib.POP3("127.0.0.1", refusing, timeout=TIMEOUT)

    with pytest.raises(poplib.error_proto, match="go away"):
        await in_thread(connect)

    # An over-long greeting whose timestamp APOP still honours.
    long_greeting = b"+OK " + b"x" * 600 + b" <42.1@example>\r\n"
    port = await start(nursery, DemoUpstream(store, Faults(greeting=long_greeting)))
    client = await Raw.connect(port)
    assert await client.line() == long_greeting[:-2]
    digest = hashlib.md5(b"<42.1@example>demo").hexdigest().encode()
    assert (await client.command(b"APOP demo " + digest)).startswith(b"+OK")

    # Without a timestamp, APOP is refused.
    port = await start(nursery, DemoUpstream(store, Faults(greeting=b"+OK hi\r\n")))
    client = await Raw.connect(port)
    assert await client.line() == b"+OK hi"
    assert (await client.command(b"APOP demo " + digest)).startswith(b"-ERR")


async def test_fault_close_after_greeting(nursery: trio.Nursery, store: MailStore) -> None:
    server = DemoUpstream(store, Faults(close_after_greeting=True))
    port = await start(nursery, server)
    client = await Raw.connect(port)
    data = await client.read_to_eof()
    assert data.startswith(b"+OK popguard demo POP3 server ready <")
    assert data.endswith(b">\r\n")
    assert data.count(b"\r\n") == 1
    assert server.received_commands == []


async def test_fault_refuse_quit_update(nursery: trio.Nursery, store: MailStore) -> None:
    port = await start(nursery, DemoUpstream(store, Faults(refuse_quit_update=True)))

    def delete_and_quit() -> None:
        pop = pop_login(port)
        pop.dele(1)
        pop.quit()

    with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\] some deleted messages not removed"):
        await in_thread(delete_and_quit)
    assert len(store.messages("demo")) == 5

    client = await Raw.connect(port)
    await client.login()
    assert (await client.command(b"STAT")).startswith(b"+OK 5 ")
    assert await client.command(b"QUIT") == b"-ERR [SYS/TEMP] some deleted messages not removed"
    assert await client.read_to_eof() == b""


async def test_received_commands(nursery: trio.Nursery, store: MailStore) -> None:
    server = DemoUpstream(store)
    port = await start(nursery, server)

    def session() -> None:
        pop = pop_login(port)
        pop.stat()
        pop.close()  # hang up without QUIT

    await in_thread(session)
    assert server.received_commands == [b"USER demo", b"PASS demo", b"STAT"]
    assert b"QUIT" not in server.received_commands


async def test_login_names_fold_to_lower_case_as_dovecot_does(
    nursery: trio.Nursery, store: MailStore
) -> None:
    """popguard's default identity rules expect the demo's accounts to fold."""
    port = await start(nursery, DemoUpstream(store))
    client = await Raw.connect(port)
    await client.line()
    assert (await client.command(b"USER DeMo")).startswith(b"+OK")
    assert (await client.command(b"PASS demo")).startswith(b"+OK maildrop has 5")
