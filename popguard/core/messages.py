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
  :meth:`internal_reply`).

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
from typing import Final

from popguard.core.grammar import reply_text
from popguard.core.records import Scalar

__all__ = ["MAX_IDENTITY_CACHE", "MessageIndex", "message_number"]

#: At most this many messages per session get identity lookups, and at most
#: this many UIDLs and sizes are learnt (bounded memory for a client that
#: walks or lists a huge mailbox: some 250 octets per message learnt); later
#: ones are recorded by number only.
MAX_IDENTITY_CACHE: Final = 100_000

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


def message_number(arg: bytes | None) -> int | None:
    """A command's message-number argument, or None if it is not one."""
    if arg is None or not arg.isdigit():
        return None
    return int(arg)


class MessageIndex:
    """UIDLs and sizes learnt in one session, and the lookups still worth making."""

    __slots__ = (
        "_listing_buf",
        "_listing_skip",
        "_listing_uidl",
        "_requested",
        "_uidl_refused_for",
        "archived",
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
        self._requested: set[int] = set()
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

    def lookups(self, msg: int) -> tuple[bool, bool]:
        """Whether to ask ``UIDL msg`` and ``LIST msg`` now (each message once)."""
        if msg in self._requested:
            return False, False
        want_uidl = self.uidl_supported and msg not in self.uidls
        want_size = msg not in self.sizes
        if not (want_uidl or want_size) or len(self._requested) >= MAX_IDENTITY_CACHE:
            return False, False
        self._requested.add(msg)
        return want_uidl, want_size

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
