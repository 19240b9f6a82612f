"""Identity: the account the upstream opens, never the client's spelling.

Unit tests of :mod:`popguard.core.identity` and :mod:`popguard.core.sasl`,
then transcripts of the session core: each login spelling or encoding must
end with popguard naming the same account the server will open, or with
popguard refusing before anything reaches the server.  (The same table runs
against real Dovecot in tests/integration/test_identity_dovecot.py.)
"""

from __future__ import annotations

import base64

import pytest

from popguard.core.identity import (
    MAX_LOGIN_IN_RECORD,
    Account,
    IdentityRefused,
    IdentityRules,
    account_key,
    login_text,
)
from popguard.core.limits import Limits
from popguard.core.records import EndReason
from popguard.core.sasl import SaslLogin, decode_base64
from tests.core.transcript import C, Expect, S, play, run_all_modes

GREETING = b"+OK Dovecot ready. <1234.5@example.org>\r\n"
DEFAULT = IdentityRules()


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def refused(reason: str) -> bytes:
    return b"-ERR [AUTH] Login refused: " + reason.encode() + b"\r\n"


# ---------------------------------------------------------------------------
# IdentityRules: login name -> account
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("typed", "account"),
    [
        (b"alice", "alice"),
        (b"ALICE", "alice"),
        (b"aLiCe@Example.ORG", "alice@example.org"),
        (b"a.b-c_d@x", "a.b-c_d@x"),
    ],
)
def test_default_rules_fold_ascii_case_as_dovecot(typed: bytes, account: str) -> None:
    result = DEFAULT.account(typed)
    assert result == Account(account, typed.decode())


def test_exact_case_keeps_the_spelling() -> None:
    assert IdentityRules(case="exact").account(b"ALICE").name == "ALICE"


def test_folding_is_ascii_only_like_dovecots_percent_l() -> None:
    # str.lower() would turn the Kelvin sign into "k"; Dovecot's %L does not.
    rules = IdentityRules(allowed_chars=None)
    assert rules.account("\u212aATE".encode()).name == "\u212aate"


@pytest.mark.parametrize(
    ("typed", "reason"),
    [
        (b"", "an empty name"),
        (b"a" * 256, "a name longer than 255 octets"),
        (b"ali ce", "a name with spaces or control characters"),
        (b"alice\x01", "a name with spaces or control characters"),
        (b"alice\x7f", "a name with spaces or control characters"),
        (b"\xff\xfe", "a name that is not UTF-8"),
    ],
)
def test_names_no_server_can_be_trusted_to_read_alike_are_refused(
    typed: bytes, reason: str
) -> None:
    for rules in (DEFAULT, IdentityRules(allowed_chars=None), IdentityRules(case="exact")):
        with pytest.raises(IdentityRefused, match=reason) as caught:
            rules.account(typed)
        assert caught.value.login == login_text(typed)


def test_characters_outside_the_servers_set_are_refused() -> None:
    with pytest.raises(IdentityRefused, match="do not accept"):
        DEFAULT.account(b"alice*master")  # Dovecot would reject '*' too
    assert IdentityRules(allowed_chars=None).account(b"alice*master").name == "alice*master"


def test_a_name_of_255_octets_is_accepted() -> None:
    assert DEFAULT.account(b"a" * 255).name == "a" * 255


def test_default_domain_and_domain_stripping() -> None:
    realm = IdentityRules(default_domain="example.org")
    assert realm.account(b"Alice").name == "alice@example.org"
    assert realm.account(b"alice@other.net").name == "alice@other.net"
    strip = IdentityRules(domain="strip")
    assert strip.account(b"Alice@Example.org").name == "alice"
    with pytest.raises(IdentityRefused):
        strip.account(b"@example.org")


def test_master_user_separator_names_the_account_before_it() -> None:
    rules = IdentityRules(master_separator="*", allowed_chars=None)
    account = rules.account(b"Alice*Admin")
    assert (account.name, account.master, account.login) == ("alice", "admin", "Alice*Admin")
    # Dovecot splits at the first separator, other servers at the last.
    with pytest.raises(IdentityRefused, match="more than one master-user separator"):
        rules.account(b"a*b*admin")
    after = IdentityRules(master_separator="*", master_account="after", allowed_chars=None)
    assert after.account(b"admin*alice").name == "alice"
    for empty in (b"*admin", b"alice*"):
        with pytest.raises(IdentityRefused, match="empty name beside"):
            rules.account(empty)


def test_plain_authzid_names_the_account() -> None:
    account = DEFAULT.account(b"admin", authzid=b"Alice")
    assert (account.name, account.master, account.login) == ("alice", "admin", "Alice")
    with pytest.raises(IdentityRefused, match="authorization identity"):
        IdentityRules(plain_authzid="refuse").account(b"admin", authzid=b"alice")
    both = IdentityRules(master_separator="*", allowed_chars=None)
    with pytest.raises(IdentityRefused, match="both"):
        both.account(b"bob*admin", authzid=b"alice")


def test_canonical_applies_to_names_from_rules_and_flags() -> None:
    assert DEFAULT.canonical("Alice") == "alice"
    assert IdentityRules(default_domain="x.org", domain="keep").canonical("Bob") == "bob@x.org"
    assert IdentityRules(case="exact").canonical("Bob") == "Bob"


def test_login_in_records_is_escaped_and_capped() -> None:
    assert login_text(b"a\r\nb") == "a\\u000d\\u000ab"
    long = login_text(b"\x01" * 10_000)
    assert len(long) == MAX_LOGIN_IN_RECORD
    assert long.endswith("…")


def test_account_keys_have_a_fixed_size() -> None:
    keys = {account_key(name) for name in ("a", "b" * 255, "\u00e9" * 100)}
    assert len(keys) == 3
    assert {len(key) for key in keys} == {32}


# ---------------------------------------------------------------------------
# Base64 and the SASL mechanisms
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "data"),
    [
        (b"YWxpY2U=", b"alice"),
        (b"YWxpY2U", b"alice"),  # padding left out
        (b"YWxp Y2U=", b"alice"),  # whitespace, as Dovecot skips it
        (b" Y W x p\tY 2 U = ", b"alice"),
        (b"", b""),
    ],
)
def test_base64_is_read_as_lenient_servers_read_it(text: bytes, data: bytes) -> None:
    assert decode_base64(text) == data


@pytest.mark.parametrize("text", [b"YWxpY2U=YQ==", b"Y", b"YW=xp", b"YWxp!2U=", b"YQ===", b"YQ="])
def test_base64_that_servers_may_read_differently_is_refused(text: bytes) -> None:
    with pytest.raises(IdentityRefused, match="not base64"):
        decode_base64(text)


def test_login_mechanism_follows_the_servers_prompts() -> None:
    login = SaslLogin("LOGIN", DEFAULT)
    assert login.initial(None) is None
    login.challenge(b"+ " + b64(b"Username:") + b"\r\n")
    assert login.response(b"QUxJQ0U") == b64(b"ALICE")
    assert login.account is not None
    assert login.account.name == "alice"
    login.challenge(b"+ " + b64(b"Password:") + b"\r\n")
    assert login.response(b"not base64 at all!") == b"not base64 at all!"  # relayed as is


def test_login_refuses_a_password_prompt_before_a_name() -> None:
    login = SaslLogin("LOGIN", DEFAULT)
    login.challenge(b"+ " + b64(b"Password:") + b"\r\n")
    with pytest.raises(IdentityRefused, match="password before a user name"):
        login.response(b64(b"alice"))


def test_login_refuses_a_second_user_name_prompt() -> None:
    login = SaslLogin("LOGIN", DEFAULT)
    login.initial(b64(b"alice"))
    login.challenge(b"+ " + b64(b"Username:") + b"\r\n")
    with pytest.raises(IdentityRefused, match="second user name"):
        login.response(b64(b"bob"))


def test_plain_takes_one_naming_response() -> None:
    login = SaslLogin("PLAIN", DEFAULT)
    assert login.initial(b"=") == b"="
    assert login.account is None
    login.response(b64(b"\0alice\0pw"))
    with pytest.raises(IdentityRefused, match="one account, in one response"):
        login.response(b64(b"\0bob\0pw"))


# ---------------------------------------------------------------------------
# Transcripts: what the server sees, what the records say
# ---------------------------------------------------------------------------


def succeeded(out: object) -> dict[str, object]:
    record = out.record("auth.succeeded")  # type: ignore[attr-defined]
    return dict(record.fields)


def test_user_pass_in_another_spelling_is_the_same_account() -> None:
    steps = [S(GREETING), C(b"USER ALICE\r\n"), S(b"+OK\r\n"), C(b"PASS pw\r\n"), S(b"+OK\r\n")]
    out = run_all_modes(steps, Expect(upstream=b"USER ALICE\r\nPASS pw\r\n", finished=False))
    fields = succeeded(out)
    assert (fields["user"], fields["login"], fields["mechanism"]) == ("alice", "ALICE", "USER")
    assert out.session.user == "alice"


def test_refused_user_name_never_reaches_the_server_nor_does_its_password() -> None:
    steps = [S(GREETING), C("USER alicé\r\n".encode()), C(b"PASS secret\r\n")]
    reply = refused("the name holds '\\xe9', which the server's name rules do not accept")
    out = run_all_modes(
        steps, Expect(upstream=b"", client=GREETING + reply + reply, finished=False)
    )
    record = out.record("auth.refused")
    assert record["mechanism"] == "USER"
    assert record["login"] == "alicé"
    assert "secret" not in repr(out.records)


def test_apop_with_odd_spacing_is_refused() -> None:
    digest = b"c4c9334bac560ecc979e58001b3e22fb"
    out = run_all_modes(
        [S(GREETING), C(b"APOP alice  " + digest + b"\r\n")],
        Expect(upstream=b"", finished=False),
    )
    assert out.record("auth.refused")["reason"] == "APOP takes a name and a digest, one space apart"
    ok = run_all_modes(
        [S(GREETING), C(b"APOP Alice " + digest + b"\r\n"), S(b"+OK\r\n")],
        Expect(upstream=b"APOP Alice " + digest + b"\r\n", finished=False),
    )
    assert succeeded(ok)["user"] == "alice"


def test_plain_initial_response_with_whitespace_is_forwarded_as_popguard_read_it() -> None:
    encoded = b64(b"\0ALICE\0pw")
    spaced = encoded[:3] + b" " + encoded[3:7] + b"  " + encoded[7:]
    steps = [S(GREETING), C(b"AUTH PLAIN " + spaced + b"\r\n"), S(b"+OK\r\n")]
    out = run_all_modes(steps, Expect(upstream=b"AUTH PLAIN " + encoded + b"\r\n"))
    assert succeeded(out)["user"] == "alice"


def test_plain_empty_initial_response_then_the_credentials() -> None:
    steps = [
        S(GREETING),
        C(b"AUTH PLAIN =\r\n"),
        S(b"+ \r\n"),
        C(b64(b"\0Alice\0pw") + b"\r\n"),
        S(b"+OK\r\n"),
    ]
    out = run_all_modes(steps, Expect(finished=False), modes=("whole", "bytewise"))
    assert succeeded(out)["user"] == "alice"
    assert out.upstream == b"AUTH PLAIN =\r\n" + b64(b"\0Alice\0pw") + b"\r\n"


def test_plain_authzid_names_the_account_and_the_master() -> None:
    steps = [S(GREETING), C(b"AUTH PLAIN " + b64(b"alice\0admin\0pw") + b"\r\n"), S(b"+OK\r\n")]
    fields = succeeded(run_all_modes(steps, Expect(finished=False)))
    assert (fields["user"], fields["master"], fields["login"]) == ("alice", "admin", "alice")


def test_login_initial_response_split_across_words_is_one_name() -> None:
    encoded = b64(b"alice")
    line = b"AUTH LOGIN " + encoded[:4] + b" " + encoded[4:] + b"\r\n"
    steps = [
        S(GREETING),
        C(line),
        S(b"+ " + b64(b"Password:") + b"\r\n"),
        C(b64(b"pw") + b"\r\n"),
        S(b"+OK\r\n"),
    ]
    out = run_all_modes(steps, Expect(finished=False), modes=("whole", "bytewise"))
    assert succeeded(out)["user"] == "alice"
    assert out.upstream.startswith(b"AUTH LOGIN " + encoded + b"\r\n")


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"AUTH LOGIN =", "LOGIN with an empty initial response is ambiguous"),
        (b"AUTH CRAM-MD5 =", "CRAM-MD5 takes no initial response (RFC 2195)"),
        (b"AUTH CRAM-MD5 " + b64(b"alice x"), "CRAM-MD5 takes no initial response (RFC 2195)"),
        (b"AUTH  PLAIN", "a malformed AUTH command"),
        (b"AUTH PLAIN ", "an empty initial response"),
        (b"AUTH PLAIN " + b64(b"alice\0pw"), "a PLAIN response that is not authzid"),
        (
            b"AUTH SCRAM-SHA-1 " + b64(b"n,,n=alice,r=x"),
            "popguard cannot tell which account SCRAM-SHA-1 logs in to; use CRAM-MD5, LOGIN, PLAIN",
        ),
        (b"AUTH XOAUTH2", "popguard cannot tell which account XOAUTH2 logs in to"),
    ],
)
def test_ambiguous_auth_lines_are_refused_before_the_server(line: bytes, reason: str) -> None:
    out = play([S(GREETING), C(line + b"\r\n"), C(b"NOOP\r\n"), S(b"+OK\r\n")])
    assert out.upstream == b"NOOP\r\n"  # the AUTH never left; the next command did
    assert out.client.startswith(GREETING + b"-ERR [AUTH] Login refused: " + reason.encode())
    record = out.record("auth.refused")
    assert str(record["reason"]).startswith(reason)
    assert "pw" not in repr(out.records)


def test_cram_md5_names_the_user_before_the_last_space() -> None:
    steps = [
        S(GREETING),
        C(b"AUTH CRAM-MD5\r\n"),
        S(b"+ PDEyMzQ1QGV4YW1wbGUub3JnPg==\r\n"),
        C(b64(b"Alice 0123456789abcdef0123456789abcdef") + b"\r\n"),
        S(b"+OK\r\n"),
    ]
    out = run_all_modes(steps, Expect(finished=False), modes=("whole", "bytewise"))
    assert succeeded(out)["user"] == "alice"


def test_a_refused_continuation_cancels_and_the_client_learns_why() -> None:
    steps = [
        S(GREETING),
        C(b"AUTH LOGIN\r\n"),
        S(b"+ " + b64(b"Username:") + b"\r\n"),
        C(b64(b"bad name") + b"\r\n"),
        S(b"-ERR Authentication aborted\r\n"),
    ]
    out = run_all_modes(steps, Expect(finished=False), modes=("whole", "bytewise"))
    assert out.upstream == b"AUTH LOGIN\r\n*\r\n"
    assert out.client.endswith(refused("a name with spaces or control characters"))
    assert out.record("auth.refused")["login"] == "bad name"
    assert "auth.succeeded" not in out.events()


def test_a_server_that_logs_in_after_a_cancel_ends_the_session() -> None:
    steps = [
        S(GREETING),
        C(b"AUTH LOGIN\r\n"),
        S(b"+ " + b64(b"Username:") + b"\r\n"),
        C(b64(b"bad name") + b"\r\n"),
        S(b"+OK Logged in.\r\n"),
    ]
    out = run_all_modes(steps, Expect(end_reason=EndReason.IDENTITY_UNKNOWN))
    assert b"+OK Logged in" not in out.client
    assert b"QUIT" not in out.upstream


def test_a_login_popguard_cannot_name_ends_the_session_without_quit() -> None:
    # A PASS with no USER before it that the server (wrongly) accepts.
    steps = [S(GREETING), C(b"PASS pw\r\n"), S(b"+OK Logged in.\r\n"), C(b"DELE 1\r\nQUIT\r\n")]
    out = run_all_modes(steps, Expect(end_reason=EndReason.IDENTITY_UNKNOWN))
    assert b"QUIT" not in out.upstream
    assert out.client.endswith(b"disconnecting\r\n")
    assert out.record("auth.refused")["mechanism"] == "USER"


def test_the_client_star_cancels() -> None:
    steps = [
        S(GREETING),
        C(b"AUTH PLAIN\r\n"),
        S(b"+ \r\n"),
        C(b"*\r\n"),
        S(b"-ERR Authentication aborted\r\n"),
    ]
    out = run_all_modes(steps, Expect(upstream=b"AUTH PLAIN\r\n*\r\n", finished=False))
    assert "auth.refused" not in out.events()


def test_capa_offers_only_mechanisms_popguard_can_read() -> None:
    capa = b"+OK\r\nTOP\r\nSASL PLAIN LOGIN SCRAM-SHA-1 CRAM-MD5 GSSAPI\r\nUSER\r\n.\r\n"
    out = run_all_modes(
        [S(GREETING), C(b"CAPA\r\n"), S(capa)],
        Expect(finished=False),
    )
    assert out.client == GREETING + b"+OK\r\nTOP\r\nSASL PLAIN LOGIN CRAM-MD5\r\nUSER\r\n.\r\n"
    only_other = b"+OK\r\nSASL GSSAPI\r\n.\r\n"
    out = run_all_modes([S(GREETING), C(b"CAPA\r\n"), S(only_other)], Expect(finished=False))
    assert out.client == GREETING + b"+OK\r\n.\r\n"


def test_exact_identity_keeps_names_apart() -> None:
    steps = [S(GREETING), C(b"USER ALICE\r\n"), S(b"+OK\r\n"), C(b"PASS pw\r\n"), S(b"+OK\r\n")]
    out = play(steps, identity=IdentityRules(case="exact"))
    assert succeeded(out)["user"] == "ALICE"


# ---------------------------------------------------------------------------
# Bounded pipelining, and upstream bytes no command asked for
# ---------------------------------------------------------------------------


def test_a_flood_of_commands_is_forwarded_only_up_to_the_bound() -> None:
    limits = Limits(max_pipelined=8)
    out = play([S(GREETING), C(b"NOOP\r\n" * 1000)], limits=limits)
    assert out.upstream.count(b"NOOP") == 8
    session = out.session
    assert not session.wants_client_data
    session.receive_server(b"+OK\r\n" * 3)
    assert session.take_upstream_output().count(b"NOOP") == 3


def test_a_flood_of_local_replies_is_released_as_output_is_taken() -> None:
    limits = Limits(max_pipelined=8)
    out = play([S(GREETING), C(b"STLS\r\n" * 100)], limits=limits)
    reply = b"-ERR STLS is not available through this proxy\r\n"
    assert out.client == GREETING + reply * 8
    session = out.session
    taken = []
    while data := session.take_client_output():
        taken.append(data)
    assert all(chunk.count(reply) <= 8 for chunk in taken)
    assert b"".join(taken).count(reply) == 92


def test_extra_replies_in_the_same_read_never_reach_the_client() -> None:
    login = [S(GREETING), C(b"USER alice\r\n"), S(b"+OK\r\n"), C(b"PASS pw\r\n"), S(b"+OK\r\n")]
    steps = [*login, C(b"DELE 1\r\n"), S(b"+OK marked\r\n+OK injected\r\n")]
    out = play(steps)
    assert b"marked" not in out.client
    assert b"injected" not in out.client
    assert out.client.endswith(b"-ERR [SYS/TEMP] Upstream POP3 server sent an invalid reply\r\n")
    assert out.session.end_reason is EndReason.UPSTREAM_PROTOCOL_ERROR
    assert out.record("deletions.discarded")["reason"] == "upstream_protocol_error"
    assert b"QUIT" not in out.upstream


def test_a_reply_in_an_earlier_read_stands() -> None:
    steps = [S(GREETING), C(b"NOOP\r\n"), S(b"+OK\r\n"), S(b"+OK extra\r\n")]
    out = play(steps)
    assert out.client == GREETING + b"+OK\r\n"  # nobody owed: no -ERR either
    assert out.session.end_reason is EndReason.UPSTREAM_PROTOCOL_ERROR


def test_a_second_login_the_server_accepts_ends_the_session() -> None:
    steps = [
        S(GREETING),
        C(b"USER alice\r\n"),
        S(b"+OK\r\n"),
        C(b"PASS pw\r\n"),
        S(b"+OK\r\n"),
        C(b"USER bob\r\n"),
        S(b"+OK\r\n"),
        C(b"PASS pw2\r\n"),
        S(b"+OK bob's maildrop\r\n"),
        C(b"DELE 1\r\n"),
    ]
    out = run_all_modes(steps, Expect(end_reason=EndReason.IDENTITY_UNKNOWN))
    assert b"bob's maildrop" not in out.client
    assert b"DELE" not in out.upstream
    assert out.record("auth.refused")["reason"] == (
        "the server accepted a second login in one session"
    )


def test_a_bare_auth_listing_offers_only_mechanisms_popguard_can_read() -> None:
    listing = b"+OK\r\nPLAIN\r\nSCRAM-SHA-256\r\nlogin\r\nGSSAPI\r\n.\r\n"
    out = run_all_modes(
        [S(GREETING), C(b"AUTH\r\n"), S(listing), C(b"NOOP\r\n"), S(b"+OK\r\n")],
        Expect(upstream=b"AUTH\r\nNOOP\r\n", finished=False),
    )
    assert out.client == GREETING + b"+OK\r\nPLAIN\r\nlogin\r\n.\r\n+OK\r\n"


@pytest.mark.parametrize(
    "user", [b"USER " + b"a" * 300 + b"\r\n", b"user ali\x01ce\r\n"], ids=["long", "control"]
)
def test_the_password_behind_a_user_line_popguard_rejected_goes_nowhere(user: bytes) -> None:
    out = run_all_modes(
        [S(GREETING), C(user), C(b"PASS secret\r\n")], Expect(upstream=b"", finished=False)
    )
    assert out.client.endswith(b"-ERR [AUTH] Login refused: no valid USER before PASS\r\n")


def test_a_malformed_mechanism_is_recorded_as_none() -> None:
    out = play([S(GREETING), C(b"AUTH  PLAIN\r\n")])
    assert out.record("auth.refused")["mechanism"] is None
