"""The printed results table: each figure direct and through popguard, the ratio, the goal."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

#: Goals popguard is measured against.  A report, not a test: missing one
#: prints BELOW (for a ratio) or OVER (for a cost), never fails the run.
GOAL_BULK = 0.90
GOAL_PINGPONG = 0.60
GOAL_CONCURRENCY = 0.85
GOAL_CPU_MS = 1.0
GOAL_IDLE_KB = 20.0
#: Full auditing (audit file, hash chain, UIDL identity) against auditing
#: off: at most 10 % of throughput, in each of bulk, concurrency and dele.
GOAL_AUDIT = 0.90

#: The same figures measured for nginx's mail proxy on this kind of machine.
REFERENCE = {
    "bulk": "0.85x",
    "pingpong": "0.64x",
    "concurrency": "0.84x",
    "cpu": "0.35 ms",
    "memory": "~5 kB",
}


def num(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def spread(s: dict[str, Any], unit: str = "") -> str:
    """'median unit [min..max]' (the bracket only when there are several samples)."""
    text = f"{num(s['median'])}{' ' + unit if unit else ''}"
    if len(s.get("samples", ())) > 1:
        text += f" [{num(s['min'])}..{num(s['max'])}]"
    return text


def ratio_text(r: float) -> str:
    return "n/a" if r is None or math.isnan(r) else f"{r:.2f}x"


def pair_spread(pairs: list[float]) -> str:
    if len(pairs) < 2:
        return ""
    return f" [{min(pairs):.2f}..{max(pairs):.2f}]"


@dataclass
class Row:
    label: str
    direct: str = ""
    proxied: str = ""
    ratio: str = ""
    goal: str = ""
    verdict: str = ""
    ref: str = ""


def _ratio_row(label: str, res: dict[str, Any], unit: str, goal: float, ref: str) -> Row:
    r = res["ratio"]
    verdict = "n/a" if math.isnan(r) else ("PASS" if r >= goal else "BELOW")
    return Row(
        label,
        spread(res["direct"], unit),
        spread(res["popguard"], unit),
        ratio_text(r) + pair_spread(res.get("pair_ratios", [])),
        f">= {goal:.2f}x",
        verdict,
        ref,
    )


def _audit_off_row(res: dict[str, Any], unit: str) -> list[Row]:
    """With --audit-compare: the audit-off side of the same run, against DIRECT."""
    audit = res.get("audit")
    if not audit:
        return []
    return [
        Row(
            "      popguard with auditing off (same run)",
            "",
            spread(audit["off"], unit),
            ratio_text(audit["off_vs_direct"]),
        )
    ]


def _pair(res: dict[str, Any], a: str, b: str, unit: str) -> tuple[str, str]:
    return (
        f"{num(res[a]['direct']['median'])} / {num(res[b]['direct']['median'])} {unit}",
        f"{num(res[a]['popguard']['median'])} / {num(res[b]['popguard']['median'])} {unit}",
    )


def _deletions(rec: dict[str, Any]) -> str:
    text = f"{rec['recorded']}/{rec['sessions']}"
    if rec["with_uidl"] == rec["messages"] == rec["recorded"]:
        return text + ", all by UIDL"
    return text + f" ({rec['messages']} msgs, {rec['with_uidl']} by UIDL)"


def _swarm_rows(cc: dict[str, Any]) -> list[Row]:
    """The detail rows shared by (c) concurrency and (f) DELE-heavy."""
    out = _audit_off_row(cc, "sess/s")
    d, p = _pair(cc, "latency_p50_ms", "latency_p99_ms", "ms")
    out.append(Row("      session latency p50 / p99", d, p))
    cu = cc["client_cpu_max_util"]
    cm = cc["client_cpu_ms_per_session"]
    out.append(
        Row(
            f"      client CPU ({cc['client_procs']} procs): busiest / per session",
            f"{cu['direct']['median']:.0%} / {num(cm['direct']['median'])} ms",
            f"{cu['popguard']['median']:.0%} / {num(cm['popguard']['median'])} ms",
        )
    )
    out.append(
        Row(
            "      popguard CPU during the run",
            "",
            f"{cc['popguard_cpu_util']['median']:.0%} of a core",
        )
    )
    dv = cc["dovecot_cpu_ms_per_session"]
    out.append(
        Row(
            "      Dovecot CPU per session (all processes)",
            f"{num(dv['direct']['median'])} ms",
            f"{num(dv['popguard']['median'])} ms",
        )
    )
    return out


def rows(results: dict[str, Any]) -> list[Row]:
    cases = results.get("cases", {})
    out: list[Row] = []

    bulk = cases.get("bulk")
    if bulk and "error" not in bulk:
        fast = bulk["bulk"]
        n = fast["messages"]
        size = results["params"]["bulk_size"] // 1000
        out.append(
            _ratio_row(
                f"(a) bulk: RETR {n} x {size} kB, one session",
                fast,
                "MB/s",
                GOAL_BULK,
                REFERENCE["bulk"],
            )
        )
        out += _audit_off_row(fast, "MB/s")
        out.append(
            Row(
                "      popguard CPU while relaying",
                "",
                f"{fast['popguard_cpu_util']['median']:.0%} of a core",
            )
        )
        plain = bulk["bulk_plain"]
        out.append(
            _ratio_row("    same, client Nagle on, 8 KiB reads", plain, "MB/s", GOAL_BULK, "")
        )
        out += _audit_off_row(plain, "MB/s")
        lat = fast["msg_p50_ms"]
        added = (lat["popguard"]["median"] - lat["direct"]["median"]) * 1e3
        out.append(
            Row(
                "      one RETR, p50 (NODELAY)",
                f"{num(lat['direct']['median'] * 1e3)} µs",
                f"{num(lat['popguard']['median'] * 1e3)} µs",
                f"+{num(added)} µs" if added >= 0 else f"{num(added)} µs",
            )
        )
        for name, res in (("NODELAY", fast), ("Nagle on", plain)):
            st, mx = res["stalls_over_20ms"], res["msg_max_ms"]
            out.append(
                Row(
                    f"      RETRs over 20 ms / slowest ({name})",
                    f"{st['direct']:.0f} / {num(mx['direct'])} ms",
                    f"{st['popguard']:.0f} / {num(mx['popguard'])} ms",
                )
            )
        out.append(
            Row(
                "      bytes relayed unchanged",
                "",
                "yes" if bulk.get("identical_bytes") else "NO (differs from Dovecot)",
            )
        )
    elif bulk:
        out.append(Row("(a) bulk", "ERROR: " + bulk["error"]))

    pp = cases.get("pingpong")
    if pp and "error" not in pp:
        out.append(
            _ratio_row(
                f"(b) ping-pong: {pp['count']:,} NOOPs, one session",
                pp,
                "rt/s",
                GOAL_PINGPONG,
                REFERENCE["pingpong"],
            )
        )
        d, p = _pair(pp, "p50_us", "p99_us", "µs")
        added = pp["p50_us"]["popguard"]["median"] - pp["p50_us"]["direct"]["median"]
        out.append(Row("      latency p50 / p99", d, p, f"+{num(added)} µs (p50)"))
        out.append(
            Row(
                "      popguard CPU per NOOP",
                "",
                f"{num(pp['popguard_cpu_us_per_noop']['median'])} µs",
            )
        )
    elif pp:
        out.append(Row("(b) ping-pong", "ERROR: " + pp["error"]))

    cc = cases.get("concurrency")
    if cc and "error" not in cc:
        out.append(
            _ratio_row(
                f"(c) concurrency: {cc['sessions']} sessions, {cc['parallel']} at a time",
                cc,
                "sess/s",
                GOAL_CONCURRENCY,
                REFERENCE["concurrency"],
            )
        )
        out += _swarm_rows(cc)
        cpu = cc["cpu_per_session_ms"]
        ok = cpu["median"] < GOAL_CPU_MS
        out.append(
            Row(
                "(e) popguard CPU per session (from (c))",
                "",
                spread(cpu, "ms"),
                "",
                f"< {GOAL_CPU_MS:g} ms",
                "PASS" if ok else "OVER",
                REFERENCE["cpu"],
            )
        )
    elif cc:
        out.append(Row("(c) concurrency", "ERROR: " + cc["error"]))

    dl = cases.get("dele")
    if dl and "error" not in dl:
        r = dl["ratio"]
        out.append(
            Row(
                f"(f) DELE-heavy: {dl['sessions']} sessions, {dl['parallel']} at a time",
                spread(dl["direct"], "sess/s"),
                spread(dl["popguard"], "sess/s"),
                ratio_text(r) + pair_spread(dl.get("pair_ratios", [])),
                "(none set)",
            )
        )
        out += _swarm_rows(dl)
        out.append(
            Row(
                "      popguard CPU per session",
                "",
                spread(dl["cpu_per_session_ms"], "ms"),
            )
        )
        ex = dl.get("expunged", {})
        main = dl.get("side", "popguard")
        if "direct" in ex and main in ex:
            out.append(
                Row(
                    "      messages expunged / DELE sessions",
                    f"{ex['direct']['expunged']}/{ex['direct']['sessions']}",
                    f"{ex[main]['expunged']}/{ex[main]['sessions']}",
                )
            )
        rec = dl.get("deletions_recorded", {}).get(main)
        if rec:
            out.append(Row("      deletions recorded", "", _deletions(rec)))
    elif dl:
        out.append(Row("(f) DELE-heavy", "ERROR: " + dl["error"]))

    mem = cases.get("memory")
    if mem and "error" not in mem:
        kb = mem["kib_per_session"]
        ok = kb["median"] < GOAL_IDLE_KB
        out.append(
            Row(
                f"(d) memory per idle session ({mem['held']} held)",
                "Dovecot " + spread(mem["dovecot_pss_kib_per_session"], "kB PSS"),
                spread(kb, "kB RSS"),
                "",
                f"< {GOAL_IDLE_KB:g} kB",
                "PASS" if ok else "OVER",
                REFERENCE["memory"],
            )
        )
        p50, p99 = mem["noop_p50_us"], mem["noop_p99_us"]
        out.append(
            Row(
                f"      NOOP with {mem['held']} held: p50 / p99",
                f"{num(p50['direct']['median'])} / {num(p99['direct']['median'])} µs",
                f"{num(p50['popguard']['median'])} / {num(p99['popguard']['median'])} µs",
                f"{ratio_text(p50['ratio'])} p50 latency",
            )
        )
        alive = mem["held_alive"]
        out.append(
            Row(
                "      held sessions answering NOOP (sample)",
                f"{alive['direct']}/{alive['sample']}",
                f"{alive['popguard']}/{alive['sample']}",
            )
        )
    elif mem:
        out.append(Row("(d) memory", "ERROR: " + mem["error"]))
    return out


_PART_LABELS = {
    "identity": "      message identity only (no file)",
    "file": "      audit file only (no identity)",
}

_AUDIT_LABELS = {
    "bulk": "(a) bulk: RETR {n} x {size} kB",
    "concurrency": "(c) concurrency: {sessions} sessions, {parallel} at a time",
    "dele": "(f) DELE-heavy: {sessions} sessions, {parallel} at a time",
}


def audit_rows(results: dict[str, Any]) -> list[Row]:
    """The --audit-compare table: full auditing against auditing off, per case."""
    cases = results.get("cases", {})
    out: list[Row] = []
    for name in ("bulk", "concurrency", "dele"):
        res = cases.get(name)
        if not res:
            continue
        if "error" in res:
            out.append(Row(f"{name}", "ERROR: " + res["error"]))
            continue
        main = res["bulk"] if name == "bulk" else res
        audit = main.get("audit")
        if not audit:
            continue
        unit = "MB/s" if name == "bulk" else "sess/s"
        label = _AUDIT_LABELS[name].format(
            n=main.get("messages"),
            size=results["params"]["bulk_size"] // 1000,
            sessions=main.get("sessions"),
            parallel=main.get("parallel"),
        )
        r = audit["ratio"]
        verdict = "n/a" if math.isnan(r) else ("PASS" if r >= GOAL_AUDIT else "BELOW")
        out.append(
            Row(
                label,
                spread(audit["off"], unit),
                spread(audit["full"], unit),
                ratio_text(r) + pair_spread(audit.get("pair_ratios", [])),
                f">= {GOAL_AUDIT:.2f}x",
                verdict,
                f"{ratio_text(audit['off_vs_direct'])} / {ratio_text(audit['full_vs_direct'])}",
            )
        )
        for side, part in audit.get("parts", {}).items():
            out.append(
                Row(
                    _PART_LABELS.get(side, f"      {side}"),
                    "",
                    spread(part["popguard"], unit),
                    ratio_text(part["ratio"]) + pair_spread(part.get("pair_ratios", [])),
                    "",
                    "",
                    f"{ratio_text(part['vs_direct'])} vs direct",
                )
            )
        if name == "bulk":
            util = main.get("popguard_cpu_util_by_side", {})
            if "off" in util and "full" in util:
                out.append(
                    Row(
                        "      popguard CPU while relaying",
                        f"{util['off']['median']:.0%} of a core",
                        f"{util['full']['median']:.0%} of a core",
                    )
                )
            cpu = main.get("cpu_per_retr_us_by_side", {})
            if "off" in cpu and "full" in cpu:
                added = cpu["full"]["median"] - cpu["off"]["median"]
                out.append(
                    Row(
                        "      popguard CPU per RETR",
                        spread(cpu["off"], "µs"),
                        spread(cpu["full"], "µs"),
                        f"{'+' if added >= 0 else ''}{num(added)} µs",
                    )
                )
            parts = [s for s in ("identity", "file") if s in cpu]
            if parts:
                out.append(
                    Row(
                        "      popguard CPU per RETR, " + " / ".join(parts) + " only",
                        "",
                        " / ".join(f"{num(cpu[s]['median'])}" for s in parts) + " µs",
                    )
                )
            per = "RETR"
        else:
            cpu = main.get("cpu_per_session_ms_by_side", {})
            if "off" in cpu and "full" in cpu:
                added = cpu["full"]["median"] - cpu["off"]["median"]
                out.append(
                    Row(
                        "      popguard CPU per session",
                        spread(cpu["off"], "ms"),
                        spread(cpu["full"], "ms"),
                        f"{'+' if added >= 0 else ''}{num(added)} ms",
                    )
                )
                parts = [s for s in ("identity", "file") if s in cpu]
                if parts:
                    out.append(
                        Row(
                            "      popguard CPU per session, " + " / ".join(parts) + " only",
                            "",
                            " / ".join(f"{num(cpu[s]['median'])}" for s in parts) + " ms",
                        )
                    )
            dv = main.get("dovecot_cpu_ms_per_session_by_side", {})
            if "off" in dv and "full" in dv:
                out.append(
                    Row(
                        "      Dovecot CPU per session",
                        f"{num(dv['off']['median'])} ms",
                        f"{num(dv['full']['median'])} ms",
                    )
                )
            per = "session"
        au = main.get("audit_file", {}).get("full")
        if au:
            out.append(
                Row(
                    f"      audit file per {per}: bytes / records",
                    "(no file)",
                    f"{num(au['bytes_per_' + per.lower()]['median'])} B / "
                    f"{num(au['records_per_' + per.lower()]['median'])}",
                )
            )
            out.append(
                Row(
                    "      last record written after the run, max",
                    "",
                    f"{au['flush_wait_s']['max'] * 1e3:.0f} ms",
                )
            )
        if name == "dele":
            ex = main.get("expunged", {})
            if "off" in ex and "full" in ex:
                out.append(
                    Row(
                        "      messages expunged / DELE sessions",
                        f"{ex['off']['expunged']}/{ex['off']['sessions']}",
                        f"{ex['full']['expunged']}/{ex['full']['sessions']}",
                    )
                )
            rec = main.get("deletions_recorded", {}).get("full")
            if rec:
                out.append(Row("      deletions recorded", "", _deletions(rec)))
    return out


def _table(head: Row, body: list[Row]) -> list[str]:
    table = [head, *body]
    cols = ("label", "direct", "proxied", "ratio", "goal", "verdict", "ref")
    widths = {c: max(len(getattr(r, c)) for r in table) for c in cols}
    lines = []
    for i, r in enumerate(table):
        lines.append("  ".join(getattr(r, c).ljust(widths[c]) for c in cols).rstrip())
        if i == 0:
            lines.append("-" * len(lines[-1]))
    return lines


def render(results: dict[str, Any]) -> str:
    meta = results["meta"]
    head = Row("case", "DIRECT (Dovecot)", "THROUGH popguard", "ratio", "goal", "", "nginx")
    lines = [
        f"popguard {meta['popguard_version']} ({meta.get('popguard_git', '?')}) against Dovecot "
        f"{meta['dovecot_version']} on loopback",
        f"{meta['cpus']} CPUs, Python {meta['python']}, load average "
        f"{meta['loadavg_before']} before / {meta['loadavg_after']} after, "
        f"{meta['elapsed_s']:.0f} s total",
        f"figures: median of {results['params']['reps']} [min..max]; ratio = popguard / direct "
        "(median over median) [per-pair min..max]",
    ]
    compare_mode = meta.get("audit_compare")
    if compare_mode:
        lines.append(
            "--audit-compare: in (a), (c) and (f) THROUGH popguard is popguard with FULL "
            "auditing; the row below it is the same run with auditing off"
        )
    lines.append("")
    lines += _table(head, rows(results))
    body = audit_rows(results) if compare_mode else []
    if body:
        lines += [
            "",
            "Audit cost: full auditing / auditing off (goal: full auditing costs at most 10 % "
            "of throughput)",
            "  full = audit file (hash chain, fsync interval) + message identity (UIDL, LIST); "
            f"audit file on {meta.get('workdir_fs', '?')}",
            "  off  = no audit file, audit.message_identity false; all with --no-console; "
            "each repetition runs "
            + " ".join(s.upper() for s in ["direct", *meta.get("audit_sides", [])])
            + ", rotated by one per repetition",
            "",
        ]
        audit_head = Row(
            "case", "audit off", "audit full", "full / off", "goal", "", "off / full vs direct"
        )
        lines += _table(audit_head, body)
    notes = results.get("notes", [])
    if notes:
        lines.append("")
        lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)
