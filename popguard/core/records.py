"""Audit records as data.

The session core does not log: it *returns* records, the way mitmproxy's
layers return a ``Log`` command.  A test can therefore assert that one input
produced exactly one record, and the shell decides where records go
(structlog, files, syslog).

Every field value is a str, int, bool, None or a tuple/list of those, so any
sink can serialise it.  Strings that came from a peer have been through
``grammar.escape_text`` already.  No record ever carries a PASS argument, an
APOP digest or a SASL response.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field


class Event(enum.StrEnum):
    """Every event name the core emits.  ``docs/audit.md`` documents each."""

    SESSION_OPENED = "session.opened"
    SESSION_CLOSED = "session.closed"
    UPSTREAM_CONNECTED = "upstream.connected"
    UPSTREAM_FAILED = "upstream.failed"
    UPSTREAM_PROTOCOL_ERROR = "upstream.protocol_error"
    AUTH_SUCCEEDED = "auth.succeeded"
    AUTH_FAILED = "auth.failed"
    #: popguard refused a login whose account it cannot tell with certainty.
    AUTH_REFUSED = "auth.refused"
    COMMAND_REJECTED = "command.rejected"
    MESSAGE_RETRIEVED = "message.retrieved"
    DELE_MARKED = "dele.marked"
    DELE_REFUSED = "dele.refused"
    DELE_REQUESTED = "dele.requested"
    RSET = "dele.unmarked"
    QUIT = "session.quit"
    DELETIONS_COMMITTED = "deletions.committed"
    DELETIONS_FAILED = "deletions.failed"
    DELETIONS_DISCARDED = "deletions.discarded"
    DELETIONS_UNKNOWN = "deletions.unknown"
    TLS_ESTABLISHED = "tls.established"
    POLICY_DENIED = "policy.denied"
    POLICY_DRY_RUN = "policy.dry_run"
    POLICY_LOGIN_BLOCKED = "policy.login_blocked"
    #: An operator asked for the session to end (the admin listener's
    #: ``POST /sessions/ID/close``): who asked, and why.
    SESSION_CLOSE_REQUESTED = "session.close_requested"
    #: A ``retain`` policy applies to the session (after ``auth.succeeded``).
    RETENTION_ACTIVE = "retention.active"
    #: The retention store holds a copy of a message; its DELE goes on.
    MESSAGE_ARCHIVED = "message.archived"
    #: No copy could be made: the DELE was refused and never forwarded.
    RETENTION_FAILED = "retention.failed"


class EndReason(enum.StrEnum):
    """Why a session ended.  Only QUIT can ever lead to UPDATE."""

    QUIT = "quit"
    CLIENT_CLOSED = "client_closed"
    CLIENT_ERROR = "client_error"
    CLIENT_PROTOCOL_ERROR = "client_protocol_error"
    IDLE_TIMEOUT = "idle_timeout"
    UPSTREAM_UNREACHABLE = "upstream_unreachable"
    UPSTREAM_CLOSED = "upstream_closed"
    UPSTREAM_ERROR = "upstream_error"
    UPSTREAM_PROTOCOL_ERROR = "upstream_protocol_error"
    UPSTREAM_REFUSED = "upstream_refused"
    SHUTDOWN = "shutdown"
    INTERNAL_ERROR = "internal_error"
    #: A policy refused the session (a limit reached at login).
    POLICY_DENIED = "policy_denied"
    #: A policy's ``max_session`` ran out.
    MAX_SESSION = "max_session"
    #: The server accepted a login whose account popguard cannot tell.
    IDENTITY_UNKNOWN = "identity_unknown"
    #: ``session.login_timeout`` ran out before a login succeeded.
    LOGIN_TIMEOUT = "login_timeout"
    #: The upstream accepted the connection but sent no greeting within
    #: ``upstream.greeting_timeout``.
    UPSTREAM_TIMEOUT = "upstream_timeout"
    #: An operator closed the session (``popguard kick``), without QUIT.
    OPERATOR_CLOSE = "operator_close"


Scalar = str | int | bool | None
#: ``messages`` fields hold one mapping per message: msg, uidl, size.
FieldValue = Scalar | tuple[int, ...] | tuple[str, ...] | tuple[Mapping[str, Scalar], ...]


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One audit event: a name and its fields."""

    event: Event
    fields: Mapping[str, FieldValue] = field(default_factory=dict)

    def __getitem__(self, key: str) -> FieldValue:
        return self.fields[key]
