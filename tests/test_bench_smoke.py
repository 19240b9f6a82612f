"""Smoke tests of the benchmark: quick mode, end to end.

Runs ``python -m bench --quick --only pingpong`` and ``--quick --only dele
--audit-compare`` in-process against a real private Dovecot and real
popguard subprocesses.  They check only that figures came out and are
positive (and, for DELE, that the messages were deleted and recorded), never
how fast anything was: timings on a shared machine are a report, not a test.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from popguard.testing import dovecot as dovecot_tool

pytestmark = [pytest.mark.dovecot, pytest.mark.slow]


@pytest.fixture
def dovecot_available() -> None:
    reason = dovecot_tool.available()
    if reason is not None:
        if os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}:
            pytest.fail(f"Dovecot is required in CI but unusable: {reason}", pytrace=False)
        pytest.skip(f"Dovecot is not available: {reason}")


@pytest.mark.usefixtures("dovecot_available")
def test_quick_pingpong_produces_positive_figures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import bench

    out = tmp_path / "results.json"
    rc = bench.main(["--quick", "--only", "pingpong", "--json", str(out)])

    assert rc == 0
    results = json.loads(out.read_text())
    pingpong = results["cases"]["pingpong"]
    assert "error" not in pingpong
    assert pingpong["direct"]["median"] > 0
    assert pingpong["popguard"]["median"] > 0
    assert pingpong["ratio"] > 0
    assert pingpong["p50_us"]["popguard"]["median"] > 0
    printed = capsys.readouterr().out
    assert "ping-pong" in printed
    assert "THROUGH popguard" in printed


@pytest.mark.usefixtures("dovecot_available")
def test_quick_dele_audit_compare_deletes_and_records(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--quick --only dele --audit-compare: every session deleted a message,
    and full auditing recorded one deletions.committed per session."""
    import bench

    out = tmp_path / "results.json"
    rc = bench.main(["--quick", "--only", "dele", "--audit-compare", "--json", str(out)])

    assert rc == 0
    results = json.loads(out.read_text())
    dele = results["cases"]["dele"]
    assert "error" not in dele
    assert dele["direct"]["median"] > 0
    assert dele["popguard"]["median"] > 0
    audit = dele["audit"]
    assert audit["off"]["median"] > 0
    assert audit["full"]["median"] > 0
    assert audit["ratio"] > 0
    for side in ("direct", "off", "full"):
        expunged = dele["expunged"][side]
        assert expunged["expunged"] == expunged["sessions"] > 0
    recorded = dele["deletions_recorded"]["full"]
    assert recorded["recorded"] == recorded["sessions"] == recorded["with_uidl"] > 0
    assert dele["audit_file"]["full"]["bytes_per_session"]["median"] > 0
    assert "off" not in dele["audit_file"]  # auditing off writes no file
    printed = capsys.readouterr().out
    assert "DELE-heavy" in printed
    assert "Audit cost" in printed
    n = recorded["sessions"]
    assert f"{n}/{n}, all by UIDL" in printed
