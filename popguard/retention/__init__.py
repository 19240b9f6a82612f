"""The retention store: a Maildir archive of every message before its DELE.

Blocking I/O, called from a worker thread by the shell; see
:mod:`popguard.retention.store` and ``docs/retention.md``.
"""

from popguard.retention.store import (
    Archived,
    ArchiveWriter,
    RetentionError,
    RetentionStore,
    account_dir,
    account_from_dir,
    file_digest,
    message_name,
)

__all__ = [
    "ArchiveWriter",
    "Archived",
    "RetentionError",
    "RetentionStore",
    "account_dir",
    "account_from_dir",
    "file_digest",
    "message_name",
]
