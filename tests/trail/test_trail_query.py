"""query(): every filter, JSON-lines and table output."""

from __future__ import annotations

import datetime
import gzip
import io
import json
from pathlib import Path
from typing import Any

import pytest
from trail_helpers import rotated_trail, seal_lines, write_lines

from popguard.trail.chain import Chain
from popguard.trail.cli import main
from popguard.trail.query import (
    ClientMatcher,
    Filter,
    client_host,
    compact_rest,
    message_digests,
    message_uidls,
    parse_digest,
    query,
    safe_text,
    write_json,
    write_table,
)
from popguard.trail.reader import SkipLog, parse_time

T = "2026-11-{day:02d}T{hour:02d}:00:00.000000Z"


def rec(event: str, *, day: int = 26, hour: int = 10, **fields: Any) -> dict[str, Any]:
    return {"event": event, "timestamp": T.format(day=day, hour=hour), "level": "info", **fields}


RECORDS = [
    rec("session.opened", session="s1", client="192.0.2.10:50000", listener="pop3", hour=9),
    rec("auth.succeeded", session="s1", client="192.0.2.10:50000", user="alice", hour=9),
    rec(
        "message.retrieved",
        session="s1",
        client="192.0.2.10:50000",
        user="alice",
        msg=1,
        uidl="UID-A1",
        size=100,
        bytes=110,
    ),
    rec(
        "deletions.committed",
        session="s1",
        client="192.0.2.10:50000",
        user="alice",
        messages=[{"msg": 1, "uidl": "UID-A1", "size": 100}, {"msg": 2, "uidl": "UID-A2"}],
    ),
    rec("auth.failed", session="s2", client="[2001:db8::5]:6000", user="bob", day=27),
    rec(
        "deletions.discarded",
        session="s3",
        client="[::ffff:198.51.100.7]:41000",
        user="carol",
        messages=[3, 4],
        reason="client_closed",
        day=27,
        hour=12,
    ),
    rec("popguard.started", upstream="127.0.0.1:110", day=28),
]


@pytest.fixture
def trail(tmp_path: Path) -> list[str]:
    """The records above, sealed, split over a gzip'd rotated file and the live one."""
    chain = Chain(chain_id="w1")
    old = seal_lines(chain, RECORDS[:4], rotate_to="audit.jsonl")
    new = seal_lines(chain, RECORDS[4:], start="rotate")
    return [
        str(write_lines(tmp_path / "audit.jsonl.1.gz", old)),
        str(write_lines(tmp_path / "audit.jsonl", new)),
    ]


def events(paths: list[str], **kwargs: Any) -> list[str]:
    return [record["event"] for _line, record in query(paths, Filter(**kwargs))]


def test_no_filter_gives_everything_in_order(trail: list[str]) -> None:
    got = events(trail)
    assert got[1:5] == [r["event"] for r in RECORDS[:4]]
    assert got[0] == got[6] == "audit.chain.start"
    assert got[5] == "audit.chain.rotate"
    assert got[7:] == [r["event"] for r in RECORDS[4:]]


def test_user(trail: list[str]) -> None:
    assert events(trail, users=("alice",)) == [
        "auth.succeeded",
        "message.retrieved",
        "deletions.committed",
    ]
    assert events(trail, users=("bob", "carol")) == ["auth.failed", "deletions.discarded"]
    assert events(trail, users=("Alice",)) == []


def test_event_globs(trail: list[str]) -> None:
    assert events(trail, events=("deletions.*",)) == ["deletions.committed", "deletions.discarded"]
    assert events(trail, events=("auth.failed", "session.*")) == ["session.opened", "auth.failed"]
    assert events(trail, events=("auth",)) == []


def test_uidl_matches_single_and_listed_messages(trail: list[str]) -> None:
    assert events(trail, uidls=("UID-A1",)) == ["message.retrieved", "deletions.committed"]
    assert events(trail, uidls=("UID-A2",)) == ["deletions.committed"]
    assert events(trail, uidls=("3",)) == []  # plain message numbers carry no UIDL


S1 = ["session.opened", "auth.succeeded", "message.retrieved", "deletions.committed"]


@pytest.mark.parametrize(
    ("client", "expected"),
    [
        ("192.0.2.10", S1),
        ("192.0.2.0/24", S1),
        ("192.0.2.10:50000", S1),
        ("192.0.2.10:1", []),
        ("2001:db8::/32", ["auth.failed"]),
        ("[2001:db8::5]", ["auth.failed"]),
        ("[2001:db8::5]:6000", ["auth.failed"]),
        ("198.51.100.0/24", ["deletions.discarded"]),  # seen as ::ffff:198.51.100.7
        ("10.0.0.0/8", []),
    ],
)
def test_client(trail: list[str], client: str, expected: list[str]) -> None:
    assert events(trail, clients=(ClientMatcher.parse(client),)) == expected


def test_client_matcher_rejects_names() -> None:
    for bad in ("example.com", "host:110", "192.0.2.300", "10.0.0.0/33"):
        with pytest.raises(ValueError, match=r"address|network|netmask"):
            ClientMatcher.parse(bad)
    assert client_host("[::1]:5") == "::1"
    assert client_host("::1") == "::1"
    assert client_host("192.0.2.1:5") == "192.0.2.1"
    assert not ClientMatcher.parse("::1").matches(None)
    assert not ClientMatcher.parse("::1").matches("not an address")


def test_session(trail: list[str]) -> None:
    assert events(trail, sessions=("s1",)) == [r["event"] for r in RECORDS[:4]]
    assert events(trail, sessions=("s2", "s3")) == ["auth.failed", "deletions.discarded"]


def test_since_and_until(trail: list[str]) -> None:
    since = parse_time("2026-11-27")
    until = parse_time("2026-11-27T12:00:00Z")
    assert events(trail, since=since, events=("[!a]*", "auth.*")) == [
        "auth.failed",
        "deletions.discarded",
        "popguard.started",
    ]
    assert events(trail, until=until, since=since, events=("[!a]*", "auth.*")) == ["auth.failed"]
    # Offsets are honoured: 13:00+01:00 is 12:00Z, inclusive.
    assert events(trail, since=parse_time("2026-11-27T13:00:00+01:00"), users=("carol",)) == [
        "deletions.discarded"
    ]


def test_flags_combine_with_and(trail: list[str]) -> None:
    assert events(trail, users=("alice",), events=("message.*",), uidls=("UID-A1",)) == [
        "message.retrieved"
    ]
    assert events(trail, users=("bob",), events=("message.*",)) == []


def test_parse_time() -> None:
    utc = datetime.UTC
    assert parse_time("2026-11-26") == datetime.datetime(2026, 11, 26, tzinfo=utc)
    assert parse_time("2026-11-26T08:30") == datetime.datetime(2026, 11, 26, 8, 30, tzinfo=utc)
    assert parse_time("2026-11-26T08:30:00.5Z").microsecond == 500000
    with pytest.raises(ValueError, match="isoformat"):
        parse_time("yesterday")


def test_message_uidls() -> None:
    assert list(message_uidls({"uidl": "a", "messages": [{"uidl": "b"}, 3, {"msg": 4}]})) == [
        "a",
        "b",
    ]


def test_json_output_is_the_original_lines(trail: list[str], tmp_path: Path) -> None:
    out = io.StringIO()
    assert write_json(query(trail, Filter(users=("alice",))), out) == 3
    lines = out.getvalue().splitlines()
    originals = set((tmp_path / "audit.jsonl").read_text().splitlines())
    with gzip.open(tmp_path / "audit.jsonl.1.gz", "rt") as f:
        originals |= set(f.read().splitlines())
    assert all(line in originals for line in lines)
    assert [json.loads(line)["user"] for line in lines] == ["alice"] * 3


def test_json_output_neutralises_terminal_controls(tmp_path: Path) -> None:
    path = tmp_path / "evil.jsonl"
    path.write_text('{"event":"x","user":"\u009b31m"}\n', encoding="utf-8")
    out = io.StringIO()
    write_json(query([str(path)], Filter()), out)
    assert "\u009b" not in out.getvalue()
    assert json.loads(out.getvalue())["user"] == "\u009b31m"


def test_table_output(trail: list[str]) -> None:
    out = io.StringIO()
    count = write_table(query(trail, Filter(sessions=("s1", "s3"))), out)
    lines = out.getvalue().splitlines()
    assert count == 5
    assert lines[0].split() == ["TIMESTAMP", "EVENT", "USER", "CLIENT", "SESSION", "DETAILS"]
    header_cols = [lines[0].index(name) for name in ("EVENT", "USER", "CLIENT", "SESSION")]
    for line in lines[1:]:
        for col in header_cols:  # every cell starts under its heading
            assert line[col - 2 : col] == "  ", line
            assert line[col] != " ", line
    retrieved = next(line for line in lines if "message.retrieved" in line)
    assert "2026-11-26T10:00:00.000000Z" in retrieved
    assert "bytes=110 msg=1 size=100 uidl=UID-A1" in retrieved  # render() sorts keys
    assert "chain=" not in retrieved
    assert "hash=" not in retrieved
    assert "level=" not in retrieved
    opened = next(line for line in lines if "session.opened" in line)
    assert " - " in opened  # no user yet
    discarded = next(line for line in lines if "deletions.discarded" in line)
    assert "messages=[3,4] reason=client_closed" in discarded


def test_table_output_with_no_rows() -> None:
    out = io.StringIO()
    assert write_table(iter(()), out) == 0
    assert out.getvalue().split() == ["TIMESTAMP", "EVENT", "USER", "CLIENT", "SESSION", "DETAILS"]


def test_table_widths_come_from_the_first_rows_only() -> None:
    rows = [(b"", {"event": "e", "user": "u" * n}) for n in (1, 2, 30)]
    out = io.StringIO()
    write_table(iter(rows), out, probe=2)
    lines = out.getvalue().splitlines()
    assert lines[3].count("u") == 30  # wider than its column, still whole


def test_compact_rest_and_safe_text() -> None:
    assert compact_rest({"event": "x", "reply": "-ERR no such message", "ok": True}) == (
        'reply="-ERR no such message" ok=true'
    )
    assert compact_rest({"level": "warning", "n": None}) == "level=warning n=null"
    assert safe_text("a\x1b[2Jb\u009b") == "a\\x1b[2Jb\\x9b"
    assert safe_text("plain") == "plain"


def test_malformed_lines_are_skipped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text(
        '{"event":"a"}\nnot json\n\n[1]\n{"event":"b"}\n{"event":"c"}', encoding="utf-8"
    )
    skips = SkipLog()
    assert [r["event"] for _l, r in query([str(path)], Filter(), skips=skips)] == ["a", "b", "c"]
    assert skips.count == 2
    assert [s.line for s in skips.samples] == [2, 4]


def test_query_reads_rotated_gzip_trails(tmp_path: Path) -> None:
    paths = rotated_trail(tmp_path)
    assert len(list(query([str(p) for p in paths], Filter()))) == 65


# --------------------------------------------------------------------------
# Finding one message by digest or UIDL (retention, docs/retention.md)
# --------------------------------------------------------------------------

D1 = "1f" * 32
D2 = "2e" * 32
RETAINED = [
    rec("retention.active", session="r1", user="alice"),
    rec(
        "message.archived",
        session="r1",
        user="alice",
        msg=1,
        uidl="UID-R1",
        size=10,
        digest=D1,
        path=f"alice/new/{D1}.u5549442d5231",
        stored=True,
    ),
    rec("dele.marked", session="r1", user="alice", msg=1, uidl="UID-R1", digest=D1),
    rec("retention.failed", session="r1", user="alice", msg=2, uidl="UID-R2", reason="x"),
    rec(
        "deletions.committed",
        session="r1",
        user="alice",
        messages=[{"msg": 1, "uidl": "UID-R1", "digest": D1}, {"msg": 3, "digest": D2}],
    ),
    rec("message.retrieved", session="r2", user="bob", msg=1, uidl="UID-R1", digest=D2),
]


@pytest.fixture
def retained(tmp_path: Path) -> list[str]:
    return [str(write_lines(tmp_path / "audit.jsonl", seal_lines(Chain(chain_id="w1"), RETAINED)))]


def test_digest_finds_every_record_naming_the_message(retained: list[str]) -> None:
    assert events(retained, digests=(D1,)) == [
        "message.archived",
        "dele.marked",
        "deletions.committed",
    ]
    assert events(retained, digests=(D2,)) == ["deletions.committed", "message.retrieved"]
    assert events(retained, digests=("00" * 32,)) == []
    # Digest and UIDL together: that message of that mailbox only.
    assert events(retained, digests=(D2,), uidls=("UID-R1",)) == ["message.retrieved"]


def test_uidl_finds_archive_and_retention_records(retained: list[str]) -> None:
    assert events(retained, uidls=("UID-R1",)) == [
        "message.archived",
        "dele.marked",
        "deletions.committed",
        "message.retrieved",
    ]
    assert events(retained, uidls=("UID-R2",)) == ["retention.failed"]


def test_parse_digest_and_message_digests() -> None:
    assert parse_digest(f" {D1.upper()} ") == D1
    for bad in ("", "1f" * 31, "1f" * 33, "zz" * 32, D1 + " x"):
        with pytest.raises(ValueError, match="64 hex digits"):
            parse_digest(bad)
    record = {"digest": D1.upper(), "messages": [{"digest": D2}, {"msg": 4}, 5]}
    assert list(message_digests(record)) == [D1, D2]


def test_query_cli_by_digest(retained: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "query", "--digest", D1.upper(), *retained]) == 0
    out = capsys.readouterr().out
    assert [json.loads(line)["event"] for line in out.splitlines()] == [
        "message.archived",
        "dele.marked",
        "deletions.committed",
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(["audit", "query", "--digest", "abc", *retained])
    assert exit_info.value.code == 2
    assert "invalid digest" in capsys.readouterr().err
