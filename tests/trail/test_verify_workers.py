"""``audit verify`` over the chains of ``workers: N``: one per process, cross-checked.

The trails are written by popguard's own writer (AuditLog + FileSink, with
the ``worker`` identity the supervisor and its workers give it): the parent
writes audit.jsonl (worker 0), worker N writes audit.wN.jsonl.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from trail_helpers import KEY, key_file

from popguard.audit import AuditLog
from popguard.shell.workers import worker_audit_file
from popguard.sinks.file import FileSink
from popguard.trail.cli import main
from popguard.trail.verify import Kind, VerifyReport, verify

Capture = pytest.CaptureFixture[str]
Events = Sequence[tuple[str, dict[str, Any]]]


def write_trail(path: Path, worker: int | None, events: Events, key: bytes | None = None) -> Path:
    """Run one process's audit log over ``path`` (a new chain, or resumed)."""
    audit = AuditLog([FileSink(path, fsync="never", key=key)], worker=worker)
    for name, fields in events:
        audit.event(name, **fields)
    audit.close()
    return path


def supervisor_events(workers: int) -> Events:
    return [
        ("popguard.workers.started", {"workers": workers, "listeners": {"pop3": ["0.0.0.0:110"]}}),
        *[("popguard.worker.started", {"slot": i, "pid": 1000 + i}) for i in range(1, workers + 1)],
        *[("popguard.worker.ready", {"slot": i}) for i in range(1, workers + 1)],
        ("popguard.workers.ready", {"workers": workers}),
    ]


def worker_events(index: int) -> Events:
    return [
        ("popguard.started", {"listeners": ["0.0.0.0:110"]}),
        ("session.opened", {"session": f"{index:016x}", "client": "192.0.2.1:5000"}),
        ("session.closed", {"session": f"{index:016x}", "reason": "quit"}),
    ]


def line_of(path: Path, event: str, occurrence: int = 1) -> int:
    """The 1-based line of the ``occurrence``-th record called ``event``."""
    seen = 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if json.loads(line)["event"] == event:
            seen += 1
            if seen == occurrence:
                return number
    raise AssertionError(f"no {event} #{occurrence} in {path}")


def deployment(
    tmp_path: Path, workers: int = 2, key: bytes | None = None, running: int | None = None
) -> dict[int, Path]:
    """The supervisor's file and each worker's: {0: audit.jsonl, 1: audit.w1.jsonl, ...}.

    ``running``: how many worker files to write (default: every worker).
    """
    parent = tmp_path / "audit.jsonl"
    files = {0: write_trail(parent, 0, supervisor_events(workers), key)}
    for index in range(1, (workers if running is None else running) + 1):
        path = Path(worker_audit_file(str(parent), index))
        files[index] = write_trail(path, index, worker_events(index), key)
    return files


def check(paths: Sequence[Path], key: bytes | None = None) -> VerifyReport:
    return verify([str(p) for p in paths], key=key)


def run(capsys: Capture, *argv: str | Path) -> tuple[int, str]:
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert err == ""
    return status, out


# --------------------------------------------------------------------------
# Every chain present
# --------------------------------------------------------------------------


@pytest.mark.parametrize("key", [None, KEY], ids=["sha256", "hmac"])
def test_every_chain_present_verifies(tmp_path: Path, key: bytes | None) -> None:
    files = deployment(tmp_path, 2, key)
    assert sorted(p.name for p in files.values()) == [
        "audit.jsonl",
        "audit.w1.jsonl",
        "audit.w2.jsonl",
    ]
    report = check(list(files.values()), key)
    assert report.ok, report.problem
    assert report.exit_status == 0
    by_worker = {c.worker: c for c in report.chains}
    assert sorted(by_worker) == [0, 1, 2]
    assert len({c.chain_id for c in report.chains}) == 3, "one chain per process"
    supervisor = by_worker[0]
    assert supervisor.files == [str(files[0])]
    assert supervisor.workers == 2
    assert supervisor.workers_at == (str(files[0]), line_of(files[0], "popguard.workers.started"))
    for index in (1, 2):
        assert by_worker[index].files == [str(files[index])]
        assert by_worker[index].workers is None


def test_the_order_of_the_files_does_not_matter(tmp_path: Path) -> None:
    files = deployment(tmp_path, 3)
    report = check([files[2], files[0], files[3], files[1]])
    assert report.ok, report.problem
    assert sorted(c.worker for c in report.chains) == [0, 1, 2, 3]


def test_text_output_names_each_writer(tmp_path: Path, capsys: Capture) -> None:
    files = deployment(tmp_path, 2)
    status, out = run(capsys, "audit", "verify", *files.values())
    assert status == 0, out
    assert out.startswith("OK ")
    report = check(list(files.values()))
    ids = {c.worker: c.chain_id for c in report.chains}
    chain_lines = [line for line in out.splitlines() if line.startswith("chain ")]
    assert len(chain_lines) == 3
    assert f"chain {ids[0]} (supervisor, sha256): seq 1.." in out
    assert f"chain {ids[1]} (worker 1, sha256): seq 1.." in out
    assert f"chain {ids[2]} (worker 2, sha256): seq 1.." in out


def test_text_output_with_a_key(tmp_path: Path, capsys: Capture) -> None:
    files = deployment(tmp_path, 2, KEY)
    keyfile = key_file(tmp_path)
    status, out = run(capsys, "audit", "verify", "--key-file", keyfile, *files.values())
    assert status == 0, out
    assert "(supervisor, hmac-sha256)" in out
    assert "(worker 2, hmac-sha256)" in out


def test_a_single_process_trail_names_no_writer(tmp_path: Path, capsys: Capture) -> None:
    path = write_trail(tmp_path / "audit.jsonl", None, worker_events(1))
    report = check([path])
    assert report.ok, report.problem
    (chain,) = report.chains
    assert chain.worker is None
    assert chain.workers is None
    status, out = run(capsys, "audit", "verify", path)
    assert status == 0
    assert f"chain {chain.chain_id} (sha256): seq 1..4, from its first record" in out
    assert "supervisor" not in out
    assert "worker" not in out


def test_json_output_has_each_chains_worker(tmp_path: Path, capsys: Capture) -> None:
    files = deployment(tmp_path, 2)
    single = write_trail(tmp_path / "other.jsonl", None, worker_events(9))
    status, out = run(capsys, "audit", "verify", "--format", "json", *files.values(), single)
    assert status == 0, out
    data = json.loads(out)
    assert data["ok"] is True
    workers = {Path(c["files"][0]).name: c["worker"] for c in data["chains"]}
    assert workers == {
        "audit.jsonl": 0,
        "audit.w1.jsonl": 1,
        "audit.w2.jsonl": 2,
        "other.jsonl": None,
    }


# --------------------------------------------------------------------------
# A worker's chain missing
# --------------------------------------------------------------------------


def test_a_missing_worker_chain_fails(tmp_path: Path) -> None:
    files = deployment(tmp_path, 2)
    report = check([files[0], files[1]])
    assert report.problem is not None
    assert report.problem.kind is Kind.MISSING_WORKER
    assert report.exit_status == 1
    # It points at the supervisor's record that says there are two workers.
    assert (report.problem.file, report.problem.line) == (
        str(files[0]),
        line_of(files[0], "popguard.workers.started"),
    )
    assert "started 2 workers" in report.problem.detail
    assert "worker(s) 2 " in report.problem.detail


def test_every_missing_worker_is_named(tmp_path: Path) -> None:
    files = deployment(tmp_path, 4, running=1)
    report = check([files[0], files[1]])
    assert report.problem is not None
    assert report.problem.kind is Kind.MISSING_WORKER
    assert "worker(s) 2, 3, 4 " in report.problem.detail


def test_only_the_supervisors_chain_given_fails(tmp_path: Path) -> None:
    files = deployment(tmp_path, 2)
    report = check([files[0]])
    assert report.problem is not None
    assert report.problem.kind is Kind.MISSING_WORKER
    assert "worker(s) 1, 2 " in report.problem.detail


def test_a_missing_worker_fails_in_the_cli(tmp_path: Path, capsys: Capture) -> None:
    files = deployment(tmp_path, 2)
    line = line_of(files[0], "popguard.workers.started")
    status, out = run(capsys, "audit", "verify", files[0], files[1])
    assert status == 1
    assert out.splitlines()[0].startswith(f"FAIL {files[0]}:{line}: missing_worker: ")
    status, out = run(capsys, "audit", "verify", "--format", "json", files[0], files[1])
    assert status == 1
    problem = json.loads(out)["problem"]
    assert (problem["kind"], problem["file"], problem["line"]) == (
        "missing_worker",
        str(files[0]),
        line,
    )


def test_a_worker_chain_of_another_number_does_not_count(tmp_path: Path) -> None:
    """Worker 3's chain (from an earlier, bigger start elsewhere) is no worker 2."""
    files = deployment(tmp_path, 2, running=1)
    stray = write_trail(tmp_path / "audit.w3.jsonl", 3, worker_events(3))
    report = check([files[0], files[1], stray])
    assert report.problem is not None
    assert report.problem.kind is Kind.MISSING_WORKER
    assert "worker(s) 2 " in report.problem.detail


# --------------------------------------------------------------------------
# Restarts with another worker count; partial sets of files
# --------------------------------------------------------------------------


def test_the_last_start_counts_fewer_workers(tmp_path: Path) -> None:
    """Restarted with one worker: worker 2's chain is no longer required."""
    files = deployment(tmp_path, 2, running=1)
    write_trail(files[0], 0, supervisor_events(1))  # the parent resumes its chain
    report = check([files[0], files[1]])
    assert report.ok, report.problem
    (supervisor,) = [c for c in report.chains if c.worker == 0]
    assert supervisor.workers == 1
    assert supervisor.workers_at == (
        str(files[0]),
        line_of(files[0], "popguard.workers.started", occurrence=2),
    )


def test_the_last_start_counts_more_workers(tmp_path: Path) -> None:
    """Restarted with three workers: the third's chain is required, and missing."""
    files = deployment(tmp_path, 2)
    write_trail(files[0], 0, supervisor_events(3))
    report = check(list(files.values()))
    assert report.problem is not None
    assert report.problem.kind is Kind.MISSING_WORKER
    assert report.problem.line == line_of(files[0], "popguard.workers.started", occurrence=2)
    assert "started 3 workers" in report.problem.detail
    assert "worker(s) 3 " in report.problem.detail


def test_a_worker_chain_alone_verifies(tmp_path: Path, capsys: Capture) -> None:
    """Without the supervisor's chain there is nothing to cross-check."""
    files = deployment(tmp_path, 2)
    report = check([files[2]])
    assert report.ok, report.problem
    (chain,) = report.chains
    assert chain.worker == 2
    status, out = run(capsys, "audit", "verify", files[2])
    assert status == 0
    assert "(worker 2, sha256)" in out


def test_workers_chains_without_the_supervisors_verify(tmp_path: Path) -> None:
    files = deployment(tmp_path, 3)
    report = check([files[1], files[3]])
    assert report.ok, report.problem
    assert sorted(c.worker for c in report.chains) == [1, 3]


def test_a_worker_file_claiming_worker_0_is_no_supervisor_count(tmp_path: Path) -> None:
    """workers.started counts only in a chain written by the supervisor (worker 0)."""
    path = write_trail(tmp_path / "audit.w1.jsonl", 1, supervisor_events(2))
    report = check([path])
    assert report.ok, report.problem
    (chain,) = report.chains
    assert chain.worker == 1
    assert chain.workers is None


def test_tampering_is_still_found_before_the_cross_check(tmp_path: Path) -> None:
    """A missing worker does not hide an altered record (or the other way round)."""
    files = deployment(tmp_path, 2)
    lines = files[1].read_text(encoding="utf-8").splitlines()
    record = json.loads(lines[2])
    record["client"] = "203.0.113.66:1"
    lines[2] = json.dumps(record, separators=(",", ":"))
    files[1].write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = check([files[0], files[1]])
    assert report.problem is not None
    assert report.problem.kind is not Kind.MISSING_WORKER
    assert (report.problem.file, report.problem.line) == (str(files[1]), 3)


def test_a_supervisor_continuing_a_single_process_chain_is_checked(tmp_path: Path) -> None:
    parent = tmp_path / "audit.jsonl"
    write_trail(parent, None, worker_events(1))  # before: workers: 1
    write_trail(parent, 0, supervisor_events(2))  # after the upgrade, the chain resumes
    records = [json.loads(line) for line in parent.read_text(encoding="utf-8").splitlines()]
    assert len({r["chain"] for r in records}) == 1, "the supervisor resumed the chain"
    assert records[-1]["worker"] == 0
    report = check([parent])  # neither worker's chain given
    assert report.problem is not None, "the two missing worker chains went unnoticed"
    assert report.problem.kind is Kind.MISSING_WORKER


def test_a_single_process_continuing_a_supervisor_chain_needs_no_workers(tmp_path: Path) -> None:
    """Back to one process (workers: 1): the chain's last writer is no supervisor,
    so the old workers.started record no longer asks for worker chains."""
    parent = tmp_path / "audit.jsonl"
    write_trail(parent, 0, supervisor_events(2))
    write_trail(parent, None, worker_events(1))  # the single process resumes the chain
    report = check([parent])
    assert report.problem is None, report.problem
    (chain,) = report.chains
    assert chain.worker is None
