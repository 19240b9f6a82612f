"""verify, query and report stream: memory does not grow with the trail.

Two measurements:

* a 200,000-record trail (about 80 MB) is verified, queried and reported on
  in a child process each; the child's peak RSS may exceed that of a child
  that only imports the modules by a few MB, not by the file's size;
* tracemalloc (slow: it traces every allocation, so a smaller trail) counts
  the Python allocations of verify and query on 10,000 records.
"""

from __future__ import annotations

import datetime
import gc
import os
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
from trail_helpers import KEY, stamp

from popguard.trail.chain import Chain, render, start_record
from popguard.trail.query import Filter, query, write_table
from popguard.trail.verify import verify

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
USERS = [f"user{n:03d}@example.com" for n in range(50)]


def write_trail(path: Path, records: int) -> Path:
    chain = Chain(key=KEY, chain_id="w1")
    when = datetime.datetime(2026, 11, 1, tzinfo=datetime.UTC)
    step = datetime.timedelta(seconds=13)
    with path.open("w", encoding="utf-8") as f:
        f.write(render(start_record(chain, reason="new", previous_file=None)) + "\n")
        for n in range(records - 1):
            when += step
            record = {
                "event": "message.retrieved" if n % 3 else "auth.succeeded",
                "timestamp": stamp(when),
                "level": "info",
                "schema": 1,
                "instance": "popguard",
                "session": f"{n // 10:016x}",
                "client": f"192.0.2.{n % 250}:{40000 + n % 20000}",
                "listener": "pop3",
                "user": USERS[n % 50],
                "command": "RETR",
                "msg": n % 40 + 1,
                "uidl": f"{n:012x}",
                "size": 1000 + n % 9000,
                "bytes": 1100 + n % 9000,
            }
            f.write(chain.seal_line(record) + "\n")
    return path


# --------------------------------------------------------------------------
# Peak RSS of a child process on a 200,000-record trail
# --------------------------------------------------------------------------

BIG = 200_000
#: How much more a tool's child may peak at than an idle child.
RSS_GROWTH_LIMIT = 16 * 1024 * 1024

CHILD = """
import os, sys
from popguard.trail.query import Filter, query, write_table
from popguard.trail.report import build_report, write_table as write_report
from popguard.trail.verify import verify

tool, path, key = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3])
if tool == "verify":
    report = verify([path], key=key)
    assert report.ok and report.records == int(sys.argv[4]), report
elif tool == "query":
    with open(os.devnull, "w") as sink:
        rows = write_table(query([path], Filter(users=("user007@example.com",))), sink)
    assert rows == int(sys.argv[4]) // 50, rows
elif tool == "report":
    with open(os.devnull, "w") as sink:
        write_report(build_report([path]), sink)
# VmHWM: this process's own peak.  ru_maxrss would carry over the peak of
# the process that forked it (pytest's), hiding growth below that.
with open("/proc/self/status") as status:
    print(next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:")))
"""


def child_peak(tool: str, path: Path) -> int:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, tool, str(path), KEY.hex(), str(BIG)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


@pytest.fixture(scope="module")
def big_trail(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_trail(tmp_path_factory.mktemp("big") / "audit.jsonl", BIG)


@pytest.fixture(scope="module")
def idle_peak(big_trail: Path) -> int:
    return child_peak("none", big_trail)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("tool", ["verify", "query", "report"])
def test_a_big_trail_is_streamed(big_trail: Path, idle_peak: int, tool: str) -> None:
    size = big_trail.stat().st_size
    assert size > 5 * RSS_GROWTH_LIMIT
    growth = child_peak(tool, big_trail) - idle_peak
    assert growth < RSS_GROWTH_LIMIT, (
        f"{tool} peaked {growth / 1e6:.1f} MB above an idle process on a {size / 1e6:.0f} MB trail"
    )


# --------------------------------------------------------------------------
# tracemalloc
# --------------------------------------------------------------------------

SMALL = 10_000
PEAK_LIMIT = 512 * 1024


@pytest.fixture(scope="module")
def small_trail(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_trail(tmp_path_factory.mktemp("small") / "audit.jsonl", SMALL)


def peak_of(work: Callable[[], object]) -> tuple[object, int]:
    gc.collect()
    tracemalloc.start()
    try:
        result = work()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak


def test_verify_allocations_stay_small(small_trail: Path) -> None:
    report, peak = peak_of(lambda: verify([str(small_trail)], key=KEY))
    assert report.ok, report.problem  # type: ignore[attr-defined]
    assert small_trail.stat().st_size > 8 * PEAK_LIMIT
    assert peak < PEAK_LIMIT, f"verify peaked at {peak / 1e3:.0f} kB"


def test_query_allocations_stay_small(small_trail: Path) -> None:
    def work() -> int:
        with open(os.devnull, "w", encoding="utf-8") as sink:
            return write_table(query([str(small_trail)], Filter(events=("message.*",))), sink)

    rows, peak = peak_of(work)
    assert rows == SMALL - 1 - (SMALL - 1 + 2) // 3
    assert peak < PEAK_LIMIT, f"query peaked at {peak / 1e3:.0f} kB"
