"""Activity per user and per UTC day, from a streamed trail.

``popguard audit report FILE... [--since ISO] [--until ISO] [--user U]
[--format table|json | --html OUT]``

For each (user, day): ``logins`` (``auth.succeeded``), ``failed_logins``
(``auth.failed``; the claimed user, or none), ``retrieved``
(``message.retrieved``), ``deleted`` (messages in ``deletions.committed``),
``discarded`` (messages in ``deletions.discarded``: marked for deletion,
kept by the server because the session ended without QUIT) and ``denied``
(``policy.denied``: an enforced policy rule refused something; dry-run
rules are not counted).  The HTML page (:mod:`popguard.trail.html`) is
drawn from the same counts.

Memory grows with the number of (user, day) pairs only.  A line with a
duplicate key is not counted under either of its values; it is counted in
``SkipLog.ambiguous`` instead, and the command exits 1.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Final, TextIO

from popguard.trail.query import safe_text
from popguard.trail.reader import SkipLog, iter_records, record_time

__all__ = [
    "Counts",
    "RecordHook",
    "Report",
    "Unusable",
    "build_report",
    "report_order",
    "write_json",
    "write_table",
]


@dataclass(slots=True)
class Counts:
    logins: int = 0
    failed_logins: int = 0
    retrieved: int = 0
    deleted: int = 0
    discarded: int = 0
    denied: int = 0

    def add(self, other: Counts) -> None:
        self.logins += other.logins
        self.failed_logins += other.failed_logins
        self.retrieved += other.retrieved
        self.deleted += other.deleted
        self.discarded += other.discarded
        self.denied += other.denied


#: (user or None, "YYYY-MM-DD") -> counts
Report = dict[tuple[str | None, str], Counts]

_COUNTED: Final = frozenset(
    {
        "auth.succeeded",
        "auth.failed",
        "message.retrieved",
        "deletions.committed",
        "deletions.discarded",
        "policy.denied",
    }
)

#: Called with each record the report keeps (counted, or in *watch*): its
#: file, line number, UTC time and the record itself.
RecordHook = Callable[[str, int, datetime.datetime, Mapping[str, Any]], None]


def _message_count(record: Mapping[str, Any]) -> int:
    messages = record.get("messages")
    return len(messages) if isinstance(messages, list) else 0


@dataclass(slots=True)
class Unusable:
    """Counted records that could not be placed on a day (no timestamp)."""

    count: int = 0


def build_report(
    paths: Iterable[str],
    *,
    since: datetime.datetime | None = None,
    until: datetime.datetime | None = None,
    skips: SkipLog | None = None,
    undated: Unusable | None = None,
    users: Collection[str] = (),
    watch: Collection[str] = (),
    each: RecordHook | None = None,
) -> Report:
    """Count activity per (user, UTC day) over the records in *paths*.

    Only records in [*since*, *until*) are counted, and with *users* only
    those whose ``user`` is one of them (exactly).  Lines that are not
    records, or have a duplicate key, are not counted; they are counted in
    *skips* (see :func:`~popguard.trail.reader.iter_records`).

    *each* is called for every counted record, and every record whose event
    is in *watch* that passes the same filters, in trail order: how the
    HTML page lists deletions in the same pass.
    """
    report: Report = {}
    for path, number, _data, record in iter_records(paths, skips):
        event = record.get("event")
        if not isinstance(event, str):
            continue  # (a list or object would not even hash)
        counted = event in _COUNTED
        if not counted and event not in watch:
            continue
        when = record_time(record)
        if when is None:
            if undated is not None:
                undated.count += 1
            continue
        if (since is not None and when < since) or (until is not None and when >= until):
            continue
        user = record.get("user")
        if users and not (isinstance(user, str) and user in users):
            continue
        if each is not None:
            each(path, number, when, record)
        if not counted:
            continue
        key = (user if isinstance(user, str) else None, when.date().isoformat())
        counts = report.get(key)
        if counts is None:
            counts = report[key] = Counts()
        if event == "auth.succeeded":
            counts.logins += 1
        elif event == "auth.failed":
            counts.failed_logins += 1
        elif event == "message.retrieved":
            counts.retrieved += 1
        elif event == "deletions.committed":
            counts.deleted += _message_count(record)
        elif event == "deletions.discarded":
            counts.discarded += _message_count(record)
        else:
            counts.denied += 1
    return report


def report_order(key: tuple[str | None, str]) -> tuple[bool, str, str]:
    """Sort key: by user (no user last), then day."""
    user, day = key
    return (user is None, user or "", day)


def write_json(report: Report, out: TextIO) -> None:
    """One JSON object per (user, day), by user then day."""
    for key in sorted(report, key=report_order):
        user, day = key
        row: dict[str, Any] = {"user": user, "day": day, **asdict(report[key])}
        out.write(json.dumps(row, ensure_ascii=True, separators=(",", ":")) + "\n")


_HEADER: Final = (
    "USER",
    "DAY",
    "LOGINS",
    "FAILED",
    "RETRIEVED",
    "DELETED",
    "DISCARDED",
    "DENIED",
)


def write_table(report: Report, out: TextIO) -> None:
    """An aligned table by user then day, with a total row."""
    rows: list[tuple[str, ...]] = []
    total = Counts()
    for key in sorted(report, key=report_order):
        user, day = key
        counts = report[key]
        total.add(counts)
        rows.append((safe_text(user) if user is not None else "-", day, *_numbers(counts)))
    rows.append(("TOTAL", "", *_numbers(total)))
    widths = [max(len(row[i]) for row in [_HEADER, *rows]) for i in range(len(_HEADER))]
    for row in [_HEADER, *rows]:
        cells = [
            cell.ljust(width) if i < 2 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        out.write("  ".join(cells).rstrip() + "\n")


def _numbers(counts: Counts) -> tuple[str, ...]:
    return (
        str(counts.logins),
        str(counts.failed_logins),
        str(counts.retrieved),
        str(counts.deleted),
        str(counts.discarded),
        str(counts.denied),
    )
