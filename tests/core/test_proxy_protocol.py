"""The PROXY protocol, v1 and v2 (popguard.core.proxy_protocol).

Pure unit tests: no HAProxy, no sockets.  Every valid header is fed whole,
one byte at a time and split at every point, with POP3 bytes behind it; every
malformed one must raise ProxyProtocolError, at the first byte that gives it
away where the format allows.
"""

from __future__ import annotations

import ast
import ipaddress
import itertools
import pathlib
import re
import struct
from collections.abc import Iterator, Sequence

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from popguard.core import proxy_protocol as pp
from popguard.core.proxy_protocol import (
    DEFAULT_MAX_V2_HEADER,
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    PP2_TYPE_CRC32C,
    PP2_TYPE_NOOP,
    PP2_TYPE_SSL,
    PP2_TYPE_UNIQUE_ID,
    V1_MAX_LENGTH,
    V1_UNKNOWN,
    V2_SIGNATURE,
    ProxyHeaderParser,
    ProxyProtocolError,
    ProxyResult,
    build_v1,
    build_v2,
    build_v2_local,
    crc32c,
    is_trusted,
    looks_like_header,
)

#: What a POP3 client might have pipelined behind the header.
TRAILER = b"CAPA\r\nUSER alice\r\n"


# -- helpers -----------------------------------------------------------------


def run(
    chunks: Sequence[bytes], parser: ProxyHeaderParser | None = None
) -> tuple[ProxyResult, bytes]:
    """Feed ``chunks`` until a result; return it and every byte after the header.

    Asserts the invariants of an incomplete header on the way: nothing is
    answered early, and every byte fed so far is held (and within the cap).
    """
    parser = parser or ProxyHeaderParser()
    fed = 0
    for i, chunk in enumerate(chunks):
        result = parser.feed(chunk)
        if result is not None:
            rest = b"".join(chunks[i + 1 :])
            return result, result.remainder + rest
        fed += len(chunk)
        assert parser.buffered == fed
        assert parser.buffered <= parser.max_header
    raise AssertionError("header never completed")


def splits(data: bytes) -> Iterator[list[bytes]]:
    """Whole, one byte at a time, and in two pieces at every point."""
    yield [data]
    yield [data[i : i + 1] for i in range(len(data))]
    for cut in range(1, len(data)):
        yield [data[:cut], data[cut:]]


def assert_parses(header: bytes, trailer: bytes = TRAILER, **kwargs: object) -> ProxyResult:
    """Every way of feeding ``header + trailer`` gives the same exact result."""
    results = []
    for chunks in splits(header + trailer):
        result, after = run(chunks, ProxyHeaderParser(**kwargs))  # type: ignore[arg-type]
        assert result.raw == header
        assert after == trailer
        results.append(result)
    whole = results[0]
    assert whole.remainder == trailer
    for other in results[1:]:
        assert (other.version, other.command, other.protocol) == (
            whole.version,
            whole.command,
            whole.protocol,
        )
        assert (other.source, other.destination, dict(other.tlvs)) == (
            whole.source,
            whole.destination,
            dict(whole.tlvs),
        )
    return whole


def assert_rejected(data: bytes, reason: str, **kwargs: object) -> None:
    """Whole or byte by byte, ``data`` is refused, with ``reason`` in the message."""
    with pytest.raises(ProxyProtocolError, match=re.escape(reason)):
        ProxyHeaderParser(**kwargs).feed(data)  # type: ignore[arg-type]
    parser = ProxyHeaderParser(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ProxyProtocolError):
        feed_bytewise_to_eof(parser, data)


def feed_bytewise_to_eof(parser: ProxyHeaderParser, data: bytes) -> None:
    for i in range(len(data)):
        assert parser.feed(data[i : i + 1]) is None
    parser.eof()


def v2(ver_cmd: int, fam: int, body: bytes) -> bytes:
    return V2_SIGNATURE + struct.pack("!BBH", ver_cmd, fam, len(body)) + body


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


IPV4_BLOCK = bytes([192, 168, 0, 1, 192, 168, 0, 11]) + struct.pack("!HH", 56324, 443)
IPV6_BLOCK = (
    ipaddress.IPv6Address("2001:db8::1").packed
    + ipaddress.IPv6Address("2001:db8::2").packed
    + struct.pack("!HH", 1, 110)
)


# -- version 1: valid --------------------------------------------------------

V1_VALID = [
    # §2.1's example, and its maximum lengths.
    (
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
        "TCP4",
        ("192.168.0.1", 56324),
        ("192.168.0.11", 443),
    ),
    (
        b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
        "TCP4",
        ("255.255.255.255", 65535),
        ("255.255.255.255", 65535),
    ),
    (b"PROXY TCP4 0.0.0.0 10.0.0.1 0 110\r\n", "TCP4", ("0.0.0.0", 0), ("10.0.0.1", 110)),
    (
        b"PROXY TCP6 "
        + b":".join([b"ffff"] * 8)
        + b" "
        + b":".join([b"ffff"] * 8)
        + b" 65535 65535\r\n",
        "TCP6",
        ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
        ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
    ),
    (b"PROXY TCP6 2001:db8::1 ::1 40000 995\r\n", "TCP6", ("2001:db8::1", 40000), ("::1", 995)),
    # Upper case is allowed; the result is canonical.
    (
        b"PROXY TCP6 2001:DB8:0:0:0:0:0:A :: 1 2\r\n",
        "TCP6",
        ("2001:db8::a", 1),
        ("::", 2),
    ),
    # inet_ntop writes IPv4-mapped addresses this way.
    (
        b"PROXY TCP6 ::ffff:10.1.2.3 ::ffff:10.0.0.1 5 110\r\n",
        "TCP6",
        ("::ffff:10.1.2.3", 5),
        ("::ffff:10.0.0.1", 110),
    ),
    (b"PROXY UNKNOWN\r\n", "UNKNOWN", None, None),
    # "the receiver must ignore anything presented before the CRLF"
    (
        b"PROXY UNKNOWN "
        + b":".join([b"ffff"] * 8)
        + b" "
        + b":".join([b"ffff"] * 8)
        + b" 65535 65535\r\n",
        "UNKNOWN",
        None,
        None,
    ),
    (b"PROXY UNKNOWN \r\n", "UNKNOWN", None, None),
    (b"PROXY UNKNOWN whatever \x00\xff goes\r\n", "UNKNOWN", None, None),
]


@pytest.mark.parametrize(("line", "protocol", "source", "destination"), V1_VALID)
def test_v1_valid(
    line: bytes, protocol: str, source: tuple[str, int] | None, destination: tuple[str, int] | None
) -> None:
    result = assert_parses(line)
    assert result.version == 1
    assert result.command == "PROXY"
    assert result.protocol == protocol
    assert result.source == source
    assert result.destination == destination
    assert result.relayed is (source is not None)
    assert result.tlvs == {}


def test_v1_maximum_lengths() -> None:
    """§2.1: 56, 104 and 107 characters."""
    assert len(V1_VALID[1][0]) == 56
    assert len(V1_VALID[3][0]) == 104
    assert len(V1_VALID[8][0]) == V1_MAX_LENGTH == 107


def test_v1_spec_example_with_the_request_behind_it() -> None:
    data = (
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
        b"GET / HTTP/1.1\r\nHost: 192.168.0.11\r\n\r\n"
    )
    result = ProxyHeaderParser().feed(data)
    assert result is not None
    assert result.remainder == b"GET / HTTP/1.1\r\nHost: 192.168.0.11\r\n\r\n"


def test_v1_remainder_may_start_with_crlf_bytes() -> None:
    result = assert_parses(b"PROXY UNKNOWN\r\n", b"\r\n\r\nPROXY TCP4\r\n")
    assert result.remainder == b"\r\n\r\nPROXY TCP4\r\n"


def test_v1_large_remainder_is_passed_on_not_buffered() -> None:
    header = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"
    body = b"x" * 1_000_000
    result = ProxyHeaderParser().feed(header + body)
    assert result is not None
    assert result.raw == header
    assert result.remainder == body


# -- version 1: malformed ----------------------------------------------------

V1_MALFORMED = [
    (b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "first byte is 0x70"),
    (b"PROXY\r\n", "must start with 'PROXY '"),
    (b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "unknown protocol b''"),
    (b"PROXY \r\n", "unknown protocol"),
    (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "unknown protocol b'TCP5'"),
    (b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n", "unknown protocol"),
    (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "unknown protocol"),
    (b"PROXY UNKNOWNX\r\n", "unknown protocol"),
    (b"PROXY TCP4\r\n", "after 0 of 4"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "after 3 of 4"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "too many fields"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "too many fields"),
    (b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "bad TCP4 source address b''"),
    (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "bad TCP4 destination address b''"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8  1 2\r\n", "bad source port b''"),
    # Line endings: CRLF only.
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "bare LF"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n", "bare CR"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rx", "bare CR"),
    (b"PROXY UNKNOWN junk\nmore\r\n", "bare LF"),
    (b"PROXY UNKNOWN junk\rmore\r\n", "bare CR"),
    (b"PROXY UNKNOWN\r\r\n", "bare CR"),
    # Dotted quads: four decimal numbers in [0, 255], no heading zero.
    (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "bad TCP4 source address"),
    (b"PROXY TCP4 1.2.3.04 5.6.7.8 1 2\r\n", "bad TCP4 source address"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.00 1 2\r\n", "bad TCP4 destination address"),
    (b"PROXY TCP4 256.2.3.4 5.6.7.8 1 2\r\n", "bad TCP4 source address"),
    (b"PROXY TCP4 1.2.3.4.5 5.6.7.8 1 2\r\n", "bad TCP4 source address"),
    (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "bad TCP4 source address"),
    (b"PROXY TCP4 1..3.4 5.6.7.8 1 2\r\n", "bad TCP4 source address"),
    (b"PROXY TCP4 .1.2.3 5.6.7.8 1 2\r\n", "bad TCP4 source address"),
    (b"PROXY TCP4 1.2.3.4. 5.6.7.8 1 2\r\n", "bad TCP4 source address"),
    (b"PROXY TCP4 1.2.3.+4 5.6.7.8 1 2\r\n", "bad TCP4 source address"),
    (b"PROXY TCP4 1.2.3.\xd9\xa4 5.6.7.8 1 2\r\n", "bad TCP4 source address"),
    (b"PROXY TCP4 0x7f.0.0.1 5.6.7.8 1 2\r\n", "bad TCP4 source address"),
    # Families must match the protocol.
    (b"PROXY TCP4 ::1 ::1 1 2\r\n", "bad TCP4 source address"),
    (b"PROXY TCP4 1.2.3.4 ::1 1 2\r\n", "bad TCP4 destination address"),
    (b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n", "bad TCP6 source address"),
    (b"PROXY TCP6 ::1 5.6.7.8 1 2\r\n", "bad TCP6 destination address"),
    # IPv6 text.
    (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "bad TCP6 source address"),
    (b"PROXY TCP6 12345::1 ::1 1 2\r\n", "bad TCP6 source address"),
    (b"PROXY TCP6 1::2::3 ::1 1 2\r\n", "bad TCP6 source address"),
    (b"PROXY TCP6 ::: ::1 1 2\r\n", "bad TCP6 source address"),
    (b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n", "bad TCP6 source address"),
    (b"PROXY TCP6 [::1] ::1 1 2\r\n", "bad TCP6 source address"),
    (b"PROXY TCP6 ::ffff:1.2.3.04 ::1 1 2\r\n", "bad TCP6 source address"),
    # Ports: decimal in [0, 65535], no heading zero.
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 080 2\r\n", "bad source port b'080'"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 00\r\n", "bad destination port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "bad source port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "bad source port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", "bad source port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1a 2\r\n", "bad source port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 100000 2\r\n", "bad source port"),
    # §2.1: no CRLF within 107 bytes.
    (b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n", "no CRLF within 107 bytes"),
    (b"PROXY UNKNOWN " + b"x" * 200, "no CRLF within 107 bytes"),
]


@pytest.mark.parametrize(("data", "reason"), V1_MALFORMED)
def test_v1_malformed(data: bytes, reason: str) -> None:
    assert_rejected(data, reason)


def test_v1_line_of_108_bytes_is_refused_but_107_accepted() -> None:
    ok = b"PROXY UNKNOWN " + b"x" * 91 + b"\r\n"
    assert len(ok) == 107
    assert_parses(ok)
    assert_rejected(b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n", "no CRLF within 107 bytes")


# -- early detection ---------------------------------------------------------

#: (accepted prefix, the byte that gives the header away, reason)
EARLY = [
    (b"", b"U", "no PROXY header: first byte is 0x55"),  # USER: a client without header
    (b"", b"\x16", "first byte is 0x16"),  # a TLS ClientHello
    (b"", b"\x00", "first byte is 0x00"),
    (b"PRO", b"Z", "must start with 'PROXY '"),
    (b"PROXY", b"\t", "must start with 'PROXY '"),
    (b"PROXY TCP", b"5", "unknown protocol"),
    (b"PROXY U", b"D", "unknown protocol"),
    (b"PROXY UNKNOWN", b"X", "unknown protocol"),
    (b"PROXY UNKNOWN junk", b"\n", "bare LF"),
    (b"PROXY UNKNOWN junk\r", b"x", "bare CR"),
    (b"PROXY TCP4", b"\r", "after 0 of 4"),
    (b"PROXY TCP4 ", b" ", "bad TCP4 source address b''"),
    (b"PROXY TCP4 ", b":", "bad TCP4 source address"),
    (b"PROXY TCP4 0", b"1", "bad TCP4 source address b'01'"),
    (b"PROXY TCP4 1.2.3.25", b"6", "bad TCP4 source address b'1.2.3.256'"),
    (b"PROXY TCP4 1.2.3.4", b".", "bad TCP4 source address"),
    (b"PROXY TCP4 1.2.3", b" ", "bad TCP4 source address b'1.2.3'"),
    (b"PROXY TCP4 1.2.3.4", b"\r", "after 1 of 4"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 6553", b"6", "bad source port b'65536'"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 0", b"8", "bad source port b'08'"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2", b" ", "too many fields"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2", b"\n", "bare LF"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r", b"\r", "bare CR"),
    (b"PROXY TCP6 ", b"g", "bad TCP6 source address"),
    (b"PROXY TCP6 ", b"%", "bad TCP6 source address"),
    (b"PROXY TCP6 1.2.3.4", b" ", "bad TCP6 source address b'1.2.3.4'"),
    (b"PROXY TCP6 " + b"1" * 45, b"1", "bad TCP6 source address"),
    # v2: the signature byte by byte, then the version, command, family, length.
    (b"\r", b"\r", "bad signature at byte 2"),
    (V2_SIGNATURE[:4], b"\x01", "bad signature at byte 5"),
    (V2_SIGNATURE[:11], b"\r", "bad signature at byte 12"),
    (V2_SIGNATURE, b"\x11", "unsupported version 1"),
    (V2_SIGNATURE, b"\x31", "unsupported version 3"),
    (V2_SIGNATURE, b"\x22", "unknown command 0x2"),
    (V2_SIGNATURE, b"\x2f", "unknown command 0xf"),
    (V2_SIGNATURE + b"\x21", b"\x13", "unknown address family/transport 0x13"),
    (V2_SIGNATURE + b"\x21", b"\x41", "unknown address family/transport 0x41"),
    (V2_SIGNATURE + b"\x21", b"\x01", "unknown address family/transport 0x01"),
    (V2_SIGNATURE + b"\x21", b"\x10", "unknown address family/transport 0x10"),
    (V2_SIGNATURE + b"\x20", b"\x41", "unknown address family/transport 0x41"),
    (V2_SIGNATURE + b"\x20", b"\x03", "unknown address family/transport 0x03"),
    (V2_SIGNATURE + b"\x21\x11\x00", b"\x0b", "TCP4 needs 12 address bytes, length says 11"),
    (V2_SIGNATURE + b"\x21\x21\x00", b"\x0c", "TCP6 needs 36 address bytes"),
    (V2_SIGNATURE + b"\x21\x31\x00", b"\xd7", "UNIX_STREAM needs 216 address bytes"),
    (V2_SIGNATURE + b"\x21\x11\x0f", b"\xf1", "header of 4097 bytes exceeds the 4096-byte limit"),
    (V2_SIGNATURE + b"\x20\x00\xff", b"\xff", "exceeds the 4096-byte limit"),
]


@pytest.mark.parametrize(("prefix", "byte", "reason"), EARLY)
def test_detected_at_the_first_bad_byte(prefix: bytes, byte: bytes, reason: str) -> None:
    parser = ProxyHeaderParser()
    for i in range(len(prefix)):
        assert parser.feed(prefix[i : i + 1]) is None
    with pytest.raises(ProxyProtocolError, match=re.escape(reason)) as caught:
        parser.feed(byte)
    assert caught.value.reason == str(caught.value)
    # Sticky: the parser keeps refusing, and holds nothing.
    assert parser.done
    assert parser.buffered == 0
    with pytest.raises(ProxyProtocolError, match=re.escape(reason)):
        parser.feed(b"PROXY UNKNOWN\r\n")


def test_a_silent_client_is_only_noticed_by_the_shells_timer() -> None:
    """A POP3 client waits for the greeting: no bytes, no decision."""
    parser = ProxyHeaderParser()
    assert parser.feed(b"") is None
    assert not parser.done
    assert pp.MIN_HEADER_TIMEOUT >= 3


# -- version 2: valid --------------------------------------------------------


def test_v2_spec_layout_tcp4_by_hand() -> None:
    header = V2_SIGNATURE + b"\x21\x11\x00\x0c" + IPV4_BLOCK
    result = assert_parses(header)
    assert result.version == 2
    assert result.command == "PROXY"
    assert result.protocol == "TCP4"
    assert result.source == ("192.168.0.1", 56324)
    assert result.destination == ("192.168.0.11", 443)
    assert result.tlvs == {}
    assert result.relayed


def test_v2_tcp6() -> None:
    result = assert_parses(v2(0x21, 0x21, IPV6_BLOCK))
    assert result.protocol == "TCP6"
    assert result.source == ("2001:db8::1", 1)
    assert result.destination == ("2001:db8::2", 110)


def test_v2_tcp6_ipv4_mapped_is_written_dotted() -> None:
    block = (
        ipaddress.IPv6Address("::ffff:10.0.0.7").packed
        + ipaddress.IPv6Address("::1").packed
        + struct.pack("!HH", 7, 110)
    )
    result = assert_parses(v2(0x21, 0x21, block))
    assert result.source == ("::ffff:10.0.0.7", 7)


def test_v2_tlvs() -> None:
    ssl = bytes([0x01]) + struct.pack("!I", 0) + tlv(0x21, b"TLSv1.3") + tlv(0x23, b"TLS_AES")
    tlvs = (
        tlv(PP2_TYPE_ALPN, b"pop3")
        + tlv(PP2_TYPE_AUTHORITY, b"mail.example.com")
        + tlv(PP2_TYPE_UNIQUE_ID, b"\x00" * 128)
        + tlv(PP2_TYPE_SSL, ssl)
        + tlv(0xEA, b"\x01vpce-0123")  # AWS NLB: custom range
        + tlv(0xE0, b"")  # empty value
    )
    result = assert_parses(v2(0x21, 0x11, IPV4_BLOCK + tlvs))
    assert result.source == ("192.168.0.1", 56324)
    assert result.tlvs == {
        PP2_TYPE_ALPN: b"pop3",
        PP2_TYPE_AUTHORITY: b"mail.example.com",
        PP2_TYPE_UNIQUE_ID: b"\x00" * 128,
        PP2_TYPE_SSL: ssl,
        0xEA: b"\x01vpce-0123",
        0xE0: b"",
    }
    assert list(result.tlvs) == [
        PP2_TYPE_ALPN,
        PP2_TYPE_AUTHORITY,
        PP2_TYPE_UNIQUE_ID,
        0x20,
        0xEA,
        0xE0,
    ]


def test_v2_noop_tlvs_are_padding() -> None:
    tlvs = tlv(PP2_TYPE_NOOP, b"") + tlv(PP2_TYPE_AUTHORITY, b"a") + tlv(PP2_TYPE_NOOP, b"\x00" * 5)
    result = assert_parses(v2(0x21, 0x21, IPV6_BLOCK + tlvs))
    assert result.tlvs == {PP2_TYPE_AUTHORITY: b"a"}


def test_v2_crc32c_is_verified() -> None:
    body = IPV4_BLOCK + tlv(PP2_TYPE_AUTHORITY, b"x") + tlv(PP2_TYPE_CRC32C, b"\x00" * 4)
    zeroed = v2(0x21, 0x11, body)
    header = zeroed[:-4] + crc32c(zeroed).to_bytes(4, "big")
    result = assert_parses(header)
    assert result.tlvs[PP2_TYPE_CRC32C] == header[-4:]
    # The checksum TLV need not be last.
    body = IPV4_BLOCK + tlv(PP2_TYPE_CRC32C, b"\x00" * 4) + tlv(PP2_TYPE_AUTHORITY, b"x")
    zeroed = v2(0x21, 0x11, body)
    at = 16 + 12 + 3
    header = zeroed[:at] + crc32c(zeroed).to_bytes(4, "big") + zeroed[at + 4 :]
    assert_parses(header)


def test_v2_local() -> None:
    header = build_v2_local()
    assert header == V2_SIGNATURE + b"\x20\x00\x00\x00"
    result = assert_parses(header)
    assert (result.version, result.command, result.protocol) == (2, "LOCAL", "UNSPEC")
    assert result.source is None
    assert result.destination is None
    assert not result.relayed


@pytest.mark.parametrize(
    "header",
    [
        # §2.2: "must not assume zero is presented for LOCAL connections";
        # the block, family included, is discarded unread.
        v2(0x20, 0x11, IPV4_BLOCK),
        v2(0x20, 0x11, b""),
        v2(0x20, 0x21, b"\xff" * 7),
        v2(0x20, 0x00, b"not even TLVs"),
        v2(0x20, 0x01, b""),  # unlisted pair, known nibbles: LOCAL ignores it
        v2(0x20, 0x00, b"\x00" * (DEFAULT_MAX_V2_HEADER - 16)),
    ],
)
def test_v2_local_discards_the_block(header: bytes) -> None:
    result = assert_parses(header)
    assert result.command == "LOCAL"
    assert result.source is None
    assert result.tlvs == {}


@pytest.mark.parametrize(
    ("fam", "body", "protocol"),
    [
        (0x00, b"", "UNSPEC"),
        (0x12, IPV4_BLOCK, "UDP4"),
        (0x22, IPV6_BLOCK, "UDP6"),
        (0x31, b"/run/a".ljust(108, b"\x00") + b"/run/b".ljust(108, b"\x00"), "UNIX_STREAM"),
        (0x32, b"\x00" * 216, "UNIX_DGRAM"),
    ],
)
def test_v2_families_popguard_falls_back_to_unspec_for(
    fam: int, body: bytes, protocol: str
) -> None:
    """§2.2: a receiver "falls back to the UNSPEC mode" for what it does not use."""
    header = v2(0x21, fam, body + tlv(PP2_TYPE_AUTHORITY, b"host"))
    result = assert_parses(header)
    assert (result.command, result.protocol) == ("PROXY", protocol)
    assert result.source is None
    assert result.destination is None
    assert result.tlvs == {PP2_TYPE_AUTHORITY: b"host"}


def test_v2_header_exactly_at_the_cap() -> None:
    padding = DEFAULT_MAX_V2_HEADER - 16 - 12 - 3
    header = v2(0x21, 0x11, IPV4_BLOCK + tlv(PP2_TYPE_NOOP, b"\x00" * padding))
    assert len(header) == DEFAULT_MAX_V2_HEADER
    assert ProxyHeaderParser().feed(header) is not None
    too_big = v2(0x21, 0x11, IPV4_BLOCK + tlv(PP2_TYPE_NOOP, b"\x00" * (padding + 1)))
    assert_rejected(too_big, "exceeds the 4096-byte limit")


def test_v2_cap_is_configurable() -> None:
    big = v2(0x21, 0x11, IPV4_BLOCK + tlv(0xE1, b"v" * 10_000))
    assert_rejected(big, "exceeds the 4096-byte limit")
    result = ProxyHeaderParser(max_v2_header=20_000).feed(big)
    assert result is not None
    assert result.tlvs[0xE1] == b"v" * 10_000
    assert_rejected(
        v2(0x21, 0x11, IPV4_BLOCK + tlv(0xE1, b"v" * 300)), "232-byte", max_v2_header=232
    )


# -- version 2: malformed ----------------------------------------------------

V2_MALFORMED = [
    (v2(0x21, 0x11, IPV4_BLOCK + b"\x02\x00"), "truncated TLV at byte 29"),
    (v2(0x21, 0x11, IPV4_BLOCK + b"\x02"), "truncated TLV"),
    (v2(0x21, 0x11, IPV4_BLOCK + b"\x02\x00\x05abcd"), "TLV 0x02 of 5 bytes overruns the header"),
    (
        v2(0x21, 0x11, IPV4_BLOCK + tlv(PP2_TYPE_AUTHORITY, b"a") + b"\x01\x00\x01"),
        "TLV 0x01 of 1 bytes overruns",
    ),
    (
        v2(0x21, 0x11, IPV4_BLOCK + tlv(PP2_TYPE_AUTHORITY, b"a") + tlv(PP2_TYPE_AUTHORITY, b"b")),
        "duplicate TLV 0x02",
    ),
    (v2(0x21, 0x11, IPV4_BLOCK + tlv(PP2_TYPE_CRC32C, b"\x00" * 4)), "CRC32C checksum mismatch"),
    (v2(0x21, 0x11, IPV4_BLOCK + tlv(PP2_TYPE_CRC32C, b"\x00" * 3)), "CRC32C TLV must be 4 bytes"),
    (v2(0x21, 0x00, b"\x00\x00"), "truncated TLV"),
    (v2(0x21, 0x31, b"\x00" * 215), "UNIX_STREAM needs 216 address bytes, length says 215"),
    (v2(0x21, 0x11, b""), "TCP4 needs 12 address bytes, length says 0"),
]


@pytest.mark.parametrize(("data", "reason"), V2_MALFORMED)
def test_v2_malformed(data: bytes, reason: str) -> None:
    assert_rejected(data, reason)


def test_v2_crc_mismatch_after_a_single_bit_flip() -> None:
    header = build_v2(("10.0.0.1", 1), ("10.0.0.2", 110), {PP2_TYPE_AUTHORITY: b"a"}, checksum=True)
    assert ProxyHeaderParser().feed(header) is not None
    for at in range(16, len(header)):
        flipped = header[:at] + bytes([header[at] ^ 0x01]) + header[at + 1 :]
        with pytest.raises(ProxyProtocolError):
            ProxyHeaderParser().feed(flipped)


def test_truncated_header_at_eof() -> None:
    header = v2(0x21, 0x11, IPV4_BLOCK)
    parser = ProxyHeaderParser()
    assert parser.feed(header[:-1]) is None
    with pytest.raises(
        ProxyProtocolError, match="closed inside the PROXY v2 header after 27 bytes"
    ):
        parser.eof()
    parser = ProxyHeaderParser()
    assert parser.feed(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r") is None
    with pytest.raises(
        ProxyProtocolError, match="closed inside the PROXY v1 header after 31 bytes"
    ):
        parser.eof()
    with pytest.raises(ProxyProtocolError, match="before any PROXY header byte"):
        ProxyHeaderParser().eof()


# -- parser lifecycle and options --------------------------------------------


def test_feed_after_the_result_is_a_bug() -> None:
    parser = ProxyHeaderParser()
    assert parser.feed(V1_UNKNOWN) is not None
    assert parser.done
    assert parser.buffered == 0
    parser.eof()  # nothing to complain about
    with pytest.raises(RuntimeError):
        parser.feed(b"USER x\r\n")


def test_errors_are_sticky_through_eof() -> None:
    parser = ProxyHeaderParser()
    with pytest.raises(ProxyProtocolError, match="0x55"):
        parser.feed(b"USER")
    with pytest.raises(ProxyProtocolError, match="0x55"):
        parser.eof()


def test_versions_restrict_what_is_accepted() -> None:
    v1_line = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"
    v2_header = v2(0x21, 0x11, IPV4_BLOCK)
    only_v2 = ProxyHeaderParser(versions=[2])
    with pytest.raises(ProxyProtocolError, match=r"v1 .* not accepted"):
        only_v2.feed(b"P")
    assert ProxyHeaderParser(versions=[2]).feed(v2_header) is not None
    only_v1 = ProxyHeaderParser(versions=[1])
    with pytest.raises(ProxyProtocolError, match=r"v2 .* not accepted"):
        only_v1.feed(b"\r")
    assert ProxyHeaderParser(versions=[1]).feed(v1_line) is not None
    assert ProxyHeaderParser(versions=[1]).max_header == V1_MAX_LENGTH
    assert ProxyHeaderParser().max_header == DEFAULT_MAX_V2_HEADER


@pytest.mark.parametrize(
    "kwargs",
    [
        {"versions": []},
        {"versions": [3]},
        {"versions": [1, 3]},
        {"max_v2_header": 231},
        {"max_v2_header": 16 + 65536},
    ],
)
def test_bad_parser_options(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="must"):
        ProxyHeaderParser(**kwargs)  # type: ignore[arg-type]


# -- building ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "destination", "expected"),
    [
        (
            ("192.168.0.1", 56324),
            ("192.168.0.11", 443),
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
        ),
        (("2001:db8::1", 1), ("::1", 110), b"PROXY TCP6 2001:db8::1 ::1 1 110\r\n"),
        # Mixed families: the IPv4 side is written IPv4-mapped.
        (
            ("10.0.0.1", 1),
            ("2001:db8::2", 110),
            b"PROXY TCP6 ::ffff:10.0.0.1 2001:db8::2 1 110\r\n",
        ),
        (
            ("2001:db8::2", 1),
            ("10.0.0.1", 110),
            b"PROXY TCP6 2001:db8::2 ::ffff:10.0.0.1 1 110\r\n",
        ),
        # IPv4-mapped IPv6 (a dual-stack listener's view) counts as IPv4.
        (("::ffff:10.0.0.1", 1), ("10.0.0.2", 110), b"PROXY TCP4 10.0.0.1 10.0.0.2 1 110\r\n"),
        # A scope has no wire form.
        (("fe80::1%eth0", 1), ("fe80::2", 110), b"PROXY TCP6 fe80::1 fe80::2 1 110\r\n"),
        (
            ("0.0.0.0", 0),
            ("255.255.255.255", 65535),
            b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n",
        ),
    ],
)
def test_build_v1(source: tuple[str, int], destination: tuple[str, int], expected: bytes) -> None:
    assert build_v1(source, destination) == expected
    assert_parses(expected)


def test_build_v2_tcp4_matches_the_hand_made_header() -> None:
    assert build_v2(("192.168.0.1", 56324), ("192.168.0.11", 443)) == v2(0x21, 0x11, IPV4_BLOCK)
    assert build_v2(("2001:db8::1", 1), ("2001:db8::2", 110)) == v2(0x21, 0x21, IPV6_BLOCK)


def test_build_v2_mixed_families() -> None:
    header = build_v2(("10.0.0.1", 1), ("2001:db8::2", 110))
    assert header[13] == 0x21
    result = ProxyHeaderParser().feed(header)
    assert result is not None
    assert result.source == ("::ffff:10.0.0.1", 1)
    assert result.destination == ("2001:db8::2", 110)
    header = build_v2(("::ffff:10.0.0.1", 1), ("10.0.0.2", 110))
    assert header[13] == 0x11


def test_build_v2_tlvs_in_order_and_checksum_last() -> None:
    header = build_v2(
        ("10.0.0.1", 1),
        ("10.0.0.2", 110),
        {PP2_TYPE_UNIQUE_ID: b"id", PP2_TYPE_AUTHORITY: b"host"},
        checksum=True,
    )
    body = header[16 + 12 :]
    assert body[:5] == tlv(PP2_TYPE_UNIQUE_ID, b"id")
    assert body[5:12] == tlv(PP2_TYPE_AUTHORITY, b"host")
    assert body[12:15] == b"\x03\x00\x04"
    zeroed = header[:-4] + b"\x00" * 4
    assert int.from_bytes(header[-4:], "big") == crc32c(zeroed)
    result = assert_parses(header)
    assert result.tlvs[PP2_TYPE_AUTHORITY] == b"host"


@pytest.mark.parametrize(
    ("args", "kwargs", "reason"),
    [
        ((("localhost", 1), ("10.0.0.1", 2)), {}, "source host must be an IP address"),
        ((("10.0.0.1", 1), ("mail.example.com", 2)), {}, "destination host must be an IP"),
        ((("10.0.0.1", 65536), ("10.0.0.1", 2)), {}, "source port"),
        ((("10.0.0.1", -1), ("10.0.0.1", 2)), {}, "source port"),
        ((("10.0.0.1", 1), ("10.0.0.1", True)), {}, "destination port"),
        ((("10.0.0.1", 1), ("10.0.0.1", "110")), {}, "destination port"),
    ],
)
def test_build_refuses_bad_endpoints(
    args: tuple[object, ...], kwargs: dict[str, object], reason: str
) -> None:
    with pytest.raises(ValueError, match=reason):
        build_v1(*args)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=reason):
        build_v2(*args, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("tlvs", "reason"),
    [
        ({PP2_TYPE_CRC32C: b"\x00" * 4}, "checksum=True"),
        ({256: b""}, "TLV type must be in"),
        ({-1: b""}, "TLV type must be in"),
        ({0xE0: b"x" * 65536}, "longer than 65535"),
        ({0xE0: b"x" * 40000, 0xE1: b"x" * 40000}, "exceed 65535"),
    ],
)
def test_build_v2_refuses_bad_tlvs(tlvs: dict[int, bytes], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        build_v2(("10.0.0.1", 1), ("10.0.0.2", 2), tlvs)


# -- CRC32C ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"123456789", 0xE3069283),
        # RFC 3720 B.4 (the iSCSI examples RFC 4960 shares).
        (b"\x00" * 32, 0x8A9136AA),
        (b"\xff" * 32, 0x62A8AB43),
        (bytes(range(32)), 0x46DD794E),
        (bytes(range(31, -1, -1)), 0x113FDB5C),
        (b"", 0),
    ],
)
def test_crc32c_vectors(data: bytes, expected: int) -> None:
    assert crc32c(data) == expected


# -- trust helpers -----------------------------------------------------------

NETWORKS = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32")]


@pytest.mark.parametrize(
    ("peer", "trusted"),
    [
        ("10.1.2.3", True),
        ("11.0.0.1", False),
        ("::ffff:10.1.2.3", True),  # dual-stack listener
        ("::ffff:11.0.0.1", False),
        ("2001:db8::5", True),
        ("2001:db8::5%eth0", True),
        ("2001:db9::5", False),
        ("::1", False),
        ("not an address", False),
        ("", False),
    ],
)
def test_is_trusted(peer: str, trusted: bool) -> None:
    assert is_trusted(peer, NETWORKS) is trusted


def test_is_trusted_with_no_networks() -> None:
    assert not is_trusted("127.0.0.1", [])


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", True),
        (b"PROXY", True),
        (V2_SIGNATURE + b"\x21", True),
        (V2_SIGNATURE, True),
        (V2_SIGNATURE[:11], False),
        (b"PROX", False),
        (b"USER alice\r\n", False),
        (b"", False),
    ],
)
def test_looks_like_header(data: bytes, expected: bool) -> None:
    assert looks_like_header(data) is expected


def test_module_is_sans_io() -> None:
    path = pathlib.Path(pp.__file__)
    tree = ast.parse(path.read_text(), filename=str(path))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"trio", "socket", "ssl", "time", "asyncio", "select", "selectors"}


# -- properties --------------------------------------------------------------

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)
endpoints = st.tuples(st.one_of(ipv4, ipv6), ports)
tlv_maps = st.dictionaries(
    st.integers(0, 255).filter(lambda t: t not in (PP2_TYPE_CRC32C, PP2_TYPE_NOOP)),
    st.binary(max_size=64),
    max_size=6,
)


@st.composite
def chunked(draw: st.DrawFn, data: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    edges = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


def expected_address(host: str, port: int, other: str) -> tuple[str, int]:
    """What the parser reports for ``host`` after build_* normalised it."""
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    o = ipaddress.ip_address(other)
    if isinstance(o, ipaddress.IPv6Address) and o.ipv4_mapped is not None:
        o = o.ipv4_mapped
    if ip.version == 4 and o.version == 6:
        return f"::ffff:{ip}", port
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return f"::ffff:{ip.ipv4_mapped}", port
    return str(ip), port


@given(
    source=endpoints,
    destination=endpoints,
    tlvs=tlv_maps,
    checksum=st.booleans(),
    trailer=st.binary(max_size=64),
    data=st.data(),
)
@settings(max_examples=200, deadline=None)
def test_build_v2_round_trip(
    source: tuple[str, int],
    destination: tuple[str, int],
    tlvs: dict[int, bytes],
    checksum: bool,
    trailer: bytes,
    data: st.DataObject,
) -> None:
    header = build_v2(source, destination, tlvs, checksum=checksum)
    result, after = run(data.draw(chunked(header + trailer)))
    assert result.raw == header
    assert after == trailer
    assert (result.version, result.command) == (2, "PROXY")
    assert result.source == expected_address(*source, destination[0])
    assert result.destination == expected_address(*destination, source[0])
    expected_tlvs = dict(tlvs)
    if checksum:
        expected_tlvs[PP2_TYPE_CRC32C] = header[-4:]
    assert result.tlvs == expected_tlvs


@given(source=endpoints, destination=endpoints, trailer=st.binary(max_size=64), data=st.data())
@settings(max_examples=200, deadline=None)
@example(source=("0.0.0.0", 0), destination=("::", 0), trailer=b"", data=None)
def test_build_v1_round_trip(
    source: tuple[str, int],
    destination: tuple[str, int],
    trailer: bytes,
    data: st.DataObject | None,
) -> None:
    header = build_v1(source, destination)
    assert len(header) <= V1_MAX_LENGTH
    chunks = [header + trailer] if data is None else data.draw(chunked(header + trailer))
    result, after = run(chunks)
    assert result.raw == header
    assert after == trailer
    assert result.version == 1
    assert result.source == expected_address(*source, destination[0])
    assert result.destination == expected_address(*destination, source[0])


@given(source=endpoints, destination=endpoints, tlvs=tlv_maps, v1=st.booleans())
@settings(max_examples=200, deadline=None)
def test_every_proper_prefix_of_a_valid_header_needs_more(
    source: tuple[str, int], destination: tuple[str, int], tlvs: dict[int, bytes], v1: bool
) -> None:
    """Early detection never refuses a header that is merely incomplete."""
    header = build_v1(source, destination) if v1 else build_v2(source, destination, tlvs)
    parser = ProxyHeaderParser()
    for i in range(len(header) - 1):
        assert parser.feed(header[i : i + 1]) is None
    assert parser.feed(header[-1:]) is not None


PREFIXES = [
    b"",
    b"P",
    b"PROXY ",
    b"PROXY TCP4 ",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 ",
    b"PROXY TCP6 ",
    b"PROXY TCP6 ::1 ",
    b"PROXY UNKNOWN",
    V2_SIGNATURE,
    V2_SIGNATURE + b"\x21\x11",
    V2_SIGNATURE + b"\x21\x11\x00\x0c",
    V2_SIGNATURE + b"\x21\x21\x00",
    V2_SIGNATURE + b"\x20\x00",
]
ALPHABET = st.sampled_from(b"PROXY TCP46UNKW0123456789.:abcdef \r\n\x00\x0b\x0c\x11\x20\x21\xff")
noise = st.one_of(
    st.binary(max_size=200),
    st.lists(ALPHABET, max_size=120).map(bytes),
)


def outcome(chunks: Sequence[bytes]) -> tuple[str, object]:
    """Feed chunks; check the invariants; say what happened."""
    parser = ProxyHeaderParser()
    fed = b""
    for chunk in chunks:
        try:
            result = parser.feed(chunk)
        except ProxyProtocolError as exc:
            assert parser.buffered == 0
            return "error", str(exc)
        fed += chunk
        if result is not None:
            assert result.raw + result.remainder == fed
            assert len(result.raw) <= parser.max_header
            return "result", (
                result.version,
                result.command,
                result.protocol,
                result.source,
                result.destination,
                dict(result.tlvs),
                result.raw,
            )
        assert parser.buffered == len(fed) <= parser.max_header
    return "more", parser.buffered


@given(prefix=st.sampled_from(PREFIXES), tail=noise, data=st.data())
@settings(max_examples=500, deadline=None)
def test_any_bytes_parse_raise_or_need_more(
    prefix: bytes, tail: bytes, data: st.DataObject
) -> None:
    """Never another exception, never more than the cap held, and the same
    verdict however the bytes are split."""
    blob = prefix + tail
    whole = outcome([blob])
    split = outcome(data.draw(chunked(blob)))
    bytewise = outcome([blob[i : i + 1] for i in range(len(blob))])
    assert whole[0] == split[0] == bytewise[0]
    if whole[0] == "result":
        assert whole == split == bytewise


@given(
    header=st.one_of(
        st.builds(build_v2, endpoints, endpoints, tlv_maps, checksum=st.booleans()),
        st.builds(build_v1, endpoints, endpoints),
    ),
    at=st.integers(0, 10_000),
    value=st.integers(0, 255),
    data=st.data(),
)
@settings(max_examples=500, deadline=None)
def test_mutated_headers(header: bytes, at: int, value: int, data: st.DataObject) -> None:
    at %= len(header)
    blob = header[:at] + bytes([value]) + header[at + 1 :] + TRAILER
    whole = outcome([blob])
    split = outcome(data.draw(chunked(blob)))
    assert whole[0] == split[0]
    if whole[0] == "result":
        assert whole == split
