"""A realistic policy tree of 1000 rules for ``--policy-compare``.

Ten files of 100 rules, in the order popguard reads them (files by name,
rules as written), so that specific rules come first and the one broad rule
last:

* 900 per-user rules, ``match: {user: NAME}``: read-only mailboxes
  (``deny_commands``), idle and session timers, a few in dry-run.  About
  400 of them name users the benchmark logs in as (``ping``, ``bulk``, the
  pool ``c0000``... and the DELE users ``d0000``...), so popguard's per-user
  index finds a rule for most sessions; those rules deny only commands the
  workload never sends (TOP, LAST, XTND) and set timers far above its
  sessions' length.  The rest name users ``u0000``... that never log in.
* 50 rules matching ``client:`` networks (IPv4 and IPv6 CIDRs): limits per
  client, refused networks, login mechanisms.  One covers 127.0.0.0/8 and
  raises the per-client limit above anything the benchmark opens.
* 49 rules with user globs and ``@domain`` patterns (on ``user`` and on
  ``claimed_user``).  Two of them match the benchmark's users (``c0*``,
  ``d*``) and set only timers.
* a last catch-all rule: ``login_throttle`` (50 failures in 60 s block for
  60 s), ``max_sessions_per_user: 100``, ``max_sessions_per_client: 500``
  and ``max_sessions_total: 100000``: checked for every session, never
  reached by the workload.

Nothing in the tree refuses a session, a login or a command of the
benchmark's workload (USER, PASS, STAT, RETR, DELE, NOOP, QUIT); the
benchmark also runs ``popguard policy check`` on it and ``policy explain``
for its users before measuring.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.procs import BenchError

FILES = 10
PER_USER = 900
NETWORKS = 50
PATTERNS = 49
TOTAL = PER_USER + NETWORKS + PATTERNS + 1

#: Commands the benchmark sends: no rule that can match its users denies them.
WORKLOAD_COMMANDS = ("USER", "PASS", "STAT", "LIST", "RETR", "DELE", "NOOP", "QUIT")


def _q(value: str) -> str:
    """A YAML scalar, quoted (JSON strings are YAML)."""
    return json.dumps(value)


def _rule(name: str, match: dict[str, Any] | None, settings: dict[str, Any], mode: str = "") -> str:
    lines = [f"  - name: {name}"]
    if mode:
        lines.append(f"    mode: {mode}")
    if match:
        lines.append("    match:")
        for key, value in match.items():
            lines.append(f"      {key}: {_yaml_value(value)}")
    lines.append("    set:")
    for key, value in settings.items():
        lines.append(f"      {key}: {_yaml_value(value)}")
    return "\n".join(lines)


def _yaml_value(value: Any) -> str:
    if isinstance(value, str):
        return _q(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if value is None:
        return "null"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no YAML for {value!r}")


def _per_user_rule(i: int, user: str, bench_user: bool) -> str:
    """Rule ``i`` of the per-user rules, for ``user``."""
    kind = i % 6
    name = f"user-{user}"
    if bench_user:
        # Only what the workload never meets: TOP/LAST/XTND, long timers.
        settings: dict[str, Any]
        if kind in (0, 3):
            settings = {"deny_commands": ["TOP", "LAST"], "idle_timeout": 3600}
        elif kind == 1:
            settings = {
                "deny_commands": ["XTND"],
                "deny_reply": "XTND is not offered for this mailbox",
            }
        elif kind == 2:
            settings = {"idle_timeout": 2400, "max_session": 7200}
        elif kind == 4:
            settings = {"max_sessions_per_user": 50}
        else:
            settings = {"deny_commands": ["TOP"], "max_session": 14400}
    elif kind in (0, 3):
        settings = {
            "deny_commands": ["DELE", "RSET"],
            "deny_reply": "This mailbox is read-only",
        }
    elif kind == 1:
        settings = {"idle_timeout": 900 + 60 * (i % 20)}
    elif kind == 2:
        settings = {"deny_commands": ["DELE"], "idle_timeout": 1800}
    elif kind == 4:
        settings = {"max_sessions_per_user": 1 + i % 4, "max_session": 3600}
    else:
        # A disabled account: refused as soon as USER names it (a rule on
        # the authenticated user could refuse it only after the login).
        return _rule(name, {"claimed_user": user}, {"access": "deny"})
    mode = "dry-run" if i % 25 == 7 else ""
    return _rule(name, {"user": user}, settings, mode)


def _network_rule(i: int) -> str:
    """Rule ``i`` of the client-network rules (``i == 0``: loopback)."""
    if i == 0:
        return _rule(
            "net-loopback-monitoring",
            {"client": ["127.0.0.0/8", "::1"]},
            {"max_sessions_per_client": 10000},
        )
    kind = i % 5
    if kind == 0:
        match = {"client": [f"10.{i}.0.0/16", f"10.{100 + i}.0.0/16"]}
        settings: dict[str, Any] = {"max_sessions_per_client": 20 + i}
    elif kind == 1:
        match = {"client": f"192.168.{i}.0/24"}
        settings = {"auth_mechanisms": ["USER", "PLAIN", "SCRAM-SHA-256"]}
    elif kind == 2:
        match = {"client": f"2001:db8:{i:x}::/48"}
        settings = {"max_sessions_per_client": 10, "login_throttle": None}
    elif kind == 3:
        match = {"client": [f"203.0.113.{4 * i % 256}/30", f"198.51.100.{i}"]}
        settings = {"access": "deny"}
    else:
        match = {"client": f"172.{16 + i % 16}.{i}.0/24"}
        settings = {
            "login_throttle": {"failures": 3, "window": 600, "block": 3600, "by": ["client"]}
        }
    return _rule(f"net-{i:02d}", match, settings)


_DOMAINS = ("example.org", "example.net", "corp.example", "partner.example", "mail.example")


def _pattern_rule(i: int) -> str:
    """Rule ``i`` of the glob and @domain rules (0 and 1 match the bench users)."""
    if i == 0:
        return _rule("glob-pool-users", {"user": "c0*"}, {"max_session": 7200})
    if i == 1:
        return _rule("glob-dele-users", {"user": ["d*", "svc-d?"]}, {"idle_timeout": 1200})
    domain = _DOMAINS[i % len(_DOMAINS)]
    kind = i % 4
    if kind == 0:
        match: dict[str, Any] = {"user": f"*@dept{i}.{domain}"}
        settings: dict[str, Any] = {"idle_timeout": 900, "deny_commands": ["DELE"]}
    elif kind == 1:
        match = {"user": [f"@sub{i}.{domain}", f"shared-{i}-*"]}
        settings = {"max_sessions_per_user": 2}
    elif kind == 2:
        match = {"claimed_user": [f"@blocked{i}.{domain}", f"guest{i}?"]}
        settings = {"access": "deny"}
    else:
        match = {"user": f"archive-[0-9][0-9]-{i}*", "client": "10.0.0.0/8"}
        settings = {"deny_commands": ["DELE", "RSET"], "max_session": 1800}
    return _rule(f"pattern-{i:02d}", match, settings)


def _catch_all() -> str:
    return _rule(
        "everyone",
        None,
        {
            "login_throttle": {"failures": 50, "window": 60, "block": 60},
            "max_sessions_per_user": 100,
            "max_sessions_per_client": 500,
            "max_sessions_total": 100000,
        },
    )


def write_tree(directory: Path, bench_users: Sequence[str]) -> dict[str, Any]:
    """Write the 1000 rules into ``directory`` (10 files); return counts."""
    directory.mkdir(parents=True, exist_ok=True)
    bench = list(dict.fromkeys(bench_users))[: PER_USER // 2]
    # The bench users evenly spread among the others, not all in the first files.
    positions = {k * PER_USER // len(bench) for k in range(len(bench))} if bench else set()
    others = iter(f"u{k:04d}" for k in range(PER_USER))
    named = iter(bench)
    users = [
        (next(named), True) if i in positions else (next(others), False) for i in range(PER_USER)
    ]
    per_file_users = PER_USER // FILES
    per_file_nets = NETWORKS // FILES
    per_file_patterns = -(-PATTERNS // FILES)
    net_i = pat_i = 0
    counts = {"per_user": 0, "bench_users": 0, "networks": 0, "patterns": 0, "catch_all": 0}
    for f in range(FILES):
        rules = []
        for j in range(per_file_users):
            i = f * per_file_users + j
            user, is_bench = users[i]
            rules.append(_per_user_rule(i, user, is_bench))
            counts["per_user"] += 1
            counts["bench_users"] += is_bench
        for _ in range(per_file_nets):
            rules.append(_network_rule(net_i))
            net_i += 1
            counts["networks"] += 1
        for _ in range(per_file_patterns):
            if pat_i < PATTERNS:
                rules.append(_pattern_rule(pat_i))
                pat_i += 1
                counts["patterns"] += 1
        if f == FILES - 1:
            rules.append(_catch_all())
            counts["catch_all"] += 1
        text = (
            f"# bench --policy-compare: generated rules, file {f + 1} of {FILES}\n"
            "rules:\n" + "\n".join(rules) + "\n"
        )
        (directory / f"{10 + f * 5:02d}-bench-{f:02d}.yaml").write_text(text)
    counts["rules"] = sum(counts[k] for k in ("per_user", "networks", "patterns", "catch_all"))
    if counts["rules"] != TOTAL:
        raise BenchError(f"generated {counts['rules']} rules, meant {TOTAL}")
    return counts


def write_empty(directory: Path) -> None:
    """A policy directory with no rules (as shipped): popguard changes nothing."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "00-none.yaml").write_text("# bench --policy-compare: no rules\nrules: []\n")


def _popguard(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "popguard", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def check(directory: Path) -> tuple[str, int]:
    """``popguard policy check DIR``: its summary line and the number of warnings.

    BenchError when it finds errors.
    """
    proc = _popguard("policy", "check", str(directory))
    out = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        raise BenchError(f"popguard policy check {directory} failed:\n{out}")
    lines = out.splitlines()
    warnings = sum(1 for line in lines if ": warning: " in line)
    summary = next((line for line in lines if line.endswith(", OK")), lines[-1] if lines else "")
    # "DIR: 1000 rules in 10 files, OK" -> "1000 rules in 10 files, OK"
    return summary.rpartition(": ")[2], warnings


def explain_denials(directory: Path, users: Sequence[str], client: str = "127.0.0.1") -> list[str]:
    """What the tree would refuse the benchmark's users: [] when nothing.

    Runs ``popguard policy explain --format json`` for each user and looks,
    in every phase, for ``access: deny`` and for denied workload commands.
    """
    problems = []
    for user in users:
        proc = _popguard(
            "policy",
            "explain",
            "--user",
            user,
            "--client",
            client,
            "--format",
            "json",
            str(directory),
        )
        if proc.returncode != 0:
            raise BenchError(f"popguard policy explain for {user} failed:\n{proc.stderr}")
        try:
            settings = json.loads(proc.stdout)["settings"]
        except (ValueError, KeyError, TypeError) as exc:
            raise BenchError(
                f"popguard policy explain printed no settings: {proc.stdout[:200]!r}"
            ) from exc
        for entry in settings.get("access", []):
            if entry.get("value") == "deny":
                problems.append(f"{user}: access deny (rule {_rule_name(entry)})")
        for entry in settings.get("deny_commands", []):
            hit = sorted(set(map(str, entry.get("value") or [])) & set(WORKLOAD_COMMANDS))
            if hit:
                problems.append(f"{user}: denies {', '.join(hit)} (rule {_rule_name(entry)})")
    return problems


def _rule_name(entry: dict[str, Any]) -> str:
    rule = entry.get("rule")
    return str(rule.get("name")) if isinstance(rule, dict) else str(rule)
