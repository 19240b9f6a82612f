"""A relayed message's content: exact dot-unstuffing and its SHA-256, chunk by chunk.

Theory of operation
-------------------

popguard relays a RETR body dot-stuffed, as the server sent it, in whatever
chunks the network delivers.  The audit trail wants the digest of the
*message* (RFC 5322 bytes, CRLF line ends, stuffing removed), and a
retention copy wants those same bytes, without buffering the message and
without a Python loop per line.  :class:`MessageContent` follows one body:

* **Lines.**  A line starts at the start of the body and after every CRLF,
  and nowhere else: a bare CR or a bare LF is a byte inside a line.  This
  is the framing of popguard's own terminator search
  (``ProxySession._relay_body``: only CRLF "." CRLF ends a reply, see
  ``grammar.MULTILINE_TERMINATOR``; a followed body's end is found here),
  so the digest covers exactly the bytes the client was given as the
  message.
* **Unstuffing** (RFC 1939 §3): a line that begins with "." and is not the
  terminator has that first octet stripped.  Read the body as if a CRLF came
  before it; then every line start that begins with "." is the sequence
  CRLF "." and unstuffing is one C-speed substitution CRLF "." -> CRLF.
  The rule strips *any* leading dot, as the RFC says; a client such as
  Python's poplib strips only from "..", which gives the same result for
  every correctly stuffed body.
* **The end.**  The first CRLF "." CRLF ends the body.  Its CRLF belongs to
  the message's last line; the "." CRLF is not message content.  A body that
  is just "." CRLF is the empty message.
* **Chunk boundaries.**  Only the last four bytes of what was fed can be the
  start of something that the next chunk completes (CR, CRLF, CRLF ".",
  CRLF "." CR: the proper prefixes of the terminator).  Those are held back
  and fed again in front of the next chunk; every other byte is unstuffed
  and returned at once, and hashed.  No CRLF "." can straddle the cut, since
  the held suffix starts with a CR and neither LF nor "." is one.
* **Speed.**  Finding the dot-lines costs as much as hashing, so how
  matters.  A one-byte ``bytes.find`` is memchr (gigabytes per second) and
  settles a chunk without a "." at once: base64 and most binary parts, the
  bulk of real mail.  Elsewhere the search walks from "." to "." with it
  and checks for the CRLF in front, while the dots are sparse; where they
  are dense (prose, HTML, headers: a "." every line or so) a Python step
  per dot would be slower than one compiled-pattern scan for CRLF ".", so
  the regex takes a window and the walk resumes after it (``_dot_lines``).
  CRLF "." is never looked for with ``bytes.find``: mail has a CR on every
  line and Python 3.11's multi-byte ``find`` then keeps stepping one byte at
  a time, slower than the regex.  Each CRLF "." is a stuffed line's
  (hash up to its CRLF, skip the dot) or, followed by CRLF, the
  terminator's.  The message is hashed as views of the chunk between the
  dots, and a chunk without a dot-line in place: no copy is made unless an
  archive keeps the bytes.  So finding the end of the body and unstuffing
  it are one scan, and :meth:`MessageContent.take` gives the relay that
  end: a body followed for its digest is scanned once, not once for the
  relay's terminator and again here.

What real Dovecot (2.3.19, ``src/pop3/pop3-commands.c`` ``fetch_callback``)
sends for a Maildir file, checked byte for byte by
``tests/integration/test_content_dovecot.py``:

* a bare LF (every line end of an LF file) gets a CR in front of it; a CRLF
  already in the file is sent as it is;
* a bare CR passes unchanged, so the message keeps it (``a\\rb`` stays
  ``a\\rb``; ``x\\r\\r\\n`` stays ``x\\r\\r\\n``); NUL bytes pass too;
* a file that does not end in LF gets CRLF appended before the terminator
  (a file ending in a bare CR ends ``\\r\\r\\n`` on the wire); an empty file
  is sent as CRLF "." CRLF, a message of one empty line.  Dovecot's own size
  (LIST, ``+OK n octets``) leaves that appended CRLF out;
* **a "." at the very start of the file is not stuffed** (Dovecot escapes a
  dot only after an LF it has sent, and starts with none).  A first line
  ``.foo`` reaches every RFC reader as ``foo``; a first line ``.`` alone
  ends the reply at once (an empty message) and leaves a stray "." CRLF on
  the connection.  Every other line is stuffed correctly.

The module is sans-I/O: bytes in, bytes and a digest out.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from typing import Final

from popguard.core.grammar import CRLF

__all__ = ["MessageContent", "find_terminator"]

#: The termination octet (RFC 1939 §3).
_DOT: Final = b"."

_DOT_ORD: Final = _DOT[0]
_CR_ORD: Final = CRLF[0]
_LF_ORD: Final = CRLF[1]

#: A line that starts with the termination octet: stuffed, or the terminator.
_DOT_LINE_BYTES: Final = CRLF + _DOT
_DOT_LINE: Final = re.compile(re.escape(_DOT_LINE_BYTES))

# The dot-line search (:func:`_dot_lines`).  Measured with CPython 3.11 on
# 50 kB bodies (the bench's mail, base64, prose, lines of dots): the walk
# costs about 150 ns per "." it steps to, the regex 0.3-0.5 ns per byte it
# scans (the most on text with a CR every line) plus about 0.3 us a call.
# So the walk is the cheaper while the dots are more than 300-500 bytes
# apart; mail text has one every 1-2 kB, prose every 40-80 bytes.
#: The walk may step to one "." per this many bytes it has covered: at that
#: density it costs about what the regex would on those bytes, never more.
_WALK_SPACING: Final = 512
#: ... plus this many dots at once: a stuffed line alone (CR LF "." ".") must
#: not look dense.  Two dots close together start a window at once.
_WALK_SLACK: Final = 2
#: The regex's first window, doubled each time the dots are dense again: a
#: dense run (a header block) costs one window, a dense body a few (each
#: return to the walk costs under 1 us).
_REGEX_WINDOW: Final = 8192

#: What may end a chunk and be completed by the next one into a dot-line or
#: the terminator: the terminator's proper prefixes, as suffixes (longest
#: first).  Those bytes are held back.
_OPEN_ENDS: Final = (CRLF + _DOT + b"\r", CRLF + _DOT, CRLF, b"\r")


def _open_end(data: bytes, start: int = 0) -> int:
    """How many bytes at the end of ``data[start:]`` must wait for the next chunk."""
    for suffix in _OPEN_ENDS:
        if data.endswith(suffix, start):
            return len(suffix)
    return 0


def _dot_lines(buf: bytes, start: int, dot: int) -> Iterator[int]:
    """Where each CRLF "." in ``buf[start:]`` begins, in order, given ``dot``:
    where the first "." in ``buf[start + 2:]`` is (not -1).

    Dots are walked one memchr at a time while they are sparse; where they
    are dense the regex takes over for a window, doubled each time, and the
    walk resumes after it.  The two split the dot-lines by the position of
    their dot, so none is missed or found twice.
    """
    find = buf.find
    window = _REGEX_WINDOW
    origin = start  # where the current walk began
    seen = 0  # the dots it has looked at
    while dot != -1:
        if buf[dot - 1] == _LF_ORD and buf[dot - 2] == _CR_ORD:
            yield dot - len(CRLF)
        seen += 1
        if seen <= _WALK_SLACK + (dot - origin) // _WALK_SPACING:
            dot = find(_DOT, dot + 1)
            continue
        # Dense: the regex finds the dot-lines whose dot lies after this one
        # and before ``origin`` (none has its CR LF on this dot), the walk
        # goes on from ``origin``.
        origin = dot + window
        for match in _DOT_LINE.finditer(buf, dot + 1, origin):
            yield match.start()
        window *= 2
        seen = 0
        dot = find(_DOT, origin)


def find_terminator(data: bytes, pos: int = 0) -> int:
    """Where the first CRLF "." CRLF in ``data[pos:]`` starts, or -1.

    The relay's search for the end of a body it does not follow for its
    content (listings, TOP, a RETR with no digest): the same dot-line
    search as :class:`MessageContent`, so a body without a "." costs one
    memchr instead of a scan for the whole terminator.
    """
    dot = data.find(_DOT, pos + len(CRLF))
    if dot == -1:
        return -1
    for at in _dot_lines(data, pos, dot):
        if data.startswith(CRLF, at + len(_DOT_LINE_BYTES)):
            return at
    return -1


class MessageContent:
    """The message inside one multi-line (RETR) body, fed as relayed.

    ``feed(chunk)`` takes the body's bytes after the status line, in order,
    in any chunks; the last one ends with the terminator and holds nothing
    after it.  Each call returns the message bytes it completed (what an
    archive copy appends; at most four bytes wait for the next call) and
    hashes them.  ``finish()`` gives the SHA-256 in hex once the terminator
    was fed.
    """

    __slots__ = ("_at_start", "_done", "_hash", "_pending", "_size")

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        # The body starts a line: read it as if a CRLF came first.  That CRLF
        # is dropped from the first bytes returned.
        self._pending = CRLF
        self._at_start = True
        self._size = 0
        self._done = False

    @property
    def size(self) -> int:
        """Message octets returned so far (the message's size once ``done``)."""
        return self._size

    @property
    def done(self) -> bool:
        """Whether the terminator has been fed."""
        return self._done

    def feed(self, chunk: bytes, *, keep: bool = True) -> bytes:
        """Take the next relayed bytes; return the message bytes they complete.

        With ``keep=False`` nothing is returned (``b""``): the bytes are only
        hashed, with no copy at all where no line needs unstuffing (the
        digest without an archive copy, the common case).  Raises
        ``ValueError`` for bytes after the terminator (in this chunk or a
        later one); nothing is consumed then.
        """
        if self._done:
            if chunk:
                raise ValueError("bytes fed after the terminator")
            return b""
        end, message, pending, at_start = self._scan(chunk, 0)
        if end != -1 and end != len(chunk):
            raise ValueError("bytes fed after the terminator")
        return self._commit(end, message, pending, at_start, keep)

    def take(self, data: bytes, pos: int = 0, *, keep: bool = False) -> tuple[int, bytes]:
        """Take the body's bytes from ``data[pos:]`` up to its terminator.

        Returns where the body ends in ``data`` (just after the terminator;
        -1 when it does not end in this data, which is then all taken) and,
        with ``keep``, the message bytes completed.  This is the relay's
        one scan of a RETR body: finding the terminator and unstuffing are
        the same search for CRLF ".".
        """
        if self._done:
            return pos, b""
        end, message, pending, at_start = self._scan(data, pos)
        return end, self._commit(end, message, pending, at_start, keep)

    def _scan(self, data: bytes, pos: int) -> tuple[int, list[bytes | memoryview], bytes, bool]:
        """Read ``data[pos:]`` without changing anything.

        Returns (where the body ends in ``data`` or -1, the message bytes
        completed as pieces (views into the data: no copy is made), the
        bytes held for the next call, whether those still begin with the
        body's virtual CRLF).
        """
        pending = self._pending
        at_start = self._at_start
        if at_start and pending == CRLF and len(data) > pos and data[pos] != _DOT_ORD:
            # The body does not begin with a dot: its virtual CRLF can go
            # now, without copying the data behind it.
            pending, at_start = b"", False
        if pending:
            buf, start, base = pending + data[pos:], 0, pos - len(pending)
        else:
            buf, start, base = data, pos, 0
        skip = len(CRLF) if at_start else 0  # the virtual CRLF is no content
        # Each CRLF "." is a stuffed line (its CRLF ends the line before, its
        # dot is dropped) or the terminator's (CRLF "." CRLF).  The message
        # is the pieces between the dots.
        view = memoryview(buf)
        pieces: list[bytes | memoryview] = []
        begin = start + skip  # where the current piece of message starts
        size = len(buf)
        # memchr settles a chunk without a "." at once (base64, most binary
        # parts); no dot-line starts before the first one.
        dot = buf.find(_DOT, start + len(CRLF))
        for at in _dot_lines(buf, start, dot) if dot != -1 else ():
            after = at + len(_DOT_LINE_BYTES)
            if buf.startswith(CRLF, after):  # CRLF "." CRLF: the end of the body
                pieces.append(view[begin : at + len(CRLF)])  # its CRLF ends the last line
                return after + len(CRLF) + base, pieces, b"", False
            if after == size or (after + 1 == size and buf[after] == _CR_ORD):
                # CRLF "." (CR) at the very end: the next data decides.
                pieces.append(view[begin:at])
                return -1, pieces, buf[at:], at_start and at == 0
            pieces.append(view[begin : at + len(CRLF)])  # a stuffed line: its dot is dropped
            begin = after
        cut = size - _open_end(buf, start)
        # A chunk without a dot-line is hashed in place, without a copy.
        pieces.append(buf if begin == 0 and cut == size else view[begin:cut])
        return -1, pieces, buf[cut:], at_start and cut == 0

    def _commit(
        self,
        end: int,
        pieces: list[bytes | memoryview],
        pending: bytes,
        at_start: bool,
        keep: bool,
    ) -> bytes:
        """Keep what :meth:`_scan` read: hash the ``pieces``, hold ``pending``."""
        self._pending = pending
        self._at_start = at_start
        if end != -1:
            self._done = True
        update = self._hash.update
        size = 0
        for piece in pieces:
            if len(piece):
                update(piece)
                size += len(piece)
        self._size += size
        if not keep or not size:
            return b""
        if len(pieces) == 1:
            piece = pieces[0]
            return piece if isinstance(piece, bytes) else piece.tobytes()
        return b"".join(pieces)

    def finish(self) -> str:
        """The message's SHA-256, in hex; only once the terminator was fed."""
        if not self._done:
            raise ValueError("the body's terminator has not been fed")
        return self._hash.hexdigest()
