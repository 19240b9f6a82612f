"""The audit chain's HMAC key file: read and checked, for the trail and the config.

:mod:`popguard.trail.chain` re-exports these names; the config file checks
``audit.hmac_key_file`` with :func:`load_key` without importing the trail.
"""

from __future__ import annotations

import os
import stat
from typing import Final

MIN_KEY_BYTES: Final = 32


class ChainError(Exception):
    """A chain cannot be built, sealed or resumed as asked."""


class KeyFileError(ChainError):
    """The HMAC key file is unusable (permissions, length, type)."""


def load_key(path: str | os.PathLike[str]) -> bytes:
    """Read an HMAC key file: at least 32 bytes, trailing newline stripped.

    Refuses a file that others may read or write (``chmod 600`` or ``640``
    it), or that is not a regular file.  ``openssl rand -hex 32 > key``
    makes a good one (64 bytes of key material).
    """
    name = os.fspath(path)
    # No following a symlink, no blocking on a FIFO; checks on the open file.
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise KeyFileError(f"{name}: cannot open key file: {exc.strerror}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(f"{name}: key file is not a regular file")
        mode = stat.S_IMODE(info.st_mode)
        if mode & (stat.S_IROTH | stat.S_IWOTH | stat.S_IWGRP):
            raise KeyFileError(
                f"{name}: key file is accessible to others (mode {mode:04o}); run: chmod 600 {name}"
            )
        data = os.read(fd, 1 << 16)
    finally:
        os.close(fd)
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    if len(data) < MIN_KEY_BYTES:
        raise KeyFileError(f"{name}: key is {len(data)} bytes; at least {MIN_KEY_BYTES} are needed")
    return data
