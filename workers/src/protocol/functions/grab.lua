-- seckill_v2_grab: a batch of customers each grab one coupon of one
-- promotion, in one atomic call (the command worker's group commit).
-- keys: state hash, customers hash, event stream.
-- args: customer ids in arrival order (the same one may appear twice).
--
-- Per batch: one HMGET of the state, one TIME. Per customer while stock
-- lasts: HSETNX customers c "<seq>:<grantedAtMs>"; 1 -> XADD CouponGrabbed
-- version 2 (plain fields, no JSON), 0 -> HGET (already granted, also the
-- same customer twice in one batch: the second gets the first's coupon).
-- Past the last coupon, or once the promotion is over, HGET: a holder still
-- gets its coupon (the idempotent retry holds after the sale); others are
-- told it is over. Then one HSET of `granted`. Coupons are numbered in
-- arrival order.
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
--   { 'sharded', now, S } (a shard of a sharded promotion: seckill_v2_shard_grab)
--   or, for a batch the window lets through, one string of lines joined by
--   "\n": batch, now, discount, over_reason or '', sold_out_now (0|1), then
--   one line per customer: g<seq> | a<held value> | x
-- where g = granted now (grantedAtMs = now), a = already held (value
-- "<seq>:<ms>", or a version 1 coupon JSON, which holds no raw newline),
-- x = none left (over_reason). One string rather than an array of two
-- items per customer: the worker's Redis client parses each item of a
-- reply on its own, and that was about 8 % of a grab's instructions in the
-- worker (callgrind, docs/BENCHMARKS.md).
redis.register_function('seckill_v2_grab', function(keys, args)
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
  for i = 1, #args do
    local c = args[i]
    if open and granted < coupons then
      local seq = granted + 1
      if redis.call('HSETNX', customers, c, seq .. ':' .. now) == 1 then
        granted = seq
        redis.call('XADD', stream, '*', 'type', 'CouponGrabbed', 'version', '2',
          'customerId', c, 'seq', seq, 'grantedAtMs', now)
        reply[5 + i] = 'g' .. seq
      else
        reply[5 + i] = 'a' .. redis.call('HGET', customers, c)
      end
    else
      local held = redis.call('HGET', customers, c)
      if held then
        reply[5 + i] = 'a' .. held
      else
        reply[5 + i] = 'x'
      end
    end
  end
  if granted > s.granted then
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
