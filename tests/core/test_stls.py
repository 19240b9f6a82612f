"""STLS in the core: popguard's own, never forwarded (RFC 2595, CVE-2011-0411)."""

from __future__ import annotations

from popguard.core.session import ProxySession

GREETING = b"+OK ready\r\n"
CAPA = b"+OK\r\nTOP\r\nUSER\r\nSTLS\r\nSASL PLAIN\r\n.\r\n"


def started(**kwargs: bool) -> ProxySession:
    session = ProxySession(client="192.0.2.7:1", listener="l", **kwargs)
    session.receive_server(GREETING)
    session.take_client_output()
    return session


def test_capa_lists_popguards_stls_not_the_upstreams() -> None:
    for stls, expected in ((True, b"TOP\r\nUSER\r\nSASL PLAIN\r\nSTLS\r\n.\r\n"),
                           (False, b"TOP\r\nUSER\r\nSASL PLAIN\r\n.\r\n")):  # fmt: skip
        session = started(stls=stls)
        session.receive_client(b"CAPA\r\n")
        session.receive_server(CAPA)
        assert session.take_client_output() == b"+OK\r\n" + expected


def test_stls_is_answered_locally_and_discards_what_follows() -> None:
    for chunking in ("whole", "bytewise"):
        session = started(stls=True)
        data = b"STLS\r\nUSER evil\r\n"
        chunks = [data] if chunking == "whole" else [data[i : i + 1] for i in range(len(data))]
        for chunk in chunks:
            session.receive_client(chunk)
        assert session.take_client_output() == b"+OK Begin TLS negotiation\r\n"
        assert session.take_upstream_output() == b""
        assert session.starttls_pending
        assert not session.wants_client_data
        session.tls_started(tls_version="TLSv1.3")
        assert session.client_tls
        session.receive_client(b"CAPA\r\n")
        assert session.take_upstream_output() == b"CAPA\r\n"  # USER evil is gone
        session.receive_server(CAPA)
        assert b"STLS" not in session.take_client_output()  # not again under TLS
        records = session.take_records()
        assert records[-1].event.value == "tls.established"
        (rejected,) = [r for r in records if r.event.value == "command.rejected"]
        assert str(rejected["reason"]).startswith("11 octets pipelined after STLS discarded")


def test_stls_without_tls_configured_is_refused() -> None:
    session = started()
    session.receive_client(b"STLS\r\n")
    assert session.take_client_output() == b"-ERR STLS is not available through this proxy\r\n"
    assert not session.starttls_pending


def test_stls_twice_is_refused() -> None:
    session = started(stls=True)
    session.receive_client(b"STLS\r\n")
    session.tls_started()
    session.take_client_output()
    session.receive_client(b"STLS\r\n")
    assert session.take_client_output() == b"-ERR Already using TLS\r\n"
