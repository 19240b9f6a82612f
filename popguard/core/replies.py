"""The replies popguard writes itself, instead of the server.

Response codes per RFC 2449 §8 and RFC 3206: ``[SYS/TEMP]`` when the
upstream (or popguard's own trail) is at fault and a retry may work,
``[AUTH]`` for a login popguard refuses.  Every one is a complete line.
"""

from __future__ import annotations

__all__ = [
    "REPLY_AUDIT_DOWN",
    "REPLY_AUDIT_UNAVAILABLE",
    "REPLY_IDENTITY_UNKNOWN",
    "REPLY_IDLE",
    "REPLY_LOGIN_TIMEOUT",
    "REPLY_MAX_SESSION",
    "REPLY_OPERATOR_CLOSE",
    "REPLY_RETENTION_UNAVAILABLE",
    "REPLY_SHUTDOWN",
    "REPLY_STLS_ACTIVE",
    "REPLY_STLS_BEGIN",
    "REPLY_STLS_PIPELINED",
    "REPLY_STLS_STATE",
    "REPLY_STLS_UNAVAILABLE",
    "REPLY_TOO_MANY_BAD",
    "REPLY_UPSTREAM_BROKEN",
    "REPLY_UPSTREAM_LOST",
    "REPLY_UPSTREAM_TIMEOUT",
    "REPLY_UPSTREAM_UNAVAILABLE",
]

REPLY_UPSTREAM_UNAVAILABLE = b"-ERR [SYS/TEMP] Upstream POP3 server is unavailable\r\n"
REPLY_UPSTREAM_LOST = b"-ERR [SYS/TEMP] Connection to the upstream POP3 server was lost\r\n"
REPLY_UPSTREAM_BROKEN = b"-ERR [SYS/TEMP] Upstream POP3 server sent an invalid reply\r\n"
REPLY_SHUTDOWN = b"-ERR [SYS/TEMP] popguard is shutting down, try again later\r\n"
REPLY_IDLE = b"-ERR Disconnected for inactivity.\r\n"
REPLY_MAX_SESSION = b"-ERR Session time limit reached, disconnecting.\r\n"
#: An operator closed the session (``popguard kick``): no response code, as
#: nothing the client can do about it is temporary or permanent.
REPLY_OPERATOR_CLOSE = b"-ERR Disconnected by an administrator.\r\n"
#: ``session.login_timeout``: no response code, since RFC 3206 keeps [AUTH] for
#: credential problems (a client would ask the user for the password again).
REPLY_LOGIN_TIMEOUT = b"-ERR Login time limit reached, disconnecting.\r\n"
#: ``upstream.greeting_timeout``: the server accepted the connection, never greeted.
REPLY_UPSTREAM_TIMEOUT = b"-ERR [SYS/TEMP] Upstream POP3 server did not answer in time\r\n"
REPLY_TOO_MANY_BAD = b"-ERR Too many invalid commands, closing connection\r\n"
REPLY_STLS_UNAVAILABLE = b"-ERR STLS is not available through this proxy\r\n"
REPLY_STLS_BEGIN = b"+OK Begin TLS negotiation\r\n"
REPLY_STLS_ACTIVE = b"-ERR Already using TLS\r\n"
REPLY_STLS_STATE = b"-ERR STLS is only allowed before login\r\n"
REPLY_STLS_PIPELINED = b"-ERR STLS must not follow commands still in progress\r\n"
REPLY_IDENTITY_UNKNOWN = (
    b"-ERR [AUTH] popguard cannot tell which account this login opened, disconnecting\r\n"
)
REPLY_AUDIT_UNAVAILABLE = (
    b"-ERR [SYS/TEMP] The audit trail cannot record this deletion now, try again later\r\n"
)

#: A new connection while fail-closed auditing cannot write (the shell sends it).
REPLY_AUDIT_DOWN = b"-ERR [SYS/TEMP] popguard cannot write its audit trail, try again later\r\n"

#: Under ``retain``: no copy of the message could be archived, so its DELE
#: never reached the server (docs/retention.md).
REPLY_RETENTION_UNAVAILABLE = (
    b"-ERR [SYS/TEMP] The message cannot be archived now, so it was not deleted;"
    b" try again later\r\n"
)
