"""Audit records as RFC 5424 syslog messages, over UDP or TCP.

One message per record::

    <38>1 2026-11-26T23:38:26.425863Z mx1 popguard 4242 dele.marked
        [popguard@32473 event="dele.marked" session="9f..." user="alice" msg="3"
        ...] dele.marked

* PRI: the configured facility, severity from the record's level (info 6,
  warning 4, error 3).  TIMESTAMP: the record's own (RFC 3339, UTC,
  microseconds).  HOSTNAME: this host's name.  APP-NAME ``popguard``,
  PROCID the process id, MSGID the event name (at most 32 characters).
* STRUCTURED-DATA: one SD-ELEMENT with every field of the record as an
  SD-PARAM (``event``, ``session`` and ``user`` first).  Values are escaped
  per RFC 5424 §6.3.3 (``"``, ``\\`` and ``]`` get a backslash); before that
  every control character (C0, DEL, C1, U+2028, U+2029) is replaced by the
  text ``\\uXXXX``, so no CR or LF can ever reach a receiver (CWE-117), even
  one that splits on newlines despite the framing.
* MSG: the event name, so that receivers that do not show structured data
  still show what happened.
* Size: a message longer than ``max_message`` octets is cut *between*
  escaped characters (never inside an escape or a UTF-8 sequence), keeps a
  well-formed SD-ELEMENT, and says ``truncated="true"``; fields at the end
  go first.
* UDP (RFC 5426): one message per datagram.  TCP (RFC 6587 §3.4.1, the
  octet-counting framing of RFC 5425): ``LENGTH SP MESSAGE``; the
  connection is re-established (with backoff) when it fails, and the record
  that was being sent is sent again on the new connection.  Neither
  transport confirms delivery: syslog sinks are never *durable*.
"""

from __future__ import annotations

import json
import os
import re
import select
import socket
from collections.abc import Iterable, Mapping
from typing import Any, Final, Literal

# The settings' data (popguard.schema.syslogdata), re-exported here.
from popguard.schema.syslogdata import DEFAULT_MAX_MESSAGE as DEFAULT_MAX_MESSAGE
from popguard.schema.syslogdata import DEFAULT_SD_ID as DEFAULT_SD_ID
from popguard.schema.syslogdata import FACILITIES as FACILITIES
from popguard.schema.syslogdata import MAX_UDP_MESSAGE as MAX_UDP_MESSAGE
from popguard.schema.syslogdata import MIN_MESSAGE as MIN_MESSAGE
from popguard.schema.syslogdata import valid_sd_id as valid_sd_id
from popguard.sinks.base import Entry, QueuedSink

__all__ = [
    "DEFAULT_MAX_MESSAGE",
    "DEFAULT_SD_ID",
    "FACILITIES",
    "MAX_UDP_MESSAGE",
    "MIN_MESSAGE",
    "SyslogFormatter",
    "SyslogTCPSink",
    "SyslogUDPSink",
    "Transport",
    "escape_param_value",
]

Transport = Literal["udp", "tcp"]


_SEVERITIES: Final[Mapping[str, int]] = {
    "critical": 2,
    "error": 3,
    "exception": 3,
    "warning": 4,
    "warn": 4,
    "notice": 5,
    "info": 6,
    "debug": 7,
}


_SD_NAME = re.compile(r"[!#-<>-\\^-~]{1,32}\Z")  # PRINTUSASCII but = SP ] "
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|[+-]\d{2}:\d{2})\Z")

_FIRST: Final = ("event", "session", "user")


#: Characters no syslog message may carry raw: C0, DEL, C1, U+2028, U+2029.
_CONTROL_CODES: Final = (*range(0x20), 0x7F, *range(0x80, 0xA0), 0x2028, 0x2029)


def _escape_table() -> dict[int, str]:
    table: dict[int, str] = {}
    for code in _CONTROL_CODES:
        # "\uXXXX" as text, whose backslash the SD-PARAM escaping doubles.
        table[code] = "\\\\u%04x" % code  # noqa: UP031
    table[ord("\\")] = "\\\\"
    table[ord('"')] = '\\"'
    table[ord("]")] = "\\]"
    return table


_ESCAPES: Final = _escape_table()
#: For MSG, which has no escaping of its own: control characters only.
_CONTROLS: Final = {code: "\\u%04x" % code for code in _CONTROL_CODES}  # noqa: UP031


def escape_param_value(text: str) -> str:
    """An SD-PARAM value: RFC 5424 §6.3.3 escaping, no control characters."""
    return text.translate(_ESCAPES)


def _printable(text: str, limit: int) -> str:
    """An RFC 5424 header field: PRINTUSASCII only, at most ``limit`` long."""
    cleaned = "".join(ch if "!" <= ch <= "~" else "_" for ch in text[:limit])
    return cleaned or "-"


def _param_name(key: str) -> str:
    if _SD_NAME.match(key):
        return key
    cleaned = "".join(ch if "!" <= ch <= "~" and ch not in '="]' else "_" for ch in key[:32])
    return cleaned or "_"


def _param_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return json.dumps(list(value), ensure_ascii=False, default=str, separators=(",", ":"))
    return str(value)


class SyslogFormatter:
    """Renders records as RFC 5424 messages (bytes, without framing)."""

    def __init__(
        self,
        *,
        facility: str | int = "auth",
        hostname: str | None = None,
        app_name: str = "popguard",
        procid: int | None = None,
        sd_id: str = DEFAULT_SD_ID,
        max_message: int = 2048,
    ) -> None:
        code = FACILITIES[facility] if isinstance(facility, str) else facility
        if not 0 <= code <= 23:
            raise ValueError(f"facility must be 0-23, got {code}")
        if not valid_sd_id(sd_id):
            raise ValueError(f"invalid SD-ID {sd_id!r}")
        if max_message < MIN_MESSAGE:
            raise ValueError(f"max_message must be at least {MIN_MESSAGE}, got {max_message}")
        self.facility = code
        self.hostname = _printable(hostname or socket.gethostname(), 255)
        self.app_name = _printable(app_name, 48)
        self.procid = _printable(str(procid if procid is not None else os.getpid()), 128)
        self.sd_id = sd_id
        self.max_message = max_message

    def format(self, event: Mapping[str, Any]) -> bytes:
        name = str(event.get("event", ""))
        level = str(event.get("level", "info"))
        pri = self.facility * 8 + _SEVERITIES.get(level, 6)
        timestamp = str(event.get("timestamp", ""))
        if not _RFC3339.match(timestamp):
            timestamp = "-"
        msgid = _printable(name, 32)
        header = (
            f"<{pri}>1 {timestamp} {self.hostname} {self.app_name} {self.procid} {msgid} "
        ).encode("ascii")
        msg = (" " + name.translate(_CONTROLS)).encode("utf-8", "backslashreplace")
        params = list(self._params(event))
        sd = self._structured_data(params, self.max_message - len(header) - len(msg))
        message = header + sd + msg
        if len(message) > self.max_message:  # only with an absurdly long event name
            message = message[: self.max_message].decode("utf-8", "ignore").encode("utf-8")
        return message

    def _params(self, event: Mapping[str, Any]) -> Iterable[tuple[str, str]]:
        for key in _FIRST:
            if key in event:
                text = _param_text(event[key])
                if text is not None:
                    yield (_param_name(key), text)
        for key, value in event.items():
            if key in _FIRST:
                continue
            text = _param_text(value)
            if text is not None:
                yield (_param_name(str(key)), text)

    def _structured_data(self, params: list[tuple[str, str]], budget: int) -> bytes:
        parts = [f'{name}="{escape_param_value(text)}"' for name, text in params]
        whole = ("[" + " ".join([self.sd_id, *parts]) + "]").encode("utf-8", "backslashreplace")
        if len(whole) <= budget:
            return whole
        # Too long: keep whole fields while they fit, then as much of the
        # next value as fits, cut between escaped characters.
        marker = b' truncated="true"]'
        out = bytearray(b"[" + self.sd_id.encode("ascii"))
        if len(out) + len(marker) > budget:
            return b"-"
        limit = budget - len(marker)
        for name, text in params:
            head = f' {name}="'.encode("ascii")
            if len(out) + len(head) + 1 > limit:
                break
            out += head
            room = limit - len(out) - 1
            cut = False
            for ch in text:
                unit = ch.translate(_ESCAPES).encode("utf-8", "backslashreplace")
                if len(unit) > room:
                    cut = True
                    break
                out += unit
                room -= len(unit)
            out += b'"'
            if cut:
                break
        return bytes(out) + marker


class _SyslogSink(QueuedSink):
    transport: Transport

    def __init__(
        self,
        host: str,
        port: int,
        *,
        facility: str = "auth",
        max_message: int | None = None,
        sd_id: str = DEFAULT_SD_ID,
        hostname: str | None = None,
        queue_size: int = 10000,
        name: str | None = None,
    ) -> None:
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        super().__init__(name or f"syslog+{self.transport}://{where}", queue_size=queue_size)
        self.host = host
        self.port = port
        self.formatter = SyslogFormatter(
            facility=facility,
            hostname=hostname,
            sd_id=sd_id,
            max_message=max_message or DEFAULT_MAX_MESSAGE[self.transport],
        )
        self._sock: socket.socket | None = None

    def _resolve(self, kind: socket.SocketKind) -> tuple[int, Any]:
        family, _, _, _, address = socket.getaddrinfo(self.host, self.port, type=kind)[0]
        return family, address

    def _message(self, entry: Entry) -> bytes:
        if entry.payload is None:
            assert entry.event is not None
            entry.payload = self.formatter.format(entry.event)
        return entry.payload

    def _drop_socket(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def _reopen(self, entry: Entry) -> None:
        # SIGHUP: connect (and resolve the name) afresh with the next record.
        self._drop_socket()

    def _release(self) -> None:
        self._drop_socket()


class SyslogUDPSink(_SyslogSink):
    """RFC 5424 over UDP (RFC 5426): one message per datagram."""

    transport = "udp"

    def __init__(self, host: str, port: int, **options: Any) -> None:
        self._address: Any = None
        super().__init__(host, port, **options)
        if self.formatter.max_message > MAX_UDP_MESSAGE:
            raise ValueError(f"max_message for UDP must be at most {MAX_UDP_MESSAGE}")

    def _deliver(self, entry: Entry) -> None:
        message = self._message(entry)
        if self._sock is None:
            family, self._address = self._resolve(socket.SOCK_DGRAM)
            self._sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self._sock.sendto(message, self._address)
        except OSError:
            self._drop_socket()  # resolve again next time
            raise


class SyslogTCPSink(_SyslogSink):
    """RFC 5424 over TCP with octet-counting framing (RFC 6587 §3.4.1)."""

    transport = "tcp"
    connect_timeout: float = 5.0
    send_timeout: float = 10.0

    def _deliver(self, entry: Entry) -> None:
        message = self._message(entry)
        frame = b"%d %b" % (len(message), message)
        sock = self._sock
        if sock is not None and self._peer_closed(sock):
            self._drop_socket()
            sock = None
        if sock is None:
            family, address = self._resolve(socket.SOCK_STREAM)
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.settimeout(self.connect_timeout)
                sock.connect(address)
                sock.settimeout(self.send_timeout)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            except OSError:
                sock.close()
                raise
            self._sock = sock
        try:
            sock.sendall(frame)
        except OSError:
            self._drop_socket()
            raise

    @staticmethod
    def _peer_closed(sock: socket.socket) -> bool:
        """A syslog receiver never talks: readable means closed (or reset).

        Checking before each send catches a receiver that restarted, so the
        record goes over a new connection instead of into a dead one.
        """
        try:
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            if not poller.poll(0):
                return False
            return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True
