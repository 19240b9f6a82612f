"""The Lua scripts behind :class:`popguard.sharedstate.redis.RedisState`.

Each decision is one script, so it is atomic (Redis runs a script with
nothing in between) and costs one round trip.  Times are Redis's own
(``TIME``, in milliseconds), so the hosts' clocks never matter; Redis 5+
replicates a script's effects, not the script, so ``TIME`` before a write
is allowed.  Every key a script writes gets an expiry: a lease set expires
with its last lease, a failure list ``window`` after its last failure, a
block when it ends.

Leases are sorted sets: member ``INSTANCE:SESSION``, score the time (ms)
the lease ends.  A lease whose score is past counts no more, and is dropped
by the next decision on its set.
"""

from __future__ import annotations

from typing import Final

#: Helpers every script starts with.  ``fmt`` writes an integer without an
#: exponent (Redis parses ``1.7e+12`` as no integer).
_PRELUDE: Final = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function fmt(n)
  return string.format('%d', n)
end
local function expire_with_last_lease(key)
  local last = redis.call('ZREVRANGE', key, 0, 0, 'WITHSCORES')
  if last[2] then
    redis.call('PEXPIREAT', key, fmt(tonumber(last[2])))
  end
end
"""

#: KEYS: every session's lease set, this client's.  ARGV: member, total
#: limit, per-client limit (-1: none), lease ms.  Returns 0 (OK), 1 (total
#: reached) or 2 (per-client reached).  A member already holding a lease
#: renews it and is OK.
OPEN_SESSION: Final = (
    _PRELUDE
    + """
local now = now_ms()
local ends = now + tonumber(ARGV[4])
for i = 1, 2 do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', fmt(now))
end
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  local limit = tonumber(ARGV[2])
  if limit >= 0 and redis.call('ZCARD', KEYS[1]) >= limit then
    return 1
  end
  limit = tonumber(ARGV[3])
  if limit >= 0 and redis.call('ZCARD', KEYS[2]) >= limit then
    return 2
  end
end
for i = 1, 2 do
  redis.call('ZADD', KEYS[i], fmt(ends), ARGV[1])
  expire_with_last_lease(KEYS[i])
end
return 0
"""
)

#: KEYS: the user's lease set.  ARGV: member, limit (-1: none), lease ms.
#: Returns 0 (OK) or 3 (per-user reached).
CLAIM_USER: Final = (
    _PRELUDE
    + """
local now = now_ms()
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', fmt(now))
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  local limit = tonumber(ARGV[2])
  if limit >= 0 and redis.call('ZCARD', KEYS[1]) >= limit then
    return 3
  end
end
redis.call('ZADD', KEYS[1], fmt(now + tonumber(ARGV[3])), ARGV[1])
expire_with_last_lease(KEYS[1])
return 0
"""
)

#: The heartbeat.  KEYS[i]: a lease set; ARGV[1]: lease ms; ARGV[1 + i]: the
#: member whose lease in KEYS[i] is renewed.  Only a lease that still
#: exists is renewed: a session closed meanwhile stays closed.
#: Returns how many leases were renewed.
RENEW: Final = (
    _PRELUDE
    + """
local ends = fmt(now_ms() + tonumber(ARGV[1]))
local renewed = 0
local seen = {}
for i, key in ipairs(KEYS) do
  if redis.call('ZSCORE', key, ARGV[1 + i]) then
    redis.call('ZADD', key, 'XX', ends, ARGV[1 + i])
    renewed = renewed + 1
  end
  seen[key] = true
end
for key in pairs(seen) do
  expire_with_last_lease(key)
end
return renewed
"""
)

#: KEYS: the failure times (a list, oldest first), the block.  ARGV:
#: failures, window ms, block ms.  The same rule as
#: ``popguard.policy.state.FailedLogins.failed``: keep the last
#: ``failures`` times within the window; that many, while not blocked, start
#: a block (the block key holds when it ends) and clear the times.
#: Returns 1 if this failure started a block, else 0.
RECORD_FAILURE: Final = (
    _PRELUDE
    + """
local now = now_ms()
local failures = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local block = tonumber(ARGV[3])
redis.call('RPUSH', KEYS[1], fmt(now))
redis.call('LTRIM', KEYS[1], -failures, -1)
local times = redis.call('LRANGE', KEYS[1], 0, -1)
local first = #times + 1
for i, t in ipairs(times) do
  if tonumber(t) > now - window then
    first = i
    break
  end
end
if first > 1 then
  redis.call('LTRIM', KEYS[1], first - 1, -1)
end
local blocked_until = tonumber(redis.call('GET', KEYS[2]) or '0')
if #times - first + 1 >= failures and blocked_until <= now then
  redis.call('SET', KEYS[2], fmt(now + block), 'PX', fmt(block))
  redis.call('DEL', KEYS[1])
  return 1
end
redis.call('PEXPIRE', KEYS[1], fmt(window))
return 0
"""
)

#: KEYS: blocks.  Returns, for each, the milliseconds it stays blocked (0: not).
BLOCKED_FOR: Final = (
    _PRELUDE
    + """
local now = now_ms()
local left = {}
for i, key in ipairs(KEYS) do
  local blocked_until = tonumber(redis.call('GET', key) or '0')
  left[i] = math.max(0, blocked_until - now)
end
return left
"""
)
