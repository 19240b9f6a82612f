"""Message identity: UIDL and size looked up upstream, invisibly to the client."""

from __future__ import annotations

from .transcript import C, ClientEof, Expect, S, play, run_all_modes

GREETING = b"+OK ready <1.2@x>\r\n"
LOGIN = [S(GREETING), C(b"USER alice\r\n"), S(b"+OK\r\n"), C(b"PASS pw\r\n"), S(b"+OK\r\n")]
LOGIN_DOWN = GREETING + b"+OK\r\n+OK\r\n"
RETR_REPLY = b"+OK 12 octets\r\nSubject: a\r\n\r\n.\r\n"
MODES = ("whole", "bytewise")


def test_retr_is_preceded_by_invisible_uidl_and_list() -> None:
    steps = [
        *LOGIN,
        C(b"RETR 1\r\n"),
        S(b"+OK 1 AAA-111\r\n+OK 1 12\r\n" + RETR_REPLY),
        C(b"NOOP\r\n"),
        S(b"+OK\r\n"),
    ]
    out = run_all_modes(
        steps,
        Expect(
            upstream=b"USER alice\r\nPASS pw\r\nUIDL 1\r\nLIST 1\r\nRETR 1\r\nNOOP\r\n",
            client=LOGIN_DOWN + RETR_REPLY + b"+OK\r\n",
        ),
        modes=MODES,
        message_identity=True,
    )
    record = out.record("message.retrieved")
    assert (record["msg"], record["uidl"], record["size"]) == (1, "AAA-111", 12)


def test_client_bytes_are_identical_with_and_without_identity() -> None:
    tail = [C(b"DELE 1\r\n"), S(b"+OK\r\n"), C(b"QUIT\r\n"), S(b"+OK bye\r\n")]
    plain = play([*LOGIN, C(b"RETR 1\r\n"), S(RETR_REPLY), *tail])
    looked_up = play(
        [*LOGIN, C(b"RETR 1\r\n"), S(b"+OK 1 u1\r\n+OK 1 12\r\n" + RETR_REPLY), *tail],
        message_identity=True,
    )
    assert looked_up.client == plain.client
    # Message 1 is known after RETR: DELE 1 needs no second lookup.
    assert looked_up.upstream.count(b"UIDL 1") == 1
    committed = looked_up.record("deletions.committed")["messages"]
    assert committed == ({"msg": 1, "uidl": "u1", "size": 12},)


def test_deletion_lifecycle_records_carry_identity() -> None:
    steps = [
        *LOGIN,
        C(b"DELE 2\r\n"),
        S(b"+OK 2 BBB\r\n+OK 2 900\r\n+OK marked\r\n"),
        C(b"RSET\r\n"),
        S(b"+OK\r\n"),
        C(b"DELE 2\r\n"),
        S(b"+OK marked\r\n"),
        ClientEof(),
    ]
    out = run_all_modes(steps, Expect(), modes=MODES, message_identity=True)
    ident = {"msg": 2, "uidl": "BBB", "size": 900}
    assert [r["uidl"] for r in out.records if r.event.value == "dele.marked"] == ["BBB", "BBB"]
    assert out.record("dele.unmarked")["messages"] == (ident,)
    assert out.record("deletions.discarded")["messages"] == (ident,)


def test_server_without_uidl_is_not_asked_again() -> None:
    steps = [
        *LOGIN,
        C(b"RETR 1\r\n"),
        S(b"-ERR unknown command\r\n+OK 1 12\r\n" + RETR_REPLY),
        C(b"RETR 2\r\n"),
        S(b"+OK 2 12\r\n" + RETR_REPLY),
    ]
    out = run_all_modes(
        steps,
        Expect(
            upstream=b"USER alice\r\nPASS pw\r\nUIDL 1\r\nLIST 1\r\nRETR 1\r\nLIST 2\r\nRETR 2\r\n",
            client=LOGIN_DOWN + RETR_REPLY * 2,
        ),
        modes=MODES,
        message_identity=True,
    )
    sizes = [(r["msg"], r["size"]) for r in out.records if r.event.value == "message.retrieved"]
    assert sizes == [(1, 12), (2, 12)]
    assert all("uidl" not in r.fields for r in out.records)


def test_lookup_errors_never_reach_the_client() -> None:
    # A message that does not exist: the lookups fail, the client sees only
    # the server's answer to its own command.
    steps = [
        *LOGIN,
        C(b"DELE 9\r\n"),
        S(b"-ERR no such message\r\n-ERR no such message\r\n-ERR no such message\r\n"),
    ]
    run_all_modes(
        steps,
        Expect(client=LOGIN_DOWN + b"-ERR no such message\r\n"),
        modes=MODES,
        message_identity=True,
    )


def test_missing_message_does_not_turn_uidl_lookups_off() -> None:
    # UIDL 9 fails because message 9 does not exist (LIST 9 fails too), not
    # because the server lacks UIDL: message 1 must still be named by UIDL.
    steps = [
        *LOGIN,
        C(b"RETR 9\r\n"),
        S(b"-ERR no such message\r\n-ERR no such message\r\n-ERR no such message\r\n"),
        C(b"RETR 1\r\n"),
        S(b"+OK 1 AAA\r\n+OK 1 12\r\n" + RETR_REPLY),
    ]
    out = run_all_modes(
        steps,
        Expect(
            upstream=b"USER alice\r\nPASS pw\r\nUIDL 9\r\nLIST 9\r\nRETR 9\r\n"
            b"UIDL 1\r\nLIST 1\r\nRETR 1\r\n",
            client=LOGIN_DOWN + b"-ERR no such message\r\n" + RETR_REPLY,
        ),
        modes=MODES,
        message_identity=True,
    )
    record = out.record("message.retrieved")
    assert (record["msg"], record["uidl"], record["size"]) == (1, "AAA", 12)


def test_commands_pipelined_behind_pass_wait_for_it_and_are_looked_up() -> None:
    # Held until the login's reply: only then is the account known, and
    # the message can be named by UIDL like any other.
    steps = [
        S(GREETING),
        C(b"USER alice\r\nPASS pw\r\nRETR 1\r\n"),
        S(b"+OK\r\n+OK\r\n"),
        S(b"+OK 1 AAA-111\r\n+OK 1 12\r\n" + RETR_REPLY),
    ]
    out = run_all_modes(
        steps,
        Expect(upstream=b"USER alice\r\nPASS pw\r\nUIDL 1\r\nLIST 1\r\nRETR 1\r\n"),
        modes=MODES,
        message_identity=True,
    )
    assert out.record("message.retrieved")["uidl"] == "AAA-111"


def test_local_error_keeps_its_place_behind_lookups() -> None:
    steps = [
        *LOGIN,
        C(b"RETR 1\r\n\x00\r\n"),
        S(b"+OK 1 u\r\n+OK 1 12\r\n" + RETR_REPLY),
    ]
    run_all_modes(
        steps,
        Expect(
            client=LOGIN_DOWN + RETR_REPLY + b"-ERR Command line contains control characters\r\n"
        ),
        modes=MODES,
        message_identity=True,
    )


def test_invalid_uidl_from_server_is_not_recorded() -> None:
    steps = [*LOGIN, C(b"RETR 1\r\n"), S(b"+OK 1 bad\x01uid\r\n+OK 1 12\r\n" + RETR_REPLY)]
    out = run_all_modes(steps, Expect(), modes=MODES, message_identity=True)
    record = out.record("message.retrieved")
    assert "uidl" not in record.fields
    assert record["size"] == 12
