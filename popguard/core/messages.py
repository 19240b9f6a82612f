"""Message identity: what one session learns of each message's UIDL and size.

Message numbers mean nothing outside one session, so records name messages
by UIDL and size as well (RFC 1939 §7: UIDs are stable across sessions, and
a number names the same message for the whole session).  A
:class:`MessageIndex` holds what was learnt, and decides what is still worth
asking; :class:`~popguard.core.session.ProxySession` feeds it the replies
and sends the questions.  It sees only parsed facts and reply bytes: no
I/O, no records.

Where the facts come from, cheapest first:

* the listings of the client's own bare ``UIDL`` (``n uid`` lines) and
  ``LIST`` (``n size``), read as they stream past (:meth:`begin_listing`,
  :meth:`learn_chunk`): whole lines are matched in bulk; one bounded partial
  line is held across reads; lines are unstuffed as RFC 1939 §3 says;
  malformed or over-long lines, and entries past :data:`MAX_IDENTITY_CACHE`,
  are simply not learnt;
* the single-line replies to the client's ``UIDL n`` and ``LIST n``
  (:meth:`client_reply`);
* popguard's own ``UIDL n`` / ``LIST n``, sent invisibly before a RETR, TOP
  or DELE for what is still unknown (:meth:`lookups`,
  :meth:`internal_reply`);
* popguard's own bare ``UIDL`` and ``LIST``, sent once instead, when a
  session touches a second message of a maildrop known (from a ``STAT``
  reply) to hold at most :data:`LISTING_MAX` messages.  A client that walks
  its mailbox with RETR alone then costs the server two listings, not two
  more commands per message.  popguard asks its own ``STAT`` (once, beside
  the second message's lookups) when the client sent none.  Whatever a
  listing did not name is still looked up one message at a time.

UIDL is optional in RFC 1939.  Lookups stop asking for it once the server
is known to lack it: a bare ``UIDL`` answered -ERR, or ``UIDL n`` answered
-ERR for a message that exists (its size is known, from a listing or from
the ``LIST n`` sent behind it, and it is not marked deleted); ``UIDL n``
-ERR alone can mean "no such message".  A -ERR carrying a response code
(``[SYS/TEMP]``, ``[IN-USE]``, RFC 2449 §8) is about something else and
proves nothing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Set
from typing import Final, NamedTuple

from popguard.core.grammar import reply_text
from popguard.core.records import Scalar

__all__ = ["LISTING_MAX", "MAX_IDENTITY_CACHE", "Lookup", "MessageIndex", "message_number"]

#: At most this many messages per session get identity lookups, and at most
#: this many UIDLs and sizes are learnt (bounded memory for a client that
#: walks or lists a huge mailbox: some 250 octets per message learnt); later
#: ones are recorded by number only.
MAX_IDENTITY_CACHE: Final = 100_000

#: A maildrop of at most this many messages is listed whole (popguard's own
#: bare UIDL and LIST) once a session touches its second message: some
#: 40 kB on the wire and at most ~250 kB learnt (about what a client that
#: walks the whole maildrop makes popguard learn anyway), against two
#: commands per message otherwise.  A larger one is looked up one message
#: at a time.
LISTING_MAX: Final = 1000

#: Digits in a message number or size that are learnt (int() stays cheap).
_MAX_NUMBER_DIGITS: Final = 20

#: The lines of a UIDL and of a LIST listing that are learnt from, as RFC
#: 1939 §7 and §5 write them: "n SP unique-id" and "n SP size", the latter
#: perhaps followed by SP and more (bounded here), each ending in CRLF.  A
#: leading "." is byte-stuffing (§3): the line is read as the client reads it.
#: Anything else (bare LF, extra spaces, an invalid unique-id) is relayed
#: like any other line, just not learnt.
_UIDL_LINES: Final = re.compile(rb"^\.?(\d{1,20}) ([\x21-\x7e]{1,70})\r$", re.MULTILINE)
_LIST_LINES: Final = re.compile(rb"^\.?(\d{1,20}) (\d{1,20})(?: [^\r\n]{0,400})?\r$", re.MULTILINE)

#: Longest listing line held across reads: no longer line could be learnt.
_MAX_INDEX_LINE: Final = 512

#: RFC 1939 §7: a unique-id is 1 to 70 characters in 0x21 to 0x7E.
_UNIQUE_ID: Final = re.compile(rb"[\x21-\x7e]{1,70}")


class Lookup(NamedTuple):
    """What :meth:`MessageIndex.lookups` asks for: ``UIDL n`` and ``LIST n``
    (``uidl``, ``size``), a ``STAT`` first, or bare ``UIDL`` and ``LIST``
    listings instead."""

    uidl: bool = False
    size: bool = False
    stat: bool = False
    listing_uidl: bool = False
    listing_size: bool = False


_NOTHING: Final = Lookup()


def message_number(arg: bytes | None) -> int | None:
    """A command's message-number argument, or None if it is not one."""
    if arg is None or not arg.isdigit():
        return None
    return int(arg)


class MessageIndex:
    """UIDLs and sizes learnt in one session, and the lookups still worth making."""

    __slots__ = (
        "_listed",
        "_listing_buf",
        "_listing_skip",
        "_listing_uidl",
        "_listings_pending",
        "_requested",
        "_stat_asked",
        "_uidl_refused_for",
        "archived",
        "count",
        "digests",
        "sizes",
        "uidl_supported",
        "uidls",
    )

    def __init__(self) -> None:
        #: Message number -> unique-id, and -> size in octets.
        self.uidls: dict[int, str] = {}
        self.sizes: dict[int, int] = {}
        #: Message number -> hex SHA-256 of its content (a whole RETR seen),
        #: and -> its copy's path in the retention store.
        self.digests: dict[int, str] = {}
        self.archived: dict[int, str] = {}
        #: False once the server is known to have no UIDL command.
        self.uidl_supported = True
        #: Messages in the maildrop, from a STAT reply (None: not known).
        self.count: int | None = None
        self._requested: set[int] = set()
        # popguard's own STAT was sent; its own listings were sent, and how
        # many of them are still unanswered.
        self._stat_asked = False
        self._listed = False
        self._listings_pending = 0
        # A UIDL -ERR only means "no UIDL here" if LIST then finds the message.
        self._uidl_refused_for: int | None = None
        # The listing being read: a UIDL (True) or LIST listing, its partial
        # line, and whether the current line is too long to learn from.
        self._listing_uidl = False
        self._listing_buf = bytearray()
        self._listing_skip = False

    # -- records -----------------------------------------------------------

    def fields(self, msg: int | None) -> dict[str, Scalar]:
        """``msg``, plus ``uidl``, ``size``, ``digest`` and ``archived`` where known."""
        fields: dict[str, Scalar] = {"msg": msg}
        if msg is not None:
            if msg in self.uidls:
                fields["uidl"] = self.uidls[msg]
            if msg in self.sizes:
                fields["size"] = self.sizes[msg]
            if msg in self.digests:
                fields["digest"] = self.digests[msg]
            if msg in self.archived:
                fields["archived"] = self.archived[msg]
        return fields

    def fields_of(self, messages: Set[int]) -> tuple[Mapping[str, Scalar], ...]:
        return tuple(self.fields(msg) for msg in sorted(messages))

    # -- popguard's own lookups --------------------------------------------

    def lookups(self, msg: int) -> Lookup:
        """What to ask the server now so that ``msg`` is named (each message once).

        The first message is looked up on its own.  From the second on, a
        maildrop of known size (at most :data:`LISTING_MAX`) is listed whole,
        once; while a listing is unanswered nothing more is asked (it will
        name the message).  A maildrop of unknown size gets popguard's own
        STAT beside the second message's lookups.
        """
        want_uidl = self.uidl_supported and msg not in self.uidls
        want_size = msg not in self.sizes
        if not (want_uidl or want_size) or msg in self._requested or self._listings_pending:
            return _NOTHING
        requested = self._requested
        if requested and not self._listed:
            count = self.count
            if count is not None and count <= LISTING_MAX:
                self._listed = True
                uidl = self.uidl_supported and len(self.uidls) < count
                size = len(self.sizes) < count
                self._listings_pending = uidl + size
                return Lookup(listing_uidl=uidl, listing_size=size)
        if len(requested) >= MAX_IDENTITY_CACHE:
            return _NOTHING
        stat = self.count is None and not self._stat_asked and bool(requested)
        if stat:
            self._stat_asked = True
        requested.add(msg)
        return Lookup(uidl=want_uidl, size=want_size, stat=stat)

    def listing_answered(self, verb: str, ok: bool, line: bytes) -> None:
        """One of popguard's own bare listings is over (read whole, or -ERR ``line``)."""
        self._listings_pending = max(0, self._listings_pending - 1)
        if not ok and verb == "UIDL" and no_uidl(line):
            self.uidl_supported = False  # a bare UIDL fails only where there is none

    def learn_stat(self, line: bytes) -> None:
        """A STAT's ``+OK count octets`` (the client's or popguard's own)."""
        words = reply_text(line).split()
        if words and words[0].isdigit() and len(words[0]) <= _MAX_NUMBER_DIGITS:
            self.count = int(words[0])

    def internal_reply(self, verb: str, msg: int, ok: bool, line: bytes, marked: Set[int]) -> None:
        """The reply to popguard's own ``UIDL msg`` or ``LIST msg``.

        ``marked``: the messages marked for deletion (a marked message's
        UIDL -ERR proves nothing about UIDL support).
        """
        if verb == "UIDL":
            if ok:
                self._uidl_refused_for = None
                self._learn(True, msg, reply_text(line))
                return
            self._uidl_refused_for = None
            if not no_uidl(line):
                return
            if msg not in self.sizes:
                # The LIST lookup sent behind it tells which.
                self._uidl_refused_for = msg
            elif msg not in marked:
                self.uidl_supported = False  # the message exists; UIDL does not
        elif verb == "LIST":
            if ok and self._learn(False, msg, reply_text(line)) and self._uidl_refused_for == msg:
                self.uidl_supported = False  # the message exists; UIDL does not
            self._uidl_refused_for = None

    # -- the client's own UIDL and LIST -------------------------------------

    def client_reply(
        self, verb: str, multiline: bool, arg: bytes | None, ok: bool, line: bytes
    ) -> None:
        """The status line of a client's UIDL or LIST (a listing is learnt as it passes)."""
        if multiline:
            if not ok and verb == "UIDL" and no_uidl(line):
                self.uidl_supported = False  # a bare UIDL fails only where there is none
            return
        msg = message_number(arg)
        if ok and msg is not None:
            self._learn(verb == "UIDL", msg, reply_text(line))

    def begin_listing(self, uidl: bool) -> None:
        """A bare UIDL (``uidl``) or LIST listing starts streaming past."""
        self._listing_uidl = uidl
        self._listing_buf.clear()
        self._listing_skip = False

    def learn_chunk(self, chunk: bytes) -> None:
        """Learn from the whole lines of a listing chunk; keep a bounded partial line.

        Lines are matched in bulk (``_UIDL_LINES``, ``_LIST_LINES``), so the
        cost per line stays small; a line split across reads is put together
        first, unless it is already longer than any line that could match.
        """
        last = chunk.rfind(b"\n")
        buf = self._listing_buf
        if last == -1:
            rest = chunk
        else:
            start = 0
            if buf or self._listing_skip:
                start = chunk.find(b"\n") + 1
                if not self._listing_skip and len(buf) + start <= _MAX_INDEX_LINE:
                    buf += chunk[:start]
                    self._listing_lines(bytes(buf))
                buf.clear()
                self._listing_skip = False
            if start <= last:
                self._listing_lines(
                    chunk[start : last + 1] if start or last + 1 < len(chunk) else chunk
                )
            rest = chunk[last + 1 :]
        if rest and not self._listing_skip:
            if len(buf) + len(rest) > _MAX_INDEX_LINE:
                buf.clear()
                self._listing_skip = True  # longer than any line learnt from: skip to its end
            else:
                buf += rest

    def _listing_lines(self, lines: bytes) -> None:
        """Learn from whole listing lines (each ending in LF)."""
        if self._listing_uidl:
            uidls = self.uidls
            for number, uid in _UIDL_LINES.findall(lines):
                n = int(number)
                if n in uidls or len(uidls) < MAX_IDENTITY_CACHE:
                    uidls[n] = uid.decode("ascii")
        else:
            sizes = self.sizes
            for number, size in _LIST_LINES.findall(lines):
                n = int(number)
                if n in sizes or len(sizes) < MAX_IDENTITY_CACHE:
                    sizes[n] = int(size)

    def _learn(self, uidl: bool, msg: int, text: bytes) -> bool:
        """Learn from the text of a ``+OK n uid`` (``uidl``) or ``+OK n size`` reply.

        ``n`` must be ``msg``, the number asked about; words are split at any
        whitespace and anything after the value is ignored (RFC 1939 §5 lets
        LIST say more).  True if the text was well-formed (and learnt, unless
        the cache is full).
        """
        words = text.split()
        if len(words) < 2:
            return False
        number, value = words[0], words[1]
        if not number.isdigit() or len(number) > _MAX_NUMBER_DIGITS:
            return False
        n = int(number)
        if n != msg:
            return False
        if uidl:
            if _UNIQUE_ID.fullmatch(value) is None:
                return False
            uidls = self.uidls
            if n in uidls or len(uidls) < MAX_IDENTITY_CACHE:
                uidls[n] = value.decode("ascii")
            return True
        if not value.isdigit() or len(value) > _MAX_NUMBER_DIGITS:
            return False
        sizes = self.sizes
        if n in sizes or len(sizes) < MAX_IDENTITY_CACHE:
            sizes[n] = int(value)
        return True


def no_uidl(line: bytes) -> bool:
    """Whether a UIDL's -ERR may say "no UIDL here": not one with a response code.

    ``[SYS/TEMP]``, ``[IN-USE]`` and the like (RFC 2449 §8, RFC 3206) are
    about something else, so they never turn UIDL lookups off.
    """
    return not reply_text(line).startswith(b"[")
