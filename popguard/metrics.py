"""Prometheus metrics for popguard, fed mostly by the audit records.

:class:`Metrics` owns its own :class:`prometheus_client.CollectorRegistry`
(never the global one), so several instances (tests, two proxies in one
process) do not clash.  Most counters are derived from audit records: a
:class:`MetricsSink` is a *plain* audit sink (``write``/``close``, called
inline by :class:`~popguard.audit.AuditLog`), so the proxy needs no change to
count sessions, logins, policy denials, deletions, bytes and TLS handshakes.
What records do not carry is fed by explicit calls: :meth:`Metrics.observe_connect`
(or :meth:`Metrics.timed_connector`), the per-session :class:`CommandTimer`
(commands by verb and their round trip), :meth:`Metrics.observe_audit_write`,
and :meth:`Metrics.watch_audit` (per-sink health, backlog and lost records,
read at scrape time).

Label cardinality is bounded everywhere: outcomes, verbs, mechanisms, TLS
versions and policy settings come from fixed sets (anything else is
``other``); rule and sink names come from the administrator's files and are
capped (:data:`MAX_RULE_LABELS`, :data:`MAX_SINK_LABELS`).  No label ever
holds a user name, a client address or a free-text reason.

A metrics bug must never break auditing: :meth:`MetricsSink.write` swallows
its own errors and counts them in ``popguard_metrics_errors_total``.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any, Final, Protocol, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from popguard import __version__

__all__ = [
    "COMMAND_VERBS",
    "MAX_RULE_LABELS",
    "MAX_SINK_LABELS",
    "MECHANISMS",
    "OUTCOMES",
    "UPSTREAM_ERROR_KINDS",
    "AuditStatus",
    "CommandTimer",
    "Metrics",
    "MetricsSink",
    "merge_scrapes",
    "outcome_of",
]

#: ``popguard_sessions_total{outcome}``: every ``session.closed`` reason maps
#: to one of these; ``session.refused`` counts as ``refused`` (the audit trail
#: was down) or ``policy_denied`` (a policy refused the connection).
OUTCOMES: Final = (
    "quit",
    "client_closed",
    "client_error",
    "idle_timeout",
    "login_timeout",
    "max_session",
    "upstream_error",
    "shutdown",
    "policy_denied",
    "identity_unknown",
    "operator_close",
    "refused",
    "internal_error",
    "other",
)

_OUTCOME_OF_REASON: Final[Mapping[str, str]] = {
    "quit": "quit",
    "client_closed": "client_closed",
    "client_error": "client_error",
    "client_protocol_error": "client_error",
    "idle_timeout": "idle_timeout",
    "login_timeout": "login_timeout",
    "max_session": "max_session",
    "upstream_unreachable": "upstream_error",
    "upstream_closed": "upstream_error",
    "upstream_error": "upstream_error",
    "upstream_protocol_error": "upstream_error",
    "upstream_refused": "upstream_error",
    "upstream_timeout": "upstream_error",
    "shutdown": "shutdown",
    "policy_denied": "policy_denied",
    "identity_unknown": "identity_unknown",
    "operator_close": "operator_close",
    "internal_error": "internal_error",
}

#: POP3 verbs counted under their own name (RFC 1939, 2449, 2595, 5034, 6856,
#: and the old LAST/XTND); any other verb is ``other``.
COMMAND_VERBS: Final = frozenset(
    {"USER", "PASS", "APOP", "AUTH", "STAT", "LIST", "RETR", "DELE", "NOOP", "RSET",
     "QUIT", "TOP", "UIDL", "CAPA", "STLS", "UTF8", "LANG", "LAST", "XTND"}
)  # fmt: skip

#: Login mechanisms counted under their own name (``USER`` is USER/PASS);
#: the same set a policy's ``auth_mechanisms`` accepts.
MECHANISMS: Final = frozenset(
    {"USER", "APOP", "PLAIN", "LOGIN", "CRAM-MD5", "DIGEST-MD5", "SCRAM-SHA-1",
     "SCRAM-SHA-256", "GSSAPI", "NTLM", "XOAUTH2", "OAUTHBEARER", "EXTERNAL", "ANONYMOUS"}
)  # fmt: skip

#: Policy settings (``popguard.policy.model.SETTINGS``); others are ``other``.
_SETTINGS: Final = frozenset(
    {"access", "deny_commands", "deny_reply", "auth_mechanisms", "require_tls", "idle_timeout",
     "max_session", "max_sessions_total", "max_sessions_per_client", "max_sessions_per_user",
     "login_throttle", "retain"}
)  # fmt: skip

_TLS_VERSIONS: Final = frozenset({"TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"})
_TLS_SIDES: Final = frozenset({"client", "upstream"})
#: How the shell's details of a failed TLS handshake begin (``popguard.shell.relay``:
#: the client's in ``session.closed``, the upstream's in ``upstream.failed``).
_TLS_FAILURE_PREFIX: Final = "TLS handshake"

#: ``popguard_upstream_errors_total{kind}``: the ``upstream_*`` end reasons
#: (``popguard.core.records.EndReason``) without their prefix.
_UPSTREAM_REASON_PREFIX: Final = "upstream_"
UPSTREAM_ERROR_KINDS: Final = (
    "unreachable",
    "closed",
    "error",
    "protocol_error",
    "refused",
    "timeout",
)
_FATES: Final = ("committed", "discarded", "failed", "unknown")
_DIRECTIONS: Final = ("client_to_upstream", "upstream_to_client")

#: Distinct rule names kept as label values; later ones are counted as ``other``.
MAX_RULE_LABELS: Final = 1000
#: Distinct audit sink names kept as label values (sinks come from the config).
MAX_SINK_LABELS: Final = 64
#: Longest label value taken from a file (rule and sink names); longer ones are cut.
_MAX_LABEL_LENGTH: Final = 128
OTHER: Final = "other"

#: Seconds.  The upstream connect: loopback to a slow WAN, up to the default
#: ``connect_timeout`` (10 s).
CONNECT_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
#: Seconds.  A command's round trip; RETR/TOP/LIST/UIDL include their whole body.
ROUNDTRIP_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0,
)  # fmt: skip
#: Seconds.  One audit write (a buffered write is ~30 µs, an fsync 0.1-10 ms).
AUDIT_WRITE_BUCKETS: Final = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
)  # fmt: skip

#: Per-session bound on commands awaiting their reply in a :class:`CommandTimer`
#: (the core itself stops reading at ``limits.max_pipelined``).
_MAX_IN_FLIGHT: Final = 1024

_T = TypeVar("_T")


def outcome_of(reason: object) -> str:
    """The ``outcome`` label for a ``session.closed`` ``reason``."""
    return _OUTCOME_OF_REASON.get(reason, OTHER) if isinstance(reason, str) else OTHER


def _from_set(value: object, known: frozenset[str], *, upper: bool = False) -> str:
    if not isinstance(value, str):
        return OTHER
    if upper:
        value = value.upper()
    return value if value in known else OTHER


def _is_tls_failure(detail: object) -> bool:
    """Whether a record's free-text detail says a TLS handshake failed."""
    return isinstance(detail, str) and detail.startswith(_TLS_FAILURE_PREFIX)


def _count(value: object) -> int:
    """A non-negative int from a record field (bools and junk count as 0)."""
    if isinstance(value, bool) or not isinstance(value, int):
        return 0
    return max(value, 0)


class _BoundedLabel:
    """Label values from files (rule, sink names): at most ``cap`` distinct, then ``other``."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: object) -> str:
        if not isinstance(value, str) or not value:
            return OTHER
        value = value[:_MAX_LABEL_LENGTH]
        seen = self._seen
        if value in seen:
            return value
        with self._lock:
            if value in seen:
                return value
            if len(seen) >= self.cap:
                return OTHER
            seen.add(value)
            return value

    def __len__(self) -> int:
        return len(self._seen)


class _Children:
    """A labelled metric's children by label values, cached.

    ``metric.labels(...)`` validates and locks on every call (~4 µs); the
    sink runs inline on the event loop, so it looks children up here.  The
    label values are bounded, so is the cache.  A race only makes two
    lookups of the same child.
    """

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: Counter | Histogram) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *labels: str) -> Any:
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = self._metric.labels(*labels)
        return child


class AuditStatus(Protocol):
    """What :meth:`Metrics.watch_audit` reads: :class:`popguard.audit.AuditLog`."""

    def status(self) -> list[dict[str, Any]]: ...


class _AuditCollector:
    """Per-sink lost records, health and backlog, read at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return [
            CounterMetricFamily("popguard_audit_records_lost", _LOST_HELP, labels=["sink"]),
            GaugeMetricFamily("popguard_audit_sink_healthy", _HEALTHY_HELP, labels=["sink"]),
            GaugeMetricFamily("popguard_audit_sink_backlog", _BACKLOG_HELP, labels=["sink"]),
        ]

    def collect(self) -> Iterable[Metric]:
        lost = CounterMetricFamily("popguard_audit_records_lost", _LOST_HELP, labels=["sink"])
        healthy = GaugeMetricFamily("popguard_audit_sink_healthy", _HEALTHY_HELP, labels=["sink"])
        backlog = GaugeMetricFamily("popguard_audit_sink_backlog", _BACKLOG_HELP, labels=["sink"])
        counts = self._metrics._lost_snapshot()
        source = self._metrics._audit
        if source is not None:
            try:
                statuses = source.status()
            except Exception:
                statuses = []
            for status in statuses:
                sink = self._metrics._sink_label(status.get("sink"))
                counts[sink] = max(counts.get(sink, 0), _count(status.get("lost")))
                healthy.add_metric([sink], 1.0 if status.get("healthy") else 0.0)
                backlog.add_metric([sink], float(_count(status.get("backlog"))))
        for sink, value in sorted(counts.items()):
            lost.add_metric([sink], float(value))
        return [lost, healthy, backlog]


_LOST_HELP = "Audit records dropped by a sink (queue full, or undelivered at shutdown)."
_HEALTHY_HELP = "1 while the audit sink writes and has recorded every record it dropped."
_BACKLOG_HELP = "Audit records waiting in the sink's queue."


class Metrics:
    """Every popguard metric, in a registry of its own."""

    def __init__(
        self,
        *,
        max_rule_labels: int = MAX_RULE_LABELS,
        max_sink_labels: int = MAX_SINK_LABELS,
        process_metrics: bool = True,
    ) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self._rule_label = _BoundedLabel(max_rule_labels)
        self._sink_label = _BoundedLabel(max_sink_labels)
        self._lost_lock = threading.Lock()
        self._lost_by_sink: dict[str, int] = {}
        self._audit: AuditStatus | None = None
        self._active_bound = False

        info = Info("popguard_build", "popguard's version.", registry=registry)
        info.info({"version": __version__})

        self.sessions_active = Gauge(
            "popguard_sessions_active", "Client sessions open now.", registry=registry
        )
        self.sessions_logged_in = Gauge(
            "popguard_sessions_logged_in",
            "Client sessions open now past a successful login (TRANSACTION state); the "
            "rest of popguard_sessions_active are still in AUTHORIZATION.",
            registry=registry,
        )
        #: Session ids (the records' ``session``) logged in and not yet closed.
        self._logged_in: set[str] = set()
        self.sessions = Counter(
            "popguard_sessions",
            "Client sessions ended, by outcome (refused: turned away while the audit trail "
            "was down; policy_denied: refused by a policy at connect or login).",
            ["outcome"],
            registry=registry,
        )
        self.logins = Counter(
            "popguard_logins",
            "Login attempts (PASS, APOP, AUTH), by result and mechanism (ok, failed: the "
            "upstream's answer; refused: popguard could not tell the account, docs/identity.md).",
            ["result", "mechanism"],
            registry=registry,
        )
        self.commands = Counter(
            "popguard_commands",
            "Well-formed client commands, by verb (other: a verb popguard does not know).",
            ["verb"],
            registry=registry,
        )
        self.commands_rejected = Counter(
            "popguard_commands_rejected",
            "Client lines popguard answered itself with -ERR (syntax, length, state).",
            registry=registry,
        )
        self.policy_denials = Counter(
            "popguard_policy_denials",
            f"Enforced policy denials, by rule and setting (at most {max_rule_labels} rule "
            "names, then other).",
            ["rule", "setting"],
            registry=registry,
        )
        self.policy_dry_runs = Counter(
            "popguard_policy_dry_runs",
            "Denials a dry-run rule would have made, by rule and setting.",
            ["rule", "setting"],
            registry=registry,
        )
        self.login_blocks = Counter(
            "popguard_policy_login_blocks",
            "Clients or users blocked by a login_throttle after failed logins.",
            registry=registry,
        )
        self.deletions = Counter(
            "popguard_deletions",
            "Messages whose deletion was settled, by fate: committed (+OK to QUIT), "
            "discarded (no QUIT: kept), failed (-ERR to QUIT), unknown (no reply to QUIT).",
            ["fate"],
            registry=registry,
        )
        self.messages_retrieved = Counter(
            "popguard_messages_retrieved",
            "RETR and TOP replies relayed completely.",
            ["command"],
            registry=registry,
        )
        self.bytes = Counter(
            "popguard_bytes",
            "Octets popguard sent on each side's connection (client_to_upstream: to the "
            "upstream, identity lookups included; upstream_to_client: to clients), counted "
            "when a session closes.",
            ["direction"],
            registry=registry,
        )
        self.upstream_connections = Counter(
            "popguard_upstream_connections",
            "Upstream connection attempts, by result (ok, failed).",
            ["result"],
            registry=registry,
        )
        self.upstream_errors = Counter(
            "popguard_upstream_errors",
            "Sessions ended by the upstream, by kind: unreachable (connect or TLS setup "
            "failed), closed, error (a read or write failed), protocol_error, refused "
            "(-ERR greeting), timeout (no greeting).",
            ["kind"],
            registry=registry,
        )
        self.upstream_connect = Histogram(
            "popguard_upstream_connect_seconds",
            "Time to establish the upstream TCP connection (successful connects).",
            buckets=CONNECT_BUCKETS,
            registry=registry,
        )
        self.command_roundtrip = Histogram(
            "popguard_command_roundtrip_seconds",
            "From forwarding a command upstream to its complete reply, by verb "
            "(multi-line replies include their body).",
            ["verb"],
            buckets=ROUNDTRIP_BUCKETS,
            registry=registry,
        )
        self.tls_sessions = Counter(
            "popguard_tls_sessions",
            "TLS handshakes completed, by side (client, upstream) and protocol version.",
            ["side", "version"],
            registry=registry,
        )
        self.tls_handshake_failures = Counter(
            "popguard_tls_handshake_failures",
            "TLS handshakes that failed or timed out, by side (client: POP3S or STLS "
            "toward a client; upstream: toward the server).",
            ["side"],
            registry=registry,
        )
        self.shared_state_outages = Counter(
            "popguard_shared_state_outages",
            "Times the shared state (shared_state:) stopped answering "
            "(shared_state.unavailable: fail-open counts in this process meanwhile, "
            "fail-closed refuses new logins).",
            registry=registry,
        )
        #: ``popguard_shared_state_up``, once :meth:`bind_shared_state` says there is one.
        self.shared_state_up: Gauge | None = None
        self.audit_sink_failures = Counter(
            "popguard_audit_sink_failures",
            "Times an audit sink started failing (audit.sink.failed).",
            ["sink"],
            registry=registry,
        )
        self.audit_write = Histogram(
            "popguard_audit_write_seconds",
            "Time to write one audit record in a sink's writer: a batch's write (fsync included) "
            "shared among its records.",
            buckets=AUDIT_WRITE_BUCKETS,
            registry=registry,
        )
        self.errors = Counter(
            "popguard_metrics_errors",
            "Audit records the metrics could not account for (a popguard bug).",
            registry=registry,
        )
        self._sessions = _Children(self.sessions)
        self._logins = _Children(self.logins)
        self._commands = _Children(self.commands)
        self._denials = _Children(self.policy_denials)
        self._dry_runs = _Children(self.policy_dry_runs)
        self._retrieved = _Children(self.messages_retrieved)
        self._bytes = _Children(self.bytes)
        self._upstream = _Children(self.upstream_connections)
        self._roundtrip = _Children(self.command_roundtrip)
        self._tls = _Children(self.tls_sessions)
        self._sink_failures = _Children(self.audit_sink_failures)
        registry.register(_AuditCollector(self))
        if process_metrics:
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)

        # Fixed label sets appear at 0 from the start, so rate() and alerts work
        # before the first event.
        for outcome in OUTCOMES:
            self._sessions(outcome)
        for fate in _FATES:
            self.deletions.labels(fate)
        for direction in _DIRECTIONS:
            self._bytes(direction)
        for result in ("ok", "failed"):
            self._upstream(result)
        for kind in UPSTREAM_ERROR_KINDS:
            self.upstream_errors.labels(kind)
        for side in sorted(_TLS_SIDES):
            self.tls_handshake_failures.labels(side)

        self._handlers: dict[str, Callable[[Mapping[str, Any]], None]] = {
            "session.opened": self._session_opened,
            "session.closed": self._session_closed,
            "session.refused": self._session_refused,
            "auth.succeeded": self._auth_succeeded,
            "auth.failed": self._auth_failed,
            "auth.refused": self._auth_refused,
            "command.rejected": self._command_rejected,
            "policy.denied": self._policy_denied,
            "policy.dry_run": self._policy_dry_run,
            "policy.login_blocked": self._login_blocked,
            "message.retrieved": self._message_retrieved,
            "deletions.committed": self._deletions("committed"),
            "deletions.discarded": self._deletions("discarded"),
            "deletions.failed": self._deletions("failed"),
            "deletions.unknown": self._deletions("unknown"),
            "upstream.connected": self._upstream_connected,
            "upstream.failed": self._upstream_failed,
            "tls.established": self._tls_established,
            "audit.sink.failed": self._sink_failed,
            "shared_state.unavailable": self._shared_state_down,
            "audit.records.lost": self._records_lost,
        }
        self.sink = MetricsSink(self)

    # -- explicit feeds (what records do not carry) --------------------------

    def observe_connect(self, seconds: float) -> None:
        """One successful upstream TCP connect took ``seconds``."""
        self.upstream_connect.observe(max(seconds, 0.0))

    def observe_roundtrip(self, seconds: float, verb: str = OTHER) -> None:
        """A command's reply was complete ``seconds`` after it was forwarded."""
        self._roundtrip(_from_set(verb, COMMAND_VERBS, upper=True)).observe(max(seconds, 0.0))

    def count_command(self, verb: str) -> None:
        """A well-formed client command (counted whether or not it was forwarded)."""
        self._commands(_from_set(verb, COMMAND_VERBS, upper=True)).inc()

    def set_active(self, n: int) -> None:
        """Set the open-session gauge (a no-op once :meth:`bind_active` was called)."""
        self.sessions_active.set(n)

    def bind_active(self, count: Callable[[], int]) -> None:
        """Read the open-session gauge from ``count`` at every scrape.

        Without it the gauge follows ``session.opened`` and ``session.closed``.
        """
        self._active_bound = True
        self.sessions_active.set_function(lambda: float(count()))

    def observe_audit_write(self, seconds: float) -> None:
        """An audit sink took ``seconds`` to write (and maybe fsync) one record."""
        self.audit_write.observe(max(seconds, 0.0))

    def watch_audit(self, audit: AuditStatus) -> None:
        """Export each queued sink's lost records, health and backlog at scrape time.

        ``audit`` is the :class:`~popguard.audit.AuditLog` (its ``status()``).
        A plain sink never sees ``audit.records.lost``, which a queued sink
        writes only into its own stream, so this is where lost records come from.
        """
        self._audit = audit

    def timed_connector(
        self,
        connect: Callable[[], Awaitable[_T]],
        clock: Callable[[], float] = time.monotonic,
    ) -> Callable[[], Awaitable[_T]]:
        """Wrap an upstream connector so each successful connect is observed."""

        async def timed() -> _T:
            started = clock()
            stream = await connect()
            self.observe_connect(clock() - started)
            return stream

        return timed

    def command_timer(self, clock: Callable[[], float] = time.monotonic) -> CommandTimer:
        """A per-session observer for the core's command hooks."""
        return CommandTimer(self, clock)

    # -- exposition ---------------------------------------------------------

    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """The scrape body and its content type, negotiated from an Accept header.

        Without an OpenMetrics or text 1.0.0 request this is the Prometheus
        text format 0.0.4, which every Prometheus version reads.
        """
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type

    # -- audit records ------------------------------------------------------

    def record(self, event: Mapping[str, Any]) -> None:
        """Account for one audit record (what :class:`MetricsSink` calls)."""
        name = event.get("event")
        if not isinstance(name, str):
            return
        handler = self._handlers.get(name)
        if handler is not None:
            handler(event)

    def _session_opened(self, event: Mapping[str, Any]) -> None:
        if not self._active_bound:
            self.sessions_active.inc()

    def _session_closed(self, event: Mapping[str, Any]) -> None:
        if not self._active_bound:
            self.sessions_active.dec()
        session = event.get("session")
        if session in self._logged_in:
            self._logged_in.discard(session)
            self.sessions_logged_in.set(len(self._logged_in))
        reason = event.get("reason")
        self._sessions(outcome_of(reason)).inc()
        if isinstance(reason, str) and reason.startswith(_UPSTREAM_REASON_PREFIX):
            kind = reason.removeprefix(_UPSTREAM_REASON_PREFIX)
            if kind in UPSTREAM_ERROR_KINDS:
                self.upstream_errors.labels(kind).inc()
        elif reason == "client_error" and _is_tls_failure(event.get("detail")):
            self.tls_handshake_failures.labels("client").inc()
        to_upstream = _count(event.get("bytes_to_upstream"))
        to_client = _count(event.get("bytes_to_client"))
        if to_upstream:
            self._bytes("client_to_upstream").inc(to_upstream)
        if to_client:
            self._bytes("upstream_to_client").inc(to_client)

    def _session_refused(self, event: Mapping[str, Any]) -> None:
        outcome = "policy_denied" if event.get("reason") == "policy" else "refused"
        self._sessions(outcome).inc()

    def _auth_succeeded(self, event: Mapping[str, Any]) -> None:
        self._logins("ok", _from_set(event.get("mechanism"), MECHANISMS, upper=True)).inc()
        session = event.get("session")
        if isinstance(session, str):
            self._logged_in.add(session)
            self.sessions_logged_in.set(len(self._logged_in))

    def _auth_failed(self, event: Mapping[str, Any]) -> None:
        mechanism = _from_set(event.get("mechanism"), MECHANISMS, upper=True)
        self._logins("failed", mechanism).inc()

    def _auth_refused(self, event: Mapping[str, Any]) -> None:
        mechanism = _from_set(event.get("mechanism"), MECHANISMS, upper=True)
        self._logins("refused", mechanism).inc()

    def _command_rejected(self, event: Mapping[str, Any]) -> None:
        self.commands_rejected.inc()

    def _policy_labels(self, event: Mapping[str, Any]) -> tuple[str, str]:
        return self._rule_label(event.get("rule")), _from_set(event.get("setting"), _SETTINGS)

    def _policy_denied(self, event: Mapping[str, Any]) -> None:
        self._denials(*self._policy_labels(event)).inc()

    def _policy_dry_run(self, event: Mapping[str, Any]) -> None:
        self._dry_runs(*self._policy_labels(event)).inc()

    def _login_blocked(self, event: Mapping[str, Any]) -> None:
        self.login_blocks.inc()

    def _message_retrieved(self, event: Mapping[str, Any]) -> None:
        command = event.get("command")
        self._retrieved(command if command in ("RETR", "TOP") else OTHER).inc()

    def _deletions(self, fate: str) -> Callable[[Mapping[str, Any]], None]:
        counter = self.deletions.labels(fate)

        def count(event: Mapping[str, Any]) -> None:
            messages = event.get("messages")
            if isinstance(messages, list | tuple) and messages:
                counter.inc(len(messages))

        return count

    def _upstream_connected(self, event: Mapping[str, Any]) -> None:
        self._upstream("ok").inc()

    def _upstream_failed(self, event: Mapping[str, Any]) -> None:
        self._upstream("failed").inc()
        if _is_tls_failure(event.get("error")):
            self.tls_handshake_failures.labels("upstream").inc()

    def _tls_established(self, event: Mapping[str, Any]) -> None:
        side = _from_set(event.get("side"), _TLS_SIDES)
        self._tls(side, _from_set(event.get("tls_version"), _TLS_VERSIONS)).inc()

    def _shared_state_down(self, event: Mapping[str, Any]) -> None:
        self.shared_state_outages.inc()

    def bind_shared_state(self, healthy: Callable[[], bool]) -> None:
        """Export ``popguard_shared_state_up`` (1: the store answers), read at scrape time."""
        if self.shared_state_up is None:
            self.shared_state_up = Gauge(
                "popguard_shared_state_up",
                "1 while the shared state (shared_state:) answers, 0 during an outage.",
                registry=self.registry,
            )
        self.shared_state_up.set_function(lambda: 1.0 if healthy() else 0.0)

    def _sink_failed(self, event: Mapping[str, Any]) -> None:
        self._sink_failures(self._sink_label(event.get("sink"))).inc()

    def _records_lost(self, event: Mapping[str, Any]) -> None:
        sink = self._sink_label(event.get("sink"))
        count = _count(event.get("count"))
        with self._lost_lock:
            self._lost_by_sink[sink] = self._lost_by_sink.get(sink, 0) + count

    def _lost_snapshot(self) -> dict[str, int]:
        with self._lost_lock:
            return dict(self._lost_by_sink)


class MetricsSink:
    """A plain audit sink that turns records into metrics.

    Called inline by :class:`~popguard.audit.AuditLog` (on the event loop,
    and from writer threads for ``audit.sink.failed``); it only bumps
    counters.  It never raises: an error is counted in
    ``popguard_metrics_errors_total`` instead of breaking the audit trail.
    """

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def write(self, event_dict: Mapping[str, Any]) -> None:
        try:
            self.metrics.record(event_dict)
        except Exception:
            self.metrics.errors.inc()

    def close(self) -> None:
        pass


class CommandTimer:
    """One session's commands: counted by verb, and timed from forward to reply.

    The core calls :meth:`command` for each well-formed client command,
    :meth:`forwarded` when it queues one for the upstream and :meth:`answered`
    when the upstream's reply to it is complete.  Replies come in the order
    the commands were forwarded (RFC 1939 pipelining, RFC 2449), so a FIFO
    of start times pairs them.  ``clock`` is the shell's (``trio.current_time``).
    """

    __slots__ = ("_clock", "_in_flight", "_metrics")

    def __init__(self, metrics: Metrics, clock: Callable[[], float] = time.monotonic) -> None:
        self._metrics = metrics
        self._clock = clock
        self._in_flight: deque[tuple[str, float]] = deque()

    def command(self, verb: str) -> None:
        self._metrics.count_command(verb)

    def forwarded(self, verb: str) -> None:
        if len(self._in_flight) < _MAX_IN_FLIGHT:
            self._in_flight.append((verb, self._clock()))

    def answered(self, verb: str) -> None:
        in_flight = self._in_flight
        if not any(sent == verb for sent, _ in in_flight):
            return  # never forwarded (the greeting), or beyond the bound
        # Pop up to the match: entries the core dropped without a reply
        # cannot be paired (and are not observed).
        while in_flight:
            sent_verb, started = in_flight.popleft()
            if sent_verb == verb:
                if verb != "AUTH":  # an AUTH exchange waits on the client too
                    self._metrics.observe_roundtrip(self._clock() - started, verb)
                return

    def __iter__(self) -> Iterator[tuple[str, float]]:
        """The commands still awaiting a reply (for tests and diagnostics)."""
        return iter(tuple(self._in_flight))


class _Merged:
    """A collector that replays parsed scrapes, each sample labelled with its worker."""

    def __init__(self, scrapes: Mapping[int, str]) -> None:
        self._scrapes = scrapes

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for worker, text in sorted(self._scrapes.items()):
            for family in text_string_to_metric_families(text):
                merged = families.get(family.name)
                if merged is None:
                    merged = Metric(family.name, family.documentation, family.type, family.unit)
                    families[family.name] = merged
                for sample in family.samples:
                    merged.add_sample(
                        sample.name,
                        {**sample.labels, "worker": str(worker)},
                        sample.value,
                        sample.timestamp,
                        sample.exemplar,
                    )
        return iter(families.values())


def merge_scrapes(scrapes: Mapping[int, str], accept: str | None = None) -> tuple[bytes, str]:
    """Several workers' ``/metrics`` as one exposition, every sample labelled ``worker``.

    What the supervisor's admin listener serves with ``workers: N``, so one
    scrape target describes the host: sum over ``worker`` in PromQL, or keep
    it to see one worker.  Each metric family appears once (its samples from
    every worker together), as the text format requires.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(scrapes))
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type
