"""What popguard does when the shared store is unavailable: ``on_failure``.

* ``fail-open``: decisions come from this process's own counters (a
  :class:`~popguard.sharedstate.local.LocalState`), so limits hold per
  process, as without shared state; logins go on.
* ``fail-closed``: decisions raise :class:`SharedStateRefused`; the caller
  refuses the login with ``-ERR [SYS/TEMP]``.  Nobody logs in until the
  store answers again.

The fallback mirrors this process's part of the shared state at all times
(every session the store admitted, every failed login it counted), so
during an outage a limit counts every session of this process, not only
those admitted since the outage began.  Records (a failed login, a
released slot, a closed session) never raise: they go to the store when it
answers, and always to the fallback (closing a session it never saw is
harmless).  A failed login during an outage is counted in the fallback in
either mode, so a throttle still holds per process.

An outage is reported once (``shared_state.unavailable``) and its end once
(``shared_state.recovered``), through ``on_event``; the counters are plain
attributes for ``/metrics``.  The heartbeat (:meth:`ResilientState.run`)
also tells when an outage ends while no session is deciding anything.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Final, Literal, TypeVar

import trio

from popguard.sharedstate.base import Decision, SharedStateRefused, SharedStateUnavailable
from popguard.sharedstate.local import LocalState
from popguard.sharedstate.redis import RedisState

T = TypeVar("T")
OnFailure = Literal["fail-open", "fail-closed"]
EventSink = Callable[[str, dict[str, object]], None]

#: ``on_failure`` values.
ON_FAILURE: Final = ("fail-open", "fail-closed")


class ResilientState:
    """A :class:`RedisState` that degrades as ``on_failure`` says."""

    def __init__(
        self,
        primary: RedisState,
        fallback: LocalState,
        on_failure: OnFailure,
        on_event: EventSink,
    ) -> None:
        if on_failure not in ON_FAILURE:
            raise ValueError(f"on_failure must be one of {', '.join(ON_FAILURE)}")
        self.primary = primary
        self.fallback = fallback
        self.on_failure = on_failure
        self._on_event = on_event
        self._outage_since: float | None = None
        #: Operations the store failed (each one, not each outage).
        self.unavailable_total = 0
        #: Decisions answered by the fallback (fail-open).
        self.fallback_decisions_total = 0
        #: Decisions refused because the store was unavailable (fail-closed).
        self.refused_total = 0

    @property
    def healthy(self) -> bool:
        """False from a failed store operation until one succeeds (``/readyz``)."""
        return self._outage_since is None

    # -- decisions -------------------------------------------------------------
    async def open_session(
        self, session: str, client: str, *, total: int | None, per_client: int | None
    ) -> Decision:
        try:
            decision = await self.primary.open_session(
                session, client, total=total, per_client=per_client
            )
        except SharedStateUnavailable as exc:
            return await self._degraded(
                exc,
                lambda: self.fallback.open_session(
                    session, client, total=total, per_client=per_client
                ),
            )
        self._recovered()
        if decision is Decision.OK:  # mirrored: this process's own count
            await self.fallback.open_session(session, client, total=None, per_client=None)
        return decision

    async def claim_user(self, session: str, user: str, *, limit: int | None) -> Decision:
        try:
            decision = await self.primary.claim_user(session, user, limit=limit)
        except SharedStateUnavailable as exc:
            return await self._degraded(
                exc, lambda: self.fallback.claim_user(session, user, limit=limit)
            )
        self._recovered()
        if decision is Decision.OK:
            await self.fallback.claim_user(session, user, limit=None)
        return decision

    async def blocked_for(self, keys: Sequence[str]) -> dict[str, float]:
        try:
            left = await self.primary.blocked_for(keys)
        except SharedStateUnavailable as exc:
            return await self._degraded(exc, lambda: self.fallback.blocked_for(keys))
        self._recovered()
        return left

    # -- records -----------------------------------------------------------------
    async def record_failure(self, key: str, *, failures: int, window: float, block: float) -> bool:
        try:
            started = await self.primary.record_failure(
                key, failures=failures, window=window, block=block
            )
        except SharedStateUnavailable as exc:
            self._unavailable(exc)
            return await self.fallback.record_failure(
                key, failures=failures, window=window, block=block
            )
        self._recovered()
        await self.fallback.record_failure(key, failures=failures, window=window, block=block)
        return started

    async def release_user(self, session: str, user: str) -> None:
        await self.fallback.release_user(session, user)
        await self._record(self.primary.release_user(session, user))

    async def close_session(self, session: str, client: str, user: str | None) -> None:
        await self.fallback.close_session(session, client, user)
        await self._record(self.primary.close_session(session, client, user))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The primary's heartbeat, which also notices an outage and its end."""
        task_status.started()
        while True:
            await trio.sleep(self.primary.lease_seconds / 3)
            await self._record(self.primary.renew())

    async def aclose(self) -> None:
        await self.primary.aclose()
        await self.fallback.aclose()

    # -- how an outage is handled --------------------------------------------------
    async def _degraded(
        self, exc: SharedStateUnavailable, fallback: Callable[[], Awaitable[T]]
    ) -> T:
        """A decision the store could not make: refuse, or ask the fallback."""
        self._unavailable(exc)
        if self.on_failure == "fail-closed":
            self.refused_total += 1
            raise SharedStateRefused(exc.reason) from None
        self.fallback_decisions_total += 1
        return await fallback()

    async def _record(self, operation: Awaitable[object]) -> None:
        try:
            await operation
        except SharedStateUnavailable as exc:
            self._unavailable(exc)
        else:
            self._recovered()

    def _unavailable(self, exc: SharedStateUnavailable) -> None:
        self.unavailable_total += 1
        if self._outage_since is None:
            self._outage_since = trio.current_time()
            self._on_event(
                "shared_state.unavailable",
                {"reason": exc.reason, "on_failure": self.on_failure},
            )

    def _recovered(self) -> None:
        if self._outage_since is None:
            return
        seconds = trio.current_time() - self._outage_since
        self._outage_since = None
        self._on_event(
            "shared_state.recovered",
            {
                "outage_seconds": round(seconds, 3),
                "unavailable_total": self.unavailable_total,
                "fallback_decisions_total": self.fallback_decisions_total,
                "refused_total": self.refused_total,
            },
        )
