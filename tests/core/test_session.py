"""Transcript tests of the sans-I/O session: bytes in, bytes and records out.

Every transcript runs whole, one byte at a time and (where timing does not
matter) pipelined, and must give the same result each way.
"""

from __future__ import annotations

import base64

import pytest

from popguard.core.limits import Limits
from popguard.core.records import EndReason
from popguard.core.replies import (
    REPLY_IDLE,
    REPLY_SHUTDOWN,
    REPLY_STLS_UNAVAILABLE,
    REPLY_TOO_MANY_BAD,
    REPLY_UPSTREAM_BROKEN,
    REPLY_UPSTREAM_LOST,
    REPLY_UPSTREAM_UNAVAILABLE,
)
from popguard.core.session import State

from .transcript import (
    C,
    ClientEof,
    End,
    Expect,
    S,
    ServerEof,
    UpstreamFailed,
    play,
    run_all_modes,
)

GREETING = b"+OK Dovecot ready. <1234.5@example.org>\r\n"
LOGIN = [
    S(GREETING),
    C(b"USER alice\r\n"),
    S(b"+OK\r\n"),
    C(b"PASS s3cret-pw\r\n"),
    S(b"+OK Logged in.\r\n"),
]
LOGIN_UP = b"USER alice\r\nPASS s3cret-pw\r\n"
LOGIN_DOWN = GREETING + b"+OK\r\n+OK Logged in.\r\n"
LOGIN_RECORDS = [
    {"event": "session.opened", "client": "192.0.2.7:40000", "listener": "test"},
    {"event": "auth.succeeded", "user": "alice", "mechanism": "USER"},
]

# A body with dot-stuffed lines and every near-terminator that must NOT end
# the reply (terminator smuggling: only CRLF "." CRLF ends it).
TRICKY_BODY = (
    b"Subject: dots\r\n\r\n"
    b"..leading dot, stuffed\r\n"
    b"bare LF dot\n.\nstill body\r\n"
    b"CRLF then dot LF\r\n.\nstill body\r\n"
    b"LF then dot CRLF\n.\r\nstill body\r\n"
    b"..\r\n"
    b"last line\r\n"
)
RETR_REPLY = b"+OK 200 octets\r\n" + TRICKY_BODY + b".\r\n"


def test_login_retrieve_delete_quit_commits() -> None:
    steps = [
        *LOGIN,
        C(b"STAT\r\n"),
        S(b"+OK 2 400\r\n"),
        C(b"LIST\r\n"),
        S(b"+OK 2 messages\r\n1 200\r\n2 200\r\n.\r\n"),
        C(b"RETR 1\r\n"),
        S(RETR_REPLY),
        C(b"DELE 1\r\n"),
        S(b"+OK Marked\r\n"),
        C(b"QUIT\r\n"),
        S(b"+OK Logging out, messages deleted.\r\n"),
    ]
    out = run_all_modes(
        steps,
        Expect(
            upstream=LOGIN_UP + b"STAT\r\nLIST\r\nRETR 1\r\nDELE 1\r\nQUIT\r\n",
            client=b"".join(s.data for s in steps if isinstance(s, S)),
            records=[
                *LOGIN_RECORDS,
                {
                    "event": "message.retrieved",
                    "msg": 1,
                    "command": "RETR",
                    "bytes": len(RETR_REPLY),
                    "user": "alice",
                },
                {"event": "dele.marked", "msg": 1},
                {"event": "session.quit", "state": "TRANSACTION", "ok": True},
                {"event": "deletions.committed", "messages": ({"msg": 1},), "user": "alice"},
                {"event": "session.closed", "reason": "quit", "state": "UPDATE"},
            ],
            finished=True,
            end_reason=EndReason.QUIT,
        ),
    )
    assert out.session.state is State.UPDATE


def test_body_bytes_are_relayed_unchanged_including_stuffing() -> None:
    steps = [*LOGIN, C(b"RETR 1\r\n"), S(RETR_REPLY), C(b"NOOP\r\n"), S(b"+OK\r\n")]
    out = run_all_modes(steps, Expect(client=LOGIN_DOWN + RETR_REPLY + b"+OK\r\n"))
    assert out.session.replies_owed == 0


def test_multiline_reply_split_inside_terminator_then_next_reply_in_same_read() -> None:
    # The terminator and the next reply's status line share reads.
    server = RETR_REPLY + b"+OK noop\r\n"
    for cut in range(len(RETR_REPLY) - 6, len(RETR_REPLY) + 3):
        steps = [
            *LOGIN,
            C(b"RETR 1\r\nNOOP\r\n"),
            S(server[:cut]),
            S(server[cut:]),
            C(b"QUIT\r\n"),
            S(b"+OK bye\r\n"),
        ]
        out = play(steps)
        assert out.client == LOGIN_DOWN + server + b"+OK bye\r\n", cut
        assert out.session.end_reason is EndReason.QUIT


def test_empty_multiline_listing() -> None:
    steps = [
        *LOGIN,
        C(b"LIST\r\n"),
        S(b"+OK 0 messages\r\n.\r\n"),
        C(b"STAT\r\n"),
        S(b"+OK 0 0\r\n"),
    ]
    run_all_modes(steps, Expect(client=LOGIN_DOWN + b"+OK 0 messages\r\n.\r\n+OK 0 0\r\n"))


@pytest.mark.parametrize(
    ("command", "reply"),
    [
        (b"LIST 1\r\n", b"+OK 1 120\r\n"),
        (b"UIDL 1\r\n", b"+OK 1 abc\r\n"),
        (b"RETR 9\r\n", b"-ERR no such message\r\n"),
        (b"TOP 9 0\r\n", b"-ERR no such message\r\n"),
        (b"CAPA\r\n", b"-ERR not supported\r\n"),
        (b"XTND XMIT\r\n", b"-ERR unknown command\r\n"),
    ],
)
def test_single_line_replies(command: bytes, reply: bytes) -> None:
    # If popguard took any of these for a multi-line reply, the NOOP reply
    # would be swallowed as body and never answered.
    steps = [*LOGIN, C(command), S(reply), C(b"NOOP\r\n"), S(b"+OK\r\n")]
    out = run_all_modes(
        steps,
        Expect(upstream=LOGIN_UP + command + b"NOOP\r\n", client=LOGIN_DOWN + reply + b"+OK\r\n"),
    )
    assert out.session.replies_owed == 0


def test_top_and_uidl_listing_are_multiline() -> None:
    top = b"+OK\r\nSubject: x\r\n\r\n.\r\n"
    uidl = b"+OK\r\n1 aaa\r\n2 bbb\r\n.\r\n"
    steps = [*LOGIN, C(b"TOP 1 0\r\n"), S(top), C(b"UIDL\r\n"), S(uidl)]
    out = run_all_modes(steps, Expect(client=LOGIN_DOWN + top + uidl))
    assert out.record("message.retrieved")["command"] == "TOP"


def test_capa_passes_through_without_stls() -> None:
    capa = (
        b"+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nSTLS\r\n"
        b"USER\r\nSASL PLAIN LOGIN\r\n.\r\n"
    )
    without = capa.replace(b"STLS\r\n", b"")
    steps = [S(GREETING), C(b"CAPA\r\n"), S(capa), C(b"STLS\r\n"), C(b"NOOP\r\n"), S(b"+OK\r\n")]
    out = run_all_modes(
        steps,
        Expect(
            upstream=b"CAPA\r\nNOOP\r\n",
            client=GREETING + without + REPLY_STLS_UNAVAILABLE + b"+OK\r\n",
        ),
    )
    assert "command.rejected" in out.events()


def test_greeting_passes_byte_for_byte_and_apop_login() -> None:
    greeting = b"+OK POP3 server ready <1896.697170952@dbc.mtview.ca.us>\r\n"
    steps = [
        S(greeting),
        C(b"APOP mrose c4c9334bac560ecc979e58001b3e22fb\r\n"),
        S(b"+OK mrose's maildrop has 2 messages (320 octets)\r\n"),
    ]
    out = run_all_modes(
        steps,
        Expect(
            client=greeting + b"+OK mrose's maildrop has 2 messages (320 octets)\r\n",
            records=[
                "session.opened",
                {"event": "auth.succeeded", "user": "mrose", "mechanism": "APOP"},
            ],
        ),
    )
    assert out.session.user == "mrose"
    assert out.session.state is State.TRANSACTION


def test_failed_login_is_recorded_without_secret() -> None:
    steps = [
        S(GREETING),
        C(b"USER bob\r\n"),
        S(b"+OK\r\n"),
        C(b"PASS wrong-pw\r\n"),
        S(b"-ERR [AUTH] Authentication failed.\r\n"),
    ]
    out = run_all_modes(
        steps,
        Expect(
            records=[
                "session.opened",
                {
                    "event": "auth.failed",
                    "user": "bob",
                    "mechanism": "USER",
                    "reply": "[AUTH] Authentication failed.",
                },
            ]
        ),
    )
    assert out.session.state is State.AUTHORIZATION
    assert "wrong-pw" not in repr(out.records)


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def test_auth_plain_with_initial_response() -> None:
    ir = _b64(b"\0carol\0plain-secret")
    steps = [S(GREETING), C(b"AUTH PLAIN " + ir + b"\r\n"), S(b"+OK Logged in.\r\n")]
    out = run_all_modes(
        steps,
        Expect(
            upstream=b"AUTH PLAIN " + ir + b"\r\n",
            records=[
                "session.opened",
                {"event": "auth.succeeded", "user": "carol", "mechanism": "PLAIN"},
            ],
        ),
    )
    assert "plain-secret" not in repr(out.records)


def test_auth_plain_with_continuation_holds_pipelined_lines() -> None:
    # The client sends its response and a STAT before the server's "+ ":
    # the first held line is the SASL response, the second a command.
    response = _b64(b"\0dave\0dave-secret")
    steps = [
        S(GREETING),
        C(b"AUTH PLAIN\r\n" + response + b"\r\nSTAT\r\n"),
        S(b"+ \r\n"),
        S(b"+OK Logged in.\r\n"),
        S(b"+OK 0 0\r\n"),
    ]
    out = run_all_modes(
        steps,
        Expect(
            upstream=b"AUTH PLAIN\r\n" + response + b"\r\nSTAT\r\n",
            client=GREETING + b"+ \r\n+OK Logged in.\r\n+OK 0 0\r\n",
            records=[
                "session.opened",
                {"event": "auth.succeeded", "user": "dave", "mechanism": "PLAIN"},
            ],
        ),
        modes=("whole", "bytewise"),
    )
    assert out.session.replies_owed == 0


def test_auth_login_two_step() -> None:
    steps = [
        S(GREETING),
        C(b"AUTH LOGIN\r\n"),
        S(b"+ VXNlcm5hbWU6\r\n"),
        C(_b64(b"erin") + b"\r\n"),
        S(b"+ UGFzc3dvcmQ6\r\n"),
        C(_b64(b"erin-secret") + b"\r\n"),
        S(b"+OK Logged in.\r\n"),
    ]
    out = run_all_modes(
        steps,
        Expect(
            records=[
                "session.opened",
                {"event": "auth.succeeded", "user": "erin", "mechanism": "LOGIN"},
            ]
        ),
    )
    assert (
        out.upstream == b"AUTH LOGIN\r\n" + _b64(b"erin") + b"\r\n" + _b64(b"erin-secret") + b"\r\n"
    )


def test_auth_cram_md5_user_name() -> None:
    steps = [
        S(GREETING),
        C(b"AUTH CRAM-MD5\r\n"),
        S(b"+ PDE4OTYuNjk3MTcwOTUyQHBvc3RvZmZpY2UucmVzdG9uLm1jaS5uZXQ+\r\n"),
        C(_b64(b"tim b913a602c7eda7a495b4e6e7334d3890") + b"\r\n"),
        S(b"-ERR [AUTH] Authentication failed.\r\n"),
    ]
    run_all_modes(
        steps,
        Expect(
            records=[
                "session.opened",
                {"event": "auth.failed", "user": "tim", "mechanism": "CRAM-MD5"},
            ]
        ),
    )


def test_auth_cancel_and_then_user_pass() -> None:
    steps = [
        S(GREETING),
        C(b"AUTH PLAIN\r\n"),
        S(b"+ \r\n"),
        C(b"*\r\n"),
        S(b"-ERR Authentication aborted\r\n"),
        *LOGIN[1:],
    ]
    out = run_all_modes(steps, Expect(upstream=b"AUTH PLAIN\r\n*\r\n" + LOGIN_UP))
    assert out.events() == ["session.opened", "auth.failed", "auth.succeeded"]


def test_bare_auth_lists_mechanisms_multiline() -> None:
    listing = b"+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n"
    steps = [S(GREETING), C(b"AUTH\r\n"), S(listing), C(b"NOOP\r\n"), S(b"+OK\r\n")]
    run_all_modes(steps, Expect(client=GREETING + listing + b"+OK\r\n"))


def test_overlong_sasl_response_is_cancelled_upstream() -> None:
    steps = [
        S(GREETING),
        C(b"AUTH PLAIN\r\n"),
        S(b"+ \r\n"),
        C(b"A" * 20000 + b"\r\n"),
        S(b"-ERR Authentication aborted\r\n"),
    ]
    out = run_all_modes(steps, Expect(upstream=b"AUTH PLAIN\r\n*\r\n"), modes=("whole",))
    assert out.client.endswith(b"-ERR Authentication aborted\r\n")
    assert not out.session.finished


def test_dele_rset_quit_deletes_nothing() -> None:
    steps = [
        *LOGIN,
        C(b"DELE 1\r\n"),
        S(b"+OK\r\n"),
        C(b"DELE 2\r\n"),
        S(b"+OK\r\n"),
        C(b"RSET\r\n"),
        S(b"+OK\r\n"),
        C(b"QUIT\r\n"),
        S(b"+OK\r\n"),
    ]
    run_all_modes(
        steps,
        Expect(
            records=[
                *LOGIN_RECORDS,
                {"event": "dele.marked", "msg": 1},
                {"event": "dele.marked", "msg": 2},
                {"event": "dele.unmarked", "messages": ({"msg": 1}, {"msg": 2})},
                "session.quit",
                {"event": "session.closed", "reason": "quit"},
            ]
        ),
    )


def test_dele_refused_is_recorded() -> None:
    steps = [*LOGIN, C(b"DELE 7\r\n"), S(b"-ERR There's no message 7.\r\n")]
    out = run_all_modes(steps, Expect())
    record = out.record("dele.refused")
    assert record["msg"] == 7
    assert not out.session.marked_for_deletion


@pytest.mark.parametrize(
    ("ending", "reason", "notice"),
    [
        (ClientEof(), EndReason.CLIENT_CLOSED, b""),
        (End(EndReason.IDLE_TIMEOUT), EndReason.IDLE_TIMEOUT, REPLY_IDLE),
        (End(EndReason.SHUTDOWN), EndReason.SHUTDOWN, REPLY_SHUTDOWN),
        (ServerEof(), EndReason.UPSTREAM_CLOSED, b""),
        (End(EndReason.CLIENT_ERROR), EndReason.CLIENT_ERROR, b""),
    ],
)
def test_marks_are_discarded_without_quit(ending: object, reason: EndReason, notice: bytes) -> None:
    steps = [*LOGIN, C(b"DELE 1\r\n"), S(b"+OK\r\n"), ending]
    out = run_all_modes(
        steps,  # type: ignore[arg-type]
        Expect(
            upstream=LOGIN_UP + b"DELE 1\r\n",  # and never a QUIT
            client=LOGIN_DOWN + b"+OK\r\n" + notice,
            finished=True,
            end_reason=reason,
        ),
    )
    discarded = out.record("deletions.discarded")
    assert discarded["messages"] == ({"msg": 1},)
    assert discarded["reason"] == reason.value
    assert out.events()[-1] == "session.closed"


def test_idle_notice_can_be_off() -> None:
    steps = [*LOGIN, End(EndReason.IDLE_TIMEOUT)]
    run_all_modes(steps, Expect(client=LOGIN_DOWN), idle_notice=False)


def test_idle_timeout_mid_reply_sends_no_notice() -> None:
    steps = [*LOGIN, C(b"RETR 1\r\n"), S(b"+OK\r\npartial body\r\n"), End(EndReason.IDLE_TIMEOUT)]
    run_all_modes(steps, Expect(client=LOGIN_DOWN + b"+OK\r\npartial body\r\n"))


def test_quit_err_in_update_records_failure() -> None:
    steps = [
        *LOGIN,
        C(b"DELE 2\r\n"),
        S(b"+OK\r\n"),
        C(b"QUIT\r\n"),
        S(b"-ERR [SYS/TEMP] some deleted messages not removed\r\n"),
    ]
    out = run_all_modes(steps, Expect(end_reason=EndReason.QUIT))
    failed = out.record("deletions.failed")
    assert failed["messages"] == ({"msg": 2},)
    assert "deletions.committed" not in out.events()


def test_quit_sent_but_connection_lost_before_reply_is_unknown() -> None:
    steps = [*LOGIN, C(b"DELE 3\r\n"), S(b"+OK\r\n"), C(b"QUIT\r\n"), ServerEof()]
    out = run_all_modes(steps, Expect(end_reason=EndReason.UPSTREAM_CLOSED))
    assert out.record("deletions.unknown")["messages"] == ({"msg": 3},)
    assert out.client.endswith(REPLY_UPSTREAM_LOST)


def test_quit_in_authorization_does_not_enter_update() -> None:
    steps = [S(GREETING), C(b"QUIT\r\n"), S(b"+OK Logging out\r\n")]
    out = run_all_modes(steps, Expect(upstream=b"QUIT\r\n", end_reason=EndReason.QUIT))
    assert out.session.state is State.AUTHORIZATION


def test_bytes_after_quit_are_never_forwarded() -> None:
    steps = [*LOGIN, C(b"QUIT\r\nDELE 1\r\nRETR 1\r\n"), S(b"+OK\r\n")]
    run_all_modes(steps, Expect(upstream=LOGIN_UP + b"QUIT\r\n"))


def test_half_closed_client_still_gets_every_reply() -> None:
    steps = [
        S(GREETING),
        C(b"USER alice\r\nPASS pw\r\nSTAT\r\nQUIT\r\n"),
        ClientEof(),
        S(b"+OK\r\n+OK Logged in.\r\n+OK 1 10\r\n+OK bye\r\n"),
    ]
    out = run_all_modes(
        steps,
        Expect(
            client=GREETING + b"+OK\r\n+OK Logged in.\r\n+OK 1 10\r\n+OK bye\r\n",
            end_reason=EndReason.QUIT,
        ),
        modes=("whole", "bytewise"),
    )
    assert out.session.finished


def test_half_closed_without_quit_ends_after_last_reply() -> None:
    steps = [*LOGIN, C(b"DELE 1\r\nSTAT\r\n"), ClientEof(), S(b"+OK\r\n+OK 0 0\r\n")]
    out = run_all_modes(
        steps, Expect(end_reason=EndReason.CLIENT_CLOSED), modes=("whole", "bytewise")
    )
    assert out.record("deletions.discarded")["reason"] == "client_closed"


# ----------------------------------------------------------------------
# Bad client input
# ----------------------------------------------------------------------
def test_overlong_command_is_refused_and_not_forwarded() -> None:
    long_line = b"USER " + b"x" * 300 + b"\r\n"
    steps = [S(GREETING), C(long_line), C(b"NOOP\r\n"), S(b"+OK\r\n")]
    out = run_all_modes(
        steps,
        Expect(
            upstream=b"NOOP\r\n",
            client=GREETING + b"-ERR Command line too long (limit 255 octets, RFC 2449)\r\n+OK\r\n",
        ),
    )
    assert out.record("command.rejected")["reason"].startswith("Command line too long")


def test_command_of_exactly_255_octets_is_accepted() -> None:
    line = b"USER " + b"u" * (255 - 7) + b"\r\n"
    assert len(line) == 255
    steps = [S(GREETING), C(line), S(b"+OK\r\n")]
    run_all_modes(steps, Expect(upstream=line))


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"US\x00ER alice\r\n", "Command line contains control characters"),
        (b"USER a\rPASS b\r\n", "Command line contains control characters"),
        (b"\x16\x03\x01\x02\x00\r\n", "Command line contains control characters"),
        (b"HELLO world\r\n", "Malformed command keyword"),
        (b"12 34\r\n", "Malformed command keyword"),
        (b"\r\n", "Empty command line"),
        (b"X\r\n", "Malformed command keyword"),
    ],
)
def test_garbage_gets_a_clear_err(line: bytes, reason: str) -> None:
    steps = [S(GREETING), C(line), C(b"NOOP\r\n"), S(b"+OK\r\n")]
    run_all_modes(
        steps,
        Expect(upstream=b"NOOP\r\n", client=GREETING + b"-ERR " + reason.encode() + b"\r\n+OK\r\n"),
    )


def test_bare_lf_command_is_forwarded_with_crlf() -> None:
    steps = [S(GREETING), C(b"noop\n"), S(b"+OK\r\n")]
    run_all_modes(steps, Expect(upstream=b"noop\r\n", client=GREETING + b"+OK\r\n"))


def test_too_many_bad_commands_disconnects() -> None:
    limits = Limits(max_bad_commands=3)
    steps = [S(GREETING), C(b"\x00\r\n" * 5 + b"NOOP\r\n")]
    out = run_all_modes(
        steps,
        Expect(
            upstream=b"",
            client=GREETING
            + b"-ERR Command line contains control characters\r\n" * 2
            + REPLY_TOO_MANY_BAD,
            finished=True,
            end_reason=EndReason.CLIENT_PROTOCOL_ERROR,
        ),
        limits=limits,
    )
    assert out.events().count("command.rejected") == 3


def test_local_error_waits_for_earlier_pipelined_replies() -> None:
    # RETR is forwarded, the bad line is answered by popguard: the -ERR must
    # reach the client after RETR's whole reply, not in the middle of it.
    steps = [*LOGIN, C(b"RETR 1\r\n\x00bad\r\nNOOP\r\n"), S(RETR_REPLY), S(b"+OK\r\n")]
    run_all_modes(
        steps,
        Expect(
            upstream=LOGIN_UP + b"RETR 1\r\nNOOP\r\n",
            client=LOGIN_DOWN
            + RETR_REPLY
            + b"-ERR Command line contains control characters\r\n+OK\r\n",
        ),
    )


def test_local_error_before_greeting_is_answered_after_it() -> None:
    steps = [C(b"\x01\r\n"), S(GREETING)]
    run_all_modes(
        steps, Expect(client=GREETING + b"-ERR Command line contains control characters\r\n")
    )


# ----------------------------------------------------------------------
# Bad server behaviour
# ----------------------------------------------------------------------
def test_garbage_status_line_ends_session_with_sys_temp() -> None:
    steps = [*LOGIN, C(b"STAT\r\n"), S(b"HELLO garbage\r\n")]
    out = run_all_modes(
        steps,
        Expect(
            client=LOGIN_DOWN + REPLY_UPSTREAM_BROKEN,
            finished=True,
            end_reason=EndReason.UPSTREAM_PROTOCOL_ERROR,
        ),
    )
    assert "upstream.protocol_error" in out.events()


def test_unsolicited_server_bytes_are_never_taken_as_a_reply() -> None:
    steps = [*LOGIN, S(b"+OK surprise\r\n"), C(b"DELE 1\r\n")]
    out = run_all_modes(
        steps,
        Expect(client=LOGIN_DOWN, upstream=LOGIN_UP, end_reason=EndReason.UPSTREAM_PROTOCOL_ERROR),
        modes=("whole", "bytewise"),
    )
    assert not out.session.marked_for_deletion


def test_upstream_closes_mid_reply_client_sees_truncation_not_err() -> None:
    steps = [*LOGIN, C(b"RETR 1\r\n"), S(b"+OK\r\nhalf a mess"), ServerEof()]
    out = run_all_modes(steps, Expect(client=LOGIN_DOWN + b"+OK\r\nhalf a mess"))
    assert out.record("session.closed")["reason"] == "upstream_closed"
    assert "message.retrieved" not in out.events()


def test_upstream_closes_while_reply_owed() -> None:
    steps = [*LOGIN, C(b"STAT\r\n"), ServerEof()]
    run_all_modes(steps, Expect(client=LOGIN_DOWN + REPLY_UPSTREAM_LOST))


def test_upstream_unreachable() -> None:
    steps = [C(b"USER alice\r\n"), UpstreamFailed("Connection refused")]
    out = run_all_modes(
        steps,
        Expect(client=REPLY_UPSTREAM_UNAVAILABLE, end_reason=EndReason.UPSTREAM_UNREACHABLE),
    )
    assert out.record("upstream.failed")["error"] == "Connection refused"


def test_err_greeting_is_relayed_and_ends_session() -> None:
    steps = [S(b"-ERR [SYS/TEMP] too busy\r\n")]
    run_all_modes(
        steps,
        Expect(client=b"-ERR [SYS/TEMP] too busy\r\n", end_reason=EndReason.UPSTREAM_REFUSED),
    )


def test_long_greeting_within_tolerance_passes() -> None:
    greeting = b"+OK " + b"g" * 1500 + b" <1.2@x>\r\n"
    run_all_modes([S(greeting)], Expect(client=greeting, finished=False))


def test_greeting_beyond_bound_is_a_protocol_error() -> None:
    greeting = b"+OK " + b"g" * 5000 + b"\r\n"
    out = run_all_modes([S(greeting)], Expect(end_reason=EndReason.UPSTREAM_PROTOCOL_ERROR))
    assert out.client == REPLY_UPSTREAM_BROKEN


def test_sasl_continuation_outside_auth_is_a_protocol_error() -> None:
    steps = [*LOGIN, C(b"STAT\r\n"), S(b"+ \r\n")]
    run_all_modes(steps, Expect(end_reason=EndReason.UPSTREAM_PROTOCOL_ERROR))


def test_user_name_with_control_characters_is_refused_and_escaped_in_records() -> None:
    name = base64.b64encode(b"\0mallory\r\nevent=forged\0pw")
    steps = [S(GREETING), C(b"AUTH PLAIN " + name + b"\r\n")]
    refusal = b"-ERR [AUTH] Login refused: a name with spaces or control characters\r\n"
    out = run_all_modes(steps, Expect(upstream=b"", client=GREETING + refusal, finished=False))
    login = out.record("auth.refused")["login"]
    assert isinstance(login, str)
    assert "\r" not in login
    assert "\n" not in login
    assert login == "mallory\\u000d\\u000aevent=forged"
