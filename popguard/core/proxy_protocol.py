"""HAProxy's PROXY protocol, versions 1 and 2, sans-I/O.

Reference: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt
(section numbers below are that document's).

Receiving
=========
A load balancer in front of popguard (HAProxy ``send-proxy``/``send-proxy-v2``,
AWS NLB, ...) opens each connection with one header that names the real
client.  :class:`ProxyHeaderParser` is fed the connection's first bytes as
they arrive and answers ``None`` (need more), a :class:`ProxyResult` (the
header is complete and valid), or raises :class:`ProxyProtocolError`.  The
bytes that followed the header in the same reads are handed back in
:attr:`ProxyResult.remainder`: they belong to the POP3 stream.

It decides as early as it can (§2.1: "abort the connection as soon as
possible"): every byte is checked as it arrives, so a peer that sends
``USER`` is refused at its first byte, ``PROXY TCP4 10.0.0.300`` at the last
``0`` and a v2 header with a bad version at its 13th byte.  A POP3 client,
though, normally sends *nothing* before the greeting, so a missing header is
only ever noticed by a timeout, which is the shell's: §2 suggests "at least
3 seconds to cover a TCP retransmit" (:data:`MIN_HEADER_TIMEOUT`).

Memory is bounded: the parser never holds more than
:attr:`ProxyHeaderParser.max_header` bytes (107 for v1, ``max_v2_header``
for v2, 4096 by default).

Strictness, where the spec leaves a choice:

* v1: exactly one space between fields, decimal numbers without heading
  zeroes, IPv4 in TCP4 and IPv6 in TCP6 only, CRLF within 107 bytes, no lone
  CR or LF anywhere in the line (not even in the ignored tail of ``UNKNOWN``).
* v2: the version nibble must be 2 and the command LOCAL or PROXY.  A PROXY
  header must use one of the seven family/transport bytes of §2.2 and carry
  at least its address block.  TLVs must tile the rest of the header exactly;
  a ``PP2_TYPE_CRC32C`` TLV is verified; ``PP2_TYPE_NOOP`` is dropped; any
  other type appearing twice is refused (two answers to one question is how
  header smuggling starts).
* LOCAL (v2) and UNKNOWN (v1) mean "use the real connection's addresses":
  ``source``/``destination`` are None (v1 has no command; its ``command`` is
  always "PROXY").  For LOCAL the whole block is discarded unread, as §2.2
  says, so ``tlvs`` is empty.
* v2 UNSPEC, UDP and UNIX: §2.2 lets a receiver fall back to UNSPEC for
  families it does not support, so these also give None addresses (a POP3
  proxy has no use for a UDP or UNIX-socket peer); their TLVs are parsed.

Sending
=======
:func:`build_v1` and :func:`build_v2` make the header popguard sends to an
upstream that wants one (Dovecot's ``haproxy_trusted_networks``).  Both
families must match on the wire, so addresses are first unmapped
(``::ffff:10.0.0.1`` counts as ``10.0.0.1``, as a dual-stack listener
reports IPv4 peers); two IPv4 addresses give TCP4, anything else TCP6 with
an IPv4 address written IPv4-mapped (``::ffff:a.b.c.d``), as HAProxy does.
``build_v2(..., checksum=True)`` adds a CRC32C TLV; :func:`build_v2_local`
is the LOCAL (health check) header and :data:`V1_UNKNOWN` the v1 one.

Trust
=====
Who may send a header is policy, and lives in the shell and the config
(§2: "The receiver MUST be configured to only receive the protocol ... and
MUST not try to guess whether the protocol header is present").
:func:`is_trusted` and :func:`looks_like_header` are the two questions the
shell asks.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, Literal

#: A (host, port) pair; host is an IP address literal.
Address = tuple[str, int]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: §2.1: the longest v1 line, CRLF included ("PROXY UNKNOWN" + two IPv6
#: addresses + two ports).
V1_MAX_LENGTH: Final = 107
V1_PREFIX: Final = b"PROXY "
#: §2.1: the shortest v1 line, and the one to send when addresses are unknown.
V1_UNKNOWN: Final = b"PROXY UNKNOWN\r\n"

#: §2.2: the 12-byte v2 signature.
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
#: Signature, version/command byte, family/transport byte, 2-byte length.
V2_FIXED_LENGTH: Final = 16
#: The largest v2 header accepted by default.  The length field allows
#: 16 + 65535 bytes; addresses take at most 216 (AF_UNIX), and real TLVs (SSL
#: details, unique IDs, cloud load balancers' endpoint IDs) a few hundred.
DEFAULT_MAX_V2_HEADER: Final = 4096
#: ``max_v2_header`` may not be set below this: every address block must fit.
MIN_MAX_V2_HEADER: Final = V2_FIXED_LENGTH + 216
#: The length field's limit.
ABSOLUTE_MAX_V2_HEADER: Final = V2_FIXED_LENGTH + 0xFFFF

#: §2: a receiver "may apply a short timeout ... (at least 3 seconds to cover
#: a TCP retransmit)".  Seconds; the timer itself belongs to the shell.
MIN_HEADER_TIMEOUT: Final = 3.0

# §2.2 TLV types.
PP2_TYPE_ALPN: Final = 0x01
PP2_TYPE_AUTHORITY: Final = 0x02
PP2_TYPE_CRC32C: Final = 0x03
PP2_TYPE_NOOP: Final = 0x04
PP2_TYPE_UNIQUE_ID: Final = 0x05
PP2_TYPE_SSL: Final = 0x20
PP2_SUBTYPE_SSL_VERSION: Final = 0x21
PP2_SUBTYPE_SSL_CN: Final = 0x22
PP2_SUBTYPE_SSL_CIPHER: Final = 0x23
PP2_SUBTYPE_SSL_SIG_ALG: Final = 0x24
PP2_SUBTYPE_SSL_KEY_ALG: Final = 0x25
PP2_TYPE_NETNS: Final = 0x30

_CMD_LOCAL = 0x0
_CMD_PROXY = 0x1

#: §2.2 "In practice, the following protocol bytes are expected": the
#: family/transport byte, its name and the size of its address block.
_V2_FAMILIES: Final[Mapping[int, tuple[str, int]]] = {
    0x00: ("UNSPEC", 0),
    0x11: ("TCP4", 12),
    0x12: ("UDP4", 12),
    0x21: ("TCP6", 36),
    0x22: ("UDP6", 36),
    0x31: ("UNIX_STREAM", 216),
    0x32: ("UNIX_DGRAM", 216),
}

_NO_TLVS: Final[Mapping[int, bytes]] = MappingProxyType({})
_V1_PROTOCOLS: Final = (b"TCP4", b"TCP6", b"UNKNOWN")
_IPV6_CHARS: Final = re.compile(rb"[0-9A-Fa-f:.]*\Z")
#: "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255"
_IPV6_MAX_TEXT: Final = 45


class ProxyProtocolError(ValueError):
    """A PROXY header popguard refuses.  ``reason`` (and ``str()``) says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ProxyResult:
    """One complete, valid PROXY header."""

    version: Literal[1, 2]
    command: Literal["PROXY", "LOCAL"]
    #: v1: "TCP4", "TCP6" or "UNKNOWN".  v2: "TCP4", "TCP6", "UDP4", "UDP6",
    #: "UNIX_STREAM", "UNIX_DGRAM" or "UNSPEC".
    protocol: str
    #: The real client, or None: use the connection's own peer address.
    source: Address | None
    #: The address the client connected to, or None likewise.
    destination: Address | None
    #: The header itself, exactly as received.
    raw: bytes
    #: Bytes that followed the header: the start of the POP3 stream.
    remainder: bytes
    #: v2 TLVs by type, read-only (NOOP dropped, CRC32C already verified);
    #: empty for v1 and for LOCAL.
    tlvs: Mapping[int, bytes] = field(default_factory=lambda: _NO_TLVS)

    @property
    def relayed(self) -> bool:
        """Whether the header names the real endpoints (else use the socket's)."""
        return self.source is not None


class ProxyHeaderParser:
    """Reads one PROXY header (v1 or v2) from the start of a connection.

    ``versions`` restricts what is accepted (HAProxy's ``accept-proxy``
    takes both); ``max_v2_header`` bounds a v2 header's total size.
    """

    def __init__(
        self,
        *,
        versions: Iterable[int] = (1, 2),
        max_v2_header: int = DEFAULT_MAX_V2_HEADER,
    ) -> None:
        accepted = frozenset(versions)
        if not accepted or not accepted <= {1, 2}:
            raise ValueError(f"versions must be a non-empty subset of {{1, 2}}, not {versions!r}")
        if not MIN_MAX_V2_HEADER <= max_v2_header <= ABSOLUTE_MAX_V2_HEADER:
            raise ValueError(
                f"max_v2_header must be in [{MIN_MAX_V2_HEADER}, {ABSOLUTE_MAX_V2_HEADER}]"
            )
        self._versions = accepted
        self._max_v2 = max_v2_header
        self._buf = bytearray()
        self._version: Literal[1, 2] | None = None
        #: The v2 header's total size, once its fixed part is in.
        self._v2_total: int | None = None
        self._result: ProxyResult | None = None
        self._error: ProxyProtocolError | None = None

    @property
    def max_header(self) -> int:
        """The most bytes this parser will ever buffer."""
        return max(
            V1_MAX_LENGTH if 1 in self._versions else 0,
            self._max_v2 if 2 in self._versions else 0,
        )

    @property
    def buffered(self) -> int:
        """Bytes held so far (0 once finished)."""
        return len(self._buf)

    @property
    def done(self) -> bool:
        """Whether a result was returned or an error raised."""
        return self._result is not None or self._error is not None

    def feed(self, data: bytes) -> ProxyResult | None:
        """Take the next bytes read from the peer.

        Returns None while the header is incomplete, the result once it is.
        Raises :class:`ProxyProtocolError` as soon as the bytes cannot be the
        start of a valid header (and again on any later call).  Calling it
        after it returned a result is a bug: RuntimeError.
        """
        if self._result is not None:
            raise RuntimeError("the PROXY header is complete; feed the POP3 session instead")
        if self._error is not None:
            raise self._error
        try:
            result = self._feed(bytes(data))
        except ProxyProtocolError as exc:
            self._error = exc
            self._buf.clear()
            raise
        if result is not None:
            self._result = result
            self._buf.clear()
        return result

    def eof(self) -> None:
        """The peer closed before the header was complete: raise why.

        Does nothing once a result was returned.
        """
        if self._result is not None:
            return
        if self._error is not None:
            raise self._error
        if not self._buf:
            error = ProxyProtocolError("connection closed before any PROXY header byte")
        else:
            error = ProxyProtocolError(
                f"connection closed inside the PROXY v{self._version} header"
                f" after {len(self._buf)} bytes"
            )
        self._error = error
        self._buf.clear()
        raise error

    # -- internals -------------------------------------------------------

    def _room(self) -> int:
        """How many more bytes may be buffered before the next decision."""
        have = len(self._buf)
        if self._version is None:
            return 1
        if self._version == 1:
            return V1_MAX_LENGTH - have
        if self._v2_total is None:
            return V2_FIXED_LENGTH - have
        return self._v2_total - have

    def _feed(self, data: bytes) -> ProxyResult | None:
        pos = 0
        while pos < len(data):
            room = self._room()
            if room <= 0:  # pragma: no cover - _advance raises first
                raise AssertionError("PROXY parser buffer full without a decision")
            chunk = data[pos : pos + room]
            pos += len(chunk)
            self._buf += chunk
            result = self._advance()
            if result is not None:
                header_len, make = result
                raw = bytes(self._buf[:header_len])
                remainder = bytes(self._buf[header_len:]) + data[pos:]
                return make(raw, remainder)
        return None

    def _advance(self) -> tuple[int, _Maker] | None:
        if self._version is None:
            self._version = self._dispatch(self._buf[0])
        if self._version == 1:
            return _scan_v1(bytes(self._buf))
        return self._advance_v2()

    def _dispatch(self, first: int) -> Literal[1, 2]:
        if first == V1_PREFIX[0]:
            if 1 not in self._versions:
                raise ProxyProtocolError("PROXY v1 (text) header not accepted; v2 only")
            return 1
        if first == V2_SIGNATURE[0]:
            if 2 not in self._versions:
                raise ProxyProtocolError("PROXY v2 (binary) header not accepted; v1 only")
            return 2
        raise ProxyProtocolError(f"no PROXY header: first byte is 0x{first:02x}")

    def _advance_v2(self) -> tuple[int, _Maker] | None:
        buf = self._buf
        have = len(buf)
        if self._v2_total is None:
            n = min(have, len(V2_SIGNATURE))
            if buf[:n] != V2_SIGNATURE[:n]:
                bad = next(i for i in range(n) if buf[i] != V2_SIGNATURE[i])
                raise ProxyProtocolError(f"PROXY v2: bad signature at byte {bad + 1}")
            if have > 12:
                _check_ver_cmd(buf[12])
            if have > 13:
                _check_family(buf[13], proxy=buf[12] & 0x0F == _CMD_PROXY)
            if have < V2_FIXED_LENGTH:
                return None
            (length,) = struct.unpack_from("!H", buf, 14)
            total = V2_FIXED_LENGTH + length
            if total > self._max_v2:
                raise ProxyProtocolError(
                    f"PROXY v2: header of {total} bytes exceeds the {self._max_v2}-byte limit"
                )
            if buf[12] & 0x0F == _CMD_PROXY:
                name, addr_len = _V2_FAMILIES[buf[13]]
                if length < addr_len:
                    raise ProxyProtocolError(
                        f"PROXY v2: {name} needs {addr_len} address bytes, length says {length}"
                    )
            self._v2_total = total
        if have < self._v2_total:
            return None
        return self._v2_total, _parse_v2(bytes(buf[: self._v2_total]))


@dataclass(frozen=True, slots=True)
class _Maker:
    """A decoded header, waiting for ``raw`` and ``remainder``."""

    version: Literal[1, 2]
    command: Literal["PROXY", "LOCAL"]
    protocol: str
    source: Address | None
    destination: Address | None
    tlvs: Mapping[int, bytes]

    def __call__(self, raw: bytes, remainder: bytes) -> ProxyResult:
        return ProxyResult(
            version=self.version,
            command=self.command,
            protocol=self.protocol,
            source=self.source,
            destination=self.destination,
            raw=raw,
            remainder=remainder,
            tlvs=self.tlvs,
        )


# -- version 1 ---------------------------------------------------------------


def _scan_v1(buf: bytes) -> tuple[int, _Maker] | None:
    """Check a v1 line, complete or not.

    Returns (header length, maker) once the CRLF is in, None while ``buf`` can
    still grow into a valid line, and raises as soon as it cannot.
    """
    n = min(len(buf), len(V1_PREFIX))
    if buf[:n] != V1_PREFIX[:n]:
        raise ProxyProtocolError("PROXY v1: the line must start with 'PROXY '")
    if len(buf) <= len(V1_PREFIX):
        return None
    end = buf.find(b"\r\n")
    complete = end >= 0
    pending_cr = False
    if complete:
        content = buf[len(V1_PREFIX) : end]
    else:
        if len(buf) >= V1_MAX_LENGTH:
            raise ProxyProtocolError(f"PROXY v1: no CRLF within {V1_MAX_LENGTH} bytes")
        content = buf[len(V1_PREFIX) :]
        if content.endswith(b"\r"):
            pending_cr = True
            content = content[:-1]
    if b"\n" in content:
        raise ProxyProtocolError("PROXY v1: bare LF in the line (CRLF required)")
    if b"\r" in content:
        raise ProxyProtocolError("PROXY v1: bare CR in the line (CRLF required)")
    line_ends = complete or pending_cr
    fields = content.split(b" ")
    proto = fields[0]
    if len(fields) == 1 and not line_ends:
        if not any(p.startswith(proto) for p in _V1_PROTOCOLS):
            raise ProxyProtocolError(f"PROXY v1: unknown protocol {proto!r}")
        return None
    if proto not in _V1_PROTOCOLS:
        raise ProxyProtocolError(f"PROXY v1: unknown protocol {proto!r} (TCP4, TCP6 or UNKNOWN)")
    if proto == b"UNKNOWN":
        # §2.1: "the receiver must ignore anything presented before the CRLF".
        if not complete:
            return None
        return end + 2, _Maker(1, "PROXY", "UNKNOWN", None, None, _NO_TLVS)
    for i, value in enumerate(fields[1:5], start=1):
        partial = i == len(fields) - 1 and not line_ends
        if i <= 2:
            _check_v1_address(proto, value, partial, "source" if i == 1 else "destination")
        else:
            _check_v1_port(value, partial, "source" if i == 3 else "destination")
    if len(fields) > 5:
        raise ProxyProtocolError(
            "PROXY v1: too many fields (expected 'PROXY proto src dst sport dport')"
        )
    if not line_ends:
        return None
    if len(fields) < 5:
        raise ProxyProtocolError(f"PROXY v1: line ends after {len(fields) - 1} of 4 address fields")
    if not complete:
        return None
    src, dst, sport, dport = (f.decode("ascii") for f in fields[1:])
    source = (_canonical(src), int(sport))
    destination = (_canonical(dst), int(dport))
    name = proto.decode("ascii")
    return end + 2, _Maker(1, "PROXY", name, source, destination, _NO_TLVS)


def _canonical(text: str) -> str:
    return _format_ip(ipaddress.ip_address(text))


def _format_ip(ip: IPAddress) -> str:
    """``str(ip)``, but IPv4-mapped IPv6 always as ``::ffff:a.b.c.d``.

    (Python before 3.13 writes ``::ffff:102:304``; inet_ntop, and so HAProxy
    and every log line an operator will compare with, use the dotted form.)
    """
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return f"::ffff:{ip.ipv4_mapped}"
    return str(ip)


def _check_v1_address(proto: bytes, value: bytes, partial: bool, which: str) -> None:
    if proto == b"TCP4":
        if not _ipv4_ok(value, partial):
            raise ProxyProtocolError(f"PROXY v1: bad TCP4 {which} address {value!r}")
        return
    ok = _IPV6_CHARS.match(value) is not None and len(value) <= _IPV6_MAX_TEXT
    if ok and not partial:
        try:
            ipaddress.IPv6Address(value.decode("ascii"))
        except ValueError:
            ok = False
    if not ok:
        raise ProxyProtocolError(f"PROXY v1: bad TCP6 {which} address {value!r}")


def _ipv4_ok(value: bytes, partial: bool) -> bool:
    """Dotted quad, no heading zeroes (§2.1); a valid prefix of one if partial."""
    parts = value.split(b".")
    if len(parts) > 4 or (not partial and len(parts) != 4):
        return False
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if not part:
            if last and partial:
                continue
            return False
        if not _decimal_ok(part, 255):
            return False
    return True


def _check_v1_port(value: bytes, partial: bool, which: str) -> None:
    if (partial and not value) or _decimal_ok(value, 65535):
        return
    raise ProxyProtocolError(f"PROXY v1: bad {which} port {value!r}")


def _decimal_ok(text: bytes, maximum: int) -> bool:
    """ASCII digits, no heading zero, at most ``maximum``.

    A prefix of a valid number passes too, which is what lets a partial field
    be checked with the same function (a prefix is never larger).
    """
    if not text or not text.isdigit() or len(text) > len(str(maximum)):
        return False
    if len(text) > 1 and text[0:1] == b"0":
        return False
    return int(text) <= maximum


# -- version 2 ---------------------------------------------------------------


def _check_ver_cmd(ver_cmd: int) -> None:
    if ver_cmd >> 4 != 2:
        raise ProxyProtocolError(f"PROXY v2: unsupported version {ver_cmd >> 4}")
    if ver_cmd & 0x0F not in (_CMD_LOCAL, _CMD_PROXY):
        raise ProxyProtocolError(f"PROXY v2: unknown command 0x{ver_cmd & 0x0F:x}")


def _check_family(fam: int, *, proxy: bool) -> None:
    """§2.2: unknown nibbles are always refused; PROXY needs a listed pair.

    LOCAL ignores the family, so any pair of known nibbles will do there.
    """
    if fam >> 4 > 0x3 or fam & 0x0F > 0x2 or (proxy and fam not in _V2_FAMILIES):
        raise ProxyProtocolError(f"PROXY v2: unknown address family/transport 0x{fam:02x}")


def _parse_v2(header: bytes) -> _Maker:
    """Decode a complete v2 header whose fixed part was already checked."""
    ver_cmd, fam = header[12], header[13]
    if ver_cmd & 0x0F == _CMD_LOCAL:
        # §2.2: "discard the protocol block including the family".
        name = _V2_FAMILIES.get(fam, ("UNSPEC", 0))[0]
        return _Maker(2, "LOCAL", name, None, None, _NO_TLVS)
    name, addr_len = _V2_FAMILIES[fam]
    source: Address | None = None
    destination: Address | None = None
    body = header[V2_FIXED_LENGTH:]
    if name in ("TCP4", "TCP6"):
        size = 4 if name == "TCP4" else 16
        src = ipaddress.ip_address(body[:size])
        dst = ipaddress.ip_address(body[size : 2 * size])
        sport, dport = struct.unpack_from("!HH", body, 2 * size)
        source, destination = (_format_ip(src), sport), (_format_ip(dst), dport)
    tlvs = _parse_tlvs(header, V2_FIXED_LENGTH + addr_len)
    return _Maker(2, "PROXY", name, source, destination, MappingProxyType(tlvs))


def _parse_tlvs(header: bytes, start: int) -> dict[int, bytes]:
    tlvs: dict[int, bytes] = {}
    crc_at: int | None = None
    pos, end = start, len(header)
    while pos < end:
        if end - pos < 3:
            raise ProxyProtocolError(f"PROXY v2: truncated TLV at byte {pos + 1}")
        kind = header[pos]
        (length,) = struct.unpack_from("!H", header, pos + 1)
        value_at = pos + 3
        if value_at + length > end:
            raise ProxyProtocolError(
                f"PROXY v2: TLV 0x{kind:02x} of {length} bytes overruns the header"
            )
        value = header[value_at : value_at + length]
        if kind == PP2_TYPE_NOOP:
            pass  # §2.2.4: padding, ignored
        elif kind in tlvs:
            raise ProxyProtocolError(f"PROXY v2: duplicate TLV 0x{kind:02x}")
        else:
            tlvs[kind] = value
            if kind == PP2_TYPE_CRC32C:
                if length != 4:
                    raise ProxyProtocolError(f"PROXY v2: CRC32C TLV must be 4 bytes, not {length}")
                crc_at = value_at
        pos = value_at + length
    if crc_at is not None:
        zeroed = header[:crc_at] + b"\x00\x00\x00\x00" + header[crc_at + 4 :]
        if crc32c(zeroed) != int.from_bytes(tlvs[PP2_TYPE_CRC32C], "big"):
            raise ProxyProtocolError("PROXY v2: CRC32C checksum mismatch")
    return tlvs


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE: Final = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as RFC 4960 Appendix B and §2.2.3 use it."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# -- sending -----------------------------------------------------------------


def _endpoint(address: Address, which: str) -> tuple[IPAddress, int]:
    host, port = address
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{which} host must be an IP address, not {host!r}") from None
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        raise ValueError(f"{which} port must be in [0, 65535], not {port!r}")
    return _unmap(ip), port


def _unmap(ip: IPAddress) -> IPAddress:
    """IPv4-mapped IPv6 as IPv4; IPv6 without its scope (it has no wire form)."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        return ipaddress.IPv6Address(ip.packed)
    return ip


def _same_family(src: IPAddress, dst: IPAddress) -> tuple[IPAddress, IPAddress]:
    """Both IPv4, or both IPv6 with IPv4 written IPv4-mapped."""
    if src.version == dst.version:
        return src, dst
    return _as_ipv6(src), _as_ipv6(dst)


def _as_ipv6(ip: IPAddress) -> ipaddress.IPv6Address:
    if isinstance(ip, ipaddress.IPv4Address):
        return ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + ip.packed)
    return ip


def build_v1(source: Address, destination: Address) -> bytes:
    """A v1 line naming ``source`` → ``destination`` (TCP4 or TCP6).

    Use :data:`V1_UNKNOWN` when the addresses are not known.
    """
    (src, sport), (dst, dport) = _endpoint(source, "source"), _endpoint(destination, "destination")
    src, dst = _same_family(src, dst)
    proto = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {proto} {_format_ip(src)} {_format_ip(dst)} {sport} {dport}\r\n".encode("ascii")


def build_v2(
    source: Address,
    destination: Address,
    tlvs: Mapping[int, bytes] | None = None,
    *,
    checksum: bool = False,
) -> bytes:
    """A v2 PROXY header naming ``source`` → ``destination`` (TCP4 or TCP6).

    ``tlvs`` are appended in the mapping's order.  ``checksum=True`` adds a
    CRC32C TLV last (ask for it that way, not through ``tlvs``).
    """
    (src, sport), (dst, dport) = _endpoint(source, "source"), _endpoint(destination, "destination")
    src, dst = _same_family(src, dst)
    fam = 0x11 if src.version == 4 else 0x21
    addresses = src.packed + dst.packed + struct.pack("!HH", sport, dport)
    return _assemble_v2(0x20 | _CMD_PROXY, fam, addresses, tlvs or {}, with_crc=checksum)


def build_v2_local() -> bytes:
    """A v2 LOCAL header (a health check: "use the real endpoints")."""
    return _assemble_v2(0x20 | _CMD_LOCAL, 0x00, b"", {}, with_crc=False)


def _assemble_v2(
    ver_cmd: int, fam: int, addresses: bytes, tlvs: Mapping[int, bytes], *, with_crc: bool
) -> bytes:
    parts = [addresses]
    for kind, value in tlvs.items():
        if isinstance(kind, bool) or not isinstance(kind, int) or not 0 <= kind <= 0xFF:
            raise ValueError(f"TLV type must be in [0, 255], not {kind!r}")
        if kind == PP2_TYPE_CRC32C:
            raise ValueError("pass checksum=True rather than a CRC32C TLV")
        value = bytes(value)
        if len(value) > 0xFFFF:
            raise ValueError(f"TLV 0x{kind:02x} value is longer than 65535 bytes")
        parts.append(struct.pack("!BH", kind, len(value)) + value)
    if with_crc:
        parts.append(struct.pack("!BH", PP2_TYPE_CRC32C, 4) + b"\x00\x00\x00\x00")
    body = b"".join(parts)
    if len(body) > 0xFFFF:
        raise ValueError("PROXY v2 header would exceed 65535 bytes after the fixed part")
    header = V2_SIGNATURE + struct.pack("!BBH", ver_cmd, fam, len(body)) + body
    if with_crc:
        header = header[:-4] + crc32c(header).to_bytes(4, "big")
    return header


# -- trust -------------------------------------------------------------------


def is_trusted(peer: str, networks: Iterable[IPNetwork]) -> bool:
    """Whether the connection's real peer ``peer`` is in one of ``networks``.

    An IPv4-mapped IPv6 peer (a dual-stack listener's view of an IPv4 client)
    is matched as IPv4; a scope (``%eth0``) is ignored.  Not an IP: False.
    """
    try:
        ip = _unmap(ipaddress.ip_address(peer))
    except ValueError:
        return False
    return any(ip in network for network in networks)


def looks_like_header(data: bytes) -> bool:
    """Whether a peer's first bytes start a PROXY header (§2.2's test).

    For peers *not* allowed to send one: their header is refused rather than
    handed to the POP3 session as a strange command.
    """
    return data.startswith(b"PROXY") or data.startswith(V2_SIGNATURE)
