"""The printed results table: each figure direct and through popguard, the ratio, the goal."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

#: Goals popguard is measured against: issue #11's, for popguard as deployed
#: (run with --audit-file).  A report, not a test: missing one prints BELOW
#: (for a ratio) or OVER (for a cost), never fails the run.
GOAL_BULK = 0.80
GOAL_PINGPONG = 0.50
GOAL_CONCURRENCY = 0.85
GOAL_CPU_MS = 1.2
GOAL_IDLE_KB = 16.0
#: Full auditing (audit file, hash chain, UIDL identity) against auditing
#: off: at most 5 % of throughput, in each of bulk, concurrency and dele.
GOAL_AUDIT = 0.95
#: A tree of 1000 rules against no policies: ping-pong and concurrency
#: change by less than 5 %.
GOAL_POLICY = 0.95
GOAL_POLICY_CASES = ("pingpong", "concurrency")
#: Over TLS, against Dovecot's own POP3S directly: bulk within 0.8x.
GOAL_TLS_BULK = 0.80

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


def _verdict(r: float, goal: float | None) -> str:
    if goal is None:
        return ""
    return "n/a" if math.isnan(r) else ("PASS" if r >= goal else "BELOW")


def _goal(goal: float | None) -> str:
    return "(none set)" if goal is None else f">= {goal:.2f}x"


def _ratio_row(label: str, res: dict[str, Any], unit: str, goal: float | None, ref: str) -> Row:
    r = res["ratio"]
    return Row(
        label,
        spread(res["direct"], unit),
        spread(res["popguard"], unit),
        ratio_text(r) + pair_spread(res.get("pair_ratios", [])),
        _goal(goal),
        _verdict(r, goal),
        ref,
    )


def _same_run_rows(res: dict[str, Any], unit: str, results: dict[str, Any]) -> list[Row]:
    """The other popguard sides of a comparison run, each against DIRECT."""
    if "audit" in res:
        return _audit_off_row(res, unit)
    by_side = res.get("by_side")
    if not by_side:
        return []
    labels = results["meta"].get("side_labels", {})
    main = res.get("side")
    return [
        Row(
            f"      popguard, {labels.get(side, side)} (same run)",
            "",
            spread(entry["value"], unit),
            ratio_text(entry["vs_direct"]["ratio"])
            + pair_spread(entry["vs_direct"].get("pair_ratios", [])),
        )
        for side, entry in by_side.items()
        if side != main
    ]


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


def _swarm_rows(cc: dict[str, Any], results: dict[str, Any]) -> list[Row]:
    """The detail rows shared by (c) concurrency and (f) DELE-heavy."""
    out = _same_run_rows(cc, "sess/s", results)
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
    # Under --tls-compare the plaintext goals and nginx's figures do not
    # apply: bulk has a TLS goal of its own, the rest none.
    tls_mode = results["meta"].get("comparison") == "tls"
    over = " over TLS" if tls_mode else ""
    ref = {} if tls_mode else REFERENCE

    bulk = cases.get("bulk")
    if bulk and "error" not in bulk:
        fast = bulk["bulk"]
        n = fast["messages"]
        size = results["params"]["bulk_size"] // 1000
        out.append(
            _ratio_row(
                f"(a) bulk: RETR {n} x {size} kB, one session{over}",
                fast,
                "MB/s",
                GOAL_TLS_BULK if tls_mode else GOAL_BULK,
                ref.get("bulk", ""),
            )
        )
        out += _same_run_rows(fast, "MB/s", results)
        out.append(
            Row(
                "      popguard CPU while relaying",
                "",
                f"{fast['popguard_cpu_util']['median']:.0%} of a core",
            )
        )
        plain = bulk["bulk_plain"]
        out.append(
            _ratio_row(
                "    same, client Nagle on, 8 KiB reads",
                plain,
                "MB/s",
                GOAL_TLS_BULK if tls_mode else GOAL_BULK,
                "",
            )
        )
        out += _same_run_rows(plain, "MB/s", results)
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
                f"(b) ping-pong: {pp['count']:,} NOOPs, one session{over}",
                pp,
                "rt/s",
                None if tls_mode else GOAL_PINGPONG,
                ref.get("pingpong", ""),
            )
        )
        out += _same_run_rows(pp, "rt/s", results)
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
                f"(c) concurrency: {cc['sessions']} sessions, {cc['parallel']} at a time{over}",
                cc,
                "sess/s",
                None if tls_mode else GOAL_CONCURRENCY,
                ref.get("concurrency", ""),
            )
        )
        out += _swarm_rows(cc, results)
        cpu = cc["cpu_per_session_ms"]
        ok = cpu["median"] <= GOAL_CPU_MS
        out.append(
            Row(
                "(e) popguard CPU per session (from (c))",
                "",
                spread(cpu, "ms"),
                "",
                "(none set)" if tls_mode else f"<= {GOAL_CPU_MS:g} ms",
                "" if tls_mode else "PASS" if ok else "OVER",
                ref.get("cpu", ""),
            )
        )
    elif cc:
        out.append(Row("(c) concurrency", "ERROR: " + cc["error"]))

    dl = cases.get("dele")
    if dl and "error" not in dl:
        r = dl["ratio"]
        out.append(
            Row(
                f"(f) DELE-heavy: {dl['sessions']} sessions, {dl['parallel']} at a time{over}",
                spread(dl["direct"], "sess/s"),
                spread(dl["popguard"], "sess/s"),
                ratio_text(r) + pair_spread(dl.get("pair_ratios", [])),
                "(none set)",
            )
        )
        out += _swarm_rows(dl, results)
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
        ok = kb["median"] <= GOAL_IDLE_KB
        out.append(
            Row(
                f"(d) memory per idle session ({mem['held']} held)",
                "Dovecot " + spread(mem["dovecot_pss_kib_per_session"], "kB PSS"),
                spread(kb, "kB RSS"),
                "",
                f"<= {GOAL_IDLE_KB:g} kB",
                "PASS" if ok else "OVER",
                REFERENCE["memory"],
            )
        )
        fds = mem.get("fds_per_session")
        if fds:
            out.append(Row("      popguard file descriptors per session", "", spread(fds)))
        p50, p99 = mem["noop_p50_us"], mem["noop_p99_us"]
        out.append(
            Row(
                f"      NOOP with {mem['held']} held: p50 / p99",
                f"{num(p50['direct']['median'])} / {num(p99['direct']['median'])} µs",
                f"{num(p50['popguard']['median'])} / {num(p99['popguard']['median'])} µs",
                f"{ratio_text(p50['ratio'])} / {ratio_text(p99['ratio'])} latency",
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
        every = mem.get("held_alive_all")
        if every:
            took = mem["noop_all_s"]
            out.append(
                Row(
                    "      all held sessions: NOOP at once, answered",
                    f"{every['direct']}/{every['held']} in {num(took['direct']['median'])} s",
                    f"{every['popguard']}/{every['held']} in {num(took['popguard']['median'])} s",
                )
            )
        hold = mem.get("hold_s")
        if hold:
            out.append(
                Row(
                    f"      logging in the {mem['held']} held sessions",
                    spread(hold["direct"], "s"),
                    spread(hold["popguard"], "s"),
                    ratio_text(hold["ratio"]),
                )
            )
    elif mem:
        out.append(Row("(d) memory", "ERROR: " + mem["error"]))

    wk = cases.get("workers")
    if wk and "error" not in wk:
        out += workers_rows(wk, results)
    elif wk:
        out.append(Row("(g) workers", "ERROR: " + wk["error"]))
    return out


def workers_rows(wk: dict[str, Any], results: dict[str, Any]) -> list[Row]:
    """(g): the concurrency swarm through ``--workers 2``, with ``--workers 1`` below."""
    by = wk["by_side"]
    w2w1 = wk["w2_vs_w1"]
    out = [
        _ratio_row(
            f"(g) workers 2: {wk['sessions']} sessions, {wk['parallel']} at a time",
            wk,
            "sess/s",
            None,
            "",
        ),
        *_swarm_rows(wk, results),
    ]
    out.append(
        Row(
            "      workers 2 / workers 1 (same run)",
            "",
            f"{num(by['w2']['value']['median'])} / {num(by['w1']['value']['median'])} sess/s",
            ratio_text(w2w1["ratio"]) + pair_spread(w2w1.get("pair_ratios", [])),
        )
    )
    cpu = wk["cpu_per_session_ms_by_side"]
    util = wk["popguard_cpu_util_by_side"]
    out.append(
        Row(
            "      popguard CPU per session, whole tree: w1 / w2",
            "",
            f"{spread(cpu['w1'], 'ms')} / {spread(cpu['w2'], 'ms')}",
            f"{ratio_text(cpu['w2']['median'] / cpu['w1']['median'])} w2/w1"
            if cpu["w1"]["median"]
            else "",
        )
    )
    out.append(
        Row(
            "      popguard CPU during the run: w1 / w2",
            "",
            f"{util['w1']['median']:.0%} / {util['w2']['median']:.0%} of a core",
        )
    )
    split = wk.get("workers_cpu", {}).get("w2", {})
    share = split.get("busiest_worker_share")
    if share:
        out.append(
            Row(
                "      w2: busiest worker's part of workers' CPU",
                "",
                f"{share['median']:.0%} [{share['min']:.0%}..{share['max']:.0%}]"
                + f" (supervisor {num(split['root_cpu_ms_per_session']['median'])} ms/session)",
            )
        )
    return out


_PART_LABELS = {
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
            parts = [s for s in ("file",) if s in cpu]
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
                parts = [s for s in ("file",) if s in cpu]
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


_CASE_LABELS = {
    "bulk": "(a) bulk: RETR {n} x {size} kB",
    "pingpong": "(b) ping-pong: {count:,} NOOPs",
    "concurrency": "(c) concurrency: {sessions} sessions, {parallel} at a time",
    "dele": "(f) DELE-heavy: {sessions} sessions, {parallel} at a time",
}
_UNITS = {"bulk": "MB/s", "pingpong": "rt/s", "concurrency": "sess/s", "dele": "sess/s"}


def _compared_cases(results: dict[str, Any]) -> list[tuple[str, dict[str, Any] | None, str]]:
    """(case, its main result or None on error, label) for the cases of a comparison."""
    out: list[tuple[str, dict[str, Any] | None, str]] = []
    for name in ("bulk", "pingpong", "concurrency", "dele"):
        res = results.get("cases", {}).get(name)
        if not res:
            continue
        if "error" in res:
            out.append((name, None, f"{name}: ERROR: {res['error']}"))
            continue
        main = res["bulk"] if name == "bulk" else res
        if "by_side" not in main:
            continue
        label = _CASE_LABELS[name].format(
            n=main.get("messages"),
            size=results["params"]["bulk_size"] // 1000,
            sessions=main.get("sessions"),
            parallel=main.get("parallel"),
            count=main.get("count", 0),
        )
        out.append((name, main, label))
    return out


def _cost_figures(name: str, main: dict[str, Any]) -> list[tuple[str, dict[str, Any], str]]:
    """(label, {side: summary}, unit) of the per-unit CPU figures of a case."""
    if name == "bulk":
        return [
            ("popguard CPU per RETR", main.get("cpu_per_retr_us_by_side", {}), "µs"),
            ("Dovecot CPU per RETR", main.get("dovecot_cpu_us_per_retr_by_side", {}), "µs"),
            ("popguard CPU while relaying", main.get("popguard_cpu_util_by_side", {}), "%"),
        ]
    if name == "pingpong":
        return [
            ("popguard CPU per NOOP", main.get("cpu_us_per_noop_by_side", {}), "µs"),
            ("Dovecot CPU per NOOP", main.get("dovecot_cpu_us_per_noop_by_side", {}), "µs"),
            ("latency p50", main.get("p50_us_by_side", {}), "µs"),
        ]
    return [
        ("popguard CPU per session", main.get("cpu_per_session_ms_by_side", {}), "ms"),
        ("Dovecot CPU per session", main.get("dovecot_cpu_ms_per_session_by_side", {}), "ms"),
        ("client CPU per session", main.get("client_cpu_ms_per_session_by_side", {}), "ms"),
        ("popguard CPU during the run", main.get("popguard_cpu_util_by_side", {}), "%"),
    ]


def _fig(summaries: dict[str, Any], side: str, unit: str) -> str:
    s = summaries.get(side)
    if s is None:
        return ""
    if unit == "%":
        return f"{s['median']:.0%} of a core"
    return spread(s, unit)


def policy_rows(results: dict[str, Any]) -> list[Row]:
    """The --policy-compare table: 1000 rules against no policies, per case."""
    out: list[Row] = []
    for name, main, label in _compared_cases(results):
        if main is None:
            out.append(Row(label))
            continue
        by = main["by_side"]
        none, pol = by["none"], by["policy"]
        r = pol["vs_base"]["ratio"]
        goal = GOAL_POLICY if name in GOAL_POLICY_CASES else None
        out.append(
            Row(
                label,
                spread(none["value"], _UNITS[name]),
                spread(pol["value"], _UNITS[name]),
                ratio_text(r) + pair_spread(pol["vs_base"].get("pair_ratios", [])),
                _goal(goal) if goal else "",
                _verdict(r, goal),
                f"{ratio_text(none['vs_direct']['ratio'])} / "
                f"{ratio_text(pol['vs_direct']['ratio'])}",
            )
        )
        for fig_label, summaries, unit in _cost_figures(name, main):
            if "none" not in summaries or "policy" not in summaries:
                continue
            diff = ""
            if unit != "%":
                added = summaries["policy"]["median"] - summaries["none"]["median"]
                diff = f"{'+' if added >= 0 else ''}{num(added)} {unit}"
            out.append(
                Row(
                    f"      {fig_label}",
                    _fig(summaries, "none", unit),
                    _fig(summaries, "policy", unit),
                    diff,
                )
            )
    return out


def tls_rows(results: dict[str, Any]) -> list[Row]:
    """The --tls-compare table: popguard over TLS against Dovecot's own POP3S."""
    out: list[Row] = []
    for name, main, label in _compared_cases(results):
        if main is None:
            out.append(Row(label))
            continue
        unit = _UNITS[name]
        by = main["by_side"]
        tls, off = by["tls"], by["offload"]
        r = tls["vs_direct"]["ratio"]
        goal = GOAL_TLS_BULK if name == "bulk" else None
        out.append(
            Row(
                label,
                spread(main["direct"], unit),
                spread(tls["value"], unit),
                ratio_text(r) + pair_spread(tls["vs_direct"].get("pair_ratios", [])),
                _goal(goal) if goal else "",
                _verdict(r, goal),
                f"{spread(off['value'], unit)}  "
                f"{ratio_text(off['vs_direct']['ratio'])}"
                + pair_spread(off["vs_direct"].get("pair_ratios", [])),
            )
        )
        for fig_label, summaries, fig_unit in _cost_figures(name, main):
            if fig_label == "latency p50":
                continue
            if not any(side in summaries for side in ("direct", "tls", "offload")):
                continue
            out.append(
                Row(
                    f"      {fig_label}",
                    _fig(summaries, "direct", fig_unit),
                    _fig(summaries, "tls", fig_unit),
                    "",
                    "",
                    "",
                    _fig(summaries, "offload", fig_unit),
                )
            )
        negotiated = main.get("tls_by_side", {})
        if negotiated:
            out.append(
                Row(
                    "      client's TLS",
                    negotiated.get("direct", "") or "plaintext",
                    negotiated.get("tls", "") or "plaintext",
                    "",
                    "",
                    "",
                    negotiated.get("offload", "") or "plaintext",
                )
            )
    return out


def _table(head: Row, body: list[Row]) -> list[str]:
    cols = ("label", "direct", "proxied", "ratio", "goal", "verdict", "ref")
    return _grid([[getattr(r, c) for c in cols] for r in (head, *body)])


def _grid(table: list[list[str]]) -> list[str]:
    """Columns padded to their widest cell; a rule under the first row (the head)."""
    width = max(len(r) for r in table)
    table = [r + [""] * (width - len(r)) for r in table]
    widths = [max(len(r[c]) for r in table) for c in range(width)]
    lines = []
    for i, r in enumerate(table):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
        if i == 0:
            lines.append("-" * len(lines[-1]))
    return lines


# -- the floor: popguard against a bare trio relay (bench/floor.py) ----------------

FLOOR_HEAD = [
    "case",
    "DIRECT (Dovecot)",
    "THROUGH floor",
    "floor / direct",
    "THROUGH popguard",
    "popguard / direct",
    "popguard / floor",
]


def _with_pairs(r: dict[str, Any]) -> str:
    return ratio_text(r["ratio"]) + pair_spread(r.get("pair_ratios", []))


def _floor_rate_row(label: str, res: dict[str, Any], unit: str) -> list[str]:
    """A rate (MB/s, rt/s, sess/s) DIRECT, floor and popguard, and the three ratios."""
    fl = res["floor"]
    return [
        label,
        spread(res["direct"], unit),
        spread(fl["value"], unit),
        _with_pairs(fl["vs_direct"]),
        spread(res["popguard"], unit),
        _with_pairs(res),
        _with_pairs(fl["popguard_vs_floor"]),
    ]


def _floor_cost_row(label: str, by_side: dict[str, Any], main: str, unit: str) -> list[str]:
    """A cost of the relay process (CPU per GB, per NOOP, per session), floor and
    popguard, and popguard / floor (medians): how many floors popguard costs."""
    fl, pg = by_side.get("floor"), by_side.get(main)
    if fl is None or pg is None:
        return []
    if unit == "%":
        return [label, "", f"{fl['median']:.0%} of a core", "", f"{pg['median']:.0%} of a core"]
    times = pg["median"] / fl["median"] if fl["median"] else float("nan")
    return [label, "", spread(fl, unit), "", spread(pg, unit), "", ratio_text(times)]


def _added(value: float, base: float, unit: str) -> str:
    diff = value - base
    return f"{'+' if diff >= 0 else ''}{num(diff)} {unit}"


def _floor_latency_row(label: str, by_side: dict[str, Any], main: str, unit: str) -> list[str]:
    """A latency DIRECT, floor and popguard, with what each relay adds to DIRECT."""
    d, fl, pg = by_side.get("direct"), by_side.get("floor"), by_side.get(main)
    if d is None or fl is None or pg is None:
        return []
    return [
        label,
        spread(d, unit),
        spread(fl, unit),
        _added(fl["median"], d["median"], unit),
        spread(pg, unit),
        _added(pg["median"], d["median"], unit),
    ]


def floor_rows(results: dict[str, Any]) -> list[list[str]]:
    """The floor table: every case DIRECT, through the floor, through popguard."""
    cases = results.get("cases", {})
    out: list[list[str]] = []

    bulk = cases.get("bulk", {})
    fast = bulk.get("bulk", {})
    if "floor" in fast:
        main = fast.get("side", "popguard")
        size = results["params"]["bulk_size"] // 1000
        out.append(_floor_rate_row(f"(a) bulk: RETR {fast['messages']} x {size} kB", fast, "MB/s"))
        out.append(
            _floor_cost_row(
                "      proxy CPU per GB relayed", fast.get("cpu_s_per_gb_by_side", {}), main, "s"
            )
        )
        out.append(
            _floor_cost_row(
                "      proxy CPU per RETR", fast.get("cpu_per_retr_us_by_side", {}), main, "µs"
            )
        )
        out.append(
            _floor_cost_row(
                "      proxy CPU while relaying",
                fast.get("popguard_cpu_util_by_side", {}),
                main,
                "%",
            )
        )
        lat = fast["msg_p50_ms"]
        out.append(
            _floor_latency_row(
                "      one RETR, p50 (NODELAY)",
                {
                    "direct": _scaled(lat["direct"], 1e3),
                    "floor": _scaled(fast["floor"]["msg_p50_ms"], 1e3),
                    main: _scaled(lat["popguard"], 1e3),
                },
                main,
                "µs",
            )
        )
        plain = bulk.get("bulk_plain", {})
        if "floor" in plain:
            out.append(_floor_rate_row("    same, client Nagle on, 8 KiB reads", plain, "MB/s"))
            st, mx, fl = plain["stalls_over_20ms"], plain["msg_max_ms"], plain["floor"]
            out.append(
                [
                    "      RETRs over 20 ms / slowest (Nagle on)",
                    f"{st['direct']:.0f} / {num(mx['direct'])} ms",
                    f"{fl['stalls_over_20ms']:.0f} / {num(fl['msg_max_ms'])} ms",
                    "",
                    f"{st['popguard']:.0f} / {num(mx['popguard'])} ms",
                ]
            )
        same = bulk.get("identical_bytes_by_side", {})
        if "floor" in same:
            out.append(
                [
                    "      bytes relayed unchanged",
                    "",
                    "yes" if same["floor"] else "NO",
                    "",
                    "yes" if same.get(main) else "NO",
                ]
            )

    pp = cases.get("pingpong", {})
    if "floor" in pp:
        main = pp.get("side", "popguard")
        out.append(_floor_rate_row(f"(b) ping-pong: {pp['count']:,} NOOPs", pp, "rt/s"))
        out.append(
            _floor_cost_row(
                "      proxy CPU per NOOP", pp.get("cpu_us_per_noop_by_side", {}), main, "µs"
            )
        )
        out.append(
            _floor_latency_row("      latency p50", pp.get("p50_us_by_side", {}), main, "µs")
        )
        out.append(
            _floor_latency_row("      latency p99", pp.get("p99_us_by_side", {}), main, "µs")
        )

    for name, tag in (("concurrency", "(c) concurrency"), ("dele", "(f) DELE-heavy")):
        cc = cases.get(name, {})
        if "floor" not in cc:
            continue
        main = cc.get("side", "popguard")
        out.append(
            _floor_rate_row(
                f"{tag}: {cc['sessions']} sessions, {cc['parallel']} at a time", cc, "sess/s"
            )
        )
        out.append(
            _floor_cost_row(
                "      proxy CPU per session", cc.get("cpu_per_session_ms_by_side", {}), main, "ms"
            )
        )
        out.append(
            _floor_cost_row(
                "      proxy CPU during the run",
                cc.get("popguard_cpu_util_by_side", {}),
                main,
                "%",
            )
        )
        dv = cc.get("dovecot_cpu_ms_per_session_by_side", {})
        if {"direct", "floor", main} <= dv.keys():
            out.append(
                [
                    "      Dovecot CPU per session",
                    spread(dv["direct"], "ms"),
                    spread(dv["floor"], "ms"),
                    "",
                    spread(dv[main], "ms"),
                ]
            )
        out.append(
            _floor_latency_row(
                "      session latency p50", cc.get("latency_p50_ms_by_side", {}), main, "ms"
            )
        )
        ex = cc.get("expunged", {})
        if {"direct", "floor", main} <= ex.keys():
            out.append(
                ["      messages expunged / DELE sessions"]
                + [
                    f"{ex[side]['expunged']}/{ex[side]['sessions']}" if side else ""
                    for side in ("direct", "floor", "", main)
                ]
            )

    mem = cases.get("memory", {})
    if "floor" in mem:
        fl = mem["floor"]
        out.append(
            [
                f"(d) memory per idle session ({mem['held']} held)",
                "Dovecot " + spread(mem["dovecot_pss_kib_per_session"], "kB PSS"),
                spread(fl["kib_per_session"], "kB RSS"),
                "",
                spread(mem["kib_per_session"], "kB RSS"),
                "",
                _with_pairs(fl["popguard_vs_floor"]),
            ]
        )
        out.append(
            [
                "      file descriptors per session",
                "",
                spread(fl["fds_per_session"]),
                "",
                spread(mem["fds_per_session"]),
            ]
        )
        for pct in ("p50", "p99"):
            key = f"noop_{pct}_us"
            three = fl[key]
            out.append(
                [
                    f"      NOOP with {mem['held']} held, {pct}",
                    spread(mem[key]["direct"], "µs"),
                    spread(three["value"], "µs"),
                    _with_pairs(three["vs_direct"]) + " latency",
                    spread(mem[key]["popguard"], "µs"),
                    _with_pairs(mem[key]) + " latency",
                    _with_pairs(three["popguard_vs_floor"]) + " latency",
                ]
            )
        every = mem["held_alive_all"]
        out.append(
            [
                "      all held sessions: NOOP at once, answered",
                f"{every['direct']}/{every['held']}",
                f"{fl['held_alive_all']}/{every['held']}",
                "",
                f"{every['popguard']}/{every['held']}",
            ]
        )
    return [r for r in out if r]


def _scaled(s: dict[str, Any], factor: float) -> dict[str, Any]:
    """A summary with every figure multiplied by ``factor`` (ms to µs)."""
    return {
        "median": s["median"] * factor,
        "min": s["min"] * factor,
        "max": s["max"] * factor,
        "samples": [v * factor for v in s.get("samples", [])],
    }


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
    mode = meta.get("comparison")
    if compare_mode:
        lines.append(
            "--audit-compare: in (a), (c) and (f) THROUGH popguard is popguard with FULL "
            "auditing; the row below it is the same run with auditing off"
        )
    elif mode == "policy":
        lines.append(
            "--policy-compare: THROUGH popguard is popguard with the 1000-rule policy tree; "
            "the row below it is the same run with no policies"
        )
    elif mode == "tls":
        lines.append(
            "--tls-compare: DIRECT is Dovecot's own POP3S port; THROUGH popguard is TLS on both "
            "sides (POP3S to popguard, TLS from popguard to Dovecot's POP3S); the row below it "
            "is TLS offload (POP3S to popguard, plaintext to Dovecot)"
        )
    lines.append("")
    lines += _table(head, rows(results))
    if mode == "policy":
        body = policy_rows(results)
        if body:
            info = meta.get("policy", {})
            tree = info.get("tree", {})
            lines += [
                "",
                "Policy cost: 1000 rules / no policies (goal: ping-pong and concurrency change "
                f"by less than 5 %, i.e. >= {GOAL_POLICY:.2f}x)",
                f"  1000 rules: {info.get('check_policy', '?')}: {tree.get('per_user', '?')} "
                f"per-user ({tree.get('bench_users', '?')} naming bench users), "
                f"{tree.get('networks', '?')} client networks, {tree.get('patterns', '?')} globs "
                "and @domains, 1 catch-all (login_throttle, session limits)",
                "  no policies: a policy directory with rules: []; both popguards otherwise as "
                "the default (--no-console, no audit file, so no message identity)",
                "  each repetition runs DIRECT NONE POLICY, rotated by one per repetition",
                "",
            ]
            lines += _table(
                Row(
                    "case",
                    "no policies",
                    "1000 rules",
                    "rules / none",
                    "goal",
                    "",
                    "none / rules vs direct",
                ),
                body,
            )
    elif mode == "tls":
        body = tls_rows(results)
        if body:
            lines += [
                "",
                "TLS: popguard against Dovecot's own POP3S, same run (goal: bulk within 0.8x of "
                "direct TLS)",
                "  every connection makes a full handshake (no resumption); clients verify the "
                "certificate (name localhost); popguard verifies Dovecot's the same way",
                "  each repetition runs DIRECT OFFLOAD TLS, rotated by one per repetition",
                "",
            ]
            lines += _table(
                Row(
                    "case",
                    "DIRECT (Dovecot POP3S)",
                    "popguard, TLS both sides",
                    "tls / direct",
                    "goal",
                    "",
                    "TLS offload  offload / direct",
                ),
                body,
            )
    body_floor = floor_rows(results)
    if body_floor:
        lines += [
            "",
            "Floor: popguard against bench/floor.py, a bare trio relay in the same run (raw "
            "non-blocking sockets, one trio wait only when a call would block, 64 KiB reads, "
            "nothing of POP3): the best a trio proxy can do here",
            "  each repetition runs DIRECT POPGUARD FLOOR, rotated by one per repetition "
            "(memory: not rotated, a fresh relay each time); proxy CPU = the relay process's "
            "utime + stime over the run",
            "  popguard / floor: for a rate, the part of the floor's rate popguard reaches; for "
            "CPU, memory and latency, how many times the floor's",
            "",
        ]
        lines += _grid([FLOOR_HEAD, *body_floor])
    body = audit_rows(results) if compare_mode else []
    if body:
        lines += [
            "",
            "Audit cost: full auditing / auditing off (goal: full auditing costs at most 5 % "
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
