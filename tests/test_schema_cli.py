"""The command line over the schema: ``config schema``, check-config's host checks, flags.

Also the two demo commands' failures that used to end in a traceback (a
port in use, Ctrl-C); those run popguard in a subprocess, on loopback.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from popguard.cli import main
from popguard.schema.config_models import ConfigFile
from popguard.schema.policy_models import PolicyFile

#: How long a subprocess gets to start or to end.
PROCESS_TIMEOUT = 20.0
#: An address of no host here (TEST-NET-2, RFC 5737).
NOT_HERE = "198.51.100.7"


def popguard(*argv: str) -> list[str]:
    return [sys.executable, "-m", "popguard", *argv]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# --------------------------------------------------------------------------
# popguard config schema
# --------------------------------------------------------------------------


def test_config_schema_is_the_models_json_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["title"] == "popguard config file"
    assert list(schema["properties"]) == list(ConfigFile.model_fields)
    assert schema["additionalProperties"] is False
    listener = schema["$defs"]["ListenerModel"]
    assert listener["required"] == ["listen"]
    assert listener["additionalProperties"] is False
    limits = schema["$defs"]["LimitsModel"]["properties"]
    assert limits["max_command_line"]["minimum"] == 255


def test_policy_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "schema", "--policy"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"] == "popguard policy file"
    assert list(schema["properties"]) == list(PolicyFile.model_fields)
    rule = schema["$defs"]["RuleModel"]
    assert list(rule["properties"]) == ["name", "mode", "match", "set"]
    assert sorted(rule["required"]) == ["name", "set"]


# --------------------------------------------------------------------------
# check-config: what it can know of this host
# --------------------------------------------------------------------------


def check(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str], str]:
    code = main(["check-config", "--config", str(path)])
    out, err = capsys.readouterr()
    return code, err.splitlines(), out


def test_a_listen_address_not_on_this_host_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "popguard.yaml"
    path.write_text(
        f'listeners:\n  - listen: "127.0.0.1:1110"\n  - listen: "{NOT_HERE}:1110"\n'
        'upstream: {address: "127.0.0.1:110"}\n'
    )
    code, err, out = check(path, capsys)
    assert code == 1
    assert out == ""
    assert err == [
        f"{path}:3:13: error: listeners[1].listen: {NOT_HERE} is not an address of this "
        "host (Cannot assign requested address)"
    ]


def test_an_audit_file_in_a_missing_directory_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "popguard.yaml"
    path.write_text('upstream: {address: "127.0.0.1:110"}\naudit:\n  file: logs/audit.jsonl\n')
    code, err, _ = check(path, capsys)
    assert code == 1
    assert err == [
        f"{path}:3:9: error: audit.file: the directory {tmp_path / 'logs'} does not exist "
        "(create it, or change audit.file)"
    ]
    (tmp_path / "logs").mkdir()
    assert check(path, capsys)[:2] == (0, [])


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes everywhere")
def test_an_audit_directory_that_is_not_writable_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    logs.chmod(0o555)
    path = tmp_path / "popguard.yaml"
    path.write_text(f"audit:\n  file: '{logs / 'audit.jsonl'}'\n")
    try:
        code, err, _ = check(path, capsys)
    finally:
        logs.chmod(0o755)
    assert code == 1
    assert err == [
        f"{path}:2:9: error: audit.file: cannot create {logs / 'audit.jsonl'}: the directory "
        f"{logs} is not writable by this user"
    ]


def test_an_unreadable_certificate_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.pem"
    path = tmp_path / "popguard.yaml"
    path.write_text(
        f'listeners:\n  - listen: "127.0.0.1:1995"\n    tls: implicit\n'
        f"    cert: '{missing}'\n    key: '{missing}'\n"
    )
    code, err, _ = check(path, capsys)
    assert code == 1
    assert err == [
        f"{path}:4:11: error: listeners[0].cert: cannot read {missing}: No such file or directory"
    ]


def test_serve_names_the_audit_file_it_cannot_open(tmp_path: Path) -> None:
    path = tmp_path / "popguard.yaml"
    audit = tmp_path / "missing" / "audit.jsonl"
    path.write_text(
        f'listeners: [{{listen: "127.0.0.1:{free_port()}"}}]\n'
        f'upstream: {{address: "127.0.0.1:{free_port()}"}}\n'
        f"audit: {{file: '{audit}'}}\n"
    )
    done = subprocess.run(
        popguard("serve", "--config", str(path)),
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
        check=False,
    )
    assert done.returncode == 1
    assert done.stderr == f"popguard: {audit}: No such file or directory\n"


# --------------------------------------------------------------------------
# Flags are validated by the models
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "line"),
    [
        (["--workers", "0"], "popguard serve: error: argument --workers: must be at least 1 "
         "(one process at least; or 'auto'), got 0"),
        (["--workers", "lots"], "popguard serve: error: argument --workers: expected one of "
         "auto, got 'lots'"),
        (["--tls", "pop3s"], "<command line>: error: --tls: expected one of none, implicit, "
         "starttls, got 'pop3s'"),
        (["--upstream-tls", "Implicit"], "<command line>: error: --upstream-tls: expected one "
         "of none, implicit, starttls, got 'Implicit' (did you mean 'implicit'?)"),
        (["--idle-timeout", "nan"], "<command line>: error: --idle-timeout: must be a finite "
         "number of seconds, got nan"),
    ],
)  # fmt: skip
def test_serve_flags_are_checked_by_the_config_models(
    capsys: pytest.CaptureFixture[str], flags: list[str], line: str
) -> None:
    """Each is worded by the model of the key the flag overrides; exit 2 before serving.

    ``--workers`` is checked as it is parsed (a usage error), the others
    once the flags are applied over the file.
    """
    argv = ["serve", "--listen", "127.0.0.1:1", "--upstream", "127.0.0.1:2", *flags]
    code: object
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    assert line in capsys.readouterr().err.splitlines()


def test_an_invalid_admin_listen_flag_is_worded_like_the_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "popguard.yaml"
    path.write_text("{}\n")
    with pytest.raises(SystemExit) as info:
        main(["check-config", "--config", str(path), "--admin-listen", "*:9110"])
    assert info.value.code == 2
    assert capsys.readouterr().err == (
        "<command line>: error: --admin-listen: invalid listen address '*:9110': use 0.0.0.0 "
        "(all IPv4 addresses) or [::] (all IPv6 addresses) instead of '*'\n"
    )


# --------------------------------------------------------------------------
# The demo tools end in one line, not a traceback
# --------------------------------------------------------------------------


def test_demo_with_its_port_taken_prints_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            popguard("demo", "--listen", f"127.0.0.1:{port}", "--audit-file", "audit.jsonl"),
            capture_output=True,
            text=True,
            timeout=PROCESS_TIMEOUT,
            check=False,
            cwd=tmp_path,
        )
    assert done.returncode == 1
    assert done.stderr == f"popguard: cannot listen on 127.0.0.1:{port}: Address already in use\n"


def test_demo_upstream_stops_on_ctrl_c_without_a_traceback() -> None:
    port = free_port()
    process = subprocess.Popen(
        popguard("demo-upstream", "--listen", f"127.0.0.1:{port}"),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        banner = process.stderr.readline()  # printed once it listens
        assert banner.startswith(f"demo upstream on 127.0.0.1:{port} ")
        with socket.create_connection(("127.0.0.1", port), timeout=PROCESS_TIMEOUT) as client:
            assert client.recv(64).startswith(b"+OK")
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=PROCESS_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130
    assert err == ""


def test_demo_upstream_refuses_a_bad_address_in_one_line() -> None:
    done = subprocess.run(
        popguard("demo-upstream", "--listen", "127.0.0.1:0"),
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr == (
        "popguard: --listen: invalid address '127.0.0.1:0': port 0 is out of range 1-65535\n"
    )
