"""The SharedState contract, run against LocalState and against RedisState.

For Redis, ``pair`` is two RedisStates on one server (two popguard
processes); for LocalState, one object seen twice.  Either way a limit set
through one view holds through the other.
"""

from __future__ import annotations

import trio

from popguard.policy.state import FailedLogins
from popguard.sharedstate import Decision

# Short windows and blocks keep the tests quick; Redis's clock is in ms.
WINDOW = 0.4
BLOCK = 0.6


async def test_total_limit_counts_both_views(pair):
    first, second = pair
    assert await first.open_session("s1", "10.0.0.1", total=2, per_client=None) is Decision.OK
    assert await second.open_session("s2", "10.0.0.2", total=2, per_client=None) is Decision.OK
    assert await first.open_session("s3", "10.0.0.3", total=2, per_client=None) is Decision.TOTAL
    assert await second.open_session("s4", "10.0.0.3", total=2, per_client=None) is Decision.TOTAL
    assert await first.open_session("s5", "10.0.0.3", total=None, per_client=None) is Decision.OK


async def test_per_client_limit(pair):
    first, second = pair
    assert await first.open_session("a", "10.0.0.1", total=None, per_client=1) is Decision.OK
    refused = await second.open_session("b", "10.0.0.1", total=None, per_client=1)
    assert refused is Decision.PER_CLIENT
    assert await second.open_session("c", "10.0.0.2", total=None, per_client=1) is Decision.OK


async def test_total_is_checked_before_per_client(pair):
    first, _ = pair
    assert await first.open_session("a", "10.0.0.1", total=1, per_client=1) is Decision.OK
    assert await first.open_session("b", "10.0.0.1", total=1, per_client=1) is Decision.TOTAL


async def test_open_session_is_idempotent(pair):
    first, second = pair
    for _ in range(3):
        assert await first.open_session("s1", "10.0.0.1", total=1, per_client=1) is Decision.OK
    assert await second.open_session("s2", "10.0.0.1", total=1, per_client=None) is Decision.TOTAL


async def test_close_returns_counts_to_zero(pair):
    first, second = pair
    for n in range(3):
        decision = await first.open_session(f"s{n}", "10.0.0.1", total=3, per_client=3)
        assert decision is Decision.OK
        assert await first.claim_user(f"s{n}", "alice", limit=3) is Decision.OK
    assert await second.open_session("x", "10.0.0.9", total=3, per_client=None) is Decision.TOTAL
    assert await second.claim_user("x", "alice", limit=3) is Decision.PER_USER
    for n in range(3):
        await first.close_session(f"s{n}", "10.0.0.1", "alice")
    for n in range(3):
        decision = await second.open_session(f"y{n}", "10.0.0.1", total=3, per_client=3)
        assert decision is Decision.OK
        assert await second.claim_user(f"y{n}", "alice", limit=3) is Decision.OK


async def test_close_of_an_unknown_session_changes_nothing(pair):
    first, second = pair
    assert await first.open_session("s1", "10.0.0.1", total=1, per_client=None) is Decision.OK
    await second.close_session("never-opened", "10.0.0.1", None)
    assert await second.open_session("s2", "10.0.0.1", total=1, per_client=None) is Decision.TOTAL


async def test_per_user_limit_and_release(pair):
    first, second = pair
    assert await first.claim_user("s1", "alice", limit=2) is Decision.OK
    assert await second.claim_user("s2", "alice", limit=2) is Decision.OK
    assert await first.claim_user("s3", "alice", limit=2) is Decision.PER_USER
    assert await first.claim_user("s3", "bob", limit=2) is Decision.OK
    assert await first.claim_user("s1", "alice", limit=2) is Decision.OK  # holds one already
    await second.release_user("s2", "alice")
    assert await first.claim_user("s3", "alice", limit=2) is Decision.OK
    assert await second.claim_user("s4", "alice", limit=None) is Decision.OK


async def test_limit_zero_refuses_everyone(pair):
    first, _ = pair
    assert await first.open_session("s1", "10.0.0.1", total=0, per_client=None) is Decision.TOTAL
    assert await first.claim_user("s1", "alice", limit=0) is Decision.PER_USER


async def test_failures_start_a_block_through_either_view(pair):
    first, second = pair
    throttle = {"failures": 3, "window": 30.0, "block": BLOCK}
    assert await first.record_failure("client:10.0.0.1", **throttle) is False
    assert await second.record_failure("client:10.0.0.1", **throttle) is False
    assert await first.blocked_for(["client:10.0.0.1"]) == {"client:10.0.0.1": 0.0}
    assert await second.record_failure("client:10.0.0.1", **throttle) is True
    for view in pair:
        left = await view.blocked_for(["client:10.0.0.1", "user:other"])
        assert 0 < left["client:10.0.0.1"] <= BLOCK
        assert left["user:other"] == 0.0
    # A 4th failure during the block counts but starts no new block.
    assert await first.record_failure("client:10.0.0.1", **throttle) is False
    await trio.sleep(BLOCK + 0.05)
    assert await second.blocked_for(["client:10.0.0.1"]) == {"client:10.0.0.1": 0.0}


async def test_failures_outside_the_window_do_not_add_up(pair):
    first, second = pair
    throttle = {"failures": 2, "window": WINDOW, "block": BLOCK}
    assert await first.record_failure("user:k", **throttle) is False
    await trio.sleep(WINDOW + 0.05)
    assert await second.record_failure("user:k", **throttle) is False
    assert await first.record_failure("user:k", **throttle) is True


async def test_failures_during_a_block_count_after_it(pair):
    """FailedLogins keeps counting while blocked: the next block can follow at once."""
    first, second = pair
    throttle = {"failures": 2, "window": 30.0, "block": BLOCK}
    assert await first.record_failure("client:a", **throttle) is False
    assert await first.record_failure("client:a", **throttle) is True
    assert await second.record_failure("client:a", **throttle) is False
    assert await second.record_failure("client:a", **throttle) is False
    await trio.sleep(BLOCK + 0.05)
    assert await first.record_failure("client:a", **throttle) is True


async def test_matches_failed_logins_step_by_step(pair):
    """The same failures, in the same order, as the table policies used in one process."""
    first, second = pair
    reference = FailedLogins()
    start = trio.current_time()
    throttle = {"failures": 3, "window": 0.5, "block": 0.3}
    pauses = [0.0, 0.1, 0.0, 0.2, 0.0, 0.0, 0.35, 0.0, 0.6, 0.0, 0.1, 0.0]
    for step, pause in enumerate(pauses):
        await trio.sleep(pause)
        view = first if step % 2 else second
        expected = reference.failed("user:r", trio.current_time() - start, **throttle)
        assert await view.record_failure("user:r", **throttle) is expected, step
