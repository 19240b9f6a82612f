"""Policy decisions on shared state: the limits and throttles that hold across processes.

Without shared state, :class:`popguard.policy.session.SessionPolicy` counts
sessions and failed logins in this process, synchronously.  With
``shared_state:`` those counts live in a store every popguard process uses
(``popguard.sharedstate``: Redis, or the in-process fallback), and each
decision that depends on them is one atomic call to the store, awaited
here, in the shell, at the moments the in-process engine decides:

* a connection arrives (:func:`check_connect`): ``access``, the client's
  throttle block, ``max_sessions_total`` and ``max_sessions_per_client``;
  the session takes a lease in the store when admitted;
* the client names an account (:func:`check_claim`; the core parks the line
  that names it, see ``ProxySession.pending_claim``): ``access``, the blocks
  of the client and of the account, and ``max_sessions_per_user``; the
  account's slot is reserved then, before any credential reaches the server;
* a login fails (:func:`record_failures`): counted under the throttle's
  keys (a block may start), and the account's slot is given back;
* the session ends (:func:`close`): every lease of it goes.

The rules themselves (which setting, which rule, dry-run or enforced) are
still the policy engine's; only the counting moved.  A dry-run limit is
checked and recorded like an enforced one, then the session is counted
all the same.  When the store refuses to answer (``on_failure:
fail-closed``) a new session or login is refused with ``-ERR [SYS/TEMP]``.
"""

from __future__ import annotations

import contextlib
from typing import Final

from popguard.core.identity import account_key
from popguard.policy.model import Rule
from popguard.policy.session import SessionPolicy, Verdict, strongest
from popguard.sharedstate import Decision, SharedState, SharedStateRefused

__all__ = ["REPLY_SHARED_STATE_DOWN", "check_claim", "check_connect", "close", "record_failures"]

REPLY_SHARED_STATE_DOWN: Final = (
    b"-ERR [SYS/TEMP] popguard cannot check its limits now, try again later\r\n"
)
#: The rule a fail-closed refusal names (no policy rule refused it).
_STORE_RULE: Final = Rule(name="shared-state", file="shared_state", line=0)

_LIMIT_OF: Final = {
    Decision.TOTAL: "max_sessions_total",
    Decision.PER_CLIENT: "max_sessions_per_client",
    Decision.PER_USER: "max_sessions_per_user",
}


def _store_down(reason: str) -> Verdict:
    return Verdict("shared_state", _STORE_RULE, REPLY_SHARED_STATE_DOWN, reason)


async def check_connect(policy: SessionPolicy, state: SharedState, session: str) -> Verdict | None:
    """Before the upstream is contacted; the session holds a lease if admitted."""
    verdicts: list[Verdict | None] = [policy.access_verdict()]
    try:
        key = policy.block_key("client")
        if key is not None and _first_enforced(verdicts) is None:
            remaining = (await state.blocked_for([key])).get(key, 0.0)
            verdicts.append(policy.block_verdict("client", remaining))
        if _first_enforced(verdicts) is None:
            verdicts.append(await _open(policy, state, session))
    except SharedStateRefused as exc:
        return _store_down(str(exc))
    return strongest(verdicts)


async def _open(policy: SessionPolicy, state: SharedState, session: str) -> Verdict | None:
    """The two connect limits: checked (dry-run ones too), the lease taken unless enforced."""
    decision = await _open_with(policy, state, session, enforced_only=False)
    if decision is Decision.OK:
        return None
    verdict = policy.limit_verdict(_LIMIT_OF[decision])
    if not verdict.enforced:
        # A dry-run limit was reached: recorded; the session counts all the
        # same, under the enforced limits only.
        again = await _open_with(policy, state, session, enforced_only=True)
        if again is not Decision.OK:
            return policy.limit_verdict(_LIMIT_OF[again])
    return verdict


async def _open_with(
    policy: SessionPolicy, state: SharedState, session: str, *, enforced_only: bool
) -> Decision:
    return await state.open_session(
        session,
        policy.peer_host,
        total=policy.limit_value("max_sessions_total", enforced_only=enforced_only),
        per_client=policy.limit_value("max_sessions_per_client", enforced_only=enforced_only),
    )


async def check_claim(
    policy: SessionPolicy, state: SharedState, session: str, user: str
) -> Verdict | None:
    """The client named ``user``: may it log in here and now?  Reserves its slot."""
    policy.note_claim(user)
    verdicts: list[Verdict | None] = [policy.access_verdict()]
    try:
        keys = [key for kind in ("client", "user") if (key := policy.block_key(kind))]
        if keys and _first_enforced(verdicts) is None:
            remaining = await state.blocked_for(keys)
            for kind, key in zip(("client", "user"), keys, strict=False):
                verdicts.append(policy.block_verdict(kind, remaining.get(key, 0.0)))
        if _first_enforced(verdicts) is None:
            verdicts.append(await _claim(policy, state, session, user))
    except SharedStateRefused as exc:
        return _store_down(str(exc))
    return strongest(verdicts)


async def _claim(
    policy: SessionPolicy, state: SharedState, session: str, user: str
) -> Verdict | None:
    name = "max_sessions_per_user"
    key = account_key(user)
    decision = await state.claim_user(session, key, limit=policy.limit_value(name))
    if decision is Decision.OK:
        return None
    verdict = policy.limit_verdict(name)
    if not verdict.enforced:
        await state.claim_user(session, key, limit=None)  # dry run: counted all the same
    return verdict


async def record_failures(
    policy: SessionPolicy, state: SharedState, session: str
) -> list[tuple[str, float, Rule | None]]:
    """Count the session's failed logins in the store; the blocks they started.

    Each failure also gives back the slot its account had reserved.  Store
    failures are swallowed here (fail-open counts them in this process;
    fail-closed refuses the next login anyway).
    """
    started: list[tuple[str, float, Rule | None]] = []
    throttle = policy.throttle()
    for user in policy.take_failures():
        try:
            if throttle is not None:
                rules = throttle[0]
                for key, label in policy.failure_keys(user):
                    if await state.record_failure(
                        key, failures=rules.failures, window=rules.window, block=rules.block
                    ):
                        started.append((label, rules.block, throttle[1]))
            if user is not None:
                await state.release_user(session, account_key(user))
        except SharedStateRefused:
            continue
    return started


async def close(policy: SessionPolicy, state: SharedState, session: str, user: str | None) -> None:
    """The session is over: its leases go (best effort; they expire anyway)."""
    with contextlib.suppress(SharedStateRefused):
        await state.close_session(
            session, policy.peer_host, account_key(user) if user is not None else None
        )


def _first_enforced(verdicts: list[Verdict | None]) -> Verdict | None:
    return next((v for v in verdicts if v is not None and v.enforced), None)
