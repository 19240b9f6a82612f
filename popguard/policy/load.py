"""Load the policy directory into a :class:`~popguard.policy.model.PolicySet`.

Every ``*.yaml`` and ``*.yml`` file directly in the directory is read, in
name order (``00-default.yaml`` before ``50-alice.yaml``; not recursive;
names starting with ``.`` are skipped, as are ``*.yaml.example`` files).
Each file holds ``rules:``, a list of rules, in the order they apply::

    rules:
      - name: alice-read-only
        match: {user: alice}
        set: {deny_commands: [DELE, RSET]}

Like :mod:`popguard.config`, the files are read by
:mod:`popguard.schema.nodes` (composed with PyYAML, every value keeping its
position) and validated by the pydantic models of
:mod:`popguard.schema.policy_models`, so every problem is reported where it
is, as ``file:line:column: error: message``, and *all* problems of *all*
files are collected before :class:`PolicyError` is raised.  What needs more
than one value (user names under the ``identity:`` rules, listener names,
rules that can never apply) is checked here, with positions too.
``docs/policies.md`` documents the language; :data:`DECIDED_AT` says when
each setting is decided, which is what the "this rule can never apply"
warnings are based on.

Setting values, as stored in :attr:`Rule.settings`:

* ``access``: ``"allow"`` or ``"deny"``
* ``deny_commands``: ``tuple[str, ...]`` of :data:`~model.DENIABLE`, upper case
* ``deny_reply``: ``str``, printable ASCII, at most 200 characters
* ``auth_mechanisms``: ``tuple[str, ...]`` of :data:`~model.MECHANISMS`, or ``None``
* ``require_tls``: a boolean (USER, PASS, APOP and AUTH refused before TLS)
* ``retain``: a boolean (archive a message before its DELE, docs/retention.md)
* ``idle_timeout``, ``max_session``: ``float`` seconds, or ``None``
* ``max_sessions_total``, ``_per_client``, ``_per_user``: ``int`` >= 1, or ``None``
* ``login_throttle``: :class:`~model.Throttle`, or ``None``

``None`` (``null`` in the file) means "no limit / popguard's default" and,
like any value, stops later rules from setting that setting: it is how a
specific rule exempts, say, a monitoring host from a broad throttle.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from pydantic import ValidationError
from yaml.nodes import MappingNode

from popguard.core.identity import DEFAULT_IDENTITY, IdentityRules
from popguard.core.sasl import DECODABLE
from popguard.policy.model import (
    SETTINGS,
    IPNetwork,
    Match,
    PolicySet,
    Rule,
    Throttle,
)
from popguard.schema.errors import Wording, close_match, issues_from
from popguard.schema.issues import Issue, IssueError, Severity
from popguard.schema.nodes import Document, Path, load_yaml, mark_position
from popguard.schema.policy_models import (
    MAX_DENY_REPLY,
    MatchModel,
    PolicyFile,
    RuleModel,
    SettingsModel,
    ThrottleModel,
    valid_rule_name,
)

__all__ = [
    "DECIDED_AT",
    "MAX_DENY_REPLY",
    "PHASES",
    "RFC1939_MIN_IDLE_TIMEOUT",
    "Issue",
    "Phase",
    "PolicyError",
    "load_policies",
    "policy_files",
]

Phase = Literal["connect", "claim", "login"]

#: The moments a session's settings are looked up, in order: a connection
#: arrives (client, listener, TLS known); the client names a user (USER,
#: APOP, or a SASL response: the *claimed* user is known); the server
#: accepts the login (the *user* is known).
PHASES: Final[tuple[Phase, ...]] = ("connect", "claim", "login")

#: When each setting is decided.  A rule that matches on ``user`` only
#: matches at ``login``, one on ``claimed_user`` from ``claim`` on; a rule
#: for a setting never decided in those phases can never set it.
DECIDED_AT: Final[Mapping[str, tuple[Phase, ...]]] = {
    "access": ("connect", "claim", "login"),
    "deny_commands": ("connect", "claim", "login"),
    "deny_reply": ("connect", "claim", "login"),
    "auth_mechanisms": ("connect", "claim"),
    "require_tls": ("connect", "claim"),
    "idle_timeout": ("connect", "claim", "login"),
    "max_session": ("connect", "claim", "login"),
    "max_sessions_total": ("connect",),
    "max_sessions_per_client": ("connect",),
    "max_sessions_per_user": ("claim", "login"),
    "login_throttle": ("connect", "claim"),
    "retain": ("connect", "claim", "login"),
}

#: RFC 1939 §3: a POP3 server's inactivity autologout timer MUST be at least
#: 10 minutes (the same value as :data:`popguard.config.RFC1939_MIN_IDLE_TIMEOUT`).
RFC1939_MIN_IDLE_TIMEOUT: Final = 600.0

_EXTENSIONS: Final = (".yaml", ".yml")
_GLOB_CHARS: Final = "*?["
_MATCH_KEYS: Final = tuple(MatchModel.model_fields)
_RULE_KEYS: Final = ("name", "mode", "match", "set")

#: Words people write for a matcher, and the key they meant.
_MATCH_ALIASES: Final[Mapping[str, str]] = {
    "ip": "client",
    "ips": "client",
    "address": "client",
    "addr": "client",
    "network": "client",
    "networks": "client",
    "cidr": "client",
    "source": "client",
    "from": "client",
    "username": "user",
    "login": "user",
    "listen": "listener",
    "port": "listener",
    "ssl": "tls",
}

_IS_SETTING: Final = {key: f"'{key}' is a setting: put it under 'set:'" for key in SETTINGS}
_IS_MATCHER: Final = {key: f"'{key}' is a matcher: put it under 'match:'" for key in _MATCH_KEYS}

#: For an unknown key, by the kind of mapping it is in: where it belongs.
_ELSEWHERE: Final[Mapping[str, Mapping[str, str]]] = {
    "file": {key: "rules go in a list under 'rules:'" for key in _RULE_KEYS},
    "rule": {
        **_IS_SETTING,
        **_IS_MATCHER,
        "settings": "did you mean 'set'?",
        "matches": "did you mean 'match'?",
        "when": "did you mean 'match'?",
    },
    "match": {
        **_IS_SETTING,
        **{alias: f"did you mean '{key}'?" for alias, key in _MATCH_ALIASES.items()},
    },
    "set": {
        **_IS_MATCHER,
        "timeout": "did you mean 'idle_timeout'?",
        "deny": "did you mean 'deny_commands' or 'access: deny'?",
        "mechanisms": "did you mean 'auth_mechanisms'?",
        "throttle": "did you mean 'login_throttle'?",
    },
}

#: Login mechanisms popguard lets through (the others it always refuses).
_READABLE: Final = frozenset({"USER", "APOP"}) | DECODABLE


class PolicyError(IssueError):
    """The policy directory is invalid.

    ``issues`` holds every error found, in every file (and any warnings found
    alongside them), in file order; ``str()`` lists them one per line.
    """


# --------------------------------------------------------------------------
# How errors are worded
# --------------------------------------------------------------------------


class _Wording:
    """Labels for one file's paths: ``rule 'alice': set.idle_timeout``."""

    def __init__(self, data: object) -> None:
        self.rules = data.get("rules") if isinstance(data, dict) else None

    def rule(self, index: int) -> str:
        items = self.rules if isinstance(self.rules, list) else []
        item = items[index] if index < len(items) else None
        name = item.get("name") if isinstance(item, dict) else None
        return f"rule {name!r}" if valid_rule_name(name) else f"rules[{index}]"

    def label(self, path: Path) -> str:
        if not path:
            return "the policy file"
        if len(path) < 2 or path[0] != "rules" or not isinstance(path[1], int):
            return ".".join(str(part) for part in path if not isinstance(part, int))
        rule = self.rule(path[1])
        rest = [str(part) for part in path[2:] if not isinstance(part, int)]
        if not rest:
            return rule
        if rest == ["name"]:
            return f"{rule}.name"
        return f"{rule}: {'.'.join(rest)}"

    def unknown_key(self, path: Path, name: str, allowed: Sequence[str]) -> str:
        """Report unknown keys with where they belong, or the nearest known key."""
        kind = "file" if not path else "rule" if len(path) == 2 else str(path[-1])
        elsewhere = _ELSEWHERE.get(kind, {})
        lowered = name.lower()
        if lowered in allowed:
            hint = f" (did you mean '{lowered}'? keys are lower case)"
        elif lowered in elsewhere:
            hint = f" ({elsewhere[lowered]})"
        elif (close := close_match(name, allowed)) is not None:
            hint = f" (did you mean '{close}'?)"
        else:
            hint = f" (valid keys: {', '.join(allowed)})"
        return f"{self.label(path)}: unknown key '{name}'{hint}"

    def wording(self) -> Wording:
        return Wording(
            label=self.label,
            unknown_key=self.unknown_key,
            number_example="300",
            type_messages={
                "": "expected a mapping with a 'rules' list, got {got}; "
                "start the file with 'rules:' and indent the rules under it",
                "rules": "expected a list of rules, got {got} "
                "(each rule starts with '- name: ...')",
            },
            missing_hints={
                "rules.*.name": " (e.g. name: alice-read-only)",
                "rules.*.set": " (what the rule sets, e.g. set: ...)",
            },
            examples={
                "user": '[alice, "*@example.org"]',
                "claimed_user": '[alice, "*@example.org"]',
                "client": '[10.0.0.0/8, "2001:db8::/32"]',
                "listener": "[main]",
                "deny_commands": "[DELE, RSET]",
                "auth_mechanisms": "[USER, PLAIN]",
                "by": "[client, user]",
            },
        )


def _syntax_hint(line: str) -> str:
    if "[" in line and "::" in line:
        return '; quote IPv6 addresses in [...] lists, e.g. ["::1", "2001:db8::/32"]'
    return ""


# --------------------------------------------------------------------------
# One file
# --------------------------------------------------------------------------


@dataclass(slots=True)
class _Parsed:
    """A rule as read, with where later checks point."""

    rule: Rule
    document: Document
    path: Path
    #: Whether the rule's name is valid (it takes part in the name checks).
    named: bool
    valid: bool


def _items(raw: object, path: Path) -> list[tuple[str, Path]]:
    """A string or a list of strings, each with its path."""
    if isinstance(raw, str):
        return [(raw, path)]
    if isinstance(raw, list):
        return [(item, (*path, index)) for index, item in enumerate(raw) if isinstance(item, str)]
    return []


def _account_pattern(identity: IdentityRules, pattern: str) -> str:
    """A user pattern as it must be written to match canonical account names.

    A plain name becomes the account it names; a glob only has its case
    folded (a default domain would narrow ``*`` to one domain); an
    ``@domain`` pattern already compares case-insensitively.
    """
    if pattern.startswith("@"):
        return pattern
    if any(ch in pattern for ch in _GLOB_CHARS):
        return identity.canonical_case(pattern)
    return identity.canonical(pattern)


class _File:
    """One policy file: validated by the models, then checked across values."""

    def __init__(
        self, document: Document, listeners: frozenset[str] | None, identity: IdentityRules
    ) -> None:
        self.document = document
        self.listeners = listeners
        self.identity = identity
        self.words = _Wording(document.data)
        self.issues: list[Issue] = []
        self.rules: list[_Parsed] = []

    def report(
        self, path: Path, message: str, severity: Severity = "error", *, key: bool = False
    ) -> None:
        self.issues.append(self.document.issue(path, message, severity, key=key))

    def warn(self, path: Path, message: str, *, key: bool = False) -> None:
        self.report(path, message, "warning", key=key)

    def run(self) -> None:
        data = self.document.data
        try:
            PolicyFile.model_validate({} if data is None else data)
        except ValidationError as exc:
            self.issues += issues_from(exc, self.document, PolicyFile, self.words.wording())
        rules = data.get("rules") if isinstance(data, dict) else None
        if not isinstance(rules, list):
            return
        for index, item in enumerate(rules):
            if isinstance(item, dict):
                self.rule(index, item)

    def rule(self, index: int, item: Mapping[str, object]) -> None:
        path: Path = ("rules", index)
        label = self.words.rule(index)
        model: RuleModel | None = None
        with contextlib.suppress(ValidationError):  # errors are reported with the file's
            model = RuleModel.model_validate(item)
        raw_match = item.get("match")
        raw_set = item.get("set")
        match = raw_match if isinstance(raw_match, dict) else {}
        settings = raw_set if isinstance(raw_set, dict) else {}
        errors = sum(1 for issue in self.issues if issue.severity == "error")
        set_node = self.document.values.get((*path, "set"))
        written_empty = isinstance(set_node, MappingNode) and not set_node.value
        if "set" in item and (raw_set is None or written_empty):
            self.report(
                (*path, "set"),
                f"{label}: set: sets nothing; give at least one setting (e.g. access: deny)",
            )
        if "deny_reply" in settings and "deny_commands" not in settings:
            self.report(
                (*path, "set", "deny_reply"),
                f"{label}: set: deny_reply without deny_commands: the reply is only used for "
                "commands this same rule denies; add deny_commands to the rule",
                key=True,
            )
        self.match_warnings(match, (*path, "match"), label)
        self.setting_warnings(settings, (*path, "set"), label)
        self.rule_warnings(match, settings, path, label)
        line, _ = self.document.position(path)
        rule = Rule(
            name=str(item["name"]) if valid_rule_name(item.get("name")) else f"rules[{index}]",
            file=self.document.file,
            line=line,
            match=self.build_match(model.match) if model and model.match else Match(),
            mode=model.mode if model else "enforce",
            settings=self.build_settings(model.set_) if model and model.set_ else {},
        )
        named = valid_rule_name(item.get("name"))
        clean = errors == sum(1 for issue in self.issues if issue.severity == "error")
        self.rules.append(_Parsed(rule, self.document, path, named, model is not None and clean))

    # -- warnings ----------------------------------------------------------

    def match_warnings(self, match: Mapping[str, object], path: Path, label: str) -> None:
        for key in ("user", "claimed_user"):
            if key not in match or not self.valid(MatchModel, key, match[key]):
                continue
            where = f"{label}: match.{key}"
            for pattern, item_path in _items(match[key], (*path, key)):
                if self.identity.domain == "strip" and "@" in pattern:
                    self.warn(
                        item_path,
                        f"{where}: {pattern!r} can never match: accounts have no domain "
                        "(identity: domain: strip)",
                    )
                account = _account_pattern(self.identity, pattern)
                if account != pattern:
                    self.warn(
                        item_path,
                        f"{where}: {pattern!r} is matched as {account!r}, the account the "
                        "upstream opens for it (identity: settings); write it so",
                    )
        if self.listeners is None or "listener" not in match:
            return
        if not self.valid(MatchModel, "listener", match["listener"]):
            return
        names = _items(match["listener"], (*path, "listener"))
        unknown = [(name, item_path) for name, item_path in names if name not in self.listeners]
        known = sorted(self.listeners)
        for name, item_path in unknown:
            close = close_match(name, known)
            hint = f" (did you mean '{close}'?)" if close else ""
            configured = ", ".join(known) if known else "none"
            never = "; this rule can never apply" if len(unknown) == len(names) else ""
            self.warn(
                item_path,
                f"{label}: match.listener: no listener is named {name!r}{hint} "
                f"(configured: {configured}){never}",
            )

    def setting_warnings(self, settings: Mapping[str, object], path: Path, label: str) -> None:
        idle = settings.get("idle_timeout")
        valid_idle = self.valid(SettingsModel, "idle_timeout", idle)
        if valid_idle and isinstance(idle, int | float) and idle < RFC1939_MIN_IDLE_TIMEOUT:
            self.warn(
                (*path, "idle_timeout"),
                f"{label}: set.idle_timeout is {idle:g} seconds, below 600: RFC 1939 §3 "
                "requires a POP3 server's inactivity autologout timer to be at least "
                "10 minutes",
            )
        mechanisms = settings.get("auth_mechanisms")
        if mechanisms is None or not self.valid(SettingsModel, "auth_mechanisms", mechanisms):
            return
        where = f"{label}: set.auth_mechanisms"
        if mechanisms == []:
            self.warn(
                (*path, "auth_mechanisms"),
                f"{where}: an empty list refuses every login (say access: deny if that is "
                "meant; null allows every mechanism)",
            )
        for text, item_path in _items(mechanisms, (*path, "auth_mechanisms")):
            if text.upper() not in _READABLE:
                self.warn(
                    item_path,
                    f"{where}: {text.upper()} is refused whatever this rule says: popguard "
                    "cannot tell which account it logs in to (docs/identity.md)",
                )

    def rule_warnings(
        self, match: Mapping[str, object], settings: Mapping[str, object], path: Path, label: str
    ) -> None:
        """Settings this rule can never set, given when each is decided."""
        names = [name for name in settings if name in DECIDED_AT]
        if "user" in match and self.valid(MatchModel, "user", match["user"]):
            key = (*path, "match", "user")
            if "access" in names:
                self.warn(
                    key,
                    f"{label}: a rule matching on 'user' cannot refuse a connection before "
                    "login: its access applies once the server has accepted the login "
                    "(match on 'claimed_user' to refuse as soon as the name is given)",
                    key=True,
                )
            never = [n for n in names if "login" not in DECIDED_AT[n]]
            if never:
                self.warn(
                    key,
                    f"{label}: {', '.join(never)} {_is_are(never)} decided before login, when "
                    "the user is not known yet; a rule matching on 'user' never sets "
                    f"{_it_them(never)} (match on 'claimed_user' instead)",
                    key=True,
                )
        elif "claimed_user" in match and self.valid(
            MatchModel, "claimed_user", match["claimed_user"]
        ):
            never = [n for n in names if DECIDED_AT[n] == ("connect",)]
            if never:
                self.warn(
                    (*path, "match", "claimed_user"),
                    f"{label}: {', '.join(never)} {_is_are(never)} decided when a connection "
                    "arrives, before any user is named; a rule matching on 'claimed_user' "
                    f"never sets {_it_them(never)}",
                    key=True,
                )

    @staticmethod
    def valid(model: type[MatchModel] | type[SettingsModel], name: str, raw: object) -> bool:
        try:
            model.model_validate({name: raw})
        except ValidationError:
            return False
        return True

    # -- the rule as data --------------------------------------------------

    def build_match(self, model: MatchModel) -> Match:
        def accounts(patterns: list[str] | None) -> tuple[str, ...] | None:
            if patterns is None:
                return None
            return tuple(dict.fromkeys(_account_pattern(self.identity, p) for p in patterns))

        clients: tuple[IPNetwork, ...] | None = None
        if model.client is not None:
            clients = tuple(dict.fromkeys(ipaddress.ip_network(text) for text in model.client))
        return Match(
            users=accounts(model.user),
            claimed_users=accounts(model.claimed_user),
            clients=clients,
            listeners=None if model.listener is None else tuple(dict.fromkeys(model.listener)),
            tls=model.tls,
        )

    @staticmethod
    def build_settings(model: SettingsModel) -> dict[str, object]:
        values: dict[str, object] = {}
        for name in SETTINGS:  # in the order explain prints them
            if name not in model.model_fields_set:
                continue
            value = getattr(model, name)
            if isinstance(value, list):
                value = tuple(dict.fromkeys(value))
            elif isinstance(value, ThrottleModel):
                by = tuple(kind for kind in ("client", "user") if kind in value.by)
                value = Throttle(value.failures, value.window, value.block, by)  # type: ignore[arg-type]
            values[name] = value
        return values


def _is_are(names: Sequence[str]) -> str:
    return "is" if len(names) == 1 else "are"


def _it_them(names: Sequence[str]) -> str:
    return "it" if len(names) == 1 else "them"


def _read_file(
    file: str, listeners: frozenset[str] | None, identity: IdentityRules
) -> _File | list[Issue]:
    loaded = load_yaml(file, "policy file", _syntax_hint)
    if loaded.document is None:
        return loaded.issues
    checked = _File(loaded.document, listeners, identity)
    for problem in loaded.problems:
        line, column = mark_position(problem.node.start_mark)
        where = checked.words.label(problem.path)
        checked.issues.append(Issue(file, line, column, f"{where}: {problem.message}"))
    checked.run()
    return checked


# --------------------------------------------------------------------------
# Across files
# --------------------------------------------------------------------------


def _match_key(match: Match) -> tuple[object, ...]:
    """Match fields as sets: two rules with equal keys match the same sessions."""

    def norm(values: tuple[object, ...] | None) -> frozenset[object] | None:
        return None if values is None else frozenset(values)

    return (
        norm(match.users),
        norm(match.claimed_users),
        norm(match.clients),
        norm(match.listeners),
        match.tls,
    )


_ANY: Final = _match_key(Match())


def _shadowing(parsed: Sequence[_Parsed]) -> list[Issue]:
    """Settings an earlier rule always sets first (same or no match)."""
    issues: list[Issue] = []
    for index, later in enumerate(parsed):
        key = _match_key(later.rule.match)
        by: dict[str, _Parsed] = {}
        for earlier in parsed[:index]:
            earlier_key = _match_key(earlier.rule.match)
            if earlier_key != _ANY and earlier_key != key:
                continue
            for name in later.rule.settings:
                if name in earlier.rule.settings and name not in by:
                    by[name] = earlier
        if not by:
            continue
        label = f"rule {later.rule.name!r}"
        rules = sorted({id(p): p for p in by.values()}.values(), key=parsed.index)
        first = ", ".join(f"rule {p.rule.name!r} ({p.rule.where})" for p in rules)
        if len(by) == len(later.rule.settings):
            message = (
                f"{label} can never apply: {first} matches every session it matches "
                "and sets everything it sets first (for each setting, the first matching "
                "rule that sets it wins)"
            )
        else:
            names = [n for n in later.rule.settings if n in by]
            message = (
                f"{label}: {', '.join(names)} never {'applies' if len(names) == 1 else 'apply'}: "
                f"{first} matches every session it matches and sets "
                f"{_it_them(names)} first"
            )
        if any(p.rule.mode == "dry-run" for p in rules) and later.rule.mode == "enforce":
            message += (
                "; a dry-run rule wins a setting like any other rule, so while it matches "
                "the setting is not enforced"
            )
        issues.append(later.document.issue(later.path, message, "warning"))
    return issues


def policy_files(directory: str | os.PathLike[str]) -> list[str]:
    """The files :func:`load_policies` reads, in order (paths joined to *directory*).

    Raises :class:`OSError` when the directory cannot be listed.
    """
    base = os.fspath(directory)
    names = sorted(
        name for name in os.listdir(base) if name.endswith(_EXTENSIONS) and not name.startswith(".")
    )
    return [os.path.join(base, name) for name in names]


def load_policies(
    directory: str | os.PathLike[str],
    *,
    listeners: Iterable[str] | None = None,
    identity: IdentityRules = DEFAULT_IDENTITY,
) -> tuple[PolicySet, list[Issue]]:
    """Load and validate every policy file in *directory*: ``(policies, warnings)``.

    *listeners*, when given, are the configured listener names: a rule
    matching only on other names can never apply, which is warned about.
    *identity* maps user names in rules to the accounts sessions are
    matched by (``Alice`` matches the account ``alice`` where names fold).
    Raises :class:`PolicyError` with every error of every file (and the
    warnings found alongside them) when anything is invalid, including a
    missing directory.  Rules of the returned set carry ``file`` paths
    joined to *directory* as given (relative stays relative).
    """
    base = os.fspath(directory)
    known = None if listeners is None else frozenset(listeners)
    if not os.path.exists(base):
        raise PolicyError([Issue(base, 0, 0, "policy directory not found")])
    if not os.path.isdir(base):
        raise PolicyError([Issue(base, 0, 0, "not a directory (expected the policy directory)")])
    try:
        files = policy_files(base)
    except OSError as exc:
        raise PolicyError(
            [Issue(base, 0, 0, f"cannot list policy directory: {exc.strerror or exc}")]
        ) from exc

    issues: list[Issue] = []
    parsed: list[_Parsed] = []
    order: dict[str, int] = {}
    for index, file in enumerate(files):
        order[file] = index
        if os.path.isdir(file):
            issues.append(Issue(file, 0, 0, "a directory, not a policy file: skipped", "warning"))
            continue
        checked = _read_file(file, known, identity)
        if isinstance(checked, list):
            issues.extend(checked)
        else:
            issues.extend(checked.issues)
            parsed.extend(checked.rules)

    names: dict[str, _Parsed] = {}
    for item in parsed:
        if not item.named:
            continue  # no name, or an invalid one (reported already)
        name = item.rule.name
        if name in names:
            first = names[name].rule
            issues.append(
                item.document.issue(
                    (*item.path, "name"),
                    f"duplicate rule name {name!r}: already used by the rule at {first.where}; "
                    "names must be unique across the policy directory",
                )
            )
            item.valid = False
        else:
            names[name] = item

    valid = [item for item in parsed if item.valid]
    issues.extend(_shadowing(valid))
    issues.sort(key=lambda issue: (order.get(issue.file, -1), issue.line, issue.column))
    if any(issue.severity == "error" for issue in issues):
        raise PolicyError(issues)
    return PolicySet(rules=tuple(item.rule for item in valid), source=base), issues
