"""popguard policy check|explain: output and exit codes."""

from __future__ import annotations

import argparse
import ipaddress
import json
import textwrap
from pathlib import Path

import pytest

from popguard.policy.cli import (
    COMBINING,
    add_policy_commands,
    explain,
    format_value,
    main,
)
from popguard.policy.load import load_policies
from popguard.policy.model import SETTINGS, Context, Throttle

TWO_RULES = """\
rules:
  - name: alice-read-only
    match:
      user: alice
    set:
      deny_commands: [DELE, RSET]
      idle_timeout: 1800
  - name: everyone
    set:
      deny_commands: [DELE]
      idle_timeout: 900
      max_sessions_per_client: 10
"""


def write(directory: Path, text: str, name: str = "50-test.yaml") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["policy", *argv])
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------
# check
# --------------------------------------------------------------------------


def test_check_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path, TWO_RULES)
    write(tmp_path, "rules: []", "00-default.yaml")
    code, out, err = run(capsys, "check", str(tmp_path))
    assert code == 0
    assert out == f"{tmp_path}: 2 rules in 2 files, OK\n"
    assert err == ""


def test_check_singular(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path, "rules: [{name: r, set: {access: allow}}]")
    assert run(capsys, "check", str(tmp_path))[1] == f"{tmp_path}: 1 rule in 1 file, OK\n"


def test_check_errors_exit_1_with_located_issues(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        """\
        rules:
          - name: r
            set:
              access: maybe
              idle_timeout: 60
        """,
    )
    code, out, err = run(capsys, "check", str(tmp_path))
    assert code == 1
    assert out == ""
    assert err.splitlines() == [
        f"{path}:4:15: error: rule 'r': set.access: expected one of allow, deny, got 'maybe'",
        f"{path}:5:21: warning: rule 'r': set.idle_timeout is 60 seconds, below 600: "
        "RFC 1939 §3 requires a POP3 server's inactivity autologout timer to be at least "
        "10 minutes",
        f"{tmp_path}: 1 error, 1 warning",
    ]


def test_check_warnings_exit_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "rules: [{name: r, set: {idle_timeout: 60}}]")
    code, out, err = run(capsys, "check", str(tmp_path))
    assert code == 0
    assert err.startswith(f"{path}:1:39: warning: ")
    assert out.endswith("1 rule in 1 file, OK\n")


def test_check_a_missing_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "check", str(tmp_path / "nope"))
    assert code == 1
    assert f"{tmp_path / 'nope'}: error: policy directory not found" in err


def test_check_defaults_to_policies_in_the_current_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "policies", "rules: []", "00-default.yaml")
    monkeypatch.chdir(tmp_path)
    assert run(capsys, "check") == (0, "policies: 0 rules in 1 file, OK\n", "")


def test_check_the_shipped_directory(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(Path(__file__).resolve().parent.parent.parent)
    assert run(capsys, "check", "policies") == (0, "policies: 0 rules in 1 file, OK\n", "")


def test_check_with_a_config_file_uses_its_directory_and_listeners(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path / "rules",
        "rules: [{name: r, match: {listener: [legacy]}, set: {access: deny}}]",
    )
    config = write(
        tmp_path,
        """\
        listeners:
          - name: main
            listen: "127.0.0.1:1110"
        policies: rules
        """,
        "popguard.yaml",
    )
    code, out, err = run(capsys, "check", "--config", str(config))
    assert code == 0
    assert out == f"{tmp_path / 'rules'}: 1 rule in 1 file, OK\n"
    assert err.startswith(f"{path}:1:38: warning: rule 'r': match.listener: no listener")


def test_check_with_a_bad_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write(tmp_path, "listners: []\n", "popguard.yaml")
    code, _, err = run(capsys, "check", "--config", str(config), str(tmp_path))
    assert code == 1
    assert "unknown top-level key 'listners'" in err


def test_commands_mount_under_another_parser() -> None:
    parser = argparse.ArgumentParser(prog="popguard")
    commands = parser.add_subparsers(dest="command", required=True)
    add_policy_commands(commands)
    args = parser.parse_args(["policy", "explain", "--user", "alice", "--client", "::1", "d"])
    assert (args.command, args.policy_command, args.directory) == ("policy", "explain", "d")
    assert args.client == ipaddress.ip_address("::1")
    assert callable(args.func)


# --------------------------------------------------------------------------
# explain
# --------------------------------------------------------------------------


def test_explain_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, TWO_RULES)
    code, out, err = run(
        capsys, "explain", "--user", "alice", "--client", "192.0.2.7", str(tmp_path)
    )
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == f"directory: {tmp_path} (2 rules)"
    assert lines[1] == (
        "context: client 192.0.2.7, listener (none), tls no, claimed user alice, user alice"
    )
    table = {line.split()[0]: line for line in lines[3:] if line and not line[0].isspace()}
    assert set(SETTINGS) <= set(table)
    assert "(not set: popguard default)" in table["access"]
    assert "10" in table["max_sessions_per_client"]
    assert f"rule everyone ({path}:8, enforce)" in table["max_sessions_per_client"]
    # deny_commands: the broad rule before login, alice's after.
    index = lines.index(table["deny_commands"])
    assert "DELE" in lines[index]
    assert f"rule everyone ({path}:8, enforce)" in lines[index]
    assert "connect, user named" in lines[index]
    follow = lines[index + 1]
    assert follow.startswith(" ")
    assert "DELE, RSET" in follow
    assert "after login" in follow
    assert f"rule alice-read-only ({path}:2, enforce)" in follow
    assert " ".join(COMBINING.split()) in " ".join(out.split())


def test_explain_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, TWO_RULES)
    code, out, _ = run(
        capsys,
        "explain",
        "--user",
        "bob",
        "--client",
        "[2001:db8::1]:40000",
        "--listener",
        "main",
        "--format",
        "json",
        str(tmp_path),
    )
    assert code == 0
    document = json.loads(out)
    assert document["context"] == {
        "client": "2001:db8::1",
        "listener": "main",
        "tls": False,
        "claimed_user": "bob",
        "user": "bob",
    }
    assert list(document["settings"]) == list(SETTINGS)
    assert document["settings"]["deny_commands"] == [
        {
            "phases": ["connect", "claim", "login"],
            "known": True,
            "set": True,
            "value": ["DELE"],
            "rule": {"name": "everyone", "file": str(path), "line": 8, "mode": "enforce"},
        }
    ]
    assert document["settings"]["access"][0]["set"] is False
    assert document["model"] == COMBINING


def test_explain_without_a_user(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path, TWO_RULES)
    code, out, _ = run(capsys, "explain", str(tmp_path))
    assert code == 0
    line = next(line for line in out.splitlines() if line.startswith("max_sessions_per_user"))
    assert "depends on the user" in line


def test_explain_invalid_policies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path, "rules: [{name: r, set: {access: maybe}}]")
    code, out, err = run(capsys, "explain", "--user", "a", str(tmp_path))
    assert (code, out) == (1, "")
    assert "error: rule 'r'" in err


def test_explain_rejects_a_bad_client(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["policy", "explain", "--client", "not-an-address", str(tmp_path)])
    assert info.value.code == 2
    assert "invalid client address 'not-an-address'" in capsys.readouterr().err


def test_explain_phases_follow_the_context(tmp_path: Path) -> None:
    write(
        tmp_path,
        """\
        rules:
          - name: bob-claimed
            match: {claimed_user: bob}
            set: {access: deny, max_sessions_per_client: 1}
          - name: everyone
            set: {access: allow, max_sessions_per_client: 5}
        """,
    )
    policies, _ = load_policies(str(tmp_path))
    decisions = explain(policies, Context(client=None, claimed_user="bob"))
    access = [d for d in decisions if d.setting == "access"]
    assert [(d.phases, d.chosen.value if d.chosen else None) for d in access] == [
        (("connect",), "allow"),
        (("claim",), "deny"),
    ]
    # Decided at connect only: the claimed_user rule cannot set it.
    (limit,) = [d for d in decisions if d.setting == "max_sessions_per_client"]
    assert limit.chosen is not None
    assert limit.chosen.value == 5


@pytest.mark.parametrize(
    ("name", "value", "text"),
    [
        ("access", "deny", "deny"),
        ("deny_commands", ("DELE", "RSET"), "DELE, RSET"),
        ("deny_commands", (), "(none)"),
        ("auth_mechanisms", (), "(none: every login refused)"),
        ("auth_mechanisms", None, "any mechanism (null)"),
        ("deny_reply", "No deleting", '"No deleting"'),
        ("idle_timeout", 900.0, "900 s"),
        ("idle_timeout", None, "popguard default (null)"),
        ("max_sessions_total", 1000, "1000"),
        ("max_sessions_total", None, "no limit (null)"),
        ("require_tls", False, "false"),
        ("login_throttle", None, "off (null)"),
        (
            "login_throttle",
            Throttle(5, 300.0, 900.0, ("client", "user")),
            "5 failed logins in 300 s: block 900 s, by client, user",
        ),
    ],
)
def test_format_value(name: str, value: object, text: str) -> None:
    assert format_value(name, value) == text
