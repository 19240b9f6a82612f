"""Limits that hold across popguard processes: shared state on a real Redis.

Two real ``popguard serve`` processes (and a ``--workers 2`` one) in front of
the real Dovecot, counting in one real ``redis-server`` started by the test
(tests/sharedstate/redisserver.py).  Witnesses: what each client is told,
the records of both processes, and Redis's own keys.
"""

from __future__ import annotations

import json
import poplib
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import free_loopback_port
from tests.sharedstate.redisserver import RedisServer

REPLY_IN_USE = b"-ERR [IN-USE] Too many sessions for this user"
REPLY_LOGIN_DELAY = b"-ERR [LOGIN-DELAY] Too many failed logins, try again later"
REPLY_SHARED_DOWN = b"-ERR [SYS/TEMP] popguard cannot check its limits now"

POLICY = """\
rules:
  - name: one-session-each
    set:
      max_sessions_per_user: 1
      login_throttle: {failures: 3, window: 300, block: 900, by: [user]}
"""


@pytest.fixture
def redis_server(tmp_path: Path):
    base = tmp_path / "redis"
    base.mkdir()
    with RedisServer(base) as server:
        yield server


def setup(
    tmp_path: Path, url: str, *, on_failure: str = "fail-open", lease: float = 30
) -> list[str]:
    """popguard flags: the policy directory and a config naming the store."""
    policies = tmp_path / "policies"
    policies.mkdir(exist_ok=True)
    (policies / "limits.yaml").write_text(POLICY)
    config = tmp_path / f"popguard-{on_failure}-{lease}.yaml"
    config.write_text(
        "shared_state:\n"
        f"  url: {url}\n"
        f"  on_failure: {on_failure}\n"
        f"  lease_seconds: {lease}\n"
        "  timeout_ms: 300\n"
    )
    return ["--config", str(config), "--policies", str(policies)]


def logged_in(address: tuple[str, int], user: str, password: str) -> poplib.POP3:
    client = poplib.POP3(*address, timeout=30)
    client.user(user)
    client.pass_(password)
    return client


def refused(address: tuple[str, int], user: str, password: str) -> bytes:
    """The -ERR a login gets (the connection is closed after it)."""
    client = poplib.POP3(*address, timeout=30)

    def log_in() -> None:
        client.user(user)
        client.pass_(password)

    try:
        with pytest.raises(poplib.error_proto) as error:
            log_in()
    finally:
        client.close()
    return error.value.args[0]


def metric(port: int, name: str) -> float:
    """One unlabelled sample of a popguard's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return float(sample.value)
    raise AssertionError(f"{name} not in /metrics")


def readiness(port: int) -> tuple[int, bool]:
    """/readyz's status and its shared_state check."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as reply:
            status, body = reply.status, reply.read()
    except urllib.error.HTTPError as error:
        status, body = error.code, error.read()
    return status, json.loads(body)["checks"]["shared_state"]


def live_keys(server: RedisServer) -> dict[str, int]:
    """Every key in the store with its live members (sorted sets) and TTL checked."""
    client = redis.Redis(host="127.0.0.1", port=server.port)
    found = {}
    for key in client.scan_iter("*"):
        assert client.pttl(key) > 0, key  # every key expires
        if client.type(key) == b"zset":
            found[key.decode()] = client.zcard(key)
    client.close()
    return found


def test_one_session_per_user_across_two_processes_and_counts_return_to_zero(
    dovecot, mailbox, make_messages, popguard_process, redis_server, tmp_path
):
    box = mailbox(make_messages(1, seed=171))
    flags = setup(tmp_path, redis_server.url)
    a = popguard_process(*flags)
    b = popguard_process(*flags)
    held = logged_in(a.address, box.user, box.password)
    assert refused(b.address, box.user, box.password).startswith(REPLY_IN_USE)
    assert refused(a.address, box.user, box.password).startswith(REPLY_IN_USE)
    held.quit()
    a.wait_for("session.closed")
    again = logged_in(b.address, box.user, box.password)  # the slot came free
    again.quit()
    b.wait_for("session.closed", count=2)
    deadline = time.monotonic() + 5
    while any(live_keys(redis_server).values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(live_keys(redis_server).values())
    denied = [r for r in b.named("policy.denied") if r["setting"] == "max_sessions_per_user"]
    assert len(denied) == 1


def test_the_fourth_failed_login_through_either_process_is_refused(
    dovecot, mailbox, make_messages, popguard_process, redis_server, tmp_path
):
    box = mailbox(make_messages(1, seed=172))
    flags = setup(tmp_path, redis_server.url)
    a = popguard_process(*flags)
    b = popguard_process(*flags)
    for proxy in (a, b, a):
        reply = refused(proxy.address, box.user, "wrong")
        assert reply.startswith(b"-ERR [AUTH]")  # Dovecot's answer
    # The right password, through either: refused before it reaches Dovecot.
    assert refused(b.address, box.user, box.password).startswith(REPLY_LOGIN_DELAY)
    assert refused(a.address, box.user, box.password).startswith(REPLY_LOGIN_DELAY)
    assert len(a.wait_for("auth.failed", count=2)) == 2
    assert len(b.wait_for("auth.failed")) == 1
    blocked = a.named("policy.login_blocked") + b.named("policy.login_blocked")
    assert len(blocked) == 1


def test_a_killed_process_frees_its_sessions_within_the_lease(
    dovecot, mailbox, make_messages, popguard_process, redis_server, tmp_path
):
    box = mailbox(make_messages(1, seed=173))
    lease = 2.0
    flags = setup(tmp_path, redis_server.url, lease=lease)
    a = popguard_process(*flags)
    b = popguard_process(*flags)
    held = logged_in(a.address, box.user, box.password)  # held open
    assert refused(b.address, box.user, box.password).startswith(REPLY_IN_USE)
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait(10)
    killed_at = time.monotonic()
    while True:
        try:
            client = logged_in(b.address, box.user, box.password)
            break
        except poplib.error_proto as exc:
            reply = exc.args[0]
        assert reply.startswith(REPLY_IN_USE)
        assert time.monotonic() - killed_at < lease + 2, "the slot was not freed in time"
        time.sleep(0.2)
    client.quit()
    held.close()
    assert time.monotonic() - killed_at <= lease + 2


def test_redis_down_each_on_failure_mode_then_back_without_a_restart(
    dovecot, mailbox, make_messages, popguard_process, redis_server, tmp_path
):
    box = mailbox(make_messages(1, seed=174))
    closed = popguard_process(*setup(tmp_path, redis_server.url, on_failure="fail-closed"))
    admin = free_loopback_port()
    opened = popguard_process(
        *setup(tmp_path, redis_server.url, on_failure="fail-open"),
        "--admin-listen",
        f"127.0.0.1:{admin}",
    )
    assert metric(admin, "popguard_shared_state_up") == 1.0
    logged_in(closed.address, box.user, box.password).quit()
    closed.wait_for("session.closed")
    redis_server.stop()
    # fail-closed: new sessions are refused, nothing reaches Dovecot.
    with pytest.raises(poplib.error_proto) as error:
        poplib.POP3(*closed.address, timeout=30)
    assert error.value.args[0].startswith(REPLY_SHARED_DOWN)
    # fail-open: served, counted in the process, and the outage recorded.
    logged_in(opened.address, box.user, box.password).quit()
    assert opened.wait_for("shared_state.unavailable")
    assert metric(admin, "popguard_shared_state_up") == 0.0
    assert metric(admin, "popguard_shared_state_outages_total") == 1.0
    assert readiness(admin) == (503, False)
    redis_server.start()
    deadline = time.monotonic() + 10
    while True:
        try:
            logged_in(closed.address, box.user, box.password).quit()
            break
        except poplib.error_proto:
            assert time.monotonic() < deadline, "no recovery after Redis came back"
            time.sleep(0.2)
    assert closed.wait_for("session.closed", count=2)
    logged_in(opened.address, box.user, box.password).quit()  # the store answers again
    assert metric(admin, "popguard_shared_state_up") == 1.0
    assert readiness(admin) == (200, True)


def test_workers_share_the_limit(
    dovecot, mailbox, make_messages, popguard_process, redis_server, tmp_path
):
    box = mailbox(make_messages(1, seed=175))
    proxy = popguard_process(
        *setup(tmp_path, redis_server.url), "--workers", "2", ready="popguard.workers.ready"
    )
    held = [logged_in(proxy.address, box.user, box.password)]
    # Whichever worker the kernel gives each new connection, the account's
    # one slot is taken.
    for _ in range(6):
        assert refused(proxy.address, box.user, box.password).startswith(REPLY_IN_USE)
    held[0].quit()
