"""Shared state kept in this process: no Redis, or Redis's fail-open fallback.

Same semantics as :class:`popguard.sharedstate.redis.RedisState`, within one
process: sessions are held by id (so every call is idempotent and closing a
session this process never counted is harmless), and failed logins are
counted by :class:`popguard.policy.state.FailedLogins`, the table the
policies used before state was shared.  A session here needs no lease: it
ends with its process.

Nothing here waits on anything but one trio checkpoint per call.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import trio

from popguard.policy.state import FailedLogins
from popguard.sharedstate.base import Decision


class LocalState:
    """Leases and failed-login counts in this process's memory."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._sessions: set[str] = set()
        self._per_client: dict[str, set[str]] = {}
        self._per_user: dict[str, set[str]] = {}
        self._failures = FailedLogins()

    # -- counts (for tests and metrics) --------------------------------------
    @property
    def total(self) -> int:
        return len(self._sessions)

    def client_sessions(self, client: str) -> int:
        return len(self._per_client.get(client, ()))

    def user_sessions(self, user: str) -> int:
        return len(self._per_user.get(user, ()))

    # -- the SharedState interface -------------------------------------------
    async def open_session(
        self, session: str, client: str, *, total: int | None, per_client: int | None
    ) -> Decision:
        await trio.lowlevel.checkpoint()
        if session not in self._sessions:
            if total is not None and len(self._sessions) >= total:
                return Decision.TOTAL
            if per_client is not None and self.client_sessions(client) >= per_client:
                return Decision.PER_CLIENT
        self._sessions.add(session)
        self._per_client.setdefault(client, set()).add(session)
        return Decision.OK

    async def claim_user(self, session: str, user: str, *, limit: int | None) -> Decision:
        await trio.lowlevel.checkpoint()
        holders = self._per_user.get(user, set())
        if session not in holders and limit is not None and len(holders) >= limit:
            return Decision.PER_USER
        self._per_user.setdefault(user, set()).add(session)
        return Decision.OK

    async def release_user(self, session: str, user: str) -> None:
        await trio.lowlevel.checkpoint()
        _discard(self._per_user, user, session)

    async def close_session(self, session: str, client: str, user: str | None) -> None:
        await trio.lowlevel.checkpoint()
        self._sessions.discard(session)
        _discard(self._per_client, client, session)
        if user is not None:
            _discard(self._per_user, user, session)

    async def blocked_for(self, keys: Sequence[str]) -> dict[str, float]:
        await trio.lowlevel.checkpoint()
        now = self._clock()
        return {key: self._failures.blocked_for(key, now) for key in keys}

    async def record_failure(self, key: str, *, failures: int, window: float, block: float) -> bool:
        await trio.lowlevel.checkpoint()
        return self._failures.failed(
            key, self._clock(), failures=failures, window=window, block=block
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Nothing to keep up: leases here end with the process."""
        task_status.started()
        await trio.sleep_forever()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


def _discard(table: dict[str, set[str]], key: str, session: str) -> None:
    holders = table.get(key)
    if holders is None:
        return
    holders.discard(session)
    if not holders:
        del table[key]
