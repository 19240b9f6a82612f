"""Properties of SASL logins: popguard names the account the server will open.

For any user name and any encoding of a PLAIN or LOGIN response (whitespace
inserted, padding dropped, the initial response split across words, bare LF
line endings, the bytes arriving in any pieces, pipelined or not), driving
the sans-I/O :class:`ProxySession` against a scripted server must give:

* either a refusal by popguard (``auth.refused`` or ``command.rejected``),
  with none of the name-bearing response forwarded,
* or ``auth.succeeded`` whose ``user`` is ``IdentityRules().account(...)``
  of the name sent: what policies and records use is what the server opens;

and every response popguard forwarded is canonical base64 (strict decoding
and re-encoding give it back) whose bytes are exactly what the client
encoded: the server decodes what popguard decoded, whatever its base64 rules.
A name the rules refuse is never logged in.  An encoding popguard promises
to read (whitespace inside a response, missing padding, single spaces inside
an initial response) is never refused for its encoding alone.
"""

from __future__ import annotations

import base64
import binascii
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from popguard.core.identity import DOVECOT_USERNAME_CHARS, IdentityRefused, IdentityRules
from popguard.core.records import AuditRecord
from popguard.core.session import ProxySession

GREETING = b"+OK ready <1.2@example.org>\r\n"
RULES = IdentityRules()
# LOGIN's prompts, as Dovecot sends them.
USERNAME_PROMPT = b"+ " + base64.b64encode(b"Username:") + b"\r\n"
PASSWORD_PROMPT = b"+ " + base64.b64encode(b"Password:") + b"\r\n"


class NotCanonical(AssertionError):
    pass


def strict_decode(line: bytes) -> bytes:
    """``line`` as a strict server decodes it; raises unless it is canonical base64."""
    try:
        data = base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise NotCanonical(f"popguard forwarded {line!r}, which is not base64: {exc}") from None
    if base64.b64encode(data) != line:
        raise NotCanonical(f"popguard forwarded {line!r}, which is not canonical base64")
    return data


@dataclass
class ScriptedServer:
    """A strict SASL server for PLAIN and LOGIN that keeps what it decoded."""

    state: str = "command"
    #: Every name-bearing payload received: PLAIN messages, LOGIN user names.
    payloads: list[bytes] = field(default_factory=list)
    lines: list[bytes] = field(default_factory=list)
    _buf: bytearray = field(default_factory=bytearray)

    def receive(self, data: bytes) -> bytes:
        self._buf += data
        out = bytearray()
        while (end := self._buf.find(b"\r\n")) != -1:
            line = bytes(self._buf[:end])
            del self._buf[: end + 2]
            self.lines.append(line)
            out += self._answer(line)
        return bytes(out)

    def _answer(self, line: bytes) -> bytes:
        state = self.state
        if state != "command" and line == b"*":
            self.state = "command"
            return b"-ERR [AUTH] Authentication aborted by client.\r\n"
        if state == "plain":
            self.payloads.append(strict_decode(line))
            self.state = "done"
            return b"+OK Logged in.\r\n"
        if state == "login-user":
            self.payloads.append(strict_decode(line))
            self.state = "login-password"
            return PASSWORD_PROMPT
        if state == "login-password":
            self.state = "done"
            return b"+OK Logged in.\r\n"
        words = line.split(b" ")
        if words[0].upper() == b"QUIT":
            return b"+OK Logging out.\r\n"
        if state == "done" or words[0].upper() != b"AUTH" or len(words) not in (2, 3):
            return b"-ERR Unknown command.\r\n"
        mechanism, initial = words[1].upper(), words[2] if len(words) == 3 else None
        if mechanism == b"PLAIN":
            if initial is None:
                self.state = "plain"
                return b"+ \r\n"
            self.payloads.append(strict_decode(initial))
            self.state = "done"
            return b"+OK Logged in.\r\n"
        if mechanism == b"LOGIN":
            if initial is None:
                self.state = "login-user"
                return USERNAME_PROMPT
            self.payloads.append(strict_decode(initial))
            self.state = "login-password"
            return PASSWORD_PROMPT
        return b"-ERR [AUTH] Unsupported authentication mechanism.\r\n"


@dataclass
class Run:
    server: ScriptedServer
    records: list[AuditRecord]
    client: bytes
    upstream: bytes

    def named(self, event: str) -> list[AuditRecord]:
        return [r for r in self.records if r.event.value == event]


def run(lines: Sequence[bytes], cuts: Sequence[int], pipelined: bool) -> Run:
    """Play the client ``lines`` through a session to the scripted server.

    Each line is cut into pieces at ``cuts`` (offsets into the whole stream).
    Pipelined: every client byte first; otherwise one line at a time, each
    once the server has answered the one before.
    """
    session = ProxySession(client="192.0.2.7:40000", listener="test")
    server = ScriptedServer()
    records: list[AuditRecord] = []
    client = bytearray()
    upstream = bytearray()

    def settle() -> None:
        while True:
            records.extend(session.take_records())
            client.extend(session.take_client_output())
            sent = session.take_upstream_output()
            if not sent or session.finished:
                records.extend(session.take_records())
                return
            upstream.extend(sent)
            answer = server.receive(sent)
            if answer:
                session.receive_server(answer)

    session.receive_server(GREETING)
    settle()
    stream = b"".join(lines)
    bounds = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    pieces = [stream[a:b] for a, b in itertools.pairwise(bounds)]
    if pipelined:
        for piece in pieces:
            session.receive_client(piece)
        settle()
    else:
        offset = 0
        ends = []
        for line in lines:
            offset += len(line)
            ends.append(offset)
        position = 0
        for piece in pieces:
            session.receive_client(piece)
            position += len(piece)
            if position in ends:
                settle()  # a whole line is in: the server answers before the next
                if not server.state.startswith(("plain", "login")):
                    break  # the exchange is over: the client sends no more
        settle()
    return Run(server, records, bytes(client), bytes(upstream))


# -- what the client sends ------------------------------------------------------------

NAME_CHARS = DOVECOT_USERNAME_CHARS + "*+:/ \t\x00\x01\x1b\x7f\u00e9\u212a"

names = st.one_of(
    st.text(alphabet=DOVECOT_USERNAME_CHARS, min_size=1, max_size=30).map(str.encode),
    st.text(alphabet=NAME_CHARS, max_size=30).map(str.encode),
    st.binary(max_size=30),
    st.text(alphabet="aA", min_size=250, max_size=260).map(str.encode),
)
passwords = st.binary(min_size=1, max_size=40)


@st.composite
def encodings(draw: st.DrawFn, data: bytes, *, initial: bool) -> tuple[bytes, bool]:
    """``data`` in base64 as a lenient decoder reads it; (text, clean).

    ``clean``: popguard promises to read it: no tab (a control character),
    and in an initial response single spaces only, none at the ends.
    """
    text = base64.b64encode(data)
    if text.endswith(b"=") and draw(st.booleans()):
        text = text.rstrip(b"=")
    gaps = draw(
        st.lists(
            st.tuples(st.integers(0, max(len(text), 0)), st.sampled_from([b" ", b"\t", b"  "])),
            max_size=4,
        )
    )
    for position, gap in sorted(gaps, reverse=True):
        text = text[:position] + gap + text[position:]
    # A tab is a control character: popguard may refuse it anywhere.
    clean = b"\t" not in text
    if initial:
        clean = clean and b"  " not in text and text.strip(b" ") == text and bool(text)
    return text, clean


@dataclass(frozen=True)
class Login:
    """One SASL login as the client writes it."""

    mechanism: str
    lines: tuple[bytes, ...]
    #: The payload that names the account (PLAIN message, LOGIN user name).
    payload: bytes
    authcid: bytes
    authzid: bytes
    #: popguard promises to read this encoding.
    clean: bool


@st.composite
def logins(draw: st.DrawFn) -> Login:
    name = draw(names)
    password = draw(passwords)
    ending = draw(st.sampled_from([b"\r\n", b"\n"]))
    spelled = draw(st.sampled_from(["PLAIN", "plain", "Plain", "LOGIN", "login"]))
    mechanism = spelled.upper()
    with_initial = draw(st.booleans())
    authzid = b""
    if mechanism == "PLAIN":
        name = name.replace(b"\0", b"")  # NUL separates PLAIN's fields
        authzid = draw(st.sampled_from([b"", name, name.upper(), name.swapcase(), b"bob"]))
        payload = authzid + b"\0" + name + b"\0" + password
    else:
        payload = name
    text, clean = draw(encodings(payload, initial=with_initial))
    verb = b"AUTH " + spelled.encode()
    lines = [verb + b" " + text + ending] if with_initial else [verb + ending, text + ending]
    # A command line holds at most 255 octets with its CRLF (RFC 2449 §4).
    clean = clean and len(lines[0].rstrip(b"\r\n")) + 2 <= 255
    if mechanism == "LOGIN":
        lines.append(base64.b64encode(password) + ending)
    return Login(mechanism, tuple(lines), payload, name, authzid, clean)


def expected_account(login: Login) -> str | None:
    """The account IdentityRules() names, or None where it refuses the name."""
    try:
        if login.authzid and login.authzid != login.authcid:
            return RULES.account(login.authcid, authzid=login.authzid).name
        return RULES.account(login.authcid).name
    except IdentityRefused:
        return None


#: Dovecot's default ``auth_username_chars`` (doc/example-config/conf.d/10-auth.conf),
#: written out here so the model below does not lean on popguard's copy.
DOVECOT_DEFAULT_CHARS = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ01234567890.-_@"


def dovecot_account(login: Login) -> str | None:
    """A model of Dovecot with its defaults: the account it opens, or None.

    ``%Lu``: ASCII letters lower-cased; a name with a character outside
    ``auth_username_chars`` is refused; a PLAIN authorization identity that
    differs from the authentication identity names the account.
    """
    names = [login.authcid]
    if login.authzid and login.authzid != login.authcid:
        names.insert(0, login.authzid)
    if any(not name or name.strip(DOVECOT_DEFAULT_CHARS) for name in names):
        return None
    return names[0].decode("ascii").lower()


def plain_ir(name: bytes, password: bytes, authzid: bytes = b"") -> Login:
    payload = authzid + b"\0" + name + b"\0" + password
    line = b"AUTH PLAIN " + base64.b64encode(payload) + b"\r\n"
    return Login("PLAIN", (line,), payload, name, authzid, True)


def login_split(name: bytes, password: bytes) -> Login:
    text = base64.b64encode(name)
    line = b"AUTH LOGIN " + text[:4] + b" " + text[4:] + b"\r\n"
    return Login("LOGIN", (line, base64.b64encode(password) + b"\r\n"), name, name, b"", True)


@settings(max_examples=500, deadline=None)
@given(login=logins(), cuts=st.lists(st.integers(0, 2000), max_size=6), pipelined=st.booleans())
@example(login=plain_ir(b"ALICE", b"pw"), cuts=[], pipelined=False)
@example(login=plain_ir(b"alice", b"pw", authzid=b"ALICE"), cuts=[], pipelined=False)
@example(login=login_split(b"ALICE", b"pw"), cuts=[3, 17], pipelined=True)
@example(login=plain_ir(b"ali\xffce", b"pw"), cuts=[], pipelined=False)
def test_the_account_popguard_names_is_the_account_the_server_decodes(
    login: Login, cuts: list[int], pipelined: bool
) -> None:
    result = run(login.lines, cuts, pipelined)
    where = f"client {login.lines!r}; upstream {result.upstream!r}; records {result.records!r}"
    succeeded = result.named("auth.succeeded")
    refused = result.named("auth.refused") + result.named("command.rejected")
    assert not result.named("auth.failed"), where
    assert len(succeeded) + bool(refused) == 1, where  # exactly one outcome
    account = expected_account(login)
    event(f"{login.mechanism}, {'logged in' if succeeded else 'refused'}")
    if succeeded:
        # The server decoded exactly what the client encoded, and popguard
        # names the account those bytes open.
        assert result.server.payloads == [login.payload], where
        assert account is not None, f"a name the rules refuse was logged in: {where}"
        assert succeeded[0].fields["user"] == account, where
        assert account == dovecot_account(login), where
        assert succeeded[0].fields["mechanism"] == login.mechanism, where
    else:
        # Refused: the name-bearing response never reached the server.
        assert result.server.payloads == [], where
        assert result.client.rstrip(b"\r\n").rsplit(b"\n", 1)[-1].startswith(b"-ERR"), where
        if account is not None and login.clean:
            raise AssertionError(f"a readable encoding of a valid name was refused: {where}")
