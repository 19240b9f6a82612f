"""Build the shared state the configuration asks for."""

from __future__ import annotations

from pathlib import Path

from popguard.sharedstate.local import LocalState
from popguard.sharedstate.redis import (
    DEFAULT_LEASE_SECONDS,
    DEFAULT_OP_TIMEOUT,
    RedisState,
)
from popguard.sharedstate.resilient import EventSink, OnFailure, ResilientState


def open_shared_state(
    url: str | None,
    *,
    password_file: str | Path | None = None,
    ca_file: str | None = None,
    on_failure: OnFailure = "fail-open",
    on_event: EventSink,
    key_prefix: str = "popguard",
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    op_timeout: float = DEFAULT_OP_TIMEOUT,
) -> LocalState | ResilientState:
    """This process's counters without ``url``; else Redis, degrading as ``on_failure`` says.

    Nothing is contacted yet: the first operation connects.  Run the
    result's ``run`` in a nursery (the lease heartbeat) and ``aclose`` it at
    shutdown.
    """
    if url is None:
        return LocalState()
    primary = RedisState(
        url,
        password_file=password_file,
        ca_file=ca_file,
        key_prefix=key_prefix,
        lease_seconds=lease_seconds,
        op_timeout=op_timeout,
    )
    return ResilientState(primary, LocalState(), on_failure, on_event)
