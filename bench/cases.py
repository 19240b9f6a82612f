"""The benchmark cases.  Each measures DIRECT to Dovecot, then THROUGH popguard.

Every case returns a plain dict (JSON-ready).  Repetitions are interleaved
as pairs, direct first, then popguard (D P D P D P) after a warm-up of
each, so that slow drift of a shared machine hits both sides alike; the
report takes the median of each side.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import procs
from bench.procs import BenchError, PopguardProcess
from bench.swarm import SwarmPool, release, run_swarm, session_script
from bench.wire import PopClient, bulk_retr, ping_pong

Address = tuple[str, int]
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
    held: int = 1000
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
            held=100,
            hold_parallel=50,
            noop_while_held=200,
            client_procs=1,
            time_limit=60.0,
        )


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
    audit_file: str | None = None
    popguard_args: tuple[str, ...] = ()
    _seq: int = field(default=0)

    def popguard(self) -> PopguardProcess:
        """A fresh popguard in front of Dovecot (start it with ``with``)."""
        self._seq += 1
        return PopguardProcess(
            self.upstream,
            self.workdir / f"popguard-{self._seq}.log",
            idle_timeout=3600,
            audit_file=self.audit_file,
            extra_args=self.popguard_args,
        )


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


# -- (a) bulk ------------------------------------------------------------------------


def case_bulk(env: Env) -> dict[str, Any]:
    prm = env.params
    user, password = env.bulk_user
    limit = prm.time_limit
    out: dict[str, Any] = {}
    with env.popguard() as pg:
        # Warm-up: one whole pass each way (Dovecot builds its index and
        # reads the files into the page cache), hashing every byte, which
        # also checks that popguard relays exactly what Dovecot sends.
        digests = []
        for target in (env.upstream, pg.address):
            digest = hashlib.blake2b()
            bulk_retr(target, user, password, prm.bulk_messages, digest=digest, time_limit=limit)
            digests.append(digest.hexdigest())
        out["identical_bytes"] = digests[0] == digests[1]
        if not out["identical_bytes"]:
            env.log("  WARNING: popguard's RETR bytes differ from Dovecot's")

        variants = {
            "bulk": {"nodelay": True, "fast": True, "count": prm.bulk_messages},
            "bulk_plain": {"nodelay": False, "fast": False, "count": prm.bulk_plain_messages},
        }
        for name, v in variants.items():
            count = int(v["count"])
            direct: list[dict[str, float]] = []
            proxied: list[dict[str, float]] = []
            pg_cpu: list[float] = []
            if name != "bulk":  # short warm-up of this client flavour
                for target in (env.upstream, pg.address):
                    bulk_retr(
                        target,
                        user,
                        password,
                        min(count, 100),
                        nodelay=bool(v["nodelay"]),
                        fast=bool(v["fast"]),
                        time_limit=limit,
                    )
            for rep in range(prm.reps):
                d = bulk_retr(
                    env.upstream,
                    user,
                    password,
                    count,
                    nodelay=bool(v["nodelay"]),
                    fast=bool(v["fast"]),
                    time_limit=limit,
                )
                cpu0 = procs.cpu_seconds(pg.pid)
                p = bulk_retr(
                    pg.address,
                    user,
                    password,
                    count,
                    nodelay=bool(v["nodelay"]),
                    fast=bool(v["fast"]),
                    time_limit=limit,
                )
                cpu = procs.cpu_seconds(pg.pid) - cpu0
                direct.append(d)
                proxied.append(p)
                pg_cpu.append(cpu / p["seconds"])
                env.log(
                    f"  {name} rep {rep + 1}/{prm.reps}: direct {d['mb_per_s']:.0f} MB/s, "
                    f"popguard {p['mb_per_s']:.0f} MB/s (popguard CPU {cpu / p['seconds']:.0%}, "
                    f"stalls>20ms {d['stalls_over_20ms']:.0f}/{p['stalls_over_20ms']:.0f})"
                )
            res = compare([d["mb_per_s"] for d in direct], [p["mb_per_s"] for p in proxied])
            res["unit"] = "MB/s"
            res["bytes_per_session"] = direct[0]["bytes"]
            res["messages"] = count
            res["msg_p50_ms"] = compare(
                [d["msg_p50_ms"] for d in direct], [p["msg_p50_ms"] for p in proxied]
            )
            res["stalls_over_20ms"] = {
                "direct": max(d["stalls_over_20ms"] for d in direct),
                "popguard": max(p["stalls_over_20ms"] for p in proxied),
            }
            res["msg_max_ms"] = {
                "direct": max(d["msg_max_ms"] for d in direct),
                "popguard": max(p["msg_max_ms"] for p in proxied),
            }
            res["popguard_cpu_util"] = summary(pg_cpu)
            res["runs"] = {"direct": direct, "popguard": proxied}
            out[name] = res
    return out


# -- (b) ping-pong -------------------------------------------------------------------


def case_pingpong(env: Env) -> dict[str, Any]:
    prm = env.params
    user, password = env.ping_user
    limit = prm.time_limit
    with env.popguard() as pg:
        for target in (env.upstream, pg.address):
            ping_pong(target, user, password, prm.pingpong_warmup, time_limit=limit)
        direct, proxied, pg_cpu_us = [], [], []
        for rep in range(prm.reps):
            d = ping_pong(env.upstream, user, password, prm.pingpong, time_limit=limit)
            cpu0 = procs.cpu_seconds(pg.pid)
            p = ping_pong(pg.address, user, password, prm.pingpong, time_limit=limit)
            cpu = procs.cpu_seconds(pg.pid) - cpu0
            direct.append(d)
            proxied.append(p)
            pg_cpu_us.append(cpu / prm.pingpong * 1e6)
            env.log(
                f"  ping-pong rep {rep + 1}/{prm.reps}: direct {d['rt_per_s']:.0f}/s "
                f"p50 {d['p50_us']:.0f} µs, popguard {p['rt_per_s']:.0f}/s "
                f"p50 {p['p50_us']:.0f} µs (popguard CPU {cpu / prm.pingpong * 1e6:.0f} µs/NOOP)"
            )
    res = compare([d["rt_per_s"] for d in direct], [p["rt_per_s"] for p in proxied])
    res["unit"] = "round trips/s"
    res["count"] = prm.pingpong
    res["p50_us"] = compare([d["p50_us"] for d in direct], [p["p50_us"] for p in proxied])
    res["p99_us"] = compare([d["p99_us"] for d in direct], [p["p99_us"] for p in proxied])
    res["popguard_cpu_us_per_noop"] = summary(pg_cpu_us)
    res["runs"] = {"direct": direct, "popguard": proxied}
    return res


# -- (c) concurrency and (e) CPU per session ----------------------------------------


def case_concurrency(env: Env) -> dict[str, Any]:
    prm = env.params
    limit = prm.time_limit
    pool_users = env.pool
    with SwarmPool(prm.client_procs) as swarm, env.popguard() as pg:

        def go(target: Address, sessions: int, parallel: int) -> dict[str, Any]:
            r = swarm.run(target, pool_users, sessions, parallel, time_limit=limit)
            if r["failed"]:
                raise BenchError(f"{r['failed']} sessions failed, e.g. {r['errors'][:3]}")
            return r

        # Warm-up: every pool user once each way (Dovecot creates their indexes).
        for target in (env.upstream, pg.address):
            go(target, max(len(pool_users), prm.parallel), prm.parallel)
        direct, proxied = [], []
        pg_cpu_ms, dovecot_cpu_direct_ms, dovecot_cpu_proxied_ms = [], [], []
        for rep in range(prm.reps):
            dv0 = procs.tree_cpu_seconds(env.dovecot_pid)
            d = go(env.upstream, prm.sessions, prm.parallel)
            dv1 = procs.tree_cpu_seconds(env.dovecot_pid)
            cpu0 = procs.cpu_seconds(pg.pid)
            p = go(pg.address, prm.sessions, prm.parallel)
            cpu1 = procs.cpu_seconds(pg.pid)
            dv2 = procs.tree_cpu_seconds(env.dovecot_pid)
            d["dovecot_cpu_ms_per_session"] = (dv1 - dv0) / d["ok"] * 1e3
            p["dovecot_cpu_ms_per_session"] = (dv2 - dv1) / p["ok"] * 1e3
            p["popguard_cpu_ms_per_session"] = (cpu1 - cpu0) / p["ok"] * 1e3
            p["popguard_cpu_util"] = (cpu1 - cpu0) / p["wall"]
            direct.append(d)
            proxied.append(p)
            pg_cpu_ms.append(p["popguard_cpu_ms_per_session"])
            dovecot_cpu_direct_ms.append(d["dovecot_cpu_ms_per_session"])
            dovecot_cpu_proxied_ms.append(p["dovecot_cpu_ms_per_session"])
            env.log(
                f"  concurrency rep {rep + 1}/{prm.reps}: direct {d['sessions_per_s']:.0f}/s, "
                f"popguard {p['sessions_per_s']:.0f}/s; popguard CPU "
                f"{p['popguard_cpu_ms_per_session']:.2f} ms/session "
                f"({p['popguard_cpu_util']:.0%} of a core); busiest client process "
                f"{max(d['client_cpu_max_util'], p['client_cpu_max_util']):.0%} of a core"
            )
    res = compare([d["sessions_per_s"] for d in direct], [p["sessions_per_s"] for p in proxied])
    res["unit"] = "sessions/s"
    res["sessions"] = prm.sessions
    res["parallel"] = prm.parallel
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
    res["dovecot_cpu_ms_per_session"] = compare(dovecot_cpu_direct_ms, dovecot_cpu_proxied_ms)
    res["cpu_per_session_ms"] = summary(pg_cpu_ms)
    res["runs"] = {"direct": direct, "popguard": proxied}
    return res


# -- (d) memory per idle session -------------------------------------------------------


def _hold(env: Env, target: Address, count: int) -> list[socket.socket]:
    prm = env.params
    pool = env.pool

    def script(index: int) -> list[tuple[bytes | None, bool]]:
        user, password = pool[index % len(pool)]
        return session_script(user, password, quit=False)

    res = run_swarm(
        target, script, range(count), prm.hold_parallel, hold=True, time_limit=prm.time_limit
    )
    if res.failed:
        release(res.held, send_quit=False)
        raise BenchError(f"{res.failed} held sessions failed to log in, e.g. {res.errors[:3]}")
    return res.held


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


def _wait_tree_size(root: int, at_most: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(procs.process_tree(root)) > at_most:
        time.sleep(0.1)


def case_memory(env: Env) -> dict[str, Any]:
    prm = env.params
    n = prm.held
    user, password = env.ping_user
    direct_runs: list[dict[str, Any]] = []
    proxied_runs: list[dict[str, Any]] = []
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
            held = _hold(env, env.upstream, n)
            time.sleep(0.5)
            pss1, nproc = procs.tree_pss_kib(env.dovecot_pid)
            lat = ping_pong(env.upstream, user, password, prm.noop_while_held, client=ping)
            alive = _check_alive(held)
            run = {
                "held": len(held),
                "dovecot_pss_kib_per_session": (pss1 - pss0) / n,
                "dovecot_processes": nproc,
                "noop_p50_us": lat["p50_us"],
                "noop_p99_us": lat["p99_us"],
                "held_alive_sample": alive,
            }
            direct_runs.append(run)
        finally:
            release(held)
            ping.quit()
        _wait_tree_size(env.dovecot_pid, base_procs)

        # THROUGH popguard: a fresh process each repetition, so that freed
        # but retained memory from an earlier round does not hide growth.
        with env.popguard() as pg:
            held = []
            ping = PopClient(pg.address)
            try:
                ping.login(user, password)
                ping_pong(pg.address, user, password, 100, client=ping)
                warm = _hold(env, pg.address, min(50, n))
                release(warm)
                time.sleep(0.5)
                rss0 = procs.vm_rss_kib(pg.pid)
                held = _hold(env, pg.address, n)
                time.sleep(0.5)
                rss1 = procs.vm_rss_kib(pg.pid)
                lat = ping_pong(pg.address, user, password, prm.noop_while_held, client=ping)
                alive = _check_alive(held)
                rss2 = procs.vm_rss_kib(pg.pid)
                run = {
                    "held": len(held),
                    "rss_before_kib": rss0,
                    "rss_after_kib": rss1,
                    "rss_after_noops_kib": rss2,
                    "kib_per_session": (rss1 - rss0) / n,
                    "noop_p50_us": lat["p50_us"],
                    "noop_p99_us": lat["p99_us"],
                    "held_alive_sample": alive,
                }
                proxied_runs.append(run)
            finally:
                release(held)
                with contextlib.suppress(OSError):
                    ping.quit()
        _wait_tree_size(env.dovecot_pid, base_procs)
        d, p = direct_runs[-1], proxied_runs[-1]
        env.log(
            f"  memory rep {rep + 1}/{prm.reps}: popguard {p['kib_per_session']:.1f} kB/session "
            f"(VmRSS {p['rss_before_kib'] / 1024:.1f} -> {p['rss_after_kib'] / 1024:.1f} MB), "
            f"Dovecot {d['dovecot_pss_kib_per_session']:.0f} kB PSS/session; NOOP with {n} "
            f"held: direct p50 {d['noop_p50_us']:.0f} µs, popguard p50 {p['noop_p50_us']:.0f} µs "
            f"(alive {d['held_alive_sample']}/{p['held_alive_sample']})"
        )
    return {
        "held": n,
        "kib_per_session": summary([r["kib_per_session"] for r in proxied_runs]),
        "dovecot_pss_kib_per_session": summary(
            [r["dovecot_pss_kib_per_session"] for r in direct_runs]
        ),
        "noop_p50_us": compare(
            [r["noop_p50_us"] for r in direct_runs], [r["noop_p50_us"] for r in proxied_runs]
        ),
        "noop_p99_us": compare(
            [r["noop_p99_us"] for r in direct_runs], [r["noop_p99_us"] for r in proxied_runs]
        ),
        "held_alive": {
            "direct": min(r["held_alive_sample"] for r in direct_runs),
            "popguard": min(r["held_alive_sample"] for r in proxied_runs),
            "sample": min(20, n),
        },
        "runs": {"direct": direct_runs, "popguard": proxied_runs},
    }


CASES: dict[str, Callable[[Env], dict[str, Any]]] = {
    "bulk": case_bulk,
    "pingpong": case_pingpong,
    "concurrency": case_concurrency,
    "memory": case_memory,
}


def params_dict(params: Params) -> dict[str, Any]:
    return asdict(params)
