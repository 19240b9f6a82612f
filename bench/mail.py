"""Realistic test mail: RFC 5322 headers, wrapped plain-text bodies, CRLF line ends.

Bodies are built from a fixed pool of prose lines (a few quoted, a few
starting with "." so that the server dot-stuffs them), drawn with a seeded
random generator, so a run is reproducible and building 50 MB is fast.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

_TEXT = (
    "the of and to in is that for it as was with be by on not he this are or his from at "
    "which but have an they you were her she there been one all we their has would when "
    "what will more if no out so said can who about up them some could him into its then "
    "two time may only over new like other these any people years first after now very "
    "meeting report invoice schedule budget review quarter project delivery customer "
    "account server mailbox archive attachment thanks regards please attached following "
    "update change request approval contract draft minutes agenda deadline team office"
)
_WORDS = _TEXT.split()

_SUBJECTS = (
    "Quarterly report",
    "Re: meeting minutes",
    "Invoice for November",
    "Fwd: project schedule",
    "Draft contract for review",
    "Re: Re: server maintenance window",
    "Agenda for Thursday",
    "Delivery update",
)

_NAMES = ("alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy")


def _line_pool(rng: random.Random, count: int = 3000) -> list[str]:
    pool = []
    for i in range(count):
        words = []
        width = 0
        target = rng.randint(30, 76)
        while width < target:
            word = rng.choice(_WORDS)
            words.append(word)
            width += len(word) + 1
        line = " ".join(words)
        line = line[0].upper() + line[1:]
        if i % 97 == 0:
            line = "." + line  # dot-stuffed on the wire
        elif i % 41 == 0:
            line = "> " + line
        elif i % 23 == 0:
            line = ""  # paragraph break
        pool.append(line)
    pool.append(".")  # a lone dot line: stuffed to ".." on the wire
    return pool


class MailFactory:
    """Makes messages of a given size (CRLF form, before dot-stuffing)."""

    def __init__(self, seed: int = 1939) -> None:
        self._rng = random.Random(seed)
        self._pool = [line.encode() + b"\r\n" for line in _line_pool(self._rng)]
        self._epoch = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)
        self._counter = 0

    def message(self, size: int, to: str = "user") -> bytes:
        rng = self._rng
        self._counter += 1
        n = self._counter
        sender = rng.choice(_NAMES)
        date = self._epoch + timedelta(minutes=7 * n)
        headers = (
            f"Return-Path: <{sender}@example.org>\r\n"
            f"Received: from mx{n % 5}.example.org (mx{n % 5}.example.org [192.0.2.{n % 250}])"
            f"\r\n\tby mail.example.net with ESMTPS id {n:08X}; {format_datetime(date)}\r\n"
            f"From: {sender.title()} <{sender}@example.org>\r\n"
            f"To: {to} <{to}@example.net>\r\n"
            f"Subject: {rng.choice(_SUBJECTS)} #{n}\r\n"
            f"Date: {format_datetime(date)}\r\n"
            f"Message-ID: <{n}.{rng.getrandbits(48):012x}@example.org>\r\n"
            "MIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n"
            "\r\n"
        ).encode()
        parts = [headers]
        total = len(headers)
        pool = self._pool
        while total < size:
            line = pool[rng.randrange(len(pool))]
            parts.append(line)
            total += len(line)
        body = b"".join(parts)
        if len(body) > size:
            # Cut to the exact size, ending the last (partial) line with CRLF.
            head = body[: size - 2]
            if head.endswith(b"\r"):
                head = head[:-1] + b" "
            body = head + b"\r\n"
        return body

    def messages(self, count: int, size: int, to: str = "user") -> list[bytes]:
        return [self.message(size, to) for _ in range(count)]
