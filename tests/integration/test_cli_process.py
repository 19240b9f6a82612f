"""popguard as a real process (``python -m popguard serve``) in front of Dovecot.

The command line, signals, and memory: a 100 MB message streamed through,
a client that stops reading in the middle of one, and SIGTERM with a
deletion pending.  Memory is read from /proc/<pid>/status (VmHWM is the
peak resident set size).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from popguard.cli import build_parser
from popguard.testing.dovecot import stored_form

MiB = 1024 * 1024
BIG_SIZE = 100 * MiB
RSS_GROWTH_LIMIT = 64 * MiB
POPGUARD_SCRIPT = Path(sys.executable).with_name("popguard")

# Dovecot's words for the end of a mail session (its pop3 logout line).
DOVECOT_DROPPED = "Disconnected: Connection closed"


def numbers(messages) -> list[int]:
    """Message numbers from a record's ``messages`` field.

    The field holds plain numbers or, with message identity, one mapping per
    message (``{"msg": n, "uidl": ..., "size": ...}``); JSON makes tuples lists.
    """
    return [m["msg"] if isinstance(m, dict) else m for m in messages]


@functools.cache
def big_message(size: int = BIG_SIZE) -> bytes:
    """About ``size`` bytes of mail: lines of 76 characters plus CRLF."""
    head = (
        b"From: Big Sender <big@example.org>\r\n"
        b"To: Recipient <rcpt@example.net>\r\n"
        b"Subject: a very large message\r\n"
        b"Message-ID: <big.1@popguard.test>\r\n"
        b"\r\n"
    )
    filler = bytes(range(0x41, 0x5B)) * 4  # A-Z, four times
    count = (size - len(head)) // 78  # "0000000042 " + 65 letters + CRLF
    body = b"".join(b"%010d %s\r\n" % (i, filler[i % 26 :][:65]) for i in range(count))
    return head + body


def kib(fields: dict[str, int], key: str) -> int:
    return fields[key] * 1024


def login(sock: socket.socket, user: str, password: str) -> bytes:
    """Greeting, USER, PASS (pipelined); return the three reply lines."""
    sock.sendall(f"USER {user}\r\nPASS {password}\r\n".encode())
    data = b""
    while data.count(b"\r\n") < 3:
        chunk = sock.recv(4096)
        if not chunk:
            raise AssertionError(f"closed during login: {data!r}")
        data += chunk
    assert data.count(b"+OK") == 3, data
    return data


def read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise AssertionError(f"closed mid-line: {data!r}")
        data += chunk
    return data


def warm_up(address: tuple[str, int], user: str, password: str) -> None:
    """One small, complete session, so the baseline includes a session's costs."""
    with socket.create_connection(address, timeout=30) as sock:
        login(sock, user, password)
        sock.sendall(b"RETR 1\r\nQUIT\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        assert data.endswith(b"\r\n.\r\n+OK Logging out.\r\n"), data[-100:]


def retrieve_discarding(
    address: tuple[str, int], user: str, password: str
) -> tuple[bytes, int, str, bytes]:
    """RETR 1 and QUIT, reading and discarding as it goes.

    Returns the status line, the number of bytes after it up to and including
    the terminating ".\\r\\n", their SHA-256, and the QUIT reply.
    """
    with socket.create_connection(address, timeout=60) as sock:
        login(sock, user, password)
        sock.sendall(b"RETR 1\r\n")
        status = read_line(sock)
        digest = hashlib.sha256()
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        total = 0
        tail = b""
        while tail != b"\r\n.\r\n":
            n = sock.recv_into(buf)
            if n == 0:
                raise AssertionError(f"closed after {total} bytes")
            digest.update(view[:n])
            total += n
            tail = (tail + bytes(view[max(0, n - 5) : n]))[-5:]
        sock.sendall(b"QUIT\r\n")
        quit_ = read_line(sock)
        return status, total, digest.hexdigest(), quit_


# -- 6. a 100 MB message, streamed -------------------------------------------------


@pytest.mark.slow
def test_100_mb_message_streams_through_in_bounded_memory(
    dovecot, mailbox, make_messages, popguard_process
):
    message = big_message()
    user, password, _ = mailbox([message])
    small = mailbox(make_messages(2, seed=6))
    proxy = popguard_process()

    warm_up(proxy.address, small.user, small.password)
    before = proxy.status()
    began = time.monotonic()
    status, total, digest, quit_ = retrieve_discarding(proxy.address, user, password)
    seconds = time.monotonic() - began
    after = proxy.status()

    growth = kib(after, "VmHWM") - kib(before, "VmHWM")
    print(
        f"\n100 MB RETR through popguard: {total / MiB:.1f} MiB in {seconds:.2f} s; "
        f"popguard VmHWM {before['VmHWM'] / 1024:.1f} -> {after['VmHWM'] / 1024:.1f} MiB "
        f"(growth {growth / MiB:.2f} MiB), VmRSS now {after['VmRSS'] / 1024:.1f} MiB"
    )
    assert status == b"+OK %d octets\r\n" % len(message)
    assert total == len(message) + 3  # no line starts with ".": nothing stuffed
    assert digest == hashlib.sha256(message + b".\r\n").hexdigest()
    assert quit_.startswith(b"+OK")
    assert growth < RSS_GROWTH_LIMIT, f"popguard's peak RSS grew by {growth / MiB:.1f} MiB"

    (closed,) = [e for e in proxy.wait_for("session.closed", 2) if e.get("user") == user]
    assert closed["reason"] == "quit"
    assert closed["bytes_from_upstream"] >= len(message)
    (retrieved,) = [e for e in proxy.named("message.retrieved") if e["user"] == user]
    assert retrieved["bytes"] == len(status) + total
    assert proxy.terminate() == 0


# -- 7. a client that never reads -----------------------------------------------------


@pytest.mark.slow
def test_client_that_stops_reading_costs_bounded_memory(
    dovecot, mailbox, make_messages, popguard_process, dovecot_log
):
    message = big_message()
    user, password, _ = mailbox([message])
    other_messages = make_messages(3, seed=7)
    other = mailbox(other_messages)
    proxy = popguard_process()

    warm_up(proxy.address, other.user, other.password)
    before = proxy.status()
    stuck = socket.create_connection(proxy.address, timeout=30)
    try:
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        login(stuck, user, password)
        stuck.sendall(b"RETR 1\r\n")  # ... and read nothing for 3 seconds
        stall_began = time.monotonic()

        # Meanwhile another session through the same popguard is served.
        time.sleep(0.5)
        began = time.monotonic()
        with socket.create_connection(proxy.address, timeout=10) as sock:
            login(sock, other.user, other.password)
            sock.sendall(b"STAT\r\n")
            stat = read_line(sock)
            sock.sendall(b"QUIT\r\n")
            quit_ = read_line(sock)
        stat_seconds = time.monotonic() - began
        assert stat == b"+OK 3 %d\r\n" % sum(len(m) for m in other_messages)
        assert quit_.startswith(b"+OK")
        assert stat_seconds < 5, f"the other session took {stat_seconds:.1f} s"

        time.sleep(max(0.0, 3.0 - (time.monotonic() - stall_began)))
        during = proxy.status()
    finally:
        stuck.close()  # with unread data: the kernel resets the connection

    growth = kib(during, "VmHWM") - kib(before, "VmHWM")
    (closed,) = [e for e in proxy.wait_for("session.closed", 3) if e.get("user") == user]
    print(
        f"\nstalled 100 MB RETR: popguard VmHWM {before['VmHWM'] / 1024:.1f} -> "
        f"{during['VmHWM'] / 1024:.1f} MiB (growth {growth / MiB:.2f} MiB); "
        f"read {closed['bytes_from_upstream'] / MiB:.1f} MiB of {len(message) / MiB:.0f} MiB "
        f"from Dovecot; the other session's STAT took {stat_seconds * 1000:.0f} ms"
    )
    assert growth < RSS_GROWTH_LIMIT, f"popguard's peak RSS grew by {growth / MiB:.1f} MiB"
    # Backpressure: popguard stopped reading Dovecot instead of buffering the message.
    assert closed["bytes_from_upstream"] < len(message) // 2
    assert closed["reason"] in ("client_error", "client_closed")
    assert not [e for e in proxy.named("message.retrieved") if e.get("user") == user]
    (end,) = dovecot_log.wait_session_ends(user)
    assert DOVECOT_DROPPED in end, end
    assert dovecot.maildir_messages(user) == [stored_form(message)]
    assert proxy.terminate() == 0


# -- 8. the command line ---------------------------------------------------------------


def run_cli(*args: str, executable: list[str] | None = None) -> subprocess.CompletedProcess:
    argv = [*(executable or [sys.executable, "-m", "popguard"]), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def subcommand_parsers() -> dict[str, object]:
    parser = build_parser()
    (commands,) = [a for a in parser._actions if a.dest == "command"]
    return dict(commands.choices)


def option_strings(parser) -> set[str]:
    """The documented options (not the internal ones a parent passes its workers)."""
    return {
        option
        for action in parser._actions
        if action.help != argparse.SUPPRESS
        for option in action.option_strings
    }


def test_help_mentions_every_command_and_flag():
    top = run_cli("--help")
    assert top.returncode == 0, top.stderr
    commands = subcommand_parsers()
    assert {"serve", "check-config", "demo", "demo-upstream"} <= commands.keys()
    for name in commands:
        assert name in top.stdout
    assert option_strings(build_parser()) <= set(top.stdout.replace(",", " ").split())

    assert POPGUARD_SCRIPT.is_file(), "the popguard console script is not installed"
    serve = run_cli("serve", "--help", executable=[str(POPGUARD_SCRIPT)])
    assert serve.returncode == 0, serve.stderr
    serve_flags = option_strings(commands["serve"])
    assert {
        "--config",
        "-c",
        "--listen",
        "--upstream",
        "--audit-file",
        "--idle-timeout",
        "--connect-timeout",
        "--console",
        "--no-console",
        "--workers",
    } <= serve_flags
    words = set(serve.stdout.replace(",", " ").replace("[", " ").replace("]", " ").split())
    assert serve_flags - words == set()

    check = run_cli("check-config", "--help")
    assert check.returncode == 0, check.stderr
    assert option_strings(commands["check-config"]) <= set(
        check.stdout.replace(",", " ").replace("[", " ").replace("]", " ").split()
    )


def test_check_config_reports_file_and_line(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        "listeners:\n"
        '  - listen: "127.0.0.1:1110"\n'
        "upstream:\n"
        '  address: "127.0.0.1:110"\n'
        "session:\n"
        '  idle_timeout: "600"\n'  # line 6: a string, not a number
        "  bogus_key: 1\n"  # line 7: unknown key
    )
    result = run_cli("check-config", "--config", str(broken))
    assert result.returncode == 1, result
    assert f"{broken}:6:" in result.stderr
    assert "idle_timeout" in result.stderr
    assert f"{broken}:7:" in result.stderr
    assert "bogus_key" in result.stderr
    assert "OK" not in result.stdout

    fine = tmp_path / "fine.yaml"
    fine.write_text('upstream:\n  address: "127.0.0.1:110"\n')
    result = run_cli("check-config", "--config", str(fine))
    assert result.returncode == 0, result
    assert result.stdout.strip() == f"{fine}: OK"


def test_sigterm_stops_an_idle_server_cleanly(dovecot, popguard_process):
    proxy = popguard_process()
    assert proxy.terminate() == 0
    # (The file may hold other records too, such as the audit trail's own.)
    names = [e["event"] for e in proxy.events() if e["event"].startswith("popguard.")]
    assert names == [
        "popguard.listening",
        "popguard.started",
        "popguard.signal",
        "popguard.stopping",
        "popguard.stopped",
    ]
    (sig,) = proxy.named("popguard.signal")
    assert sig["signal"] == "SIGTERM"
    assert "Traceback" not in proxy.stderr()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(proxy.address, timeout=5).close()


def test_sigterm_during_a_session_loses_nothing(
    dovecot, mailbox, make_messages, popguard_process, dovecot_log, tmp_path
):
    messages = make_messages(3, seed=8)
    user, password, _ = mailbox(messages)
    config = tmp_path / "popguard.yaml"
    config.write_text("shutdown:\n  grace_period: 0.5\n")  # flags give the rest
    proxy = popguard_process("--config", str(config))

    with socket.create_connection(proxy.address, timeout=30) as sock:
        login(sock, user, password)
        sock.sendall(b"DELE 1\r\n")
        assert read_line(sock) == b"+OK Marked to be deleted.\r\n"
        proxy.proc.send_signal(signal.SIGTERM)
        rest = b""
        while chunk := sock.recv(4096):
            rest += chunk
    assert rest == b"-ERR [SYS/TEMP] popguard is shutting down, try again later\r\n"
    assert proxy.proc.wait(20) == 0

    (end,) = dovecot_log.wait_session_ends(user)  # Dovecot is done with the session
    assert DOVECOT_DROPPED in end, end
    assert "del=0/3" in end, end
    assert dovecot.maildir_messages(user) == [stored_form(m) for m in messages]
    (discarded,) = proxy.named("deletions.discarded")
    assert (discarded["reason"], numbers(discarded["messages"])) == ("shutdown", [1])
    assert not proxy.named("deletions.committed")
    (stopping,) = proxy.named("popguard.stopping")
    assert (stopping["active_sessions"], stopping["grace_period"]) == (1, 0.5)
    names = [e["event"] for e in proxy.events() if e["event"].startswith("popguard.")]
    assert names[-3:] == ["popguard.signal", "popguard.stopping", "popguard.stopped"]


def test_second_sigterm_skips_the_grace_period(
    dovecot, mailbox, make_messages, popguard_process, dovecot_log
):
    messages = make_messages(2, seed=10)
    user, password, _ = mailbox(messages)
    proxy = popguard_process()  # default grace: 10 s

    with socket.create_connection(proxy.address, timeout=30) as sock:
        login(sock, user, password)
        sock.sendall(b"DELE 1\r\n")
        assert read_line(sock) == b"+OK Marked to be deleted.\r\n"
        proxy.proc.send_signal(signal.SIGTERM)
        first = time.monotonic()
        proxy.wait_for("popguard.stopping")
        # Within the grace period the session goes on, but no one new gets in.
        sock.sendall(b"STAT\r\n")
        assert read_line(sock) == b"+OK 1 %d\r\n" % len(messages[1])
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(proxy.address, timeout=5).close()
        proxy.proc.send_signal(signal.SIGTERM)
        rest = b""
        while chunk := sock.recv(4096):
            rest += chunk
    assert rest == b"-ERR [SYS/TEMP] popguard is shutting down, try again later\r\n"
    assert proxy.proc.wait(20) == 0
    assert time.monotonic() - first < 8  # well inside the 10 s grace
    assert [e["signal"] for e in proxy.named("popguard.signal")] == ["SIGTERM", "SIGTERM"]
    (end,) = dovecot_log.wait_session_ends(user)
    assert DOVECOT_DROPPED in end, end
    assert dovecot.maildir_messages(user) == [stored_form(m) for m in messages]
    (discarded,) = proxy.named("deletions.discarded")
    assert numbers(discarded["messages"]) == [1]


def test_sighup_reopens_the_audit_file_after_rotation(
    dovecot, mailbox, make_messages, popguard_process
):
    """logrotate's way: rename the file, then SIGHUP. No record is lost,
    the chain runs on across both files, and the proxy keeps serving."""
    user, password, _ = mailbox(make_messages(2, seed=12))
    proxy = popguard_process()

    def one_session() -> None:
        with socket.create_connection(proxy.address, timeout=30) as sock:
            login(sock, user, password)
            sock.sendall(b"QUIT\r\n")
            assert read_line(sock).startswith(b"+OK")

    one_session()
    proxy.wait_for("session.closed")
    rotated = proxy.audit_path.with_name(proxy.audit_path.name + ".1")
    proxy.audit_path.rename(rotated)
    proxy.proc.send_signal(signal.SIGHUP)
    proxy.wait_for("audit.chain.start")  # the new file is open
    one_session()
    proxy.wait_for("session.closed")
    assert proxy.terminate() == 0

    old = [json.loads(line) for line in rotated.read_text().splitlines()]
    new = proxy.events()
    assert [e["event"] for e in old].count("session.closed") == 1
    assert [e["event"] for e in new].count("session.closed") == 1
    assert (new[0]["event"], new[0]["reason"]) == ("audit.chain.start", "reopen")
    # The old file ends by saying why (the signal) and where the chain goes on.
    assert (old[-2]["event"], old[-2]["signal"]) == ("popguard.signal", "SIGHUP")
    assert (old[-1]["event"], old[-1]["next_file"]) == ("audit.chain.rotate", str(proxy.audit_path))
    verified = run_cli("audit", "verify", str(rotated), str(proxy.audit_path))
    assert verified.returncode == 0, verified


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_user_flag_drops_root_after_binding(dovecot, mailbox, make_messages, popguard_process):
    import pwd

    nobody = pwd.getpwnam("nobody")
    user, password, _ = mailbox(make_messages(1, seed=21))
    proxy = popguard_process("--user", "nobody")
    status = Path(f"/proc/{proxy.pid}/status").read_text()
    uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
    gids = next(line for line in status.splitlines() if line.startswith("Gid:")).split()[1:]
    assert set(map(int, uids)) == {nobody.pw_uid}  # real, effective, saved, fs
    assert set(map(int, gids)) == {nobody.pw_gid}
    with socket.create_connection(proxy.address, timeout=30) as sock:
        login(sock, user, password)
        sock.sendall(b"QUIT\r\n")
        assert read_line(sock).startswith(b"+OK")
    proxy.wait_for("session.closed")  # the audit file, opened as root, is still written
    assert proxy.terminate() == 0


def test_admin_listener_is_named_in_the_trail(dovecot, popguard_process):
    """The trail says where the admin listener is (with workers, one port each)."""
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proxy = popguard_process("--admin-listen", f"127.0.0.1:{port}")
    (record,) = proxy.wait_for("admin.listening")
    assert record["address"] == f"127.0.0.1:{port}"
    with urllib.request.urlopen(f"http://{record['address']}/healthz", timeout=10) as reply:
        assert reply.status == 200
    assert proxy.terminate() == 0
