"""Policy timers (``idle_timeout``, ``max_session``) in the trio shell.

Memory streams and trio's autojump clock, as in ``test_relay.py``: the
test plays both the POP3 client and the upstream server, and virtual time
makes "exactly at the configured time" an exact assertion.  The Relay runs
with a :class:`SessionPolicy` over a :class:`PolicyHolder`, as the server
wires it; a reload is ``holder.replace`` + ``relay.rearm`` (what
``ProxyServer.reload_policies`` does), and once through
``ProxyServer.reload_policies`` itself.
"""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing

from popguard.audit import AuditLog
from popguard.core.records import AuditRecord
from popguard.core.replies import REPLY_IDLE, REPLY_MAX_SESSION
from popguard.core.session import ProxySession
from popguard.policy.model import Match, PolicySet, Rule
from popguard.policy.session import PolicyHolder, PolicyShared, SessionPolicy
from popguard.shell.relay import Relay
from popguard.shell.server import Endpoint, LiveSession, ProxyServer, ServerSettings
from tests.shell.test_relay import recv_all, recv_until

GREETING = b"+OK ready <1.2@test>\r\n"
POLICY_FILE = "policies/50-timers.yaml"
CLIENT = "192.0.2.1"


def rule(name: str, mode: str = "enforce", match: Match | None = None, **settings: Any) -> Rule:
    return Rule(name, POLICY_FILE, 4, match or Match(), mode, settings)  # type: ignore[arg-type]


def policies(*rules: Rule) -> PolicySet:
    return PolicySet(rules, source="policies")


ALICE = Match(users=("alice",))


@dataclass
class Rig:
    client: trio.abc.Stream  # the test's end, playing the POP3 client
    server: trio.abc.Stream  # the test's end, playing the upstream server
    relay: Relay
    holder: PolicyHolder
    shared: PolicyShared
    records: list[AuditRecord] = field(default_factory=list)
    done: trio.Event = field(default_factory=trio.Event)
    started: float = 0.0

    def events(self) -> list[str]:
        return [r.event.value for r in self.records]

    def named(self, name: str) -> list[AuditRecord]:
        return [r for r in self.records if r.event.value == name]

    def record(self, name: str) -> AuditRecord:
        found = self.named(name)
        assert len(found) == 1, self.events()
        return found[0]

    def reload(self, new: PolicySet) -> None:
        """What ProxyServer.reload_policies does for one open session."""
        self.holder.replace(new)
        self.relay.rearm()


@asynccontextmanager
async def rig(rules: PolicySet, *, idle_timeout: float = 600.0) -> AsyncIterator[Rig]:
    client_test, client_proxy = trio.testing.memory_stream_pair()
    upstream_proxy, server_test = trio.testing.memory_stream_pair()
    records: list[AuditRecord] = []
    holder = PolicyHolder(rules)
    shared = PolicyShared(holder, trio.current_time)
    policy = SessionPolicy(
        shared,
        peer=f"{CLIENT}:5000",
        client=ipaddress.ip_address(CLIENT),
        listener="mem",
    )
    assert policy.check_connect() is None

    async def connect_upstream() -> trio.abc.Stream:
        return upstream_proxy

    session = ProxySession(client=f"{CLIENT}:5000", listener="mem", policy=policy)
    relay = Relay(
        session,
        client_proxy,
        connect_upstream=connect_upstream,
        upstream_label="mem-upstream",
        connect_timeout=10,
        idle_timeout=idle_timeout,
        emit=records.append,
        policy=policy,
    )
    r = Rig(client_test, server_test, relay, holder, shared, records)

    async def run() -> None:
        try:
            await relay.run()
        finally:
            policy.closed()
            r.done.set()

    async with trio.open_nursery() as nursery:
        r.started = trio.current_time()
        nursery.start_soon(run)
        yield r
        with trio.fail_after(30):
            await r.done.wait()
    assert shared.counts.total == 0


async def greet(r: Rig) -> None:
    await r.server.send_all(GREETING)
    assert await recv_until(r.client, b"\r\n") == GREETING


async def login(r: Rig, user: str = "alice") -> None:
    await r.client.send_all(b"USER %s\r\nPASS pw\r\n" % user.encode())
    sent = b"USER %s\r\nPASS pw\r\n" % user.encode()
    assert await recv_until(r.server, b"PASS pw\r\n") == sent
    await r.server.send_all(b"+OK\r\n+OK Logged in.\r\n")
    assert await recv_until(r.client, b"Logged in.\r\n") == b"+OK\r\n+OK Logged in.\r\n"


async def mark(r: Rig, n: int = 1) -> None:
    await r.client.send_all(b"DELE %d\r\n" % n)
    assert await recv_until(r.server, b"\r\n") == b"DELE %d\r\n" % n
    await r.server.send_all(b"+OK\r\n")
    assert await recv_until(r.client, b"\r\n") == b"+OK\r\n"


async def noop(r: Rig) -> None:
    await r.client.send_all(b"NOOP\r\n")
    assert await recv_until(r.server, b"\r\n") == b"NOOP\r\n"
    await r.server.send_all(b"+OK\r\n")
    assert await recv_until(r.client, b"\r\n") == b"+OK\r\n"


def assert_policy_record(
    record: AuditRecord, *, rule_name: str, setting: str, mode: str = "enforce"
) -> None:
    assert dict(record.fields) == {
        "rule": rule_name,
        "policy_file": f"{POLICY_FILE}:4",
        "setting": setting,
        "mode": mode,
        "reason": f"{setting} reached",
        "user": record.fields.get("user"),
    }


# -- idle_timeout --------------------------------------------------------------


async def test_policy_idle_timeout_after_login_closes_at_exactly_its_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A user's shorter idle_timeout: the server default until login, then the rule's."""
    rules = policies(rule("alice-short", match=ALICE, idle_timeout=90))
    async with rig(rules, idle_timeout=600) as r:
        await greet(r)
        # Before login the rule (matching on user) does not apply: 200 s of
        # silence are well within the server's 600 s.
        await trio.sleep(200)
        assert not r.relay.session.finished
        await login(r)
        await mark(r, 1)
        await mark(r, 3)
        last_activity = trio.current_time()
        assert await recv_all(r.client, limit=1000) == REPLY_IDLE
        assert trio.current_time() - last_activity == pytest.approx(90, abs=1e-6)
        assert await recv_all(r.server) == b""  # EOF, and never a QUIT
    denied = r.record("policy.denied")
    assert_policy_record(denied, rule_name="alice-short", setting="idle_timeout")
    assert denied["user"] == "alice"
    discarded = r.record("deletions.discarded")
    assert discarded["reason"] == "idle_timeout"
    assert discarded["messages"] == ({"msg": 1}, {"msg": 3})
    assert r.record("session.closed")["reason"] == "idle_timeout"
    assert "deletions.committed" not in r.events()
    # The denial is recorded before the close that it caused.
    assert r.events().index("policy.denied") < r.events().index("session.closed")


async def test_policy_idle_timeout_longer_than_the_default_wins_after_login(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rules = policies(rule("alice-long", match=ALICE, idle_timeout=900))
    async with rig(rules, idle_timeout=600) as r:
        await greet(r)
        await login(r)
        last_activity = trio.current_time()
        await trio.sleep(700)  # past the server default: still open
        assert not r.relay.session.finished
        assert await recv_all(r.client, limit=1000) == REPLY_IDLE
        assert trio.current_time() - last_activity == pytest.approx(900, abs=1e-6)
    assert r.record("policy.denied")["setting"] == "idle_timeout"


async def test_server_default_applies_before_login_when_the_rule_needs_a_user(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rules = policies(rule("alice-short", match=ALICE, idle_timeout=30))
    async with rig(rules, idle_timeout=100) as r:
        await greet(r)
        greeted = trio.current_time()
        assert await recv_all(r.client, limit=1000) == REPLY_IDLE
        assert trio.current_time() - greeted == pytest.approx(100, abs=1e-6)
        assert await recv_all(r.server) == b""
    assert r.named("policy.denied") == []  # popguard's own timer, not the rule's
    assert r.record("session.closed")["reason"] == "idle_timeout"


async def test_client_rule_idle_timeout_applies_from_connect(
    autojump_clock: trio.testing.MockClock,
) -> None:
    match = Match(clients=(ipaddress.ip_network("192.0.2.0/24"),))
    rules = policies(rule("lan-short", match=match, idle_timeout=45))
    async with rig(rules, idle_timeout=600) as r:
        await greet(r)
        assert await recv_all(r.client, limit=1000) == REPLY_IDLE
        assert trio.current_time() - r.started == pytest.approx(45, abs=1e-6)
    denied = r.record("policy.denied")
    assert_policy_record(denied, rule_name="lan-short", setting="idle_timeout")
    assert denied["user"] is None


async def test_activity_restarts_the_policy_idle_timer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rules = policies(rule("short", idle_timeout=60))
    async with rig(rules) as r:
        await greet(r)
        await login(r)
        for _ in range(5):
            await trio.sleep(50)
            await noop(r)
        last_activity = trio.current_time()
        assert await recv_all(r.client, limit=1000) == REPLY_IDLE
        assert trio.current_time() - last_activity == pytest.approx(60, abs=1e-6)
    assert len(r.named("policy.denied")) == 1


# -- max_session -----------------------------------------------------------------


async def test_max_session_ends_a_busy_session_at_its_limit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rules = policies(rule("cap", max_session=300))
    async with rig(rules, idle_timeout=600) as r:
        await greet(r)
        await login(r)
        await mark(r, 2)
        while trio.current_time() - r.started < 260:
            await trio.sleep(40)
            await noop(r)  # never idle
        assert not r.relay.session.finished
        assert await recv_all(r.client, limit=1000) == REPLY_MAX_SESSION
        assert trio.current_time() - r.started == pytest.approx(300, abs=1e-6)
        assert await recv_all(r.server) == b""  # no QUIT
    assert_policy_record(r.record("policy.denied"), rule_name="cap", setting="max_session")
    assert r.record("deletions.discarded")["reason"] == "max_session"
    assert r.record("session.closed")["reason"] == "max_session"


async def test_max_session_of_a_user_rule_counts_from_the_session_start(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rules = policies(rule("alice-cap", match=ALICE, max_session=120))
    async with rig(rules) as r:
        await greet(r)
        await trio.sleep(100)  # the rule does not match yet: nothing ends at 120
        await login(r)
        # Logged in at 100 s: the limit counts from the start, so 20 s are left.
        assert await recv_all(r.client, limit=1000) == REPLY_MAX_SESSION
        assert trio.current_time() - r.started == pytest.approx(120, abs=1e-6)
    assert r.record("policy.denied")["user"] == "alice"


# -- dry-run timers ----------------------------------------------------------------


async def test_dry_run_idle_timeout_is_recorded_once_and_does_not_close(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rules = policies(rule("try-short-idle", "dry-run", idle_timeout=30))
    async with rig(rules, idle_timeout=120) as r:
        await greet(r)
        await login(r)
        await mark(r, 1)
        await trio.sleep(35)
        assert not r.relay.session.finished
        (dry,) = r.named("policy.dry_run")
        assert_policy_record(
            dry, rule_name="try-short-idle", setting="idle_timeout", mode="dry-run"
        )
        assert dry["user"] == "alice"
        await noop(r)
        await trio.sleep(60)  # idle past 30 s again: not recorded a second time
        assert len(r.named("policy.dry_run")) == 1
        await noop(r)
        last_activity = trio.current_time()
        # The server's own idle timer still applies, and only it closes.
        assert await recv_all(r.client, limit=1000) == REPLY_IDLE
        assert trio.current_time() - last_activity == pytest.approx(120, abs=1e-6)
        assert await recv_all(r.server) == b""
    assert r.named("policy.denied") == []
    assert len(r.named("policy.dry_run")) == 1
    assert r.record("session.closed")["reason"] == "idle_timeout"
    assert r.record("deletions.discarded")["reason"] == "idle_timeout"


async def test_dry_run_max_session_is_recorded_and_the_session_goes_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rules = policies(rule("try-cap", "dry-run", max_session=60))
    async with rig(rules, idle_timeout=100) as r:
        await greet(r)
        await login(r)
        while trio.current_time() - r.started < 300:
            await trio.sleep(50)
            await noop(r)
        assert not r.relay.session.finished
        (dry,) = r.named("policy.dry_run")
        assert_policy_record(dry, rule_name="try-cap", setting="max_session", mode="dry-run")
        await r.client.send_all(b"QUIT\r\n")
        assert await recv_until(r.server, b"\r\n") == b"QUIT\r\n"
        await r.server.send_all(b"+OK bye\r\n")
        assert await recv_all(r.client) == b"+OK bye\r\n"
    assert r.record("session.closed")["reason"] == "quit"
    assert r.named("policy.denied") == []


# -- reload --------------------------------------------------------------------------


async def test_reload_shortening_idle_timeout_applies_to_an_open_session(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with rig(policies(rule("idle", idle_timeout=500)), idle_timeout=600) as r:
        await greet(r)
        await login(r)
        last_activity = trio.current_time()
        await trio.sleep(100)
        r.reload(policies(rule("idle-shorter", idle_timeout=250)))
        # Counted from the last activity with the new value: 150 s more.
        assert await recv_all(r.client, limit=1000) == REPLY_IDLE
        assert trio.current_time() - last_activity == pytest.approx(250, abs=1e-6)
    assert r.record("policy.denied")["rule"] == "idle-shorter"


async def test_reload_below_the_time_already_idle_ends_the_session_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with rig(policies(rule("no-dele", deny_commands=("DELE",))), idle_timeout=600) as r:
        await greet(r)
        await login(r)
        await trio.sleep(100)
        reloaded_at = trio.current_time()
        r.reload(policies(rule("idle-50", idle_timeout=50)))
        assert await recv_all(r.client, limit=1000) == REPLY_IDLE
        assert trio.current_time() == pytest.approx(reloaded_at, abs=1e-6)
    assert_policy_record(r.record("policy.denied"), rule_name="idle-50", setting="idle_timeout")


async def test_reload_lengthening_or_removing_timers_keeps_the_session_open(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with rig(policies(rule("short", idle_timeout=60, max_session=100))) as r:
        await greet(r)
        await login(r)
        await trio.sleep(30)
        r.reload(policies(rule("long", idle_timeout=1000)))  # and no max_session
        await trio.sleep(200)
        assert not r.relay.session.finished
        r.reload(policies())  # no rules: popguard's own 600 s
        last_activity = r.started
        assert await recv_all(r.client, limit=2000) == REPLY_IDLE
        assert trio.current_time() - last_activity == pytest.approx(600, abs=1e-6)
    assert r.named("policy.denied") == []


async def test_reload_lowering_max_session_ends_sessions_already_past_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with rig(policies(rule("cap", max_session=1000))) as r:
        await greet(r)
        await login(r)
        for _ in range(4):
            await trio.sleep(50)
            await noop(r)
        r.reload(policies(rule("cap-150", max_session=150)))
        assert await recv_all(r.client, limit=1000) == REPLY_MAX_SESSION
        assert trio.current_time() - r.started == pytest.approx(200, abs=1e-6)
    assert r.record("policy.denied")["rule"] == "cap-150"


async def test_server_reload_policies_rearms_open_sessions_and_keeps_the_old_set_on_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    audit_events: list[dict[str, Any]] = []

    class Sink:
        def write(self, event: Any) -> None:
            audit_events.append(dict(event))

        def close(self) -> None:
            pass

    loads: list[PolicySet | Exception] = [
        ValueError("policies/bad.yaml:1:1: error: broken"),
        policies(rule("idle-40", idle_timeout=40)),
    ]

    def loader() -> PolicySet:
        item = loads.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    async with rig(policies(rule("idle-300", idle_timeout=300))) as r:
        settings = ServerSettings(listeners=(), upstream=Endpoint("127.0.0.1", 1))
        server = ProxyServer(settings, AuditLog([Sink()]), policies=r.shared, policy_loader=loader)
        # As if ProxyServer had accepted this session.
        server._sessions["0" * 16] = LiveSession({}, r.relay)
        await greet(r)
        await login(r)
        last_activity = trio.current_time()
        await trio.sleep(20)
        assert not server.reload_policies()  # invalid: idle-300 stays
        await trio.sleep(50)
        assert not r.relay.session.finished
        assert r.holder.current.rules[0].name == "idle-300"
        assert server.reload_policies()
        # 70 s idle > 40 s: the new timer ends the session at once.
        assert await recv_all(r.client, limit=1000) == REPLY_IDLE
        assert trio.current_time() - last_activity == pytest.approx(70, abs=1e-6)
        del server._sessions["0" * 16]
    names = [e["event"] for e in audit_events]
    assert names == ["policy.reload_failed", "policy.reloaded"]
    assert audit_events[0]["errors"] == ["policies/bad.yaml:1:1: error: broken"]
    assert r.record("policy.denied")["rule"] == "idle-40"


async def test_claimed_user_idle_timeout_and_its_record_agree(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rules = policies(rule("named-short", match=Match(claimed_users=("alice",)), idle_timeout=30))
    async with rig(rules, idle_timeout=600) as r:
        await greet(r)
        await r.client.send_all(b"USER alice\r\n")
        assert await recv_until(r.server, b"\r\n") == b"USER alice\r\n"
        await r.server.send_all(b"+OK\r\n")
        assert await recv_until(r.client, b"\r\n") == b"+OK\r\n"
        last_activity = trio.current_time()
        assert await recv_all(r.client, limit=1000) == REPLY_IDLE
        elapsed = trio.current_time() - last_activity
    denied = [(d["rule"], d["setting"]) for d in r.named("policy.denied")]
    # Either the rule's timer closed the session (and the record says so),
    # or popguard's own did (and no rule is blamed); not a mix of the two.
    assert (
        elapsed == pytest.approx(30, abs=1e-6) and denied == [("named-short", "idle_timeout")]
    ) or (elapsed == pytest.approx(600, abs=1e-6) and denied == []), (elapsed, denied)
