"""The deletion lifecycle, path by path, against the real Dovecot.

RFC 1939 gives every DELE that got +OK exactly one fate, and the audit trail
must record it:

* ``dele.unmarked``: RSET undid the mark;
* ``deletions.committed``: QUIT in TRANSACTION, then +OK in UPDATE;
* ``deletions.failed``: QUIT in TRANSACTION, then -ERR in UPDATE;
* ``deletions.discarded``: the session ended without a successful QUIT
  (client drop or reset, half-close, idle timeout, upstream failure,
  shutdown), with the reason;
* ``deletions.unknown``: QUIT went upstream, but the connection ended before
  its reply.

Each path below runs one real session through popguard to a real Dovecot,
then checks three witnesses against each other: the audit trail (walked in
order: every mark ends in exactly one fate record, and every record names
its messages by the UIDL and size Dovecot itself reports), the Maildir on
disk and a fresh UIDL listing (exactly the committed messages are gone), and
Dovecot's own log line for the pop3 process that served the session (a
``Logged out`` only where the client's QUIT reached it).  Between popguard
and Dovecot sits a recording tap, so the bytes popguard sent upstream are
known; where the path needs Dovecot's TCP reset to reach popguard unchanged
(the tap would turn it into a FIN), the tap is left out and the kernel's
receive queue of Dovecot's socket shows what Dovecot never read.

The Dovecot pop3 process of a session is found honestly: Dovecot's login
line names it (``mpid=``), and ``/proc`` confirms it is a ``pop3`` process
whose working directory is that user's Maildir, before any signal is sent.

A failing UPDATE, as Dovecot 2.3 really does it: a Maildir that cannot be
written (``cur/`` read-only for the mail user) does *not* fail it; Dovecot
logs each failed unlink and still answers "+OK Logging out, messages
deleted." (pinned down by the last test: "committed" is the server's word).
What makes Dovecot answer QUIT with -ERR is a mailbox that changed under the
session beyond repair: the user's Maildir moved away between DELE and QUIT
gives "-ERR [SYS/TEMP] Mailbox is in inconsistent state, please relogin."
and removes nothing.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import signal
import socket
import struct
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from popguard.testing.dovecot import DovecotInstance, stored_form

in_thread = trio.to_thread.run_sync

#: Messages in every test mailbox.
COUNT = 5
#: Every wait is generous: the machine may be small and busy.
WAIT = 20.0

MARKED = b"+OK Marked to be deleted.\r\n"
QUIT_DELETED = b"+OK Logging out, messages deleted.\r\n"
QUIT_NOTHING = b"+OK Logging out.\r\n"
# popguard's own replies (popguard/core/session.py).
REPLY_IDLE = b"-ERR Disconnected for inactivity.\r\n"
REPLY_SHUTDOWN = b"-ERR [SYS/TEMP] popguard is shutting down, try again later\r\n"
REPLY_UPSTREAM_LOST = b"-ERR [SYS/TEMP] Connection to the upstream POP3 server was lost\r\n"
# What Dovecot 2.3 answers QUIT with when its Maildir vanished during the session.
DOVECOT_INCONSISTENT = b"-ERR [SYS/TEMP] Mailbox is in inconsistent state, please relogin.\r\n"

#: Every record that ends a mark, and the fate it stands for.
FATE_EVENTS = {
    "dele.unmarked": "unmarked",
    "deletions.committed": "committed",
    "deletions.failed": "failed",
    "deletions.discarded": "discarded",
    "deletions.unknown": "unknown",
}

Identity = dict[str, Any]  # {"msg": n, "uidl": "...", "size": n}


# -- Dovecot, seen directly -----------------------------------------------------


def dovecot_view(dovecot: DovecotInstance, wire, user: str, password: str) -> dict[int, Identity]:
    """``{n: {"msg", "uidl", "size"}}`` as Dovecot lists the mailbox (UIDL and LIST)."""
    w = wire(*dovecot.address)
    assert w.readline().startswith(b"+OK")
    assert w.command(f"USER {user}").startswith(b"+OK")
    assert w.command(f"PASS {password}").startswith(b"+OK")
    uidl = w.command("UIDL", multiline=True).split(b"\r\n")[1:-2]
    sizes = w.command("LIST", multiline=True).split(b"\r\n")[1:-2]
    assert w.command("QUIT") == QUIT_NOTHING
    w.close()
    view: dict[int, Identity] = {}
    for u, s in zip(uidl, sizes, strict=True):
        n, uid = u.split()
        m, size = s.split()
        assert n == m
        view[int(n)] = {"msg": int(n), "uidl": uid.decode(), "size": int(size)}
    return view


def login_pids(dovecot: DovecotInstance, user: str) -> list[int]:
    """The pop3 process ids Dovecot named in ``user``'s login lines."""
    pattern = rf"pop3-login: Info: Login: user=<{re.escape(user)}>, .*\bmpid=(\d+)"
    return [int(pid) for pid in re.findall(pattern, dovecot.log_text())]


def process_log(dovecot: DovecotInstance, user: str, pid: int) -> list[str]:
    """What Dovecot logged about the pop3 process ``pid`` serving ``user``."""
    pattern = rf"pop3\({re.escape(user)}\)<{pid}><[^>]*>: (.*)"
    return re.findall(pattern, dovecot.log_text())


def process_ended(lines: list[str]) -> bool:
    return any("Info: Disconnected: " in line or "killed with signal" in line for line in lines)


def wait_process_end(dovecot: DovecotInstance, user: str, pid: int) -> list[str]:
    """Block until Dovecot logged how process ``pid`` ended; its lines."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        lines = process_log(dovecot, user, pid)
        if process_ended(lines):
            return lines
        time.sleep(0.05)
    raise AssertionError(
        f"Dovecot logged no end of pop3 process {pid} ({user}):\n" + dovecot.log_text()[-3000:]
    )


def find_pop3_process(dovecot: DovecotInstance, user: str) -> int:
    """The one live pop3 process serving ``user`` now (the proxied session).

    Its pid comes from Dovecot's login line; ``/proc`` must confirm that it
    is a ``pop3`` process working in ``user``'s Maildir, and that it is the
    only such session still open, before a test may signal it.
    """
    maildir = str(dovecot.maildir(user))
    deadline = time.monotonic() + WAIT
    found: list[int] = []
    while time.monotonic() < deadline:
        found = []
        for pid in login_pids(dovecot, user):
            if process_ended(process_log(dovecot, user, pid)):
                continue
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
                try:
                    cwd = os.readlink(f"/proc/{pid}/cwd")
                except PermissionError:  # not root, and Dovecot made it undumpable
                    cwd = maildir
            except OSError:
                continue  # gone already
            if comm == "pop3" and cwd == maildir:
                found.append(pid)
        if len(found) == 1:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no single live pop3 process for {user}: {found}")


def process_state(pid: int) -> str:
    """The state letter of ``/proc/<pid>/stat`` (``T`` when stopped)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rpartition(")")[2].split()[0]


def unread_by(pid: int, port: int) -> int:
    """Bytes waiting, unread, in the receive queue of ``pid``'s TCP socket on ``port``."""
    inodes: set[str] | None = set()
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except PermissionError:  # not root: the one connection to Dovecot's port will do
        inodes, fds = None, []
    for fd in fds:
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:[") and inodes is not None:
                inodes.add(target[len("socket:[") : -1])
    queues = []
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state, queue, inode = fields[1], fields[3], fields[4], fields[9]
        mine = inode in inodes if inodes is not None else state == "01"  # ESTABLISHED
        if mine and int(local.rpartition(":")[2], 16) == port:
            queues.append(int(queue.partition(":")[2], 16))
    assert len(queues) == 1, f"process {pid}: {len(queues)} TCP sockets on port {port}"
    return queues[0]


# -- one proxied session ----------------------------------------------------------


@dataclass
class Run:
    """What a path's client script works with (it runs in a worker thread)."""

    dovecot: DovecotInstance
    proxy: Any  # the conftest's RunningProxy
    wire: Callable[..., Any]
    user: str
    password: str
    maildir: Path
    #: The raw client socket (conftest's PopWire), once logged in.
    w: Any = None
    #: The Dovecot pop3 process of this session, found at login.
    pid: int | None = None
    #: Set by :meth:`frozen`: what popguard forwarded while Dovecot was
    #: frozen, and how many bytes its socket held unread before the signal.
    unread: tuple[bytes, int] | None = None

    def login(self):
        self.w = w = self.wire(*self.proxy.address, timeout=WAIT)
        assert w.readline().startswith(b"+OK")
        assert w.command(f"USER {self.user}") == b"+OK\r\n"
        assert w.command(f"PASS {self.password}") == b"+OK Logged in.\r\n"
        self.pid = find_pop3_process(self.dovecot, self.user)
        return w

    def dele(self, w, *numbers: int) -> None:
        for n in numbers:
            assert w.command(f"DELE {n}") == MARKED, n

    def rest(self) -> bytes:
        """Everything popguard still sends, up to its close; then hang up too."""
        data = self.w.read_to_eof()
        self.w.close()
        return data

    def pop3_pid(self) -> int:
        assert self.pid is not None, "not logged in"
        return self.pid

    def kill(self, sig: signal.Signals) -> None:
        os.kill(self.pop3_pid(), sig)

    @contextlib.contextmanager
    def frozen(
        self, line: bytes, *, then: signal.Signals, upstream: bytes | None = None
    ) -> Iterator[None]:
        """Freeze the pop3 process, send ``line``, and signal ``then`` on the way out.

        Inside, what popguard forwarded for ``line`` (``upstream``, by default
        ``line`` itself) sits unread in Dovecot's socket, and
        :attr:`unread` holds how much did: the kernel's receive queue proves
        that Dovecot read none of it, and that popguard sent nothing more.
        A SIGKILL with unread input makes the kernel reset the connection (a
        real upstream error for popguard); a SIGCONT lets Dovecot go on and
        read it, even from a connection popguard has closed since.
        """
        expected = line if upstream is None else upstream
        pid = self.pop3_pid()
        os.kill(pid, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + WAIT
            while process_state(pid) != "T":
                assert time.monotonic() < deadline, "the pop3 process did not stop"
                time.sleep(0.01)
            self.w.send(line)
            while (unread := unread_by(pid, self.dovecot.port)) < len(expected):
                assert time.monotonic() < deadline, f"only {unread} bytes reached Dovecot"
                time.sleep(0.01)
            time.sleep(0.2)  # popguard has nothing more to send: nothing else may arrive
            self.unread = (expected, unread_by(pid, self.dovecot.port))
            yield
        finally:
            os.kill(pid, then)  # SIGKILL also ends a stopped process


# -- the paths ------------------------------------------------------------------------


def commit(run: Run) -> None:
    """DELE 1, DELE 1 again (refused), DELE 3 and 5, QUIT: 1, 3, 5 are removed."""
    w = run.login()
    run.dele(w, 1)
    assert w.command("DELE 1") == b"-ERR Message is deleted.\r\n"
    run.dele(w, 3, 5)
    assert w.command("QUIT") == QUIT_DELETED
    assert run.rest() == b""


def rset_all(run: Run) -> None:
    """DELE 2, DELE 4, RSET, QUIT: nothing is removed."""
    w = run.login()
    run.dele(w, 2, 4)
    assert w.command("RSET").startswith(b"+OK")
    assert w.command("QUIT") == QUIT_NOTHING
    assert run.rest() == b""


def rset_then_dele(run: Run) -> None:
    """DELE 1, RSET, DELE 2, QUIT: only 2 is removed."""
    w = run.login()
    run.dele(w, 1)
    assert w.command("RSET").startswith(b"+OK")
    run.dele(w, 2)
    assert w.command("QUIT") == QUIT_DELETED
    assert run.rest() == b""


def client_close(run: Run) -> None:
    """DELE 1 and 2, then the client closes its socket (FIN) without QUIT."""
    w = run.login()
    run.dele(w, 1, 2)
    w.close()


def client_reset(run: Run) -> None:
    """DELE 2, then the client's connection is reset (RST) without QUIT."""
    w = run.login()
    run.dele(w, 2)
    w.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    w.close()


def client_half_close(run: Run) -> None:
    """DELE 1, then DELE 3 and shutdown(SHUT_WR): the owed reply still arrives."""
    w = run.login()
    run.dele(w, 1)
    w.send("DELE 3\r\n")
    w.sock.shutdown(socket.SHUT_WR)
    assert run.rest() == MARKED


def idle_timeout(run: Run) -> None:
    """DELE 4, then silence until popguard's idle timeout ends the session."""
    w = run.login()
    run.dele(w, 4)
    assert run.rest() == REPLY_IDLE


def shutdown(run: Run) -> None:
    """DELE 1 and 5, then popguard shuts down (graceful, short grace period)."""
    w = run.login()
    run.dele(w, 1, 5)
    trio.from_thread.run_sync(run.proxy.server.request_shutdown)
    assert run.rest() == REPLY_SHUTDOWN


def upstream_killed(run: Run) -> None:
    """DELE 2, then Dovecot's pop3 process dies (SIGKILL) while idle: a FIN."""
    w = run.login()
    run.dele(w, 2)
    run.kill(signal.SIGKILL)
    assert run.rest() == b""  # no reply was owed, so nothing to explain


def upstream_reset(run: Run) -> None:
    """DELE 1 and 3, NOOP; Dovecot dies before reading the NOOP: a reset."""
    w = run.login()
    run.dele(w, 1, 3)
    with run.frozen(b"NOOP\r\n", then=signal.SIGKILL):
        pass
    assert run.rest() == REPLY_UPSTREAM_LOST


def upstream_terminated(run: Run) -> None:
    """DELE 3, then SIGTERM: Dovecot says "-ERR ... Server shutting down." unasked and closes."""
    w = run.login()
    run.dele(w, 3)
    run.kill(signal.SIGTERM)
    assert run.rest() == b""  # popguard owed no reply


def quit_lost(run: Run) -> None:
    """DELE 2 and 4, QUIT; Dovecot dies before reading the QUIT: fate unknown."""
    w = run.login()
    run.dele(w, 2, 4)
    with run.frozen(b"QUIT\r\n", then=signal.SIGKILL):
        pass
    assert run.rest() == REPLY_UPSTREAM_LOST


def quit_at_shutdown(run: Run) -> None:
    """DELE 2 and 4, QUIT; popguard shuts down before Dovecot read the QUIT.

    Dovecot then reads the QUIT from the closed connection, and deletes:
    "unknown" really means that either may have happened.
    """
    w = run.login()
    run.dele(w, 2, 4)
    shut_down = functools.partial(run.proxy.server.request_shutdown, immediate=True)
    with run.frozen(b"QUIT\r\n", then=signal.SIGCONT):
        trio.from_thread.run_sync(shut_down)
        assert run.rest() == REPLY_SHUTDOWN


def update_fails(run: Run) -> None:
    """DELE 1 and 4; the Maildir is moved away; QUIT gets -ERR from Dovecot's UPDATE."""
    w = run.login()
    run.dele(w, 1, 4)
    away = run.maildir.with_name(run.maildir.name + ".away")
    run.maildir.rename(away)
    try:
        assert w.command("QUIT") == DOVECOT_INCONSISTENT
        assert run.rest() == b""
    finally:
        wait_process_end(run.dovecot, run.user, run.pop3_pid())
        if run.maildir.exists():  # whatever Dovecot may have recreated: no mail
            assert not [p for sub in ("cur", "new") for p in (run.maildir / sub).glob("*")]
            shutil.rmtree(run.maildir)
        away.rename(run.maildir)


@dataclass(frozen=True)
class Fate:
    msg: int
    fate: str
    reason: str | None = None


@dataclass(frozen=True)
class LifecyclePath:
    client: Callable[[Run], None]
    #: The fate of every mark, in the order the trail records them.
    fates: tuple[Fate, ...]
    #: ``session.closed``: reason and state.
    closed: str
    state: str = "TRANSACTION"
    #: What Dovecot logged last for the session's pop3 process.
    dovecot_end: str = "Info: Disconnected: Connection closed"
    #: Whether the client's QUIT was (and had to be) forwarded to Dovecot.
    quit_upstream: bool = False
    refused: tuple[int, ...] = ()
    settings: Mapping[str, Any] = field(default_factory=dict)
    #: False where Dovecot's reset must reach popguard as a reset.
    tap: bool = True
    #: ``deletions.failed``: the server's reply text.
    failed_reply: str | None = None
    #: Text ``session.closed``'s detail must contain.
    detail: str | None = None
    #: The messages Dovecot removed, where that is not just the committed ones.
    removed: tuple[int, ...] | None = None


def dropped(msg: int, reason: str) -> Fate:
    return Fate(msg, "discarded", reason)


KILLED = "Fatal: master: service(pop3): child {pid} killed with signal 9"

PATHS = {
    "commit": LifecyclePath(
        commit,
        (Fate(1, "committed"), Fate(3, "committed"), Fate(5, "committed")),
        closed="quit",
        state="UPDATE",
        dovecot_end="Info: Disconnected: Logged out",
        quit_upstream=True,
        refused=(1,),
    ),
    "rset": LifecyclePath(
        rset_all,
        (Fate(2, "unmarked"), Fate(4, "unmarked")),
        closed="quit",
        state="UPDATE",
        dovecot_end="Info: Disconnected: Logged out",
        quit_upstream=True,
    ),
    "rset-then-dele": LifecyclePath(
        rset_then_dele,
        (Fate(1, "unmarked"), Fate(2, "committed")),
        closed="quit",
        state="UPDATE",
        dovecot_end="Info: Disconnected: Logged out",
        quit_upstream=True,
    ),
    "client-close": LifecyclePath(
        client_close,
        (dropped(1, "client_closed"), dropped(2, "client_closed")),
        closed="client_closed",
    ),
    "client-reset": LifecyclePath(
        client_reset, (dropped(2, "client_error"),), closed="client_error"
    ),
    "client-half-close": LifecyclePath(
        client_half_close,
        (dropped(1, "client_closed"), dropped(3, "client_closed")),
        closed="client_closed",
    ),
    "idle-timeout": LifecyclePath(
        idle_timeout,
        (dropped(4, "idle_timeout"),),
        closed="idle_timeout",
        settings={"idle_timeout": 3.0},
    ),
    "shutdown": LifecyclePath(
        shutdown,
        (dropped(1, "shutdown"), dropped(5, "shutdown")),
        closed="shutdown",
        settings={"shutdown_grace": 0.2},
    ),
    "upstream-killed": LifecyclePath(
        upstream_killed,
        (dropped(2, "upstream_closed"),),
        closed="upstream_closed",
        dovecot_end=KILLED,
    ),
    "upstream-reset": LifecyclePath(
        upstream_reset,
        (dropped(1, "upstream_error"), dropped(3, "upstream_error")),
        closed="upstream_error",
        dovecot_end=KILLED,
        tap=False,
    ),
    "upstream-terminated": LifecyclePath(
        upstream_terminated,
        # Dovecot's unsolicited "-ERR [SYS/TEMP] Server shutting down." is
        # its parting line: the upstream closed (not a protocol error).
        (dropped(3, "upstream_closed"),),
        closed="upstream_closed",
        dovecot_end="Info: Disconnected: Server shutting down.",
        detail="Server shutting down.",
    ),
    "quit-lost": LifecyclePath(
        quit_lost,
        (Fate(2, "unknown", "upstream_error"), Fate(4, "unknown", "upstream_error")),
        closed="upstream_error",
        dovecot_end=KILLED,
        quit_upstream=True,
        tap=False,
    ),
    "quit-at-shutdown": LifecyclePath(
        quit_at_shutdown,
        (Fate(2, "unknown", "shutdown"), Fate(4, "unknown", "shutdown")),
        closed="shutdown",
        dovecot_end="Info: Disconnected: Logged out",
        quit_upstream=True,
        removed=(2, 4),
    ),
    "update-fails": LifecyclePath(
        update_fails,
        (Fate(1, "failed"), Fate(4, "failed")),
        closed="quit",
        state="UPDATE",
        dovecot_end="Info: Disconnected: Mailbox is in inconsistent state.",
        quit_upstream=True,
        failed_reply="[SYS/TEMP] Mailbox is in inconsistent state, please relogin.",
    ),
}


# -- reading the trail ---------------------------------------------------------------


def identity(record: Mapping[str, Any]) -> Identity:
    return {key: record.get(key) for key in ("msg", "uidl", "size")}


def trail_fates(events: list[dict[str, Any]], view: dict[int, Identity]) -> list[Fate]:
    """Walk the trail in order; every mark must end in exactly one fate record.

    A fate record must list exactly the marks open at that moment (RFC 1939:
    RSET unmarks all, QUIT commits all, any other end drops all), each named
    by the UIDL and size Dovecot reports, and no mark may be left open.
    """
    open_marks: dict[int, Identity] = {}
    fates: list[Fate] = []
    for event in events:
        name = event["event"]
        if name == "dele.marked":
            mark = identity(event)
            assert mark == view[mark["msg"]], f"dele.marked names {mark}, Dovecot {view}"
            assert mark["msg"] not in open_marks, f"message {mark['msg']} marked twice"
            open_marks[mark["msg"]] = mark
        elif name in FATE_EVENTS:
            listed = [identity(m) for m in event["messages"]]
            expected = [open_marks[n] for n in sorted(open_marks)]
            assert listed == expected, f"{name} lists {listed}; open marks: {expected}"
            fates += [Fate(m["msg"], FATE_EVENTS[name], event.get("reason")) for m in listed]
            open_marks.clear()
    assert not open_marks, f"marks that never got a fate: {sorted(open_marks)}"
    return fates


# -- the test --------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PATHS))
async def test_every_dele_ends_in_exactly_one_fate(
    name, dovecot, mailbox, make_messages, popguard, tap, wire
):
    path = PATHS[name]
    messages = make_messages(COUNT, seed=300 + list(PATHS).index(name))
    box = mailbox(messages)
    before = await in_thread(dovecot_view, dovecot, wire, box.user, box.password)
    assert sorted(before) == list(range(1, COUNT + 1))
    for pid in login_pids(dovecot, box.user):  # that look was a session of its own
        await in_thread(wait_process_end, dovecot, box.user, pid)

    recorder = await tap() if path.tap else None
    proxy = await popguard(upstream=recorder.address if recorder else None, **dict(path.settings))
    run = Run(dovecot, proxy, wire, box.user, box.password, box.maildir)
    await in_thread(path.client, run)
    (closed,) = await proxy.wait_for("session.closed", limit=WAIT)
    pid = run.pop3_pid()
    dovecot_lines = await in_thread(wait_process_end, dovecot, box.user, pid)

    # The trail: every mark has exactly one fate, the expected one.
    events = proxy.sink.events
    fates = trail_fates(events, before)
    assert fates == list(path.fates)
    assert (closed["reason"], closed["state"]) == (path.closed, path.state)
    if path.detail is not None:
        assert path.detail in str(closed["detail"]), closed
    for fate_record in proxy.sink.named("deletions.discarded") + proxy.sink.named(
        "deletions.unknown"
    ):
        assert fate_record["reason"] == closed["reason"]
    refused = proxy.sink.named("dele.refused")
    assert [identity(e) for e in refused] == [before[n] for n in path.refused]
    if path.failed_reply is not None:
        (failed,) = proxy.sink.named("deletions.failed")
        assert failed["reply"] == path.failed_reply
    quits = proxy.sink.named("session.quit")
    if path.state == "UPDATE":
        assert [(q["state"], q["ok"]) for q in quits] == [
            ("TRANSACTION", path.failed_reply is None)
        ]
    else:
        assert not quits

    # The Maildir and a fresh listing: exactly the committed messages are gone
    # (or, where the trail says "unknown", the ones Dovecot says it removed).
    committed = {f.msg for f in fates if f.fate == "committed"}
    removed = committed if path.removed is None else set(path.removed)
    assert committed <= removed
    assert removed <= {f.msg for f in fates if f.fate in ("committed", "unknown")}
    kept = [n for n in range(1, COUNT + 1) if n not in removed]
    on_disk = await in_thread(dovecot.maildir_messages, box.user)
    assert on_disk == [stored_form(messages[n - 1]) for n in kept]
    after = await in_thread(dovecot_view, dovecot, wire, box.user, box.password)
    assert [(a["uidl"], a["size"]) for a in after.values()] == [
        (before[n]["uidl"], before[n]["size"]) for n in kept
    ]

    # Dovecot's word: a logout only where the client's QUIT reached it.
    last = dovecot_lines[-1]
    assert last.startswith(path.dovecot_end.format(pid=pid)), dovecot_lines
    if "Disconnected" in last:
        assert f"del={len(removed)}/{COUNT}," in last, last
    logged_out = any("Disconnected: Logged out" in line for line in dovecot_lines)
    assert logged_out == path.dovecot_end.endswith("Logged out"), dovecot_lines
    if recorder is not None:
        await recorder.wait_closed(limit=WAIT)
        (connection,) = recorder.connections
        upstream = bytes(connection.from_client)
        assert upstream.upper().count(b"QUIT") == int(path.quit_upstream), upstream
        if path.quit_upstream:
            assert upstream.endswith(b"QUIT\r\n")
    else:
        # No tap: the receive queue of Dovecot's socket, at its death, held
        # exactly the line sent after it was frozen, so it read nothing of it,
        # and before it froze it had answered every command with +OK.
        assert run.unread is not None
        line, unread = run.unread
        assert unread == len(line), run.unread
        assert line.upper().count(b"QUIT") == int(path.quit_upstream)


# -- what "committed" can and cannot promise ----------------------------------------------


async def test_committed_is_dovecots_word_even_when_it_could_not_unlink(
    dovecot, mailbox, make_messages, popguard, wire
):
    """Dovecot 2.3 answers QUIT with +OK even when its Maildir refuses the unlinks.

    ``deletions.committed`` records the server's +OK in UPDATE (RFC 1939 §6);
    popguard cannot see past it.  Here ``cur/`` is made read-only for the
    mail user after the DELEs: Dovecot logs ``unlink(...) failed`` for each
    message, still says "messages deleted", and the mail stays on disk.  The
    trail is right about what the server said, and only about that.
    """
    messages = make_messages(COUNT, seed=399)
    box = mailbox(messages)
    before = await in_thread(dovecot_view, dovecot, wire, box.user, box.password)
    for pid in login_pids(dovecot, box.user):
        await in_thread(wait_process_end, dovecot, box.user, pid)
    proxy = await popguard()
    cur = box.maildir / "cur"
    mode = cur.stat().st_mode & 0o7777

    run = Run(dovecot, proxy, wire, box.user, box.password, box.maildir)

    def client() -> bytes:
        w = run.login()
        run.dele(w, 2, 3)
        cur.chmod(0o500)
        try:
            quit_ = w.command("QUIT")
            assert run.rest() == b""
        finally:
            cur.chmod(mode)
        return quit_

    assert await in_thread(client) == QUIT_DELETED
    await proxy.wait_for("session.closed", limit=WAIT)
    lines = await in_thread(wait_process_end, dovecot, box.user, run.pop3_pid())
    fates = trail_fates(proxy.sink.events, before)
    assert fates == [Fate(2, "committed"), Fate(3, "committed")]
    # ...yet every message is still there, and Dovecot's log says why.
    assert await in_thread(dovecot.maildir_messages, box.user) == [stored_form(m) for m in messages]
    unlink_failed = [line for line in lines if re.search(r"unlink\(.*\) failed: Perm", line)]
    assert len(unlink_failed) == 2, lines
    assert "Info: Disconnected: Logged out" in lines[-1]
    assert f"del=2/{COUNT}," in lines[-1]


# -- a DELE still in flight when the session ends ------------------------------------------


class TrailGap(AssertionError):
    """Dovecot removed a message that no fate record names."""


def test_dele_in_flight_before_quit_is_named_when_the_session_ends(
    dovecot, mailbox, make_messages, popguard_process, wire
):
    """popguard (a real process) is stopped while DELE 1 and QUIT wait in Dovecot's socket.

    A sync test on purpose: pytest-trio would wrap a failure in an
    ExceptionGroup, and a gap in the trail must fail as itself (TrailGap).
    """
    messages = make_messages(COUNT, seed=398)
    box = mailbox(messages)
    before = dovecot_view(dovecot, wire, box.user, box.password)
    for pid in login_pids(dovecot, box.user):
        wait_process_end(dovecot, box.user, pid)
    proc = popguard_process()
    run = Run(dovecot, proc, wire, box.user, box.password, box.maildir)
    # Identity lookups (the second message: popguard's own STAT too), then the lines.
    in_flight = b"STAT\r\nUIDL 1\r\nLIST 1\r\nDELE 1\r\nQUIT\r\n"

    w = run.login()
    run.dele(w, 3)  # a mark popguard saw answered
    with run.frozen(b"DELE 1\r\nQUIT\r\n", then=signal.SIGCONT, upstream=in_flight):
        proc.proc.send_signal(signal.SIGTERM)  # stop: first gracefully...
        proc.wait_for("popguard.stopping")
        proc.proc.send_signal(signal.SIGTERM)  # ...then at once
        assert run.rest() == REPLY_SHUTDOWN
        assert proc.proc.wait(WAIT) == 0
    assert run.unread == (in_flight, len(in_flight))
    (closed,) = proc.named("session.closed")
    assert closed["reason"] == "shutdown"
    # Dovecot read DELE 1 and QUIT after popguard had gone, and removed 1 and 3.
    lines = wait_process_end(dovecot, box.user, run.pop3_pid())
    assert "Info: Disconnected: Logged out" in lines[-1], lines
    assert f"del=2/{COUNT}," in lines[-1], lines
    assert dovecot.maildir_messages(box.user) == [
        stored_form(m) for n, m in enumerate(messages, 1) if n not in (1, 3)
    ]
    events = proc.events()
    assert box.password not in proc.audit_path.read_text()
    # The trail: message 3 is "unknown", as it should be...
    unknown = proc.named("deletions.unknown")
    assert {e["reason"] for e in unknown} == {"shutdown"}
    assert before[3] in [identity(m) for e in unknown for m in e["messages"]]
    # ...but message 1, removed all the same, is in no record at all.
    named = {m["msg"] for e in events if e["event"] in FATE_EVENTS for m in e["messages"]}
    if 1 not in named:
        raise TrailGap(f"Dovecot removed message 1 ({before[1]}); no fate record names it")
