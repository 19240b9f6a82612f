"""A small POP3 server on trio, for demos and tests only.

This is **not** a production mail server.  popguard ships it for two jobs:

* the embedded demo upstream behind ``make run`` (user ``demo`` / ``demo``,
  a handful of sample messages), so a newcomer can point a mail client at
  the proxy without installing Dovecot; and
* a fault-injection peer for popguard's own tests: a :class:`Faults`
  instance makes the server misbehave in specific, repeatable ways (drop a
  connection half way through a reply, stall, answer with garbage, push
  unsolicited bytes, dribble its output, refuse the UPDATE state, ...).

What it speaks:

* RFC 1939: USER, PASS, APOP, STAT, LIST, UIDL, RETR, TOP, DELE, RSET, NOOP,
  QUIT, with the AUTHORIZATION / TRANSACTION / UPDATE states.  Messages
  marked with DELE are removed only when QUIT is received in TRANSACTION
  state; a dropped connection removes nothing.  Removals persist in the
  :class:`MailStore`, so the next session sees them.
* RFC 2449: CAPA (TOP, UIDL, USER, SASL PLAIN, PIPELINING, RESP-CODES,
  IMPLEMENTATION, and STLS when asked to advertise it -- STLS itself is
  always refused, there is no TLS here), the 255-octet command line limit,
  and pipelining (commands are answered strictly in order).
* RFC 5034: AUTH PLAIN with or without an initial response; ``*`` cancels.
  A bare ``AUTH`` lists the mechanisms as a multi-line reply (a common
  de-facto extension).

Each session works on a snapshot of its maildrop taken at login, and UPDATE
removes messages by UIDL, so concurrent sessions cannot corrupt each other
even without the (optional, off by default) RFC 1939 exclusive lock.

Nothing is logged.  :attr:`DemoUpstream.received_commands` keeps every line
the server received -- including ``PASS`` lines and SASL responses, i.e.
credentials -- in memory only, for tests to inspect.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import hashlib
import hmac
import itertools
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import trio
import trio.lowlevel

__all__ = [
    "MAX_COMMAND_LINE",
    "DemoUpstream",
    "Faults",
    "MailStore",
    "Mailbox",
    "Message",
    "bound_port",
    "main",
    "sample_store",
]

CRLF = b"\r\n"

#: RFC 2449 §4: a command line is at most 255 octets including the CRLF.
MAX_COMMAND_LINE = 255

#: Longest SASL client response line accepted after a ``+`` continuation.
MAX_SASL_LINE = 8192

_RECEIVE_SIZE = 65536

#: Greeting counter, shared by every server in the process so that no two
#: greetings (and so no two APOP timestamps) are ever the same.
_greeting_counter = itertools.count(1)

_UID_OK = re.compile(rb"[\x21-\x7e]{1,70}\Z")
_ANY_EOL = re.compile(rb"\r\n|\r|\n")
_LINE_START_DOT = re.compile(rb"^\.", re.MULTILINE)
_TIMESTAMP = re.compile(rb"<[^<>]*>")


# --------------------------------------------------------------------------
# Mail storage
# --------------------------------------------------------------------------


def _normalise(data: bytes) -> bytes:
    """Return *data* with every line ending as CRLF, ending in CRLF."""
    data = _ANY_EOL.sub(CRLF, data)
    if data and not data.endswith(CRLF):
        data += CRLF
    return data


@dataclass(frozen=True)
class Message:
    """One stored message: its octets (CRLF line endings) and its UIDL."""

    data: bytes
    uid: str

    @property
    def size(self) -> int:
        """Size in octets as counted by STAT and LIST (before dot-stuffing)."""
        return len(self.data)


def account_name(login: str) -> str:
    """The account a login name opens: A-Z folded to a-z, as Dovecot's
    default ``auth_username_format = %Lu`` does (and popguard's default
    ``identity:`` expects)."""
    return login.translate(_ASCII_FOLD)


_ASCII_FOLD = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


@dataclass
class Mailbox:
    """One user's maildrop."""

    password: str
    messages: list[Message] = field(default_factory=list)


class MailStore:
    """Users, their passwords and their messages, shared by all sessions.

    Message bodies are normalised to CRLF line endings (with a final CRLF)
    when added, so what is stored is exactly what RETR sends, before
    dot-stuffing.
    """

    def __init__(self) -> None:
        self.mailboxes: dict[str, Mailbox] = {}
        self._uid_counter = itertools.count(1)

    def add_user(self, user: str, password: str) -> Mailbox:
        """Create *user* (or change an existing user's password)."""
        user = account_name(user)
        box = self.mailboxes.get(user)
        if box is None:
            box = self.mailboxes[user] = Mailbox(password)
        else:
            box.password = password
        return box

    def add_message(self, user: str, data: bytes, *, uid: str | None = None) -> Message:
        """Append a message to *user*'s maildrop and return it.

        Line endings are normalised to CRLF.  Without *uid* a stable unique
        one is made up (a counter plus a content hash).
        """
        box = self.mailboxes[user]
        data = _normalise(data)
        if uid is None:
            digest = hashlib.sha256(data).hexdigest()[:16]
            uid = f"{next(self._uid_counter):06d}.{digest}"
        if not _UID_OK.match(uid.encode("ascii", "replace")):
            raise ValueError(f"UIDL must be 1-70 octets in 0x21-0x7E: {uid!r}")
        if any(m.uid == uid for m in box.messages):
            raise ValueError(f"duplicate UIDL {uid!r} for {user!r}")
        message = Message(data, uid)
        box.messages.append(message)
        return message

    def messages(self, user: str) -> list[bytes]:
        """The octets of *user*'s current messages, in order."""
        return [m.data for m in self.mailboxes[user].messages]

    def uids(self, user: str) -> list[str]:
        """The UIDLs of *user*'s current messages, in order."""
        return [m.uid for m in self.mailboxes[user].messages]

    def load_maildir(
        self,
        path: str | os.PathLike[str],
        *,
        user: str = "demo",
        password: str = "demo",  # noqa: S107 - the demo account, on purpose
    ) -> int:
        """Append every message in Maildir *path* (``cur`` and ``new``) to *user*.

        The user is created with *password* if it does not exist yet.
        Messages are taken in file-name order (Maildir names start with the
        delivery time); ``tmp`` and dot-files are ignored.  The UIDL is the
        unique part of the file name (before ``:``) when that is a valid
        UIDL, otherwise a hash of it.  Returns the number of messages added.
        """
        root = Path(path)
        if user not in self.mailboxes:
            self.add_user(user, password)
        box = self.mailboxes[user]
        files: list[Path] = []
        for sub in ("cur", "new"):
            folder = root / sub
            if folder.is_dir():
                files.extend(
                    p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                )
        files.sort(key=lambda p: p.name)
        taken = {m.uid for m in box.messages}
        added = 0
        for file in files:
            unique = file.name.split(":", 1)[0]
            uid: str | None = unique
            if not _UID_OK.match(unique.encode("ascii", "replace")) or unique in taken:
                uid = hashlib.sha256(file.name.encode("utf-8", "surrogateescape")).hexdigest()
                if uid in taken:
                    uid = None
            message = self.add_message(user, file.read_bytes(), uid=uid)
            taken.add(message.uid)
            added += 1
        return added

    def _remove(self, user: str, uids: set[str]) -> None:
        """Commit an UPDATE: drop *user*'s messages whose UIDL is in *uids*."""
        box = self.mailboxes[user]
        box.messages = [m for m in box.messages if m.uid not in uids]


def _sample_large_message() -> bytes:
    """A ~300 KB message with a base64 attachment of deterministic bytes."""
    blob = b"".join(hashlib.sha256(str(i).encode()).digest() for i in range(7000))
    encoded = base64.encodebytes(blob).replace(b"\n", CRLF)
    head = (
        b"From: Reports Robot <reports@popguard.demo>\r\n"
        b"To: demo@popguard.demo\r\n"
        b"Subject: Quarterly report (large attachment)\r\n"
        b"Date: Tue, 02 Apr 2024 08:00:00 +0000\r\n"
        b"Message-ID: <large.3@popguard.demo>\r\n"
        b"MIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="=_popguard_demo_boundary"\r\n'
        b"\r\n"
        b"This is a multi-part message in MIME format.\r\n"
        b"\r\n"
        b"--=_popguard_demo_boundary\r\n"
        b"Content-Type: text/plain; charset=us-ascii\r\n"
        b"\r\n"
        b"Please find the quarterly report attached.\r\n"
        b"\r\n"
        b"--=_popguard_demo_boundary\r\n"
        b"Content-Type: application/octet-stream\r\n"
        b'Content-Disposition: attachment; filename="report.bin"\r\n'
        b"Content-Transfer-Encoding: base64\r\n"
        b"\r\n"
    )
    return head + encoded + b"\r\n--=_popguard_demo_boundary--\r\n"


def sample_store() -> MailStore:
    """A store for the demo: user ``demo``/``demo`` with five sample
    messages, and user ``alice``/``alicepw`` with two.

    ``demo``'s messages, in order: a plain welcome note; one whose body has
    lines starting with ``.`` (exercises dot-stuffing, including a line
    that is just ``.``); a ~300 KB MIME message; one with a single
    12,000-octet line (far beyond RFC 5322's 998, and beyond the 2048-octet
    line limit of Python's ``poplib``); and a short UTF-8 message.
    """
    store = MailStore()
    store.add_user("demo", "demo")
    store.add_message(
        "demo",
        b"From: popguard <postmaster@popguard.demo>\r\n"
        b"To: demo@popguard.demo\r\n"
        b"Subject: Welcome to the popguard demo\r\n"
        b"Date: Mon, 01 Apr 2024 09:00:00 +0000\r\n"
        b"Message-ID: <welcome.1@popguard.demo>\r\n"
        b"\r\n"
        b"Hello!\r\n"
        b"\r\n"
        b"This mailbox lives in the popguard demo upstream.  Everything you\r\n"
        b"fetch through the proxy is recorded in the audit log.\r\n"
        b"\r\n"
        b"Try deleting this message: it is gone for good only after QUIT.\r\n",
    )
    store.add_message(
        "demo",
        b"From: Bob <bob@example.org>\r\n"
        b"To: demo@popguard.demo\r\n"
        b"Subject: Lines that start with a dot\r\n"
        b"Date: Mon, 01 Apr 2024 10:30:00 +0000\r\n"
        b"Message-ID: <dots.2@popguard.demo>\r\n"
        b"\r\n"
        b"The next lines begin with dots and must be dot-stuffed on the wire:\r\n"
        b".\r\n"
        b"..\r\n"
        b".hidden-file\r\n"
        b"...and so on\r\n"
        b". a dot and a space\r\n"
        b"\r\n"
        b".\r\n",
    )
    store.add_message("demo", _sample_large_message())
    store.add_message(
        "demo",
        b"From: Logger <logs@example.net>\r\n"
        b"To: demo@popguard.demo\r\n"
        b"Subject: One very long line\r\n"
        b"Date: Wed, 03 Apr 2024 12:00:00 +0000\r\n"
        b"Message-ID: <longline.4@popguard.demo>\r\n"
        b"\r\n" + b"".join(b"field%05d=value;" % i for i in range(750)) + b"\r\n",
    )
    store.add_message(
        "demo",
        "From: Zoë <zoe@example.com>\r\n"
        "To: demo@popguard.demo\r\n"
        "Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n"
        "Date: Thu, 04 Apr 2024 18:45:00 +0200\r\n"
        "Message-ID: <utf8.5@popguard.demo>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
        "Grüße aus Zürich - see you soon.\r\n".encode(),
    )
    store.add_user("alice", "alicepw")
    store.add_message(
        "alice",
        b"From: Carol <carol@example.org>\r\n"
        b"To: alice@popguard.demo\r\n"
        b"Subject: Lunch?\r\n"
        b"Date: Fri, 05 Apr 2024 11:00:00 +0000\r\n"
        b"Message-ID: <lunch.1@example.org>\r\n"
        b"\r\n"
        b"Noon at the usual place?\r\n",
    )
    store.add_message(
        "alice",
        b"From: IT <it@example.org>\r\n"
        b"To: alice@popguard.demo\r\n"
        b"Subject: Password policy\r\n"
        b"Date: Fri, 05 Apr 2024 15:00:00 +0000\r\n"
        b"Message-ID: <policy.2@example.org>\r\n"
        b"\r\n"
        b"Never send your password by mail.\r\n",
    )
    return store


# --------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------


@dataclass
class Faults:
    """Ways to make the server misbehave.  Everything is off by default.

    Command verbs are matched case-insensitively against the verb of each
    received command line, in any state.  When several hooks name the same
    verb, ``stall_on`` wins over ``garbage_on``, which wins over
    ``drop_mid_reply_on``.
    """

    #: Execute this command (side effects included, as a server crashing
    #: while writing would), send only part of its reply -- never the
    #: complete reply nor, for a multi-line reply, its terminator -- then
    #: close the connection.  Nothing is committed unless the verb is QUIT.
    drop_mid_reply_on: str | None = None
    #: Never answer this command nor anything after it.  The connection
    #: stays open (further lines are still read and recorded) until the peer
    #: closes it.
    stall_on: str | None = None
    #: Answer this command with :attr:`garbage` instead of a POP3 reply,
    #: without executing it; the session then carries on.
    garbage_on: str | None = None
    #: The line sent for ``garbage_on``.
    garbage: bytes = b"HELLO garbage\r\n"
    #: Bytes sent unprompted straight after the +OK of a successful login
    #: (PASS, APOP or AUTH).
    unsolicited_after_login: bytes | None = None
    #: Sleep this many seconds before every receive.
    slow_reads: float | None = None
    #: Split every write into chunks of at most this many octets, yielding
    #: to the scheduler (``trio.sleep(0)``) between chunks.
    send_chunk: int | None = None
    #: Send exactly these bytes as the greeting (include the CRLF).  APOP
    #: then uses the first ``<...>`` in it as the timestamp, if any.
    greeting: bytes | None = None
    #: Close the connection right after sending the greeting.
    close_after_greeting: bool = False
    #: Answer QUIT in TRANSACTION state with
    #: ``-ERR [SYS/TEMP] some deleted messages not removed`` and remove
    #: nothing.
    refuse_quit_update: bool = False

    def __post_init__(self) -> None:
        if self.send_chunk is not None and self.send_chunk < 1:
            raise ValueError("send_chunk must be a positive number of octets")
        if self.slow_reads is not None and self.slow_reads < 0:
            raise ValueError("slow_reads must not be negative")


# --------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------


class _SessionEnded(Exception):
    """Raised inside a session to end it quietly (EOF, QUIT, injected drop)."""


@dataclass
class _Reply:
    data: bytes
    close: bool = False
    logged_in: bool = False


def _ok(text: str) -> bytes:
    return b"+OK " + text.encode() + CRLF if text else b"+OK" + CRLF


def _err(text: str) -> bytes:
    return b"-ERR " + text.encode() + CRLF


def _multiline(status: str, body: bytes) -> bytes:
    """A +OK multi-line reply: *body* (CRLF-terminated lines) dot-stuffed."""
    return _ok(status) + _LINE_START_DOT.sub(b"..", body) + b"." + CRLF


def _top(data: bytes, lines: int) -> bytes:
    """The header, the blank separator line and *lines* body lines."""
    if not data:
        return b""
    parts = data[: -len(CRLF)].split(CRLF)
    try:
        blank = parts.index(b"")
    except ValueError:
        return data  # headers only
    return CRLF.join(parts[: blank + 1 + lines]) + CRLF


class DemoUpstream:
    """A POP3 server over a :class:`MailStore`, with optional :class:`Faults`.

    Serve one session on any trio stream with :meth:`handle`, or listen on
    TCP with :meth:`serve`.  All sessions share :attr:`received_commands`.
    """

    def __init__(
        self,
        store: MailStore,
        faults: Faults | None = None,
        *,
        advertise_stls: bool = False,
        lock_maildrops: bool = False,
    ) -> None:
        self.store = store
        self.faults = faults if faults is not None else Faults()
        self.advertise_stls = advertise_stls
        #: When true, a second concurrent login to the same maildrop gets
        #: ``-ERR [IN-USE]`` (RFC 1939 exclusive lock).  Off by default so a
        #: quick reconnect after a dropped session is never refused.
        self.lock_maildrops = lock_maildrops
        #: Every line received, across all sessions, in arrival order, without
        #: its line ending; lines over the length limit are truncated to it.
        #: Holds credentials (PASS lines, SASL responses): in memory only.
        self.received_commands: list[bytes] = []
        self._locked: set[str] = set()

    async def handle(self, stream: trio.abc.Stream) -> None:
        """Serve one POP3 session on *stream*, then close it.

        Never raises for a broken or closed stream.
        """
        session = _Session(self, stream)
        try:
            await session.run()
        except (_SessionEnded, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            session.unlock()
            await trio.aclose_forcefully(stream)

    async def serve(
        self,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on TCP *host*:*port* and serve sessions until cancelled.

        Reports the listeners through ``task_status.started``; use
        :func:`bound_port` on them when *port* is 0.  Give a numeric address
        such as ``127.0.0.1``: a name that resolves to several addresses
        gets several listeners, each on its own port when *port* is 0.
        """
        listeners = await trio.open_tcp_listeners(port, host=host)
        task_status.started(listeners)
        await trio.serve_listeners(self.handle, listeners)


def bound_port(listeners: Sequence[trio.SocketListener]) -> int:
    """The TCP port the first of *listeners* is bound to."""
    return int(listeners[0].socket.getsockname()[1])


class _Session:
    """One POP3 session: the line reader, the state machine and the faults."""

    def __init__(self, server: DemoUpstream, stream: trio.abc.Stream) -> None:
        self.server = server
        self.store = server.store
        self.faults = server.faults
        self.stream = stream
        self.buffer = bytearray()
        self.state = "AUTHORIZATION"
        self.timestamp: bytes | None = None
        self.pending_user: str | None = None
        self.user: str | None = None
        self.messages: list[Message] = []
        self.deleted: set[int] = set()  # zero-based indexes into self.messages
        self.holds_lock = False

    def unlock(self) -> None:
        if self.holds_lock and self.user is not None:
            self.server._locked.discard(self.user)
        self.holds_lock = False

    # ---------------------------------------------------------------- I/O

    async def send(self, data: bytes) -> None:
        chunk = self.faults.send_chunk
        if chunk is None or len(data) <= chunk:
            await self.stream.send_all(data)
            return
        for start in range(0, len(data), chunk):
            if start:
                await trio.lowlevel.checkpoint()  # i.e. trio.sleep(0)
            await self.stream.send_all(data[start : start + chunk])

    async def receive_line(self, limit: int = MAX_COMMAND_LINE) -> tuple[bytes, bool]:
        """The next line without its ending, and whether it was over *limit*.

        *limit* counts the line ending.  An over-long line is discarded up to
        its end without buffering it; its first *limit* octets are returned.
        Raises :class:`_SessionEnded` at end of stream.
        """
        too_long = False
        prefix = b""
        while True:
            newline = self.buffer.find(b"\n")
            if newline >= 0:
                raw = bytes(self.buffer[: newline + 1])
                del self.buffer[: newline + 1]
                if too_long:
                    return prefix, True
                line = raw[:-2] if raw.endswith(CRLF) else raw[:-1]
                if len(raw) > limit:
                    return line[:limit], True
                return line, False
            if len(self.buffer) > limit:
                if not too_long:
                    prefix = bytes(self.buffer[:limit])
                    too_long = True
                self.buffer.clear()
            if self.faults.slow_reads is not None:
                await trio.sleep(self.faults.slow_reads)
            data = await self.stream.receive_some(_RECEIVE_SIZE)
            if not data:
                raise _SessionEnded
            self.buffer += data

    async def next_command(self) -> tuple[bytes, bool]:
        line, too_long = await self.receive_line()
        self.server.received_commands.append(line)
        return line, too_long

    # ------------------------------------------------------------ session

    async def run(self) -> None:
        faults = self.faults
        if faults.greeting is not None:
            greeting = faults.greeting
            found = _TIMESTAMP.search(greeting)
            self.timestamp = found.group(0) if found else None
        else:
            self.timestamp = f"<{os.getpid()}.{next(_greeting_counter)}@popguard.demo>".encode()
            greeting = b"+OK popguard demo POP3 server ready " + self.timestamp + CRLF
        await self.send(greeting)
        if faults.close_after_greeting:
            return
        while True:
            line, too_long = await self.next_command()
            if too_long:
                await self.send(_err(f"command line longer than {MAX_COMMAND_LINE} octets"))
                self.pending_user = None
                continue
            verb_bytes, _, rest = line.partition(b" ")
            verb = verb_bytes.decode("ascii", "replace").upper()
            if _matches(faults.stall_on, verb):
                await self.stall()
            if _matches(faults.garbage_on, verb):
                await self.send(faults.garbage)
                continue
            reply = await self.execute(verb, rest)
            if _matches(faults.drop_mid_reply_on, verb):
                await self.send(reply.data[: _cut_point(reply.data)])
                return
            await self.send(reply.data)
            if reply.logged_in and faults.unsolicited_after_login is not None:
                await self.send(faults.unsolicited_after_login)
            if reply.close:
                return

    async def stall(self) -> NoReturn:
        """Answer nothing ever again, but notice when the peer goes away."""
        while True:
            await self.next_command()

    async def execute(self, verb: str, rest: bytes) -> _Reply:
        pending_user, self.pending_user = self.pending_user, None
        args = rest.split()
        if verb == "CAPA":
            return self.capa(args)
        if verb == "QUIT":
            return self.quit(args)
        if verb == "STLS":
            if self.server.advertise_stls:
                return _Reply(_err("STLS is not implemented by the popguard demo server"))
            return _Reply(_err("unknown command"))
        if self.state == "AUTHORIZATION":
            if verb == "USER":
                return self.user_command(args)
            if verb == "PASS":
                return self.pass_command(pending_user, rest)
            if verb == "APOP":
                return self.apop(args)
            if verb == "AUTH":
                return await self.auth(args)
            if verb in _TRANSACTION_COMMANDS:
                return _Reply(_err(f"{verb} is not valid before login"))
            return _Reply(_err("unknown command"))
        # TRANSACTION
        if verb in ("USER", "PASS", "APOP", "AUTH"):
            return _Reply(_err("already logged in"))
        handler = _TRANSACTION_COMMANDS.get(verb)
        if handler is None:
            return _Reply(_err("unknown command"))
        return handler(self, args)

    # ------------------------------------------------- AUTHORIZATION state

    def capa(self, args: list[bytes]) -> _Reply:
        if args:
            return _Reply(_err("CAPA takes no arguments"))
        capabilities = [
            "TOP",
            "UIDL",
            "USER",
            "SASL PLAIN",
            "PIPELINING",
            "RESP-CODES",
            "IMPLEMENTATION popguard-demo",
        ]
        if self.server.advertise_stls:
            capabilities.append("STLS")
        body = "".join(c + "\r\n" for c in capabilities).encode()
        return _Reply(_multiline("Capability list follows", body))

    def user_command(self, args: list[bytes]) -> _Reply:
        if len(args) != 1:
            return _Reply(_err("usage: USER name"))
        self.pending_user = account_name(args[0].decode("utf-8", "replace"))
        return _Reply(_ok("send PASS"))

    def pass_command(self, user: str | None, rest: bytes) -> _Reply:
        if user is None:
            return _Reply(_err("USER first"))
        # RFC 1939 §7: PASS has one argument, so spaces belong to it.
        box = self.store.mailboxes.get(user)
        if box is None or not rest or not hmac.compare_digest(rest, box.password.encode()):
            return _Reply(_err("invalid user name or password"))
        return self.login(user)

    def apop(self, args: list[bytes]) -> _Reply:
        if len(args) != 2:
            return _Reply(_err("usage: APOP name digest"))
        if self.timestamp is None:
            return _Reply(_err("APOP not available: no timestamp in the greeting"))
        user = account_name(args[0].decode("utf-8", "replace"))
        box = self.store.mailboxes.get(user)
        if box is None:
            return _Reply(_err("invalid user name or digest"))
        expected = hashlib.md5(self.timestamp + box.password.encode()).hexdigest().encode()
        if not hmac.compare_digest(args[1].lower(), expected):
            return _Reply(_err("invalid user name or digest"))
        return self.login(user)

    async def auth(self, args: list[bytes]) -> _Reply:
        if not args:
            return _Reply(_multiline("SASL mechanisms follow", b"PLAIN\r\n"))
        if len(args) > 2:
            return _Reply(_err("usage: AUTH mechanism [initial-response]"))
        if args[0].upper() != b"PLAIN":
            return _Reply(_err("unsupported SASL mechanism"))
        if len(args) == 2:
            response = b"" if args[1] == b"=" else args[1]
        else:
            await self.send(b"+ " + CRLF)
            response, too_long = await self.receive_line(MAX_SASL_LINE)
            self.server.received_commands.append(response)
            if too_long:
                return _Reply(_err("SASL response too long"))
            if response == b"*":
                return _Reply(_err("authentication cancelled"))
        try:
            decoded = base64.b64decode(response, validate=True)
        except (binascii.Error, ValueError):
            return _Reply(_err("invalid base64 in SASL response"))
        parts = decoded.split(b"\0")
        if len(parts) != 3:
            return _Reply(_err("malformed PLAIN response"))
        authzid, authcid, password = parts
        try:
            user = account_name(authcid.decode("utf-8"))
        except UnicodeDecodeError:
            return _Reply(_err("authentication failed"))
        box = self.store.mailboxes.get(user)
        if (
            box is None
            or authzid not in (b"", authcid)
            or not hmac.compare_digest(password, box.password.encode())
        ):
            return _Reply(_err("authentication failed"))
        return self.login(user)

    def login(self, user: str) -> _Reply:
        if self.server.lock_maildrops:
            if user in self.server._locked:
                return _Reply(_err("[IN-USE] maildrop already locked"))
            self.server._locked.add(user)
            self.holds_lock = True
        self.user = user
        self.state = "TRANSACTION"
        self.messages = list(self.store.mailboxes[user].messages)
        self.deleted = set()
        count, size = self.totals()
        return _Reply(_ok(f"maildrop has {count} messages ({size} octets)"), logged_in=True)

    def quit(self, args: list[bytes]) -> _Reply:
        if args:
            return _Reply(_err("QUIT takes no arguments"))
        if self.state == "AUTHORIZATION":
            return _Reply(_ok("popguard demo POP3 server signing off"), close=True)
        assert self.user is not None
        if self.faults.refuse_quit_update:
            self.unlock()
            return _Reply(_err("[SYS/TEMP] some deleted messages not removed"), close=True)
        # UPDATE state; commit before replying, so a client that reconnects
        # the moment it sees +OK finds the messages gone.
        self.state = "UPDATE"
        uids = {self.messages[i].uid for i in self.deleted}
        self.store._remove(self.user, uids)
        self.unlock()
        remaining = len(self.store.mailboxes[self.user].messages)
        return _Reply(
            _ok(f"popguard demo POP3 server signing off ({remaining} messages left)"),
            close=True,
        )

    # --------------------------------------------------- TRANSACTION state

    def totals(self) -> tuple[int, int]:
        live = [m for i, m in enumerate(self.messages) if i not in self.deleted]
        return len(live), sum(m.size for m in live)

    def message_index(self, arg: bytes) -> int | str:
        """The zero-based index for message-number *arg*, or an error text."""
        if not arg.isdigit() or len(arg) > 10:
            return "invalid message number"
        index = int(arg) - 1
        if not 0 <= index < len(self.messages):
            return "no such message"
        if index in self.deleted:
            return f"message {index + 1} already deleted"
        return index

    def stat(self, args: list[bytes]) -> _Reply:
        if args:
            return _Reply(_err("STAT takes no arguments"))
        count, size = self.totals()
        return _Reply(_ok(f"{count} {size}"))

    def list_(self, args: list[bytes]) -> _Reply:
        return self.scan_listing(args, "LIST", lambda m: str(m.size))

    def uidl(self, args: list[bytes]) -> _Reply:
        return self.scan_listing(args, "UIDL", lambda m: m.uid)

    def scan_listing(
        self, args: list[bytes], verb: str, describe: Callable[[Message], str]
    ) -> _Reply:
        if len(args) > 1:
            return _Reply(_err(f"usage: {verb} [message-number]"))
        if args:
            index = self.message_index(args[0])
            if isinstance(index, str):
                return _Reply(_err(index))
            return _Reply(_ok(f"{index + 1} {describe(self.messages[index])}"))
        lines = "".join(
            f"{i + 1} {describe(m)}\r\n"
            for i, m in enumerate(self.messages)
            if i not in self.deleted
        )
        count, size = self.totals()
        return _Reply(_multiline(f"{count} messages ({size} octets)", lines.encode()))

    def retr(self, args: list[bytes]) -> _Reply:
        if len(args) != 1:
            return _Reply(_err("usage: RETR message-number"))
        index = self.message_index(args[0])
        if isinstance(index, str):
            return _Reply(_err(index))
        message = self.messages[index]
        return _Reply(_multiline(f"{message.size} octets", message.data))

    def top(self, args: list[bytes]) -> _Reply:
        if len(args) != 2:
            return _Reply(_err("usage: TOP message-number lines"))
        index = self.message_index(args[0])
        if isinstance(index, str):
            return _Reply(_err(index))
        if not args[1].isdigit() or len(args[1]) > 10:
            return _Reply(_err("invalid number of lines"))
        body = _top(self.messages[index].data, int(args[1]))
        return _Reply(_multiline("top of message follows", body))

    def dele(self, args: list[bytes]) -> _Reply:
        if len(args) != 1:
            return _Reply(_err("usage: DELE message-number"))
        index = self.message_index(args[0])
        if isinstance(index, str):
            return _Reply(_err(index))
        self.deleted.add(index)
        return _Reply(_ok(f"message {index + 1} deleted"))

    def rset(self, args: list[bytes]) -> _Reply:
        if args:
            return _Reply(_err("RSET takes no arguments"))
        self.deleted.clear()
        count, size = self.totals()
        return _Reply(_ok(f"maildrop has {count} messages ({size} octets)"))

    def noop(self, args: list[bytes]) -> _Reply:
        if args:
            return _Reply(_err("NOOP takes no arguments"))
        return _Reply(_ok(""))


def _matches(fault_verb: str | None, verb: str) -> bool:
    return fault_verb is not None and fault_verb.upper() == verb


def _cut_point(reply: bytes) -> int:
    """Where to cut *reply* for ``drop_mid_reply_on``: past the status line
    when there is more, about half way, never at the very end."""
    first_line = reply.find(b"\n") + 1
    cut = max(first_line, len(reply) // 2)
    if cut >= len(reply):
        cut = len(reply) - 1
    return max(cut, 1)


_TRANSACTION_COMMANDS: dict[str, Callable[[_Session, list[bytes]], _Reply]] = {
    "STAT": _Session.stat,
    "LIST": _Session.list_,
    "UIDL": _Session.uidl,
    "RETR": _Session.retr,
    "TOP": _Session.top,
    "DELE": _Session.dele,
    "RSET": _Session.rset,
    "NOOP": _Session.noop,
}


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    """Run the demo upstream on its own: ``python -m popguard.testing.demo_upstream``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1110)
    parser.add_argument("--maildir", help="also load this Maildir into user demo")
    parser.add_argument("--advertise-stls", action="store_true")
    options = parser.parse_args(argv)
    store = sample_store()
    if options.maildir:
        store.load_maildir(options.maildir)
    server = DemoUpstream(store, advertise_stls=options.advertise_stls)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(server.serve, options.host, options.port)
            print(f"popguard demo POP3 server on {options.host}:{bound_port(listeners)}")

    with contextlib.suppress(KeyboardInterrupt):
        trio.run(run)


if __name__ == "__main__":
    main()
