"""Measure a decision's latency and CPU: a dedicated thread against ``to_thread``.

``python -m tests.sharedstate.measure`` starts a private redis-server and
runs ``open_session`` decisions, one at a time and many at once, through
RedisState as it is (one dedicated thread fed by a queue, answering through the trio token)
and through the alternative the design weighed: ``trio.to_thread.run_sync``
per call under a CapacityLimiter of 8 threads and connections.  The numbers are in the module
docstring of ``popguard/sharedstate/redis.py``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import redis
import trio

from popguard.sharedstate import RedisState
from tests.sharedstate.redisserver import RedisServer

#: Threads (and connections) for the to_thread executor.
TO_THREAD_THREADS: Final = 8


class ToThread:
    """The alternative: ``trio.to_thread.run_sync`` per call, under a CapacityLimiter."""

    def __init__(self, threads: int) -> None:
        self._limiter = trio.CapacityLimiter(threads)

    async def call(self, operation: Callable[[], Any]) -> Any:
        return await trio.to_thread.run_sync(
            operation, limiter=self._limiter, abandon_on_cancel=True
        )

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def run_case(url: str, executor: str, concurrency: int, decisions: int) -> dict[str, float]:
    state = RedisState(url, key_prefix=f"m{executor}{concurrency}")
    if executor == "to_thread":
        state._client.connection_pool.max_connections = TO_THREAD_THREADS
        state._thread = ToThread(TO_THREAD_THREADS)
    latencies: list[float] = []
    per_task = decisions // concurrency

    async def worker(index: int) -> None:
        for n in range(per_task):
            started = time.perf_counter()
            await state.open_session(f"{index}-{n}", f"10.0.{index}.1", total=None, per_client=None)
            latencies.append(time.perf_counter() - started)

    await worker(-1)  # warm up: connections, script cache
    latencies.clear()
    cpu, wall = time.process_time(), time.perf_counter()
    async with trio.open_nursery() as nursery:
        for index in range(concurrency):
            nursery.start_soon(worker, index)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    await state.aclose()
    state._client.close()
    count = len(latencies)
    return {
        "p50_us": percentile(latencies, 0.50) * 1e6,
        "p99_us": percentile(latencies, 0.99) * 1e6,
        "mean_us": statistics.fmean(latencies) * 1e6,
        "cpu_us": cpu / count * 1e6,
        "per_s": count / wall,
    }


def baseline(url: str, decisions: int) -> dict[str, float]:
    """The same script straight from redis-py, no trio: the floor."""
    client = redis.Redis.from_url(url)
    state = RedisState(url, key_prefix="mbase")
    script = client.register_script(state._open.script)
    latencies = []
    cpu = time.process_time()
    for n in range(decisions):
        started = time.perf_counter()
        script(["mbase:sessions", "mbase:client:x"], [f"b{n}", -1, -1, 30000])
        latencies.append(time.perf_counter() - started)
    cpu = time.process_time() - cpu
    client.close()
    return {
        "p50_us": percentile(latencies, 0.50) * 1e6,
        "p99_us": percentile(latencies, 0.99) * 1e6,
        "mean_us": statistics.fmean(latencies) * 1e6,
        "cpu_us": cpu / decisions * 1e6,
        "per_s": decisions / sum(latencies),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as base, RedisServer(Path(base)) as server:
        print("case                       p50 us   p99 us  mean us   CPU us  decisions/s")
        row = baseline(server.url, args.decisions)
        print(
            f"{'redis-py alone, serial':26} {row['p50_us']:7.0f}  {row['p99_us']:7.0f}"
            f"  {row['mean_us']:7.0f}  {row['cpu_us']:7.0f}  {row['per_s']:11.0f}"
        )
        for _ in range(args.rounds):
            for concurrency in (1, 32):
                for executor in ("dedicated", "to_thread"):
                    row = trio.run(run_case, server.url, executor, concurrency, args.decisions)
                    print(
                        f"{executor + ', ' + str(concurrency) + ' at once':26}"
                        f" {row['p50_us']:7.0f}  {row['p99_us']:7.0f}  {row['mean_us']:7.0f}"
                        f"  {row['cpu_us']:7.0f}  {row['per_s']:11.0f}"
                    )


if __name__ == "__main__":
    main()
