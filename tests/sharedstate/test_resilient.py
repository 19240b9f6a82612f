"""ResilientState: what happens to decisions while Redis is away (on_failure)."""

from __future__ import annotations

import pytest
import trio

from popguard.sharedstate import (
    Decision,
    LocalState,
    RedisState,
    ResilientState,
    SharedStateRefused,
    open_shared_state,
)

OP_TIMEOUT = 0.3
#: Short backoff, so that recovery is seen within a test.
BACKOFF = (0.05, 0.2)


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, object]]] = []

    def __call__(self, name: str, fields: dict[str, object]) -> None:
        self.seen.append((name, fields))

    def names(self) -> list[str]:
        return [name for name, _ in self.seen]


def _resilient(server, key_prefix, on_failure, events, **options):
    primary = RedisState(
        server.url, key_prefix=key_prefix, op_timeout=OP_TIMEOUT, backoff=BACKOFF, **options
    )
    return ResilientState(primary, LocalState(), on_failure, events)


async def _until_healthy(state: ResilientState, operation) -> None:
    deadline = trio.current_time() + 3.0
    while True:
        await operation()
        if state.healthy:
            return
        assert trio.current_time() < deadline, "no recovery"
        await trio.sleep(0.05)


async def test_fail_open_answers_from_this_process_and_reports_once(own_redis_server, key_prefix):
    events = Events()
    state = _resilient(own_redis_server, key_prefix, "fail-open", events)
    assert await state.open_session("s1", "10.0.0.1", total=2, per_client=None) is Decision.OK
    assert await state.claim_user("s1", "alice", limit=1) is Decision.OK
    assert state.healthy
    own_redis_server.stop()
    # The fallback mirrored s1: it still counts against this process's limits.
    assert await state.open_session("s2", "10.0.0.1", total=2, per_client=None) is Decision.OK
    assert await state.open_session("s3", "10.0.0.1", total=2, per_client=None) is Decision.TOTAL
    assert await state.claim_user("s2", "alice", limit=1) is Decision.PER_USER
    assert await state.blocked_for(["client:10.0.0.1"]) == {"client:10.0.0.1": 0.0}
    assert await state.record_failure("client:10.0.0.1", failures=1, window=9, block=9) is True
    assert (await state.blocked_for(["client:10.0.0.1"]))["client:10.0.0.1"] > 8
    await state.close_session("s2", "10.0.0.1", None)  # never raises
    await state.release_user("s1", "alice")
    assert not state.healthy
    assert events.names() == ["shared_state.unavailable"]
    fields = events.seen[0][1]
    assert fields["on_failure"] == "fail-open"
    assert "Connection" in str(fields["reason"])
    assert state.fallback_decisions_total == 5
    assert state.unavailable_total >= 5
    assert state.refused_total == 0
    await state.aclose()


async def test_fail_closed_refuses_logins_but_records_quietly(own_redis_server, key_prefix):
    events = Events()
    state = _resilient(own_redis_server, key_prefix, "fail-closed", events)
    assert await state.open_session("s1", "10.0.0.1", total=None, per_client=None) is Decision.OK
    own_redis_server.stop()
    with pytest.raises(SharedStateRefused):
        await state.open_session("s2", "10.0.0.1", total=None, per_client=None)
    with pytest.raises(SharedStateRefused):
        await state.claim_user("s1", "alice", limit=None)
    with pytest.raises(SharedStateRefused):
        await state.blocked_for(["client:10.0.0.1"])
    assert await state.record_failure("user:k", failures=2, window=9, block=9) is False
    await state.release_user("s1", "alice")
    await state.close_session("s1", "10.0.0.1", "alice")
    assert state.refused_total == 3
    assert state.fallback_decisions_total == 0
    assert events.names() == ["shared_state.unavailable"]
    await state.aclose()


async def test_recovery_is_reported_once_and_the_store_decides_again(own_redis_server, key_prefix):
    events = Events()
    state = _resilient(own_redis_server, key_prefix, "fail-closed", events)
    other = RedisState(own_redis_server.url, key_prefix=key_prefix)
    own_redis_server.stop()
    with pytest.raises(SharedStateRefused):
        await state.open_session("s1", "10.0.0.1", total=1, per_client=None)
    own_redis_server.start()
    await _until_healthy(state, lambda: state.release_user("s0", "nobody"))
    assert await state.open_session("s1", "10.0.0.1", total=1, per_client=None) is Decision.OK
    # Another process sees this one's session: the answer came from Redis.
    assert await other.open_session("s9", "10.0.0.9", total=1, per_client=None) is Decision.TOTAL
    assert events.names() == ["shared_state.unavailable", "shared_state.recovered"]
    recovered = events.seen[1][1]
    assert recovered["outage_seconds"] > 0
    assert recovered["refused_total"] == 1
    await other.aclose()
    await state.aclose()


async def test_the_heartbeat_notices_an_outage_and_its_end(own_redis_server, key_prefix):
    events = Events()
    state = _resilient(own_redis_server, key_prefix, "fail-open", events, lease_seconds=0.3)
    async with trio.open_nursery() as nursery:
        await nursery.start(state.run)
        own_redis_server.stop()
        with trio.fail_after(2):
            while state.healthy:
                await trio.sleep(0.02)
        assert events.names() == ["shared_state.unavailable"]
        own_redis_server.start()
        with trio.fail_after(3):
            while not state.healthy:
                await trio.sleep(0.02)
        nursery.cancel_scope.cancel()
    assert events.names() == ["shared_state.unavailable", "shared_state.recovered"]
    await state.aclose()


def test_on_failure_must_be_known(redis_server):
    with pytest.raises(ValueError, match="fail-open, fail-closed"):
        ResilientState(RedisState(redis_server.url), LocalState(), "fail-maybe", Events())


async def test_the_factory_builds_what_the_configuration_names(redis_server, key_prefix):
    events = Events()
    assert isinstance(open_shared_state(None, on_event=events), LocalState)
    state = open_shared_state(
        redis_server.url, on_failure="fail-closed", on_event=events, key_prefix=key_prefix
    )
    assert isinstance(state, ResilientState)
    assert state.on_failure == "fail-closed"
    assert await state.open_session("s1", "10.0.0.1", total=1, per_client=None) is Decision.OK
    assert state.primary.live_sessions == 1
    await state.aclose()
