"""Message identity: UIDL and size looked up upstream, invisibly to the client."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popguard.core import messages as messages_module

from .transcript import (
    C,
    ClientEof,
    Expect,
    Outcome,
    S,
    ServerEof,
    new_session,
    play,
    run_all_modes,
)

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
    # The content was seen whole (RETR): its SHA-256 names it too.
    digest = hashlib.sha256(b"Subject: a\r\n\r\n").hexdigest()
    assert committed == ({"msg": 1, "uidl": "u1", "size": 12, "digest": digest},)


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
        # The second message: popguard's own STAT comes along (see
        # test_a_walked_maildrop_is_listed_once).
        S(b"+OK 2 24\r\n+OK 2 12\r\n" + RETR_REPLY),
    ]
    out = run_all_modes(
        steps,
        Expect(
            upstream=b"USER alice\r\nPASS pw\r\nUIDL 1\r\nLIST 1\r\nRETR 1\r\n"
            b"STAT\r\nLIST 2\r\nRETR 2\r\n",
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
        S(b"+OK 2 24\r\n+OK 1 AAA\r\n+OK 1 12\r\n" + RETR_REPLY),
    ]
    out = run_all_modes(
        steps,
        Expect(
            upstream=b"USER alice\r\nPASS pw\r\nUIDL 9\r\nLIST 9\r\nRETR 9\r\n"
            b"STAT\r\nUIDL 1\r\nLIST 1\r\nRETR 1\r\n",
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


# -- learning identity from the client's own UIDL and LIST --------------------------

UIDL_LISTING = b"+OK\r\n1 AAA-111\r\n2 BBB\r\n.\r\n"
LIST_LISTING = b"+OK 2 messages (912 octets)\r\n1 12\r\n2 900\r\n.\r\n"
LOGIN_UP = b"USER alice\r\nPASS pw\r\n"


def retrieved(out: Outcome) -> list[tuple[object, object, object]]:
    return [
        (r["msg"], r.fields.get("uidl"), r.fields.get("size"))
        for r in out.records
        if r.event.value == "message.retrieved"
    ]


def test_uidl_and_list_listings_make_lookups_unnecessary() -> None:
    steps = [
        *LOGIN,
        C(b"UIDL\r\n"),
        S(UIDL_LISTING),
        C(b"LIST\r\n"),
        S(LIST_LISTING),
        C(b"RETR 1\r\n"),
        S(RETR_REPLY),
        C(b"DELE 2\r\n"),
        S(b"+OK\r\n"),
        C(b"QUIT\r\n"),
        S(b"+OK bye\r\n"),
    ]
    out = run_all_modes(
        steps,
        Expect(
            upstream=LOGIN_UP + b"UIDL\r\nLIST\r\nRETR 1\r\nDELE 2\r\nQUIT\r\n",
            client=LOGIN_DOWN + UIDL_LISTING + LIST_LISTING + RETR_REPLY + b"+OK\r\n+OK bye\r\n",
        ),
        modes=MODES,
        message_identity=True,
    )
    assert retrieved(out) == [(1, "AAA-111", 12)]
    ident = {"msg": 2, "uidl": "BBB", "size": 900}
    assert {k: out.record("dele.marked")[k] for k in ident} == ident
    assert out.record("deletions.committed")["messages"] == (ident,)


def test_list_listing_leaves_only_uidl_to_look_up() -> None:
    steps = [
        *LOGIN,
        C(b"LIST\r\n"),
        S(LIST_LISTING),
        C(b"RETR 1\r\n"),
        S(b"+OK 1 AAA-111\r\n" + RETR_REPLY),
    ]
    out = run_all_modes(
        steps,
        Expect(
            upstream=LOGIN_UP + b"LIST\r\nUIDL 1\r\nRETR 1\r\n",
            client=LOGIN_DOWN + LIST_LISTING + RETR_REPLY,
        ),
        modes=MODES,
        message_identity=True,
    )
    assert retrieved(out) == [(1, "AAA-111", 12)]


def test_uidl_listing_leaves_only_the_size_to_look_up() -> None:
    steps = [
        *LOGIN,
        C(b"UIDL\r\n"),
        S(UIDL_LISTING),
        C(b"TOP 2 0\r\n"),
        S(b"+OK 2 900\r\n" + RETR_REPLY),
    ]
    out = run_all_modes(
        steps,
        Expect(
            upstream=LOGIN_UP + b"UIDL\r\nLIST 2\r\nTOP 2 0\r\n",
            client=LOGIN_DOWN + UIDL_LISTING + RETR_REPLY,
        ),
        modes=MODES,
        message_identity=True,
    )
    assert retrieved(out) == [(2, "BBB", 900)]


def test_single_line_uidl_and_list_replies_are_learnt() -> None:
    steps = [
        *LOGIN,
        C(b"UIDL 1\r\n"),
        S(b"+OK 1 AAA-111\r\n"),
        C(b"LIST 1\r\n"),
        S(b"+OK 1 12\r\n"),
        C(b"RETR 1\r\n"),
        S(RETR_REPLY),
        # A reply naming another message than the one asked for is not learnt.
        C(b"UIDL 2\r\n"),
        S(b"+OK 3 CCC\r\n"),
        C(b"LIST 2\r\n"),
        S(b"+OK 2 900 octets\r\n"),  # RFC 1939 §5: anything may follow the size
        C(b"RETR 2\r\n"),
        S(b"+OK 2 BBB\r\n" + RETR_REPLY),
    ]
    out = run_all_modes(
        steps,
        Expect(
            upstream=LOGIN_UP + b"UIDL 1\r\nLIST 1\r\nRETR 1\r\nUIDL 2\r\nLIST 2\r\n"
            b"UIDL 2\r\nRETR 2\r\n",
            client=LOGIN_DOWN
            + b"+OK 1 AAA-111\r\n+OK 1 12\r\n"
            + RETR_REPLY
            + b"+OK 3 CCC\r\n+OK 2 900 octets\r\n"
            + RETR_REPLY,
        ),
        modes=MODES,
        message_identity=True,
    )
    assert retrieved(out) == [(1, "AAA-111", 12), (2, "BBB", 900)]


def test_pipelined_listings_in_one_read() -> None:
    # Both listings and the status line behind them arrive in one read: the
    # reader goes INDEX -> STATUS -> INDEX -> STATUS within it.
    steps = [
        *LOGIN,
        C(b"UIDL\r\nLIST\r\nNOOP\r\n"),
        S(UIDL_LISTING + LIST_LISTING + b"+OK\r\n"),
        C(b"DELE 1\r\n"),
        S(b"+OK\r\n"),
    ]
    out = run_all_modes(
        steps,
        Expect(
            upstream=LOGIN_UP + b"UIDL\r\nLIST\r\nNOOP\r\nDELE 1\r\n",
            client=LOGIN_DOWN + UIDL_LISTING + LIST_LISTING + b"+OK\r\n+OK\r\n",
        ),
        modes=MODES,
        message_identity=True,
    )
    marked = out.record("dele.marked")
    assert (marked["uidl"], marked["size"]) == ("AAA-111", 12)


MALFORMED = (
    b"+OK\r\n"
    b"1 AAA\r\n"
    b"garbage\r\n"
    b"2\r\n"
    b"x 5\r\n"
    b"3 bad\x01uid\r\n"
    b"4 DDD\n"  # a bare LF: not learnt
    b"..5 stuffed\r\n"  # byte-stuffed ".5 stuffed": no number
    b"6 " + b"F" * 600 + b"\r\n"  # too long to learn from (and no UIDL anyway)
    b"7 GGG\r\n"
    b"8 \xff\xfe\r\n"
    b"\r\n.\r\n"  # an empty line just before the terminator
)


def test_malformed_listing_lines_are_relayed_and_skipped() -> None:
    steps = [
        *LOGIN,
        C(b"UIDL\r\n"),
        S(MALFORMED),
        C(b"NOOP\r\n"),
        S(b"+OK\r\n"),
    ]
    out = run_all_modes(
        steps,
        Expect(
            upstream=LOGIN_UP + b"UIDL\r\nNOOP\r\n",
            client=LOGIN_DOWN + MALFORMED + b"+OK\r\n",
            finished=False,
        ),
        modes=MODES,
        message_identity=True,
    )
    assert out.session.messages.uidls == {1: "AAA", 7: "GGG"}
    assert "upstream.protocol_error" not in out.events()


def test_long_and_stuffed_lines_do_not_hide_later_ones() -> None:
    listing = b"+OK\r\n1 " + b"9" * 700 + b"\r\n.2 200\r\n...\r\n3 300\r\n.\r\n"
    steps = [*LOGIN, C(b"LIST\r\n"), S(listing)]
    out = run_all_modes(
        steps,
        Expect(client=LOGIN_DOWN + listing),
        modes=MODES,
        message_identity=True,
    )
    # ".2 200" is "2 200" byte-stuffed (RFC 1939 §3), as the client reads it.
    assert out.session.messages.sizes == {2: 200, 3: 300}


def _split_everywhere(data: bytes) -> list[list[bytes]]:
    return [[data[:i], data[i:]] for i in range(1, len(data))] + [
        [data[:i], data[i:j], data[j:]]
        for i in range(1, len(data))
        for j in range(i + 1, min(len(data), i + 7))
    ]


def test_listing_split_across_reads_at_every_byte() -> None:
    server = UIDL_LISTING + LIST_LISTING + b"+OK\r\n"
    for chunks in _split_everywhere(server):
        session = new_session(message_identity=True)
        session.receive_server(GREETING)
        session.receive_client(b"USER alice\r\n")
        session.receive_server(b"+OK\r\n")
        session.receive_client(b"PASS pw\r\n")
        session.receive_server(b"+OK\r\n")
        session.take_client_output()
        session.take_upstream_output()
        session.receive_client(b"UIDL\r\nLIST\r\nNOOP\r\n")
        client = bytearray()
        for chunk in chunks:
            session.receive_server(chunk)
            client += session.take_client_output()
        assert bytes(client) == server, chunks
        assert session.messages.uidls == {1: "AAA-111", 2: "BBB"}, chunks
        assert session.messages.sizes == {1: 12, 2: 900}, chunks
        assert not session.finished
        assert not session.reply_in_progress
        session.receive_client(b"TOP 2 0\r\n")  # known: no lookup
        assert session.take_upstream_output() == b"UIDL\r\nLIST\r\nNOOP\r\nTOP 2 0\r\n"


def test_listing_cut_short_is_left_cut_short() -> None:
    steps = [*LOGIN, C(b"UIDL\r\n"), S(b"+OK\r\n1 AAA\r\n2 B"), ServerEof()]
    out = run_all_modes(
        steps,
        Expect(client=LOGIN_DOWN + b"+OK\r\n1 AAA\r\n2 B", finished=True),
        modes=MODES,
        message_identity=True,
    )
    assert "in the middle of a multi-line reply" in str(out.record("session.closed")["detail"])


def test_server_without_uidl_learns_from_list_and_asks_nothing() -> None:
    steps = [
        *LOGIN,
        C(b"UIDL\r\n"),
        S(b"-ERR Unknown command\r\n"),
        C(b"LIST\r\n"),
        S(LIST_LISTING),
        C(b"RETR 1\r\n"),
        S(RETR_REPLY),
        C(b"RETR 3\r\n"),  # not in the listing: its size is asked, UIDL no more
        S(b"-ERR no such message\r\n-ERR no such message\r\n"),
    ]
    out = run_all_modes(
        steps,
        Expect(
            upstream=LOGIN_UP + b"UIDL\r\nLIST\r\nRETR 1\r\nLIST 3\r\nRETR 3\r\n",
            client=LOGIN_DOWN
            + b"-ERR Unknown command\r\n"
            + LIST_LISTING
            + RETR_REPLY
            + b"-ERR no such message\r\n",
        ),
        modes=MODES,
        message_identity=True,
    )
    assert retrieved(out) == [(1, None, 12)]


def test_uidl_lookup_refused_for_a_listed_message_means_no_uidl() -> None:
    # The size is known (LIST listing), so UIDL 1 goes alone; its -ERR for a
    # message that exists says the server has no UIDL: not asked again.
    steps = [
        *LOGIN,
        C(b"LIST\r\n"),
        S(LIST_LISTING),
        C(b"RETR 1\r\n"),
        S(b"-ERR unknown command\r\n" + RETR_REPLY),
        C(b"RETR 2\r\n"),
        S(RETR_REPLY),
    ]
    out = run_all_modes(
        steps,
        Expect(
            upstream=LOGIN_UP + b"LIST\r\nUIDL 1\r\nRETR 1\r\nRETR 2\r\n",
            client=LOGIN_DOWN + LIST_LISTING + RETR_REPLY * 2,
        ),
        modes=MODES,
        message_identity=True,
    )
    assert retrieved(out) == [(1, None, 12), (2, None, 900)]


def test_uncertain_uidl_errors_keep_lookups_on() -> None:
    # A client's "UIDL n" -ERR may mean "no such message"; a bare UIDL's
    # -ERR with a response code is a temporary trouble, not "no UIDL".
    steps = [
        *LOGIN,
        C(b"UIDL 9\r\n"),
        S(b"-ERR no such message\r\n"),
        C(b"UIDL\r\n"),
        S(b"-ERR [SYS/TEMP] try again\r\n"),
        C(b"RETR 1\r\n"),
        S(b"+OK 1 AAA\r\n+OK 1 12\r\n" + RETR_REPLY),
    ]
    out = run_all_modes(
        steps,
        Expect(upstream=LOGIN_UP + b"UIDL 9\r\nUIDL\r\nUIDL 1\r\nLIST 1\r\nRETR 1\r\n"),
        modes=MODES,
        message_identity=True,
    )
    assert retrieved(out) == [(1, "AAA", 12)]


def test_temporary_uidl_lookup_error_does_not_turn_uidl_off() -> None:
    steps = [
        *LOGIN,
        C(b"RETR 1\r\n"),
        S(b"-ERR [SYS/TEMP] busy\r\n+OK 1 12\r\n" + RETR_REPLY),
        C(b"RETR 2\r\n"),
        S(b"+OK 2 912\r\n+OK 2 BBB\r\n+OK 2 900\r\n" + RETR_REPLY),
    ]
    out = run_all_modes(
        steps,
        Expect(
            upstream=LOGIN_UP
            + b"UIDL 1\r\nLIST 1\r\nRETR 1\r\nSTAT\r\nUIDL 2\r\nLIST 2\r\nRETR 2\r\n"
        ),
        modes=MODES,
        message_identity=True,
    )
    assert retrieved(out) == [(1, None, 12), (2, "BBB", 900)]


def test_nothing_is_learnt_before_login_or_with_identity_off() -> None:
    before_login = [
        S(GREETING),
        C(b"UIDL\r\n"),
        S(b"+OK\r\n1 AAA\r\n.\r\n"),  # a server that lists before login: not trusted
        C(b"USER alice\r\n"),
        S(b"+OK\r\n"),
        C(b"PASS pw\r\n"),
        S(b"+OK\r\n"),
        C(b"RETR 1\r\n"),
        S(b"+OK 1 AAA\r\n+OK 1 12\r\n" + RETR_REPLY),
    ]
    run_all_modes(
        before_login,
        Expect(upstream=b"UIDL\r\n" + LOGIN_UP + b"UIDL 1\r\nLIST 1\r\nRETR 1\r\n"),
        modes=MODES,
        message_identity=True,
    )
    off = [*LOGIN, C(b"UIDL\r\n"), S(UIDL_LISTING), C(b"RETR 1\r\n"), S(RETR_REPLY)]
    out = run_all_modes(
        off,
        Expect(
            upstream=LOGIN_UP + b"UIDL\r\nRETR 1\r\n",
            client=LOGIN_DOWN + UIDL_LISTING + RETR_REPLY,
        ),
        modes=MODES,
    )
    assert retrieved(out) == [(1, None, None)]
    assert out.session.messages.uidls == {}


def test_learning_stops_at_the_cache_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(messages_module, "MAX_IDENTITY_CACHE", 2)
    listing = b"+OK\r\n1 A\r\n2 B\r\n3 C\r\n.\r\n"
    steps = [*LOGIN, C(b"UIDL\r\n"), S(listing), C(b"UIDL 1\r\n"), S(b"+OK 1 A2\r\n")]
    out = run_all_modes(
        steps,
        Expect(client=LOGIN_DOWN + listing + b"+OK 1 A2\r\n"),
        modes=MODES,
        message_identity=True,
    )
    assert out.session.messages.uidls == {1: "A2", 2: "B"}  # known ones still update


_LISTING_LINES = st.lists(
    st.one_of(
        st.builds(
            lambda dot, n, value, tail: dot + b"%d " % n + value + tail + b"\r\n",
            st.sampled_from([b"", b"."]),
            st.integers(0, 60),
            st.sampled_from([b"u1", b"AAA-111", b"x" * 70, b"x" * 71, b"12", b"b\x01d", b""]),
            st.sampled_from([b"", b" more", b" " + b"z" * 400, b" " + b"z" * 401, b"\n"]),
        ),
        st.binary(max_size=12).map(lambda b: b.replace(b"\n", b"\r\n")),
    ),
    max_size=25,
)


def _learnt(listing: bytes, uidl: bool, cuts: list[int]) -> tuple[bytes, object]:
    session = new_session(message_identity=True)
    for data, client in ((GREETING, b"USER alice\r\n"), (b"+OK\r\n", b"PASS pw\r\n")):
        session.receive_server(data)
        session.receive_client(client)
    session.receive_server(b"+OK\r\n")
    session.take_client_output()
    session.receive_client(b"UIDL\r\nNOOP\r\n" if uidl else b"LIST\r\nNOOP\r\n")
    server = b"+OK\r\n" + listing + b".\r\n+OK\r\n"
    client = bytearray()
    pos = 0
    for cut in [*sorted(set(cuts)), len(server)]:
        if pos < cut <= len(server):
            session.receive_server(server[pos:cut])
            client += session.take_client_output()
            pos = cut
    assert bytes(client) == server
    assert session.replies_owed == 0
    return bytes(client), session.messages.uidls if uidl else session.messages.sizes


@settings(max_examples=300, deadline=None)
@given(_LISTING_LINES, st.booleans(), st.lists(st.integers(1, 2000), max_size=30))
def test_what_is_learnt_does_not_depend_on_read_boundaries(
    lines: list[bytes], uidl: bool, cuts: list[int]
) -> None:
    listing = b"".join(lines)
    if not listing.endswith(b"\r\n"):
        listing += b"\r\n"
    listing = b"\r\n" + listing
    while b"\r\n.\r\n" in listing:  # no early terminator
        listing = listing.replace(b"\r\n.\r\n", b"\r\n..\r\n")
    listing = listing[2:]
    whole = _learnt(listing, uidl, [])
    assert _learnt(listing, uidl, cuts) == whole
    assert _learnt(listing, uidl, list(range(1, len(listing) + 12))) == whole


def test_fetchmail_style_list_n_before_each_retr() -> None:
    # fetchmail 6.4 (--all) sends LIST n before each RETR n: only UIDL n is
    # left to ask; on a server without UIDL, after the first -ERR nothing is.
    with_uidl = [
        *LOGIN,
        C(b"LIST 1\r\n"),
        S(b"+OK 1 12\r\n"),
        C(b"RETR 1\r\n"),
        S(b"+OK 1 AAA\r\n" + RETR_REPLY),
    ]
    out = run_all_modes(
        with_uidl,
        Expect(upstream=LOGIN_UP + b"LIST 1\r\nUIDL 1\r\nRETR 1\r\n"),
        modes=MODES,
        message_identity=True,
    )
    assert retrieved(out) == [(1, "AAA", 12)]
    without_uidl = [
        *LOGIN,
        C(b"LIST 1\r\n"),
        S(b"+OK 1 12\r\n"),
        C(b"RETR 1\r\n"),
        S(b"-ERR Unknown command\r\n" + RETR_REPLY),
        C(b"LIST 2\r\n"),
        S(b"+OK 2 900\r\n"),
        C(b"RETR 2\r\n"),
        S(RETR_REPLY),
    ]
    out = run_all_modes(
        without_uidl,
        Expect(
            upstream=LOGIN_UP + b"LIST 1\r\nUIDL 1\r\nRETR 1\r\nLIST 2\r\nRETR 2\r\n",
            client=LOGIN_DOWN + b"+OK 1 12\r\n" + RETR_REPLY + b"+OK 2 900\r\n" + RETR_REPLY,
        ),
        modes=MODES,
        message_identity=True,
    )
    assert retrieved(out) == [(1, None, 12), (2, None, 900)]


# -- a maildrop walked with RETR alone is listed once --------------------------

WALK_UIDLS = b"+OK\r\n1 AAA\r\n2 BBB\r\n3 CCC\r\n4 DDD\r\n.\r\n"
WALK_SIZES = b"+OK 4 messages\r\n1 12\r\n2 12\r\n3 300\r\n4 400\r\n.\r\n"
#: A client that sent STAT (4 messages), then RETR 1, looked up on its own.
STAT_FIRST = [
    *LOGIN,
    C(b"STAT\r\n"),
    S(b"+OK 4 724\r\n"),
    C(b"RETR 1\r\n"),
    S(b"+OK 1 AAA\r\n+OK 1 12\r\n" + RETR_REPLY),
]
STAT_FIRST_UP = LOGIN_UP + b"STAT\r\nUIDL 1\r\nLIST 1\r\nRETR 1\r\n"


def test_a_walked_maildrop_is_listed_once() -> None:
    # The first message is looked up alone; the second brings popguard's own
    # STAT; from the third on, one bare UIDL and LIST name them all.
    steps = [
        *LOGIN,
        C(b"RETR 1\r\n"),
        S(b"+OK 1 AAA\r\n+OK 1 12\r\n" + RETR_REPLY),
        C(b"RETR 2\r\n"),
        S(b"+OK 4 724\r\n+OK 2 BBB\r\n+OK 2 12\r\n" + RETR_REPLY),
        C(b"RETR 3\r\n"),
        S(WALK_UIDLS + WALK_SIZES + RETR_REPLY),
        C(b"RETR 4\r\n"),
        S(RETR_REPLY),
        C(b"DELE 4\r\n"),
        S(b"+OK marked\r\n"),
    ]
    out = run_all_modes(
        steps,
        Expect(
            upstream=LOGIN_UP
            + b"UIDL 1\r\nLIST 1\r\nRETR 1\r\nSTAT\r\nUIDL 2\r\nLIST 2\r\nRETR 2\r\n"
            b"UIDL\r\nLIST\r\nRETR 3\r\nRETR 4\r\nDELE 4\r\n",
            # Nothing of popguard's own reaches the client.
            client=LOGIN_DOWN + RETR_REPLY * 4 + b"+OK marked\r\n",
        ),
        modes=MODES,
        message_identity=True,
    )
    assert retrieved(out) == [(1, "AAA", 12), (2, "BBB", 12), (3, "CCC", 300), (4, "DDD", 400)]
    assert out.record("dele.marked")["uidl"] == "DDD"
    # What was relayed to the client is exactly what the client asked for.
    assert out.session.bytes_to_client == len(LOGIN_DOWN + RETR_REPLY * 4 + b"+OK marked\r\n")


def test_a_client_stat_lets_the_second_message_list_the_maildrop() -> None:
    steps = [
        *STAT_FIRST,
        C(b"RETR 3\r\n"),
        S(WALK_UIDLS + WALK_SIZES + RETR_REPLY),
    ]
    out = run_all_modes(
        steps,
        Expect(
            upstream=STAT_FIRST_UP + b"UIDL\r\nLIST\r\nRETR 3\r\n",
            client=LOGIN_DOWN + b"+OK 4 724\r\n" + RETR_REPLY * 2,
        ),
        modes=MODES,
        message_identity=True,
    )
    assert retrieved(out) == [(1, "AAA", 12), (3, "CCC", 300)]


def test_pipelined_commands_wait_for_the_listing_instead_of_asking() -> None:
    # RETR 2..4 arrive at once: the listing the first of them brings names
    # the others; nothing more is asked while it is unanswered.
    steps = [
        *STAT_FIRST,
        C(b"RETR 2\r\nRETR 3\r\nDELE 4\r\n"),
        S(WALK_UIDLS + WALK_SIZES + RETR_REPLY * 2 + b"+OK marked\r\n"),
    ]
    out = run_all_modes(
        steps,
        Expect(
            upstream=STAT_FIRST_UP + b"UIDL\r\nLIST\r\nRETR 2\r\nRETR 3\r\nDELE 4\r\n",
            client=LOGIN_DOWN + b"+OK 4 724\r\n" + RETR_REPLY * 3 + b"+OK marked\r\n",
        ),
        modes=MODES,
        message_identity=True,
    )
    assert retrieved(out) == [(1, "AAA", 12), (2, "BBB", 12), (3, "CCC", 300)]
    assert (out.record("dele.marked")["uidl"], out.record("dele.marked")["size"]) == ("DDD", 400)


def test_a_large_maildrop_is_looked_up_one_message_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(messages_module, "LISTING_MAX", 3)
    steps = [
        *STAT_FIRST,
        C(b"RETR 3\r\n"),
        S(b"+OK 3 CCC\r\n+OK 3 300\r\n" + RETR_REPLY),
    ]
    out = run_all_modes(
        steps,
        Expect(upstream=STAT_FIRST_UP + b"UIDL 3\r\nLIST 3\r\nRETR 3\r\n"),
        modes=MODES,
        message_identity=True,
    )
    assert retrieved(out) == [(1, "AAA", 12), (3, "CCC", 300)]


def test_a_message_the_listing_missed_is_looked_up_on_its_own() -> None:
    # The listing names 1 to 3 only (a malformed line for 4 is not learnt):
    # message 4 is asked about by number when it is used.
    steps = [
        *STAT_FIRST,
        C(b"RETR 2\r\n"),
        S(
            b"+OK\r\n1 AAA\r\n2 BBB\r\n3 CCC\r\n4  bad\r\n.\r\n"
            b"+OK\r\n1 12\r\n2 12\r\n3 300\r\n4 x\r\n.\r\n" + RETR_REPLY
        ),
        C(b"RETR 4\r\n"),
        S(b"+OK 4 DDD\r\n+OK 4 400\r\n" + RETR_REPLY),
    ]
    out = run_all_modes(
        steps,
        Expect(
            upstream=STAT_FIRST_UP + b"UIDL\r\nLIST\r\nRETR 2\r\nUIDL 4\r\nLIST 4\r\nRETR 4\r\n"
        ),
        modes=MODES,
        message_identity=True,
    )
    assert retrieved(out) == [(1, "AAA", 12), (2, "BBB", 12), (4, "DDD", 400)]


def test_a_refused_bare_uidl_turns_uidl_lookups_off() -> None:
    steps = [
        *STAT_FIRST,
        C(b"RETR 2\r\n"),
        S(b"-ERR no UIDL here\r\n" + b"+OK\r\n1 12\r\n2 12\r\n.\r\n" + RETR_REPLY),
        C(b"RETR 4\r\n"),
        S(b"+OK 4 400\r\n" + RETR_REPLY),
    ]
    out = run_all_modes(
        steps,
        Expect(
            upstream=STAT_FIRST_UP + b"UIDL\r\nLIST\r\nRETR 2\r\nLIST 4\r\nRETR 4\r\n",
            client=LOGIN_DOWN + b"+OK 4 724\r\n" + RETR_REPLY * 3,
        ),
        modes=MODES,
        message_identity=True,
    )
    assert retrieved(out) == [(1, "AAA", 12), (2, None, 12), (4, None, 400)]
