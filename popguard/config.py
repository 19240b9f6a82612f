"""popguard's configuration: a YAML file, validated with file:line:column errors.

The file is read by :mod:`popguard.schema.nodes` (composed with PyYAML, so
every value keeps its position) and validated by the pydantic models of
:mod:`popguard.schema.config_models` (strict, unknown keys refused); every
problem is reported where it is, e.g.::

    popguard.yaml:7:17: error: session.idle_timeout: expected a number of seconds,
    got a string '600'; write numbers without quotes

and *all* problems are collected before :class:`ConfigError` is raised.
What needs more than one value (duplicate listeners, a certificate for
``tls: implicit``, settings that do nothing) is checked here, after the
models, with positions too.  ``popguard.example.yaml`` (repo root)
documents every key and its default; ``popguard config schema`` prints the
JSON Schema.

Loading in two steps
--------------------
A file may leave out ``listeners`` and ``upstream`` when the command line
supplies them (``--listen``, ``--upstream``), so the loader works in two steps:

* :func:`read_config` validates a file into a :class:`PartialConfig`, in
  which ``listeners`` may be empty and ``upstream_address`` may be ``None``.
* :func:`build_config` applies command-line flags over a base (a
  :class:`PartialConfig`, a :class:`Config` or nothing) and returns the
  finished :class:`Config`; it raises when still no listener or no upstream
  results.  Each flag's value is validated by the same model field as the
  file's key it overrides.

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
TLS settings come out as the dataclasses of :mod:`popguard.schema.tlsdata`
(re-exported by :mod:`popguard.shell.tls`): :class:`ListenerTLS` on each
listener, :class:`UpstreamTLS` on the upstream.  Certificate and key files
are read and loaded into a throwaway ``ssl.SSLContext`` at load time, so a
missing file, a non-PEM file, an encrypted key or a key that does not match
its certificate is reported at its line rather than at the first handshake.
Toward clients TLS 1.0 and 1.1 are refused (RFC 8996); toward the upstream
they, and ``tls_verify: false``, are accepted with a warning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import ipaddress
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from popguard.core.identity import DEFAULT_IDENTITY, IdentityRules
from popguard.core.limits import Limits
from popguard.schema.checks import (
    VERIFY_OFF,
    Address,
    address_key,
    cert_key_problem,
    parse_address,
    parse_listen_address,
    sni_name_problem,
)
from popguard.schema.config_models import (
    LIMIT_MINIMUMS,
    MAX_WORKERS,
    AdminModel,
    AuditModel,
    CertKeyModel,
    ConfigFile,
    ListenerModel,
    RetentionModel,
    SessionModel,
    SharedStateModel,
    SyslogModel,
    UpstreamModel,
)
from popguard.schema.errors import Wording, flag_issues, issues_from, model_fields_by_alias
from popguard.schema.issues import COMMAND_LINE, Issue, IssueError, Severity, has_errors
from popguard.schema.nodes import Document, Path, load_yaml, mark_position
from popguard.schema.syslogdata import DEFAULT_MAX_MESSAGE, DEFAULT_SD_ID
from popguard.schema.tlsdata import (
    DEFAULT_MIN_VERSION,
    CertKey,
    ListenerTLS,
    ListenerTLSMode,
    UpstreamTLS,
)

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
    "ProxyProtocolConfig",
    "SessionConfig",
    "SharedStateConfig",
    "SyslogTarget",
    "UpstreamConfig",
    "Workers",
    "admin_listen_flag",
    "build_config",
    "load_config",
    "parse_address",
    "parse_listen_address",
    "read_config",
    "workers_flag",
]

#: RFC 1939 §3: a POP3 server's autologout timer MUST be at least 10 minutes.
RFC1939_MIN_IDLE_TIMEOUT: Final = 600.0

_DEFAULT_CONNECT_TIMEOUT: Final = 10.0
#: From the upstream's TCP connection to its greeting.  A server that does a
#: slow reverse-DNS or ident lookup before greeting still fits in 30 s.
_DEFAULT_GREETING_TIMEOUT: Final = 30.0
_DEFAULT_SHUTDOWN_GRACE: Final = 10.0
#: ``workers:`` is a count of processes, or ``"auto"`` (one per CPU).
Workers = int | Literal["auto"]

#: One issue class for the config file, the policy files and the flags.
ConfigIssue = Issue


class ConfigError(IssueError):
    """The configuration is invalid.

    ``issues`` holds every error found (and any warnings found alongside
    them), in file order; ``str()`` lists them one per line.
    """


# --------------------------------------------------------------------------
# The configuration as data
# --------------------------------------------------------------------------


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
    #: With ``message_identity``: records name a message retrieved whole by
    #: the SHA-256 of its content too (docs/audit.md).
    content_digests: bool = True


@dataclass(frozen=True, slots=True)
class SharedStateConfig:
    """Where limits are counted across processes (``shared_state:``, docs/shared-state.md)."""

    url: str
    #: Absolute path of a file holding the store's password, or None.
    password_file: str | None = None
    #: Absolute path of the CA bundle for ``rediss://``, or None (system CAs).
    ca_file: str | None = None
    on_failure: OnFailure = "fail-open"
    lease_seconds: float = 30.0
    timeout_ms: int = 500


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
    #: Absolute path of the retention store (docs/retention.md), or None.
    retention_store: str | None = None
    #: The store limits are counted in across processes; None: this process.
    shared_state: SharedStateConfig | None = None
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
    retention_store: str | None = None
    shared_state: SharedStateConfig | None = None
    policies: str | None = None
    #: Where /metrics, /healthz and /readyz are served (None: nowhere).
    admin_listen: Address | None = None
    workers: Workers = 1
    identity: IdentityRules = DEFAULT_IDENTITY
    #: The file it was read from, as given to :func:`read_config`.
    source: str | None = None


# --------------------------------------------------------------------------
# How errors are worded
# --------------------------------------------------------------------------


def _keys(model: type[BaseModel]) -> tuple[str, ...]:
    return tuple(model_fields_by_alias(model))


_TOP_KEYS: Final = _keys(ConfigFile)


def _section_keys() -> dict[str, tuple[str, ...]]:
    sections: dict[str, tuple[str, ...]] = {}
    for name, info in ConfigFile.model_fields.items():
        members = getattr(info.annotation, "__args__", ())
        model = next((m for m in members if isinstance(m, type) and issubclass(m, BaseModel)), None)
        if model is not None:
            sections[name] = _keys(model)
    return sections


#: Every mapping section and its keys, for "did you mean" across sections.
_SECTIONS: Final = _section_keys()
#: Listener keys that belong to no other section, for "did you mean".
_LISTENER_ONLY_KEYS: Final = ("cert", "key", "sni")


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


def _label(path: Path) -> str:
    """``("listeners", 0, "listen")`` -> ``listeners[0].listen``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or "the configuration"


def _section(path: Path) -> str:
    if not path:
        return ""
    if path[0] == "listeners":
        return "proxy_protocol" if "proxy_protocol" in path else "listeners"
    if path[:2] == ("audit", "syslog"):
        return "audit.syslog"
    return str(path[0])


def _unknown_key(path: Path, name: str, allowed: Sequence[str]) -> str:
    what = f"{_label(path)}: unknown key" if path else "unknown top-level key"
    return f"{what} '{name}'{_suggest(name, allowed, _section(path))}"


_WORDING: Final = Wording(
    label=_label,
    unknown_key=_unknown_key,
    type_messages={
        "listeners": 'expected a list of listeners, got {got} (e.g. "- listen: 127.0.0.1:1110")',
        "audit.syslog": "expected a list of syslog targets, got {got} "
        '(e.g. "- address: 127.0.0.1:514")',
    },
    missing_hints={
        "listeners.*.listen": ' (e.g. listen: "127.0.0.1:1110")',
        "audit.syslog.*.address": ' (e.g. address: "127.0.0.1:514")',
        "listeners.*.proxy_protocol.trusted": " (the load balancers allowed to send a PROXY "
        'header, e.g. trusted: ["10.0.0.5/32"])',
    },
    examples={
        "listen": '"127.0.0.1:1110"',
        "address": '"127.0.0.1:110"',
        "server_name": '"mail.example.org"',
        "sd_id": '"popguard@32473"',
    },
)


def _syntax_hint(line: str) -> str:
    if re.search(r":\s*\[[0-9A-Fa-f:.%]*\]:", line):
        return '; quote IPv6 addresses, e.g. "[::1]:1110"'
    return ""


# --------------------------------------------------------------------------
# One field's value, validated on its own
# --------------------------------------------------------------------------

_STRICT: Final = ConfigDict(strict=True)
#: The validation context of command-line values: paths relative to the
#: current directory, and messages worded for flags.
_FLAGS: Final = {"flags": True}


@functools.cache
def _adapter(model: type[BaseModel], name: str) -> TypeAdapter[object]:
    info = model.model_fields[name]
    annotation: Any = info.annotation
    if info.metadata:
        annotation = Annotated[annotation, *info.metadata]
    return TypeAdapter(annotation, config=_STRICT)


def _valid(
    model: type[BaseModel], name: str, raw: object, context: Mapping[str, object]
) -> tuple[bool, object]:
    """``(True, value)`` when *raw* is a valid value of the field, else ``(False, None)``."""
    try:
        return True, _adapter(model, name).validate_python(raw, context=dict(context))
    except ValidationError:
        return False, None


def _parsed(raw: object, parse: Callable[[str], Address]) -> Address | None:
    if not isinstance(raw, str):
        return None
    try:
        return parse(raw)
    except ValueError:
        return None


def _is_empty(value: object) -> bool:
    """Null, ``{}`` or ``[]``: nothing given."""
    return value is None or value == {} or value == []


# --------------------------------------------------------------------------
# What needs more than one value
# --------------------------------------------------------------------------


class _Checks:
    """Checks across values, on the file's plain values (valid or not).

    They run whether or not the models accepted the file, so that a file's
    problems are all reported at once; a value the models refuse is left
    out here (its error is reported already).
    """

    def __init__(self, document: Document, base_dir: str) -> None:
        self.document = document
        self.context = {"base_dir": base_dir}
        self.issues: list[Issue] = []

    def report(
        self, path: Path | None, message: str, severity: Severity = "error", *, key: bool = False
    ) -> None:
        if path is None:
            self.issues.append(Issue(self.document.file, 0, 0, message, severity))
        else:
            self.issues.append(self.document.issue(path, message, severity, key=key))

    def run(self, data: Mapping[str, object]) -> None:
        self.listeners(data.get("listeners"))
        if isinstance(upstream := data.get("upstream"), dict):
            self.upstream(upstream)
        if isinstance(session := data.get("session"), dict):
            ok, value = _valid(SessionModel, "idle_timeout", session.get("idle_timeout"), {})
            if ok and isinstance(value, float) and value < RFC1939_MIN_IDLE_TIMEOUT:
                self.report(
                    ("session", "idle_timeout"),
                    _idle_timeout_warning(value, "session.idle_timeout"),
                    "warning",
                )
        if isinstance(audit := data.get("audit"), dict):
            self.audit(audit)
        workers = data.get("workers")
        if workers not in (None, 1) and data.get("shared_state") is None:
            self.report(("workers",), _PER_PROCESS_LIMITS, "warning")

    # -- listeners ---------------------------------------------------------

    def listeners(self, items: object) -> None:
        if not isinstance(items, list):
            return
        names: dict[str, Path] = {}
        addresses: dict[tuple[str, int], tuple[str, Path]] = {}
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                continue
            path: Path = ("listeners", index)
            where = f"listeners[{index}]"
            name: str | None = f"listener-{index}"
            name_path = path
            if "name" in item:
                ok, _ = _valid(ListenerModel, "name", item["name"], {})
                name = item["name"] if ok and isinstance(item["name"], str) else None
                name_path = (*path, "name")
            if name is not None:
                if name in names:
                    line, _ = self.document.position(names[name])
                    default = "" if "name" in item else " (the default name)"
                    self.report(
                        name_path,
                        f"{where}.name: duplicate listener name {name!r}{default}; "
                        f"already used on line {line}",
                    )
                    name = None
                else:
                    names[name] = name_path
            self.listener_tls(item, path, where)
            address = _parsed(item.get("listen"), parse_listen_address)
            if address is None:
                continue
            key = address_key(address)
            if key in addresses:
                other, other_path = addresses[key]
                line, _ = self.document.position(other_path)
                self.report(
                    (*path, "listen"),
                    f"{where}.listen: {address} is already used by listener {other!r} "
                    f"(line {line})",
                )
            elif name is not None:
                addresses[key] = (name, (*path, "listen"))

    def listener_tls(self, item: Mapping[str, object], path: Path, where: str) -> None:
        mode = item.get("tls", "none")
        known = mode in ("none", "implicit", "starttls")
        check = known and mode != "none"
        required = f"with tls: {mode}" if check else ""
        self.cert_key(item, path, where, ((*path, "tls"), False), required=required, check=check)
        if isinstance(sni := item.get("sni"), dict):
            self.sni(sni, (*path, "sni"), f"{where}.sni", check=check)
        if mode != "none":
            return
        # Settings that do nothing (defaults are never warned about).
        for name in ("cert", "key", "sni"):
            if name in item and not _is_empty(item[name]):
                self.report(
                    (*path, name),
                    f"{where}.{name}: cert/key ignored without tls; set {where}.tls "
                    "to implicit or starttls to use them",
                    "warning",
                    key=True,
                )
        if "tls_min_version" in item:
            ok, version = _valid(ListenerModel, "tls_min_version", item["tls_min_version"], {})
            if ok and version != DEFAULT_MIN_VERSION:
                self.report(
                    (*path, "tls_min_version"),
                    f"{where}.tls_min_version has no effect without tls",
                    "warning",
                    key=True,
                )

    def cert_key(
        self,
        entries: Mapping[str, object],
        path: Path,
        where: str,
        anchor: tuple[Path, bool],
        *,
        required: str,
        check: bool,
    ) -> None:
        """The ``cert`` and ``key`` of *entries*: both given (if *required*), and a pair.

        *required* (e.g. ``"with tls: implicit"``), if not empty, makes a
        missing one an error located at *anchor* (a path, and whether its key).
        """
        paths: dict[str, str] = {}
        missing: list[str] = []
        for name in ("cert", "key"):
            if entries.get(name) is None:
                missing.append(name)
                continue
            ok, value = _valid(CertKeyModel, name, entries[name], self.context)
            if ok and isinstance(value, str):
                paths[name] = value
        if missing:
            if required:
                needed = " and ".join(f"'{name}'" for name in missing)
                what = "a PEM certificate file" if missing == ["cert"] else "PEM files"
                if missing == ["key"]:
                    what = "a PEM private key file"
                anchor_path, on_key = anchor
                self.report(
                    anchor_path,
                    f"{where}: missing {needed} ({what}), required {required}",
                    key=on_key,
                )
            return
        if check and len(paths) == 2:
            problem = cert_key_problem(paths["cert"], paths["key"])
            if problem is not None:
                which, message = problem
                self.report((*path, which), f"{where}.{which}: {message}")

    def sni(self, entries: Mapping[str, object], path: Path, where: str, *, check: bool) -> None:
        """A listener's ``sni``: names given twice, and each name's pair."""
        seen: dict[str, Path] = {}
        for name, value in entries.items():
            item_path = (*path, name)
            if sni_name_problem(name) is None and name.lower() in seen:
                line, _ = self.document.position(seen[name.lower()], key=True)
                self.report(
                    item_path,
                    f"{where}: {name!r} is given twice (names are case-insensitive; "
                    f"first on line {line})",
                    key=True,
                )
            seen.setdefault(name.lower(), item_path)
            pair = {} if value is None else value
            if isinstance(pair, dict):
                anchor = (item_path, not isinstance(value, dict))
                self.cert_key(
                    pair,
                    item_path,
                    f"{where}.{name}",
                    anchor,
                    required="for each SNI name",
                    check=check,
                )

    # -- upstream ----------------------------------------------------------

    def upstream(self, entries: Mapping[str, object]) -> None:
        """Weakened security, and TLS keys that do nothing (defaults never warn)."""
        mode = entries.get("tls", "none")
        if mode not in ("none", "implicit", "starttls"):
            return
        defaults: dict[str, object] = {
            "ca_file": None,
            "server_name": None,
            "tls_verify": True,
            "tls_min_version": DEFAULT_MIN_VERSION,
        }
        values: dict[str, object] = {}
        for key, default in defaults.items():
            if key in entries:
                ok, value = _valid(UpstreamModel, key, entries[key], self.context)
                if ok and value != default:
                    values[key] = value
        if mode == "none":
            for key in values:
                self.report(
                    ("upstream", key),
                    f"upstream.{key} has no effect without upstream.tls (implicit or starttls)",
                    "warning",
                    key=True,
                )
            return
        if "tls_verify" in values:
            self.report(("upstream", "tls_verify"), f"upstream.tls_verify: {VERIFY_OFF}", "warning")
            if "ca_file" in values:
                self.report(
                    ("upstream", "ca_file"),
                    "upstream.ca_file has no effect with tls_verify: false",
                    "warning",
                    key=True,
                )
        version = values.get("tls_min_version")
        if version in ("TLSv1", "TLSv1.1"):
            self.report(
                ("upstream", "tls_min_version"),
                f"upstream.tls_min_version: legacy TLS version allowed for the upstream: "
                f"{version} (RFC 8996 deprecates TLS 1.0 and 1.1; allow it only for a server "
                "that cannot do TLS 1.2)",
                "warning",
            )

    # -- audit -------------------------------------------------------------

    def audit(self, entries: Mapping[str, object]) -> None:
        """Keys set to something other than their default, to no effect.

        (Defaults are never warned about: the example file lists them all.)
        """
        default = AuditConfig()
        values: dict[str, object] = {}
        for name in ("file", "fsync", "fsync_interval_ms", "hmac_key_file", "on_failure"):
            if name in entries:
                ok, value = _valid(AuditModel, name, entries[name], self.context)
                if ok:
                    values[name] = value

        def changed(name: str) -> bool:
            return name in values and values[name] != getattr(default, name)

        if values.get("file") is None:
            for name in ("fsync", "fsync_interval_ms", "hmac_key_file"):
                if changed(name):
                    self.report(
                        ("audit", name),
                        f"audit.{name} has no effect without audit.file",
                        "warning",
                        key=True,
                    )
            if changed("on_failure"):
                self.report(
                    ("audit", "on_failure"),
                    "audit.on_failure: fail-closed has no effect without audit.file "
                    "(only the audit file is a durable sink)",
                    "warning",
                    key=True,
                )
        else:
            fsync = values.get("fsync", default.fsync)
            if fsync != "interval" and changed("fsync_interval_ms"):
                self.report(
                    ("audit", "fsync_interval_ms"),
                    f"audit.fsync_interval_ms has no effect with fsync: {fsync}",
                    "warning",
                    key=True,
                )
        if isinstance(targets := entries.get("syslog"), list):
            self.syslog(targets)

    def syslog(self, targets: Sequence[object]) -> None:
        seen: dict[tuple[str, tuple[str, int]], int] = {}
        for index, item in enumerate(targets):
            try:
                target = SyslogModel.model_validate(item, context=self.context)
            except ValidationError:
                continue  # reported by the models
            address = parse_address(target.address)
            key = (target.transport, address_key(address))
            if key in seen:
                self.report(
                    ("audit", "syslog", index, "address"),
                    f"audit.syslog[{index}].address: {target.transport} {address} is already "
                    f"audit.syslog[{seen[key]}]; every record would be sent twice",
                    "warning",
                )
            seen[key] = index

    # -- a file complete on its own ----------------------------------------

    def require_complete(self, data: object) -> None:
        """Report a missing listener or upstream address (for :func:`load_config`).

        Only what is absent is reported here: a listener or an address that
        is present but invalid has its own error already.
        """
        if data is None:
            data = {}
        if not isinstance(data, dict):
            return  # not a mapping: reported already
        if "listeners" not in data:
            self.report(None, "no listener configured: add a 'listeners:' section")
        elif data["listeners"] is None:
            self.report(("listeners",), "listeners: no listener configured", key=True)
        if "upstream" not in data:
            self.report(None, "no upstream configured: add an 'upstream:' section")
        elif data["upstream"] is None:
            self.report(("upstream",), "upstream: missing required key 'address'", key=True)
        elif isinstance(data["upstream"], dict) and "address" not in data["upstream"]:
            self.report(("upstream",), "upstream: missing required key 'address'")


#: Said of ``workers`` other than 1 without ``shared_state:``.
_PER_PROCESS_LIMITS: Final = (
    "limits and login throttles count per worker without shared_state (a per-user "
    "limit of 3 admits 3 per worker); see docs/shared-state.md"
)


def _idle_timeout_warning(value: float, where: str) -> str:
    return (
        f"{where} is {value:g} seconds, below 600: RFC 1939 §3 requires a POP3 "
        "server's inactivity autologout timer to be at least 10 minutes"
    )


# --------------------------------------------------------------------------
# From the validated model to the configuration
# --------------------------------------------------------------------------


def _listener(index: int, model: ListenerModel) -> ListenerConfig:
    tls = ListenerTLS()
    if model.tls != "none":
        assert model.cert is not None
        assert model.key is not None
        sni = {
            name: CertKey(pair.cert, pair.key)
            for name, pair in (model.sni or {}).items()
            if pair is not None and pair.cert is not None and pair.key is not None
        }
        tls = ListenerTLS(
            mode=model.tls,
            cert=CertKey(model.cert, model.key),
            sni=sni,
            min_version=model.tls_min_version,
        )
    proxy = None
    if model.proxy_protocol is not None:
        given = model.proxy_protocol
        proxy = ProxyProtocolConfig(
            tuple(ipaddress.ip_network(text, strict=True) for text in given.trusted),
            given.required,
            given.timeout,
        )
    return ListenerConfig(
        model.name or f"listener-{index}",
        parse_listen_address(model.listen),
        tls,
        proxy,
        model.send_proxy,
    )


def _audit(model: AuditModel) -> AuditConfig:
    targets = tuple(
        SyslogTarget(
            address=parse_address(target.address),
            transport=target.transport,
            facility=target.facility,
            max_message=target.max_message or 0,
            sd_id=target.sd_id,
        )
        for target in model.syslog or ()
    )
    return AuditConfig(
        file=model.file,
        console=model.console,
        stdout=model.stdout,
        fsync=model.fsync,
        fsync_interval_ms=model.fsync_interval_ms,
        queue_size=model.queue_size,
        on_failure=model.on_failure,
        hmac_key_file=model.hmac_key_file,
        durable_timeout_ms=model.durable_timeout_ms,
        syslog=targets,
        message_identity=model.message_identity,
        content_digests=model.content_digests,
    )


def _shared_state(model: SharedStateModel | None) -> SharedStateConfig | None:
    if model is None:
        return None
    return SharedStateConfig(
        url=model.url,
        password_file=model.password_file,
        ca_file=model.ca_file,
        on_failure=model.on_failure,
        lease_seconds=model.lease_seconds,
        timeout_ms=model.timeout_ms,
    )


def _partial(model: ConfigFile, source: str) -> PartialConfig:
    upstream = model.upstream or UpstreamModel()
    session = model.session or SessionModel()
    identity = DEFAULT_IDENTITY
    if model.identity is not None:
        given = {name: getattr(model.identity, name) for name in model.identity.model_fields_set}
        identity = dataclasses.replace(DEFAULT_IDENTITY, **given)
    admin = model.admin.listen if model.admin is not None else None
    return PartialConfig(
        listeners=tuple(_listener(index, item) for index, item in enumerate(model.listeners or ())),
        upstream_address=None if upstream.address is None else parse_address(upstream.address),
        connect_timeout=upstream.connect_timeout,
        greeting_timeout=upstream.greeting_timeout,
        upstream_tls=UpstreamTLS(
            mode=upstream.tls,
            ca_file=upstream.ca_file,
            server_name=upstream.server_name,
            verify=upstream.tls_verify,
            min_version=upstream.tls_min_version,
        ),
        session=SessionConfig(
            idle_timeout=session.idle_timeout,
            idle_notice=session.idle_notice,
            login_timeout=session.login_timeout,
        ),
        limits=Limits(**model.limits.model_dump()) if model.limits is not None else Limits(),
        shutdown_grace=model.shutdown.grace_period if model.shutdown else _DEFAULT_SHUTDOWN_GRACE,
        audit=_audit(model.audit) if model.audit is not None else AuditConfig(),
        retention_store=model.retention.store if model.retention is not None else None,
        shared_state=_shared_state(model.shared_state),
        policies=model.policies,
        admin_listen=None if admin is None else parse_listen_address(admin),
        workers=model.workers,
        identity=identity,
        source=source,
    )


def _read(
    path: str | os.PathLike[str], *, require_complete: bool
) -> tuple[PartialConfig, list[ConfigIssue]]:
    file = os.fspath(path)
    loaded = load_yaml(file, "config file", _syntax_hint)
    document = loaded.document
    if document is None:
        raise ConfigError(loaded.issues)
    issues = [
        Issue(
            file,
            *mark_position(problem.node.start_mark),
            f"{_label(problem.path)}: {problem.message}",
        )
        for problem in loaded.problems
    ]
    base_dir = os.path.dirname(os.path.abspath(file))
    data = {} if document.data is None else document.data
    model: ConfigFile | None = None
    try:
        model = ConfigFile.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        issues += issues_from(exc, document, ConfigFile, _WORDING)
    checks = _Checks(document, base_dir)
    if isinstance(data, dict):
        checks.run(data)
    if require_complete:
        checks.require_complete(document.data)
    issues = sorted([*issues, *checks.issues], key=lambda issue: (issue.line, issue.column))
    if model is None or has_errors(issues):
        raise ConfigError(issues)
    return _partial(model, file), issues


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
    workers: int | str | None = None,
    retention_dir: str | None = None,
    shared_state_url: str | None = None,
) -> tuple[Config, list[ConfigIssue]]:
    """Apply command-line flags over *base* (a file's config, or defaults).

    Flags win.  Each flag's value is validated by the model field of the
    config key it overrides (``--idle-timeout`` by ``session.idle_timeout``,
    ...), so a flag accepts what the file accepts.  ``listen`` given
    replaces the base's listeners, which are named ``cli-0``, ``cli-1``, ...
    A relative ``audit_file`` is made absolute against the current directory.

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
    listener or no upstream results.  ``workers`` is a count or ``"auto"``
    (a flag's text is passed on: the model says what it may be).
    """
    partial = _as_partial(base)
    flags = _Flags()

    cli_tls = _listen_tls_flags(
        flags, listen=bool(listen), mode=listen_tls, cert=tls_cert, key=tls_key
    )

    listeners = partial.listeners
    if listen:
        parsed: list[ListenerConfig] = []
        seen: dict[tuple[str, int], str] = {}
        for index, text in enumerate(listen):
            ok, _ = flags.value(ListenerModel, "listen", text, "--listen")
            if not ok:
                continue
            address = parse_listen_address(text)
            key = address_key(address)
            if key in seen:
                flags.report(f"--listen: {address} is given twice ({seen[key]!r} and {text!r})")
                continue
            seen[key] = text
            parsed.append(ListenerConfig(f"cli-{index}", address, cli_tls))
        listeners = tuple(parsed)

    upstream_address = partial.upstream_address
    if upstream is not None:
        ok, _ = flags.value(UpstreamModel, "address", upstream, "--upstream")
        if ok:
            upstream_address = parse_address(upstream)

    upstream_tls_config = _upstream_tls_flags(
        partial.upstream_tls,
        flags,
        mode=upstream_tls,
        ca_file=upstream_ca_file,
        server_name=upstream_server_name,
        verify=upstream_tls_verify,
    )

    timeout = flags.seconds(UpstreamModel, "connect_timeout", connect_timeout, "--connect-timeout")
    greeting = flags.seconds(
        UpstreamModel, "greeting_timeout", greeting_timeout, "--greeting-timeout"
    )
    session = partial.session
    idle = flags.seconds(SessionModel, "idle_timeout", idle_timeout, "--idle-timeout")
    if idle is not None:
        session = dataclasses.replace(session, idle_timeout=idle)
        if idle < RFC1939_MIN_IDLE_TIMEOUT:
            flags.report(_idle_timeout_warning(idle, "--idle-timeout"), "warning")
    login = flags.seconds(SessionModel, "login_timeout", login_timeout, "--login-timeout")
    if login is not None:
        session = dataclasses.replace(session, login_timeout=login)

    audit = partial.audit
    if audit_file is not None:
        ok, path = flags.value(AuditModel, "file", audit_file, "--audit-file")
        if ok and isinstance(path, str):
            audit = dataclasses.replace(audit, file=path)
    if console is not None:
        audit = dataclasses.replace(audit, console=console)

    retention_store = partial.retention_store
    if retention_dir is not None:
        ok, path = flags.value(RetentionModel, "store", retention_dir, "--retention-dir")
        if ok and isinstance(path, str):
            retention_store = path

    chosen_workers = partial.workers
    if workers is not None:
        ok, value = flags.value(ConfigFile, "workers", workers, "--workers")
        if ok and (value == "auto" or isinstance(value, int)):
            chosen_workers = value

    shared_state = partial.shared_state
    if shared_state_url is not None:
        ok, url = flags.value(SharedStateModel, "url", shared_state_url, "--shared-state")
        if ok and isinstance(url, str):
            base_state = shared_state or SharedStateConfig(url)
            shared_state = dataclasses.replace(base_state, url=url)
    if workers is not None and chosen_workers != 1 and shared_state is None:
        flags.report(f"--workers: {_PER_PROCESS_LIMITS}", "warning")

    in_file = f" in {partial.source}" if partial.source else " in the config file"
    if not listeners and not listen:
        flags.report(
            f"no listener configured: pass --listen HOST:PORT or add 'listeners:'{in_file}"
        )
    if upstream_address is None and upstream is None:
        flags.report(
            f"no upstream configured: pass --upstream HOST:PORT or set 'upstream.address'{in_file}"
        )

    if has_errors(flags.issues):
        raise ConfigError(flags.issues)
    assert upstream_address is not None  # every path without one reported an error
    config = Config(
        listeners=listeners,
        upstream=UpstreamConfig(
            upstream_address,
            connect_timeout=partial.connect_timeout if timeout is None else timeout,
            greeting_timeout=partial.greeting_timeout if greeting is None else greeting,
            tls=upstream_tls_config,
        ),
        session=session,
        limits=partial.limits,
        shutdown_grace=partial.shutdown_grace,
        audit=audit,
        retention_store=retention_store,
        shared_state=shared_state,
        policies=partial.policies,
        admin_listen=partial.admin_listen,
        workers=chosen_workers,
        identity=partial.identity,
    )
    return config, flags.issues


def admin_listen_flag(text: str) -> Address:
    """``--admin-listen``'s value, validated as ``admin.listen`` is.

    Raises :class:`ConfigError` (file ``"<command line>"``) when it is invalid.
    """
    flags = _Flags()
    ok, _ = flags.value(AdminModel, "listen", text, "--admin-listen")
    if not ok:
        raise ConfigError(flags.issues)
    return parse_listen_address(text)


def workers_flag(text: str) -> Workers:
    """``--workers``'s value (a count, or ``auto``), validated as ``workers:`` is.

    Raises :class:`ConfigError` (file ``"<command line>"``) when it is invalid.
    """
    raw: int | str = text
    with contextlib.suppress(ValueError):
        raw = int(text)
    flags = _Flags()
    ok, value = flags.value(ConfigFile, "workers", raw, "--workers")
    if not ok:
        raise ConfigError(flags.issues)
    return "auto" if value == "auto" else int(str(value))


def _as_partial(base: Config | PartialConfig | None) -> PartialConfig:
    if base is None:
        return PartialConfig()
    if isinstance(base, PartialConfig):
        return base
    return PartialConfig(
        listeners=base.listeners,
        upstream_address=base.upstream.address,
        connect_timeout=base.upstream.connect_timeout,
        greeting_timeout=base.upstream.greeting_timeout,
        upstream_tls=base.upstream.tls,
        session=base.session,
        limits=base.limits,
        shutdown_grace=base.shutdown_grace,
        audit=base.audit,
        retention_store=base.retention_store,
        shared_state=base.shared_state,
        policies=base.policies,
        admin_listen=base.admin_listen,
        workers=base.workers,
        identity=base.identity,
    )


class _Flags:
    """Command-line values, validated by the model fields of the keys they override."""

    def __init__(self) -> None:
        self.issues: list[ConfigIssue] = []

    def report(self, message: str, severity: Severity = "error") -> None:
        self.issues.append(Issue(COMMAND_LINE, 0, 0, message, severity))

    def value(
        self, model: type[BaseModel], name: str, raw: object, flag: str
    ) -> tuple[bool, object]:
        """``(True, value)``, or ``(False, None)`` with the errors reported as *flag*'s."""
        try:
            return True, _adapter(model, name).validate_python(raw, context=dict(_FLAGS))
        except ValidationError as exc:
            for message in flag_issues(exc, flag):
                self.report(message)
            return False, None

    def seconds(
        self, model: type[BaseModel], name: str, raw: float | None, flag: str
    ) -> float | None:
        if raw is None:
            return None
        ok, value = self.value(model, name, raw, flag)
        return float(value) if ok and isinstance(value, float | int) else None


_TLS_MODES: Final[Mapping[str, ListenerTLSMode]] = {
    "none": "none",
    "implicit": "implicit",
    "starttls": "starttls",
}


def _listen_tls_flags(
    flags: _Flags, *, listen: bool, mode: str | None, cert: str | None, key: str | None
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
        flags.report(
            f"{', '.join(given)}: the TLS flags apply to the --listen listeners; "
            "give --listen too, or set tls on the config file's listeners"
        )
        return ListenerTLS()
    chosen: ListenerTLSMode | None = "none"
    if mode is not None:
        ok, value = flags.value(ListenerModel, "tls", mode, "--tls")
        chosen = _TLS_MODES.get(str(value)) if ok else None
    cert_ok, cert_path = True, None
    if cert is not None:
        cert_ok, cert_path = flags.value(CertKeyModel, "cert", cert, "--tls-cert")
    key_ok, key_path = True, None
    if key is not None:
        key_ok, key_path = flags.value(CertKeyModel, "key", key, "--tls-key")
    if chosen is None:
        return ListenerTLS()
    if chosen == "none":
        if cert is not None or key is not None:
            flags.report("--tls-cert and --tls-key need --tls implicit or --tls starttls")
        return ListenerTLS()
    missing = [
        flag
        for flag, value in (("--tls-cert FILE", cert), ("--tls-key FILE", key))
        if value is None
    ]
    if missing:
        flags.report(f"--tls {chosen}: missing {' and '.join(missing)}")
        return ListenerTLS()
    if not (cert_ok and key_ok and isinstance(cert_path, str) and isinstance(key_path, str)):
        return ListenerTLS()  # an empty path: reported
    problem = cert_key_problem(cert_path, key_path)
    if problem is not None:
        which, message = problem
        flags.report(f"--tls-{which}: {message}")
        return ListenerTLS()
    return ListenerTLS(mode=chosen, cert=CertKey(cert_path, key_path))


def _upstream_tls_flags(
    base: UpstreamTLS,
    flags: _Flags,
    *,
    mode: str | None,
    ca_file: str | None,
    server_name: str | None,
    verify: bool | None,
) -> UpstreamTLS:
    """*base* with the upstream TLS flags applied (part of :func:`build_config`)."""
    tls = base
    given: list[str] = []
    mode_ok = True
    if mode is not None:
        mode_ok, value = flags.value(UpstreamModel, "tls", mode, "--upstream-tls")
        if mode_ok:
            tls = dataclasses.replace(tls, mode=_TLS_MODES[str(value)])
    if ca_file is not None:
        given.append("--upstream-ca-file")
        ok, path = flags.value(UpstreamModel, "ca_file", ca_file, "--upstream-ca-file")
        if ok and isinstance(path, str):
            tls = dataclasses.replace(tls, ca_file=path)
    if server_name is not None:
        given.append("--upstream-server-name")
        ok, _ = flags.value(UpstreamModel, "server_name", server_name, "--upstream-server-name")
        if ok:
            tls = dataclasses.replace(tls, server_name=server_name)
    if verify is not None:
        if not verify:
            given.append("--upstream-tls-insecure")
        tls = dataclasses.replace(tls, verify=verify)
    if not mode_ok:
        return tls  # an invalid mode: reported
    if tls.mode == "none":
        for flag in given:
            flags.report(
                f"{flag} has no effect without TLS to the upstream "
                "(--upstream-tls implicit|starttls, or upstream.tls)",
                "warning",
            )
    elif verify is False:
        flags.report(f"--upstream-tls-insecure: {VERIFY_OFF}", "warning")
    return tls
