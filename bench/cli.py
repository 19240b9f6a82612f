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

from bench import procs
from bench.cases import CASES, Env, Params, params_dict
from bench.mail import MailFactory
from bench.procs import BenchError
from bench.report import render

ORDER = ("bulk", "pingpong", "concurrency", "memory")
ALIASES = {"cpu": "concurrency", "ping-pong": "pingpong", "mem": "memory", "conc": "concurrency"}
PASSWORD = "bench-secret"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure popguard against a private Dovecot on loopback: each case "
        "DIRECT to Dovecot, then THROUGH popguard, and print popguard/direct.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small counts, one repetition: a smoke check"
    )
    parser.add_argument(
        "--only",
        metavar="CASES",
        help="comma-separated subset of: bulk, pingpong, concurrency, cpu (= concurrency), memory",
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
        return list(ORDER)
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
    cc = cases.get("concurrency", {})
    if "client_cpu_max_util" in cc:
        busiest = max(
            cc["client_cpu_max_util"]["direct"]["max"], cc["client_cpu_max_util"]["popguard"]["max"]
        )
        if busiest > 0.85:
            notes.append(
                f"a client process reached {busiest:.0%} of a core in (c): the client may "
                "limit the rate; try --client-procs"
            )
        else:
            notes.append(
                f"(c) client not saturated: busiest client process at most {busiest:.0%} of a core"
            )
        pg = cc["popguard_cpu_util"]["max"]
        if pg > 0.9:
            notes.append(
                f"popguard used {pg:.0%} of a core in (c): its single trio thread is the limit"
            )
    mem = cases.get("memory", {})
    if "held_alive" in mem:
        alive = mem["held_alive"]
        if min(alive["direct"], alive["popguard"]) < alive["sample"]:
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


def _setup_users(
    dovecot: Any, cases: Sequence[str], params: Params, log: Any
) -> tuple[tuple[str, str], tuple[str, str], list[tuple[str, str]]]:
    mail = MailFactory()
    bulk_user = ("bulk", PASSWORD)
    ping_user = ("ping", PASSWORD)
    pool: list[tuple[str, str]] = []
    if "bulk" in cases:
        count = max(params.bulk_messages, params.bulk_plain_messages)
        log(f"creating {count} messages of {params.bulk_size:,} bytes for user 'bulk'")
        dovecot.add_user("bulk", PASSWORD, mail.messages(count, params.bulk_size, "bulk"))
    dovecot.add_user("ping", PASSWORD, mail.messages(1, params.small_size, "ping"))
    if "concurrency" in cases or "memory" in cases:
        log(f"creating {params.pool_users} users with {params.small_messages} small messages")
        for i in range(params.pool_users):
            name = f"c{i:04d}"
            dovecot.add_user(
                name, PASSWORD, mail.messages(params.small_messages, params.small_size, name)
            )
            pool.append((name, PASSWORD))
    return bulk_user, ping_user, pool


def run(
    cases: Sequence[str],
    params: Params,
    *,
    workdir: Path,
    log: Any,
    audit_file: str | None = None,
    popguard_args: Sequence[str] = (),
    login_processes: int | None = None,
) -> dict[str, Any]:
    """Start Dovecot under ``workdir``, run ``cases``, stop everything; return the results."""
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
        },
        "params": params_dict(params),
        "cases": {},
    }
    cpus = os.cpu_count() or 1
    dovecot = dovecot_tool.DovecotInstance(
        workdir / "dovecot", login_processes=login_processes or max(1, min(4, cpus))
    )
    try:
        bulk_user, ping_user, pool = _setup_users(dovecot, cases, params, log)
        dovecot.start()
        assert dovecot.pid is not None
        log(f"Dovecot {results['meta']['dovecot_version']} on {dovecot.host}:{dovecot.port}")
        env = Env(
            upstream=dovecot.address,
            dovecot_pid=dovecot.pid,
            bulk_user=bulk_user,
            ping_user=ping_user,
            pool=pool,
            params=params,
            workdir=workdir,
            log=log,
            audit_file=audit_file,
            popguard_args=tuple(popguard_args),
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
    # Per-session latencies of the concurrency runs are bulky; keep summaries.
    trimmed = json.loads(json.dumps(_jsonable(results)))
    for run in trimmed.get("cases", {}).get("concurrency", {}).get("runs", {}).values():
        for r in run:
            r.pop("latencies", None)
    target.write_text(json.dumps(trimmed, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cases = select_cases(args.only)
    params = Params.quick() if args.quick else Params()
    if args.reps is not None:
        params.reps = max(1, args.reps)
    if args.client_procs is not None:
        params.client_procs = max(1, args.client_procs)
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
