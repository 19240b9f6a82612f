"""Properties that must hold for any input: fuzzing, deletion safety, purity."""

from __future__ import annotations

import ast
import pathlib

from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from popguard.core.records import EndReason
from popguard.core.session import ProxySession

from .transcript import new_session

CORE = pathlib.Path(__file__).resolve().parents[2] / "popguard" / "core"

COMMANDS = [
    b"USER alice\r\n",
    b"PASS pw\r\n",
    b"STAT\r\n",
    b"LIST\r\n",
    b"LIST 1\r\n",
    b"RETR 1\r\n",
    b"TOP 1 0\r\n",
    b"DELE 1\r\n",
    b"DELE 2\r\n",
    b"RSET\r\n",
    b"NOOP\r\n",
    b"UIDL\r\n",
    b"CAPA\r\n",
    b"AUTH PLAIN\r\n",
    b"AUTH\r\n",
    b"*\r\n",
    b"\x00\r\n",
    b"x" * 300 + b"\r\n",
]
REPLIES = [
    b"+OK\r\n",
    b"-ERR no\r\n",
    b"+ \r\n",
    b"+OK\r\nbody\r\n.\r\n",
    b"+OK\r\n..stuffed\r\n\n.\n.\r\n",
    b"garbage\r\n",
    b"+OK partial",
]
ENDINGS = [
    EndReason.CLIENT_CLOSED,
    EndReason.IDLE_TIMEOUT,
    EndReason.SHUTDOWN,
    EndReason.UPSTREAM_CLOSED,
    EndReason.UPSTREAM_ERROR,
    EndReason.CLIENT_ERROR,
]


def _drive(session: ProxySession, steps: list[tuple[str, bytes]]) -> tuple[bytes, list[str]]:
    upstream = bytearray()
    events: list[str] = []
    for side, data in steps:
        if side == "c":
            session.receive_client(data)
        else:
            session.receive_server(data)
        upstream += session.take_upstream_output()
        session.take_client_output()
        events += [r.event.value for r in session.take_records()]
    return bytes(upstream), events


step = st.one_of(
    st.tuples(st.just("c"), st.sampled_from(COMMANDS)),
    st.tuples(st.just("s"), st.sampled_from(REPLIES)),
    st.tuples(st.sampled_from(["c", "s"]), st.binary(max_size=64)),
)


@settings(max_examples=400, deadline=None)
@given(steps=st.lists(step, max_size=30), ending=st.sampled_from(ENDINGS), identity=st.booleans())
def test_no_quit_ever_goes_upstream_unless_the_client_sent_one(
    steps: list[tuple[str, bytes]], ending: EndReason, identity: bool
) -> None:
    """Deletion safety: the proxy never originates a QUIT (RFC 1939 §6)."""
    steps = [
        (side, data.replace(b"QUIT", b"QUIZ").replace(b"quit", b"quiz")) for side, data in steps
    ]
    session = new_session()
    session.receive_server(b"+OK hi\r\n")
    upstream, _ = _drive(session, steps)
    session.end(ending)
    upstream += session.take_upstream_output()
    assert b"QUIT" not in upstream.upper()


@settings(max_examples=400, deadline=None)
@given(steps=st.lists(step, max_size=30), ending=st.sampled_from(ENDINGS), identity=st.booleans())
def test_every_mark_ends_in_exactly_one_fate(
    steps: list[tuple[str, bytes]], ending: EndReason, identity: bool
) -> None:
    """Replaying the records as a model: each +OK'd DELE is closed exactly once."""
    session = new_session(message_identity=identity)
    session.receive_server(b"+OK hi\r\n")
    session.receive_client(b"USER a\r\nPASS b\r\n")
    session.receive_server(b"+OK\r\n+OK\r\n")
    records = []
    for side, data in steps:
        if side == "c":
            session.receive_client(data)
        else:
            session.receive_server(data)
        records += session.take_records()
    session.end(ending)
    records += session.take_records()
    open_marks: set[int] = set()
    fates = {
        "dele.unmarked",
        "deletions.committed",
        "deletions.failed",
        "deletions.discarded",
        "deletions.unknown",
    }
    for record in records:
        name = record.event.value
        if name == "dele.marked":
            # A second +OK for the same message (a lenient server) marks it
            # again; it is still one mark, closed once.
            open_marks.add(record["msg"])
        elif name in fates:
            closed = {m["msg"] for m in record["messages"]}
            # DELEs still unanswered when the session ended share the fate.
            unanswered = set(record.fields.get("unanswered", ()))
            assert not unanswered or name in ("deletions.discarded", "deletions.unknown")
            assert closed == open_marks | unanswered, (name, closed, open_marks)
            open_marks.clear()
    assert not open_marks
    assert not session.marked_for_deletion
    assert [r.event.value for r in records].count("session.closed") == 1


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=2048), cut=st.integers(min_value=0, max_value=2048))
@example(data=b"+OK\r\n" * 3, cut=2)
def test_server_parser_never_raises(data: bytes, cut: int) -> None:
    session = new_session()
    session.receive_client(b"RETR 1\r\nCAPA\r\nAUTH PLAIN\r\n")
    session.receive_server(data[:cut])
    session.receive_server(data[cut:])
    session.server_eof()
    assert session.finished


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=4096))
def test_client_parser_never_raises_and_buffers_stay_bounded(data: bytes) -> None:
    session = new_session()
    session.receive_server(b"+OK hi\r\n")
    for i in range(0, len(data), 97):
        session.receive_client(data[i : i + 97])
        session.take_upstream_output()
        session.take_client_output()
    assert (
        len(session._client_buf) <= session.limits.max_sasl_line + session.limits.max_command_line
    )


def _dot_stuff(body: bytes) -> bytes:
    """RFC 1939 §3 byte-stuffing: every line starting with "." gets another."""
    stuffed = body.replace(b"\r\n.", b"\r\n..")
    return b"." + stuffed if stuffed.startswith(b".") else stuffed


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=512).map(_dot_stuff))
def test_any_stuffed_body_is_relayed_exactly(body: bytes) -> None:
    """A body that holds no terminator goes through untouched, however split."""
    reply = b"+OK\r\n" + body + b"\r\n.\r\n+OK next\r\n"
    session = new_session()
    session.receive_server(b"+OK hi\r\n")
    session.take_client_output()
    session.receive_client(b"RETR 1\r\nNOOP\r\n")
    for i in range(len(reply)):
        session.receive_server(reply[i : i + 1])
    assert session.take_client_output() == reply
    assert session.replies_owed == 0


def test_core_imports_no_io() -> None:
    """The core stays sans-I/O: no trio, socket, ssl, time, asyncio or select."""
    forbidden = {"trio", "socket", "ssl", "time", "asyncio", "select", "selectors"}
    for path in sorted(CORE.glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in forbidden, f"{path.name} imports {name}"


RETENTION_COMMANDS = [b"DELE 1", b"DELE 2", b"RETR 1", b"RETR 2", b"RSET", b"NOOP", b"QUIT"]


def _server_reply(line: bytes, ok: bool) -> bytes:
    """A well-behaved server's answer to one command popguard sent."""
    verb, _, arg = line.partition(b" ")
    if not ok and verb != b"QUIT":
        return b"-ERR no\r\n"
    if verb == b"RETR":
        return b"+OK\r\nSubject: " + arg + b"\r\n\r\n..dot\r\n.\r\n"
    if verb == b"UIDL":
        return b"+OK " + arg + b" u" + arg + b"\r\n"
    if verb == b"LIST":
        return b"+OK " + arg + b" 30\r\n"
    return b"+OK\r\n"


@settings(max_examples=300, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.sampled_from(RETENTION_COMMANDS), st.booleans(), st.booleans()), max_size=12
    ),
    ending=st.sampled_from(ENDINGS),
    identity=st.booleans(),
)
def test_under_retain_no_dele_goes_upstream_without_an_archived_copy(
    steps: list[tuple[bytes, bool, bool]], ending: EndReason, identity: bool
) -> None:
    """Retention: every DELE forwarded follows the shell's "the copy is durable".

    Each step: a client command, whether the server says +OK to what it is
    sent, and whether the shell manages to archive.  Whatever the
    combination, a ``DELE n`` reaches the server only right after a
    ``message.archived`` for n, and every session ends exactly once.
    """
    session = new_session(message_identity=identity, retain=True)
    session.receive_server(b"+OK hi\r\n")
    session.receive_client(b"USER a\r\nPASS b\r\n")
    session.receive_server(b"+OK\r\n+OK\r\n")
    session.take_upstream_output()
    records = session.take_records()
    archived: list[int] = []
    for command, server_ok, shell_ok in steps:
        session.receive_client(command + b"\r\n")
        while True:
            new = session.take_records()
            records += new
            archived += [r["msg"] for r in new if r.event.value == "message.archived"]
            session.take_archive_events()
            sent = session.take_upstream_output()
            for line in sent.split(b"\r\n")[:-1]:
                if line.startswith(b"DELE "):
                    assert archived, line
                    assert archived[-1] == int(line.split()[1]), (line, archived)
                    archived.pop()
                    event("a DELE went upstream after its copy")
                session.receive_server(_server_reply(line, server_ok))
            if session.pending_retention is not None:
                if shell_ok:
                    session.retention_result(True, path="a/new/x", stored=True)
                else:
                    event("the shell could not archive")
                    session.retention_result(False, reason="disk full")
            elif not sent:
                break
    session.end(ending)
    records += session.take_records()
    assert [r.event.value for r in records].count("session.closed") == 1
    assert session.pending_retention is None
