"""The interface every shared-state backend offers, and its two errors.

A *decision* (:meth:`SharedState.open_session`, :meth:`SharedState.claim_user`,
:meth:`SharedState.blocked_for`) answers whether a limit lets a session go
on; a *record* (:meth:`SharedState.record_failure`,
:meth:`SharedState.release_user`, :meth:`SharedState.close_session`) changes
what later decisions see.  Sessions are named by the caller's session id;
every method is idempotent per session, so a retried call never counts a
session twice.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Protocol

import trio


class Decision(enum.Enum):
    """Which limit refused a session, or ``OK``."""

    OK = "ok"
    TOTAL = "max_sessions_total"
    PER_CLIENT = "max_sessions_per_client"
    PER_USER = "max_sessions_per_user"


class SharedStateUnavailable(Exception):
    """The store did not answer in time, or answered with an error.

    ``reason`` is safe to log: it never holds the store's password.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SharedStateRefused(Exception):
    """``on_failure: fail-closed`` and the store is unavailable: refuse the login.

    The caller answers ``-ERR [SYS/TEMP]`` (RFC 3206: a temporary failure).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SharedState(Protocol):
    """Session leases and failed-login counts, shared by every popguard process."""

    async def open_session(
        self, session: str, client: str, *, total: int | None, per_client: int | None
    ) -> Decision:
        """Add a lease for ``session`` unless ``total`` or ``per_client`` is reached.

        ``None`` is no limit.  A session already holding a lease keeps it (OK).
        """
        ...

    async def claim_user(self, session: str, user: str, *, limit: int | None) -> Decision:
        """A lease in ``user``'s set if it holds fewer than ``limit`` live sessions."""
        ...

    async def release_user(self, session: str, user: str) -> None:
        """The login failed: give the user slot back."""
        ...

    async def close_session(self, session: str, client: str, user: str | None) -> None:
        """The session is over: remove every lease it holds."""
        ...

    async def blocked_for(self, keys: Sequence[str]) -> dict[str, float]:
        """Seconds each key stays blocked (0.0: not blocked)."""
        ...

    async def record_failure(self, key: str, *, failures: int, window: float, block: float) -> bool:
        """Count a failed login under ``key``; True if this one starts a block.

        ``failures`` failures within ``window`` seconds block the key for
        ``block`` seconds, as :class:`popguard.policy.state.FailedLogins`.
        """
        ...

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Background upkeep (the lease heartbeat), for ``nursery.start``."""
        ...

    async def aclose(self) -> None:
        """Release the connection; leases left behind expire on their own."""
        ...
