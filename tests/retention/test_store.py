"""The retention store: Maildir layout, atomic commits, duplicates, failing closed."""

from __future__ import annotations

import errno
import hashlib
import mailbox
import os
import re
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from popguard.retention import store as store_module
from popguard.retention.store import (
    MAX_UIDL,
    STALE_TMP_SECONDS,
    Archived,
    RetentionError,
    RetentionStore,
    account_dir,
    account_from_dir,
    message_name,
)

MESSAGE = (
    b"From: Bob <bob@example.org>\r\n"
    b"To: alice@example.org\r\n"
    b"Subject: quarterly figures\r\n"
    b"\r\n"
    b"Hello Alice,\r\n"
    b".a line that began with a dot (unstuffed)\r\n"
    b"From the desk of Bob\r\n"
    b"\xc3\xa9t\xc3\xa9 8bit\r\n"
)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def archive(
    store: RetentionStore,
    account: str,
    uidl: str | None,
    data: bytes = MESSAGE,
    *,
    chunk: int = 7,
) -> Archived:
    """Stream *data* into the store in small chunks, as the shell does, and commit."""
    writer = store.open(account, uidl)
    for start in range(0, len(data), chunk):
        writer.write(data[start : start + chunk])
    return writer.commit(sha(data), len(data))


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "archive" / "root"


@pytest.fixture
def store(root: Path) -> RetentionStore:
    return RetentionStore(root)


# --------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------


def test_maildir_layout_modes_and_name(store: RetentionStore, root: Path) -> None:
    archived = archive(store, "alice", "UID-17")
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    maildir = root / "alice"
    for sub in ("tmp", "new", "cur"):
        assert stat.S_IMODE((maildir / sub).stat().st_mode) == 0o700
    name = f"{sha(MESSAGE)}.u{b'UID-17'.hex()}"
    assert archived == Archived(f"alice/new/{name}", stored=True)
    stored = root / archived.path
    assert stored.read_bytes() == MESSAGE
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    assert files(maildir / "tmp") == []
    assert files(maildir / "cur") == []
    assert message_name("UID-17", sha(MESSAGE)) == name


def test_message_names_carry_uidl_and_digest_and_nothing_maildir_reserves() -> None:
    digest = sha(b"x")
    assert message_name(None, digest) == f"{digest}.n"
    assert message_name("a:b/c,S=1", digest) == f"{digest}.u{b'a:b/c,S=1'.hex()}"
    long_uidl = "x" * (MAX_UIDL + 1)
    hashed = message_name(long_uidl, digest)
    assert hashed == f"{digest}.h{sha(long_uidl.encode())}"
    assert message_name("x" * MAX_UIDL, digest).endswith("78" * MAX_UIDL)
    for name in (message_name("a:b/c,S=1", digest), hashed):
        assert re.fullmatch(r"[0-9a-f.unh]+", name)
        assert len(name) + len(":2,DFPRST") <= 255
    with pytest.raises(RetentionError, match="digest"):
        message_name("u", "ABC")
    with pytest.raises(RetentionError, match="digest"):
        message_name("u", digest.upper())
    with pytest.raises(RetentionError, match="UIDL is empty"):
        message_name("", digest)


def test_messages_without_uidl_and_other_accounts_are_kept_apart(
    store: RetentionStore, root: Path
) -> None:
    first = archive(store, "alice", None)
    other = archive(store, "bob@example.org", None)
    assert first.path == f"alice/new/{sha(MESSAGE)}.n"
    assert other.path == f"bob@example.org/new/{sha(MESSAGE)}.n"
    assert (root / first.path).read_bytes() == (root / other.path).read_bytes() == MESSAGE


def test_an_existing_root_and_maildir_are_used_as_they_are(tmp_path: Path) -> None:
    maildir = tmp_path / "alice"
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True)
    (maildir / "cur" / "1.M1.host:2,S").write_bytes(b"older mail\r\n")
    store = RetentionStore(tmp_path)
    archived = archive(store, "alice", "u1")
    assert (tmp_path / archived.path).read_bytes() == MESSAGE
    assert files(maildir / "cur") == ["1.M1.host:2,S"]


def test_a_root_that_is_a_file_or_missing_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(RetentionError, match="cannot create the retention store"):
        RetentionStore(tmp_path / "file" / "root")
    with pytest.raises(RetentionError, match="cannot create the retention store: Not a directory"):
        RetentionStore(tmp_path / "file")
    with pytest.raises(RetentionError, match="not a directory"):
        RetentionStore(tmp_path / "absent", create=False)
    assert not (tmp_path / "absent").exists()


# --------------------------------------------------------------------------
# Account names
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("account", "directory"),
    [
        ("alice", "alice"),
        ("bob@example.org", "bob@example.org"),
        ("a.b_c+d-e", "a.b_c+d-e"),
        ("Alice", "%41lice"),
        (".", "%2E"),
        ("..", "%2E."),
        (".hidden", "%2Ehidden"),
        ("../../etc", "%2E.%2F..%2Fetc"),
        ("a/b", "a%2Fb"),
        ("a b\tc", "a%20b%09c"),
        ("100%", "100%25"),
        ("%41lice", "%2541lice"),
        ("nul\x00", "nul%00"),
        ("dävid", "d%C3%A4vid"),
        ("cur", "cur"),
        ("a:2,S", "a%3A2%2C%53"),
    ],
)
def test_account_directory_names(account: str, directory: str) -> None:
    assert account_dir(account) == directory
    assert account_from_dir(directory) == account


def test_hostile_accounts_stay_inside_the_root(store: RetentionStore, root: Path) -> None:
    for account in ("..", "../escape", "/etc/passwd", ".", "a/../../b", "x\udcff"):
        archived = archive(store, account, "u")
        path = (root / archived.path).resolve()
        assert path.parent.parent.parent == root.resolve()
        assert path.parent.parent.name == account_dir(account)
        assert account_from_dir(path.parent.parent.name) == account
    assert not (root.parent / "escape").exists()
    assert sorted(os.listdir(root)) == sorted(
        account_dir(a) for a in ("..", "../escape", "/etc/passwd", ".", "a/../../b", "x\udcff")
    )


def test_unusable_account_names_are_refused() -> None:
    with pytest.raises(RetentionError, match="empty"):
        account_dir("")
    with pytest.raises(RetentionError, match="too long"):
        account_dir("é" * 50)  # 100 octets, 300 characters escaped
    assert account_dir("a" * 255) == "a" * 255
    for name in ("", "%2e", "%41%", "A", "%2E%2E", "a%2Eb", "%C3", "%ZZ"):
        with pytest.raises(ValueError, match="not an account directory"):
            account_from_dir(name)


@given(st.text(min_size=1, max_size=20))  # 20 x 4 octets x 3 (%XX) fit in 255
@example("..")
@example(".")
@example("\udcff")
def test_account_names_map_injectively_to_safe_names(account: str) -> None:
    name = account_dir(account)
    assert re.fullmatch(r"[a-z0-9._@+%A-F-]+", name)
    assert name not in (".", "..")
    assert not name.startswith(".")
    assert "/" not in name
    assert account_from_dir(name) == account  # reversible, hence injective


# --------------------------------------------------------------------------
# Atomicity
# --------------------------------------------------------------------------


def test_nothing_reaches_new_before_commit(store: RetentionStore, root: Path) -> None:
    writer = store.open("alice", "u1")
    writer.write(MESSAGE)
    assert files(root / "alice" / "new") == []
    assert len(files(root / "alice" / "tmp")) == 1
    tmp_file = root / "alice" / "tmp" / files(root / "alice" / "tmp")[0]
    assert stat.S_IMODE(tmp_file.stat().st_mode) == 0o600
    writer.commit(sha(MESSAGE), len(MESSAGE))
    assert files(root / "alice" / "tmp") == []
    assert len(files(root / "alice" / "new")) == 1


_CRASH_SCRIPT = textwrap.dedent(
    """
    import hashlib, os, sys
    from popguard.retention import store as module
    from popguard.retention.store import RetentionStore

    root, where = sys.argv[1], sys.argv[2]
    data = b"Subject: crash\\r\\n\\r\\nbody\\r\\n"
    store = RetentionStore(root)
    writer = store.open("alice", "u-crash")
    writer.write(data[:10])
    if where == "write":
        os._exit(3)
    writer.write(data[10:])
    if where == "rename":
        def crash(*args, **kwargs):
            os._exit(3)
        module.os.rename = crash
    writer.commit(hashlib.sha256(data).hexdigest(), len(data))
    os._exit(0)
    """
)


@pytest.mark.parametrize("where", ["write", "rename"])
def test_a_crash_before_the_rename_leaves_nothing_in_new(root: Path, where: str) -> None:
    """A process killed mid-write, or after the fsync but before the rename."""
    proc = subprocess.run(
        [sys.executable, "-c", _CRASH_SCRIPT, str(root), where], check=False, timeout=60
    )
    assert proc.returncode == 3
    assert files(root / "alice" / "new") == []
    assert files(root / "alice" / "cur") == []
    leftovers = files(root / "alice" / "tmp")
    assert len(leftovers) == 1
    if where == "rename":  # the whole message was written (and fsynced) to tmp/
        assert (root / "alice" / "tmp" / leftovers[0]).read_bytes().endswith(b"body\r\n")
    # The next writer archives the message all the same; the debris stays
    # until it is old enough to sweep.
    data = b"Subject: crash\r\n\r\nbody\r\n"
    archived = archive(RetentionStore(root), "alice", "u-crash", data)
    assert archived.stored
    assert files(root / "alice" / "tmp") == leftovers


def test_abort_and_context_exit_remove_the_temporary_file(
    store: RetentionStore, root: Path
) -> None:
    writer = store.open("alice", "u1")
    writer.write(MESSAGE)
    writer.abort()
    writer.abort()  # idempotent
    assert writer.closed
    with store.open("alice", "u2") as second:
        second.write(MESSAGE)
    assert files(root / "alice" / "tmp") == []
    assert files(root / "alice" / "new") == []
    with pytest.raises(RetentionError, match="already committed or aborted"):
        writer.write(b"more")
    with pytest.raises(RetentionError, match="already committed or aborted"):
        second.commit(sha(MESSAGE), len(MESSAGE))


def test_finished_copies_hold_no_file_descriptor(store: RetentionStore, root: Path) -> None:
    """Copies waiting for their DELE (finish) cost no fd; commit syncs them later."""
    fds_before = len(os.listdir("/proc/self/fd"))
    writers = []
    for index in range(50):
        writer = store.open("alice", f"UID-{index}")
        writer.write(MESSAGE + str(index).encode() + b"\r\n")
        writer.finish()
        writers.append(writer)
    assert len(os.listdir("/proc/self/fd")) == fds_before
    assert len(files(root / "alice" / "tmp")) == 50
    with pytest.raises(RetentionError, match="already finished"):
        writers[0].write(b"more")
    writers[1].abort()
    for index, writer in enumerate(writers):
        if index == 1:
            continue
        data = MESSAGE + str(index).encode() + b"\r\n"
        archived = writer.commit(sha(data), len(data))
        assert (root / archived.path).read_bytes() == data
    assert files(root / "alice" / "tmp") == []
    assert len(files(root / "alice" / "new")) == 49


def test_a_committed_writer_cannot_be_used_again(store: RetentionStore, root: Path) -> None:
    with store.open("alice", "u1") as writer:
        writer.write(MESSAGE)
        archived = writer.commit(sha(MESSAGE), len(MESSAGE))
    assert (root / archived.path).read_bytes() == MESSAGE  # exit did not undo it
    with pytest.raises(RetentionError, match="already committed"):
        writer.commit(sha(MESSAGE), len(MESSAGE))


@pytest.mark.parametrize(
    ("digest", "size", "reason"),
    [
        (sha(MESSAGE + b"x"), len(MESSAGE), "does not match"),
        (sha(MESSAGE), len(MESSAGE) + 1, "does not match"),
        (sha(MESSAGE).upper(), len(MESSAGE), "64 lower-case hex"),
        ("not a digest", len(MESSAGE), "64 lower-case hex"),
    ],
)
def test_a_copy_that_differs_from_what_was_seen_is_refused(
    store: RetentionStore, root: Path, digest: str, size: int, reason: str
) -> None:
    writer = store.open("alice", "u1")
    writer.write(MESSAGE)
    with pytest.raises(RetentionError, match=reason):
        writer.commit(digest, size)
    assert writer.closed
    assert files(root / "alice" / "new") == []
    assert files(root / "alice" / "tmp") == []


def test_the_commit_syncs_the_file_before_the_rename_and_new_after(
    store: RetentionStore, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        target = os.readlink(f"/proc/self/fd/{fd}")
        calls.append("fsync " + ("new/" if target.endswith("/new") else "file"))
        real_fsync(fd)

    def rename(src: str | Path, dst: str | Path) -> None:
        calls.append("rename")
        real_rename(src, dst)

    writer = store.open("alice", "u1")  # the Maildir's own fsyncs happen here
    writer.write(MESSAGE)
    finished = store.open("alice", "u2")
    finished.write(MESSAGE)
    finished.finish()
    monkeypatch.setattr(store_module.os, "fsync", fsync)
    monkeypatch.setattr(store_module.os, "rename", rename)
    writer.commit(sha(MESSAGE), len(MESSAGE))
    assert calls == ["fsync file", "rename", "fsync new/"]
    calls.clear()
    finished.commit(sha(MESSAGE), len(MESSAGE))  # synced through a new descriptor
    assert calls == ["fsync file", "rename", "fsync new/"]


# --------------------------------------------------------------------------
# Duplicates and lookup
# --------------------------------------------------------------------------


def test_the_same_uidl_and_digest_is_stored_once(store: RetentionStore, root: Path) -> None:
    first = archive(store, "alice", "UID-1")
    again = archive(store, "alice", "UID-1", chunk=1000)
    assert first.stored
    assert again == Archived(first.path, stored=False)
    assert files(root / "alice" / "new") == [first.path.split("/")[-1]]
    assert files(root / "alice" / "tmp") == []
    # Same bytes under another UIDL, another message under the same UIDL:
    # different messages, each stored.
    other_uidl = archive(store, "alice", "UID-2")
    changed = archive(store, "alice", "UID-1", MESSAGE + b"P.S.\r\n")
    assert other_uidl.stored
    assert changed.stored
    assert len(files(root / "alice" / "new")) == 3


def test_lookup_finds_an_intact_copy_only(store: RetentionStore, root: Path) -> None:
    digest = sha(MESSAGE)
    assert store.lookup("alice", "UID-1", digest) is None  # no Maildir yet
    archived = archive(store, "alice", "UID-1")
    assert store.lookup("alice", "UID-1", digest) == archived.path
    assert store.lookup("alice", "UID-2", digest) is None
    assert store.lookup("alice", None, digest) is None
    assert store.lookup("bob", "UID-1", digest) is None
    assert store.lookup("alice", "UID-1", sha(b"other")) is None
    (root / archived.path).write_bytes(MESSAGE.replace(b"Alice", b"Alicf"))
    assert store.lookup("alice", "UID-1", digest) is None


def test_a_copy_moved_to_cur_by_a_reader_is_still_found(store: RetentionStore, root: Path) -> None:
    """What Dovecot and mutt do when they open the archive: new/X -> cur/X:2,<flags>."""
    archived = archive(store, "alice", "UID-1")
    name = archived.path.split("/")[-1]
    new, cur = root / "alice" / "new", root / "alice" / "cur"
    os.rename(new / name, cur / f"{name}:2,")
    an_hour_ago = time.time() - 3600
    os.utime(cur, (an_hour_ago, an_hour_ago))  # so the cur/ listing is kept
    assert store.lookup("alice", "UID-1", sha(MESSAGE)) == f"alice/cur/{name}:2,"
    # The reader flags it Seen later: cur/ changed, so it is listed again.
    os.rename(cur / f"{name}:2,", cur / f"{name}:2,S")
    again = archive(store, "alice", "UID-1")
    assert again == Archived(f"alice/cur/{name}:2,S", stored=False)
    assert files(new) == []
    assert store.locate(archived.path) == cur / f"{name}:2,S"
    assert store.locate(f"alice/cur/{name}:2,FS") == cur / f"{name}:2,S"


def test_locate_takes_only_store_paths(store: RetentionStore) -> None:
    archived = archive(store, "alice", "UID-1")
    name = archived.path.split("/")[-1]
    assert store.locate(archived.path) is not None
    for bad in (
        f"alice/tmp/{name}",
        f"../alice/new/{name}",
        f"/alice/new/{name}",
        f"alice/new/../new/{name}",
        f"./new/{name}",
        f"alice/new/{name}/x",
        "alice/new/",
        f"bob/new/{name}",
    ):
        assert store.locate(bad) is None, bad


def test_a_damaged_copy_is_replaced_in_place(store: RetentionStore, root: Path) -> None:
    archived = archive(store, "alice", "UID-1")
    name = archived.path.split("/")[-1]
    cur_path = root / "alice" / "cur" / f"{name}:2,S"
    os.rename(root / archived.path, cur_path)
    cur_path.write_bytes(MESSAGE[:20])  # truncated behind the store's back
    repaired = archive(store, "alice", "UID-1")
    assert repaired == Archived(f"alice/cur/{name}:2,S", stored=True)
    assert cur_path.read_bytes() == MESSAGE
    assert files(root / "alice" / "new") == []  # never two files of one unique name


# --------------------------------------------------------------------------
# Failing closed
# --------------------------------------------------------------------------


def _fail_with(code: int) -> Callable[..., None]:
    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(code, os.strerror(code), "/secret/other-user/path")

    return fail


def _assert_clean_reason(exc: RetentionError, root: Path, *fragments: str) -> None:
    for fragment in fragments:
        assert fragment in exc.reason
    assert "/secret" not in exc.reason  # no path, ours or anyone's
    assert str(root) not in exc.reason
    assert "alice" not in exc.reason
    assert "OSError" not in exc.reason
    assert "Errno" not in exc.reason


@pytest.mark.parametrize(
    ("target", "code", "expected"),
    [
        ("write", errno.ENOSPC, "cannot write the copy: No space left on device"),
        ("write", errno.EDQUOT, "cannot write the copy: Disk quota exceeded"),
        ("fsync", errno.EIO, "cannot sync the copy to disk: Input/output error"),
        ("rename", errno.EACCES, "cannot move the copy into the Maildir: Permission denied"),
    ],
)
def test_failures_raise_a_short_reason_and_leave_nothing(
    store: RetentionStore,
    root: Path,
    monkeypatch: pytest.MonkeyPatch,
    target: str,
    code: int,
    expected: str,
) -> None:
    writer = store.open("alice", "UID-1")
    if target != "write":
        writer.write(MESSAGE)
    monkeypatch.setattr(store_module.os, target, _fail_with(code))
    step = (
        (lambda: writer.write(MESSAGE))
        if target == "write"
        else (lambda: writer.commit(sha(MESSAGE), len(MESSAGE)))
    )
    with pytest.raises(RetentionError) as info:
        step()
    monkeypatch.undo()
    assert info.value.reason == expected
    assert info.value.errno == code
    _assert_clean_reason(info.value, root)
    assert writer.closed
    assert files(root / "alice" / "new") == []
    assert files(root / "alice" / "tmp") == []
    assert store.lookup("alice", "UID-1", sha(MESSAGE)) is None


def test_a_maildir_that_cannot_be_made_is_a_failure(
    store: RetentionStore, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Permissions (tests run as root, so chmod would not stop them: simulated)."""
    monkeypatch.setattr(store_module.Path, "mkdir", _fail_with(errno.EACCES))
    with pytest.raises(RetentionError) as info:
        store.open("carol", "u1")
    assert info.value.reason == "cannot create the account's Maildir: Permission denied"
    _assert_clean_reason(info.value, root)


def test_a_temporary_file_that_cannot_be_made_is_a_failure(
    store: RetentionStore, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive(store, "alice", "u0")  # the Maildir exists
    monkeypatch.setattr(store_module.os, "open", _fail_with(errno.EROFS))
    with pytest.raises(RetentionError) as info:
        store.open("alice", "u1")
    assert info.value.reason == "cannot create the copy: Read-only file system"
    _assert_clean_reason(info.value, root)


def test_an_empty_uidl_is_refused_before_anything_is_written(
    store: RetentionStore, root: Path
) -> None:
    with pytest.raises(RetentionError, match="UIDL is empty"):
        store.open("alice", "")
    assert not (root / "alice").exists()


# --------------------------------------------------------------------------
# Stale temporary files
# --------------------------------------------------------------------------


def test_stale_temporary_files_are_swept_at_open(root: Path) -> None:
    tmp = root / "alice" / "tmp"
    tmp.mkdir(parents=True)
    old, fresh = tmp / "1.M1P1.crashed", tmp / "2.M2P2.writing"
    old.write_bytes(b"debris")
    fresh.write_bytes(b"in progress")
    long_ago = time.time() - STALE_TMP_SECONDS - 60
    os.utime(old, (long_ago, long_ago))
    nearly = time.time() - STALE_TMP_SECONDS + 600
    os.utime(fresh, (nearly, nearly))
    store = RetentionStore(root)
    writer = store.open("alice", "u1")
    assert not old.exists()
    assert fresh.exists()
    writer.abort()
    assert files(tmp) == ["2.M2P2.writing"]


# --------------------------------------------------------------------------
# Real Maildir readers
# --------------------------------------------------------------------------

SAMPLES = [
    MESSAGE,
    b"Subject: dots\r\n\r\n.\r\n..\r\n.hidden\r\nend\r\n",
    b"Subject: long\r\n\r\n" + b"x" * 5000 + b"\r\n" + b"y\r\n" * 2000,
    b"Subject: binary-ish\r\nContent-Transfer-Encoding: 8bit\r\n\r\n\x01\x7f\xff\xfe\r\n",
]


def test_python_mailbox_reads_every_message_back_byte_identical(
    store: RetentionStore, root: Path
) -> None:
    archived = [archive(store, "alice", f"UID-{i}", data) for i, data in enumerate(SAMPLES)]
    # mailbox converts os.linesep to "\n" on reading; on POSIX that is "\n"
    # itself, so the CRLF message comes back exactly as stored.
    assert os.linesep == "\n"
    box = mailbox.Maildir(root / "alice", create=False)
    by_key = {key: box.get_bytes(key) for key in box.iterkeys()}
    names = [a.path.split("/")[-1] for a in archived]
    assert by_key == dict(zip(names, SAMPLES, strict=True))
    subjects = sorted(str(message["Subject"]) for message in box)
    assert subjects == ["binary-ish", "dots", "long", "quarterly figures"]
