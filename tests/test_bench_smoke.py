"""Smoke tests of the benchmark: quick mode, end to end.

Runs ``python -m bench --quick --only bulk,pingpong,concurrency``,
``--quick --only dele --audit-compare``, ``--quick --only pingpong
--policy-compare``, ``--quick --only bulk --tls-compare`` and ``--quick
--only memory,workers --held 120`` in-process against a real private
Dovecot and real popguard (and floor) subprocesses.  They check only that
figures came out and are positive (and, for DELE, that the messages were
deleted and recorded; for TLS, that every side spoke TLS and relayed the
same bytes; for memory, that every held session still answered; for
workers, that the two-worker popguard ran three processes; for the floor,
bench/floor.py, that it was measured wherever it applies and nowhere
else), never how fast anything was: timings on a shared machine are a
report, not a test.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from popguard.testing import dovecot as dovecot_tool


def test_floor_option_and_where_it_applies() -> None:
    """--floor is the default, --no-floor turns it off; never in a compared case."""
    from bench.cases import COMPARISONS, floor_applies
    from bench.cli import build_parser

    assert build_parser().parse_args([]).floor is True
    assert build_parser().parse_args(["--no-floor"]).floor is False
    for case in ("bulk", "pingpong", "concurrency", "dele", "memory"):
        assert floor_applies(case, None, True)
        assert not floor_applies(case, None, False)
    assert not floor_applies("workers", None, True)
    assert floor_applies("pingpong", COMPARISONS["audit"], True)  # not an audit case
    assert not floor_applies("bulk", COMPARISONS["audit"], True)
    assert not floor_applies("pingpong", COMPARISONS["tls"], True)
    assert floor_applies("memory", COMPARISONS["policy"], True)


@pytest.fixture
def dovecot_available() -> None:
    reason = dovecot_tool.available()
    if reason is not None:
        if os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}:
            pytest.fail(f"Dovecot is required in CI but unusable: {reason}", pytrace=False)
        pytest.skip(f"Dovecot is not available: {reason}")


def _assert_floor(res: dict[str, Any]) -> None:
    """The floor's rate and all three ratios came out positive."""
    floor = res["floor"]
    assert floor["value"]["median"] > 0
    assert floor["vs_direct"]["ratio"] > 0
    assert floor["popguard_vs_floor"]["ratio"] > 0
    assert res["ratio"] > 0


@pytest.mark.dovecot
@pytest.mark.slow
@pytest.mark.usefixtures("dovecot_available")
def test_quick_run_produces_positive_figures_with_the_floor(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--quick --only bulk,pingpong,concurrency: DIRECT, popguard and the floor."""
    import bench

    out = tmp_path / "results.json"
    rc = bench.main(["--quick", "--only", "bulk,pingpong,concurrency", "--json", str(out)])

    assert rc == 0
    results = json.loads(out.read_text())
    assert results["meta"]["floor"] is True
    assert results["meta"]["floor_cases"] == ["bulk", "pingpong", "concurrency"]
    pingpong = results["cases"]["pingpong"]
    assert "error" not in pingpong
    assert pingpong["direct"]["median"] > 0
    assert pingpong["popguard"]["median"] > 0
    assert pingpong["ratio"] > 0
    assert pingpong["p50_us"]["popguard"]["median"] > 0
    _assert_floor(pingpong)
    assert pingpong["floor"]["p50_us"]["median"] > 0
    assert pingpong["floor"]["cpu_us_per_noop"]["median"] > 0

    bulk = results["cases"]["bulk"]
    assert "error" not in bulk
    assert bulk["identical_bytes_by_side"] == {"popguard": True, "floor": True}
    for variant in ("bulk", "bulk_plain"):
        _assert_floor(bulk[variant])
    # 100 RETRs are 5 MB: the floor may spend less than one clock tick on them.
    assert bulk["bulk"]["floor"]["cpu_s_per_gb"]["median"] >= 0
    assert bulk["bulk"]["cpu_s_per_gb"]["median"] > 0

    cc = results["cases"]["concurrency"]
    assert "error" not in cc
    _assert_floor(cc)
    assert cc["floor"]["cpu_per_session_ms"]["median"] > 0
    assert cc["cpu_per_session_ms"]["median"] > 0
    assert set(cc["runs"]) == {"direct", "popguard", "floor"}

    printed = capsys.readouterr().out
    assert "ping-pong" in printed
    assert "THROUGH popguard" in printed
    assert "Floor: popguard against bench/floor.py" in printed
    assert "popguard / floor" in printed
    assert "proxy CPU per GB relayed" in printed
    assert "proxy CPU per session" in printed


@pytest.mark.dovecot
@pytest.mark.slow
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
    assert set(dele["runs"]) == {"direct", "off", "full"}  # no floor under a comparison
    printed = capsys.readouterr().out
    assert "DELE-heavy" in printed
    assert "Audit cost" in printed
    n = recorded["sessions"]
    assert f"{n}/{n}, all by UIDL" in printed


@pytest.mark.dovecot
@pytest.mark.slow
@pytest.mark.usefixtures("dovecot_available")
def test_quick_pingpong_policy_compare_produces_positive_figures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--quick --only pingpong --policy-compare: no policies and 1000 rules, side by side."""
    import bench

    out = tmp_path / "results.json"
    rc = bench.main(["--quick", "--only", "pingpong", "--policy-compare", "--json", str(out)])

    assert rc == 0
    results = json.loads(out.read_text())
    policy = results["meta"]["policy"]
    assert policy["tree"]["rules"] == 1000
    assert policy["check_policy"].startswith("1000 rules")
    pingpong = results["cases"]["pingpong"]
    assert "error" not in pingpong
    assert pingpong["side"] == "policy"
    assert pingpong["direct"]["median"] > 0
    for side in ("none", "policy"):
        entry = pingpong["by_side"][side]
        assert entry["value"]["median"] > 0
        assert entry["vs_direct"]["ratio"] > 0
        assert pingpong["cpu_us_per_noop_by_side"][side]["median"] >= 0
    assert pingpong["by_side"]["policy"]["vs_base"]["ratio"] > 0
    assert "floor" not in pingpong  # no floor in a compared case
    assert results["meta"]["floor_cases"] == []
    printed = capsys.readouterr().out
    assert "Policy cost" in printed
    assert "popguard CPU per NOOP" in printed


@pytest.mark.dovecot
@pytest.mark.slow
@pytest.mark.usefixtures("dovecot_available")
def test_quick_bulk_tls_compare_produces_positive_figures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--quick --only bulk --tls-compare: Dovecot's POP3S, TLS offload, TLS both sides."""
    import bench

    out = tmp_path / "results.json"
    rc = bench.main(["--quick", "--only", "bulk", "--tls-compare", "--json", str(out)])

    assert rc == 0
    results = json.loads(out.read_text())
    bulk = results["cases"]["bulk"]
    assert "error" not in bulk
    assert bulk["identical_bytes"] is True  # every side delivered Dovecot's bytes
    fast = bulk["bulk"]
    assert fast["side"] == "tls"
    assert fast["direct"]["median"] > 0
    for side in ("offload", "tls"):
        entry = fast["by_side"][side]
        assert entry["value"]["median"] > 0
        assert entry["vs_direct"]["ratio"] > 0
    for side in ("direct", "offload", "tls"):
        assert fast["tls_by_side"][side].startswith("TLSv1.")
    printed = capsys.readouterr().out
    assert "TLS: popguard against Dovecot's own POP3S" in printed


@pytest.mark.dovecot
@pytest.mark.slow
@pytest.mark.usefixtures("dovecot_available")
def test_quick_memory_and_workers_produce_positive_figures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--quick --only memory,workers --held 120: every held session answers a
    NOOP on both sides; --workers 1 and --workers 2 side by side, popguard's
    CPU counted over the supervisor and both workers."""
    import bench

    out = tmp_path / "results.json"
    rc = bench.main(["--quick", "--only", "memory,workers", "--held", "120", "--json", str(out)])

    assert rc == 0
    results = json.loads(out.read_text())
    mem = results["cases"]["memory"]
    assert "error" not in mem
    assert mem["held"] == 120
    assert mem["kib_per_session"]["median"] > 0
    assert mem["held_alive_all"] == {"direct": 120, "popguard": 120, "held": 120}
    assert mem["noop_p50_us"]["ratio"] > 0
    floor = mem["floor"]
    assert floor["kib_per_session"]["median"] > 0
    assert floor["popguard_vs_floor"]["ratio"] > 0
    assert floor["held_alive_all"] == 120
    assert floor["noop_p50_us"]["popguard_vs_floor"]["ratio"] > 0
    workers = results["cases"]["workers"]
    assert "error" not in workers
    assert workers["side"] == "w2"
    for side in ("w1", "w2"):
        assert workers["by_side"][side]["value"]["median"] > 0
        assert workers["cpu_per_session_ms_by_side"][side]["median"] > 0
    assert workers["w2_vs_w1"]["ratio"] > 0
    assert workers["workers_cpu"]["w1"]["processes"] == 1
    assert workers["workers_cpu"]["w2"]["processes"] == 3  # supervisor + 2 workers
    assert "floor" not in workers["runs"]
    printed = capsys.readouterr().out
    assert "(d) memory per idle session (120 held)" in printed
    assert "workers 2 / workers 1" in printed
