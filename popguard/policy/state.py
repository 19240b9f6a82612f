"""State that policies share across sessions: who is connected, who failed.

Both trackers live in one popguard process.  With several processes (or
hosts) each counts only its own sessions and failures: a limit of 3
sessions per user becomes 3 per process.  ``docs/policies.md`` says so.

No clock is read here: every method that needs the time takes ``now``
(seconds, any monotonic origin), passed in by the shell.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Final

#: At most this many distinct keys are tracked for failed logins; beyond it,
#: the oldest key is forgotten (bounded memory under a spray of user names).
MAX_THROTTLE_KEYS: Final = 100_000


class SessionCounts:
    """Active sessions in total, per client address and per user."""

    def __init__(self) -> None:
        self.total = 0
        self.per_client: Counter[str] = Counter()
        self.per_user: Counter[str] = Counter()

    def opened(self, client: str) -> None:
        self.total += 1
        self.per_client[client] += 1

    def closed(self, client: str, user: str | None) -> None:
        self.total -= 1
        _decrement(self.per_client, client)
        if user is not None:
            _decrement(self.per_user, user)

    def logged_in(self, user: str) -> None:
        self.per_user[user] += 1


def _decrement(counter: Counter[str], key: str) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


@dataclass(slots=True)
class _Failures:
    times: deque[float] = field(default_factory=deque)
    blocked_until: float = 0.0


class FailedLogins:
    """Failed logins per key (``client:ADDR`` or ``user:NAME``), and blocks.

    A key is blocked once it has ``failures`` failures within ``window``
    seconds, until ``block`` seconds after the failure that crossed the line.
    A success does not clear the count (an attacker with one valid account
    must not reset another's failures from the same address).
    """

    def __init__(self, max_keys: int = MAX_THROTTLE_KEYS) -> None:
        self._keys: dict[str, _Failures] = {}
        self._max_keys = max_keys

    def blocked_for(self, key: str, now: float) -> float:
        """Seconds the key stays blocked (0.0 if it is not blocked)."""
        entry = self._keys.get(key)
        if entry is None:
            return 0.0
        return max(0.0, entry.blocked_until - now)

    def failed(self, key: str, now: float, *, failures: int, window: float, block: float) -> bool:
        """Count a failure; True if this one starts a block."""
        entry = self._keys.pop(key, None) or _Failures()
        self._keys[key] = entry  # most recently used last
        times = entry.times
        times.append(now)
        while times and times[0] <= now - window:
            times.popleft()
        while len(times) > failures:
            times.popleft()
        if len(self._keys) > self._max_keys:
            del self._keys[next(iter(self._keys))]
        if len(times) >= failures and entry.blocked_until <= now:
            entry.blocked_until = now + block
            times.clear()
            return True
        return False

    def __len__(self) -> int:
        return len(self._keys)
