"""The Lua scripts behind every limiter operation; each runs atomically inside Redis.

Buckets are hashes ``{t: tokens, ts: last update (ms), cap: capacity, per: refill period (ms)}``
refilled linearly at ``cap / per`` tokens per millisecond on Redis's own clock (``TIME``), so
replicas with skewed clocks agree. A missing bucket reads as full, so an idle bucket is given a
TTL of "time until full again" and simply disappears.

Reservation records are JSON strings ``{b: [[bucket key, cost, cap, per, counts_tokens], ...],
t: estimated tokens, e: expires at (ms)}``; a sorted set scores reservation ids by expiry for the
sweep. Settle and sweep touch bucket keys named inside the record, so the scripts need a single
Redis (or a primary with replicas), not Redis Cluster — as does reserve, whose buckets of
different tenants would live in different slots.
"""

from __future__ import annotations

# A reservation record outlives its expiry by this much so that the sweep, not Redis's key
# expiry, is what refunds it; the TTL is only a safety net against leaks if no sweep ever runs.
RECORD_GRACE_MS = 86_400_000

_PRELUDE = f"local RECORD_GRACE_MS = {RECORD_GRACE_MS}\n" + """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Tokens in a bucket at `now`; a missing bucket is full.
local function level(key, cap, per, now)
  local st = redis.call('HMGET', key, 't', 'ts')
  if not st[1] then return cap end
  local tokens = tonumber(st[1]) + math.max(0, now - tonumber(st[2])) * cap / per
  if tokens > cap then tokens = cap end
  return tokens
end

local function store(key, tokens, cap, per, now)
  redis.call('HSET', key, 't', string.format('%.17g', tokens), 'ts', string.format('%d', now),
             'cap', string.format('%d', cap), 'per', string.format('%d', per))
  local full_in = math.ceil((cap - tokens) * per / cap)
  if full_in < 0 then full_in = 0 end
  redis.call('PEXPIRE', key, string.format('%d', full_in + 1000))
end

-- Give back (delta > 0, capped at capacity) or charge (delta < 0, may go negative) one bucket.
-- The bucket's current capacity wins over the one recorded at reserve time: limits change.
local function adjust(key, delta, cap, per, now)
  local st = redis.call('HMGET', key, 'cap', 'per')
  if st[1] then
    cap = tonumber(st[1])
    per = tonumber(st[2])
  elseif delta > 0 then
    return  -- missing means full: nothing to give back
  end
  local tokens = level(key, cap, per, now) + delta
  if tokens > cap then tokens = cap end
  store(key, tokens, cap, per, now)
end

-- Settle a reservation record: 'release' refunds every bucket in full; 'commit' refunds
-- (estimate - actual) to token buckets and keeps the request slot. Returns tokens refunded.
local function settle(raw, mode, actual, now)
  local rec = cjson.decode(raw)
  for _, b in ipairs(rec.b) do
    local delta = b[2]
    if mode == 'commit' then
      if b[5] == 1 then delta = b[2] - actual else delta = 0 end
    end
    if delta ~= 0 then adjust(b[1], delta, b[3], b[4], now) end
  end
  if mode == 'commit' then return rec.t - actual end
  return rec.t
end
"""

# KEYS[1..n]: buckets; KEYS[n+1]: reservation record; KEYS[n+2]: expiry set.
# ARGV[1]: n; ARGV[2]: reservation id; ARGV[3]: ttl ms; ARGV[4]: estimated tokens;
# then per bucket: capacity, period ms, cost, counts_tokens (0/1).
# Returns {1, expires_at_ms} or {0, retry_after_ms, {failed bucket indexes (1-based)}}.
RESERVE = _PRELUDE + """
local n = tonumber(ARGV[1])
local ttl = tonumber(ARGV[3])
local now = now_ms()
local have = {}
local failed = {}
local wait = 0
-- Check every bucket first; debit only if all have room (all-or-nothing).
for i = 1, n do
  local o = 4 + (i - 1) * 4
  local cap, per, cost = tonumber(ARGV[o + 1]), tonumber(ARGV[o + 2]), tonumber(ARGV[o + 3])
  local tokens = level(KEYS[i], cap, per, now)
  have[i] = tokens
  if tokens < cost then
    failed[#failed + 1] = i
    -- A cost above the capacity never fits; a full period is the honest "not soon".
    local need = per
    if cost <= cap then need = math.ceil((cost - tokens) * per / cap) end
    if need > wait then wait = need end
  end
end
if #failed > 0 then return {0, wait, failed} end
local debited = {}
for i = 1, n do
  local o = 4 + (i - 1) * 4
  local cap, per, cost = tonumber(ARGV[o + 1]), tonumber(ARGV[o + 2]), tonumber(ARGV[o + 3])
  store(KEYS[i], have[i] - cost, cap, per, now)
  debited[i] = {KEYS[i], cost, cap, per, tonumber(ARGV[o + 4])}
end
local expires = now + ttl
local rec = cjson.encode({b = debited, t = tonumber(ARGV[4]), e = expires})
redis.call('SET', KEYS[n + 1], rec, 'PX', string.format('%d', ttl + RECORD_GRACE_MS))
redis.call('ZADD', KEYS[n + 2], string.format('%d', expires), ARGV[2])
return {1, expires}
"""

# KEYS[1]: reservation record; KEYS[2]: expiry set.
# ARGV[1]: reservation id; ARGV[2]: 'commit' | 'release'; ARGV[3]: actual tokens.
# Returns {0} when there is no such (unsettled) reservation, else {1, refunded tokens}.
SETTLE = _PRELUDE + """
local raw = redis.call('GET', KEYS[1])
if not raw then return {0} end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return {1, settle(raw, ARGV[2], tonumber(ARGV[3]), now_ms())}
"""

# KEYS[1]: expiry set. ARGV[1]: reservation record key prefix; ARGV[2]: batch size.
# Refunds up to a batch of expired reservations. Returns {ids looked at, reservations refunded}.
# Atomic per batch: a reservation is refunded by exactly one of sweep, commit or release.
SWEEP = _PRELUDE + """
local now = now_ms()
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
local refunded = 0
for _, id in ipairs(ids) do
  local key = ARGV[1] .. id
  local raw = redis.call('GET', key)
  if raw then
    settle(raw, 'release', 0, now)
    redis.call('DEL', key)
    refunded = refunded + 1
  end
  redis.call('ZREM', KEYS[1], id)
end
return {#ids, refunded}
"""

# KEYS: buckets; ARGV: capacity, period ms per bucket. Returns each bucket's tokens now (strings:
# Redis would truncate Lua numbers to integers).
LEVELS = _PRELUDE + """
local now = now_ms()
local out = {}
for i = 1, #KEYS do
  out[i] = string.format('%.17g', level(KEYS[i], tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i]), now))
end
return out
"""
