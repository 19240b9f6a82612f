"""With shared state, a line that names an account waits for the shell's verdict.

The core cannot ask a store itself (no I/O): it parks the USER, the APOP,
the AUTH whose initial response names the account, or the SASL response
that names it, and offers the account as ``pending_claim``.  The shell's
answer (``claim_result``) then plays exactly the part the in-process
``claim`` plays.  Nothing behind the parked line reaches the server before.
"""

from __future__ import annotations

import base64
import ipaddress

from popguard.core.records import EndReason, Event
from popguard.policy.model import Match, PolicySet, Rule
from popguard.policy.session import (
    REPLY_TOO_MANY_SESSIONS,
    PolicyHolder,
    PolicyShared,
    SessionPolicy,
    Verdict,
)

from .transcript import new_session

GREETING = b"+OK ready <1.2@x>\r\n"
LIMIT = Rule("one-each", "policies/test.yaml", 3, Match(), "enforce", {"max_sessions_per_user": 1})
TRIAL = Rule("trial", "policies/test.yaml", 9, Match(), "dry-run", {"max_sessions_per_user": 1})


def shared_policy(*rules: Rule) -> SessionPolicy:
    state = PolicyShared(PolicyHolder(PolicySet(rules)), lambda: 1000.0, shared_state=True)
    return SessionPolicy(
        state, peer="192.0.2.7:40000", client=ipaddress.ip_address("192.0.2.7"), listener="t"
    )


def too_many(rule: Rule = LIMIT) -> Verdict:
    return Verdict("max_sessions_per_user", rule, REPLY_TOO_MANY_SESSIONS, "too many")


def greeted(*rules: Rule, identity: bool = False):  # type: ignore[no-untyped-def]
    policy = shared_policy(*(rules or (LIMIT,)))
    session = new_session(policy=lambda: policy, message_identity=identity)
    session.receive_server(GREETING)
    session.take_client_output()
    return session, policy


def test_user_waits_for_the_verdict_and_so_does_everything_behind_it() -> None:
    session, _ = greeted()
    session.receive_client(b"USER Alice\r\nPASS pw\r\nSTAT\r\n")
    assert session.take_upstream_output() == b""
    assert session.pending_claim == "alice"  # the account, canonical
    session.claim_result(None)
    assert session.pending_claim is None
    assert session.take_upstream_output() == b"USER Alice\r\nPASS pw\r\n"


def test_an_enforced_verdict_refuses_the_user_and_the_pass_behind_it() -> None:
    session, _ = greeted()
    session.receive_client(b"USER alice\r\nPASS secret\r\n")
    session.claim_result(too_many())
    assert session.take_upstream_output() == b""  # no name, no password upstream
    out = session.take_client_output()
    assert out.startswith(REPLY_TOO_MANY_SESSIONS)
    assert out.count(b"-ERR") == 2
    records = session.take_records()
    denied = [r for r in records if r.event is Event.POLICY_DENIED]
    assert [r["setting"] for r in denied] == ["max_sessions_per_user"]
    assert all(b"secret" not in repr(r.fields).encode() for r in records)


def test_a_dry_run_verdict_is_recorded_and_the_line_goes_on() -> None:
    session, _ = greeted(TRIAL)
    session.receive_client(b"USER alice\r\n")
    session.claim_result(too_many(TRIAL))
    assert session.take_upstream_output() == b"USER alice\r\n"
    dry = [r for r in session.take_records() if r.event is Event.POLICY_DRY_RUN]
    assert [r["rule"] for r in dry] == ["trial"]


def test_apop_is_parked_whole() -> None:
    session, _ = greeted()
    session.receive_client(b"APOP bob c4c9334bac560ecc979e58001b3e22fb\r\n")
    assert session.take_upstream_output() == b""
    assert session.pending_claim == "bob"
    session.claim_result(None)
    assert session.take_upstream_output().startswith(b"APOP bob ")


def test_auth_plain_with_an_initial_response_is_parked() -> None:
    session, _ = greeted()
    response = base64.b64encode(b"\0carol\0pw")
    session.receive_client(b"AUTH PLAIN " + response + b"\r\n")
    assert session.take_upstream_output() == b""
    assert session.pending_claim == "carol"
    session.claim_result(too_many())
    assert session.take_upstream_output() == b""
    assert session.take_client_output() == REPLY_TOO_MANY_SESSIONS


def test_the_sasl_response_that_names_the_account_is_parked_then_cancelled() -> None:
    session, _ = greeted()
    session.receive_client(b"AUTH LOGIN\r\n")
    assert session.take_upstream_output() == b"AUTH LOGIN\r\n"
    session.receive_server(b"+ VXNlcm5hbWU6\r\n")  # Username:
    session.receive_client(base64.b64encode(b"dave") + b"\r\n")
    assert session.take_upstream_output() == b""
    assert session.pending_claim == "dave"
    session.claim_result(too_many())
    assert session.take_upstream_output() == b"*\r\n"  # cancelled: no password asked for
    session.receive_server(b"-ERR cancelled\r\n")
    assert session.take_client_output().endswith(REPLY_TOO_MANY_SESSIONS)


def test_without_rules_nothing_is_parked() -> None:
    policy = shared_policy()
    session = new_session(policy=lambda: policy)
    session.receive_server(GREETING)
    session.receive_client(b"USER alice\r\n")
    assert session.pending_claim is None
    assert session.take_upstream_output() == b"USER alice\r\n"


def test_a_failed_login_is_queued_for_the_store_not_counted_here() -> None:
    session, policy = greeted()
    session.receive_client(b"USER alice\r\nPASS wrong\r\n")
    session.claim_result(None)
    session.receive_server(b"+OK\r\n-ERR [AUTH] Authentication failed.\r\n")
    assert policy.has_failures
    assert policy.take_failures() == ["alice"]
    assert not policy.has_failures


def test_the_session_ending_at_the_gate_forwards_nothing() -> None:
    session, _ = greeted()
    session.receive_client(b"USER alice\r\n")
    session.end(EndReason.CLIENT_CLOSED)
    assert session.pending_claim is None
    session.claim_result(None)  # a late answer changes nothing
    assert session.take_upstream_output() == b""
