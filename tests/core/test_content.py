"""MessageContent: exact dot-unstuffing and SHA-256 of relayed bodies, chunk by chunk.

Each tricky body is fed whole, one byte at a time, and split in two at every
point; the hypothesis properties feed stuffed messages in arbitrary chunks.
The references below work line by line, the way RFC 1939 §3 describes
stuffing, and share no code with the implementation.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Iterator

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from popguard.core.content import MessageContent

CRLF = b"\r\n"
TERMINATOR_LINE = b".\r\n"
#: How many bytes MessageContent may hold back at a chunk boundary (CR LF "." CR).
MAX_HELD = 4


def stuff(message: bytes) -> bytes:
    """The body a conforming server sends for ``message``: lines split at CRLF,
    a "." put in front of every line that starts with one, the last line ended
    with CRLF if it was not, then the terminator line."""
    lines = message.split(CRLF)
    last = lines.pop()  # the bytes after the last CRLF: b"" when it ends in one
    if last:
        lines.append(last)  # the server ends it with CRLF
    return b"".join((b"." + line if line.startswith(b".") else line) + CRLF for line in lines) + (
        TERMINATOR_LINE
    )


def as_pop3_message(message: bytes) -> bytes:
    """``message`` as POP3 delivers it: a last line without CRLF gets one."""
    return message if message == b"" or message.endswith(CRLF) else message + CRLF


def unstuff_reference(body: bytes) -> bytes:
    """RFC 1939 §3 read line by line: up to the first line that is exactly ".",
    each line's leading "." stripped.  ``body`` must hold a terminator."""
    lines = body.split(CRLF)
    out: list[bytes] = []
    for line in lines[:-1]:  # each of these was followed by CRLF
        if line == b".":
            return b"".join(out)
        out.append((line[1:] if line.startswith(b".") else line) + CRLF)
    raise AssertionError(f"no terminator in {body!r}")


def split_at(body: bytes, points: Iterable[int]) -> list[bytes]:
    cuts = [0, *sorted(set(points)), len(body)]
    return [body[a:b] for a, b in itertools.pairwise(cuts)]


def feed_all(chunks: Iterable[bytes]) -> tuple[bytes, MessageContent]:
    """Feed ``chunks`` (empty ones allowed) and check the invariants after every call."""
    content = MessageContent()
    out = bytearray()
    fed = 0
    dots = 0  # CRLF "." sequences in the virtual CRLF plus what was fed
    seen = CRLF  # the last two bytes of that stream
    for index, chunk in enumerate(chunks):
        assert not content.done or not chunk, f"chunk {index} comes after the terminator"
        out += content.feed(chunk)
        fed += len(chunk)
        dots += (seen + chunk).count(b"\r\n.")
        seen = (seen + chunk)[-2:]
        # Nothing is held back beyond a possible terminator prefix: only the
        # stripped dots and at most MAX_HELD bytes (counting the virtual CRLF
        # in front of the body) are missing from what was fed.
        if not content.done:
            assert len(out) >= fed - dots - MAX_HELD, (index, chunk, bytes(out[-20:]))
        assert content.size == len(out)
    assert content.done
    return bytes(out), content


def chunkings(body: bytes) -> Iterator[tuple[str, list[bytes]]]:
    """Whole, one byte at a time, and in two pieces at every split point."""
    yield "whole", [body]
    yield "bytewise", [body[i : i + 1] for i in range(len(body))]
    for point in range(1, len(body)):
        yield f"split at {point}", [body[:point], body[point:]]


def assert_unstuffs(body: bytes, message: bytes) -> None:
    expected_digest = hashlib.sha256(message).hexdigest()
    for how, chunks in chunkings(body):
        out, content = feed_all(chunks)
        assert out == message, how
        assert content.finish() == expected_digest, how
        assert content.size == len(message), how
        # Hashing only (no archive copy wanted): the same digest and size.
        digest_only = MessageContent()
        for chunk in chunks:
            assert digest_only.feed(chunk, keep=False) == b""
        assert digest_only.finish() == expected_digest, how
        assert digest_only.size == len(message), how


# -- the tricky bodies ---------------------------------------------------------

#: (name, body as on the wire, message): each message written out by hand.
TRICKY = [
    ("lone dot line", b"a\r\n..\r\nb\r\n.\r\n", b"a\r\n.\r\nb\r\n"),
    ("double dot line", b"a\r\n...\r\nb\r\n.\r\n", b"a\r\n..\r\nb\r\n"),
    ("dot line last", b"a\r\n..\r\n.\r\n", b"a\r\n.\r\n"),
    ("dots first", b"..\r\n...x\r\n.\r\n", b".\r\n..x\r\n"),
    ("dot lines only", b"..\r\n..\r\n..\r\n.\r\n", b".\r\n.\r\n.\r\n"),
    ("empty message", b".\r\n", b""),
    ("one empty line", b"\r\n.\r\n", b"\r\n"),
    ("empty lines", b"\r\n\r\n\r\n.\r\n", b"\r\n\r\n\r\n"),
    ("bare LF lines", b"a\n.\nb\n..\n\r\n.\r\n", b"a\n.\nb\n..\n\r\n"),
    ("bare CR lines", b"a\r.\rb\r..\r\r\n.\r\n", b"a\r.\rb\r..\r\r\n"),
    ("bare CR before CRLF", b"x\r\r\n..\r\r\n.\r\n", b"x\r\r\n.\r\r\n"),
    ("smuggled terminators", b"a\n.\nb\r\n.\nc\n.\r\nd\r\n.\r\n", b"a\n.\nb\r\n\nc\n.\r\nd\r\n"),
    ("CRLF dot CR, not the end", b"a\r\n..\rx\r\n.\r\n", b"a\r\n.\rx\r\n"),
    # A server that did not stuff (Dovecot's first line): the RFC strips the dot.
    ("unstuffed dot line", b".foo\r\n.\rx\r\n.\r\n", b"foo\r\n\rx\r\n"),
    ("NUL and 8-bit", b"\x00\xff\r\n..\x00\r\n.\r\n", b"\x00\xff\r\n.\x00\r\n"),
    # As Dovecot sends a stored "Subject: a\n\nno final newline" (CRLF added).
    (
        "no final newline as stored",
        b"Subject: a\r\n\r\nno final newline\r\n.\r\n",
        b"Subject: a\r\n\r\nno final newline\r\n",
    ),
    # ... and a stored file ending in a bare CR: Dovecot adds CRLF after it.
    ("stored file ends in CR", b"x\r\r\n.\r\n", b"x\r\r\n"),
]


@pytest.mark.parametrize(("body", "message"), [t[1:] for t in TRICKY], ids=[t[0] for t in TRICKY])
def test_tricky_bodies(body: bytes, message: bytes) -> None:
    assert unstuff_reference(body) == message  # the hand-written expectation is the RFC's
    assert_unstuffs(body, message)


def test_a_dot_at_every_chunk_boundary() -> None:
    message = b"".join(b".%d\r\n..\r\n.\r\n" % i for i in range(20)) + b"end\r\n"
    body = stuff(message)
    dots = [i for i, byte in enumerate(body) if byte == ord(".")]
    assert len(dots) > 60
    for points in (dots, [d + 1 for d in dots], [d - 1 for d in dots if d]):
        out, content = feed_all(split_at(body, points))
        assert out == message
        assert content.finish() == hashlib.sha256(message).hexdigest()


def test_terminator_split_everywhere_in_three_pieces() -> None:
    body = b"a\r\n..\r\n.\r\n"
    message = b"a\r\n.\r\n"
    for i in range(1, len(body)):
        for j in range(i + 1, len(body)):
            out, content = feed_all(split_at(body, [i, j]))
            assert out == message, (i, j)
            assert content.finish() == hashlib.sha256(message).hexdigest()


def test_long_lines() -> None:
    line = bytes(range(33, 127)) * 2000  # 188,000 octets, dots inside
    message = line + CRLF + b"." + line + CRLF + line[:70_000]
    body = stuff(message)
    expected = as_pop3_message(message)
    for size in (1, 2, 3, 4, 5, 4096, 65536, len(body)):
        out, content = feed_all(body[i : i + size] for i in range(0, len(body), size))
        assert out == expected, size
        assert content.finish() == hashlib.sha256(expected).hexdigest()


def test_bytes_are_returned_as_soon_as_known() -> None:
    content = MessageContent()
    assert content.feed(b"abc") == b"abc"
    assert content.feed(b"\r") == b""  # could start CRLF "."
    assert content.feed(b"\n") == b""
    assert content.feed(b".") == b""  # dot-line or terminator: not known yet
    assert content.feed(b".x") == b"\r\n.x"  # stuffed: one dot stripped
    assert content.feed(b"\r\n.\r") == b""
    assert content.feed(b"\n") == b"\r\n"
    assert content.done
    assert content.finish() == hashlib.sha256(b"abc\r\n.x\r\n").hexdigest()


def test_finish_before_the_terminator_is_an_error() -> None:
    content = MessageContent()
    content.feed(b"a\r\n.\r")
    assert not content.done
    with pytest.raises(ValueError, match="terminator"):
        content.finish()
    content.feed(b"\n")
    assert content.finish() == hashlib.sha256(b"a\r\n").hexdigest()


def test_bytes_after_the_terminator_are_refused() -> None:
    content = MessageContent()
    with pytest.raises(ValueError, match="after the terminator"):
        content.feed(b"a\r\n.\r\n+OK\r\n")
    assert not content.done  # nothing consumed: the same chunk minus the excess works
    assert content.feed(b"a\r\n.\r\n") == b"a\r\n"
    assert content.feed(b"") == b""
    with pytest.raises(ValueError, match="after the terminator"):
        content.feed(b"+OK\r\n")
    assert content.finish() == hashlib.sha256(b"a\r\n").hexdigest()


def test_the_terminator_is_found_when_a_dot_line_follows_it() -> None:
    # CRLF "." CRLF "." : the terminator's CRLF is also the start of the
    # next CRLF ".", so the two overlap; the body still ends at the first.
    content = MessageContent()
    data = b"a\r\n.b\r\n.\r\n.junk"
    end, message = content.take(data, keep=True)
    assert end == len(b"a\r\n.b\r\n.\r\n")
    assert message == b"a\r\nb\r\n"  # the stuffed ".b" unstuffed
    assert content.done


def test_a_plain_chunk_is_passed_on_without_a_copy() -> None:
    content = MessageContent()
    content.feed(b"x")  # past the body's start
    chunk = b"no dots here, " * 4000 + b"end"
    assert content.feed(chunk) is chunk


# -- properties ----------------------------------------------------------------

#: Fragments that make the tricky combinations likely in generated messages.
_FRAGMENTS = [b".", b"..", b"\r", b"\n", CRLF, b"\r\n.", b".\r\n", b"\r\n.\r\n", b"a", b"\x00"]

messages = st.one_of(
    st.binary(max_size=300),
    st.lists(st.sampled_from(_FRAGMENTS), max_size=60).map(b"".join),
    st.lists(st.sampled_from([b"", b".", b"..", b"x", b".x", b"\r", b"\n"]), max_size=30).map(
        lambda lines: b"".join(line + CRLF for line in lines)
    ),
)


@given(message=messages, data=st.data())
@example(message=b"", data=None)
@example(message=b".", data=None)
@example(message=b"\r", data=None)
@example(message=b"\r\n.\r", data=None)
def test_any_message_comes_back_exactly(message: bytes, data: st.DataObject | None) -> None:
    body = stuff(message)
    points = [] if data is None else data.draw(st.lists(st.integers(0, len(body)), max_size=12))
    expected = as_pop3_message(message)
    out, content = feed_all(split_at(body, points))
    assert out == expected
    assert content.finish() == hashlib.sha256(expected).hexdigest()
    assert content.size == len(expected)


@given(raw=st.lists(st.sampled_from(_FRAGMENTS), max_size=60).map(b"".join), data=st.data())
@example(raw=b".foo\r\n.\rx", data=None)
def test_any_body_unstuffs_as_the_rfc_reads_it(raw: bytes, data: st.DataObject | None) -> None:
    """Bodies from servers that stuff wrongly or not at all: still the RFC's reading,
    up to the first terminator."""
    body = CRLF.join([raw, b".", b""])  # a terminator at the end (maybe another before it)
    end = (CRLF + body).find(b"\r\n.\r\n") + len(b"\r\n.\r\n") - len(CRLF)
    body = body[:end]
    points = [] if data is None else data.draw(st.lists(st.integers(0, len(body)), max_size=12))
    out, content = feed_all(split_at(body, points))
    assert out == unstuff_reference(body)
    assert content.finish() == hashlib.sha256(out).hexdigest()
