"""build_report(): activity per user and UTC day."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from trail_helpers import seal_lines, write_lines

from popguard.trail.chain import Chain
from popguard.trail.reader import SkipLog, parse_time
from popguard.trail.report import Counts, Unusable, build_report, write_json, write_table


def rec(event: str, stamp: str, **fields: Any) -> dict[str, Any]:
    return {"event": event, "timestamp": stamp, "level": "info", **fields}


DAY1 = "2026-11-26T{}Z"
DAY2 = "2026-11-27T{}Z"
MSGS = [{"msg": 1, "uidl": "a", "size": 1}, {"msg": 2, "uidl": "b", "size": 2}]
RECORDS = [
    rec("session.opened", DAY1.format("08:00:00.000000")),
    rec("auth.succeeded", DAY1.format("08:00:01.000000"), user="alice"),
    rec("message.retrieved", DAY1.format("08:00:02.000000"), user="alice", msg=1),
    rec("message.retrieved", DAY1.format("08:00:03.000000"), user="alice", msg=2),
    rec("deletions.committed", DAY1.format("08:00:04.000000"), user="alice", messages=MSGS),
    rec("auth.failed", DAY1.format("09:00:00.000000"), user="bob"),
    rec("auth.failed", DAY1.format("09:00:01.000000")),  # no user given
    rec("auth.failed", DAY1.format("09:00:02.000000"), user="bob"),
    # 23:59:59 at -01:00 is the next UTC day.
    rec("auth.succeeded", "2026-11-26T23:59:59.000000-01:00", user="alice"),
    rec("deletions.discarded", DAY2.format("01:00:00.000000"), user="alice", messages=[1, 2, 3]),
    rec("deletions.committed", DAY2.format("02:00:00.000000"), user="bob", messages=[7]),
    rec("dele.marked", DAY2.format("02:00:00.000000"), user="bob", msg=7),
    rec("auth.succeeded", "not a time", user="carol"),
]


def trail(tmp_path: Path) -> list[str]:
    chain = Chain(chain_id="w1")
    old = seal_lines(chain, RECORDS[:6], rotate_to="audit.jsonl")
    new = seal_lines(chain, RECORDS[6:], start="rotate")
    return [
        str(write_lines(tmp_path / "audit.jsonl.1.gz", old)),
        str(write_lines(tmp_path / "audit.jsonl", new)),
    ]


def test_counts_per_user_and_day(tmp_path: Path) -> None:
    undated = Unusable()
    report = build_report(trail(tmp_path), undated=undated)
    assert report == {
        ("alice", "2026-11-26"): Counts(logins=1, retrieved=2, deleted=2),
        ("bob", "2026-11-26"): Counts(failed_logins=2),
        (None, "2026-11-26"): Counts(failed_logins=1),
        ("alice", "2026-11-27"): Counts(logins=1, discarded=3),
        ("bob", "2026-11-27"): Counts(deleted=1),
    }
    assert undated.count == 1


def test_since_and_until(tmp_path: Path) -> None:
    report = build_report(
        trail(tmp_path), since=parse_time("2026-11-26T09:00:01Z"), until=parse_time("2026-11-27")
    )
    assert report == {
        ("bob", "2026-11-26"): Counts(failed_logins=1),
        (None, "2026-11-26"): Counts(failed_logins=1),
    }


def test_table(tmp_path: Path) -> None:
    out = io.StringIO()
    write_table(build_report(trail(tmp_path)), out)
    lines = out.getvalue().splitlines()
    assert lines[0].split() == [
        "USER",
        "DAY",
        "LOGINS",
        "FAILED",
        "RETRIEVED",
        "DELETED",
        "DISCARDED",
        "DENIED",
    ]
    assert [line.split() for line in lines[1:]] == [
        ["alice", "2026-11-26", "1", "0", "2", "2", "0", "0"],
        ["alice", "2026-11-27", "1", "0", "0", "0", "3", "0"],
        ["bob", "2026-11-26", "0", "2", "0", "0", "0", "0"],
        ["bob", "2026-11-27", "0", "0", "0", "1", "0", "0"],
        ["-", "2026-11-26", "0", "1", "0", "0", "0", "0"],
        ["TOTAL", "2", "3", "2", "3", "3", "0"],
    ]
    # Numbers are right-aligned under their headings.
    ends = [lines[0].index(h) + len(h) for h in ("LOGINS", "DISCARDED", "DENIED")]
    for line in lines[1:]:
        assert all(line[end - 1] != " " for end in ends), line


def test_json(tmp_path: Path) -> None:
    out = io.StringIO()
    write_json(build_report(trail(tmp_path)), out)
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert rows[0] == {
        "user": "alice",
        "day": "2026-11-26",
        "logins": 1,
        "failed_logins": 0,
        "retrieved": 2,
        "deleted": 2,
        "discarded": 0,
        "denied": 0,
    }
    assert rows[-1]["user"] is None
    assert len(rows) == 5


def test_empty_and_malformed_input(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text("garbage\n", encoding="utf-8")
    skips = SkipLog()
    report = build_report([str(path)], skips=skips)
    assert report == {}
    assert skips.count == 1
    out = io.StringIO()
    write_table(report, out)
    assert out.getvalue().splitlines()[-1].split() == ["TOTAL", "0", "0", "0", "0", "0", "0"]
