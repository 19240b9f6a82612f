"""TLS settings as data: what the config holds, what popguard.shell.tls builds contexts from.

Only data (no ``ssl`` contexts, no trio), so the configuration can hold TLS
settings without importing the shell; :mod:`popguard.shell.tls` re-exports
these names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

ListenerTLSMode = Literal["none", "implicit", "starttls"]
UpstreamTLSMode = Literal["none", "implicit", "starttls"]
TLSVersionName = Literal["TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"]

#: The TLS versions by name, oldest first.
VERSION_NAMES: Final[tuple[TLSVersionName, ...]] = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")
#: Both sides' minimum unless configured (TLS 1.0 and 1.1: RFC 8996).
DEFAULT_MIN_VERSION: Final = "TLSv1.2"


@dataclass(frozen=True, slots=True)
class CertKey:
    cert: str
    key: str


@dataclass(frozen=True, slots=True)
class ListenerTLS:
    """TLS toward clients on one listener."""

    mode: ListenerTLSMode = "none"
    #: The default certificate and key (PEM files).
    cert: CertKey | None = None
    #: Other certificates by server name (SNI), e.g. ``mail.example.org``.
    sni: Mapping[str, CertKey] = field(default_factory=dict)
    min_version: TLSVersionName = DEFAULT_MIN_VERSION


@dataclass(frozen=True, slots=True)
class UpstreamTLS:
    """TLS toward the upstream server."""

    mode: UpstreamTLSMode = "none"
    #: CA bundle to verify the server with; None: the system's store.
    ca_file: str | None = None
    #: The name to verify and send as SNI; None: the upstream host.
    server_name: str | None = None
    #: False skips certificate and name checks (an explicit, logged opt-in).
    verify: bool = True
    #: TLSv1 or TLSv1.1 only for legacy servers (an explicit, logged opt-in).
    min_version: TLSVersionName = DEFAULT_MIN_VERSION
