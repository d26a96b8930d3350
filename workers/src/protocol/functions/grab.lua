-- seckill_v3_grab: a batch of customers each grab one coupon of one
-- promotion, in one atomic call (the command worker's group commit).
-- keys: state hash, customers hash, event stream.
-- args: customer ids in arrival order (the same one may appear twice).
--
-- Per batch, whatever its size: one HMGET of the state, one TIME, one
-- HMGET of the batch's customers in the customers hash; then, if anyone
-- got a coupon, one HSET of the new holders (c -> "<seq>:<grantedAtMs>"),
-- one XADD of a CouponGrabbed version 3 holding them all (plain fields, no
-- JSON; `append_grants`) and one HSET of `granted`. Redis commands cost
-- per call far more than per field, so this is about half of what a
-- command per customer (HSETNX + XADD each, version 2) cost Redis per
-- grant (docs/BENCHMARKS.md).
-- A holder (also the same customer twice in one batch: the second gets
-- the first's coupon) is answered its coupon, before the sale, after it
-- and whatever the stock (the idempotent retry holds after the sale);
-- while stock lasts a new customer gets the next coupon; past the last
-- coupon, or once the promotion is over, others are told it is over.
-- Coupons are numbered in arrival order.
--
-- The window is checked on Redis' clock. Grabs open exactly at publish time
-- even when the operator's start is late: the first grab appends
-- PromotionStarted itself, so Started always precedes the first CouponGrabbed.
-- The batch that takes the last coupon appends PromotionFinished{SoldOut};
-- one past the finish time appends PromotionFinished{Expired}; each once.
--
-- Reply, decoded by `workers::protocol::decode_reply`:
--   { 'unknown_promotion', now }
--   { 'not_started', now, opens_in_ms, publishTime }
--   { 'sharded', now, S } (a shard of a sharded promotion: seckill_v3_shard_grab)
--   or, for a batch the window lets through, one string of lines joined by
--   "\n": batch, now, discount, over_reason or '', sold_out_now (0|1), then
--   one line per customer: g<seq> | a<held value> | x
-- where g = granted now (grantedAtMs = now), a = already held (value
-- "<seq>:<ms>", or a version 1 coupon JSON, which holds no raw newline),
-- x = none left (over_reason). One string rather than an array of two
-- items per customer: the worker's Redis client parses each item of a
-- reply on its own, and that was about 8 % of a grab's instructions in the
-- worker (callgrind, docs/BENCHMARKS.md).
redis.register_function('seckill_v3_grab', function(keys, args)
  local key, customers, stream = keys[1], keys[2], keys[3]
  local s = state_of(key)
  local now = now_ms()
  if not s then
    return { 'unknown_promotion', now }
  end
  if s.shards then
    return { 'sharded', now, s.shards }
  end
  if s.phase ~= 'Finished' then
    if now < s.publish_ms then
      return { 'not_started', now, s.publish_ms - now, s.publish_time }
    end
    ensure_started(key, stream, s, now)
    if now >= s.finish_ms then
      finish_now(key, stream, s, 'Expired', now)
    end
  end
  local open = s.phase ~= 'Finished'
  local granted = s.granted
  local coupons = s.coupons
  local reply = { 'batch', now, s.discount_text, '', 0 }
  local held = hmget_all(customers, args)
  local at = ':' .. now
  local mine = {}    -- customer -> the coupon granted in this batch
  local writes = {}  -- customer, coupon, customer, coupon, ...
  local new = {}     -- the customers granted now, in coupon order
  -- Numbers stay numbers in the loop and become text once each (Lua 5.1
  -- formats a number with sprintf at every concatenation); table sizes are
  -- counted rather than asked of `#`.
  local w, n = 0, 0
  for i = 1, #args do
    local c = args[i]
    local h = held[i] or mine[c]
    if h then
      reply[5 + i] = 'a' .. h
    elseif open and granted < coupons then
      granted = granted + 1
      local seq = tostring(granted)
      local coupon = seq .. at
      mine[c] = coupon
      writes[w + 1], writes[w + 2], w = c, coupon, w + 2
      n = n + 1
      new[n] = c
      reply[5 + i] = 'g' .. seq
    else
      reply[5 + i] = 'x'
    end
  end
  if granted > s.granted then
    hset_all(customers, writes)
    append_grants(stream, s.granted + 1, new, now)
    redis.call('HSET', key, 'granted', granted)
    s.granted = granted
    if open and granted >= coupons then
      finish_now(key, stream, s, 'SoldOut', now)
      reply[5] = 1
    end
  end
  if s.phase == 'Finished' then
    reply[4] = s.finish_reason
  elseif granted >= coupons then
    -- Unreachable while the sold-out finish above holds; kept as the last
    -- guard against oversell should the state ever be edited by hand.
    reply[4] = 'SoldOut'
  end
  return table.concat(reply, '\n')
end)
