"""``popguard serve --workers 2`` as real processes in front of a real Dovecot.

The parent binds the listener once per worker (SO_REUSEPORT) and
supervises; each worker writes its own audit file and chain.  These tests
check what an operator relies on: sessions are spread over the workers, a
killed worker's sessions delete nothing and the worker comes back, the
listener never stops answering, logrotate's rename + SIGHUP works for every
file, SIGTERM drains, a dead parent takes its workers down gracefully, and
``popguard audit verify`` checks every chain and notices a missing one.
"""

from __future__ import annotations

import json
import os
import poplib
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from popguard.shell.workers import worker_audit_file
from popguard.testing.dovecot import stored_form

READY = "popguard.workers.ready"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def long_lines(monkeypatch):
    """The sample mail has lines longer than poplib's 2048-byte default."""
    monkeypatch.setattr(poplib, "_MAXLINE", 1 << 20)


def free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def records(path: Path) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.endswith("}")]


def worker_file(proxy, index: int) -> Path:
    return Path(worker_audit_file(str(proxy.audit_path), index))


def wait_until(predicate, what: str, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def worker_pids(proxy) -> dict[int, int]:
    """Each worker's current pid, from the parent's worker.started records."""
    return {e["slot"]: e["pid"] for e in proxy.named("popguard.worker.started")}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by a dead parent's init) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def full_session(address, user: str, password: str, count: int) -> list[bytes]:
    client = poplib.POP3(*address, timeout=30)
    try:
        client.user(user)
        client.pass_(password)
        got = [b"\n".join(client.retr(n)[1]) + b"\n" for n in range(1, count + 1)]
    finally:
        client.quit()
    return got


def serving_worker(proxy, user: str) -> int:
    """Which worker logged ``user`` in (its auth.succeeded record)."""

    def find() -> int | None:
        for index in (1, 2):
            for record in records(worker_file(proxy, index)):
                if record["event"] == "auth.succeeded" and record.get("user") == user:
                    return index
        return None

    return wait_until(find, f"the login of {user} in a worker's audit file")


def verify(*paths: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "popguard", "audit", "verify", *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_sessions_spread_over_workers_each_with_its_own_chain(
    dovecot, mailbox, make_messages, popguard_process
):
    messages = make_messages(2, seed=61)
    box = mailbox(messages)
    admin = free_loopback_port()
    while True:  # three consecutive free ports: the parent's, then worker N's on port + N
        try:
            with (
                socket.create_server(("127.0.0.1", admin + 1)),
                socket.create_server(("127.0.0.1", admin + 2)),
            ):
                break
        except OSError:
            admin = free_loopback_port()
    proxy = popguard_process("--workers", "2", "--admin-listen", f"127.0.0.1:{admin}", ready=READY)
    pids = worker_pids(proxy)
    assert sorted(pids) == [1, 2]
    assert proxy.pid not in pids.values()

    expected = [stored_form(m) for m in messages]
    for _ in range(24):
        got = full_session(proxy.address, box.user, box.password, 2)
        assert [g.replace(b"\r\n", b"\n") for g in got] == expected

    for port in (admin, admin + 1, admin + 2):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as reply:
            assert reply.status == 200

    assert proxy.terminate() == 0
    assert not any(alive(pid) for pid in pids.values())
    served = {}
    for index in (1, 2):
        trail = records(worker_file(proxy, index))
        assert trail
        assert all(r.get("worker") == index for r in trail)
        served[index] = sum(r["event"] == "session.quit" for r in trail)
        assert trail[-1]["event"] == "popguard.stopped"
    # SO_REUSEPORT hashes each connection's addresses and ports: 24 sessions
    # all landing on one worker has a probability of about 2**-23.
    assert served[1] > 0
    assert served[2] > 0
    assert served[1] + served[2] == 24
    parent = proxy.events()
    assert all(r.get("worker") == 0 for r in parent)
    names = [r["event"] for r in parent]
    assert names.count("popguard.worker.exited") == 2
    assert names[-1] == "popguard.stopped"

    result = verify(proxy.audit_path, worker_file(proxy, 1), worker_file(proxy, 2))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "(supervisor, sha256)" in result.stdout
    assert "(worker 1, sha256)" in result.stdout
    assert "(worker 2, sha256)" in result.stdout
    missing = verify(proxy.audit_path, worker_file(proxy, 1))
    assert missing.returncode == 1
    assert "missing_worker" in missing.stdout


def test_killed_worker_deletes_nothing_and_is_replaced(
    dovecot, mailbox, make_messages, popguard_process, dovecot_log
):
    messages = make_messages(3, seed=62)
    box = mailbox(messages)
    other = mailbox(make_messages(1, seed=63))
    proxy = popguard_process("--workers", "2", ready=READY)

    client = poplib.POP3(*proxy.address, timeout=30)
    client.user(box.user)
    client.pass_(box.password)
    assert client.dele(1).startswith(b"+OK")
    assert client.dele(2).startswith(b"+OK")
    index = serving_worker(proxy, box.user)
    victim = worker_pids(proxy)[index]
    os.kill(victim, signal.SIGKILL)

    with pytest.raises((poplib.error_proto, OSError, EOFError)):
        client.noop()  # the session is gone with its worker
    client.sock.close()
    dovecot_log.wait_session_ends(box.user)
    # No QUIT reached Dovecot: the marks were discarded, nothing deleted.
    assert dovecot.maildir_messages(box.user) == [stored_form(m) for m in messages]

    died = proxy.wait_for("popguard.worker.died")[0]
    assert (died["slot"], died["pid"], died["signal"]) == (index, victim, "SIGKILL")
    assert died["upstream_quit"] is False
    wait_until(lambda: worker_pids(proxy)[index] != victim, "a replacement worker")
    proxy.wait_for("popguard.worker.ready", count=3)
    # Both sockets serve again: every new session works.
    for _ in range(10):
        full_session(proxy.address, other.user, other.password, 1)

    assert proxy.terminate() == 0
    trail = records(worker_file(proxy, index))
    starts = [r for r in trail if r["event"] == "audit.chain.start"]
    # The replacement appended to the dead worker's file, continuing its chain.
    assert [s["reason"] for s in starts] == ["new", "restart"]
    assert len({r["chain"] for r in trail}) == 1
    files = [proxy.audit_path, worker_file(proxy, 1), worker_file(proxy, 2)]
    result = verify(*files)
    assert result.returncode == 0, result.stdout + result.stderr


def test_connections_queue_while_the_only_worker_restarts(
    dovecot, mailbox, make_messages, popguard_process
):
    """The parent keeps the listening socket, so a connection made while its
    worker is dead waits for the replacement instead of being refused."""
    box = mailbox(make_messages(1, seed=64))
    proxy = popguard_process("--workers", "2", ready=READY)
    for pid in worker_pids(proxy).values():
        os.kill(pid, signal.SIGKILL)
    # Connect at once, before any replacement is up: nothing accepts yet.
    for _ in range(6):
        full_session(proxy.address, box.user, box.password, 1)
    assert len(proxy.named("popguard.worker.died")) == 2
    assert proxy.terminate() == 0


def test_rotation_and_sighup_reach_every_worker(dovecot, mailbox, make_messages, popguard_process):
    box = mailbox(make_messages(1, seed=65))
    proxy = popguard_process("--workers", "2", ready=READY)
    current = [proxy.audit_path, worker_file(proxy, 1), worker_file(proxy, 2)]
    for _ in range(4):
        full_session(proxy.address, box.user, box.password, 1)
    rotated = [path.with_name(path.name + ".1") for path in current]
    for old, new in zip(current, rotated, strict=True):
        old.rename(new)
    proxy.proc.send_signal(signal.SIGHUP)
    for path in current:
        wait_until(
            lambda path=path: any(
                r["event"] == "audit.chain.start" and r["reason"] == "reopen" for r in records(path)
            ),
            f"{path.name} reopened",
        )
    for _ in range(4):
        full_session(proxy.address, box.user, box.password, 1)
    assert proxy.terminate() == 0
    for path in rotated:
        assert records(path)[-1]["event"] == "audit.chain.rotate"
    result = verify(*rotated, *current)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("from its first record") == 3


def test_sigterm_drains_open_sessions_on_every_worker(
    dovecot, mailbox, make_messages, popguard_process, tmp_path
):
    config = tmp_path / "grace.yaml"
    config.write_text("shutdown:\n  grace_period: 20\n")
    box = mailbox(make_messages(2, seed=66))
    proxy = popguard_process("--workers", "2", "--config", str(config), ready=READY)
    clients = []
    for _ in range(6):
        client = poplib.POP3(*proxy.address, timeout=30)
        client.user(box.user)
        client.pass_(box.password)
        clients.append(client)
    proxy.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: proxy.named("popguard.signal"), "the parent's signal record")
    # New connections are refused at once (the sockets are closed) ...
    wait_until(lambda: _refused(proxy.address), "the listener to close")
    # ... while the open sessions are served to their end.
    for client in clients:
        assert client.noop().startswith(b"+OK")
        client.quit()
    assert proxy.proc.wait(30) == 0
    quits = 0
    for index in (1, 2):
        trail = records(worker_file(proxy, index))
        quits += [r["event"] for r in trail].count("session.quit")
        assert trail[-1]["event"] == "popguard.stopped"
    assert quits == 6  # every drained session ended with the client's QUIT


def _refused(address) -> bool:
    try:
        with socket.create_connection(address, timeout=2):
            return False
    except ConnectionRefusedError:
        return True


def test_workers_stop_gracefully_when_the_parent_dies(
    dovecot, mailbox, make_messages, popguard_process, dovecot_log, tmp_path
):
    config = tmp_path / "grace.yaml"
    config.write_text("shutdown:\n  grace_period: 1\n")
    messages = make_messages(2, seed=67)
    box = mailbox(messages)
    proxy = popguard_process("--workers", "2", "--config", str(config), ready=READY)
    pids = worker_pids(proxy)
    client = poplib.POP3(*proxy.address, timeout=30)
    client.user(box.user)
    client.pass_(box.password)
    client.dele(1)
    index = serving_worker(proxy, box.user)
    proxy.proc.kill()
    proxy.proc.wait(10)
    wait_until(lambda: not any(alive(pid) for pid in pids.values()), "the workers to exit")
    dovecot_log.wait_session_ends(box.user)
    assert dovecot.maildir_messages(box.user) == [stored_form(m) for m in messages]
    client.sock.close()
    trail = records(worker_file(proxy, index))
    names = [r["event"] for r in trail]
    assert "popguard.worker.orphaned" in names
    assert names[-1] == "popguard.stopped"
    closed = [r for r in trail if r["event"] == "session.closed"]
    assert closed
    assert closed[-1]["reason"] == "shutdown"


def test_a_worker_that_cannot_start_stops_everything(dovecot, tmp_path):
    """A broken setup (here: the admin port is taken) fails at once, exit 1,
    instead of restarting workers forever."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = free_loopback_port()
        audit = tmp_path / "audit.jsonl"
        argv = [
            sys.executable,
            "-m",
            "popguard",
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--upstream",
            f"{dovecot.host}:{dovecot.port}",
            "--audit-file",
            str(audit),
            "--no-console",
            "--workers",
            "2",
            "--admin-listen",
            f"127.0.0.1:{taken.getsockname()[1]}",
        ]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=90, check=False)
    assert proc.returncode == 1, proc.stderr
    names = [r["event"] for r in records(audit)]
    assert "popguard.workers.start_failed" in names
    assert names[-1] == "popguard.stopped"
    assert "popguard.worker.restarting" not in names


def test_the_shipped_logrotate_snippet_rotates_every_workers_file(
    dovecot, mailbox, make_messages, popguard_process, tmp_path
):
    """packaging/logrotate.d/popguard, run by a real logrotate, against a
    workers: 2 deployment: every process's file is rotated, one SIGHUP (to the
    parent) reopens them all, and verify passes over the rotated and new files."""
    logrotate = shutil.which("logrotate") or "/usr/sbin/logrotate"
    if not Path(logrotate).exists():
        if os.environ.get("CI"):
            pytest.fail("logrotate is required in CI")
        pytest.skip("logrotate is not installed")
    box = mailbox(make_messages(1, seed=68))
    proxy = popguard_process("--workers", "2", ready=READY)
    logs = proxy.audit_path.parent
    audit_glob = f"{logs}/{proxy.audit_path.stem}*.jsonl"
    snippet = (REPO / "packaging" / "logrotate.d" / "popguard").read_text()
    assert "/var/log/popguard/audit*.jsonl {" in snippet
    assert "systemctl reload popguard.service" in snippet
    conf = tmp_path / "logrotate.conf"
    conf.write_text(
        snippet.replace("/var/log/popguard/audit*.jsonl", audit_glob)
        .replace("create 0640 popguard popguard", "create 0640")
        .replace("systemctl reload popguard.service", f"/bin/kill -HUP {proxy.pid}")
    )
    conf.chmod(0o644)
    for _ in range(4):
        full_session(proxy.address, box.user, box.password, 1)
    current = [proxy.audit_path, worker_file(proxy, 1), worker_file(proxy, 2)]
    wait_until(lambda: all(records(path) for path in current), "every file written")
    result = subprocess.run(
        [logrotate, "-f", "-s", str(tmp_path / "state"), str(conf)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    rotated = sorted(logs.glob(f"{proxy.audit_path.stem}*.jsonl-*"))  # dateext names
    assert len(rotated) == 3, sorted(p.name for p in logs.iterdir())
    for path in current:
        wait_until(
            lambda path=path: any(
                r["event"] == "audit.chain.start" and r["reason"] == "reopen" for r in records(path)
            ),
            f"{path.name} reopened",
        )
    # One signal, to the parent: it reopened once and passed it on once, so
    # every process recorded exactly one (in its file before the rotation).
    for old in rotated:
        assert [r["event"] for r in records(old)].count("popguard.signal") == 1, old.name
    for _ in range(4):
        full_session(proxy.address, box.user, box.password, 1)
    assert proxy.terminate() == 0
    result = verify(*rotated, *current)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("from its first record") == 3
