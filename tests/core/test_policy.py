"""Policies in the session core: what is refused, what is recorded, what reaches the server."""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Callable

from popguard.core.records import EndReason
from popguard.policy.model import Match, Mode, PolicySet, Rule, Throttle
from popguard.policy.session import PolicyHolder, PolicyShared, SessionPolicy

from .transcript import C, ClientEof, Expect, S, play, run_all_modes

GREETING = b"+OK ready <1.2@x>\r\n"
MODES = ("whole", "bytewise", "pipelined")


def rule(name: str, mode: Mode = "enforce", match: Match | None = None, **settings: object) -> Rule:
    return Rule(name, "policies/test.yaml", 1, match or Match(), mode, settings)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def shared(*rules: Rule, clock: Clock | None = None) -> PolicyShared:
    return PolicyShared(PolicyHolder(PolicySet(rules)), clock or Clock())


def factory(state: PolicyShared, client: str = "192.0.2.7") -> Callable[[], SessionPolicy]:
    def make() -> SessionPolicy:
        policy = SessionPolicy(
            state,
            peer=f"{client}:40000",
            client=ipaddress.ip_address(client),
            listener="test",
        )
        assert policy.check_connect() is None
        return policy

    return make


ALICE_READ_ONLY = rule("alice-read-only", match=Match(users=("alice",)), deny_commands=("DELE",))


def test_denied_command_is_answered_locally_and_never_forwarded() -> None:
    steps = [
        S(GREETING),
        C(b"USER alice\r\n"),
        S(b"+OK\r\n"),
        C(b"PASS pw\r\n"),
        S(b"+OK logged in\r\n"),
        C(b"DELE 1\r\n"),
        C(b"NOOP\r\n"),
        S(b"+OK\r\n"),
    ]
    out = run_all_modes(
        steps,
        Expect(
            upstream=b"USER alice\r\nPASS pw\r\nNOOP\r\n",
            client=GREETING
            + b"+OK\r\n+OK logged in\r\n-ERR [SYS/PERM] DELE is not permitted by policy\r\n+OK\r\n",
        ),
        modes=MODES,
        policy=factory(shared(ALICE_READ_ONLY)),
    )
    denied = out.record("policy.denied")
    assert denied["rule"] == "alice-read-only"
    assert denied["policy_file"] == "policies/test.yaml:1"
    assert (denied["command"], denied["setting"], denied["user"]) == (
        "DELE",
        "deny_commands",
        "alice",
    )
    assert "dele.marked" not in out.events()


def test_other_users_are_not_affected() -> None:
    steps = [S(GREETING), C(b"USER bob\r\nPASS pw\r\nDELE 1\r\n"), S(b"+OK\r\n+OK\r\n+OK\r\n")]
    out = play(steps, policy=factory(shared(ALICE_READ_ONLY)))
    assert out.upstream == b"USER bob\r\nPASS pw\r\nDELE 1\r\n"
    assert "policy.denied" not in out.events()


def test_commands_pipelined_behind_pass_wait_for_the_login() -> None:
    # One packet: without the hold, DELE would be forwarded before popguard
    # knew that alice logged in, and her policy would not apply to it.
    steps = [
        S(GREETING),
        C(b"USER alice\r\nPASS pw\r\nDELE 1\r\nQUIT\r\n"),
        S(b"+OK\r\n"),
        S(b"+OK logged in\r\n"),
        S(b"+OK bye\r\n"),
    ]
    out = run_all_modes(
        steps,
        Expect(
            upstream=b"USER alice\r\nPASS pw\r\nQUIT\r\n",
            client=GREETING
            + b"+OK\r\n+OK logged in\r\n-ERR [SYS/PERM] DELE is not permitted by policy\r\n"
            + b"+OK bye\r\n",
        ),
        modes=("whole", "bytewise"),
        policy=factory(shared(ALICE_READ_ONLY)),
    )
    assert out.record("policy.denied")["command"] == "DELE"


def test_without_rules_commands_behind_a_login_still_wait_for_it() -> None:
    # Not for policies (there are none) but for identity: a login whose
    # account popguard cannot tell must end before anything behind it ran.
    steps = [S(GREETING), C(b"USER alice\r\nPASS pw\r\nSTAT\r\n")]
    out = play(steps, policy=factory(shared()))
    assert out.upstream == b"USER alice\r\nPASS pw\r\n"
    out.session.receive_server(b"+OK\r\n+OK\r\n")
    assert out.session.take_upstream_output() == b"STAT\r\n"


def test_dry_run_forwards_and_records_what_would_be_denied() -> None:
    dry = rule("try-read-only", "dry-run", Match(users=("alice",)), deny_commands=("DELE",))
    steps = [
        S(GREETING),
        C(b"USER alice\r\nPASS pw\r\n"),
        S(b"+OK\r\n+OK\r\n"),
        C(b"DELE 1\r\n"),
        S(b"+OK marked\r\n"),
    ]
    out = run_all_modes(
        steps,
        Expect(upstream=b"USER alice\r\nPASS pw\r\nDELE 1\r\n"),
        modes=("whole", "bytewise"),
        policy=factory(shared(dry)),
    )
    record = out.record("policy.dry_run")
    assert (record["mode"], record["command"]) == ("dry-run", "DELE")
    assert "dele.marked" in out.events()
    assert "policy.denied" not in out.events()


def test_disallowed_mechanism_sends_neither_user_nor_password() -> None:
    only_plain = rule("sasl-only", auth_mechanisms=("PLAIN",))
    steps = [S(GREETING), C(b"USER alice\r\n"), C(b"PASS secret\r\n"), C(b"CAPA\r\n")]
    out = run_all_modes(
        steps,
        Expect(
            upstream=b"CAPA\r\n",
            client=GREETING + b"-ERR [AUTH] USER is not allowed here\r\n" * 2,
        ),
        modes=("whole", "bytewise"),
        policy=factory(shared(only_plain)),
    )
    assert out.record("policy.denied")["setting"] == "auth_mechanisms"
    assert b"secret" not in out.upstream


def test_allowed_mechanism_passes() -> None:
    only_plain = rule("sasl-only", auth_mechanisms=("PLAIN",))
    initial = base64.b64encode(b"\0alice\0pw")
    steps = [S(GREETING), C(b"AUTH PLAIN " + initial + b"\r\n"), S(b"+OK\r\n")]
    out = play(steps, policy=factory(shared(only_plain)))
    assert out.upstream == b"AUTH PLAIN " + initial + b"\r\n"
    assert out.record("auth.succeeded")["user"] == "alice"


def failed_login(state: PolicyShared, user: bytes = b"alice") -> bytes:
    steps = [S(GREETING), C(b"USER " + user + b"\r\nPASS bad\r\n"), S(b"+OK\r\n-ERR nope\r\n")]
    return play(steps, policy=factory(state)).upstream


def test_failed_logins_block_the_client_without_hitting_the_server() -> None:
    clock = Clock()
    throttle = Throttle(failures=2, window=60, block=300, by=("client",))
    state = shared(rule("throttle", login_throttle=throttle), clock=clock)
    assert failed_login(state) == b"USER alice\r\nPASS bad\r\n"
    second = play(
        [S(GREETING), C(b"USER alice\r\nPASS bad\r\n"), S(b"+OK\r\n-ERR nope\r\n")],
        policy=factory(state),
    )
    blocked = second.record("policy.login_blocked")
    assert (blocked["key"], blocked["seconds"]) == ("client:192.0.2.7", 300)

    # A blocked client is refused when it connects, before any upstream.
    third = SessionPolicy(
        state, peer="192.0.2.7:40001", client=ipaddress.ip_address("192.0.2.7"), listener="test"
    )
    verdict = third.check_connect()
    assert verdict is not None
    assert verdict.reply == b"-ERR [LOGIN-DELAY] Too many failed logins, try again later\r\n"

    # Another client is not blocked; after the block, this one is not either.
    other = play([S(GREETING), C(b"USER bob\r\n")], policy=factory(state, "192.0.2.8"))
    assert other.upstream == b"USER bob\r\n"
    clock.now += 301
    later = play([S(GREETING), C(b"USER bob\r\n")], policy=factory(state))
    assert later.upstream == b"USER bob\r\n"


def test_failures_outside_the_window_do_not_add_up() -> None:
    clock = Clock()
    throttle = Throttle(failures=2, window=60, block=300, by=("user",))
    state = shared(rule("throttle", login_throttle=throttle), clock=clock)
    failed_login(state)
    clock.now += 61
    failed_login(state)
    assert failed_login(state, b"alice")  # still reaches the server...
    nxt = play([S(GREETING), C(b"USER alice\r\n")], policy=factory(state))
    assert nxt.upstream == b""  # ...but that was the second within 60 s: blocked
    bob = play([S(GREETING), C(b"USER bob\r\n")], policy=factory(state))
    assert bob.upstream == b"USER bob\r\n"  # by user only: the address is fine


def test_user_blocked_in_a_sasl_exchange_is_cancelled_upstream() -> None:
    throttle = Throttle(failures=1, window=60, block=300, by=("user",))
    state = shared(rule("throttle", login_throttle=throttle))
    failed_login(state)
    user = base64.b64encode(b"alice")
    steps = [
        S(GREETING),
        C(b"AUTH LOGIN\r\n"),
        S(b"+ VXNlcm5hbWU6\r\n"),
        C(user + b"\r\n"),
        S(b"-ERR cancelled\r\n"),
    ]
    out = run_all_modes(
        steps,
        Expect(
            upstream=b"AUTH LOGIN\r\n*\r\n",
            client=GREETING
            + b"+ VXNlcm5hbWU6\r\n-ERR [LOGIN-DELAY] Too many failed logins, try again later\r\n",
        ),
        modes=("whole", "bytewise"),
        policy=lambda: factory(state)(),
    )
    assert "auth.failed" not in out.events()  # a refusal, not a failed login


def test_sessions_per_user_limit() -> None:
    state = shared(rule("one-each", max_sessions_per_user=1))
    first = play(
        [S(GREETING), C(b"USER alice\r\nPASS pw\r\n"), S(b"+OK\r\n+OK\r\n")], policy=factory(state)
    )
    assert first.session.state.value == "TRANSACTION"
    initial = base64.b64encode(b"\0alice\0pw")
    second = play([S(GREETING), C(b"AUTH PLAIN " + initial + b"\r\n")], policy=factory(state))
    assert second.upstream == b""
    assert second.client == GREETING + b"-ERR [IN-USE] Too many sessions for this user\r\n"
    # Once the first session ends, alice may log in again.
    assert first.session.policy is not None
    first.session.policy.closed()
    third = play([S(GREETING), C(b"USER alice\r\n")], policy=factory(state))
    assert third.upstream == b"USER alice\r\n"


def test_limit_reached_at_login_ends_the_session_without_quit() -> None:
    # Two sessions claim alice at once; both pass the claim check.  The
    # first to log in counts; the second's +OK becomes the policy's -ERR,
    # and the session ends with no QUIT for the server.
    state = shared(rule("one-each", max_sessions_per_user=1))
    steps = [S(GREETING), C(b"USER alice\r\nPASS pw\r\n"), S(b"+OK\r\n")]
    first = play(steps, policy=factory(state))
    second = play(steps, policy=factory(state))
    for out in (first, second):
        assert out.upstream == b"USER alice\r\nPASS pw\r\n"
    first.session.receive_server(b"+OK logged in\r\n")
    assert first.session.take_client_output() == b"+OK logged in\r\n"
    second.session.receive_server(b"+OK logged in\r\n")
    assert second.session.take_client_output() == (
        b"-ERR [IN-USE] Too many sessions for this user\r\n"
    )
    assert second.session.finished
    assert second.session.end_reason is EndReason.POLICY_DENIED
    assert second.session.take_upstream_output() == b""
    events = [r.event.value for r in second.session.take_records()]
    assert events == ["auth.succeeded", "policy.denied", "session.closed"]


def test_rule_on_the_authenticated_user_refuses_at_login() -> None:
    deny = rule("no-bob", match=Match(users=("bob",)), access="deny")
    steps = [S(GREETING), C(b"USER bob\r\nPASS pw\r\n"), S(b"+OK\r\n+OK in\r\n")]
    out = run_all_modes(
        steps,
        Expect(
            upstream=b"USER bob\r\nPASS pw\r\n",
            client=GREETING + b"+OK\r\n-ERR [SYS/PERM] Access denied by policy\r\n",
            end_reason=EndReason.POLICY_DENIED,
        ),
        modes=("whole", "bytewise"),
        policy=factory(shared(deny)),
    )
    assert out.record("policy.denied")["setting"] == "access"


def test_access_denied_for_a_claimed_user_from_a_network() -> None:
    deny = rule(
        "no-admin-from-outside",
        match=Match(claimed_users=("admin",), clients=(ipaddress.ip_network("192.0.2.0/24"),)),
        access="deny",
    )
    out = play([S(GREETING), C(b"USER admin\r\nPASS pw\r\n")], policy=factory(shared(deny)))
    assert out.upstream == b""
    assert out.client == GREETING + b"-ERR [SYS/PERM] Access denied by policy\r\n" * 2
    ok = play([S(GREETING), C(b"USER admin\r\n")], policy=factory(shared(deny), "198.51.100.9"))
    assert ok.upstream == b"USER admin\r\n"


def test_quit_is_never_denied() -> None:
    everything = rule("lockdown", deny_commands=("STAT", "LIST", "RETR", "DELE", "NOOP", "RSET"))
    steps = [S(GREETING), C(b"QUIT\r\n"), S(b"+OK bye\r\n")]
    out = play(steps, policy=factory(shared(everything)))
    assert out.upstream == b"QUIT\r\n"
    assert out.session.end_reason is EndReason.QUIT


def test_half_closed_client_gets_every_held_command_answered() -> None:
    # A script that pipelines everything and half-closes: the lines held
    # behind PASS are still answered after the login reply.
    steps = [
        S(GREETING),
        C(b"USER alice\r\nPASS pw\r\nDELE 1\r\nQUIT\r\n"),
        ClientEof(),
        S(b"+OK\r\n+OK in\r\n"),
        S(b"+OK bye\r\n"),
    ]
    out = run_all_modes(
        steps,
        Expect(
            upstream=b"USER alice\r\nPASS pw\r\nQUIT\r\n",
            client=GREETING
            + b"+OK\r\n+OK in\r\n-ERR [SYS/PERM] DELE is not permitted by policy\r\n+OK bye\r\n",
            end_reason=EndReason.QUIT,
        ),
        modes=("whole", "bytewise"),
        policy=factory(shared(ALICE_READ_ONLY)),
    )
    assert out.record("policy.denied")["command"] == "DELE"


def test_sessions_opened_without_rules_count_against_limits_a_reload_brings() -> None:
    # With no rules every check is skipped, but sessions and logins still
    # count, so a limit loaded later sees the sessions already open.
    state = shared()
    first = play(
        [S(GREETING), C(b"USER alice\r\nPASS pw\r\n"), S(b"+OK\r\n+OK\r\n")], policy=factory(state)
    )
    assert first.session.state.value == "TRANSACTION"
    assert state.counts.total == 1
    state.holder.replace(PolicySet((rule("one-each", max_sessions_per_user=1),)))
    second = play([S(GREETING), C(b"USER alice\r\n")], policy=factory(state))
    assert second.upstream == b""
    assert second.client == GREETING + b"-ERR [IN-USE] Too many sessions for this user\r\n"
