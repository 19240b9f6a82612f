"""The whole proxy over real loopback TCP, in front of the demo upstream.

The demo upstream is the fault-injection peer here (drop mid-reply, garbage,
unsolicited bytes, stalls).  The behaviour of a real server is tested
against Dovecot in ``tests/integration``.
"""

from __future__ import annotations

import errno
import os
import poplib
import socket
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import trio

from popguard.audit import AuditLog
from popguard.core.limits import Limits
from popguard.metrics import Metrics
from popguard.policy.model import Match, PolicySet, Rule
from popguard.policy.session import PolicyHolder, PolicyShared
from popguard.shell.server import (
    Endpoint,
    ListenerSpec,
    ProxyServer,
    ServerSettings,
    connect_tcp,
)
from popguard.shell.tcp import TCPStream
from popguard.sinks.base import Entry, QueuedSink
from popguard.testing.demo_upstream import DemoUpstream, Faults, bound_port, sample_store


class ListSink:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def write(self, event_dict: Any) -> None:
        self.events.append(dict(event_dict))

    def close(self) -> None:
        pass

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == name]


@dataclass
class Stack:
    proxy: ProxyServer
    demo: DemoUpstream
    port: int
    sink: ListSink
    host: str = "127.0.0.1"

    def pop(self) -> poplib.POP3:
        return poplib.POP3(self.host, self.port, timeout=10)


@asynccontextmanager
async def stack(
    faults: Faults | None = None,
    *,
    host: str = "127.0.0.1",
    upstream_port: int | None = None,
    audit: AuditLog | None = None,
    sink: ListSink | None = None,
    policies: Any = None,
    policy_loader: Any = None,
    shared_state: Any = None,
    demo: DemoUpstream | None = None,
    metrics: Metrics | None = None,
    **settings: Any,
) -> AsyncIterator[Stack]:
    """A proxy in front of a demo upstream (``demo``: one already serving,
    ``upstream_port`` its port; ``shared_state``: the store limits count in)."""
    own_demo = demo is None
    demo = demo or DemoUpstream(sample_store(), faults)
    if sink is None:
        sink = ListSink()
    if audit is None:
        audit = AuditLog([sink])
    async with trio.open_nursery() as nursery:
        port = upstream_port
        if own_demo:
            listeners = await nursery.start(demo.serve, host, 0)
            port = upstream_port if upstream_port is not None else bound_port(listeners)
        assert port is not None
        config = ServerSettings(
            listeners=(ListenerSpec("test", Endpoint(host, 0)),),
            upstream=Endpoint(host, port),
            **settings,
        )
        shared = None
        if policies is not None:
            shared = PolicyShared(
                PolicyHolder(policies), trio.current_time, shared_state=shared_state is not None
            )
        proxy = ProxyServer(
            config,
            audit,
            policies=shared,
            policy_loader=policy_loader,
            shared_state=shared_state,
            metrics=metrics,
        )
        await nursery.start(proxy.run)
        yield Stack(proxy, demo, proxy.bound["test"][0].port, sink, host)
        proxy.request_shutdown(immediate=True)
        with trio.fail_after(10):
            while proxy.active_sessions:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()


def in_thread(fn: Any, *args: Any) -> Any:
    return trio.to_thread.run_sync(fn, *args)


def raw_session(port: int, script: bytes, host: str = "127.0.0.1") -> bytes:
    """Send ``script`` in one write, half-close, and read until EOF."""
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(script)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def no_quit_upstream(demo: DemoUpstream) -> bool:
    return not any(line.upper().startswith(b"QUIT") for line in demo.received_commands)


async def test_poplib_retrieves_every_message_byte_for_byte() -> None:
    async with stack() as s:

        def client() -> list[bytes]:
            pop = s.pop()
            pop.user("demo")
            pop.pass_("demo")
            count, _ = pop.stat()
            bodies = [b"\r\n".join(pop.retr(i + 1)[1]) + b"\r\n" for i in range(count)]
            pop.quit()
            return bodies

        poplib._MAXLINE = 65536  # the sample holds a 12,000-octet line
        bodies = await in_thread(client)
    assert bodies == [
        m.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") for m in s.demo.store.messages("demo")
    ]
    assert len(s.sink.named("message.retrieved")) == len(bodies)


async def test_apop_through_the_proxy() -> None:
    async with stack() as s:

        def client() -> bytes:
            pop = s.pop()
            welcome: bytes = pop.getwelcome()
            pop.apop("alice", "alicepw")
            pop.quit()
            return welcome

        welcome = await in_thread(client)
    assert b"<" in welcome  # the APOP timestamp reached the client
    assert s.sink.named("auth.succeeded")[0]["mechanism"] == "APOP"


async def test_pipelined_script_in_one_packet() -> None:
    async with stack() as s:
        out = await in_thread(
            raw_session, s.port, b"USER demo\r\nPASS demo\r\nSTAT\r\nLIST 1\r\nNOOP\r\nQUIT\r\n"
        )
    lines = out.split(b"\r\n")
    assert lines[0].startswith(b"+OK")  # greeting
    assert [line[:3] for line in lines[1:7]] == [b"+OK"] * 6
    assert lines[3].startswith(b"+OK 5 ")  # STAT
    assert lines[4].startswith(b"+OK 1 ")  # LIST 1


async def test_upstream_drop_mid_reply_ends_that_session_only() -> None:
    async with stack(Faults(drop_mid_reply_on="RETR")) as s:
        out = await in_thread(
            raw_session, s.port, b"USER demo\r\nPASS demo\r\nDELE 2\r\nRETR 1\r\n"
        )
        assert b"\r\n.\r\n" not in out.split(b"RETR", 1)[-1]  # never a fake terminator
        # The proxy keeps serving.
        again = await in_thread(raw_session, s.port, b"USER demo\r\nPASS demo\r\nSTAT\r\nQUIT\r\n")
    assert b"+OK 5 " in again  # DELE 2 was discarded: nothing deleted
    closed = s.sink.named("session.closed")
    assert closed[0]["reason"] == "upstream_closed"
    assert s.sink.named("deletions.discarded")[0]["messages"][0]["msg"] == 2


async def test_garbage_reply_gets_sys_temp() -> None:
    async with stack(Faults(garbage_on="STAT")) as s:
        out = await in_thread(raw_session, s.port, b"USER demo\r\nPASS demo\r\nSTAT\r\nNOOP\r\n")
    assert out.endswith(b"-ERR [SYS/TEMP] Upstream POP3 server sent an invalid reply\r\n")
    assert s.sink.named("upstream.protocol_error")
    assert no_quit_upstream(s.demo)


async def test_unsolicited_bytes_after_login_end_the_session() -> None:
    async with stack(Faults(unsolicited_after_login=b"+OK I was not asked\r\n")) as s:

        def client() -> bytes:
            with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
                sock.sendall(b"USER demo\r\nPASS demo\r\n")
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
                return data

        out = await in_thread(client)
    assert b"I was not asked" not in out
    assert s.sink.named("session.closed")[0]["reason"] == "upstream_protocol_error"


async def test_err_greeting_is_relayed() -> None:
    async with stack(Faults(greeting=b"-ERR [SYS/TEMP] maintenance\r\n")) as s:
        out = await in_thread(raw_session, s.port, b"USER demo\r\n")
    assert out == b"-ERR [SYS/TEMP] maintenance\r\n"


async def test_unreachable_upstream() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    async with stack(upstream_port=dead) as s:
        out = await in_thread(raw_session, s.port, b"USER demo\r\n")
    assert out == b"-ERR [SYS/TEMP] Upstream POP3 server is unavailable\r\n"
    assert s.sink.named("upstream.failed")


async def test_ipv6_listener_and_upstream() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("::1 is not configured")
    async with stack(host="::1") as s:
        out = await in_thread(
            raw_session, s.port, b"USER demo\r\nPASS demo\r\nSTAT\r\nQUIT\r\n", "::1"
        )
    assert b"+OK 5 " in out
    assert s.sink.named("session.opened")[0]["client"].startswith("[::1]:")


async def test_tcp_nodelay_on_both_sockets() -> None:
    async with stack() as s:
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=10)
        try:
            with trio.fail_after(5):
                while not any(live.relay.upstream for live in s.proxy._sessions.values()):
                    await trio.sleep(0.01)
            ((_, relay),) = s.proxy._sessions.values()
            for stream in (relay.client, relay.upstream):
                assert isinstance(stream, TCPStream)
                assert stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        finally:
            sock.close()


async def test_shutdown_after_grace_closes_without_quit() -> None:
    async with stack(shutdown_grace=0.5) as s:
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=10)
        sock.sendall(b"USER demo\r\nPASS demo\r\nDELE 1\r\n")
        received = b""
        with trio.fail_after(5):
            while received.count(b"\r\n") < 4:
                received += await in_thread(sock.recv, 4096)
        s.proxy.request_shutdown()
        # The proxy tells the client and closes it after the grace period.
        rest = b""
        with trio.fail_after(5):
            while chunk := await in_thread(sock.recv, 4096):
                rest += chunk
        sock.close()
    assert rest == b"-ERR [SYS/TEMP] popguard is shutting down, try again later\r\n"
    assert no_quit_upstream(s.demo)
    assert len(s.demo.store.messages("demo")) == 5
    assert s.sink.named("deletions.discarded")[0]["reason"] == "shutdown"


async def test_session_that_quits_within_grace_commits() -> None:
    async with stack(shutdown_grace=5) as s:
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=10)
        sock.sendall(b"USER demo\r\nPASS demo\r\nDELE 1\r\n")
        received = b""
        with trio.fail_after(5):
            while received.count(b"\r\n") < 4:
                received += await in_thread(sock.recv, 4096)
        s.proxy.request_shutdown()
        await trio.sleep(0.2)
        # New connections are refused now, the open session carries on.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", s.port), timeout=2).close()
        sock.sendall(b"QUIT\r\n")
        reply = await in_thread(sock.recv, 4096)
        sock.close()
    assert reply.startswith(b"+OK")
    assert len(s.demo.store.messages("demo")) == 4
    assert s.sink.named("deletions.committed")


async def test_over_long_and_garbage_commands_do_not_reach_upstream() -> None:
    async with stack(limits=Limits(max_bad_commands=3)) as s:
        out = await in_thread(
            raw_session,
            s.port,
            b"USER " + b"a" * 400 + b"\r\nNO\x00OP\r\n\x16\x03\x01\r\nSTAT\r\n",
        )
    assert out.count(b"-ERR") == 3
    assert out.endswith(b"-ERR Too many invalid commands, closing connection\r\n")
    assert s.demo.received_commands == []


class FailableDiskSink(QueuedSink):
    """A durable queued sink (like the audit file) whose writes can fail."""

    durable = True

    def __init__(self) -> None:
        super().__init__("disk")
        self.retry_initial = 0.01
        self.retry_max = 0.05
        self.fail = threading.Event()
        self.delivered: list[dict[str, Any]] = []

    def _deliver(self, entry: Entry) -> None:
        if self.fail.is_set():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        assert entry.event is not None
        self.delivered.append(dict(entry.event))

    def _sync(self, *, force: bool) -> None:
        pass

    def _commit(self, *, durable: bool) -> None:
        pass


async def wait_until(condition: Any, limit: float = 10.0) -> None:
    with trio.fail_after(limit):
        while not condition():
            await trio.sleep(0.01)


async def test_fail_closed_forwards_dele_only_after_its_record_is_on_disk() -> None:
    disk, sink = FailableDiskSink(), ListSink()
    audit = AuditLog([disk, sink], on_failure="fail-closed")
    async with stack(audit=audit, sink=sink) as s:
        out = await in_thread(raw_session, s.port, b"USER demo\r\nPASS demo\r\nDELE 1\r\nQUIT\r\n")
    audit.close()
    assert out.count(b"+OK") == 5
    assert len(s.demo.store.messages("demo")) == 4
    names = [event["event"] for event in disk.delivered]
    # The request is on disk before the server saw the DELE, then the outcome.
    assert names.index("dele.requested") < names.index("dele.marked")
    assert "deletions.committed" in names


async def test_fail_closed_refuses_sessions_and_deletions_while_the_disk_fails() -> None:
    disk, sink = FailableDiskSink(), ListSink()
    audit = AuditLog([disk, sink], on_failure="fail-closed")
    async with stack(audit=audit, sink=sink) as s:
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=10)
        sock.sendall(b"USER demo\r\nPASS demo\r\n")
        received = b""
        with trio.fail_after(5):
            while received.count(b"\r\n") < 3:
                received += await in_thread(sock.recv, 4096)
        disk.fail.set()
        audit.event("test.poke")  # the next write fails: the disk is unhealthy
        await wait_until(lambda: not audit.healthy)

        # A new connection is refused before any upstream connection is made.
        assert s.demo.received_commands.count(b"USER demo") == 1
        refused = await in_thread(raw_session, s.port, b"")
        assert (
            refused == b"-ERR [SYS/TEMP] popguard cannot write its audit trail, try again later\r\n"
        )
        assert sink.named("session.refused")[0]["reason"] == "audit_unavailable"

        # The open session's DELE is refused and never reaches the server.
        sock.sendall(b"DELE 1\r\n")
        reply = await in_thread(sock.recv, 4096)
        assert reply.startswith(b"-ERR [SYS/TEMP]")
        assert b"DELE 1" not in s.demo.received_commands

        # Once the disk recovers, the same session may delete.
        disk.fail.clear()
        await wait_until(lambda: audit.healthy)
        sock.sendall(b"DELE 1\r\nQUIT\r\n")
        rest = b""
        with trio.fail_after(5):
            while chunk := await in_thread(sock.recv, 4096):
                rest += chunk
        sock.close()
        assert s.demo.received_commands.count(b"USER demo") == 1  # no new upstream session
    audit.close()
    assert rest.startswith(b"+OK")
    assert rest.count(b"+OK") == 2
    assert len(s.demo.store.messages("demo")) == 4
    # Nothing was lost while the disk failed: the records were retried.
    names = [event["event"] for event in disk.delivered]
    assert "session.refused" in names
    assert "command.rejected" in names


async def test_upstream_by_name_and_by_address_literal() -> None:
    # A literal is connected directly, a name through the resolver: both work.
    demo = DemoUpstream(sample_store())
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(demo.serve, "127.0.0.1", 0)
        port = bound_port(listeners)
        for host in ("127.0.0.1", "localhost"):
            stream = await connect_tcp(host, port)
            try:
                assert (await stream.receive_some(100)).startswith(b"+OK")
            finally:
                await stream.aclose()
        nursery.cancel_scope.cancel()
    with pytest.raises(ConnectionRefusedError):
        await connect_tcp("127.0.0.1", 1)  # nothing listens on port 1


def policy_rule(
    name: str, mode: str = "enforce", match: Match | None = None, **settings: Any
) -> Rule:
    return Rule(name, "policies/test.yaml", 3, match or Match(), mode, settings)  # type: ignore[arg-type]


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


async def test_policy_denies_dele_through_the_proxy() -> None:
    rules = PolicySet(
        (policy_rule("read-only", match=Match(users=("demo",)), deny_commands=("DELE",)),)
    )
    async with stack(policies=rules) as s:
        out = await in_thread(
            raw_session, s.port, b"USER demo\r\nPASS demo\r\nDELE 1\r\nSTAT\r\nQUIT\r\n"
        )
    assert b"-ERR [SYS/PERM] DELE is not permitted by policy\r\n" in out
    assert not any(line.startswith(b"DELE") for line in s.demo.received_commands)
    assert len(s.demo.store.messages("demo")) == 5
    (denied,) = s.sink.named("policy.denied")
    assert (denied["rule"], denied["user"], denied["command"]) == ("read-only", "demo", "DELE")


async def test_policy_refuses_connections_before_the_upstream() -> None:
    rules = PolicySet((policy_rule("cap", max_sessions_total=1),))
    async with stack(policies=rules) as s:
        held = socket.create_connection(("127.0.0.1", s.port), timeout=10)
        assert (await in_thread(held.recv, 100)).startswith(b"+OK")
        second = await in_thread(raw_session, s.port, b"")
        held.close()
        assert second == b"-ERR [SYS/TEMP] Too many connections, try again later\r\n"
        # Once the first has gone, a new session is served again.
        await trio.sleep(0.2)
        third = await in_thread(raw_session, s.port, b"QUIT\r\n")
    assert third.startswith(b"+OK")
    assert s.sink.named("policy.denied")[0]["setting"] == "max_sessions_total"
    assert s.sink.named("session.refused")[0]["reason"] == "policy"


async def test_policy_idle_timeout_applies_after_login() -> None:
    rules = PolicySet((policy_rule("short", match=Match(users=("demo",)), idle_timeout=0.3),))
    async with stack(policies=rules, idle_timeout=30) as s:
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=10)
        sock.sendall(b"USER demo\r\nPASS demo\r\nDELE 1\r\n")
        started = trio.current_time()
        with trio.fail_after(10):
            out = await in_thread(read_until_closed, sock)
        sock.close()
    assert out.endswith(b"-ERR Disconnected for inactivity.\r\n")
    assert trio.current_time() - started < 10  # the policy's timer, not the server's 30 s
    assert no_quit_upstream(s.demo)
    assert len(s.demo.store.messages("demo")) == 5
    assert s.sink.named("policy.denied")[0]["setting"] == "idle_timeout"
    assert s.sink.named("deletions.discarded")[0]["reason"] == "idle_timeout"


async def test_policy_max_session_and_dry_run_timer() -> None:
    rules = PolicySet(
        (
            policy_rule("watch", "dry-run", Match(users=("demo",)), idle_timeout=0.2),
            policy_rule("cap", max_session=0.8),
        )
    )
    async with stack(policies=rules, idle_timeout=30) as s:
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=10)
        sock.sendall(b"USER demo\r\nPASS demo\r\n")
        with trio.fail_after(10):
            out = await in_thread(read_until_closed, sock)
        sock.close()
    assert out.endswith(b"-ERR Session time limit reached, disconnecting.\r\n")
    (dry,) = s.sink.named("policy.dry_run")
    assert (dry["setting"], dry["rule"]) == ("idle_timeout", "watch")
    (denied,) = s.sink.named("policy.denied")
    assert (denied["setting"], denied["rule"]) == ("max_session", "cap")
    assert s.sink.named("session.closed")[0]["reason"] == "max_session"


async def test_policy_reload_applies_to_open_sessions_and_keeps_old_set_on_error() -> None:
    loads: list[Any] = []

    def loader() -> PolicySet:
        item = loads.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    async with stack(policies=PolicySet(), policy_loader=loader) as s:
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=10)
        sock.sendall(b"USER demo\r\nPASS demo\r\n")
        got = b""
        with trio.fail_after(5):
            while got.count(b"\r\n") < 3:
                got += await in_thread(sock.recv, 4096)
        loads.append(PolicySet((policy_rule("no-dele", deny_commands=("DELE",)),)))
        assert s.proxy.reload_policies()
        sock.sendall(b"DELE 1\r\n")
        denied = await in_thread(sock.recv, 4096)
        loads.append(ValueError("policies/bad.yaml:2:3: unknown key"))
        assert not s.proxy.reload_policies()
        sock.sendall(b"DELE 1\r\n")
        still = await in_thread(sock.recv, 4096)
        sock.close()
    assert denied.startswith(b"-ERR [SYS/PERM]")
    assert still.startswith(b"-ERR [SYS/PERM]")  # the old (valid) set stayed
    assert s.sink.named("policy.reloaded")[0]["rules"] == 1
    assert s.sink.named("policy.reload_failed")[0]["errors"] == [
        "policies/bad.yaml:2:3: unknown key"
    ]


@pytest.mark.parametrize("with_sink", [True, False])
async def test_message_identity_lookups_only_when_a_sink_records_them(with_sink: bool) -> None:
    # UIDL and LIST lookups (and the content digest) are for the records:
    # with no sink but the metrics' (which only counts events) nothing would
    # receive them, so nothing is asked.
    metrics = Metrics()
    audit = AuditLog([ListSink(), metrics.sink] if with_sink else [metrics.sink])
    async with stack(audit=audit, metrics=metrics) as s:
        reply = await in_thread(
            raw_session, s.port, b"USER demo\r\nPASS demo\r\nRETR 1\r\nQUIT\r\n"
        )
    assert reply.count(b"+OK") >= 4
    lookups = [line for line in s.demo.received_commands if line.upper().startswith(b"UIDL")]
    assert bool(lookups) is with_sink
    assert no_quit_upstream(s.demo) is False  # the client's QUIT went through
