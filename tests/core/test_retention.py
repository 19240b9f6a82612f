"""Retention in the core: a DELE under ``retain`` waits for a copy of its message.

The core hands the shell the message's bytes (unstuffed) as archive events
and parks the DELE at a gate; only the shell's answer lets it go upstream
(or refuses it).  Played whole and one byte at a time.
"""

from __future__ import annotations

import hashlib

from popguard.core.records import EndReason
from popguard.core.replies import REPLY_RETENTION_UNAVAILABLE
from popguard.core.retention import ArchiveBegin, ArchiveData, ArchiveEnd, ArchiveEvent

from .transcript import C, Durable, End, Expect, Retained, S, play, run_all_modes

GREETING = b"+OK ready\r\n"
LOGIN = [S(GREETING), C(b"USER alice\r\n"), S(b"+OK\r\n"), C(b"PASS pw\r\n"), S(b"+OK\r\n")]
LOGIN_UP = b"USER alice\r\nPASS pw\r\n"
LOGIN_DOWN = GREETING + b"+OK\r\n+OK\r\n"
#: Timing matters here (a DELE pipelined behind a RETR finds no copy yet).
MODES = ("whole", "bytewise")

#: A message with lines that need stuffing: one that is only ".", one
#: starting with "..", one starting with "." and text.
MESSAGE = b"Subject: dots\r\n\r\nline\r\n.\r\n..two\r\n.hidden\r\nend\r\n"
STUFFED = b"Subject: dots\r\n\r\nline\r\n..\r\n...two\r\n..hidden\r\nend\r\n"
DIGEST = hashlib.sha256(MESSAGE).hexdigest()
RETR_REPLY = b"+OK %d octets\r\n" % len(MESSAGE) + STUFFED + b".\r\n"
PATH = "alice/new/copy"


def archived_bytes(events: list[ArchiveEvent], msg: int) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, ArchiveData) and e.msg == msg)


def test_a_retrieved_message_is_archived_from_the_relayed_bytes_before_its_dele() -> None:
    steps = [
        *LOGIN,
        C(b"RETR 1\r\n"),
        S(RETR_REPLY),
        C(b"DELE 1\r\n"),
        Retained(ok=True, path=PATH),
        S(b"+OK marked\r\n"),
    ]
    out = run_all_modes(
        steps,
        Expect(
            upstream=LOGIN_UP + b"RETR 1\r\nDELE 1\r\n",
            client=LOGIN_DOWN + RETR_REPLY + b"+OK marked\r\n",
            records=[
                "session.opened",
                "auth.succeeded",
                {"event": "retention.active", "user": "alice"},
                {"event": "message.retrieved", "msg": 1, "digest": DIGEST},
                {
                    "event": "message.archived",
                    "msg": 1,
                    "digest": DIGEST,
                    "size": len(MESSAGE),
                    "path": PATH,
                    "stored": True,
                },
                {"event": "dele.marked", "msg": 1, "digest": DIGEST, "archived": PATH},
            ],
        ),
        modes=MODES,
        retain=True,
    )
    events = out.archive
    assert events[0] == ArchiveBegin(1, "alice", None)
    assert events[-1] == ArchiveEnd(1, DIGEST, len(MESSAGE))
    assert archived_bytes(events, 1) == MESSAGE


def test_nothing_reaches_the_server_while_the_dele_waits_for_its_copy() -> None:
    out = play([*LOGIN, C(b"RETR 1\r\n"), S(RETR_REPLY), C(b"DELE 1\r\nNOOP\r\n")], retain=True)
    assert out.upstream == LOGIN_UP + b"RETR 1\r\n"
    gate = out.session.pending_retention
    assert gate is not None
    assert (gate.msg, gate.account, gate.digest, gate.size) == (1, "alice", DIGEST, len(MESSAGE))


def test_a_message_not_yet_retrieved_is_fetched_unseen_by_the_client() -> None:
    steps = [
        *LOGIN,
        C(b"DELE 1\r\nNOOP\r\n"),
        S(b"+OK 1 AAA\r\n+OK 1 %d\r\n" % len(MESSAGE) + RETR_REPLY),
        Retained(ok=True, path=PATH, stored=False),
        S(b"+OK marked\r\n+OK\r\n"),
    ]
    out = run_all_modes(
        steps,
        Expect(
            upstream=LOGIN_UP + b"UIDL 1\r\nLIST 1\r\nRETR 1\r\nDELE 1\r\nNOOP\r\n",
            client=LOGIN_DOWN + b"+OK marked\r\n+OK\r\n",
            records=[
                "session.opened",
                "auth.succeeded",
                "retention.active",
                {
                    "event": "message.archived",
                    "msg": 1,
                    "uidl": "AAA",
                    "digest": DIGEST,
                    "stored": False,
                },
                {
                    "event": "dele.marked",
                    "msg": 1,
                    "uidl": "AAA",
                    "size": len(MESSAGE),
                    "digest": DIGEST,
                    "archived": PATH,
                },
            ],
        ),
        modes=MODES,
        retain=True,
        message_identity=True,
    )
    assert out.archive[0] == ArchiveBegin(1, "alice", "AAA")
    assert archived_bytes(out.archive, 1) == MESSAGE


def test_no_copy_no_deletion() -> None:
    steps = [
        *LOGIN,
        C(b"DELE 1\r\nNOOP\r\n"),
        S(RETR_REPLY),
        Retained(ok=False, reason="No space left on device"),
        S(b"+OK\r\n"),
    ]
    out = run_all_modes(
        steps,
        Expect(
            upstream=LOGIN_UP + b"RETR 1\r\nNOOP\r\n",
            client=LOGIN_DOWN + REPLY_RETENTION_UNAVAILABLE + b"+OK\r\n",
            records=[
                "session.opened",
                "auth.succeeded",
                "retention.active",
                {"event": "retention.failed", "msg": 1, "reason": "No space left on device"},
            ],
        ),
        modes=MODES,
        retain=True,
    )
    assert out.session.marked_for_deletion == set()


def test_a_refused_fetch_refuses_the_dele() -> None:
    steps = [*LOGIN, C(b"DELE 9\r\n"), S(b"-ERR no such message\r\n")]
    run_all_modes(
        steps,
        Expect(
            upstream=LOGIN_UP + b"RETR 9\r\n",
            client=LOGIN_DOWN + REPLY_RETENTION_UNAVAILABLE,
            records=[
                "session.opened",
                "auth.succeeded",
                "retention.active",
                {
                    "event": "retention.failed",
                    "msg": 9,
                    "reason": "the server refused RETR: no such message",
                },
            ],
        ),
        modes=MODES,
        retain=True,
    )


def test_a_session_that_ends_at_the_gate_never_sends_the_dele() -> None:
    steps = [*LOGIN, C(b"DELE 1\r\n"), S(RETR_REPLY), End(EndReason.CLIENT_CLOSED)]
    out = run_all_modes(
        steps,
        Expect(upstream=LOGIN_UP + b"RETR 1\r\n", finished=True),
        modes=MODES,
        retain=True,
    )
    assert out.session.pending_retention is None
    assert "dele.marked" not in out.events()


def test_a_copy_that_failed_is_fetched_again_by_the_next_dele() -> None:
    steps = [
        *LOGIN,
        C(b"RETR 1\r\n"),
        S(RETR_REPLY),
        C(b"DELE 1\r\n"),
        Retained(ok=False, reason="Input/output error"),
        C(b"DELE 1\r\n"),
        S(RETR_REPLY),
        Retained(ok=True, path=PATH),
        S(b"+OK\r\n"),
    ]
    run_all_modes(
        steps,
        Expect(
            upstream=LOGIN_UP + b"RETR 1\r\nRETR 1\r\nDELE 1\r\n",
            client=LOGIN_DOWN + RETR_REPLY + REPLY_RETENTION_UNAVAILABLE + b"+OK\r\n",
        ),
        modes=MODES,
        retain=True,
    )


def test_retention_and_a_durable_record_both_come_before_the_dele() -> None:
    steps = [
        *LOGIN,
        C(b"DELE 1\r\n"),
        S(RETR_REPLY),
        Retained(ok=True, path=PATH),
        Durable(ok=True),
        S(b"+OK\r\n"),
    ]
    out = run_all_modes(
        steps,
        Expect(upstream=LOGIN_UP + b"RETR 1\r\nDELE 1\r\n", client=LOGIN_DOWN + b"+OK\r\n"),
        modes=MODES,
        retain=True,
        durable_deletions=True,
    )
    assert out.session.marked_for_deletion == {1}


def test_without_retain_a_dele_goes_straight_on_and_retr_records_carry_the_digest() -> None:
    steps = [
        *LOGIN,
        C(b"RETR 1\r\n"),
        S(b"+OK 1 AAA\r\n+OK 1 %d\r\n" % len(MESSAGE) + RETR_REPLY),
        C(b"DELE 1\r\n"),
        S(b"+OK\r\n"),
    ]
    out = run_all_modes(
        steps,
        Expect(
            upstream=LOGIN_UP + b"UIDL 1\r\nLIST 1\r\nRETR 1\r\nDELE 1\r\n",
            client=LOGIN_DOWN + RETR_REPLY + b"+OK\r\n",
            records=[
                "session.opened",
                "auth.succeeded",
                {"event": "message.retrieved", "uidl": "AAA", "digest": DIGEST},
                {"event": "dele.marked", "uidl": "AAA", "digest": DIGEST},
            ],
        ),
        modes=MODES,
        message_identity=True,
    )
    assert out.archive == []


def test_top_is_not_the_message_and_gets_no_digest() -> None:
    top = b"+OK\r\nSubject: dots\r\n\r\n.\r\n"
    out = play([*LOGIN, C(b"TOP 1 0\r\n"), S(top)], retain=True)
    retrieved = out.record("message.retrieved")
    assert "digest" not in retrieved.fields
    assert out.archive == []


def test_content_digests_off_leaves_retr_records_without_one_but_retention_keeps_its_own() -> None:
    steps = [*LOGIN, C(b"RETR 1\r\n"), S(b"+OK 1 AAA\r\n+OK 1 %d\r\n" % len(MESSAGE) + RETR_REPLY)]
    out = play(steps, message_identity=True, content_digests=False)
    assert "digest" not in out.record("message.retrieved").fields
    assert out.session.messages.digests == {}
    # Under retain the copy is still followed and named by its digest.
    retained = play(
        [*LOGIN, C(b"DELE 1\r\n"), S(RETR_REPLY), Retained(ok=True, path=PATH)],
        retain=True,
        content_digests=False,
    )
    assert retained.record("message.archived")["digest"] == DIGEST
