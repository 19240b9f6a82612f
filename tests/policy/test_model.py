"""popguard.policy.model and .state: matching, first match per setting, counters."""

from __future__ import annotations

import dataclasses
import ipaddress
import textwrap
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popguard.policy.load import load_policies
from popguard.policy.model import (
    SETTINGS,
    Context,
    Match,
    PolicySet,
    Rule,
    Throttle,
    _user_matches,
    client_address,
)
from popguard.policy.session import (
    REPLY_ACCESS_DENIED,
    PolicyHolder,
    PolicyShared,
    SessionPolicy,
)
from popguard.policy.state import FailedLogins, SessionCounts


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def net(*texts: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(text) for text in texts)


def rule(name: str, match: Match | None = None, mode: str = "enforce", **values: object) -> Rule:
    return Rule(name, "policies/50-test.yaml", 1, match or Match(), mode, values)  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# Users
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("patterns", "user", "expected"),
    [
        (("alice",), "alice", True),
        (("alice",), "Alice", False),  # user names compare case-sensitively
        (("alice",), "alice2", False),
        (("alice", "bob"), "bob", True),
        (("*@example.org",), "bob@example.org", True),
        (("*@example.org",), "bob@example.org.evil", False),
        (("*@example.org",), "bob@EXAMPLE.org", False),  # a glob is case-sensitive
        (("b?b",), "bob", True),
        (("[ab]ob",), "bob", True),
        (("[ab]ob",), "cob", False),
        (("@example.org",), "bob@example.org", True),
        (("@example.org",), "bob@EXAMPLE.ORG", True),  # domains compare case-insensitively
        (("@EXAMPLE.org",), "bob@example.ORG", True),
        (("@example.org",), "bob@sub.example.org", False),
        (("@example.org",), "example.org", False),
        (("@example.org",), "a@b@example.org", True),  # the part after the last @
        (("*@*.example.org",), "bob@sub.example.org", True),
        ((), "alice", False),
    ],
)
def test_user_patterns(patterns: tuple[str, ...], user: str, expected: bool) -> None:
    assert _user_matches(patterns, user) is expected


@settings(max_examples=500)
@given(patterns=st.lists(st.text(max_size=12), max_size=4), user=st.text(max_size=20))
def test_user_matching_never_raises(patterns: list[str], user: str) -> None:
    assert _user_matches(tuple(patterns), user) in (True, False)


@given(user=st.text(min_size=1, max_size=20).filter(lambda u: not set(u) & set("*?[@")))
def test_an_exact_pattern_matches_itself(user: str) -> None:
    assert _user_matches((user,), user)


def test_user_matches_only_after_login() -> None:
    match = Match(users=("alice",))
    assert not match.matches(Context(client=None))
    assert not match.matches(Context(client=None, claimed_user="alice"))
    assert match.matches(Context(client=None, claimed_user="alice", user="alice"))


def test_claimed_user_matches_the_claim_and_then_the_user() -> None:
    match = Match(claimed_users=("alice",))
    assert not match.matches(Context(client=None))
    assert match.matches(Context(client=None, claimed_user="alice"))
    assert not match.matches(Context(client=None, claimed_user="bob"))
    # After login the authenticated user is what counts (a SASL authzid may differ).
    assert match.matches(Context(client=None, claimed_user="bob", user="alice"))
    assert not match.matches(Context(client=None, claimed_user="alice", user="bob"))


def test_claiming_and_logging_in_change_only_the_user_fields() -> None:
    # Context.claimed and logged_in copy the other fields by name (cheaper
    # than dataclasses.replace): a field added to Context must be copied too.
    assert [f.name for f in dataclasses.fields(Context)] == [
        "client",
        "listener",
        "tls",
        "claimed_user",
        "user",
    ], "a new Context field: copy it in Context.claimed and Context.logged_in"
    context = Context(
        client=ipaddress.ip_address("192.0.2.7"),
        listener="pop3s",
        tls=True,
        claimed_user="first",
        user="first",
    )
    assert context.claimed("alice") == dataclasses.replace(context, claimed_user="alice")
    assert context.logged_in("bob") == dataclasses.replace(context, claimed_user="bob", user="bob")


# --------------------------------------------------------------------------
# Clients, listeners, TLS
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("networks", "client", "expected"),
    [
        (("10.0.0.0/8",), "10.1.2.3", True),
        (("10.0.0.0/8",), "11.0.0.1", False),
        (("192.0.2.7/32",), "192.0.2.7", True),
        (("192.0.2.7/32",), "192.0.2.8", False),
        (("2001:db8::/32",), "2001:db8::1", True),
        (("2001:db8::/32",), "2001:db9::1", False),
        (("2001:db8::/32",), "10.1.2.3", False),  # v4 client, v6 network: no match, no error
        (("10.0.0.0/8",), "2001:db8::1", False),
        (("10.0.0.0/8", "::1/128"), "::1", True),
    ],
)
def test_client_networks(networks: tuple[str, ...], client: str, expected: bool) -> None:
    assert Match(clients=net(*networks)).matches(Context(client=ip(client))) is expected


def test_a_client_rule_never_matches_an_unknown_address() -> None:
    assert not Match(clients=net("0.0.0.0/0", "::/0")).matches(Context(client=None))


def test_listener_and_tls() -> None:
    assert Match(listeners=("main",)).matches(Context(client=None, listener="main"))
    assert not Match(listeners=("main",)).matches(Context(client=None, listener="legacy"))
    assert Match(tls=False).matches(Context(client=None))
    assert not Match(tls=True).matches(Context(client=None))
    assert Match(tls=True).matches(Context(client=None, tls=True))


def test_every_given_field_must_match() -> None:
    match = Match(clients=net("10.0.0.0/8"), listeners=("main",))
    assert match.matches(Context(client=ip("10.0.0.1"), listener="main"))
    assert not match.matches(Context(client=ip("10.0.0.1"), listener="other"))
    assert not match.matches(Context(client=ip("192.0.2.1"), listener="main"))


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        ("192.0.2.7:40000", "192.0.2.7"),
        ("[2001:db8::1]:40000", "2001:db8::1"),
        ("[fe80::1%eth0]:110", "fe80::1"),
        ("2001:db8::1", "2001:db8::1"),
        ("garbage", None),
        ("", None),
    ],
)
def test_client_address(peer: str, expected: str | None) -> None:
    address = client_address(peer)
    assert (None if address is None else str(address)) == expected


# --------------------------------------------------------------------------
# First match per setting
# --------------------------------------------------------------------------


def test_for_each_setting_the_first_matching_rule_that_sets_it_wins() -> None:
    alice = rule("alice", Match(users=("alice",)), deny_commands=("DELE",), idle_timeout=1200.0)
    everyone = rule("everyone", deny_commands=("DELE", "RSET"), max_session=3600.0)
    policies = PolicySet((alice, everyone))

    as_alice = policies.resolve(Context(client=None, claimed_user="alice", user="alice"))
    assert as_alice.value("deny_commands") == ("DELE",)
    assert as_alice.get("deny_commands").rule is alice  # type: ignore[union-attr]
    assert as_alice.value("idle_timeout") == 1200.0
    assert as_alice.get("max_session").rule is everyone  # type: ignore[union-attr]

    as_bob = policies.resolve(Context(client=None, claimed_user="bob", user="bob"))
    assert as_bob.value("deny_commands") == ("DELE", "RSET")
    assert as_bob.get("idle_timeout") is None
    assert as_bob.value("idle_timeout") is None


def test_order_decides_not_specificity() -> None:
    everyone = rule("everyone", access="allow")
    alice = rule("alice", Match(claimed_users=("alice",)), access="deny")
    context = Context(client=None, claimed_user="alice")
    assert PolicySet((everyone, alice)).resolve(context).value("access") == "allow"
    assert PolicySet((alice, everyone)).resolve(context).value("access") == "deny"


def test_the_mode_of_the_winning_rule_is_carried() -> None:
    trial = rule("trial", mode="dry-run", deny_commands=("DELE",))
    real = rule("real", deny_commands=("DELE", "RSET"), max_session=60.0)
    effective = PolicySet((trial, real)).resolve(Context(client=None))
    denied = effective.get("deny_commands")
    assert denied is not None
    assert denied.rule is trial
    assert not denied.enforced
    timer = effective.get("max_session")
    assert timer is not None
    assert timer.enforced


def test_no_rules_set_nothing() -> None:
    assert dict(PolicySet().resolve(Context(client=ip("10.0.0.1"))).settings) == {}


_names = st.sampled_from(["alice", "bob", "carol@example.org"])
# Plain names (indexed by PolicySet) mixed with patterns (always candidates).
_patterns = st.lists(
    st.sampled_from(["alice", "bob", "carol@example.org", "b*", "@example.org", "*"]),
    min_size=1,
    max_size=3,
).map(tuple)
_matches = st.builds(
    Match,
    users=st.none() | _patterns,
    claimed_users=st.none() | _patterns,
    clients=st.none() | st.sampled_from([net("10.0.0.0/8"), net("2001:db8::/32")]),
    listeners=st.none() | st.just(("main",)),
    tls=st.none() | st.booleans(),
)
_values = st.dictionaries(
    st.sampled_from(SETTINGS), st.integers(min_value=1, max_value=5), min_size=1, max_size=4
)
_rules = st.lists(
    st.builds(
        lambda index, match, mode, values: Rule(f"r{index}", "f.yaml", index, match, mode, values),
        st.integers(0, 1000),
        _matches,
        st.sampled_from(["enforce", "dry-run"]),
        _values,
    ),
    max_size=12,
)
_contexts = st.builds(
    Context,
    client=st.none() | st.sampled_from([ip("10.1.2.3"), ip("2001:db8::5"), ip("192.0.2.1")]),
    listener=st.sampled_from(["", "main", "legacy"]),
    tls=st.booleans(),
    claimed_user=st.none() | _names,
    user=st.none() | _names,
)


@settings(max_examples=300)
@given(rules=_rules, context=_contexts)
def test_resolve_is_deterministic_and_first_match_per_setting(
    rules: list[Rule], context: Context
) -> None:
    policies = PolicySet(tuple(rules))
    effective = policies.resolve(context)
    assert effective == policies.resolve(context)
    for name in SETTINGS:
        expected = next((r for r in rules if r.match.matches(context) and name in r.settings), None)
        chosen = effective.get(name)
        if expected is None:
            assert chosen is None
        else:
            assert chosen is not None
            assert chosen.rule is expected
            assert chosen.value == expected.settings[name]


# --------------------------------------------------------------------------
# Counters (popguard.policy.state)
# --------------------------------------------------------------------------


def test_failures_within_the_window_start_a_block() -> None:
    failed = FailedLogins()
    limits: dict[str, Any] = {"failures": 3, "window": 60.0, "block": 100.0}
    assert not failed.failed("user:alice", 0.0, **limits)
    assert not failed.failed("user:alice", 10.0, **limits)
    assert failed.blocked_for("user:alice", 10.0) == 0.0
    assert failed.failed("user:alice", 20.0, **limits)  # the third: blocked
    assert failed.blocked_for("user:alice", 20.0) == 100.0
    assert failed.blocked_for("user:alice", 119.0) == 1.0
    assert failed.blocked_for("user:alice", 120.0) == 0.0
    assert failed.blocked_for("user:bob", 20.0) == 0.0


def test_failures_older_than_the_window_do_not_count() -> None:
    failed = FailedLogins()
    limits: dict[str, Any] = {"failures": 3, "window": 60.0, "block": 100.0}
    assert not failed.failed("client:192.0.2.7", 0.0, **limits)
    assert not failed.failed("client:192.0.2.7", 30.0, **limits)
    assert not failed.failed("client:192.0.2.7", 61.0, **limits)  # the one at 0 expired
    assert failed.blocked_for("client:192.0.2.7", 61.0) == 0.0
    assert failed.failed("client:192.0.2.7", 62.0, **limits)  # 30, 61, 62


def test_failures_during_a_block_do_not_extend_it() -> None:
    failed = FailedLogins()
    limits: dict[str, Any] = {"failures": 2, "window": 1000.0, "block": 50.0}
    failed.failed("k", 0.0, **limits)
    assert failed.failed("k", 1.0, **limits)
    assert not failed.failed("k", 10.0, **limits)
    assert not failed.failed("k", 20.0, **limits)
    assert failed.blocked_for("k", 50.0) == 1.0
    assert failed.blocked_for("k", 51.0) == 0.0
    assert failed.failed("k", 52.0, **limits)  # a new block once the old one ended


def test_failure_keys_are_bounded_least_recently_failed_first() -> None:
    failed = FailedLogins(max_keys=2)
    limits: dict[str, Any] = {"failures": 1, "window": 60.0, "block": 100.0}
    failed.failed("a", 0.0, **limits)
    failed.failed("b", 1.0, **limits)
    failed.failed("a", 2.0, **limits)  # a is now the most recent
    failed.failed("c", 3.0, **limits)  # b is forgotten
    assert len(failed) == 2
    assert failed.blocked_for("b", 3.0) == 0.0
    assert failed.blocked_for("a", 3.0) > 0
    assert failed.blocked_for("c", 3.0) > 0


@settings(max_examples=200)
@given(
    times=st.lists(st.floats(0, 1e6, allow_nan=False), max_size=30).map(sorted),
    keys=st.lists(st.sampled_from("abcdef"), min_size=30, max_size=30),
)
def test_failed_logins_stay_bounded(times: list[float], keys: list[str]) -> None:
    failed = FailedLogins(max_keys=3)
    for now, key in zip(times, keys, strict=False):
        failed.failed(key, now, failures=2, window=10.0, block=5.0)
        assert len(failed) <= 3
        assert 0.0 <= failed.blocked_for(key, now) <= 5.0


def test_session_counts() -> None:
    counts = SessionCounts()
    counts.opened("192.0.2.7")
    counts.opened("192.0.2.7")
    counts.opened("10.0.0.1")
    counts.logged_in("alice")
    assert (counts.total, counts.per_client["192.0.2.7"], counts.per_user["alice"]) == (3, 2, 1)
    counts.closed("192.0.2.7", "alice")
    counts.closed("10.0.0.1", None)
    assert counts.total == 1
    assert dict(counts.per_client) == {"192.0.2.7": 1}
    assert dict(counts.per_user) == {}  # no zero entries are kept
    counts.closed("192.0.2.7", None)
    assert (counts.total, dict(counts.per_client)) == (0, {})


# --------------------------------------------------------------------------
# Loaded files, as a session uses them
# --------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def loaded(tmp_path: Path, text: str) -> PolicyShared:
    (tmp_path / "50-test.yaml").write_text(textwrap.dedent(text), encoding="utf-8")
    policies, _ = load_policies(str(tmp_path))
    return PolicyShared(PolicyHolder(policies), Clock())


def session(shared: PolicyShared, client: str = "192.0.2.7") -> SessionPolicy:
    return SessionPolicy(shared, peer=f"{client}:40000", client=ip(client), listener="main")


def test_a_loaded_deny_reply_is_what_the_client_sees(tmp_path: Path) -> None:
    shared = loaded(
        tmp_path,
        """\
        rules:
          - name: alice-read-only
            match: {user: alice}
            set: {deny_commands: [dele], deny_reply: "Deletion is not permitted here"}
        """,
    )
    policy = session(shared)
    assert policy.check_connect() is None
    assert policy.claim("alice") is None
    assert policy.login_succeeded("alice") is None
    verdict = policy.check_command("DELE")
    assert verdict is not None
    assert verdict.enforced
    assert verdict.reply == b"-ERR [SYS/PERM] Deletion is not permitted here\r\n"
    assert verdict.fields()["policy_file"] == f"{tmp_path / '50-test.yaml'}:2"
    assert policy.check_command("RETR") is None


def test_a_loaded_access_rule_refuses_at_connect(tmp_path: Path) -> None:
    shared = loaded(
        tmp_path,
        """\
        rules:
          - name: internal
            match: {client: [10.0.0.0/8, "2001:db8::/32"]}
            set: {access: allow}
          - name: everyone-else
            set: {access: deny}
        """,
    )
    assert session(shared, "10.9.8.7").check_connect() is None
    assert session(shared, "2001:db8::7").check_connect() is None
    verdict = session(shared, "192.0.2.7").check_connect()
    assert verdict is not None
    assert verdict.reply == REPLY_ACCESS_DENIED
    assert verdict.rule.name == "everyone-else"


def test_a_loaded_dry_run_rule_gives_unenforced_verdicts(tmp_path: Path) -> None:
    shared = loaded(
        tmp_path,
        "rules: [{name: trial, mode: dry-run, set: {auth_mechanisms: [PLAIN]}}]",
    )
    verdict = session(shared).check_command("USER")
    assert verdict is not None
    assert not verdict.enforced
    assert verdict.fields()["mode"] == "dry-run"


def test_a_loaded_throttle_and_its_null_exemption(tmp_path: Path) -> None:
    shared = loaded(
        tmp_path,
        """\
        rules:
          - name: relay
            match: {client: 198.51.100.25}
            set: {login_throttle: null}
          - name: everyone
            set: {login_throttle: {failures: 2, window: 60, block: 300, by: [client]}}
        """,
    )
    relay = session(shared, "198.51.100.25")
    assert relay.login_failed("alice") == []
    assert relay.login_failed("alice") == []
    other = session(shared)
    assert other.login_failed("alice") == []
    assert other.login_failed("alice") == [("client:192.0.2.7", 300.0)]
    verdict = session(shared).check_connect()
    assert verdict is not None
    assert verdict.setting == "login_throttle"
    assert session(shared, "198.51.100.25").check_connect() is None
    throttle = shared.holder.current.rules[1].settings["login_throttle"]
    assert throttle == Throttle(2, 60.0, 300.0, ("client",))


def test_a_loaded_user_rule_refuses_access_at_login(tmp_path: Path) -> None:
    shared = loaded(
        tmp_path,
        "rules: [{name: alice-off, match: {user: alice}, set: {access: deny}}]",
    )
    policy = session(shared)
    assert policy.check_connect() is None
    assert policy.claim("alice") is None  # the user is not known yet
    verdict = policy.login_succeeded("alice")
    assert verdict is not None
    assert verdict.reply == REPLY_ACCESS_DENIED
    assert verdict.rule.name == "alice-off"
