"""A realistic, hostile trail for the HTML report tests, and a DOM reader.

The sessions follow docs/audit.md: logins that succeed and fail, RETRs,
DELEs answered +OK, then QUIT (``deletions.committed``), a dropped
connection (``deletions.discarded``), a lost QUIT reply
(``deletions.unknown``), enforced and dry-run policy denials.  Some user
names and UIDLs are markup, quotes and control characters: an edited (or
hostile) trail must not be able to inject anything into the page.
"""

from __future__ import annotations

import datetime
import hashlib
import random
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from trail_helpers import seal_lines, stamp, write_lines

from popguard.trail.chain import Chain
from popguard.trail.query import safe_text
from popguard.trail.reader import iter_records, record_time

START = datetime.datetime(2026, 11, 24, 7, 0, 0, tzinfo=datetime.UTC)
#: The days sessions start on: 2026-11-26 is left empty (a gap in the charts).
DAYS = (0, 1, 3)

HOSTILE_USERS = (
    '"><img src=x onerror=alert(1)>',
    "</td></tr></table><script>alert(2)</script>",
    "eve\x1b[31m\u202e",
)
USERS = ("alice", "bob", "carol@example.com", "dävid", *HOSTILE_USERS)
HOSTILE_UIDL = "<svg onload=alert(3)>&amp;'\""
CLIENTS = ("192.0.2.10:50000", "198.51.100.7:41000", "[2001:db8::5]:6000")


def _session(rng: random.Random, when: datetime.datetime, user: str) -> list[dict[str, Any]]:
    """One session's records, without timestamps and common fields."""
    records: list[dict[str, Any]] = [
        {"event": "session.opened", "listener": "pop3"},
        {"event": "upstream.connected", "upstream": "127.0.0.1:110"},
    ]
    for _ in range(rng.randint(0, 2)):
        records.append(
            {
                "event": "auth.failed",
                "user": user if rng.random() < 0.7 else None,
                "login": user,
                "mechanism": "USER",
                "reply": "-ERR [AUTH] Authentication failed.",
            }
        )
    if rng.random() < 0.15:
        records.append(
            {
                "event": "policy.denied",
                "rule": "office-hours",
                "policy_file": "policies/hours.yaml:3",
                "setting": "networks",
                "mode": "enforce",
                "reason": "client network not allowed",
            }
        )
        records.append({"event": "session.closed", "reason": "policy_denied"})
        return records
    records.append({"event": "auth.succeeded", "user": user, "login": user, "mechanism": "USER"})
    marked = []
    for msg in range(1, rng.randint(1, 5)):
        uidl = HOSTILE_UIDL if rng.random() < 0.05 else f"{user[:3]}-{when:%m%d}-{msg:04d}"
        size = 900 + rng.randrange(9000)
        records.append(
            {
                "event": "message.retrieved",
                "user": user,
                "command": "RETR",
                "msg": msg,
                "uidl": uidl,
                "size": size,
                "bytes": size + 12,
            }
        )
        if rng.random() < 0.6:
            entry: dict[str, Any] = {"msg": msg, "uidl": uidl, "size": size}
            if rng.random() < 0.1:
                del entry["uidl"]  # a server without UIDL
            if rng.random() < 0.5:  # retrieved whole first: named by content too
                entry["digest"] = hashlib.sha256(f"{user} {msg} {size}".encode()).hexdigest()
            records.append({"event": "dele.marked", "user": user, **entry})
            marked.append(entry)
    if rng.random() < 0.2:
        denied = {"event": "policy.denied", "user": user, "command": "DELE"}
        records.append({**denied, "rule": "read-only", "mode": "enforce", "reason": "denied"})
    if rng.random() < 0.1:
        records.append({"event": "policy.dry_run", "user": user, "rule": "x", "mode": "dry-run"})
    ending = rng.random()
    if ending < 0.6:
        records.append({"event": "session.quit", "user": user, "state": "TRANSACTION", "ok": True})
        if marked:
            records.append({"event": "deletions.committed", "user": user, "messages": marked})
        records.append({"event": "session.closed", "user": user, "reason": "quit"})
    elif ending < 0.9:
        if marked:
            records.append(
                {
                    "event": "deletions.discarded",
                    "user": user,
                    "messages": marked,
                    "reason": "client_closed",
                }
            )
        records.append({"event": "session.closed", "user": user, "reason": "client_closed"})
    elif ending < 0.95:
        records.append({"event": "session.quit", "user": user, "state": "TRANSACTION", "ok": False})
        if marked:
            records.append(
                {
                    "event": "deletions.failed",
                    "user": user,
                    "messages": marked,
                    "reply": "-ERR [SYS/TEMP] Some deleted messages were not removed",
                }
            )
        records.append({"event": "session.closed", "user": user, "reason": "quit"})
    else:
        records.append({"event": "session.quit", "user": user, "state": "TRANSACTION"})
        if marked:
            records.append(
                {
                    "event": "deletions.unknown",
                    "user": user,
                    "messages": marked,
                    "reason": "upstream_closed",
                }
            )
        records.append({"event": "session.closed", "user": user, "reason": "upstream_closed"})
    return records


def compliance_records(
    sessions: int, *, seed: int = 13, users: tuple[str, ...] = USERS
) -> Iterator[dict[str, Any]]:
    """*sessions* sessions spread over :data:`DAYS`, in time order."""
    rng = random.Random(seed)
    per_day = -(-sessions // len(DAYS))
    made = 0
    for day in DAYS:
        when = START + datetime.timedelta(days=day)
        for _ in range(per_day):
            if made == sessions:
                return
            made += 1
            when += datetime.timedelta(minutes=rng.randint(1, 20))
            user = rng.choice(users)
            base = {
                "level": "info",
                "schema": 1,
                "instance": "popguard",
                "session": f"{rng.getrandbits(64):016x}",
                "client": rng.choice(CLIENTS),
            }
            for body in _session(rng, when, user):
                when += datetime.timedelta(seconds=rng.randint(1, 30))
                yield {"event": body.pop("event"), "timestamp": stamp(when), **base, **body}


def compliance_trail(
    directory: Path,
    *,
    sessions: int = 60,
    key: bytes | None = None,
    users: tuple[str, ...] = USERS,
) -> list[Path]:
    """audit.jsonl.1.gz and audit.jsonl: one chain, oldest first."""
    records = list(compliance_records(sessions, users=users))
    half = len(records) // 2
    chain = Chain(key=key, chain_id="w1")
    old = seal_lines(chain, records[:half], rotate_to="audit.jsonl")
    new = seal_lines(chain, records[half:], start="rotate", previous_file="audit.jsonl")
    return [
        write_lines(directory / "audit.jsonl.1.gz", old),
        write_lines(directory / "audit.jsonl", new),
    ]


# --------------------------------------------------------------------------
# Reading a page (as written, or as the browser's DOM)
# --------------------------------------------------------------------------


class Element:
    """One element: its tag, attributes, text (its own and its children's)."""

    def __init__(self, tag: str, attrs: dict[str, str | None], parent: Element | None) -> None:
        self.tag = tag
        self.attrs = attrs
        self.parent = parent
        self.children: list[Element] = []
        self.parts: list[str] = []

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def ancestors(self) -> Iterator[Element]:
        node = self.parent
        while node is not None:
            yield node
            node = node.parent

    def iter(self) -> Iterator[Element]:
        for child in self.children:
            yield child
            yield from child.iter()

    def find_all(self, tag: str | None = None, **attrs: str) -> list[Element]:
        """Descendants with *tag* whose attributes include *attrs* (``_`` for ``-``)."""
        wanted = {name.replace("_", "-"): value for name, value in attrs.items()}
        return [
            node
            for node in self.iter()
            if (tag is None or node.tag == tag)
            and all(node.attrs.get(name) == value for name, value in wanted.items())
        ]

    def one(self, tag: str | None = None, **attrs: str) -> Element:
        (found,) = self.find_all(tag, **attrs)
        return found


#: Elements that never have content (no end tag).
VOID = frozenset({"meta", "br", "hr", "img", "input", "link", "col", "area", "base", "wbr"})


class Dom(HTMLParser):
    """A small tree builder: enough to read the page back."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Element("#document", {}, None)
        self._node = self.root
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Element(tag, dict(attrs), self._node)
        self._node.children.append(node)
        if tag not in VOID:
            self._node = node

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._node.children.append(Element(tag, dict(attrs), self._node))

    def handle_endtag(self, tag: str) -> None:
        node: Element | None = self._node
        while node is not None and node.tag != tag:
            node = node.parent
        if node is not None and node.parent is not None:
            self._node = node.parent

    def handle_data(self, data: str) -> None:
        self._node.parts.append(data)
        for node in self._node.ancestors():
            node.parts.append(data)


# --------------------------------------------------------------------------
# What the page must show, worked out from the JSON report and the trail
# --------------------------------------------------------------------------

FIGURES = ("logins", "failed_logins", "retrieved", "deleted", "discarded", "denied")
CHART_SERIES = ("retrieved", "deleted", "discarded", "denied", "failed_logins")


def _user_key(user: object) -> str | None:
    """A JSON report user as the page names it (``None``: no user)."""
    return safe_text(user) if isinstance(user, str) else None


def _row_user(node: Element) -> str | None:
    if "data-no-user" in node.attrs:
        return None
    value = node.attrs["data-user"]
    assert value is not None
    return value


def _numbers(node: Element) -> dict[str, int]:
    """A table row's figures, by name."""
    return {
        td.attrs["data-figure"] or "": int(td.text)
        for td in node.find_all("td")
        if "data-figure" in td.attrs
    }


def check_figures(page: Element, rows: list[dict[str, Any]]) -> int:
    """Assert every figure on *page* equals what the JSON report *rows* add up
    to; returns how many numbers were compared."""
    compared = 0
    by_day: dict[str, dict[str, int]] = {}
    by_user: dict[str | None, dict[str, int]] = {}
    active: dict[str | None, int] = {}
    total = dict.fromkeys(FIGURES, 0)
    for row in rows:
        user = _user_key(row["user"])
        active[user] = active.get(user, 0) + 1
        for name in FIGURES:
            by_day.setdefault(row["day"], dict.fromkeys(FIGURES, 0))[name] += row[name]
            by_user.setdefault(user, dict.fromkeys(FIGURES, 0))[name] += row[name]
            total[name] += row[name]
    zero = dict.fromkeys(FIGURES, 0)
    days: list[str] = []
    if by_day:
        first = datetime.date.fromisoformat(min(by_day))
        last = datetime.date.fromisoformat(max(by_day))
        days = [
            (first + datetime.timedelta(days=n)).isoformat() for n in range((last - first).days + 1)
        ]

    # The charts: one figure per series, one bar per day.
    figures = page.find_all("figure")
    assert [f.attrs.get("data-series") for f in figures] == (list(CHART_SERIES) if days else [])
    for figure in figures:
        series = figure.attrs["data-series"]
        assert series is not None
        assert figure.find_all("svg"), "a chart without its SVG"
        bars = figure.find_all("rect", **{"class": "bar"})
        assert [bar.attrs["data-day"] for bar in bars] == days
        for bar in bars:
            value = by_day.get(bar.attrs["data-day"] or "", zero)[series]
            assert bar.attrs["data-value"] == str(value), (series, bar.attrs)
            assert bar.one("title").text == f"{bar.attrs['data-day']}: {value} " + (
                "failed logins" if series == "failed_logins" else series
            )
            compared += 1
        assert figure.attrs["data-total"] == str(total[series])
        assert figure.one("figcaption").text.endswith(f": {total[series]}")
        compared += 1

    # The table per day, and its total row.
    day_rows = [tr for tr in page.find_all("tr") if "data-day" in tr.attrs]
    assert [tr.attrs["data-day"] for tr in day_rows] == days
    for tr in day_rows:
        assert _numbers(tr) == by_day.get(tr.attrs["data-day"] or "", zero)
        compared += len(FIGURES)
    if days:
        (total_row,) = [tr for tr in page.find_all("tr") if "data-total" in tr.attrs]
        assert _numbers(total_row) == total
        compared += len(FIGURES)

    # The table per user.
    users_table = page.find_all("table", **{"class": "users"})
    user_rows = users_table[0].find_all("tr")[1:] if users_table else []
    assert len(user_rows) == len(by_user)
    for tr in user_rows:
        user = _row_user(tr)
        assert _numbers(tr) == by_user[user], user
        assert tr.find_all("td")[-1].text == str(active[user])
        compared += len(FIGURES) + 1
    assert {_row_user(tr) for tr in user_rows} == set(by_user)
    return compared


Deletion = tuple[str, str | None, str, str, str, str, str]
DELETION_RECORDS = ("deletions.committed", "deletions.failed", "deletions.unknown")


def expected_deletions(
    paths: list[Path],
    *,
    since: datetime.datetime | None = None,
    until: datetime.datetime | None = None,
    users: tuple[str, ...] = (),
) -> list[Deletion]:
    """(event, user, msg, uidl, size, digest, hash) for each message of each
    deletion record in the period, read straight from the trail."""
    rows: list[Deletion] = []
    for _path, _line, _data, record in iter_records([str(p) for p in paths]):
        if record.get("event") not in DELETION_RECORDS:
            continue
        when = record_time(record)
        assert when is not None
        if (since and when < since) or (until and when >= until):
            continue
        if users and record.get("user") not in users:
            continue
        for entry in record["messages"]:
            rows.append(
                (
                    record["event"],
                    _user_key(record.get("user")),
                    str(entry["msg"]),
                    safe_text(entry.get("uidl", "")),
                    str(entry["size"]),
                    safe_text(entry.get("digest", "")),
                    record.get("hash", ""),
                )
            )
    return rows


def page_deletions(page: Element) -> list[Deletion]:
    """The deletion rows as the page shows them."""
    section = page.one("section", id="deletions")
    rows: list[Deletion] = []
    for tr in section.find_all("tr"):
        if "data-event" not in tr.attrs:
            continue
        cells = tr.find_all("td")
        event = tr.attrs["data-event"]
        assert event is not None
        msg, uidl, size, digest, seal = (cells[i].text for i in (3, 4, 5, 6, 9))
        rows.append((event, _row_user(cells[1]), msg, uidl, size, digest, seal))
    return rows
