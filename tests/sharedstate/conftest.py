"""Fixtures: a private redis-server, and RedisState / LocalState pairs.

``redis_server`` (session) serves the tests that do not disturb it; each of
them uses a key prefix of its own.  ``own_redis_server`` (function) is one
a test may stop, restart or pause.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import redis

from popguard.sharedstate import LocalState, RedisState
from tests.sharedstate.redisserver import RedisServer

_prefixes = itertools.count(1)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def own_redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path) as server:
        yield server


@pytest.fixture
def key_prefix() -> str:
    return f"t{next(_prefixes)}"


@pytest.fixture
def inspect(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A plain client, to look at what the store wrote."""
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
async def redis_pair(
    redis_server: RedisServer, key_prefix: str
) -> AsyncIterator[tuple[RedisState, RedisState]]:
    """Two RedisStates on one Redis: two popguard processes."""
    first = RedisState(redis_server.url, key_prefix=key_prefix)
    second = RedisState(redis_server.url, key_prefix=key_prefix)
    yield first, second
    await first.aclose()
    await second.aclose()


Backend = LocalState | RedisState


@pytest.fixture(params=["local", "redis"])
def backend(request: pytest.FixtureRequest, key_prefix: str) -> Callable[[], Backend]:
    """Makes the views of one shared state: a RedisState per process, or one LocalState."""
    if request.param == "local":
        local = LocalState()
        return lambda: local
    server = request.getfixturevalue("redis_server")
    return lambda: RedisState(server.url, key_prefix=key_prefix)


@pytest.fixture
async def pair(backend: Callable[[], Backend]) -> AsyncIterator[tuple[Backend, Backend]]:
    """Two views of one shared state: two processes on Redis, one LocalState twice."""
    first, second = backend(), backend()
    yield first, second
    await first.aclose()
    await second.aclose()
