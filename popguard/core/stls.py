"""STLS (RFC 2595), terminated by popguard: when it may begin.

popguard never forwards STLS: it answers it itself and the shell does the
handshake.  This is the rule for *when*, as a pure function of what the
session knows; the session carries it out (``ProxySession._stls``), and
throws away whatever the client pipelined behind an accepted STLS
(CVE-2011-0411).
"""

from __future__ import annotations

from popguard.core.replies import (
    REPLY_STLS_ACTIVE,
    REPLY_STLS_PIPELINED,
    REPLY_STLS_STATE,
    REPLY_STLS_UNAVAILABLE,
)

__all__ = ["stls_refusal"]


def stls_refusal(
    *, offered: bool, encrypted: bool, authorization: bool, replies_owed: bool
) -> tuple[str, bytes] | None:
    """Why STLS is refused now (the reason to record, the reply), or None: begin TLS.

    ``offered``: the listener offers STLS; ``encrypted``: the client
    connection already is; ``authorization``: no login has succeeded and no
    SASL exchange is under way; ``replies_owed``: commands before it are
    still unanswered, so server bytes from before the handshake could
    reach the client after it.
    """
    if not offered and not encrypted:
        return "STLS is not offered", REPLY_STLS_UNAVAILABLE
    if encrypted:
        return "TLS is already active", REPLY_STLS_ACTIVE
    if not authorization:
        return "STLS after login", REPLY_STLS_STATE
    if replies_owed:
        return "STLS behind commands in progress", REPLY_STLS_PIPELINED
    return None
