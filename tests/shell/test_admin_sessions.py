"""Live sessions on the admin listener: ``GET /sessions``, ``POST /sessions/ID/close``,
the supervisor's fan-out, and ``popguard sessions`` / ``popguard kick``.

Everything runs over loopback in front of the demo upstream: a real proxy,
real admin listeners, POP3 spoken by the test on a trio stream.  The same
against real Dovecot and real processes (``workers: 2``) is in
``tests/integration/test_sessions_dovecot.py``.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from popguard import cli
from popguard.audit import AuditLog
from popguard.core.replies import REPLY_OPERATOR_CLOSE
from popguard.metrics import Metrics
from popguard.shell.admin import (
    CSRF_HEADER,
    MAX_CLOSE_REASON,
    REQUESTED_BY_HEADER,
    AdminServer,
    admin_request,
)
from popguard.shell.server import (
    Endpoint,
    ListenerSpec,
    ProxyServer,
    ServerSettings,
    worker_of_session,
)
from popguard.shell.workers import Supervisor, WorkerRole, _admin_of, worker_admin_address
from popguard.testing.demo_upstream import DemoUpstream, bound_port, sample_store
from tests.listsink import ListSink

LIMIT = 10.0
SESSION_ID = re.compile(r"[0-9a-f]{16}\Z")


async def always_ready() -> dict[str, bool]:
    return {"listeners": True}


@dataclass
class Rig:
    """A proxy in front of the demo upstream, with its admin listener."""

    proxy: ProxyServer
    demo: DemoUpstream
    sink: ListSink
    pop3: int
    admin: int
    clients: list[trio.SocketStream] = field(default_factory=list)

    async def get(self, target: str) -> tuple[int, Any]:
        status, body = await admin_request(("127.0.0.1", self.admin), "GET", target)
        return status, json.loads(body)

    async def post(self, target: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        return await admin_request(("127.0.0.1", self.admin), "POST", target, headers)

    async def login(self, user: bytes = b"demo", password: bytes = b"demo") -> trio.SocketStream:
        """A client logged in (TRANSACTION), its greeting and replies read."""
        stream = await trio.open_tcp_stream("127.0.0.1", self.pop3)
        self.clients.append(stream)
        assert (await read_line(stream)).startswith(b"+OK")
        for line in (b"USER " + user, b"PASS " + password):
            assert (await command(stream, line)).startswith(b"+OK"), line
        return stream


async def read_line(stream: trio.SocketStream) -> bytes:
    data = b""
    with trio.fail_after(LIMIT):
        while not data.endswith(b"\r\n"):
            chunk = await stream.receive_some(1)
            if not chunk:
                break
            data += chunk
    return data


async def read_to_eof(stream: trio.SocketStream) -> bytes:
    data = b""
    with trio.fail_after(LIMIT):
        while chunk := await stream.receive_some(65536):
            data += chunk
    return data


async def command(stream: trio.SocketStream, line: bytes, *, multiline: bool = False) -> bytes:
    await stream.send_all(line + b"\r\n")
    reply = await read_line(stream)
    if multiline and reply.startswith(b"+OK"):
        while (more := await read_line(stream)) != b".\r\n":
            reply += more
    return reply


def local_address(stream: trio.SocketStream) -> str:
    host, port = stream.socket.getsockname()[:2]
    return f"{host}:{port}"


@asynccontextmanager
async def rig(worker: int | None = None) -> AsyncIterator[Rig]:
    demo = DemoUpstream(sample_store())
    sink = ListSink()
    audit = AuditLog([sink])
    async with trio.open_nursery() as nursery:
        upstream = bound_port(await nursery.start(demo.serve, "127.0.0.1", 0))
        settings = ServerSettings(
            listeners=(ListenerSpec("test", Endpoint("127.0.0.1", 0)),),
            upstream=Endpoint("127.0.0.1", upstream),
        )
        proxy = ProxyServer(settings, audit, worker=worker)
        await nursery.start(proxy.run)
        admin = AdminServer(Metrics(), always_ready, sessions=proxy)
        await admin.open(("127.0.0.1", 0))
        await nursery.start(admin.run)
        made = Rig(proxy, demo, sink, proxy.bound["test"][0].port, admin.bound[0][1])
        try:
            yield made
        finally:
            for stream in made.clients:
                await trio.aclose_forcefully(stream)
            proxy.request_shutdown(immediate=True)
            with trio.fail_after(LIMIT):
                while proxy.active_sessions:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()


def no_quit_upstream(demo: DemoUpstream) -> bool:
    return not any(line.upper().startswith(b"QUIT") for line in demo.received_commands)


# -- GET /sessions -------------------------------------------------------------


async def test_a_logged_in_session_is_listed_with_its_account_and_figures() -> None:
    async with rig() as r:
        before = time.time()
        # Typed in capitals: the account is the one the server opens (demo).
        client = await r.login(b"DEMO")
        retrieved = await command(client, b"RETR 1", multiline=True)
        assert (await command(client, b"DELE 2")).startswith(b"+OK")
        waiting = await r.login(b"alice", b"alicepw")
        await trio.sleep(0.3)  # alice stays idle; demo is touched again below
        assert (await command(client, b"NOOP")).startswith(b"+OK")

        status, document = await r.get("/sessions")
        assert status == 200
        by_account = {s["account"]: s for s in document["sessions"]}
        assert set(by_account) == {"demo", "alice"}
        demo = by_account["demo"]
        assert SESSION_ID.match(demo["id"])
        assert demo["state"] == "TRANSACTION"
        assert demo["client"] == local_address(client)
        assert demo["listener"] == "test"
        assert demo["tls"] is False
        assert demo["upstream_tls"] is False
        assert demo["worker"] is None
        assert demo["marked"] == 1
        assert demo["bytes_to_client"] >= len(retrieved)
        assert demo["bytes_from_upstream"] >= len(retrieved)
        assert demo["bytes_from_client"] == len(
            b"USER DEMO\r\nPASS demo\r\nRETR 1\r\nDELE 2\r\nNOOP\r\n"
        )
        assert demo["bytes_to_upstream"] >= demo["bytes_from_client"]
        since = time.mktime(time.strptime(demo["since"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
        assert before - 2 <= since <= time.time() + 1
        alice = by_account["alice"]
        assert alice["client"] == local_address(waiting)
        assert alice["marked"] == 0
        # alice has been silent since the sleep began; demo just sent NOOP.
        assert alice["idle_seconds"] >= 0.2 > demo["idle_seconds"]
        # Oldest first.
        assert [s["account"] for s in document["sessions"]] == ["demo", "alice"]


async def test_a_session_before_login_has_no_account() -> None:
    async with rig() as r:
        stream = await trio.open_tcp_stream("127.0.0.1", r.pop3)
        r.clients.append(stream)
        assert (await read_line(stream)).startswith(b"+OK")
        assert (await command(stream, b"USER demo")).startswith(b"+OK")
        _, document = await r.get("/sessions")
        (session,) = document["sessions"]
        assert session["account"] is None
        assert session["state"] == "AUTHORIZATION"


async def test_user_filter_matches_the_account_exactly() -> None:
    async with rig() as r:
        await r.login(b"demo")
        await r.login(b"alice", b"alicepw")
        _, only = await r.get("/sessions?user=alice")
        assert [s["account"] for s in only["sessions"]] == ["alice"]
        _, typed = await r.get("/sessions?user=ALICE")
        assert typed["sessions"] == []  # the server matches accounts, not spellings


# -- POST /sessions/ID/close ---------------------------------------------------------


async def test_close_ends_the_session_without_quit_and_records_who_and_why() -> None:
    async with rig() as r:
        client = await r.login()
        assert (await command(client, b"DELE 1")).startswith(b"+OK")
        other = await r.login(b"alice", b"alicepw")
        _, document = await r.get("/sessions?user=demo")
        (session,) = document["sessions"]
        messages_before = r.demo.store.messages("demo")

        stream = await trio.open_tcp_stream("127.0.0.1", r.admin)
        requester = local_address(stream)
        reason = "ticket 42: account\r\nlocked"  # CR LF must not forge a record
        target = f"/sessions/{session['id']}/close?" + urllib.parse.urlencode({"reason": reason})
        async with stream:
            head = (
                f"POST {target} HTTP/1.1\r\nHost: x\r\n{CSRF_HEADER}: 1\r\n"
                "Content-Length: 0\r\n\r\n"
            )
            await stream.send_all(head.encode())
            raw = await read_to_eof(stream)
        assert raw.startswith(b"HTTP/1.1 200 ")
        answer = json.loads(raw.partition(b"\r\n\r\n")[2])
        assert answer["closed"] is True
        assert answer["session"]["id"] == session["id"]
        assert answer["session"]["account"] == "demo"

        # The client is told, then the connection closes; nothing was deleted.
        assert await read_to_eof(client) == REPLY_OPERATOR_CLOSE
        assert no_quit_upstream(r.demo)
        assert r.demo.store.messages("demo") == messages_before
        # The other session is untouched.
        assert (await command(other, b"NOOP")).startswith(b"+OK")
        _, after = await r.get("/sessions")
        assert [s["account"] for s in after["sessions"]] == ["alice"]

        trail = [e for e in r.sink.events if e.get("session") == session["id"]]
        names = [e["event"] for e in trail]
        assert names[-3:] == ["session.close_requested", "deletions.discarded", "session.closed"]
        requested, discarded, closed = trail[-3:]
        assert requested["requested_by"] == requester
        assert "relayed_by" not in requested
        assert requested["reason"] == "ticket 42: account\\u000d\\u000alocked"
        assert requested["client"] == session["client"]
        assert discarded["reason"] == "operator_close"
        assert [m["msg"] for m in discarded["messages"]] == [1]
        assert closed["reason"] == "operator_close"
        assert closed["state"] == "TRANSACTION"
        assert closed["detail"] == f"closed by {requester}: {requested['reason']}"
        assert "\r" not in json.dumps(trail)
        assert "\n" not in json.dumps(trail)


async def test_close_without_a_reason() -> None:
    async with rig() as r:
        client = await r.login()
        _, document = await r.get("/sessions")
        session_id = document["sessions"][0]["id"]
        status, body = await r.post(f"/sessions/{session_id}/close")
        assert status == 200, body
        assert await read_to_eof(client) == REPLY_OPERATOR_CLOSE
        (requested,) = r.sink.named("session.close_requested")
        assert requested["reason"] is None
        (closed,) = r.sink.named("session.closed")
        assert closed["detail"].startswith("closed by 127.0.0.1:")


async def test_a_long_reason_is_cut() -> None:
    async with rig() as r:
        await r.login()
        _, document = await r.get("/sessions")
        session_id = document["sessions"][0]["id"]
        reason = urllib.parse.quote("x" * (MAX_CLOSE_REASON * 5))
        status, _ = await r.post(f"/sessions/{session_id}/close?reason={reason}")
        assert status == 200
        (requested,) = r.sink.named("session.close_requested")
        assert requested["reason"] == "x" * MAX_CLOSE_REASON


async def test_a_post_without_the_csrf_header_is_refused() -> None:
    async with rig() as r:
        client = await r.login()
        _, document = await r.get("/sessions")
        session_id = document["sessions"][0]["id"]
        stream = await trio.open_tcp_stream("127.0.0.1", r.admin)
        async with stream:
            # What a cross-site form post from a browser looks like.
            await stream.send_all(
                f"POST /sessions/{session_id}/close HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                "Origin: http://evil.example\r\nContent-Type: application/x-www-form-urlencoded"
                "\r\nContent-Length: 0\r\n\r\n".encode()
            )
            raw = await read_to_eof(stream)
        assert raw.startswith(b"HTTP/1.1 403 ")
        assert CSRF_HEADER.encode() in raw
        assert (await command(client, b"NOOP")).startswith(b"+OK")  # still alive
        assert r.sink.named("session.close_requested") == []


async def test_get_on_the_close_url_is_405_and_allows_only_post() -> None:
    async with rig() as r:
        await r.login()
        _, document = await r.get("/sessions")
        session_id = document["sessions"][0]["id"]
        stream = await trio.open_tcp_stream("127.0.0.1", r.admin)
        async with stream:
            await stream.send_all(
                f"GET /sessions/{session_id}/close HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            )
            raw = await read_to_eof(stream)
        assert raw.startswith(b"HTTP/1.1 405 ")
        assert b"\r\nAllow: POST\r\n" in raw
        status, _ = await r.post("/sessions")  # and POST on the list is 405 too
        assert status == 405
        _, still = await r.get("/sessions")
        assert len(still["sessions"]) == 1


async def test_an_unknown_session_is_404_json() -> None:
    async with rig() as r:
        status, body = await r.post("/sessions/0123456789abcdef/close")
        assert status == 404
        assert json.loads(body) == {"error": "no such session", "id": "0123456789abcdef"}
        status, body = await r.post("/sessions/not-an-id/close")
        assert (status, json.loads(body)["error"]) == (404, "no such session")


async def test_a_relayed_close_names_the_original_requester() -> None:
    async with rig() as r:
        await r.login()
        _, document = await r.get("/sessions")
        session_id = document["sessions"][0]["id"]
        status, _ = await r.post(
            f"/sessions/{session_id}/close", {REQUESTED_BY_HEADER: "[::1]:4711" + "x" * 100}
        )
        assert status == 200
        (requested,) = r.sink.named("session.close_requested")
        assert requested["requested_by"] == ("[::1]:4711" + "x" * 100)[:64]  # bounded
        assert requested["relayed_by"].startswith("127.0.0.1:")


# -- session ids and workers -----------------------------------------------------------


async def test_a_workers_session_ids_start_with_its_slot() -> None:
    async with rig(worker=3) as r:
        await r.login()
        await r.login(b"alice", b"alicepw")
        _, document = await r.get("/sessions")
        ids = [s["id"] for s in document["sessions"]]
        assert len(set(ids)) == 2
        for session_id in ids:
            assert SESSION_ID.match(session_id)
            assert session_id.startswith("02")
            assert worker_of_session(session_id) == 3
        assert {s["worker"] for s in document["sessions"]} == {3}


def test_the_ready_message_names_the_workers_admin_listener() -> None:
    for admin, expected in [
        (("127.0.0.1", 9111), ("127.0.0.1", 9111)),
        (("0.0.0.0", 9112), ("127.0.0.1", 9112)),
        (("::", 9113), ("::1", 9113)),
        (None, None),
    ]:
        read_end, write_end = os.pipe()
        try:
            WorkerRole(1, 2, write_end, -1).ready(admin)  # closes write_end
            message = os.read(read_end, 512)
        finally:
            os.close(read_end)
        assert message.startswith(b"R")
        assert _admin_of(message) == expected
    assert worker_admin_address(("127.0.0.1", 9110), 2) == ("127.0.0.1", 9112)
    assert worker_admin_address(("127.0.0.1", 0), 2) == ("127.0.0.1", 0)


@asynccontextmanager
async def supervisor_over(
    workers: list[Rig | None],
) -> AsyncIterator[tuple[Supervisor, ListSink, int]]:
    """A Supervisor's admin listener in front of in-process "workers" (real
    proxies with their admin listeners; None: a worker whose admin port is
    closed).  No processes: the slots are pointed at the listeners."""
    sink = ListSink()
    supervisor = Supervisor([], [], AuditLog([sink], worker=0), workers=len(workers))
    try:
        with trio.socket.socket() as closed:
            await closed.bind(("127.0.0.1", 0))
            dead_port = closed.getsockname()[1]
        for slot, rig_ in zip(supervisor.slots, workers, strict=True):
            slot.ready = True
            slot.admin = ("127.0.0.1", rig_.admin if rig_ is not None else dead_port)
        server = supervisor.admin_server()
        await server.open(("127.0.0.1", 0))
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            yield supervisor, sink, server.bound[0][1]
            nursery.cancel_scope.cancel()
    finally:
        os.close(supervisor._lifeline_read)
        os.close(supervisor._lifeline_write)


async def test_the_supervisor_merges_every_workers_sessions_and_routes_a_close() -> None:
    async with rig(worker=1) as one, rig(worker=2) as two:
        first = await one.login()
        await two.login(b"alice", b"alicepw")
        await trio.sleep(1.1)  # "since" has one-second steps: an order to see
        second = await two.login()
        async with supervisor_over([one, two]) as (_, _, port):
            status, body = await admin_request(("127.0.0.1", port), "GET", "/readyz")
            assert (status, json.loads(body)["status"]) == (200, "ready")
            status, body = await admin_request(("127.0.0.1", port), "GET", "/sessions")
            assert status == 200
            merged = json.loads(body)
            assert merged["complete"] is True
            assert merged["workers"] == [{"worker": 1, "ok": True}, {"worker": 2, "ok": True}]
            sessions = merged["sessions"]
            assert [(s["worker"], s["account"]) for s in sessions] == [
                (1, "demo"),
                (2, "alice"),
                (2, "demo"),
            ]
            status, body = await admin_request(("127.0.0.1", port), "GET", "/sessions?user=demo")
            assert [s["worker"] for s in json.loads(body)["sessions"]] == [1, 2]

            # Close worker 2's demo session through the supervisor.
            target = sessions[2]["id"]
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            requester = local_address(stream)
            async with stream:
                await stream.send_all(
                    f"POST /sessions/{target}/close?reason=maintenance HTTP/1.1\r\n"
                    f"Host: x\r\n{CSRF_HEADER}: 1\r\n\r\n".encode()
                )
                raw = await read_to_eof(stream)
            assert raw.startswith(b"HTTP/1.1 200 "), raw
            assert json.loads(raw.partition(b"\r\n\r\n")[2])["closed"] is True
            assert await read_to_eof(second) == REPLY_OPERATOR_CLOSE
            assert (await command(first, b"NOOP")).startswith(b"+OK")
            assert no_quit_upstream(two.demo)
            (requested,) = two.sink.named("session.close_requested")
            assert requested["session"] == target
            assert requested["requested_by"] == requester  # the operator, not the supervisor
            assert requested["relayed_by"].startswith("127.0.0.1:")
            assert requested["relayed_by"] != requester
            assert requested["reason"] == "maintenance"
            assert one.sink.named("session.close_requested") == []

            # An id of a worker that does not exist, or that its worker does not have.
            status, _ = await admin_request(
                ("127.0.0.1", port), "POST", "/sessions/ff00000000000000/close"
            )
            assert status == 404
            status, body = await admin_request(
                ("127.0.0.1", port), "POST", f"/sessions/00{target[2:]}/close"
            )
            assert (status, json.loads(body)["error"]) == (404, "no such session")


async def test_a_worker_that_does_not_answer_makes_the_list_incomplete() -> None:
    async with rig(worker=1) as one:
        await one.login()
        async with supervisor_over([one, None]) as (_, _, port):
            status, body = await admin_request(("127.0.0.1", port), "GET", "/sessions")
            assert status == 200
            document = json.loads(body)
            assert document["complete"] is False
            assert [s["worker"] for s in document["sessions"]] == [1]
            (missing,) = [w for w in document["workers"] if not w["ok"]]
            assert missing["worker"] == 2
            assert "worker 2" in missing["error"]
            status, body = await admin_request(
                ("127.0.0.1", port), "POST", "/sessions/0100000000000000/close"
            )
            assert status == 503
            status, body = await admin_request(("127.0.0.1", port), "GET", "/readyz")
            assert status == 503
            assert json.loads(body)["checks"] == {
                "workers": True,
                "worker_1": True,
                "worker_2": False,
            }
            # The supervisor's /metrics merges the scrapes of the workers that
            # answer, each sample labelled: worker 2's are missing, not an error.
            status, body = await admin_request(("127.0.0.1", port), "GET", "/metrics")
            assert status == 200
            assert b'popguard_sessions_active{worker="1"}' in body
            assert b'worker="2"' not in body


async def test_a_taken_admin_port_stops_the_supervisor_at_once() -> None:
    with trio.socket.socket() as taken:
        await taken.bind(("127.0.0.1", 0))
        taken.listen()
        sink = ListSink()
        supervisor = Supervisor(
            ["false"],
            [],
            AuditLog([sink], worker=0),
            workers=2,
            admin=("127.0.0.1", taken.getsockname()[1]),
        )
        with trio.fail_after(LIMIT):
            assert await supervisor.run() == 1
    (failed,) = sink.named("popguard.workers.start_failed")
    assert "admin" in failed["error"]
    assert sink.names()[-1] == "popguard.stopped"
    assert sink.named("popguard.worker.started") == []


# -- popguard sessions / popguard kick ---------------------------------------------------


def run_cli(*argv: str) -> int:
    return cli.main(list(argv))


async def test_cli_sessions_prints_a_table_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    async with rig() as r:
        client = await r.login()
        url = f"http://127.0.0.1:{r.admin}"
        assert await trio.to_thread.run_sync(run_cli, "sessions", "--admin", url) == 0
        table = capsys.readouterr().out.splitlines()
        assert table[0].split() == [
            "ID", "ACCOUNT", "STATE", "CLIENT", "LISTENER", "TLS", "SINCE", "IDLE",
            "FROM-CLIENT", "TO-CLIENT", "MARKED",
        ]  # fmt: skip
        (row,) = table[1:]
        cells = row.split()
        assert SESSION_ID.match(cells[0])
        assert cells[1:6] == ["demo", "TRANSACTION", local_address(client), "test", "no"]

        argv = ("sessions", "--admin", f"127.0.0.1:{r.admin}", "--json", "--user", "demo")
        assert await trio.to_thread.run_sync(run_cli, *argv) == 0
        document = json.loads(capsys.readouterr().out)
        assert [s["id"] for s in document["sessions"]] == [cells[0]]


async def test_cli_kick_by_user_canonicalised_with_the_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with rig() as r:
        client = await r.login()
        other = await r.login(b"alice", b"alicepw")
        config = tmp_path / "popguard.yaml"
        config.write_text(f'admin:\n  listen: "127.0.0.1:{r.admin}"\n', encoding="utf-8")
        # Without the config, --user is exact: DEMO is no account.
        argv = ("kick", "--admin", f"http://127.0.0.1:{r.admin}", "--user", "DEMO")
        assert await trio.to_thread.run_sync(run_cli, *argv) == 1
        assert "no session of DEMO" in capsys.readouterr().err
        # With it, the identity rules (Dovecot's default: lower case) apply.
        argv = ("kick", "-c", str(config), "--user", "DEMO", "--reason", "password reset")
        assert await trio.to_thread.run_sync(run_cli, *argv) == 0
        out = capsys.readouterr().out
        assert re.fullmatch(r"kicked [0-9a-f]{16} demo 127\.0\.0\.1:\d+ \(closed\)\n", out)
        assert await read_to_eof(client) == REPLY_OPERATOR_CLOSE
        assert (await command(other, b"NOOP")).startswith(b"+OK")
        (requested,) = r.sink.named("session.close_requested")
        assert requested["reason"] == "password reset"
        assert no_quit_upstream(r.demo)


async def test_cli_kick_by_id_and_an_unknown_id(capsys: pytest.CaptureFixture[str]) -> None:
    async with rig() as r:
        client = await r.login()
        _, document = await r.get("/sessions")
        session_id = document["sessions"][0]["id"]
        url = f"http://127.0.0.1:{r.admin}"
        assert await trio.to_thread.run_sync(run_cli, "kick", "--admin", url, session_id) == 0
        assert await read_to_eof(client) == REPLY_OPERATOR_CLOSE
        capsys.readouterr()
        assert await trio.to_thread.run_sync(run_cli, "kick", "--admin", url, session_id) == 1
        assert capsys.readouterr().err == f"popguard kick: {session_id}: no such session\n"


def test_cli_unreachable_admin_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed below: nothing listens there
    assert run_cli("sessions", "--admin", f"http://127.0.0.1:{port}") == 1
    err = capsys.readouterr().err
    assert err.startswith(f"popguard: cannot reach the admin listener at http://127.0.0.1:{port}")
    assert err.count("\n") == 1
    assert "Traceback" not in err
    assert run_cli("kick", "--admin", f"http://127.0.0.1:{port}") == 2  # neither ids nor --user
