"""The compliance report as one self-contained HTML page.

``popguard audit report --html OUT.html [--since ISO] [--until ISO]
[--user U] [--key-file FILE] [--checkpoint C:S:H] FILE...``

Theory of operation
-------------------

The page answers an auditor's questions in the order they are asked:

1. *Can the trail be trusted?*  The hash chain is verified first
   (:func:`~popguard.trail.verify.verify`, the same check as ``audit
   verify``): verified, tampered or damaged (which file, which line, what),
   or not verified (an HMAC-sealed trail and no key).  Every file is listed
   with what became of it.
2. *What happened, day by day?*  One inline SVG bar chart per figure:
   messages retrieved, deletions committed, marks discarded, policy
   denials, failed logins; and the same numbers as a table.
3. *Who did it?*  A table per user.
4. *What was deleted?*  Every message in ``deletions.committed``, and in
   ``deletions.failed`` and ``deletions.unknown`` (the server may have
   removed some or all of them), with its UIDL and size where popguard knew
   them, and the record's place and seal (its chain ``hash``), so each row
   can be found in the trail and checked.

Every figure comes from :func:`~popguard.trail.report.build_report`, the
counts ``audit report --format json`` prints, so the page and the JSON agree
by construction (the browser test compares them number by number).  The
deletions are collected in the same pass, through its record hook.

Memory stays flat: verify and the report stream the files; the counts grow
with (user, day) pairs only; deletion rows are rendered as they are read
into an anonymous temporary file and copied into the page at the end.

The page is safe to open whatever the trail holds.  Every string from the
trail (user names, UIDLs, file names, reply texts) has its non-printable
characters escaped (:func:`~popguard.trail.query.safe_text`), then is
HTML-escaped, quotes included.  The page carries no script at all, and a
Content-Security-Policy that forbids scripts, every fetch, and every style
but its own stylesheet (allowed by hash), so markup that did get in could
neither run nor load anything.  It references no external URL: it reads the
same offline, and prints (a print stylesheet, no scroll areas).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import html
import json
import math
import os
import shutil
import tempfile
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Final

import popguard
from popguard.trail.chain import ALG_SHA256
from popguard.trail.query import safe_text
from popguard.trail.reader import SkipLog
from popguard.trail.report import Counts, Report, Unusable, build_report, report_order
from popguard.trail.verify import Checkpoint, Kind, VerifyReport, verify

__all__ = [
    "CHARTS",
    "COLUMNS",
    "CONTENT_SECURITY_POLICY",
    "DELETION_EVENTS",
    "Built",
    "DeletionLog",
    "Page",
    "Series",
    "build_page",
    "per_day",
    "per_user",
    "render_chart",
    "write_page",
]


@dataclass(frozen=True, slots=True)
class Series:
    """One figure: a :class:`~popguard.trail.report.Counts` field and its words."""

    field: str
    heading: str
    #: Said after a number in a bar's tooltip ("3 retrieved").
    unit: str


#: The per-day charts, in the order the issue names them.
CHARTS: Final = (
    Series("retrieved", "Messages retrieved", "retrieved"),
    Series("deleted", "Deletions committed", "deleted"),
    Series("discarded", "Marks discarded (session ended without QUIT)", "discarded"),
    Series("denied", "Policy denials", "denied"),
    Series("failed_logins", "Failed logins", "failed logins"),
)

#: The table columns: every field of ``Counts``, as ``--format json`` names them.
COLUMNS: Final = (
    Series("logins", "Logins", "logins"),
    Series("failed_logins", "Failed logins", "failed logins"),
    Series("retrieved", "Retrieved", "retrieved"),
    Series("deleted", "Deleted", "deleted"),
    Series("discarded", "Discarded", "discarded"),
    Series("denied", "Policy denials", "denied"),
)

#: Deletion records listed, and what each says about its messages.
DELETION_EVENTS: Final = {
    "deletions.committed": "deleted",
    "deletions.failed": "QUIT failed: some or none deleted",
    "deletions.unknown": "unknown: QUIT sent, no reply",
}

# Chart geometry, in SVG user units (the chart scales to the page width).
_WIDTH: Final = 720
_HEIGHT: Final = 180
_LEFT: Final = 40
_RIGHT: Final = 8
_TOP: Final = 10
_BOTTOM: Final = 22
#: Share of a day's slot its bar fills.
_BAR_FILL: Final = 0.8
#: At most this many day labels under a chart.
_MAX_DAY_LABELS: Final = 8

STYLESHEET: Final = """
:root { color-scheme: light; --ok: #1b6e3a; --bad: #a61b1b; --warn: #8a5a00; --line: #c9ced6; }
* { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2330;
  max-width: 1100px; margin: 24px auto; padding: 0 16px; }
h1 { font-size: 1.6em; margin: 0 0 4px; }
h2 { font-size: 1.2em; margin: 28px 0 8px; border-bottom: 1px solid var(--line); }
.meta { color: #4a5568; margin: 0; }
.verdict { border: 2px solid; border-radius: 6px; padding: 10px 14px; margin-top: 16px; }
.verdict h2 { margin-top: 0; border: 0; }
.verdict.verified { border-color: var(--ok); background: #eef8f1; }
.verdict.tampered { border-color: var(--bad); background: #fbeeee; }
.verdict.unverified { border-color: var(--warn); background: #fdf6e6; }
.verified .status { color: var(--ok); }
.tampered .status { color: var(--bad); }
.unverified .status { color: var(--warn); }
.warning { color: var(--warn); }
table { border-collapse: collapse; margin: 6px 0; }
th, td { border-bottom: 1px solid var(--line); padding: 3px 8px; text-align: left;
  vertical-align: top; }
th { background: #f1f3f6; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
tfoot td { font-weight: 600; border-top: 2px solid #8d96a3; }
code, .mono { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 0.85em; }
.hash { word-break: break-all; font-size: 0.75em; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(480px, 1fr)); gap: 12px; }
figure { margin: 0; border: 1px solid var(--line); border-radius: 6px; padding: 8px; }
figcaption { font-weight: 600; }
svg.chart { width: 100%; height: auto; display: block; }
svg.chart text { font-size: 10px; fill: #4a5568; }
svg.chart .grid { stroke: #e2e6ec; }
svg.chart .axis { stroke: #8d96a3; }
.bar { fill: #3a6ea5; }
[data-series="deleted"] .bar { fill: #b03a2e; }
[data-series="discarded"] .bar { fill: #c98a12; }
[data-series="denied"] .bar { fill: #6b4ca5; }
[data-series="failed_logins"] .bar { fill: #7a4a4a; }
@page { margin: 14mm; }
@media print {
  body { font-size: 10pt; max-width: none; margin: 0; padding: 0; }
  .charts { display: block; }
  figure { break-inside: avoid; margin-bottom: 8px; }
  thead { display: table-header-group; }
  tr { break-inside: avoid; }
}
"""

#: The page's only style is its own stylesheet, allowed by hash; nothing may
#: run, load or submit (the page has no script and needs nothing fetched).
CONTENT_SECURITY_POLICY: Final = (
    "default-src 'none'; "
    "style-src 'sha256-"
    + base64.b64encode(hashlib.sha256(STYLESHEET.encode("utf-8")).digest()).decode("ascii")
    + "'; base-uri 'none'; form-action 'none'"
)


def _text(value: str) -> str:
    """A string from the trail, safe as HTML text and as a quoted attribute."""
    return html.escape(safe_text(value), quote=True)


def _user(user: object) -> str:
    """A user cell's text: the name, or ``-`` for none."""
    return _text(user) if isinstance(user, str) else "-"


def _user_attr(user: object) -> str:
    """``data-user`` with the name, or ``data-no-user`` (so no name can pose as none)."""
    return f'data-user="{_text(user)}"' if isinstance(user, str) else 'data-no-user=""'


def _value(value: object) -> str:
    """A field of a deletion's message entry, as HTML: empty when unknown."""
    if value is None:
        return ""
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return _text(json.dumps(value, ensure_ascii=False, separators=(",", ":")))


# --------------------------------------------------------------------------
# The figures, from the report's counts (pure)
# --------------------------------------------------------------------------


def per_day(report: Report) -> list[tuple[str, Counts]]:
    """Totals per UTC day, every day from the first to the last with activity."""
    totals: dict[str, Counts] = {}
    for (_user_name, day), counts in report.items():
        totals.setdefault(day, Counts()).add(counts)
    if not totals:
        return []
    first = datetime.date.fromisoformat(min(totals))
    last = datetime.date.fromisoformat(max(totals))
    days = (first + datetime.timedelta(days=n) for n in range((last - first).days + 1))
    return [(day.isoformat(), totals.get(day.isoformat(), Counts())) for day in days]


def per_user(report: Report) -> list[tuple[str | None, Counts, int]]:
    """Totals per user (no user last): the counts and the number of active days."""
    totals: dict[str | None, Counts] = {}
    active: dict[str | None, int] = {}
    for key in sorted(report, key=report_order):
        user, _day = key
        totals.setdefault(user, Counts()).add(report[key])
        active[user] = active.get(user, 0) + 1
    return [(user, counts, active[user]) for user, counts in totals.items()]


def _ceiling(peak: int) -> int:
    """The chart's top: *peak* rounded up to 1, 2 or 5 times a power of ten."""
    if peak <= 1:
        return 1
    power = 1  # the largest power of ten at or below peak
    while power * 10 <= peak:
        power *= 10
    return next(step * power for step in (1, 2, 5, 10) if step * power >= peak)


def render_chart(series: Series, days: Sequence[tuple[str, Counts]]) -> str:
    """One figure as an inline SVG bar chart: a bar per day, every day present.

    Each bar carries ``data-day`` and ``data-value`` and a tooltip; the
    scale is labelled at 0 and the top (and the middle, when it is whole).
    """
    values = [getattr(counts, series.field) for _day, counts in days]
    top = _ceiling(max(values, default=0))
    plot_w = _WIDTH - _LEFT - _RIGHT
    plot_h = _HEIGHT - _TOP - _BOTTOM
    base = _TOP + plot_h
    slot = plot_w / max(len(days), 1)
    parts = [
        f'<figure data-series="{series.field}" data-total="{sum(values)}">',
        f"<figcaption>{html.escape(series.heading)}: {sum(values)}</figcaption>",
        f'<svg class="chart" viewBox="0 0 {_WIDTH} {_HEIGHT}" role="img" '
        f'aria-label="{html.escape(series.heading, quote=True)} per day">',
    ]
    for mark in (0, top // 2, top) if top % 2 == 0 else (0, top):
        y = base - plot_h * mark / top
        parts.append(
            f'<line class="{"axis" if mark == 0 else "grid"}" x1="{_LEFT}" y1="{y:.1f}" '
            f'x2="{_WIDTH - _RIGHT}" y2="{y:.1f}"/>'
            f'<text x="{_LEFT - 4}" y="{y + 3:.1f}" text-anchor="end">{mark}</text>'
        )
    every = max(1, math.ceil(len(days) / _MAX_DAY_LABELS))
    for i, (day, value) in enumerate(zip((d for d, _c in days), values, strict=True)):
        height = plot_h * value / top
        x = _LEFT + i * slot + slot * (1 - _BAR_FILL) / 2
        parts.append(
            f'<rect class="bar" x="{x:.2f}" y="{base - height:.2f}" '
            f'width="{slot * _BAR_FILL:.2f}" height="{height:.2f}" '
            f'data-day="{day}" data-value="{value}">'
            f"<title>{day}: {value} {html.escape(series.unit)}</title></rect>"
        )
        if i % every == 0:
            parts.append(
                f'<text x="{_LEFT + (i + 0.5) * slot:.1f}" y="{_HEIGHT - 6}" '
                f'text-anchor="middle">{day[5:]}</text>'
            )
    parts.append("</svg></figure>")
    return "".join(parts)


# --------------------------------------------------------------------------
# Deletions: rendered as they stream past, spooled to a temporary file
# --------------------------------------------------------------------------


class DeletionLog:
    """Table rows for the messages of deletion records, kept in *spool*.

    :meth:`add` has the signature of :data:`~popguard.trail.report.RecordHook`;
    :meth:`copy_to` writes the rows out.  The spool is the caller's (an
    anonymous temporary file), so rows never accumulate in memory.
    """

    def __init__(self, spool: IO[str]) -> None:
        self._spool = spool
        self.records = 0
        #: Rows: one per entry of a record's ``messages``.
        self.messages = 0

    def add(self, path: str, line: int, when: datetime.datetime, record: Mapping[str, Any]) -> None:
        event = record.get("event")
        messages = record.get("messages")
        if not (isinstance(event, str) and event in DELETION_EVENTS):
            return
        if not isinstance(messages, list):
            return
        outcome = DELETION_EVENTS[event]
        self.records += 1
        self.messages += len(messages)
        user = record.get("user")
        common = (
            f"<td>{when.strftime('%Y-%m-%d %H:%M:%S')}</td>"
            f"<td {_user_attr(user)}>{_user(user)}</td><td>{html.escape(outcome)}</td>"
        )
        place = (
            f'<td class="mono">{_text(os.path.basename(path))}:{line}</td>'
            f'<td class="mono">{_value(record.get("session"))}</td>'
            f'<td class="mono hash">{_value(record.get("hash"))}</td>'
        )
        for entry in messages:
            item: Mapping[str, Any] = entry if isinstance(entry, dict) else {"msg": entry}
            self._spool.write(
                f'<tr data-event="{event}">{common}'
                f'<td class="n">{_value(item.get("msg"))}</td>'
                f'<td class="mono">{_value(item.get("uidl"))}</td>'
                f'<td class="n">{_value(item.get("size"))}</td>'
                f'<td class="mono hash">{_value(item.get("digest"))}</td>{place}</tr>\n'
            )

    def copy_to(self, out: IO[str]) -> None:
        self._spool.seek(0)
        shutil.copyfileobj(self._spool, out)


# --------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------


@dataclass(slots=True)
class Page:
    """Everything the page shows: what verify and the report computed."""

    files: Sequence[str]
    verification: VerifyReport
    report: Report
    deletions: DeletionLog
    generated: datetime.datetime
    since: datetime.datetime | None = None
    until: datetime.datetime | None = None
    users: Collection[str] = ()
    skips: SkipLog = field(default_factory=SkipLog)
    undated: int = 0


def _status(verification: VerifyReport) -> str:
    """``verified``, ``tampered`` (tampering or damage) or ``unverified``."""
    if verification.problem is None:
        return "verified"
    return "unverified" if verification.problem.kind is Kind.KEY_REQUIRED else "tampered"


def _file_states(page: Page) -> Iterator[tuple[str, str]]:
    verified = {path for chain in page.verification.chains for path in chain.files}
    problem = page.verification.problem
    for path in page.files:
        if problem is not None and path == problem.file:
            yield path, f"problem at line {problem.line}"
        elif path in verified:
            yield path, "verified"
        elif problem is None:
            yield path, "no chained records"
        else:
            yield path, "not verified (verification stops at the first problem)"


def _verification(page: Page) -> Iterator[str]:
    report = page.verification
    status = _status(report)
    problem = report.problem
    yield f'<section id="verification" class="verdict {status}" data-status="{status}">'
    if problem is None:
        yield (
            '<h2>Chain verification: <span class="status">verified</span></h2>'
            f"<p>{report.records} records in {report.files} files: every record is "
            "sealed, unaltered and in order.</p>"
        )
    elif status == "unverified":
        yield (
            '<h2>Chain verification: <span class="status">not verified</span></h2>'
            "<p>The trail is sealed with an HMAC key: give it with "
            "<code>--key-file</code> to verify it.</p>"
        )
    else:
        yield (
            '<h2>Chain verification: <span class="status">tampered or damaged</span></h2>'
            f'<p data-problem="{html.escape(str(problem.kind))}"><strong>'
            f"{html.escape(str(problem.kind))}</strong> at <code>{_text(problem.file)}:"
            f"{problem.line}</code>: {_text(problem.detail)}</p>"
            f"<p>{report.records} records verified before it. The figures below "
            "are counted from records that cannot all be trusted.</p>"
        )
    yield '<table class="files"><thead><tr><th>File</th><th>Result</th></tr></thead><tbody>'
    for path, state in _file_states(page):
        yield f'<tr><td class="mono">{_text(path)}</td><td>{html.escape(state)}</td></tr>'
    yield "</tbody></table>"
    if report.chains:
        yield (
            '<table class="chains"><thead><tr><th>Chain</th><th>Seal</th>'
            '<th class="n">Records</th><th>Sequence</th><th>Checkpoint</th>'
            "</tr></thead><tbody>"
        )
        for chain in report.chains:
            start = "from its first record" if chain.from_genesis else "continuing older files"
            yield (
                f'<tr><td class="mono">{_text(chain.chain_id)}</td><td>{_text(chain.alg)}</td>'
                f'<td class="n">{chain.records}</td>'
                f"<td>{chain.first_seq}..{chain.last_seq}, {start}</td>"
                f'<td class="mono hash">{_text(str(chain.checkpoint))}</td></tr>'
            )
        yield "</tbody></table>"
        if any(chain.alg == ALG_SHA256 for chain in report.chains):
            yield (
                '<p class="warning">Sealed without a key (sha256): anyone who can write '
                "the files can rewrite a chain whole. Compare the checkpoint with a copy "
                "kept elsewhere, or verify with <code>--checkpoint</code>.</p>"
            )
    for note in report.notes:
        yield f'<p class="warning">{_text(note)}</p>'
    yield "</section>"


def _when(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _period(since: datetime.datetime | None, until: datetime.datetime | None) -> str:
    parts = [f"from {_when(since)}"] if since is not None else []
    if until is not None:
        parts.append(f"until before {_when(until)}")
    return " ".join(parts) or "all records"


def _heading(page: Page) -> Iterator[str]:
    users = ", ".join(_text(user) for user in sorted(page.users)) or "all"
    yield (
        "<header><h1>popguard audit report</h1>"
        f'<p class="meta">Period: {_period(page.since, page.until)}. Users: {users}. '
        "Days are UTC days.</p>"
        f'<p class="meta">Made {_when(page.generated)} by popguard {popguard.__version__}.</p>'
        "</header>"
    )


def _warnings(page: Page) -> Iterator[str]:
    skips = page.skips
    if not skips.count and not page.undated:
        return
    yield '<section id="warnings"><h2>Lines not counted</h2>'
    if skips.count:
        yield f'<p class="warning">{skips.count} lines are not records and were skipped'
        if skips.ambiguous:
            yield (
                f", {skips.ambiguous} of them for a duplicate key (an edited line that "
                "JSON readers read differently)"
            )
        yield ".</p><ul>"
        for item in skips.samples:
            yield f'<li class="mono">{_text(str(item))}</li>'
        yield "</ul>"
    if page.undated:
        yield (
            f'<p class="warning">{page.undated} records without a usable timestamp '
            "were not counted.</p>"
        )
    yield "</section>"


_HEADINGS: Final = tuple(html.escape(column.heading) for column in COLUMNS)


def _figures_row(counts: Counts) -> str:
    return "".join(
        f'<td class="n" data-figure="{column.field}">{getattr(counts, column.field)}</td>'
        for column in COLUMNS
    )


def _figures_head(first: str, *extra: str) -> str:
    cells = "".join(f'<th class="n">{heading}</th>' for heading in (*_HEADINGS, *extra))
    return f"<thead><tr><th>{first}</th>{cells}</tr></thead>"


def _activity(page: Page) -> Iterator[str]:
    days = per_day(page.report)
    total = Counts()
    for _day, counts in days:
        total.add(counts)
    yield '<section id="days"><h2>Per day</h2>'
    if not days:
        yield "<p>No activity in this period.</p></section>"
        return
    yield '<div class="charts">'
    yield from (render_chart(series, days) for series in CHARTS)
    yield '</div><table class="days">' + _figures_head("Day") + "<tbody>"
    for day, counts in days:
        yield f'<tr data-day="{day}"><td>{day}</td>{_figures_row(counts)}</tr>'
    yield f'</tbody><tfoot><tr data-total=""><td>Total</td>{_figures_row(total)}</tr></tfoot>'
    yield "</table></section>"

    yield '<section id="users"><h2>Per user</h2><table class="users">'
    yield _figures_head("User", "Active days") + "<tbody>"
    for user, counts, active in per_user(page.report):
        yield (
            f"<tr {_user_attr(user)}><td>{_user(user)}</td>{_figures_row(counts)}"
            f'<td class="n">{active}</td></tr>'
        )
    yield "</tbody></table>"
    yield (
        "<p>A failed login is counted under the account it named; <code>-</code> is "
        "activity with no user (a login that named none, a denial before login).</p>"
        "</section>"
    )


def _deletions_head(page: Page) -> str:
    log = page.deletions
    listed = log.messages
    return (
        f'<section id="deletions" data-records="{log.records}" data-messages="{listed}">'
        f"<h2>Deletions</h2><p>{listed} messages in {log.records} deletion records. "
        "Deleted: the server confirmed QUIT (RFC 1939 UPDATE). The other outcomes may "
        "have removed some or all of their messages. Messages are named by UIDL, "
        "size and <em>digest</em> (the SHA-256 of the message's content, once "
        "popguard saw it whole) where popguard knew them; <em>seal</em> is the "
        "record's chain hash.</p>"
        '<table class="deletions"><thead><tr><th>Time (UTC)</th><th>User</th>'
        '<th>Outcome</th><th class="n">Msg</th><th>UIDL</th><th class="n">Size</th>'
        "<th>Digest</th><th>Record</th><th>Session</th><th>Seal</th></tr></thead><tbody>\n"
    )


def write_page(page: Page, out: IO[str]) -> None:
    """Write the whole page to *out*."""
    out.write(
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CONTENT_SECURITY_POLICY}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<title>popguard audit report</title>"
        f"<style>{STYLESHEET}</style></head><body>\n"
    )
    for part in (_heading(page), _verification(page), _warnings(page), _activity(page)):
        out.writelines(part)
    out.write(_deletions_head(page))
    page.deletions.copy_to(out)
    out.write("</tbody></table></section></body></html>\n")


@dataclass(frozen=True, slots=True)
class Built:
    """What :func:`build_page` found, for the command's exit status."""

    verification: VerifyReport
    report: Report
    #: Counted records without a usable timestamp (not counted).
    undated: int


def build_page(
    paths: Sequence[str],
    out: IO[str],
    *,
    key: bytes | None,
    checkpoints: Sequence[Checkpoint] = (),
    since: datetime.datetime | None = None,
    until: datetime.datetime | None = None,
    users: Collection[str] = (),
    skips: SkipLog | None = None,
    generated: datetime.datetime | None = None,
) -> Built:
    """Verify *paths*, count them, and write the page to *out*.

    Two streaming passes: verify, then the report with its deletions.
    ``OSError`` propagates.
    """
    verification = verify(paths, key=key, checkpoints=checkpoints)
    log = skips if skips is not None else SkipLog()
    undated = Unusable()
    with tempfile.TemporaryFile("w+", encoding="utf-8", newline="") as spool:
        deletions = DeletionLog(spool)
        report = build_report(
            paths,
            since=since,
            until=until,
            users=users,
            skips=log,
            undated=undated,
            watch=DELETION_EVENTS.keys(),
            each=deletions.add,
        )
        page = Page(
            files=paths,
            verification=verification,
            report=report,
            deletions=deletions,
            generated=generated or datetime.datetime.now(datetime.UTC),
            since=since,
            until=until,
            users=users,
            skips=log,
            undated=undated.count,
        )
        write_page(page, out)
    return Built(verification, report, undated.count)
