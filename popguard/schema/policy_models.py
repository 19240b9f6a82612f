"""The policy files' schema: pydantic models, strict, unknown keys refused.

A policy file holds ``rules:``, a list of :class:`RuleModel`; each rule has
a ``name``, an optional ``mode`` and ``match``, and ``set``
(:class:`SettingsModel`).  Matchers and list settings take one string or a
list of strings.  Checks that need one value only are validators here
(command names, mechanisms, networks, user patterns); what needs the
identity rules, the listeners or other rules is checked by
:mod:`popguard.policy.load`.

Settings are told apart from absent ones by ``model_fields_set``: ``null``
is a value ("no limit") where a setting allows it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Annotated, Any, Final, Literal

from pydantic import AfterValidator, BeforeValidator, Field, WithJsonSchema, model_validator

from popguard.policy.model import DENIABLE, MECHANISMS
from popguard.schema.config_models import AtLeast, Model, Seconds
from popguard.schema.errors import close_match, fail, fail_type, not_null

#: The longest ``deny_reply`` text: with ``-ERR [SYS/PERM] `` and CRLF the
#: line stays well inside RFC 2449 §4's 512 octets.
MAX_DENY_REPLY: Final = 200

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_GLOB_CHARS: Final = "*?["

#: Commands a rule may not deny, and why.
UNDENIABLE: Final[Mapping[str, str]] = {
    "QUIT": "QUIT can never be denied: a client must always be able to end its session",
    "USER": "login commands are not denied with deny_commands: "
    "use auth_mechanisms (e.g. [PLAIN]) or access: deny",
    "PASS": "login commands are not denied with deny_commands: "
    "use auth_mechanisms (e.g. [PLAIN]) or access: deny",
    "APOP": "login commands are not denied with deny_commands: "
    "use auth_mechanisms (e.g. [USER]) or access: deny",
    "AUTH": "login commands are not denied with deny_commands: "
    "use auth_mechanisms (e.g. [USER]) or access: deny",
    "STLS": "STLS is not decided by policy: popguard terminates it itself "
    "(use require_tls to demand TLS before credentials)",
}


def _one_or_more(value: object) -> object:
    """A value stands for a one-element list; a mapping or null is a type error."""
    if isinstance(value, list):
        return value
    if value is None or isinstance(value, dict):
        fail_type("expected a string or a list of strings")
    return [value]


def _strings(item: Any, *, empty: str = "") -> Any:
    """One string or a list of strings, each checked by *item*.

    *empty*, if given, refuses an empty list with that message.
    """

    def not_empty(values: list[str]) -> list[str]:
        if empty and not values:
            fail(empty)
        return values

    schema = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
    return Annotated[
        list[Annotated[str, AfterValidator(item)]],
        BeforeValidator(_one_or_more),
        AfterValidator(not_empty),
        WithJsonSchema(schema),
    ]


def pattern_problem(pattern: str) -> str | None:
    """Why a user pattern is unusable, or None."""
    if not pattern:
        return "empty user name"
    if pattern != pattern.strip():
        return f"{pattern!r} has leading or trailing whitespace"
    if not pattern.isprintable():
        return f"{pattern!r} contains a control character"
    if pattern.startswith("@"):
        domain = pattern[1:]
        if not domain:
            return "'@' needs a domain after it (e.g. '@example.org')"
        if "@" in domain:
            return f"{pattern!r}: an @domain pattern has a single '@'"
        if any(ch in domain for ch in _GLOB_CHARS):
            return (
                f"{pattern!r}: an @domain pattern compares the domain exactly; for a "
                f"glob write '*{pattern}'"
            )
    return None


def _user_pattern(value: str) -> str:
    problem = pattern_problem(value)
    if problem is not None:
        fail(problem)
    return value


def network_problem(text: str) -> str | None:
    """Why *text* is not ``10.0.0.0/8``, ``2001:db8::/32`` or a single address."""
    if "%" in text:
        return f"{text!r}: zone indexes (%...) are not supported"
    try:
        ipaddress.ip_network(text, strict=True)
        return None
    except ValueError as exc:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            return f"invalid address or network {text!r}: {exc}"
    address = text.partition("/")[0]
    return (
        f"{text!r} has host bits set: write the network {loose} "
        f"or the single address {address}/{loose.max_prefixlen}"
    )


def _network(value: str) -> str:
    problem = network_problem(value)
    if problem is not None:
        fail(problem)
    return value


def _listener_name(value: str) -> str:
    if not value:
        fail("empty listener name")
    return value


def _command(value: str) -> str:
    verb = value.upper()
    if verb in DENIABLE:
        return verb
    if verb in UNDENIABLE:
        fail(UNDENIABLE[verb])
    close = close_match(verb, sorted(DENIABLE))
    hint = f" (did you mean '{close}'?)" if close else ""
    fail(f"unknown command {value!r}{hint}; a rule can deny {', '.join(sorted(DENIABLE))}")


def _mechanism(value: str) -> str:
    mechanism = value.upper()
    if mechanism in MECHANISMS:
        return mechanism
    if mechanism == "PASS":
        fail("PASS is part of USER/PASS: write USER")
    close = close_match(mechanism, sorted(MECHANISMS))
    hint = f" (did you mean '{close}'?)" if close else ""
    fail(
        f"unknown mechanism {value!r}{hint}; known: USER (USER/PASS), "
        f"{', '.join(sorted(MECHANISMS - {'USER'}))}"
    )


def _throttle_by(value: str) -> str:
    if value not in ("client", "user"):
        close = close_match(value, ("client", "user"))
        hint = f" (did you mean '{close}'?)" if close else ""
        fail(f"expected client or user, got {value!r}{hint}")
    return value


def _deny_reply(text: str) -> str:
    if not text.strip():
        fail("empty reply text")
    if "\r" in text or "\n" in text:
        fail("the reply must be one line (no CR or LF)")
    bad = next((ch for ch in text if not " " <= ch <= "~"), None)
    if bad is not None:
        fail(f"the reply must be printable ASCII; {bad!r} (U+{ord(bad):04X}) is not")
    if len(text) > MAX_DENY_REPLY:
        fail(f"the reply is {len(text)} characters, longer than {MAX_DENY_REPLY}")
    return text


def _rule_name(value: str) -> str:
    if not _NAME.match(value):
        fail(
            f"invalid rule name {value!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def valid_rule_name(value: object) -> bool:
    return isinstance(value, str) and bool(_NAME.match(value))


def _match_any(what: str) -> str:
    return f"the list is empty and would match nothing; leave out '{what}' to match any"


class MatchModel(Model):
    """What a rule applies to; every matcher given must match (AND), any entry of one (OR)."""

    user: _strings(_user_pattern, empty=_match_any("user")) = Field(default=None)  # type: ignore[valid-type]
    """The account the server opened: names, globs (*, ?, [...]) or @domain."""
    claimed_user: _strings(_user_pattern, empty=_match_any("claimed_user")) = Field(default=None)  # type: ignore[valid-type]
    """The name the client gave, before the server accepted it."""
    client: _strings(_network, empty=_match_any("client")) = Field(default=None)  # type: ignore[valid-type]
    """Client networks (10.0.0.0/8, "2001:db8::/32") or addresses."""
    listener: _strings(_listener_name, empty=_match_any("listener")) = Field(default=None)  # type: ignore[valid-type]
    """Listener names from the config file."""
    tls: Annotated[bool | None, BeforeValidator(not_null("expected true or false"))] = None
    """Whether the session is encrypted (implicit TLS, or after STLS)."""


class ThrottleModel(Model):
    """After ``failures`` failed logins within ``window`` s, block for ``block`` s."""

    failures: Annotated[int, AtLeast(1, "a block needs a failure")]
    window: Seconds
    block: Seconds
    by: _strings(_throttle_by, empty="empty; count by client, user, or both") = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["client", "user"]
    )
    """Count and block by the client address, the user name, or each separately."""

    @model_validator(mode="before")
    @classmethod
    def _not_empty(cls, value: object) -> object:
        if value == {}:
            fail(
                "expected failures, window and block "
                "(e.g. {failures: 5, window: 300, block: 900}); null turns throttling off"
            )
        return value


_MAX_SESSIONS_REASON: Final = "to refuse every session use access: deny; null means no limit"
MaxSessions = Annotated[int, AtLeast(1, _MAX_SESSIONS_REASON)]


class SettingsModel(Model):
    """What a rule sets; for each setting, the first matching rule that sets it wins."""

    access: Annotated[
        Literal["allow", "deny"] | None, BeforeValidator(not_null("expected one of allow, deny"))
    ] = None
    deny_commands: _strings(_command) = Field(default=None)  # type: ignore[valid-type]
    """Commands answered -ERR and not forwarded ([] denies nothing)."""
    deny_reply: Annotated[
        Annotated[str, AfterValidator(_deny_reply)] | None,
        BeforeValidator(not_null("expected a string")),
    ] = None
    auth_mechanisms: _strings(_mechanism) | None = None  # type: ignore[valid-type]
    """Login mechanisms allowed (USER means USER/PASS); null: all."""
    require_tls: Annotated[bool | None, BeforeValidator(not_null("expected true or false"))] = None
    """Refuse USER, PASS, APOP and AUTH before TLS."""
    idle_timeout: Seconds | None = None
    max_session: Seconds | None = None
    max_sessions_total: MaxSessions | None = None
    max_sessions_per_client: MaxSessions | None = None
    max_sessions_per_user: MaxSessions | None = None
    login_throttle: ThrottleModel | None = None
    retain: Annotated[bool | None, BeforeValidator(not_null("expected true or false"))] = None
    """Archive each message in the retention store before its DELE is forwarded."""


class RuleModel(Model):
    """One rule: what it matches and what it sets."""

    name: Annotated[str, AfterValidator(_rule_name)]
    mode: Literal["enforce", "dry-run"] = "enforce"
    """dry-run: record what the rule would do, and do nothing."""
    match: MatchModel | None = None
    set_: SettingsModel | None = Field(alias="set")


class PolicyFile(Model):
    """A policy file (docs/policies.md): rules, in the order they apply."""

    rules: list[RuleModel] | None = None
