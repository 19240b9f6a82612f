"""``popguard policy check|explain``: validate the policy directory, explain it.

The main CLI mounts them with ``add_policy_commands(commands)`` and calls
``args.func(args)``; standalone: ``python -m popguard.policy.cli policy ...``.

``check [DIR]`` prints every problem as ``file:line:column: error|warning:
message`` (on stderr) and ``DIR: N rules in M files, OK`` (on stdout) when
there are no errors.  ``explain`` shows, for a user and a client, the value
of every setting and the rule that set it, per phase of the session (see
:data:`~popguard.policy.load.DECIDED_AT`).

Exit status: 0 valid (warnings included), 1 the policies (or the config
file given with ``--config``) have errors, 2 usage error.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

from popguard.core.identity import DEFAULT_IDENTITY, IdentityRules
from popguard.policy.load import (
    DECIDED_AT,
    PHASES,
    Issue,
    Phase,
    PolicyError,
    load_policies,
    policy_files,
)
from popguard.policy.model import (
    SETTINGS,
    Context,
    IPAddress,
    PolicySet,
    Setting,
    Throttle,
    client_address,
)

__all__ = [
    "COMBINING",
    "DEFAULT_DIRECTORY",
    "Decision",
    "add_policy_commands",
    "cmd_check",
    "cmd_explain",
    "explain",
    "format_value",
    "main",
]

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2

#: The policy directory when none is given: ``policies`` in the current directory.
DEFAULT_DIRECTORY: Final = "policies"

#: One line on how rules combine, printed by ``explain``.
COMBINING: Final = (
    "Rules apply in order (files by name, rules as written); for each setting the "
    "first matching rule that sets it wins, whatever its mode; a setting no rule "
    "sets keeps popguard's default."
)

_PHASES_NOTE: Final = (
    "Decided: connect = when the connection arrives; user named = when USER, APOP or "
    "a SASL response names the user; after login = once the server accepts the login."
)

_PHASE_TEXT: Final[dict[Phase, str]] = {
    "connect": "connect",
    "claim": "user named",
    "login": "after login",
}


# --------------------------------------------------------------------------
# explain, as data
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Decision:
    """A setting's value during some phases of a session, and the rule behind it.

    ``chosen`` is ``None`` when no rule sets it (popguard's default).
    ``known`` is ``False`` when the context does not reach any phase in
    which the setting is decided (e.g. ``max_sessions_per_user`` without a
    user): nothing can be said.
    """

    setting: str
    phases: tuple[Phase, ...]
    chosen: Setting | None
    known: bool = True


def _phase_contexts(context: Context) -> dict[Phase, Context]:
    connect = Context(client=context.client, listener=context.listener, tls=context.tls)
    contexts: dict[Phase, Context] = {"connect": connect}
    claimed = context.claimed_user or context.user
    if claimed is not None:
        contexts["claim"] = replace(connect, claimed_user=claimed)
    if context.user is not None:
        contexts["login"] = replace(connect, claimed_user=claimed, user=context.user)
    return contexts


def explain(policies: PolicySet, context: Context) -> list[Decision]:
    """Every setting of :data:`SETTINGS`, as decided in each phase *context* reaches.

    The connect phase uses only the client, listener and TLS of *context*;
    the claim phase adds the claimed user (``claimed_user``, else ``user``);
    the login phase the user.  Consecutive phases with the same value from
    the same rule are merged into one :class:`Decision`.
    """
    contexts = _phase_contexts(context)
    resolved = {phase: policies.resolve(ctx) for phase, ctx in contexts.items()}
    decisions: list[Decision] = []
    for name in SETTINGS:
        phases = [phase for phase in DECIDED_AT[name] if phase in resolved]
        if not phases:
            decisions.append(Decision(name, DECIDED_AT[name], None, known=False))
            continue
        groups: list[tuple[list[Phase], Setting | None]] = []
        for phase in phases:
            chosen = resolved[phase].get(name)
            if groups and _same(groups[-1][1], chosen):
                groups[-1][0].append(phase)
            else:
                groups.append(([phase], chosen))
        decisions.extend(Decision(name, tuple(group), chosen) for group, chosen in groups)
    return decisions


def _same(a: Setting | None, b: Setting | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.rule is b.rule and a.value == b.value


def format_value(name: str, value: object) -> str:
    """A setting's value as ``explain`` prints it."""
    if value is None:
        if name == "auth_mechanisms":
            return "any mechanism (null)"
        if name in ("idle_timeout", "max_session"):
            return "popguard default (null)"
        if name == "login_throttle":
            return "off (null)"
        return "no limit (null)"
    if isinstance(value, Throttle):
        return (
            f"{value.failures} failed logins in {value.window:g} s: block {value.block:g} s, "
            f"by {', '.join(value.by)}"
        )
    if isinstance(value, tuple):
        if not value:
            return "(none: every login refused)" if name == "auth_mechanisms" else "(none)"
        return ", ".join(str(item) for item in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g} s"
    if name == "deny_reply":
        return json.dumps(value)
    return str(value)


def _json_value(value: object) -> object:
    if isinstance(value, Throttle):
        return {
            "failures": value.failures,
            "window": value.window,
            "block": value.block,
            "by": list(value.by),
        }
    if isinstance(value, tuple):
        return list(value)
    return value


# --------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------


def _print_issues(issues: Sequence[Issue]) -> None:
    for issue in issues:
        print(issue, file=sys.stderr)


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


_Where = tuple[str, list[str] | None, IdentityRules]


def _settings_from_config(args: argparse.Namespace) -> _Where | int:
    """The directory, listener names and identity rules to use; an exit code
    if ``--config`` is bad."""
    listeners: list[str] | None = None
    identity = DEFAULT_IDENTITY
    directory = args.directory
    if args.config:
        from popguard.config import ConfigError, read_config

        try:
            partial, _ = read_config(args.config)
        except ConfigError as exc:
            for issue in exc.issues:
                print(issue, file=sys.stderr)
            return EXIT_INVALID
        if partial.listeners:
            listeners = [listener.name for listener in partial.listeners]
        if directory is None and partial.policies is not None:
            directory = partial.policies
        identity = partial.identity
    return (directory or DEFAULT_DIRECTORY), listeners, identity


def _load(
    directory: str, listeners: list[str] | None, identity: IdentityRules
) -> tuple[PolicySet, list[Issue]] | None:
    try:
        return load_policies(directory, listeners=listeners, identity=identity)
    except PolicyError as exc:
        _print_issues(exc.issues)
        errors, warnings = len(exc.errors), len(exc.warnings)
        summary = _plural(errors, "error")
        if warnings:
            summary += f", {_plural(warnings, 'warning')}"
        print(f"{directory}: {summary}", file=sys.stderr)
        return None


def cmd_check(args: argparse.Namespace) -> int:
    where = _settings_from_config(args)
    if isinstance(where, int):
        return where
    directory, listeners, identity = where
    loaded = _load(directory, listeners, identity)
    if loaded is None:
        return EXIT_INVALID
    policies, warnings = loaded
    _print_issues(warnings)
    try:
        files = len(policy_files(directory))
    except OSError:  # pragma: no cover - it was just listed
        files = len({rule.file for rule in policies.rules})
    print(f"{directory}: {_plural(len(policies.rules), 'rule')} in {_plural(files, 'file')}, OK")
    return EXIT_OK


def _context(args: argparse.Namespace, identity: IdentityRules) -> Context:
    """The session to explain; user names as the accounts the upstream opens."""

    def account(name: str | None) -> str | None:
        return None if name is None else identity.canonical(name)

    return Context(
        client=args.client,
        listener=args.listener or "",
        tls=bool(args.tls),
        claimed_user=account(args.claimed_user),
        user=account(args.user),
    )


def _describe_context(context: Context) -> str:
    parts = [
        f"client {context.client if context.client is not None else '(none)'}",
        f"listener {context.listener or '(none)'}",
        f"tls {'yes' if context.tls else 'no'}",
    ]
    claimed = context.claimed_user or context.user
    if claimed is not None:
        parts.append(f"claimed user {claimed}")
    if context.user is not None:
        parts.append(f"user {context.user}")
    return ", ".join(parts)


def _write_text(directory: str, policies: PolicySet, context: Context) -> None:
    decisions = explain(policies, context)
    rows: list[tuple[str, str, str, str]] = []
    previous = ""
    for decision in decisions:
        label = decision.setting if decision.setting != previous else ""
        previous = decision.setting
        phases = ", ".join(_PHASE_TEXT[phase] for phase in decision.phases)
        if not decision.known:
            value, source = "(unknown: depends on the user; give --user)", ""
        elif decision.chosen is None:
            value, source = "(not set: popguard default)", ""
        else:
            rule = decision.chosen.rule
            value = format_value(decision.setting, decision.chosen.value)
            source = f"rule {rule.name} ({rule.where}, {rule.mode})"
        rows.append((label, value, phases, source))
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    out = sys.stdout
    out.write(f"directory: {directory} ({_plural(len(policies.rules), 'rule')})\n")
    out.write(f"context: {_describe_context(context)}\n\n")
    header = ("setting", "value", "decided", "set by")
    for row in (header, *rows):
        cells = [f"{cell:<{width}}" for cell, width in zip(row, widths, strict=False)]
        out.write(("  ".join(cells) + "  " + row[3]).rstrip() + "\n")
    out.write("\n" + textwrap.fill(COMBINING, 79) + "\n")
    out.write(textwrap.fill(_PHASES_NOTE, 79) + "\n")


def _write_json(directory: str, policies: PolicySet, context: Context) -> None:
    settings: dict[str, list[dict[str, Any]]] = {}
    for decision in explain(policies, context):
        entry: dict[str, Any] = {"phases": list(decision.phases), "known": decision.known}
        if decision.chosen is None:
            entry |= {"set": False, "value": None, "rule": None}
        else:
            rule = decision.chosen.rule
            entry |= {
                "set": True,
                "value": _json_value(decision.chosen.value),
                "rule": {
                    "name": rule.name,
                    "file": rule.file,
                    "line": rule.line,
                    "mode": rule.mode,
                },
            }
        settings.setdefault(decision.setting, []).append(entry)
    document = {
        "directory": directory,
        "rules": len(policies.rules),
        "context": {
            "client": None if context.client is None else str(context.client),
            "listener": context.listener or None,
            "tls": context.tls,
            "claimed_user": context.claimed_user or context.user,
            "user": context.user,
        },
        "phases": list(PHASES),
        "settings": settings,
        "model": COMBINING,
    }
    json.dump(document, sys.stdout, indent=2)
    sys.stdout.write("\n")


def cmd_explain(args: argparse.Namespace) -> int:
    where = _settings_from_config(args)
    if isinstance(where, int):
        return where
    directory, listeners, identity = where
    loaded = _load(directory, listeners, identity)
    if loaded is None:
        return EXIT_INVALID
    policies, _ = loaded  # warnings: `policy check` shows them
    context = _context(args, identity)
    try:
        if args.format == "json":
            _write_json(directory, policies, context)
        else:
            _write_text(directory, policies, context)
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
    return EXIT_OK


# --------------------------------------------------------------------------
# The parser
# --------------------------------------------------------------------------


def _client(text: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        address = client_address(text)  # host:port or [v6]:port
        if address is None:
            raise argparse.ArgumentTypeError(f"invalid client address {text!r}") from None
        return address


_client.__name__ = "client address"


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "directory",
        nargs="?",
        metavar="DIR",
        help="the policy directory (default: the config file's 'policies', else ./policies)",
    )
    parser.add_argument(
        "--config",
        "-c",
        metavar="FILE",
        help="popguard's config file: its 'policies' directory and listener names",
    )


def add_policy_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``policy check|explain``; each sets ``func(args) -> int``."""
    policy = subparsers.add_parser(
        "policy",
        help="check and explain the policy rules",
        description="Validate the policy directory, and explain which rule sets each "
        "setting for a user and client. See docs/policies.md.",
    )
    commands = policy.add_subparsers(dest="policy_command", metavar="SUBCOMMAND", required=True)

    check = commands.add_parser(
        "check",
        help="validate the policy files",
        description="Validate every *.yaml/*.yml file of the policy directory; print each "
        "problem as file:line:column: error|warning: message. Exit 0 valid (warnings "
        "included), 1 errors.",
    )
    _add_common(check)
    check.set_defaults(func=cmd_check)

    explain_parser = commands.add_parser(
        "explain",
        help="show the settings in force for a user and client, and why",
        description="For each setting, print the value in force and the rule that set it "
        "(file:line and mode), per phase of the session: at connect, once the user is named, "
        "after login. Exit 0, 1 if the policies have errors.",
    )
    _add_common(explain_parser)
    explain_parser.add_argument("--user", metavar="USER", help="the user, after login")
    explain_parser.add_argument(
        "--claimed-user",
        metavar="USER",
        help="the name given with USER, APOP or SASL (default: --user)",
    )
    explain_parser.add_argument(
        "--client", type=_client, metavar="ADDR", help="the client's IP address"
    )
    explain_parser.add_argument("--listener", metavar="NAME", help="the listener's name")
    explain_parser.add_argument("--tls", action="store_true", help="the client connected with TLS")
    explain_parser.add_argument(
        "--format", choices=("text", "json"), default="text", help="output format"
    )
    explain_parser.set_defaults(func=cmd_explain)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="popguard")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_policy_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], Any] = args.func
    try:
        return int(func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
