"""Certificates for ``--tls-compare``.

popguard's POP3S listener gets a certificate for ``localhost`` and
``127.0.0.1`` from a throw-away CA made with trustme (ECDSA P-256, like the
self-signed certificate :class:`popguard.testing.dovecot.DovecotInstance`
makes for Dovecot).  The bench clients trust one bundle holding both: that
CA and Dovecot's certificate, and check the name ``localhost``, so DIRECT
and THROUGH clients verify the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench.procs import BenchError
from bench.target import TlsSpec

#: The name both certificates carry (Dovecot's: CN and DNS SAN ``localhost``,
#: IP SANs 127.0.0.1 and ::1), sent as SNI and checked.
SERVER_NAME = "localhost"


@dataclass(frozen=True)
class ListenerPki:
    cert: Path  # popguard's certificate chain (leaf, then the CA)
    key: Path
    clients_ca: Path  # the trustme CA and Dovecot's certificate
    client_spec: TlsSpec


def make_listener_pki(directory: Path, dovecot_cert: Path) -> ListenerPki:
    """Write popguard's certificate and key and the clients' CA bundle into ``directory``."""
    try:
        import trustme
    except ImportError as exc:  # a dev dependency: pip install -e '.[dev]'
        raise BenchError("--tls-compare needs trustme (pip install trustme)") from exc
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_unit_name="popguard bench")
    leaf = ca.issue_cert(SERVER_NAME, "127.0.0.1")
    cert, key = directory / "popguard-cert.pem", directory / "popguard-key.pem"
    leaf.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)
    with cert.open("wb") as out:
        for blob in leaf.cert_chain_pems:
            out.write(blob.bytes())
    bundle = directory / "clients-ca.pem"
    bundle.write_bytes(ca.cert_pem.bytes() + Path(dovecot_cert).read_bytes())
    return ListenerPki(cert, key, bundle, TlsSpec(cafile=str(bundle), server_name=SERVER_NAME))
