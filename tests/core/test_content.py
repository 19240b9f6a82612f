"""MessageContent: exact dot-unstuffing and SHA-256 of relayed bodies, chunk by chunk.

Each tricky body is fed whole, one byte at a time, and split in two at every
point; the hypothesis properties feed stuffed messages in arbitrary chunks.
The references below work line by line, the way RFC 1939 §3 describes
stuffing, and share no code with the implementation.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Iterable, Iterator

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from popguard.core import content as content_module
from popguard.core.content import MessageContent, find_terminator

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


# -- the dot-line search: a memchr walk where dots are sparse, the regex where dense

#: Prose lines: a "." ends every one, none starts one.
_DENSE_LINE = b"The report is attached. Please review it by Friday.\r\n"
#: A line without a ".".
_PLAIN_LINE = b"lorem ipsum dolor sit amet consectetur adipiscing elit sed do\r\n"


def replace_reference(body: bytes) -> bytes:
    """The message in ``body``, by C-speed substitution rather than line by line:
    up to the first CRLF "." CRLF (reading the body as if a CRLF came before
    it), every CRLF "." becomes CRLF."""
    stream = CRLF + body
    end = stream.find(b"\r\n.\r\n")
    assert end != -1, "no terminator"
    return stream[: end + len(CRLF)].replace(b"\r\n.", CRLF)[len(CRLF) :]


class _RegexSpy:
    """The module's dot-line pattern, recording each window the regex searched."""

    def __init__(self, pattern: re.Pattern[bytes]) -> None:
        self.pattern = pattern
        self.windows: list[tuple[int, int]] = []

    def finditer(self, buf: bytes, pos: int, endpos: int) -> Iterator[re.Match[bytes]]:
        self.windows.append((pos, endpos))
        return self.pattern.finditer(buf, pos, endpos)


@pytest.fixture
def regex_windows(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Where the regex searched during the test (``(pos, endpos)`` per window)."""
    spy = _RegexSpy(content_module._DOT_LINE)
    monkeypatch.setattr(content_module, "_DOT_LINE", spy)
    return spy.windows


def assert_chunked(
    body: bytes, sizes: Iterable[int] = (1000, 4096, 8191), splits: Iterable[int] = ()
) -> None:
    """``body`` whole, in chunks of each size, and in two at each split point:
    the same message, digest and size as the substitution reference."""
    message = replace_reference(body)
    digest = hashlib.sha256(message).hexdigest()
    chunkings = [[body]]
    chunkings += [[body[i : i + size] for i in range(0, len(body), size)] for size in sizes]
    chunkings += [[body[:point], body[point:]] for point in splits]
    for chunks in chunkings:
        out, content = feed_all(chunks)
        assert out == message, [len(chunk) for chunk in chunks]
        assert content.finish() == digest
        hashed = MessageContent()
        for chunk in chunks:
            hashed.feed(chunk, keep=False)
        assert (hashed.finish(), hashed.size) == (digest, len(message))


def test_sparse_dots_are_walked_without_the_regex(regex_windows: list[tuple[int, int]]) -> None:
    lines = [b"." + _PLAIN_LINE if i % 40 == 0 else _PLAIN_LINE for i in range(1000)]
    lines[500] = b".\r\n"  # a lone dot line, stuffed to ".."
    body = stuff(b"".join(lines))
    assert (CRLF + body).count(b"\r\n..") == 26  # stuffed lines
    assert_chunked(body)
    assert regex_windows == []


def test_dense_dots_are_left_to_the_regex(regex_windows: list[tuple[int, int]]) -> None:
    lines = [b"." + _DENSE_LINE if i % 7 == 0 else _DENSE_LINE for i in range(1000)]
    body = stuff(b"".join(lines))
    content = MessageContent()
    assert content.feed(body) == replace_reference(body)
    # The walk gave up at once and the regex took the body in few windows,
    # each larger than the one before.
    assert regex_windows[0][0] < len(_DENSE_LINE)
    sizes = [endpos - pos for pos, endpos in regex_windows]
    assert len(sizes) > 1
    assert sizes == sorted(set(sizes))
    assert_chunked(body)


def test_the_walk_resumes_after_a_dense_stretch(regex_windows: list[tuple[int, int]]) -> None:
    sparse = [b"." + _PLAIN_LINE if i % 30 == 0 else _PLAIN_LINE for i in range(300)]
    dense = [b"." + _DENSE_LINE if i % 5 == 0 else _DENSE_LINE for i in range(40)]
    message = b"".join(sparse + dense + sparse * 2)
    body = stuff(message)
    dense_at = len(stuff(b"".join(sparse))) - len(TERMINATOR_LINE)
    content = MessageContent()
    assert content.feed(body) == message
    assert content.finish() == hashlib.sha256(message).hexdigest()
    # One window, opened in the dense stretch; the sparse tail is walked again
    # (and its stuffed lines unstuffed: the message came back exactly).
    ((pos, endpos),) = regex_windows
    assert dense_at < pos < dense_at + len(_DENSE_LINE) * 40 < endpos < len(body)
    assert body.count(b"\r\n..", endpos) >= 10


@pytest.mark.parametrize("offset", range(-4, 5))
def test_a_dot_line_at_the_edge_of_a_regex_window(
    regex_windows: list[tuple[int, int]], offset: int
) -> None:
    """The regex and the walk split the dot-lines by where their dot is: a
    dot-line whose CR, LF or dot is the window's last or first byte is found
    once, by one of them."""
    dense = _DENSE_LINE * 3
    MessageContent().feed(stuff(dense + _PLAIN_LINE * 400))  # learn where the window ends
    ((_, window_end),) = regex_windows
    # Plain text up to a dot-line whose dot lands at window_end + offset.
    filler = window_end + offset - len(CRLF) - len(dense)
    message = dense + b"x" * filler + CRLF + b".y" + CRLF + _PLAIN_LINE * 400 + b".z" + CRLF
    body = stuff(message)
    assert body[window_end + offset - 2 : window_end + offset + 1] == b"\r\n."
    assert_chunked(body, splits=range(window_end + offset - 6, window_end + offset + 6))
    assert regex_windows[1][1] == window_end  # the same window on the whole body
    found = list(content_module._dot_lines(body, 0, body.find(b".", len(CRLF))))
    assert found == [i for i in range(len(body)) if body.startswith(b"\r\n.", i)]


def test_a_dot_line_split_where_the_walk_gives_up() -> None:
    """Dense dots from the start of a chunk, whose first line is a dot-line
    completed by the bytes held from the chunk before: every split point."""
    head = _PLAIN_LINE * 3 + b".first" + CRLF
    message = head + b"." + _DENSE_LINE + _DENSE_LINE * 20 + b".last" + CRLF
    body = stuff(message)
    middle = len(stuff(head)) - len(TERMINATOR_LINE)
    assert_chunked(body, sizes=(), splits=range(middle - 12, middle + 80))


def test_take_holds_back_no_bytes_from_before_pos() -> None:
    # The CR before pos belongs to what came before the body: the body's
    # "\n" and the next ".\r\n" are no terminator.
    content = MessageContent()
    assert content.take(b"x\r\n", 2, keep=True) == (-1, b"\n")
    assert content.take(b".\r\n", keep=True) == (-1, b".")
    assert content.take(b"\r\n.\r\n", keep=True) == (5, b"\r\n\r\n")
    assert content.finish() == hashlib.sha256(b"\n.\r\n\r\n").hexdigest()


#: Blocks of the size the dot-line search cares about (dot spacing, windows).
_BLOCKS = st.sampled_from(
    [b"x" * 511, b"x" * 513, b"x" * 4000, b"a." * 300, b"." * 40, b"y" * 9000]
)


@given(
    parts=st.lists(st.one_of(_BLOCKS, st.sampled_from(_FRAGMENTS)), max_size=30).map(b"".join),
    data=st.data(),
)
def test_any_mix_of_sparse_and_dense_dots(parts: bytes, data: st.DataObject) -> None:
    body = stuff(parts)
    points = data.draw(st.lists(st.integers(0, len(body)), max_size=6))
    expected = as_pop3_message(parts)
    out, content = feed_all(split_at(body, points))
    assert out == expected == replace_reference(body)
    assert content.finish() == hashlib.sha256(expected).hexdigest()


@given(
    buf=st.lists(st.one_of(_BLOCKS, st.sampled_from(_FRAGMENTS)), max_size=30).map(b"".join),
    start=st.integers(0, 8),
)
def test_dot_lines_are_every_crlf_dot(buf: bytes, start: int) -> None:
    first = buf.find(b".", start + len(CRLF))
    found = list(content_module._dot_lines(buf, start, first)) if first != -1 else []
    assert found == [i for i in range(start, len(buf) - 2) if buf.startswith(b"\r\n.", i)]


@given(
    parts=st.lists(
        st.one_of(_BLOCKS, st.sampled_from([*_FRAGMENTS, b"\r\n.\r\n", b"\r\n..\r\n"])),
        max_size=30,
    ).map(b"".join),
    pos=st.integers(0, 12),
)
def test_find_terminator_is_the_first_crlf_dot_crlf(parts: bytes, pos: int) -> None:
    # The relay's search for the end of a body it does not follow (no digest).
    assert find_terminator(parts, pos) == parts.find(b"\r\n.\r\n", pos)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\r\n.\r\n",
        b"x\r\n.\r\n",
        b"\r\n..\r\n.\r\n",
        b"\r\n.\r",
        b"." * 5000 + b"\r\n.\r\n",  # dense dots: the regex windows
        b"a.\r\n" * 3000 + b".\r\n" + b"\r\n.\r\n",
        b"z" * 100_000 + b"\r\n.\r\n",  # no dot before the end: one memchr
    ],
    ids=["empty", "bare", "after-text", "after-stuffed", "cut", "dots", "prose", "sparse"],
)
def test_find_terminator_cases(body: bytes) -> None:
    for pos in range(4):
        assert find_terminator(body, pos) == body.find(b"\r\n.\r\n", pos)
