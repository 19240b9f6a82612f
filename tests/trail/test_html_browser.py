"""The HTML report in a real browser: headless Chromium loads the file.

Chromium renders the page from ``file://`` with the network unused, and
prints two things: the DOM after loading (``--dump-dom``), which the tests
read back and compare number for number with ``audit report --format json``
for the same files and flags; and, with ``--enable-logging=stderr``, every
console message as a ``CONSOLE`` line (uncaught errors, Content-Security-
Policy violations, failed loads).  The page has no script, so any console
message at all fails.  Two negative controls prove the console check
catches what it must: a page with a JavaScript error, and the report with
markup injected past the escaping (an image: the page's CSP refuses it).

``POPGUARD_UPDATE_SCREENSHOTS=1`` also writes docs/img/audit-report.png
from the browser's screenshot.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from html_helpers import Dom, check_figures, compliance_trail, expected_deletions, page_deletions
from trail_helpers import KEY, key_file

from popguard.trail.reader import parse_time
from tests.ci import needs_tool

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or (
    "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None
)
SCREENSHOT = ROOT / "docs" / "img" / "audit-report.png"
#: The screenshot's window; the PNG must stay small enough to commit.
WINDOW = (1200, 1600)
MAX_SCREENSHOT_BYTES = 250_000
#: A cold start of Chromium takes a second or two; this is a hang.
BROWSER_TIMEOUT = 120
#: How Chromium logs a console message to stderr: ``INFO:CONSOLE(12)] "..."``
#: (older builds) or ``INFO:CONSOLE:12] "..."``.
CONSOLE = re.compile(r":CONSOLE[(:]\d*\)?\] (.*)")

pytestmark = needs_tool(CHROMIUM, "chromium (Debian package: chromium)")


def chromium(tmp_path: Path, page: Path, *action: str) -> tuple[str, list[str]]:
    """Load *page* in headless Chromium: (stdout, console messages)."""
    assert CHROMIUM is not None, "chromium is not installed (Debian package: chromium)"
    profile = tmp_path / "chromium-profile"
    done = subprocess.run(
        [
            CHROMIUM,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            "--disable-background-networking",
            f"--user-data-dir={profile}",
            "--enable-logging=stderr",
            "--v=0",
            *action,
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=BROWSER_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, [m[1] for line in done.stderr.splitlines() if (m := CONSOLE.search(line))]


def report(*argv: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "popguard", "audit", "report", *argv],
        capture_output=True,
        text=True,
        check=False,
        cwd=cwd,
    )


def html_and_json(
    paths: list[Path], out: Path, flags: tuple[str, ...]
) -> tuple[Path, list[dict[str, Any]]]:
    files = [str(p) for p in paths]
    done = report("--html", str(out), *flags, *files)
    assert done.returncode == 0, done.stderr
    rows = report("--format", "json", *flags, *files)
    assert rows.returncode == 0, rows.stderr
    return out, [json.loads(line) for line in rows.stdout.splitlines()]


# --------------------------------------------------------------------------
# The console check catches errors (negative controls)
# --------------------------------------------------------------------------


def test_a_script_error_is_seen(tmp_path: Path) -> None:
    page = tmp_path / "broken.html"
    page.write_text(
        '<!DOCTYPE html><html><head><meta charset="utf-8"><title>x</title></head>'
        "<body><p>x</p><script>undefinedFunction();</script></body></html>",
        encoding="utf-8",
    )
    dom, console = chromium(tmp_path, page, "--dump-dom")
    assert "<p>x</p>" in dom
    assert any("undefinedFunction is not defined" in message for message in console), console


def test_markup_injected_into_the_report_is_seen(tmp_path: Path) -> None:
    out, _rows = html_and_json(compliance_trail(tmp_path), tmp_path / "report.html", ())
    text = out.read_text(encoding="utf-8")
    # What a missed escape would let in: a tag that loads something.
    injected = tmp_path / "injected.html"
    injected.write_text(text.replace("<td>alice</td>", '<td><img src="x.png">alice</td>', 1))
    assert injected.read_text() != text
    _dom, console = chromium(tmp_path, injected, "--dump-dom")
    assert any("Content Security Policy" in message for message in console), console


# --------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags",
    [(), ("--since", "2026-11-25T06:00Z", "--until", "2026-11-28", "--user", "alice")],
    ids=["all", "filtered"],
)
def test_the_rendered_report_equals_the_json_report(tmp_path: Path, flags: tuple[str, ...]) -> None:
    trail = compliance_trail(tmp_path)
    out, rows = html_and_json(trail, tmp_path / "report.html", flags)
    dom, console = chromium(tmp_path, out, "--dump-dom")
    assert console == []
    page = Dom(dom).root
    # Chromium's DOM, not the file: the browser built it from the markup.
    assert page.one("section", id="verification").attrs["data-status"] == "verified"
    assert len(page.find_all("figure")) == 5
    assert all(figure.find_all("svg") for figure in page.find_all("figure"))
    assert check_figures(page, rows) > 50
    given = dict(zip(flags[::2], flags[1::2], strict=True))
    since, until = (parse_time(given[f]) if f in given else None for f in ("--since", "--until"))
    users = (given["--user"],) if "--user" in given else ()
    if users:
        assert {row["user"] for row in rows} == set(users)
    expected = expected_deletions(trail, since=since, until=until, users=users)
    assert expected
    assert page_deletions(page) == expected
    assert page.find_all("script") == []
    assert page.find_all("img") == []


def test_prints(tmp_path: Path) -> None:
    out, _rows = html_and_json(compliance_trail(tmp_path), tmp_path / "report.html", ())
    pdf = tmp_path / "report.pdf"
    _stdout, console = chromium(tmp_path, out, f"--print-to-pdf={pdf}", "--no-pdf-header-footer")
    assert console == []
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF-")
    assert len(re.findall(rb"/Type\s*/Page\b", data)) >= 2  # rows flow onto more pages


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_screenshot(tmp_path: Path) -> None:
    """The picture in docs/operations.md: a keyed trail, no hostile names,
    the files named as an operator would (relative to the directory)."""
    users = ("alice", "bob", "carol@example.com", "dävid", "erik")
    trail = compliance_trail(tmp_path, users=users, key=KEY)
    out = tmp_path / "report.html"
    keyfile = key_file(tmp_path).name
    done = report("--html", out.name, "--key-file", keyfile, *(p.name for p in trail), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    shot = tmp_path / "audit-report.png"
    _stdout, console = chromium(
        tmp_path,
        out,
        f"--screenshot={shot}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        "--hide-scrollbars",
    )
    assert console == []
    assert png_size(shot) == WINDOW
    assert shot.stat().st_size < MAX_SCREENSHOT_BYTES
    if os.environ.get("POPGUARD_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)
