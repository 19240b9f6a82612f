"""popguard's configuration: a YAML file, validated with file:line:column errors.

The file is never handed to ``yaml.safe_load``.  It is *composed* with
PyYAML's ``SafeLoader`` (``yaml.compose``), which gives a tree of nodes that
still carry their ``start_mark``, and the tree is walked against the schema
by hand.  That way every problem is reported where it is, e.g.::

    popguard.yaml:7:17: error: session.idle_timeout: expected a number of seconds,
    got a string '600'; write numbers without quotes

and *all* problems are collected before :class:`ConfigError` is raised.
``popguard.example.yaml`` (repo root) documents every key and its default.

Loading in two steps
--------------------
A file may leave out ``listeners`` and ``upstream`` when the command line
supplies them (``--listen``, ``--upstream``), so the loader works in two steps:

* :func:`read_config` validates a file into a :class:`PartialConfig`, in
  which ``listeners`` may be empty and ``upstream_address`` may be ``None``.
* :func:`build_config` applies command-line flags over a base (a
  :class:`PartialConfig`, a :class:`Config` or nothing) and returns the
  finished :class:`Config`; it raises when still no listener or no upstream
  results.

:func:`load_config` is the one-step form for a file that is complete on its
own: ``read_config`` plus the requirement that the file configures a
listener and an upstream.  The command line therefore does::

    partial, warnings = read_config(path)          # or base=None without a file
    config, more = build_config(base=partial, listen=..., upstream=...)

Conventions
-----------
* Line and column numbers in :class:`ConfigIssue` are 1-based.  Line 0 means
  the issue has no position (a missing file, something missing from the whole
  file, or a command-line flag, whose issues use the file name
  ``"<command line>"``).
* Relative paths in the file (``audit.file``, ``audit.hmac_key_file``,
  ``policies``, a listener's ``cert``/``key`` and its ``sni`` pairs,
  ``upstream.ca_file``) are resolved against the directory of the config
  file; relative path flags (``audit_file``, ``tls_cert``, ``tls_key``,
  ``upstream_ca_file``) are resolved against the current directory.  All
  come out absolute, with ``~`` expanded.
* A section left empty (``session:`` with every key commented out) means
  all its defaults.  Unknown keys, duplicate keys, YAML merge keys (``<<``)
  and values of the wrong YAML type are errors; YAML 1.1 booleans
  (``true``/``false``/``yes``/``no``/``on``/``off``) are accepted for, and
  only for, boolean keys.
* Messages about command-line values name the flags popguard's CLI is
  expected to use: ``--listen``, ``--upstream``, ``--audit-file``,
  ``--idle-timeout``, ``--login-timeout``, ``--connect-timeout``,
  ``--greeting-timeout``, ``--tls``, ``--tls-cert``,
  ``--tls-key``, ``--upstream-tls``, ``--upstream-ca-file``,
  ``--upstream-server-name``, ``--upstream-tls-insecure``.
* Listeners without a ``name`` are called ``listener-<index>`` and listeners
  from ``--listen`` are called ``cli-<index>``; indexes are 0-based, like the
  ``listeners[0]`` paths in error messages.

TLS
---
TLS settings come out as the dataclasses of :mod:`popguard.shell.tls`
(:class:`~popguard.shell.tls.ListenerTLS` on each listener,
:class:`~popguard.shell.tls.UpstreamTLS` on the upstream); that module
imports only ``ssl``, never trio.  Certificate and key files are read and
loaded into a throwaway ``ssl.SSLContext`` at load time, so a missing file,
a non-PEM file, an encrypted key or a key that does not match its
certificate is reported at its line rather than at the first handshake.
Toward clients TLS 1.0 and 1.1 are refused (RFC 8996); toward the upstream
they, and ``tls_verify: false``, are accepted with a warning.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import re
import ssl
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Final, Literal, cast

import yaml
from yaml.constructor import SafeConstructor
from yaml.error import Mark
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.reader import ReaderError

from popguard import yamlnodes
from popguard.core.identity import DEFAULT_IDENTITY, IdentityRules
from popguard.core.limits import Limits
from popguard.shell.tls import (
    VERSIONS,
    CertKey,
    ListenerTLS,
    ListenerTLSMode,
    TLSVersionName,
    UpstreamTLS,
)
from popguard.sinks.syslog import (
    DEFAULT_MAX_MESSAGE,
    DEFAULT_SD_ID,
    FACILITIES,
    MAX_UDP_MESSAGE,
    MIN_MESSAGE,
    valid_sd_id,
)
from popguard.trail.chain import ChainError, load_key

__all__ = [
    "COMMAND_LINE",
    "LIMIT_MINIMUMS",
    "MAX_WORKERS",
    "RFC1939_MIN_IDLE_TIMEOUT",
    "Address",
    "AuditConfig",
    "Config",
    "ConfigError",
    "ConfigIssue",
    "ListenerConfig",
    "PartialConfig",
    "SessionConfig",
    "SyslogTarget",
    "UpstreamConfig",
    "Workers",
    "build_config",
    "load_config",
    "parse_address",
    "parse_listen_address",
    "read_config",
]

#: The pseudo file name of issues raised by command-line flags.
COMMAND_LINE: Final = "<command line>"

#: RFC 1939 §3: a POP3 server's autologout timer MUST be at least 10 minutes.
RFC1939_MIN_IDLE_TIMEOUT: Final = 600.0

_DEFAULT_CONNECT_TIMEOUT: Final = 10.0
#: From the upstream's TCP connection to its greeting.  A server that does a
#: slow reverse-DNS or ident lookup before greeting still fits in 30 s.
_DEFAULT_GREETING_TIMEOUT: Final = 30.0
_DEFAULT_SHUTDOWN_GRACE: Final = 10.0
#: ``workers:`` is a count of processes, or ``"auto"`` (one per CPU).
Workers = int | Literal["auto"]
MAX_WORKERS: Final = 256

#: The smallest value each ``limits:`` key accepts, and why.  Keys of
#: :class:`~popguard.core.limits.Limits` missing here must be at least 1.
LIMIT_MINIMUMS: Final[Mapping[str, tuple[int, str]]] = {
    "max_command_line": (
        255,
        "RFC 2449 §4 requires servers to accept command lines of 255 octets",
    ),
    "max_server_status_line": (
        512,
        "RFC 2449 §4 allows the first line of a response to be 512 octets",
    ),
    "max_sasl_line": (
        512,
        "a SASL line must hold at least a 512-octet response line (RFC 2449 §4)",
    ),
    "max_listing_line": (
        512,
        "RFC 1939 §3 allows response lines of 512 octets",
    ),
    "max_bad_commands": (1, "a client must be allowed at least one bad command"),
    "max_pipelined": (1, "at least one command must be allowed in flight"),
}


# --------------------------------------------------------------------------
# The configuration as data
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Address:
    """A TCP endpoint.  ``host`` holds IPv6 literals without brackets."""

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    name: str
    address: Address
    #: TLS toward this listener's clients (mode ``none``: plain POP3).
    tls: ListenerTLS = field(default_factory=ListenerTLS)
    #: Accept HAProxy's PROXY header (v1/v2) from these peers, or None.
    proxy_protocol: ProxyProtocolConfig | None = None
    #: Send a PROXY header (``v1``/``v2``) to the upstream for this
    #: listener's sessions, so the server sees the real client.
    send_proxy: Literal["none", "v1", "v2"] = "none"


@dataclass(frozen=True, slots=True)
class ProxyProtocolConfig:
    """Who may put a PROXY header in front of a session, and whether they must."""

    trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    #: A trusted peer that sends no header is refused (else served as itself).
    required: bool = True
    #: Seconds to wait for the header (the spec says at least 3).
    timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    address: Address
    connect_timeout: float = _DEFAULT_CONNECT_TIMEOUT
    #: Seconds from the TCP connection to the upstream's greeting.
    greeting_timeout: float = _DEFAULT_GREETING_TIMEOUT
    #: TLS toward the upstream (mode ``none``: plain POP3).
    tls: UpstreamTLS = field(default_factory=UpstreamTLS)


@dataclass(frozen=True, slots=True)
class SessionConfig:
    #: Seconds a session may stay silent before it is closed.
    idle_timeout: float = 600.0
    #: Send ``-ERR Disconnected for inactivity.`` before closing an idle
    #: session (Dovecot's behaviour); ``False`` closes silently (RFC 1939 §3).
    idle_notice: bool = True
    #: Seconds from the client's connection to a successful login; 0: no limit.
    login_timeout: float = 60.0


FsyncPolicy = Literal["always", "interval", "never"]
OnFailure = Literal["fail-open", "fail-closed"]
SyslogTransport = Literal["udp", "tcp"]

_FSYNC_POLICIES: Final[tuple[FsyncPolicy, ...]] = ("always", "interval", "never")
_ON_FAILURE: Final[tuple[OnFailure, ...]] = ("fail-open", "fail-closed")
_TRANSPORTS: Final[tuple[SyslogTransport, ...]] = ("udp", "tcp")
#: The largest ``max_message`` accepted for TCP targets.
_MAX_TCP_MESSAGE: Final = 1 << 20


@dataclass(frozen=True, slots=True)
class SyslogTarget:
    """One RFC 5424 syslog receiver (``audit.syslog`` list item)."""

    address: Address
    transport: SyslogTransport = "udp"
    #: An RFC 5424 facility name (``auth``, ``local0``, ...).
    facility: str = "auth"
    #: Longest message in octets; 0 becomes the transport's default
    #: (2048 for UDP, RFC 5426; 8192 for TCP, RFC 5425).
    max_message: int = 0
    #: The SD-ID of the structured-data element holding the record's fields.
    sd_id: str = DEFAULT_SD_ID

    def __post_init__(self) -> None:
        if not self.max_message:
            object.__setattr__(self, "max_message", DEFAULT_MAX_MESSAGE[self.transport])


@dataclass(frozen=True, slots=True)
class AuditConfig:
    #: Absolute path of the JSON-lines audit file, or ``None`` for none.
    file: str | None = None
    #: Human-readable events on stderr.
    console: bool = True
    #: JSON lines on standard output too.
    stdout: bool = False
    #: When the audit file is fsynced: after every record, at most
    #: ``fsync_interval_ms`` after a record, or when the kernel likes.
    fsync: FsyncPolicy = "interval"
    fsync_interval_ms: int = 200
    #: Records each sink may hold while its writer is behind (or retrying).
    queue_size: int = 10000
    #: ``fail-closed``: refuse new sessions while the audit file is unhealthy.
    on_failure: OnFailure = "fail-open"
    #: Absolute path of the HMAC key for an authenticated hash chain.
    hmac_key_file: str | None = None
    #: How long ``emit_durable`` waits for a record to be fsynced.
    durable_timeout_ms: int = 5000
    syslog: tuple[SyslogTarget, ...] = ()
    #: Look up each message's UIDL and size upstream (two extra one-line
    #: commands, once per message), so records name messages durably.
    message_identity: bool = True


@dataclass(frozen=True, slots=True)
class Config:
    """A complete configuration: at least one listener and an upstream."""

    listeners: tuple[ListenerConfig, ...]
    upstream: UpstreamConfig
    session: SessionConfig = SessionConfig()
    limits: Limits = field(default_factory=Limits)
    #: Seconds open sessions get on SIGTERM/SIGINT before they are closed.
    shutdown_grace: float = _DEFAULT_SHUTDOWN_GRACE
    audit: AuditConfig = AuditConfig()
    #: Absolute path of the policy directory (see docs/policies.md).
    policies: str | None = None
    #: Where /metrics, /healthz and /readyz are served (None: nowhere).
    admin_listen: Address | None = None
    #: Worker processes (``"auto"``: one per CPU); 1 runs a single process.
    workers: Workers = 1
    #: How the upstream maps login names to accounts (docs/identity.md).
    identity: IdentityRules = DEFAULT_IDENTITY


@dataclass(frozen=True, slots=True)
class PartialConfig:
    """What a config file says; listeners and upstream may still be missing.

    :func:`build_config` turns it into a :class:`Config`.
    """

    listeners: tuple[ListenerConfig, ...] = ()
    upstream_address: Address | None = None
    connect_timeout: float = _DEFAULT_CONNECT_TIMEOUT
    greeting_timeout: float = _DEFAULT_GREETING_TIMEOUT
    upstream_tls: UpstreamTLS = field(default_factory=UpstreamTLS)
    session: SessionConfig = SessionConfig()
    limits: Limits = field(default_factory=Limits)
    shutdown_grace: float = _DEFAULT_SHUTDOWN_GRACE
    audit: AuditConfig = AuditConfig()
    policies: str | None = None
    #: Where /metrics, /healthz and /readyz are served (None: nowhere).
    admin_listen: Address | None = None
    workers: Workers = 1
    identity: IdentityRules = DEFAULT_IDENTITY
    #: The file it was read from, as given to :func:`read_config`.
    source: str | None = None


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One error or warning, located in a file (1-based; line 0 = no position)."""

    file: str
    line: int
    column: int
    message: str
    severity: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        if self.line > 0:
            return f"{self.file}:{self.line}:{self.column}: {self.severity}: {self.message}"
        return f"{self.file}: {self.severity}: {self.message}"


class ConfigError(Exception):
    """The configuration is invalid.

    ``issues`` holds every error found (and any warnings found alongside
    them), in file order; ``str()`` lists them one per line.
    """

    issues: tuple[ConfigIssue, ...]

    def __init__(self, issues: Iterable[ConfigIssue]) -> None:
        self.issues = tuple(issues)
        super().__init__("\n".join(str(issue) for issue in self.issues))

    @property
    def errors(self) -> tuple[ConfigIssue, ...]:
        return tuple(issue for issue in self.issues if issue.severity == "error")

    def __str__(self) -> str:
        return "\n".join(str(issue) for issue in self.issues)


# --------------------------------------------------------------------------
# Addresses
# --------------------------------------------------------------------------

_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)\Z")


def _check_host_name(host: str) -> str | None:
    """Return why *host* is not a valid IPv4 literal or DNS name, or None."""
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        pass
    else:
        return None
    name = host[:-1] if host.endswith(".") else host
    if not name or len(name) > 253:
        return f"invalid host name {host!r}"
    labels = name.split(".")
    if not all(_LABEL.match(label) for label in labels):
        return f"invalid host name {host!r}"
    if labels[-1].isdigit():
        # RFC 3696 §2: a top-level domain is never all-numeric, so this was
        # meant as an IPv4 address.
        return f"invalid IPv4 address {host!r}"
    return None


def parse_address(text: str) -> Address:
    """Parse ``host:port``; IPv6 literals go in brackets: ``[::1]:110``.

    The host may be an IPv4 literal, a bracketed IPv6 literal or a DNS name.
    Raises :class:`ValueError` with a message that quotes *text*.
    """
    what = f"invalid address {text!r}"
    if not text:
        raise ValueError("empty address: expected HOST:PORT, e.g. 127.0.0.1:110")
    if text != text.strip():
        raise ValueError(f"{what}: leading or trailing whitespace")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{what}: missing ']' after the IPv6 address")
        host, rest = text[1:end], text[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(
                f"{what}: {host!r} is not an IPv6 address (brackets are only for IPv6)"
            ) from None
        if not rest.startswith(":"):
            raise ValueError(f"{what}: missing port after ']' (expected [IPV6]:PORT)")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"{what}: missing port (expected HOST:PORT)")
        if ":" in host:
            raise ValueError(f"{what}: IPv6 addresses must be written in brackets, e.g. [::1]:110")
        if not host:
            raise ValueError(f"{what}: missing host (expected HOST:PORT)")
        problem = _check_host_name(host)
        if problem is not None:
            raise ValueError(f"{what}: {problem}")
    if not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"{what}: the port must be a number from 1 to 65535")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"{what}: port {port} is out of range 1-65535")
    return Address(host, port)


def parse_listen_address(text: str) -> Address:
    """Like :func:`parse_address`, but the host must be an IP literal or localhost.

    A listener binds, so a DNS name (which may resolve to anything) is refused.
    """
    if text.startswith("*:"):
        raise ValueError(
            f"invalid listen address {text!r}: use 0.0.0.0 (all IPv4 addresses) "
            "or [::] (all IPv6 addresses) instead of '*'"
        )
    address = parse_address(text)
    if address.host.lower() == "localhost":
        return Address("localhost", address.port)
    try:
        ipaddress.ip_address(address.host)
    except ValueError:
        raise ValueError(
            f"invalid listen address {text!r}: the host must be a literal IP address "
            "or 'localhost', not a host name"
        ) from None
    return address


def _address_key(address: Address) -> tuple[str, int]:
    """A comparison key under which equal IP literals written differently match."""
    try:
        return (str(ipaddress.ip_address(address.host)), address.port)
    except ValueError:
        return (address.host.lower(), address.port)


# --------------------------------------------------------------------------
# TLS files
# --------------------------------------------------------------------------

_TLS_MODES: Final[Mapping[str, ListenerTLSMode]] = {
    "none": "none",
    "implicit": "implicit",
    "starttls": "starttls",
}
_TLS_VERSION_NAMES: Final[Mapping[str, TLSVersionName]] = {
    "TLSv1": "TLSv1",
    "TLSv1.1": "TLSv1.1",
    "TLSv1.2": "TLSv1.2",
    "TLSv1.3": "TLSv1.3",
}
assert set(_TLS_VERSION_NAMES) == set(VERSIONS)
#: Versions refused toward clients and warned about toward the upstream.
_LEGACY_VERSIONS: Final = ("TLSv1", "TLSv1.1")
_CLIENT_VERSIONS: Final = ("TLSv1.2", "TLSv1.3")
_DEFAULT_MIN_VERSION: Final = "TLSv1.2"

#: Longest certificate, key or CA file read (a CA bundle is ~250 KiB).
_MAX_PEM_FILE: Final = 16 << 20

_PEM_CERT = b"-----BEGIN CERTIFICATE-----"
_PEM_KEY = re.compile(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")

_VERIFY_OFF: Final = (
    "certificate verification is off: anyone on the path can read the mail and passwords"
)
_LEGACY_UPSTREAM: Final = "legacy TLS version allowed for the upstream"


class _EncryptedKey(Exception):
    """Raised by the password callback: the key wants a passphrase."""


def _no_password() -> bytes:
    raise _EncryptedKey


def _read_file(path: str) -> tuple[bytes | None, str | None]:
    """The file's first bytes, or why it cannot be read."""
    try:
        with open(path, "rb") as stream:
            return stream.read(_MAX_PEM_FILE), None
    except OSError as exc:
        return None, f"cannot read {path}: {exc.strerror or exc}"


def _cert_key_problem(cert: str, key: str) -> tuple[Literal["cert", "key"], str] | None:
    """Why *cert* and *key* would not load as a server's pair, and which is at fault.

    Both must be readable PEM files (they may be the same file), the key not
    encrypted, and the key must match the certificate.
    """
    cert_data, problem = _read_file(cert)
    if problem is not None:
        return ("cert", problem)
    key_data, problem = _read_file(key)
    if problem is not None:
        return ("key", problem)
    assert cert_data is not None
    assert key_data is not None
    if _PEM_CERT not in cert_data:
        return ("cert", f"{cert} holds no PEM certificate ('{_PEM_CERT.decode()}')")
    if not _PEM_KEY.search(key_data):
        return ("key", f"{key} holds no PEM private key ('-----BEGIN ... PRIVATE KEY-----')")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except _EncryptedKey:
        return (
            "key",
            f"{key} is encrypted (it needs a passphrase): popguard reads unencrypted keys; "
            f"decrypt it with: openssl pkey -in {key} -out NEW.key",
        )
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            return ("cert", f"the certificate {cert} does not match the key {key}")
        return ("cert", f"cannot load the certificate {cert} with the key {key}: {exc}")
    except OSError as exc:  # pragma: no cover - read just above
        return ("cert", f"cannot load the certificate {cert}: {exc.strerror or exc}")
    return None


def _ca_file_problem(path: str) -> str | None:
    """Why *path* is not a usable CA bundle (PEM certificates), or None."""
    _, problem = _read_file(path)
    if problem is not None:
        return problem
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        if exc.reason == "NO_CERTIFICATE_OR_CRL_FOUND":
            return f"{path} holds no PEM certificate ('{_PEM_CERT.decode()}')"
        return f"cannot load CA certificates from {path}: {exc}"
    except OSError as exc:  # pragma: no cover - read just above
        return f"cannot read {path}: {exc.strerror or exc}"
    return None


def _server_name_problem(name: str) -> str | None:
    """Why *name* cannot be the upstream's TLS server name, or None."""
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return _check_host_name(name)
    return None


def _sni_name_problem(name: str) -> str | None:
    """Why *name* can never arrive as a client's SNI host name, or None."""
    if name.startswith("*"):
        return (
            f"wildcard {name!r} is not supported: SNI names are matched exactly; "
            "list each name (a wildcard certificate may serve several)"
        )
    try:
        ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        return f"{name!r} is an IP address: SNI never carries one (RFC 6066 §3)"
    if name.endswith("."):
        return f"write {name!r} without the trailing dot (RFC 6066 §3)"
    return _check_host_name(name)


# --------------------------------------------------------------------------
# The schema walker
# --------------------------------------------------------------------------

_TAG, _STR, _INT, _FLOAT, _BOOL, _NULL, _MERGE = (
    yamlnodes.TAG,
    yamlnodes.STR,
    yamlnodes.INT,
    yamlnodes.FLOAT,
    yamlnodes.BOOL,
    yamlnodes.NULL,
    yamlnodes.MERGE,
)
_KINDS = yamlnodes.KINDS

_LIMIT_KEYS: Final = tuple(f.name for f in fields(Limits))

#: Every mapping section and its keys, for "did you mean" across sections.
_SECTIONS: Final[Mapping[str, tuple[str, ...]]] = {
    "upstream": (
        "address",
        "connect_timeout",
        "greeting_timeout",
        "tls",
        "ca_file",
        "server_name",
        "tls_verify",
        "tls_min_version",
    ),
    "session": ("idle_timeout", "idle_notice", "login_timeout"),
    "limits": _LIMIT_KEYS,
    "shutdown": ("grace_period",),
    "identity": tuple(f.name for f in fields(IdentityRules)),
    "admin": ("listen",),
    "audit": (
        "file",
        "console",
        "stdout",
        "fsync",
        "fsync_interval_ms",
        "queue_size",
        "on_failure",
        "hmac_key_file",
        "durable_timeout_ms",
        "syslog",
        "message_identity",
    ),
}
_TOP_KEYS: Final = (
    "listeners",
    "upstream",
    "session",
    "limits",
    "shutdown",
    "audit",
    "policies",
    "admin",
    "workers",
    "identity",
)
_LISTENER_KEYS: Final = (
    "name",
    "listen",
    "tls",
    "cert",
    "key",
    "sni",
    "tls_min_version",
    "proxy_protocol",
    "send_proxy",
)
_PROXY_PROTOCOL_KEYS: Final = ("trusted", "required", "timeout")
_SEND_PROXY: Final = ("none", "v1", "v2")
#: Listener keys that belong to no other section, for "did you mean".
_LISTENER_ONLY_KEYS: Final = ("cert", "key", "sni")
_SNI_KEYS: Final = ("cert", "key")
_SYSLOG_KEYS: Final = ("address", "transport", "facility", "max_message", "sd_id")

_LISTENER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")

_Entries = dict[str, tuple[ScalarNode, Node]]


def _describe(node: Node) -> str:
    return yamlnodes.describe(node)


def _number_hint(node: Node) -> str:
    return yamlnodes.number_hint(node, "1000")


def _suggest(name: str, allowed: Sequence[str], section: str) -> str:
    """A " (did you mean ...?)" hint for an unknown key, or the valid keys."""
    # A key of another section, spelt right, is more likely than a typo.
    for other, keys in _SECTIONS.items():
        if other != section and name in keys:
            return f" (did you mean '{other}.{name}'?)"
    for candidate in (name, name.lower()):
        close = difflib.get_close_matches(candidate, allowed, n=1, cutoff=0.6)
        if close:
            return f" (did you mean '{close[0]}'?)"
    # Maybe the key is right but in the wrong section.
    for other, keys in _SECTIONS.items():
        if other != section and name.lower() in keys:
            return f" (did you mean '{other}.{name.lower()}'?)"
    if section != "" and name.lower() in _TOP_KEYS:
        return f" ('{name.lower()}' is a top-level section)"
    if section != "listeners" and name.lower() in _LISTENER_ONLY_KEYS:
        return f" (did you mean 'listeners[N].{name.lower()}'? it is set per listener)"
    return f" (valid keys: {', '.join(allowed)})"


def _mark_position(mark: Mark | None) -> tuple[int, int]:
    if mark is None:
        return (0, 0)
    return (mark.line + 1, mark.column + 1)


def _text_position(text: str, index: int) -> tuple[int, int]:
    index = max(0, min(index, len(text)))
    line = text.count("\n", 0, index) + 1
    column = index - (text.rfind("\n", 0, index) + 1) + 1
    return (line, column)


class _Walker:
    """Walks a composed YAML tree against the schema, collecting issues."""

    def __init__(self, file: str, base_dir: str) -> None:
        self.file = file
        self.base_dir = base_dir
        self.issues: list[ConfigIssue] = []
        self.constructor = SafeConstructor()
        #: The top-level entries, once :meth:`document` has run.
        self.top: _Entries | None = None

    # -- reporting ---------------------------------------------------------

    def report(
        self,
        node: Node | None,
        message: str,
        severity: Literal["error", "warning"] = "error",
    ) -> None:
        line, column = _mark_position(node.start_mark if node is not None else None)
        self.issues.append(ConfigIssue(self.file, line, column, message, severity))

    # -- structure ---------------------------------------------------------

    def mapping(self, node: Node, where: str) -> _Entries | None:
        """The string-keyed entries of a mapping node (null counts as empty)."""
        if isinstance(node, ScalarNode) and node.tag == _NULL:
            return {}
        if not isinstance(node, MappingNode):
            self.report(node, f"{where}: expected a mapping, got {_describe(node)}")
            return None
        entries: _Entries = {}
        for key, value in node.value:
            if key.tag == _MERGE:
                self.report(key, f"{where}: YAML merge keys ('<<') are not supported")
                continue
            if not (isinstance(key, ScalarNode) and key.tag == _STR):
                self.report(key, f"{where}: keys must be strings, got {_describe(key)} as a key")
                continue
            if key.value in entries:
                first, _ = entries[key.value]
                line, _ = _mark_position(first.start_mark)
                self.report(
                    key, f"{where}: duplicate key '{key.value}' (first given on line {line})"
                )
                continue
            entries[key.value] = (key, value)
        return entries

    def check_keys(
        self, entries: _Entries, allowed: Sequence[str], where: str, section: str
    ) -> None:
        for name, (key, _) in entries.items():
            if name not in allowed:
                what = f"{where}: unknown key" if where else "unknown top-level key"
                self.report(key, f"{what} '{name}'{_suggest(name, allowed, section)}")

    # -- scalars -----------------------------------------------------------

    def integer(self, node: Node, where: str, minimum: int, reason: str) -> int | None:
        if not (isinstance(node, ScalarNode) and node.tag == _INT):
            self.report(
                node, f"{where}: expected an integer, got {_describe(node)}{_number_hint(node)}"
            )
            return None
        value = self.constructor.construct_yaml_int(node)
        if value < minimum:
            self.report(node, f"{where}: must be at least {minimum} ({reason}), got {value}")
            return None
        return value

    def seconds(self, node: Node, where: str, *, allow_zero: bool) -> float | None:
        if not (isinstance(node, ScalarNode) and node.tag in (_INT, _FLOAT)):
            self.report(
                node,
                f"{where}: expected a number of seconds, got {_describe(node)}{_number_hint(node)}",
            )
            return None
        try:
            if node.tag == _INT:
                value = float(self.constructor.construct_yaml_int(node))
            else:
                value = self.constructor.construct_yaml_float(node)
        except OverflowError:
            value = math.inf
        problem = _seconds_problem(value, allow_zero=allow_zero)
        if problem is not None:
            self.report(node, f"{where}: {problem}")
            return None
        return value

    def boolean(self, node: Node, where: str) -> bool | None:
        if not (isinstance(node, ScalarNode) and node.tag == _BOOL):
            self.report(node, f"{where}: expected true or false, got {_describe(node)}")
            return None
        return self.constructor.construct_yaml_bool(node)

    def string(self, node: Node, where: str, example: str = "") -> str | None:
        if not (isinstance(node, ScalarNode) and node.tag == _STR):
            hint = ""
            if isinstance(node, ScalarNode) and node.tag != _NULL:
                hint = "; put it in quotes if you meant a string"
            if example:
                hint += f" (e.g. {example})"
            self.report(node, f"{where}: expected a string, got {_describe(node)}{hint}")
            return None
        value: str = node.value
        return value

    def choice(self, node: Node, where: str, allowed: Sequence[str]) -> str | None:
        """One of ``allowed`` (strings), with a "did you mean" hint."""
        options = ", ".join(allowed)
        if not (isinstance(node, ScalarNode) and node.tag == _STR):
            self.report(node, f"{where}: expected one of {options}, got {_describe(node)}")
            return None
        value: str = node.value
        if value in allowed:
            return value
        lowered = {option.lower(): option for option in allowed}
        close = difflib.get_close_matches(value.lower(), list(lowered), n=1, cutoff=0.6)
        hint = f" (did you mean '{lowered[close[0]]}'?)" if close else ""
        self.report(node, f"{where}: expected one of {options}, got {value!r}{hint}")
        return None

    def path(self, node: Node, where: str) -> str | None:
        """An optional path, resolved against the config file's directory."""
        if isinstance(node, ScalarNode) and node.tag == _NULL:
            return None
        value = self.string(node, where)
        if value is None:
            return None
        if not value:
            self.report(node, f"{where}: empty path (use null for none)")
            return None
        return os.path.normpath(os.path.join(self.base_dir, os.path.expanduser(value)))

    def address(self, node: Node, where: str, *, listen: bool) -> Address | None:
        example = '"127.0.0.1:1110"' if listen else '"127.0.0.1:110"'
        text = self.string(node, where, example)
        if text is None:
            return None
        try:
            return parse_listen_address(text) if listen else parse_address(text)
        except ValueError as exc:
            self.report(node, f"{where}: {exc}")
            return None

    # -- sections ----------------------------------------------------------

    def document(self, root: Node | None) -> PartialConfig:
        top = {} if root is None else self.mapping(root, "the configuration")
        self.top = top
        if top is None:
            return PartialConfig(source=self.file)
        self.check_keys(top, _TOP_KEYS, "", "")

        def section(name: str) -> Node | None:
            entry = top.get(name)
            return entry[1] if entry is not None else None

        listeners = self.listeners(section("listeners"))
        upstream_address, connect_timeout, greeting_timeout, upstream_tls = self.upstream(
            section("upstream")
        )
        session = self.session(section("session"))
        limits = self.limits(section("limits"))
        grace = self.shutdown(section("shutdown"))
        audit = self.audit(section("audit"))
        policies_node = section("policies")
        policies = None if policies_node is None else self.path(policies_node, "policies")
        admin_listen = self.admin(section("admin"))
        workers_node = section("workers")
        workers = 1 if workers_node is None else self.workers(workers_node)
        identity = self.identity(section("identity"))
        return PartialConfig(
            listeners=listeners,
            upstream_address=upstream_address,
            connect_timeout=_DEFAULT_CONNECT_TIMEOUT
            if connect_timeout is None
            else connect_timeout,
            greeting_timeout=_DEFAULT_GREETING_TIMEOUT
            if greeting_timeout is None
            else greeting_timeout,
            upstream_tls=upstream_tls,
            session=session,
            limits=limits,
            shutdown_grace=_DEFAULT_SHUTDOWN_GRACE if grace is None else grace,
            audit=audit,
            policies=policies,
            admin_listen=admin_listen,
            workers=workers,
            identity=identity,
            source=self.file,
        )

    def listeners(self, node: Node | None) -> tuple[ListenerConfig, ...]:
        if node is None or (isinstance(node, ScalarNode) and node.tag == _NULL):
            return ()
        if not isinstance(node, SequenceNode):
            self.report(
                node,
                f"listeners: expected a list of listeners, got {_describe(node)} "
                '(e.g. "- listen: 127.0.0.1:1110")',
            )
            return ()
        if not node.value:
            self.report(
                node,
                "listeners: the list is empty; configure at least one listener "
                "(or leave 'listeners' out and pass --listen)",
            )
        result: list[ListenerConfig] = []
        names: dict[str, Node] = {}
        addresses: dict[tuple[str, int], tuple[str, Node]] = {}
        for index, item in enumerate(node.value):
            where = f"listeners[{index}]"
            entries = self.mapping(item, where)
            if entries is None:
                continue
            self.check_keys(entries, _LISTENER_KEYS, where, "listeners")
            name: str | None = f"listener-{index}"
            name_node: Node = item
            if "name" in entries:
                name_node = entries["name"][1]
                name = self.string(name_node, f"{where}.name")
                if name is not None and not _LISTENER_NAME.match(name):
                    self.report(
                        name_node,
                        f"{where}.name: invalid name {name!r}: use 1-64 letters, digits, "
                        "'.', '_' or '-', starting with a letter or digit",
                    )
                    name = None
            if name is not None:
                if name in names:
                    line, _ = _mark_position(names[name].start_mark)
                    default = "" if "name" in entries else " (the default name)"
                    self.report(
                        name_node,
                        f"{where}.name: duplicate listener name {name!r}{default}; "
                        f"already used on line {line}",
                    )
                    name = None
                else:
                    names[name] = name_node
            tls = self.listener_tls(entries, where)
            if "listen" not in entries:
                self.report(
                    item,
                    f"{where}: missing required key 'listen' (e.g. listen: \"127.0.0.1:1110\")",
                )
                continue
            listen_node = entries["listen"][1]
            address = self.address(listen_node, f"{where}.listen", listen=True)
            if address is None:
                continue
            key = _address_key(address)
            if key in addresses:
                other, other_node = addresses[key]
                line, _ = _mark_position(other_node.start_mark)
                self.report(
                    listen_node,
                    f"{where}.listen: {address} is already used by listener "
                    f"{other!r} (line {line})",
                )
                continue
            proxy = self.proxy_protocol(entries, where)
            send_proxy: Literal["none", "v1", "v2"] = "none"
            if "send_proxy" in entries:
                chosen = self.choice(entries["send_proxy"][1], f"{where}.send_proxy", _SEND_PROXY)
                if chosen is None:
                    continue
                send_proxy = cast(Literal["none", "v1", "v2"], chosen)
            if name is not None:
                addresses[key] = (name, listen_node)
                if tls is not None and proxy is not False:
                    result.append(ListenerConfig(name, address, tls, proxy or None, send_proxy))
        return tuple(result)

    def proxy_protocol(
        self, entries: _Entries, where: str
    ) -> ProxyProtocolConfig | Literal[False] | None:
        """``proxy_protocol:``; None when absent, False when invalid (reported)."""
        if "proxy_protocol" not in entries:
            return None
        node = entries["proxy_protocol"][1]
        label = f"{where}.proxy_protocol"
        sub = self.mapping(node, label)
        if sub is None:
            return False
        self.check_keys(sub, _PROXY_PROTOCOL_KEYS, label, "proxy_protocol")
        if "trusted" not in sub:
            self.report(
                node,
                f"{label}: missing required key 'trusted' (the load balancers allowed to "
                'send a PROXY header, e.g. trusted: ["10.0.0.5/32"])',
            )
            return False
        trusted_node = sub["trusted"][1]
        items = trusted_node.value if isinstance(trusted_node, SequenceNode) else [trusted_node]
        networks = []
        for item in items:
            text = self.string(item, f"{label}.trusted", "10.0.0.0/8")
            if text is None:
                return False
            try:
                networks.append(ipaddress.ip_network(text, strict=True))
            except ValueError as exc:
                self.report(item, f"{label}.trusted: {exc}")
                return False
        if not networks:
            self.report(trusted_node, f"{label}.trusted: the list is empty")
            return False
        required = True
        if "required" in sub:
            value = self.boolean(sub["required"][1], f"{label}.required")
            if value is None:
                return False
            required = value
        timeout = 5.0
        if "timeout" in sub:
            seconds = self.seconds(sub["timeout"][1], f"{label}.timeout", allow_zero=False)
            if seconds is None:
                return False
            if seconds < 3:
                self.report(
                    sub["timeout"][1],
                    f"{label}.timeout: {seconds:g} s is too short; the PROXY protocol spec "
                    "asks receivers to wait at least 3 seconds",
                )
                return False
            timeout = seconds
        return ProxyProtocolConfig(tuple(networks), required, timeout)

    def tls_mode(self, entries: _Entries, where: str) -> tuple[ListenerTLSMode | None, Node | None]:
        """The ``tls`` key: the mode (None when invalid) and its node."""
        if "tls" not in entries:
            return ("none", None)
        node = entries["tls"][1]
        chosen = self.choice(node, f"{where}.tls", tuple(_TLS_MODES))
        return (None if chosen is None else _TLS_MODES[chosen], node)

    def tls_version(
        self, node: Node, where: str, allowed: Sequence[str], refused: str = ""
    ) -> TLSVersionName | None:
        """A ``tls_min_version``; *refused* explains why the versions not allowed are."""
        if (
            refused
            and isinstance(node, ScalarNode)
            and node.tag == _STR
            and node.value in _TLS_VERSION_NAMES
            and node.value not in allowed
        ):
            self.report(node, f"{where}: {node.value} is not allowed {refused}")
            return None
        chosen = self.choice(node, where, allowed)
        return None if chosen is None else _TLS_VERSION_NAMES[chosen]

    def is_null(self, node: Node) -> bool:
        return isinstance(node, ScalarNode) and node.tag == _NULL

    def is_empty(self, node: Node) -> bool:
        """Null, ``{}`` or ``[]``: nothing given."""
        return self.is_null(node) or (
            isinstance(node, MappingNode | SequenceNode) and not node.value
        )

    def cert_key(
        self, entries: _Entries, where: str, anchor: Node | None, *, required: str, check: bool
    ) -> CertKey | None:
        """The ``cert`` and ``key`` of *entries*, both checked to load together.

        *required* (e.g. ``"with tls: implicit"``), if not empty, makes a
        missing one an error located at *anchor*.  Returns None when either
        is missing or invalid (its error, if any, reported).
        """
        paths: dict[str, str] = {}
        missing: list[str] = []
        for name in _SNI_KEYS:
            node = entries[name][1] if name in entries else None
            if node is None or self.is_null(node):
                missing.append(name)
                continue
            value = self.path(node, f"{where}.{name}")
            if value is not None:
                paths[name] = value
        if missing:
            if required:
                needed = " and ".join(f"'{name}'" for name in missing)
                what = "a PEM certificate file" if missing == ["cert"] else "PEM files"
                if missing == ["key"]:
                    what = "a PEM private key file"
                self.report(anchor, f"{where}: missing {needed} ({what}), required {required}")
            return None
        if len(paths) < len(_SNI_KEYS):
            return None
        pair = CertKey(paths["cert"], paths["key"])
        if check:
            problem = _cert_key_problem(pair.cert, pair.key)
            if problem is not None:
                which, message = problem
                self.report(entries[which][1], f"{where}.{which}: {message}")
                return None
        return pair

    def sni(self, node: Node, where: str, *, check: bool) -> dict[str, CertKey] | None:
        """A listener's ``sni`` mapping: server name -> {cert, key}."""
        if self.is_null(node):
            return {}
        entries = self.mapping(node, where)
        if entries is None:
            return None
        result: dict[str, CertKey] = {}
        ok = True
        seen: dict[str, Node] = {}
        for name, (key_node, value) in entries.items():
            item_where = f"{where}.{name}"
            problem = _sni_name_problem(name)
            if problem is not None:
                self.report(key_node, f"{where}: {problem}")
                ok = False
            elif name.lower() in seen:
                line, _ = _mark_position(seen[name.lower()].start_mark)
                self.report(
                    key_node,
                    f"{where}: {name!r} is given twice (names are case-insensitive; "
                    f"first on line {line})",
                )
                ok = False
            seen.setdefault(name.lower(), key_node)
            pair_entries = self.mapping(value, item_where)
            if pair_entries is None:
                ok = False
                continue
            self.check_keys(pair_entries, _SNI_KEYS, item_where, "listeners")
            anchor = value if isinstance(value, MappingNode) else key_node
            pair = self.cert_key(
                pair_entries, item_where, anchor, required="for each SNI name", check=check
            )
            if pair is None:
                ok = False
            else:
                result[name] = pair
        return result if ok else None

    def listener_tls(self, entries: _Entries, where: str) -> ListenerTLS | None:
        """A listener's TLS keys; None when one of them is invalid (reported)."""
        mode, mode_node = self.tls_mode(entries, where)
        ok = mode is not None
        check = mode not in (None, "none")

        min_version: TLSVersionName = _DEFAULT_MIN_VERSION
        if "tls_min_version" in entries:
            chosen = self.tls_version(
                entries["tls_min_version"][1],
                f"{where}.tls_min_version",
                _CLIENT_VERSIONS,
                "toward clients: RFC 8996 deprecates TLS 1.0 and 1.1; use TLSv1.2 or TLSv1.3 "
                "(only the upstream side has a legacy opt-in)",
            )
            ok = ok and chosen is not None
            min_version = chosen or min_version

        required = f"with tls: {mode}" if check else ""
        pair = self.cert_key(entries, where, mode_node, required=required, check=check)
        if check and pair is None:
            ok = False

        sni: dict[str, CertKey] | None = {}
        if "sni" in entries:
            sni = self.sni(entries["sni"][1], f"{where}.sni", check=check)
            ok = ok and sni is not None

        if mode == "none":
            # Settings that do nothing (defaults are never warned about).
            for name in ("cert", "key", "sni"):
                if name in entries and not self.is_empty(entries[name][1]):
                    self.report(
                        entries[name][0],
                        f"{where}.{name}: cert/key ignored without tls; set {where}.tls "
                        "to implicit or starttls to use them",
                        "warning",
                    )
            if "tls_min_version" in entries and min_version != _DEFAULT_MIN_VERSION:
                self.report(
                    entries["tls_min_version"][0],
                    f"{where}.tls_min_version has no effect without tls",
                    "warning",
                )
            return ListenerTLS() if ok else None
        if not ok or mode is None or sni is None:
            return None
        return ListenerTLS(mode=mode, cert=pair, sni=sni, min_version=min_version)

    def upstream(
        self, node: Node | None
    ) -> tuple[Address | None, float | None, float | None, UpstreamTLS]:
        """Address, connect_timeout, greeting_timeout (None: not given) and TLS."""
        if node is None:
            return (None, None, None, UpstreamTLS())
        entries = self.mapping(node, "upstream")
        if entries is None:
            return (None, None, None, UpstreamTLS())
        self.check_keys(entries, _SECTIONS["upstream"], "upstream", "upstream")
        address: Address | None = None
        timeout: float | None = None
        greeting: float | None = None
        if "address" in entries:
            address = self.address(entries["address"][1], "upstream.address", listen=False)
        if "connect_timeout" in entries:
            timeout = self.seconds(
                entries["connect_timeout"][1], "upstream.connect_timeout", allow_zero=False
            )
        if "greeting_timeout" in entries:
            greeting = self.seconds(
                entries["greeting_timeout"][1], "upstream.greeting_timeout", allow_zero=False
            )
        return (address, timeout, greeting, self.upstream_tls(entries))

    def upstream_tls(self, entries: _Entries) -> UpstreamTLS:
        """The upstream's TLS keys (invalid ones fall back to their defaults)."""
        default = UpstreamTLS()
        mode, _ = self.tls_mode(entries, "upstream")
        values: dict[str, object] = {}
        if mode is not None:
            values["mode"] = mode
        if "ca_file" in entries:
            node = entries["ca_file"][1]
            ca_file = self.path(node, "upstream.ca_file")
            if ca_file is not None:
                problem = _ca_file_problem(ca_file)
                if problem is not None:
                    self.report(node, f"upstream.ca_file: {problem}")
                else:
                    values["ca_file"] = ca_file
        if "server_name" in entries:
            node = entries["server_name"][1]
            if not self.is_null(node):
                name = self.string(node, "upstream.server_name", '"mail.example.org"')
                problem = None if name is None else _server_name_problem(name)
                if problem is not None:
                    self.report(node, f"upstream.server_name: {problem}")
                elif name is not None:
                    values["server_name"] = name
        if "tls_verify" in entries:
            verify = self.boolean(entries["tls_verify"][1], "upstream.tls_verify")
            if verify is not None:
                values["verify"] = verify
        if "tls_min_version" in entries:
            version = self.tls_version(
                entries["tls_min_version"][1],
                "upstream.tls_min_version",
                tuple(_TLS_VERSION_NAMES),
            )
            if version is not None:
                values["min_version"] = version
        tls = dataclasses.replace(default, **values)  # type: ignore[arg-type]
        self.upstream_tls_warnings(entries, tls, mode_known=mode is not None)
        return tls

    def upstream_tls_warnings(
        self, entries: _Entries, tls: UpstreamTLS, *, mode_known: bool
    ) -> None:
        """Weakened security, and keys that do nothing (defaults never warn)."""
        default = UpstreamTLS()
        keys = {
            "ca_file": "ca_file",
            "server_name": "server_name",
            "tls_verify": "verify",
            "tls_min_version": "min_version",
        }
        changed = {
            key: entries[key][0]
            for key, attribute in keys.items()
            if key in entries and getattr(tls, attribute) != getattr(default, attribute)
        }
        if not mode_known:
            return
        if tls.mode == "none":
            for key, key_node in changed.items():
                self.report(
                    key_node,
                    f"upstream.{key} has no effect without upstream.tls (implicit or starttls)",
                    "warning",
                )
            return
        if "tls_verify" in changed:
            self.report(entries["tls_verify"][1], f"upstream.tls_verify: {_VERIFY_OFF}", "warning")
            if "ca_file" in changed:
                self.report(
                    changed["ca_file"],
                    "upstream.ca_file has no effect with tls_verify: false",
                    "warning",
                )
        if tls.min_version in _LEGACY_VERSIONS:
            self.report(
                entries["tls_min_version"][1],
                f"upstream.tls_min_version: {_LEGACY_UPSTREAM}: {tls.min_version} "
                "(RFC 8996 deprecates TLS 1.0 and 1.1; allow it only for a server that "
                "cannot do TLS 1.2)",
                "warning",
            )

    def session(self, node: Node | None) -> SessionConfig:
        default = SessionConfig()
        if node is None:
            return default
        entries = self.mapping(node, "session")
        if entries is None:
            return default
        self.check_keys(entries, _SECTIONS["session"], "session", "session")
        idle_timeout: float | None = None
        idle_notice: bool | None = None
        login_timeout: float | None = None
        if "idle_timeout" in entries:
            value_node = entries["idle_timeout"][1]
            idle_timeout = self.seconds(value_node, "session.idle_timeout", allow_zero=False)
            warning = _idle_timeout_warning(idle_timeout, "session.idle_timeout")
            if warning is not None:
                self.report(value_node, warning, "warning")
        if "idle_notice" in entries:
            idle_notice = self.boolean(entries["idle_notice"][1], "session.idle_notice")
        if "login_timeout" in entries:
            value_node = entries["login_timeout"][1]
            if self.is_null(value_node):
                self.report(
                    value_node,
                    "session.login_timeout: expected a number of seconds, got null; "
                    "write 0 for no limit",
                )
            else:
                login_timeout = self.seconds(value_node, "session.login_timeout", allow_zero=True)
        return SessionConfig(
            idle_timeout=default.idle_timeout if idle_timeout is None else idle_timeout,
            idle_notice=default.idle_notice if idle_notice is None else idle_notice,
            login_timeout=default.login_timeout if login_timeout is None else login_timeout,
        )

    def identity(self, node: Node | None) -> IdentityRules:
        """``identity:``: how the upstream maps a login name to an account."""
        default = DEFAULT_IDENTITY
        if node is None:
            return default
        entries = self.mapping(node, "identity")
        if entries is None:
            return default
        self.check_keys(entries, _SECTIONS["identity"], "identity", "identity")
        values: dict[str, object] = {}
        choices = {
            "case": ("lower", "exact"),
            "domain": ("keep", "strip"),
            "master_account": ("before", "after"),
            "plain_authzid": ("account", "refuse"),
        }
        for name, allowed in choices.items():
            if name in entries:
                value = self.choice(entries[name][1], f"identity.{name}", allowed)
                if value is not None:
                    values[name] = value
        for name in ("default_domain", "master_separator", "allowed_chars"):
            if name not in entries:
                continue
            value_node = entries[name][1]
            where = f"identity.{name}"
            if self.is_null(value_node):
                values[name] = None
                continue
            text = self.string(value_node, where)
            if text is None:
                continue
            problem = _identity_problem(name, text)
            if problem is not None:
                self.report(value_node, f"{where}: {problem}")
            else:
                values[name] = text
        return dataclasses.replace(default, **values)  # type: ignore[arg-type]

    def limits(self, node: Node | None) -> Limits:
        if node is None:
            return Limits()
        entries = self.mapping(node, "limits")
        if entries is None:
            return Limits()
        self.check_keys(entries, _LIMIT_KEYS, "limits", "limits")
        values: dict[str, int] = {}
        for name in _LIMIT_KEYS:
            if name in entries:
                minimum, reason = LIMIT_MINIMUMS.get(name, (1, "it cannot be less"))
                value = self.integer(entries[name][1], f"limits.{name}", minimum, reason)
                if value is not None:
                    values[name] = value
        return Limits(**values)

    def admin(self, node: Node | None) -> Address | None:
        if node is None or self.is_null(node):
            return None
        entries = self.mapping(node, "admin")
        if entries is None or "listen" not in entries:
            return None
        self.check_keys(entries, _SECTIONS["admin"], "admin", "admin")
        listen = entries["listen"][1]
        if self.is_null(listen):
            return None
        return self.address(listen, "admin.listen", listen=True)

    def workers(self, node: Node) -> Workers:
        if isinstance(node, ScalarNode) and node.tag == _STR:
            return "auto" if self.choice(node, "workers", ["auto"]) else 1
        value = self.integer(node, "workers", 1, "one process at least; or 'auto'")
        if value is not None and value > MAX_WORKERS:
            self.report(node, f"workers: at most {MAX_WORKERS}, got {value}")
            return 1
        return 1 if value is None else value

    def shutdown(self, node: Node | None) -> float | None:
        if node is None:
            return None
        entries = self.mapping(node, "shutdown")
        if entries is None:
            return None
        self.check_keys(entries, _SECTIONS["shutdown"], "shutdown", "shutdown")
        if "grace_period" not in entries:
            return None
        return self.seconds(entries["grace_period"][1], "shutdown.grace_period", allow_zero=True)

    def audit(self, node: Node | None) -> AuditConfig:
        default = AuditConfig()
        if node is None:
            return default
        entries = self.mapping(node, "audit")
        if entries is None:
            return default
        self.check_keys(entries, _SECTIONS["audit"], "audit", "audit")
        values: dict[str, object] = {}

        def given(name: str) -> Node | None:
            entry = entries.get(name)
            return entry[1] if entry is not None else None

        def keep(name: str, value: object) -> None:
            if value is not None:
                values[name] = value

        if (value_node := given("file")) is not None:
            values["file"] = self.path(value_node, "audit.file")
        for name in ("console", "stdout", "message_identity"):
            if (value_node := given(name)) is not None:
                keep(name, self.boolean(value_node, f"audit.{name}"))
        if (value_node := given("fsync")) is not None:
            keep("fsync", self.choice(value_node, "audit.fsync", _FSYNC_POLICIES))
        if (value_node := given("fsync_interval_ms")) is not None:
            keep(
                "fsync_interval_ms",
                self.integer(
                    value_node, "audit.fsync_interval_ms", 1, "milliseconds between fsyncs"
                ),
            )
        if (value_node := given("queue_size")) is not None:
            keep(
                "queue_size",
                self.integer(value_node, "audit.queue_size", 1, "a queue holds a record or more"),
            )
        if (value_node := given("on_failure")) is not None:
            keep("on_failure", self.choice(value_node, "audit.on_failure", _ON_FAILURE))
        if (value_node := given("durable_timeout_ms")) is not None:
            keep(
                "durable_timeout_ms",
                self.integer(
                    value_node, "audit.durable_timeout_ms", 1, "a wait of a millisecond or more"
                ),
            )
        if (value_node := given("hmac_key_file")) is not None:
            key_file = self.path(value_node, "audit.hmac_key_file")
            if key_file is not None:
                try:
                    load_key(key_file)
                except ChainError as exc:
                    self.report(value_node, f"audit.hmac_key_file: {exc}")
                else:
                    values["hmac_key_file"] = key_file
        if (value_node := given("syslog")) is not None:
            values["syslog"] = self.syslog_targets(value_node)
        config = dataclasses.replace(default, **values)  # type: ignore[arg-type]
        self.audit_warnings(entries, config)
        return config

    def audit_warnings(self, entries: _Entries, config: AuditConfig) -> None:
        """Keys set to something other than their default, to no effect.

        (Defaults are never warned about: the example file lists them all.)
        """
        default = AuditConfig()

        def changed(name: str) -> ScalarNode | None:
            if name in entries and getattr(config, name) != getattr(default, name):
                return entries[name][0]
            return None

        if config.file is None:
            for name in ("fsync", "fsync_interval_ms", "hmac_key_file"):
                if (key := changed(name)) is not None:
                    self.report(key, f"audit.{name} has no effect without audit.file", "warning")
            if (key := changed("on_failure")) is not None:
                self.report(
                    key,
                    "audit.on_failure: fail-closed has no effect without audit.file "
                    "(only the audit file is a durable sink)",
                    "warning",
                )
        elif config.fsync != "interval" and (key := changed("fsync_interval_ms")) is not None:
            self.report(
                key,
                f"audit.fsync_interval_ms has no effect with fsync: {config.fsync}",
                "warning",
            )

    def syslog_targets(self, node: Node) -> tuple[SyslogTarget, ...]:
        if isinstance(node, ScalarNode) and node.tag == _NULL:
            return ()
        if not isinstance(node, SequenceNode):
            self.report(
                node,
                f"audit.syslog: expected a list of syslog targets, got {_describe(node)} "
                '(e.g. "- address: 127.0.0.1:514")',
            )
            return ()
        targets: list[SyslogTarget] = []
        seen: dict[tuple[str, tuple[str, int]], int] = {}
        for index, item in enumerate(node.value):
            where = f"audit.syslog[{index}]"
            entries = self.mapping(item, where)
            if entries is None:
                continue
            self.check_keys(entries, _SYSLOG_KEYS, where, "audit.syslog")
            if "address" not in entries:
                self.report(
                    item,
                    f"{where}: missing required key 'address' (e.g. address: \"127.0.0.1:514\")",
                )
                continue
            ok = True
            address_node = entries["address"][1]
            address = self.address(address_node, f"{where}.address", listen=False)
            ok = ok and address is not None
            transport: str = "udp"
            if "transport" in entries:
                chosen = self.choice(entries["transport"][1], f"{where}.transport", _TRANSPORTS)
                ok = ok and chosen is not None
                transport = chosen or transport
            facility = "auth"
            if "facility" in entries:
                chosen = self.choice(entries["facility"][1], f"{where}.facility", tuple(FACILITIES))
                ok = ok and chosen is not None
                facility = chosen or facility
            max_message = DEFAULT_MAX_MESSAGE[transport]
            if "max_message" in entries:
                size_node = entries["max_message"][1]
                size = self.integer(
                    size_node,
                    f"{where}.max_message",
                    MIN_MESSAGE,
                    "RFC 5426 §3.2: every receiver accepts 480 octets",
                )
                upper = MAX_UDP_MESSAGE if transport == "udp" else _MAX_TCP_MESSAGE
                if size is not None and size > upper:
                    why = "the largest UDP payload" if transport == "udp" else "1 MiB"
                    self.report(
                        size_node,
                        f"{where}.max_message: must be at most {upper} ({why}) "
                        f"for {transport}, got {size}",
                    )
                    size = None
                ok = ok and size is not None
                max_message = size or max_message
            sd_id = DEFAULT_SD_ID
            if "sd_id" in entries:
                sd_node = entries["sd_id"][1]
                text = self.string(sd_node, f"{where}.sd_id", '"popguard@32473"')
                if text is not None and not valid_sd_id(text):
                    self.report(
                        sd_node,
                        f"{where}.sd_id: invalid SD-ID {text!r}: write NAME@ENTERPRISE-NUMBER "
                        "(RFC 5424 §7.2.2), e.g. popguard@32473",
                    )
                    text = None
                ok = ok and text is not None
                sd_id = text or sd_id
            if not ok or address is None:
                continue
            key = (transport, _address_key(address))
            if key in seen:
                self.report(
                    address_node,
                    f"{where}.address: {transport} {address} is already audit.syslog"
                    f"[{seen[key]}]; every record would be sent twice",
                    "warning",
                )
            seen[key] = index
            targets.append(
                SyslogTarget(
                    address=address,
                    transport="tcp" if transport == "tcp" else "udp",
                    facility=facility,
                    max_message=max_message,
                    sd_id=sd_id,
                )
            )
        return tuple(targets)

    def require_complete(self) -> None:
        """Report a missing listener or upstream address (for :func:`load_config`).

        Only what is absent is reported here: a listener or an address that
        is present but invalid has its own error already.
        """
        top = self.top
        if top is None:  # not a mapping: reported already
            return
        key, value = top.get("listeners", (None, None))
        if key is None:
            self.report(None, "no listener configured: add a 'listeners:' section")
        elif isinstance(value, ScalarNode) and value.tag == _NULL:
            self.report(key, "listeners: no listener configured")
        key, value = top.get("upstream", (None, None))
        if key is None:
            self.report(None, "no upstream configured: add an 'upstream:' section")
        elif isinstance(value, ScalarNode) and value.tag == _NULL:
            self.report(key, "upstream: missing required key 'address'")
        elif isinstance(value, MappingNode) and not any(
            isinstance(k, ScalarNode) and k.value == "address" for k, _ in value.value
        ):
            self.report(value, "upstream: missing required key 'address'")


def _identity_problem(name: str, text: str) -> str | None:
    """Why an ``identity:`` string is unusable, or None."""
    if not text:
        if name == "allowed_chars":
            return "empty: no name could log in (null accepts any printable character)"
        return "empty (use null for none)"
    if not text.isascii() or not text.isprintable() or " " in text:
        return "printable ASCII without spaces expected"
    if name == "master_separator" and len(text) != 1:
        return f"one character expected (Dovecot's auth_master_user_separator), got {text!r}"
    if name == "default_domain" and "@" in text:
        return f"a domain without '@' expected, got {text!r}"
    return None


def _seconds_problem(value: float, *, allow_zero: bool) -> str | None:
    if not math.isfinite(value):
        return f"must be a finite number of seconds, got {value}"
    if allow_zero and value < 0:
        return f"must be at least 0 seconds, got {value:g}"
    if not allow_zero and value <= 0:
        return f"must be greater than 0 seconds, got {value:g}"
    return None


def _idle_timeout_warning(value: float | None, where: str) -> str | None:
    if value is None or value >= RFC1939_MIN_IDLE_TIMEOUT:
        return None
    return (
        f"{where} is {value:g} seconds, below 600: RFC 1939 §3 requires a POP3 "
        "server's inactivity autologout timer to be at least 10 minutes"
    )


def _syntax_issue(file: str, text: str, exc: yaml.YAMLError) -> ConfigIssue:
    """Turn a PyYAML error into a located issue."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        line, column = _mark_position(mark)
        message = exc.problem or exc.context or "invalid YAML"
        if exc.context and exc.problem and exc.context_mark is not None:
            context_line, _ = _mark_position(exc.context_mark)
            message = f"{message} ({exc.context} started on line {context_line})"
        if mark is not None:
            lines = text.splitlines()
            source_line = lines[mark.line] if mark.line < len(lines) else ""
            if re.search(r":\s*\[[0-9A-Fa-f:.%]*\]:", source_line):
                message += '; quote IPv6 addresses, e.g. "[::1]:1110"'
        return ConfigIssue(file, line, column, f"YAML syntax error: {message}")
    if isinstance(exc, ReaderError):
        line, column = _text_position(text, int(exc.position))
        return ConfigIssue(file, line, column, f"YAML syntax error: {exc.reason}")
    return ConfigIssue(file, 0, 0, f"YAML syntax error: {exc}")


def _read(
    path: str | os.PathLike[str], *, require_complete: bool
) -> tuple[PartialConfig, list[ConfigIssue]]:
    file = os.fspath(path)
    try:
        with open(file, "rb") as stream:
            data = stream.read()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError([ConfigIssue(file, 0, 0, f"cannot read config file: {reason}")]) from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(
            [ConfigIssue(file, line, column, "the config file is not valid UTF-8")]
        ) from exc
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise ConfigError([_syntax_issue(file, text, exc)]) from exc

    walker = _Walker(file, os.path.dirname(os.path.abspath(file)))
    config = walker.document(root)
    if require_complete:
        walker.require_complete()
    issues = sorted(walker.issues, key=lambda issue: (issue.line, issue.column))
    if any(issue.severity == "error" for issue in issues):
        raise ConfigError(issues)
    return config, issues


# --------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------


def read_config(path: str | os.PathLike[str]) -> tuple[PartialConfig, list[ConfigIssue]]:
    """Validate a config file that may leave listeners and upstream to flags.

    Returns the partial configuration and the warnings; raises
    :class:`ConfigError` with every error (YAML syntax errors and an
    unreadable file included).  Finish with :func:`build_config`.
    """
    return _read(path, require_complete=False)


def load_config(path: str | os.PathLike[str]) -> tuple[Config, list[ConfigIssue]]:
    """Load a config file that is complete on its own: ``(config, warnings)``.

    Like :func:`read_config`, but a file without a listener or without an
    upstream address is an error too.
    """
    partial, warnings = _read(path, require_complete=True)
    config, _ = build_config(base=partial)
    return config, warnings


def build_config(
    *,
    base: Config | PartialConfig | None,
    listen: Sequence[str] = (),
    upstream: str | None = None,
    audit_file: str | None = None,
    idle_timeout: float | None = None,
    connect_timeout: float | None = None,
    login_timeout: float | None = None,
    greeting_timeout: float | None = None,
    console: bool | None = None,
    listen_tls: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    upstream_tls: str | None = None,
    upstream_ca_file: str | None = None,
    upstream_server_name: str | None = None,
    upstream_tls_verify: bool | None = None,
    workers: Workers | None = None,
) -> tuple[Config, list[ConfigIssue]]:
    """Apply command-line flags over *base* (a file's config, or defaults).

    Flags win.  ``listen`` given replaces the base's listeners, which are
    named ``cli-0``, ``cli-1``, ...  A relative ``audit_file`` is made
    absolute against the current directory.

    ``listen_tls`` (``none``, ``implicit`` or ``starttls``), ``tls_cert``
    and ``tls_key`` apply to every ``listen`` listener and need ``listen``;
    a mode other than ``none`` needs both files, and the files need a mode.
    ``upstream_tls`` (a mode), ``upstream_ca_file``, ``upstream_server_name``
    and ``upstream_tls_verify`` override the base's upstream TLS one by one.
    Relative paths are made absolute against the current directory, and the
    files are checked like the config file's.  Returns ``(config, warnings)``
    where the warnings concern the flags only (the file's come from
    :func:`read_config`).  Raises :class:`ConfigError` (file
    ``"<command line>"``, line 0) when a flag value is invalid or when no
    listener or no upstream results.
    """
    if base is None:
        partial = PartialConfig()
    elif isinstance(base, Config):
        partial = PartialConfig(
            listeners=base.listeners,
            upstream_address=base.upstream.address,
            connect_timeout=base.upstream.connect_timeout,
            greeting_timeout=base.upstream.greeting_timeout,
            upstream_tls=base.upstream.tls,
            session=base.session,
            limits=base.limits,
            shutdown_grace=base.shutdown_grace,
            audit=base.audit,
            policies=base.policies,
            admin_listen=base.admin_listen,
            workers=base.workers,
            identity=base.identity,
        )
    else:
        partial = base

    issues: list[ConfigIssue] = []

    def report(message: str, severity: Literal["error", "warning"] = "error") -> None:
        issues.append(ConfigIssue(COMMAND_LINE, 0, 0, message, severity))

    def flag_path(flag: str, value: str) -> str | None:
        if not value:
            report(f"{flag}: empty path")
            return None
        return os.path.abspath(os.path.expanduser(value))

    def flag_mode(flag: str, value: str) -> ListenerTLSMode | None:
        if value in _TLS_MODES:
            return _TLS_MODES[value]
        report(f"{flag}: expected one of {', '.join(_TLS_MODES)}, got {value!r}")
        return None

    cli_tls = _listen_tls_flags(
        report,
        flag_path,
        flag_mode,
        listen=bool(listen),
        mode=listen_tls,
        cert=tls_cert,
        key=tls_key,
    )

    listeners = partial.listeners
    if listen:
        parsed: list[ListenerConfig] = []
        seen: dict[tuple[str, int], str] = {}
        for index, text in enumerate(listen):
            try:
                address = parse_listen_address(text)
            except ValueError as exc:
                report(f"--listen: {exc}")
                continue
            key = _address_key(address)
            if key in seen:
                report(f"--listen: {address} is given twice ({seen[key]!r} and {text!r})")
                continue
            seen[key] = text
            parsed.append(ListenerConfig(f"cli-{index}", address, cli_tls))
        listeners = tuple(parsed)

    upstream_address = partial.upstream_address
    if upstream is not None:
        try:
            upstream_address = parse_address(upstream)
        except ValueError as exc:
            report(f"--upstream: {exc}")

    upstream_tls_config = _upstream_tls_flags(
        partial.upstream_tls,
        report,
        flag_path,
        flag_mode,
        mode=upstream_tls,
        ca_file=upstream_ca_file,
        server_name=upstream_server_name,
        verify=upstream_tls_verify,
    )

    timeout = partial.connect_timeout
    if connect_timeout is not None:
        problem = _seconds_problem(connect_timeout, allow_zero=False)
        if problem is not None:
            report(f"--connect-timeout: {problem}")
        else:
            timeout = float(connect_timeout)

    greeting = partial.greeting_timeout
    if greeting_timeout is not None:
        problem = _seconds_problem(greeting_timeout, allow_zero=False)
        if problem is not None:
            report(f"--greeting-timeout: {problem}")
        else:
            greeting = float(greeting_timeout)

    session = partial.session
    if idle_timeout is not None:
        problem = _seconds_problem(idle_timeout, allow_zero=False)
        if problem is not None:
            report(f"--idle-timeout: {problem}")
        else:
            session = dataclasses.replace(session, idle_timeout=float(idle_timeout))
            warning = _idle_timeout_warning(idle_timeout, "--idle-timeout")
            if warning is not None:
                report(warning, "warning")
    if login_timeout is not None:
        problem = _seconds_problem(login_timeout, allow_zero=True)
        if problem is not None:
            report(f"--login-timeout: {problem}")
        else:
            session = dataclasses.replace(session, login_timeout=float(login_timeout))

    audit = partial.audit
    if audit_file is not None:
        if not audit_file:
            report("--audit-file: empty path")
        else:
            audit = dataclasses.replace(audit, file=os.path.abspath(os.path.expanduser(audit_file)))
    if console is not None:
        audit = dataclasses.replace(audit, console=console)

    in_file = f" in {partial.source}" if partial.source else " in the config file"
    if not listeners and not listen:
        report(f"no listener configured: pass --listen HOST:PORT or add 'listeners:'{in_file}")
    if upstream_address is None and upstream is None:
        report(
            f"no upstream configured: pass --upstream HOST:PORT or set 'upstream.address'{in_file}"
        )

    if any(issue.severity == "error" for issue in issues):
        raise ConfigError(issues)
    assert upstream_address is not None  # every path without one reported an error
    config = Config(
        listeners=listeners,
        upstream=UpstreamConfig(
            upstream_address,
            connect_timeout=timeout,
            greeting_timeout=greeting,
            tls=upstream_tls_config,
        ),
        session=session,
        limits=partial.limits,
        shutdown_grace=partial.shutdown_grace,
        audit=audit,
        policies=partial.policies,
        admin_listen=partial.admin_listen,
        workers=partial.workers if workers is None else workers,
        identity=partial.identity,
    )
    return config, issues


def _listen_tls_flags(
    report: Callable[[str, Literal["error", "warning"]], None],
    flag_path: Callable[[str, str], str | None],
    flag_mode: Callable[[str, str], ListenerTLSMode | None],
    *,
    listen: bool,
    mode: str | None,
    cert: str | None,
    key: str | None,
) -> ListenerTLS:
    """The TLS of the ``--listen`` listeners (part of :func:`build_config`)."""
    given = [
        flag
        for flag, value in (("--tls", mode), ("--tls-cert", cert), ("--tls-key", key))
        if value is not None
    ]
    if not given:
        return ListenerTLS()
    if not listen:
        report(
            f"{', '.join(given)}: the TLS flags apply to the --listen listeners; "
            "give --listen too, or set tls on the config file's listeners",
            "error",
        )
        return ListenerTLS()
    chosen: ListenerTLSMode | None = "none"
    if mode is not None:
        chosen = flag_mode("--tls", mode)
    cert_path = None if cert is None else flag_path("--tls-cert", cert)
    key_path = None if key is None else flag_path("--tls-key", key)
    if chosen is None:
        return ListenerTLS()
    if chosen == "none":
        if cert is not None or key is not None:
            report("--tls-cert and --tls-key need --tls implicit or --tls starttls", "error")
        return ListenerTLS()
    missing = [
        flag
        for flag, value in (("--tls-cert FILE", cert), ("--tls-key FILE", key))
        if value is None
    ]
    if missing:
        report(f"--tls {chosen}: missing {' and '.join(missing)}", "error")
        return ListenerTLS()
    if cert_path is None or key_path is None:
        return ListenerTLS()  # an empty path: reported
    problem = _cert_key_problem(cert_path, key_path)
    if problem is not None:
        which, message = problem
        report(f"--tls-{which}: {message}", "error")
        return ListenerTLS()
    return ListenerTLS(mode=chosen, cert=CertKey(cert_path, key_path))


def _upstream_tls_flags(
    base: UpstreamTLS,
    report: Callable[[str, Literal["error", "warning"]], None],
    flag_path: Callable[[str, str], str | None],
    flag_mode: Callable[[str, str], ListenerTLSMode | None],
    *,
    mode: str | None,
    ca_file: str | None,
    server_name: str | None,
    verify: bool | None,
) -> UpstreamTLS:
    """*base* with the upstream TLS flags applied (part of :func:`build_config`)."""
    values: dict[str, object] = {}
    given: list[str] = []
    if mode is not None:
        chosen = flag_mode("--upstream-tls", mode)
        if chosen is not None:
            values["mode"] = chosen
    if ca_file is not None:
        given.append("--upstream-ca-file")
        path = flag_path("--upstream-ca-file", ca_file)
        problem = None if path is None else _ca_file_problem(path)
        if problem is not None:
            report(f"--upstream-ca-file: {problem}", "error")
        elif path is not None:
            values["ca_file"] = path
    if server_name is not None:
        given.append("--upstream-server-name")
        problem = _server_name_problem(server_name)
        if problem is not None:
            report(f"--upstream-server-name: {problem}", "error")
        else:
            values["server_name"] = server_name
    if verify is not None:
        if not verify:
            given.append("--upstream-tls-insecure")
        values["verify"] = verify
    tls = dataclasses.replace(base, **values)  # type: ignore[arg-type]
    if mode is not None and "mode" not in values:
        return tls  # an invalid mode: reported
    if tls.mode == "none":
        for flag in given:
            report(
                f"{flag} has no effect without TLS to the upstream "
                "(--upstream-tls implicit|starttls, or upstream.tls)",
                "warning",
            )
    elif verify is False:
        report(f"--upstream-tls-insecure: {_VERIFY_OFF}", "warning")
    return tls
