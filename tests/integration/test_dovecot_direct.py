"""Smoke tests straight against the private Dovecot: no proxy involved.

They prove the fixtures (and the real clients the proxy tests rely on)
work, and pin down the upstream behaviour the proxy must pass through.
"""

from __future__ import annotations

import os
import poplib
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

from popguard.testing.dovecot import DovecotInstance, stored_form, wire_form

TIMEOUT = 30


@pytest.fixture(autouse=True)
def _allow_long_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    # poplib refuses lines over 2048 bytes; the samples carry a 10,000-byte line.
    monkeypatch.setattr(poplib, "_MAXLINE", 1 << 20)


def _login(dovecot: DovecotInstance, user: str, password: str) -> poplib.POP3:
    pop = poplib.POP3(dovecot.host, dovecot.port, timeout=TIMEOUT)
    pop.user(user)
    pop.pass_(password)
    return pop


def _retr(pop: poplib.POP3, which: int) -> bytes:
    """RETR through poplib (which un-stuffs dots), as CRLF-terminated bytes."""
    _resp, lines, _octets = pop.retr(which)
    return b"".join(line + b"\r\n" for line in lines)


def _read_until(sock: socket.socket, terminator: bytes) -> bytes:
    buf = b""
    while not buf.endswith(terminator):
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed early; got {buf[-200:]!r}")
        buf += chunk
    return buf


def _wait_for_log(dovecot: DovecotInstance, pattern: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(pattern, dovecot.log_text())
        if match:
            return match.group(0)
        time.sleep(0.05)
    raise AssertionError(f"{pattern!r} not in Dovecot's log:\n{dovecot.log_text()[-3000:]}")


def test_samples_cover_the_tricky_cases(make_messages):
    messages = make_messages()
    blob = b"".join(messages)
    assert b"\r\n.\r\n" in blob  # a lone dot line, stuffed as ".." on the wire
    assert any(m.endswith(b"\r\n.\r\n") for m in messages)
    assert any(len(line) >= 10_000 for m in messages for line in m.split(b"\r\n"))
    assert any(byte >= 0x80 for byte in blob)
    assert make_messages(3, seed=7) == make_messages(3, seed=7)
    assert make_messages(3, seed=7) != make_messages(3, seed=8)


def test_greeting_and_capabilities(dovecot):
    pop = poplib.POP3(dovecot.host, dovecot.port, timeout=TIMEOUT)
    try:
        welcome = pop.getwelcome()
        # "+OK Dovecot (Debian) ready. <pid.n.hex.base64@host>": an APOP timestamp.
        assert re.fullmatch(rb"\+OK .*<[^<>@\s]+@[^<>\s]+>", welcome), welcome
        assert dovecot.greeting.startswith("+OK")
        capa = pop.capa()
        assert {"USER", "UIDL", "TOP", "PIPELINING", "RESP-CODES"} <= capa.keys()
        assert set(capa["SASL"]) >= {"PLAIN", "LOGIN", "CRAM-MD5"}
        assert "STLS" not in capa  # TLS is off by default
    finally:
        pop.quit()


def test_user_pass_stat_list_retr(dovecot, mailbox, make_messages):
    messages = make_messages()
    user, password, maildir = mailbox(messages)
    assert maildir == dovecot.maildir(user)
    assert {"cur", "new", "tmp"} <= {p.name for p in maildir.iterdir()}
    pop = _login(dovecot, user, password)
    try:
        count, size = pop.stat()
        assert count == len(messages)
        assert size == sum(len(wire_form(m)) for m in messages)
        _resp, listing, _ = pop.list()
        assert listing == [b"%d %d" % (i, len(m)) for i, m in enumerate(messages, 1)]
        for i, original in enumerate(messages, 1):
            assert _retr(pop, i) == original
    finally:
        pop.quit()
    # RETR only marks messages \Seen (a rename in cur/): nothing is lost.
    assert dovecot.maildir_messages(user) == [stored_form(m) for m in messages]


def test_lf_input_is_stored_with_lf_and_served_with_crlf(dovecot, mailbox):
    lf = b"Subject: lf\n\nline one\n.\n..two\n"
    user, password, _ = mailbox([lf])
    assert dovecot.maildir_messages(user) == [lf]
    name = next((dovecot.maildir(user) / "cur").iterdir()).name
    wire_size = len(lf) + lf.count(b"\n")
    assert name.endswith(f",S={len(lf)},W={wire_size}:2,")
    pop = _login(dovecot, user, password)
    try:
        assert _retr(pop, 1) == wire_form(lf) == lf.replace(b"\n", b"\r\n")
    finally:
        pop.quit()


def test_dot_stuffing_on_the_wire(dovecot, mailbox, make_messages):
    messages = make_messages()
    user, password, _ = mailbox(messages)
    with socket.create_connection(dovecot.address, timeout=TIMEOUT) as sock:
        assert _read_until(sock, b"\r\n").startswith(b"+OK")
        sock.sendall(f"USER {user}\r\nPASS {password}\r\n".encode())
        assert _read_until(sock, b"\r\n").startswith(b"+OK")
        assert _read_until(sock, b"\r\n").startswith(b"+OK")
        for i, original in enumerate(messages, 1):
            sock.sendall(b"RETR %d\r\n" % i)
            raw = _read_until(sock, b"\r\n.\r\n")
            status, _, body = raw.partition(b"\r\n")
            assert status == b"+OK %d octets" % len(original)
            stuffed = re.sub(rb"(?m)^\.", b"..", original)
            assert body == stuffed + b".\r\n"
        sock.sendall(b"QUIT\r\n")
        assert _read_until(sock, b"\r\n").startswith(b"+OK")


def test_apop_login(dovecot, mailbox, make_messages):
    messages = make_messages(2, seed=3)
    user, password, _ = mailbox(messages)
    pop = poplib.POP3(dovecot.host, dovecot.port, timeout=TIMEOUT)
    try:
        assert pop.apop(user, password).startswith(b"+OK")
        assert pop.stat()[0] == 2
        assert _retr(pop, 2) == messages[1]
    finally:
        pop.quit()


def test_wrong_password_is_refused(dovecot, mailbox):
    user, _password, _ = mailbox([])
    pop = poplib.POP3(dovecot.host, dovecot.port, timeout=TIMEOUT)
    try:
        pop.user(user)
        with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\]"):
            pop.pass_("not-the-password")
    finally:
        pop.close()


def test_curl_retrieves_message_1(dovecot, mailbox, make_messages, require_tool):
    curl = require_tool("curl")
    messages = make_messages()
    user, password, _ = mailbox(messages)
    base = f"pop3://{user}:{password}@{dovecot.host}:{dovecot.port}/"
    got = subprocess.run(
        [curl, "--silent", "--show-error", "--max-time", "20", base + "1"],
        capture_output=True,
        timeout=TIMEOUT,
        check=True,
    )
    # curl un-stuffs dots and keeps CRLF: the bytes are the message as sent.
    assert got.stdout == messages[0]
    listing = subprocess.run(
        [curl, "--silent", "--show-error", "--max-time", "20", base],
        capture_output=True,
        timeout=TIMEOUT,
        check=True,
    )
    assert listing.stdout == b"".join(b"%d %d\r\n" % (i, len(m)) for i, m in enumerate(messages, 1))


def test_fetchmail_retrieves_all_messages(dovecot, mailbox, make_messages, require_tool, tmp_path):
    fetchmail = require_tool("fetchmail")
    # fetchmail 6.4 breaks lines longer than ~8 kB (it splits them and adds
    # stray bytes), so leave the 10,000-byte line out of this one.
    messages = [m for m in make_messages(10, seed=5) if b"[long]" not in m]
    user, password, _ = mailbox(messages)
    home = tmp_path / "home"
    out = tmp_path / "out"
    home.mkdir()
    out.mkdir()
    mda = tmp_path / "mda.sh"
    # One file per message, numbered in delivery order.
    mda.write_text(f'#!/bin/sh\nn=$(ls "{out}" | wc -l)\nexec cat > "{out}/$(printf %04d "$n")"\n')
    mda.chmod(0o755)
    rc = tmp_path / "fetchmailrc"
    rc.touch(mode=0o600)
    rc.write_text(
        f"poll {dovecot.host} protocol pop3 port {dovecot.port}\n"
        f'  user "{user}" there with password "{password}"\n'
    )
    proc = subprocess.run(
        [
            fetchmail,
            "--fetchmailrc",
            str(rc),
            "--nosyslog",
            "--nodetach",
            "--sslproto",
            "",  # do not try STLS
            "--keep",
            "--all",
            "--invisible",  # no Received: header of its own
            "--norewrite",
            "--verbose",
            "--mda",
            str(mda),
        ],
        capture_output=True,
        timeout=60,
        env={**os.environ, "HOME": str(home)},
        check=False,
    )
    assert proc.returncode == 0, proc.stdout.decode(errors="replace") + proc.stderr.decode(
        errors="replace"
    )
    delivered = [p.read_bytes() for p in sorted(out.iterdir())]
    # fetchmail hands messages to the MDA with LF line endings.
    assert delivered == [stored_form(m) for m in messages]
    # --keep: everything is still on the server.
    assert dovecot.maildir_messages(user) == [stored_form(m) for m in messages]


def test_dele_then_quit_expunges(dovecot, mailbox, make_messages):
    messages = make_messages(4, seed=11)
    user, password, _ = mailbox(messages)
    pop = _login(dovecot, user, password)
    pop.dele(2)
    assert pop.quit().startswith(b"+OK")
    remaining = dovecot.maildir_messages(user)
    assert remaining == [stored_form(m) for i, m in enumerate(messages) if i != 1]


def test_dele_without_quit_keeps_the_message(dovecot, mailbox, make_messages):
    messages = make_messages(4, seed=12)
    user, password, _ = mailbox(messages)
    pop = _login(dovecot, user, password)
    assert pop.dele(2).startswith(b"+OK")
    assert pop.stat()[0] == 3  # hidden in this session...
    pop.close()  # ...but the socket closes without QUIT: no UPDATE state
    _wait_for_log(dovecot, rf"pop3\({re.escape(user)}\)<[^>]*><[^>]*>: Info: Disconnected: .*")
    assert dovecot.maildir_messages(user) == [stored_form(m) for m in messages]


def test_each_mailbox_is_fresh(dovecot, mailbox):
    first = mailbox([b"Subject: a\r\n\r\na\r\n"])
    second = mailbox([b"Subject: b\r\n\r\nb\r\n"])
    assert first.user != second.user
    assert first.maildir != second.maildir
    assert dovecot.maildir_messages(first.user) == [b"Subject: a\n\na\n"]
    assert Path(first.maildir).parent == Path(second.maildir).parent
