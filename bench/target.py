"""Where a bench client connects, and whether it speaks TLS there.

A :class:`Target` is an address plus, for POP3S, a :class:`TlsSpec`: how
the client verifies the server (a CA file and the name to check).  Both are
small frozen dataclasses, so they cross to the swarm's worker processes as
they are; each process builds its :class:`ssl.SSLContext` once per spec
(:func:`client_context`).

The clients make a full handshake on every connection (no session
resumption), as a mail client polling every few minutes would: that is the
expensive case for the server side and for popguard.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from functools import lru_cache

Address = tuple[str, int]


@dataclass(frozen=True, slots=True)
class TlsSpec:
    """How a client checks the server: trust ``cafile``, expect ``server_name``.

    ``verify=False`` turns verification off (the benchmark never does; it is
    there for trying a server whose certificate is at hand nowhere).
    """

    cafile: str | None = None
    server_name: str = "localhost"
    verify: bool = True


@lru_cache(maxsize=8)
def client_context(spec: TlsSpec) -> ssl.SSLContext:
    """One client context per spec and process (loading the CA file is not free)."""
    ctx = ssl.create_default_context(cafile=spec.cafile)
    if not spec.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


@dataclass(frozen=True, slots=True)
class Target:
    """``host:port``, plaintext or implicit TLS (POP3S) when ``tls`` is set."""

    host: str
    port: int
    tls: TlsSpec | None = None

    @property
    def address(self) -> Address:
        return (self.host, self.port)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}{' (TLS)' if self.tls else ''}"

    def connect(self, *, timeout: float = 30.0, nodelay: bool = True) -> socket.socket:
        """A connected blocking socket; for TLS, with the handshake done."""
        sock = socket.create_connection(self.address, timeout=timeout)
        # Python sockets start with Nagle on; set it explicitly either way.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1 if nodelay else 0)
        if self.tls is None:
            return sock
        try:
            return client_context(self.tls).wrap_socket(sock, server_hostname=self.tls.server_name)
        except BaseException:
            sock.close()
            raise


def as_target(where: Target | Address) -> Target:
    """A :class:`Target` for a plain ``(host, port)`` too."""
    if isinstance(where, Target):
        return where
    host, port = where
    return Target(host, port)


def tls_description(sock: socket.socket) -> str:
    """'TLSv1.3 TLS_AES_256_GCM_SHA384' for a TLS socket, '' for a plain one."""
    if not isinstance(sock, ssl.SSLSocket):
        return ""
    cipher = sock.cipher()
    return f"{sock.version()} {cipher[0] if cipher else '?'}"
