"""Policies see the account the server opens: spellings cannot walk around them.

The sans-I/O half of the bypass tests (the real-Dovecot half is in
tests/integration/test_identity_dovecot.py): rules, limits and throttles
keyed by one account apply to every spelling of it, and what a spray of
failed logins costs does not depend on the names it uses.
"""

from __future__ import annotations

import base64
import sys
from pathlib import Path

import pytest

from popguard.core.identity import IdentityRules
from popguard.policy.load import load_policies
from popguard.policy.model import Match, Throttle
from popguard.policy.state import MAX_THROTTLE_KEYS

from .test_policy import GREETING, factory, rule, shared
from .transcript import C, S, play

SPELLINGS = [
    [C(b"USER ALICE\r\n"), S(b"+OK\r\n"), C(b"PASS pw\r\n"), S(b"+OK\r\n")],
    [C(b"APOP Alice c4c9334bac560ecc979e58001b3e22fb\r\n"), S(b"+OK\r\n")],
    [C(b"AUTH PLAIN " + base64.b64encode(b"\0aLiCe\0pw") + b"\r\n"), S(b"+OK\r\n")],
    [
        C(b"AUTH LOGIN\r\n"),
        S(b"+ VXNlcm5hbWU6\r\n"),
        C(b"QUxJ Q0U\r\n"),  # "ALICE", with a space and no padding
        S(b"+ UGFzc3dvcmQ6\r\n"),
        C(b"cHc=\r\n"),
        S(b"+OK\r\n"),
    ],
    [
        C(b"AUTH PLAIN =\r\n"),
        S(b"+ \r\n"),
        C(base64.b64encode(b"\0ALICE\0pw") + b"\r\n"),
        S(b"+OK\r\n"),
    ],
    [
        C(b"AUTH CRAM-MD5\r\n"),
        S(b"+ PDEuMkB4Pg==\r\n"),
        C(base64.b64encode(b"Alice 0123456789abcdef0123456789abcdef") + b"\r\n"),
        S(b"+OK\r\n"),
    ],
]


@pytest.mark.parametrize("login", SPELLINGS, ids=["user", "apop", "plain", "login", "eq", "cram"])
def test_a_read_only_rule_holds_under_every_spelling(login: list[C | S]) -> None:
    read_only = rule("alice-read-only", match=Match(users=("alice",)), deny_commands=("DELE",))
    steps = [S(GREETING), *login, C(b"DELE 1\r\n")]
    out = play(steps, policy=factory(shared(read_only)))
    assert b"DELE" not in out.upstream
    assert out.client.endswith(b"-ERR [SYS/PERM] DELE is not permitted by policy\r\n")
    assert out.record("policy.denied")["user"] == "alice"
    assert out.record("auth.succeeded")["user"] == "alice"


@pytest.mark.parametrize("login", SPELLINGS, ids=["user", "apop", "plain", "login", "eq", "cram"])
def test_access_deny_holds_under_every_spelling(login: list[C | S]) -> None:
    deny = rule("no-alice", match=Match(claimed_users=("alice",)), access="deny")
    out = play([S(GREETING), *login], policy=factory(shared(deny)))
    assert "auth.succeeded" not in out.events()
    assert b"PASS" not in out.upstream
    assert b"pw" not in out.upstream
    assert base64.b64encode(b"pw") not in out.upstream
    assert base64.b64encode(b"\0aLiCe\0pw") not in out.upstream
    assert out.record("policy.denied")["setting"] == "access"


def test_one_session_per_user_counts_every_spelling_as_one_user() -> None:
    limit = rule("one-each", max_sessions_per_user=1)
    state = shared(limit)
    first = play([S(GREETING), *SPELLINGS[0]], policy=factory(state))
    assert first.record("auth.succeeded")["user"] == "alice"
    second = play([S(GREETING), *SPELLINGS[2]], policy=factory(state))
    assert second.record("policy.denied")["setting"] == "max_sessions_per_user"
    assert "auth.succeeded" not in second.events()


def test_a_user_block_holds_under_every_spelling() -> None:
    throttle = Throttle(failures=2, window=60, block=300, by=("user",))
    state = shared(rule("throttle", login_throttle=throttle))
    for name in (b"alice", b"ALICE"):
        fail = [S(GREETING), C(b"USER " + name + b"\r\n"), S(b"+OK\r\n"), C(b"PASS x\r\n")]
        out = play([*fail, S(b"-ERR [AUTH] Authentication failed.\r\n")], policy=factory(state))
        assert out.record("auth.failed")["user"] == "alice"
    blocked = out.record("policy.login_blocked")
    assert blocked["key"] == "user:alice"
    attempt = play([S(GREETING), *SPELLINGS[3]], policy=factory(state))
    assert attempt.record("policy.denied")["setting"] == "login_throttle"
    assert b"cHc=" not in attempt.upstream  # the password never left


def _spray(state: object, names: list[bytes]) -> None:
    for name in names:
        steps = [S(GREETING), C(b"USER " + name + b"\r\n"), S(b"+OK\r\n"), C(b"PASS x\r\n")]
        play([*steps, S(b"-ERR [AUTH] Authentication failed.\r\n")], policy=factory(state))


def test_failed_login_memory_does_not_depend_on_the_names() -> None:
    throttle = Throttle(failures=5, window=600, block=600, by=("user",))
    state = shared(rule("throttle", login_throttle=throttle))
    # USER + 240 octets: the longest name a command line holds.
    _spray(state, [f"{index:08d}".encode().ljust(240, b"x") for index in range(1000)])
    table = state.failures._keys
    assert len(table) == 1000
    # Keys are digests of the account: the same size whatever the name.
    assert {len(key) for key in table} == {len("user:") + 32}
    per_key = max(
        sys.getsizeof(key)
        + sys.getsizeof(entry)
        + sys.getsizeof(entry.times)
        + sum(map(sys.getsizeof, entry.times))
        for key, entry in table.items()
    )
    # So the whole table is bounded: MAX_THROTTLE_KEYS of these, ~80 MB at
    # worst, where 12 kB names once cost ~100 kB a key (~10 GB).
    assert per_key < 1024
    assert per_key * MAX_THROTTLE_KEYS < 100 * 2**20


def test_names_past_the_bound_never_reach_the_throttle() -> None:
    throttle = Throttle(failures=5, window=600, block=600, by=("user",))
    state = shared(rule("throttle", login_throttle=throttle))
    name = b"\x01" * 12_000
    long_sasl = [
        S(GREETING),
        C(b"AUTH PLAIN\r\n"),
        S(b"+ \r\n"),
        C(base64.b64encode(b"\0" + name + b"\0pw") + b"\r\n"),
        S(b"-ERR Authentication aborted\r\n"),
    ]
    out = play(long_sasl, policy=factory(state))
    assert out.upstream == b"AUTH PLAIN\r\n*\r\n"
    assert len(state.failures) == 0
    assert len(str(out.record("auth.refused")["login"])) <= 128


def test_rules_naming_a_spelling_match_the_account(tmp_path: Path) -> None:
    (tmp_path / "10.yaml").write_text(
        "rules:\n"
        "  - name: ro\n"
        "    match: {user: [Alice, 'Shared-*']}\n"
        "    set: {deny_commands: [DELE]}\n"
    )
    policies, warnings = load_policies(tmp_path)
    assert policies.rules[0].match.users == ("alice", "shared-*")
    assert any("'Alice' is matched as 'alice'" in str(issue) for issue in warnings)
    exact, warnings = load_policies(tmp_path, identity=IdentityRules(case="exact"))
    assert exact.rules[0].match.users == ("Alice", "Shared-*")
    assert not warnings
