"""Live sessions and kick against real Dovecot, with real processes and poplib.

``popguard serve`` runs as a real process (one, and ``workers: 2`` under the
supervisor); a poplib client logs in to Dovecot through it and marks
messages; ``popguard sessions`` lists the session with the account Dovecot
opened and state TRANSACTION; ``popguard kick`` ends it.  The client sees
the connection close, Dovecot never receives QUIT (it logs the session as
disconnected, not logged out) and keeps every message that was marked for
deletion.
"""

from __future__ import annotations

import contextlib
import json
import poplib
import socket
import subprocess
import sys

import pytest

from popguard.testing.dovecot import stored_form
from tests.integration.test_workers_dovecot import records, worker_file

READY_WORKERS = "popguard.workers.ready"


@pytest.fixture(autouse=True)
def long_lines(monkeypatch):
    """The sample mail has lines longer than poplib's 2048-byte default."""
    monkeypatch.setattr(poplib, "_MAXLINE", 1 << 20)


def free_ports(count: int) -> int:
    """A loopback port with the ``count - 1`` ports after it free as well: the
    supervisor serves admin on the first, worker N on the first + N."""
    while True:
        with contextlib.ExitStack() as stack:
            first = stack.enter_context(socket.create_server(("127.0.0.1", 0)))
            port = first.getsockname()[1]
            try:
                for offset in range(1, count):
                    stack.enter_context(socket.create_server(("127.0.0.1", port + offset)))
            except OSError:
                continue
            return port


def popguard_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "popguard", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def admin_url(proxy) -> str:
    """The admin listener's URL, from the (parent's) admin.listening record."""
    (record,) = proxy.wait_for("admin.listening")
    return f"http://{record['address']}"


def sessions_json(url: str, *args: str) -> dict:
    result = popguard_cli("sessions", "--admin", url, "--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def kick_and_check(proxy, url, box, messages, dovecot, dovecot_log, *, worker: int | None):
    """Log in with poplib (name in capitals), mark two messages, list, kick, check."""
    client = poplib.POP3(*proxy.address, timeout=30)
    client.user(box.user.upper())  # Dovecot opens the lower-case account
    client.pass_(box.password)
    assert client.dele(1).startswith(b"+OK")
    assert client.dele(2).startswith(b"+OK")

    document = sessions_json(url, "--user", box.user)
    (session,) = document["sessions"]
    assert session["account"] == box.user
    assert session["state"] == "TRANSACTION"
    assert session["marked"] == 2
    host, port = client.sock.getsockname()[:2]
    assert session["client"] == f"{host}:{port}"
    if worker is None:
        assert session["worker"] is None
    else:
        assert document["complete"] is True
        assert session["worker"] in range(1, worker + 1)
        assert session["id"].startswith(f"{session['worker'] - 1:02x}")

    table = popguard_cli("sessions", "--admin", url)
    assert table.returncode == 0, table.stderr
    assert any(
        line.split()[:1] == [session["id"]] and box.user in line.split()
        for line in table.stdout.splitlines()
    ), table.stdout

    kicked = popguard_cli("kick", "--admin", url, "--user", box.user, "--reason", "test kick")
    assert kicked.returncode == 0, kicked.stderr
    assert kicked.stdout.startswith(f"kicked {session['id']} {box.user} ")

    # The client sees popguard's notice, then the connection closes.
    with pytest.raises(poplib.error_proto, match="Disconnected by an administrator"):
        client.noop()
    assert client.file.readline() == b""  # end of file
    client.sock.close()

    # Dovecot: the session ended without QUIT, so nothing was deleted.
    (end,) = dovecot_log.wait_session_ends(box.user)
    assert "Logged out" not in end, end
    assert dovecot.maildir_messages(box.user) == [stored_form(m) for m in messages]
    assert sessions_json(url, "--user", box.user)["sessions"] == []
    return session


def test_kick_ends_a_session_without_quit(
    dovecot, mailbox, make_messages, popguard_process, dovecot_log
):
    messages = make_messages(3, seed=91)
    box = mailbox(messages)
    proxy = popguard_process("--admin-listen", f"127.0.0.1:{free_ports(1)}")
    url = admin_url(proxy)
    session = kick_and_check(proxy, url, box, messages, dovecot, dovecot_log, worker=None)

    trail = [r for r in proxy.events() if r.get("session") == session["id"]]
    names = [r["event"] for r in trail]
    assert names[-3:] == ["session.close_requested", "deletions.discarded", "session.closed"]
    requested, discarded, closed = trail[-3:]
    assert requested["requested_by"].startswith("127.0.0.1:")
    assert requested["reason"] == "test kick"
    assert discarded["reason"] == "operator_close"
    assert sorted(m["msg"] for m in discarded["messages"]) == [1, 2]
    assert closed["reason"] == "operator_close"
    assert proxy.terminate() == 0


def test_kick_through_the_supervisor_of_two_workers(
    dovecot, mailbox, make_messages, popguard_process, dovecot_log
):
    messages = make_messages(2, seed=92)
    box = mailbox(messages)
    proxy = popguard_process(
        "--workers", "2", "--admin-listen", f"127.0.0.1:{free_ports(3)}", ready=READY_WORKERS
    )
    url = admin_url(proxy)  # the parent's: it answers for both workers
    session = kick_and_check(proxy, url, box, messages, dovecot, dovecot_log, worker=2)

    assert proxy.terminate() == 0
    trail = [
        r
        for r in records(worker_file(proxy, session["worker"]))
        if r.get("session") == session["id"]
    ]
    names = [r["event"] for r in trail]
    assert names[-3:] == ["session.close_requested", "deletions.discarded", "session.closed"]
    requested = trail[-3]
    # Who asked: the kick command's address, as the supervisor relayed it.
    assert requested["requested_by"].startswith("127.0.0.1:")
    assert requested["relayed_by"].startswith("127.0.0.1:")
    assert requested["requested_by"] != requested["relayed_by"]
    assert trail[-1]["reason"] == "operator_close"
