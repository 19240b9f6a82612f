"""A private Dovecot POP3 server on loopback, for tests and benchmarks.

This module is a test and benchmark tool.  The proxy never imports it.  It
starts a throw-away Dovecot (Debian's ``dovecot-core`` and ``dovecot-pop3d``)
whose configuration, sockets, state, log, users and mail all live under one
directory, listening on free loopback ports only::

    with DovecotInstance(tmp_path) as dovecot:
        dovecot.add_user("alice", "secret", [b"Subject: hi\\n\\nhello\\n"])
        pop = poplib.POP3(dovecot.host, dovecot.port)

The API is synchronous and uses the standard library only.

Notes on how the instance is set up:

* Passwords are stored with the ``{PLAIN}`` scheme, so USER/PASS, APOP,
  AUTH PLAIN, LOGIN and CRAM-MD5 all work.
* Each user gets a one-line passwd-file of its own (``users.d/<name>``).
  Dovecot re-reads a changed passwd-file at most once per second, so a user
  appended to one shared file may be refused for up to a second; a new
  file is read at its first lookup.
* Running as root, mail is owned by uid/gid 5000 and the mail process
  chroots into the mail directory (``home=<mail>/./<user>``), so the base
  directory may sit under a private (mode 0700) parent such as pytest's
  tmp dir.  The auth process runs as root for the same reason.  Not root,
  everything runs as the current user and nothing is chrooted.
* Messages are stored the way Dovecot stores them: LF line endings, in
  ``cur/`` with ``S=`` (size on disk) and ``W=`` (size on the wire, CRLF)
  in the file name.
* How Dovecot maps a login name to an account can be changed per instance
  (``username_format``, ``default_realm``, master users and
  ``master_user_separator``), to test a proxy's idea of "which account did
  this login open" against the real thing; :meth:`DovecotInstance.login_users`
  reads back which accounts Dovecot opened.
"""

from __future__ import annotations

import atexit
import contextlib
import grp
import itertools
import os
import pwd
import re
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = [
    "DEFAULT_MAIL_GID",
    "DEFAULT_MAIL_UID",
    "DovecotError",
    "DovecotInstance",
    "available",
    "find_dovecot",
    "stored_form",
    "wire_form",
]

DEFAULT_MAIL_UID = 5000
DEFAULT_MAIL_GID = 5000

_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}\Z")
# Dovecot's config parser and passwd-file "args" split on white space, and
# UNIX socket paths under base_dir must stay below 108 bytes.
_UNSAFE_PATH_RE = re.compile(r"[\s\"'#\\{}$%]")
# auth_username_format: Dovecot %-variables and name characters only.
_FORMAT_RE = re.compile(r"[A-Za-z0-9%{}._@:-]{1,64}\Z")
_REALM_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,62}[A-Za-z0-9])?\Z")
# One character, not white space, not special to Dovecot's config parser.
_SEPARATOR_RE = re.compile(r"[!*+/=^|~]\Z")
# "pop3-login: Info: Login: user=<alice>, method=PLAIN, rip=..., ..."
_LOGIN_LINE_RE = re.compile(rb"pop3-login: Info: Login: user=<([^>\n]*)>")
_MAX_BASE_DIR_LEN = 70
_LOG_TAIL_LINES = 30
_seq = itertools.count(1)


class DovecotError(RuntimeError):
    """Dovecot could not be started or did not behave."""


class _AddressInUse(DovecotError):
    """The picked port was taken before Dovecot could bind it; try again."""


def find_dovecot() -> str | None:
    """Path of the ``dovecot`` binary, also looking in sbin dirs off PATH."""
    found = shutil.which("dovecot")
    if found is not None:
        return found
    for directory in _SBIN_DIRS:
        candidate = Path(directory) / "dovecot"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _libexec_dirs(dovecot: str) -> list[Path]:
    prefix = Path(dovecot).resolve().parent.parent
    return [
        prefix / "lib" / "dovecot",
        prefix / "libexec" / "dovecot",
        Path("/usr/lib/dovecot"),
        Path("/usr/libexec/dovecot"),
    ]


def available() -> str | None:
    """Return None when a private Dovecot POP3 server can run here, else why not."""
    dovecot = find_dovecot()
    if dovecot is None:
        return "dovecot binary not found (install dovecot-core and dovecot-pop3d)"
    try:
        proc = subprocess.run([dovecot, "--version"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot run {dovecot} --version: {exc}"
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()
        return f"{dovecot} --version exited with {proc.returncode}: {err}"
    if not any(
        (d / "pop3").is_file() and (d / "pop3-login").is_file() for d in _libexec_dirs(dovecot)
    ):
        return "Dovecot's POP3 server is not installed (dovecot-pop3d)"
    if os.geteuid() != 0:
        try:
            pwd.getpwuid(os.getuid())
            grp.getgrgid(os.getgid())
        except KeyError:
            return (
                f"uid {os.getuid()} / gid {os.getgid()} have no passwd/group entry; "
                "a non-root Dovecot runs as a named user"
            )
    return None


def stored_form(message: bytes) -> bytes:
    """The bytes Dovecot keeps on disk for ``message``: CRLF turned into LF."""
    return message.replace(b"\r\n", b"\n")


def wire_form(message: bytes) -> bytes:
    """``message`` as a POP3 client sees it after un-stuffing: every line ends in CRLF."""
    return re.sub(rb"(?<!\r)\n", b"\r\n", stored_form(message))


def _wire_size(stored: bytes) -> int:
    return len(stored) + stored.count(b"\n") - stored.count(b"\r\n")


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_is_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


class DovecotInstance:
    """One private Dovecot POP3 server, everything under ``base_dir``.

    ``start()`` (or ``with``) writes the config and starts ``dovecot -F``;
    ``stop()`` ends it and may be called any number of times.  Users can be
    added before or after start.

    ``tls=True`` generates a self-signed certificate with ``openssl req``,
    turns STLS on for the plain port and opens an implicit-TLS (pop3s)
    port as ``tls_port``.  ``ipv6=True`` also listens on ``::1`` (same
    ports).  ``extra_config`` is appended to dovecot.conf verbatim.

    ``auth_delays=False`` (the default) turns off Dovecot's brakes on failed
    logins: ``auth_failure_delay`` (2 s per failure) and the per-IP auth
    penalty, which otherwise delays the *next* login from 127.0.0.1, even a
    correct one, by seconds, leaking time from one test into the next.  A
    failed login then still takes about 0.5 s.

    How a login name becomes an account (all default to Dovecot's defaults,
    and the default instance's config does not mention them):

    * ``username_format``: ``auth_username_format``, e.g. ``%Lu`` (Dovecot's
      default: lower case), ``%u`` (exact), ``%Ln`` (lower case, domain
      dropped).  The passdb and the mail home use the formatted name, so a
      user added as ``add_user("alice", ...)`` is the account ``alice``.
    * ``default_realm``: ``auth_default_realm``, appended as ``@realm`` to
      a name without ``@`` (add users as ``alice@realm`` then).
    * ``master_users``: name -> password of master users, in a second
      passdb (``master = yes``, ``pass = yes``: the master password opens
      any account that exists in the normal passdb) with a users file of
      its own (``masters``); :meth:`add_master_user` adds more.  A master
      user logs in to an account with SASL PLAIN's authorization identity,
      or, with ``master_user_separator`` (``auth_master_user_separator``,
      one character such as ``*``), as ``account*master`` by USER/PASS,
      PLAIN or LOGIN.  Dovecot 2.3 refuses master logins by APOP and
      CRAM-MD5 (``-ERR [AUTH] Authorization failed``).
    """

    host = "127.0.0.1"
    host6 = "::1"

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        *,
        tls: bool = False,
        ipv6: bool = False,
        startup_timeout: float = 20.0,
        login_processes: int | None = None,
        debug: bool = False,
        auth_delays: bool = False,
        extra_config: str = "",
        username_format: str | None = None,
        default_realm: str | None = None,
        master_users: Mapping[str, str] | None = None,
        master_user_separator: str | None = None,
    ) -> None:
        self.base_dir = Path(base_dir).resolve()
        if _UNSAFE_PATH_RE.search(str(self.base_dir)):
            raise ValueError(
                "base_dir must not contain white space, quotes or any of #\\{}$%: "
                f"{self.base_dir}"
            )
        self.tls = tls
        self.ipv6 = ipv6
        self.startup_timeout = startup_timeout
        self.login_processes = login_processes or max(1, min(4, os.cpu_count() or 1))
        self.debug = debug
        self.auth_delays = auth_delays
        self.extra_config = extra_config
        if username_format is not None and not _FORMAT_RE.match(username_format):
            raise ValueError(f"username_format {username_format!r} must match {_FORMAT_RE.pattern}")
        if default_realm is not None and not _REALM_RE.match(default_realm):
            raise ValueError(f"default_realm {default_realm!r} must be a domain name")
        if master_user_separator is not None and not _SEPARATOR_RE.match(master_user_separator):
            raise ValueError(
                f"master_user_separator {master_user_separator!r} must be one of !*+/=^|~"
            )
        self.username_format = username_format
        self.default_realm = default_realm
        self.master_user_separator = master_user_separator
        self.master_users: dict[str, str] = {}
        for name, password in (master_users or {}).items():
            self._check_user(name, password)
            self.master_users[name] = password
        self.instance_name = f"popguard-{os.getpid()}-{secrets.token_hex(4)}"
        self.as_root = os.geteuid() == 0
        if self.as_root:
            self.mail_uid, self.mail_gid = DEFAULT_MAIL_UID, DEFAULT_MAIL_GID
        else:
            self.mail_uid, self.mail_gid = os.getuid(), os.getgid()
        self.conf_path = self.base_dir / "dovecot.conf"
        self.log_path = self.base_dir / "dovecot.log"
        self.stderr_path = self.base_dir / "dovecot.stderr"
        self.state_dir = self.base_dir / "state"
        self.users_dir = self.base_dir / "users.d"
        self.masters_path = self.base_dir / "masters"
        self.mail_dir = self.base_dir / "mail"
        self.cert_path: Path | None = None
        self.key_path: Path | None = None
        self.port = 0
        self.tls_port: int | None = None
        self.greeting = ""
        self.startup_seconds = 0.0
        self._run_dir: Path | None = None
        self._own_run_dir = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    def __repr__(self) -> str:
        state = f"running on {self.host}:{self.port}" if self.running else "stopped"
        return f"<DovecotInstance {self.instance_name} {state} in {self.base_dir}>"

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """Pid of the Dovecot master process, while started."""
        return None if self._proc is None else self._proc.pid

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def run_dir(self) -> Path:
        """Dovecot's ``base_dir`` (sockets, master.pid)."""
        if self._run_dir is None:
            raise DovecotError("the instance has not been started")
        return self._run_dir

    def start(self) -> Self:
        """Write dovecot.conf, start Dovecot and wait for a ``+OK`` greeting."""
        if self._proc is not None:
            raise DovecotError("this Dovecot instance is already started")
        reason = available()
        if reason is not None:
            raise DovecotError(reason)
        dovecot = find_dovecot()
        assert dovecot is not None
        began = time.monotonic()
        self._prepare_dirs()
        if self.tls and self.cert_path is None:
            self._make_certificate()
        if self.master_users:
            self._write_masters()
        self._run_dir = self._pick_run_dir()
        for attempt in range(5):
            self._pick_ports()
            self.conf_path.write_text(self._config_text())
            self._spawn(dovecot)
            try:
                self._wait_ready(began + self.startup_timeout)
            except _AddressInUse:
                self._terminate()
                if attempt == 4:
                    raise
                continue
            except BaseException:
                self.stop()
                raise
            break
        atexit.register(self.stop)
        self.startup_seconds = time.monotonic() - began
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop Dovecot: SIGTERM, wait, then SIGKILL.  Safe to call repeatedly."""
        atexit.unregister(self.stop)
        self._terminate(timeout)
        if self._own_run_dir and self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)
            self._run_dir = None
            self._own_run_dir = False

    def _terminate(self, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # -- logs ----------------------------------------------------------------

    def log_text(self) -> str:
        """Everything Dovecot logged so far (empty if nothing yet)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_position(self) -> int:
        """How many bytes Dovecot has logged so far: a mark for ``since=``."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_bytes(self, since: int = 0) -> bytes:
        """What Dovecot logged from byte offset ``since`` on (see :meth:`log_position`)."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(since)
                return f.read()
        except FileNotFoundError:
            return b""

    def login_users(self, since: int = 0) -> list[str]:
        """The accounts Dovecot opened, in order: ``user=<...>`` of its login lines.

        A login line is ``pop3-login: Info: Login: user=<alice>, method=PLAIN,
        rip=..., lip=..., mpid=..., session=<...>``; its ``user`` is the
        account after Dovecot's own mapping (lower case, realm, master user
        split off; the line of a master login names the account only, not
        the master).  ``since``: only lines logged after that byte offset.
        """
        log = self.log_bytes(since)
        return [m.decode("utf-8", "backslashreplace") for m in _LOGIN_LINE_RE.findall(log)]

    def _log_tail(self) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(self._log_offset)
                log = f.read().decode(errors="replace")
        except FileNotFoundError:
            log = ""
        try:
            err = self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            err = ""
        lines = (log + err).splitlines()[-_LOG_TAIL_LINES:]
        if not lines:
            return "(Dovecot logged nothing)"
        return "\n".join(lines)

    # -- users and mail ----------------------------------------------------

    def maildir(self, name: str) -> Path:
        """The Maildir of user ``name``."""
        self._check_name(name)
        return self.mail_dir / name

    def add_user(
        self,
        name: str,
        password: str,
        messages: Iterable[bytes] = (),
        *,
        verbatim: bool = False,
    ) -> Path:
        """Create user ``name`` with a fresh Maildir holding ``messages``; return the Maildir.

        Messages may use CRLF or LF line endings; they are stored with LF,
        in order, so message N in POP3 is ``messages[N-1]``.

        ``verbatim=True`` stores each message byte for byte as given (CRLF,
        bare CR, no final newline: whatever a real Maildir may hold), and
        leaves ``W=`` out of the file name so that Dovecot computes the
        wire size itself.
        """
        self._check_user(name, password)
        self._prepare_dirs()
        user_file = self.users_dir / name
        maildir = self.maildir(name)
        if user_file.exists() or maildir.exists():
            raise ValueError(f"user {name!r} already exists")
        maildir.mkdir(mode=0o700)
        self._chown(maildir)
        for sub in ("tmp", "new", "cur"):
            (maildir / sub).mkdir(mode=0o700)
            self._chown(maildir / sub)
        stamp = int(time.time())
        batch = next(_seq)
        for index, message in enumerate(messages):
            data = message if verbatim else stored_form(message)
            unique = f"{stamp}.M{index:06d}P{os.getpid()}Q{batch}.popguard"
            tmp = maildir / "tmp" / unique
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            self._chown(tmp)
            sizes = f"S={len(data)}" if verbatim else f"S={len(data)},W={_wire_size(data)}"
            final = f"{unique},{sizes}:2,"
            tmp.rename(maildir / "cur" / final)
        # The passdb entry comes last: once it exists, the user can log in.
        tmp_user = self.users_dir / f".{name}.{batch}.tmp"
        tmp_user.write_text(f"{name}:{{PLAIN}}{password}::::::\n")
        tmp_user.chmod(0o600)
        tmp_user.replace(user_file)
        return maildir

    def maildir_messages(self, name: str) -> list[bytes]:
        """The messages now in ``name``'s Maildir (cur and new), sorted by file name.

        The bytes are as stored on disk, i.e. with LF line endings (compare
        with ``stored_form(original)``).
        """
        maildir = self.maildir(name)
        for _ in range(20):
            files = sorted(
                (p for sub in ("cur", "new") for p in (maildir / sub).iterdir()),
                key=lambda p: p.name,
            )
            try:
                return [p.read_bytes() for p in files]
            except FileNotFoundError:
                # Dovecot renamed a file (new flags) between listing and reading.
                time.sleep(0.01)
        raise DovecotError(f"{maildir} keeps changing under us")

    def add_master_user(self, name: str, password: str) -> None:
        """Add a master user (see the class doc); the instance needs ``master_users``.

        Dovecot re-reads the file at most once per second: a master user
        added while it runs may be refused for up to a second.
        """
        self._check_user(name, password)
        if not self.master_users:
            raise DovecotError("the instance was started without master_users")
        if name in self.master_users:
            raise ValueError(f"master user {name!r} already exists")
        self.master_users[name] = password
        self._write_masters()

    def _write_masters(self) -> None:
        self._prepare_dirs()
        temporary = self.base_dir / ".masters.tmp"
        temporary.write_text(
            "".join(f"{name}:{{PLAIN}}{pw}::::::\n" for name, pw in self.master_users.items())
        )
        temporary.chmod(0o600)
        temporary.replace(self.masters_path)

    @classmethod
    def _check_user(cls, name: str, password: str) -> None:
        cls._check_name(name)
        if not password or re.search(r"[:\x00-\x1f\x7f]", password):
            raise ValueError("password must be non-empty without ':' or control characters")

    @staticmethod
    def _check_name(name: str) -> None:
        if not _NAME_RE.match(name):
            raise ValueError(f"user name {name!r} must match {_NAME_RE.pattern}")

    def _chown(self, path: Path) -> None:
        if self.as_root:
            os.chown(path, self.mail_uid, self.mail_gid)

    # -- set-up helpers ----------------------------------------------------

    def _prepare_dirs(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        for d in (self.state_dir, self.users_dir, self.mail_dir):
            d.mkdir(mode=0o755, exist_ok=True)

    def _pick_run_dir(self) -> Path:
        run = self.base_dir / "run"
        if len(str(run)) <= _MAX_BASE_DIR_LEN:
            run.mkdir(mode=0o755, exist_ok=True)
            self._own_run_dir = False
            return run
        # Socket paths would be too long: use a short directory in /tmp.
        self._own_run_dir = True
        run = Path(tempfile.mkdtemp(prefix="pgdv-", dir="/tmp"))
        run.chmod(0o755)  # Dovecot wants its base_dir world-readable
        return run

    def _pick_ports(self) -> None:
        hosts = [self.host, self.host6] if self.ipv6 else [self.host]
        ports: list[int] = []
        while len(ports) < (2 if self.tls else 1):
            port = _free_port(self.host)
            if port not in ports and all(_port_is_free(h, port) for h in hosts[1:]):
                ports.append(port)
        self.port = ports[0]
        self.tls_port = ports[1] if self.tls else None

    def _make_certificate(self) -> None:
        openssl = shutil.which("openssl")
        if openssl is None:
            raise DovecotError("tls=True needs the openssl command")
        tls_dir = self.base_dir / "tls"
        tls_dir.mkdir(mode=0o700, exist_ok=True)
        cert, key = tls_dir / "cert.pem", tls_dir / "key.pem"
        cmd = [
            openssl,
            "req",
            "-x509",
            "-batch",
            "-nodes",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-days",
            "30",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ]
        proc = subprocess.run(cmd, capture_output=True, timeout=30, check=False)
        if proc.returncode != 0:
            raise DovecotError(
                "openssl req failed: " + proc.stderr.decode(errors="replace").strip()
            )
        key.chmod(0o600)
        self.cert_path, self.key_path = cert, key

    def _config_text(self) -> str:
        addresses = f"{self.host}, {self.host6}" if self.ipv6 else self.host
        mail = self.mail_dir
        lines = [
            "# Written by popguard.testing.dovecot: a private test/bench instance.",
            f"instance_name = {self.instance_name}",
            f"base_dir = {self.run_dir}",
            f"state_dir = {self.state_dir}",
            f"log_path = {self.log_path}",
            "protocols = pop3",
            f"listen = {addresses}",
            "shutdown_clients = yes",
            "disable_plaintext_auth = no",
            "auth_mechanisms = plain login apop cram-md5",
            "mail_location = maildir:~",
            "mail_fsync = never",
            f"first_valid_uid = {min(self.mail_uid, 500)}",
            "first_valid_gid = 0",
            "default_process_limit = 2000",
            "default_client_limit = 4000",
        ]
        if self.as_root:
            home = f"{mail}/./%u"  # "/./": chroot into the mail dir, then cd to %u
            lines.append(f"valid_chroot_dirs = {mail}")
        else:
            home = f"{mail}/%u"
            user = pwd.getpwuid(os.getuid()).pw_name
            group = grp.getgrgid(os.getgid()).gr_name
            lines += [
                f"default_internal_user = {user}",
                f"default_internal_group = {group}",
                f"default_login_user = {user}",
            ]
        if self.tls:
            lines += [
                "ssl = yes",
                f"ssl_cert = <{self.cert_path}",
                f"ssl_key = <{self.key_path}",
            ]
        else:
            lines.append("ssl = no")
        if self.debug:
            lines += ["auth_verbose = yes", "auth_debug = yes", "mail_debug = yes"]
        if not self.auth_delays:
            lines.append("auth_failure_delay = 0")
        if self.username_format is not None:
            lines.append(f"auth_username_format = {self.username_format}")
        if self.default_realm is not None:
            lines.append(f"auth_default_realm = {self.default_realm}")
        if self.master_user_separator is not None:
            lines.append(f"auth_master_user_separator = {self.master_user_separator}")
        if self.master_users:
            lines += [
                "passdb {",
                "  driver = passwd-file",
                f"  args = scheme=PLAIN username_format=%u {self.masters_path}",
                "  master = yes",
                "  pass = yes",
                "}",
            ]
        lines += [
            "passdb {",
            "  driver = passwd-file",
            f"  args = scheme=PLAIN username_format=%u {self.users_dir}/%u",
            "}",
            "userdb {",
            "  driver = static",
            f"  args = uid={self.mail_uid} gid={self.mail_gid} home={home}",
            "}",
            "service pop3-login {",
            "  inet_listener pop3 {",
            f"    address = {addresses}",
            f"    port = {self.port}",
            "  }",
        ]
        if self.tls_port is not None:
            lines += [
                "  inet_listener pop3s {",
                f"    address = {addresses}",
                f"    port = {self.tls_port}",
                "    ssl = yes",
                "  }",
            ]
        lines += [
            "  service_count = 0",
            f"  process_min_avail = {self.login_processes}",
            "  client_limit = 4000",
        ]
        if not self.as_root:
            lines.append("  chroot =")
        lines += [
            "}",
            "service pop3 {",
            "  process_limit = 2000",
            "}",
            "protocol pop3 {",
            "  mail_max_userip_connections = 2000",
            "}",
        ]
        if self.as_root:
            # The auth process reads users.d/, which may sit under a private dir.
            lines += ["service auth {", "  user = root", "}"]
        lines.append("service anvil {")
        if not self.as_root:
            lines.append("  chroot =")
        if not self.auth_delays:
            # Without this socket the auth process keeps no per-IP penalty.
            lines += ["  unix_listener anvil-auth-penalty {", "    mode = 0", "  }"]
        lines.append("}")
        if self.extra_config:
            lines.append(self.extra_config)
        return "\n".join(lines) + "\n"

    def _spawn(self, dovecot: str) -> None:
        argv = [dovecot, "-F", "-c", str(self.conf_path)]
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = 16384 if hard == resource.RLIM_INFINITY else min(hard, 16384)
        if soft < want:
            argv = ["/bin/sh", "-c", f'ulimit -S -n {want} 2>/dev/null; exec "$@"', "sh", *argv]
        try:
            self._log_offset = self.log_path.stat().st_size
        except FileNotFoundError:
            self._log_offset = 0
        with self.stderr_path.open("wb") as err:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT
            )

    def _wait_ready(self, deadline: float) -> None:
        proc = self._proc
        assert proc is not None
        while True:
            rc = proc.poll()
            if rc is not None:
                tail = self._log_tail()
                if "Address already in use" in tail:
                    raise _AddressInUse(tail)
                raise DovecotError(f"dovecot exited with status {rc} while starting:\n{tail}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DovecotError(
                    f"Dovecot gave no +OK greeting on {self.host}:{self.port} within "
                    f"{self.startup_timeout:g} s; log tail:\n{self._log_tail()}"
                )
            line = self._probe(min(remaining, 2.0))
            if line.startswith(b"+OK"):
                self.greeting = line.decode(errors="replace").rstrip("\r\n")
                return
            if line:
                raise DovecotError(f"unexpected greeting from Dovecot: {line!r}")
            time.sleep(0.02)

    def _probe(self, timeout: float) -> bytes:
        """Connect to the POP3 port and return the greeting line (b"" if none yet)."""
        try:
            with socket.create_connection(self.address, timeout=timeout) as sock:
                line = _read_line(sock)
                if line.startswith(b"+OK"):
                    with contextlib.suppress(OSError):
                        sock.sendall(b"QUIT\r\n")
                        _read_line(sock)
                return line
        except OSError:
            return b""


def _read_line(sock: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\n") and len(buf) < 4096:
        chunk = sock.recv(4096)
        if not chunk:
            break
        buf += chunk
    return buf
