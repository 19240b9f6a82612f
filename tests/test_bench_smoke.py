"""Smoke test of the benchmark: the cheapest case, quick mode, end to end.

Runs ``python -m bench --quick --only pingpong`` in-process against a real
private Dovecot and a real popguard subprocess.  It checks only that a
figure came out and is positive, never how fast anything was: timings on a
shared machine are a report, not a test.
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
