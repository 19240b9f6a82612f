"""RFC 5424 syslog: formatting, escaping, truncation, UDP and TCP delivery."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popguard.audit import AuditLog, open_audit_log_from_config
from popguard.config import Address, AuditConfig, SyslogTarget
from popguard.core.records import AuditRecord, Event
from popguard.sinks.syslog import (
    FACILITIES,
    SyslogFormatter,
    SyslogTCPSink,
    SyslogUDPSink,
    escape_param_value,
)
from tests.ci import needs_tool
from tests.listsink import ListSink

# --------------------------------------------------------------------------
# A strict RFC 5424 parser (the receiving side, for the tests)
# --------------------------------------------------------------------------

_HEADER = re.compile(
    rb"<(?P<pri>\d{1,3})>1 (?P<timestamp>\S+) (?P<hostname>\S+) (?P<app>\S+) "
    rb"(?P<procid>\S+) (?P<msgid>\S+) "
)
_SD_NAME = rb"[!#-<>-\\^-~]{1,32}"


@dataclass
class Message:
    pri: int
    timestamp: str
    hostname: str
    app: str
    procid: str
    msgid: str
    sd_id: str | None
    params: dict[str, str] = field(default_factory=dict)
    msg: str = ""
    raw: bytes = b""

    @property
    def facility(self) -> int:
        return self.pri // 8

    @property
    def severity(self) -> int:
        return self.pri % 8


def parse_rfc5424(raw: bytes) -> Message:
    """Parse one message; raises AssertionError on anything malformed."""
    assert b"\r" not in raw, "CR in a syslog message"
    assert b"\n" not in raw, "LF in a syslog message"
    match = _HEADER.match(raw)
    assert match, f"bad header: {raw[:80]!r}"
    for name in ("hostname", "app", "procid", "msgid"):
        assert all(33 <= b <= 126 for b in match[name])
    assert len(match["msgid"]) <= 32
    assert len(match["app"]) <= 48
    pos = match.end()
    sd_id: str | None = None
    params: dict[str, str] = {}
    if raw[pos : pos + 1] == b"-":
        pos += 1
    else:
        assert raw[pos : pos + 1] == b"[", "no SD-ELEMENT"
        sd = re.compile(rb"\[(" + _SD_NAME + rb")").match(raw, pos)
        assert sd, "bad SD-ID"
        sd_id = sd[1].decode()
        pos = sd.end()
        while raw[pos : pos + 1] == b" ":
            name = re.compile(rb" (" + _SD_NAME + rb')="').match(raw, pos)
            assert name, f"bad SD-PARAM at {raw[pos : pos + 40]!r}"
            pos = name.end()
            value = bytearray()
            while True:
                byte = raw[pos : pos + 1]
                assert byte, "unterminated PARAM-VALUE"
                if byte == b"\\" and raw[pos + 1 : pos + 2] in (b'"', b"\\", b"]"):
                    value += raw[pos + 1 : pos + 2]
                    pos += 2
                    continue
                assert byte not in (b'"', b"]") or byte == b'"', "unescaped ]"
                if byte == b'"':
                    pos += 1
                    break
                value += byte
                pos += 1
            params[name[1].decode()] = value.decode("utf-8")
        assert raw[pos : pos + 1] == b"]", "SD-ELEMENT not closed"
        pos += 1
    msg = ""
    if pos < len(raw):
        assert raw[pos : pos + 1] == b" "
        msg = raw[pos + 1 :].decode("utf-8")
    return Message(
        pri=int(match["pri"]),
        timestamp=match["timestamp"].decode(),
        hostname=match["hostname"].decode(),
        app=match["app"].decode(),
        procid=match["procid"].decode(),
        msgid=match["msgid"].decode(),
        sd_id=sd_id,
        params=params,
        msg=msg,
        raw=raw,
    )


def split_octet_counted(data: bytes) -> tuple[list[bytes], bytes]:
    """RFC 6587 §3.4.1 frames in ``data``; returns (messages, rest)."""
    messages = []
    while True:
        space = data.find(b" ")
        if space < 0:
            return messages, data
        length_text = data[:space]
        assert re.fullmatch(rb"[1-9][0-9]*", length_text), length_text
        length = int(length_text)
        if len(data) < space + 1 + length:
            return messages, data
        messages.append(data[space + 1 : space + 1 + length])
        data = data[space + 1 + length :]


# --------------------------------------------------------------------------
# Receivers on loopback
# --------------------------------------------------------------------------


class UDPReceiver:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(5)
        self.port = self.sock.getsockname()[1]

    def receive(self, count: int) -> list[Message]:
        return [parse_rfc5424(self.sock.recv(70000)) for _ in range(count)]

    def close(self) -> None:
        self.sock.close()


class TCPReceiver:
    """Accepts connections; collects octet-counted frames from all of them."""

    def __init__(self, port: int = 0) -> None:
        self.server = socket.create_server(("127.0.0.1", port))
        self.port = self.server.getsockname()[1]
        self.frames: list[bytes] = []
        self.connections = 0
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                self._socks.append(conn)
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        buffer = b""
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            buffer += data
            frames, buffer = split_octet_counted(buffer)
            with self._lock:
                self.frames.extend(frames)

    def messages(self) -> list[Message]:
        with self._lock:
            return [parse_rfc5424(frame) for frame in self.frames]

    def wait(self, count: int, limit: float = 10.0) -> list[Message]:
        wait_until(lambda: len(self.frames) >= count, limit)
        return self.messages()

    def drop_connections(self) -> None:
        with self._lock:
            for conn in self._socks:
                conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            self._socks.clear()

    def close(self) -> None:
        # shutdown() wakes the thread blocked in accept(); close() alone
        # would leave the listening socket alive until accept() returns.
        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()
        self._thread.join(5)
        self.drop_connections()


def wait_until(condition: Callable[[], bool], limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.fixture
def udp() -> Iterator[UDPReceiver]:
    receiver = UDPReceiver()
    yield receiver
    receiver.close()


@pytest.fixture
def tcp() -> Iterator[TCPReceiver]:
    receiver = TCPReceiver()
    yield receiver
    receiver.close()


EVENT = {
    "session": "0123456789abcdef",
    "client": "127.0.0.1:40000",
    "listener": "pop3",
    "event": "dele.marked",
    "user": "alice",
    "msg": 3,
    "level": "info",
    "timestamp": "2026-11-26T23:38:26.425863Z",
    "schema": 1,
    "instance": "popguard",
}


# --------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------


def test_header_and_structured_data() -> None:
    fmt = SyslogFormatter(facility="auth", hostname="mx1.example.org", procid=4242)
    message = parse_rfc5424(fmt.format(EVENT))
    assert message.pri == 4 * 8 + 6  # auth.info
    assert message.timestamp == "2026-11-26T23:38:26.425863Z"
    assert message.hostname == "mx1.example.org"
    assert message.app == "popguard"
    assert message.procid == "4242"
    assert message.msgid == "dele.marked"
    assert message.sd_id == "popguard@32473"
    assert list(message.params)[:3] == ["event", "session", "user"]
    assert message.params == {key: str(value) for key, value in EVENT.items()}
    assert message.msg == "dele.marked"


@pytest.mark.parametrize(
    ("level", "severity"), [("info", 6), ("warning", 4), ("error", 3), ("other", 6)]
)
def test_severity_from_level(level: str, severity: int) -> None:
    fmt = SyslogFormatter(facility="local3")
    message = parse_rfc5424(fmt.format({**EVENT, "level": level}))
    assert message.facility == FACILITIES["local3"] == 19
    assert message.severity == severity


def test_sd_param_escaping() -> None:
    fmt = SyslogFormatter()
    tricky = 'a"b\\c]d[e=f'
    raw = fmt.format({**EVENT, "reply": tricky})
    assert b'reply="a\\"b\\\\c\\]d[e=f"' in raw
    assert parse_rfc5424(raw).params["reply"] == tricky
    assert escape_param_value('"\\]') == '\\"\\\\\\]'


def test_no_cr_or_lf_can_reach_the_message() -> None:
    """CWE-117: a forged second message must stay inside the first one."""
    fmt = SyslogFormatter()
    evil = 'bob\r\n<13>1 2026-01-01T00:00:00Z forged popguard - auth.succeeded [x a="b"] x'
    for event in (
        {**EVENT, "user": evil},
        {**EVENT, "event": "dele.marked\r\nforged"},
        {**EVENT, "evil\nkey": "v"},
        {**EVENT, "user": "nel\x85ls\u2028ps\u2029nul\x00del\x7f"},
    ):
        raw = fmt.format(event)
        assert all(b not in raw for b in (b"\r", b"\n", b"\x00", b"\x7f")), raw
        assert "\x85".encode() not in raw
        assert "\u2028".encode() not in raw
        parse_rfc5424(raw)
    message = parse_rfc5424(fmt.format({**EVENT, "user": evil}))
    assert message.params["user"].startswith("bob\\u000d\\u000a<13>1")


def test_bad_timestamp_becomes_nilvalue() -> None:
    message = parse_rfc5424(SyslogFormatter().format({**EVENT, "timestamp": "yesterday"}))
    assert message.timestamp == "-"


def test_values_of_every_type() -> None:
    event = {**EVENT, "ok": True, "no": False, "n": None, "msgs": (1, 2), "ratio": 0.5}
    params = parse_rfc5424(SyslogFormatter().format(event)).params
    assert params["ok"] == "true"
    assert params["no"] == "false"
    assert "n" not in params
    assert params["msgs"] == "[1,2]"
    assert params["ratio"] == "0.5"


def test_long_records_are_truncated_safely() -> None:
    fmt = SyslogFormatter(max_message=480)
    event = {**EVENT, "reply": ('"]\\' * 200) + "é" * 100, "tail": "x" * 50}
    raw = fmt.format(event)
    assert len(raw) <= 480
    message = parse_rfc5424(raw)
    assert message.params["truncated"] == "true"
    assert message.params["event"] == "dele.marked"  # the important fields stay
    assert message.params["user"] == "alice"
    assert '"]\\'.startswith(message.params["reply"][:3])
    assert "tail" not in message.params


@settings(max_examples=300, deadline=None)
@given(
    value=st.text(alphabet=st.sampled_from(['"', "\\", "]", "é", "€", "a", "\r", "\n", "😀"])),
    max_message=st.integers(min_value=480, max_value=1200),
    key=st.text(min_size=1, max_size=40),
)
def test_truncation_never_breaks_the_format(value: str, max_message: int, key: str) -> None:
    fmt = SyslogFormatter(max_message=max_message, hostname="h")
    raw = fmt.format({**EVENT, key: value, "more": value})
    assert len(raw) <= max_message
    message = parse_rfc5424(raw)
    if "truncated" not in message.params:
        assert message.params.get("more") == value.translate(
            {ord("\r"): "\\u000d", ord("\n"): "\\u000a"}
        )


# --------------------------------------------------------------------------
# Over the network
# --------------------------------------------------------------------------


def test_udp_one_message_per_datagram(udp: UDPReceiver) -> None:
    sink = SyslogUDPSink("127.0.0.1", udp.port, facility="local0")
    log = AuditLog([sink], instance="test")
    log.emit(AuditRecord(Event.DELE_MARKED, {"msg": 1}))
    log.emit(AuditRecord(Event.SESSION_CLOSED, {"reason": "quit", "user": 'x"]\\'}))
    log.close()
    first, second = udp.receive(2)
    assert first.msgid == "dele.marked"
    assert first.params["msg"] == "1"
    assert first.facility == 16
    assert first.procid == str(os.getpid())
    assert first.params["instance"] == "test"
    assert second.msgid == "session.closed"
    assert second.params["user"] == 'x"]\\'
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", first.timestamp)


def test_udp_datagrams_respect_max_message(udp: UDPReceiver) -> None:
    sink = SyslogUDPSink("127.0.0.1", udp.port, max_message=600)
    log = AuditLog([sink])
    log.event("big", blob="z" * 5000)
    log.close()
    (message,) = udp.receive(1)
    assert len(message.raw) <= 600
    assert message.params["truncated"] == "true"


def test_tcp_octet_counting(tcp: TCPReceiver) -> None:
    sink = SyslogTCPSink("127.0.0.1", tcp.port, facility="authpriv")
    log = AuditLog([sink])
    for n in range(50):
        log.emit(AuditRecord(Event.DELE_MARKED, {"msg": n, "user": "a\r\nb"}))
    log.close()
    messages = tcp.wait(50)
    assert [m.params["msg"] for m in messages] == [str(n) for n in range(50)]
    assert all(m.facility == 10 for m in messages)
    assert tcp.connections == 1


def test_tcp_reconnects_and_delivers_the_backlog() -> None:
    receiver = TCPReceiver()
    port = receiver.port
    sink = SyslogTCPSink("127.0.0.1", port)
    sink.retry_initial = 0.02
    sink.retry_max = 0.1
    other = ListSink()
    log = AuditLog([sink, other])
    log.event("one")
    receiver.wait(1)
    # The receiver restarts: its connection goes away.
    receiver.close()
    time.sleep(0.05)
    log.event("two")  # noticed before sending: goes over a new connection
    wait_until(lambda: bool(other.named("audit.sink.failed")))
    assert not sink.healthy
    log.event("three")
    restarted = TCPReceiver(port)
    try:
        wait_until(lambda: bool(other.named("audit.sink.recovered")))
        messages = restarted.wait(2)
        assert [m.msgid for m in messages] == ["two", "three"]
        assert sink.lost == 0
    finally:
        log.close()
        restarted.close()


def test_from_config_with_several_targets(udp: UDPReceiver, tcp: TCPReceiver) -> None:
    config = AuditConfig(
        console=False,
        syslog=(
            SyslogTarget(Address("127.0.0.1", udp.port), "udp", "local1"),
            SyslogTarget(Address("127.0.0.1", tcp.port), "tcp", "local2", 8192, "audit@99999"),
        ),
    )
    log = open_audit_log_from_config(config, instance="multi")
    log.event("popguard.started")
    log.close()
    (from_udp,) = udp.receive(1)
    (from_tcp,) = tcp.wait(1)
    assert from_udp.facility == 17
    assert from_udp.sd_id == "popguard@32473"
    assert from_tcp.facility == 18
    assert from_tcp.sd_id == "audit@99999"
    assert from_udp.params["instance"] == from_tcp.params["instance"] == "multi"


def test_user_name_with_crlf_everywhere(tmp_path: Path, udp: UDPReceiver) -> None:
    """One record stays one line in the file and one message in syslog."""
    path = tmp_path / "audit.jsonl"
    config = AuditConfig(
        file=str(path),
        console=False,
        syslog=(SyslogTarget(Address("127.0.0.1", udp.port)),),
    )
    log = open_audit_log_from_config(config)
    evil = 'mallory\r\n{"event":"auth.succeeded","user":"root"}\r\n'
    log.emit(AuditRecord(Event.AUTH_FAILED, {"user": evil, "mechanism": "USER"}))
    log.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 2  # the chain start and the record
    assert '"auth.succeeded"' not in lines[1].replace('\\"auth.succeeded\\"', "")
    (message,) = udp.receive(1)
    assert message.params["user"].startswith("mallory\\u000d\\u000a{")


# --------------------------------------------------------------------------
# Integration: a private rsyslogd (Debian package ``rsyslog``)
#
# Skipped where rsyslogd is not installed.  The daemon runs in the
# foreground with its own config, pid file and work directory, on loopback
# ports, and writes what it parsed with a template that shows each RFC 5424
# field separately.
# --------------------------------------------------------------------------

RSYSLOGD = shutil.which("rsyslogd") or (
    "/usr/sbin/rsyslogd" if Path("/usr/sbin/rsyslogd").exists() else None
)

needs_rsyslog = needs_tool(RSYSLOGD, "rsyslogd (Debian package: rsyslog)")

_CONFIG = """\
global(workDirectory="{work}" maxMessageSize="64k")
module(load="imudp")
module(load="imtcp")
input(type="imudp" address="127.0.0.1" port="{udp}")
input(type="imtcp" address="127.0.0.1" port="{tcp}")
template(name="fields" type="list") {{
  property(name="inputname") constant(value="\\t")
  property(name="pri") constant(value="\\t")
  property(name="timereported" dateFormat="rfc3339") constant(value="\\t")
  property(name="hostname") constant(value="\\t")
  property(name="app-name") constant(value="\\t")
  property(name="procid") constant(value="\\t")
  property(name="msgid") constant(value="\\t")
  property(name="structured-data") constant(value="\\t")
  property(name="msg" droplastlf="on") constant(value="\\n")
}}
*.* action(type="omfile" file="{out}" template="fields")
"""


@dataclass
class Rsyslog:
    udp_port: int
    tcp_port: int
    out: Path

    def lines(self) -> list[list[str]]:
        if not self.out.exists():
            return []
        return [line.split("\t") for line in self.out.read_text().splitlines()]

    def wait_for(self, count: int, limit: float = 15.0) -> list[list[str]]:
        deadline = time.monotonic() + limit
        while len(self.lines()) < count:
            assert time.monotonic() < deadline, f"rsyslogd wrote {len(self.lines())}/{count}"
            time.sleep(0.05)
        return self.lines()


def _free_port(kind: socket.SocketKind) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def rsyslog(tmp_path: Path) -> Iterator[Rsyslog]:
    assert RSYSLOGD is not None, "rsyslogd is required in CI"
    work = tmp_path / "rsyslog"
    work.mkdir()
    out = work / "out.log"
    udp, tcp = _free_port(socket.SOCK_DGRAM), _free_port(socket.SOCK_STREAM)
    conf = work / "rsyslog.conf"
    conf.write_text(_CONFIG.format(work=work, udp=udp, tcp=tcp, out=out))
    log = (work / "stderr").open("w")
    proc = subprocess.Popen(
        [RSYSLOGD, "-n", "-f", str(conf), "-i", str(work / "rsyslogd.pid")],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", tcp), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("rsyslogd did not start: " + (work / "stderr").read_text()[-2000:])
                time.sleep(0.05)
        yield Rsyslog(udp, tcp, out)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _params(structured_data: str) -> dict[str, str]:
    raw = f"<0>1 - h a p m {structured_data}".encode()
    return parse_rfc5424(raw).params


@needs_rsyslog
def test_rsyslog_receives_udp_and_tcp(rsyslog: Rsyslog) -> None:
    """A private ``rsyslogd -n`` (imudp/imtcp -> omfile) parses every message."""
    config = AuditConfig(
        console=False,
        syslog=(
            SyslogTarget(Address("127.0.0.1", rsyslog.udp_port), "udp", "auth"),
            SyslogTarget(Address("127.0.0.1", rsyslog.tcp_port), "tcp", "local4"),
        ),
    )
    log = open_audit_log_from_config(config, instance="it")
    tricky = 'eve "the ]bad\\" one\r\n<34>1 forged'
    log.emit(AuditRecord(Event.AUTH_FAILED, {"user": tricky, "mechanism": "USER"}))
    for n in range(20):
        log.emit(AuditRecord(Event.DELE_MARKED, {"msg": n, "user": "alice"}))
    log.close()

    lines = rsyslog.wait_for(42)
    assert len(lines) == 42  # no message split by the CR/LF, none lost
    by_input: dict[str, list[list[str]]] = {"imudp": [], "imtcp": []}
    for fields in lines:
        assert len(fields) == 9, fields
        by_input[fields[0]].append(fields)
    for name, facility in (("imudp", 4), ("imtcp", 20)):
        got = by_input[name]
        assert len(got) == 21
        first = got[0]
        _, pri, reported, hostname, app, procid, msgid, sd, msg = first
        assert int(pri) == facility * 8 + 6
        assert app == "popguard"
        assert msgid == "auth.failed"
        assert msg == "auth.failed"
        assert procid.isdigit()
        assert hostname == socket.gethostname()
        assert reported.startswith("20")
        params = _params(sd)
        assert params["user"] == tricky.replace("\r", "\\u000d").replace("\n", "\\u000a")
        assert params["instance"] == "it"
        assert params["mechanism"] == "USER"
        assert [_params(f[7])["msg"] for f in got[1:]] == [str(n) for n in range(20)]
