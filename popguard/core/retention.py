"""Retention as data: what the core asks the shell to archive, and when.

Under a ``retain`` policy a DELE may reach the server only once the
retention store holds a copy of that exact message (issue #15,
``docs/retention.md``).  The core never touches a disk: it hands the shell

* *archive events* (:meth:`ProxySession.take_archive_events`), in order:
  :class:`ArchiveBegin` when the body of a RETR starts (the client's own,
  or popguard's internal one), :class:`ArchiveData` with the message's
  bytes as RFC 5322 octets (dot-stuffing removed), :class:`ArchiveEnd`
  with its SHA-256 and size once the terminator has passed.  The shell
  streams them into a temporary file of the store; nothing is kept in
  memory.
* a *gate* (:attr:`ProxySession.pending_retention`, a
  :class:`RetentionGate`): a DELE is parked until the shell has made the
  copy durable and answers :meth:`ProxySession.retention_result`.  Only
  then is the DELE forwarded; if the copy cannot be made, it is refused
  with ``-ERR [SYS/TEMP]`` and never reaches the server.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ArchiveBegin",
    "ArchiveData",
    "ArchiveEnd",
    "ArchiveEvent",
    "RetentionGate",
]


@dataclass(frozen=True, slots=True)
class ArchiveBegin:
    """A copy of message ``msg`` begins (any earlier unfinished one is void)."""

    msg: int
    #: The canonical account (one Maildir per account).
    account: str
    uidl: str | None


@dataclass(frozen=True, slots=True)
class ArchiveData:
    """The next bytes of message ``msg``, unstuffed."""

    msg: int
    data: bytes


@dataclass(frozen=True, slots=True)
class ArchiveEnd:
    """The whole of message ``msg`` has been handed over."""

    msg: int
    #: Hex SHA-256 of the message's bytes, and their number.
    digest: str
    size: int


ArchiveEvent = ArchiveBegin | ArchiveData | ArchiveEnd


@dataclass(frozen=True, slots=True)
class RetentionGate:
    """A DELE waits: make the copy of ``msg`` durable, then answer."""

    msg: int
    account: str
    uidl: str | None
    digest: str
    size: int
