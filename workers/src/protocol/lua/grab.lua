-- grab: one customer takes one coupon, in one atomic round trip.
-- KEYS[1] state hash, KEYS[2] customers hash, KEYS[3] event stream.
-- ARGV[1] customer id.
-- The window is checked on Redis' clock. Grabs open exactly at publish time even
-- when the operator's start is late: the first grab appends PromotionStarted
-- itself, so Started always precedes the first CouponGrabbed. The grab that
-- takes the last coupon appends PromotionFinished{SoldOut}; one past the finish
-- time appends PromotionFinished{Expired}; each exactly once.
local key, customers, stream = KEYS[1], KEYS[2], KEYS[3]
local customer = ARGV[1]
local s = state_of(key)
if not s then
  return cjson.encode({ outcome = 'unknown_promotion' })
end
local held = redis.call('HGET', customers, customer)
if held then
  return cjson.encode({ outcome = 'already_granted', coupon = cjson.decode(held) })
end
if s.phase == 'Finished' then
  if s.finish_reason == 'SoldOut' then
    return cjson.encode({ outcome = 'sold_out' })
  end
  return cjson.encode({ outcome = 'finished', reason = s.finish_reason })
end
local now = now_ms()
if now < s.publish_ms then
  return cjson.encode({ outcome = 'not_started', opensInMs = s.publish_ms - now, publishTime = s.publish_time })
end
ensure_started(key, stream, s, now)
if now >= s.finish_ms then
  finish_now(key, stream, s, 'Expired', now)
  return cjson.encode({ outcome = 'finished', reason = 'Expired' })
end
if s.granted >= s.coupons then
  -- Unreachable while the sold-out finish below holds; kept as the last guard
  -- against oversell should the state ever be edited by hand.
  return cjson.encode({ outcome = 'sold_out' })
end
local seq = redis.call('HINCRBY', key, 'granted', 1)
s.granted = seq
local coupon = {
  couponId = s.promotion .. '#' .. seq, customerId = customer, promotion = s.promotion,
  discount = s.discount, grantedAt = rfc3339(now),
}
redis.call('HSET', customers, customer, cjson.encode(coupon))
coupon['type'] = 'CouponGrabbed'
append(stream, coupon)
coupon['type'] = nil
coupon['version'] = nil
local sold_out = false
if seq >= s.coupons then
  finish_now(key, stream, s, 'SoldOut', now)
  sold_out = true
end
return cjson.encode({ outcome = 'granted', coupon = coupon, soldOut = sold_out })
