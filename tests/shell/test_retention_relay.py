"""Retention through the trio shell: copies land in a real Maildir before any DELE.

Memory streams play client and server; the retention store is a real
directory.  The server side of each test sees exactly which commands
arrive, so "the DELE never reached the server" is observed, not assumed.
"""

from __future__ import annotations

import hashlib
import mailbox
import os
from pathlib import Path

import pytest

from popguard.core.replies import REPLY_RETENTION_UNAVAILABLE
from popguard.retention import ArchiveWriter, RetentionError, RetentionStore

from .test_relay import login, recv_until, rig

MESSAGE = b"Subject: kept\r\n\r\nfirst\r\n.\r\n..two\r\nlast\r\n"
STUFFED = b"Subject: kept\r\n\r\nfirst\r\n..\r\n...two\r\nlast\r\n"
RETR_REPLY = b"+OK %d octets\r\n" % len(MESSAGE) + STUFFED + b".\r\n"
DIGEST = hashlib.sha256(MESSAGE).hexdigest()


def archived_files(root: Path, state: str = "new") -> list[Path]:
    return sorted((root / "alice" / state).glob("*")) if (root / "alice").exists() else []


async def test_a_retrieved_message_is_archived_before_its_dele_reaches_the_server(
    tmp_path: Path,
) -> None:
    store = RetentionStore(tmp_path)
    async with rig(retain=True, retention=store) as r:
        await login(r)
        await r.client.send_all(b"RETR 1\r\n")
        await recv_until(r.server, b"RETR 1\r\n")
        await r.server.send_all(RETR_REPLY)
        assert await recv_until(r.client, b"\r\n.\r\n") == RETR_REPLY
        await r.client.send_all(b"DELE 1\r\n")
        # The copy is durable before the DELE is sent: by the time the
        # server reads it, the file is in new/.
        assert await recv_until(r.server, b"\r\n") == b"DELE 1\r\n"
        files = archived_files(tmp_path)
        assert len(files) == 1
        assert files[0].read_bytes() == MESSAGE
        await r.server.send_all(b"+OK marked\r\n")
        await recv_until(r.client, b"marked\r\n")
        await r.client.send_all(b"QUIT\r\n")
        await recv_until(r.server, b"QUIT\r\n")
        await r.server.send_all(b"+OK bye\r\n")
    archived = r.record("message.archived")
    assert archived["digest"] == DIGEST
    assert archived["stored"] is True
    assert tmp_path / str(archived["path"]) == files[0]
    committed = r.record("deletions.committed")["messages"]
    assert committed[0]["digest"] == DIGEST
    assert committed[0]["archived"] == archived["path"]
    assert archived_files(tmp_path, "tmp") == []
    # Any Maildir reader opens the archive: Python's reads the message back.
    box = mailbox.Maildir(tmp_path / "alice", factory=None, create=False)
    (key,) = box.keys()
    assert box.get_bytes(key) == MESSAGE


async def test_a_message_never_retrieved_is_fetched_unseen_then_deleted(tmp_path: Path) -> None:
    store = RetentionStore(tmp_path)
    async with rig(retain=True, retention=store) as r:
        await login(r)
        await r.client.send_all(b"DELE 1\r\n")
        assert await recv_until(r.server, b"\r\n") == b"RETR 1\r\n"
        await r.server.send_all(RETR_REPLY)
        assert await recv_until(r.server, b"\r\n") == b"DELE 1\r\n"
        await r.server.send_all(b"+OK marked\r\n")
        # The client's only reply is the DELE's: the body never reached it.
        assert await recv_until(r.client, b"\r\n") == b"+OK marked\r\n"
        await r.client.send_all(b"QUIT\r\n")
        await recv_until(r.server, b"QUIT\r\n")
        await r.server.send_all(b"+OK bye\r\n")
    (copy,) = archived_files(tmp_path)
    assert copy.read_bytes() == MESSAGE


async def test_a_copy_that_cannot_be_made_durable_keeps_the_dele_from_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(self: ArchiveWriter, digest: str, size: int) -> object:
        raise RetentionError("no space left in the retention store")

    monkeypatch.setattr(ArchiveWriter, "commit", disk_full)
    store = RetentionStore(tmp_path)
    async with rig(retain=True, retention=store) as r:
        await login(r)
        await r.client.send_all(b"DELE 1\r\nNOOP\r\n")
        assert await recv_until(r.server, b"\r\n") == b"RETR 1\r\n"
        await r.server.send_all(RETR_REPLY)
        # NOOP, queued behind the refused DELE, is the next command sent.
        assert await recv_until(r.server, b"\r\n") == b"NOOP\r\n"
        await r.server.send_all(b"+OK\r\n")
        reply = await recv_until(r.client, b"+OK\r\n")
        assert reply == REPLY_RETENTION_UNAVAILABLE + b"+OK\r\n"
        await r.client.send_all(b"QUIT\r\n")
        await recv_until(r.server, b"QUIT\r\n")
        await r.server.send_all(b"+OK bye\r\n")
    failed = r.record("retention.failed")
    assert failed["reason"] == "no space left in the retention store"
    assert "dele.marked" not in r.events()
    assert archived_files(tmp_path) == []
    assert archived_files(tmp_path, "tmp") == []  # the temporary copy is gone too


async def test_without_a_store_a_dele_under_retain_is_refused() -> None:
    async with rig(retain=True, retention=None) as r:
        await login(r)
        await r.client.send_all(b"DELE 1\r\n")
        assert await recv_until(r.server, b"\r\n") == b"RETR 1\r\n"
        await r.server.send_all(RETR_REPLY)
        assert await recv_until(r.client, b"\r\n") == REPLY_RETENTION_UNAVAILABLE
        await r.client.send_all(b"QUIT\r\n")
        assert await recv_until(r.server, b"\r\n") == b"QUIT\r\n"
        await r.server.send_all(b"+OK bye\r\n")
    assert r.record("retention.failed")["reason"] == "no retention store is configured"


async def test_copies_no_dele_needed_are_removed_when_the_session_ends(tmp_path: Path) -> None:
    store = RetentionStore(tmp_path)
    async with rig(retain=True, retention=store) as r:
        await login(r)
        await r.client.send_all(b"RETR 1\r\n")
        await recv_until(r.server, b"RETR 1\r\n")
        await r.server.send_all(RETR_REPLY)
        await recv_until(r.client, b"\r\n.\r\n")
        tmp = archived_files(tmp_path, "tmp")
        assert len(tmp) == 1  # streamed to disk while relayed, not kept in memory
        await r.client.aclose()  # gone without QUIT
    assert archived_files(tmp_path, "tmp") == []
    assert archived_files(tmp_path) == []
    assert r.relay.session.end_reason is not None


async def test_an_identical_copy_is_not_stored_twice(tmp_path: Path) -> None:
    store = RetentionStore(tmp_path)
    for _ in range(2):
        async with rig(retain=True, retention=store) as r:
            await login(r)
            await r.client.send_all(b"DELE 1\r\n")
            await recv_until(r.server, b"RETR 1\r\n")
            await r.server.send_all(RETR_REPLY)
            await recv_until(r.server, b"DELE 1\r\n")
            await r.server.send_all(b"-ERR not today\r\n")
            await recv_until(r.client, b"today\r\n")
            await r.client.send_all(b"QUIT\r\n")
            await recv_until(r.server, b"QUIT\r\n")
            await r.server.send_all(b"+OK bye\r\n")
    assert r.record("message.archived")["stored"] is False
    assert len(archived_files(tmp_path)) == 1
    assert os.listdir(tmp_path / "alice" / "tmp") == []
