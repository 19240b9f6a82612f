"""RedisState against a real redis-server: atomicity, leases, expiry, failures, secrets."""

from __future__ import annotations

import logging
import time

import pytest
import redis
import trio

from popguard.sharedstate import Decision, RedisState, SharedStateUnavailable
from popguard.sharedstate.redis import BACKOFF_MAX
from tests.sharedstate.redisserver import RedisServer, ServerTLS

#: A short lease, so that expiry is seen within a test.
LEASE = 1.0
#: Slack for scheduling and one round trip, on top of a bound under test.
SLACK = 0.3


async def _open_all(states, count, **limits):
    """``count`` sessions opened at once, spread over ``states``; their decisions."""
    decisions: list[Decision] = []

    async def one(n: int) -> None:
        state = states[n % len(states)]
        decisions.append(await state.open_session(f"s{n}", f"10.0.0.{n % 3}", **limits))

    async with trio.open_nursery() as nursery:
        for n in range(count):
            nursery.start_soon(one, n)
    return decisions


async def test_total_limit_is_exact_under_concurrency(redis_pair, inspect):
    decisions = await _open_all(redis_pair, 50, total=10, per_client=None)
    assert decisions.count(Decision.OK) == 10
    assert decisions.count(Decision.TOTAL) == 40
    assert inspect.zcard(redis_pair[0].sessions_key) == 10


async def test_per_client_limit_is_exact_under_concurrency(redis_pair, inspect):
    decisions = await _open_all(redis_pair, 60, total=None, per_client=4)
    assert decisions.count(Decision.OK) == 12  # three client addresses
    assert decisions.count(Decision.PER_CLIENT) == 48
    assert inspect.zcard(redis_pair[0].client_key("10.0.0.1")) == 4


async def test_per_user_limit_is_exact_under_concurrency(redis_pair):
    decisions: list[Decision] = []

    async def claim(n: int) -> None:
        state = redis_pair[n % 2]
        decisions.append(await state.claim_user(f"s{n}", "alice-key", limit=3))

    async with trio.open_nursery() as nursery:
        for n in range(40):
            nursery.start_soon(claim, n)
    assert decisions.count(Decision.OK) == 3
    assert decisions.count(Decision.PER_USER) == 37


async def test_failures_are_counted_once_each_under_concurrency(redis_pair):
    starts: list[bool] = []

    async def fail(n: int) -> None:
        state = redis_pair[n % 2]
        starts.append(
            await state.record_failure("client:10.9.9.9", failures=5, window=60, block=60)
        )

    async with trio.open_nursery() as nursery:
        for n in range(23):
            nursery.start_soon(fail, n)
    assert starts.count(True) == 1  # the 5th starts the block; the rest fall in it


async def test_killed_process_leases_end_within_the_lease(redis_server, key_prefix):
    dead = RedisState(redis_server.url, key_prefix=key_prefix, lease_seconds=LEASE)
    alive = RedisState(redis_server.url, key_prefix=key_prefix, lease_seconds=LEASE)
    for n in range(3):
        assert await dead.open_session(f"d{n}", "10.0.0.1", total=3, per_client=None) is Decision.OK
        assert await dead.claim_user(f"d{n}", "alice", limit=3) is Decision.OK
    opened = trio.current_time()
    # "Killed": no heartbeat and no close; its leases still count for now.
    assert await alive.open_session("a", "10.0.0.2", total=3, per_client=None) is Decision.TOTAL
    assert await alive.claim_user("a", "alice", limit=3) is Decision.PER_USER
    while await alive.open_session("a", "10.0.0.2", total=3, per_client=None) is Decision.TOTAL:
        assert trio.current_time() - opened < LEASE + SLACK
        await trio.sleep(0.05)
    assert trio.current_time() - opened > LEASE * 0.8
    assert await alive.claim_user("a", "alice", limit=1) is Decision.OK
    await dead.aclose()
    await alive.aclose()


async def test_heartbeat_keeps_live_sessions_counted(redis_server, key_prefix, inspect):
    owner = RedisState(redis_server.url, key_prefix=key_prefix, lease_seconds=LEASE)
    other = RedisState(redis_server.url, key_prefix=key_prefix, lease_seconds=LEASE)
    assert await owner.open_session("s1", "10.0.0.1", total=1, per_client=None) is Decision.OK
    assert await owner.claim_user("s1", "alice", limit=1) is Decision.OK
    async with trio.open_nursery() as nursery:
        await nursery.start(owner.run)
        await trio.sleep(LEASE * 2.5)
        assert (
            await other.open_session("s2", "10.0.0.2", total=1, per_client=None) is Decision.TOTAL
        )
        assert await other.claim_user("s2", "alice", limit=1) is Decision.PER_USER
        assert 0 < inspect.pttl(owner.user_key("alice")) <= LEASE * 1000 + 1
        nursery.cancel_scope.cancel()  # the process dies
    stopped = trio.current_time()
    while await other.claim_user("s2", "alice", limit=1) is Decision.PER_USER:
        assert trio.current_time() - stopped < LEASE + SLACK
        await trio.sleep(0.05)
    await owner.aclose()
    await other.aclose()


async def test_heartbeat_does_not_revive_closed_sessions(redis_server, key_prefix, inspect):
    state = RedisState(redis_server.url, key_prefix=key_prefix, lease_seconds=LEASE)
    assert await state.open_session("s1", "10.0.0.1", total=None, per_client=None) is Decision.OK
    assert await state.open_session("s2", "10.0.0.1", total=None, per_client=None) is Decision.OK
    await state.close_session("s1", "10.0.0.1", None)
    assert await state.renew() == 2  # s2 in the total and in its client's set
    assert inspect.zcard(state.sessions_key) == 1
    await state.aclose()


async def test_every_key_expires_and_names_are_bounded(redis_pair, inspect, key_prefix):
    first, second = redis_pair
    long_address = "x" * 5000
    assert await first.open_session("s1", long_address, total=5, per_client=5) is Decision.OK
    assert await second.open_session("s" * 300, "10.0.0.1", total=5, per_client=5) is Decision.OK
    assert await first.claim_user("s1", "u" * 5000, limit=5) is Decision.OK
    await first.record_failure("client:" + long_address, failures=2, window=30, block=30)
    await second.record_failure("client:" + long_address, failures=2, window=30, block=30)
    await second.record_failure("user:k", failures=3, window=30, block=30)
    await first.renew()
    keys = list(inspect.scan_iter(f"{key_prefix}:*"))
    kinds = {key.split(":")[1] for key in keys}
    assert kinds == {"sessions", "client", "user", "fails", "block"}
    for key in keys:
        assert 0 < inspect.pttl(key) <= 30_000, key
        assert len(key) <= len(key_prefix) + len(":client:") + 32, key
    members = inspect.zrange(first.sessions_key, 0, -1)
    assert all(len(member) <= 9 + 64 for member in members)


async def test_works_over_a_unix_socket(redis_server, key_prefix):
    state = RedisState(redis_server.unix_url, key_prefix=key_prefix)
    assert await state.open_session("s1", "10.0.0.1", total=1, per_client=None) is Decision.OK
    assert await state.open_session("s2", "10.0.0.1", total=1, per_client=None) is Decision.TOTAL
    await state.aclose()


async def test_operations_fail_fast_when_redis_is_down(own_redis_server, key_prefix):
    op_timeout = 0.3
    state = RedisState(own_redis_server.url, key_prefix=key_prefix, op_timeout=op_timeout)
    assert await state.open_session("s1", "10.0.0.1", total=5, per_client=None) is Decision.OK
    own_redis_server.stop()
    for _ in range(3):
        started = time.monotonic()
        with pytest.raises(SharedStateUnavailable):
            await state.open_session("s2", "10.0.0.1", total=5, per_client=None)
        assert time.monotonic() - started < op_timeout
    await state.aclose()


async def test_a_stalled_redis_never_stalls_an_operation(own_redis_server, key_prefix):
    op_timeout = 0.3
    state = RedisState(own_redis_server.url, key_prefix=key_prefix, op_timeout=op_timeout)
    assert await state.blocked_for(["client:a"]) == {"client:a": 0.0}
    own_redis_server.pause()
    try:
        started = time.monotonic()
        with pytest.raises(SharedStateUnavailable, match=r"no answer within 0\.3 s"):
            await state.claim_user("s1", "alice", limit=1)
        assert time.monotonic() - started < op_timeout + SLACK
        # Backing off: the next ones fail at once, holding no thread.
        started = time.monotonic()
        with pytest.raises(SharedStateUnavailable, match="backing off"):
            await state.claim_user("s1", "alice", limit=1)
        assert time.monotonic() - started < 0.05
    finally:
        own_redis_server.resume()
    await _until_answered(lambda: state.claim_user("s1", "alice", limit=1))
    await state.aclose()


async def _until_answered(operation, within=BACKOFF_MAX + 2.0):
    deadline = trio.current_time() + within
    while True:
        try:
            return await operation()
        except SharedStateUnavailable:
            assert trio.current_time() < deadline, "no recovery"
            await trio.sleep(0.05)


async def test_recovers_after_a_restart_without_new_objects(own_redis_server, key_prefix):
    state = RedisState(own_redis_server.url, key_prefix=key_prefix, backoff=(0.05, 0.2))
    assert await state.open_session("s1", "10.0.0.1", total=1, per_client=None) is Decision.OK
    own_redis_server.stop()
    with pytest.raises(SharedStateUnavailable):
        await state.open_session("s2", "10.0.0.1", total=1, per_client=None)
    own_redis_server.start()
    probe = redis.Redis.from_url(own_redis_server.url)
    script_sha = state._open.sha
    assert probe.script_exists(script_sha) == [False]  # the restart forgot the scripts
    decision = await _until_answered(
        lambda: state.open_session("s2", "10.0.0.1", total=1, per_client=None)
    )
    assert decision is Decision.OK  # the restart also forgot s1's lease
    assert probe.script_exists(script_sha) == [True]  # NOSCRIPT handled: loaded again
    assert await state.open_session("s3", "10.0.0.1", total=1, per_client=None) is Decision.TOTAL
    probe.close()
    await state.aclose()


async def test_password_from_a_file_never_shows(tmp_path, caplog):
    secret = "s3cret-Pa55word-for-tests"
    (tmp_path / "redis").mkdir()
    with RedisServer(tmp_path / "redis", password=secret) as server:
        password_file = tmp_path / "password"
        password_file.write_text(secret + "\n")
        wrong_file = tmp_path / "wrong"
        wrong_file.write_text("not-" + secret + "\n")
        caplog.set_level(logging.DEBUG)
        state = RedisState(server.url, password_file=password_file)
        assert await state.open_session("s1", "10.0.0.1", total=1, per_client=None) is Decision.OK
        texts = []
        for url in (server.url, server.unix_url):
            for credentials in (wrong_file, None):
                refused = RedisState(url, password_file=credentials)
                with pytest.raises(SharedStateUnavailable) as failure:
                    await refused.open_session("s2", "10.0.0.1", total=5, per_client=None)
                texts += [str(failure.value), repr(failure.value), failure.value.reason]
                assert failure.value.__cause__ is None
                assert failure.value.__context__ is None or secret not in str(
                    failure.value.__context__
                )
                await refused.aclose()
        assert any("Authentication" in text or "NOAUTH" in text for text in texts), texts
        server.stop()
        with pytest.raises(SharedStateUnavailable) as failure:
            await state.open_session("s3", "10.0.0.1", total=1, per_client=None)
        texts.append(str(failure.value))
        texts.append(repr(state.__dict__.get("_client")))
        await state.aclose()
    everything = "\n".join(texts + [record.getMessage() for record in caplog.records])
    assert secret not in everything


def test_a_password_in_the_url_is_refused():
    with pytest.raises(ValueError, match="password_file") as failure:
        RedisState("redis://:hunter2@127.0.0.1:6379/0")
    assert "hunter2" not in str(failure.value)
    with pytest.raises(ValueError, match="password_file"):
        RedisState("unix:///run/redis.sock?password=hunter2")


@pytest.mark.parametrize(
    ("url", "ca_file", "message"),
    [
        ("http://127.0.0.1:6379", None, "unknown scheme"),
        ("redis://127.0.0.1:6379", "/etc/ssl/ca.pem", "rediss"),
    ],
)
def test_bad_urls_are_refused(url, ca_file, message):
    with pytest.raises(ValueError, match=message):
        RedisState(url, ca_file=ca_file)


def test_a_key_prefix_must_be_short_and_plain():
    for prefix in ("", "a b", "x" * 65, "pre\r\nfix"):
        with pytest.raises(ValueError, match="key prefix"):
            RedisState("redis://127.0.0.1:6379/0", key_prefix=prefix)


@pytest.mark.parametrize("bad", [{"failures": 0}, {"window": 0.0}, {"block": -1.0}])
async def test_record_failure_refuses_nonsense(redis_pair, bad):
    throttle = {"failures": 3, "window": 1.0, "block": 1.0, **bad}
    with pytest.raises(ValueError, match="positive"):
        await redis_pair[0].record_failure("client:x", **throttle)


@pytest.fixture
def tls_files(tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    files = ServerTLS(tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem")
    cert.cert_chain_pems[0].write_to_path(files.cert_file)
    cert.private_key_pem.write_to_path(files.key_file)
    ca.cert_pem.write_to_path(files.ca_file)
    other = trustme.CA()
    other.cert_pem.write_to_path(tmp_path / "other-ca.pem")
    return files


async def test_rediss_verifies_the_server_against_the_ca(tmp_path, tls_files, key_prefix):
    (tmp_path / "redis").mkdir()
    with RedisServer(tmp_path / "redis", tls=tls_files) as server:
        assert server.url.startswith("rediss://")
        state = RedisState(server.url, ca_file=str(tls_files.ca_file), key_prefix=key_prefix)
        assert await state.open_session("s1", "10.0.0.1", total=1, per_client=None) is Decision.OK
        assert (
            await state.open_session("s2", "10.0.0.1", total=1, per_client=None) is Decision.TOTAL
        )
        await state.aclose()
        untrusted = RedisState(server.url, ca_file=str(tmp_path / "other-ca.pem"))
        with pytest.raises(SharedStateUnavailable, match=r"(?i)certificate"):
            await untrusted.open_session("s1", "10.0.0.1", total=1, per_client=None)
        await untrusted.aclose()
        plaintext = RedisState(server.url.replace("rediss://", "redis://"), op_timeout=0.3)
        with pytest.raises(SharedStateUnavailable):
            await plaintext.open_session("s1", "10.0.0.1", total=1, per_client=None)
        await plaintext.aclose()
