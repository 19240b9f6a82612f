"""Counts that policies enforce, shared by every popguard process (issue #14).

:class:`LocalState` keeps them in this process; :class:`RedisState` keeps
them in Redis for every process and host; :class:`ResilientState` decides
what happens when Redis is unavailable (``on_failure``).  See
``docs/shared-state.md``.
"""

from popguard.sharedstate.base import (
    Decision,
    SharedState,
    SharedStateRefused,
    SharedStateUnavailable,
)
from popguard.sharedstate.factory import open_shared_state
from popguard.sharedstate.local import LocalState
from popguard.sharedstate.redis import RedisState
from popguard.sharedstate.resilient import ResilientState

__all__ = [
    "Decision",
    "LocalState",
    "RedisState",
    "ResilientState",
    "SharedState",
    "SharedStateRefused",
    "SharedStateUnavailable",
    "open_shared_state",
]
