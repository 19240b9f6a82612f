"""The retention store: a Maildir per account, a copy before every DELE.

Theory of operation
-------------------

Under a ``retain`` policy popguard forwards a DELE only once this store
holds a copy of that exact message (issue #15, ``docs/retention.md``).  The
store is plain Maildir, so any Maildir tool (mutt, Python's ``mailbox``) or
IMAP server (Dovecot) can open the archive; nothing here is popguard's own
format.

Layout::

    root/                          mode 0700
      <account-dir>/               one Maildir per canonical account
        tmp/  new/  cur/           mode 0700; messages mode 0600

*Account directories.*  :func:`account_dir` maps an account name to a
directory name: every UTF-8 byte outside ``[a-z0-9._@+-]`` is
percent-encoded (``%XX``, upper-case hex), and so is a leading dot, so no
account becomes ``.``, ``..``, a hidden name or a Maildir++ sub-folder.
Percent-encoding is injective (``%`` itself is always encoded) and
:func:`account_from_dir` reverses it.  The account is canonical already
(``popguard.core.identity``), but the mapping does not rely on that: any
string, hostile ones included, maps to one safe name.

*Message names.*  A message is stored as ``<digest>.<uidl-part>``: its
SHA-256 (hex), a dot, and ``u`` + the UIDL's octets in hex (a UIDL is 1 to
70 octets, RFC 1939 §7), ``h`` + the SHA-256 of a longer UIDL, or ``n`` when
the server gave none.  The name is a function of (UIDL, digest), which is
exactly when a message counts as "already archived", so the duplicate check
is a lookup of one name instead of a sidecar index that could disagree with
the directory after a crash.  The name holds only ``[0-9a-f.unh]``: no
``/``, no ``:`` (the Maildir info separator), no ``,`` (Dovecot reads
``,S=`` and ``,W=`` fields in a name), so Dovecot, mutt and ``mailbox``
take it as an ordinary unique name.  A reader that opens the archive moves
``new/X`` to ``cur/X:2,<flags>``; the store (and ``audit verify
--retention``) therefore finds a message by that base name in ``new/`` or
``cur/``, whatever its flags (:meth:`RetentionStore.locate`).

*Writing* (the Maildir way).  :meth:`RetentionStore.open` creates a file in
``tmp/`` (a unique name, ``O_EXCL``, mode 0600); :meth:`ArchiveWriter.write`
streams the message into it while hashing it (:meth:`ArchiveWriter.finish`
closes the file of a whole copy that waits for its DELE, so waiting copies
hold no file descriptor); :meth:`ArchiveWriter.commit`
refuses a copy whose SHA-256 or size differ from what the caller saw, then
``fsync`` s the file, and either finds the same message already archived
(the temporary file is removed; ``stored=False``) or renames the file into
``new/`` and ``fsync`` s ``new/``.  Only after that does it return, and only
then may the DELE be forwarded.  A crash at any point before the rename
leaves nothing in ``new/`` (a file in ``tmp/``, removed after 36 hours as
Maildir readers do); after the directory ``fsync`` the copy survives a
power cut.

*Failing closed.*  Every failure raises :class:`RetentionError` with a
short reason fit for an audit record (``cannot write the copy: No space
left on device``): never a path, never an exception's repr.  The writer's
temporary file is removed on any failure.

The API is blocking: the trio shell calls it from a worker thread.  One
store may be used by several threads at once.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import os
import re
import secrets
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Self

__all__ = [
    "MAX_UIDL",
    "STALE_TMP_SECONDS",
    "ArchiveWriter",
    "Archived",
    "RetentionError",
    "RetentionStore",
    "account_dir",
    "account_from_dir",
    "message_name",
]

#: Mode of every directory the store makes: the archive holds other
#: people's mail.
DIR_MODE: Final = 0o700
#: Mode of every message file.
FILE_MODE: Final = 0o600
#: Maildir's rule: a file in ``tmp/`` untouched for 36 hours is debris from
#: a crashed writer and may be removed (the Maildir specification, cr.yp.to).
STALE_TMP_SECONDS: Final = 36 * 3600
#: How often (at most) one account's ``tmp/`` is swept, at :meth:`~RetentionStore.open`.
SWEEP_INTERVAL_SECONDS: Final = 3600
#: A UIDL is 1 to 70 octets (RFC 1939 §7); a longer one (a non-conforming
#: server) is named by its SHA-256 so the file name stays bounded.
MAX_UIDL: Final = 70
#: The longest file name most file systems allow (NAME_MAX).
MAX_NAME: Final = 255
#: How many accounts' ``cur/`` listings are kept (see :class:`_CurIndex`).
CUR_INDEX_ACCOUNTS: Final = 16
#: A directory listing taken less than this long after the directory's
#: mtime is not trusted later: a change in the same clock tick (coarse
#: timestamps) would not change the mtime again.
RACY_SECONDS: Final = 2
#: Bytes read at a time when hashing a stored copy.
READ_CHUNK: Final = 1 << 16

_SAFE_BYTES: Final = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789._@+-")
_DIGEST_RE: Final = re.compile(r"[0-9a-f]{64}\Z")
_NAME_RE: Final = re.compile(r"([0-9a-f]{64})\.(n|u(?:[0-9a-f]{2})+|h[0-9a-f]{64})\Z")
_PERCENT_RE: Final = re.compile(r"%([0-9A-F]{2})")
_INFO_SEPARATOR: Final = ":"
_SUBDIRS: Final = ("tmp", "new", "cur")


class RetentionError(Exception):
    """No copy can be made (or found).  ``reason`` is fit for an audit record."""

    def __init__(self, reason: str, *, errno_value: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        #: The ``errno`` of the underlying OS error, if there was one.
        self.errno = errno_value


def _os_failure(action: str, exc: OSError) -> RetentionError:
    """A :class:`RetentionError` for *exc*: what failed and the OS's words, no path."""
    code = exc.errno
    words = os.strerror(code) if code is not None else "unknown error"
    return RetentionError(f"cannot {action}: {words}", errno_value=code)


@dataclass(frozen=True, slots=True)
class Archived:
    """Where a message's copy is, and whether this call stored it."""

    #: Relative to the store's root, ``/``-separated: ``alice/new/<name>``.
    path: str
    #: True: written now.  False: an identical copy (same UIDL and digest)
    #: was already there.
    stored: bool


# --------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------


def account_dir(account: str) -> str:
    """The directory name of *account*'s Maildir (injective, never ``.``/``..``).

    ``RetentionError`` for an empty account or one whose name would be
    longer than a file name may be.
    """
    if not account:
        raise RetentionError("the account name is empty")
    raw = account.encode("utf-8", "surrogatepass")
    out = []
    for index, byte in enumerate(raw):
        if byte in _SAFE_BYTES and not (index == 0 and byte == ord(".")):
            out.append(chr(byte))
        else:
            out.append(f"%{byte:02X}")
    name = "".join(out)
    if len(name) > MAX_NAME:
        raise RetentionError("the account name is too long for a directory name")
    return name


def account_from_dir(name: str) -> str:
    """The account whose Maildir is *name* (the inverse of :func:`account_dir`).

    ``ValueError`` if *name* is not a name :func:`account_dir` makes.
    """
    try:
        raw = _PERCENT_RE.sub(lambda m: chr(int(m[1], 16)), name).encode("latin-1")
        account = raw.decode("utf-8", "surrogatepass")
        if account_dir(account) == name:
            return account
    except (UnicodeError, RetentionError):
        pass
    raise ValueError(f"not an account directory name: {name!r}")


def _uidl_part(uidl: str | None) -> str:
    if uidl is None:
        return "n"
    raw = uidl.encode("utf-8", "surrogatepass")
    if not raw:
        raise RetentionError("the UIDL is empty")
    return "u" + raw.hex() if len(raw) <= MAX_UIDL else "h" + hashlib.sha256(raw).hexdigest()


def message_name(uidl: str | None, digest: str) -> str:
    """The file name (without Maildir info) of the message (*uidl*, *digest*)."""
    if not _DIGEST_RE.match(digest):
        raise RetentionError("the digest is not 64 lower-case hex digits")
    return f"{digest}.{_uidl_part(uidl)}"


def base_name(file_name: str) -> str:
    """A Maildir file name without its info (``:2,S``): the message's unique name."""
    return file_name.partition(_INFO_SEPARATOR)[0]


def file_digest(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of the file at *path* (``OSError`` if it cannot be read)."""
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(READ_CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


# --------------------------------------------------------------------------
# Finding a message whatever a reader did to its name
# --------------------------------------------------------------------------


@dataclass(slots=True)
class _Listing:
    key: tuple[int, int, int]  # (device, inode, mtime_ns) of cur/
    trusted: bool
    names: dict[str, str]  # base name -> file name


class _CurIndex:
    """Base name -> file name in ``cur/``, re-listed only when ``cur/`` changes.

    popguard renames into ``new/`` only, so ``cur/`` changes only when a
    reader opens the archive (or flags a message): its listing can be kept
    and reused until its mtime moves.  Kept for the last
    :data:`CUR_INDEX_ACCOUNTS` Maildirs used.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._listings: collections.OrderedDict[str, _Listing] = collections.OrderedDict()

    def find(self, cur: str, base: str) -> str | None:
        """The file name in *cur* whose base name is *base*, if any (``OSError``)."""
        info = os.stat(cur)
        key = (info.st_dev, info.st_ino, info.st_mtime_ns)
        with self._lock:
            listing = self._listings.get(cur)
            if listing is None or not listing.trusted or listing.key != key:
                listing = self._list(cur, key)
                self._listings[cur] = listing
            self._listings.move_to_end(cur)
            while len(self._listings) > CUR_INDEX_ACCOUNTS:
                self._listings.popitem(last=False)
            return listing.names.get(base)

    @staticmethod
    def _list(cur: str, key: tuple[int, int, int]) -> _Listing:
        listed_at = time.time_ns()
        names: dict[str, str] = {}
        with os.scandir(cur) as entries:
            for entry in entries:
                names[base_name(entry.name)] = entry.name
        trusted = listed_at - key[2] >= RACY_SECONDS * 1_000_000_000
        return _Listing(key, trusted, names)


# --------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------


class RetentionStore:
    """The Maildir archive under *root* (created, mode 0700, if missing).

    ``RetentionError`` if *root* cannot be made or is not a directory.
    ``create=False`` (for readers such as ``audit verify --retention``)
    never creates it: a missing root is a ``RetentionError`` too.
    """

    def __init__(self, root: str | os.PathLike[str], *, create: bool = True) -> None:
        self.root = Path(root).absolute()
        if create:
            try:
                _make_dir(self.root, parents=True)
            except OSError as exc:
                raise _os_failure("create the retention store", exc) from None
        if not self.root.is_dir():
            raise RetentionError("the retention store is not a directory")
        self._cur = _CurIndex()
        self._lock = threading.Lock()
        #: Account directory -> when its tmp/ was last swept (monotonic).
        self._swept: dict[str, float] = {}

    def maildir(self, account: str) -> Path:
        """The path of *account*'s Maildir (not created here)."""
        return self.root / account_dir(account)

    # -- writing -----------------------------------------------------------

    def open(self, account: str, uidl: str | None) -> ArchiveWriter:
        """A writer for a copy of one message of *account* (the Maildir is made if missing)."""
        directory = account_dir(account)
        _uidl_part(uidl)  # refused now rather than at commit
        maildir = self.root / directory
        try:
            self._prepare(maildir)
        except OSError as exc:
            raise _os_failure("create the account's Maildir", exc) from None
        self._maybe_sweep(directory, maildir / "tmp")
        now = time.time()
        seconds = int(now)
        unique = (
            f"{seconds}.M{int((now - seconds) * 1_000_000):06d}P{os.getpid()}"
            f"R{secrets.token_hex(8)}.popguard"
        )
        tmp = maildir / "tmp" / unique
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(tmp, flags | getattr(os, "O_NOFOLLOW", 0), FILE_MODE)
        except OSError as exc:
            raise _os_failure("create the copy", exc) from None
        return ArchiveWriter(self, directory, uidl, fd, tmp)

    def _prepare(self, maildir: Path) -> None:
        """Make *maildir* and its tmp/, new/, cur/ (made ones are fsynced into place)."""
        made = _make_dir(maildir)
        for sub in _SUBDIRS:
            made = _make_dir(maildir / sub) or made
        if made:
            _fsync_dir(maildir)
            _fsync_dir(self.root)

    def _maybe_sweep(self, directory: str, tmp: Path) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._swept.get(directory)
            if last is not None and now - last < SWEEP_INTERVAL_SECONDS:
                return
            self._swept[directory] = now
        sweep_tmp(tmp)

    # -- finding -----------------------------------------------------------

    def locate(self, relative: str) -> Path | None:
        """Where the copy recorded as *relative* (``alice/new/<name>``) is now.

        A Maildir reader moves ``new/X`` to ``cur/X:2,<flags>`` and changes
        the flags later: the message is found by its base name in ``new/``
        or ``cur/`` of the same Maildir.  None if it is in neither, or if
        *relative* is not ``<account-dir>/{new,cur}/<name>``
        (``RetentionError`` if a directory cannot be read).
        """
        parts = relative.split("/")
        if len(parts) != 3 or parts[1] not in ("new", "cur"):
            return None
        directory, _sub, file_name = parts
        base = base_name(file_name)
        if not _safe_component(directory) or not _safe_component(base):
            return None
        try:
            return self._find(self.root / directory, base)
        except OSError as exc:
            raise _os_failure("read the account's Maildir", exc) from None

    def _find(self, maildir: Path, base: str) -> Path | None:
        """The file of message *base* in *maildir*'s new/ or cur/ (``OSError``)."""
        candidate = maildir / "new" / base
        try:
            if stat.S_ISREG(os.lstat(candidate).st_mode):
                return candidate
        except FileNotFoundError:
            pass
        try:
            found = self._cur.find(str(maildir / "cur"), base)
        except FileNotFoundError:
            return None
        return None if found is None else maildir / "cur" / found

    def lookup(self, account: str, uidl: str | None, digest: str) -> str | None:
        """The relative path of an intact copy of (*uidl*, *digest*), if archived.

        The copy's SHA-256 is checked (a local read is cheaper than fetching
        the message again, and a DELE is about to rely on it): a copy that
        does not match is not returned.
        """
        directory = account_dir(account)
        name = message_name(uidl, digest)
        try:
            found = self._find(self.root / directory, name)
            if found is None or file_digest(found) != digest:
                return None
        except OSError as exc:
            raise _os_failure("read the archive", exc) from None
        return self.relative(found)

    def relative(self, path: Path) -> str:
        """*path* (under the root) as a record names it: ``/``-separated, relative."""
        return path.relative_to(self.root).as_posix()

    # -- used by ArchiveWriter ---------------------------------------------

    def _commit(self, directory: str, uidl: str | None, digest: str, tmp: Path) -> Archived:
        """Move the fsynced *tmp* into place, or find the same message already there."""
        maildir = self.root / directory
        name = message_name(uidl, digest)
        existing = self._find(maildir, name)
        if existing is not None:
            try:
                intact = file_digest(existing) == digest
            except FileNotFoundError:
                intact = False  # moved between the look and the read: store ours
                existing = None
            if intact and existing is not None:
                tmp.unlink()
                return Archived(self.relative(existing), stored=False)
        # A copy that no longer matches (damaged, edited) is replaced in place,
        # so no Maildir ever holds two files of one unique name.
        target = existing if existing is not None else maildir / "new" / name
        os.rename(tmp, target)
        _fsync_dir(target.parent)
        return Archived(self.relative(target), stored=True)


class ArchiveWriter:
    """One message being copied into ``tmp/``: write, (finish,) then commit or abort.

    The writer holds an open file until :meth:`finish`, :meth:`commit` or
    :meth:`abort`; a caller that keeps whole copies waiting for their DELE
    calls :meth:`finish` first, so that waiting copies hold no file
    descriptor.  Used as a context manager, a writer that was neither
    committed nor aborted is aborted on exit.
    """

    def __init__(
        self, store: RetentionStore, directory: str, uidl: str | None, fd: int, tmp: Path
    ) -> None:
        self._store = store
        self._directory = directory
        self._uidl = uidl
        #: The open file while writing; None once finished or closed.
        self._fd: int | None = fd
        self._closed = False
        self._tmp = tmp
        self._hasher = hashlib.sha256()
        #: Octets written so far.
        self.size = 0

    @property
    def closed(self) -> bool:
        """True once committed or aborted."""
        return self._closed

    def write(self, data: bytes) -> None:
        """Append *data* to the copy (and to its running SHA-256)."""
        self._usable()
        fd = self._fd
        if fd is None:
            raise RetentionError("the copy was already finished")
        view = memoryview(data)
        try:
            while view:
                written = os.write(fd, view)
                view = view[written:]
        except OSError as exc:
            self.abort()
            raise _os_failure("write the copy", exc) from None
        self._hasher.update(data)
        self.size += len(data)

    def finish(self) -> None:
        """The whole message is written: close the file (no fd held while waiting).

        Not synced yet: :meth:`commit` syncs it, so a copy that is never
        committed (a message retrieved but not deleted) costs no fsync.
        """
        self._usable()
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.close(fd)
        except OSError as exc:
            self.abort()
            raise _os_failure("write the copy", exc) from None

    def commit(self, digest: str, size: int) -> Archived:
        """Make the copy durable in ``new/`` (or find it there); then the DELE may go.

        *digest* and *size* are what the caller saw pass: a copy that
        differs is refused (``RetentionError``), never stored.
        """
        self._usable()
        if not _DIGEST_RE.match(digest):
            self.abort()
            raise RetentionError("the digest is not 64 lower-case hex digits")
        if size != self.size or digest != self._hasher.hexdigest():
            self.abort()
            raise RetentionError("the copy does not match the message (its digest or size differ)")
        try:
            self._sync()
        except OSError as exc:
            self.abort()
            raise _os_failure("sync the copy to disk", exc) from None
        self._closed = True
        try:
            return self._store._commit(self._directory, self._uidl, digest, self._tmp)
        except OSError as exc:
            self._remove_tmp()
            raise _os_failure("move the copy into the Maildir", exc) from None
        except BaseException:
            self._remove_tmp()
            raise

    def abort(self) -> None:
        """Drop the copy: close and remove the temporary file (idempotent)."""
        if self._closed:
            return
        self._closed = True
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):  # the file is removed below all the same
                os.close(fd)
        self._remove_tmp()

    def _sync(self) -> None:
        """fsync the file's data (through a new descriptor if it was finished)."""
        fd, self._fd = self._fd, None
        if fd is None:
            fd = os.open(self._tmp, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _usable(self) -> None:
        if self._closed:
            raise RetentionError("the copy was already committed or aborted")

    def _remove_tmp(self) -> None:
        with contextlib.suppress(OSError):  # else left in tmp/, swept later
            self._tmp.unlink()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.abort()


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def sweep_tmp(tmp: str | os.PathLike[str], now: float | None = None) -> int:
    """Remove regular files in *tmp* not modified for :data:`STALE_TMP_SECONDS`.

    Returns how many were removed.  Errors are ignored: sweeping is
    housekeeping and must never stop a copy being made.
    """
    limit = (time.time() if now is None else now) - STALE_TMP_SECONDS
    removed = 0
    try:
        with os.scandir(tmp) as entries:
            for entry in entries:
                try:
                    info = entry.stat(follow_symlinks=False)
                    if stat.S_ISREG(info.st_mode) and info.st_mtime < limit:
                        os.unlink(entry.path)
                        removed += 1
                except OSError:
                    continue
    except OSError:
        return removed
    return removed


def _safe_component(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\0" not in name


def _make_dir(path: Path, *, parents: bool = False) -> bool:
    """Create *path* with :data:`DIR_MODE`; False if it was already there."""
    try:
        path.mkdir(mode=DIR_MODE, parents=parents)
    except FileExistsError:
        if not path.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)) from None
        return False
    return True


def _fsync_dir(path: Path) -> None:
    """fsync a directory, so the names made or renamed in it survive a crash."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
