"""Retention against the real Dovecot: no message leaves the server without a copy.

A real ``popguard serve --policies DIR --retention-dir DIR`` in front of
Dovecot, and poplib as the client.  Witnesses: Dovecot's Maildir (what is
still there), the retention store on disk (what was archived, byte for
byte), and popguard's audit file, checked by ``popguard audit verify
--retention``.
"""

from __future__ import annotations

import hashlib
import poplib
import subprocess
import sys
from pathlib import Path

import pytest

from popguard.testing.dovecot import stored_form

RETAIN_ALL = """\
rules:
  - name: keep-everything
    set:
      retain: true
"""


def policies(tmp_path: Path, text: str = RETAIN_ALL) -> Path:
    directory = tmp_path / "policies"
    directory.mkdir()
    (directory / "retain.yaml").write_text(text)
    return directory


def wire_form(message: bytes) -> bytes:
    """The message as Dovecot serves it (and as popguard archives it): CRLF lines."""
    return stored_form(message).replace(b"\n", b"\r\n")


def verify_retention(audit: Path, store: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "popguard",
            "audit",
            "verify",
            "--retention",
            str(store),
            str(audit),
        ],
        capture_output=True,
        text=True,
        check=False,
    )


def test_fetch_and_delete_archives_every_message_before_dovecot_expunges_it(
    dovecot, mailbox, make_messages, popguard_process, tmp_path
):
    messages = make_messages(3, seed=151)
    box = mailbox(messages)
    store = tmp_path / "store"
    proxy = popguard_process("--policies", str(policies(tmp_path)), "--retention-dir", str(store))
    client = poplib.POP3(*proxy.address, timeout=30)
    client.user(box.user)
    client.pass_(box.password)
    # Message 1 retrieved then deleted (the copy is what was relayed);
    # messages 2 and 3 deleted unread (popguard fetches them itself).
    client.retr(1)
    for n in (1, 2, 3):
        assert client.dele(n).startswith(b"+OK")
    assert client.quit().startswith(b"+OK")
    proxy.wait_for("session.closed")

    assert mailbox.messages(box.user) == []  # Dovecot expunged all three
    archived = sorted((store / box.user / "new").iterdir())
    assert sorted(path.read_bytes() for path in archived) == sorted(wire_form(m) for m in messages)
    records = proxy.events()
    digests = {r["msg"]: r["digest"] for r in records if r["event"] == "message.archived"}
    assert sorted(digests) == [1, 2, 3]
    for n, message in enumerate(messages, 1):
        assert digests[n] == hashlib.sha256(wire_form(message)).hexdigest()
    retrieved = next(r for r in records if r["event"] == "message.retrieved")
    assert retrieved["digest"] == digests[1]
    committed = next(r for r in records if r["event"] == "deletions.committed")
    assert {m["msg"]: m["archived"] for m in committed["messages"]} == {
        r["msg"]: r["path"] for r in records if r["event"] == "message.archived"
    }
    assert proxy.terminate() == 0
    done = verify_retention(proxy.audit_path, store)
    assert done.returncode == 0, done.stdout + done.stderr


def test_no_copy_means_the_dele_never_reaches_dovecot(
    dovecot, mailbox, make_messages, popguard_process, tmp_path
):
    messages = make_messages(1, seed=152)
    box = mailbox(messages)
    store = tmp_path / "store"
    store.mkdir()
    (store / box.user).write_text("not a Maildir")  # the account's directory cannot be made
    proxy = popguard_process("--policies", str(policies(tmp_path)), "--retention-dir", str(store))
    client = poplib.POP3(*proxy.address, timeout=30)
    client.user(box.user)
    client.pass_(box.password)
    with pytest.raises(poplib.error_proto) as refused:
        client.dele(1)
    assert refused.value.args[0].startswith(b"-ERR [SYS/TEMP] The message cannot be archived")
    assert client.quit().startswith(b"+OK")
    proxy.wait_for("session.closed")
    # Dovecot never saw the DELE: the message is still there.
    assert mailbox.messages(box.user) == [stored_form(m) for m in messages]
    failed = proxy.named("retention.failed")
    assert len(failed) == 1
    assert failed[0]["msg"] == 1
    assert "dele.marked" not in {r["event"] for r in proxy.events()}


def test_a_dry_run_retain_records_and_archives_nothing(
    dovecot, mailbox, make_messages, popguard_process, tmp_path
):
    box = mailbox(make_messages(1, seed=153))
    store = tmp_path / "store"
    text = RETAIN_ALL.replace(
        "  - name: keep-everything\n", "  - name: keep-everything\n    mode: dry-run\n"
    )
    proxy = popguard_process(
        "--policies", str(policies(tmp_path, text)), "--retention-dir", str(store)
    )
    client = poplib.POP3(*proxy.address, timeout=30)
    client.user(box.user)
    client.pass_(box.password)
    assert client.dele(1).startswith(b"+OK")
    assert client.quit().startswith(b"+OK")
    proxy.wait_for("session.closed")
    assert mailbox.messages(box.user) == []
    dry = [r for r in proxy.named("policy.dry_run") if r.get("setting") == "retain"]
    assert len(dry) == 1
    assert not proxy.named("message.archived")
    assert not (store / box.user).exists()
    # The trail says nothing was under retention, so verify has nothing to miss.
    assert proxy.terminate() == 0
    done = verify_retention(proxy.audit_path, store)
    assert done.returncode == 0, done.stdout + done.stderr
    assert dry[0]["rule"] == "keep-everything"
