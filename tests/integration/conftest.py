"""Fixtures for integration tests against a real, private Dovecot on loopback.

* ``dovecot`` (session): one :class:`DovecotInstance` for the whole run.
  Without a usable Dovecot the tests are skipped, except in CI (``CI=true``
  or ``CI=1``), where they fail: CI must never go green by skipping.
* ``mailbox`` (function): a factory making a fresh, unique user per call,
  ``mailbox(messages) -> Mailbox(user, password, maildir)``.
* ``make_messages``: the :func:`sample_messages` generator.
* ``require_tool``: ``require_tool("curl")`` gives the command's path, or
  skips (fails in CI) when it is missing.

Tests that use ``dovecot`` (directly or through ``mailbox``) get the
``dovecot`` marker, so ``-m "not dovecot"`` deselects them.
"""

from __future__ import annotations

import base64
import contextlib
import io
import itertools
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import pytest
import trio

from popguard.audit import AuditLog, ConsoleSink, JsonLinesSink
from popguard.policy.load import load_policies
from popguard.policy.session import PolicyHolder, PolicyShared
from popguard.shell.server import Endpoint, ListenerSpec, ProxyServer, ServerSettings
from popguard.shell.tls import ListenerTLS
from popguard.testing import dovecot as dovecot_tool
from popguard.testing.dovecot import DovecotInstance
from tests.listsink import ListSink

_HERE = Path(__file__).parent
_user_counter = itertools.count(1)


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in item.path.parents and "dovecot" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.dovecot)


@pytest.fixture(scope="session")
def dovecot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DovecotInstance]:
    reason = dovecot_tool.available()
    if reason is not None:
        if in_ci():
            pytest.fail(f"Dovecot is required in CI but unusable: {reason}", pytrace=False)
        pytest.skip(f"Dovecot is not available: {reason}")
    instance = DovecotInstance(tmp_path_factory.mktemp("dovecot"))
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()


class Mailbox(NamedTuple):
    user: str
    password: str
    maildir: Path


class MailboxFactory:
    """``factory(messages)`` creates a new user on the shared Dovecot.

    Every call makes a new user (``u<n>-<random>``) with a new password and
    Maildir, so tests never share mail.  ``messages=None`` stores
    ``sample_messages()``.
    """

    def __init__(self, dovecot: DovecotInstance) -> None:
        self.dovecot = dovecot
        self.created: list[Mailbox] = []

    def __call__(
        self, messages: Sequence[bytes] | None = None, *, password: str | None = None
    ) -> Mailbox:
        user = f"u{next(_user_counter)}-{secrets.token_hex(3)}"
        password = password or secrets.token_urlsafe(12)
        if messages is None:
            messages = sample_messages()
        maildir = self.dovecot.add_user(user, password, messages)
        box = Mailbox(user, password, maildir)
        self.created.append(box)
        return box

    def messages(self, user: str) -> list[bytes]:
        """What is in ``user``'s Maildir now (LF line endings, file-name order)."""
        return self.dovecot.maildir_messages(user)


@pytest.fixture
def mailbox(dovecot: DovecotInstance) -> MailboxFactory:
    return MailboxFactory(dovecot)


def require_tool(name: str) -> str:
    """Path of the command ``name``; skip without it, but fail in CI."""
    path = shutil.which(name)
    if path is None:
        if in_ci():
            pytest.fail(f"{name} is required in CI but not installed", pytrace=False)
        pytest.skip(f"{name} is not installed")
    return path


@pytest.fixture(name="require_tool")
def require_tool_fixture() -> Callable[[str], str]:
    return require_tool


@pytest.fixture
def make_messages() -> Callable[..., list[bytes]]:
    return sample_messages


# -- sample mail ---------------------------------------------------------------

_WORDS = [
    "audit",
    "proxy",
    "mailbox",
    "session",
    "greeting",
    "capability",
    "retrieve",
    "delete",
    "quota",
    "transparent",
    "loopback",
    "message",
    "header",
    "body",
    "octet",
    "stream",
    "policy",
    "upstream",
]


def _headers(kind: str, index: int, seed: int, extra: Sequence[str] = ()) -> list[str]:
    day = 1 + (index % 28)
    return [
        "Return-Path: <sender@example.org>",
        "Received: from mx.example.org (mx.example.org [192.0.2.25])",
        f"\tby mail.example.net with ESMTPS id {seed:04x}{index:04x}; "
        f"Mon, {day:02d} Jan 2024 10:{index % 60:02d}:00 +0000",
        f'From: "Sender {index}" <sender@example.org>',
        "To: Recipient <rcpt@example.net>",
        f"Subject: [{kind}] sample message {index}",
        f"Date: Mon, {day:02d} Jan 2024 10:{index % 60:02d}:00 +0000",
        f"Message-ID: <{kind}.{seed}.{index}@popguard.test>",
        "MIME-Version: 1.0",
        *extra,
    ]


def _words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(count))


def _dots(index: int, seed: int, rng: random.Random) -> bytes:
    lines = [
        *_headers("dots", index, seed, ["Content-Type: text/plain; charset=us-ascii"]),
        "",
        "Lines starting with dots must be dot-stuffed on the wire:",
        ".",
        "..",
        "...",
        ". leading dot and space",
        ".hidden-looking line",
        _words(rng, 12),
        "",
        ".",
        "The line above is a lone dot, and so is the last line.",
        ".",
    ]
    return ("\r\n".join(lines) + "\r\n").encode()


def _long_line(index: int, seed: int, rng: random.Random) -> bytes:
    long = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(10_000))
    lines = [
        *_headers("long", index, seed, ["Content-Type: text/plain; charset=us-ascii"]),
        "",
        "The next line is 10,000 characters long (RFC 5322 says 998 at most):",
        long,
        "." + long[:500],
        "end",
    ]
    return ("\r\n".join(lines) + "\r\n").encode()


def _eight_bit(index: int, seed: int, rng: random.Random) -> bytes:
    head = _headers(
        "8bit",
        index,
        seed,
        ["Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: 8bit"],
    )
    body = [
        "Grüße aus Köln — «ça va?» 日本語のテキスト ✉".encode(),
        "latin-1: caf\xe9 na\xefve \xa9\xae\xb5".encode("latin-1"),
        # Every byte value except NUL, CR and LF, which mail must not carry raw.
        bytes(b for b in range(1, 256) if b not in (10, 13)),
        bytes(rng.randrange(0x80, 0x100) for _ in range(300)),
        b".\xff\xfe dot then high bytes",
        b"\ttab-indented line\twith\ttabs \x1b[0m\x7f",
    ]
    return "\r\n".join([*head, ""]).encode() + b"\r\n" + b"\r\n".join(body) + b"\r\n"


def _multipart(index: int, seed: int, rng: random.Random) -> bytes:
    boundary = f"=_popguard_{seed}_{index}"
    payload = rng.randbytes(6000)
    encoded = base64.encodebytes(payload).decode().replace("\n", "\r\n")
    lines = [
        *_headers("mime", index, seed, [f'Content-Type: multipart/mixed; boundary="{boundary}"']),
        "",
        "This is a multi-part message in MIME format.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        _words(rng, 40),
        ".signature-like line",
        "",
        f"--{boundary}",
        "Content-Type: application/octet-stream; name=blob.bin",
        "Content-Transfer-Encoding: base64",
        'Content-Disposition: attachment; filename="blob.bin"',
        "",
    ]
    tail = ["", f"--{boundary}--", ""]
    return ("\r\n".join(lines) + "\r\n" + encoded + "\r\n".join(tail)).encode()


def _plain(index: int, seed: int, rng: random.Random) -> bytes:
    lines = _headers("plain", index, seed, ["Content-Type: text/plain; charset=us-ascii"])
    lines += ["", *(_words(rng, rng.randrange(3, 15)) for _ in range(rng.randrange(5, 30)))]
    return ("\r\n".join(lines) + "\r\n").encode()


_KINDS: tuple[Callable[[int, int, random.Random], bytes], ...] = (
    _dots,
    _long_line,
    _eight_bit,
    _multipart,
    _plain,
)


def sample_messages(count: int = len(_KINDS), *, seed: int = 0) -> list[bytes]:
    """``count`` realistic messages (CRLF line endings), deterministic per ``seed``.

    They cycle through: lines starting with ``.`` (and lone ``.`` lines,
    including the last one), a 10,000-character line, 8-bit content (UTF-8,
    Latin-1 and every byte value except NUL/CR/LF), a MIME multipart with a
    base64 attachment, and plain text.
    """
    rng = random.Random(seed)
    return [_KINDS[i % len(_KINDS)](i + 1, seed, rng) for i in range(count)]


# -- popguard in front of the real Dovecot -------------------------------------
#
# Fixtures for the tests that run real clients THROUGH popguard:
#
# * ``popguard`` (async, trio): ``proxy = await popguard(**settings)`` starts
#   an in-process ProxyServer on 127.0.0.1 (or ``host="::1"``) in front of the
#   shared Dovecot (or ``upstream=(host, port)``), with every audit sink
#   there is: a list of event dicts, a JSON-lines file and a console renderer.
#   ``policies=DIR`` loads a policy directory (as ``serve --policies DIR``);
#   ``secrets=[...]`` adds passwords (say, of users made without ``mailbox``)
#   to the check that no password ever reaches a sink.
#   Every proxy is shut down at the end of the test.
# * ``tap`` (async, trio): ``await tap()`` a recording TCP pass-through to
#   Dovecot, to put between popguard and Dovecot: it shows the exact bytes
#   each side sent (a QUIT that reached Dovecot, the greeting as Dovecot sent
#   it).
# * ``wire``: ``wire(host, port)`` a raw, blocking POP3 socket client that
#   shows the bytes exactly as on the wire (dot-stuffing included).  Use it
#   from a worker thread (``trio.to_thread.run_sync``) in trio tests.
# * ``popguard_process``: ``popguard_process(*args)`` runs ``python -m
#   popguard serve`` as a real process on a free loopback port, with a JSON
#   lines audit file; stopped (SIGTERM, then SIGKILL) at the end of the test.
# * ``dovecot_log``: helpers over Dovecot's log for one user's sessions.


class RunningProxy:
    """One in-process popguard, as started by the ``popguard`` fixture."""

    def __init__(
        self,
        server: ProxyServer,
        sink: ListSink,
        json_path: Path,
        console: io.StringIO,
        secrets: Sequence[str] = (),
    ) -> None:
        self.server = server
        self.sink = sink
        self.json_path = json_path
        self.console = console
        #: Passwords that must never be logged, besides the mailboxes'.
        self.secrets = tuple(secrets)
        endpoint = next(iter(server.bound.values()))[0]
        self.host = endpoint.host
        self.port = endpoint.port

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def everything_logged(self) -> str:
        """Every sink's output: the event dicts' reprs, the JSON file, the console."""
        text = "\n".join(repr(e) for e in self.sink.events)
        text += "\n" + self.json_path.read_text(encoding="utf-8", errors="replace")
        return text + "\n" + self.console.getvalue()

    def assert_never_logged(self, secrets: Sequence[str | bytes], *other_output: str) -> None:
        """No sink (nor any of ``other_output``) ever showed any of ``secrets``."""
        text = "\n".join([self.everything_logged(), *other_output])
        for secret in secrets:
            needle = secret.decode() if isinstance(secret, bytes) else secret
            assert needle, "an empty secret proves nothing"
            assert needle not in text, f"the secret {needle!r} was logged"

    async def wait_for(self, name: str, count: int = 1, limit: float = 10.0) -> list[dict]:
        """Wait until ``count`` events called ``name`` were emitted; return them."""
        with trio.fail_after(limit):
            while len(self.sink.named(name)) < count:
                await trio.sleep(0.01)
        return self.sink.named(name)

    async def stop(self, limit: float = 10.0) -> None:
        """Shut down at once (sessions end without QUIT) and wait for it."""
        self.server.request_shutdown(immediate=True)
        with trio.fail_after(limit):
            while self.server.active_sessions or not self.sink.named("popguard.stopped"):
                await trio.sleep(0.01)


@pytest.fixture
async def popguard(dovecot, mailbox, nursery, tmp_path):
    started: list[RunningProxy] = []

    async def start(
        *,
        host: str = "127.0.0.1",
        upstream: tuple[str, int] | None = None,
        tls: ListenerTLS | None = None,
        policies: Path | None = None,
        secrets: Sequence[str] = (),
        **settings,
    ) -> RunningProxy:
        sink = ListSink()
        json_path = tmp_path / f"audit-{len(started)}.jsonl"
        console = io.StringIO()
        audit = AuditLog([sink, JsonLinesSink(str(json_path)), ConsoleSink(console)])
        up_host, up_port = upstream if upstream is not None else dovecot.address
        config = ServerSettings(
            listeners=(ListenerSpec("it", Endpoint(host, 0), tls or ListenerTLS()),),
            upstream=Endpoint(up_host, up_port),
            **settings,
        )
        shared = None
        if policies is not None:
            shared = PolicyShared(PolicyHolder(load_policies(policies)[0]), trio.current_time)
        server = ProxyServer(config, audit, policies=shared)
        await nursery.start(server.run)
        proxy = RunningProxy(server, sink, json_path, console, secrets)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        await proxy.stop()
        proxy.server.audit.close()
    # A safety net under every proxied test: no password ever reaches a sink.
    for proxy in started:
        proxy.assert_never_logged([box.password for box in mailbox.created] + [*proxy.secrets])


class TapConnection:
    def __init__(self) -> None:
        self.from_client = bytearray()  # what popguard sent to Dovecot
        self.from_server = bytearray()  # what Dovecot sent to popguard
        self.closed = trio.Event()


class Tap:
    """A recording TCP pass-through from a loopback port to ``target``."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self.connections: list[TapConnection] = []

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, down: trio.SocketStream) -> None:
        conn = TapConnection()
        self.connections.append(conn)
        try:
            up = await trio.open_tcp_stream(*self.target)
        except OSError:
            await down.aclose()
            conn.closed.set()
            return
        try:
            async with trio.open_nursery() as nursery:

                async def copy(src, dst, record: bytearray) -> None:
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        while data := await src.receive_some(65536):
                            record += data
                            await dst.send_all(data)
                    nursery.cancel_scope.cancel()  # one side is done: end both

                nursery.start_soon(copy, down, up, conn.from_client)
                nursery.start_soon(copy, up, down, conn.from_server)
        finally:
            await trio.aclose_forcefully(up)
            await trio.aclose_forcefully(down)
            conn.closed.set()

    async def wait_closed(self, limit: float = 10.0) -> None:
        with trio.fail_after(limit):
            for conn in self.connections:
                await conn.closed.wait()


@pytest.fixture
async def tap(dovecot, nursery):
    async def start(target: tuple[str, int] | None = None) -> Tap:
        t = Tap(target or dovecot.address)
        await nursery.start(t.serve)
        return t

    return start


class PopWire:
    """A raw, blocking POP3 client socket: bytes exactly as on the wire."""

    def __init__(self, host: str, port: int, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self._buf = bytearray()

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def _fill(self) -> None:
        chunk = self.sock.recv(262144)
        if not chunk:
            raise EOFError(f"connection closed; unread: {bytes(self._buf[-200:])!r}")
        self._buf += chunk

    def readline(self) -> bytes:
        while (end := self._buf.find(b"\n")) == -1:
            self._fill()
        line = bytes(self._buf[: end + 1])
        del self._buf[: end + 1]
        return line

    def reply(self, multiline: bool = False) -> bytes:
        """One whole reply: the status line, and for a multi-line +OK all of its
        (still dot-stuffed) lines up to and including the terminating ".\\r\\n"."""
        status = self.readline()
        if not (multiline and status.startswith(b"+OK")):
            return status
        parts = [status]
        while True:
            line = self.readline()
            parts.append(line)
            if line == b".\r\n":
                return b"".join(parts)

    def command(self, line: bytes | str, multiline: bool = False) -> bytes:
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply(multiline)

    def read_to_eof(self) -> bytes:
        data = bytes(self._buf)
        self._buf.clear()
        while chunk := self.sock.recv(262144):
            data += chunk
        return data

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def wire() -> Iterator[Callable[..., PopWire]]:
    opened: list[PopWire] = []

    def connect(host: str, port: int, timeout: float = 30.0) -> PopWire:
        w = PopWire(host, port, timeout)
        opened.append(w)
        return w

    yield connect
    for w in opened:
        w.close()


class DovecotLog:
    """Dovecot's log lines about one user's mail sessions (``pop3(user)``)."""

    def __init__(self, dovecot: DovecotInstance) -> None:
        self.dovecot = dovecot

    def session_ends(self, user: str) -> list[str]:
        pattern = rf"pop3\({re.escape(user)}\)<[^>]*><[^>]*>: Info: Disconnected: .*"
        return re.findall(pattern, self.dovecot.log_text())

    def logins(self, user: str) -> list[str]:
        pattern = rf"pop3-login: Info: Login: user=<{re.escape(user)}>, .*"
        return re.findall(pattern, self.dovecot.log_text())

    def wait_session_ends(self, user: str, count: int = 1, timeout: float = 10.0) -> list[str]:
        """Block until Dovecot logged the end of ``count`` sessions of ``user``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ends = self.session_ends(user)
            if len(ends) >= count:
                return ends
            time.sleep(0.05)
        raise AssertionError(
            f"Dovecot did not log {count} session end(s) for {user}:\n"
            + self.dovecot.log_text()[-3000:]
        )

    def wait_mail_processes_gone(self, user: str, timeout: float = 10.0) -> None:
        """Block until every mail process Dovecot started for ``user`` has exited.

        A wait for the end of sessions that needs no log line.  When many
        sessions end at once, Dovecot 2.3.19 has been seen to log one
        ``pop3: Info: Disconnected: ...`` line without its
        ``pop3(user)<pid><session>`` prefix (CI, 2026-12-07), so that end
        cannot be told from the log.  Each session has a mail process of its
        own (``service pop3`` keeps ``service_count = 1``), named by
        ``mpid=`` in the login line; once it has exited, Dovecot is done
        with the mailbox.
        """
        pattern = rf"pop3-login: Info: Login: user=<{re.escape(user)}>, .*?mpid=(\d+)"
        mpids = re.findall(pattern, self.dovecot.log_text())
        assert mpids, f"no login of {user} in Dovecot's log"
        deadline = time.monotonic() + timeout
        while any(os.path.exists(f"/proc/{pid}") for pid in mpids):
            if time.monotonic() > deadline:
                raise AssertionError(f"{user}'s mail processes {mpids} did not exit")
            time.sleep(0.05)


@pytest.fixture
def dovecot_log(dovecot) -> DovecotLog:
    return DovecotLog(dovecot)


class PopguardProcess:
    """``python -m popguard serve`` as a real process (see ``popguard_process``)."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, audit: Path, stderr: Path):
        self.proc = proc
        self.host = "127.0.0.1"
        self.port = port
        self.audit_path = audit
        self.stderr_path = stderr

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def events(self) -> list[dict]:
        try:
            text = self.audit_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        # The last line may be half-written while the process runs.
        return [json.loads(line) for line in text.splitlines() if line.endswith("}")]

    def named(self, name: str) -> list[dict]:
        return [e for e in self.events() if e["event"] == name]

    def wait_for(self, name: str, count: int = 1, timeout: float = 15.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.named(name)
            if len(found) >= count:
                return found
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(
            f"no {count} x {name!r} from popguard (exit status {self.proc.poll()}); "
            f"events: {[e['event'] for e in self.events()]}; stderr: {self.stderr()}"
        )

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def status(self) -> dict[str, int]:
        """The ``Vm*`` lines of /proc/<pid>/status, in KiB."""
        fields = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.startswith("Vm") and value.strip().endswith("kB"):
                fields[key] = int(value.split()[0])
        return fields

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM, and the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


def free_loopback_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@pytest.fixture
def popguard_process(dovecot, tmp_path) -> Iterator[Callable[..., PopguardProcess]]:
    started: list[PopguardProcess] = []

    def start(
        *args: str, upstream: str | None = None, ready: str = "popguard.started"
    ) -> PopguardProcess:
        """*ready*: the record that says it serves (with --workers, the
        parent's popguard.workers.ready)."""
        upstream = upstream or f"{dovecot.host}:{dovecot.port}"
        for attempt in range(5):
            n = len(started)
            port = free_loopback_port()
            audit = tmp_path / f"popguard-{n}-{attempt}.jsonl"
            stderr = tmp_path / f"popguard-{n}-{attempt}.stderr"
            argv = [
                sys.executable,
                "-m",
                "popguard",
                "serve",
                "--listen",
                f"127.0.0.1:{port}",
                "--upstream",
                upstream,
                "--audit-file",
                str(audit),
                "--no-console",
                *args,
            ]
            with stderr.open("wb") as err:
                proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT
                )
            handle = PopguardProcess(proc, port, audit, stderr)
            started.append(handle)
            try:
                handle.wait_for(ready)
            except AssertionError:
                if proc.poll() is not None and "in use" in handle.stderr() and attempt < 4:
                    continue  # someone took the port first: try another
                raise
            return handle
        raise AssertionError("unreachable")

    yield start
    for handle in started:
        if handle.proc.poll() is None:
            handle.proc.send_signal(signal.SIGTERM)
            try:
                handle.proc.wait(5)
            except subprocess.TimeoutExpired:
                handle.proc.kill()
                handle.proc.wait(10)
