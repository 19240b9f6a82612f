"""The config file's schema: pydantic models, strict, unknown keys refused.

One model per section (``listeners[]``, ``upstream``, ``session``, ...),
validated from the plain values :mod:`.nodes` made of the YAML.  Every
check that needs one value only is a validator here (addresses, ranges,
file paths, readable CA and key files), raising :func:`.errors.fail` with
popguard's message; checks across values (duplicate listeners, a
certificate for ``tls: implicit``, warnings) are in :mod:`popguard.config`.

Paths are resolved while validating, against ``base_dir`` of the
validation context (the config file's directory; the current directory
for flags), so a validated model holds absolute paths.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    PlainValidator,
    ValidationInfo,
    WithJsonSchema,
    create_model,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError, core_schema

from popguard.core.limits import Limits
from popguard.schema.checks import (
    ca_file_problem,
    identity_problem,
    parse_address,
    parse_listen_address,
    seconds_problem,
    server_name_problem,
    sni_name_problem,
)
from popguard.schema.errors import choice_message, fail, not_null
from popguard.schema.keyfile import ChainError, load_key
from popguard.schema.syslogdata import (
    DEFAULT_SD_ID,
    FACILITIES,
    MAX_UDP_MESSAGE,
    MIN_MESSAGE,
    valid_sd_id,
)
from popguard.schema.tlsdata import DEFAULT_MIN_VERSION

#: ``workers:`` at most.
MAX_WORKERS: Final = 256
#: The largest ``max_message`` accepted for TCP targets.
MAX_TCP_MESSAGE: Final = 1 << 20

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

#: Above this an int is no float (``float(10**400)`` overflows).
_LARGEST_FLOAT_INT: Final = 2**1024

_LISTENER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")


class Model(BaseModel):
    """Strict (``"600"`` is no number, ``1`` no boolean); unknown keys are errors."""

    model_config = ConfigDict(
        strict=True, extra="forbid", frozen=True, use_attribute_docstrings=True
    )


# --------------------------------------------------------------------------
# Value types
# --------------------------------------------------------------------------


def _no_overflow(value: object) -> object:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= _LARGEST_FLOAT_INT:
        fail(f"must be a finite number of seconds, got {'inf' if value > 0 else '-inf'}")
    return value


def _seconds(*, allow_zero: bool) -> Callable[[float], float]:
    def check(value: float) -> float:
        problem = seconds_problem(value, allow_zero=allow_zero)
        if problem is not None:
            fail(problem)
        return float(value)

    return check


#: A number of seconds greater than 0 (an integer or a float, not a string).
Seconds = Annotated[
    float,
    BeforeValidator(_no_overflow),
    AfterValidator(_seconds(allow_zero=False)),
    Field(json_schema_extra={"exclusiveMinimum": 0}),
]
#: A number of seconds, 0 or more.
SecondsOrZero = Annotated[
    float,
    BeforeValidator(_no_overflow),
    AfterValidator(_seconds(allow_zero=True)),
    Field(json_schema_extra={"minimum": 0}),
]


@dataclass(frozen=True, slots=True)
class AtLeast:
    """``Annotated[int, AtLeast(1, reason)]``: values below the minimum are refused, with why."""

    minimum: int
    reason: str

    def __get_pydantic_core_schema__(
        self, source: type[Any], handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(self._check, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        json_schema = handler(schema)
        json_schema["minimum"] = self.minimum
        return json_schema

    def _check(self, value: int) -> int:
        if value < self.minimum:
            fail(f"must be at least {self.minimum} ({self.reason}), got {value}")
        return value


def _base_dir(info: ValidationInfo) -> str:
    context = info.context if isinstance(info.context, dict) else {}
    return str(context.get("base_dir") or os.getcwd())


def _from_flags(info: ValidationInfo) -> bool:
    return isinstance(info.context, dict) and bool(info.context.get("flags"))


def _path(value: str, info: ValidationInfo) -> str:
    """Non-empty; made absolute against the base directory, ``~`` expanded."""
    if not value:
        fail("empty path" if _from_flags(info) else "empty path (use null for none)")
    return os.path.normpath(os.path.join(_base_dir(info), os.path.expanduser(value)))


def _ca_file(value: str, info: ValidationInfo) -> str:
    problem = ca_file_problem(value)
    if problem is not None:
        fail(problem)
    return value


def _hmac_key_file(value: str, info: ValidationInfo) -> str:
    try:
        load_key(value)
    except ChainError as exc:
        fail(str(exc))
    return value


#: A file or directory path, relative to the config file's directory.
FilePath = Annotated[str, AfterValidator(_path)]
#: PEM CA certificates to verify the upstream with (checked to load).
CAFile = Annotated[str, AfterValidator(_path), AfterValidator(_ca_file)]
#: The HMAC key of the audit hash chain (checked: mode 600, 32 bytes or more).
HMACKeyFile = Annotated[str, AfterValidator(_path), AfterValidator(_hmac_key_file)]


def _listen_address(value: str) -> str:
    try:
        parse_listen_address(value)
    except ValueError as exc:
        fail(str(exc))
    return value


def _address(value: str) -> str:
    try:
        parse_address(value)
    except ValueError as exc:
        fail(str(exc))
    return value


#: ``IP:PORT`` or ``localhost:PORT``; IPv6 in brackets: ``"[::1]:1110"``.
ListenAddress = Annotated[
    str,
    AfterValidator(_listen_address),
    Field(examples=["127.0.0.1:1110", "[::1]:1110"]),
]
#: ``HOST:PORT``: an IP literal or a DNS name; IPv6 in brackets.
HostAddress = Annotated[
    str, AfterValidator(_address), Field(examples=["127.0.0.1:110", "mail.example.org:110"])
]


def _problem_check(problem: Callable[[str], str | None]) -> Callable[[str], str]:
    def check(value: str) -> str:
        found = problem(value)
        if found is not None:
            fail(found)
        return value

    return check


def _choice(allowed: tuple[str, ...]) -> Callable[[str], str]:
    """One of *allowed*; for choices too many for a readable ``Literal``."""

    def check(value: str) -> str:
        if value not in allowed:
            fail(choice_message(value, allowed, repr(value)))
        return value

    return check


TLSMode = Literal["none", "implicit", "starttls"]
TLSVersion = Literal["TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"]
ClientTLSVersion = Literal["TLSv1.2", "TLSv1.3"]


def _client_version(value: object) -> object:
    if value in ("TLSv1", "TLSv1.1"):
        fail(
            f"{value} is not allowed toward clients: RFC 8996 deprecates TLS 1.0 and 1.1; "
            "use TLSv1.2 or TLSv1.3 (only the upstream side has a legacy opt-in)"
        )
    return value


# --------------------------------------------------------------------------
# Listeners
# --------------------------------------------------------------------------


def _listener_name(value: str) -> str:
    if not _LISTENER_NAME.match(value):
        fail(
            f"invalid name {value!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


class CertKeyModel(Model):
    """A certificate and its key, PEM files (they may be the same file)."""

    cert: FilePath | None = None
    """The certificate chain, PEM."""
    key: FilePath | None = None
    """Its private key, PEM, not encrypted."""


def _network(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        fail(str(exc))
    return value


def _one_or_more(value: object) -> object:
    return [value] if isinstance(value, str) else value


def _not_empty(value: list[str]) -> list[str]:
    if not value:
        fail("the list is empty")
    return value


class ProxyProtocolModel(Model):
    """Accept HAProxy's PROXY header (v1 or v2) from these peers."""

    trusted: Annotated[
        list[Annotated[str, AfterValidator(_network)]],
        BeforeValidator(_one_or_more),
        AfterValidator(_not_empty),
    ]
    """The load balancers allowed to send a PROXY header: networks, e.g. 10.0.0.5/32."""
    required: bool = True
    """A trusted peer that sends no header is refused (else served as itself)."""
    timeout: Seconds = 5.0
    """Seconds to wait for the header (at least 3, as the spec asks)."""

    @model_validator(mode="after")
    def _long_enough(self) -> ProxyProtocolModel:
        if self.timeout < 3:
            fail(
                f"{self.timeout:g} s is too short; the PROXY protocol spec asks receivers "
                "to wait at least 3 seconds",
                at=("timeout",),
            )
        return self


class ListenerModel(Model):
    """An address popguard accepts POP3 clients on."""

    name: Annotated[
        Annotated[str, AfterValidator(_listener_name)] | None,
        BeforeValidator(not_null("expected a string")),
    ] = None
    """Names the listener in records and policies (default: listener-INDEX)."""
    listen: ListenAddress
    tls: TLSMode = "none"
    """implicit: POP3S (RFC 8314); starttls: STLS offered (RFC 2595)."""
    cert: FilePath | None = None
    """PEM certificate chain, for tls: implicit or starttls."""
    key: FilePath | None = None
    """PEM private key (not encrypted)."""
    sni: (
        dict[Annotated[str, AfterValidator(_problem_check(sni_name_problem))], CertKeyModel | None]
        | None
    ) = None
    """Other certificates by the server name clients ask for (SNI)."""
    tls_min_version: Annotated[ClientTLSVersion, BeforeValidator(_client_version)] = (
        DEFAULT_MIN_VERSION
    )
    proxy_protocol: ProxyProtocolModel | None = None
    send_proxy: Literal["none", "v1", "v2"] = "none"
    """Send a PROXY header to the upstream, so the server sees the real client."""


def _listeners_not_empty(value: list[ListenerModel]) -> list[ListenerModel]:
    if not value:
        fail(
            "the list is empty; configure at least one listener "
            "(or leave 'listeners' out and pass --listen)"
        )
    return value


# --------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------


class UpstreamModel(Model):
    """The POP3 server popguard relays to."""

    address: Annotated[HostAddress | None, BeforeValidator(not_null("expected a string"))] = None
    connect_timeout: Seconds = 10.0
    greeting_timeout: Seconds = 30.0
    """Seconds from the TCP connection to the server's greeting."""
    tls: TLSMode = "none"
    ca_file: CAFile | None = None
    """CA bundle to verify the server with (default: the system's store)."""
    server_name: Annotated[str, AfterValidator(_problem_check(server_name_problem))] | None = None
    """The name to verify and send as SNI (default: the address's host)."""
    tls_verify: bool = True
    tls_min_version: TLSVersion = DEFAULT_MIN_VERSION


def _login_timeout_not_null(value: object) -> object:
    if value is None:
        fail("expected a number of seconds, got null; write 0 for no limit")
    return value


class SessionModel(Model):
    idle_timeout: Seconds = 600.0
    """Seconds a session may stay silent (RFC 1939 §3: at least 600)."""
    idle_notice: bool = True
    """Send -ERR Disconnected for inactivity. before closing an idle session."""
    login_timeout: Annotated[SecondsOrZero, BeforeValidator(_login_timeout_not_null)] = 60.0
    """Seconds from connecting to a successful login; 0: no limit."""


def _limit_field(name: str) -> tuple[object, object]:
    minimum, reason = LIMIT_MINIMUMS.get(name, (1, "it cannot be less"))
    return (Annotated[int, AtLeast(minimum, reason)], getattr(Limits(), name))


#: ``limits:``: one integer key per field of :class:`~popguard.core.limits.Limits`.
LimitsModel: type[Model] = create_model(  # type: ignore[call-overload]
    "LimitsModel",
    __base__=Model,
    **{name: _limit_field(name) for name in Limits.__dataclass_fields__},
)


class ShutdownModel(Model):
    grace_period: SecondsOrZero = 10.0
    """Seconds open sessions get on SIGTERM/SIGINT before they are closed."""


def _sd_id(value: str) -> str:
    if not valid_sd_id(value):
        fail(
            f"invalid SD-ID {value!r}: write NAME@ENTERPRISE-NUMBER (RFC 5424 §7.2.2), "
            "e.g. popguard@32473"
        )
    return value


class SyslogModel(Model):
    """An RFC 5424 syslog receiver."""

    address: HostAddress
    transport: Literal["udp", "tcp"] = "udp"
    facility: Annotated[
        str,
        AfterValidator(_choice(tuple(FACILITIES))),
        WithJsonSchema({"enum": list(FACILITIES)}),
    ] = "auth"
    max_message: Annotated[
        Annotated[int, AtLeast(MIN_MESSAGE, "RFC 5426 §3.2: every receiver accepts 480 octets")]
        | None,
        BeforeValidator(not_null("expected an integer")),
    ] = None
    """Longest message in octets (default 2048 for UDP, 8192 for TCP)."""
    sd_id: Annotated[str, AfterValidator(_sd_id)] = DEFAULT_SD_ID

    @model_validator(mode="after")
    def _fits_transport(self) -> SyslogModel:
        upper = MAX_UDP_MESSAGE if self.transport == "udp" else MAX_TCP_MESSAGE
        if self.max_message is not None and self.max_message > upper:
            why = "the largest UDP payload" if self.transport == "udp" else "1 MiB"
            fail(
                f"must be at most {upper} ({why}) for {self.transport}, got {self.max_message}",
                at=("max_message",),
            )
        return self


class AuditModel(Model):
    file: FilePath | None = None
    """The JSON-lines audit file (null: none)."""
    console: bool = True
    stdout: bool = False
    fsync: Literal["always", "interval", "never"] = "interval"
    fsync_interval_ms: Annotated[int, AtLeast(1, "milliseconds between fsyncs")] = 200
    queue_size: Annotated[int, AtLeast(1, "a queue holds a record or more")] = 10000
    on_failure: Literal["fail-open", "fail-closed"] = "fail-open"
    hmac_key_file: HMACKeyFile | None = None
    durable_timeout_ms: Annotated[int, AtLeast(1, "a wait of a millisecond or more")] = 5000
    syslog: list[SyslogModel] | None = None
    message_identity: bool = True
    """Look up each message's UIDL and size upstream, so records name it durably
    (skipped when no sink would record it and no retention store is set)."""
    content_digests: bool = True
    """With message_identity: name each message retrieved whole by its SHA-256 too."""


def _identity_string(name: str) -> Callable[[str], str]:
    return _problem_check(lambda text: identity_problem(name, text))


class IdentityModel(Model):
    """How the upstream maps login names to accounts (docs/identity.md)."""

    case: Literal["lower", "exact"] = "lower"
    domain: Literal["keep", "strip"] = "keep"
    default_domain: Annotated[str, AfterValidator(_identity_string("default_domain"))] | None = None
    master_separator: (
        Annotated[str, AfterValidator(_identity_string("master_separator"))] | None
    ) = None
    master_account: Literal["before", "after"] = "before"
    plain_authzid: Literal["account", "refuse"] = "account"
    allowed_chars: Annotated[str, AfterValidator(_identity_string("allowed_chars"))] | None = None


def _shared_state_url(value: str) -> str:
    scheme = value.partition("://")[0].lower()
    if scheme not in ("redis", "rediss", "unix") or "://" not in value:
        fail(f"expected redis://HOST:PORT/DB, rediss://HOST:PORT/DB or unix:///PATH, got {value!r}")
    if "@" in value.partition("://")[2].partition("/")[0]:
        fail("put the password in password_file, not in the URL (it would be logged)")
    return value


class SharedStateModel(Model):
    """The store every popguard process counts limits in (docs/shared-state.md)."""

    url: Annotated[str, AfterValidator(_shared_state_url)]
    """redis://HOST:PORT/DB, rediss://HOST:PORT/DB (TLS) or unix:///PATH."""
    password_file: FilePath | None = None
    """A file holding the store's password (trailing newline stripped)."""
    ca_file: CAFile | None = None
    """CA bundle to verify a rediss:// server with (default: the system's store)."""
    on_failure: Literal["fail-open", "fail-closed"] = "fail-open"
    """When the store does not answer: count in this process, or refuse new logins."""
    lease_seconds: Seconds = 30.0
    """A dead process's sessions stop counting at most this long after its last heartbeat."""
    timeout_ms: Annotated[int, AtLeast(1, "milliseconds per operation")] = 500
    """The longest one decision may wait for the store."""


class RetentionModel(Model):
    """Where copies go before a DELE under a ``retain`` policy (docs/retention.md)."""

    store: FilePath | None = None
    """The retention store's root directory (one Maildir per account; null: none)."""


class AdminModel(Model):
    listen: ListenAddress | None = None
    """Where /metrics, /healthz and /readyz are served (null: nowhere)."""


def _workers(value: object) -> int | Literal["auto"]:
    if isinstance(value, str):
        if value != "auto":
            fail(choice_message(value, ("auto",), repr(value)))
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int):
        raise PydanticCustomError("int_type", "Input should be a valid integer")
    if value < 1:
        fail(f"must be at least 1 (one process at least; or 'auto'), got {value}")
    if value > MAX_WORKERS:
        fail(f"at most {MAX_WORKERS}, got {value}")
    return value


#: A count of worker processes, or ``auto`` (one per CPU).
Workers = Annotated[
    int | Literal["auto"],
    PlainValidator(_workers),
    WithJsonSchema(
        {"anyOf": [{"type": "integer", "minimum": 1, "maximum": MAX_WORKERS}, {"const": "auto"}]}
    ),
]


class ConfigFile(Model):
    """popguard's config file (popguard.example.yaml documents every key)."""

    listeners: Annotated[list[ListenerModel], AfterValidator(_listeners_not_empty)] | None = None
    upstream: UpstreamModel | None = None
    session: SessionModel | None = None
    limits: LimitsModel | None = None  # type: ignore[valid-type]  # made by create_model
    shutdown: ShutdownModel | None = None
    audit: AuditModel | None = None
    retention: RetentionModel | None = None
    shared_state: SharedStateModel | None = None
    policies: FilePath | None = None
    """The policy directory (docs/policies.md)."""
    admin: AdminModel | None = None
    workers: Workers = 1
    identity: IdentityModel | None = None
