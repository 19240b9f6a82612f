"""POP3 wire grammar: command lines, status lines, and reply framing.

Pure functions over bytes.  Nothing here keeps state; the session machine in
``popguard.core.session`` decides *when* to call them.

References (see also the project's PROTOCOL notes):

* RFC 1939 §3: a command is a case-insensitive keyword of three or four
  characters, optionally followed by arguments separated by single spaces,
  terminated by CRLF.  Replies start with ``+OK`` or ``-ERR``.
* RFC 2449 §4: command lines are at most 255 octets including CRLF, and a
  reply's first line at most 512 octets.
* RFC 5034 §4: a SASL server challenge is ``+`` SP base64 (``+ `` alone is an
  empty challenge).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

CRLF = b"\r\n"

#: The end of a multi-line reply: a line holding only ".", i.e. CRLF "." CRLF
#: counting the CRLF that ended the previous line (RFC 1939 §3).  Only this
#: exact sequence terminates; "\n.\n" and friends are body bytes.
MULTILINE_TERMINATOR = b"\r\n.\r\n"

#: RFC 1939 §3: "Keywords are three or four characters long."
_KEYWORD = re.compile(rb"[A-Za-z]{3,4}\Z")

#: Bytes that may never appear inside a command line: C0 controls (CR and LF
#: included, since the line has been split already) and DEL.  8-bit bytes
#: are allowed because RFC 6856 (UTF8) permits UTF-8 user names.
_FORBIDDEN = re.compile(rb"[\x00-\x1f\x7f]")


class CommandSyntaxError(ValueError):
    """A client line popguard refuses to forward.  ``str()`` is the -ERR text."""


@dataclass(frozen=True, slots=True)
class Command:
    """One parsed client command.

    ``line`` is what goes upstream: the client's bytes, with the line ending
    normalised to CRLF so that popguard and the server frame it identically.
    """

    verb: str
    args: tuple[bytes, ...]
    line: bytes

    @property
    def rest(self) -> bytes:
        """Everything after the keyword and its space (USER names may hold spaces)."""
        _, _, rest = self.line[:-2].partition(b" ")
        return rest


def strip_line_ending(line: bytes) -> bytes:
    """Drop a trailing CRLF or bare LF."""
    if line.endswith(b"\r\n"):
        return line[:-2]
    if line.endswith(b"\n"):
        return line[:-1]
    return line


def parse_command(raw: bytes) -> Command:
    """Parse one client line (with its line ending) into a :class:`Command`.

    Raises :class:`CommandSyntaxError` for anything that is not a well-formed
    command.  Unknown but well-formed keywords are *not* errors: the upstream
    is the server and decides what it supports.
    """
    body = strip_line_ending(raw)
    if not body:
        raise CommandSyntaxError("Empty command line")
    if _FORBIDDEN.search(body):
        raise CommandSyntaxError("Command line contains control characters")
    words = body.split(b" ")
    if not _KEYWORD.match(words[0]):
        raise CommandSyntaxError("Malformed command keyword")
    verb = words[0].decode("ascii").upper()
    args = tuple(word for word in words[1:] if word)
    return Command(verb=verb, args=args, line=body + CRLF)


def is_multiline(command: Command) -> bool:
    """Whether a ``+OK`` answer to ``command`` is a multi-line reply.

    RFC 1939 §5-§7 and RFC 2449 §5: RETR, TOP, LIST and UIDL without an
    argument, and CAPA.  A bare ``AUTH`` is answered by legacy servers with a
    mechanism list (nginx's mail tests rely on this).  ``-ERR`` is always one
    line.
    """
    verb = command.verb
    if verb in ("RETR", "TOP", "CAPA"):
        return True
    if verb in ("LIST", "UIDL", "AUTH"):
        return not command.args
    return False


class Status(enum.Enum):
    OK = "+OK"
    ERR = "-ERR"
    #: A SASL continuation ("+ base64" or a bare "+"), valid only during AUTH.
    CONTINUE = "+"


def parse_status(line: bytes) -> Status | None:
    """Classify a server reply's first line, or None when it is not one."""
    body = strip_line_ending(line)
    head = body[:4].upper()
    if head.startswith(b"+OK") and (len(body) == 3 or body[3:4] == b" "):
        return Status.OK
    if head == b"-ERR" and (len(body) == 4 or body[4:5] == b" "):
        return Status.ERR
    if body == b"+" or body.startswith(b"+ "):
        return Status.CONTINUE
    return None


def reply_text(line: bytes) -> bytes:
    """The free text after the status indicator, for audit records."""
    body = strip_line_ending(line)
    _, _, text = body.partition(b" ")
    return text


def escape_text(data: bytes) -> str:
    """A peer-supplied string made safe for a log line (CWE-117).

    Decodes UTF-8 leniently and escapes every control character, so a user
    name carrying CR or LF cannot start a forged record in any sink.
    """
    text = data.decode("utf-8", errors="backslashreplace")
    return "".join(ch if ch.isprintable() else f"\\u{ord(ch):04x}" for ch in text)
