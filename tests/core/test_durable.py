"""Fail-closed auditing: a DELE is forwarded only once its record is durable."""

from __future__ import annotations

from popguard.core.records import EndReason
from popguard.core.replies import REPLY_AUDIT_UNAVAILABLE

from .transcript import C, ClientEof, Durable, End, Expect, S, play, run_all_modes

GREETING = b"+OK ready\r\n"
LOGIN = [S(GREETING), C(b"USER alice\r\n"), S(b"+OK\r\n"), C(b"PASS pw\r\n"), S(b"+OK\r\n")]
LOGIN_UP = b"USER alice\r\nPASS pw\r\n"
LOGIN_DOWN = GREETING + b"+OK\r\n+OK\r\n"
MODES = ("whole", "bytewise")


def test_dele_waits_for_its_record_then_goes_upstream() -> None:
    steps = [
        *LOGIN,
        C(b"DELE 1\r\nNOOP\r\n"),
        Durable(ok=True),
        S(b"+OK marked\r\n+OK\r\n"),
    ]
    out = run_all_modes(
        steps,
        Expect(
            upstream=LOGIN_UP + b"DELE 1\r\nNOOP\r\n",
            client=LOGIN_DOWN + b"+OK marked\r\n+OK\r\n",
            records=[
                "session.opened",
                "auth.succeeded",
                "dele.marked",
            ],
        ),
        modes=MODES,
        durable_deletions=True,
    )
    assert out.session.marked_for_deletion == {1}


def test_nothing_behind_the_dele_is_forwarded_before_the_record_is_durable() -> None:
    out = play([*LOGIN, C(b"DELE 1\r\nNOOP\r\n")], durable_deletions=True)
    assert out.upstream == LOGIN_UP
    pending = out.session.pending_durable
    assert pending is not None
    assert pending.event.value == "dele.requested"
    assert pending["msg"] == 1
    assert pending["user"] == "alice"


def test_dele_refused_when_the_record_cannot_be_written() -> None:
    steps = [*LOGIN, C(b"DELE 1\r\nNOOP\r\n"), Durable(ok=False), S(b"+OK\r\n")]
    out = run_all_modes(
        steps,
        Expect(
            upstream=LOGIN_UP + b"NOOP\r\n",
            client=LOGIN_DOWN + REPLY_AUDIT_UNAVAILABLE + b"+OK\r\n",
        ),
        modes=MODES,
        durable_deletions=True,
    )
    assert out.record("command.rejected")["reason"] == "audit trail unavailable"
    assert not out.session.marked_for_deletion


def test_half_closed_client_still_gets_its_dele_answered() -> None:
    # A client that half-closes after DELE still reads replies: the DELE
    # waits for its durable record, is answered, and the mark is then
    # discarded (no QUIT ever came).
    out = play([*LOGIN, C(b"DELE 1\r\n"), ClientEof()], durable_deletions=True)
    assert not out.session.finished
    assert out.session.pending_durable is not None
    out.session.durable_result(True)
    assert out.session.take_upstream_output() == b"DELE 1\r\n"
    out.session.receive_server(b"+OK marked\r\n")
    assert out.session.take_client_output() == b"+OK marked\r\n"
    assert out.session.finished
    events = [r.event.value for r in out.session.take_records()]
    assert events[-2:] == ["deletions.discarded", "session.closed"]


def test_session_ended_while_waiting_means_the_dele_is_never_sent() -> None:
    out = play([*LOGIN, C(b"DELE 1\r\n"), End(EndReason.CLIENT_ERROR)], durable_deletions=True)
    assert out.session.finished
    assert out.session.pending_durable is None
    out.session.durable_result(True)  # a late answer changes nothing
    assert out.session.take_upstream_output() == b""
    assert b"DELE" not in out.upstream
