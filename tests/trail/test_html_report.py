"""``popguard audit report --html``: the page's structure, figures and safety.

The page is read back with a small HTML tree builder (html_helpers.Dom);
test_html_browser.py reads Chromium's DOM of the same pages.
"""

from __future__ import annotations

import base64
import datetime
import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from html_helpers import (
    HOSTILE_UIDL,
    HOSTILE_USERS,
    Dom,
    check_figures,
    compliance_trail,
    expected_deletions,
    page_deletions,
)
from trail_helpers import KEY, key_file, read_lines, seal_lines, stamp, write_lines

from popguard.trail.chain import Chain, render, start_record
from popguard.trail.html import (
    CHARTS,
    CONTENT_SECURITY_POLICY,
    STYLESHEET,
    build_page,
    per_day,
    render_chart,
)
from popguard.trail.query import safe_text
from popguard.trail.reader import parse_time
from popguard.trail.report import Counts, build_report

ROOT = Path(__file__).resolve().parents[2]
GENERATED = datetime.datetime(2026, 12, 1, 9, 30, tzinfo=datetime.UTC)


def popguard(*argv: str) -> subprocess.CompletedProcess[str]:
    """The real command line, in a child process."""
    return subprocess.run(
        [sys.executable, "-m", "popguard", "audit", "report", *argv],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )


def names(paths: list[Path]) -> list[str]:
    return [str(p) for p in paths]


def html_and_json(paths: list[Path], out: Path, *flags: str) -> tuple[str, list[dict[str, Any]]]:
    """The page and the JSON report for the same files and flags."""
    done = popguard("--html", str(out), *flags, *names(paths))
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    rows = popguard("--format", "json", *flags, *names(paths))
    assert rows.returncode == 0, rows.stderr
    return out.read_text(encoding="utf-8"), [json.loads(line) for line in rows.stdout.splitlines()]


@pytest.fixture
def trail(tmp_path: Path) -> list[Path]:
    return compliance_trail(tmp_path)


# --------------------------------------------------------------------------
# Figures and structure
# --------------------------------------------------------------------------


def test_figures_equal_the_json_report(trail: list[Path], tmp_path: Path) -> None:
    text, rows = html_and_json(trail, tmp_path / "report.html")
    page = Dom(text).root
    compared = check_figures(page, rows)
    assert compared > 100
    # The trail is realistic: every figure occurs.
    assert all(sum(row[name] for row in rows) > 0 for name in Counts.__slots__)
    assert page_deletions(page) == expected_deletions(trail)


@pytest.mark.parametrize(
    "flags",
    [
        ("--since", "2026-11-25", "--until", "2026-11-27T12:00Z"),
        ("--user", "alice", "--user", HOSTILE_USERS[1]),
        ("--since", "2026-11-25T10:00:00+02:00", "--user", "bob"),
    ],
    ids=["period", "users", "both"],
)
def test_filters_apply_to_every_part(
    trail: list[Path], tmp_path: Path, flags: tuple[str, ...]
) -> None:
    text, rows = html_and_json(trail, tmp_path / "report.html", *flags)
    page = Dom(text).root
    assert rows
    check_figures(page, rows)
    since = parse_time(flags[flags.index("--since") + 1]) if "--since" in flags else None
    until = parse_time(flags[flags.index("--until") + 1]) if "--until" in flags else None
    users = tuple(flags[i + 1] for i, flag in enumerate(flags) if flag == "--user")
    expected = expected_deletions(trail, since=since, until=until, users=users)
    assert expected
    assert page_deletions(page) == expected
    # The verification covers the files whole, whatever the filters.
    assert page.one("section", id="verification").attrs["data-status"] == "verified"


def test_sections_in_order_and_charts_complete(trail: list[Path], tmp_path: Path) -> None:
    text, _rows = html_and_json(trail, tmp_path / "report.html")
    page = Dom(text).root
    sections = [s.attrs["id"] for s in page.find_all("section")]
    assert sections == ["verification", "days", "users", "deletions"]
    figures = page.find_all("figure")
    assert [f.attrs["data-series"] for f in figures] == [s.field for s in CHARTS]
    # Every day from the first to the last: 2026-11-26 had no sessions.
    for figure in figures:
        days = [bar.attrs["data-day"] for bar in figure.find_all("rect")]
        assert days == ["2026-11-24", "2026-11-25", "2026-11-26", "2026-11-27"]
        assert figure.find_all("rect", data_day="2026-11-26")[0].attrs["data-value"] == "0"
    deletions = page.one("section", id="deletions")
    committed = [tr for tr in deletions.find_all("tr") if tr.attrs.get("data-event")]
    assert int(deletions.attrs["data-messages"] or "") == len(committed)
    assert {tr.attrs["data-event"] for tr in committed} == {
        "deletions.committed",
        "deletions.failed",
        "deletions.unknown",
    }


def test_chart_bars_are_to_scale() -> None:
    days = [
        ("2026-11-01", Counts(retrieved=0)),
        ("2026-11-02", Counts(retrieved=7)),
        ("2026-11-03", Counts(retrieved=20)),
    ]
    chart = Dom(render_chart(CHARTS[0], days)).root
    heights = [float(bar.attrs["height"] or "") for bar in chart.find_all("rect")]
    # The scale's top is 20 (1, 2 or 5 times a power of ten): 20 fills it.
    labels = [t.text for t in chart.find_all("text") if t.attrs.get("text-anchor") == "end"]
    assert labels == ["0", "10", "20"]
    assert heights[0] == 0
    assert heights[2] == pytest.approx(heights[1] * 20 / 7, abs=0.02)
    tops = [
        float(bar.attrs["y"] or "") + h
        for bar, h in zip(chart.find_all("rect"), heights, strict=True)
    ]
    assert len(set(tops)) == 1  # every bar stands on the axis


def test_per_day_fills_gaps_and_sums_users() -> None:
    report = {
        ("alice", "2026-11-28"): Counts(logins=1, retrieved=2),
        ("bob", "2026-11-28"): Counts(retrieved=3, denied=1),
        (None, "2026-11-30"): Counts(failed_logins=4),
    }
    assert per_day(report) == [
        ("2026-11-28", Counts(logins=1, retrieved=5, denied=1)),
        ("2026-11-29", Counts()),
        ("2026-11-30", Counts(failed_logins=4)),
    ]
    assert per_day({}) == []


def test_denials_users_and_hook_in_build_report(tmp_path: Path) -> None:
    def rec(event: str, hh: int, **fields: Any) -> dict[str, Any]:
        return {"event": event, "timestamp": f"2026-11-26T{hh:02d}:00:00.000000Z", **fields}

    records = [
        rec("policy.denied", 8, mode="enforce", reason="network"),  # before login: no user
        rec("policy.denied", 9, user="bob", mode="enforce", command="DELE"),
        rec("policy.dry_run", 9, user="bob", mode="dry-run", command="DELE"),
        rec("deletions.unknown", 10, user="bob", messages=[{"msg": 1}]),
        rec("deletions.committed", 11, user="alice", messages=[{"msg": 2}]),
        rec("auth.succeeded", 12, user=["not", "a", "name"]),
        {"event": ["not", "an", "event"], "timestamp": "2026-11-26T12:00:00Z"},
    ]
    path = write_lines(tmp_path / "audit.jsonl", [json.dumps(r) for r in records])
    seen: list[tuple[int, str]] = []
    report = build_report(
        [str(path)],
        watch={"deletions.unknown"},
        each=lambda _p, line, _w, record: seen.append((line, str(record["event"]))),
    )
    assert report == {
        (None, "2026-11-26"): Counts(denied=1, logins=1),
        ("bob", "2026-11-26"): Counts(denied=1),
        ("alice", "2026-11-26"): Counts(deleted=1),
    }
    assert seen == [
        (1, "policy.denied"),
        (2, "policy.denied"),
        (4, "deletions.unknown"),
        (5, "deletions.committed"),
        (6, "auth.succeeded"),
    ]
    only_bob = build_report([str(path)], users=frozenset({"bob"}))
    assert only_bob == {("bob", "2026-11-26"): Counts(denied=1)}


def test_an_empty_period_says_so(trail: list[Path], tmp_path: Path) -> None:
    text, rows = html_and_json(trail, tmp_path / "r.html", "--since", "2030-01-01")
    assert rows == []
    page = Dom(text).root
    assert "No activity in this period." in page.one("section", id="days").text
    assert page.find_all("figure") == []
    assert page.one("section", id="deletions").attrs["data-messages"] == "0"
    assert page.one("section", id="verification").attrs["data-status"] == "verified"


# --------------------------------------------------------------------------
# Verification at the top
# --------------------------------------------------------------------------


def test_tampering_is_shown_first_and_exits_1(trail: list[Path], tmp_path: Path) -> None:
    lines = read_lines(trail[1])
    del lines[7]  # a record removed from the newest file
    write_lines(trail[1], lines)
    out = tmp_path / "report.html"
    done = popguard("--html", str(out), *names(trail))
    assert done.returncode == 1
    assert f"chain verification FAILED: {trail[1]}:8: deleted:" in done.stderr
    page = Dom(out.read_text(encoding="utf-8")).root
    first = page.find_all("section")[0]
    assert first.attrs["id"] == "verification"
    assert first.attrs["data-status"] == "tampered"
    assert first.one("p", data_problem="deleted").text.startswith(f"deleted at {trail[1]}:8: ")
    files = {
        tr.find_all("td")[0].text: tr.find_all("td")[1].text
        for tr in first.one("table", **{"class": "files"}).find_all("tr")[1:]
    }
    assert files == {str(trail[0]): "verified", str(trail[1]): "problem at line 8"}


def test_a_keyed_trail_needs_its_key(tmp_path: Path) -> None:
    trail = compliance_trail(tmp_path, key=KEY)
    out = tmp_path / "report.html"
    done = popguard("--html", str(out), *names(trail))
    assert done.returncode == 0, done.stderr
    assert "not verified (HMAC-sealed; give --key-file)" in done.stderr
    section = Dom(out.read_text(encoding="utf-8")).root.one("section", id="verification")
    assert section.attrs["data-status"] == "unverified"

    done = popguard("--html", str(out), "--key-file", str(key_file(tmp_path)), *names(trail))
    assert done.returncode == 0, done.stderr
    section = Dom(out.read_text(encoding="utf-8")).root.one("section", id="verification")
    assert section.attrs["data-status"] == "verified"
    assert "hmac-sha256" in section.text
    assert "Sealed without a key" not in section.text


def test_a_checkpoint_the_trail_lacks_is_tampering(trail: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    forged = "w1:9999:" + "ab" * 32
    done = popguard("--html", str(out), "--checkpoint", forged, *names(trail))
    assert done.returncode == 1
    section = Dom(out.read_text(encoding="utf-8")).root.one("section", id="verification")
    assert section.attrs["data-status"] == "tampered"


# --------------------------------------------------------------------------
# Safety: hostile trail contents, no external references
# --------------------------------------------------------------------------

#: Every element the page uses; anything else got in from the trail.
PAGE_TAGS = {
    "html", "head", "meta", "title", "style", "body", "header", "h1", "h2", "p", "section",
    "table", "thead", "tbody", "tfoot", "tr", "th", "td", "code", "strong", "em", "span", "ul",
    "li", "div", "figure", "figcaption", "svg", "line", "text", "rect",
}  # fmt: skip


def test_hostile_names_and_uidls_stay_text(trail: list[Path], tmp_path: Path) -> None:
    text, _rows = html_and_json(trail, tmp_path / "report.html")
    page = Dom(text).root
    assert {node.tag for node in page.iter()} <= PAGE_TAGS
    assert not [
        (node.tag, name) for node in page.iter() for name in node.attrs if name.startswith("on")
    ]
    for raw in ("<script", "<img", "<svg onload", "\x1b", "\u202e"):
        assert raw not in text
    users = {tr.attrs.get("data-user") for tr in page.one("section", id="users").find_all("tr")}
    assert {safe_text(user) for user in HOSTILE_USERS} <= users
    assert "eve\\x1b[31m\\u202e" in users
    uidls = {row[3] for row in page_deletions(page)}
    assert HOSTILE_UIDL in uidls


def test_hostile_file_names_and_skipped_lines_stay_text(tmp_path: Path) -> None:
    directory = tmp_path / "<b onmouseover='x'>\"&amp;"  # no '/' in a name
    directory.mkdir()
    chain = Chain(chain_id="w1")
    record = {"event": "auth.failed", "timestamp": stamp(GENERATED), "user": "<i>u</i>"}
    lines = seal_lines(chain, [record])
    lines.insert(1, "<script>not json</script>")
    path = write_lines(directory / "audit.jsonl", lines)
    out = io.StringIO()
    build_page([str(path)], out, key=None, generated=GENERATED)
    text = out.getvalue()
    page = Dom(text).root
    assert {node.tag for node in page.iter()} <= PAGE_TAGS
    assert page.one("section", id="verification").attrs["data-status"] == "tampered"
    assert str(path) in page.one("section", id="verification").text
    assert "<script>not json</script>" not in text
    assert "1 lines are not records" in page.one("section", id="warnings").text


def test_no_external_references(trail: list[Path], tmp_path: Path) -> None:
    text, _rows = html_and_json(trail, tmp_path / "report.html")
    assert "http://" not in text
    assert "https://" not in text
    page = Dom(text).root
    linking = {"src", "href", "xlink:href", "srcset", "action", "poster", "data"}
    assert not [(n.tag, a) for n in page.iter() for a in n.attrs if a in linking]
    assert "url(" not in STYLESHEET
    assert "@import" not in STYLESHEET
    assert not re.search(r"""(src|href)\s*=\s*["']?//""", text)


def test_csp_allows_the_stylesheet_by_hash_and_nothing_else(
    trail: list[Path], tmp_path: Path
) -> None:
    text, _rows = html_and_json(trail, tmp_path / "report.html")
    page = Dom(text).root
    (meta,) = [m for m in page.find_all("meta") if m.attrs.get("http-equiv")]
    assert meta.attrs["content"] == CONTENT_SECURITY_POLICY
    style = page.one("style").text
    digest = base64.b64encode(hashlib.sha256(style.encode("utf-8")).digest()).decode()
    directives = dict(d.strip().split(" ", 1) for d in CONTENT_SECURITY_POLICY.split(";"))
    assert directives == {
        "default-src": "'none'",
        "style-src": f"'sha256-{digest}'",
        "base-uri": "'none'",
        "form-action": "'none'",
    }
    assert page.find_all("script") == []


def test_printable(trail: list[Path], tmp_path: Path) -> None:
    text, _rows = html_and_json(trail, tmp_path / "report.html")
    assert "@media print" in STYLESHEET
    # Nothing scrolls or hides rows: no overflow, no fixed heights.
    assert not re.search(r"overflow|max-height|(?<![-\w])height\s*:\s*\d", STYLESHEET)
    assert "position: fixed" not in STYLESHEET
    page = Dom(text).root
    assert page.find_all("details") == []


# --------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------


def test_output_is_replaced_whole_or_not_at_all(trail: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    out.write_text("previous report", encoding="utf-8")
    done = popguard("--html", str(out), str(trail[1]), str(tmp_path / "missing.jsonl"))
    assert done.returncode == 2
    assert "missing.jsonl" in done.stderr
    assert out.read_text(encoding="utf-8") == "previous report"
    # An unreadable gzip: read errors are skipped lines, the page is written.
    broken = tmp_path / "audit.jsonl.2.gz"
    broken.write_bytes(gzip.compress(b"x" * 100)[:30])
    done = popguard("--html", str(out), str(broken), *names(trail))
    assert done.returncode == 1  # and verify names the broken file
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert oct(out.stat().st_mode & 0o777) == oct(0o600)


def test_html_and_format_exclude_each_other(trail: list[Path], tmp_path: Path) -> None:
    done = popguard("--html", str(tmp_path / "r.html"), "--format", "json", *names(trail))
    assert done.returncode == 2
    assert "not allowed with argument" in done.stderr
    done = popguard("--key-file", str(key_file(tmp_path)), *names(trail))
    assert done.returncode == 2
    assert "--key-file and --checkpoint need --html" in done.stderr


def test_user_filter_for_table_and_json(trail: list[Path]) -> None:
    done = popguard("--format", "json", "--user", "alice", *names(trail))
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert rows
    assert {row["user"] for row in rows} == {"alice"}
    table = popguard("--user", "alice", *names(trail))
    assert [line.split()[0] for line in table.stdout.splitlines()[1:-1]] == ["alice"] * len(rows)


# --------------------------------------------------------------------------
# Memory: flat, however many deletions the trail holds
# --------------------------------------------------------------------------

BIG = 200_000
#: How much more the report's child may peak at than an idle child.
RSS_GROWTH_LIMIT = 16 * 1024 * 1024

#: The child's own peak is VmHWM, the high-water mark of its address space.
#: (Not getrusage's ru_maxrss: Linux carries that over exec from the address
#: space the child was forked or vforked from, so it starts at the parent's
#: peak, here pytest's, and hides any growth below it.)
CHILD = """
import io, re, sys
from popguard.trail.html import build_page
path, out, key = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3])
if out == "memory":  # the control: the page held in memory must show
    built = build_page([path], io.StringIO(), key=key)
elif out != "-":
    with open(out, "w", encoding="utf-8") as f:
        built = build_page([path], f, key=key)
if out != "-":
    assert built.verification.ok, built.verification.problem
with open("/proc/self/status", encoding="ascii") as status:
    print(int(re.search(r"^VmHWM:\\s+(\\d+) kB$", status.read(), re.M)[1]) * 1024)
"""


def write_big_trail(path: Path, records: int) -> int:
    """Sessions of 50 users over 30 days: half the records delete 3 messages.
    Returns the number of messages deleted."""
    chain = Chain(key=KEY, chain_id="w1")
    when = datetime.datetime(2026, 11, 1, tzinfo=datetime.UTC)
    step = datetime.timedelta(seconds=30 * 86400 / records)
    deleted = 0
    with path.open("w", encoding="utf-8") as f:
        f.write(render(start_record(chain, reason="new", previous_file=None)) + "\n")
        for n in range(records - 1):
            when += step
            user = f"user{n % 50:03d}@example.com"
            record: dict[str, Any] = {
                "event": "deletions.committed",
                "timestamp": stamp(when),
                "level": "info",
                "schema": 1,
                "instance": "popguard",
                "session": f"{n:016x}",
                "client": f"192.0.2.{n % 250}:{40000 + n % 20000}",
                "user": user,
            }
            if n % 2:
                record.update(event="message.retrieved", command="RETR", msg=1, size=5000)
            else:
                record["messages"] = [
                    {"msg": m, "uidl": f"{n:010x}-{m}", "size": 1000 + m} for m in (1, 2, 3)
                ]
                deleted += 3
            f.write(chain.seal_line(record) + "\n")
    return deleted


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM: /proc, on Linux")
def test_a_big_trail_is_reported_in_flat_memory(tmp_path: Path) -> None:
    trail = tmp_path / "audit.jsonl"
    deleted = write_big_trail(trail, BIG)
    out = tmp_path / "report.html"

    def peak(target: str) -> int:
        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(trail), target, KEY.hex()],
            capture_output=True,
            text=True,
            check=False,
            cwd=ROOT,
        )
        assert done.returncode == 0, done.stderr
        return int(done.stdout)

    idle = peak("-")
    growth = peak(str(out)) - idle
    size = trail.stat().st_size
    assert size > 5 * RSS_GROWTH_LIMIT
    assert out.stat().st_size > 2 * RSS_GROWTH_LIMIT  # the page itself is big
    assert growth < RSS_GROWTH_LIMIT, (
        f"report --html peaked {growth / 1e6:.1f} MB above an idle process "
        f"on a {size / 1e6:.0f} MB trail"
    )
    # The measurement sees memory that grows with the page.
    assert peak("memory") - idle > RSS_GROWTH_LIMIT
    # Every deletion is on the page.
    with out.open(encoding="utf-8") as f:
        rows = sum(line.startswith('<tr data-event="deletions.committed"') for line in f)
    assert rows == deleted
    os.unlink(out)
