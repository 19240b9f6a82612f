"""popguard behind a real HAProxy, with the PROXY protocol on both hops.

The topology, all on loopback, every process real::

    client 127.0.0.2/.3 ──▶ HAProxy 127.0.0.4 (mode tcp, roundrobin)
                              ├─ send-proxy-v2 ─▶ popguard a ─┐ send_proxy: v2
                              └─ send-proxy-v2 ─▶ popguard b ─┴─▶ Dovecot (haproxy = yes)

* HAProxy (Debian's ``haproxy``) is started by the test in the foreground
  (``-db``) with a private config and stats socket: health checks on
  popguard's ``/readyz`` as docs/deploy.md describes, plus ``retries 3`` and
  ``option redispatch 1``.  It connects to popguard from ``source
  127.0.0.1``, the one network popguard trusts to send PROXY headers.
* Clients bind 127.0.0.2 or 127.0.0.3 (or ``::1``) and dial HAProxy's
  frontend on 127.0.0.4, so every address in a record tells who put it
  there: the real client (127.0.0.2/.3), HAProxy's side of the hop
  (127.0.0.1), or the frontend the client dialled (127.0.0.4).
* The two popguards are ``python -m popguard serve --config FILE
  --admin-listen ...`` processes.  (The ``popguard_process`` fixture cannot
  be used: it passes ``--listen``, which replaces the config file's
  listeners, and with them ``proxy_protocol`` and ``send_proxy``.)
* Dovecot is a second private instance (the launcher's ``extra_config``)
  with an extra ``haproxy = yes`` listener, ``haproxy_trusted_networks =
  127.0.0.1/32``, and a login line that shows the ports too, so each line
  names exactly one client socket.

What is checked: the audit trail names the real client (HAProxy is the
record's ``proxy``); Dovecot's own log names the real client
(``rip``/``rport``) and the frontend it dialled (``lip``/``lport``), also
with TLS toward Dovecot, for v1 and TLV-laden v2 headers from HAProxy, and
for an IPv6 client; a forged header from an untrusted peer is refused.
When one popguard is SIGKILLed in the middle of sessions, their clients are
cut off, every message they had marked is still in the mailbox (nobody sent
QUIT: Dovecot logs "Connection closed", ``del=0/3``), the audit file is
intact up to the marks, the other instance's sessions carry on, and new
sessions work through the survivor, first by HAProxy's redispatch, then
because the health checks marked the dead one down.  SIGTERM (a rolling
restart) drains: /readyz fails, HAProxy moves new clients away, and the open
session finishes and commits its deletion.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from popguard.core.proxy_protocol import build_v2
from popguard.testing.dovecot import DovecotError, DovecotInstance, stored_form
from tests.ci import in_ci

T = TypeVar("T")
Record = dict[str, Any]

#: Where the clients connect from: not HAProxy's 127.0.0.1, and not each other.
CLIENT_A = "127.0.0.2"
CLIENT_B = "127.0.0.3"
#: HAProxy's frontend address (the "destination" in every PROXY header).
FRONTEND = "127.0.0.4"
#: HAProxy's own address toward popguard: the one network popguard trusts,
#: and the one Dovecot trusts (popguard connects from it too).
HAPROXY_SOURCE = "127.0.0.1"
#: Seconds any one wait may take: generous, for a noisy 2-core machine.
LIMIT = 30.0
#: HAProxy's health checks: every CHECK_INTER_MS, down after FALL failures.
CHECK_INTER_MS = 500
FALL = 3
RISE = 2

#: The backend's settings (the farm adds ``source`` and the ``server`` lines).
BACKEND = (
    "balance roundrobin",
    # The health check of docs/deploy.md: /readyz on the admin listener.
    "option httpchk",
    "http-check send meth GET uri /readyz ver HTTP/1.1 hdr Host popguard",
    "http-check expect status 200",
    f"default-server check inter {CHECK_INTER_MS}ms fall {FALL} rise {RISE}",
    # A connect refused by a dead or draining instance is retried, each time
    # on another server (redispatch on every retry), so no client notices the
    # seconds before the health checks mark the instance down.
    "retries 3",
    "option redispatch 1",
)

_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")


# -- tools ---------------------------------------------------------------------


def find_haproxy() -> str | None:
    """Path of ``haproxy``, also looking in sbin dirs off PATH."""
    found = shutil.which("haproxy")
    if found is not None:
        return found
    for directory in _SBIN_DIRS:
        candidate = Path(directory) / "haproxy"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


@pytest.fixture(scope="module")
def haproxy_bin() -> str:
    path = find_haproxy()
    if path is None:
        if in_ci():
            pytest.fail("haproxy is required in CI but not installed", pytrace=False)
        pytest.skip("haproxy is not installed (Debian: apt-get install haproxy)")
    return path


def ipv6_loopback_unavailable() -> str | None:
    if not socket.has_ipv6:
        return "Python has no IPv6 support"
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError as exc:
        return f"::1 is not usable here: {exc}"
    return None


def free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(what: str, check: Callable[[], T], limit: float = LIMIT) -> T:
    """Poll ``check`` until it returns something true; return that."""
    deadline = time.monotonic() + limit
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit:g} s waiting for {what}")
        time.sleep(0.05)


# -- Dovecot with PROXY-protocol listeners ----------------------------------------


class ProxiedDovecot:
    """A private Dovecot with ``haproxy = yes`` listeners.

    Plain POP3 on ``pp_port``; with ``tls=True`` also POP3S on ``pps_port``
    (and STLS on ``pp_port``).  Its own ``port`` (no PROXY header) is what
    the launcher probes.
    """

    def __init__(self, instance: DovecotInstance, pp_port: int, pps_port: int | None) -> None:
        self.instance = instance
        self.pp_port = pp_port
        self.pps_port = pps_port
        self.passwords: dict[str, str] = {}

    @property
    def pp_address(self) -> str:
        return f"{HAPROXY_SOURCE}:{self.pp_port}"

    @property
    def pps_address(self) -> str:
        assert self.pps_port is not None
        return f"{HAPROXY_SOURCE}:{self.pps_port}"

    def add_user(self, messages: Sequence[bytes]) -> tuple[str, str]:
        user = f"hp{len(self.passwords)}-{secrets.token_hex(3)}"
        password = secrets.token_urlsafe(12)
        self.instance.add_user(user, password, messages)
        self.passwords[user] = password
        return user, password

    def stored(self, user: str) -> list[bytes]:
        """The user's messages on disk (LF line endings)."""
        return self.instance.maildir_messages(user)

    def log(self) -> str:
        return self.instance.log_text()

    def logins(self, user: str) -> list[str]:
        pattern = rf"pop3-login: Info: Login: user=<{re.escape(user)}>, .*"
        return re.findall(pattern, self.log())

    def session_ends(self, user: str) -> list[str]:
        pattern = rf"pop3\({re.escape(user)}\)<[^>]*><[^>]*>: Info: Disconnected: .*"
        return re.findall(pattern, self.log())

    def login_line(self, user: str) -> str:
        """Dovecot's one login line for ``user`` (each test user logs in once)."""
        lines = wait_until(f"Dovecot's login line for {user}", lambda: self.logins(user))
        assert len(lines) == 1, lines
        return lines[0]

    def wait_session_end(self, user: str) -> str:
        ends = wait_until(
            f"Dovecot to log the end of {user}'s session", lambda: self.session_ends(user)
        )
        assert len(ends) == 1, ends
        return ends[0]


def _proxied_config(pp_port: int, pps_port: int | None) -> str:
    # Dovecot merges a repeated "service" block into the launcher's: this one
    # only adds listeners.  The login line gets the ports as well (%{rport},
    # %{lport}), so each line can be matched to one client socket.
    lines = [
        f"haproxy_trusted_networks = {HAPROXY_SOURCE}/32",
        "login_log_format_elements = user=<%u> method=%m rip=%r rport=%{rport} "
        "lip=%l lport=%{lport} mpid=%e %c session=<%{session}>",
        "service pop3-login {",
        "  inet_listener pop3-haproxy {",
        f"    address = {HAPROXY_SOURCE}",
        f"    port = {pp_port}",
        "    haproxy = yes",
        "  }",
    ]
    if pps_port is not None:
        lines += [
            "  inet_listener pop3s-haproxy {",
            f"    address = {HAPROXY_SOURCE}",
            f"    port = {pps_port}",
            "    ssl = yes",
            "    haproxy = yes",
            "  }",
        ]
    return "\n".join([*lines, "}"])


def start_proxied_dovecot(
    tmp_path_factory: pytest.TempPathFactory, *, tls: bool = False
) -> ProxiedDovecot:
    for attempt in range(5):
        pp_port = free_port(HAPROXY_SOURCE)
        pps_port = free_port(HAPROXY_SOURCE) if tls else None
        instance = DovecotInstance(
            tmp_path_factory.mktemp("dovecot-haproxy"),
            tls=tls,
            extra_config=_proxied_config(pp_port, pps_port),
        )
        try:
            instance.start()
        except DovecotError as exc:
            # Someone took one of our ports before Dovecot bound it: pick others.
            if "Address already in use" in str(exc) and attempt < 4:
                continue
            raise
        return ProxiedDovecot(instance, pp_port, pps_port)
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def proxied_dovecot(
    dovecot: DovecotInstance, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxiedDovecot]:
    """A second private Dovecot whose ``pp_port`` wants a PROXY header.

    It asks for ``dovecot`` so that a missing Dovecot skips (fails in CI)
    exactly as every other integration test does.
    """
    proxied = start_proxied_dovecot(tmp_path_factory)
    try:
        yield proxied
    finally:
        proxied.instance.stop()


@pytest.fixture(scope="module")
def proxied_tls_dovecot(
    dovecot: DovecotInstance, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxiedDovecot]:
    """Like ``proxied_dovecot``, with TLS: STLS on ``pp_port``, POP3S on ``pps_port``."""
    if shutil.which("openssl") is None:  # Dovecot's certificate is made with it
        if in_ci():
            pytest.fail("openssl is required in CI but not installed", pytrace=False)
        pytest.skip("openssl is not installed")
    proxied = start_proxied_dovecot(tmp_path_factory, tls=True)
    try:
        yield proxied
    finally:
        proxied.instance.stop()


# -- popguard processes ----------------------------------------------------------


class Popguard:
    """``python -m popguard serve --config FILE`` behind HAProxy, with /readyz."""

    def __init__(self, name: str, workdir: Path, upstream: str, upstream_extra: str = "") -> None:
        self.name = name
        self.workdir = workdir
        self.upstream = upstream
        self.upstream_extra = upstream_extra
        self.port = 0
        self.admin_port = 0
        self.config_path = workdir / f"popguard-{name}.yaml"
        self.audit_path = workdir / f"audit-{name}.jsonl"
        self.stderr_path = workdir / f"popguard-{name}.stderr"
        self.proc: subprocess.Popen[bytes] | None = None

    def config(self) -> str:
        return (
            "listeners:\n"
            "  - name: behind-haproxy\n"
            f'    listen: "127.0.0.1:{self.port}"\n'
            "    proxy_protocol:\n"
            f'      trusted: ["{HAPROXY_SOURCE}/32"]\n'
            "      required: true\n"
            "      timeout: 5\n"
            "    send_proxy: v2\n"
            "upstream:\n"
            f'  address: "{self.upstream}"\n'
            f"{self.upstream_extra}"
            "audit:\n"
            f'  file: "{self.audit_path}"\n'
            "  console: false\n"
            # Long enough for a drained session to finish on a slow machine.
            "shutdown:\n"
            "  grace_period: 60\n"
        )

    def start(self) -> None:
        for attempt in range(5):
            self.port = free_port("127.0.0.1")
            self.admin_port = free_port("127.0.0.1")
            self.config_path.write_text(self.config())
            argv = [
                sys.executable,
                "-m",
                "popguard",
                "serve",
                "--config",
                str(self.config_path),
                "--admin-listen",
                f"127.0.0.1:{self.admin_port}",
            ]
            with self.stderr_path.open("ab") as err:
                # cwd: not the repository, whose ./policies would be loaded.
                self.proc = subprocess.Popen(
                    argv,
                    cwd=self.workdir,
                    stdin=subprocess.DEVNULL,
                    stdout=err,
                    stderr=subprocess.STDOUT,
                )
            try:
                wait_until(f"popguard {self.name} to start", self._ready)
            except AssertionError as exc:
                if self.proc.poll() is not None and "in use" in self.stderr() and attempt < 4:
                    continue  # a port was taken under us: try others
                raise AssertionError(f"popguard {self.name}: {exc}\n{self.stderr()}") from None
            return

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"popguard {self.name} exited with {self.proc.returncode}")
        return bool(self.named("popguard.started")) and self.readyz() == 200

    def readyz(self) -> int | None:
        url = f"http://127.0.0.1:{self.admin_port}/readyz"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return None

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def events(self) -> list[Record]:
        try:
            text = self.audit_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        # The last line may be half-written while the process runs.
        return [json.loads(line) for line in text.splitlines() if line.endswith("}")]

    def named(self, name: str) -> list[Record]:
        return [e for e in self.events() if e["event"] == name]

    def session_of(self, client: str) -> str | None:
        """The session id this instance gave the client ``host:port``, if any."""
        for event in self.named("session.opened"):
            if event.get("client") == client:
                return str(event["session"])
        return None

    def session_events(self, session: str) -> list[Record]:
        return [e for e in self.events() if e.get("session") == session]

    def wait_session_event(self, session: str, name: str, count: int = 1) -> list[Record]:
        def found() -> list[Record]:
            events = [e for e in self.session_events(session) if e["event"] == name]
            return events if len(events) >= count else []

        return wait_until(f"{count} x {name} in session {session} on {self.name}", found)

    def kill(self) -> None:
        """SIGKILL: a crash, no drain, no QUIT for anyone."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(LIMIT)

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def audit_verify(path: Path) -> subprocess.CompletedProcess[str]:
    """``popguard audit verify FILE``: the hash chain, checked by the real CLI."""
    return subprocess.run(
        [sys.executable, "-m", "popguard", "audit", "verify", str(path)],
        capture_output=True,
        text=True,
        timeout=LIMIT,
        check=False,
    )


# -- HAProxy ---------------------------------------------------------------------


class HAProxy:
    """HAProxy in the foreground (``-db``) with a private config and stats socket."""

    def __init__(
        self,
        binary: str,
        workdir: Path,
        servers: Sequence[Popguard],
        *,
        send_proxy: str = "send-proxy-v2",
        extra_frontend: Sequence[str] = (),
        backend: Sequence[str] = BACKEND,
    ) -> None:
        self.binary = binary
        self.workdir = workdir
        self.servers = servers
        self.send_proxy = send_proxy
        self.extra_frontend = list(extra_frontend)
        self.backend = list(backend)
        self.ipv6 = ipv6_loopback_unavailable() is None
        self.port = 0
        self.port6 = 0
        self.config_path = workdir / "haproxy.cfg"
        self.log_path = workdir / "haproxy.log"
        # UNIX socket paths must stay short; pytest's tmp dirs may not be.
        self._sock_dir = Path(tempfile.mkdtemp(prefix="pghp-", dir="/tmp"))
        self.stats_path = self._sock_dir / "stats.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    def config(self) -> str:
        lines = [
            "global",
            "    log stdout format raw local0 info",
            f"    stats socket {self.stats_path} mode 600 level admin",
            "    maxconn 2000",
            "defaults",
            "    mode tcp",
            "    log global",
            "    option tcplog",
            "    timeout connect 5s",
            "    timeout client 120s",
            "    timeout server 120s",
            "    timeout check 3s",
            "frontend pop3",
            f"    bind {FRONTEND}:{self.port}",
        ]
        if self.ipv6:
            lines.append(f"    bind [::1]:{self.port6}")
        lines += [f"    {line}" for line in self.extra_frontend]
        lines += [
            "    default_backend popguards",
            "backend popguards",
            f"    source {HAPROXY_SOURCE}",
            *(f"    {line}" for line in self.backend),
        ]
        lines += [
            f"    server {s.name} 127.0.0.1:{s.port} {self.send_proxy} check port {s.admin_port}"
            for s in self.servers
        ]
        return "\n".join(lines) + "\n"

    def start(self) -> None:
        for attempt in range(5):
            self.port = free_port(FRONTEND)
            self.port6 = free_port("::1") if self.ipv6 else 0
            self.config_path.write_text(self.config())
            check = subprocess.run(
                [self.binary, "-c", "-f", str(self.config_path)],
                capture_output=True,
                timeout=LIMIT,
                check=False,
            )
            if check.returncode != 0:
                raise AssertionError(
                    "haproxy -c refused the config:\n"
                    + check.stdout.decode(errors="replace")
                    + check.stderr.decode(errors="replace")
                )
            with self.log_path.open("ab") as log:
                self.proc = subprocess.Popen(
                    [self.binary, "-db", "-f", str(self.config_path)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            try:
                wait_until("HAProxy's frontend to open", self._frontend_open)
            except AssertionError as exc:
                if self.proc.poll() is not None and "bind" in self.log() and attempt < 4:
                    continue  # a frontend port was taken under us
                raise AssertionError(f"HAProxy: {exc}\n{self.log()}") from None
            return

    def _frontend_open(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"HAProxy exited with {self.proc.returncode}")
        try:
            stats = self.stats()
        except OSError:
            return False
        return stats.get(("pop3", "FRONTEND"), {}).get("status") == "OPEN"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def command(self, line: str) -> str:
        """One command on the admin (stats) socket; its whole answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(self.stats_path))
            sock.sendall(line.encode() + b"\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        return data.decode(errors="replace")

    def stats(self) -> dict[tuple[str, str], dict[str, str]]:
        """``show stat``, keyed by (proxy, server)."""
        text = self.command("show stat").lstrip("# ")
        return {(row["pxname"], row["svname"]): row for row in csv.DictReader(io.StringIO(text))}

    def server(self, name: str) -> dict[str, str]:
        return self.stats()[("popguards", name)]

    def wait_servers(self, status: str, names: Sequence[str]) -> None:
        """Wait until every named server's health checks say ``status`` (UP/DOWN)."""

        def settled() -> bool:
            rows = [self.server(n) for n in names]
            if status == "UP":
                # UP and checked: not merely "UP" from startup, before any check.
                return all(r["status"] == "UP" and r["check_status"] == "L7OK" for r in rows)
            return all(r["status"] == status for r in rows)

        try:
            wait_until(f"HAProxy servers {list(names)} {status}", settled)
        except AssertionError:
            rows = {n: (self.server(n)["status"], self.server(n)["check_status"]) for n in names}
            raise AssertionError(f"servers not {status}: {rows}\n{self.log()[-3000:]}") from None

    def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        shutil.rmtree(self._sock_dir, ignore_errors=True)


# -- POP3 clients from a chosen source address -------------------------------------


class Client:
    """A blocking POP3 client socket bound to ``source`` (any port)."""

    def __init__(self, source: str, target: tuple[str, int], timeout: float = LIMIT) -> None:
        self.sock = socket.create_connection(target, timeout=timeout, source_address=(source, 0))
        host, local_port = self.sock.getsockname()[:2]
        self.host = str(host)
        self.local_port = int(local_port)
        #: The client as the audit trail must name it.
        self.address = f"[{host}]:{local_port}" if ":" in host else f"{host}:{local_port}"
        self._buf = bytearray()
        self.greeting = self.readline()

    def readline(self) -> bytes:
        while (end := self._buf.find(b"\n")) == -1:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"connection closed; unread: {bytes(self._buf)!r}")
            self._buf += chunk
        line = bytes(self._buf[: end + 1])
        del self._buf[: end + 1]
        return line

    def command(self, line: str, multiline: bool = False) -> bytes:
        self.sock.sendall(line.encode() + b"\r\n")
        status = self.readline()
        if not (multiline and status.startswith(b"+OK")):
            return status
        parts = [status]
        while (part := self.readline()) != b".\r\n":
            parts.append(part)
        return b"".join(parts)

    def login(self, user: str, password: str) -> None:
        assert self.command(f"USER {user}").startswith(b"+OK")
        reply = self.command(f"PASS {password}")
        assert reply.startswith(b"+OK"), reply

    def wait_closed(self) -> bytes:
        """Everything until the peer closes (a reset counts as a close)."""
        data = bytes(self._buf)
        self._buf.clear()
        with contextlib.suppress(ConnectionResetError):
            while chunk := self.sock.recv(65536):
                data += chunk
        return data

    def close(self) -> None:
        self.sock.close()


# -- the farm: HAProxy, two popguards, the proxied Dovecot ------------------------------


@dataclass
class Session:
    """An open session through HAProxy, and where it landed."""

    client: Client
    user: str
    messages: list[bytes]
    instance: Popguard
    id: str


@dataclass
class Farm:
    haproxy: HAProxy
    a: Popguard
    b: Popguard
    dovecot: ProxiedDovecot
    clients: list[Client]

    @property
    def instances(self) -> tuple[Popguard, Popguard]:
        return (self.a, self.b)

    def connect(self, source: str) -> Client:
        """A client from ``source`` to HAProxy's frontend (``::1`` for an IPv6 source)."""
        frontend = ("::1", self.haproxy.port6) if ":" in source else (FRONTEND, self.haproxy.port)
        client = Client(source, frontend)
        self.clients.append(client)
        assert client.greeting.startswith(b"+OK"), client.greeting
        return client

    def served_by(self, client: Client) -> Popguard:
        """The instance whose audit trail opened a session for this client."""

        def find() -> Popguard | None:
            for instance in self.instances:
                if instance.session_of(client.address) is not None:
                    return instance
            return None

        return wait_until(f"an audit record for client {client.address}", find)

    def open_session(self, source: str, tag: str, count: int = 3) -> Session:
        """Log a new user in through HAProxy and leave the session open."""
        messages = sample(tag, count)
        user, password = self.dovecot.add_user(messages)
        client = self.connect(source)
        client.login(user, password)
        instance = self.served_by(client)
        session = instance.session_of(client.address)
        assert session is not None
        return Session(client, user, messages, instance, session)

    def whole_session(self, source: str, tag: str) -> tuple[Client, str]:
        """A whole session through HAProxy (login, STAT, RETR, QUIT): (client, user)."""
        messages = sample(tag, 1)
        user, password = self.dovecot.add_user(messages)
        client = self.connect(source)
        client.login(user, password)
        assert client.command("STAT").startswith(b"+OK 1 ")
        assert f"Subject: {tag} #1".encode() in client.command("RETR 1", multiline=True)
        assert client.command("QUIT").startswith(b"+OK")
        assert client.wait_closed() == b""
        return client, user

    def check_real_client(self, client: Client, user: str, instance: Popguard) -> None:
        """Both hops named the real client: the instance's records, Dovecot's login line."""
        session = instance.session_of(client.address)
        assert session is not None
        instance.wait_session_event(session, "session.closed")
        for record in instance.session_events(session):
            assert record["client"] == client.address, record
            host, _, port = str(record["proxy"]).rpartition(":")
            assert host == HAPROXY_SOURCE, record
            assert port.isdigit(), record
        line = self.dovecot.login_line(user)
        assert f"rip={client.host}, rport={client.local_port}," in line, line
        frontend = (
            ("::1", self.haproxy.port6) if ":" in client.host else (FRONTEND, self.haproxy.port)
        )
        assert f"lip={frontend[0]}, lport={frontend[1]}," in line, line

    def explain(self) -> str:
        parts = [f"--- haproxy log ---\n{self.haproxy.log()[-3000:]}"]
        for p in self.instances:
            parts.append(f"--- popguard {p.name} stderr ---\n{p.stderr()[-2000:]}")
        return "\n".join(parts)


def sample(tag: str, count: int) -> list[bytes]:
    return [
        f"From: hp@example.org\r\nSubject: {tag} #{i}\r\n\r\nbody {i} of {tag}\r\n".encode()
        for i in range(1, count + 1)
    ]


@pytest.fixture
def make_farm(
    haproxy_bin: str, proxied_dovecot: ProxiedDovecot, tmp_path: Path
) -> Iterator[Callable[..., Farm]]:
    """``make_farm(**haproxy_options)``: HAProxy, popguards a and b, all healthy.

    ``dovecot``, ``upstream`` (its address) and ``upstream_extra`` (more
    lines for popguard's ``upstream:`` section) choose another upstream.
    """
    built: list[Farm] = []

    def make(
        *,
        dovecot: ProxiedDovecot | None = None,
        upstream: str | None = None,
        upstream_extra: str = "",
        **haproxy_options: Any,
    ) -> Farm:
        dovecot = dovecot or proxied_dovecot
        upstream = upstream or dovecot.pp_address
        workdir = tmp_path / f"farm{len(built)}"
        workdir.mkdir()
        a = Popguard("a", workdir, upstream, upstream_extra)
        b = Popguard("b", workdir, upstream, upstream_extra)
        haproxy = HAProxy(haproxy_bin, workdir, [a, b], **haproxy_options)
        farm = Farm(haproxy, a, b, dovecot, [])
        built.append(farm)
        a.start()
        b.start()
        haproxy.start()
        haproxy.wait_servers("UP", ["a", "b"])
        return farm

    yield make
    for farm in built:
        for client in farm.clients:
            client.close()
        farm.haproxy.stop()
        farm.a.stop()
        farm.b.stop()


@pytest.fixture
def farm(make_farm: Callable[..., Farm]) -> Farm:
    return make_farm()


def one_session_each(farm: Farm, source: str, tag: str) -> list[tuple[Client, str, Popguard]]:
    """A whole session on each instance (roundrobin: two in a row), checked end to end."""
    done = []
    for index in range(2):
        client, user = farm.whole_session(source, f"{tag}-{index}")
        done.append((client, user, farm.served_by(client)))
    assert {p.name for _, _, p in done} == {"a", "b"}, farm.explain()
    for client, user, instance in done:
        farm.check_real_client(client, user, instance)
    for instance in farm.instances:
        assert instance.named("proxy_protocol.rejected") == []
    return done


# -- the real client, end to end -------------------------------------------------


def test_real_client_reaches_audit_trail_and_dovecot(farm: Farm) -> None:
    """Both hops carry the real client: popguard's records and Dovecot's log."""
    runs = []
    for index in range(4):
        source = CLIENT_A if index % 2 == 0 else CLIENT_B
        messages = sample(f"real-{index}", 2)
        user, password = farm.dovecot.add_user(messages)
        client = farm.connect(source)
        client.login(user, password)
        assert client.command("STAT").startswith(b"+OK 2 ")
        assert f"Subject: real-{index} #1".encode() in client.command("RETR 1", multiline=True)
        assert client.command("QUIT").startswith(b"+OK")
        assert client.wait_closed() == b""
        runs.append((client, user))

    served: dict[str, list[str]] = {"a": [], "b": []}
    for client, user in runs:
        instance = farm.served_by(client)
        served[instance.name].append(client.address)
        farm.check_real_client(client, user, instance)
        session = instance.session_of(client.address)
        assert session is not None
        names = [r["event"] for r in instance.session_events(session)]
        assert "auth.succeeded" in names, names
        assert "message.retrieved" in names, names
    # roundrobin: both instances served, two sessions each.
    assert [len(v) for v in served.values()] == [2, 2], (served, farm.explain())

    for instance in farm.instances:
        # HAProxy's health checks go to the admin port, never to POP3: every
        # session is a real client, and nothing was refused.
        opened = instance.named("session.opened")
        assert all(str(e["client"]).startswith((f"{CLIENT_A}:", f"{CLIENT_B}:")) for e in opened)
        assert instance.named("proxy_protocol.rejected") == []


@pytest.mark.parametrize(
    "send_proxy",
    [
        pytest.param("send-proxy", id="v1"),
        # Every TLV HAProxy can add (on a plain TCP frontend the SSL one says
        # "no TLS"), with a CRC32C over the whole header that popguard checks.
        pytest.param(
            "send-proxy-v2 proxy-v2-options "
            "ssl,cert-cn,ssl-cipher,cert-sig,cert-key,authority,crc32c,unique-id",
            id="v2-all-tlvs",
        ),
    ],
)
def test_other_header_forms_from_haproxy(make_farm: Callable[..., Farm], send_proxy: str) -> None:
    """HAProxy's v1 line, and its v2 header with every TLV, give the same result."""
    farm = make_farm(
        send_proxy=send_proxy,
        extra_frontend=["unique-id-format %{+X}o%ci:%cp_%fi:%fp_%Ts_%rt:%pid"],
    )
    one_session_each(farm, CLIENT_A, "form")


def test_ipv6_client_through_ipv4_hops(farm: Farm) -> None:
    """A client on ::1: HAProxy and popguard talk IPv4, the headers carry IPv6."""
    reason = ipv6_loopback_unavailable()
    if reason is not None:
        pytest.skip(reason)
    for client, _, _ in one_session_each(farm, "::1", "six"):
        assert client.address.startswith("[::1]:"), client.address


@pytest.mark.parametrize("mode", ["implicit", "starttls"])
def test_header_goes_before_upstream_tls(
    make_farm: Callable[..., Farm], proxied_tls_dovecot: ProxiedDovecot, mode: str
) -> None:
    """``send_proxy`` with TLS toward Dovecot: the header first, in the clear, then
    the TLS handshake (POP3S) or the greeting and STLS.  Dovecot reads the real
    client from it either way."""
    dovecot = proxied_tls_dovecot
    cert = dovecot.instance.cert_path
    assert cert is not None
    farm = make_farm(
        dovecot=dovecot,
        upstream=dovecot.pps_address if mode == "implicit" else dovecot.pp_address,
        upstream_extra=f'  tls: {mode}\n  ca_file: "{cert}"\n  server_name: localhost\n',
    )
    for client, user, instance in one_session_each(farm, CLIENT_B, f"tls-{mode}"):
        assert ", TLS, " in dovecot.login_line(user)
        session = instance.session_of(client.address)
        assert session is not None
        tls = [
            e
            for e in instance.session_events(session)
            if e["event"] == "tls.established" and e.get("side") == "upstream"
        ]
        assert len(tls) == 1, instance.session_events(session)
        assert tls[0]["stls"] is (mode == "starttls"), tls


def test_forged_header_from_untrusted_peer_is_refused(farm: Farm) -> None:
    """Only HAProxy's address may name a client: a forged header is refused."""
    with socket.create_connection(
        ("127.0.0.1", farm.a.port), timeout=LIMIT, source_address=(CLIENT_A, 0)
    ) as sock:
        me = "{}:{}".format(*sock.getsockname()[:2])
        sock.sendall(build_v2(("192.0.2.66", 4242), ("127.0.0.1", farm.a.port)) + b"CAPA\r\n")
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(4096):
                received += chunk
    assert received == b"", received  # not even a greeting
    rejected = wait_until(
        "proxy_protocol.rejected", lambda: farm.a.named("proxy_protocol.rejected")
    )
    assert [r["client"] for r in rejected] == [me], rejected
    assert "trusted" in rejected[0]["reason"], rejected
    assert "192.0.2.66" not in farm.a.audit_path.read_text(), "the forged address was believed"
    assert farm.a.named("session.opened") == []


# -- one instance goes away ------------------------------------------------------


def test_kill_one_instance_mid_session(farm: Farm) -> None:
    """SIGKILL popguard a under open sessions: nothing marked is lost, b carries on."""
    # Sessions through HAProxy until each instance holds two (roundrobin
    # alternates, so this normally takes four).
    held: dict[str, list[Session]] = {"a": [], "b": []}
    for index in range(12):
        if all(len(v) >= 2 for v in held.values()):
            break
        session = farm.open_session(CLIENT_A if index % 2 == 0 else CLIENT_B, f"kill-{index}")
        if len(held[session.instance.name]) < 2:
            held[session.instance.name].append(session)
        else:
            assert session.client.command("QUIT").startswith(b"+OK")
    assert [len(v) for v in held.values()] == [2, 2], farm.explain()

    # Every session marks messages 1 and 2 of 3, and its instance records that.
    for session in held["a"] + held["b"]:
        assert session.client.command("STAT").startswith(b"+OK 3 ")
        assert session.client.command("DELE 1").startswith(b"+OK")
        assert session.client.command("DELE 2").startswith(b"+OK")
    for session in held["a"] + held["b"]:
        session.instance.wait_session_event(session.id, "dele.marked", count=2)

    # HAProxy notices a dead server only after FALL failed checks.  Pause a's
    # checks so that window stays open, however fast or slow the machine: the
    # sessions right after the crash must get through by retry and redispatch.
    assert farm.haproxy.command("disable health popguards/a").strip() == ""
    before = farm.haproxy.server("a")

    # The crash: no drain, no QUIT, no goodbye.
    farm.a.kill()
    assert farm.a.proc is not None
    assert farm.a.proc.returncode == -signal.SIGKILL

    fresh = [
        farm.whole_session(CLIENT_A if i % 2 == 0 else CLIENT_B, f"after-kill-{i}")
        for i in range(4)
    ]
    after = farm.haproxy.server("a")
    # HAProxy still sends connections to a ("no check": checks paused) ...
    assert after["status"] == "no check", after["status"]
    # ... and some did go there first, were refused, and were sent on to b.
    switched = sum(int(after[k] or 0) - int(before[k] or 0) for k in ("wredis", "wretr"))
    assert switched >= 1, (before, after)

    # Then the health checks see it: a goes down, and b takes everyone.
    assert farm.haproxy.command("enable health popguards/a").strip() == ""
    farm.haproxy.wait_servers("DOWN", ["a"])
    assert farm.haproxy.server("b")["status"] == "UP"
    fresh += [
        farm.whole_session(CLIENT_A if i % 2 == 0 else CLIENT_B, f"after-down-{i}")
        for i in range(4)
    ]

    # a's clients were cut off (HAProxy closes them when a's side goes away),
    # without a word from anyone.
    for session in held["a"]:
        assert session.client.wait_closed() == b"", session.client.address
    # Dovecot saw each of a's sessions drop without QUIT and applied no mark:
    # every message is still in the Maildir.
    for session in held["a"]:
        end = farm.dovecot.wait_session_end(session.user)
        assert "Disconnected: Connection closed" in end, end
        assert "del=0/3" in end, end
        assert farm.dovecot.stored(session.user) == [stored_form(m) for m in session.messages]
    # a's audit trail got as far as the marks, intact (the crash cut no record
    # in half), and claims no deletion.
    for session in held["a"]:
        names = [e["event"] for e in farm.a.session_events(session.id)]
        assert names.count("dele.marked") == 2, names
        assert not [n for n in names if n.startswith("deletions.")], names
    verified = audit_verify(farm.a.audit_path)
    assert verified.returncode == 0, verified.stdout + verified.stderr

    # b's sessions never noticed: they carry on, and their QUIT deletes.
    for session in held["b"]:
        assert session.client.command("NOOP").startswith(b"+OK")
        assert session.client.command("QUIT").startswith(b"+OK")
        assert session.client.wait_closed() == b""
    for session in held["b"]:
        end = farm.dovecot.wait_session_end(session.user)
        assert "Disconnected: Logged out" in end, end
        assert "del=2/3" in end, end
        assert farm.dovecot.stored(session.user) == [stored_form(session.messages[2])]
        farm.b.wait_session_event(session.id, "deletions.committed")

    # Every new session went through b, which recorded the real client, and
    # so did Dovecot.
    for client, user in fresh:
        assert farm.served_by(client) is farm.b
        farm.check_real_client(client, user, farm.b)

    # The killed sessions' mail is all there for the next session, through b.
    for session in held["a"]:
        client = farm.connect(CLIENT_B)
        client.login(session.user, farm.dovecot.passwords[session.user])
        listing = client.command("LIST", multiline=True)
        assert listing.count(b"\r\n") == 1 + len(session.messages), listing
        assert client.command("QUIT").startswith(b"+OK")
        assert farm.served_by(client) is farm.b
    assert farm.b.named("proxy_protocol.rejected") == []


def test_sigterm_drains_one_instance(farm: Farm) -> None:
    """SIGTERM a (a rolling restart): HAProxy moves new clients to b, a's session ends well.

    docs/deploy.md: popguard stops accepting at once and /readyz fails, so
    HAProxy sends new clients elsewhere while the open sessions get
    ``shutdown.grace_period`` seconds to finish.
    """
    held: dict[str, Session] = {}
    for index in range(6):
        if len(held) == 2:
            break
        session = farm.open_session(CLIENT_A if index % 2 == 0 else CLIENT_B, f"drain-{index}")
        if session.instance.name in held:
            assert session.client.command("QUIT").startswith(b"+OK")
        else:
            held[session.instance.name] = session
    assert sorted(held) == ["a", "b"], farm.explain()
    on_a = held["a"]
    assert on_a.client.command("DELE 1").startswith(b"+OK")

    assert farm.a.proc is not None
    farm.a.proc.send_signal(signal.SIGTERM)
    wait_until("a to start draining", lambda: farm.a.named("popguard.stopping"))
    # New clients get through at once (a refuses, HAProxy redispatches) ...
    fresh = [farm.whole_session(CLIENT_B, f"drain-new-{i}") for i in range(2)]
    # ... and a's health check fails on /readyz (503) while its session is open.
    farm.haproxy.wait_servers("DOWN", ["a"])
    assert farm.haproxy.server("a")["check_status"] == "L7STS", farm.haproxy.server("a")
    assert farm.a.proc.poll() is None  # still serving its session
    fresh += [farm.whole_session(CLIENT_A, f"drain-down-{i}") for i in range(2)]
    for client, user in fresh:
        assert farm.served_by(client) is farm.b
        farm.check_real_client(client, user, farm.b)

    # The drained session finishes normally, and its deletion is committed.
    assert b"Subject: drain-" in on_a.client.command("RETR 2", multiline=True)
    assert on_a.client.command("QUIT").startswith(b"+OK")
    assert on_a.client.wait_closed() == b""
    end = farm.dovecot.wait_session_end(on_a.user)
    assert "Disconnected: Logged out" in end, end
    assert "del=1/3" in end, end
    assert farm.dovecot.stored(on_a.user) == [stored_form(m) for m in on_a.messages[1:]]
    assert farm.a.proc.wait(LIMIT) == 0, farm.a.stderr()
    assert farm.a.wait_session_event(on_a.id, "deletions.committed")
    assert farm.a.named("popguard.stopped"), [e["event"] for e in farm.a.events()]
    # b never noticed.
    assert held["b"].client.command("QUIT").startswith(b"+OK")


# -- docs/deploy.md's HAProxy example --------------------------------------------


def documented_backend() -> list[str]:
    """The backend settings of docs/deploy.md's HAProxy example ("Deployment 2").

    Its ``server`` lines are left out (the farm adds its own, each with its
    instance's admin port for the check), and so is the shared ``port 9110``
    of ``default-server``, for the same reason.
    """
    text = (Path(__file__).parents[2] / "docs" / "deploy.md").read_text()
    section = text[text.index("## Deployment 2") :]
    block = section[section.index("```haproxy") :].split("```", 2)[1]
    backend = block[block.index("\nbackend ") :].splitlines()[2:]
    lines = []
    for raw in backend:
        line = raw.strip()
        if not line or line.startswith(("#", "server ", "mode ")):
            continue
        lines.append(re.sub(r"\s+port \d+", "", line))
    assert any(line.startswith("default-server") for line in lines), lines
    return lines


def test_documented_backend_moves_new_clients_off_a_stopped_instance(
    make_farm: Callable[..., Farm],
) -> None:
    """docs/deploy.md: "after SIGTERM it stops accepting at once and /readyz
    fails, so HAProxy sends new clients elsewhere".  With the documented
    backend that holds only once the health checks have seen it; this test
    looks at the seconds before (a's checks paused, so the window is the same
    on any machine).  One session is held open on b, so that ``balance
    leastconn`` picks a for every new client.
    """
    farm = make_farm(backend=documented_backend())
    assert "balance leastconn" in farm.haproxy.config()
    on_b: Session | None = None
    for index in range(6):
        session = farm.open_session(CLIENT_B, f"documented-held-{index}")
        if session.instance is farm.b:
            on_b = session
            break
        assert session.client.command("QUIT").startswith(b"+OK")
        session.instance.wait_session_event(session.id, "session.closed")
    assert on_b is not None, farm.explain()

    assert farm.haproxy.command("disable health popguards/a").strip() == ""
    assert farm.a.proc is not None
    farm.a.proc.send_signal(signal.SIGTERM)
    assert farm.a.proc.wait(LIMIT) == 0  # no sessions: it stops at once
    try:
        farm.whole_session(CLIENT_A, "documented-new")
    finally:
        assert on_b.client.command("QUIT").startswith(b"+OK")
