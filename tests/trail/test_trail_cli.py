"""``popguard audit verify|query|report`` through main(argv), and mounted."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
from trail_helpers import KEY, key_file, read_lines, rotated_trail, write_lines

from popguard.trail.cli import add_audit_commands, main

Capture = pytest.CaptureFixture[str]


def run(capsys: Capture, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def names(paths: list[Path]) -> list[str]:
    return [str(p) for p in paths]


# --------------------------------------------------------------------------
# verify
# --------------------------------------------------------------------------


def test_verify_ok_sorts_rotated_files(tmp_path: Path, capsys: Capture) -> None:
    paths = rotated_trail(tmp_path, key=KEY)
    keyfile = key_file(tmp_path)
    status, out, err = run(
        capsys, "audit", "verify", "--key-file", str(keyfile), *names(paths[::-1])
    )
    assert status == 0, out + err
    assert out.startswith("OK 65 records in 3 files")
    assert "chain w1 (hmac-sha256): seq 1..65, from its first record" in out
    checkpoint = next(line for line in out.splitlines() if line.startswith("checkpoint: "))
    assert checkpoint.startswith("checkpoint: w1:65:")

    status, out, _ = run(
        capsys,
        "audit",
        "verify",
        "--key-file",
        str(keyfile),
        "--checkpoint",
        checkpoint.split(": ")[1],
        *names(paths),
    )
    assert status == 0


def test_verify_as_given_finds_files_out_of_order(tmp_path: Path, capsys: Capture) -> None:
    paths = rotated_trail(tmp_path)
    status, out, _ = run(capsys, "audit", "verify", "--as-given", *names(paths[::-1]))
    assert status == 1
    assert out.startswith(f"FAIL {paths[1]}:1: out_of_order:")


def test_verify_reports_tampering_with_status_1(tmp_path: Path, capsys: Capture) -> None:
    paths = rotated_trail(tmp_path, gzip_oldest=False)
    lines = read_lines(paths[1])
    del lines[5]
    write_lines(paths[1], lines)
    status, out, _ = run(capsys, "audit", "verify", *names(paths))
    assert status == 1
    assert out.splitlines()[0] == (
        f"FAIL {paths[1]}:6: deleted: 1 record missing before this line (seq 28)"
    )
    assert "note: chain" not in out


def test_verify_json_format(tmp_path: Path, capsys: Capture) -> None:
    paths = rotated_trail(tmp_path)
    status, out, _ = run(capsys, "audit", "verify", "--format", "json", *names(paths))
    assert status == 0
    data = json.loads(out)
    assert data["ok"] is True
    assert data["records"] == 65


def test_verify_unkeyed_trail_carries_a_note(tmp_path: Path, capsys: Capture) -> None:
    paths = rotated_trail(tmp_path)
    status, out, _ = run(capsys, "audit", "verify", *names(paths))
    assert status == 0
    assert "sealed without a key" in out


def test_verify_usage_and_io_errors_exit_2(tmp_path: Path, capsys: Capture) -> None:
    paths = rotated_trail(tmp_path, key=KEY)
    status, _, err = run(capsys, "audit", "verify", *names(paths))
    assert status == 2
    assert "--key-file" in err

    loose = key_file(tmp_path, mode=0o644)
    status, _, err = run(capsys, "audit", "verify", "--key-file", str(loose), *names(paths))
    assert status == 2
    assert "chmod 600" in err

    status, _, err = run(capsys, "audit", "verify", str(tmp_path / "missing.jsonl"))
    assert status == 2
    assert "missing.jsonl" in err

    with pytest.raises(SystemExit) as exit_info:
        main(["audit", "verify", "--checkpoint", "nonsense", str(paths[0])])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["audit", "verify"])
    assert exit_info.value.code == 2


def test_verify_wrong_key_exits_1(tmp_path: Path, capsys: Capture) -> None:
    paths = rotated_trail(tmp_path, key=KEY)
    other = key_file(tmp_path, key=b"x" * 40)
    status, out, _ = run(capsys, "audit", "verify", "--key-file", str(other), *names(paths))
    assert status == 1
    assert ": wrong_key:" in out


# --------------------------------------------------------------------------
# query and report
# --------------------------------------------------------------------------


def test_query_json_and_table(tmp_path: Path, capsys: Capture) -> None:
    paths = rotated_trail(tmp_path)
    status, out, _ = run(
        capsys, "audit", "query", "--event", "deletions.*", "--user", "alice", *names(paths)
    )
    assert status == 0
    records = [json.loads(line) for line in out.splitlines()]
    assert records
    assert all(r["event"] == "deletions.committed" for r in records)
    assert all(r["user"] == "alice" for r in records)

    status, out, _ = run(
        capsys,
        "audit",
        "query",
        "--format",
        "table",
        "--client",
        "2001:db8::/32",
        "--since",
        "2026-11-26T08:00:00Z",
        *names(paths),
    )
    assert status == 0
    lines = out.splitlines()
    assert lines[0].startswith("TIMESTAMP")
    assert len(lines) > 1
    assert all("[2001:db8::5]:6000" in line for line in lines[1:])


def test_query_bad_flags_exit_2(tmp_path: Path) -> None:
    paths = rotated_trail(tmp_path)
    for flags in (["--client", "example.com"], ["--since", "last tuesday"], ["--format", "xml"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["audit", "query", *flags, str(paths[0])])
        assert exit_info.value.code == 2


def test_query_missing_file_exits_2(tmp_path: Path, capsys: Capture) -> None:
    status, out, err = run(capsys, "audit", "query", str(tmp_path / "nope.jsonl"))
    assert status == 2
    assert out == ""
    assert "nope.jsonl" in err


def test_query_warns_about_skipped_lines(tmp_path: Path, capsys: Capture) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text('{"event":"a"}\n{broken\n', encoding="utf-8")
    status, out, err = run(capsys, "audit", "query", str(path))
    assert status == 0
    assert out == '{"event":"a"}\n'
    assert f"skipped {path}:2:" in err


def test_report_table_and_json(tmp_path: Path, capsys: Capture) -> None:
    paths = rotated_trail(tmp_path)
    status, out, _ = run(capsys, "audit", "report", *names(paths))
    assert status == 0
    assert out.splitlines()[0].split()[:3] == ["USER", "DAY", "LOGINS"]
    assert out.splitlines()[-1].startswith("TOTAL")
    status, out, _ = run(capsys, "audit", "report", "--format", "json", *names(paths))
    assert status == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert sum(row["logins"] for row in rows) > 0


# --------------------------------------------------------------------------
# Mounting
# --------------------------------------------------------------------------


def test_mounts_on_another_parser(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="popguard")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve")
    add_audit_commands(commands)
    paths = rotated_trail(tmp_path)
    args = parser.parse_args(["audit", "report", *names(paths)])
    assert args.command == "audit"
    assert args.audit_command == "report"
    assert callable(args.func)
    assert not hasattr(parser.parse_args(["serve"]), "func")


def test_runs_as_a_module(tmp_path: Path) -> None:
    paths = rotated_trail(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "popguard.trail.cli", "audit", "verify", *names(paths)],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("OK 65 records")
