"""Playbook-style transcripts for the sans-I/O session (after mitmproxy's tutils).

A transcript is a list of steps: bytes from the client (``C``), bytes from
the server (``S``), or an event (``Eof``/``ServerEof``/``End``/...).  It is
played in several feeding modes, and each mode must produce the *same*
upstream bytes, client bytes and audit records:

``whole``      each step is one read;
``bytewise``   every byte is its own read;
``pipelined``  all client bytes arrive in one read before the server says
               anything, then the server's steps in order (only for
               transcripts whose meaning does not depend on timing).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from popguard.core.identity import DEFAULT_IDENTITY, IdentityRules
from popguard.core.limits import Limits
from popguard.core.records import AuditRecord, EndReason
from popguard.core.retention import ArchiveEvent
from popguard.core.session import ProxySession
from popguard.policy.session import SessionPolicy


@dataclass(frozen=True)
class C:
    data: bytes


@dataclass(frozen=True)
class S:
    data: bytes


@dataclass(frozen=True)
class ClientEof:
    pass


@dataclass(frozen=True)
class ServerEof:
    pass


@dataclass(frozen=True)
class End:
    reason: EndReason


@dataclass(frozen=True)
class UpstreamFailed:
    error: str = "Connection refused"


@dataclass(frozen=True)
class Durable:
    """The shell's answer to ``pending_durable``."""

    ok: bool


@dataclass(frozen=True)
class Retained:
    """The shell's answer to ``pending_retention`` (popguard.core.retention)."""

    ok: bool
    path: str | None = None
    stored: bool = True
    reason: str | None = None


Step = C | S | ClientEof | ServerEof | End | UpstreamFailed | Durable | Retained
MODES = ("whole", "bytewise", "pipelined")


@dataclass
class Outcome:
    upstream: bytes
    client: bytes
    records: list[AuditRecord]
    session: ProxySession
    mode: str = ""
    #: The archive events the session handed over, in order.
    archive: list[ArchiveEvent] = field(default_factory=list)

    def events(self) -> list[str]:
        return [r.event.value for r in self.records]

    def record(self, event: str) -> AuditRecord:
        matches = [r for r in self.records if r.event.value == event]
        assert len(matches) == 1, f"expected one {event!r}, got {self.events()}"
        return matches[0]


@dataclass
class Expect:
    upstream: bytes | None = None
    client: bytes | None = None
    #: The exact sequence of events; each item an event name or a dict whose
    #: 'event' key is the name and whose other keys must match the fields.
    records: Sequence[str | dict[str, Any]] | None = None
    finished: bool | None = None
    end_reason: EndReason | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def new_session(
    limits: Limits | None = None,
    idle_notice: bool = True,
    message_identity: bool = False,
    durable_deletions: bool = False,
    policy: Callable[[], SessionPolicy] | None = None,
    identity: IdentityRules = DEFAULT_IDENTITY,
    retain: bool = False,
    content_digests: bool = True,
) -> ProxySession:
    """A session; ``policy`` makes a fresh SessionPolicy for each play."""
    return ProxySession(
        identity=identity,
        policy=policy() if policy is not None else None,
        client="192.0.2.7:40000",
        listener="test",
        limits=limits or Limits(),
        idle_notice=idle_notice,
        message_identity=message_identity,
        durable_deletions=durable_deletions,
        retain=retain,
        content_digests=content_digests,
    )


def _feed(session: ProxySession, step: Step, chunks: Iterable[bytes] | None = None) -> None:
    if isinstance(step, C):
        for chunk in chunks if chunks is not None else [step.data]:
            session.receive_client(chunk)
    elif isinstance(step, S):
        for chunk in chunks if chunks is not None else [step.data]:
            session.receive_server(chunk)
    elif isinstance(step, ClientEof):
        session.client_eof()
    elif isinstance(step, ServerEof):
        session.server_eof()
    elif isinstance(step, End):
        session.end(step.reason)
    elif isinstance(step, UpstreamFailed):
        session.upstream_failed("198.51.100.1:110", step.error)
    elif isinstance(step, Durable):
        assert session.pending_durable is not None, "no durable record was pending"
        session.durable_result(step.ok)
    elif isinstance(step, Retained):
        assert session.pending_retention is not None, "no DELE waited for its copy"
        session.retention_result(step.ok, path=step.path, stored=step.stored, reason=step.reason)


def play(steps: Sequence[Step], mode: str = "whole", **session_args: Any) -> Outcome:
    session = new_session(**session_args)
    upstream = bytearray()
    client = bytearray()
    records: list[AuditRecord] = []
    archive: list[ArchiveEvent] = []

    def collect() -> None:
        upstream.extend(session.take_upstream_output())
        client.extend(session.take_client_output())
        records.extend(session.take_records())
        archive.extend(session.take_archive_events())

    if mode == "pipelined":
        client_bytes = b"".join(s.data for s in steps if isinstance(s, C))
        session.receive_client(client_bytes)
        collect()
        # The server's replies in order, each step one read: a reply can
        # only follow the command popguard forwarded (and popguard holds
        # commands pipelined behind a login until its reply).
        for step in steps:
            if not isinstance(step, C):
                _feed(session, step)
                collect()
    else:
        for step in steps:
            if mode == "bytewise" and isinstance(step, C | S):
                data = step.data
                _feed(session, step, (data[i : i + 1] for i in range(len(data))))
            else:
                _feed(session, step)
            collect()
    return Outcome(bytes(upstream), bytes(client), records, session, mode, archive)


def check(outcome: Outcome, expect: Expect) -> None:
    where = f"[mode={outcome.mode}]"
    if expect.upstream is not None:
        assert outcome.upstream == expect.upstream, where
    if expect.client is not None:
        assert outcome.client == expect.client, where
    if expect.records is not None:
        names = [e if isinstance(e, str) else e["event"] for e in expect.records]
        assert outcome.events() == names, where
        for want, got in zip(expect.records, outcome.records, strict=True):
            if isinstance(want, dict):
                for key, value in want.items():
                    if key == "event":
                        continue
                    assert got.fields.get(key) == value, f"{where} {got.event}.{key}"
    if expect.finished is not None:
        assert outcome.session.finished == expect.finished, where
    if expect.end_reason is not None:
        assert outcome.session.end_reason == expect.end_reason, where


def run_all_modes(
    steps: Sequence[Step], expect: Expect, modes: Sequence[str] = MODES, **session_args: Any
) -> Outcome:
    """Play the transcript in every mode; every mode must meet ``expect``."""
    outcome: Outcome | None = None
    for mode in modes:
        outcome = play(steps, mode, **session_args)
        check(outcome, expect)
    assert outcome is not None
    return outcome
