"""Fixtures for integration tests against a real, private Dovecot on loopback.

* ``dovecot`` (session): one :class:`DovecotInstance` for the whole run.
  Without a usable Dovecot the tests are skipped, except in CI (``CI=true``
  or ``CI=1``), where they fail: CI must never go green by skipping.
* ``mailbox`` (function): a factory making a fresh, unique user per call,
  ``mailbox(messages) -> Mailbox(user, password, maildir)``.
* ``make_messages``: the :func:`sample_messages` generator.
* ``require_tool``: ``require_tool("curl")`` gives the command's path, or
  skips (fails in CI) when it is missing.

Tests that use ``dovecot`` (directly or through ``mailbox``) get the
``dovecot`` marker, so ``-m "not dovecot"`` deselects them.
"""

from __future__ import annotations

import base64
import itertools
import os
import random
import secrets
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import pytest

from popguard.testing import dovecot as dovecot_tool
from popguard.testing.dovecot import DovecotInstance

_HERE = Path(__file__).parent
_user_counter = itertools.count(1)


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in item.path.parents and "dovecot" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.dovecot)


@pytest.fixture(scope="session")
def dovecot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DovecotInstance]:
    reason = dovecot_tool.available()
    if reason is not None:
        if in_ci():
            pytest.fail(f"Dovecot is required in CI but unusable: {reason}", pytrace=False)
        pytest.skip(f"Dovecot is not available: {reason}")
    instance = DovecotInstance(tmp_path_factory.mktemp("dovecot"))
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()


class Mailbox(NamedTuple):
    user: str
    password: str
    maildir: Path


class MailboxFactory:
    """``factory(messages)`` creates a new user on the shared Dovecot.

    Every call makes a new user (``u<n>-<random>``) with a new password and
    Maildir, so tests never share mail.  ``messages=None`` stores
    ``sample_messages()``.
    """

    def __init__(self, dovecot: DovecotInstance) -> None:
        self.dovecot = dovecot
        self.created: list[Mailbox] = []

    def __call__(
        self, messages: Sequence[bytes] | None = None, *, password: str | None = None
    ) -> Mailbox:
        user = f"u{next(_user_counter)}-{secrets.token_hex(3)}"
        password = password or secrets.token_urlsafe(12)
        if messages is None:
            messages = sample_messages()
        maildir = self.dovecot.add_user(user, password, messages)
        box = Mailbox(user, password, maildir)
        self.created.append(box)
        return box

    def messages(self, user: str) -> list[bytes]:
        """What is in ``user``'s Maildir now (LF line endings, file-name order)."""
        return self.dovecot.maildir_messages(user)


@pytest.fixture
def mailbox(dovecot: DovecotInstance) -> MailboxFactory:
    return MailboxFactory(dovecot)


def require_tool(name: str) -> str:
    """Path of the command ``name``; skip without it, but fail in CI."""
    path = shutil.which(name)
    if path is None:
        if in_ci():
            pytest.fail(f"{name} is required in CI but not installed", pytrace=False)
        pytest.skip(f"{name} is not installed")
    return path


@pytest.fixture(name="require_tool")
def require_tool_fixture() -> Callable[[str], str]:
    return require_tool


@pytest.fixture
def make_messages() -> Callable[..., list[bytes]]:
    return sample_messages


# -- sample mail ---------------------------------------------------------------

_WORDS = [
    "audit",
    "proxy",
    "mailbox",
    "session",
    "greeting",
    "capability",
    "retrieve",
    "delete",
    "quota",
    "transparent",
    "loopback",
    "message",
    "header",
    "body",
    "octet",
    "stream",
    "policy",
    "upstream",
]


def _headers(kind: str, index: int, seed: int, extra: Sequence[str] = ()) -> list[str]:
    day = 1 + (index % 28)
    return [
        "Return-Path: <sender@example.org>",
        "Received: from mx.example.org (mx.example.org [192.0.2.25])",
        f"\tby mail.example.net with ESMTPS id {seed:04x}{index:04x}; "
        f"Mon, {day:02d} Jan 2024 10:{index % 60:02d}:00 +0000",
        f'From: "Sender {index}" <sender@example.org>',
        "To: Recipient <rcpt@example.net>",
        f"Subject: [{kind}] sample message {index}",
        f"Date: Mon, {day:02d} Jan 2024 10:{index % 60:02d}:00 +0000",
        f"Message-ID: <{kind}.{seed}.{index}@popguard.test>",
        "MIME-Version: 1.0",
        *extra,
    ]


def _words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(count))


def _dots(index: int, seed: int, rng: random.Random) -> bytes:
    lines = [
        *_headers("dots", index, seed, ["Content-Type: text/plain; charset=us-ascii"]),
        "",
        "Lines starting with dots must be dot-stuffed on the wire:",
        ".",
        "..",
        "...",
        ". leading dot and space",
        ".hidden-looking line",
        _words(rng, 12),
        "",
        ".",
        "The line above is a lone dot, and so is the last line.",
        ".",
    ]
    return ("\r\n".join(lines) + "\r\n").encode()


def _long_line(index: int, seed: int, rng: random.Random) -> bytes:
    long = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(10_000))
    lines = [
        *_headers("long", index, seed, ["Content-Type: text/plain; charset=us-ascii"]),
        "",
        "The next line is 10,000 characters long (RFC 5322 says 998 at most):",
        long,
        "." + long[:500],
        "end",
    ]
    return ("\r\n".join(lines) + "\r\n").encode()


def _eight_bit(index: int, seed: int, rng: random.Random) -> bytes:
    head = _headers(
        "8bit",
        index,
        seed,
        ["Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: 8bit"],
    )
    body = [
        "Grüße aus Köln — «ça va?» 日本語のテキスト ✉".encode(),
        "latin-1: caf\xe9 na\xefve \xa9\xae\xb5".encode("latin-1"),
        # Every byte value except NUL, CR and LF, which mail must not carry raw.
        bytes(b for b in range(1, 256) if b not in (10, 13)),
        bytes(rng.randrange(0x80, 0x100) for _ in range(300)),
        b".\xff\xfe dot then high bytes",
        b"\ttab-indented line\twith\ttabs \x1b[0m\x7f",
    ]
    return "\r\n".join([*head, ""]).encode() + b"\r\n" + b"\r\n".join(body) + b"\r\n"


def _multipart(index: int, seed: int, rng: random.Random) -> bytes:
    boundary = f"=_popguard_{seed}_{index}"
    payload = rng.randbytes(6000)
    encoded = base64.encodebytes(payload).decode().replace("\n", "\r\n")
    lines = [
        *_headers("mime", index, seed, [f'Content-Type: multipart/mixed; boundary="{boundary}"']),
        "",
        "This is a multi-part message in MIME format.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        _words(rng, 40),
        ".signature-like line",
        "",
        f"--{boundary}",
        "Content-Type: application/octet-stream; name=blob.bin",
        "Content-Transfer-Encoding: base64",
        'Content-Disposition: attachment; filename="blob.bin"',
        "",
    ]
    tail = ["", f"--{boundary}--", ""]
    return ("\r\n".join(lines) + "\r\n" + encoded + "\r\n".join(tail)).encode()


def _plain(index: int, seed: int, rng: random.Random) -> bytes:
    lines = _headers("plain", index, seed, ["Content-Type: text/plain; charset=us-ascii"])
    lines += ["", *(_words(rng, rng.randrange(3, 15)) for _ in range(rng.randrange(5, 30)))]
    return ("\r\n".join(lines) + "\r\n").encode()


_KINDS: tuple[Callable[[int, int, random.Random], bytes], ...] = (
    _dots,
    _long_line,
    _eight_bit,
    _multipart,
    _plain,
)


def sample_messages(count: int = len(_KINDS), *, seed: int = 0) -> list[bytes]:
    """``count`` realistic messages (CRLF line endings), deterministic per ``seed``.

    They cycle through: lines starting with ``.`` (and lone ``.`` lines,
    including the last one), a 10,000-character line, 8-bit content (UTF-8,
    Latin-1 and every byte value except NUL/CR/LF), a MIME multipart with a
    base64 attachment, and plain text.
    """
    rng = random.Random(seed)
    return [_KINDS[i % len(_KINDS)](i + 1, seed, rng) for i in range(count)]
