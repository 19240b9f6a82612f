"""The benchmark cases.  Each measures DIRECT to Dovecot, then THROUGH popguard.

Every case returns a plain dict (JSON-ready).  Repetitions are interleaved
as pairs, direct first, then popguard (D P D P D P) after a warm-up of
each, so that slow drift of a shared machine hits both sides alike; the
report takes the median of each side.

With ``--audit-compare`` the bulk, concurrency and DELE cases measure three
*sides* instead of two: DIRECT, popguard with auditing off and popguard
with full auditing (two popguard processes side by side).  Each repetition
runs all three, in an order rotated from one repetition to the next
(D OFF FULL, OFF FULL D, FULL D OFF), so every side takes every position
once in three repetitions.

``--policy-compare`` and ``--tls-compare`` work the same way with other
popguard sides (see :class:`Comparison`): popguard without policies and
with a tree of 1000 rules; popguard terminating TLS on both sides and TLS
offload (TLS to popguard, plaintext to Dovecot), where DIRECT is then
Dovecot's own POP3S port.

The ``workers`` case (only with ``--only workers``) always measures two
popguards the same way, whatever the run's comparison: ``--workers 1`` and
``--workers 2`` (see :data:`CASE_COMPARISONS`).

The *floor* (unless ``--no-floor``) is one more side in every case that
measures the default popguard (bulk, ping-pong, concurrency, DELE, memory;
not a case under a comparison, not workers): :mod:`bench.floor`, a bare
trio relay that understands nothing of POP3, started and measured like
popguard.  Those cases then run D P F, P F D, F D P, ...; the report gives
popguard/direct, floor/direct and popguard/floor.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import selectors
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import auditlog, procs
from bench.procs import BenchError, FloorProcess, PopguardProcess
from bench.swarm import SwarmPool, release, run_swarm, session_script
from bench.target import Address, Target, TlsSpec
from bench.wire import PopClient, bulk_retr, ping_pong

Log = Callable[[str], None]


@dataclass
class Params:
    """Counts and sizes.  ``Params()`` is the full run; ``Params.quick()`` a smoke check."""

    reps: int = 3
    bulk_messages: int = 1000
    bulk_size: int = 50_000
    bulk_plain_messages: int = 1000
    pingpong: int = 20_000
    pingpong_warmup: int = 2_000
    sessions: int = 1000
    parallel: int = 200
    pool_users: int = 200
    small_size: int = 4_000
    small_messages: int = 3
    dele_sessions: int = 1000
    dele_parallel: int = 200
    dele_size: int = 2_000
    held: int = 5000
    hold_parallel: int = 100
    noop_while_held: int = 2_000
    client_procs: int = 2
    time_limit: float = 120.0

    @classmethod
    def quick(cls) -> Params:
        return cls(
            reps=1,
            bulk_messages=100,
            bulk_plain_messages=100,
            pingpong=2_000,
            pingpong_warmup=200,
            sessions=200,
            parallel=40,
            pool_users=40,
            dele_sessions=200,
            dele_parallel=40,
            held=100,
            hold_parallel=50,
            noop_while_held=200,
            client_procs=1,
            time_limit=60.0,
        )


def dele_messages_per_user(params: Params, sides: int) -> int:
    """Messages each DELE user needs: one per run (warm-up and repetitions, every side).

    The DELE case gives every session a user of its own, so each run takes
    one message from every user; one more is left over at the end.
    """
    return (1 + params.reps) * sides + 1


# -- popguard configurations ------------------------------------------------------

#: The popguard sides of a case: the default run, and the --audit-compare run.
DEFAULT_SIDES = ("popguard",)
AUDIT_SIDES = ("off", "full")
#: --audit-breakdown: also each half of full auditing on its own.
BREAKDOWN_SIDES = ("off", "file", "full")
#: The cases that measure AUDIT_SIDES under --audit-compare.
AUDIT_CASES = ("bulk", "concurrency", "dele")
#: --policy-compare: no policies against a tree of 1000 rules.
POLICY_SIDES = ("none", "policy")
POLICY_CASES = ("bulk", "pingpong", "concurrency", "dele")
#: --tls-compare: TLS offload (TLS to popguard, plaintext to Dovecot) and
#: TLS on both sides; DIRECT is Dovecot's POP3S port.
TLS_SIDES = ("offload", "tls")
TLS_CASES = ("bulk", "pingpong", "concurrency", "dele")


@dataclass(frozen=True)
class Comparison:
    """A run that measures several popguards side by side in some cases.

    ``sides`` are the popguard sides, the last one the *main* side (shown as
    THROUGH popguard in the main table); ``base`` is the side the others are
    divided by in the comparison's own table (``None``: only against DIRECT).
    With ``tls`` DIRECT means Dovecot's POP3S port, spoken to with TLS.
    """

    name: str
    sides: tuple[str, ...]
    cases: tuple[str, ...]
    base: str | None = None
    tls: bool = False


COMPARISONS = {
    "audit": Comparison("audit", AUDIT_SIDES, AUDIT_CASES, base="off"),
    "breakdown": Comparison("audit", BREAKDOWN_SIDES, AUDIT_CASES, base="off"),
    "policy": Comparison("policy", POLICY_SIDES, POLICY_CASES, base="none"),
    "tls": Comparison("tls", TLS_SIDES, TLS_CASES, tls=True),
}

#: The workers case: popguard ``--workers 1`` (one process, as today) and
#: ``--workers 2`` (a supervisor and two workers on one SO_REUSEPORT port).
WORKER_SIDES = ("w1", "w2")
#: Cases that always measure several popguards, whatever the run's comparison.
CASE_COMPARISONS = {
    "workers": Comparison("workers", WORKER_SIDES, ("workers",), base="w1"),
}

#: The floor's side: :mod:`bench.floor`, a bare trio relay, in the cases
#: below whenever they measure the default popguard (not under a comparison).
FLOOR = "floor"
FLOOR_LABEL = "bare trio floor"
FLOOR_CASES = ("bulk", "pingpong", "concurrency", "dele", "memory")


def floor_applies(case: str, comparison: Comparison | None, floor: bool) -> bool:
    """Whether ``case`` measures the floor: asked for, a floor case, no comparison in it."""
    if not floor or case not in FLOOR_CASES or case in CASE_COMPARISONS:
        return False
    return comparison is None or case not in comparison.cases


@dataclass(frozen=True)
class Variant:
    """One way of running popguard: its extra arguments and its audit file, if any.

    ``upstream`` replaces Dovecot's plain port (the TLS sides use its POP3S
    port); ``client_tls``: popguard's listener is POP3S and clients verify it
    with this spec.
    """

    name: str
    label: str
    args: tuple[str, ...] = ()
    audit_file: str | None = None
    upstream: Address | None = None
    client_tls: TlsSpec | None = None
    #: ``--workers N``; None: no flag (popguard's default, one process).
    workers: int | None = None


def make_variants(
    workdir: Path, audit_file: str | None, popguard_args: Sequence[str]
) -> dict[str, Variant]:
    """The popguard configurations, their config files written under ``workdir``.

    * ``popguard``: ``--no-console``, plus ``--audit-file`` when given (without
      it no sink records anything, so popguard skips message identity).
    * ``off``: auditing off: no audit file and ``audit.message_identity: false``
      (popguard asks the server nothing of its own).
    * ``full``: full auditing: the audit file (hash chain, always on for the
      file sink) in the work directory, the default ``fsync: interval``, and
      message identity (UIDL and size) on.
    * ``file`` (``--audit-breakdown``): the file without message identity, so
      that full / file is what identity costs.  (There is no "identity
      without a file": with no sink popguard skips the lookups, as nothing
      would record them.)
    * ``w1`` and ``w2`` (the workers case): as deployed by default, without an
      audit file, with ``--workers 1`` and ``--workers 2``.

    ``popguard_args`` (``--popguard-arg``) go to every variant.
    """
    extra = tuple(popguard_args)
    default_args = ("--audit-file", audit_file) if audit_file else ()
    off_conf = workdir / "popguard-audit-off.yaml"
    off_conf.write_text(
        "# bench --audit-compare: auditing off\naudit:\n  console: false\n"
        "  file: null\n  message_identity: false\n"
    )
    full_file = workdir / "audit-full.jsonl"
    full_conf = workdir / "popguard-audit-full.yaml"
    full_conf.write_text(
        "# bench --audit-compare: full auditing\naudit:\n  console: false\n"
        f"  file: {json.dumps(str(full_file))}\n  fsync: interval\n  message_identity: true\n"
    )
    file_file = workdir / "audit-file-only.jsonl"
    file_conf = workdir / "popguard-audit-file.yaml"
    file_conf.write_text(
        "# bench --audit-breakdown: the audit file, no message identity\naudit:\n"
        f"  console: false\n  file: {json.dumps(str(file_file))}\n  fsync: interval\n"
        "  message_identity: false\n"
    )
    return {
        "popguard": Variant("popguard", "popguard", default_args + extra, audit_file),
        "file": Variant("file", "file only", ("--config", str(file_conf), *extra), str(file_file)),
        "off": Variant("off", "audit off", ("--config", str(off_conf), *extra)),
        "full": Variant("full", "audit full", ("--config", str(full_conf), *extra), str(full_file)),
        "w1": Variant("w1", "workers 1", extra, workers=1),
        "w2": Variant("w2", "workers 2", extra, workers=2),
    }


@dataclass
class Env:
    """What every case needs: Dovecot's address, the users, a way to start popguard."""

    upstream: Address
    dovecot_pid: int
    bulk_user: tuple[str, str]
    ping_user: tuple[str, str]
    pool: list[tuple[str, str]]
    params: Params
    workdir: Path
    log: Log
    variants: dict[str, Variant] = field(default_factory=dict)
    #: The comparison run (--audit-compare, --policy-compare, --tls-compare);
    #: None: one popguard side as usual.
    comparison: Comparison | None = None
    #: Dovecot's POP3S port, for DIRECT under --tls-compare.
    direct_tls: Target | None = None
    dele_pool: list[tuple[str, str]] = field(default_factory=list)
    dele_maildirs: list[Path] = field(default_factory=list)
    #: Measure the floor (bench.floor) too, where it applies (--no-floor: off).
    floor: bool = False
    _seq: int = field(default=0)

    @property
    def audit_sides(self) -> tuple[str, ...]:
        """The popguard sides of --audit-compare; empty in any other run."""
        cmp = self.comparison
        return cmp.sides if cmp is not None and cmp.name == "audit" else ()

    def popguard(self, side: str = "popguard") -> PopguardProcess:
        """A fresh popguard in front of Dovecot (start it with ``with``)."""
        self._seq += 1
        variant = self.variants.get(side) or Variant(side, side)
        return PopguardProcess(
            variant.upstream or self.upstream,
            self.workdir / f"popguard-{self._seq}-{side}.log",
            idle_timeout=3600,
            extra_args=variant.args,
            client_tls=variant.client_tls,
            workers=variant.workers,
        )

    def proxy(self, side: str) -> PopguardProcess:
        """A fresh relay for ``side``: the floor, or a popguard (start it with ``with``)."""
        if side != FLOOR:
            return self.popguard(side)
        self._seq += 1
        return FloorProcess(self.upstream, self.workdir / f"floor-{self._seq}.log")

    def has_floor(self, case: str) -> bool:
        return floor_applies(case, self.comparison, self.floor)

    def proxy_sides(self, case: str) -> tuple[str, ...]:
        """Every side ``case`` starts a process for: its popguards, then the floor."""
        return self.sides(case) + ((FLOOR,) if self.has_floor(case) else ())

    def compares(self, case: str) -> Comparison | None:
        """The comparison ``case`` takes part in, if any."""
        if case in CASE_COMPARISONS:
            return CASE_COMPARISONS[case]
        cmp = self.comparison
        return cmp if cmp is not None and case in cmp.cases else None

    def sides(self, case: str) -> tuple[str, ...]:
        """The popguard sides ``case`` measures (besides DIRECT)."""
        cmp = self.compares(case)
        return cmp.sides if cmp is not None else DEFAULT_SIDES

    def direct_target(self, case: str) -> Target:
        """DIRECT for ``case``: Dovecot's plain port, or its POP3S port under --tls-compare."""
        cmp = self.compares(case)
        if cmp is not None and cmp.tls:
            if self.direct_tls is None:
                raise BenchError("--tls-compare needs Dovecot's POP3S port")
            return self.direct_tls
        return Target(*self.upstream)

    def label(self, side: str) -> str:
        if side == FLOOR:
            return FLOOR_LABEL
        variant = self.variants.get(side)
        return variant.label if variant else side

    def main_side(self, case: str) -> str:
        """The side shown as THROUGH popguard in the main table."""
        return self.sides(case)[-1]

    def order(self, case: str, rep: int) -> list[str]:
        """Sides in the order repetition ``rep`` runs them."""
        sides = ["direct", *self.proxy_sides(case)]
        if len(sides) <= 2:
            return sides  # D P, as always
        k = rep % len(sides)
        return sides[k:] + sides[:k]

    def audit_file(self, side: str) -> str | None:
        variant = self.variants.get(side)
        return variant.audit_file if variant else None


# -- statistics ------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return float("nan")
    mid = n // 2
    return ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def summary(values: Sequence[float]) -> dict[str, Any]:
    return {
        "median": median(values),
        "min": min(values) if values else float("nan"),
        "max": max(values) if values else float("nan"),
        "samples": list(values),
    }


def compare(direct: Sequence[float], proxied: Sequence[float]) -> dict[str, Any]:
    """Both sides' summaries plus popguard/direct (ratio of medians, and per pair)."""
    d, p = summary(direct), summary(proxied)
    pairs = [b / a for a, b in zip(direct, proxied, strict=False) if a]
    return {
        "direct": d,
        "popguard": p,
        "ratio": p["median"] / d["median"] if d["median"] else float("nan"),
        "pair_ratios": pairs,
    }


# -- running one side of one repetition ---------------------------------------------


def measure(
    env: Env,
    case: str,
    side: str,
    pgs: dict[str, PopguardProcess],
    run: Callable[[Target], dict[str, Any]],
    *,
    sessions: int,
    dovecot_cpu: bool = False,
) -> dict[str, Any]:
    """Run ``run`` against one side of ``case`` and add what it cost around it.

    DIRECT is :meth:`Env.direct_target` (Dovecot's POP3S port under
    --tls-compare), a popguard side its :attr:`PopguardProcess.target`.

    Adds ``popguard_cpu_s`` (popguard's utime + stime over the run and the
    wait for its audit records), ``dovecot_cpu_s`` (when asked: Dovecot's
    whole process tree over the run) and, for a side with an audit file,
    ``audit``: the records the run added (:func:`bench.auditlog.tally`) and
    ``flush_wait_s``, how long after the run the last of them arrived.
    """
    pg = pgs.get(side)
    address = env.direct_target(case) if pg is None else pg.target
    audit = env.audit_file(side) if pg is not None else None
    offset = auditlog.size(audit) if audit else 0
    dv0 = procs.tree_cpu_seconds(env.dovecot_pid) if dovecot_cpu else 0.0
    cpu0 = pg.cpu_seconds() if pg is not None else 0.0
    split0 = pg.cpu_by_process() if pg is not None and pg.workers else {}
    result = run(address)
    if dovecot_cpu:
        result["dovecot_cpu_s"] = procs.tree_cpu_seconds(env.dovecot_pid) - dv0
    if audit:
        segment, waited = auditlog.wait_segment(audit, offset, sessions)
        result["audit"] = auditlog.tally(segment)
        result["audit"]["flush_wait_s"] = waited
    if pg is not None:
        result["popguard_cpu_s"] = pg.cpu_seconds() - cpu0
        if pg.workers:
            result["popguard_cpu_split_s"] = _cpu_split(pg.pid, split0, pg.cpu_by_process())
    return result


def _cpu_split(root: int, before: dict[int, float], after: dict[int, float]) -> dict[str, Any]:
    """CPU seconds of a popguard tree over a run: its root (with ``--workers`` N > 1
    the supervisor) and each child (a worker), busiest first."""
    spent = {pid: cpu - before.get(pid, 0.0) for pid, cpu in after.items()}
    return {
        "root": spent.pop(root, 0.0),
        "children": sorted(spent.values(), reverse=True),
    }


def _values(runs: dict[str, list[dict[str, Any]]], key: Callable[[dict[str, Any]], float]) -> Any:
    return {side: [key(r) for r in rs] for side, rs in runs.items()}


def assemble(
    env: Env,
    case: str,
    runs: dict[str, list[dict[str, Any]]],
    key: Callable[[dict[str, Any]], float],
) -> dict[str, Any]:
    """compare() of DIRECT and the main side for the figure ``key``; with
    --audit-compare also ``audit``: full/off (medians and per repetition) and
    each against DIRECT."""
    vals = _values(runs, key)
    res = compare(vals["direct"], vals[env.main_side(case)])
    res["side"] = env.main_side(case)
    if FLOOR in vals:
        res["floor"] = floor_figures(vals["direct"], vals[FLOOR], vals[env.main_side(case)])
    if "off" in vals and "full" in vals:
        off, full = vals["off"], vals["full"]
        cost = compare(off, full)  # here "direct" is OFF and "popguard" is FULL
        res["audit"] = {
            "off": cost["direct"],
            "full": cost["popguard"],
            "ratio": cost["ratio"],
            "pair_ratios": cost["pair_ratios"],
            "off_vs_direct": compare(vals["direct"], off)["ratio"],
            "full_vs_direct": compare(vals["direct"], full)["ratio"],
            # --audit-breakdown: each half on its own, against OFF.
            "parts": {
                side: {
                    **compare(off, vals[side]),
                    "vs_direct": compare(vals["direct"], vals[side])["ratio"],
                }
                for side in vals
                if side not in ("direct", "off", "full")
            },
        }
    cmp = env.compares(case)
    if cmp is not None:
        # Every popguard side against DIRECT and, for a comparison with a
        # base side (none, off), against that base.
        res["comparison"] = cmp.name
        res["by_side"] = {}
        for side in cmp.sides:
            entry: dict[str, Any] = {
                "value": summary(vals[side]),
                "vs_direct": _ratio_only(compare(vals["direct"], vals[side])),
            }
            if cmp.base is not None and side != cmp.base:
                entry["vs_base"] = _ratio_only(compare(vals[cmp.base], vals[side]))
            res["by_side"][side] = entry
    return res


def _ratio_only(cmp: dict[str, Any]) -> dict[str, Any]:
    return {"ratio": cmp["ratio"], "pair_ratios": cmp["pair_ratios"]}


def floor_figures(
    direct: Sequence[float], floor: Sequence[float], popguard: Sequence[float]
) -> dict[str, Any]:
    """The floor's summary, floor/direct and popguard/floor (medians, and per repetition)."""
    return {
        "value": summary(floor),
        "vs_direct": _ratio_only(compare(direct, floor)),
        "popguard_vs_floor": _ratio_only(compare(floor, popguard)),
    }


def tls_by_side(runs: dict[str, list[dict[str, Any]]]) -> dict[str, str]:
    """The TLS version and cipher each side's client saw ("" in plaintext)."""
    return {
        side: next((r.get("tls", "") for r in rs if r.get("tls")), "") for side, rs in runs.items()
    }


def side_summary(
    runs: dict[str, list[dict[str, Any]]], key: Callable[[dict[str, Any]], float]
) -> dict[str, Any]:
    """summary() of a figure for every side that has it."""
    out = {}
    for side, rs in runs.items():
        with contextlib.suppress(KeyError, ZeroDivisionError):
            out[side] = summary([key(r) for r in rs])
    return out


def audit_summary(runs: dict[str, list[dict[str, Any]]], per: str) -> dict[str, Any]:
    """For each side with an audit file: bytes and records per ``per``, flush wait."""
    out: dict[str, Any] = {}
    for side, rs in runs.items():
        if not rs or "audit" not in rs[0]:
            continue
        out[side] = {
            "bytes_per_" + per: summary([r["audit"]["bytes"] / r["units"] for r in rs]),
            "records_per_" + per: summary([r["audit"]["records"] / r["units"] for r in rs]),
            "flush_wait_s": summary([r["audit"]["flush_wait_s"] for r in rs]),
            "bad_lines": sum(r["audit"]["bad_lines"] for r in rs),
        }
    return out


def _fmt_sides(runs_now: dict[str, dict[str, Any]], fmt: Callable[[dict[str, Any]], str]) -> str:
    return ", ".join(f"{side} {fmt(r)}" for side, r in runs_now.items())


# -- (a) bulk ------------------------------------------------------------------------


def case_bulk(env: Env) -> dict[str, Any]:
    prm = env.params
    user, password = env.bulk_user
    limit = prm.time_limit
    sides = env.proxy_sides("bulk")  # the popguard, then the floor
    out: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        pgs = {side: stack.enter_context(env.proxy(side)) for side in sides}
        # Warm-up: one whole pass each way (Dovecot builds its index and
        # reads the files into the page cache), hashing every byte, which
        # also checks that popguard relays exactly what Dovecot sends.
        digests = {}
        # (Warm-ups go through measure() too, which waits for their audit
        # records, so none of them lands in a measured run's share of the file.)
        for side in ("direct", *sides):
            digest = hashlib.blake2b()

            def hashed(address: Target, digest: Any = digest) -> dict[str, Any]:
                return bulk_retr(
                    address, user, password, prm.bulk_messages, digest=digest, time_limit=limit
                )

            measure(env, "bulk", side, pgs, hashed, sessions=1)
            digests[side] = digest.hexdigest()
        out["identical_bytes"] = all(d == digests["direct"] for d in digests.values())
        out["identical_bytes_by_side"] = {
            side: d == digests["direct"] for side, d in digests.items() if side != "direct"
        }
        if not out["identical_bytes"]:
            differ = [side for side, same in out["identical_bytes_by_side"].items() if not same]
            env.log(f"  WARNING: the RETR bytes through {', '.join(differ)} differ from Dovecot's")

        variants = {
            "bulk": {"nodelay": True, "fast": True, "count": prm.bulk_messages},
            "bulk_plain": {"nodelay": False, "fast": False, "count": prm.bulk_plain_messages},
        }
        for name, v in variants.items():
            count = int(v["count"])
            nodelay, fast = bool(v["nodelay"]), bool(v["fast"])
            runs: dict[str, list[dict[str, Any]]] = {s: [] for s in ("direct", *sides)}
            if name != "bulk":  # short warm-up of this client flavour
                for side in ("direct", *sides):

                    def warm(
                        address: Target,
                        count: int = count,
                        nodelay: bool = nodelay,
                        fast: bool = fast,
                    ) -> dict[str, Any]:
                        return bulk_retr(
                            address,
                            user,
                            password,
                            min(count, 100),
                            nodelay=nodelay,
                            fast=fast,
                            time_limit=limit,
                        )

                    measure(env, "bulk", side, pgs, warm, sessions=1)

            def go(
                address: Target, count: int = count, nodelay: bool = nodelay, fast: bool = fast
            ) -> dict[str, Any]:
                return bulk_retr(
                    address, user, password, count, nodelay=nodelay, fast=fast, time_limit=limit
                )

            for rep in range(prm.reps):
                now = {}
                for side in env.order("bulk", rep):
                    r = measure(env, "bulk", side, pgs, go, sessions=1, dovecot_cpu=True)
                    r["units"] = count  # audit figures per RETR
                    runs[side].append(r)
                    now[side] = r
                env.log(
                    f"  {name} rep {rep + 1}/{prm.reps}: "
                    + _fmt_sides(
                        now,
                        lambda r: (
                            f"{r['mb_per_s']:.0f} MB/s"
                            + (
                                f" (CPU {r['popguard_cpu_s'] / r['seconds']:.0%})"
                                if "popguard_cpu_s" in r
                                else ""
                            )
                        ),
                    )
                    + "; stalls>20ms "
                    + "/".join(f"{r['stalls_over_20ms']:.0f}" for r in now.values())
                )
            main = env.main_side("bulk")
            res = assemble(env, "bulk", runs, lambda r: r["mb_per_s"])
            res["unit"] = "MB/s"
            res["bytes_per_session"] = runs["direct"][0]["bytes"]
            res["messages"] = count
            res["msg_p50_ms"] = compare(
                [r["msg_p50_ms"] for r in runs["direct"]], [r["msg_p50_ms"] for r in runs[main]]
            )
            res["stalls_over_20ms"] = {
                "direct": max(r["stalls_over_20ms"] for r in runs["direct"]),
                "popguard": max(r["stalls_over_20ms"] for r in runs[main]),
            }
            res["msg_max_ms"] = {
                "direct": max(r["msg_max_ms"] for r in runs["direct"]),
                "popguard": max(r["msg_max_ms"] for r in runs[main]),
            }
            util = side_summary(
                {s: runs[s] for s in sides}, lambda r: r["popguard_cpu_s"] / r["seconds"]
            )
            res["popguard_cpu_util"] = util[main]
            res["popguard_cpu_util_by_side"] = util
            res["cpu_per_retr_us_by_side"] = side_summary(
                {s: runs[s] for s in sides}, lambda r: r["popguard_cpu_s"] / r["messages"] * 1e6
            )
            # CPU seconds per 10^9 bytes relayed (bytes on the wire, as MB/s).
            res["cpu_s_per_gb_by_side"] = side_summary(
                {s: runs[s] for s in sides}, lambda r: r["popguard_cpu_s"] / r["bytes"] * 1e9
            )
            res["cpu_s_per_gb"] = res["cpu_s_per_gb_by_side"][main]
            if FLOOR in runs:
                fl = runs[FLOOR]
                res["floor"]["cpu_s_per_gb"] = res["cpu_s_per_gb_by_side"][FLOOR]
                res["floor"]["cpu_us_per_retr"] = res["cpu_per_retr_us_by_side"][FLOOR]
                res["floor"]["cpu_util"] = util[FLOOR]
                res["floor"]["msg_p50_ms"] = summary([r["msg_p50_ms"] for r in fl])
                res["floor"]["stalls_over_20ms"] = max(r["stalls_over_20ms"] for r in fl)
                res["floor"]["msg_max_ms"] = max(r["msg_max_ms"] for r in fl)
            res["dovecot_cpu_us_per_retr_by_side"] = side_summary(
                runs, lambda r: r["dovecot_cpu_s"] / r["messages"] * 1e6
            )
            res["tls_by_side"] = tls_by_side(runs)
            res["audit_file"] = audit_summary(runs, "retr")
            res["runs"] = runs
            out[name] = res
    return out


# -- (b) ping-pong -------------------------------------------------------------------


def case_pingpong(env: Env) -> dict[str, Any]:
    """(b) ``pingpong`` sequential NOOPs in one session, every side in turn.

    One popguard per side, kept for all repetitions; the sides run in the
    rotated order of :meth:`Env.order` (D P D P ... with one popguard).
    """
    prm = env.params
    user, password = env.ping_user
    limit = prm.time_limit
    sides = env.proxy_sides("pingpong")
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in ("direct", *sides)}
    with contextlib.ExitStack() as stack:
        pgs = {side: stack.enter_context(env.proxy(side)) for side in sides}

        def warm(target: Target) -> dict[str, Any]:
            return ping_pong(target, user, password, prm.pingpong_warmup, time_limit=limit)

        def go(target: Target) -> dict[str, Any]:
            return ping_pong(target, user, password, prm.pingpong, time_limit=limit)

        for side in ("direct", *sides):
            measure(env, "pingpong", side, pgs, warm, sessions=1)
        for rep in range(prm.reps):
            now = {}
            for side in env.order("pingpong", rep):
                r = measure(env, "pingpong", side, pgs, go, sessions=1, dovecot_cpu=True)
                if "popguard_cpu_s" in r:
                    r["popguard_cpu_us_per_noop"] = r["popguard_cpu_s"] / prm.pingpong * 1e6
                r["dovecot_cpu_us_per_noop"] = r["dovecot_cpu_s"] / prm.pingpong * 1e6
                runs[side].append(r)
                now[side] = r
            env.log(
                f"  ping-pong rep {rep + 1}/{prm.reps}: "
                + _fmt_sides(
                    now,
                    lambda r: (
                        f"{r['rt_per_s']:.0f}/s p50 {r['p50_us']:.0f} µs"
                        + (
                            f" (CPU {r['popguard_cpu_us_per_noop']:.0f} µs/NOOP)"
                            if "popguard_cpu_us_per_noop" in r
                            else ""
                        )
                    ),
                )
            )
    main = env.main_side("pingpong")
    direct, proxied = runs["direct"], runs[main]
    res = assemble(env, "pingpong", runs, lambda r: r["rt_per_s"])
    res["unit"] = "round trips/s"
    res["count"] = prm.pingpong
    res["p50_us"] = compare([d["p50_us"] for d in direct], [p["p50_us"] for p in proxied])
    res["p99_us"] = compare([d["p99_us"] for d in direct], [p["p99_us"] for p in proxied])
    res["popguard_cpu_us_per_noop"] = summary([p["popguard_cpu_us_per_noop"] for p in proxied])
    res["cpu_us_per_noop_by_side"] = side_summary(
        {s: runs[s] for s in sides}, lambda r: r["popguard_cpu_us_per_noop"]
    )
    res["dovecot_cpu_us_per_noop_by_side"] = side_summary(
        runs, lambda r: r["dovecot_cpu_us_per_noop"]
    )
    res["p50_us_by_side"] = side_summary(runs, lambda r: r["p50_us"])
    res["p99_us_by_side"] = side_summary(runs, lambda r: r["p99_us"])
    if FLOOR in runs:
        res["floor"]["cpu_us_per_noop"] = res["cpu_us_per_noop_by_side"][FLOOR]
        res["floor"]["p50_us"] = summary([r["p50_us"] for r in runs[FLOOR]])
        res["floor"]["p99_us"] = summary([r["p99_us"] for r in runs[FLOOR]])
    res["tls_by_side"] = tls_by_side(runs)
    res["runs"] = runs
    return res


# -- (c) concurrency, (e) CPU per session and (f) DELE-heavy ------------------------


def _count_messages(maildirs: Sequence[Path]) -> int:
    """Messages now in these Maildirs (cur and new)."""
    total = 0
    for maildir in maildirs:
        for sub in ("cur", "new"):
            with contextlib.suppress(FileNotFoundError):
                total += len(os.listdir(maildir / sub))
    return total


def _swarm_case(
    env: Env,
    case: str,
    *,
    kind: str,
    users: Sequence[tuple[str, str]],
    sessions: int,
    parallel: int,
    warmup_sessions: int,
    maildirs: Sequence[Path] = (),
) -> dict[str, Any]:
    """Many sessions, ``parallel`` at a time, against every side of ``case``.

    ``kind`` is the swarm script (``retr`` or ``dele``).  With ``maildirs``,
    the messages in them are counted before and after each run (outside the
    timed part) to confirm each session really deleted one.
    """
    prm = env.params
    limit = prm.time_limit
    sides = env.proxy_sides(case)
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in ("direct", *sides)}
    with SwarmPool(prm.client_procs) as swarm, contextlib.ExitStack() as stack:
        pgs = {side: stack.enter_context(env.proxy(side)) for side in sides}

        def go(target: Target, count: int = sessions) -> dict[str, Any]:
            before = _count_messages(maildirs) if maildirs else 0
            r = swarm.run(target, users, count, parallel, time_limit=limit, kind=kind)
            if r["failed"]:
                raise BenchError(f"{r['failed']} sessions failed, e.g. {r['errors'][:3]}")
            if maildirs:
                r["expunged"] = before - _count_messages(maildirs)
            return r

        # Warm-up, each side: every user at least once (Dovecot creates their
        # indexes; a DELE warm-up deletes a message from every user too).
        for side in ("direct", *sides):

            def warm(address: Target) -> dict[str, Any]:
                return go(address, warmup_sessions)

            measure(env, case, side, pgs, warm, sessions=warmup_sessions)
        for rep in range(prm.reps):
            now = {}
            for side in env.order(case, rep):
                r = measure(env, case, side, pgs, go, sessions=sessions, dovecot_cpu=True)
                r["units"] = r["ok"]
                r["dovecot_cpu_ms_per_session"] = r["dovecot_cpu_s"] / r["ok"] * 1e3
                if "popguard_cpu_s" in r:
                    r["popguard_cpu_ms_per_session"] = r["popguard_cpu_s"] / r["ok"] * 1e3
                    r["popguard_cpu_util"] = r["popguard_cpu_s"] / r["wall"]
                runs[side].append(r)
                now[side] = r
            env.log(
                f"  {case} rep {rep + 1}/{prm.reps}: "
                + _fmt_sides(
                    now,
                    lambda r: (
                        f"{r['sessions_per_s']:.0f}/s"
                        + (
                            f" (CPU {r['popguard_cpu_ms_per_session']:.2f} ms/session, "
                            f"{r['popguard_cpu_util']:.0%} of a core)"
                            if "popguard_cpu_s" in r
                            else ""
                        )
                    ),
                )
                + "; busiest client process "
                + f"{max(r['client_cpu_max_util'] for r in now.values()):.0%} of a core"
            )
    main = env.main_side(case)
    direct, proxied = runs["direct"], runs[main]
    res = assemble(env, case, runs, lambda r: r["sessions_per_s"])
    res["unit"] = "sessions/s"
    res["sessions"] = sessions
    res["parallel"] = parallel
    res["client_procs"] = prm.client_procs
    res["latency_p50_ms"] = compare(
        [d["latency_p50_ms"] for d in direct], [p["latency_p50_ms"] for p in proxied]
    )
    res["latency_p99_ms"] = compare(
        [d["latency_p99_ms"] for d in direct], [p["latency_p99_ms"] for p in proxied]
    )
    res["client_cpu_max_util"] = compare(
        [d["client_cpu_max_util"] for d in direct], [p["client_cpu_max_util"] for p in proxied]
    )
    res["client_cpu_ms_per_session"] = compare(
        [sum(d["client_cpu_s"]) / d["ok"] * 1e3 for d in direct],
        [sum(p["client_cpu_s"]) / p["ok"] * 1e3 for p in proxied],
    )
    res["popguard_cpu_util"] = summary([p["popguard_cpu_util"] for p in proxied])
    res["dovecot_cpu_ms_per_session"] = compare(
        [d["dovecot_cpu_ms_per_session"] for d in direct],
        [p["dovecot_cpu_ms_per_session"] for p in proxied],
    )
    res["cpu_per_session_ms"] = summary([p["popguard_cpu_ms_per_session"] for p in proxied])
    pg_runs = {s: runs[s] for s in sides}
    res["cpu_per_session_ms_by_side"] = side_summary(
        pg_runs, lambda r: r["popguard_cpu_ms_per_session"]
    )
    res["popguard_cpu_util_by_side"] = side_summary(pg_runs, lambda r: r["popguard_cpu_util"])
    res["dovecot_cpu_ms_per_session_by_side"] = side_summary(
        runs, lambda r: r["dovecot_cpu_ms_per_session"]
    )
    res["client_cpu_ms_per_session_by_side"] = side_summary(
        runs, lambda r: sum(r["client_cpu_s"]) / r["ok"] * 1e3
    )
    res["latency_p50_ms_by_side"] = side_summary(runs, lambda r: r["latency_p50_ms"])
    res["latency_p99_ms_by_side"] = side_summary(runs, lambda r: r["latency_p99_ms"])
    if FLOOR in runs:
        res["floor"]["cpu_per_session_ms"] = res["cpu_per_session_ms_by_side"][FLOOR]
        res["floor"]["cpu_util"] = res["popguard_cpu_util_by_side"][FLOOR]
        res["floor"]["dovecot_cpu_ms_per_session"] = res["dovecot_cpu_ms_per_session_by_side"][
            FLOOR
        ]
    res["tls_by_side"] = tls_by_side(runs)
    res["audit_file"] = audit_summary(runs, "session")
    if maildirs:
        res["expunged"] = {
            side: {"expunged": sum(r["expunged"] for r in rs), "sessions": sum(r["ok"] for r in rs)}
            for side, rs in runs.items()
        }
    res["runs"] = runs
    return res


def case_concurrency(env: Env, case: str = "concurrency") -> dict[str, Any]:
    prm = env.params
    return _swarm_case(
        env,
        case,
        kind="retr",
        users=env.pool,
        sessions=prm.sessions,
        parallel=prm.parallel,
        warmup_sessions=max(len(env.pool), prm.parallel),
    )


def case_workers(env: Env) -> dict[str, Any]:
    """(g) the concurrency swarm DIRECT, through ``--workers 1`` and ``--workers 2``.

    Each repetition runs the three sides rotated (D W1 W2, W1 W2 D, W2 D W1).
    popguard's CPU is summed over its whole process tree (the supervisor,
    both workers, and any worker it reaped); ``workers_cpu`` tells how evenly
    the kernel's SO_REUSEPORT hashing spread the work over the two workers.
    """
    prm = env.params
    res = case_concurrency(env, case="workers")
    by = res["by_side"]
    res["w2_vs_w1"] = by["w2"]["vs_base"]
    split: dict[str, Any] = {}
    for side in WORKER_SIDES:
        runs = res["runs"][side]
        workers = [len(r["popguard_cpu_split_s"]["children"]) for r in runs]
        entry: dict[str, Any] = {
            "processes": max(workers) + 1 if max(workers) else 1,
            "root_cpu_ms_per_session": summary(
                [r["popguard_cpu_split_s"]["root"] / r["ok"] * 1e3 for r in runs]
            ),
        }
        if max(workers) >= 2:
            # The busiest worker's part of all the workers' CPU: 0.5 is an even split.
            entry["busiest_worker_share"] = summary(
                [
                    ch[0] / sum(ch) if sum(ch) else float("nan")
                    for ch in (r["popguard_cpu_split_s"]["children"] for r in runs)
                ]
            )
        split[side] = entry
    res["workers_cpu"] = split
    env.log(
        f"  workers: sessions/s direct {res['direct']['median']:.0f}, "
        + ", ".join(
            f"{env.label(side)} {by[side]['value']['median']:.0f} "
            f"({by[side]['vs_direct']['ratio']:.2f}x direct, "
            f"{res['cpu_per_session_ms_by_side'][side]['median']:.2f} ms CPU/session)"
            for side in WORKER_SIDES
        )
        + f"; workers 2 / workers 1 {res['w2_vs_w1']['ratio']:.2f}x"
        + f" ({prm.reps} repetitions)"
    )
    return res


def case_dele(env: Env) -> dict[str, Any]:
    """(f) DELE-heavy: every session logs in, DELEs message 1 and QUITs.

    Each session has a user of its own (``dele_sessions`` users), so every
    run deletes exactly one message per user and no two sessions touch the
    same mailbox; the users hold a message for every run of every side.
    Through a popguard with an audit file, each session must have left one
    ``deletions.committed`` record.
    """
    prm = env.params
    if len(env.dele_pool) < prm.dele_sessions:
        raise BenchError(
            f"the DELE case needs {prm.dele_sessions} users, set up {len(env.dele_pool)}"
        )
    res = _swarm_case(
        env,
        "dele",
        kind="dele",
        users=env.dele_pool,
        sessions=prm.dele_sessions,
        parallel=prm.dele_parallel,
        warmup_sessions=prm.dele_sessions,
        maildirs=env.dele_maildirs,
    )
    deletions = {}
    for side, rs in res["runs"].items():
        if rs and "audit" in rs[0]:
            deletions[side] = {
                "recorded": sum(r["audit"]["deletions_committed"] for r in rs),
                "messages": sum(r["audit"]["deleted_messages"] for r in rs),
                "with_uidl": sum(r["audit"]["deleted_with_uidl"] for r in rs),
                "sessions": sum(r["ok"] for r in rs),
            }
            d = deletions[side]
            env.log(
                f"  dele, {side}: deletions recorded {d['recorded']}/{d['sessions']} "
                f"({d['with_uidl']} named by UIDL)"
            )
    res["deletions_recorded"] = deletions
    return res


# -- (d) memory per idle session -------------------------------------------------------


def _hold_seconds(prm: Params, count: int) -> float:
    """Time allowed to log in (or to wind down) ``count`` held sessions.

    Dovecot forks a ``pop3`` process per login: on 2 cores about 130
    logins/s when idle, so 5,000 take some 40 s; allow 20 per second.
    """
    return max(prm.time_limit, count / 20)


def _hold(env: Env, target: Address, count: int) -> tuple[list[socket.socket], float]:
    """Log ``count`` sessions in and leave them idle; (their sockets, seconds it took)."""
    prm = env.params
    pool = env.pool

    def script(index: int) -> list[tuple[bytes | None, bool]]:
        user, password = pool[index % len(pool)]
        return session_script(user, password, quit=False)

    res = run_swarm(
        target,
        script,
        range(count),
        prm.hold_parallel,
        hold=True,
        time_limit=_hold_seconds(prm, count),
    )
    if res.failed:
        release(res.held, send_quit=False)
        raise BenchError(f"{res.failed} held sessions failed to log in, e.g. {res.errors[:3]}")
    return res.held, res.wall


def _check_alive(socks: Sequence[socket.socket], sample: int = 20) -> int:
    """NOOP on a random sample of held sessions; how many answered +OK."""
    alive = 0
    for sock in random.sample(list(socks), min(sample, len(socks))):
        try:
            sock.settimeout(10)
            sock.sendall(b"NOOP\r\n")
            data = b""
            while not data.endswith(b"\r\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
            alive += data.startswith(b"+OK")
        except OSError:
            pass
        finally:
            sock.setblocking(False)
    return alive


def _noop_all(socks: Sequence[socket.socket], timeout: float) -> tuple[int, float]:
    """NOOP on every held session at once; (how many answered +OK, seconds for all).

    The sockets are non-blocking (as :func:`bench.swarm.run_swarm` leaves
    them): send every NOOP, then read the replies as they come.
    """
    sel = selectors.DefaultSelector()
    answered = 0
    bufs: dict[socket.socket, bytes] = {}
    started = time.perf_counter()
    try:
        for sock in socks:
            sock.setblocking(False)
            try:
                if sock.send(b"NOOP\r\n") != 6:
                    continue
            except OSError:
                continue
            sel.register(sock, selectors.EVENT_READ)
            bufs[sock] = b""
        deadline = time.monotonic() + timeout
        while sel.get_map() and time.monotonic() < deadline:
            for key, _mask in sel.select(timeout=0.5):
                ready = key.fileobj
                assert isinstance(ready, socket.socket)
                try:
                    chunk = ready.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                data = bufs[ready] + chunk
                bufs[ready] = data
                if chunk and not data.endswith(b"\r\n"):
                    continue
                answered += data.startswith(b"+OK")
                sel.unregister(ready)
    finally:
        sel.close()
    return answered, time.perf_counter() - started


def _wait_tree_size(root: int, at_most: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(procs.process_tree(root)) > at_most:
        time.sleep(0.1)


def _hold_through(env: Env, proc: PopguardProcess, n: int, wind_down: float) -> dict[str, Any]:
    """One repetition of (d) through a fresh relay (popguard or the floor): hold
    ``n`` sessions, VmRSS and file descriptors before and after, NOOPs meanwhile."""
    prm = env.params
    user, password = env.ping_user
    with proc as pg:
        held: list[socket.socket] = []
        ping = PopClient(pg.address)
        try:
            ping.login(user, password)
            ping_pong(pg.address, user, password, 100, client=ping)
            warm, _ = _hold(env, pg.address, min(50, n))
            release(warm)
            time.sleep(0.5)
            rss0 = procs.vm_rss_kib(pg.pid)
            fds0 = procs.fd_count(pg.pid)
            held, hold_s = _hold(env, pg.address, n)
            time.sleep(0.5)
            rss1 = procs.vm_rss_kib(pg.pid)
            fds1 = procs.fd_count(pg.pid)
            lat = ping_pong(pg.address, user, password, prm.noop_while_held, client=ping)
            alive = _check_alive(held)
            rss2 = procs.vm_rss_kib(pg.pid)
            all_alive, all_s = _noop_all(held, wind_down)
            return {
                "held": len(held),
                "hold_s": hold_s,
                "rss_before_kib": rss0,
                "rss_after_kib": rss1,
                "rss_after_noops_kib": rss2,
                "kib_per_session": (rss1 - rss0) / n,
                "popguard_fds": fds1,
                "fds_per_session": (fds1 - fds0) / n,
                "noop_p50_us": lat["p50_us"],
                "noop_p99_us": lat["p99_us"],
                "held_alive_sample": alive,
                "held_alive_all": all_alive,
                "noop_all_s": all_s,
            }
        finally:
            release(held, timeout=wind_down)
            with contextlib.suppress(OSError):
                ping.quit()


def case_memory(env: Env) -> dict[str, Any]:
    """(d) ``held`` idle authenticated sessions, DIRECT then THROUGH one popguard.

    Each repetition: Dovecot holds them (PSS growth over its process tree,
    one ``pop3`` process per session), then a fresh popguard holds as many
    (VmRSS growth / sessions), then (unless --no-floor) a fresh floor.
    While they are held a separate session, logged in before, runs
    ``noop_while_held`` NOOPs (p50, p99: popguard's against DIRECT's of the
    same repetition), a sample of 20 held sessions answers a NOOP one by
    one, then every held session gets a NOOP at once.
    """
    prm = env.params
    n = prm.held
    user, password = env.ping_user
    wind_down = _hold_seconds(prm, n) / 4
    direct_runs: list[dict[str, Any]] = []
    proxied_runs: list[dict[str, Any]] = []
    floor_runs: list[dict[str, Any]] = []
    for rep in range(prm.reps):
        # DIRECT: Dovecot's own memory per session (sum of PSS over its
        # process tree: one pop3 process per session) and NOOP latency.
        base_procs = len(procs.process_tree(env.dovecot_pid))
        ping = PopClient(env.upstream)
        held: list[socket.socket] = []
        try:
            ping.login(user, password)
            ping_pong(env.upstream, user, password, 100, client=ping)
            pss0, _ = procs.tree_pss_kib(env.dovecot_pid)
            held, hold_s = _hold(env, env.upstream, n)
            time.sleep(0.5)
            pss1, nproc = procs.tree_pss_kib(env.dovecot_pid)
            lat = ping_pong(env.upstream, user, password, prm.noop_while_held, client=ping)
            alive = _check_alive(held)
            all_alive, all_s = _noop_all(held, wind_down)
            run = {
                "held": len(held),
                "hold_s": hold_s,
                "dovecot_pss_kib_per_session": (pss1 - pss0) / n,
                "dovecot_processes": nproc,
                "noop_p50_us": lat["p50_us"],
                "noop_p99_us": lat["p99_us"],
                "held_alive_sample": alive,
                "held_alive_all": all_alive,
                "noop_all_s": all_s,
            }
            direct_runs.append(run)
        finally:
            release(held, timeout=wind_down)
            ping.quit()
        _wait_tree_size(env.dovecot_pid, base_procs, wind_down)

        # THROUGH popguard: a fresh process each repetition, so that freed
        # but retained memory from an earlier round does not hide growth.
        proxied_runs.append(_hold_through(env, env.popguard(), n, wind_down))
        _wait_tree_size(env.dovecot_pid, base_procs, wind_down)
        d, p = direct_runs[-1], proxied_runs[-1]
        floor_text = ""
        if env.has_floor("memory"):
            floor_runs.append(_hold_through(env, env.proxy(FLOOR), n, wind_down))
            _wait_tree_size(env.dovecot_pid, base_procs, wind_down)
            f = floor_runs[-1]
            floor_text = (
                f"; floor {f['kib_per_session']:.1f} kB/session, NOOP p50 "
                f"{f['noop_p50_us']:.0f} µs, alive {f['held_alive_all']} of {n}"
            )
        env.log(
            f"  memory rep {rep + 1}/{prm.reps}: popguard {p['kib_per_session']:.1f} kB/session "
            f"(VmRSS {p['rss_before_kib'] / 1024:.1f} -> {p['rss_after_kib'] / 1024:.1f} MB, "
            f"{p['popguard_fds']} fds), Dovecot {d['dovecot_pss_kib_per_session']:.0f} kB "
            f"PSS/session ({d['dovecot_processes']} processes); logins held in "
            f"{d['hold_s']:.1f} / {p['hold_s']:.1f} s; NOOP with {n} held: direct p50 "
            f"{d['noop_p50_us']:.0f} p99 {d['noop_p99_us']:.0f} µs, popguard p50 "
            f"{p['noop_p50_us']:.0f} p99 {p['noop_p99_us']:.0f} µs; alive: sample "
            f"{d['held_alive_sample']}/{p['held_alive_sample']}, all "
            f"{d['held_alive_all']}/{p['held_alive_all']} of {n}" + floor_text
        )
    res: dict[str, Any] = {
        "held": n,
        "kib_per_session": summary([r["kib_per_session"] for r in proxied_runs]),
        "fds_per_session": summary([r["fds_per_session"] for r in proxied_runs]),
        "dovecot_pss_kib_per_session": summary(
            [r["dovecot_pss_kib_per_session"] for r in direct_runs]
        ),
        "hold_s": compare([r["hold_s"] for r in direct_runs], [r["hold_s"] for r in proxied_runs]),
        "noop_p50_us": compare(
            [r["noop_p50_us"] for r in direct_runs], [r["noop_p50_us"] for r in proxied_runs]
        ),
        "noop_p99_us": compare(
            [r["noop_p99_us"] for r in direct_runs], [r["noop_p99_us"] for r in proxied_runs]
        ),
        "noop_all_s": compare(
            [r["noop_all_s"] for r in direct_runs], [r["noop_all_s"] for r in proxied_runs]
        ),
        "held_alive": {
            "direct": min(r["held_alive_sample"] for r in direct_runs),
            "popguard": min(r["held_alive_sample"] for r in proxied_runs),
            "sample": min(20, n),
        },
        "held_alive_all": {
            "direct": min(r["held_alive_all"] for r in direct_runs),
            "popguard": min(r["held_alive_all"] for r in proxied_runs),
            "held": n,
        },
        "runs": {"direct": direct_runs, "popguard": proxied_runs},
    }
    if floor_runs:
        res["runs"][FLOOR] = floor_runs

        def three(key: str) -> dict[str, Any]:
            return floor_figures(
                [r[key] for r in direct_runs],
                [r[key] for r in floor_runs],
                [r[key] for r in proxied_runs],
            )

        res["floor"] = {
            # No floor/direct here: Dovecot's figure is PSS over its processes.
            "kib_per_session": summary([r["kib_per_session"] for r in floor_runs]),
            "popguard_vs_floor": _ratio_only(
                compare(
                    [r["kib_per_session"] for r in floor_runs],
                    [r["kib_per_session"] for r in proxied_runs],
                )
            ),
            "fds_per_session": summary([r["fds_per_session"] for r in floor_runs]),
            "noop_p50_us": three("noop_p50_us"),
            "noop_p99_us": three("noop_p99_us"),
            "hold_s": three("hold_s"),
            "held_alive": min(r["held_alive_sample"] for r in floor_runs),
            "held_alive_all": min(r["held_alive_all"] for r in floor_runs),
        }
    return res


CASES: dict[str, Callable[[Env], dict[str, Any]]] = {
    "bulk": case_bulk,
    "pingpong": case_pingpong,
    "concurrency": case_concurrency,
    "dele": case_dele,
    "memory": case_memory,
    "workers": case_workers,
}


def params_dict(params: Params) -> dict[str, Any]:
    return asdict(params)
