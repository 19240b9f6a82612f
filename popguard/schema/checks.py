"""The checks behind the schema's values: addresses, TLS files, names.

Each ``*_problem`` function returns why a value is unusable (a message in
popguard's words), or None; the models of :mod:`.config_models` call them
from their validators, and so do the command-line flags.
"""

from __future__ import annotations

import ipaddress
import math
import re
import ssl
from dataclasses import dataclass
from typing import Final, Literal

#: Longest certificate, key or CA file read (a CA bundle is ~250 KiB).
_MAX_PEM_FILE: Final = 16 << 20


@dataclass(frozen=True, slots=True)
class Address:
    """A TCP endpoint.  ``host`` holds IPv6 literals without brackets."""

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)\Z")


def check_host_name(host: str) -> str | None:
    """Return why *host* is not a valid IPv4 literal or DNS name, or None."""
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        pass
    else:
        return None
    name = host[:-1] if host.endswith(".") else host
    if not name or len(name) > 253:
        return f"invalid host name {host!r}"
    labels = name.split(".")
    if not all(_LABEL.match(label) for label in labels):
        return f"invalid host name {host!r}"
    if labels[-1].isdigit():
        # RFC 3696 §2: a top-level domain is never all-numeric, so this was
        # meant as an IPv4 address.
        return f"invalid IPv4 address {host!r}"
    return None


def parse_address(text: str) -> Address:
    """Parse ``host:port``; IPv6 literals go in brackets: ``[::1]:110``.

    The host may be an IPv4 literal, a bracketed IPv6 literal or a DNS name.
    Raises :class:`ValueError` with a message that quotes *text*.
    """
    what = f"invalid address {text!r}"
    if not text:
        raise ValueError("empty address: expected HOST:PORT, e.g. 127.0.0.1:110")
    if text != text.strip():
        raise ValueError(f"{what}: leading or trailing whitespace")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{what}: missing ']' after the IPv6 address")
        host, rest = text[1:end], text[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(
                f"{what}: {host!r} is not an IPv6 address (brackets are only for IPv6)"
            ) from None
        if not rest.startswith(":"):
            raise ValueError(f"{what}: missing port after ']' (expected [IPV6]:PORT)")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"{what}: missing port (expected HOST:PORT)")
        if ":" in host:
            raise ValueError(f"{what}: IPv6 addresses must be written in brackets, e.g. [::1]:110")
        if not host:
            raise ValueError(f"{what}: missing host (expected HOST:PORT)")
        problem = check_host_name(host)
        if problem is not None:
            raise ValueError(f"{what}: {problem}")
    if not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"{what}: the port must be a number from 1 to 65535")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"{what}: port {port} is out of range 1-65535")
    return Address(host, port)


def parse_listen_address(text: str) -> Address:
    """Like :func:`parse_address`, but the host must be an IP literal or localhost.

    A listener binds, so a DNS name (which may resolve to anything) is refused.
    """
    if text.startswith("*:"):
        raise ValueError(
            f"invalid listen address {text!r}: use 0.0.0.0 (all IPv4 addresses) "
            "or [::] (all IPv6 addresses) instead of '*'"
        )
    address = parse_address(text)
    if address.host.lower() == "localhost":
        return Address("localhost", address.port)
    try:
        ipaddress.ip_address(address.host)
    except ValueError:
        raise ValueError(
            f"invalid listen address {text!r}: the host must be a literal IP address "
            "or 'localhost', not a host name"
        ) from None
    return address


def address_key(address: Address) -> tuple[str, int]:
    """A comparison key under which equal IP literals written differently match."""
    try:
        return (str(ipaddress.ip_address(address.host)), address.port)
    except ValueError:
        return (address.host.lower(), address.port)


_PEM_CERT = b"-----BEGIN CERTIFICATE-----"
_PEM_KEY = re.compile(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")

VERIFY_OFF: Final = (
    "certificate verification is off: anyone on the path can read the mail and passwords"
)


class _EncryptedKey(Exception):
    """Raised by the password callback: the key wants a passphrase."""


def _no_password() -> bytes:
    raise _EncryptedKey


def _read_file(path: str) -> tuple[bytes | None, str | None]:
    """The file's first bytes, or why it cannot be read."""
    try:
        with open(path, "rb") as stream:
            return stream.read(_MAX_PEM_FILE), None
    except OSError as exc:
        return None, f"cannot read {path}: {exc.strerror or exc}"


def cert_key_problem(cert: str, key: str) -> tuple[Literal["cert", "key"], str] | None:
    """Why *cert* and *key* would not load as a server's pair, and which is at fault.

    Both must be readable PEM files (they may be the same file), the key not
    encrypted, and the key must match the certificate.
    """
    cert_data, problem = _read_file(cert)
    if problem is not None:
        return ("cert", problem)
    key_data, problem = _read_file(key)
    if problem is not None:
        return ("key", problem)
    assert cert_data is not None
    assert key_data is not None
    if _PEM_CERT not in cert_data:
        return ("cert", f"{cert} holds no PEM certificate ('{_PEM_CERT.decode()}')")
    if not _PEM_KEY.search(key_data):
        return ("key", f"{key} holds no PEM private key ('-----BEGIN ... PRIVATE KEY-----')")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except _EncryptedKey:
        return (
            "key",
            f"{key} is encrypted (it needs a passphrase): popguard reads unencrypted keys; "
            f"decrypt it with: openssl pkey -in {key} -out NEW.key",
        )
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            return ("cert", f"the certificate {cert} does not match the key {key}")
        return ("cert", f"cannot load the certificate {cert} with the key {key}: {exc}")
    except OSError as exc:  # pragma: no cover - read just above
        return ("cert", f"cannot load the certificate {cert}: {exc.strerror or exc}")
    return None


def ca_file_problem(path: str) -> str | None:
    """Why *path* is not a usable CA bundle (PEM certificates), or None."""
    _, problem = _read_file(path)
    if problem is not None:
        return problem
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        if exc.reason == "NO_CERTIFICATE_OR_CRL_FOUND":
            return f"{path} holds no PEM certificate ('{_PEM_CERT.decode()}')"
        return f"cannot load CA certificates from {path}: {exc}"
    except OSError as exc:  # pragma: no cover - read just above
        return f"cannot read {path}: {exc.strerror or exc}"
    return None


def server_name_problem(name: str) -> str | None:
    """Why *name* cannot be the upstream's TLS server name, or None."""
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return check_host_name(name)
    return None


def sni_name_problem(name: str) -> str | None:
    """Why *name* can never arrive as a client's SNI host name, or None."""
    if name.startswith("*"):
        return (
            f"wildcard {name!r} is not supported: SNI names are matched exactly; "
            "list each name (a wildcard certificate may serve several)"
        )
    try:
        ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        return f"{name!r} is an IP address: SNI never carries one (RFC 6066 §3)"
    if name.endswith("."):
        return f"write {name!r} without the trailing dot (RFC 6066 §3)"
    return check_host_name(name)


def identity_problem(name: str, text: str) -> str | None:
    """Why an ``identity:`` string is unusable, or None."""
    if not text:
        if name == "allowed_chars":
            return "empty: no name could log in (null accepts any printable character)"
        return "empty (use null for none)"
    if not text.isascii() or not text.isprintable() or " " in text:
        return "printable ASCII without spaces expected"
    if name == "master_separator" and len(text) != 1:
        return f"one character expected (Dovecot's auth_master_user_separator), got {text!r}"
    if name == "default_domain" and "@" in text:
        return f"a domain without '@' expected, got {text!r}"
    return None


def seconds_problem(value: float, *, allow_zero: bool) -> str | None:
    if not math.isfinite(value):
        return f"must be a finite number of seconds, got {value}"
    if allow_zero and value < 0:
        return f"must be at least 0 seconds, got {value:g}"
    if not allow_zero and value <= 0:
        return f"must be greater than 0 seconds, got {value:g}"
    return None
