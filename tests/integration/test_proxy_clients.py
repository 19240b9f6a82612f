"""Real mail clients (curl, fetchmail) through an in-process popguard to Dovecot.

Each client also runs straight against Dovecot in the same test, and what
it got through popguard must be exactly what it got directly.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import subprocess
from pathlib import Path

import pytest
import trio

from popguard.testing.dovecot import stored_form

CLIENT_LIMIT = 60  # seconds any one client run may take


async def run(argv: list[str], *, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    with trio.fail_after(CLIENT_LIMIT):
        proc = await trio.run_process(
            argv, capture_stdout=True, capture_stderr=True, check=False, env=env
        )
    assert proc.returncode == 0, (
        f"{argv[0]} exited with {proc.returncode}:\n"
        + proc.stdout.decode(errors="replace")[-3000:]
        + proc.stderr.decode(errors="replace")[-3000:]
    )
    return proc


def numbers(messages) -> list[int]:
    """Message numbers from a record's ``messages`` field.

    The field holds plain numbers or, with message identity, one mapping per
    message (``{"msg": n, "uidl": ..., "size": ...}``); JSON makes tuples lists.
    """
    return [m["msg"] if isinstance(m, dict) else m for m in messages]


def sasl_responses(upstream_bytes: bytes) -> list[bytes]:
    """The lines a client sent in answer to SASL challenges (after AUTH/APOP)."""
    lines = upstream_bytes.split(b"\r\n")
    secrets = []
    for i, line in enumerate(lines):
        verb = line.split(b" ", 1)[0].upper()
        if verb == b"AUTH":
            secrets += [word for word in line.split(b" ")[2:] if word]
            # Every following line up to the next command is a SASL response.
            for following in lines[i + 1 :]:
                if following[:4].upper() in (b"STAT", b"LIST", b"RETR", b"UIDL", b"QUIT"):
                    break
                if following:
                    secrets.append(following)
        elif verb == b"APOP":
            secrets.append(line.split(b" ")[2])
        elif verb == b"PASS":
            secrets.append(line.split(b" ", 1)[1])
    for response in list(secrets):
        # A CRAM-MD5 response decodes to "user hexdigest": the digest is secret too.
        with contextlib.suppress(ValueError):
            decoded = base64.b64decode(response, validate=True)
            if re.fullmatch(rb"\S+ [0-9a-f]{32}", decoded):
                secrets.append(decoded.split(b" ")[1])
    return secrets


# -- curl ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("login_options", "mechanism"),
    [
        (None, "CRAM-MD5"),  # what curl picks by itself from Dovecot's SASL list
        ("AUTH=PLAIN", "PLAIN"),
        ("AUTH=LOGIN", "LOGIN"),
        ("AUTH=+APOP", "APOP"),
    ],
)
async def test_curl_lists_and_retrieves_like_direct(
    dovecot,
    mailbox,
    make_messages,
    popguard,
    tap,
    require_tool,
    dovecot_log,
    caplog,
    capsys,
    login_options,
    mechanism,
):
    curl = require_tool("curl")
    messages = make_messages()
    user, password, _ = mailbox(messages)
    recorder = await tap()
    proxy = await popguard(upstream=recorder.address)
    options = ["--login-options", login_options] if login_options else []

    async def fetch(address: tuple[str, int], path: str) -> bytes:
        url = f"pop3://{user}:{password}@{address[0]}:{address[1]}/{path}"
        argv = [curl, "--silent", "--show-error", "--max-time", "30", *options, url]
        return (await run(argv)).stdout

    direct_list = await fetch(dovecot.address, "")
    direct_1 = await fetch(dovecot.address, "1")
    proxied_list = await fetch(proxy.address, "")
    proxied_1 = await fetch(proxy.address, "1")

    assert proxied_list == direct_list
    assert proxied_list == b"".join(b"%d %d\r\n" % (i, len(m)) for i, m in enumerate(messages, 1))
    assert proxied_1 == direct_1 == messages[0]  # the dot-stuffed sample, un-stuffed by curl

    await proxy.wait_for("session.closed", 2)
    assert [(e["user"], e["mechanism"]) for e in proxy.sink.named("auth.succeeded")] == [
        (user, mechanism)
    ] * 2
    assert [e["reason"] for e in proxy.sink.named("session.closed")] == ["quit", "quit"]
    assert sum(f"method={mechanism}," in line for line in dovecot_log.logins(user)) == 4
    retrieved = proxy.sink.named("message.retrieved")
    assert [(e["command"], e["msg"]) for e in retrieved] == [("RETR", 1)]

    await recorder.wait_closed()
    sent = b"".join(bytes(c.from_client) for c in recorder.connections)
    secrets = sasl_responses(sent)
    assert secrets, sent  # the client did authenticate through the tap
    captured = capsys.readouterr()
    proxy.assert_never_logged([password, *secrets], caplog.text, captured.out, captured.err)
    assert dovecot.maildir_messages(user) == [stored_form(m) for m in messages]


# -- fetchmail ---------------------------------------------------------------------


def fetchmail_messages(make_messages) -> list[bytes]:
    # fetchmail 6.4 breaks lines longer than ~8 kB; leave the long sample out.
    return [m for m in make_messages(10, seed=41) if b"[long]" not in m]


async def fetchmail(
    tool: str, tmp_path: Path, name: str, address: tuple[str, int], user: str, password: str, keep
) -> tuple[list[bytes], str]:
    """Run fetchmail once; return the delivered messages and its output."""
    work = tmp_path / name
    home, out = work / "home", work / "out"
    home.mkdir(parents=True)
    out.mkdir()
    mda = work / "mda.sh"
    mda.write_text(f'#!/bin/sh\nn=$(ls "{out}" | wc -l)\nexec cat > "{out}/$(printf %04d "$n")"\n')
    mda.chmod(0o755)
    rc = work / "fetchmailrc"
    rc.touch(mode=0o600)
    rc.write_text(
        f"poll {address[0]} protocol pop3 port {address[1]}\n"
        f'  user "{user}" there with password "{password}"\n'
    )
    argv = [
        tool,
        "--fetchmailrc",
        str(rc),
        "--nosyslog",
        "--nodetach",
        "--sslproto",
        "",  # do not try STLS
        *(["--keep"] if keep else []),
        "--all",
        "--invisible",
        "--norewrite",
        "--verbose",
        "--mda",
        str(mda),
    ]
    proc = await run(argv, env={**os.environ, "HOME": str(home)})
    delivered = [p.read_bytes() for p in sorted(out.iterdir())]
    return delivered, proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")


async def test_fetchmail_keep_gets_what_direct_gets(
    dovecot, mailbox, make_messages, popguard, tap, require_tool, tmp_path
):
    tool = require_tool("fetchmail")
    messages = fetchmail_messages(make_messages)
    user, password, _ = mailbox(messages)
    recorder = await tap()
    proxy = await popguard(upstream=recorder.address)

    direct, _ = await fetchmail(tool, tmp_path, "direct", dovecot.address, user, password, True)
    proxied, log = await fetchmail(tool, tmp_path, "proxy", proxy.address, user, password, True)

    assert len(proxied) == len(messages), log
    assert proxied == direct == [stored_form(m) for m in messages]
    assert dovecot.maildir_messages(user) == [stored_form(m) for m in messages]  # --keep
    (closed,) = await proxy.wait_for("session.closed")
    assert closed["reason"] == "quit"
    assert [e["user"] for e in proxy.sink.named("auth.succeeded")] == [user]
    retrieved = {e["msg"] for e in proxy.sink.named("message.retrieved")}
    assert retrieved == set(range(1, len(messages) + 1))
    assert not proxy.sink.named("dele.marked")
    await recorder.wait_closed()
    secrets = sasl_responses(bytes(recorder.connections[0].from_client))
    assert secrets  # fetchmail authenticated through the tap
    proxy.assert_never_logged([password, *secrets])


async def test_fetchmail_without_keep_deletes_everything(
    dovecot, mailbox, make_messages, popguard, require_tool, tmp_path, dovecot_log
):
    tool = require_tool("fetchmail")
    messages = fetchmail_messages(make_messages)
    user, password, _ = mailbox(messages)
    proxy = await popguard()

    delivered, log = await fetchmail(
        tool, tmp_path, "flush", proxy.address, user, password, keep=False
    )

    assert delivered == [stored_form(m) for m in messages], log
    assert dovecot.maildir_messages(user) == []
    (closed,) = await proxy.wait_for("session.closed")
    assert closed["reason"] == "quit"
    count = len(messages)
    assert sorted(e["msg"] for e in proxy.sink.named("dele.marked")) == list(range(1, count + 1))
    (committed,) = proxy.sink.named("deletions.committed")
    assert numbers(committed["messages"]) == list(range(1, count + 1))
    assert committed["user"] == user
    (end,) = await trio.to_thread.run_sync(dovecot_log.wait_session_ends, user)
    assert "Disconnected: Logged out" in end, end
    assert f"del={count}/{count}" in end, end
