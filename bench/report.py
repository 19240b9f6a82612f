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


def _pair(res: dict[str, Any], a: str, b: str, unit: str) -> tuple[str, str]:
    return (
        f"{num(res[a]['direct']['median'])} / {num(res[b]['direct']['median'])} {unit}",
        f"{num(res[a]['popguard']['median'])} / {num(res[b]['popguard']['median'])} {unit}",
    )


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


def render(results: dict[str, Any]) -> str:
    meta = results["meta"]
    head = Row("case", "DIRECT (Dovecot)", "THROUGH popguard", "ratio", "goal", "", "nginx")
    table = [head, *rows(results)]
    cols = ("label", "direct", "proxied", "ratio", "goal", "verdict", "ref")
    widths = {c: max(len(getattr(r, c)) for r in table) for c in cols}
    lines = [
        f"popguard {meta['popguard_version']} ({meta.get('popguard_git', '?')}) against Dovecot "
        f"{meta['dovecot_version']} on loopback",
        f"{meta['cpus']} CPUs, Python {meta['python']}, load average "
        f"{meta['loadavg_before']} before / {meta['loadavg_after']} after, "
        f"{meta['elapsed_s']:.0f} s total",
        f"figures: median of {results['params']['reps']} [min..max]; ratio = popguard / direct "
        "(median over median) [per-pair min..max]",
        "",
    ]
    for i, r in enumerate(table):
        lines.append("  ".join(getattr(r, c).ljust(widths[c]) for c in cols).rstrip())
        if i == 0:
            lines.append("-" * len(lines[-1]))
    notes = results.get("notes", [])
    if notes:
        lines.append("")
        lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)
