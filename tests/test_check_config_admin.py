"""``popguard check-config`` warns when the admin listener is reachable from other hosts."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from popguard.cli import main

CONFIG = 'upstream:\n  address: "127.0.0.1:110"\nadmin:\n  listen: "{listen}"\n'
#: Where the admin.listen value starts in CONFIG (line 4, after `  listen: `).
POSITION = "4:11"


def check(tmp_path: Path, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """Run check-config on tmp_path/popguard.yaml: (exit code, stderr); stdout must say OK."""
    path = tmp_path / "popguard.yaml"
    code = main(["check-config", "--config", str(path), *argv])
    out, err = capsys.readouterr()
    if code == 0:
        assert out == f"{path}: OK\n"
    return code, err


def write(tmp_path: Path, listen: str) -> Path:
    path = tmp_path / "popguard.yaml"
    path.write_text(CONFIG.format(listen=listen))
    return path


@pytest.mark.parametrize(
    ("listen", "shown", "scope", "local"),
    [
        ("0.0.0.0:9110", "0.0.0.0:9110", "binds every address of this host", True),
        ("[::]:9110", "[::]:9110", "binds every address of this host", True),
        ("10.0.0.11:9110", "10.0.0.11:9110", "is not a loopback address", False),
        ("192.168.1.5:9999", "192.168.1.5:9999", "is not a loopback address", False),
        ("[2001:db8::1]:9110", "[2001:db8::1]:9110", "is not a loopback address", False),
        ("[::ffff:10.0.0.1]:9110", "[::ffff:10.0.0.1]:9110", "is not a loopback address", False),
    ],
)
def test_a_non_loopback_admin_address_is_a_warning_not_an_error(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    listen: str,
    shown: str,
    scope: str,
    local: bool,
) -> None:
    """The exposure is a warning; an address that is not this host's is an error of its own.

    The wildcards are on every host (where it has IPv6 at all); the
    documentation and private addresses are taken to be on none.
    """
    path = write(tmp_path, listen)
    code, err = check(tmp_path, capsys)
    port = listen.rsplit(":", 1)[1]
    lines = err.splitlines()
    assert lines[0] == (
        f"{path}:{POSITION}: warning: admin.listen: {shown} {scope}: the admin endpoint has "
        "no authentication and exposes metrics and health (/metrics, /healthz, /readyz) to "
        f"anyone who can reach it; bind it to loopback (127.0.0.1:{port} or [::1]:{port}), "
        "or firewall the port so that only your scraper and load balancer reach it"
    )
    if local and (listen.startswith("0") or socket.has_ipv6):
        assert (code, len(lines)) == (0, 1), err
    else:
        assert code == 1
        assert len(lines) == 2
        assert lines[1].startswith(f"{path}:{POSITION}: error: admin.listen: ")
        host = shown.rsplit(":", 1)[0].strip("[]")
        assert f"{host} is not an address of this host" in lines[1] or "cannot listen" in lines[1]


@pytest.mark.parametrize(
    "listen",
    ["127.0.0.1:9110", "127.8.9.10:9110", "[::1]:9110", "localhost:9110", "[::ffff:127.0.0.1]:9"],
)
def test_a_loopback_admin_address_is_fine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], listen: str
) -> None:
    write(tmp_path, listen)
    assert check(tmp_path, capsys) == (0, "")


@pytest.mark.parametrize(
    "admin", ["", "admin:\n", "admin:\n  listen: null\n", "admin:\n  listen: ~\n"]
)
def test_no_admin_listener_no_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], admin: str
) -> None:
    (tmp_path / "popguard.yaml").write_text(f'upstream:\n  address: "127.0.0.1:110"\n{admin}')
    assert check(tmp_path, capsys) == (0, "")


def test_the_admin_listen_flag_is_checked_instead_of_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """As with serve, --admin-listen replaces admin.listen: its address is the one checked."""
    write(tmp_path, "127.0.0.1:9110")
    code, err = check(tmp_path, capsys, "--admin-listen", "0.0.0.0:9110")
    assert code == 0
    assert err.startswith(
        "<command line>: warning: --admin-listen: 0.0.0.0:9110 binds every address of this host"
    )
    assert err.count("\n") == 1

    write(tmp_path, "0.0.0.0:9110")
    assert check(tmp_path, capsys, "--admin-listen", "[::1]:9110") == (0, "")


def test_the_warning_comes_after_the_files_other_warnings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "popguard.yaml"
    path.write_text(
        'upstream:\n  address: "127.0.0.1:110"\n  tls: implicit\n  tls_verify: false\n'
        'admin:\n  listen: "0.0.0.0:9110"\n'
    )
    code, err = check(tmp_path, capsys)
    assert code == 0
    lines = err.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{path}:4:15: warning: upstream.tls_verify:")
    assert lines[1].startswith(f"{path}:6:11: warning: admin.listen: 0.0.0.0:9110 binds")


def test_errors_still_fail_with_a_non_loopback_admin_address(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "popguard.yaml"
    path.write_text(
        'upstream:\n  address: "127.0.0.1:110"\n  bogus: 1\nadmin:\n  listen: "0.0.0.0:1"\n'
    )
    code, err = check(tmp_path, capsys)
    assert code == 1
    assert "bogus" in err


def test_an_invalid_admin_listen_flag_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path, "127.0.0.1:9110")
    with pytest.raises(SystemExit) as info:
        check(tmp_path, capsys, "--admin-listen", "admin.example.org:9110")
    assert info.value.code == 2
    assert "--admin-listen" in capsys.readouterr().err
