"""Metrics from audit records: counters, bounded labels, and never a user name."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from popguard.audit import AuditLog
from popguard.core.records import AuditRecord, EndReason, Event, Scalar
from popguard.metrics import (
    COMMAND_VERBS,
    MECHANISMS,
    OUTCOMES,
    CommandTimer,
    Metrics,
    outcome_of,
)
from popguard.policy.model import MECHANISMS as POLICY_MECHANISMS
from popguard.policy.model import SETTINGS, Mode

USER = "alice.secret@example.org"


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(process_metrics=False)


def value(metrics: Metrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def feed(metrics: Metrics, event: str, **fields: Any) -> None:
    metrics.sink.write({"event": event, "session": "0123456789abcdef", "user": USER, **fields})


def series(metrics: Metrics, family: str) -> list[dict[str, str]]:
    return [
        sample.labels
        for metric in metrics.registry.collect()
        if metric.name == family
        for sample in metric.samples
        if sample.name == family + "_total"
    ]


# -- sessions -------------------------------------------------------------------


def test_every_end_reason_maps_to_a_known_outcome() -> None:
    for reason in EndReason:
        assert outcome_of(reason.value) in OUTCOMES
        assert outcome_of(reason.value) != "other", reason
    assert outcome_of("something_new") == "other"
    assert outcome_of(None) == "other"


@pytest.mark.parametrize(
    ("reason", "outcome"),
    [
        ("quit", "quit"),
        ("client_closed", "client_closed"),
        ("client_error", "client_error"),
        ("client_protocol_error", "client_error"),
        ("idle_timeout", "idle_timeout"),
        ("max_session", "max_session"),
        ("upstream_closed", "upstream_error"),
        ("upstream_error", "upstream_error"),
        ("upstream_protocol_error", "upstream_error"),
        ("upstream_unreachable", "upstream_error"),
        ("upstream_refused", "upstream_error"),
        ("shutdown", "shutdown"),
        ("policy_denied", "policy_denied"),
        ("internal_error", "internal_error"),
        ("from_the_future", "other"),
    ],
)
def test_session_closed_counts_by_outcome(metrics: Metrics, reason: str, outcome: str) -> None:
    feed(metrics, "session.opened", client="192.0.2.1:5000", listener="pop3")
    feed(metrics, "session.closed", reason=reason)
    assert value(metrics, "popguard_sessions_total", outcome=outcome) == 1
    assert sum(value(metrics, "popguard_sessions_total", outcome=o) for o in OUTCOMES) == 1


def test_every_outcome_is_exported_at_zero_from_the_start(metrics: Metrics) -> None:
    for outcome in OUTCOMES:
        found = metrics.registry.get_sample_value("popguard_sessions_total", {"outcome": outcome})
        assert found == 0.0
    assert {labels["outcome"] for labels in series(metrics, "popguard_sessions")} == set(OUTCOMES)


def test_refused_sessions(metrics: Metrics) -> None:
    feed(metrics, "session.refused", reason="audit_unavailable")
    feed(metrics, "session.refused", reason="policy")
    assert value(metrics, "popguard_sessions_total", outcome="refused") == 1
    assert value(metrics, "popguard_sessions_total", outcome="policy_denied") == 1
    assert value(metrics, "popguard_sessions_active") == 0


def test_active_follows_opened_and_closed(metrics: Metrics) -> None:
    for _ in range(3):
        feed(metrics, "session.opened")
    feed(metrics, "session.closed", reason="quit")
    assert value(metrics, "popguard_sessions_active") == 2


def test_set_active_and_bind_active(metrics: Metrics) -> None:
    metrics.set_active(7)
    assert value(metrics, "popguard_sessions_active") == 7
    open_sessions = [1, 2]
    metrics.bind_active(lambda: len(open_sessions))
    feed(metrics, "session.opened")  # ignored once bound
    assert value(metrics, "popguard_sessions_active") == 2
    open_sessions.append(3)
    assert value(metrics, "popguard_sessions_active") == 3


def test_bytes_each_way_from_session_closed(metrics: Metrics) -> None:
    feed(
        metrics,
        "session.closed",
        reason="quit",
        bytes_from_client=100,
        bytes_to_upstream=130,
        bytes_from_upstream=5060,
        bytes_to_client=5000,
    )
    feed(metrics, "session.closed", reason="quit", bytes_to_upstream=1, bytes_to_client=2)
    assert value(metrics, "popguard_bytes_total", direction="client_to_upstream") == 131
    assert value(metrics, "popguard_bytes_total", direction="upstream_to_client") == 5002


# -- logins, commands ------------------------------------------------------------


def test_logins_by_result_and_mechanism(metrics: Metrics) -> None:
    feed(metrics, "auth.succeeded", mechanism="USER")
    feed(metrics, "auth.succeeded", mechanism="PLAIN")
    feed(metrics, "auth.failed", mechanism="APOP", reply="-ERR no")
    feed(metrics, "auth.failed", mechanism="X-MADE-UP-\u2603", reply="-ERR no")
    feed(metrics, "auth.failed", mechanism=None)
    assert value(metrics, "popguard_logins_total", result="ok", mechanism="USER") == 1
    assert value(metrics, "popguard_logins_total", result="ok", mechanism="PLAIN") == 1
    assert value(metrics, "popguard_logins_total", result="failed", mechanism="APOP") == 1
    assert value(metrics, "popguard_logins_total", result="failed", mechanism="other") == 2


def test_mechanism_set_matches_the_policy_engine() -> None:
    assert MECHANISMS == POLICY_MECHANISMS


def test_commands_by_verb_are_bounded(metrics: Metrics) -> None:
    for verb in ("RETR", "RETR", "stat", "QUIT"):
        metrics.count_command(verb)
    for i in range(500):
        metrics.count_command(f"X{i:03d}")
    assert value(metrics, "popguard_commands_total", verb="RETR") == 2
    assert value(metrics, "popguard_commands_total", verb="STAT") == 1
    assert value(metrics, "popguard_commands_total", verb="other") == 500
    verbs = {labels["verb"] for labels in series(metrics, "popguard_commands")}
    assert verbs <= COMMAND_VERBS | {"other"}


def test_rejected_commands(metrics: Metrics) -> None:
    feed(metrics, "command.rejected", reason="Command line too long")
    assert value(metrics, "popguard_commands_rejected_total") == 1


# -- policy ----------------------------------------------------------------------


def test_policy_denials_by_rule_and_setting(metrics: Metrics) -> None:
    mode: Mode = "enforce"
    feed(
        metrics,
        "policy.denied",
        rule="no-dele",
        setting="deny_commands",
        mode=mode,
        policy_file="/etc/popguard/policies/10.yaml:3",
        reason="DELE is not allowed",
        command="DELE",
    )
    feed(metrics, "policy.denied", rule="no-dele", setting="deny_commands")
    feed(metrics, "policy.denied", rule="limits", setting="max_sessions_per_client")
    feed(metrics, "policy.denied", rule="weird", setting="not_a_setting")
    feed(metrics, "policy.dry_run", rule="trial", setting="max_session")
    feed(metrics, "policy.login_blocked", key="client", seconds=60, rule="throttle")
    denials = "popguard_policy_denials_total"
    assert value(metrics, denials, rule="no-dele", setting="deny_commands") == 2
    assert value(metrics, denials, rule="limits", setting="max_sessions_per_client") == 1
    assert value(metrics, denials, rule="weird", setting="other") == 1
    assert value(metrics, "popguard_policy_dry_runs_total", rule="trial", setting="max_session")
    assert value(metrics, "popguard_policy_login_blocks_total") == 1


def test_every_policy_setting_is_a_label_of_its_own(metrics: Metrics) -> None:
    for setting in SETTINGS:
        feed(metrics, "policy.denied", rule="r", setting=setting)
        assert value(metrics, "popguard_policy_denials_total", rule="r", setting=setting) == 1


def test_rule_names_are_capped() -> None:
    metrics = Metrics(process_metrics=False, max_rule_labels=5)
    for i in range(20):
        feed(metrics, "policy.denied", rule=f"rule-{i}", setting="access")
    feed(metrics, "policy.denied", rule="rule-0", setting="access")  # known: kept
    rules = {labels["rule"] for labels in series(metrics, "popguard_policy_denials")}
    assert rules == {f"rule-{i}" for i in range(5)} | {"other"}
    assert value(metrics, "popguard_policy_denials_total", rule="rule-0", setting="access") == 2
    assert value(metrics, "popguard_policy_denials_total", rule="other", setting="access") == 15


def test_default_rule_cap_is_1000(metrics: Metrics) -> None:
    for i in range(1500):
        feed(metrics, "policy.denied", rule=f"r{i}", setting="access")
    rules = {labels["rule"] for labels in series(metrics, "popguard_policy_denials")}
    assert len(rules) == 1001
    assert value(metrics, "popguard_policy_denials_total", rule="other", setting="access") == 500


def test_long_rule_names_are_cut(metrics: Metrics) -> None:
    feed(metrics, "policy.denied", rule="r" * 1000, setting="access")
    (labels,) = series(metrics, "popguard_policy_denials")
    assert labels["rule"] == "r" * 128


# -- deletions, messages, upstream, TLS ---------------------------------------------


def test_deletions_count_messages_by_fate(metrics: Metrics) -> None:
    two = [{"msg": 1, "uidl": "a", "size": 10}, {"msg": 2, "uidl": "b", "size": 20}]
    feed(metrics, "deletions.committed", messages=two)
    feed(metrics, "deletions.committed", messages=two[:1])
    feed(metrics, "deletions.discarded", messages=two, reason="client_closed")
    feed(metrics, "deletions.failed", messages=two[:1], reply="-ERR")
    feed(metrics, "deletions.unknown", messages=(two[1],), reason="upstream_closed")
    feed(metrics, "deletions.discarded", messages=[])
    assert value(metrics, "popguard_deletions_total", fate="committed") == 3
    assert value(metrics, "popguard_deletions_total", fate="discarded") == 2
    assert value(metrics, "popguard_deletions_total", fate="failed") == 1
    assert value(metrics, "popguard_deletions_total", fate="unknown") == 1


def test_messages_retrieved(metrics: Metrics) -> None:
    feed(metrics, "message.retrieved", command="RETR", msg=1, uidl="u", size=5, bytes=9)
    feed(metrics, "message.retrieved", command="TOP", msg=1)
    assert value(metrics, "popguard_messages_retrieved_total", command="RETR") == 1
    assert value(metrics, "popguard_messages_retrieved_total", command="TOP") == 1


def test_upstream_connections(metrics: Metrics) -> None:
    feed(metrics, "upstream.connected", upstream="127.0.0.1:110")
    feed(metrics, "upstream.failed", upstream="127.0.0.1:110", error="Connection refused")
    feed(metrics, "upstream.failed", upstream="127.0.0.1:110", error="connect timed out")
    assert value(metrics, "popguard_upstream_connections_total", result="ok") == 1
    assert value(metrics, "popguard_upstream_connections_total", result="failed") == 2


def test_tls_by_side_and_version(metrics: Metrics) -> None:
    feed(metrics, "tls.established", side="client", stls=True, tls_version="TLSv1.3")
    feed(metrics, "tls.established", side="upstream", stls=False, tls_version="TLSv1.2")
    feed(metrics, "tls.established", side="sideways", tls_version="SSLv3-ish")
    tls = "popguard_tls_sessions_total"
    assert value(metrics, tls, side="client", version="TLSv1.3") == 1
    assert value(metrics, tls, side="upstream", version="TLSv1.2") == 1
    assert value(metrics, tls, side="other", version="other") == 1


# -- the audit trail's own health ----------------------------------------------------


def test_sink_failures_and_lost_records_from_events(metrics: Metrics) -> None:
    feed(metrics, "audit.sink.failed", sink="file:/var/log/popguard/audit.jsonl", error="ENOSPC")
    feed(metrics, "audit.records.lost", sink="syslog+udp://127.0.0.1:514", count=7)
    feed(metrics, "audit.records.lost", sink="syslog+udp://127.0.0.1:514", count=3)
    assert (
        value(
            metrics,
            "popguard_audit_sink_failures_total",
            sink="file:/var/log/popguard/audit.jsonl",
        )
        == 1
    )
    lost = value(metrics, "popguard_audit_records_lost_total", sink="syslog+udp://127.0.0.1:514")
    assert lost == 10


def test_watch_audit_reads_each_sinks_status_at_scrape_time(metrics: Metrics) -> None:
    class FakeAudit:
        def __init__(self) -> None:
            self.statuses = [
                {"sink": "file:a", "healthy": True, "lost": 0, "backlog": 3},
                {"sink": "stdout", "healthy": False, "lost": 12, "backlog": 10000},
            ]

        def status(self) -> list[dict[str, Any]]:
            return self.statuses

    audit = FakeAudit()
    metrics.watch_audit(audit)
    assert value(metrics, "popguard_audit_sink_healthy", sink="file:a") == 1
    assert value(metrics, "popguard_audit_sink_healthy", sink="stdout") == 0
    assert value(metrics, "popguard_audit_sink_backlog", sink="stdout") == 10000
    assert value(metrics, "popguard_audit_records_lost_total", sink="stdout") == 12
    audit.statuses[1]["lost"] = 20
    assert value(metrics, "popguard_audit_records_lost_total", sink="stdout") == 20


def test_a_broken_status_does_not_break_the_scrape(metrics: Metrics) -> None:
    class Broken:
        def status(self) -> list[dict[str, Any]]:
            raise RuntimeError("bug")

    metrics.watch_audit(Broken())
    body, _ = metrics.exposition()
    assert b"popguard_sessions_total" in body


def test_sink_names_are_capped() -> None:
    metrics = Metrics(process_metrics=False, max_sink_labels=3)
    for i in range(10):
        feed(metrics, "audit.sink.failed", sink=f"syslog+udp://10.0.0.{i}:514")
    sinks = {labels["sink"] for labels in series(metrics, "popguard_audit_sink_failures")}
    assert len(sinks) == 4
    assert "other" in sinks


def test_audit_write_histogram(metrics: Metrics) -> None:
    metrics.observe_audit_write(0.00003)
    metrics.observe_audit_write(0.004)
    assert value(metrics, "popguard_audit_write_seconds_count") == 2
    assert value(metrics, "popguard_audit_write_seconds_bucket", le="5e-05") == 1


# -- robustness ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "event",
    [
        {},
        {"event": None},
        {"event": 42},
        {"event": "session.closed"},
        {"event": "session.closed", "reason": 7, "bytes_to_client": "lots"},
        {"event": "session.closed", "reason": "quit", "bytes_to_client": -5},
        {"event": "session.closed", "reason": "quit", "bytes_to_client": True},
        {"event": "deletions.committed", "messages": 3},
        {"event": "deletions.committed", "messages": None},
        {"event": "auth.succeeded", "mechanism": ["USER"]},
        {"event": "policy.denied"},
        {"event": "policy.denied", "rule": {"x": 1}, "setting": 3},
        {"event": "audit.records.lost", "count": "many"},
        {"event": "tls.established"},
        {"event": "some.future.event", "anything": object()},
    ],
)
def test_odd_records_never_raise(metrics: Metrics, event: dict[str, Any]) -> None:
    metrics.sink.write(event)
    assert value(metrics, "popguard_metrics_errors_total") == 0
    assert value(metrics, "popguard_bytes_total", direction="upstream_to_client") == 0


def test_a_bug_is_counted_not_raised(metrics: Metrics, monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(event: Any) -> None:
        raise RuntimeError("bug in a handler")

    monkeypatch.setitem(metrics._handlers, "session.opened", explode)
    metrics.sink.write({"event": "session.opened"})
    metrics.sink.close()
    assert value(metrics, "popguard_metrics_errors_total") == 1


def test_no_user_name_in_any_label(metrics: Metrics) -> None:
    messages = [{"msg": 1, "uidl": USER, "size": 1}]
    for name in (
        "session.opened",
        "auth.succeeded",
        "auth.failed",
        "message.retrieved",
        "dele.marked",
        "deletions.committed",
        "deletions.discarded",
        "policy.denied",
        "policy.dry_run",
        "policy.login_blocked",
        "tls.established",
        "command.rejected",
        "session.closed",
        "session.refused",
    ):
        feed(
            metrics,
            name,
            mechanism=USER,
            messages=messages,
            key=USER,
            reason=USER,
            reply=USER,
            client=USER,
            sni=USER,
            command=USER,
            uidl=USER,
            setting=USER,
        )
    metrics.count_command(USER)
    metrics.observe_roundtrip(0.1, USER)
    body, _ = metrics.exposition()
    assert USER.encode() not in body
    assert b"alice" not in body
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            assert all("alice" not in v for v in sample.labels.values())


# -- command timing --------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_command_timer_pairs_pipelined_replies_in_order(metrics: Metrics) -> None:
    clock = FakeClock()
    timer = metrics.command_timer(clock)
    assert isinstance(timer, CommandTimer)
    for verb in ("STAT", "LIST", "RETR"):
        timer.command(verb)
        timer.forwarded(verb)
    clock.now += 0.002
    timer.answered("STAT")
    clock.now += 0.003
    timer.answered("LIST")
    clock.now += 1.0
    timer.answered("RETR")
    roundtrip = "popguard_command_roundtrip_seconds"
    assert value(metrics, roundtrip + "_sum", verb="STAT") == pytest.approx(0.002)
    assert value(metrics, roundtrip + "_sum", verb="LIST") == pytest.approx(0.005)
    assert value(metrics, roundtrip + "_sum", verb="RETR") == pytest.approx(1.005)
    assert value(metrics, "popguard_commands_total", verb="RETR") == 1
    assert list(timer) == []


def test_command_timer_ignores_the_greeting_and_auth(metrics: Metrics) -> None:
    clock = FakeClock()
    timer = metrics.command_timer(clock)
    timer.forwarded("USER")
    timer.answered("GREETING")  # never forwarded: must not drain the queue
    assert [verb for verb, _ in timer] == ["USER"]
    timer.answered("USER")
    timer.forwarded("AUTH")
    clock.now += 30  # the client typed slowly
    timer.answered("AUTH")
    assert value(metrics, "popguard_command_roundtrip_seconds_count", verb="USER") == 1
    assert value(metrics, "popguard_command_roundtrip_seconds_count", verb="AUTH") == 0


def test_command_timer_skips_commands_that_got_no_reply(metrics: Metrics) -> None:
    timer = metrics.command_timer(FakeClock())
    timer.forwarded("DELE")
    timer.forwarded("NOOP")
    timer.answered("NOOP")
    assert value(metrics, "popguard_command_roundtrip_seconds_count", verb="NOOP") == 1
    assert value(metrics, "popguard_command_roundtrip_seconds_count", verb="DELE") == 0
    assert list(timer) == []


def test_command_timer_is_bounded(metrics: Metrics) -> None:
    timer = metrics.command_timer(FakeClock())
    for _ in range(5000):
        timer.forwarded("NOOP")
    assert len(list(timer)) == 1024


async def test_timed_connector_observes_successful_connects(
    metrics: Metrics, autojump_clock: trio.testing.MockClock
) -> None:
    async def connect() -> str:
        await trio.sleep(0.02)
        return "stream"

    async def refuse() -> str:
        await trio.sleep(0.01)
        raise OSError("refused")

    timed = metrics.timed_connector(connect, trio.current_time)
    assert await timed() == "stream"
    with pytest.raises(OSError, match="refused"):
        await metrics.timed_connector(refuse, trio.current_time)()
    assert value(metrics, "popguard_upstream_connect_seconds_count") == 1
    assert value(metrics, "popguard_upstream_connect_seconds_sum") == pytest.approx(0.02)
    assert value(metrics, "popguard_upstream_connect_seconds_bucket", le="0.025") == 1
    assert value(metrics, "popguard_upstream_connect_seconds_bucket", le="0.01") == 0


# -- registries, exposition, AuditLog ------------------------------------------------


def test_instances_do_not_share_a_registry() -> None:
    first, second = Metrics(), Metrics()  # process collectors too: no clash
    feed(first, "session.closed", reason="quit")
    assert value(first, "popguard_sessions_total", outcome="quit") == 1
    assert value(second, "popguard_sessions_total", outcome="quit") == 0


def test_exposition_formats(metrics: Metrics) -> None:
    body, content_type = metrics.exposition()
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    names = {family.name for family in text_string_to_metric_families(body.decode())}
    assert {
        "popguard_sessions_active",
        "popguard_sessions",
        "popguard_logins",
        "popguard_commands",
        "popguard_policy_denials",
        "popguard_deletions",
        "popguard_bytes",
        "popguard_upstream_connect_seconds",
        "popguard_command_roundtrip_seconds",
        "popguard_audit_records_lost",
        "popguard_audit_sink_failures",
        "popguard_audit_write_seconds",
        "popguard_tls_sessions",
        "popguard_build_info",
    } <= names
    body, content_type = metrics.exposition("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


def test_records_reach_the_sink_through_the_audit_log(metrics: Metrics) -> None:
    """A plain sink in an AuditLog sees every record, exactly as emitted."""
    audit = AuditLog([metrics.sink])
    audit.emit(AuditRecord(Event.SESSION_OPENED, {"client": "192.0.2.1:1", "listener": "l"}))
    audit.emit(AuditRecord(Event.AUTH_SUCCEEDED, {"user": USER, "mechanism": "APOP"}))
    message: dict[str, Scalar] = {"msg": 1, "uidl": "x", "size": 3}
    audit.emit(AuditRecord(Event.DELETIONS_COMMITTED, {"messages": (message,)}))
    audit.emit(AuditRecord(Event.SESSION_CLOSED, {"reason": "quit", "bytes_to_client": 42}))
    audit.warning("session.refused", reason="audit_unavailable")
    audit.close()
    assert value(metrics, "popguard_logins_total", result="ok", mechanism="APOP") == 1
    assert value(metrics, "popguard_deletions_total", fate="committed") == 1
    assert value(metrics, "popguard_sessions_total", outcome="quit") == 1
    assert value(metrics, "popguard_sessions_total", outcome="refused") == 1
    assert value(metrics, "popguard_bytes_total", direction="upstream_to_client") == 42
    assert value(metrics, "popguard_sessions_active") == 0


def test_logins_popguard_refused_are_counted_apart(metrics: Metrics) -> None:
    feed(metrics, "auth.refused", mechanism="SCRAM-SHA-1", login=None, reason="x")
    feed(metrics, "auth.refused", mechanism="USER", login="a b", reason="y")
    feed(metrics, "auth.failed", mechanism="USER", user="alice")
    value = metrics.registry.get_sample_value
    assert value("popguard_logins_total", {"result": "refused", "mechanism": "SCRAM-SHA-1"}) == 1
    assert value("popguard_logins_total", {"result": "refused", "mechanism": "USER"}) == 1
    assert value("popguard_logins_total", {"result": "failed", "mechanism": "USER"}) == 1


@pytest.mark.parametrize("reason", ["identity_unknown", "login_timeout"])
def test_identity_and_login_time_outcomes_have_their_own_label(
    metrics: Metrics, reason: str
) -> None:
    feed(metrics, "session.opened")
    feed(metrics, "session.closed", reason=reason)
    assert metrics.registry.get_sample_value("popguard_sessions_total", {"outcome": reason}) == 1
