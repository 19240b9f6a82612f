"""TLS settings and SSL contexts, for clients (POP3S, STLS) and the upstream.

Defaults follow Python's ``ssl.create_default_context`` (the "secure
default": no SSLv3, no compression, forward-secret AEAD ciphers first) with
TLS 1.2 as the minimum on both sides.  Toward clients, ALPN offers only
``pop3`` (RFC 8314 §7, the ALPACA cross-protocol attack).

Python's ``ssl`` module cannot see the protocols a client offers, so a
client that offers ALPN without ``pop3`` is not refused (OpenSSL then
simply selects no protocol); the audit record shows ``alpn: null``.

Contexts are built from files once, and again by :meth:`TLSContexts.reload`
(SIGHUP): a session keeps the context it started its handshake with, new
handshakes use the new one.  A reload that fails keeps the old contexts.
"""

from __future__ import annotations

import ipaddress
import ssl
import weakref
from collections.abc import Mapping
from typing import Final

import trio

# The settings are data (popguard.schema.tlsdata), re-exported here.
from popguard.schema.tlsdata import CertKey as CertKey
from popguard.schema.tlsdata import ListenerTLS as ListenerTLS
from popguard.schema.tlsdata import ListenerTLSMode as ListenerTLSMode
from popguard.schema.tlsdata import TLSVersionName as TLSVersionName
from popguard.schema.tlsdata import UpstreamTLS as UpstreamTLS
from popguard.schema.tlsdata import UpstreamTLSMode as UpstreamTLSMode
from popguard.shell.tlssock import TLSSocketStream, record_sni

VERSIONS: Final[Mapping[str, ssl.TLSVersion]] = {
    "TLSv1": ssl.TLSVersion.TLSv1,
    "TLSv1.1": ssl.TLSVersion.TLSv1_1,
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}

#: The server name of each per-name (``sni:``) server context.
_SNI_CONTEXTS: weakref.WeakKeyDictionary[ssl.SSLContext, str] = weakref.WeakKeyDictionary()

#: How long a TLS handshake may take, on either side.
HANDSHAKE_TIMEOUT: Final = 10.0


def server_context(tls: ListenerTLS) -> ssl.SSLContext:
    """The context for a listener: its certificate, SNI, ALPN ``pop3``."""
    assert tls.cert is not None
    context = _server_base(tls, tls.cert)
    by_name = {name.lower(): _server_base(tls, pair) for name, pair in tls.sni.items()}
    for name, chosen in by_name.items():
        _SNI_CONTEXTS[chosen] = name

    def choose(sock: ssl.SSLSocket | ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
        if name:
            record_sni(sock, name)  # for the record
            chosen = by_name.get(name.lower())
            if chosen is not None:
                sock.context = chosen

    context.sni_callback = choose
    return context


def _server_base(tls: ListenerTLS, pair: CertKey) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = VERSIONS[tls.min_version]
    context.load_cert_chain(pair.cert, pair.key)
    context.set_alpn_protocols(["pop3"])
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    return context


def client_context(tls: UpstreamTLS) -> ssl.SSLContext:
    """The context for connections to the upstream."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_file)
    context.minimum_version = VERSIONS[tls.min_version]
    if tls.min_version in ("TLSv1", "TLSv1.1"):
        # OpenSSL's default security level 2 refuses the SHA-1 MACs that
        # TLS 1.0/1.1 need; the operator asked for a legacy server.
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    if not tls.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.options |= ssl.OP_NO_COMPRESSION
    return context


def legacy_warnings(tls: UpstreamTLS) -> list[str]:
    """What an operator opted into that weakens the upstream link."""
    warnings = []
    if tls.mode != "none" and not tls.verify:
        warnings.append("upstream TLS certificate verification is OFF (upstream.tls_verify)")
    if tls.mode != "none" and tls.min_version in ("TLSv1", "TLSv1.1"):
        warnings.append(f"upstream TLS allows {tls.min_version} (upstream.tls_min_version)")
    return warnings


def describe(stream: TLSSocketStream | trio.SSLStream[trio.abc.Stream]) -> dict[str, str | None]:
    """Version, cipher, SNI and ALPN of an established TLS stream.

    The SNI toward clients is the name the client sent; a ``trio.SSLStream``
    (only over non-TCP transports, such as the tests' memory streams) keeps
    its ``SSLObject`` private, so there it is known only when the name chose
    one of the listener's ``sni:`` certificates.
    """
    cipher = stream.cipher()
    sni: str | None
    if isinstance(stream, TLSSocketStream):
        sni = stream.sni
    elif stream.server_side:
        sni = _SNI_CONTEXTS.get(stream.context)
    else:
        sni = stream.server_hostname
    if not stream.server_side and isinstance(sni, str) and _is_ip(sni):
        sni = None  # no SNI is sent for an address (RFC 6066 §3)
    return {
        "tls_version": stream.version(),
        "cipher": cipher[0] if cipher else None,
        "sni": sni if isinstance(sni, str) else None,
        "alpn": stream.selected_alpn_protocol(),
    }


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class TLSContexts:
    """The SSL contexts in use, rebuilt from their files on reload."""

    def __init__(self, listeners: Mapping[str, ListenerTLS], upstream: UpstreamTLS | None) -> None:
        self._listener_settings = dict(listeners)
        self._upstream_settings = upstream
        self.listeners: dict[str, ssl.SSLContext] = {}
        self.upstream: ssl.SSLContext | None = None
        self._build()

    def _build(self) -> None:
        listeners = {
            name: server_context(tls)
            for name, tls in self._listener_settings.items()
            if tls.mode != "none"
        }
        upstream = None
        if self._upstream_settings is not None and self._upstream_settings.mode != "none":
            upstream = client_context(self._upstream_settings)
        self.listeners, self.upstream = listeners, upstream

    def reload(self) -> None:
        """Read the certificates and keys again; raises (keeping the old) on error."""
        self._build()
