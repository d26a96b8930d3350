#!lua name=seckill_v3
-- The seckill Redis Functions library, protocol version 3: every command-side
-- function of the protocol (and the read side's, if any), loaded once per
-- master with FUNCTION LOAD REPLACE instead of a prelude sent and run with
-- every call. `workers::protocol::functions` assembles this file and the
-- ones after it into one library at compile time. Function names carry the
-- version (seckill_v3_*) so that two releases can coexist during a rolling
-- upgrade without FUNCTION LOAD REPLACE flip-flopping one library.
--
-- This head holds the helpers shared by every function, defined once.
--
-- Time always comes from Redis' own clock (TIME), never from the caller's host:
-- a worker or operator whose clock is skewed can open or close nothing early.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- RFC 3339 UTC timestamp with milliseconds from epoch milliseconds
-- (days-from-civil inverse, proleptic Gregorian calendar). Only the rare
-- lifecycle events use it; grabs carry epoch milliseconds and Rust renders them.
local function rfc3339(ms)
  local secs = math.floor(ms / 1000)
  local millis = ms - secs * 1000
  local days = math.floor(secs / 86400)
  local rem = secs - days * 86400
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local y = yoe + era * 400
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m
  if mp < 10 then m = mp + 3 else m = mp - 9 end
  if m <= 2 then y = y + 1 end
  return string.format('%04d-%02d-%02dT%02d:%02d:%02d.%03dZ', y, m, d,
    math.floor(rem / 3600), math.floor((rem % 3600) / 60), rem % 60, millis)
end

-- Appends one version 1 event (PromotionStarted, PromotionFinished): a JSON
-- object with `type` and `version` in the single field `event`. They are rare,
-- so cjson costs nothing that matters there.
local function append_json(stream, event)
  event['version'] = 1
  return redis.call('XADD', stream, '*', 'event', cjson.encode(event))
end

-- Appends one CouponGrabbed version 3 (`workers::protocol::grab_entry`):
-- the grants of one grab call that took coupons first_seq, first_seq + 1,
-- ..., in one entry: one XADD per batch instead of one per grant.
-- `shard_granted`: a shard's count of grants after the last of them (the
-- grabs of a sharded promotion only).
local function append_grants(stream, first_seq, customers, now, shard_granted)
  if #customers == 0 then return end
  local ids = table.concat(customers, ' ')
  if shard_granted then
    redis.call('XADD', stream, '*', 'type', 'CouponGrabbed', 'version', '3',
      'firstSeq', first_seq, 'grantedAtMs', now, 'customerIds', ids,
      'shardGranted', shard_granted)
  else
    redis.call('XADD', stream, '*', 'type', 'CouponGrabbed', 'version', '3',
      'firstSeq', first_seq, 'grantedAtMs', now, 'customerIds', ids)
  end
end

-- Lua's unpack stops near 8,000 values; a batch may hold 4,096 customers
-- (8,192 values to HSET), so the batch's hash reads and writes go in slices.
local SLICE = 1000

-- HMGET of every field of `fields` (a list) from index `from` (default 1)
-- on, in slices: the values, in order, the first at 1 (false where absent).
local function hmget_all(key, fields, from)
  from = from or 1
  local out = {}
  for i = from, #fields, SLICE do
    local part = redis.call('HMGET', key, unpack(fields, i, math.min(i + SLICE - 1, #fields)))
    for j = 1, #part do out[i - from + j] = part[j] end
  end
  return out
end

-- HSET of `pairs` (field, value, field, value, ...) in slices.
local function hset_all(key, pairs)
  for i = 1, #pairs, 2 * SLICE do
    redis.call('HSET', key, unpack(pairs, i, math.min(i + 2 * SLICE - 1, #pairs)))
  end
end

-- A promotion's (or shard's) state in one HMGET. `...`: more fields to read
-- in the same call, answered as v[15], v[16], ... of the second value.
local function state_of(key, ...)
  local v = redis.call('HMGET', key, 'phase', 'started', 'discount', 'coupons', 'granted',
    'publish_ms', 'finish_ms', 'publish_time', 'finish_time', 'started_at', 'finished_at',
    'finish_reason', 'promotion', 'shards', ...)
  if not v[1] then return nil end
  return {
    phase = v[1], started = v[2] == '1', discount = tonumber(v[3]), coupons = tonumber(v[4]),
    granted = tonumber(v[5]) or 0, publish_ms = tonumber(v[6]), finish_ms = tonumber(v[7]),
    publish_time = v[8], finish_time = v[9], started_at = v[10], finished_at = v[11],
    finish_reason = v[12], promotion = v[13], discount_text = v[3],
    -- Present only on the shards of a sharded promotion (shards.lua), which
    -- the unsharded functions refuse to touch.
    shards = tonumber(v[14]),
  }, v
end

-- Appends PromotionStarted exactly once: the `started` flag is set in the same
-- atomic call, so however often or concurrently this runs, one event results.
local function ensure_started(key, stream, s, now)
  if s.started then return false end
  local at = rfc3339(now)
  append_json(stream, {
    type = 'PromotionStarted', promotion = s.promotion, discount = s.discount,
    numberOfCoupons = s.coupons, publishTime = s.publish_time, finishTime = s.finish_time,
    startedAt = at,
  })
  redis.call('HSET', key, 'started', '1', 'phase', 'Active', 'started_at', at)
  s.started = true
  s.phase = 'Active'
  s.started_at = at
  return true
end

-- Appends PromotionFinished exactly once (guarded by phase = Finished).
local function finish_now(key, stream, s, reason, now)
  local at = rfc3339(now)
  append_json(stream, {
    type = 'PromotionFinished', promotion = s.promotion, reason = reason,
    granted = s.granted, finishedAt = at,
  })
  redis.call('HSET', key, 'phase', 'Finished', 'finish_reason', reason, 'finished_at', at)
  s.phase = 'Finished'
  s.finish_reason = reason
  s.finished_at = at
end

-- The answer of every lifecycle function: one JSON document (they are rare).
local function snapshot(result, s, now)
  if not s then
    return cjson.encode({ result = result, exists = false, now = now })
  end
  return cjson.encode({
    result = result, exists = true, now = now, phase = s.phase, started = s.started,
    discount = s.discount, numberOfCoupons = s.coupons, granted = s.granted,
    publishMs = s.publish_ms, finishMs = s.finish_ms, startedAt = s.started_at or false,
    finishedAt = s.finished_at or false, finishReason = s.finish_reason or false,
  })
end
