"""What the client is told it may use: CAPA (RFC 2449) and AUTH listings (RFC 5034).

popguard rewrites two multi-line replies, line by line, and relays every
other line unchanged:

* ``CAPA``: the upstream's ``STLS`` is never relayed (STLS is popguard's own
  business; it lists its own where the listener offers it, see
  :func:`own_stls`); ``USER`` and ``SASL`` are dropped before TLS where a
  policy requires TLS (as Dovecot's ``disable_plaintext_auth`` does); the
  ``SASL`` line names only the mechanisms popguard can read the account of.
* a bare ``AUTH``'s mechanism listing: the same mechanisms only.

Pure functions of a line and a few facts; the session decides when they apply.
"""

from __future__ import annotations

from popguard.core.grammar import CRLF
from popguard.core.sasl import DECODABLE

__all__ = ["capa_line", "mechanism_line", "own_stls"]


def capa_line(line: bytes, *, client_tls: bool, requires_tls: bool) -> bytes | None:
    """A CAPA line as it reaches the client (RFC 2449 §6), or None: dropped.

    ``requires_tls``: a policy refuses logins before TLS for this session.
    """
    words = line.split()
    keyword = words[0].upper() if words else b""
    if keyword == b"STLS":
        return None  # STLS is popguard's, never the upstream's
    if keyword in (b"USER", b"SASL") and not client_tls and requires_tls:
        return None  # no login offered before TLS
    if keyword == b"SASL":
        # Only mechanisms whose account popguard can read are offered: the
        # others would be refused (popguard.core.sasl).
        offered = [
            word for word in words[1:] if word.upper().decode("ascii", "replace") in DECODABLE
        ]
        if len(offered) == len(words) - 1:
            return line
        return b" ".join([words[0], *offered]) + CRLF if offered else None
    return line


def mechanism_line(line: bytes) -> bytes | None:
    """A line of a bare AUTH's mechanism listing, or None for one popguard refuses."""
    words = line.split()
    name = words[0].decode("ascii", "replace").upper() if words else ""
    return line if name in DECODABLE else None


def own_stls(*, offers_stls: bool, client_tls: bool, authorization: bool) -> bytes | None:
    """popguard's own ``STLS`` capability line (RFC 2595 §4), where it offers STLS."""
    if offers_stls and not client_tls and authorization:
        return b"STLS\r\n"
    return None
