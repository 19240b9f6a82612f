"""MessageContent against real Dovecot: RETR bodies unstuffed byte for byte.

Tricky Maildir files are stored verbatim (LF or CRLF line ends, bare CR, no
final newline, empty, lines of dots, dots at Dovecot's 4096-byte read
boundaries), fetched over a raw socket, and the bodies fed to
:class:`MessageContent` whole, one byte at a time, and in the chunks the
socket delivered.  The result must be exactly the message as Dovecot's POP3
defines it for that file (``dovecot_message``; findings in the docstring of
``popguard/core/content.py``), and the same bodies fetched through popguard
must be the same bytes with the same digests.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import socket
from collections.abc import Callable, Iterable
from typing import Any

import trio

from popguard.core.content import MessageContent
from popguard.testing.dovecot import DovecotInstance, stored_form
from tests.core.test_content import stuff

TIMEOUT = 30
TERMINATOR = b"\r\n.\r\n"
#: Dovecot's fetch loop reads the file at most this many bytes at a time
#: (``fetch_callback``); a line start there is its own stuffing boundary.
DOVECOT_READ = 4096


def _dots_at_read_boundaries(eol: bytes) -> bytes:
    """Lines of 4096 octets that start with a dot, from file offset 4096 on.

    With CRLF line ends Dovecot sends each read unchanged until a dot: every
    dot-line then starts a read of its own, where Dovecot decides by the
    byte it sent last.  With LF line ends it stops at every LF instead.
    """
    header = b"Subject: dots at read boundaries" + eol
    header += b"X-Pad: " + b"p" * (DOVECOT_READ - len(header) - len(b"X-Pad: ") - len(eol)) + eol
    line = b"." + b"d" * (DOVECOT_READ - 1 - len(eol)) + eol
    return header + line * 5


#: (name, the Maildir file's exact bytes).  No file starts with "." (below).
STORED = [
    ("LF lines with dots", b"Subject: dots\n\n.\n..\n...\n.x\nend\n.\n"),
    ("CRLF lines with dots", b"Subject: crlf\r\n\r\n.\r\n..\r\nend\r\n"),
    ("mixed line ends", b"Subject: mixed\r\n\nx\r\n.y\n.z\r\n"),
    ("bare CR", b"Subject: cr\n\nbare\rcr\r.dot after cr\n\r\n.\rx\n\r.\r\n"),
    ("CR before CRLF", b"Subject: crcrlf\n\nx\r\r\n.\r\r\n"),
    ("smuggled terminators", b"Subject: smuggle\n\na\r\n.\r\nb\n.\nc\r.\r\nd\n.\r\n"),
    ("no final newline", b"Subject: a\n\nno final newline"),
    ("no final newline, a dot", b"Subject: a\n\n."),
    ("ends in a bare CR", b"Subject: a\n\nends in cr\r"),
    ("empty file", b""),
    ("NUL and 8-bit", b"Subject: bin\n\nnul\x00here\n.\xff\xfe\n"),
    ("dot lines only", b"Subject: many\n\n" + b".\n" * 3000),
    ("dots at read boundaries, CRLF", _dots_at_read_boundaries(b"\r\n")),
    ("dots at read boundaries, LF", _dots_at_read_boundaries(b"\n")),
]


def dovecot_message(stored: bytes) -> bytes:
    """The message Dovecot's POP3 delivers for a Maildir file: a CR put before
    every LF that has none, CRLF appended when the file does not end in LF."""
    message = re.sub(rb"(?<!\r)\n", b"\r\n", stored)
    return message if stored.endswith(b"\n") else message + b"\r\n"


class RawPop:
    """A blocking POP3 socket that keeps each reply body as the reads delivered it."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address, timeout=TIMEOUT)
        self.buf = b""
        self.line()  # greeting

    def _read(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError(f"connection closed; unread {self.buf[-200:]!r}")
        return data

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self.buf += self._read()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line + b"\r\n"

    def login(self, user: str, password: str) -> None:
        for command in (f"USER {user}", f"PASS {password}"):
            self.sock.sendall(command.encode() + b"\r\n")
            assert self.line().startswith(b"+OK")

    def retr(self, number: int) -> tuple[bytes, list[bytes]]:
        """RETR: the status line, and the body up to its first CRLF "." CRLF
        (the first ".\\r\\n" counts too, as popguard reads it), as chunks."""
        self.sock.sendall(b"RETR %d\r\n" % number)
        status = self.line()
        assert status.startswith(b"+OK"), status
        chunks = [self.buf] if self.buf else []
        self.buf = b""
        while (end := (b"\r\n" + b"".join(chunks)).find(TERMINATOR)) == -1:
            chunks.append(self._read())
        body_length = end + len(TERMINATOR) - 2
        body = b"".join(chunks)
        self.buf = body[body_length:]
        while sum(map(len, chunks)) > body_length:  # trim to the body
            excess = sum(map(len, chunks)) - body_length
            last = chunks.pop()
            if len(last) > excess:
                chunks.append(last[: len(last) - excess])
        return status, chunks

    def quit(self) -> bytes:
        self.sock.sendall(b"QUIT\r\n")
        reply = self.line()
        self.sock.close()
        return reply


def _user(dovecot: DovecotInstance, files: Iterable[bytes]) -> tuple[str, str]:
    user, password = f"content-{secrets.token_hex(4)}", secrets.token_urlsafe(12)
    dovecot.add_user(user, password, files, verbatim=True)
    return user, password


def _unstuff(chunks: Iterable[bytes]) -> tuple[bytes, str]:
    content = MessageContent()
    out = b"".join(content.feed(chunk) for chunk in chunks)
    assert content.done
    assert content.size == len(out)
    return out, content.finish()


def _fetch_all(
    address: tuple[str, int], user: str, password: str, count: int
) -> list[tuple[bytes, list[bytes]]]:
    pop = RawPop(address)
    pop.login(user, password)
    replies = [pop.retr(n) for n in range(1, count + 1)]
    assert pop.quit().startswith(b"+OK")
    return replies


def test_dovecot_bodies_unstuff_to_the_message_byte_for_byte(
    dovecot: DovecotInstance, make_messages: Callable[..., list[bytes]]
) -> None:
    files = [data for _name, data in STORED] + [stored_form(m) for m in make_messages()]
    names = [name for name, _data in STORED] + ["sample"] * (len(files) - len(STORED))
    user, password = _user(dovecot, files)
    replies = _fetch_all(dovecot.address, user, password, len(files))
    for name, stored, (status, chunks) in zip(names, files, replies, strict=True):
        body = b"".join(chunks)
        message = dovecot_message(stored)
        # Dovecot stuffs exactly as RFC 1939 says (no file here starts with ".").
        assert body == stuff(message), name
        digest = hashlib.sha256(message).hexdigest()
        for how, pieces in (
            ("as received", chunks),
            ("whole", [body]),
            ("bytewise", [body[i : i + 1] for i in range(len(body))]),
        ):
            assert _unstuff(pieces) == (message, digest), (name, how)
        # Dovecot's size leaves out the CRLF it appends to a file without a final LF.
        octets = int(status.split()[1])
        appended = 0 if stored.endswith(b"\n") else 2
        assert octets == len(message) - appended, (name, status)


def test_dovecot_does_not_stuff_a_dot_that_starts_the_file(dovecot: DovecotInstance) -> None:
    """Dovecot escapes a dot only after an LF it sent, and starts with none.

    ``.foo`` as the first line reaches an RFC reader as ``foo``; ``.`` alone
    as the first line ends the reply at once, and the rest of the message
    follows as stray bytes.
    """
    files = [b".foo\n..bar\n", b".\nrest\n"]
    user, password = _user(dovecot, files)
    pop = RawPop(dovecot.address)
    pop.login(user, password)
    _status, chunks = pop.retr(1)
    body = b"".join(chunks)
    assert body == b".foo\r\n...bar\r\n.\r\n"  # first line unstuffed, the second stuffed
    assert _unstuff(chunks) == (
        b"foo\r\n..bar\r\n",
        hashlib.sha256(b"foo\r\n..bar\r\n").hexdigest(),
    )
    _status, chunks = pop.retr(2)
    assert b"".join(chunks) == b".\r\n"
    assert _unstuff(chunks) == (b"", hashlib.sha256(b"").hexdigest())
    while not pop.buf.endswith(TERMINATOR):
        pop.buf += pop._read()
    assert pop.buf == b"rest\r\n.\r\n"  # what a client (or popguard) reads next
    pop.buf = b""
    assert pop.quit().startswith(b"+OK")


async def test_bodies_through_popguard_are_dovecots_with_the_same_digests(
    dovecot: DovecotInstance, popguard: Any
) -> None:
    files = [data for _name, data in STORED]
    user, password = _user(dovecot, files)
    proxy = await popguard(secrets=[password])
    direct = await trio.to_thread.run_sync(_fetch_all, dovecot.address, user, password, len(files))
    relayed = await trio.to_thread.run_sync(_fetch_all, proxy.address, user, password, len(files))
    for (name, stored), (_s1, from_dovecot), (_s2, through) in zip(
        STORED, direct, relayed, strict=True
    ):
        assert b"".join(through) == b"".join(from_dovecot), name
        message = dovecot_message(stored)
        digest = hashlib.sha256(message).hexdigest()
        assert _unstuff(through) == (message, digest), name
