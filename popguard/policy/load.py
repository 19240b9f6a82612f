"""Load the policy directory into a :class:`~popguard.policy.model.PolicySet`.

Every ``*.yaml`` and ``*.yml`` file directly in the directory is read, in
name order (``00-default.yaml`` before ``50-alice.yaml``; not recursive;
names starting with ``.`` are skipped, as are ``*.yaml.example`` files).
Each file holds ``rules:``, a list of rules, in the order they apply::

    rules:
      - name: alice-read-only
        match: {user: alice}
        set: {deny_commands: [DELE, RSET]}

Like :mod:`popguard.config`, the files are *composed* with PyYAML (never
``safe_load``-ed), so every problem is reported where it is, as
``file:line:column: error: message``, and *all* problems of *all* files are
collected before :class:`PolicyError` is raised.  ``docs/policies.md``
documents the language; :data:`DECIDED_AT` says when each setting is decided,
which is what the "this rule can never apply" warnings are based on.

Setting values, as stored in :attr:`Rule.settings`:

* ``access``: ``"allow"`` or ``"deny"``
* ``deny_commands``: ``tuple[str, ...]`` of :data:`~model.DENIABLE`, upper case
* ``deny_reply``: ``str``, printable ASCII, at most 200 characters
* ``auth_mechanisms``: ``tuple[str, ...]`` of :data:`~model.MECHANISMS`, or ``None``
* ``require_tls``: a boolean (USER, PASS, APOP and AUTH refused before TLS)
* ``idle_timeout``, ``max_session``: ``float`` seconds, or ``None``
* ``max_sessions_total``, ``_per_client``, ``_per_user``: ``int`` >= 1, or ``None``
* ``login_throttle``: :class:`~model.Throttle`, or ``None``

``None`` (``null`` in the file) means "no limit / popguard's default" and,
like any value, stops later rules from setting that setting: it is how a
specific rule exempts, say, a monitoring host from a broad throttle.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

import yaml
from yaml.constructor import SafeConstructor
from yaml.error import Mark
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.reader import ReaderError

from popguard import yamlnodes
from popguard.core.identity import DEFAULT_IDENTITY, IdentityRules
from popguard.core.sasl import DECODABLE
from popguard.policy.model import (
    DENIABLE,
    MECHANISMS,
    SETTINGS,
    IPNetwork,
    Match,
    Mode,
    PolicySet,
    Rule,
    Throttle,
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

Severity = Literal["error", "warning"]
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
}

#: RFC 1939 §3: a POP3 server's inactivity autologout timer MUST be at least
#: 10 minutes (the same value as :data:`popguard.config.RFC1939_MIN_IDLE_TIMEOUT`).
RFC1939_MIN_IDLE_TIMEOUT: Final = 600.0

#: The longest ``deny_reply`` text: with ``-ERR [SYS/PERM] `` and CRLF the
#: line stays well inside RFC 2449 §4's 512 octets.
MAX_DENY_REPLY: Final = 200

_EXTENSIONS: Final = (".yaml", ".yml")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_GLOB_CHARS: Final = "*?["

_TOP_KEYS: Final = ("rules",)
_RULE_KEYS: Final = ("name", "mode", "match", "set")
_MATCH_KEYS: Final = ("user", "claimed_user", "client", "listener", "tls")
_THROTTLE_KEYS: Final = ("failures", "window", "block", "by")
_MODES: Final[tuple[Mode, ...]] = ("enforce", "dry-run")

#: Settings that accept ``null``: "no limit, and no later rule may set one".
_NULLABLE: Final = frozenset(
    {
        "auth_mechanisms",
        "idle_timeout",
        "max_session",
        "max_sessions_total",
        "max_sessions_per_client",
        "max_sessions_per_user",
        "login_throttle",
    }
)

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

#: Commands a rule may not deny, and why.
_UNDENIABLE: Final[Mapping[str, str]] = {
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


# --------------------------------------------------------------------------
# Issues
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Issue:
    """One error or warning, located in a file (1-based; line 0 = no position)."""

    file: str
    line: int
    column: int
    message: str
    severity: Severity = "error"

    def __str__(self) -> str:
        if self.line > 0:
            return f"{self.file}:{self.line}:{self.column}: {self.severity}: {self.message}"
        return f"{self.file}: {self.severity}: {self.message}"


class PolicyError(Exception):
    """The policy directory is invalid.

    ``issues`` holds every error found, in every file (and any warnings found
    alongside them), in file order; ``str()`` lists them one per line.
    """

    issues: tuple[Issue, ...]

    def __init__(self, issues: Iterable[Issue]) -> None:
        self.issues = tuple(issues)
        super().__init__(str(self))

    @property
    def errors(self) -> tuple[Issue, ...]:
        return tuple(issue for issue in self.issues if issue.severity == "error")

    @property
    def warnings(self) -> tuple[Issue, ...]:
        return tuple(issue for issue in self.issues if issue.severity == "warning")

    def __str__(self) -> str:
        return "\n".join(str(issue) for issue in self.issues)


# --------------------------------------------------------------------------
# YAML helpers (the same approach as popguard.config)
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

_Entries = dict[str, tuple[ScalarNode, Node]]


def _describe(node: Node) -> str:
    return yamlnodes.describe(node)


def _is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == _NULL


def _number_hint(node: Node) -> str:
    return yamlnodes.number_hint(node, "300")


def _position(mark: Mark | None) -> tuple[int, int]:
    if mark is None:
        return (0, 0)
    return (mark.line + 1, mark.column + 1)


def _close(name: str, allowed: Iterable[str]) -> str | None:
    options = list(allowed)
    for candidate in (name, name.lower(), name.upper()):
        found = difflib.get_close_matches(candidate, options, n=1, cutoff=0.6)
        if found:
            return found[0]
    return None


def _node_line(node: Node) -> int:
    return _position(node.start_mark)[0]


@dataclass(slots=True)
class _Parsed:
    """A rule as read, with the nodes later checks point at."""

    rule: Rule
    node: Node
    name_node: Node | None
    match_keys: dict[str, Node] = field(default_factory=dict)
    setting_keys: dict[str, Node] = field(default_factory=dict)
    valid: bool = True


class _FileWalker:
    """Walks one composed policy file against the schema, collecting issues."""

    def __init__(
        self, file: str, listeners: frozenset[str] | None, identity: IdentityRules
    ) -> None:
        self.file = file
        self.listeners = listeners
        self.identity = identity
        self.issues: list[Issue] = []
        self.constructor = SafeConstructor()
        self.rules: list[_Parsed] = []

    # -- reporting ---------------------------------------------------------

    def report(self, node: Node | None, message: str, severity: Severity = "error") -> None:
        line, column = _position(node.start_mark if node is not None else None)
        self.issues.append(Issue(self.file, line, column, message, severity))

    def warn(self, node: Node | None, message: str) -> None:
        self.report(node, message, "warning")

    def error_count(self) -> int:
        return sum(1 for issue in self.issues if issue.severity == "error")

    # -- structure ---------------------------------------------------------

    def mapping(self, node: Node, where: str) -> _Entries | None:
        """The string-keyed entries of a mapping node (null counts as empty)."""
        if _is_null(node):
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
                self.report(
                    key,
                    f"{where}: duplicate key '{key.value}' (first given on line "
                    f"{_node_line(first)})",
                )
                continue
            entries[key.value] = (key, value)
        return entries

    def check_keys(
        self,
        entries: _Entries,
        allowed: Sequence[str],
        where: str,
        elsewhere: Mapping[str, str] | None = None,
    ) -> None:
        """Report unknown keys; ``elsewhere`` maps a key to where it belongs."""
        for name, (key, _) in entries.items():
            if name in allowed:
                continue
            lowered = name.lower()
            if lowered in allowed:
                hint = f" (did you mean '{lowered}'? keys are lower case)"
            elif elsewhere and lowered in elsewhere:
                hint = f" ({elsewhere[lowered]})"
            elif (close := _close(name, allowed)) is not None:
                hint = f" (did you mean '{close}'?)"
            else:
                hint = f" (valid keys: {', '.join(allowed)})"
            self.report(key, f"{where}: unknown key '{name}'{hint}")

    def strings(self, node: Node, where: str, example: str) -> list[tuple[str, Node]] | None:
        """A string or a list of strings, each with its node.

        Items that are not strings are reported and left out; ``None`` when
        *node* is neither a string nor a list.
        """
        if isinstance(node, MappingNode) or _is_null(node):
            self.report(
                node, f"{where}: expected a string or a list of strings, got {_describe(node)}"
            )
            return None
        items = node.value if isinstance(node, SequenceNode) else [node]
        result: list[tuple[str, Node]] = []
        for item in items:
            if isinstance(item, ScalarNode) and item.tag == _STR:
                result.append((item.value, item))
                continue
            hint = ""
            if isinstance(item, ScalarNode) and item.tag != _NULL:
                hint = "; put it in quotes if you meant a string"
                if item.tag == _INT and ":" in item.value:
                    hint = f"; YAML 1.1 reads {item.value} as a number: quote it"
            elif isinstance(item, SequenceNode | MappingNode):
                hint = f" (e.g. {example})"
            self.report(item, f"{where}: expected a string, got {_describe(item)}{hint}")
        return result

    # -- scalars -----------------------------------------------------------

    def boolean(self, node: Node, where: str) -> bool | None:
        if not (isinstance(node, ScalarNode) and node.tag == _BOOL):
            self.report(node, f"{where}: expected true or false, got {_describe(node)}")
            return None
        value: bool = self.constructor.construct_yaml_bool(node)
        return value

    def integer(self, node: Node, where: str, minimum: int, reason: str) -> int | None:
        if not (isinstance(node, ScalarNode) and node.tag == _INT):
            self.report(
                node, f"{where}: expected an integer, got {_describe(node)}{_number_hint(node)}"
            )
            return None
        try:
            value: int = self.constructor.construct_yaml_int(node)
        except ValueError:
            self.report(node, f"{where}: expected an integer, got {_describe(node)}")
            return None
        if value < minimum:
            self.report(node, f"{where}: must be at least {minimum} ({reason}), got {value}")
            return None
        return value

    def seconds(self, node: Node, where: str) -> float | None:
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
                value = float(self.constructor.construct_yaml_float(node))
        except OverflowError:
            value = math.inf
        except ValueError:
            self.report(node, f"{where}: expected a number of seconds, got {_describe(node)}")
            return None
        if not math.isfinite(value):
            self.report(node, f"{where}: must be a finite number of seconds, got {value}")
            return None
        if value <= 0:
            self.report(node, f"{where}: must be greater than 0 seconds, got {value:g}")
            return None
        return value

    def choice(self, node: Node, where: str, allowed: Sequence[str]) -> str | None:
        options = ", ".join(allowed)
        if not (isinstance(node, ScalarNode) and node.tag == _STR):
            hint = ""
            if isinstance(node, ScalarNode) and node.tag == _BOOL:
                hint = f"; YAML reads {node.value} as a boolean"
            self.report(node, f"{where}: expected one of {options}, got {_describe(node)}{hint}")
            return None
        value: str = node.value
        if value in allowed:
            return value
        close = _close(value.replace("_", "-"), allowed)
        hint = f" (did you mean '{close}'?)" if close else ""
        self.report(node, f"{where}: expected one of {options}, got {value!r}{hint}")
        return None

    # -- the document ------------------------------------------------------

    def document(self, root: Node | None) -> None:
        if root is None:
            return  # an empty file (or only comments): no rules
        if isinstance(root, SequenceNode):
            self.report(
                root,
                "expected a mapping with a 'rules' list, got a list; "
                "start the file with 'rules:' and indent the rules under it",
            )
            return
        top = self.mapping(root, "the policy file")
        if top is None:
            return
        rule_keys = {key: "rules go in a list under 'rules:'" for key in _RULE_KEYS}
        self.check_keys(top, _TOP_KEYS, "the policy file", rule_keys)
        if "rules" not in top:
            return  # empty, or only unknown keys (reported)
        rules = top["rules"][1]
        if _is_null(rules):
            return
        if not isinstance(rules, SequenceNode):
            self.report(
                rules,
                f"rules: expected a list of rules, got {_describe(rules)} "
                "(each rule starts with '- name: ...')",
            )
            return
        for index, item in enumerate(rules.value):
            parsed = self.rule(item, index)
            if parsed is not None:
                self.rules.append(parsed)

    def rule(self, node: Node, index: int) -> _Parsed | None:
        label = f"rules[{index}]"
        errors_before = self.error_count()
        entries = self.mapping(node, label)
        if entries is None:
            return None
        name: str | None = None
        name_node: Node | None = None
        if "name" in entries:
            name_node = entries["name"][1]
            name = self.rule_name(name_node, label)
        else:
            self.report(node, f"{label}: missing required key 'name' (e.g. name: alice-read-only)")
        if name is not None:
            label = f"rule {name!r}"
        elsewhere = {key: f"'{key}' is a setting: put it under 'set:'" for key in SETTINGS}
        elsewhere |= {key: f"'{key}' is a matcher: put it under 'match:'" for key in _MATCH_KEYS}
        elsewhere |= {
            "settings": "did you mean 'set'?",
            "matches": "did you mean 'match'?",
            "when": "did you mean 'match'?",
        }
        self.check_keys(entries, _RULE_KEYS, label, elsewhere)

        mode: Mode = "enforce"
        if "mode" in entries:
            chosen = self.choice(entries["mode"][1], f"{label}: mode", _MODES)
            mode = "dry-run" if chosen == "dry-run" else "enforce"

        match = Match()
        match_keys: dict[str, Node] = {}
        if "match" in entries:
            match, match_keys = self.match(entries["match"][1], label)

        settings: dict[str, object] = {}
        setting_keys: dict[str, Node] = {}
        if "set" in entries:
            settings, setting_keys = self.settings(entries["set"][1], label)
        else:
            self.report(
                node, f"{label}: missing required key 'set' (what the rule sets, e.g. set: ...)"
            )

        rule = Rule(
            name=name or f"rules[{index}]",
            file=self.file,
            line=_node_line(node),
            match=match,
            mode=mode,
            settings=settings,
        )
        parsed = _Parsed(rule, node, name_node, match_keys, setting_keys)
        self.rule_warnings(parsed, label)
        parsed.valid = name is not None and self.error_count() == errors_before
        return parsed

    def rule_name(self, node: Node, label: str) -> str | None:
        if not (isinstance(node, ScalarNode) and node.tag == _STR):
            self.report(
                node,
                f"{label}.name: expected a string, got {_describe(node)}; "
                "put it in quotes if you meant a string",
            )
            return None
        name: str = node.value
        if not _NAME.match(name):
            self.report(
                node,
                f"{label}.name: invalid rule name {name!r}: use 1-64 letters, digits, "
                "'.', '_' or '-', starting with a letter or digit",
            )
            return None
        return name

    # -- match -------------------------------------------------------------

    def match(self, node: Node, label: str) -> tuple[Match, dict[str, Node]]:
        entries = self.mapping(node, f"{label}: match")
        if entries is None:
            return Match(), {}
        elsewhere = {key: f"'{key}' is a setting: put it under 'set:'" for key in SETTINGS}
        elsewhere |= {alias: f"did you mean '{key}'?" for alias, key in _MATCH_ALIASES.items()}
        self.check_keys(entries, _MATCH_KEYS, f"{label}: match", elsewhere)
        keys: dict[str, Node] = {
            name: key for name, (key, _) in entries.items() if name in _MATCH_KEYS
        }

        def given(name: str) -> Node | None:
            entry = entries.get(name)
            return entry[1] if entry is not None else None

        users = claimed = listeners = None
        clients: tuple[IPNetwork, ...] | None = None
        tls: bool | None = None
        if (value := given("user")) is not None:
            users = self.user_patterns(value, f"{label}: match.user", "user")
        if (value := given("claimed_user")) is not None:
            claimed = self.user_patterns(value, f"{label}: match.claimed_user", "claimed_user")
        if (value := given("client")) is not None:
            clients = self.clients(value, f"{label}: match.client")
        if (value := given("listener")) is not None:
            listeners = self.listener_names(value, f"{label}: match.listener")
        if (value := given("tls")) is not None:
            tls = self.boolean(value, f"{label}: match.tls")
        match = Match(
            users=users, claimed_users=claimed, clients=clients, listeners=listeners, tls=tls
        )
        return match, keys

    def _non_empty(self, node: Node, where: str, what: str) -> bool:
        if not (isinstance(node, SequenceNode) and not node.value):
            return True
        self.report(
            node,
            f"{where}: the list is empty and would match nothing; leave out {what} to match any",
        )
        return False

    def user_patterns(self, node: Node, where: str, key: str) -> tuple[str, ...] | None:
        """User patterns, as the canonical accounts they must match."""
        values = self.strings(node, where, '[alice, "*@example.org"]')
        if values is None or not self._non_empty(node, where, f"'{key}'"):
            return None
        result: list[str] = []
        errors = self.error_count()
        for pattern, item in values:
            problem = _pattern_problem(pattern)
            if problem is not None:
                self.report(item, f"{where}: {problem}")
                continue
            if self.identity.domain == "strip" and "@" in pattern:
                self.warn(
                    item,
                    f"{where}: {pattern!r} can never match: accounts have no domain "
                    "(identity: domain: strip)",
                )
            account = _account_pattern(self.identity, pattern)
            if account != pattern:
                self.warn(
                    item,
                    f"{where}: {pattern!r} is matched as {account!r}, the account the "
                    "upstream opens for it (identity: settings); write it so",
                )
            if account not in result:
                result.append(account)
        return tuple(result) if self.error_count() == errors else None

    def clients(self, node: Node, where: str) -> tuple[IPNetwork, ...] | None:
        values = self.strings(node, where, '[10.0.0.0/8, "2001:db8::/32"]')
        if values is None or not self._non_empty(node, where, "'client'"):
            return None
        result: list[IPNetwork] = []
        errors = self.error_count()
        for text, item in values:
            network, problem = _parse_network(text)
            if network is None:
                self.report(item, f"{where}: {problem}")
            elif network not in result:
                result.append(network)
        return tuple(result) if self.error_count() == errors else None

    def listener_names(self, node: Node, where: str) -> tuple[str, ...] | None:
        values = self.strings(node, where, "[main]")
        if values is None or not self._non_empty(node, where, "'listener'"):
            return None
        result: list[str] = []
        errors = self.error_count()
        unknown: list[tuple[str, Node]] = []
        for name, item in values:
            if not name:
                self.report(item, f"{where}: empty listener name")
                continue
            if self.listeners is not None and name not in self.listeners:
                unknown.append((name, item))
            if name not in result:
                result.append(name)
        known = sorted(self.listeners or ())
        for name, item in unknown:
            close = _close(name, known)
            hint = f" (did you mean '{close}'?)" if close else ""
            configured = ", ".join(known) if known else "none"
            never = "; this rule can never apply" if len(unknown) == len(values) else ""
            self.warn(
                item,
                f"{where}: no listener is named {name!r}{hint} (configured: {configured}){never}",
            )
        return tuple(result) if self.error_count() == errors else None

    # -- set ---------------------------------------------------------------

    def settings(self, node: Node, label: str) -> tuple[dict[str, object], dict[str, Node]]:
        where = f"{label}: set"
        entries = self.mapping(node, where)
        if entries is None:
            return {}, {}
        elsewhere = {key: f"'{key}' is a matcher: put it under 'match:'" for key in _MATCH_KEYS}
        elsewhere |= {
            "timeout": "did you mean 'idle_timeout'?",
            "deny": "did you mean 'deny_commands' or 'access: deny'?",
            "mechanisms": "did you mean 'auth_mechanisms'?",
            "throttle": "did you mean 'login_throttle'?",
        }
        self.check_keys(entries, SETTINGS, where, elsewhere)
        if not entries and not (isinstance(node, MappingNode) and node.value):
            self.report(
                node, f"{where}: sets nothing; give at least one setting (e.g. access: deny)"
            )
        values: dict[str, object] = {}
        keys: dict[str, Node] = {}
        for name in SETTINGS:  # in the order explain prints them
            if name not in entries:
                continue
            key, value_node = entries[name]
            keys[name] = key
            at = f"{label}: set.{name}"
            if name in _NULLABLE and _is_null(value_node):
                values[name] = None
                continue
            ok, value = self.setting(name, value_node, at)
            if ok:
                values[name] = value
        if "deny_reply" in keys and "deny_commands" not in keys:
            self.report(
                keys["deny_reply"],
                f"{where}: deny_reply without deny_commands: the reply is only used for "
                "commands this same rule denies; add deny_commands to the rule",
            )
        return values, keys

    def setting(self, name: str, node: Node, where: str) -> tuple[bool, object]:
        """Parse one setting; ``(False, None)`` when it is invalid (reported)."""
        value: object = None
        if name == "access":
            value = self.choice(node, where, ("allow", "deny"))
        elif name == "deny_commands":
            value = self.commands(node, where)
        elif name == "deny_reply":
            value = self.deny_reply(node, where)
        elif name == "auth_mechanisms":
            value = self.mechanisms(node, where)
        elif name == "require_tls":
            value = self.boolean(node, where)
        elif name in ("idle_timeout", "max_session"):
            value = self.seconds(node, where)
            if name == "idle_timeout" and value is not None and value < RFC1939_MIN_IDLE_TIMEOUT:
                self.warn(
                    node,
                    f"{where} is {value:g} seconds, below 600: RFC 1939 §3 requires a POP3 "
                    "server's inactivity autologout timer to be at least 10 minutes",
                )
        elif name.startswith("max_sessions_"):
            value = self.integer(
                node, where, 1, "to refuse every session use access: deny; null means no limit"
            )
        elif name == "login_throttle":
            value = self.throttle(node, where)
        return value is not None, value

    def commands(self, node: Node, where: str) -> tuple[str, ...] | None:
        if isinstance(node, SequenceNode) and not node.value:
            return ()  # deny nothing: overrides later rules
        values = self.strings(node, where, "[DELE, RSET]")
        if values is None:
            return None
        result: list[str] = []
        errors = self.error_count()
        for text, item in values:
            verb = text.upper()
            if verb in DENIABLE:
                if verb not in result:
                    result.append(verb)
                continue
            if verb in _UNDENIABLE:
                self.report(item, f"{where}: {_UNDENIABLE[verb]}")
                continue
            close = _close(verb, sorted(DENIABLE))
            hint = f" (did you mean '{close}'?)" if close else ""
            self.report(
                item,
                f"{where}: unknown command {text!r}{hint}; a rule can deny "
                f"{', '.join(sorted(DENIABLE))}",
            )
        return tuple(result) if self.error_count() == errors else None

    def deny_reply(self, node: Node, where: str) -> str | None:
        if not (isinstance(node, ScalarNode) and node.tag == _STR):
            self.report(
                node,
                f"{where}: expected a string, got {_describe(node)}; "
                "put it in quotes if you meant a string",
            )
            return None
        text: str = node.value
        if not text.strip():
            self.report(node, f"{where}: empty reply text")
            return None
        if "\r" in text or "\n" in text:
            self.report(node, f"{where}: the reply must be one line (no CR or LF)")
            return None
        bad = next((ch for ch in text if not " " <= ch <= "~"), None)
        if bad is not None:
            self.report(
                node,
                f"{where}: the reply must be printable ASCII; {bad!r} (U+{ord(bad):04X}) is not",
            )
            return None
        if len(text) > MAX_DENY_REPLY:
            self.report(
                node,
                f"{where}: the reply is {len(text)} characters, longer than {MAX_DENY_REPLY}",
            )
            return None
        return text

    def mechanisms(self, node: Node, where: str) -> tuple[str, ...] | None:
        if isinstance(node, SequenceNode) and not node.value:
            self.warn(
                node,
                f"{where}: an empty list refuses every login (say access: deny if that is "
                "meant; null allows every mechanism)",
            )
            return ()
        values = self.strings(node, where, "[USER, PLAIN]")
        if values is None:
            return None
        result: list[str] = []
        errors = self.error_count()
        for text, item in values:
            mechanism = text.upper()
            if mechanism in MECHANISMS:
                if mechanism not in result:
                    result.append(mechanism)
                if mechanism not in _READABLE:
                    self.warn(
                        item,
                        f"{where}: {mechanism} is refused whatever this rule says: popguard "
                        "cannot tell which account it logs in to (docs/identity.md)",
                    )
                continue
            if mechanism == "PASS":
                self.report(item, f"{where}: PASS is part of USER/PASS: write USER")
                continue
            close = _close(mechanism, sorted(MECHANISMS))
            hint = f" (did you mean '{close}'?)" if close else ""
            self.report(
                item,
                f"{where}: unknown mechanism {text!r}{hint}; known: USER (USER/PASS), "
                f"{', '.join(sorted(MECHANISMS - {'USER'}))}",
            )
        return tuple(result) if self.error_count() == errors else None

    def throttle(self, node: Node, where: str) -> Throttle | None:
        entries = self.mapping(node, where)
        if entries is None:
            return None
        if not entries:
            self.report(
                node,
                f"{where}: expected failures, window and block "
                "(e.g. {failures: 5, window: 300, block: 900}); null turns throttling off",
            )
            return None
        errors = self.error_count()
        self.check_keys(entries, _THROTTLE_KEYS, where)
        for required in ("failures", "window", "block"):
            if required not in entries:
                self.report(node, f"{where}: missing required key '{required}'")
        failures = window = block = None
        if "failures" in entries:
            failures = self.integer(
                entries["failures"][1], f"{where}.failures", 1, "a block needs a failure"
            )
        if "window" in entries:
            window = self.seconds(entries["window"][1], f"{where}.window")
        if "block" in entries:
            block = self.seconds(entries["block"][1], f"{where}.block")
        by: tuple[Literal["client", "user"], ...] = ("client", "user")
        if "by" in entries:
            by_node = entries["by"][1]
            given: set[str] = set()
            for text, item in self.strings(by_node, f"{where}.by", "[client, user]") or ():
                if text in ("client", "user"):
                    given.add(text)
                    continue
                close = _close(text, ("client", "user"))
                hint = f" (did you mean '{close}'?)" if close else ""
                self.report(item, f"{where}.by: expected client or user, got {text!r}{hint}")
            if isinstance(by_node, SequenceNode) and not by_node.value:
                self.report(by_node, f"{where}.by: empty; count by client, user, or both")
            by = tuple(kind for kind in ("client", "user") if kind in given)
        if self.error_count() != errors or failures is None or window is None or block is None:
            return None
        return Throttle(failures=failures, window=window, block=block, by=by)

    # -- what cannot work --------------------------------------------------

    def rule_warnings(self, parsed: _Parsed, label: str) -> None:
        """Settings this rule can never set, given when each is decided."""
        rule = parsed.rule
        names = [name for name in parsed.setting_keys if name in DECIDED_AT]
        if rule.match.users is not None:
            key = parsed.match_keys.get("user")
            if "access" in names:
                self.warn(
                    key,
                    f"{label}: a rule matching on 'user' cannot refuse a connection before "
                    "login: its access applies once the server has accepted the login "
                    "(match on 'claimed_user' to refuse as soon as the name is given)",
                )
            never = [n for n in names if "login" not in DECIDED_AT[n]]
            if never:
                self.warn(
                    key,
                    f"{label}: {', '.join(never)} {_is_are(never)} decided before login, when "
                    "the user is not known yet; a rule matching on 'user' never sets "
                    f"{_it_them(never)} (match on 'claimed_user' instead)",
                )
        elif rule.match.claimed_users is not None:
            never = [n for n in names if DECIDED_AT[n] == ("connect",)]
            if never:
                self.warn(
                    parsed.match_keys.get("claimed_user"),
                    f"{label}: {', '.join(never)} {_is_are(never)} decided when a connection "
                    "arrives, before any user is named; a rule matching on 'claimed_user' "
                    f"never sets {_it_them(never)}",
                )


def _is_are(names: Sequence[str]) -> str:
    return "is" if len(names) == 1 else "are"


def _it_them(names: Sequence[str]) -> str:
    return "it" if len(names) == 1 else "them"


def _pattern_problem(pattern: str) -> str | None:
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


#: Login mechanisms popguard lets through (the others it always refuses).
_READABLE: Final = frozenset({"USER", "APOP"}) | DECODABLE


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


def _parse_network(text: str) -> tuple[IPNetwork | None, str]:
    """A network from ``10.0.0.0/8``, ``2001:db8::/32`` or a single address."""
    if "%" in text:
        return None, f"{text!r}: zone indexes (%...) are not supported"
    try:
        return ipaddress.ip_network(text, strict=True), ""
    except ValueError as exc:
        try:
            loose = ipaddress.ip_network(text, strict=False)
        except ValueError:
            return None, f"invalid address or network {text!r}: {exc}"
    address = text.partition("/")[0]
    return None, (
        f"{text!r} has host bits set: write the network {loose} "
        f"or the single address {address}/{loose.max_prefixlen}"
    )


def _syntax_issue(file: str, text: str, exc: yaml.YAMLError) -> Issue:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        line, column = _position(mark)
        message = exc.problem or exc.context or "invalid YAML"
        if exc.context and exc.problem and exc.context_mark is not None:
            message = f"{message} ({exc.context} started on line {_position(exc.context_mark)[0]})"
        if mark is not None:
            lines = text.splitlines()
            source = lines[mark.line] if mark.line < len(lines) else ""
            if "[" in source and "::" in source:
                message += '; quote IPv6 addresses in [...] lists, e.g. ["::1", "2001:db8::/32"]'
        return Issue(file, line, column, f"YAML syntax error: {message}")
    if isinstance(exc, ReaderError):
        index = max(0, min(int(exc.position), len(text)))
        line = text.count("\n", 0, index) + 1
        column = index - (text.rfind("\n", 0, index) + 1) + 1
        return Issue(file, line, column, f"YAML syntax error: {exc.reason}")
    return Issue(file, 0, 0, f"YAML syntax error: {exc}")


def _read_file(file: str, listeners: frozenset[str] | None, identity: IdentityRules) -> _FileWalker:
    walker = _FileWalker(file, listeners, identity)
    try:
        with open(file, "rb") as stream:
            data = stream.read()
    except OSError as exc:
        walker.issues.append(Issue(file, 0, 0, f"cannot read policy file: {exc.strerror or exc}"))
        return walker
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        walker.issues.append(Issue(file, line, column, "the policy file is not valid UTF-8"))
        return walker
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        walker.issues.append(_syntax_issue(file, text, exc))
        return walker
    except RecursionError:
        walker.issues.append(Issue(file, 0, 0, "YAML syntax error: nested too deeply"))
        return walker
    walker.document(root)
    return walker


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
        line, column = _position(later.node.start_mark)
        issues.append(Issue(later.rule.file, line, column, message, "warning"))
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
        walker = _read_file(file, known, identity)
        issues.extend(walker.issues)
        parsed.extend(walker.rules)

    names: dict[str, _Parsed] = {}
    for item in parsed:
        if item.name_node is None or item.rule.name.startswith("rules["):
            continue  # no name, or an invalid one (reported already)
        name = item.rule.name
        if name in names:
            first = names[name].rule
            line, column = _position(item.name_node.start_mark)
            issues.append(
                Issue(
                    item.rule.file,
                    line,
                    column,
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
