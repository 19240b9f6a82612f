"""``python -m bench``: set up a private Dovecot, run the cases, print the table."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import pki, policytree, procs
from bench.cases import (
    CASES,
    COMPARISONS,
    DEFAULT_SIDES,
    FLOOR,
    FLOOR_LABEL,
    Comparison,
    Env,
    Params,
    Variant,
    dele_messages_per_user,
    floor_applies,
    make_variants,
    params_dict,
)
from bench.mail import MailFactory
from bench.procs import BenchError
from bench.report import render
from bench.target import Target

ORDER = ("bulk", "pingpong", "concurrency", "dele", "memory", "workers")
#: Without --only: every case but ``workers`` (it needs ``popguard serve
#: --workers`` and adds a few minutes; select it with ``--only workers``).
DEFAULT_CASES = ("bulk", "pingpong", "concurrency", "dele", "memory")
ALIASES = {
    "cpu": "concurrency",
    "ping-pong": "pingpong",
    "mem": "memory",
    "conc": "concurrency",
    "delete": "dele",
}
PASSWORD = "bench-secret"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure popguard against a private Dovecot on loopback: each case "
        "DIRECT to Dovecot, THROUGH popguard and THROUGH a bare trio relay (the floor), and "
        "print popguard/direct, floor/direct and popguard/floor.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small counts, one repetition: a smoke check"
    )
    parser.add_argument(
        "--only",
        metavar="CASES",
        help="comma-separated subset of: bulk, pingpong, concurrency, cpu (= concurrency), dele, "
        "memory, workers (default: all but workers)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write every figure to FILE as JSON")
    parser.add_argument("--reps", type=int, metavar="N", help="repetitions per figure (default 3)")
    parser.add_argument(
        "--client-procs",
        type=int,
        metavar="N",
        help="client processes for the concurrency case (default 2)",
    )
    parser.add_argument(
        "--held",
        type=int,
        metavar="N",
        help="idle authenticated sessions the memory case holds (default 5000, --quick 100)",
    )
    parser.add_argument(
        "--login-processes",
        type=int,
        metavar="N",
        help="Dovecot pop3-login processes (default: CPUs, at most 4)",
    )
    parser.add_argument(
        "--audit-file",
        metavar="FILE",
        help="let popguard write its audit log to FILE (default: no audit file)",
    )
    parser.add_argument(
        "--audit-compare",
        action="store_true",
        help="measure bulk, concurrency and dele through two popguards, auditing off and "
        "full auditing (file, hash chain, UIDL identity), and report full/off",
    )
    parser.add_argument(
        "--audit-breakdown",
        action="store_true",
        help="like --audit-compare, plus a popguard with the audit file but no message "
        "identity (full / file only is what identity costs)",
    )
    parser.add_argument(
        "--policy-compare",
        action="store_true",
        help="measure through two popguards, one without policies and one with a generated "
        "tree of 1000 rules, and report rules/none (ping-pong, concurrency; bulk and dele too)",
    )
    parser.add_argument(
        "--tls-compare",
        action="store_true",
        help="bulk, ping-pong, concurrency and dele over TLS: DIRECT to Dovecot's POP3S port, "
        "popguard with TLS on both sides, and TLS offload (TLS to popguard, plaintext to "
        "Dovecot), in the same run",
    )
    parser.add_argument(
        "--floor",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure bench/floor.py, a bare trio relay, as a third side of bulk, "
        "pingpong, concurrency, dele and memory, except in a case under a comparison "
        "(default: on; --no-floor: popguard and DIRECT only)",
    )
    parser.add_argument(
        "--popguard-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for `popguard serve` (repeatable)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (Dovecot and popguard logs)"
    )
    return parser


def select_cases(only: str | None) -> list[str]:
    if not only:
        return list(DEFAULT_CASES)
    wanted = set()
    for raw in only.split(","):
        name = raw.strip().lower()
        if not name:
            continue
        name = ALIASES.get(name, name)
        if name not in CASES:
            raise SystemExit(
                f"--only: unknown case {raw.strip()!r} (choose from {', '.join(ORDER)})"
            )
        wanted.add(name)
    return [name for name in ORDER if name in wanted]


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def _dovecot_version() -> str:
    from popguard.testing.dovecot import find_dovecot

    binary = find_dovecot()
    if binary is None:
        return "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run([binary, "--version"], capture_output=True, timeout=10, check=False)
        return out.stdout.decode(errors="replace").strip().split(" ")[0]
    return "?"


def _git_state() -> str:
    """The popguard tree measured: commit, and whether it had local changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            timeout=10,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "popguard"],
            capture_output=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "?"
    state = head.stdout.decode().strip()
    return state + (" + local changes" if dirty.stdout.strip() else "")


def _log(started: float) -> Any:
    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    return log


def _notes(results: dict[str, Any]) -> list[str]:
    notes = []
    cases = results["cases"]
    for name, tag in (("concurrency", "(c)"), ("dele", "(f)"), ("workers", "(g)")):
        cc = cases.get(name, {})
        if "runs" not in cc:
            continue
        all_runs = [r for rs in cc["runs"].values() for r in rs]
        busiest = max(r["client_cpu_max_util"] for r in all_runs)
        if busiest > 0.85:
            notes.append(
                f"a client process reached {busiest:.0%} of a core in {tag}: the client may "
                "limit the rate; try --client-procs"
            )
        else:
            notes.append(
                f"{tag} client not saturated: busiest client process at most {busiest:.0%} "
                "of a core"
            )
        single = [r for side, rs in cc["runs"].items() if side not in ("w2", FLOOR) for r in rs]
        pg = max((r.get("popguard_cpu_util", 0.0) for r in single), default=0.0)
        if pg > 0.9:
            notes.append(
                f"popguard used {pg:.0%} of a core in {tag}: its single trio thread is the limit"
            )
        fl = max((r["popguard_cpu_util"] for r in cc["runs"].get(FLOOR, [])), default=0.0)
        if fl > 0.9:
            notes.append(f"the floor used {fl:.0%} of a core in {tag}: the floor is the limit")
        for side, ex in cc.get("expunged", {}).items():
            if ex["expunged"] != ex["sessions"]:
                notes.append(
                    f"{tag} {side}: {ex['expunged']} messages expunged for {ex['sessions']} "
                    "DELE sessions"
                )
        for side, d in cc.get("deletions_recorded", {}).items():
            if d["recorded"] != d["sessions"]:
                notes.append(
                    f"{tag} {side}: {d['recorded']} deletions.committed records for "
                    f"{d['sessions']} DELE sessions"
                )
    for name, res in cases.items():
        parts = [res] if name != "bulk" else [res.get("bulk", {}), res.get("bulk_plain", {})]
        for part in parts:
            for side, au in part.get("audit_file", {}).items():
                wait = au["flush_wait_s"]["max"]
                if wait > 1.0:
                    notes.append(
                        f"{name}, {side}: the last audit records reached the file {wait:.1f} s "
                        "after the run ended (the writer thread was behind)"
                    )
                if au["bad_lines"]:
                    notes.append(f"{name}, {side}: {au['bad_lines']} audit lines were not JSON")
    mem = cases.get("memory", {})
    if "held_alive" in mem:
        alive = mem["held_alive"]
        every = mem.get("held_alive_all", {})
        if min(alive["direct"], alive["popguard"]) < alive["sample"] or min(
            every.get("direct", 0), every.get("popguard", 0)
        ) < every.get("held", 0):
            notes.append("some held sessions did not answer NOOP in (d): see the JSON runs")
    bulk = cases.get("bulk", {})
    if "bulk_plain" in bulk and bulk["bulk_plain"]["stalls_over_20ms"]["popguard"] > 0:
        notes.append(
            "RETRs over 20 ms through popguard with a Nagle-on client: delayed-ACK stalls?"
        )
    load = results["meta"]["loadavg_before"].split()[0]
    with contextlib.suppress(ValueError):
        if float(load) > 0.5 * (os.cpu_count() or 1):
            notes.append(f"the machine was busy before the run (load {load}): figures are noisy")
    return notes


def _bench_users(params: Params) -> list[str]:
    """The names the benchmark logs in as (whichever cases run: the same tree each time)."""
    names = ["ping", "bulk"]
    names += [f"c{i:04d}" for i in range(params.pool_users)]
    names += [f"d{i:04d}" for i in range(params.dele_sessions)]
    return names


def policy_variants(
    workdir: Path,
    bench_users: list[str],
    popguard_args: Sequence[str],
    log: Any,
) -> tuple[dict[str, Variant], dict[str, Any]]:
    """--policy-compare: the two popguards, their policy directories written and checked.

    ``none``: a directory whose one file says ``rules: []``; ``policy``: the
    1000 rules of :mod:`bench.policytree`.  Both are checked with ``popguard
    policy check``; ``policy explain`` must show nothing that refuses a few of
    the benchmark's users (their sessions, their logins or the commands the
    workload sends).
    """
    extra = tuple(popguard_args)
    none_dir = workdir / "policies-none"
    tree_dir = workdir / "policies-1000"
    policytree.write_empty(none_dir)
    counts = policytree.write_tree(tree_dir, bench_users)
    info: dict[str, Any] = {"tree": counts, "directory": str(tree_dir)}
    for name, directory in (("none", none_dir), ("policy", tree_dir)):
        summary, warnings = policytree.check(directory)
        info[f"check_{name}"] = summary
        info[f"warnings_{name}"] = warnings
        log(f"popguard policy check: {summary}" + (f" ({warnings} warnings)" if warnings else ""))
    sample = list(bench_users[:2])
    sample += [u for u in bench_users if u.startswith("c")][:2]
    sample += [u for u in bench_users if u.startswith("d")][:1]
    problems = policytree.explain_denials(tree_dir, sample)
    if problems:
        raise BenchError(
            "the generated policy tree would refuse the benchmark's workload: "
            + "; ".join(problems)
        )
    info["explained_users"] = sample
    log(
        f"policy tree: {counts['rules']} rules in {policytree.FILES} files "
        f"({counts['per_user']} per-user, {counts['bench_users']} of them for bench users; "
        f"{counts['networks']} client networks; {counts['patterns']} globs and @domains; "
        f"1 catch-all); policy explain finds nothing refused for {', '.join(sample)}"
    )
    return {
        "none": Variant("none", "no policies", ("--policies", str(none_dir), *extra)),
        "policy": Variant(
            "policy", f"{counts['rules']} rules", ("--policies", str(tree_dir), *extra)
        ),
    }, info


def tls_variants(
    workdir: Path, dovecot: Any, popguard_args: Sequence[str], log: Any
) -> tuple[dict[str, Variant], Target, dict[str, Any]]:
    """--tls-compare: the two TLS popguards and DIRECT's target (Dovecot's POP3S port).

    ``tls``: POP3S toward clients and implicit TLS toward Dovecot's POP3S
    port, verifying Dovecot's certificate (its own file as the CA, name
    ``localhost``).  ``offload``: POP3S toward clients, plaintext toward
    Dovecot's plain port.
    """
    extra = tuple(popguard_args)
    files = pki.make_listener_pki(workdir / "tls", dovecot.cert_path)
    listen = ("--tls", "implicit", "--tls-cert", str(files.cert), "--tls-key", str(files.key))
    upstream_tls = (
        "--upstream-tls",
        "implicit",
        "--upstream-ca-file",
        str(dovecot.cert_path),
        "--upstream-server-name",
        pki.SERVER_NAME,
    )
    spec = files.client_spec
    direct = Target(dovecot.host, dovecot.tls_port, spec)
    info = {
        "dovecot_pop3s": f"{dovecot.host}:{dovecot.tls_port}",
        "popguard_cert": str(files.cert),
        "upstream_verified_as": pki.SERVER_NAME,
        "client_ca": str(files.clients_ca),
    }
    log(
        f"TLS comparison: DIRECT is Dovecot's POP3S {dovecot.host}:{dovecot.tls_port}; "
        "popguard listens with POP3S (trustme certificate for localhost) and reaches "
        "Dovecot's POP3S port verifying its certificate as 'localhost' (tls), or its plain "
        "port (offload)"
    )
    return (
        {
            "offload": Variant("offload", "TLS offload", (*listen, *extra), client_tls=spec),
            "tls": Variant(
                "tls",
                "TLS both sides",
                (*listen, *upstream_tls, *extra),
                upstream=(dovecot.host, dovecot.tls_port),
                client_tls=spec,
            ),
        },
        direct,
        info,
    )


#: The sessions :class:`popguard.testing.dovecot.DovecotInstance` is set up for
#: (its ``process_limit`` of 2000 per service and ``client_limit`` of 4000).
DOVECOT_BASE_SESSIONS = 1800


def dovecot_limits(cases: Sequence[str], params: Params) -> str:
    """dovecot.conf lines (``extra_config``) for the sessions the run holds at once.

    Dovecot runs one ``pop3`` process per session (``service_count = 1``,
    ``client_limit = 1``: its default model, kept as it is), so N held
    sessions are N processes: ``service pop3 { process_limit }`` must
    exceed them, and every such process keeps a connection to ``anvil``
    (per user and IP session counts) and talks to ``log``, ``config`` and
    ``auth``: ``default_client_limit`` must exceed them too.  Through
    popguard Dovecot sees the same N sessions, all from 127.0.0.1, so
    ``mail_max_userip_connections`` must allow N / users per user.

    Empty (the launcher's own limits) unless the memory case holds more
    than :data:`DOVECOT_BASE_SESSIONS`.
    """
    sessions = params.held if "memory" in cases else 0
    if sessions <= DOVECOT_BASE_SESSIONS:
        return ""
    processes = sessions + 200  # the ping session, login and auth processes, stragglers
    clients = 2 * processes + 1000
    return "\n".join(
        [
            f"# bench: room for {sessions} concurrent POP3 sessions, one pop3 process each",
            f"default_process_limit = {processes}",
            f"default_client_limit = {clients}",
            "service pop3 {",
            f"  process_limit = {processes}",
            "}",
            "service anvil {",
            f"  client_limit = {clients}",
            "}",
            "protocol pop3 {",
            f"  mail_max_userip_connections = {processes}",
            "}",
        ]
    )


def _setup_users(
    dovecot: Any, cases: Sequence[str], params: Params, log: Any, *, dele_sides: int = 2
) -> dict[str, Any]:
    """Create the users and their mail; ``dele_sides``: sides the DELE case runs."""
    mail = MailFactory()
    bulk_user = ("bulk", PASSWORD)
    ping_user = ("ping", PASSWORD)
    pool: list[tuple[str, str]] = []
    if "bulk" in cases:
        count = max(params.bulk_messages, params.bulk_plain_messages)
        log(f"creating {count} messages of {params.bulk_size:,} bytes for user 'bulk'")
        dovecot.add_user("bulk", PASSWORD, mail.messages(count, params.bulk_size, "bulk"))
    dovecot.add_user("ping", PASSWORD, mail.messages(1, params.small_size, "ping"))
    if {"concurrency", "memory", "workers"} & set(cases):
        log(f"creating {params.pool_users} users with {params.small_messages} small messages")
        for i in range(params.pool_users):
            name = f"c{i:04d}"
            dovecot.add_user(
                name, PASSWORD, mail.messages(params.small_messages, params.small_size, name)
            )
            pool.append((name, PASSWORD))
    dele_pool: list[tuple[str, str]] = []
    dele_maildirs = []
    if "dele" in cases:
        per_user = dele_messages_per_user(params, dele_sides)
        log(
            f"creating {params.dele_sessions} users with {per_user} messages of "
            f"{params.dele_size:,} bytes for the DELE case"
        )
        # The same few bodies for every user: building them is not the point.
        messages = mail.messages(per_user, params.dele_size, "dele")
        for i in range(params.dele_sessions):
            name = f"d{i:04d}"
            dele_maildirs.append(dovecot.add_user(name, PASSWORD, messages))
            dele_pool.append((name, PASSWORD))
    return {
        "bulk_user": bulk_user,
        "ping_user": ping_user,
        "pool": pool,
        "dele_pool": dele_pool,
        "dele_maildirs": dele_maildirs,
    }


def run(
    cases: Sequence[str],
    params: Params,
    *,
    workdir: Path,
    log: Any,
    audit_file: str | None = None,
    popguard_args: Sequence[str] = (),
    login_processes: int | None = None,
    comparison: Comparison | None = None,
    floor: bool = True,
) -> dict[str, Any]:
    """Start Dovecot under ``workdir``, run ``cases``, stop everything; return the results.

    ``comparison`` (:data:`bench.cases.COMPARISONS`): several popguards side
    by side in the cases it covers (--audit-compare, --policy-compare,
    --tls-compare).  ``floor``: also measure :mod:`bench.floor` in the cases
    where it applies (:func:`bench.cases.floor_applies`).
    """
    from popguard import __version__ as popguard_version
    from popguard.testing import dovecot as dovecot_tool

    reason = dovecot_tool.available()
    if reason is not None:
        raise BenchError(f"Dovecot is not available: {reason}")
    started = time.monotonic()
    soft, hard = procs.raise_nofile()
    results: dict[str, Any] = {
        "meta": {
            "popguard_version": popguard_version,
            "popguard_git": _git_state(),
            "dovecot_version": _dovecot_version(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "nofile": [soft, hard],
            "loadavg_before": _loadavg(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "audit_file": audit_file,
            "popguard_args": list(popguard_args),
            "comparison": comparison.name if comparison else None,
            "comparison_sides": list(comparison.sides) if comparison else [],
            "audit_compare": bool(comparison and comparison.name == "audit"),
            "audit_sides": list(comparison.sides)
            if comparison and comparison.name == "audit"
            else [],
            "workdir_fs": procs.filesystem_of(workdir),
            "floor": floor,
            "floor_cases": [c for c in cases if floor_applies(c, comparison, floor)],
        },
        "params": params_dict(params),
        "cases": {},
    }
    cpus = os.cpu_count() or 1
    tls = bool(comparison and comparison.tls)
    limits = dovecot_limits(cases, params)
    results["meta"]["dovecot_extra_config"] = limits
    dovecot = dovecot_tool.DovecotInstance(
        workdir / "dovecot",
        login_processes=login_processes or max(1, min(4, cpus)),
        tls=tls,
        extra_config=limits,
    )
    try:
        sides = comparison.sides if comparison and "dele" in comparison.cases else DEFAULT_SIDES
        dele_sides = 1 + len(sides) + floor_applies("dele", comparison, floor)
        users = _setup_users(dovecot, cases, params, log, dele_sides=dele_sides)
        dovecot.start()
        assert dovecot.pid is not None
        log(
            f"Dovecot {results['meta']['dovecot_version']} on {dovecot.host}:{dovecot.port}"
            + (f", POP3S on {dovecot.tls_port}" if tls else "")
        )
        variants = make_variants(workdir, audit_file, popguard_args)
        direct_tls = None
        if comparison and comparison.name == "policy":
            more, info = policy_variants(workdir, _bench_users(params), popguard_args, log)
            variants.update(more)
            results["meta"]["policy"] = info
        elif tls:
            more, direct_tls, info = tls_variants(workdir, dovecot, popguard_args, log)
            variants.update(more)
            results["meta"]["tls"] = info
        results["meta"]["side_labels"] = {name: v.label for name, v in variants.items()}
        results["meta"]["side_labels"][FLOOR] = FLOOR_LABEL
        env = Env(
            upstream=dovecot.address,
            dovecot_pid=dovecot.pid,
            bulk_user=users["bulk_user"],
            ping_user=users["ping_user"],
            pool=users["pool"],
            params=params,
            workdir=workdir,
            log=log,
            variants=variants,
            comparison=comparison,
            direct_tls=direct_tls,
            dele_pool=users["dele_pool"],
            dele_maildirs=users["dele_maildirs"],
            floor=floor,
        )
        if comparison and comparison.name == "audit":
            log(
                "audit comparison: bulk, concurrency and dele run DIRECT and popguard as "
                + ", ".join(env.variants[s].label for s in comparison.sides)
                + f" (full auditing's file: {env.variants['full'].audit_file})"
            )
        elif comparison:
            log(
                f"{comparison.name} comparison: "
                + ", ".join(c for c in cases if c in comparison.cases)
                + " run DIRECT"
                + (" (Dovecot's POP3S)" if tls else "")
                + " and popguard as "
                + ", ".join(env.variants[s].label for s in comparison.sides)
            )
        if results["meta"]["floor_cases"]:
            log(
                f"floor: {', '.join(results['meta']['floor_cases'])} also run through "
                "bench/floor.py, a bare trio relay (--no-floor to skip)"
            )
        for name in cases:
            log(f"case {name}")
            case_started = time.monotonic()
            try:
                results["cases"][name] = CASES[name](env)
            except (BenchError, OSError) as exc:
                log(f"  case {name} failed: {type(exc).__name__}: {exc}")
                results["cases"][name] = {"error": f"{type(exc).__name__}: {exc}"}
                results["meta"].setdefault("tracebacks", {})[name] = traceback.format_exc()
            results["cases"].setdefault(name, {})["elapsed_s"] = time.monotonic() - case_started
    finally:
        dovecot.stop()
        results["meta"]["loadavg_after"] = _loadavg()
        results["meta"]["elapsed_s"] = time.monotonic() - started
    results["notes"] = _notes(results)
    return results


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def write_json(results: dict[str, Any], path: str) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Per-session latencies of the swarm runs are bulky; keep summaries.
    trimmed = json.loads(json.dumps(_jsonable(results)))
    for case in ("concurrency", "dele", "workers"):
        for run in trimmed.get("cases", {}).get(case, {}).get("runs", {}).values():
            for r in run:
                r.pop("latencies", None)
    target.write_text(json.dumps(trimmed, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    chosen = [
        flag
        for flag, on in (
            ("--audit-compare/--audit-breakdown", args.audit_compare or args.audit_breakdown),
            ("--policy-compare", args.policy_compare),
            ("--tls-compare", args.tls_compare),
        )
        if on
    ]
    if len(chosen) > 1:
        parser.error(f"choose one comparison: {' or '.join(chosen)}")
    comparison = (
        COMPARISONS["breakdown"]
        if args.audit_breakdown
        else COMPARISONS["audit"]
        if args.audit_compare
        else COMPARISONS["policy"]
        if args.policy_compare
        else COMPARISONS["tls"]
        if args.tls_compare
        else None
    )
    cases = select_cases(args.only)
    params = Params.quick() if args.quick else Params()
    if args.reps is not None:
        params.reps = max(1, args.reps)
    if args.client_procs is not None:
        params.client_procs = max(1, args.client_procs)
    if args.held is not None:
        params.held = max(1, args.held)
    started = time.monotonic()
    log = _log(started)
    workdir = Path(tempfile.mkdtemp(prefix="pgbench-", dir="/tmp"))
    log(f"popguard benchmark: cases {', '.join(cases)}; work directory {workdir}")
    audit_file = os.path.abspath(args.audit_file) if args.audit_file else None
    try:
        results = run(
            cases,
            params,
            workdir=workdir,
            log=log,
            audit_file=audit_file,
            popguard_args=args.popguard_arg,
            login_processes=args.login_processes,
            comparison=comparison,
            floor=args.floor,
        )
    except KeyboardInterrupt:
        print("\ninterrupted: popguard and Dovecot stopped", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    finally:
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(render(results))
    if args.json:
        write_json(results, args.json)
        log(f"results written to {args.json}")
    failed = [name for name, res in results["cases"].items() if "error" in res]
    return 1 if failed else 0
