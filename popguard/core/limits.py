"""Every bound the session core enforces, with the reason for its value.

Like h11's ``DEFAULT_MAX_INCOMPLETE_EVENT_SIZE``, each limit is a named
default that a deployment may override (``limits:`` in the config file).
"""

from __future__ import annotations

from dataclasses import dataclass

#: RFC 2449 §4: a command line is at most 255 octets including CRLF.
MAX_COMMAND_LINE = 255

#: RFC 2449 §4 bounds a reply's first line to 512 octets including CRLF.
#: Legacy servers are known to overrun it (long greetings, verbose -ERR
#: texts), so popguard tolerates up to 4 KiB before calling it a protocol
#: error.  Anything longer is not a status line.
MAX_SERVER_STATUS_LINE = 4096

#: RFC 5034 §4: SASL continuation lines "may be of arbitrary length".
#: popguard has to hold one whole line to classify it, so it bounds it;
#: 16 KiB fits every mechanism in the IANA registry with real-world tokens
#: (XOAUTH2 bearer tokens are the largest, a few KiB).
MAX_SASL_LINE = 16384

#: A line of a multi-line reply that popguard reads line by line (CAPA).
MAX_LISTING_LINE = 4096

#: aiosmtpd's BOGUS_LIMIT idea: after this many invalid commands the client
#: is told so and disconnected.
MAX_BAD_COMMANDS = 10

#: Replies owed: commands forwarded and still waiting for their reply, and
#: replies popguard made itself that the shell has not taken yet.  Past this,
#: further commands wait in the core's buffer and the shell stops reading
#: from the client until replies drain, so a client that pipelines without
#: end costs bounded memory.
MAX_PIPELINED = 64


@dataclass(frozen=True, slots=True)
class Limits:
    """The per-session bounds; defaults are the constants above."""

    max_command_line: int = MAX_COMMAND_LINE
    max_server_status_line: int = MAX_SERVER_STATUS_LINE
    max_sasl_line: int = MAX_SASL_LINE
    max_listing_line: int = MAX_LISTING_LINE
    max_bad_commands: int = MAX_BAD_COMMANDS
    max_pipelined: int = MAX_PIPELINED
