"""Time limits before login, over loopback: ``session.login_timeout`` against
the real Dovecot, and ``upstream.greeting_timeout`` against a listener that
accepts and never greets.

The idle timer restarts on every byte read, so a client that drips one byte
at a time is never idle; only the login time limit ends it.  Either way the
upstream is closed without QUIT: the ``tap`` between popguard and Dovecot
(or the silent listener itself) shows every byte popguard sent it.
"""

from __future__ import annotations

import time

import pytest
import trio

from popguard.core.replies import REPLY_LOGIN_TIMEOUT, REPLY_UPSTREAM_TIMEOUT
from popguard.shell.tls import UpstreamTLS

in_thread = trio.to_thread.run_sync

LOGIN_TIMEOUT = 1.5
DRIP_EVERY = 0.3


async def test_dripping_client_is_cut_at_login_timeout(popguard, mailbox, tap, wire, dovecot_log):
    box = mailbox()
    recorder = await tap()  # popguard -> tap -> Dovecot: every byte Dovecot got
    proxy = await popguard(upstream=recorder.address, login_timeout=LOGIN_TIMEOUT)

    def client() -> tuple[bytes, bytes, bytes, float, int]:
        start = time.monotonic()
        w = wire(*proxy.address, timeout=20)
        greeting = w.readline()
        capa = w.command("CAPA", multiline=True)
        # "USER <name>" one byte every 0.3 s, never finished by a CRLF.
        drip = f"USER {box.user}{'x' * 40}".encode()
        w.sock.settimeout(DRIP_EVERY)
        sent = 0
        answer = b""
        while sent < len(drip):
            try:
                answer = w.sock.recv(4096)
                break  # popguard spoke (or closed)
            except TimeoutError:
                w.send(drip[sent : sent + 1])
                sent += 1
        cut_at = time.monotonic() - start
        w.sock.settimeout(10)
        if answer:
            while chunk := w.sock.recv(4096):
                answer += chunk
        return greeting, capa, answer, cut_at, sent

    greeting, capa, answer, cut_at, sent = await in_thread(client)
    assert greeting.startswith(b"+OK")
    assert capa.startswith(b"+OK")
    assert capa.endswith(b"\r\n.\r\n")
    assert answer == REPLY_LOGIN_TIMEOUT
    assert LOGIN_TIMEOUT - 0.05 <= cut_at <= LOGIN_TIMEOUT + 1.0, cut_at
    assert sent >= 3  # it kept dripping: never idle for popguard
    (closed,) = await proxy.wait_for("session.closed")
    assert closed["reason"] == "login_timeout"
    assert closed["detail"] == f"no login within {LOGIN_TIMEOUT:g} s"
    assert closed["state"] == "AUTHORIZATION"
    await recorder.wait_closed()
    (conn,) = recorder.connections
    assert bytes(conn.from_client) == b"CAPA\r\n"  # no dripped bytes, no QUIT
    assert dovecot_log.logins(box.user) == []


async def test_a_client_that_logs_in_in_time_outlives_login_timeout(popguard, mailbox, wire):
    box = mailbox()
    proxy = await popguard(login_timeout=LOGIN_TIMEOUT)

    def client() -> tuple[bytes, bytes]:
        w = wire(*proxy.address, timeout=20)
        assert w.readline().startswith(b"+OK")
        assert w.command(f"USER {box.user}").startswith(b"+OK")
        assert w.command(f"PASS {box.password}").startswith(b"+OK")
        time.sleep(LOGIN_TIMEOUT + 1.0)
        stat = w.command("STAT")
        return stat, w.command("QUIT")

    stat, quit_ = await in_thread(client)
    assert stat.startswith(b"+OK 5 ")
    assert quit_.startswith(b"+OK")
    (closed,) = await proxy.wait_for("session.closed")
    assert closed["reason"] == "quit"
    assert closed["duration_ms"] > LOGIN_TIMEOUT * 1000


class SilentUpstream:
    """A loopback listener that accepts, never writes, and keeps what it reads."""

    def __init__(self) -> None:
        self.port = 0
        self.received: list[bytes] = []
        self.closed = trio.Event()

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        data = bytearray()
        try:
            while chunk := await stream.receive_some(4096):
                data += chunk
        except trio.BrokenResourceError:
            pass  # a reset is a close too
        finally:
            self.received.append(bytes(data))
            await trio.aclose_forcefully(stream)
            self.closed.set()


@pytest.mark.parametrize("upstream_tls", ["none", "starttls"])
async def test_upstream_that_never_greets(popguard, nursery, wire, upstream_tls: str):
    silent = SilentUpstream()
    await nursery.start(silent.serve)
    proxy = await popguard(
        upstream=("127.0.0.1", silent.port),
        greeting_timeout=1.0,
        upstream_tls=UpstreamTLS(mode=upstream_tls),  # type: ignore[arg-type]
    )

    def client() -> tuple[bytes, float]:
        start = time.monotonic()
        w = wire(*proxy.address, timeout=20)
        answer = w.read_to_eof()
        return answer, time.monotonic() - start

    answer, elapsed = await in_thread(client)
    assert answer == REPLY_UPSTREAM_TIMEOUT
    assert answer.startswith(b"-ERR [SYS/TEMP] ")
    assert 0.95 <= elapsed <= 2.0, elapsed
    with trio.fail_after(5):
        await silent.closed.wait()
    assert silent.received == [b""]  # closed, and not a byte sent: no STLS, no QUIT
    (closed,) = await proxy.wait_for("session.closed")
    assert closed["reason"] == "upstream_timeout"
    assert closed["detail"] == "no greeting from the upstream within 1 s"
    assert [e["event"] for e in proxy.sink.events if "session" in e] == [
        "session.opened",
        "upstream.connected",
        "session.closed",
    ]
