"""The sans-I/O POP3 proxy session.

Theory of operation
===================

One :class:`ProxySession` sits between one client and one upstream server.
The shell feeds it bytes (``receive_client``, ``receive_server``) and events
(``upstream_connected``, ``client_eof``, ``server_eof``, ``end``), and after
each call collects what it produced: bytes for the server
(``take_upstream_output``), bytes for the client (``take_client_output``) and
audit records (``take_records``).  It never blocks, sleeps, or touches a
socket, so every behaviour below is testable as a transcript.

Modules
-------
This module is the state machine and the framing; each other concern has
a module of its own, which knows nothing of sessions:

``grammar``   command lines and status lines (RFC 1939, RFC 2449);
``identity``  login name to account, the way the server maps it;
``sasl``      an AUTH exchange: which lines open one, and the account inside
              it (PLAIN, LOGIN, CRAM-MD5);
``messages``  UIDLs and sizes learnt, and the lookups still worth making;
``capa``      the CAPA and AUTH listings as the client sees them;
``stls``      when STLS may begin (popguard terminates it);
``content``   a RETR body unstuffed, and its SHA-256;
``retention`` archive events and the DELE gate (``retain``);
``replies``   the replies popguard writes itself;
``records``   audit records as data; ``limits`` the bounds.

Commands are dispatched through two tables, by verb: ``_BEFORE_FORWARD``
(what a command needs before it goes upstream: QUIT closes the input, AUTH
opens a SASL exchange, DELE waits for its durable record) and ``_ON_REPLY``
(what its complete reply does to the state: logins, RETR/TOP, DELE, RSET,
QUIT, the client's own UIDL/LIST).  A verb in neither is forwarded and
relayed as it is.

Commands
--------
Client bytes are split into lines.  A line is parsed (``grammar``); a
malformed or over-long one is answered by popguard with ``-ERR`` and never
forwarded.  Every other line is forwarded at once, in order (RFC 2449
pipelining), and an entry for it is appended to ``pending``: the FIFO of
replies the client is owed.  The greeting is the first entry.  Two things
hold lines back in the buffer: a login in progress (below), and the bound
``max_pipelined`` on replies owed or made locally and not yet taken by the
shell, so a client that pipelines without reading costs bounded memory.

Only the command tells how its reply is framed (RFC 1939 §3), so the FIFO is
what lets popguard find reply boundaries: the head entry says whether a
``+OK`` starts a multi-line reply.  A reply popguard makes itself (``-ERR``
for a bad line) is queued in the same FIFO as a *local* entry, so it reaches
the client after the replies to the commands sent before it.

Replies
-------
The server's bytes are read in one of four modes:

``STATUS``
    collect the reply's first line, classify it (+OK, -ERR, or a SASL
    ``+`` continuation during AUTH) and forward it unchanged.  Bytes that
    arrive when no reply is owed, and lines that are not status lines, are a
    protocol error: the session ends, because a reply must never be passed
    off as the answer to the wrong command.  Nothing of the read that held
    such bytes reaches the client (a client owed a reply gets
    ``-ERR [SYS/TEMP]``): the replies before them cannot be trusted either.
``BODY``
    stream a multi-line reply to the client as it arrives, without
    unstuffing, watching only for the terminator CRLF "." CRLF, however the
    reads split it.  Memory use does not depend on the message size.
``INDEX``
    a client's UIDL or LIST listing with ``message_identity`` on: streamed
    like ``BODY`` (the same terminator search, the bytes unchanged), and
    also read line by line to learn each message's UIDL or size (see
    "Message identity").
``LISTING``
    a multi-line reply popguard reads line by line because it rewrites it
    (CAPA: the upstream's ``STLS`` is never relayed, since STLS is
    popguard's own business; popguard lists its own ``STLS`` where it offers
    it, and drops ``USER``/``SASL`` before TLS where a policy requires TLS;
    ``SASL`` and a bare ``AUTH``'s listing name only the mechanisms whose
    account popguard can read).

STLS (RFC 2595)
---------------
popguard terminates STLS itself and never forwards it.  It is accepted only
in AUTHORIZATION, before any login, with no reply owed (so no server bytes
from before the handshake can reach the client after it), on a listener
that offers it and is not yet encrypted.  popguard answers ``+OK``, throws
away anything the client pipelined behind ``STLS`` in the same plaintext
(CVE-2011-0411: such bytes would otherwise be read as if they came over
TLS), and sets :attr:`ProxySession.starttls_pending`; the shell then does
the handshake and calls :meth:`ProxySession.tls_started`.

Identity (popguard.core.identity, popguard.core.sasl)
-----------------------------------------------------
Policies, limits and records name the *account* the server opens, which
``identity`` (the config's ``identity:`` rules) derives from the login name
the way the server does (Dovecot lowercases it, for one).  USER and APOP
names, and names read from SASL responses, are mapped when the command
passes; a name popguard cannot map with certainty is refused with
``-ERR [AUTH]`` (record ``auth.refused``) and never reaches the server.
Commands pipelined behind a login are held until its reply, so they run for
a known account; if the server accepts a login whose account popguard does
not know, the session ends there, without QUIT (``identity_unknown``).

SASL (RFC 5034)
---------------
After ``AUTH mech`` the next client line may be a SASL response rather than a
command, and popguard cannot know which until the server answers.  So client
lines that follow an AUTH are *held* until the server speaks: a ``+``
continuation makes the next held line a SASL response, and the final
+OK/-ERR makes them commands again.  Only mechanisms whose account popguard
can read are let through (PLAIN, LOGIN, CRAM-MD5), and base64 goes upstream
as popguard decoded it (canonically re-encoded), so the server reads the
same name.  A response popguard must refuse cancels the exchange upstream
with ``*``.  SASL responses are decoded only to learn the account; they are
never stored or logged.

Message identity (popguard.core.messages)
-----------------------------------------
Message numbers mean nothing outside one session, so records name messages
by UIDL and size as well (RFC 1939 §7: UIDs are stable across sessions, and
a number names the same message for the whole session).  With
``message_identity`` on, popguard first learns them from the replies to the
client's own commands: the listings of a bare ``UIDL`` (``n uid`` lines) and
``LIST`` (``n size``), read as they stream past (the ``INDEX`` reader: one
bounded partial line held, lines unstuffed as RFC 1939 §3 says, malformed or
over-long lines and entries past ``MAX_IDENTITY_CACHE`` simply not learnt),
and the single-line replies to ``UIDL n`` and ``LIST n``.  Many clients list
before they retrieve (fetchmail 6.4 sends ``LIST n`` before each ``RETR n``),
so little is left to ask.

What is still unknown when a RETR, TOP or DELE is forwarded, popguard asks
for itself, in the same write, before the command: ``UIDL n`` unless the UIDL
is known (or the server has none), ``LIST n`` unless the size is.  Their
entries in ``pending`` are *internal*: the replies are read and kept, never
shown to the client, so the client sees exactly the bytes it would see
without popguard, in the same order.  Only commands forwarded and replies
received in TRANSACTION count (commands pipelined behind a login wait for
its reply); a RETR pipelined behind the client's own UIDL is looked up all
the same, since it is forwarded before the listing arrives.

What was learnt, and when UIDL is known to be missing (so no longer
asked), is ``popguard.core.messages``' business.  The whole of a RETR body
is also followed by ``popguard.core.content``, so records name the message
by its SHA-256 (RFC 5322 bytes) as well.

Durable deletions (fail-closed auditing)
----------------------------------------
With ``durable_deletions`` on, a DELE is not forwarded until its
``dele.requested`` record is safely written.  The core parks the command
and offers the record as ``pending_durable``; client lines behind it are
held.  The shell writes the record, waits for the sink, and answers with
``durable_result(ok)``: the DELE is then forwarded, or refused with
``-ERR [SYS/TEMP]`` and never reaches the server.

Retention (popguard.core.retention)
-----------------------------------
Under ``retain`` (a policy, decided at login) a DELE waits at a gate too:
first for a copy of its message (the bytes relayed by a RETR of this
session, or popguard's own RETR, never shown to the client), handed to the
shell as archive events, then for the shell's ``retention_result``: the copy
is durable (the DELE goes on, after the durable record if that is on too)
or not (refused with ``-ERR [SYS/TEMP]``, never forwarded).

State and deletions
-------------------
The RFC 1939 state follows the server's replies: a +OK to PASS, APOP or AUTH
enters TRANSACTION; a +OK to DELE marks a message; a +OK to RSET unmarks
them all; QUIT in TRANSACTION enters UPDATE and its +OK commits the marks.
Any other end of the session discards the marks (RFC 1939 §6), and the
records say so.  Nothing in this module ever produces a QUIT for the server:
the only QUIT that goes upstream is a client's line, forwarded.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Set
from dataclasses import dataclass
from typing import Final, Protocol

from popguard.core.capa import capa_line, mechanism_line, own_stls
from popguard.core.content import MessageContent, find_terminator
from popguard.core.grammar import (
    CRLF,
    MULTILINE_TERMINATOR,
    Command,
    CommandSyntaxError,
    Status,
    escape_text,
    is_multiline,
    parse_command,
    parse_status,
    reply_text,
    strip_line_ending,
)
from popguard.core.identity import DEFAULT_IDENTITY, Account, IdentityRefused, IdentityRules
from popguard.core.limits import Limits
from popguard.core.messages import MAX_IDENTITY_CACHE, MessageIndex, message_number
from popguard.core.records import AuditRecord, EndReason, Event, FieldValue, Scalar
from popguard.core.replies import (
    REPLY_AUDIT_UNAVAILABLE,
    REPLY_IDENTITY_UNKNOWN,
    REPLY_IDLE,
    REPLY_LOGIN_TIMEOUT,
    REPLY_MAX_SESSION,
    REPLY_OPERATOR_CLOSE,
    REPLY_RETENTION_UNAVAILABLE,
    REPLY_SHUTDOWN,
    REPLY_STLS_BEGIN,
    REPLY_TOO_MANY_BAD,
    REPLY_UPSTREAM_BROKEN,
    REPLY_UPSTREAM_LOST,
    REPLY_UPSTREAM_TIMEOUT,
    REPLY_UPSTREAM_UNAVAILABLE,
)
from popguard.core.retention import (
    ArchiveBegin,
    ArchiveData,
    ArchiveEnd,
    ArchiveEvent,
    RetentionGate,
)
from popguard.core.sasl import SaslExchange, auth_label, open_auth
from popguard.core.stls import stls_refusal
from popguard.policy.session import SessionPolicy, Verdict

__all__ = ["CommandObserver", "ProxySession", "State"]


class State(enum.StrEnum):
    """RFC 1939 §3 session states."""

    AUTHORIZATION = "AUTHORIZATION"
    TRANSACTION = "TRANSACTION"
    UPDATE = "UPDATE"


class _Reader(enum.Enum):
    STATUS = enum.auto()
    BODY = enum.auto()
    INDEX = enum.auto()
    LISTING = enum.auto()


_DEFAULT_LIMITS = Limits()


@dataclass(slots=True)
class _Pending:
    """A reply the client is owed, in the order the client asked."""

    verb: str
    #: The first argument where popguard needs it (message number, user
    #: name).  Never a password or digest: those are not kept.
    arg: bytes | None = None
    multiline: bool = False
    #: A reply popguard makes itself instead of the server.
    local_reply: bytes | None = None
    #: After sending ``local_reply``, end the session with this reason.
    closes: EndReason | None = None
    #: A command popguard sent itself (message identity); its reply is
    #: consumed, never relayed.
    internal: bool = False
    #: The account a USER or APOP names (``popguard.core.identity``).
    account: Account | None = None


@dataclass(slots=True)
class _ParkedClaim:
    """A line that names an account, held while the shell asks the shared state.

    ``kind``: ``"command"`` (USER or APOP: ``command``, ``account`` and the
    verdict ``check_command`` gave), ``"auth"`` (an AUTH whose initial
    response names the account: ``command`` is the line to forward) or
    ``"response"`` (a SASL response that named it: ``line`` to forward).
    """

    kind: str
    command: Command | None = None
    account: Account | None = None
    prior: Verdict | None = None
    line: bytes = b""


#: Commands whose reply decides who is logged in; later pipelined commands
#: wait for it, so they run for a known account (see _held_for_login).
_LOGIN_VERBS = frozenset({"PASS", "APOP", "AUTH"})

#: Commands whose first argument the session needs when the reply arrives.
_KEEP_ARG = frozenset({"RETR", "TOP", "DELE", "UIDL", "LIST"})

#: Commands whose message popguard names by UIDL and size (message identity).
_LOOKUP_VERBS = frozenset({"RETR", "TOP", "DELE"})

#: Commands that name the account to log in to.
_NAMING_VERBS = frozenset({"USER", "APOP"})


class CommandObserver(Protocol):
    """Told about commands as they pass (metrics); it owns the clock, the core does not."""

    def command(self, verb: str) -> None: ...
    def forwarded(self, verb: str) -> None: ...
    def answered(self, verb: str) -> None: ...


class ProxySession:
    """One proxied POP3 session, as a pure state machine."""

    # Slots: a session's two objects are most of what an idle session
    # costs (an instance dict of ~55 attributes is ~1.6 kB each).
    __slots__ = (
        "_archive_out",
        "_archiving",
        "_bad_commands",
        "_body_internal",
        "_claimed",
        "_client_buf",
        "_client_eof",
        "_client_input_closed",
        "_client_out",
        "_content",
        "_content_msg",
        "_copies",
        "_discarding_line",
        "_gated",
        "_input_held",
        "_logins_pending",
        "_marks",
        "_messages",
        "_parked_claim",
        "_pending",
        "_read_mark",
        "_read_owed",
        "_reader",
        "_records",
        "_refused_user",
        "_reply_bytes",
        "_sasl",
        "_server_buf",
        "_stls_discarded",
        "_tail",
        "_unsent_local",
        "_upstream_out",
        "account",
        "bytes_from_client",
        "bytes_from_upstream",
        "bytes_to_client",
        "bytes_to_upstream",
        "client_tls",
        "content_digests",
        "durable_deletions",
        "end_reason",
        "finished",
        "identity",
        "idle_notice",
        "limits",
        "message_identity",
        "observer",
        "pending_claim",
        "pending_durable",
        "pending_retention",
        "policy",
        "policy_epoch",
        "retain",
        "starttls_pending",
        "state",
        "stls",
        "user",
    )

    def __init__(
        self,
        *,
        client: str,
        listener: str,
        limits: Limits = _DEFAULT_LIMITS,
        idle_notice: bool = True,
        message_identity: bool = False,
        content_digests: bool = True,
        identity: IdentityRules = DEFAULT_IDENTITY,
        durable_deletions: bool = False,
        retain: bool = False,
        policy: SessionPolicy | None = None,
        stls: bool = False,
        tls: bool = False,
        observer: CommandObserver | None = None,
    ) -> None:
        self.limits = limits
        #: Told about each command (popguard.metrics.CommandTimer); None: nobody.
        self.observer = observer
        #: Whether this listener offers STLS (RFC 2595), terminated by popguard.
        self.stls = stls
        #: Whether the client connection is encrypted (implicit TLS, or after STLS).
        self.client_tls = tls
        #: STLS was answered +OK: the shell must do the handshake, then call
        #: :meth:`tls_started` (or end the session).
        self.starttls_pending = False
        self._stls_discarded = 0
        #: The policies that apply to this session (``popguard.policy``).
        self.policy = policy
        #: Bumped whenever what the policies decide may have changed (login),
        #: so the shell re-reads the session's timers.
        self.policy_epoch = 0
        self._refused_user: bytes | None = None
        self.idle_notice = idle_notice
        #: How the upstream maps login names to accounts.
        self.identity = identity
        self.message_identity = message_identity
        #: With message_identity: follow each RETR body for its SHA-256
        #: (popguard.core.content); retention follows it regardless.
        self.content_digests = content_digests
        #: What popguard learnt about each message number this session
        #: (popguard.core.messages); made on first use, so that a session
        #: that never names a message does not pay for one.
        self._messages: MessageIndex | None = None
        self.durable_deletions = durable_deletions
        #: A record the shell must write durably before the session goes on.
        self.pending_durable: AuditRecord | None = None
        self._gated: Command | None = None
        #: Under retention (``retain``: from the listener, or a policy at
        #: login), a DELE waits until the shell has archived the message
        #: (popguard.core.retention): the gate it waits at, the archive
        #: events for the shell, and the messages whose whole content the
        #: shell was given (number -> digest, size).
        self.retain = retain
        self.pending_retention: RetentionGate | None = None
        #: With shared state (popguard.shell.shared), a line that names an
        #: account waits while the shell asks the store whether that account
        #: may log in (blocks, per-user limit): the account, and the line.
        self.pending_claim: str | None = None
        self._parked_claim: _ParkedClaim | None = None
        self._archive_out: list[ArchiveEvent] = []
        self._copies: dict[int, tuple[str, int]] | None = None
        #: The RETR body being read: its content (digest, unstuffed bytes),
        #: whose message it is, whether a copy is being handed to the shell,
        #: and whether the body is popguard's own (never relayed).
        self._content: MessageContent | None = None
        self._content_msg = 0
        self._archiving = False
        self._body_internal = False
        self.state = State.AUTHORIZATION
        #: The account the server opened (after login), and its name.
        self.account: Account | None = None
        self.user: str | None = None
        self.finished = False
        self.end_reason: EndReason | None = None
        #: What :attr:`marked_for_deletion` holds (None: nothing; most
        #: sessions mark nothing, and an empty set is 216 bytes).
        self._marks: set[int] | None = None

        self.bytes_from_client = 0
        self.bytes_to_client = 0
        self.bytes_from_upstream = 0
        self.bytes_to_upstream = 0

        # A list, not a deque: at most max_pipelined entries, and an empty
        # deque alone costs ~700 bytes per idle session.
        self._pending: list[_Pending] = [_Pending("GREETING")]
        self._client_buf = bytearray()
        self._discarding_line = False
        self._client_input_closed = False
        self._client_eof = False
        self._bad_commands = 0
        #: The account of the last USER the server accepted (for PASS).
        self._claimed: Account | None = None
        self._sasl: SaslExchange | None = None
        #: Local replies produced since the shell last took client output;
        #: with ``_pending`` they bound what a client that never reads costs.
        self._unsent_local = 0
        self._input_held = False
        #: Logins forwarded and not yet answered (see _held_for_login).
        self._logins_pending = 0

        self._reader = _Reader.STATUS
        self._read_mark = 0
        self._read_owed = False
        self._server_buf = bytearray()
        self._tail = b""
        self._reply_bytes = 0

        self._client_out: list[bytes] = []
        self._upstream_out: list[bytes] = []
        self._records: list[AuditRecord] = []
        self._record(Event.SESSION_OPENED, client=client, listener=listener)

    # ------------------------------------------------------------------
    # Outputs
    # ------------------------------------------------------------------
    def take_client_output(self) -> bytes:
        """Bytes to send to the client, in order; empties the buffer.

        Command lines held back because too many replies were unsent (see
        :meth:`_output_full`) are processed when the output is empty again,
        so a shell that calls this until it returns nothing sends them all.
        """
        chunks = self.take_client_chunks()
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def take_client_chunks(self) -> list[bytes]:
        """:meth:`take_client_output` as the chunks it joins (for a gathered
        write: a 50 kB reply and its status line need not be copied into one)."""
        out = self._client_out
        if not out and self._input_held:
            self._input_held = False
            self._process_client_lines()
        if not out:
            return out[:]
        self._client_out = []
        self._unsent_local = 0
        self.bytes_to_client += sum(map(len, out))
        return out

    def take_upstream_output(self) -> bytes:
        """Bytes to send to the upstream server, in order; empties the buffer."""
        out = self._upstream_out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self.bytes_to_upstream += len(data)
        return data

    def take_records(self) -> list[AuditRecord]:
        """Audit records produced since the last call."""
        records = self._records
        self._records = []
        return records

    @property
    def has_client_output(self) -> bool:
        """Whether :meth:`take_client_chunks` has anything (or held commands to run)."""
        return bool(self._client_out) or self._input_held

    @property
    def has_upstream_output(self) -> bool:
        return bool(self._upstream_out)

    @property
    def has_records(self) -> bool:
        return bool(self._records)

    def take_archive_events(self) -> list[ArchiveEvent]:
        """What to write to the retention store, in order (popguard.core.retention)."""
        events = self._archive_out
        if events:
            self._archive_out = []
        return events

    @property
    def has_archive_events(self) -> bool:
        return bool(self._archive_out)

    # ------------------------------------------------------------------
    # Questions the shell asks
    # ------------------------------------------------------------------
    @property
    def wants_client_data(self) -> bool:
        """False while reading more from the client would only grow buffers."""
        if self.finished or self._client_input_closed or self._client_eof:
            return False
        if self.starttls_pending:
            return False
        if len(self._pending) >= self.limits.max_pipelined:
            return False
        held_limit = self.limits.max_sasl_line + self.limits.max_command_line
        return len(self._client_buf) < held_limit

    @property
    def client_input_open(self) -> bool:
        """Whether client bytes can still mean anything (no QUIT, no EOF)."""
        return not (self.finished or self._client_input_closed or self._client_eof)

    @property
    def replies_owed(self) -> int:
        """How many replies the client is still waiting for."""
        return len(self._pending)

    @property
    def reply_in_progress(self) -> bool:
        """A multi-line reply has started reaching the client and is not done."""
        return self._reader is not _Reader.STATUS

    @property
    def awaiting_greeting(self) -> bool:
        """The upstream's greeting has not been received whole yet."""
        pending = self._pending
        return not self.finished and bool(pending) and pending[0].verb == "GREETING"

    @property
    def marked_for_deletion(self) -> Set[int]:
        """Message numbers marked by DELE and not yet committed or unmarked."""
        return self._marks if self._marks is not None else _NO_MARKS

    @property
    def logged_in(self) -> bool:
        """A login succeeded (the session left AUTHORIZATION)."""
        return self.state is not State.AUTHORIZATION

    @property
    def messages(self) -> MessageIndex:
        """The UIDLs and sizes learnt so far (``popguard.core.messages``)."""
        messages = self._messages
        if messages is None:
            messages = self._messages = MessageIndex()
        return messages

    # ------------------------------------------------------------------
    # Inputs: connection events
    # ------------------------------------------------------------------
    def upstream_connected(self, address: str) -> None:
        self._record(Event.UPSTREAM_CONNECTED, upstream=address)

    def upstream_failed(self, address: str, error: str) -> None:
        self._record(Event.UPSTREAM_FAILED, upstream=address, error=error)
        self.end(EndReason.UPSTREAM_UNREACHABLE, error)

    def client_eof(self) -> None:
        """The client will send no more (closed or half-closed).

        Replies already owed are still relayed, so a client that writes
        ``...QUIT`` and shuts down its sending side gets every answer.
        """
        if self.finished:
            return
        self._client_eof = True
        # Complete lines still held (behind a login, a SASL step or a DELE
        # waiting for its durable record) are still answered; an
        # unterminated last line can never be completed, so it goes.
        buf = self._client_buf
        del buf[buf.rfind(b"\n") + 1 :]
        self._process_client_lines()
        self._finish_if_idle_after_eof()

    def server_eof(self) -> None:
        if self.finished:
            return
        detail = "upstream closed the connection"
        if self._reader is not _Reader.STATUS:
            detail += " in the middle of a multi-line reply"
        elif self._pending:
            detail += " while a reply was owed"
        self.end(EndReason.UPSTREAM_CLOSED, detail)

    def end(self, reason: EndReason, detail: str | None = None) -> None:
        """End the session.  Never produces a QUIT for the server.

        Tells the client why where that cannot corrupt a reply in progress,
        records the fate of marked messages, and records the close.  The
        shell then closes both connections.
        """
        if self.finished:
            return
        self.finished = True
        self.end_reason = reason
        self.pending_durable = None
        self.pending_retention = None
        self.pending_claim = None
        self._parked_claim = None
        self._gated = None
        self._content = None
        notice = self._closing_notice(reason)
        if notice is not None:
            self._client_out.append(notice)
        # DELEs forwarded but never answered may have marked their message
        # too: they share the fate of the marks (RFC 1939 §6).
        unanswered = {
            msg
            for entry in self._pending
            if entry.verb == "DELE" and (msg := message_number(entry.arg)) is not None
        }
        if self.state is not State.TRANSACTION:
            unanswered.clear()
        marks = self.marked_for_deletion | unanswered
        if marks:
            fields: dict[str, FieldValue] = {
                "reason": reason.value,
                "messages": self._identities(marks),
            }
            if unanswered:
                fields["unanswered"] = tuple(sorted(unanswered))
            quit_sent = any(entry.verb == "QUIT" for entry in self._pending)
            if quit_sent and self.state is State.TRANSACTION:
                # The server may or may not have received the QUIT: popguard
                # cannot tell whether it entered UPDATE.
                self._record(Event.DELETIONS_UNKNOWN, **fields)
            else:
                self._record(Event.DELETIONS_DISCARDED, **fields)
            self._marks = None
        self._record(
            Event.SESSION_CLOSED,
            reason=reason.value,
            detail=detail,
            state=self.state.value,
            bytes_from_client=self.bytes_from_client,
            bytes_to_client=self.bytes_to_client + sum(map(len, self._client_out)),
            bytes_from_upstream=self.bytes_from_upstream,
            bytes_to_upstream=self.bytes_to_upstream + sum(map(len, self._upstream_out)),
        )
        self._pending.clear()
        self._upstream_out.clear()

    def _closing_notice(self, reason: EndReason) -> bytes | None:
        if self._reader is not _Reader.STATUS:
            return None  # a reply is half-sent; an -ERR now would corrupt it
        owed = bool(self._pending)
        if reason is EndReason.IDLE_TIMEOUT:
            return REPLY_IDLE if self.idle_notice else None
        if reason is EndReason.MAX_SESSION:
            return REPLY_MAX_SESSION
        if reason is EndReason.LOGIN_TIMEOUT:
            # Not into a client's TLS handshake, which expects no plaintext.
            return None if self.starttls_pending else REPLY_LOGIN_TIMEOUT
        if reason is EndReason.OPERATOR_CLOSE:
            return None if self.starttls_pending else REPLY_OPERATOR_CLOSE
        if reason is EndReason.SHUTDOWN:
            return REPLY_SHUTDOWN
        if not owed:
            return None
        if reason is EndReason.UPSTREAM_UNREACHABLE:
            return REPLY_UPSTREAM_UNAVAILABLE
        if reason is EndReason.UPSTREAM_TIMEOUT:
            return REPLY_UPSTREAM_TIMEOUT
        if reason is EndReason.UPSTREAM_PROTOCOL_ERROR:
            return REPLY_UPSTREAM_BROKEN
        if reason in (EndReason.UPSTREAM_CLOSED, EndReason.UPSTREAM_ERROR):
            return REPLY_UPSTREAM_LOST
        return None

    # ------------------------------------------------------------------
    # Inputs: client bytes
    # ------------------------------------------------------------------
    def receive_client(self, data: bytes) -> None:
        if self.finished or self._client_input_closed or self._client_eof:
            return
        if self.starttls_pending:
            # Plaintext after STLS, before the handshake: never a command.
            self._stls_discarded += len(data)
            return
        self.bytes_from_client += len(data)
        self._client_buf += data
        self._process_client_lines()

    def _process_client_lines(self) -> None:
        buf = self._client_buf
        while buf and not self._client_input_closed and not self.finished:
            if self._discarding_line:
                newline = buf.find(b"\n")
                if newline == -1:
                    buf.clear()
                    return
                del buf[: newline + 1]
                self._discarding_line = False
                continue
            if self._gated is not None or self._parked_claim is not None:
                return  # held until the shell answers (durable record, copy, claim)
            sasl = self._sasl
            if sasl is not None and sasl.awaiting_server:
                return  # held: the server has not said what the next line is
            if sasl is None and (self._held_for_login() or self._output_full()):
                return
            limit = self.limits.max_sasl_line if sasl else self.limits.max_command_line
            newline = buf.find(b"\n", 0, limit)
            if newline == -1:
                if len(buf) < limit:
                    return  # wait for the rest of the line
                # Too long: drop it up to its end (which may not be here yet).
                self._discarding_line = True
                self._line_too_long(limit)
                continue
            line = bytes(buf[: newline + 1])
            del buf[: newline + 1]
            if sasl is not None:
                self._sasl_response(sasl, line)
            else:
                self._command(line)

    def _output_full(self) -> bool:
        """Whether replies owed or unsent have reached the pipelining bound.

        Then further commands wait in the buffer (and the shell stops
        reading, see :attr:`wants_client_data`): a client that pipelines
        without reading costs at most ``max_pipelined`` replies, whether the
        server or popguard makes them.
        """
        limit = self.limits.max_pipelined
        if len(self._pending) < limit and self._unsent_local < limit:
            return False
        self._input_held = True
        return True

    def _held_for_login(self) -> bool:
        """Hold commands behind a login until its reply.

        Only then is it known which account they act for: the user's
        policies apply to them, their records name the account and the
        messages, and a login whose account popguard cannot tell ends the
        session before any of them (a pipelined DELE and QUIT among them)
        reached the server.
        """
        return self._logins_pending > 0

    def _line_too_long(self, limit: int) -> None:
        if self._sasl is not None:
            # The server waits for a response; cancelling (RFC 5034 §4 "*")
            # makes it answer the AUTH with -ERR, which the client receives.
            self._record(Event.COMMAND_REJECTED, reason="SASL response line too long")
            self._sasl.awaiting_server = True
            self._upstream_out.append(b"*\r\n")
            return
        self._reject(
            f"Command line too long (limit {limit} octets, RFC 2449)", bytes(self._client_buf[:5])
        )

    def _reject(self, reason: str, line: bytes = b"") -> None:
        """Answer a client line with -ERR; ``line`` is its start, where known."""
        if line[:5].upper() == b"USER ":
            # A USER popguard could not read: the PASS behind it goes nowhere.
            self._refused_user = b"-ERR [AUTH] Login refused: no valid USER before PASS\r\n"
        self._bad_commands += 1
        self._record(Event.COMMAND_REJECTED, reason=reason)
        if self._bad_commands >= self.limits.max_bad_commands:
            self._client_input_closed = True
            self._client_buf.clear()
            self._queue_local(REPLY_TOO_MANY_BAD, closes=EndReason.CLIENT_PROTOCOL_ERROR)
        else:
            self._queue_local(b"-ERR " + reason.encode("ascii") + b"\r\n")

    def _command(self, line: bytes) -> None:
        try:
            command = parse_command(line)
        except CommandSyntaxError as exc:
            self._reject(str(exc), line)
            return
        verb = command.verb
        if self.observer is not None:
            self.observer.command(verb)
        if verb == "STLS":
            self._stls()
            return
        if verb == "PASS" and self._refused_user is not None:
            # The USER before it was refused: its password goes nowhere.
            self._queue_local(self._refused_user)
            return
        account: Account | None = None
        if verb in _NAMING_VERBS:
            account = self._login_name(command)
            if account is None:
                return
        if verb == "USER":
            self._refused_user = None
        if self.policy is not None and verb != "QUIT" and self._policy_refuses(command, account):
            return
        prepare = _BEFORE_FORWARD.get(verb)
        if prepare is not None:
            prepared = prepare(self, command)
            if prepared is None:
                return
            command = prepared
        self._forward(command, account)

    def _before_quit(self, command: Command) -> Command | None:
        # Whatever follows QUIT can never be answered (RFC 1939 §6).
        self._client_input_closed = True
        self._client_buf.clear()
        return command

    def _before_auth(self, command: Command) -> Command | None:
        """AUTH: the line as popguard forwards it, or None (refused and answered)."""
        if not command.args:
            return command  # the mechanism listing (RFC 5034 §4)
        forwarded = self._open_sasl(command)
        if forwarded is None:
            return None
        assert self._sasl is not None
        if self._sasl_claim_refused(self._sasl):
            self._sasl = None
            return None
        if self._shared_claim_due(self._sasl.login.account):
            self._park_claim(_ParkedClaim("auth", forwarded))
            return None
        return forwarded

    def _before_dele(self, command: Command) -> Command | None:
        """DELE: parked until the message is archived (``retain``) and its
        record durable (``durable_deletions``)."""
        msg = message_number(command.args[0] if command.args else None)
        if self.retain and msg is not None and self.state is State.TRANSACTION:
            self._gated = command
            self._retain_copy(msg)
            return None
        if not self.durable_deletions:
            return command
        self._gate_durable(command)
        return None

    def _gate_durable(self, command: Command) -> None:
        """Park a DELE until its ``dele.requested`` record is durable."""
        self._gated = command
        msg = message_number(command.args[0] if command.args else None)
        self.pending_durable = AuditRecord(
            Event.DELE_REQUESTED, self._with_user(self._identity(msg))
        )

    # ------------------------------------------------------------------
    # Identity: which account a login opens (popguard.core.identity)
    # ------------------------------------------------------------------
    def _login_name(self, command: Command) -> Account | None:
        """The account a USER or APOP names; None if refused (the -ERR is queued)."""
        verb = command.verb
        if verb == "USER":
            raw = command.rest  # everything after "USER ", as servers read it
        else:
            # APOP name digest (RFC 1939 §7), one space apart: servers split
            # at the first space, so any other spacing names someone else.
            args = command.args
            if len(args) != 2 or command.rest != args[0] + b" " + args[1]:
                self._refuse_login(verb, None, "APOP takes a name and a digest, one space apart")
                return None
            raw = args[0]
        try:
            return self.identity.account(raw)
        except IdentityRefused as exc:
            self._refuse_login(verb, exc.login, str(exc))
            return None

    def _refuse_login(
        self, mechanism: str | None, login: str | None, reason: str, *, reply: bool = True
    ) -> bytes:
        """popguard cannot tell the account: refuse, record, and say why."""
        self._record(Event.AUTH_REFUSED, login=login, mechanism=mechanism, reason=reason)
        text = b"-ERR [AUTH] Login refused: " + reason.encode("ascii", "backslashreplace") + CRLF
        if mechanism == "USER":
            self._refused_user = text
        if reply:
            self._queue_local(text)
        return text

    def _open_sasl(self, command: Command) -> Command | None:
        """Follow an AUTH exchange; the AUTH line to forward, or None if refused."""
        try:
            self._sasl, rest = open_auth(command.rest, self.identity)
        except IdentityRefused as exc:
            self._refuse_login(auth_label(command.rest), exc.login, str(exc))
            return None
        return Command(command.verb, command.args, command.line[:5] + rest + CRLF)

    def _sasl_response(self, sasl: SaslExchange, line: bytes) -> None:
        """A client line during AUTH: relayed as popguard read it, or cancelled."""
        sasl.awaiting_server = True
        body = strip_line_ending(line)
        if body.strip() == b"*" or sasl.denied is not None:
            # The client cancels (RFC 5034 §4); or popguard did, and a server
            # that asks for more gets nothing of the client's but "*" again.
            self._upstream_out.append(b"*\r\n")
            return
        known = sasl.login.account is not None
        try:
            forwarded = sasl.login.response(body)
        except IdentityRefused as exc:
            sasl.denied = self._refuse_login(sasl.mechanism, exc.login, str(exc), reply=False)
            self._upstream_out.append(b"*\r\n")  # cancel: nothing more reaches the server
            return
        if not known and self._sasl_claim_refused_in_exchange(sasl):
            self._upstream_out.append(b"*\r\n")  # cancel (RFC 5034 §4): no credentials sent
            return
        if not known and self._shared_claim_due(sasl.login.account):
            self._park_claim(_ParkedClaim("response", line=forwarded + CRLF))
            return
        self._upstream_out.append(forwarded + CRLF)

    # ------------------------------------------------------------------
    # Claims decided by the shared state (popguard.shell.shared)
    # ------------------------------------------------------------------
    def _shared_claim_due(self, account: Account | None) -> bool:
        """Whether naming ``account`` must wait for the shell's shared-state check."""
        policy = self.policy
        return (
            account is not None
            and policy is not None
            and policy.active
            and policy.uses_shared_state
            and self.state is State.AUTHORIZATION
        )

    def _park_claim(self, parked: _ParkedClaim) -> None:
        account = parked.account
        if account is None and self._sasl is not None:
            account = self._sasl.login.account
        assert account is not None
        self._parked_claim = parked
        self.pending_claim = account.name

    def claim_result(self, verdict: Verdict | None) -> None:
        """The shell's answer for ``pending_claim``: the verdict of the shared checks.

        Acts as the in-process ``claim`` would have: an enforced verdict
        refuses (and is recorded), a dry-run one is recorded, and the line
        then goes upstream.
        """
        parked = self._parked_claim
        self._parked_claim = None
        self.pending_claim = None
        if parked is None or self.finished:
            return
        if parked.kind == "command":
            assert parked.command is not None
            if not self._claim_decided(parked.command.verb, parked.prior, verdict):
                self._forward(parked.command, parked.account)
        elif parked.kind == "auth":
            assert parked.command is not None
            if self._apply_verdict(verdict, "AUTH"):
                self._sasl = None
            else:
                self._forward(parked.command)
        else:
            sasl = self._sasl
            if sasl is not None and self._apply_verdict(verdict, "AUTH", reply=False):
                assert verdict is not None
                sasl.denied = verdict.reply
                self._upstream_out.append(b"*\r\n")  # cancel: no credentials sent
            elif sasl is not None:
                self._upstream_out.append(parked.line)
        self._process_client_lines()

    # ------------------------------------------------------------------
    # STLS (RFC 2595), terminated here
    # ------------------------------------------------------------------
    def _stls(self) -> None:
        refusal = stls_refusal(
            offered=self.stls,
            encrypted=self.client_tls,
            authorization=self.state is State.AUTHORIZATION and self._sasl is None,
            replies_owed=bool(self._pending),
        )
        if refusal is not None:
            reason, reply = refusal
            self._record(Event.COMMAND_REJECTED, reason=reason, command="STLS")
            self._queue_local(reply)
            return
        self._stls_discarded = len(self._client_buf)
        self._client_buf.clear()
        self._discarding_line = False
        self._client_out.append(REPLY_STLS_BEGIN)
        self.starttls_pending = True

    def tls_established(self, side: str, *, stls: bool, **details: Scalar) -> None:
        """The shell finished a TLS handshake: implicit TLS, or the upstream's."""
        if not self.finished:
            self._record(Event.TLS_ESTABLISHED, side=side, stls=stls, **details)

    def tls_started(self, **details: Scalar) -> None:
        """The shell finished the client's STLS handshake."""
        if self.finished or not self.starttls_pending:
            return
        self.starttls_pending = False
        self.client_tls = True
        if self._stls_discarded:
            discarded, self._stls_discarded = self._stls_discarded, 0
            self._record(
                Event.COMMAND_REJECTED,
                command="STLS",
                reason=f"{discarded} octets pipelined after STLS discarded (CVE-2011-0411)",
            )
        if self.policy is not None:
            self.policy.tls_started()
        self._record(Event.TLS_ESTABLISHED, side="client", stls=True, **details)

    # ------------------------------------------------------------------
    # Policies
    # ------------------------------------------------------------------
    def _policy_refuses(self, command: Command, account: Account | None) -> bool:
        """Ask the policies about a command; True if popguard answered it itself.

        ``account`` is the account a USER or APOP names.
        """
        policy = self.policy
        assert policy is not None
        if not policy.active:
            return False
        verb = command.verb
        if verb == "AUTH" and not command.args:
            return False  # the mechanism listing (RFC 5034 §4) decides nothing
        mechanism = command.args[0].decode("ascii", "replace").upper() if verb == "AUTH" else None
        verdict = policy.check_command(verb, mechanism)
        if (
            account is not None
            and (verdict is None or not verdict.enforced)
            and self.state is State.AUTHORIZATION
        ):
            self.policy_epoch += 1  # claimed_user rules may set timers
            if policy.uses_shared_state:
                self._park_claim(_ParkedClaim("command", command, account, verdict))
                return True  # answered by claim_result
            return self._claim_decided(verb, verdict, policy.claim(account.name))
        return self._claim_decided(verb, verdict, None)

    def _claim_decided(self, verb: str, prior: Verdict | None, on_claim: Verdict | None) -> bool:
        """Record what ``check_command`` and the claim decided; True if refused.

        An enforced claim verdict wins over a dry-run command verdict (which
        is recorded all the same); without one, the command's stands.
        """
        verdict = prior
        if on_claim is not None and (prior is None or on_claim.enforced):
            if prior is not None:
                self._apply_verdict(prior, verb)  # the dry run, recorded
            verdict = on_claim
        refused = self._apply_verdict(verdict, verb)
        if verb == "USER":
            self._refused_user = verdict.reply if refused and verdict is not None else None
        return refused

    def _sasl_claim_refused(self, sasl: SaslExchange) -> bool:
        """The SASL account is known from the AUTH line: may it log in?  True if refused."""
        policy = self.policy
        account = sasl.login.account
        if policy is None or not policy.active or account is None:
            return False
        self.policy_epoch += 1
        if policy.uses_shared_state:
            return False  # _before_auth parks the line instead
        return self._apply_verdict(policy.claim(account.name), "AUTH")

    def _apply_verdict(self, verdict: Verdict | None, verb: str, *, reply: bool = True) -> bool:
        """Record a verdict; True if it is enforced (the command is refused)."""
        if verdict is None:
            return False
        event = Event.POLICY_DENIED if verdict.enforced else Event.POLICY_DRY_RUN
        self._record(event, **self._with_user({**verdict.fields(), "command": verb}))
        if not verdict.enforced:
            return False
        if reply:
            self._queue_local(verdict.reply)
        return True

    def durable_result(self, ok: bool) -> None:
        """The shell's answer for ``pending_durable``: written durably or not."""
        command = self._gated
        self._gated = None
        self.pending_durable = None
        if command is None or self.finished:
            return
        if ok:
            self._forward(command)
        else:
            self._record(Event.COMMAND_REJECTED, command="DELE", reason="audit trail unavailable")
            self._queue_local(REPLY_AUDIT_UNAVAILABLE)
        self._process_client_lines()

    def _forward(self, command: Command, account: Account | None = None) -> None:
        arg = command.args[0] if command.verb in _KEEP_ARG and command.args else None
        if arg is not None and command.verb in _LOOKUP_VERBS:
            self._request_identity(message_number(arg))
        self._pending.append(_Pending(command.verb, arg, is_multiline(command), account=account))
        if command.verb in _LOGIN_VERBS:
            self._logins_pending += 1
        self._upstream_out.append(command.line)
        if self.observer is not None:
            self.observer.forwarded(command.verb)

    def _request_identity(self, msg: int | None) -> None:
        """Ask the server for what is unknown of a message's UIDL and size, invisibly."""
        if msg is None or not self.message_identity or self.state is not State.TRANSACTION:
            return
        lookup = self.messages.lookups(msg)
        if lookup.stat:
            self._ask(_Pending("STAT", internal=True), b"STAT\r\n")
        if lookup.listing_uidl:
            self._ask(_Pending("UIDL", multiline=True, internal=True), b"UIDL\r\n")
        if lookup.listing_size:
            self._ask(_Pending("LIST", multiline=True, internal=True), b"LIST\r\n")
        if lookup.uidl or lookup.size:
            number = str(msg).encode("ascii")
            if lookup.uidl:
                self._ask(_Pending("UIDL", number, internal=True), b"UIDL " + number + CRLF)
            if lookup.size:
                self._ask(_Pending("LIST", number, internal=True), b"LIST " + number + CRLF)

    def _ask(self, entry: _Pending, line: bytes) -> None:
        """Send popguard's own command; its reply is read, never relayed."""
        self._pending.append(entry)
        self._upstream_out.append(line)

    def _internal_reply(self, entry: _Pending, status: Status, line: bytes) -> None:
        """Keep what an identity lookup answered; the client never sees it."""
        self._pending.pop(0)
        msg = message_number(entry.arg)
        if msg is not None and entry.verb == "RETR":
            # Only a -ERR comes here (a +OK starts the body).
            reason = "the server refused RETR: " + escape_text(reply_text(line)[:80])
            self._retention_failed(msg, reason)
        elif msg is not None:
            ok = status is Status.OK
            self.messages.internal_reply(entry.verb, msg, ok, line, self.marked_for_deletion)
        elif entry.verb == "STAT":
            if status is Status.OK:
                self.messages.learn_stat(line)
        elif entry.multiline:  # a bare listing's -ERR
            self.messages.listing_answered(entry.verb, False, line)
        self._flush_local()
        self._finish_if_idle_after_eof()

    def _identity(self, msg: int | None) -> dict[str, Scalar]:
        """``msg``, plus ``uidl`` and ``size`` where known, for a record."""
        messages = self._messages
        return {"msg": msg} if messages is None else messages.fields(msg)

    def _identities(self, marks: Set[int]) -> tuple[Mapping[str, Scalar], ...]:
        messages = self._messages
        if messages is None:
            return tuple({"msg": msg} for msg in sorted(marks))
        return messages.fields_of(marks)

    def _sasl_claim_refused_in_exchange(self, sasl: SaslExchange) -> bool:
        policy = self.policy
        account = sasl.login.account
        if policy is None or not policy.active or account is None:
            return False
        self.policy_epoch += 1
        if policy.uses_shared_state:
            return False  # _sasl_response parks the line instead
        verdict = policy.claim(account.name)
        if self._apply_verdict(verdict, "AUTH", reply=False):
            assert verdict is not None
            sasl.denied = verdict.reply
            return True
        return False

    # ------------------------------------------------------------------
    # Local replies
    # ------------------------------------------------------------------
    def _queue_local(self, reply: bytes, closes: EndReason | None = None) -> None:
        self._pending.append(_Pending("LOCAL", local_reply=reply, closes=closes))
        self._flush_local()

    def _flush_local(self) -> None:
        pending = self._pending
        while pending and pending[0].local_reply is not None and not self.finished:
            entry = pending.pop(0)
            assert entry.local_reply is not None
            self._client_out.append(entry.local_reply)
            self._unsent_local += 1
            if entry.closes is not None:
                self.end(entry.closes)

    # ------------------------------------------------------------------
    # Inputs: server bytes
    # ------------------------------------------------------------------
    def receive_server(self, data: bytes) -> None:
        if self.finished:
            return
        self.bytes_from_upstream += len(data)
        # Where this read's output starts, in case it holds bytes no command
        # asked for (see _unsolicited).
        self._read_mark = len(self._client_out)
        self._read_owed = bool(self._pending) and self._reader is _Reader.STATUS
        pos = 0
        size = len(data)
        while pos < size and not self.finished:
            if self._reader is _Reader.BODY:
                pos = self._relay_body(data, pos)
            elif self._reader is _Reader.INDEX:
                pos = self._relay_index(data, pos)
            elif self._reader is _Reader.LISTING:
                pos = self._relay_listing(data, pos)
            else:
                pos = self._read_status(data, pos)

    def _read_status(self, data: bytes, pos: int) -> int:
        limit = self.limits.max_server_status_line
        newline = data.find(b"\n", pos)
        if newline == -1:
            self._server_buf += data[pos:]
            if len(self._server_buf) > limit:
                self._protocol_error(f"reply status line longer than {limit} octets")
            elif not self._pending:
                self._unsolicited("data from the server when no reply was owed")
            return len(data)
        if self._server_buf:
            self._server_buf += data[pos : newline + 1]
            line = bytes(self._server_buf)
            self._server_buf.clear()
        else:
            line = data[pos : newline + 1]
        if len(line) > limit:
            self._protocol_error(f"reply status line longer than {limit} octets")
        else:
            self._status_line(line)
        return newline + 1

    def _status_line(self, line: bytes) -> None:
        if not self._pending:
            text = escape_text(line.rstrip(b"\r\n")[:80])
            if parse_status(line) is Status.ERR:
                # A server's parting words (Dovecot: "-ERR [SYS/TEMP] Server
                # shutting down."): it is closing.  Never relayed, since the
                # client would take it as the answer to its next command.
                self.end(EndReason.UPSTREAM_CLOSED, "upstream said: " + text)
                return
            self._unsolicited("data from the server when no reply was owed: " + text)
            return
        entry = self._pending[0]
        status = parse_status(line)
        if status is None:
            self._protocol_error("not a POP3 status line: " + escape_text(line[:80]))
            return
        if entry.internal:
            if status is Status.CONTINUE:
                self._protocol_error("SASL continuation outside an AUTH exchange")
            elif status is Status.OK and entry.multiline and entry.verb == "RETR":
                # popguard's own RETR (retention): read, never relayed.
                self._reply_bytes = len(line)
                self._reader = _Reader.BODY
                self._tail = b"\r\n"
                self._body_internal = True
                self._follow_content(entry)
            elif status is Status.OK and entry.multiline:
                # popguard's own bare UIDL or LIST: learnt from, never relayed.
                self._reader = _Reader.INDEX
                self._tail = b"\r\n"
                self._body_internal = True
                self.messages.begin_listing(entry.verb == "UIDL")
            else:
                self._internal_reply(entry, status, line)
            return
        if status is Status.CONTINUE:
            sasl = self._sasl
            if entry.verb != "AUTH" or sasl is None or not sasl.awaiting_server:
                self._protocol_error("SASL continuation outside an AUTH exchange")
                return
            self._client_out.append(line)
            sasl.awaiting_server = False
            sasl.login.challenge(line)
            self._process_client_lines()
            return
        self._client_out.append(line)
        if status is Status.OK and entry.multiline:
            self._reply_bytes = len(line)
            if entry.verb in ("CAPA", "AUTH"):
                self._reader = _Reader.LISTING
            elif (
                entry.verb in ("UIDL", "LIST")
                and self.message_identity
                and self.state is State.TRANSACTION
            ):
                self._reader = _Reader.INDEX
                self._tail = b"\r\n"
                self.messages.begin_listing(entry.verb == "UIDL")
            else:
                self._reader = _Reader.BODY
                self._tail = b"\r\n"
                if entry.verb == "RETR":
                    self._follow_content(entry)
            return
        self._reply_bytes = len(line)
        self._complete(status, line)

    def _relay_body(self, data: bytes, pos: int) -> int:
        """Stream a multi-line reply through, finding only its terminator.

        A body followed for its content (a RETR's digest, a retention copy)
        is framed by :meth:`MessageContent.take`, whose one search for CRLF
        "." finds the terminator and the stuffed lines alike.
        """
        content = self._content
        if content is not None:
            end, message = content.take(data, pos, keep=self._archiving)
            if message:
                self._archive_out.append(ArchiveData(self._content_msg, message))
        else:
            tail = self._tail
            probe = tail + data[pos : pos + 4]
            found = probe.find(MULTILINE_TERMINATOR)
            if found != -1:
                end = pos + found + len(MULTILINE_TERMINATOR) - len(tail)
            else:
                found = find_terminator(data, pos)
                end = found + len(MULTILINE_TERMINATOR) if found != -1 else -1
        chunk = (data[pos:] if pos else data) if end == -1 else data[pos:end]
        if not self._body_internal:
            self._client_out.append(chunk)
        self._reply_bytes += len(chunk)
        if end == -1:
            if content is None:
                self._tail = chunk[-4:] if len(chunk) >= 4 else (self._tail + chunk)[-4:]
            return len(data)
        self._reader = _Reader.STATUS
        self._complete(Status.OK, b"")
        return end

    # ------------------------------------------------------------------
    # Message content: digests, and copies for retention
    # ------------------------------------------------------------------
    def _follow_content(self, entry: _Pending) -> None:
        """A RETR's body starts: follow its content (digest; a copy under retention)."""
        msg = message_number(entry.arg)
        account = self.account
        archive = self.retain and account is not None and self.state is State.TRANSACTION
        if msg is None or not (archive or (self.message_identity and self.content_digests)):
            return
        self._content = MessageContent()
        self._content_msg = msg
        self._archiving = archive
        if archive:
            assert account is not None
            uidl = self._messages.uidls.get(msg) if self._messages is not None else None
            self._archive_out.append(ArchiveBegin(msg, account.name, uidl))

    def _end_content(self) -> tuple[str, int] | None:
        """The RETR body is complete: its digest and size, learnt (and archived)."""
        content = self._content
        if content is None or not content.done:
            self._content = None
            return None
        self._content = None
        msg = self._content_msg
        digest, size = content.finish(), content.size
        digests = self.messages.digests
        if msg in digests or len(digests) < MAX_IDENTITY_CACHE:
            digests[msg] = digest
        if self._archiving:
            self._archiving = False
            self._archive_out.append(ArchiveEnd(msg, digest, size))
            copies = self._copies
            if copies is None:
                copies = self._copies = {}
            copies[msg] = (digest, size)
        return digest, size

    def _retain_copy(self, msg: int) -> None:
        """Under retention, before DELE ``msg``: make sure the shell has its copy.

        A message the client retrieved whole in this session was copied as
        it was relayed; any other is fetched with popguard's own ``RETR``,
        whose reply the client never sees.
        """
        copy = self._copies.get(msg) if self._copies is not None else None
        if copy is not None:
            self._open_gate(msg, *copy)
            return
        self._request_identity(msg)  # its UIDL names the copy
        number = str(msg).encode("ascii")
        self._ask(_Pending("RETR", number, multiline=True, internal=True), b"RETR " + number + CRLF)

    def _open_gate(self, msg: int, digest: str, size: int) -> None:
        account = self.account
        assert account is not None
        uidl = self._messages.uidls.get(msg) if self._messages is not None else None
        self.pending_retention = RetentionGate(msg, account.name, uidl, digest, size)

    def retention_result(
        self,
        ok: bool,
        *,
        path: str | None = None,
        stored: bool = False,
        reason: str | None = None,
    ) -> None:
        """The shell's answer for ``pending_retention``: archived at ``path``, or not."""
        gate = self.pending_retention
        command = self._gated
        self.pending_retention = None
        if gate is None or command is None or self.finished:
            return
        if ok and path is not None:
            self.messages.archived[gate.msg] = path
            self._record(
                Event.MESSAGE_ARCHIVED,
                msg=gate.msg,
                uidl=gate.uidl,
                size=gate.size,
                digest=gate.digest,
                path=path,
                stored=stored,
            )
            if self.durable_deletions:
                self._gate_durable(command)
                return
            self._gated = None
            self._forward(command)
        else:
            if self._copies is not None:
                self._copies.pop(gate.msg, None)  # the next DELE fetches it again
            self._retention_failed(gate.msg, reason or "the copy could not be made durable")
        self._process_client_lines()

    def _retention_failed(self, msg: int, reason: str) -> None:
        """No copy: the DELE is refused here and never reaches the server."""
        self._gated = None
        uidl = self._messages.uidls.get(msg) if self._messages is not None else None
        self._record(Event.RETENTION_FAILED, msg=msg, uidl=uidl, reason=reason)
        self._queue_local(REPLY_RETENTION_UNAVAILABLE)

    def _relay_index(self, data: bytes, pos: int) -> int:
        """Stream a UIDL or LIST listing through unchanged, learning its lines.

        The client gets exactly the bytes ``_relay_body`` would pass (the
        same terminator search); the same chunks are then read line by line
        (``MessageIndex.learn_chunk``).  The bulk path (``BODY``) is not touched.
        """
        tail = self._tail
        found = (tail + data[pos : pos + 4]).find(MULTILINE_TERMINATOR)
        if found != -1:
            end = pos + found + len(MULTILINE_TERMINATOR) - len(tail)
        else:
            found = find_terminator(data, pos)
            end = found + len(MULTILINE_TERMINATOR) if found != -1 else len(data)
        chunk = data[pos:end] if pos or end != len(data) else data
        internal = self._body_internal
        if not internal:
            self._client_out.append(chunk)
            self._reply_bytes += len(chunk)
        self.messages.learn_chunk(chunk)
        if found == -1:
            self._tail = chunk[-4:] if len(chunk) >= 4 else (tail + chunk)[-4:]
            return end
        self._reader = _Reader.STATUS
        if internal:
            # popguard's own listing: over, and nobody is owed a reply.
            self._body_internal = False
            entry = self._pending.pop(0)
            self.messages.listing_answered(entry.verb, True, b"")
            self._flush_local()
            self._finish_if_idle_after_eof()
        else:
            self._complete(Status.OK, b"")
        return end

    def _relay_listing(self, data: bytes, pos: int) -> int:
        """Relay a multi-line reply line by line (CAPA), rewriting as needed."""
        limit = self.limits.max_listing_line
        size = len(data)
        while pos < size:
            newline = data.find(b"\n", pos)
            if newline == -1:
                self._server_buf += data[pos:]
                if len(self._server_buf) > limit:
                    self._protocol_error(f"multi-line reply line longer than {limit} octets")
                return size
            self._server_buf += data[pos : newline + 1]
            pos = newline + 1
            line = bytes(self._server_buf)
            self._server_buf.clear()
            if len(line) > limit:
                self._protocol_error(f"multi-line reply line longer than {limit} octets")
                return size
            capa = self._pending[0].verb == "CAPA"
            if line == b".\r\n":
                stls = capa and own_stls(
                    offers_stls=self.stls,
                    client_tls=self.client_tls,
                    authorization=self.state is State.AUTHORIZATION,
                )
                if stls:
                    self._client_out.append(stls)
                    self._reply_bytes += len(stls)
                self._client_out.append(line)
                self._reply_bytes += len(line)
                self._reader = _Reader.STATUS
                self._complete(Status.OK, b"")
                return pos
            if capa:
                shown = capa_line(
                    line, client_tls=self.client_tls, requires_tls=self._requires_tls()
                )
            else:
                shown = mechanism_line(line)
            if shown is None:
                continue
            self._client_out.append(shown)
            self._reply_bytes += len(shown)
        return pos

    def _requires_tls(self) -> bool:
        """A policy refuses logins before TLS (so CAPA offers none)."""
        return self.policy is not None and self.policy.requires_tls()

    def _unsolicited(self, detail: str) -> None:
        """Server bytes that no command asked for: the session ends.

        Once a server says more than it was asked, no reply in the same read
        can be trusted to answer the command it seems to answer (response
        injection), so none of this read's output reaches the client.  A
        client that was owed a reply gets ``-ERR [SYS/TEMP]`` instead, unless
        a multi-line reply was already under way (it is left cut short).
        """
        del self._client_out[self._read_mark :]
        if self._read_owed:
            self._client_out.append(REPLY_UPSTREAM_BROKEN)
        self._protocol_error(detail)

    def _protocol_error(self, detail: str) -> None:
        self._record(Event.UPSTREAM_PROTOCOL_ERROR, detail=detail)
        self.end(EndReason.UPSTREAM_PROTOCOL_ERROR, detail)

    # ------------------------------------------------------------------
    # Reply completion: where the RFC 1939 state moves
    # ------------------------------------------------------------------
    def _complete(self, status: Status, line: bytes) -> None:
        """A reply is complete: move the state as the command's handler says.

        Handlers are looked up by verb in ``_ON_REPLY``; a verb without one
        (NOOP, CAPA, ...) changes nothing.  A handler returns True when
        the session must not go on to the next command (it ended).
        """
        entry = self._pending.pop(0)
        verb = entry.verb
        if verb in _LOGIN_VERBS:
            self._logins_pending -= 1
        if self.observer is not None and verb != "GREETING":
            self.observer.answered(verb)
        handler = _ON_REPLY.get(verb)
        if handler is not None and handler(self, entry, status is Status.OK, line):
            return
        self._flush_local()
        if self._sasl is None and self._client_buf:
            self._process_client_lines()
        self._finish_if_idle_after_eof()

    def _greeting_reply(self, entry: _Pending, ok: bool, line: bytes) -> bool:
        if not ok:
            self.end(EndReason.UPSTREAM_REFUSED, "upstream greeting was -ERR")
            return True
        return False

    def _user_reply(self, entry: _Pending, ok: bool, line: bytes) -> bool:
        if ok:
            self._claimed = entry.account
        return False

    def _pass_reply(self, entry: _Pending, ok: bool, line: bytes) -> bool:
        self._auth_result(ok, self._claimed, "USER", line)
        return False

    def _apop_reply(self, entry: _Pending, ok: bool, line: bytes) -> bool:
        self._auth_result(ok, entry.account, "APOP", line)
        return False

    def _auth_reply(self, entry: _Pending, ok: bool, line: bytes) -> bool:
        sasl = self._sasl
        self._sasl = None
        if sasl is not None and sasl.denied is not None:
            self._replace_reply(line, sasl.denied)  # the cancel's -ERR: say why
            if ok:  # a server that logs in after a cancel: not on popguard's watch
                self.end(EndReason.IDENTITY_UNKNOWN, "the server accepted a cancelled login")
                return True
        elif sasl is not None:
            self._auth_result(ok, sasl.login.account, sasl.mechanism, line)
            return self.finished
        return False

    def _retrieve_reply(self, entry: _Pending, ok: bool, line: bytes) -> bool:
        copy = self._end_content()
        if entry.internal:
            # popguard's own RETR, for the copy a parked DELE waits for.
            self._body_internal = False
            msg = message_number(entry.arg)
            if msg is not None and self._gated is not None:
                if copy is None:
                    self._retention_failed(msg, "the message could not be read")
                else:
                    self._open_gate(msg, *copy)
            return False
        if ok:
            self._record(
                Event.MESSAGE_RETRIEVED,
                command=entry.verb,
                **self._identity(message_number(entry.arg)),
                bytes=self._reply_bytes,
            )
        return False

    def _dele_reply(self, entry: _Pending, ok: bool, line: bytes) -> bool:
        self._dele_result(ok, message_number(entry.arg), line)
        return False

    def _listing_reply(self, entry: _Pending, ok: bool, line: bytes) -> bool:
        """The client's own UIDL or LIST: learn from it (message identity)."""
        if self.message_identity and self.state is State.TRANSACTION:
            self.messages.client_reply(entry.verb, entry.multiline, entry.arg, ok, line)
        return False

    def _stat_reply(self, entry: _Pending, ok: bool, line: bytes) -> bool:
        """The client's own STAT: how many messages (message identity)."""
        if ok and self.message_identity and self.state is State.TRANSACTION:
            self.messages.learn_stat(line)
        return False

    def _rset_reply(self, entry: _Pending, ok: bool, line: bytes) -> bool:
        if ok and self.state is State.TRANSACTION:
            self._record(Event.RSET, messages=self._identities(self.marked_for_deletion))
            self._marks = None
        return False

    def _quit_reply(self, entry: _Pending, ok: bool, line: bytes) -> bool:
        self._quit_result(ok, line)
        return True

    def _auth_result(self, ok: bool, account: Account | None, mechanism: str, line: bytes) -> None:
        policy = self.policy
        if ok and self.state is not State.AUTHORIZATION:
            # A second login accepted in one session (RFC 1939 allows none):
            # which mailbox is open now is anyone's guess.
            self._record(
                Event.AUTH_REFUSED,
                login=account.login if account is not None else None,
                mechanism=mechanism,
                reason="the server accepted a second login in one session",
            )
            self._replace_reply(line, REPLY_IDENTITY_UNKNOWN)
            self.end(EndReason.IDENTITY_UNKNOWN, "a second login was accepted")
            return
        if ok:
            if account is None:
                # The server opened a mailbox popguard cannot name (a USER it
                # never saw accepted): no rule or record could be right, so
                # the session ends here, without QUIT.
                self._record(
                    Event.AUTH_REFUSED,
                    login=None,
                    mechanism=mechanism,
                    reason="the server accepted a login whose account popguard cannot tell",
                )
                self._replace_reply(line, REPLY_IDENTITY_UNKNOWN)
                self.end(EndReason.IDENTITY_UNKNOWN, "account of the login unknown")
                return
            self.state = State.TRANSACTION
            self.account = account
            self.user = account.name
            fields: dict[str, FieldValue] = {
                "user": account.name,
                "login": account.login,
                "mechanism": mechanism,
            }
            if account.master is not None:
                fields["master"] = account.master
            self._record(Event.AUTH_SUCCEEDED, **fields)
            if policy is not None:
                self.policy_epoch += 1
                verdict = policy.login_succeeded(account.name)
                if self._apply_verdict(verdict, mechanism, reply=False):
                    assert verdict is not None
                    # Logged in upstream, refused here: the client gets the
                    # policy's -ERR, and the upstream is closed without QUIT.
                    self._replace_reply(line, verdict.reply)
                    self.end(EndReason.POLICY_DENIED, verdict.reason)
                    return
            self._start_retention()  # the user's rules apply from here
        elif not ok:
            failed = account.name if account is not None else None
            self._record(
                Event.AUTH_FAILED,
                user=failed,
                login=account.login if account is not None else None,
                mechanism=mechanism,
                reply=escape_text(reply_text(line)),
            )
            if policy is not None and policy.active:
                for key, seconds in policy.login_failed(failed):
                    rule = policy.throttle_rule()
                    self._record(
                        Event.POLICY_LOGIN_BLOCKED,
                        key=key,
                        seconds=round(seconds),
                        rule=rule.name if rule else None,
                        policy_file=rule.where if rule else None,
                        mode=rule.mode if rule else None,
                    )

    def _start_retention(self) -> None:
        """At login: does a ``retain`` policy (or the listener) apply?"""
        policy = self.policy
        if policy is not None and policy.active and not self.retain:
            enforced, rule = policy.retention()
            if enforced:
                self.retain = True
            elif rule is not None:
                self._record(
                    Event.POLICY_DRY_RUN,
                    rule=rule.name,
                    policy_file=rule.where,
                    setting="retain",
                    mode=rule.mode,
                    reason="messages would be archived before deletion",
                )
        if self.retain:
            self._record(Event.RETENTION_ACTIVE)

    def _replace_reply(self, line: bytes, reply: bytes) -> None:
        """Send ``reply`` instead of the server's ``line``, queued just now."""
        out = self._client_out
        if out and out[-1] is line:
            out.pop()
            out.append(reply)

    def _dele_result(self, ok: bool, msg: int | None, line: bytes) -> None:
        if ok and msg is not None and self.state is State.TRANSACTION:
            if self._marks is None:
                self._marks = set()
            self._marks.add(msg)
            self._record(Event.DELE_MARKED, **self._identity(msg))
        elif not ok:
            self._record(
                Event.DELE_REFUSED, **self._identity(msg), reply=escape_text(reply_text(line))
            )

    def _quit_result(self, ok: bool, line: bytes) -> None:
        self._record(Event.QUIT, state=self.state.value, ok=ok)
        if self.state is State.TRANSACTION:
            # RFC 1939 §6: QUIT in TRANSACTION enters UPDATE; +OK means the
            # marked messages were removed, -ERR that some or none were.
            self.state = State.UPDATE
            messages = self._identities(self.marked_for_deletion)
            self._marks = None
            if ok and messages:
                self._record(Event.DELETIONS_COMMITTED, messages=messages)
            elif not ok:
                self._record(
                    Event.DELETIONS_FAILED,
                    messages=messages,
                    reply=escape_text(reply_text(line)),
                )
        self.end(EndReason.QUIT)

    def _finish_if_idle_after_eof(self) -> None:
        if (
            self._client_eof
            and not self._pending
            and self._gated is None
            and not self.finished
            and not self._client_buf
        ):
            self.end(EndReason.CLIENT_CLOSED)

    # ------------------------------------------------------------------
    def _record(self, event: Event, **fields: FieldValue) -> None:
        self._records.append(AuditRecord(event, self._with_user(fields)))

    def _with_user(
        self, fields: dict[str, FieldValue] | dict[str, Scalar]
    ) -> dict[str, FieldValue]:
        merged: dict[str, FieldValue] = dict(fields)
        if self.user is not None and "user" not in merged:
            merged["user"] = self.user
        return merged


_Preparer = Callable[[ProxySession, Command], Command | None]

#: What a command needs before it is forwarded, by verb (see
#: ProxySession._command): the command to forward, or None when popguard
#: answered or parked it.  Every other verb is forwarded as it came.
_BEFORE_FORWARD: Final[Mapping[str, _Preparer]] = {
    "QUIT": ProxySession._before_quit,
    "AUTH": ProxySession._before_auth,
    "DELE": ProxySession._before_dele,
}

_ReplyHandler = Callable[[ProxySession, _Pending, bool, bytes], bool]

#: What a complete reply does, by the verb it answers (see ProxySession._complete).
_ON_REPLY: Final[Mapping[str, _ReplyHandler]] = {
    "GREETING": ProxySession._greeting_reply,
    "USER": ProxySession._user_reply,
    "PASS": ProxySession._pass_reply,
    "APOP": ProxySession._apop_reply,
    "AUTH": ProxySession._auth_reply,
    "RETR": ProxySession._retrieve_reply,
    "TOP": ProxySession._retrieve_reply,
    "DELE": ProxySession._dele_reply,
    "UIDL": ProxySession._listing_reply,
    "LIST": ProxySession._listing_reply,
    "STAT": ProxySession._stat_reply,
    "RSET": ProxySession._rset_reply,
    "QUIT": ProxySession._quit_reply,
}


_NO_MARKS: Final[frozenset[int]] = frozenset()
