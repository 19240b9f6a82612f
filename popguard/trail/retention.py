"""``audit verify --retention DIR``: every deletion under retention has its copy.

The chain verifier (:mod:`popguard.trail.verify`) proves the records are
those popguard wrote; this module proves what they claim about the
retention store (issue #15, ``docs/retention.md``).  It streams the trail
once and, for every session with a ``retention.active`` record:

* every entry of its ``deletions.committed`` must carry ``digest`` and
  ``archived`` (``not_archived`` otherwise: the server deleted a message
  that the trail does not show was copied first);

and for those entries and for every ``message.archived`` record (in any
session):

* ``archived`` / ``path`` must name a message file in the Maildir of the
  session's user (``misplaced_copy`` if it is another account's);
* the file must exist under DIR (``missing_copy``), found by its Maildir
  base name in ``new/`` or ``cur/``, since a reader that opened the
  archive has moved and flagged it;
* the SHA-256 of the file must equal the record's ``digest``
  (``changed_copy``).

Every problem is reported (not just the first), each at the file and line
of the record that makes the claim.  Memory stays flat: what is kept is the
sessions still open at that point of the trail (each dropped at its
``session.closed``) and a bounded cache of file digests.  A session whose
``retention.active`` is in an older file that was not given is not known
to be under retention; its deletions are not checked (give the older
files too).
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

from popguard.retention.store import RetentionError, RetentionStore, account_dir, file_digest
from popguard.trail.reader import SkipLog, iter_records
from popguard.trail.verify import Kind, Problem

__all__ = ["RetentionSummary", "check_retention"]

RETENTION_ACTIVE: Final = "retention.active"
MESSAGE_ARCHIVED: Final = "message.archived"
DELETIONS_COMMITTED: Final = "deletions.committed"
SESSION_CLOSED: Final = "session.closed"
#: How many stored copies' digests are remembered, so a copy named by both
#: its ``message.archived`` and its ``deletions.committed`` is read once.
DIGEST_CACHE: Final = 4096


@dataclass(slots=True)
class RetentionSummary:
    """What the retention check covered."""

    #: Sessions with a ``retention.active`` record.
    sessions: int = 0
    #: Entries of ``deletions.committed`` in those sessions.
    deletions: int = 0
    #: ``message.archived`` records.
    archived: int = 0
    #: Distinct copies whose SHA-256 was computed.
    copies_read: int = 0
    problems: int = 0

    def to_json(self) -> dict[str, int]:
        return {
            "sessions": self.sessions,
            "deletions": self.deletions,
            "archived": self.archived,
            "copies_read": self.copies_read,
            "problems": self.problems,
        }


class _Checker:
    def __init__(self, store: RetentionStore, summary: RetentionSummary) -> None:
        self.store = store
        self.summary = summary
        #: Session id -> its user (None if the record named none), while open.
        self.active: dict[str, str | None] = {}
        self.digests: collections.OrderedDict[str, str | None] = collections.OrderedDict()

    def record(self, path: str, line: int, record: Mapping[str, Any]) -> Iterator[Problem]:
        event = record.get("event")
        session = record.get("session")
        if not isinstance(session, str):
            return
        if event == RETENTION_ACTIVE:
            if session not in self.active:
                self.summary.sessions += 1
            user = record.get("user")
            self.active[session] = user if isinstance(user, str) else None
        elif event == MESSAGE_ARCHIVED:
            self.summary.archived += 1
            yield from self.copy(
                path, line, record, record.get("path"), self.user_of(session, record)
            )
        elif event == DELETIONS_COMMITTED and session in self.active:
            yield from self.committed(path, line, record, self.user_of(session, record))
        elif event == SESSION_CLOSED:
            self.active.pop(session, None)

    def user_of(self, session: str, record: Mapping[str, Any]) -> str | None:
        user = record.get("user")
        if isinstance(user, str):
            return user
        return self.active.get(session)

    def committed(
        self, path: str, line: int, record: Mapping[str, Any], user: str | None
    ) -> Iterator[Problem]:
        messages = record.get("messages")
        if not isinstance(messages, list):
            yield Problem(Kind.NOT_ARCHIVED, path, line, "no list of messages to check")
            return
        for entry in messages:
            self.summary.deletions += 1
            if not isinstance(entry, dict):
                yield Problem(
                    Kind.NOT_ARCHIVED,
                    path,
                    line,
                    f"message {entry!r} was deleted under retention, and the record names "
                    "no archived copy",
                )
                continue
            archived = entry.get("archived")
            if not isinstance(archived, str):
                yield Problem(
                    Kind.NOT_ARCHIVED,
                    path,
                    line,
                    f"{_which(entry)} was deleted under retention, and the record names "
                    "no archived copy",
                )
                continue
            yield from self.copy(path, line, entry, archived, user, what=_which(entry))

    def copy(
        self,
        path: str,
        line: int,
        fields: Mapping[str, Any],
        relative: object,
        user: str | None,
        *,
        what: str = "the archived message",
    ) -> Iterator[Problem]:
        """Problems with the copy at *relative* that *fields* (``digest``) describe."""
        digest = fields.get("digest")
        if not isinstance(relative, str) or not relative:
            yield Problem(Kind.NOT_ARCHIVED, path, line, f"{what}: no path to its copy")
            return
        if not isinstance(digest, str):
            yield Problem(
                Kind.NOT_ARCHIVED, path, line, f"{what}: no digest to check its copy against"
            )
            return
        if user is not None:
            expected = _account_dir(user)
            owner = relative.split("/", 1)[0]
            if expected is not None and owner != expected:
                yield Problem(
                    Kind.MISPLACED_COPY,
                    path,
                    line,
                    f"{what}: its copy {relative!r} is not in the Maildir of {user!r} "
                    f"({expected}/)",
                )
                return
        found, error = self.digest_of(relative)
        if found is None:
            detail = f"{what}: its copy {relative!r} is not in the retention store"
            if error:
                detail += f" ({error})"
            yield Problem(Kind.MISSING_COPY, path, line, detail)
        elif found != digest.lower():
            yield Problem(
                Kind.CHANGED_COPY,
                path,
                line,
                f"{what}: its copy {relative!r} has SHA-256 {found}, the record says {digest}",
            )

    def digest_of(self, relative: str) -> tuple[str | None, str]:
        """The SHA-256 of the copy at *relative* (None if absent), and why not."""
        if relative in self.digests:
            self.digests.move_to_end(relative)
            return self.digests[relative], ""
        error = ""
        digest: str | None = None
        try:
            located = self.store.locate(relative)
            if located is not None:
                digest = file_digest(located)
                self.summary.copies_read += 1
        except RetentionError as exc:
            error = exc.reason
        except OSError as exc:
            error = f"cannot read it: {os.strerror(exc.errno) if exc.errno else exc}"
        if not error:
            self.digests[relative] = digest
            while len(self.digests) > DIGEST_CACHE:
                self.digests.popitem(last=False)
        return digest, error


def _which(entry: Mapping[str, Any]) -> str:
    msg = entry.get("msg")
    uidl = entry.get("uidl")
    text = f"message {msg}" if msg is not None else "a message"
    return f"{text} (uidl {uidl!r})" if isinstance(uidl, str) else text


def _account_dir(user: str) -> str | None:
    try:
        return account_dir(user)
    except RetentionError:
        return None


def check_retention(
    paths: Iterable[str],
    root: str | os.PathLike[str],
    summary: RetentionSummary,
    *,
    skips: SkipLog | None = None,
) -> Iterator[Problem]:
    """The retention problems in the trail *paths* (oldest first) against *root*.

    Streams: each problem is yielded as its record is read, and *summary*
    is filled in as the trail goes.  ``RetentionError`` if *root* is not a
    directory; ``OSError`` for a trail file that cannot be read.  Lines that
    are not records are counted in *skips* (the chain verifier reports them).
    """
    store = RetentionStore(root, create=False)
    checker = _Checker(store, summary)
    for path, line, _data, record in iter_records(paths, skips):
        for problem in checker.record(path, line, record):
            summary.problems += 1
            yield problem
