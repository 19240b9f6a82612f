"""Policies as data: rules, what they match, what they set.

A policy set is an ordered list of rules: the files of the policy directory
in name order (``00-defaults.yaml`` before ``50-alice.yaml``), and the rules
of each file in the order written.  **For each setting, the first matching
rule that sets it wins.**  A later rule can therefore only fill in settings
that no earlier matching rule set; put the specific rules first and the
broad ones (a rule without ``match``) last.  ``popguard policy explain``
shows, for a given user and client, which rule and file set each value.

Rules are matched against a :class:`Context`, which grows during a session:
at connect time only the client address, listener and TLS are known; once
the client names a user (USER, APOP, or a SASL initial response) the
*claimed* user is known; after the server accepts the login, the *user*.  A
rule that matches on ``user`` does not match before login, and one that
matches on ``claimed_user`` not before a name was claimed.  So every
setting is decided with what is known at the moment it is needed.

Pure data and pure functions: no I/O, no clock (``popguard.policy`` is part
of the sans-I/O core).
"""

from __future__ import annotations

import fnmatch
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Final, Literal

Mode = Literal["enforce", "dry-run"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Authentication mechanisms a rule can allow: USER means USER/PASS.
MECHANISMS: Final = frozenset(
    {"USER", "APOP", "PLAIN", "LOGIN", "CRAM-MD5", "DIGEST-MD5", "SCRAM-SHA-1",
     "SCRAM-SHA-256", "GSSAPI", "NTLM", "XOAUTH2", "OAUTHBEARER", "EXTERNAL", "ANONYMOUS"}
)  # fmt: skip

#: Commands a rule may deny.  Login commands are governed by ``auth_mechanisms``;
#: QUIT can never be denied (a client must always be able to end a session).
DENIABLE: Final = frozenset(
    {"STAT", "LIST", "RETR", "DELE", "NOOP", "RSET", "TOP", "UIDL", "CAPA", "LAST", "XTND"}
)

#: Every setting a rule can carry, in the order ``explain`` prints them.
SETTINGS: Final = (
    "access",
    "deny_commands",
    "deny_reply",
    "auth_mechanisms",
    "require_tls",
    "idle_timeout",
    "max_session",
    "max_sessions_total",
    "max_sessions_per_client",
    "max_sessions_per_user",
    "login_throttle",
    "retain",
)


@dataclass(frozen=True, slots=True)
class Throttle:
    """After ``failures`` failed logins within ``window`` s, block for ``block`` s.

    ``by`` says what is counted and blocked: the client address, the user
    name, or each of them separately.
    """

    failures: int
    window: float
    block: float
    by: tuple[Literal["client", "user"], ...] = ("client", "user")


@dataclass(frozen=True, slots=True)
class Match:
    """What a rule applies to; every field given must match (AND).

    Within a field, any entry may match (OR).  ``None`` means "any".
    """

    users: tuple[str, ...] | None = None
    claimed_users: tuple[str, ...] | None = None
    clients: tuple[IPNetwork, ...] | None = None
    listeners: tuple[str, ...] | None = None
    tls: bool | None = None

    def matches(self, context: Context) -> bool:
        return self.matches_user(context) and self.matches_connection(context)

    def matches_user(self, context: Context) -> bool:
        """The parts about who: ``user`` and ``claimed_user``."""
        if self.users is not None and (
            context.user is None or not _user_matches(self.users, context.user)
        ):
            return False
        if self.claimed_users is not None:
            claimed = context.user or context.claimed_user
            if claimed is None or not _user_matches(self.claimed_users, claimed):
                return False
        return True

    def matches_connection(self, context: Context) -> bool:
        """The parts fixed for a connection: client, listener, TLS."""
        if self.clients is not None and (
            context.client is None or not any(context.client in network for network in self.clients)
        ):
            return False
        if self.listeners is not None and context.listener not in self.listeners:
            return False
        return self.tls is None or context.tls == self.tls


def _user_matches(patterns: tuple[str, ...], user: str) -> bool:
    """Exact name, glob (``*``, ``?``, ``[...]``), or ``@domain`` (the part after @).

    ``user`` is a canonical account (:mod:`popguard.core.identity`: the
    name the upstream opens, case already folded where the server folds
    it), and the patterns were made canonical when the rules were loaded
    (``popguard.policy.load._account_pattern``), so names and globs compare
    exactly; an ``@domain`` compares case-insensitively (RFC 5321 §2.4).
    """
    for pattern in patterns:
        if pattern.startswith("@"):
            _, at, domain = user.rpartition("@")
            if at and domain.lower() == pattern[1:].lower():
                return True
        elif any(ch in pattern for ch in "*?["):
            if fnmatch.fnmatchcase(user, pattern):
                return True
        elif user == pattern:
            return True
    return False


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    file: str
    line: int
    match: Match = field(default_factory=Match)
    mode: Mode = "enforce"
    #: Setting name (one of :data:`SETTINGS`) to its value.
    settings: Mapping[str, object] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True, slots=True)
class PolicySet:
    rules: tuple[Rule, ...] = ()
    #: Where it was loaded from, for records and ``explain``.
    source: str = ""
    # An index, so that a set of many per-user rules stays cheap to resolve:
    # a rule whose user (or claimed user) matcher lists only plain names can
    # match only a session with one of those names, so it is looked up by
    # name; every other rule is always a candidate.
    _always: tuple[int, ...] = field(init=False, repr=False, compare=False, default=())
    _by_user: Mapping[str, tuple[int, ...]] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )
    _by_claimed: Mapping[str, tuple[int, ...]] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )
    # The always-candidates whose client/listener/TLS part matches, per
    # connection; a session resolves several times (connect, user named,
    # login) with the same connection, and many rules test CIDRs.
    _by_connection: dict[tuple[object, str, bool], tuple[int, ...]] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        always: list[int] = []
        by_user: dict[str, list[int]] = {}
        by_claimed: dict[str, list[int]] = {}
        for position, rule in enumerate(self.rules):
            match = rule.match
            if match.users is not None and all(map(_plain_name, match.users)):
                for name in set(match.users):
                    by_user.setdefault(name, []).append(position)
            elif match.claimed_users is not None and all(map(_plain_name, match.claimed_users)):
                for name in set(match.claimed_users):
                    by_claimed.setdefault(name, []).append(position)
            else:
                always.append(position)
        object.__setattr__(self, "_always", tuple(always))
        object.__setattr__(self, "_by_user", {k: tuple(v) for k, v in by_user.items()})
        object.__setattr__(self, "_by_claimed", {k: tuple(v) for k, v in by_claimed.items()})

    def resolve(self, context: Context) -> Effective:
        """Each setting from the first matching rule that sets it."""
        key = (context.client, context.listener, context.tls)
        cache = self._by_connection
        always = cache.get(key)
        if always is None:
            if len(cache) >= _CONNECTION_CACHE_SIZE:
                cache.clear()
            rules = self.rules
            always = tuple(i for i in self._always if rules[i].match.matches_connection(context))
            cache[key] = always
        candidates: Iterable[int] = always
        extra: tuple[int, ...] = ()
        if context.user is not None:
            extra += self._by_user.get(context.user, ())
        claimed = context.user or context.claimed_user
        if claimed is not None:
            extra += self._by_claimed.get(claimed, ())
        if extra:
            candidates = sorted((*always, *extra))
        chosen: dict[str, Setting] = {}
        rules = self.rules
        for position in candidates:
            rule = rules[position]
            if not rule.match.matches(context):
                continue
            for name, value in rule.settings.items():
                if name not in chosen:
                    chosen[name] = Setting(value, rule)
        return Effective(chosen)


#: Connections (client, listener, TLS) whose candidate rules are remembered.
_CONNECTION_CACHE_SIZE = 4096


def _plain_name(pattern: str) -> bool:
    return not pattern.startswith("@") and not any(ch in pattern for ch in "*?[")


#: The empty policy: changes nothing.
NO_POLICY: Final = PolicySet()


@dataclass(frozen=True, slots=True)
class Context:
    """What is known about a session when a setting is needed."""

    client: IPAddress | None
    listener: str = ""
    tls: bool = False
    claimed_user: str | None = None
    user: str | None = None

    def claimed(self, user: str) -> Context:
        """This context once the client named ``user``.

        (``dataclasses.replace`` would do, at several times the cost, on a
        path every session takes.  Both methods copy every other field by
        name: a field added to the class must be added to them too, which
        tests/policy/test_model.py checks.)
        """
        return Context(
            client=self.client,
            listener=self.listener,
            tls=self.tls,
            claimed_user=user,
            user=self.user,
        )

    def logged_in(self, user: str) -> Context:
        """This context once the server accepted ``user``'s login."""
        return Context(
            client=self.client, listener=self.listener, tls=self.tls, claimed_user=user, user=user
        )


@dataclass(frozen=True, slots=True)
class Setting:
    value: object
    rule: Rule

    @property
    def enforced(self) -> bool:
        return self.rule.mode == "enforce"


@dataclass(frozen=True, slots=True)
class Effective:
    """The settings in force for one context, each with the rule that set it."""

    settings: Mapping[str, Setting] = field(default_factory=dict)

    def get(self, name: str) -> Setting | None:
        return self.settings.get(name)

    def value(self, name: str) -> object:
        setting = self.settings.get(name)
        return None if setting is None else setting.value


def client_address(peer: str) -> IPAddress | None:
    """The IP address in ``host:port`` or ``[v6]:port`` (as records write it)."""
    host = peer
    if peer.startswith("["):
        host = peer[1 : peer.find("]")]
    elif peer.count(":") == 1:
        host = peer.partition(":")[0]
    return _ip_address(host.partition("%")[0])


@lru_cache(maxsize=1024)
def _ip_address(host: str) -> IPAddress | None:
    """``host`` parsed, or None (cached: sessions come from few hosts, and
    parsing one costs more than the rest of a session's policy setup)."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None
