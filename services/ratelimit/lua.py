"""The Lua scripts behind every limiter operation; each runs atomically inside Redis.

Buckets are strings ``"tokens ts cap per"`` (tokens, last update in ms, capacity, refill period
in ms) refilled linearly at ``cap / per`` tokens per millisecond on Redis's own clock (``TIME``),
so replicas with skewed clocks agree. A missing bucket reads as full, so an idle bucket is given
a TTL of "time until full again" and simply disappears. (Strings rather than hashes: one MGET
reads all of a request's buckets and one SET ... PX writes each, which halves the commands a
reserve runs inside Redis.)

Budgets are hashes per UTC calendar window (see :mod:`services.ratelimit.budgets`): ``s`` committed
spend, ``h`` held by outstanding reservations, ``a``/``al`` alert bookkeeping. The window, and so
the key, is computed inside the script from Redis's clock: every replica rolls over at the same
instant. Amounts cross the Lua boundary as decimal strings and are added with ``HINCRBY``, so
they stay exact integers (Lua's own numbers are doubles: exact below 2**53).

Reservation records are lines of space-separated fields (ids never contain whitespace; a line
format costs a fraction of cjson, which was the largest single cost of a reserve):
``<estimated tokens> <expires at ms>``, then per bucket ``b <key> <cost> <cap> <per ms>
<counts_tokens>``, then per budget ``m <key> <estimated cost> <limit> <d|m> <window id> <window
end ms> <scope> <scope id>`` (the scope id last: it is empty for global). A sorted set scores
reservation ids by expiry for the sweep. An optional idempotency key ``{request key} -> "id
expires advice"`` makes a retried reserve return the same reservation instead of debiting again;
``{prefix}rl:c:{key id}:{charge id}`` marks a charge drawn, so a replayed charge draws nothing.

Settle, sweep and reserve touch keys named inside records or computed from the clock, so the
scripts need a single Redis (or a primary with replicas), not Redis Cluster.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.ratelimit.budgets import ALERT_THRESHOLDS_PCT, PREFER_CHEAPER_PCT, WINDOW_KEEP_MS

# A reservation record outlives its expiry by this much so that the sweep, not Redis's key
# expiry, is what refunds it; the TTL is only a safety net against leaks if no sweep ever runs.
RECORD_GRACE_MS = 86_400_000
# Budget alert events kept in the stream (approximately; older ones are trimmed).
ALERT_STREAM_MAXLEN = 10_000

REDIS_CLOCK = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""


def key_clock(key: str) -> str:
    """A clock read from a Redis key (integer ms) instead of ``TIME``: for deterministic tests only."""
    if "]]" in key:
        raise ValueError("clock key must not contain ']]'")
    return f"\nlocal function now_ms() return tonumber(redis.call('GET', [[{key}]])) end\n"


_CONSTANTS = (f"local RECORD_GRACE_MS = {RECORD_GRACE_MS}\nlocal WINDOW_KEEP_MS = {WINDOW_KEEP_MS}\n"
              f"local ALERT_STREAM_MAXLEN = '{ALERT_STREAM_MAXLEN}'\n"
              f"local PREFER_CHEAPER_PCT = {PREFER_CHEAPER_PCT}\n"
              "local ALERT_PCTS = {" + ", ".join(str(p) for p in ALERT_THRESHOLDS_PCT) + "}\n")

_FUNCTIONS = """
local function fmt(x) return string.format('%d', x) end

-- A bucket is one string "tokens ts cap per" (tokens as %.17g, the rest integers) with a TTL:
-- one SET ... PX writes it, and one MGET reads every bucket of a request.
-- Tokens in a bucket (its stored value `v`, false when missing) at `now`; a missing bucket is full.
local function level(v, cap, per, now)
  if not v then return cap end
  local t, ts = string.match(v, '^(%S+) (%S+)')
  local tokens = tonumber(t) + math.max(0, now - tonumber(ts)) * cap / per
  if tokens > cap then tokens = cap end
  return tokens
end

local function store(key, tokens, cap, per, now)
  local full_in = math.ceil((cap - tokens) * per / cap)
  if full_in < 0 then full_in = 0 end
  redis.call('SET', key, string.format('%.17g %d %d %d', tokens, now, cap, per), 'PX', fmt(full_in + 1000))
end

-- Give back (delta > 0, capped at capacity) or charge (delta < 0, may go negative) one bucket
-- whose stored value is `v`. Its current capacity wins over the one recorded at reserve time:
-- limits change.
local function adjust(key, v, delta, cap, per, now)
  if v then
    local c, p = string.match(v, '^%S+ %S+ (%S+) (%S+)$')
    cap, per = tonumber(c), tonumber(p)
  elseif delta > 0 then
    return  -- missing means full: nothing to give back
  end
  local tokens = level(v, cap, per, now) + delta
  if tokens > cap then tokens = cap end
  store(key, tokens, cap, per, now)
end

-- Take `amount` (> 0) from one bucket without refusing, stopping at zero (a level that charges took
-- below zero stays where it is). Its current capacity wins, as in `adjust`.
local function draw(key, v, amount, cap, per, now)
  if v then
    local c, p = string.match(v, '^%S+ %S+ (%S+) (%S+)$')
    cap, per = tonumber(c), tonumber(p)
  end
  local tokens = level(v, cap, per, now)
  store(key, math.min(tokens, math.max(0, tokens - amount)), cap, per, now)
end

-- Calendar arithmetic (proleptic Gregorian, UTC), after H. Hinnant's days_from_civil/civil_from_days.
local function civil_from_days(days)
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m, d
end

local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = m > 2 and m - 3 or m + 9
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

-- The UTC window of period 'd' (day) or 'm' (month) holding `now`: id, start ms, end ms.
local function window(period, now)
  local day = math.floor(now / 86400000)
  local y, m, d = civil_from_days(day)
  if period == 'd' then
    return string.format('%04d%02d%02d', y, m, d), day * 86400000, (day + 1) * 86400000
  end
  local ny, nm = y, m + 1
  if nm > 12 then ny, nm = y + 1, 1 end
  return string.format('%04d%02d', y, m), days_from_civil(y, m, 1) * 86400000,
         days_from_civil(ny, nm, 1) * 86400000
end

-- ceil(limit * pct / 100) exactly for any limit below 2^53 (limit * pct itself may not be exact).
local function threshold(limit, pct)
  local q = math.floor(limit / 100)
  return q * pct + math.ceil((limit - q * 100) * pct / 100)
end

local PERIOD_NAMES = {d = 'daily', m = 'monthly'}

-- Keep a budget counter until WINDOW_KEEP_MS after its window ends. Relative to the script's
-- clock (not PEXPIREAT, which is on Redis's clock) so that the clock tests use is consistent.
local function keep_until(key, wend, now)
  redis.call('PEXPIRE', key, fmt(math.max(1, wend + WINDOW_KEEP_MS - now)))
end

-- Emit one stream event per alert threshold the committed spend has reached in this window
-- and that was not emitted yet (for the current limit: a changed limit re-arms them).
local function alert(stream, m, spent, now)
  local limit = tonumber(m.l)
  local st = redis.call('HMGET', m.k, 'a', 'al')
  local done = tonumber(st[1]) or 0
  if st[2] ~= m.l then done = 0 end
  local top = done
  for _, pct in ipairs(ALERT_PCTS) do
    if pct > done and spent >= threshold(limit, pct) then
      redis.call('XADD', stream, 'MAXLEN', '~', ALERT_STREAM_MAXLEN, '*',
                 'scope', m.s, 'scope_id', m.i, 'period', PERIOD_NAMES[m.p], 'window', m.w,
                 'threshold_pct', tostring(pct), 'spent_nano_usd', fmt(spent), 'limit_nano_usd', m.l,
                 'resets_at_ms', fmt(m.r), 'at_ms', fmt(now))
      top = pct
    end
  end
  if top ~= done or st[2] ~= m.l then redis.call('HSET', m.k, 'a', tostring(top), 'al', m.l) end
end

local function decode(raw)
  local rec = {b = {}, m = {}}
  for line in string.gmatch(raw, '[^\\n]+') do
    local tag = string.sub(line, 1, 2)
    if tag == 'b ' then
      local k, c, cap, per, counts = string.match(line, '^b (%S+) (%S+) (%S+) (%S+) (%S+)$')
      rec.b[#rec.b + 1] = {k, tonumber(c), tonumber(cap), tonumber(per), tonumber(counts)}
    elseif tag == 'm ' then
      local k, c, l, p, w, r, sc, id = string.match(line, '^m (%S+) (%S+) (%S+) (%S+) (%S+) (%S+) (%S+) (.*)$')
      rec.m[#rec.m + 1] = {k = k, c = c, l = l, p = p, w = w, r = tonumber(r), s = sc, i = id}
    else
      local t, e = string.match(line, '^(%S+) (%S+)$')
      rec.t, rec.e = tonumber(t), tonumber(e)
    end
  end
  return rec
end

-- Settle a reservation record: 'release' refunds every bucket and budget hold in full; 'commit'
-- refunds (estimate - actual) to token buckets, keeps the request slot, turns the budget hold
-- into the actual cost and emits alerts. Returns tokens refunded.
local function settle(raw, mode, actual, actual_cost, now, stream)
  local rec = decode(raw)
  local todo, keys = {}, {}
  for _, b in ipairs(rec.b) do
    local delta = b[2]
    if mode == 'commit' then
      if b[5] == 1 then delta = b[2] - actual else delta = 0 end
    end
    if delta ~= 0 then
      todo[#todo + 1] = {b, delta}
      keys[#keys + 1] = b[1]
    end
  end
  if #keys > 0 then
    local vals = redis.call('MGET', unpack(keys))
    for i, t in ipairs(todo) do adjust(t[1][1], vals[i], t[2], t[1][3], t[1][4], now) end
  end
  for _, m in ipairs(rec.m) do
    if m.c ~= '0' and redis.call('HINCRBY', m.k, 'h', '-' .. m.c) < 0 then
      -- The counter was gone (window long over, or Redis lost it): there was no hold to give back.
      redis.call('HSET', m.k, 'h', '0')
      keep_until(m.k, m.r, now)
    end
    if mode == 'commit' and actual_cost ~= '0' and now < m.r + WINDOW_KEEP_MS then
      -- Charged to the window the reservation was made in (the ledger dates a request by its start).
      local spent = redis.call('HINCRBY', m.k, 's', actual_cost)
      if spent == tonumber(actual_cost) then keep_until(m.k, m.r, now) end  -- maybe created just now
      -- Below the lowest threshold there is nothing to alert (nor to re-arm: that happens on reading).
      if spent >= threshold(tonumber(m.l), ALERT_PCTS[1]) then alert(stream, m, spent, now) end
    end
  end
  if mode == 'commit' then return rec.t - actual end
  return rec.t
end
"""

# KEYS[1..n]: buckets; KEYS[n+1]: reservation record; KEYS[n+2]: expiry set; KEYS[n+3]: idempotency
# key (only when ARGV[7] == '1').
# ARGV[1]: n; ARGV[2]: reservation id; ARGV[3]: ttl ms; ARGV[4]: estimated tokens; ARGV[5]: nb
# (budgets); ARGV[6]: estimated cost (nano-USD, decimal string); ARGV[7]: '1' to use the
# idempotency key; then per bucket: capacity, period ms, counts_tokens (1: costs the estimate,
# 0: costs one request); then per budget: key base (without window), period ('d'|'m'), limit,
# scope, scope id. Everything after ARGV[7] depends only on the subject and the configuration.
# Returns {1, expires_at_ms, advice (0/1), reservation id, replayed (0/1),
#          "used after" per budget joined by spaces, "window id" per budget joined by spaces}
#      or {0, retry_after_ms, {failed bucket indexes}, {{budget index, used, window id}, ...}}.
_RESERVE_BODY = """
local n = tonumber(ARGV[1])
local ttl = tonumber(ARGV[3])
local tokens_est = tonumber(ARGV[4])
local nb = tonumber(ARGV[5])
local cost_s = ARGV[6]
local cost = tonumber(cost_s)
local idem = ARGV[7] == '1'
local now = now_ms()
if idem then
  local seen = redis.call('GET', KEYS[n + 3])
  if seen then
    -- The same request reserved before: answer with that reservation, debit nothing.
    local rid, expires, advice = string.match(seen, '^(%S+) (%d+) (%d)$')
    return {1, tonumber(expires), tonumber(advice), rid, 1, '', ''}
  end
end
local have = {}
local failed = {}
local wait = 0
local vals = {}
if n > 0 then vals = redis.call('MGET', unpack(KEYS, 1, n)) end
-- Check every bucket and budget first; debit only if all have room (all-or-nothing).
local costs = {}
for i = 1, n do
  local o = 7 + (i - 1) * 3
  local cap, per = tonumber(ARGV[o + 1]), tonumber(ARGV[o + 2])
  local c = 1
  if ARGV[o + 3] == '1' then c = tokens_est end
  costs[i] = c
  local tokens = level(vals[i], cap, per, now)
  have[i] = tokens
  if tokens < c then
    failed[#failed + 1] = i
    -- A cost above the capacity never fits; a full period is the honest "not soon".
    local need = per
    if c <= cap then need = math.ceil((c - tokens) * per / cap) end
    if need > wait then wait = need end
  end
end
local bo = 7 + n * 3
local bkey, bused, bwin, bend, bnew = {}, {}, {}, {}, {}
local bfailed = {}
local windows = {}
for j = 1, nb do
  local o = bo + (j - 1) * 5
  local limit = tonumber(ARGV[o + 3])
  local period = ARGV[o + 2]
  if not windows[period] then windows[period] = {window(period, now)} end
  local id, wend = windows[period][1], windows[period][3]
  local key = ARGV[o + 1] .. id
  local st = redis.call('HMGET', key, 's', 'h')
  local used = (tonumber(st[1]) or 0) + (tonumber(st[2]) or 0)
  bkey[j], bused[j], bwin[j], bend[j], bnew[j] = key, used, id, wend, not st[1] and not st[2]
  -- At 100 % nothing more is admitted, and a reservation must fit in what is left.
  if used >= limit or used + cost > limit then
    bfailed[#bfailed + 1] = {j, fmt(used), id}
    if wend - now > wait then wait = wend - now end
  end
end
if #failed > 0 or #bfailed > 0 then return {0, wait, failed, bfailed} end
local expires = now + ttl
local lines = {fmt(tokens_est) .. ' ' .. fmt(expires)}
for i = 1, n do
  local o = 7 + (i - 1) * 3
  local cap, per, c = tonumber(ARGV[o + 1]), tonumber(ARGV[o + 2]), costs[i]
  store(KEYS[i], have[i] - c, cap, per, now)
  lines[#lines + 1] = 'b ' .. KEYS[i] .. ' ' .. fmt(c) .. ' ' .. ARGV[o + 1] .. ' ' .. ARGV[o + 2] .. ' ' .. ARGV[o + 3]
end
local advice = 0
local after = {}
for j = 1, nb do
  local o = bo + (j - 1) * 5
  local limit = tonumber(ARGV[o + 3])
  if cost > 0 then
    redis.call('HINCRBY', bkey[j], 'h', cost_s)
    -- The window's end is fixed: the TTL set when the counter is created stays right.
    if bnew[j] then keep_until(bkey[j], bend[j], now) end
  end
  after[j] = fmt(bused[j] + cost)
  if bused[j] + cost >= threshold(limit, PREFER_CHEAPER_PCT) then advice = 1 end
  lines[#lines + 1] = 'm ' .. bkey[j] .. ' ' .. cost_s .. ' ' .. ARGV[o + 3] .. ' ' .. ARGV[o + 2] .. ' ' .. bwin[j]
                      .. ' ' .. fmt(bend[j]) .. ' ' .. ARGV[o + 4] .. ' ' .. ARGV[o + 5]
end
local keep = fmt(ttl + RECORD_GRACE_MS)
redis.call('SET', KEYS[n + 1], table.concat(lines, '\\n'), 'PX', keep)
redis.call('ZADD', KEYS[n + 2], fmt(expires), ARGV[2])
if idem then redis.call('SET', KEYS[n + 3], ARGV[2] .. ' ' .. fmt(expires) .. ' ' .. advice, 'PX', keep) end
return {1, expires, advice, ARGV[2], 0, table.concat(after, ' '), table.concat(bwin, ' ')}
"""

# KEYS[1]: reservation record; KEYS[2]: expiry set; KEYS[3]: budget alert stream.
# ARGV[1]: reservation id; ARGV[2]: 'commit' | 'release'; ARGV[3]: actual tokens; ARGV[4]: actual cost.
# Returns {0} when there is no such (unsettled) reservation, else {1, refunded tokens}.
_SETTLE_BODY = """
local raw = redis.call('GET', KEYS[1])
if not raw then return {0} end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return {1, settle(raw, ARGV[2], tonumber(ARGV[3]), ARGV[4], now_ms(), KEYS[3])}
"""

# KEYS[1]: expiry set. ARGV[1]: reservation record key prefix; ARGV[2]: batch size.
# Refunds up to a batch of expired reservations. Returns {ids looked at, reservations refunded}.
# Atomic per batch: a reservation is refunded by exactly one of sweep, commit or release.
_SWEEP_BODY = """
local now = now_ms()
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
local refunded = 0
for _, id in ipairs(ids) do
  local key = ARGV[1] .. id
  local raw = redis.call('GET', key)
  if raw then
    settle(raw, 'release', 0, '0', now, '')
    redis.call('DEL', key)
    refunded = refunded + 1
  end
  redis.call('ZREM', KEYS[1], id)
end
return {#ids, refunded}
"""

# KEYS: buckets. ARGV[1]: n buckets; then capacity, period ms per bucket; then per budget: key
# base, period. Returns {{tokens per bucket (strings: Redis would truncate Lua numbers)},
# {{spent, held, window id, start ms, end ms} per budget}}.
_USAGE_BODY = """
local now = now_ms()
local n = tonumber(ARGV[1])
local out = {}
local vals = {}
if n > 0 then vals = redis.call('MGET', unpack(KEYS, 1, n)) end
for i = 1, n do
  out[i] = string.format('%.17g', level(vals[i], tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1]), now))
end
local budgets = {}
local j = 1
for o = 2 + 2 * n, #ARGV, 2 do
  local id, wstart, wend = window(ARGV[o + 1], now)
  local st = redis.call('HMGET', ARGV[o] .. id, 's', 'h')
  budgets[j] = {st[1] or '0', st[2] or '0', id, wstart, wend}
  j = j + 1
end
return {out, budgets}
"""

# KEYS[1]: a budget window's counter. ARGV[1]: spend per the ledger; ARGV[2]: the window's end (ms).
# Raises the committed spend to the ledger's figure (never lowers it: events still on their way to
# the ledger were committed here already). Returns {spent before, spent after, held}.
_RECONCILE_BODY = """
local now = now_ms()
local wend = tonumber(ARGV[2])
local st = redis.call('HMGET', KEYS[1], 's', 'h')
local before = tonumber(st[1]) or 0
local ledger = tonumber(ARGV[1])
local spent = before
if ledger > before and now < wend + WINDOW_KEEP_MS then
  redis.call('HSET', KEYS[1], 's', ARGV[1])
  keep_until(KEYS[1], wend, now)
  spent = ledger
end
return {fmt(before), fmt(spent), st[2] or '0'}
"""

# KEYS: budget counters. ARGV: amounts (decimal strings), then each window's end (ms), one per key.
# Adds spend committed by the local fallback while Redis was away.
_ADD_SPEND_BODY = """
local now = now_ms()
local n = #KEYS
for i = 1, n do
  local wend = tonumber(ARGV[n + i])
  if now < wend + WINDOW_KEEP_MS then
    redis.call('HINCRBY', KEYS[i], 's', ARGV[i])
    keep_until(KEYS[i], wend, now)
  end
end
return n
"""

# KEYS: buckets. ARGV: per bucket its capacity, period ms and amount (decimal string; negative
# gives back). Applies what the local fallback admitted (and refunded) while Redis was away.
# A draw never refuses and stops at zero (a level commits took below zero stays where it is): an
# outage's worth of local admissions must not lock a key out for periods to come. Returns n.
_DRAW_BODY = """
local n = #KEYS
local vals = redis.call('MGET', unpack(KEYS))
local now = now_ms()
for i = 1, n do
  local o = (i - 1) * 3
  local cap, per, amount = tonumber(ARGV[o + 1]), tonumber(ARGV[o + 2]), tonumber(ARGV[o + 3])
  if amount < 0 then
    adjust(KEYS[i], vals[i], -amount, cap, per, now)
  elseif amount > 0 then
    draw(KEYS[i], vals[i], amount, cap, per, now)
  end
end
return n
"""

# KEYS[1..n]: buckets; KEYS[n+1]: idempotency key; KEYS[n+2]: budget alert stream.
# ARGV[1]: n; ARGV[2]: nb (budgets); ARGV[3]: requests; ARGV[4]: tokens; ARGV[5]: cost (nano-USD,
# decimal string); ARGV[6]: when the usage happened (ms, or 'now'); ARGV[7]: how long the idempotency
# key lives (ms); then per bucket and per budget the arguments a reserve takes after its own
# (capacity, period ms, counts_tokens; key base, period, limit, scope, scope id).
# Charges usage admitted without this service (the router's local limiter): every bucket drawn
# without refusing, stopping at zero (`draw`), unless its period has passed since the usage; the
# cost added to the committed spend of the budget windows holding the usage, with alerts, as a
# commit does. Returns 1, or 0 when the idempotency key was there already (nothing drawn).
_CHARGE_BODY = """
local n = tonumber(ARGV[1])
local nb = tonumber(ARGV[2])
if redis.call('EXISTS', KEYS[n + 1]) == 1 then return 0 end
local now = now_ms()
local at = now
if ARGV[6] ~= 'now' then at = math.min(now, tonumber(ARGV[6])) end
local requests, tokens = tonumber(ARGV[3]), tonumber(ARGV[4])
local vals = {}
if n > 0 then vals = redis.call('MGET', unpack(KEYS, 1, n)) end
for i = 1, n do
  local o = 7 + (i - 1) * 3
  local cap, per = tonumber(ARGV[o + 1]), tonumber(ARGV[o + 2])
  local amount = requests
  if ARGV[o + 3] == '1' then amount = tokens end
  if amount > 0 and now - at < per then draw(KEYS[i], vals[i], amount, cap, per, now) end
end
local cost = ARGV[5]
if cost ~= '0' then
  local bo = 7 + n * 3
  for j = 1, nb do
    local o = bo + (j - 1) * 5
    local period = ARGV[o + 2]
    local id, _, wend = window(period, at)
    if now < wend + WINDOW_KEEP_MS then
      local key = ARGV[o + 1] .. id
      local spent = redis.call('HINCRBY', key, 's', cost)
      keep_until(key, wend, now)
      if spent >= threshold(tonumber(ARGV[o + 3]), ALERT_PCTS[1]) then
        alert(KEYS[n + 2], {k = key, l = ARGV[o + 3], s = ARGV[o + 4], i = ARGV[o + 5], p = period, w = id,
                            r = wend}, spent, now)
      end
    end
  end
end
redis.call('SET', KEYS[n + 1], '1', 'PX', ARGV[7])
return 1
"""


@dataclass(frozen=True)
class Scripts:
    """The script texts, all on one clock."""

    reserve: str
    settle: str
    sweep: str
    usage: str
    reconcile: str
    add_spend: str
    draw: str
    charge: str


def build(clock: str = REDIS_CLOCK) -> Scripts:
    prelude = _CONSTANTS + clock + _FUNCTIONS
    return Scripts(reserve=prelude + _RESERVE_BODY, settle=prelude + _SETTLE_BODY, sweep=prelude + _SWEEP_BODY,
                   usage=prelude + _USAGE_BODY, reconcile=prelude + _RECONCILE_BODY,
                   add_spend=prelude + _ADD_SPEND_BODY, draw=prelude + _DRAW_BODY,
                   charge=prelude + _CHARGE_BODY)


SCRIPTS = build()
PRELUDE = _CONSTANTS + REDIS_CLOCK + _FUNCTIONS
