"""One session's view of the policies: verdicts for the core to act on.

:class:`SessionPolicy` is what :class:`popguard.core.session.ProxySession`
asks before it forwards a command, and what the shell asks when a
connection arrives and for the session's timers.  It answers with a
:class:`Verdict` (deny, and how to say so) or ``None`` (go on).  A verdict
from a ``dry-run`` rule has ``enforced = False``: the core records what
would have happened and forwards the command anyway.

The policy set is read from a :class:`PolicyHolder` at every decision, so a
reload applies to the next command of every open session.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, replace
from typing import Final

from popguard.core.identity import account_key
from popguard.policy.model import (
    NO_POLICY,
    Context,
    Effective,
    IPAddress,
    PolicySet,
    Rule,
    Setting,
    Throttle,
)
from popguard.policy.state import FailedLogins, SessionCounts

Scalar = str | int | bool | None
#: When a timer fires (any clock), the setting, and the policy rule behind it.
Deadline = tuple[float, str, Rule | None]

REPLY_ACCESS_DENIED = b"-ERR [SYS/PERM] Access denied by policy\r\n"
REPLY_TOO_MANY_CONNECTIONS = b"-ERR [SYS/TEMP] Too many connections, try again later\r\n"
REPLY_TOO_MANY_SESSIONS = b"-ERR [IN-USE] Too many sessions for this user\r\n"
REPLY_TLS_REQUIRED = (
    b"-ERR [AUTH] Plaintext authentication disallowed on non-secure connections, use STLS\r\n"
)
REPLY_LOGIN_DELAY = b"-ERR [LOGIN-DELAY] Too many failed logins, try again later\r\n"


class PolicyHolder:
    """The policy set in force; :meth:`replace` swaps it in one step (reload)."""

    def __init__(self, policies: PolicySet = NO_POLICY) -> None:
        self.current = policies
        self.version = 0

    def replace(self, policies: PolicySet) -> None:
        self.current = policies
        self.version += 1


@dataclass(frozen=True, slots=True)
class Verdict:
    """A policy decision that changes what the client sees (or would, in dry-run)."""

    setting: str
    rule: Rule
    reply: bytes
    reason: str

    @property
    def enforced(self) -> bool:
        return self.rule.mode == "enforce"

    def fields(self) -> dict[str, Scalar]:
        return {
            "rule": self.rule.name,
            "policy_file": self.rule.where,
            "setting": self.setting,
            "mode": self.rule.mode,
            "reason": self.reason,
        }


class PolicyShared:
    """What every session of one popguard process shares: policies, counters, clock."""

    def __init__(
        self, holder: PolicyHolder, clock: Callable[[], float], *, shared_state: bool = False
    ) -> None:
        self.holder = holder
        self.clock = clock
        #: Counts and failures live in a shared store (popguard.sharedstate),
        #: asked by the shell (popguard.shell.shared): the ones here are not
        #: used for decisions.
        self.shared_state = shared_state
        self.counts = SessionCounts()
        self.failures = FailedLogins()


class SessionPolicy:
    def __init__(
        self,
        shared: PolicyShared,
        *,
        peer: str,
        client: IPAddress | None,
        listener: str,
        tls: bool = False,
    ) -> None:
        self._shared = shared
        self.peer = peer
        self.context = Context(client=client, listener=listener, tls=tls)
        self._peer_host = str(client) if client is not None else peer
        self.started_at = shared.clock()
        self._cache: tuple[int, Context, Effective] | None = None
        self._counted = False
        self._counted_user: str | None = None
        #: With shared state: failed logins (the account named, or None) for
        #: the shell to record in the store (see :meth:`take_failures`).
        self._failures: list[str | None] = []

    # -- what is in force ----------------------------------------------------
    @property
    def active(self) -> bool:
        """Whether any policy is loaded (an empty set changes nothing)."""
        return bool(self._shared.holder.current.rules)

    def effective(self) -> Effective:
        holder = self._shared.holder
        cached = self._cache
        if cached is not None and cached[0] == holder.version and cached[1] == self.context:
            return cached[2]
        effective = holder.current.resolve(self.context)
        self._cache = (holder.version, self.context, effective)
        return effective

    def _setting(self, name: str) -> Setting | None:
        return self.effective().get(name)

    def deadlines(
        self,
        idle: Deadline,
        last_activity: float,
        started_at: float,
        *,
        skip_dry_run: Collection[str] = (),
    ) -> list[Deadline]:
        """The session's timers, given the server-wide idle deadline.

        An enforced ``idle_timeout`` replaces the server's idle timer (from
        the last activity); an enforced ``max_session`` adds one (from the
        session's start).  A dry-run rule's timer is added to be recorded
        when it would fire, unless already reported (``skip_dry_run``).
        """
        timers = [idle]
        for name, since in (("idle_timeout", last_activity), ("max_session", started_at)):
            timer = self.timer(name)
            if timer is None:
                continue
            seconds, rule = timer
            if rule.mode == "enforce":
                if name == "idle_timeout":
                    timers[0] = (since + seconds, name, rule)
                else:
                    timers.append((since + seconds, name, rule))
            elif name not in skip_dry_run:
                timers.append((since + seconds, name, rule))
        return timers

    def timer(self, name: str) -> tuple[float, Rule] | None:
        """``idle_timeout`` or ``max_session`` in seconds, and the rule that set it."""
        setting = self._setting(name)
        if setting is None or not isinstance(setting.value, int | float):
            return None
        return float(setting.value), setting.rule

    def tls_started(self) -> None:
        """The client connection is now encrypted (after STLS)."""
        self.context = replace(self.context, tls=True)

    def requires_tls(self) -> bool:
        """Whether an enforced rule requires TLS before credentials, on plaintext."""
        if self.context.tls or not self.active:
            return False
        setting = self._setting("require_tls")
        return setting is not None and setting.value is True and setting.enforced

    def retention(self) -> tuple[bool, Rule | None]:
        """Whether a ``retain: true`` rule applies (enforced), and its rule.

        A dry-run rule gives ``(False, rule)``: nothing is archived, and the
        session records that it would have been (``policy.dry_run``).
        """
        setting = self._setting("retain")
        if setting is None or setting.value is not True:
            return False, None
        return setting.enforced, setting.rule

    # -- shared state (the shell asks the store; popguard.shell.shared) ------
    @property
    def uses_shared_state(self) -> bool:
        return self._shared.shared_state

    def access_verdict(self) -> Verdict | None:
        """``access: deny`` for what is known now (rules only, no counts)."""
        return self._access()

    def limit_value(self, name: str, *, enforced_only: bool = False) -> int | None:
        """The ``max_sessions_*`` limit ``name`` in force (None: none, or only a
        dry-run one when ``enforced_only``)."""
        setting = self._setting(name)
        if setting is None or not isinstance(setting.value, int) or isinstance(setting.value, bool):
            return None
        if enforced_only and setting.rule.mode != "enforce":
            return None
        return setting.value

    def limit_verdict(self, name: str) -> Verdict:
        """The verdict for the limit ``name``, which the store says is reached."""
        setting = self._setting(name)
        assert setting is not None, name
        reply, reason = _LIMITS[name]
        return Verdict(name, setting.rule, reply, reason)

    def throttle(self) -> tuple[Throttle, Rule] | None:
        setting = self._setting("login_throttle")
        if setting is None or not isinstance(setting.value, Throttle):
            return None
        return setting.value, setting.rule

    def block_key(self, kind: str) -> str | None:
        """The store key whose block applies to this session (``client`` or ``user``)."""
        throttle = self.throttle()
        if throttle is None or kind not in throttle[0].by:
            return None
        if kind == "client":
            return "client:" + self.peer_host
        if self.context.claimed_user is not None:
            return "user:" + account_key(self.context.claimed_user)
        return None

    def block_verdict(self, kind: str, remaining: float) -> Verdict | None:
        throttle = self.throttle()
        if throttle is None or remaining <= 0:
            return None
        return Verdict(
            "login_throttle",
            throttle[1],
            REPLY_LOGIN_DELAY,
            f"{kind} blocked after failed logins ({remaining:.0f} s left)",
        )

    def note_claim(self, user: str) -> None:
        """The client named ``user`` (the shell decides the rest with the store)."""
        self.context = self.context.claimed(user)

    def failure_keys(self, user: str | None) -> list[tuple[str, str]]:
        """The throttle keys a failed login of ``user`` counts under, with labels."""
        throttle = self.throttle()
        return [] if throttle is None else self._keys(throttle[0], user)

    def take_failures(self) -> list[str | None]:
        """Failed logins queued for the store since the last call."""
        failures, self._failures = self._failures, []
        return failures

    @property
    def has_failures(self) -> bool:
        return bool(self._failures)

    # -- connect -------------------------------------------------------------
    def check_connect(self) -> Verdict | None:
        """Before the upstream is contacted.  The session counts once allowed."""
        shared = self._shared
        # Without rules every check is None: skip building them (a session
        # still counts, for the rules a reload may bring).
        verdict = (
            None
            if not self.active
            else _decide(
                self._access,
                lambda: self._limit("max_sessions_total", shared.counts.total),
                lambda: self._limit(
                    "max_sessions_per_client", shared.counts.per_client[self.peer_host]
                ),
                lambda: self._blocked("client"),
            )
        )
        if verdict is None or not verdict.enforced:
            shared.counts.opened(self.peer_host)
            self._counted = True
        return verdict

    @property
    def peer_host(self) -> str:
        return self._peer_host

    def closed(self) -> None:
        """The session is over: it no longer counts against any limit."""
        if self._counted:
            self._counted = False
            self._shared.counts.closed(self.peer_host, self._counted_user)

    # -- commands ------------------------------------------------------------
    def check_command(self, verb: str, mechanism: str | None = None) -> Verdict | None:
        """A command about to be forwarded (``mechanism`` for AUTH)."""
        if verb in ("USER", "APOP", "AUTH"):
            name = {"USER": "USER", "APOP": "APOP"}.get(verb, mechanism or "")
            needs_tls = self._setting("require_tls")
            if needs_tls is not None and needs_tls.value is True and not self.context.tls:
                return Verdict(
                    "require_tls",
                    needs_tls.rule,
                    REPLY_TLS_REQUIRED,
                    f"{name} before TLS",
                )
            setting = self._setting("auth_mechanisms")
            allowed = setting.value if setting is not None else None
            if setting is not None and isinstance(allowed, tuple) and name not in allowed:
                return Verdict(
                    "auth_mechanisms",
                    setting.rule,
                    b"-ERR [AUTH] " + name.encode("ascii", "replace") + b" is not allowed here\r\n",
                    f"{name} authentication is not allowed",
                )
            return None
        setting = self._setting("deny_commands")
        if setting is None or not isinstance(setting.value, tuple) or verb not in setting.value:
            return None
        text = self._setting("deny_reply")
        message = (
            str(text.value) if text is not None else f"{verb} is not permitted by policy"
        ).encode("ascii", "replace")
        return Verdict(
            "deny_commands",
            setting.rule,
            b"-ERR [SYS/PERM] " + message + b"\r\n",
            f"{verb} denied",
        )

    def claim(self, user: str) -> Verdict | None:
        """The client named a user (USER, APOP, or SASL): may it try to log in?"""
        self.context = self.context.claimed(user)
        if not self.active:
            return None
        return _decide(
            self._access,
            lambda: self._blocked("client"),
            lambda: self._blocked("user"),
            lambda: self._limit("max_sessions_per_user", self._shared.counts.per_user[user]),
        )

    def login_succeeded(self, user: str) -> Verdict | None:
        """The server accepted the login.  An enforced verdict ends the session.

        Checked again here, now that the user is authenticated: rules that
        match on ``user`` apply from this point, and two sessions that
        claimed the same user at once cannot both pass a per-user limit.
        """
        self.context = self.context.logged_in(user)
        if self._shared.shared_state:
            # The store counted the user when the name was given (its slot
            # is this session's lease): only the rules' access is left.
            return self._access()
        verdict = (
            None
            if not self.active
            else _decide(
                self._access,
                lambda: self._limit("max_sessions_per_user", self._shared.counts.per_user[user]),
            )
        )
        if verdict is not None and verdict.enforced:
            return verdict
        if self._counted and self._counted_user is None:
            self._shared.counts.logged_in(user)
            self._counted_user = user
        return verdict

    def login_failed(self, user: str | None) -> list[tuple[str, float]]:
        """Count a failed login; returns the keys that are now blocked, with seconds.

        With shared state the failure is queued for the shell, which counts
        it in the store (and gives back the account's slot): ``[]`` here.
        """
        if self._shared.shared_state:
            self._failures.append(user)
            return []
        setting = self._setting("login_throttle")
        if setting is None or not isinstance(setting.value, Throttle):
            return []
        throttle = setting.value
        now = self._shared.clock()
        started: list[tuple[str, float]] = []
        for key, label in self._keys(throttle, user):
            if self._shared.failures.failed(
                key, now, failures=throttle.failures, window=throttle.window, block=throttle.block
            ):
                started.append((label, throttle.block))
        return started

    def throttle_rule(self) -> Rule | None:
        setting = self._setting("login_throttle")
        return None if setting is None else setting.rule

    # -- helpers -------------------------------------------------------------
    def _keys(self, throttle: Throttle, user: str | None) -> list[tuple[str, str]]:
        """The throttle's table keys for this session, each with its label for records.

        A user is keyed by a fixed-size digest of the account, so the table
        costs the same whatever names a spray of failed logins uses.
        """
        keys = []
        if "client" in throttle.by:
            key = "client:" + self.peer_host
            keys.append((key, key))
        if "user" in throttle.by and user:
            keys.append(("user:" + account_key(user), "user:" + user))
        return keys

    def _access(self) -> Verdict | None:
        setting = self._setting("access")
        if setting is None or setting.value != "deny":
            return None
        return Verdict("access", setting.rule, REPLY_ACCESS_DENIED, "access denied")

    def _limit(self, name: str, current: int) -> Verdict | None:
        setting = self._setting(name)
        if setting is None or not isinstance(setting.value, int) or current < setting.value:
            return None
        reply, reason = _LIMITS[name]
        return Verdict(name, setting.rule, reply, reason)

    def _blocked(self, kind: str) -> Verdict | None:
        setting = self._setting("login_throttle")
        if setting is None or not isinstance(setting.value, Throttle):
            return None
        if kind not in setting.value.by:
            return None
        if kind == "client":
            key = "client:" + self.peer_host
        elif self.context.claimed_user is not None:
            key = "user:" + account_key(self.context.claimed_user)
        else:
            return None
        remaining = self._shared.failures.blocked_for(key, self._shared.clock())
        if remaining <= 0:
            return None
        return Verdict(
            "login_throttle",
            setting.rule,
            REPLY_LOGIN_DELAY,
            f"{kind} blocked after failed logins ({remaining:.0f} s left)",
        )


#: What the client is told, and the reason recorded, when a limit is reached.
_LIMITS: Final = {
    "max_sessions_total": (REPLY_TOO_MANY_CONNECTIONS, "too many sessions in total"),
    "max_sessions_per_client": (REPLY_TOO_MANY_CONNECTIONS, "too many sessions from this client"),
    "max_sessions_per_user": (REPLY_TOO_MANY_SESSIONS, "too many sessions for this user"),
}


def strongest(verdicts: Iterable[Verdict | None]) -> Verdict | None:
    """The first enforced verdict, else the first dry-run one (consumed lazily)."""
    dry_run: Verdict | None = None
    for verdict in verdicts:
        if verdict is None:
            continue
        if verdict.enforced:
            return verdict
        if dry_run is None:
            dry_run = verdict
    return dry_run


def _decide(*checks: Callable[[], Verdict | None]) -> Verdict | None:
    """The first enforced verdict of ``checks``; else the first dry-run one.

    A dry-run rule only records what it would do: it must never stop an
    enforced setting that comes after it from being checked.
    """
    return strongest(check() for check in checks)
