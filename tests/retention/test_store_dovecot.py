"""The archive opens in a real IMAP/POP3 server: Dovecot serves it as it is.

The retention store's root is made Dovecot's mail directory, so the Maildir
popguard wrote for ``alice`` *is* alice's mailbox: no copying.  Every
message comes back over POP3 byte for byte, and after Dovecot has moved the
files from ``new/`` to ``cur/`` (and flagged them), the store still finds
each copy.  Needs Dovecot (``dovecot-core dovecot-pop3d``): skipped without
it, failed in CI.
"""

from __future__ import annotations

import hashlib
import os
import poplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from popguard.retention.store import RetentionStore
from popguard.testing import dovecot as dovecot_tool
from popguard.testing.dovecot import DovecotInstance
from tests.ci import in_ci
from tests.retention.test_store import SAMPLES, archive

#: poplib refuses lines over 2048 octets; one sample has a 5000-octet line.
LONG_LINES = 1 << 16


@pytest.fixture
def dovecot(tmp_path: Path) -> Iterator[DovecotInstance]:
    reason = dovecot_tool.available()
    if reason is not None:
        if in_ci():
            pytest.fail(f"Dovecot is required in CI but unusable: {reason}", pytrace=False)
        pytest.skip(f"Dovecot is not available: {reason}")
    with DovecotInstance(tmp_path / "dovecot") as instance:
        yield instance


def _hand_over(instance: DovecotInstance, maildir: Path) -> None:
    """Give the Maildir to Dovecot's mail user (as an operator would: chown -R)."""
    if os.geteuid() != 0:
        return
    for directory, _dirs, names in os.walk(maildir):
        os.chown(directory, instance.mail_uid, instance.mail_gid)
        for name in names:
            os.chown(os.path.join(directory, name), instance.mail_uid, instance.mail_gid)


def _retrieve_all(instance: DovecotInstance, password: str) -> list[tuple[int, bytes]]:
    """(LIST size, RETR content un-stuffed with CRLF line ends) of every message."""
    pop = poplib.POP3(instance.host, instance.port, timeout=30)
    try:
        pop.user("alice")
        pop.pass_(password)
        listing = pop.list()[1]
        got = []
        for entry in listing:
            number, size = (int(x) for x in entry.split())
            lines = pop.retr(number)[1]
            got.append((size, b"".join(line + b"\r\n" for line in lines)))
        pop.quit()  # nothing marked: nothing deleted
    finally:
        pop.close()
    return got


def test_dovecot_serves_the_archive_byte_identical(
    dovecot: DovecotInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(poplib, "_MAXLINE", LONG_LINES)
    maildir = dovecot.add_user("alice", "archive-pw")  # an empty Maildir, and a login
    store = RetentionStore(dovecot.mail_dir)
    archived = [archive(store, "alice", f"UID-{i}", data) for i, data in enumerate(SAMPLES)]
    assert all(a.stored and a.path.startswith("alice/new/") for a in archived)
    assert maildir == dovecot.mail_dir / "alice"
    _hand_over(dovecot, maildir)

    got = _retrieve_all(dovecot, "archive-pw")
    assert sorted(content for _size, content in got) == sorted(SAMPLES)
    assert sorted(size for size, _content in got) == sorted(len(data) for data in SAMPLES)

    # Dovecot took the messages into cur/ (with Maildir info); the store
    # still finds every copy, and does not store any of them again.
    assert os.listdir(maildir / "new") == []
    assert sorted(n.partition(":")[0] for n in os.listdir(maildir / "cur")) == sorted(
        a.path.rsplit("/", 1)[1] for a in archived
    )
    for index, (data, first) in enumerate(zip(SAMPLES, archived, strict=True)):
        digest = hashlib.sha256(data).hexdigest()
        found = store.lookup("alice", f"UID-{index}", digest)
        assert found is not None
        assert found.startswith("alice/cur/")
        assert store.locate(first.path) == dovecot.mail_dir / found
        again = archive(store, "alice", f"UID-{index}", data)
        assert again.path == found
        assert not again.stored
    assert os.listdir(maildir / "new") == []
