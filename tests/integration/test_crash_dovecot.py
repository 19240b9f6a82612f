"""A crashed worker's sessions in the trail, with ``--workers 2`` before a real Dovecot.

A worker that is SIGKILLed writes nothing more: the sessions it served have
``session.opened`` and no ``session.closed`` in its file, and their
``dele.marked`` no fate.  The supervisor reads the dead worker's records and
writes ``session.orphaned`` and ``deletions.unknown`` (reason
``worker_died``) into its own trail (docs/audit.md).  These tests hold
sessions with marks open through popguard, kill the worker serving them (or
the whole process group, as a host crash would), and check the parent's
trail names exactly those sessions, once, across restarts of the
supervisor; that Dovecot deleted nothing; and that ``popguard audit verify``
still passes on every file.  The soak (``-m slow``) does the same with
random sessions and several kills.
"""

from __future__ import annotations

import os
import poplib
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from popguard.shell.workers import worker_audit_file
from popguard.testing.dovecot import stored_form
from tests.integration.test_workers_dovecot import (
    READY,
    alive,
    free_loopback_port,
    records,
    verify,
    wait_until,
)


def small_messages(tag: str, count: int) -> list[bytes]:
    """*count* short messages, each named by its Message-ID."""
    return [
        (
            f"From: sender@example.org\r\nMessage-ID: <{tag}.{i}@popguard.test>\r\n"
            f"Subject: message {i}\r\n\r\nbody of {tag} {i}\r\n"
        ).encode()
        for i in range(1, count + 1)
    ]


_MESSAGE_ID = re.compile(rb"Message-ID: <([^>]+)>")


def message_ids(messages: list[bytes]) -> set[str]:
    found = set()
    for message in messages:
        match = _MESSAGE_ID.search(message)
        assert match is not None
        found.add(match.group(1).decode())
    return found


class Popguard:
    """``popguard serve --workers 2`` on a fixed port and audit file, restartable."""

    def __init__(self, dovecot: Any, directory: Path, *extra: str) -> None:
        self.dovecot = dovecot
        self.audit = directory / "audit.jsonl"
        self.port = free_loopback_port()
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0
        self.stderr = directory / "popguard.stderr"

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def start(self) -> None:
        ready_before = len(self.named(READY))
        argv = [
            sys.executable,
            "-m",
            "popguard",
            "serve",
            "--listen",
            f"127.0.0.1:{self.port}",
            "--upstream",
            f"{self.dovecot.host}:{self.dovecot.port}",
            "--audit-file",
            str(self.audit),
            "--no-console",
            "--workers",
            "2",
            *self.extra,
        ]
        with self.stderr.open("ab") as err:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT
            )
        self.runs += 1
        wait_until(
            lambda: len(self.named(READY)) > ready_before or self.proc.poll() is not None,
            "popguard to be ready",
            timeout=30,
        )
        assert self.proc.poll() is None, self.stderr.read_text(errors="replace")

    def events(self) -> list[dict[str, Any]]:
        return records(self.audit)

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events() if e["event"] == name]

    def worker_file(self, index: int) -> Path:
        return Path(worker_audit_file(str(self.audit), index))

    def pids(self) -> dict[int, int]:
        """The current worker pids (the parent's last worker.started per slot)."""
        return {e["slot"]: e["pid"] for e in self.named("popguard.worker.started")}

    def files(self) -> list[Path]:
        return [self.audit, *sorted(self.audit.parent.glob("audit.w*.jsonl"))]

    def terminate(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(30) == 0

    def crash(self) -> None:
        """SIGKILL the parent, then every worker: as a host crash leaves the files."""
        assert self.proc is not None
        workers = list(self.pids().values())
        self.proc.kill()
        self.proc.wait(10)
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not any(alive(pid) for pid in workers), "the workers to die")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pid in self.pids().values():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def popguard_workers(dovecot: Any, tmp_path: Path) -> Iterator[Popguard]:
    made = Popguard(dovecot, tmp_path)
    yield made
    made.stop()


@dataclass
class Held:
    """A session logged in through popguard and left open with its marks."""

    user: str
    password: str
    client: poplib.POP3
    marked: list[int] = field(default_factory=list)
    worker: int = 0


def hold(address: tuple[str, int], box: Any, marks: list[int]) -> Held:
    client = poplib.POP3(*address, timeout=30)
    client.user(box.user)
    client.pass_(box.password)
    for msg in marks:
        assert client.dele(msg).startswith(b"+OK")
    return Held(box.user, box.password, client, marks)


def logged_in_at(proxy: Popguard, user: str) -> int:
    """The worker whose file has ``user``'s login."""

    def find() -> int | None:
        for index in (1, 2):
            for record in records(proxy.worker_file(index)):
                if record["event"] == "auth.succeeded" and record.get("user") == user:
                    return index
        return None

    return wait_until(find, f"{user}'s login in a worker file")


def marks_seen(proxy: Popguard, user: str, count: int) -> None:
    """Wait until the worker's file holds ``count`` dele.marked of ``user``
    (they are queued in memory for a moment after the client got +OK)."""

    def seen() -> bool:
        return (
            sum(
                r["event"] == "dele.marked" and r.get("user") == user
                for index in (1, 2)
                for r in records(proxy.worker_file(index))
            )
            >= count
        )

    wait_until(seen, f"{user}'s marks in the worker's file")


def test_a_killed_workers_sessions_and_marks_are_reconciled_once(
    dovecot: Any, mailbox: Any, popguard_workers: Popguard, dovecot_log: Any
) -> None:
    proxy = popguard_workers
    proxy.start()
    boxes = [mailbox(small_messages(f"k{i}", 3)) for i in range(8)]
    # Sessions that end properly, one with a committed deletion.
    done = mailbox(small_messages("done", 3))
    for _ in range(6):
        client = poplib.POP3(*proxy.address, timeout=30)
        client.user(done.user)
        client.pass_(done.password)
        client.quit()
    held = [hold(proxy.address, box, [1, 2] if i % 3 else []) for i, box in enumerate(boxes)]
    for session in held:
        session.worker = logged_in_at(proxy, session.user)
        marks_seen(proxy, session.user, len(session.marked))
    by_worker = {index: [s for s in held if s.worker == index] for index in (1, 2)}
    victim = max(by_worker, key=lambda index: len(by_worker[index]))
    survivors = by_worker[3 - victim]
    doomed = by_worker[victim]
    assert doomed
    pid = proxy.pids()[victim]
    os.kill(pid, signal.SIGKILL)

    wait_until(
        lambda: any(r["slot"] == victim for r in proxy.named("popguard.worker.reconciled")),
        "the reconciliation of the dead worker",
    )
    orphaned = proxy.named("session.orphaned")
    assert sorted(o["user"] for o in orphaned) == sorted(s.user for s in doomed)
    for record in orphaned:
        assert (record["slot"], record["pid"], record["signal"]) == (victim, pid, "SIGKILL")
        assert record["reason"] == "worker_died"
        assert record["listener"]
        assert record["client"].startswith("127.0.0.1:")
    unknown = {u["user"]: u for u in proxy.named("deletions.unknown")}
    assert sorted(unknown) == sorted(s.user for s in doomed if s.marked)
    for session in doomed:
        if session.marked:
            record = unknown[session.user]
            assert [m["msg"] for m in record["messages"]] == session.marked
            assert all(m["uidl"] and m["size"] for m in record["messages"])
            assert record["reason"] == "worker_died"

    # Dovecot deleted nothing: no QUIT reached it for the dead worker's sessions.
    for session in doomed:
        session.client.sock.close()
        dovecot_log.wait_mail_processes_gone(session.user)
        box = next(b for b in boxes if b.user == session.user)
        assert dovecot.maildir_messages(box.user) == [
            stored_form(m) for m in small_messages(f"k{boxes.index(box)}", 3)
        ]
    # The other worker's sessions were never orphaned; they end with QUIT.
    for session in survivors:
        assert session.client.quit().startswith(b"+OK")

    # Restarting the supervisor reports nothing again.
    reported = len(orphaned)
    proxy.terminate()
    proxy.start()
    proxy.terminate()
    assert len(proxy.named("session.orphaned")) == reported
    assert len(proxy.named("deletions.unknown")) == len(unknown)
    result = verify(*proxy.files())
    assert result.returncode == 0, result.stdout + result.stderr


def test_start_up_reconciles_what_a_crash_left_open(
    dovecot: Any, mailbox: Any, popguard_workers: Popguard
) -> None:
    proxy = popguard_workers
    proxy.start()
    boxes = [mailbox(small_messages(f"c{i}", 2)) for i in range(6)]
    held = [hold(proxy.address, box, [2]) for box in boxes]
    for session in held:
        marks_seen(proxy, session.user, 1)
    proxy.crash()  # nobody is left to reconcile at once
    assert proxy.named("session.orphaned") == []
    for session in held:
        session.client.sock.close()

    proxy.start()
    orphaned = proxy.named("session.orphaned")
    assert sorted(o["user"] for o in orphaned) == sorted(b.user for b in boxes)
    assert all(o["previous_run"] is True and "signal" not in o for o in orphaned)
    unknown = proxy.named("deletions.unknown")
    assert sorted(u["user"] for u in unknown) == sorted(b.user for b in boxes)
    assert all([m["msg"] for m in u["messages"]] == [2] for u in unknown)
    proxy.terminate()
    proxy.start()
    proxy.terminate()
    assert len(proxy.named("session.orphaned")) == len(boxes)
    for box in boxes:
        assert len(dovecot.maildir_messages(box.user)) == 2
    result = verify(*proxy.files())
    assert result.returncode == 0, result.stdout + result.stderr


# -- the soak ---------------------------------------------------------------------

SOAK_SESSIONS = int(os.environ.get("POPGUARD_SOAK_SESSIONS", "300"))
SOAK_KILLS = int(os.environ.get("POPGUARD_SOAK_KILLS", "3"))
SOAK_CLIENTS = 8
SOAK_MESSAGES = 40


@dataclass
class SoakLog:
    """What the clients did, by Message-ID."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    #: Marked in a session whose client sent QUIT (the server may delete them).
    quit_sent: set[str] = field(default_factory=set)
    #: Marked in a session whose QUIT got +OK (the server deleted them).
    committed: set[str] = field(default_factory=set)
    sessions: int = 0
    errors: int = 0


def soak_session(address: tuple[str, int], box: Any, rng: random.Random, log: SoakLog) -> None:
    marked: list[str] = []
    quit_sent = False
    try:
        client = poplib.POP3(*address, timeout=30)
        try:
            client.user(box.user)
            client.pass_(box.password)
            count = client.stat()[0]
            for msg in rng.sample(range(1, count + 1), min(count, rng.randint(0, 3))):
                header = b"\n".join(client.top(msg, 0)[1])
                match = _MESSAGE_ID.search(header)
                assert match is not None
                client.dele(msg)
                marked.append(match.group(1).decode())
            if marked and rng.random() < 0.2:
                client.rset()
                marked.clear()
            time.sleep(rng.random() * 0.05)
            if rng.random() < 0.2:
                return  # the client goes away without QUIT
            quit_sent = True
            reply = client.quit()
            if reply.startswith(b"+OK"):
                with log.lock:
                    log.committed.update(marked)
        finally:
            client.close()  # after quit() too: it is a no-op then
    except (poplib.error_proto, OSError, EOFError):
        with log.lock:
            log.errors += 1
    finally:
        with log.lock:
            log.sessions += 1
            if quit_sent:
                log.quit_sent.update(marked)


def fates(proxy: Popguard) -> tuple[list[tuple[str, int]], set[tuple[str, int]]]:
    """Every (session, msg) marked in any trail, and every one with a fate."""
    marked: list[tuple[str, int]] = []
    fated: set[tuple[str, int]] = set()
    for path in proxy.files():
        for record in records(path):
            session = record.get("session")
            if record["event"] == "dele.marked":
                marked.append((session, record["msg"]))
            elif record["event"] in {
                "dele.unmarked",
                "deletions.committed",
                "deletions.failed",
                "deletions.discarded",
                "deletions.unknown",
            }:
                fated.update((session, m["msg"]) for m in record["messages"])
    return marked, fated


@pytest.mark.slow
def test_soak_every_mark_has_a_fate_and_nothing_is_deleted_without_quit(
    dovecot: Any, mailbox: Any, popguard_workers: Popguard
) -> None:
    proxy = popguard_workers
    proxy.start()
    boxes = [mailbox(small_messages(f"s{i}", SOAK_MESSAGES)) for i in range(SOAK_CLIENTS * 2)]
    before = {box.user: message_ids(dovecot.maildir_messages(box.user)) for box in boxes}
    log = SoakLog()
    free = list(boxes)
    free_lock = threading.Lock()
    started = 0
    start_lock = threading.Lock()

    failures: list[BaseException] = []

    def client_loop(seed: int) -> None:
        nonlocal started
        rng = random.Random(seed)
        while True:
            with start_lock:
                if started >= SOAK_SESSIONS or failures:
                    return
                started += 1
            with free_lock:
                box = free.pop(rng.randrange(len(free)))
            try:
                soak_session(proxy.address, box, rng, log)
            except BaseException as exc:  # the test fails with it, not a lost thread
                failures.append(exc)
                raise
            finally:
                with free_lock:
                    free.append(box)

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(SOAK_CLIENTS)]
    for thread in threads:
        thread.start()
    killer = random.Random(1234)
    for kill in range(1, SOAK_KILLS + 1):
        wait_until(
            lambda kill=kill: failures or log.sessions >= SOAK_SESSIONS * kill // (SOAK_KILLS + 1),
            "sessions before a kill",
            timeout=300,
        )
        assert not failures, failures
        pids = proxy.pids()
        slot = killer.choice(sorted(pids))
        os.kill(pids[slot], signal.SIGKILL)
        wait_until(
            lambda slot=slot, pid=pids[slot]: proxy.pids()[slot] != pid,
            "a replacement worker",
        )
    for thread in threads:
        thread.join(300)
    assert not failures, failures
    proxy.terminate()

    after = {box.user: message_ids(dovecot.maildir_messages(box.user)) for box in boxes}
    deleted = set().union(*(before[user] - after[user] for user in before))
    assert deleted <= log.quit_sent, "deleted without the client's QUIT"
    assert log.committed <= deleted
    marked, fated = fates(proxy)
    unfated = [mark for mark in marked if mark not in fated]
    assert marked
    assert unfated == []
    assert len(proxy.named("popguard.worker.died")) == SOAK_KILLS
    result = verify(*proxy.files())
    assert result.returncode == 0, result.stdout + result.stderr
