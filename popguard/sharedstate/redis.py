"""Shared state on Redis: session leases and failed-login counts for every process.

Theory of operation
-------------------
*Leases.*  A session counts while it holds a lease: a member
``INSTANCE:SESSION`` of a sorted set, scored by the time (Redis's clock, ms)
the lease ends.  There is one set for all sessions, one per client address
and one per user.  Deciding drops the ended leases of the sets it reads,
counts, and adds the new lease, in one Lua script (:mod:`.scripts`), so two
processes racing for the last slot cannot both get it.  :meth:`RedisState.run`
renews this process's leases every ``lease_seconds / 3`` in one round trip
(per :data:`RENEW_BATCH` sessions).  **Bound:** a process that dies without
closing its sessions (SIGKILL, power loss) stops counting at most
``lease_seconds`` after its last heartbeat, so at most ``lease_seconds``
(30 s by default) after it died.

*Failed logins* are a list of failure times per key and a block key that
holds when the block ends (``popguard.policy.state.FailedLogins``'s rule).

*Keys* are ``PREFIX:sessions``, ``PREFIX:client:H``, ``PREFIX:user:H``,
``PREFIX:fails:H`` and ``PREFIX:block:H``, where ``H`` is a 128-bit BLAKE2b
digest of the address or key (bounded size whatever a client sends).  Every
key expires: a lease set with its last lease, failures a ``window`` after
the last one, a block when it ends.

*Threads.*  redis-py is a blocking client; every call runs in one dedicated
thread fed by a queue (:mod:`.thread`), over one connection.  The
alternative, ``trio.to_thread.run_sync`` per call under a CapacityLimiter of
8 threads and connections, was measured against it (``python -m
tests.sharedstate.measure``: 4000 ``open_session`` decisions per case,
loopback, redis-server 7.0, redis-py 8.2, 2 vCPUs shared with other work;
median of 4 rounds, microseconds):

============================  =====  ======  =============  ===========
case                          p50    p99     CPU/decision   decisions/s
============================  =====  ======  =============  ===========
redis-py alone (no trio)      80     138     51             11800
dedicated thread, 1 at once   191    318     156            4800
``to_thread``, 1 at once      245    365     201            3900
dedicated thread, 32 at once  6025   9930    169            4800
``to_thread``, 32 at once     7400   13700   240            4600
============================  =====  ======  =============  ===========

The dedicated thread is faster one at a time and cheaper in CPU; under
load both are bound by the GIL (the same throughput; the dedicated
thread's p99 is lower).  At 32 at once the latency is queueing: 32
decisions of about 190 us each.

*Failures.*  Every operation ends within ``op_timeout`` seconds: it raises
:class:`SharedStateUnavailable` if Redis does not answer in time (the
thread is abandoned and ends at its socket timeout, the same
``op_timeout``) or answers with an error.  Each operation is sent at most
once (redis-py's retries are off): a failure counted twice would tighten a
throttle.  After a failure, operations fail at once for a backoff that
doubles from :data:`BACKOFF_MIN` to :data:`BACKOFF_MAX` seconds, then the
next one tries again, on a fresh connection: no restart is needed when
Redis comes back.  Scripts are sent by digest (``EVALSHA``) and loaded
again when a restarted Redis answers ``NOSCRIPT``.  A decision that timed
out may still have been applied: its lease, unknown here, ends within
``lease_seconds``.

*Secrets.*  The password is read from a file and given to redis-py, never
kept in a URL; a URL with a password is refused.  Error texts are redis-py's
own (no password in them) and, to be sure, the password is masked in them.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import parse_qs, urlsplit

import redis
import trio
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from popguard.sharedstate import scripts
from popguard.sharedstate.base import Decision, SharedStateUnavailable
from popguard.sharedstate.thread import RedisThread

T = TypeVar("T")

#: URL schemes redis-py understands: TCP, TLS, a Unix socket.
SCHEMES: Final = frozenset({"redis", "rediss", "unix"})
#: Default lease: how long a dead process's sessions keep counting, at most.
DEFAULT_LEASE_SECONDS: Final = 30.0
#: Default time an operation may take before the store counts as unavailable.
#: Loopback or LAN Redis answers in well under a millisecond.
DEFAULT_OP_TIMEOUT: Final = 0.5
#: Backoff after a failure before the store is tried again, in seconds.
BACKOFF_MIN: Final = 0.1
BACKOFF_MAX: Final = 2.0
#: Sessions renewed per heartbeat round trip (a script runs alone in Redis:
#: keep each one short).
RENEW_BATCH: Final = 500
#: Session ids longer than this are hashed into the lease member.
MAX_SESSION_ID_CHARS: Final = 64
#: Key prefix: short, and safe in ``redis-cli`` output.
MAX_PREFIX_CHARS: Final = 64
_PREFIX_CHARS: Final = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.:-"
)
#: Bytes of BLAKE2b digest in a key name (128 bits: collisions are not a concern).
_DIGEST_SIZE: Final = 16
#: Error texts are cut to this many characters.
MAX_REASON_CHARS: Final = 200
_REDACTED: Final = "[password]"

_REFUSED_BY_SCRIPT: Final = {1: Decision.TOTAL, 2: Decision.PER_CLIENT, 3: Decision.PER_USER}


def read_password(path: str | Path) -> str:
    """The password in ``path``, without its trailing newline."""
    password = Path(path).read_text(encoding="utf-8").rstrip("\r\n")
    if not password:
        raise ValueError(f"{path}: the password file is empty")
    return password


def _digest(value: str) -> str:
    data = value.encode("utf-8", "surrogatepass")
    return hashlib.blake2b(data, digest_size=_DIGEST_SIZE).hexdigest()


def _millis(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def _check_url(url: str, ca_file: str | None) -> None:
    """Refuse what would put a secret in a URL or silently skip TLS."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise ValueError(f"shared_state: unknown scheme {parts.scheme!r} (redis, rediss, unix)")
    if parts.password is not None or "password" in parse_qs(parts.query):
        raise ValueError("shared_state: put the password in password_file, not in the URL")
    if ca_file is not None and parts.scheme != "rediss":
        raise ValueError("shared_state: a CA file needs a rediss:// URL")


@dataclass(slots=True)
class _Lease:
    """What this process renews for one of its sessions."""

    member: str
    client_key: str | None = None
    user_keys: set[str] = field(default_factory=set)


class RedisState:
    """The :class:`popguard.sharedstate.base.SharedState` of every process, on Redis."""

    def __init__(
        self,
        url: str,
        *,
        password_file: str | Path | None = None,
        ca_file: str | None = None,
        key_prefix: str = "popguard",
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        op_timeout: float = DEFAULT_OP_TIMEOUT,
        backoff: tuple[float, float] = (BACKOFF_MIN, BACKOFF_MAX),
    ) -> None:
        _check_url(url, ca_file)
        if not key_prefix or len(key_prefix) > MAX_PREFIX_CHARS or set(key_prefix) - _PREFIX_CHARS:
            raise ValueError(
                f"shared_state: key prefix must be 1-{MAX_PREFIX_CHARS} of [A-Za-z0-9_.:-]"
            )
        if lease_seconds <= 0 or op_timeout <= 0:
            raise ValueError("shared_state: lease_seconds and op_timeout must be positive")
        self._password = read_password(password_file) if password_file is not None else None
        options: dict[str, Any] = {}
        if ca_file is not None:
            options.update(ssl_ca_certs=ca_file, ssl_cert_reqs="required")
        self._client = redis.Redis.from_url(
            url,
            password=self._password,
            socket_timeout=op_timeout,
            socket_connect_timeout=op_timeout,
            retry=Retry(NoBackoff(), 0),
            max_connections=1,  # one thread, one connection
            client_name="popguard",
            **options,
        )
        self._open = self._client.register_script(scripts.OPEN_SESSION)
        self._claim = self._client.register_script(scripts.CLAIM_USER)
        self._renew = self._client.register_script(scripts.RENEW)
        self._record = self._client.register_script(scripts.RECORD_FAILURE)
        self._blocked = self._client.register_script(scripts.BLOCKED_FOR)
        self._prefix = key_prefix
        self._instance = secrets.token_hex(4)
        self.lease_seconds = lease_seconds
        self._lease_ms = _millis(lease_seconds)
        self._op_timeout = op_timeout
        self._thread = RedisThread("popguard-redis", on_exit=self._client.close)
        self._closed = False
        self._backoff_min, self._backoff_max = backoff
        self._backoff = 0.0
        self._retry_at = -math.inf
        self._last_error = ""
        self._leases: dict[str, _Lease] = {}

    # -- key names -------------------------------------------------------------
    @property
    def sessions_key(self) -> str:
        return f"{self._prefix}:sessions"

    def client_key(self, client: str) -> str:
        return f"{self._prefix}:client:{_digest(client)}"

    def user_key(self, user: str) -> str:
        return f"{self._prefix}:user:{_digest(user)}"

    def _fails_key(self, key: str) -> str:
        return f"{self._prefix}:fails:{_digest(key)}"

    def _block_key(self, key: str) -> str:
        return f"{self._prefix}:block:{_digest(key)}"

    def _member(self, session: str) -> str:
        if len(session) > MAX_SESSION_ID_CHARS:
            session = _digest(session)
        return f"{self._instance}:{session}"

    def _lease(self, session: str) -> _Lease:
        lease = self._leases.get(session)
        if lease is None:
            lease = self._leases[session] = _Lease(self._member(session))
        return lease

    @property
    def live_sessions(self) -> int:
        """Sessions of this process whose leases the heartbeat renews."""
        return len(self._leases)

    # -- the SharedState interface ---------------------------------------------
    async def open_session(
        self, session: str, client: str, *, total: int | None, per_client: int | None
    ) -> Decision:
        member = self._member(session)
        client_key = self.client_key(client)
        keys = [self.sessions_key, client_key]
        args: list[str | int] = [member, _limit(total), _limit(per_client), self._lease_ms]
        answer = await self._call("open_session", lambda: self._open(keys, args))
        decision = _REFUSED_BY_SCRIPT.get(int(answer), Decision.OK)
        if decision is Decision.OK:
            self._lease(session).client_key = client_key
        return decision

    async def claim_user(self, session: str, user: str, *, limit: int | None) -> Decision:
        user_key = self.user_key(user)
        args: list[str | int] = [self._member(session), _limit(limit), self._lease_ms]
        answer = await self._call("claim_user", lambda: self._claim([user_key], args))
        decision = _REFUSED_BY_SCRIPT.get(int(answer), Decision.OK)
        if decision is Decision.OK:
            self._lease(session).user_keys.add(user_key)
        return decision

    async def release_user(self, session: str, user: str) -> None:
        user_key = self.user_key(user)
        lease = self._leases.get(session)
        if lease is not None:
            lease.user_keys.discard(user_key)
        member = self._member(session)
        await self._call("release_user", lambda: self._client.zrem(user_key, member))

    async def close_session(self, session: str, client: str, user: str | None) -> None:
        lease = self._leases.pop(session, None)
        keys = {self.sessions_key, self.client_key(client)}
        if user is not None:
            keys.add(self.user_key(user))
        if lease is not None:
            keys |= lease.user_keys
        member = self._member(session)

        def remove() -> None:
            with self._client.pipeline(transaction=False) as pipe:
                for key in sorted(keys):
                    pipe.zrem(key, member)
                pipe.execute()

        await self._call("close_session", remove)

    async def blocked_for(self, keys: Sequence[str]) -> dict[str, float]:
        if not keys:
            return {}
        block_keys = [self._block_key(key) for key in keys]
        left = await self._call("blocked_for", lambda: self._blocked(block_keys))
        return {key: int(ms) / 1000 for key, ms in zip(keys, left, strict=True)}

    async def record_failure(self, key: str, *, failures: int, window: float, block: float) -> bool:
        if failures < 1 or window <= 0 or block <= 0:
            raise ValueError("failures, window and block must be positive")
        keys = [self._fails_key(key), self._block_key(key)]
        args = [failures, _millis(window), _millis(block)]
        answer = await self._call("record_failure", lambda: self._record(keys, args))
        return int(answer) == 1

    async def renew(self) -> int:
        """Renew every lease of this process (one round trip per :data:`RENEW_BATCH`).

        Without leases, checks that Redis answers (``PING``): the heartbeat
        also tells when an outage ends.  Returns the leases renewed.
        """
        batch: list[tuple[str, str]] = []
        batches: list[list[tuple[str, str]]] = []
        for count, lease in enumerate(list(self._leases.values()), 1):
            batch.append((self.sessions_key, lease.member))
            if lease.client_key is not None:
                batch.append((lease.client_key, lease.member))
            batch.extend((key, lease.member) for key in lease.user_keys)
            if count % RENEW_BATCH == 0:
                batches.append(batch)
                batch = []
        if batch:
            batches.append(batch)
        if not batches:
            await self._call("ping", self._client.ping)
            return 0
        renewed = 0
        for pairs in batches:
            keys = [key for key, _ in pairs]
            args: list[str | int] = [self._lease_ms, *(member for _, member in pairs)]
            renewed += int(await self._call("renew", partial(self._renew, keys, args)))
        return renewed

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The heartbeat: renew this process's leases every ``lease_seconds / 3``.

        A failed renewal is tried again at the next beat; two missed beats
        still leave a third before any lease of a live session ends.
        """
        task_status.started()
        while True:
            await trio.sleep(self.lease_seconds / 3)
            with contextlib.suppress(SharedStateUnavailable):
                await self.renew()

    async def aclose(self) -> None:
        """Close the connection.  Leases left behind end within ``lease_seconds``."""
        self._closed = True
        self._leases.clear()
        await self._thread.aclose()

    # -- one operation -----------------------------------------------------------
    async def _call(self, what: str, operation: Callable[[], T]) -> T:
        """Run ``operation`` in the Redis thread, within ``op_timeout``."""
        if self._closed:
            raise SharedStateUnavailable(f"{what}: closed")
        if trio.current_time() < self._retry_at:
            raise SharedStateUnavailable(f"{what}: backing off after: {self._last_error}")
        with trio.move_on_after(self._op_timeout):
            try:
                result = await self._thread.call(operation)
            except (RedisError, OSError) as exc:
                reason = self._describe(exc)
            else:
                self._backoff = 0.0
                self._retry_at = -math.inf
                return result
            self._failed(reason)
            raise SharedStateUnavailable(f"{what}: {reason}") from None
        self._failed(f"no answer within {self._op_timeout:g} s")
        raise SharedStateUnavailable(f"{what}: {self._last_error}")

    def _failed(self, reason: str) -> None:
        now = trio.current_time()
        if now >= self._retry_at:  # a probe failed: back off longer
            self._backoff = min(self._backoff_max, max(self._backoff_min, self._backoff * 2))
            self._retry_at = now + self._backoff
        self._last_error = reason

    def _describe(self, exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {exc}"
        if self._password:
            text = text.replace(self._password, _REDACTED)
        return text[:MAX_REASON_CHARS]


def _limit(limit: int | None) -> int:
    """A limit as the scripts take it: -1 for none."""
    return -1 if limit is None else limit
