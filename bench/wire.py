"""A blocking raw-socket POP3 client, built to cost as little as possible.

poplib reads a reply line by line through a buffered file; at hundreds of
MB/s that is the bottleneck, and it would hide the proxy's cost.  This
client works in lock step (one command, then its whole reply), so the end
of a reply is always at the end of the bytes received so far:

* a single-line reply is complete when the data ends with CRLF;
* a multi-line reply is complete when the data ends with CRLF "." CRLF.
  After dot-stuffing that sequence cannot occur inside a body (RFC 1939
  §3), so checking the last five bytes of each read is exact.

The fast reader receives into one preallocated buffer (``recv_into``) and
keeps nothing but a byte count (and optionally a running hash, to check
that popguard relays the exact bytes Dovecot sends).

Every function takes a ``(host, port)`` or a :class:`bench.target.Target`;
a target with TLS gets an :class:`ssl.SSLSocket` (implicit TLS, POP3S),
which reads at most one TLS record (16 KiB) per ``recv_into``.
"""

from __future__ import annotations

import contextlib
import socket
import time
from typing import Any

from bench.procs import BenchError
from bench.target import Address, Target, as_target, tls_description

TERMINATOR = b"\r\n.\r\n"
_TLEN = len(TERMINATOR)


class PopClient:
    """One POP3 session over a blocking socket, plaintext or implicit TLS."""

    def __init__(
        self,
        address: Target | Address,
        *,
        nodelay: bool = True,
        timeout: float = 30.0,
        recv_size: int = 1 << 20,
    ) -> None:
        self.target = as_target(address)
        self.address = self.target.address
        self.sock: socket.socket = self.target.connect(timeout=timeout, nodelay=nodelay)
        #: "TLSv1.3 TLS_AES_256_GCM_SHA384", or "" in plaintext.
        self.tls = tls_description(self.sock)
        self._buf = bytearray(recv_size)
        self._view = memoryview(self._buf)
        self.greeting = self.read_status()

    # -- single-line replies -------------------------------------------------
    def read_status(self) -> bytes:
        sock = self.sock
        data = sock.recv(4096)
        while not data.endswith(b"\r\n"):
            if not data or len(data) > 65536:
                raise BenchError(f"bad or missing status line from {self.address}: {data[:80]!r}")
            more = sock.recv(4096)
            if not more:
                raise BenchError(f"connection closed by {self.address} mid-line")
            data += more
        if not data.startswith(b"+OK"):
            raise BenchError(f"{self.address} answered {data[:120]!r}")
        return data

    def command(self, line: bytes) -> bytes:
        self.sock.sendall(line)
        return self.read_status()

    def login(self, user: str, password: str) -> None:
        self.command(f"USER {user}\r\n".encode())
        self.command(f"PASS {password}\r\n".encode())

    # -- multi-line replies --------------------------------------------------
    def read_multiline_fast(self, digest: Any = None) -> int:
        """Read one multi-line reply into the reused buffer; return its size on the wire."""
        sock = self.sock
        buf = self._buf
        view = self._view
        n = sock.recv_into(view)
        if n == 0:
            raise BenchError(f"connection closed by {self.address} before a reply")
        if buf[0] != 0x2B:  # "+"
            raise BenchError(f"{self.address} answered {bytes(buf[: min(n, 120)])!r}")
        total = n
        tail = b""
        while True:
            if digest is not None:
                digest.update(view[:n])
            if n >= _TLEN:
                if buf[n - _TLEN : n] == TERMINATOR:
                    return total
                tail = bytes(buf[n - _TLEN : n])
            else:
                tail = (tail + bytes(buf[:n]))[-_TLEN:]
                if tail == TERMINATOR:
                    return total
            n = sock.recv_into(view)
            if n == 0:
                raise BenchError(f"connection closed by {self.address} mid-reply")
            total += n

    def read_multiline_plain(self, recv_size: int = 8192) -> bytes:
        """Read one multi-line reply the way a plain client does: recv(8 KiB), join."""
        sock = self.sock
        chunks: list[bytes] = []
        tail = b""
        while True:
            chunk = sock.recv(recv_size)
            if not chunk:
                raise BenchError(f"connection closed by {self.address} mid-reply")
            if not chunks and not chunk.startswith(b"+"):
                raise BenchError(f"{self.address} answered {chunk[:120]!r}")
            chunks.append(chunk)
            tail = (tail + chunk[-_TLEN:])[-_TLEN:]
            if tail == TERMINATOR:
                return b"".join(chunks)

    def quit(self) -> None:
        with contextlib.suppress(OSError, BenchError):
            self.command(b"QUIT\r\n")
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> PopClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the measured loops ----------------------------------------------------------


def bulk_retr(
    address: Target | Address,
    user: str,
    password: str,
    count: int,
    *,
    nodelay: bool = True,
    fast: bool = True,
    digest: Any = None,
    time_limit: float = 120.0,
) -> dict[str, Any]:
    """RETR 1..count in one session; bytes on the wire, seconds, per-message stalls."""
    client = PopClient(address, nodelay=nodelay)
    try:
        client.login(user, password)
        sock = client.sock
        per_message: list[float] = []
        total = 0
        clock = time.perf_counter
        started = clock()
        deadline = started + time_limit
        for number in range(1, count + 1):
            t0 = clock()
            sock.sendall(b"RETR %d\r\n" % number)
            if fast:
                total += client.read_multiline_fast(digest)
            else:
                total += len(client.read_multiline_plain())
            t1 = clock()
            per_message.append(t1 - t0)
            if t1 > deadline:
                raise BenchError(f"bulk RETR exceeded {time_limit:g} s after {number} messages")
        elapsed = clock() - started
        client.quit()
    finally:
        client.close()
    per_message.sort()
    return {
        "tls": client.tls,
        "bytes": total,
        "seconds": elapsed,
        "messages": count,
        "mb_per_s": total / elapsed / 1e6,
        "msg_p50_ms": per_message[len(per_message) // 2] * 1e3,
        "msg_max_ms": per_message[-1] * 1e3,
        "stalls_over_20ms": sum(1 for t in per_message if t > 0.020),
    }


def ping_pong(
    address: Target | Address,
    user: str,
    password: str,
    count: int,
    *,
    time_limit: float = 120.0,
    client: PopClient | None = None,
) -> dict[str, Any]:
    """``count`` sequential NOOPs in one authenticated session."""
    own = client is None
    if client is None:
        client = PopClient(address, nodelay=True)
        client.login(user, password)
    try:
        sock = client.sock
        read = client.read_status
        clock = time.perf_counter_ns
        samples = [0] * count
        started = clock()
        deadline = started + int(time_limit * 1e9)
        for i in range(count):
            t0 = clock()
            sock.sendall(b"NOOP\r\n")
            read()
            t1 = clock()
            samples[i] = t1 - t0
            if t1 > deadline:
                raise BenchError(f"ping-pong exceeded {time_limit:g} s after {i + 1} NOOPs")
        elapsed = (clock() - started) / 1e9
        if own:
            client.quit()
    finally:
        if own:
            client.close()
    samples.sort()
    return {
        "tls": client.tls,
        "round_trips": count,
        "seconds": elapsed,
        "rt_per_s": count / elapsed,
        "p50_us": samples[count // 2] / 1e3,
        "p99_us": samples[min(count - 1, (count * 99) // 100)] / 1e3,
        "max_us": samples[-1] / 1e3,
    }
